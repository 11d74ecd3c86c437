//! Prometheus metrics, `/healthz` and `/readyz`, served by a tiny HTTP/1.0 responder
//! on a tokio `TcpListener` (three GET routes do not need an HTTP framework).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lb_common::{Counter, Reason, map_names};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{debug, warn};

use super::model::{FrontendKey, IssueKind};

/// Upper bounds of the sync duration histogram, in seconds.
const SYNC_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Default)]
struct Histogram {
    buckets: [u64; SYNC_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// A programmed frontend, for per-service counters.
#[derive(Clone, Debug)]
pub struct ProgrammedFrontend {
    pub key: FrontendKey,
    pub id: u32,
    pub service: String,
    pub backends: usize,
}

/// Per-CPU counter maps read at scrape time.
pub struct StatsReader {
    stats: aya::maps::PerCpuArray<aya::maps::MapData, Counter>,
    svc_stats: aya::maps::PerCpuArray<aya::maps::MapData, Counter>,
}

impl StatsReader {
    pub fn open(pin_dir: &Path) -> Result<Self, aya::maps::MapError> {
        let open = |name: &str| -> Result<_, aya::maps::MapError> {
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(aya::maps::MapData::from_pin(
                pin_dir.join(name),
            )?))
        };
        Ok(Self { stats: open(map_names::STATS)?, svc_stats: open(map_names::SVC_STATS)? })
    }
    pub fn reason(&self, r: Reason) -> Counter {
        crate::datapath::counter_total(&self.stats, r as u32).unwrap_or_default()
    }
    pub fn service(&self, id: u32) -> Counter {
        crate::datapath::counter_total(&self.svc_stats, id).unwrap_or_default()
    }
}

/// Everything the agent exports. Shared between the sync loop, the watchers and the
/// HTTP responder.
#[derive(Default)]
pub struct Metrics {
    ready: AtomicBool,
    syncs: AtomicU64,
    sync_errors: AtomicU64,
    sync_hist: Mutex<Histogram>,
    last_sync_unix_ms: AtomicU64,
    map_writes: AtomicU64,
    frontends: AtomicU64,
    endpoints: AtomicU64,
    watch_restarts: Mutex<BTreeMap<&'static str, u64>>,
    watch_errors: Mutex<BTreeMap<&'static str, u64>>,
    decode_errors: Mutex<BTreeMap<&'static str, u64>>,
    source_errors: AtomicU64,
    source_error: AtomicBool,
    invalid_total: Mutex<BTreeMap<IssueKind, u64>>,
    invalid_now: Mutex<BTreeMap<IssueKind, u64>>,
    attached: AtomicU64,
    attach_errors: AtomicU64,
    attach_failing: Mutex<Vec<super::attach::AttachFailure>>,
    ct_entries: AtomicU64,
    ct_open_flows: AtomicU64,
    ct_expired_total: AtomicU64,
    ct_passes: AtomicU64,
    rp_filter: Mutex<super::rpfilter::RpFilterStatus>,
    programmed: Mutex<Arc<Vec<ProgrammedFrontend>>>,
    stats: Mutex<Option<StatsReader>>,
}

fn bump(m: &Mutex<BTreeMap<&'static str, u64>>, k: &'static str) {
    if let Ok(mut m) = m.lock() {
        *m.entry(k).or_default() += 1;
    }
}

impl Metrics {
    pub fn set_stats_reader(&self, r: StatsReader) {
        if let Ok(mut s) = self.stats.lock() {
            *s = Some(r);
        }
    }
    /// The initial sync is done.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }
    pub fn is_synced(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
    /// Synced, and every wanted attachment in place: without the uplink hook, say,
    /// every cross-node reply would go un-NATed.
    pub fn is_ready(&self) -> bool {
        self.not_ready_because().is_none()
    }
    /// Why `/readyz` fails, if it does.
    pub fn not_ready_because(&self) -> Option<String> {
        if !self.is_synced() {
            return Some("initial sync not done".into());
        }
        let failing = self.attach_failing.lock().map(|f| f.clone()).unwrap_or_default();
        if failing.is_empty() {
            return None;
        }
        let list: Vec<String> = failing.iter().map(|f| format!("{} ({}): {}", f.iface, f.hook, f.error)).collect();
        Some(format!("attach failing on {}", list.join("; ")))
    }
    pub fn conntrack_pass(&self, p: &super::conntrack::GcPass) {
        self.ct_entries.store(p.entries as u64, Ordering::Relaxed);
        self.ct_open_flows.store(p.open_flows as u64, Ordering::Relaxed);
        self.ct_expired_total.fetch_add(p.expired_flows as u64, Ordering::Relaxed);
        self.ct_passes.fetch_add(1, Ordering::Relaxed);
    }
    pub fn set_attach_failures(&self, f: &[super::attach::AttachFailure]) {
        if let Ok(mut m) = self.attach_failing.lock() {
            *m = f.to_vec();
        }
    }
    pub fn watch_restart(&self, resource: &'static str) {
        bump(&self.watch_restarts, resource);
    }
    pub fn watch_error(&self, resource: &'static str) {
        bump(&self.watch_errors, resource);
    }
    pub fn decode_error(&self, source: &'static str) {
        bump(&self.decode_errors, source);
    }
    /// The source could not be read as a whole (a YAML syntax error in the file
    /// source): it keeps its last good state until `set_source_ok`.
    pub fn source_error(&self) {
        self.source_errors.fetch_add(1, Ordering::Relaxed);
        self.source_error.store(true, Ordering::Relaxed);
    }
    pub fn set_source_ok(&self) {
        self.source_error.store(false, Ordering::Relaxed);
    }
    pub fn watch_restarts_total(&self) -> u64 {
        self.watch_restarts.lock().map(|m| m.values().sum()).unwrap_or(0)
    }
    pub fn sync_done(&self, took: Duration, ok: bool, writes: usize, frontends: usize, endpoints: usize) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.sync_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.map_writes.fetch_add(writes as u64, Ordering::Relaxed);
        self.frontends.store(frontends as u64, Ordering::Relaxed);
        self.endpoints.store(endpoints as u64, Ordering::Relaxed);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.last_sync_unix_ms.store(now.as_millis() as u64, Ordering::Relaxed);
        if let Ok(mut h) = self.sync_hist.lock() {
            let s = took.as_secs_f64();
            for (i, b) in SYNC_BUCKETS.iter().enumerate() {
                if s <= *b {
                    h.buckets[i] += 1;
                }
            }
            h.count += 1;
            h.sum += s;
        }
    }
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
    /// New issues (first seen in this sync) and the current count of each kind.
    pub fn issues(&self, new: &[&super::model::Issue], current: &[super::model::Issue]) {
        if let Ok(mut t) = self.invalid_total.lock() {
            for i in new {
                *t.entry(i.kind).or_default() += 1;
            }
        }
        if let Ok(mut n) = self.invalid_now.lock() {
            n.clear();
            for i in current {
                *n.entry(i.kind).or_default() += 1;
            }
        }
    }
    pub fn set_programmed(&self, p: Vec<ProgrammedFrontend>) {
        if let Ok(mut m) = self.programmed.lock() {
            *m = Arc::new(p);
        }
    }
    pub fn programmed(&self) -> Arc<Vec<ProgrammedFrontend>> {
        self.programmed.lock().map(|m| m.clone()).unwrap_or_default()
    }
    pub fn set_attached(&self, n: usize) {
        self.attached.store(n as u64, Ordering::Relaxed);
    }
    pub fn attach_error(&self) {
        self.attach_errors.fetch_add(1, Ordering::Relaxed);
    }
    pub fn set_rp_filter(&self, st: &super::rpfilter::RpFilterStatus) {
        if let Ok(mut m) = self.rp_filter.lock() {
            m.clone_from(st);
        }
    }
    pub fn rp_filter(&self) -> super::rpfilter::RpFilterStatus {
        self.rp_filter.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        let mut o2 = String::new();
        let g = |o: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(
            &mut o,
            "lb_ready",
            "gauge",
            "1 once the initial sync is done and every wanted attachment is in place.",
            u64::from(self.is_ready()),
        );
        g(
            &mut o,
            "lb_syncs_total",
            "counter",
            "Syncs of desired state to the maps.",
            self.syncs.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lb_sync_errors_total",
            "counter",
            "Syncs that failed (retried).",
            self.sync_errors.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lb_map_writes_total",
            "counter",
            "Map updates and deletes written by syncs.",
            self.map_writes.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lb_programmed_services",
            "gauge",
            "Frontends (ClusterIP, port, protocol) in the maps.",
            self.frontends.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lb_programmed_endpoints",
            "gauge",
            "Backend slots over all frontends.",
            self.endpoints.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lb_attached_interfaces",
            "gauge",
            "Interfaces the datapath is attached to.",
            self.attached.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lb_attach_errors_total",
            "counter",
            "Failed attach attempts.",
            self.attach_errors.load(Ordering::Relaxed),
        );
        if self.ct_passes.load(Ordering::Relaxed) > 0 {
            g(
                &mut o,
                "lb_conntrack_entries",
                "gauge",
                "Conntrack entries (two per flow) at the collector's last pass.",
                self.ct_entries.load(Ordering::Relaxed),
            );
            g(
                &mut o,
                "lb_conntrack_open_flows",
                "gauge",
                "Live flows not closed by a RST or both FINs, at the collector's last pass.",
                self.ct_open_flows.load(Ordering::Relaxed),
            );
            g(
                &mut o,
                "lb_conntrack_expired_total",
                "counter",
                "Flows the collector deleted as past their timeout.",
                self.ct_expired_total.load(Ordering::Relaxed),
            );
        }
        let failing = self.attach_failing.lock().map(|f| f.clone()).unwrap_or_default();
        let _ = writeln!(
            o,
            "# HELP lb_attach_failing Wanted attachments not in place (retried with backoff; the agent is not ready meanwhile).\n# TYPE lb_attach_failing gauge"
        );
        if failing.is_empty() {
            let _ = writeln!(o, "lb_attach_failing 0");
        }
        for f in &failing {
            let _ = writeln!(
                o,
                "lb_attach_failing{{interface=\"{}\",hook=\"{}\"}} 1",
                f.iface.replace('\\', "\\\\").replace('"', "\\\""),
                f.hook
            );
        }
        g(
            &mut o,
            "lb_source_errors_total",
            "counter",
            "Reads of the source rejected as a whole (YAML syntax errors in the file source).",
            self.source_errors.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lb_source_error",
            "gauge",
            "1 while the source's latest read was rejected and the last good state is kept.",
            u64::from(self.source_error.load(Ordering::Relaxed)),
        );
        let rp = self.rp_filter();
        if let Some(all) = rp.all {
            g(
                &mut o,
                "lb_rp_filter_all",
                "gauge",
                "net.ipv4.conf.all.rp_filter in the agent's namespace (1, strict, drops every reverse-NATed reply).",
                u64::from(all),
            );
        }
        g(
            &mut o,
            "lb_rp_filter_problem",
            "gauge",
            "1 while rp_filter would drop reverse-NATed replies: conf.all strict, or an attached interface whose rp_filter could not be set to 0.",
            u64::from(rp.warning.is_some() || !rp.ifaces_failed.is_empty()),
        );
        let last = self.last_sync_unix_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(
            o,
            "# HELP lb_last_sync_timestamp_seconds Unix time of the last sync.\n# TYPE lb_last_sync_timestamp_seconds gauge\nlb_last_sync_timestamp_seconds {last:.3}"
        );
        if let Ok(h) = self.sync_hist.lock() {
            let _ = writeln!(
                o,
                "# HELP lb_sync_duration_seconds Time from snapshot to maps written.\n# TYPE lb_sync_duration_seconds histogram"
            );
            for (i, b) in SYNC_BUCKETS.iter().enumerate() {
                let _ = writeln!(o, "lb_sync_duration_seconds_bucket{{le=\"{b}\"}} {}", h.buckets[i]);
            }
            let _ = writeln!(o, "lb_sync_duration_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
            let _ =
                writeln!(o, "lb_sync_duration_seconds_sum {:.6}\nlb_sync_duration_seconds_count {}", h.sum, h.count);
        }
        let labelled = |o: &mut String, name: &str, help: &str, label: &str, m: &Mutex<BTreeMap<&'static str, u64>>| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            if let Ok(m) = m.lock() {
                for (k, v) in m.iter() {
                    let _ = writeln!(o, "{name}{{{label}=\"{k}\"}} {v}");
                }
            }
        };
        labelled(
            &mut o,
            "lb_watch_restarts_total",
            "Re-lists of a watched resource after the first list.",
            "resource",
            &self.watch_restarts,
        );
        labelled(
            &mut o,
            "lb_watch_errors_total",
            "Watch errors (each is followed by a backoff and a resume).",
            "resource",
            &self.watch_errors,
        );
        labelled(
            &mut o,
            "lb_decode_errors_total",
            "Objects or documents that could not be decoded.",
            "source",
            &self.decode_errors,
        );
        let _ = writeln!(
            o,
            "# HELP lb_invalid_objects_total Problems found in objects (counted once when first seen).\n# TYPE lb_invalid_objects_total counter"
        );
        let _ = writeln!(
            o2,
            "# HELP lb_invalid_objects Problems present in the current objects.\n# TYPE lb_invalid_objects gauge"
        );
        if let (Ok(t), Ok(n)) = (self.invalid_total.lock(), self.invalid_now.lock()) {
            for k in IssueKind::ALL {
                let _ = writeln!(
                    o,
                    "lb_invalid_objects_total{{reason=\"{}\"}} {}",
                    k.name(),
                    t.get(&k).copied().unwrap_or(0)
                );
                let _ =
                    writeln!(o2, "lb_invalid_objects{{reason=\"{}\"}} {}", k.name(), n.get(&k).copied().unwrap_or(0));
            }
        }
        o.push_str(&o2);
        if let Ok(guard) = self.stats.lock()
            && let Some(r) = guard.as_ref()
        {
            let _ = writeln!(
                o,
                "# HELP lb_datapath_packets_total Packets by datapath verdict reason.\n# TYPE lb_datapath_packets_total counter"
            );
            let counters: Vec<(Reason, Counter)> = Reason::ALL.iter().map(|&x| (x, r.reason(x))).collect();
            for (x, c) in &counters {
                let _ = writeln!(o, "lb_datapath_packets_total{{reason=\"{}\"}} {}", x.name(), c.packets);
            }
            let _ = writeln!(
                o,
                "# HELP lb_datapath_bytes_total Bytes by datapath verdict reason.\n# TYPE lb_datapath_bytes_total counter"
            );
            for (x, c) in &counters {
                let _ = writeln!(o, "lb_datapath_bytes_total{{reason=\"{}\"}} {}", x.name(), c.bytes);
            }
            let programmed = self.programmed();
            let _ = writeln!(
                o,
                "# HELP lb_service_packets_total Packets through a frontend (forward and reply).\n# TYPE lb_service_packets_total counter"
            );
            let per: Vec<(&ProgrammedFrontend, Counter)> = programmed.iter().map(|p| (p, r.service(p.id))).collect();
            for (p, c) in &per {
                let _ = writeln!(
                    o,
                    "lb_service_packets_total{{service=\"{}\",frontend=\"{}\"}} {}",
                    p.service, p.key, c.packets
                );
            }
            let _ = writeln!(
                o,
                "# HELP lb_service_bytes_total Bytes through a frontend (forward and reply).\n# TYPE lb_service_bytes_total counter"
            );
            for (p, c) in &per {
                let _ = writeln!(
                    o,
                    "lb_service_bytes_total{{service=\"{}\",frontend=\"{}\"}} {}",
                    p.service, p.key, c.bytes
                );
            }
        }
        o
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the task is dropped.
/// Returns the address bound (for port 0) and the serving task.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz");
    Ok((
        bound,
        tokio::spawn(async move {
            loop {
                let (mut sock, peer) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut n = 0;
                    let read = tokio::time::timeout(Duration::from_secs(5), async {
                        while n < buf.len() {
                            let r = sock.read(&mut buf[n..]).await?;
                            if r == 0 {
                                break;
                            }
                            n += r;
                            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
                                || buf[..n].windows(2).any(|w| w == b"\n\n")
                            {
                                break;
                            }
                        }
                        Ok::<_, std::io::Error>(())
                    })
                    .await;
                    if !matches!(read, Ok(Ok(()))) {
                        return;
                    }
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let mut parts = req.split_whitespace();
                    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let path = path.split('?').next().unwrap_or("");
                    debug!(%peer, method, path, "http");
                    let (status, ctype, body) = match (method, path) {
                        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
                        ("GET", "/readyz") => match metrics.not_ready_because() {
                            None => ("200 OK", "text/plain", "ok\n".to_string()),
                            Some(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
                        },
                        ("GET", _) => {
                            ("404 Not Found", "text/plain", "try /metrics, /healthz or /readyz\n".to_string())
                        }
                        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
                    };
                    let head = format!(
                        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    if method != "HEAD" {
                        let _ = sock.write_all(body.as_bytes()).await;
                    }
                    let _ = sock.shutdown().await;
                });
            }
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::model::{Issue, Protocol};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn health_ready_and_metrics() {
        let m = Arc::new(Metrics::default());
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), m.clone()).await.unwrap();
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.0 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.0 503"));
        m.sync_done(Duration::from_millis(3), true, 12, 2, 5);
        m.set_ready();
        m.watch_restart("services");
        m.source_error();
        let issue = Issue { kind: IssueKind::InvalidIp, object: "Service a/b".into(), detail: "x".into() };
        m.issues(&[&issue], std::slice::from_ref(&issue));
        m.set_programmed(vec![ProgrammedFrontend {
            key: FrontendKey { ip: "10.96.0.1".parse().unwrap(), port: 443, proto: Protocol::Tcp },
            id: 1,
            service: "default/kubernetes:https".into(),
            backends: 1,
        }]);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.0 200"));
        let body = get(addr, "/metrics").await;
        for line in [
            "lb_ready 1",
            "lb_syncs_total 1",
            "lb_programmed_services 2",
            "lb_programmed_endpoints 5",
            "lb_watch_restarts_total{resource=\"services\"} 1",
            "lb_invalid_objects_total{reason=\"invalid_ip\"} 1",
            "lb_invalid_objects{reason=\"invalid_ip\"} 1",
            "lb_sync_duration_seconds_bucket{le=\"0.005\"} 1",
            "lb_sync_duration_seconds_count 1",
            "lb_source_errors_total 1",
            "lb_source_error 1",
        ] {
            assert!(body.lines().any(|l| l == line), "missing {line:?} in\n{body}");
        }
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.0 404"));
        task.abort();
    }
}
