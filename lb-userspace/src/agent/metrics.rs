//! Prometheus metrics, `/healthz` and `/readyz`.
//!
//! The metrics live in a `prometheus-client` [`Registry`]; what is only known at scrape
//! time (the datapath's per-CPU counters, attach failures, rp_filter, conntrack) is
//! encoded by a [`Collector`]. `/metrics` is the Prometheus text format 0.0.4, not
//! OpenMetrics: OpenMetrics names a counter's family without `_total`, so
//! `lb_invalid_objects_total` (counter) and `lb_invalid_objects` (gauge) would be two
//! families of one name there, and both names predate this encoder.
//!
//! The HTTP side is an axum router served by hyper's HTTP/1 connection builder, which,
//! unlike `axum::serve`, takes a header read timeout.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    extract::State,
    http::{Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use lb_common::{Counter as DpCounter, Reason, map_names};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets, linear_buckets},
    },
    registry::Registry,
};
use tracing::{debug, warn};

use super::model::{FrontendKey, IssueKind};

/// Upper bounds of `lb_sync_duration_seconds`, in seconds (the agent's own, from before
/// the kube-proxy compatible `lb_sync_proxy_rules_duration_seconds`).
const SYNC_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// kube-proxy's `sync_proxy_rules_duration_seconds` buckets:
/// `prometheus.ExponentialBuckets(0.001, 2, 15)`, 1 ms to 16.384 s
/// (<https://github.com/kubernetes/kubernetes/blob/v1.20.2/pkg/proxy/metrics/metrics.go>).
fn sync_proxy_rules_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// kube-proxy's `network_programming_duration_seconds` buckets, from the same file:
/// `merge(LinearBuckets(0.25, 0.25, 2), LinearBuckets(1, 1, 59), LinearBuckets(60, 5, 12),
/// LinearBuckets(120, 30, 7))`. Its `merge` starts from `make([]float64, 1)`, so the
/// list begins with a 0 bucket; it is kept, so that the two histograms have the same
/// `le` values and can be aggregated together.
fn network_programming_buckets() -> impl Iterator<Item = f64> {
    std::iter::once(0.0)
        .chain(linear_buckets(0.25, 0.25, 2))
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7))
}

/// Trigger times kept per Service while its changes wait for a sync, and in flight
/// overall: bounds memory while syncs keep failing (the earliest are kept, they are the
/// ones the SLI is about).
const MAX_PENDING_PER_SERVICE: usize = 1_000;
const MAX_IN_FLIGHT: usize = 100_000;

/// The bookkeeping of the network programming latency SLI, as kube-proxy does it
/// (`EndpointChangeTracker` in
/// <https://github.com/kubernetes/kubernetes/blob/v1.20.2/pkg/proxy/endpoints.go>, and
/// the `syncProxyRules` tail in `pkg/proxy/iptables/proxier.go`):
///
/// - every EndpointSlice change that the proxy acts on and that carries
///   `endpoints.kubernetes.io/last-change-trigger-time` adds that time to its Service's
///   list ([`Triggers::changed`]; the callers in `k8s.rs` decide what a change is);
/// - a sync takes all pending times ([`Triggers::begin`], when the snapshot is taken)
///   and, once it has programmed them, observes `now - trigger` for each
///   ([`Triggers::done`]).
///
/// Two later kube-proxy fixes are taken too (`pkg/proxy/endpointschangetracker.go`
/// from 1.22 on): trigger times from before the agent started are ignored (a restart
/// would otherwise observe the age of every slice in the cluster), and deleting a slice
/// drops its Service's pending times (a deleted slice's annotation is the time of its
/// last update, not of the deletion). One deliberate difference: kube-proxy loses the
/// times of a failed sync; here they stay in flight and are observed by the sync that
/// does program them, which is what the SLI measures.
#[derive(Debug)]
pub struct Triggers {
    started: SystemTime,
    pending: HashMap<Box<str>, Vec<SystemTime>>,
    in_flight: Vec<SystemTime>,
}

impl Triggers {
    pub fn new(started: SystemTime) -> Self {
        Self { started, pending: HashMap::new(), in_flight: Vec::new() }
    }

    /// A slice of `service` (`namespace/name`) changed, triggered at `at`. False if the
    /// time is ignored (before the agent started, or over the bound).
    pub fn changed(&mut self, service: &str, at: SystemTime) -> bool {
        if at <= self.started {
            return false;
        }
        let list = match self.pending.get_mut(service) {
            Some(l) => l,
            None => self.pending.entry(service.into()).or_default(),
        };
        if list.len() >= MAX_PENDING_PER_SERVICE {
            return false;
        }
        list.push(at);
        true
    }

    /// A slice of `service` was deleted.
    pub fn deleted(&mut self, service: &str) {
        self.pending.remove(service);
    }

    /// A snapshot is being taken: everything pending until now is in it.
    pub fn begin(&mut self) {
        for (_, times) in self.pending.drain() {
            let room = MAX_IN_FLIGHT.saturating_sub(self.in_flight.len());
            self.in_flight.extend(times.into_iter().take(room));
        }
    }

    /// The sync of the snapshots taken since the last successful one is done: the
    /// latencies to observe (seconds; negative if the trigger time is ahead of this
    /// node's clock, as kube-proxy's `time.Since` would give), none if it failed.
    pub fn done(&mut self, ok: bool, now: SystemTime) -> Vec<f64> {
        if !ok {
            return Vec::new();
        }
        self.in_flight
            .drain(..)
            .map(|t| match now.duration_since(t) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            })
            .collect()
    }

    pub fn pending_len(&self) -> usize {
        self.pending.values().map(Vec::len).sum()
    }
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
    stats: aya::maps::PerCpuArray<aya::maps::MapData, DpCounter>,
    svc_stats: aya::maps::PerCpuArray<aya::maps::MapData, DpCounter>,
    sock_svc_stats: aya::maps::PerCpuArray<aya::maps::MapData, DpCounter>,
}

impl StatsReader {
    pub fn open(pin_dir: &Path) -> Result<Self, aya::maps::MapError> {
        let open = |name: &str| -> Result<_, aya::maps::MapError> {
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(aya::maps::MapData::from_pin(
                pin_dir.join(name),
            )?))
        };
        Ok(Self {
            stats: open(map_names::STATS)?,
            svc_stats: open(map_names::SVC_STATS)?,
            sock_svc_stats: open(map_names::SOCK_SVC_STATS)?,
        })
    }
    pub fn reason(&self, r: Reason) -> DpCounter {
        crate::datapath::counter_total(&self.stats, r as u32).unwrap_or_default()
    }
    pub fn service(&self, id: u32) -> DpCounter {
        crate::datapath::counter_total(&self.svc_stats, id).unwrap_or_default()
    }
    /// The socket LB's connect() and sendmsg() translations for service `id`.
    pub fn service_sock(&self, id: u32) -> u64 {
        crate::datapath::counter_total(&self.sock_svc_stats, id).unwrap_or_default().packets
    }
}

/// What is read at scrape time, shared between [`Metrics`] and the registry's
/// collector.
#[derive(Default)]
struct Live {
    /// The initial sync is done.
    synced: AtomicBool,
    attach_failing: Mutex<Vec<super::attach::AttachFailure>>,
    ct_entries: AtomicU64,
    ct_open_flows: AtomicU64,
    ct_expired_total: AtomicU64,
    ct_passes: AtomicU64,
    map_fill: Mutex<Option<super::conntrack::MapFill>>,
    rp_filter: Mutex<super::rpfilter::RpFilterStatus>,
    programmed: Mutex<Arc<Vec<ProgrammedFrontend>>>,
    stats: Mutex<Option<StatsReader>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").field("synced", &self.synced).finish_non_exhaustive()
    }
}

impl Live {
    fn attach_failing(&self) -> Vec<super::attach::AttachFailure> {
        self.attach_failing.lock().map(|f| f.clone()).unwrap_or_default()
    }
    fn rp_filter(&self) -> super::rpfilter::RpFilterStatus {
        self.rp_filter.lock().map(|m| m.clone()).unwrap_or_default()
    }
    fn programmed(&self) -> Arc<Vec<ProgrammedFrontend>> {
        self.programmed.lock().map(|m| m.clone()).unwrap_or_default()
    }
    fn is_ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed) && self.attach_failing().is_empty()
    }
}

/// Encodes a metric without labels.
fn encode_one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl prometheus_client::encoding::EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let e = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(e)
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let enc = &mut encoder;
        encode_one(
            enc,
            "lb_ready",
            "1 once the initial sync is done and every wanted attachment is in place.",
            &ConstGauge::new(i64::from(self.is_ready())),
        )?;
        if self.ct_passes.load(Ordering::Relaxed) > 0 {
            encode_one(
                enc,
                "lb_conntrack_entries",
                "Conntrack entries (two per flow) at the collector's last pass.",
                &ConstGauge::new(self.ct_entries.load(Ordering::Relaxed)),
            )?;
            encode_one(
                enc,
                "lb_conntrack_open_flows",
                "Live flows not closed by a RST or both FINs, at the collector's last pass.",
                &ConstGauge::new(self.ct_open_flows.load(Ordering::Relaxed)),
            )?;
            // Counter names go without `_total`: the encoder appends it.
            if let Some(f) = self.map_fill.lock().ok().and_then(|f| *f) {
                for (name, help, v) in [
                    (
                        "lb_conntrack_capacity",
                        "Size of the conntrack LRU (--max-conntrack): at lb_conntrack_entries, new flows evict old ones (the kernel counts no evictions; lb_datapath_packets{reason=\"ct_midflow_miss\"} counts established TCP flows found evicted).",
                        f.ct_capacity as i64,
                    ),
                    (
                        "lb_affinity_entries",
                        "ClientIP affinity entries at the collector's last pass.",
                        f.affinity_entries as i64,
                    ),
                    (
                        "lb_affinity_capacity",
                        "Size of the affinity LRU (--max-affinity): at lb_affinity_entries, new clients evict old ones (lb_datapath_packets{reason=\"affinity_miss\"} counts clients found without an entry).",
                        f.affinity_capacity as i64,
                    ),
                ] {
                    encode_one(enc, name, help, &ConstGauge::new(v))?;
                }
            }
            encode_one(
                enc,
                "lb_conntrack_expired",
                "Flows the collector deleted as past their timeout.",
                &ConstCounter::new(self.ct_expired_total.load(Ordering::Relaxed)),
            )?;
        }
        {
            let failing = self.attach_failing();
            let mut e = enc.encode_descriptor(
                "lb_attach_failing",
                "Wanted attachments not in place (retried with backoff; the agent is not ready meanwhile).",
                None,
                MetricType::Gauge,
            )?;
            if failing.is_empty() {
                ConstGauge::new(0i64).encode(e)?;
            } else {
                for f in &failing {
                    let labels = [("interface", f.iface.as_str()), ("hook", f.hook.as_str())];
                    ConstGauge::new(1i64).encode(e.encode_family(&labels)?)?;
                }
            }
        }
        let rp = self.rp_filter();
        if let Some(all) = rp.all {
            encode_one(
                enc,
                "lb_rp_filter_all",
                "net.ipv4.conf.all.rp_filter in the agent's namespace (1, strict, drops every reverse-NATed reply).",
                &ConstGauge::new(i64::from(all)),
            )?;
        }
        encode_one(
            enc,
            "lb_rp_filter_problem",
            "1 while rp_filter would drop reverse-NATed replies: conf.all strict, or an attached interface whose rp_filter could not be set to 0.",
            &ConstGauge::new(i64::from(rp.warning.is_some() || !rp.ifaces_failed.is_empty())),
        )?;
        let Ok(guard) = self.stats.lock() else { return Ok(()) };
        let Some(r) = guard.as_ref() else { return Ok(()) };
        // Read once per scrape, straight from the per-CPU maps: the datapath's
        // counters are never copied into the registry.
        let counters: Vec<(Reason, DpCounter)> = Reason::ALL.iter().map(|&x| (x, r.reason(x))).collect();
        for (name, help, bytes) in [
            ("lb_datapath_packets", "Packets by datapath verdict reason.", false),
            ("lb_datapath_bytes", "Bytes by datapath verdict reason.", true),
        ] {
            let mut e = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (x, c) in &counters {
                let labels = [("reason", x.name())];
                ConstCounter::new(if bytes { c.bytes } else { c.packets }).encode(e.encode_family(&labels)?)?;
            }
        }
        let programmed = self.programmed();
        let per: Vec<(&ProgrammedFrontend, String, DpCounter)> =
            programmed.iter().map(|p| (p, p.key.to_string(), r.service(p.id))).collect();
        {
            let mut e = enc.encode_descriptor(
                "lb_service_socket_translations",
                "connect() and unconnected sendmsg() calls the socket LB translated to a backend of the frontend (no packet of them is counted in lb_service_packets).",
                None,
                MetricType::Counter,
            )?;
            for (p, frontend, _) in &per {
                let labels = [("service", p.service.as_str()), ("frontend", frontend.as_str())];
                ConstCounter::new(r.service_sock(p.id)).encode(e.encode_family(&labels)?)?;
            }
        }
        for (name, help, bytes) in [
            ("lb_service_packets", "Packets through a frontend (forward and reply).", false),
            ("lb_service_bytes", "Bytes through a frontend (forward and reply).", true),
        ] {
            let mut e = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (p, frontend, c) in &per {
                let labels = [("service", p.service.as_str()), ("frontend", frontend.as_str())];
                ConstCounter::new(if bytes { c.bytes } else { c.packets }).encode(e.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

type Label = [(&'static str, &'static str); 1];

/// Everything the agent exports. Shared between the sync loop, the watchers and the
/// HTTP server.
pub struct Metrics {
    registry: Registry,
    live: Arc<Live>,
    syncs: Counter,
    sync_errors: Counter,
    sync_duration: Histogram,
    sync_proxy_rules_duration: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    sync_proxy_rules_last: Gauge<f64, AtomicU64>,
    network_programming: Histogram,
    triggers: Mutex<Triggers>,
    trigger_time_errors: Counter,
    map_writes: Counter,
    frontends: Gauge,
    endpoints: Gauge,
    watch_restarts: Family<Label, Counter>,
    watch_restarts_sum: AtomicU64,
    watch_errors: Family<Label, Counter>,
    decode_errors: Family<Label, Counter>,
    source_errors: Counter,
    source_error: Gauge,
    invalid_total: Family<Label, Counter>,
    invalid_now: Family<Label, Gauge>,
    attached: Gauge,
    attach_errors: Counter,
    socket_lb_attached: Gauge,
    sockets_destroyed: Family<Label, Counter>,
    socket_closer_errors: Counter,
    socket_netns_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(SystemTime::now())
    }
}

impl Metrics {
    /// `started`: trigger times before it are not observed (see [`Triggers`]).
    pub fn new(started: SystemTime) -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            live: Arc::default(),
            syncs: Counter::default(),
            sync_errors: Counter::default(),
            sync_duration: Histogram::new(SYNC_BUCKETS),
            sync_proxy_rules_duration: Histogram::new(sync_proxy_rules_buckets()),
            last_sync: Gauge::default(),
            sync_proxy_rules_last: Gauge::default(),
            network_programming: Histogram::new(network_programming_buckets()),
            triggers: Mutex::new(Triggers::new(started)),
            trigger_time_errors: Counter::default(),
            map_writes: Counter::default(),
            frontends: Gauge::default(),
            endpoints: Gauge::default(),
            watch_restarts: Family::default(),
            watch_restarts_sum: AtomicU64::new(0),
            watch_errors: Family::default(),
            decode_errors: Family::default(),
            source_errors: Counter::default(),
            source_error: Gauge::default(),
            invalid_total: Family::default(),
            invalid_now: Family::default(),
            attached: Gauge::default(),
            attach_errors: Counter::default(),
            socket_lb_attached: Gauge::default(),
            sockets_destroyed: Family::default(),
            socket_closer_errors: Counter::default(),
            socket_netns_refused: Counter::default(),
        };
        // Every reason is exported, zero or not, so that a rate() over it starts at 0.
        for k in IssueKind::ALL {
            let _ = m.invalid_total.get_or_create(&[("reason", k.name())]);
            let _ = m.invalid_now.get_or_create(&[("reason", k.name())]);
        }
        // `Registry::register` appends a full stop to the help text and `_total` to a
        // counter's name: names and help are given without them.
        let r = &mut m.registry;
        r.register("lb_syncs", "Syncs of desired state to the maps", m.syncs.clone());
        r.register("lb_sync_errors", "Syncs that failed (retried)", m.sync_errors.clone());
        r.register("lb_map_writes", "Map updates and deletes written by syncs", m.map_writes.clone());
        r.register("lb_programmed_services", "Frontends (ClusterIP, port, protocol) in the maps", m.frontends.clone());
        r.register("lb_programmed_endpoints", "Backend slots over all frontends", m.endpoints.clone());
        r.register("lb_attached_interfaces", "Interfaces the datapath is attached to", m.attached.clone());
        r.register("lb_attach_errors", "Failed attach attempts", m.attach_errors.clone());
        r.register(
            "lb_socket_lb_attached",
            "Socket LB programs attached to the node's cgroup (4 when on, 0 when off)",
            m.socket_lb_attached.clone(),
        );
        r.register(
            "lb_socket_lb_destroyed",
            "Sockets the socket LB closed because their backend left its Service (UDP), or its pod is gone (TCP)",
            m.sockets_destroyed.clone(),
        );
        r.register(
            "lb_socket_lb_close_errors",
            "Runs of the socket iterator that failed (the sockets stay open)",
            m.socket_closer_errors.clone(),
        );
        r.register(
            "lb_socket_lb_netns_refused",
            "Network namespaces the socket iterator could not walk (no CAP_SYS_PTRACE or CAP_SYS_ADMIN); their sockets stay open",
            m.socket_netns_refused.clone(),
        );
        for proto in ["udp", "tcp"] {
            let _ = m.sockets_destroyed.get_or_create(&[("protocol", proto)]);
        }
        r.register(
            "lb_source_errors",
            "Reads of the source rejected as a whole (YAML syntax errors in the file source)",
            m.source_errors.clone(),
        );
        r.register(
            "lb_source_error",
            "1 while the source's latest read was rejected and the last good state is kept",
            m.source_error.clone(),
        );
        r.register("lb_last_sync_timestamp_seconds", "Unix time of the last sync", m.last_sync.clone());
        r.register("lb_sync_duration_seconds", "Time from snapshot to maps written", m.sync_duration.clone());
        r.register(
            "lb_sync_proxy_rules_duration_seconds",
            "Time from snapshot to maps written, failed syncs included, in kube-proxy's sync_proxy_rules_duration_seconds buckets",
            m.sync_proxy_rules_duration.clone(),
        );
        r.register(
            "lb_sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last successful sync, as kube-proxy's sync_proxy_rules_last_timestamp_seconds",
            m.sync_proxy_rules_last.clone(),
        );
        r.register(
            "lb_network_programming_duration_seconds",
            "In-cluster network programming latency: from an EndpointSlice's endpoints.kubernetes.io/last-change-trigger-time to the sync that programmed it, as kube-proxy's network_programming_duration_seconds",
            m.network_programming.clone(),
        );
        r.register(
            "lb_trigger_time_errors",
            "EndpointSlice changes whose endpoints.kubernetes.io/last-change-trigger-time is not an RFC 3339 time (not observed)",
            m.trigger_time_errors.clone(),
        );
        r.register(
            "lb_watch_restarts",
            "Re-lists of a watched resource after the first list",
            m.watch_restarts.clone(),
        );
        r.register(
            "lb_watch_errors",
            "Watch errors (each is followed by a backoff and a resume)",
            m.watch_errors.clone(),
        );
        r.register("lb_decode_errors", "Objects or documents that could not be decoded", m.decode_errors.clone());
        r.register(
            "lb_invalid_objects",
            "Problems found in objects (counted once when first seen)",
            m.invalid_total.clone(),
        );
        r.register("lb_invalid_objects", "Problems present in the current objects", m.invalid_now.clone());
        r.register_collector(Box::new(m.live.clone()));
        m
    }

    pub fn set_stats_reader(&self, r: StatsReader) {
        if let Ok(mut s) = self.live.stats.lock() {
            *s = Some(r);
        }
    }
    /// The initial sync is done.
    pub fn set_ready(&self) {
        self.live.synced.store(true, Ordering::Relaxed);
    }
    pub fn is_synced(&self) -> bool {
        self.live.synced.load(Ordering::Relaxed)
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
        let failing = self.live.attach_failing();
        if failing.is_empty() {
            return None;
        }
        let list: Vec<String> = failing.iter().map(|f| format!("{} ({}): {}", f.iface, f.hook, f.error)).collect();
        Some(format!("attach failing on {}", list.join("; ")))
    }
    pub fn conntrack_pass(&self, p: &super::conntrack::GcPass) {
        let l = &self.live;
        l.ct_entries.store(p.entries as u64, Ordering::Relaxed);
        l.ct_open_flows.store(p.open_flows as u64, Ordering::Relaxed);
        l.ct_expired_total.fetch_add(p.expired_flows as u64, Ordering::Relaxed);
        l.ct_passes.fetch_add(1, Ordering::Relaxed);
        if let (Some(f), Ok(mut m)) = (p.fill, l.map_fill.lock()) {
            *m = Some(f);
        }
    }
    pub fn set_attach_failures(&self, f: &[super::attach::AttachFailure]) {
        if let Ok(mut m) = self.live.attach_failing.lock() {
            *m = f.to_vec();
        }
    }
    pub fn watch_restart(&self, resource: &'static str) {
        self.watch_restarts.get_or_create(&[("resource", resource)]).inc();
        self.watch_restarts_sum.fetch_add(1, Ordering::Relaxed);
    }
    pub fn watch_error(&self, resource: &'static str) {
        self.watch_errors.get_or_create(&[("resource", resource)]).inc();
    }
    pub fn decode_error(&self, source: &'static str) {
        self.decode_errors.get_or_create(&[("source", source)]).inc();
    }
    /// The source could not be read as a whole (a YAML syntax error in the file
    /// source): it keeps its last good state until `set_source_ok`.
    pub fn source_error(&self) {
        self.source_errors.inc();
        self.source_error.set(1);
    }
    pub fn set_source_ok(&self) {
        self.source_error.set(0);
    }
    pub fn watch_restarts_total(&self) -> u64 {
        self.watch_restarts_sum.load(Ordering::Relaxed)
    }

    /// An EndpointSlice of `service` (`namespace/name`) changed in a way the agent
    /// programs, with this `endpoints.kubernetes.io/last-change-trigger-time`. Call it
    /// once the change is visible in the source's snapshot.
    pub fn endpoints_changed(&self, service: &str, trigger: SystemTime) {
        if let Ok(mut t) = self.triggers.lock() {
            t.changed(service, trigger);
        }
    }
    /// An EndpointSlice of `service` was deleted.
    pub fn endpoints_deleted(&self, service: &str) {
        if let Ok(mut t) = self.triggers.lock() {
            t.deleted(service);
        }
    }
    /// An EndpointSlice change whose trigger time annotation could not be parsed.
    pub fn trigger_time_error(&self) {
        self.trigger_time_errors.inc();
    }
    /// Changes recorded and not yet in a snapshot.
    pub fn pending_triggers(&self) -> usize {
        self.triggers.lock().map(|t| t.pending_len()).unwrap_or(0)
    }
    /// The source is taking a snapshot: the changes recorded so far are in it, and the
    /// next successful [`Metrics::sync_done`] observes their latency.
    pub fn snapshot_taken(&self) {
        if let Ok(mut t) = self.triggers.lock() {
            t.begin();
        }
    }

    pub fn sync_done(&self, took: Duration, ok: bool, writes: usize, frontends: usize, endpoints: usize) {
        let now = SystemTime::now();
        let unix = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.syncs.inc();
        if !ok {
            self.sync_errors.inc();
        }
        self.map_writes.inc_by(writes as u64);
        self.frontends.set(i64::try_from(frontends).unwrap_or(i64::MAX));
        self.endpoints.set(i64::try_from(endpoints).unwrap_or(i64::MAX));
        // Milliseconds, as before the registry: the status file has the same value.
        self.last_sync.set(unix.as_millis() as f64 / 1000.0);
        self.sync_duration.observe(took.as_secs_f64());
        // kube-proxy observes every sync, failed or not (the deferred Observe at the
        // top of syncProxyRules), and stamps only the successful ones.
        self.sync_proxy_rules_duration.observe(took.as_secs_f64());
        if ok {
            self.sync_proxy_rules_last.set(unix.as_secs_f64());
        }
        let latencies = self.triggers.lock().map(|mut t| t.done(ok, now)).unwrap_or_default();
        for l in &latencies {
            self.network_programming.observe(*l);
        }
        if !latencies.is_empty() {
            debug!(
                changes = latencies.len(),
                max_s = latencies.iter().copied().fold(f64::MIN, f64::max),
                "network programmed"
            );
        }
    }
    pub fn syncs(&self) -> u64 {
        self.syncs.get()
    }
    /// New issues (first seen in this sync) and the current count of each kind.
    pub fn issues(&self, new: &[&super::model::Issue], current: &[super::model::Issue]) {
        for i in new {
            self.invalid_total.get_or_create(&[("reason", i.kind.name())]).inc();
        }
        let mut now: HashMap<IssueKind, i64> = HashMap::new();
        for i in current {
            *now.entry(i.kind).or_default() += 1;
        }
        for k in IssueKind::ALL {
            self.invalid_now.get_or_create(&[("reason", k.name())]).set(now.get(&k).copied().unwrap_or(0));
        }
    }
    pub fn set_programmed(&self, p: Vec<ProgrammedFrontend>) {
        if let Ok(mut m) = self.live.programmed.lock() {
            *m = Arc::new(p);
        }
    }
    pub fn programmed(&self) -> Arc<Vec<ProgrammedFrontend>> {
        self.live.programmed()
    }
    pub fn set_attached(&self, n: usize) {
        self.attached.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    pub fn attach_error(&self) {
        self.attach_errors.inc();
    }
    pub fn set_socket_lb_attached(&self, n: usize) {
        self.socket_lb_attached.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    /// A run of the socket iterators closed `udp` and `tcp` sockets.
    pub fn sockets_destroyed(&self, udp: u64, tcp: u64) {
        self.sockets_destroyed.get_or_create(&[("protocol", "udp")]).inc_by(udp);
        self.sockets_destroyed.get_or_create(&[("protocol", "tcp")]).inc_by(tcp);
    }
    /// A run of the socket iterators could not walk `n` network namespaces.
    pub fn socket_netns_refused(&self, n: usize) {
        self.socket_netns_refused.inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }
    pub fn socket_close_error(&self) {
        self.socket_closer_errors.inc();
    }
    pub fn set_rp_filter(&self, st: &super::rpfilter::RpFilterStatus) {
        if let Ok(mut m) = self.live.rp_filter.lock() {
            m.clone_from(st);
        }
    }
    pub fn rp_filter(&self) -> super::rpfilter::RpFilterStatus {
        self.live.rp_filter()
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(8192);
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut o, &self.registry) {
            // Only a collector can fail, and ours do not; serve what was encoded.
            warn!(error = %e, "encoding metrics failed");
        }
        o
    }
}

/// A client that does not send its request headers within this long is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

async fn metrics_page(State(m): State<Arc<Metrics>>) -> Response {
    ([(header::CONTENT_TYPE, prometheus_client::encoding::prometheus_text::CONTENT_TYPE)], m.render()).into_response()
}

async fn readyz(State(m): State<Arc<Metrics>>) -> Response {
    match m.not_ready_because() {
        None => "ok\n".into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn other(method: Method) -> Response {
    if method == Method::GET || method == Method::HEAD {
        (StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n").into_response()
    } else {
        (StatusCode::METHOD_NOT_ALLOWED, "GET only\n").into_response()
    }
}

fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .method_not_allowed_fallback(other)
        .fallback(other)
        .with_state(metrics)
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
    let app = router(metrics);
    Ok((
        bound,
        tokio::spawn(async move {
            loop {
                let (sock, peer) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                tokio::spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
                    if let Err(e) = conn.await {
                        debug!(%peer, error = %e, "metrics connection");
                    }
                });
            }
        }),
    ))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::agent::model::{Issue, Protocol};

    /// An HTTP/1.0 request: the server answers in HTTP/1.0 and closes.
    async fn get(addr: SocketAddr, path: &str) -> String {
        request(addr, &format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")).await
    }

    async fn request(addr: SocketAddr, req: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await.unwrap().unwrap();
        out
    }

    fn body(resp: &str) -> &str {
        resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
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

    #[tokio::test]
    async fn http11_methods_content_type_and_query() {
        let m = Arc::new(Metrics::default());
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), m.clone()).await.unwrap();
        let r = request(addr, "GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4; charset=utf-8"), "{r}");
        assert!(body(&r).lines().any(|l| l == "lb_ready 0"), "{r}");
        let r = request(addr, "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert_eq!(body(&r), "initial sync not done\n");
        let r =
            request(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
        assert_eq!(body(&r), "GET only\n");
        let r = request(addr, "PUT /elsewhere HTTP/1.0\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.0 405"), "{r}");
        let r = request(addr, "GET /nope HTTP/1.0\r\n\r\n").await;
        assert_eq!(body(&r), "try /metrics, /healthz or /readyz\n");
        let r = request(addr, "HEAD /healthz HTTP/1.0\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.0 200") && body(&r).is_empty(), "{r}");
        // Junk is answered (400) or dropped, never a panic; the server keeps serving.
        let _ = request(addr, "\x16\x03\x01 not http\r\n\r\n").await;
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.0 200"));
        task.abort();
    }

    #[tokio::test]
    async fn bind_error_is_returned() {
        let m = Arc::new(Metrics::default());
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), m.clone()).await.unwrap();
        assert!(serve(addr, m).await.is_err());
        task.abort();
    }

    /// Every metric family the agent exported before the registry, under the same
    /// name and type; counters keep their `_total` in HELP, TYPE and samples.
    #[test]
    fn names_and_types_are_kept() {
        let m = Metrics::default();
        m.set_attach_failures(&[super::super::attach::AttachFailure {
            iface: "eth\"0".into(),
            ifindex: 2,
            hook: "tc".into(),
            error: "x".into(),
            attempts: 1,
            retry_in_s: 1,
        }]);
        m.conntrack_pass(&super::super::conntrack::GcPass {
            entries: 4,
            open_flows: 2,
            expired_flows: 3,
            fill: Some(super::super::conntrack::MapFill {
                ct_entries: 4,
                ct_capacity: 256,
                affinity_entries: 5,
                affinity_capacity: 128,
            }),
            ..Default::default()
        });
        m.set_rp_filter(&super::super::rpfilter::RpFilterStatus { all: Some(1), ..Default::default() });
        m.watch_error("endpointslices");
        m.watch_restart("services");
        m.decode_error("file");
        let text = m.render();
        for (name, kind) in [
            ("lb_ready", "gauge"),
            ("lb_syncs_total", "counter"),
            ("lb_sync_errors_total", "counter"),
            ("lb_map_writes_total", "counter"),
            ("lb_programmed_services", "gauge"),
            ("lb_programmed_endpoints", "gauge"),
            ("lb_attached_interfaces", "gauge"),
            ("lb_attach_errors_total", "counter"),
            ("lb_conntrack_entries", "gauge"),
            ("lb_conntrack_open_flows", "gauge"),
            ("lb_conntrack_capacity", "gauge"),
            ("lb_affinity_entries", "gauge"),
            ("lb_affinity_capacity", "gauge"),
            ("lb_conntrack_expired_total", "counter"),
            ("lb_attach_failing", "gauge"),
            ("lb_source_errors_total", "counter"),
            ("lb_source_error", "gauge"),
            ("lb_rp_filter_all", "gauge"),
            ("lb_rp_filter_problem", "gauge"),
            ("lb_last_sync_timestamp_seconds", "gauge"),
            ("lb_sync_duration_seconds", "histogram"),
            ("lb_sync_proxy_rules_duration_seconds", "histogram"),
            ("lb_sync_proxy_rules_last_timestamp_seconds", "gauge"),
            ("lb_network_programming_duration_seconds", "histogram"),
            ("lb_trigger_time_errors_total", "counter"),
            ("lb_watch_restarts_total", "counter"),
            ("lb_watch_errors_total", "counter"),
            ("lb_decode_errors_total", "counter"),
            ("lb_invalid_objects_total", "counter"),
            ("lb_invalid_objects", "gauge"),
        ] {
            let ty = format!("# TYPE {name} {kind}");
            assert!(text.lines().any(|l| l == ty), "missing {ty:?} in\n{text}");
            assert!(text.lines().any(|l| l.starts_with(&format!("# HELP {name} "))), "no HELP for {name}");
        }
        for line in [
            "lb_attach_failing{interface=\"eth\\\"0\",hook=\"tc\"} 1",
            "lb_conntrack_entries 4",
            "lb_conntrack_open_flows 2",
            "lb_conntrack_capacity 256",
            "lb_affinity_entries 5",
            "lb_affinity_capacity 128",
            "lb_conntrack_expired_total 3",
            "lb_rp_filter_all 1",
            "lb_rp_filter_problem 0",
            "lb_ready 0",
            "lb_watch_errors_total{resource=\"endpointslices\"} 1",
            "lb_decode_errors_total{source=\"file\"} 1",
            "lb_invalid_objects{reason=\"invalid_ip\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("_total_total") && !text.contains(".."), "{text}");
        assert!(!text.contains("# EOF"), "not OpenMetrics: {text}");
        // Not yet: the collector has not run, the rp_filter is unknown.
        let fresh = Metrics::default().render();
        assert!(!fresh.contains("lb_conntrack_") && !fresh.contains("lb_rp_filter_all"), "{fresh}");
        assert!(fresh.lines().any(|l| l == "lb_attach_failing 0"), "{fresh}");
    }

    /// The buckets are kube-proxy's, bound for bound (`le` as Go prints them).
    #[test]
    fn kube_proxy_buckets() {
        let np: Vec<f64> = network_programming_buckets().collect();
        assert_eq!(np.len(), 1 + 2 + 59 + 12 + 7);
        assert_eq!(&np[..5], &[0.0, 0.25, 0.5, 1.0, 2.0]);
        assert_eq!(np[61], 59.0);
        assert_eq!(np[62], 60.0);
        assert_eq!(np[73], 115.0);
        assert_eq!(np[74], 120.0);
        assert_eq!(*np.last().unwrap(), 300.0);
        let sp: Vec<f64> = sync_proxy_rules_buckets().collect();
        assert_eq!(sp.len(), 15);
        assert_eq!((sp[0], sp[14]), (0.001, 16.384));
        let m = Metrics::default();
        m.sync_done(Duration::from_millis(3), false, 0, 0, 0);
        let text = m.render();
        for line in [
            "lb_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 0",
            "lb_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "lb_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"} 1",
            "lb_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 1",
            "lb_sync_proxy_rules_duration_seconds_count 1",
            "lb_network_programming_duration_seconds_bucket{le=\"0\"} 0",
            "lb_network_programming_duration_seconds_bucket{le=\"0.25\"} 0",
            "lb_network_programming_duration_seconds_bucket{le=\"300\"} 0",
            "lb_network_programming_duration_seconds_count 0",
            "lb_sync_errors_total 1",
            // A failed sync is not a successful one.
            "lb_sync_proxy_rules_last_timestamp_seconds 0.0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        m.sync_done(Duration::from_millis(3), true, 0, 0, 0);
        let stamp = m.sync_proxy_rules_last.get();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((now - stamp).abs() < 60.0, "{stamp}");
    }

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn triggers_before_start_are_ignored() {
        let mut t = Triggers::new(at(1000));
        assert!(!t.changed("a/web", at(999)));
        assert!(!t.changed("a/web", at(1000)));
        assert!(t.changed("a/web", at(1001)));
        assert_eq!(t.pending_len(), 1);
    }

    #[test]
    fn every_pending_change_is_observed_once_after_a_successful_sync() {
        let mut t = Triggers::new(at(1000));
        t.changed("a/web", at(1010));
        t.changed("a/web", at(1012));
        t.changed("b/db", at(1011));
        t.begin();
        // Changes after the snapshot belong to the next sync.
        t.changed("a/web", at(1019));
        let mut got = t.done(true, at(1020));
        got.sort_by(f64::total_cmp);
        assert_eq!(got, [8.0, 9.0, 10.0]);
        assert!(t.done(true, at(1021)).is_empty(), "observed once");
        t.begin();
        assert_eq!(t.done(true, at(1030)), [11.0]);
    }

    #[test]
    fn a_failed_sync_keeps_its_changes_for_the_retry() {
        let mut t = Triggers::new(at(1000));
        t.changed("a/web", at(1010));
        t.begin();
        assert!(t.done(false, at(1011)).is_empty());
        t.changed("a/web", at(1012));
        t.begin();
        let mut got = t.done(true, at(1015));
        got.sort_by(f64::total_cmp);
        assert_eq!(got, [3.0, 5.0]);
    }

    #[test]
    fn a_deleted_slice_drops_its_services_pending_changes() {
        let mut t = Triggers::new(at(1000));
        t.changed("a/web", at(1010));
        t.changed("b/db", at(1010));
        t.deleted("a/web");
        t.begin();
        assert_eq!(t.done(true, at(1012)), [2.0]);
    }

    #[test]
    fn a_trigger_ahead_of_the_clock_is_negative_as_in_kube_proxy() {
        let mut t = Triggers::new(at(1000));
        t.changed("a/web", at(1010));
        t.begin();
        assert_eq!(t.done(true, at(1008)), [-2.0]);
    }

    #[test]
    fn pending_changes_are_bounded() {
        let mut t = Triggers::new(at(0));
        for i in 0..MAX_PENDING_PER_SERVICE + 10 {
            t.changed("a/web", at(i as u64 + 1));
        }
        assert_eq!(t.pending_len(), MAX_PENDING_PER_SERVICE);
        t.begin();
        let got = t.done(true, at(10_000));
        // The earliest are kept.
        assert_eq!(got[0], 9_999.0);
    }

    #[test]
    fn sync_done_observes_the_network_programming_latency() {
        let m = Metrics::new(SystemTime::now() - Duration::from_secs(60));
        m.endpoints_changed("a/web", SystemTime::now() - Duration::from_millis(1500));
        m.snapshot_taken();
        m.sync_done(Duration::from_millis(1), false, 0, 0, 0);
        assert!(m.render().lines().any(|l| l == "lb_network_programming_duration_seconds_count 0"));
        m.sync_done(Duration::from_millis(1), true, 0, 0, 0);
        let text = m.render();
        for line in [
            "lb_network_programming_duration_seconds_count 1",
            "lb_network_programming_duration_seconds_bucket{le=\"1\"} 0",
            "lb_network_programming_duration_seconds_bucket{le=\"2\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
