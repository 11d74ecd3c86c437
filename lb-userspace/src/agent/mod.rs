//! The node agent (`lb agent`): watches Services and EndpointSlices ([`k8s`]), computes
//! the desired datapath state ([`model`]), writes only the difference into the pinned
//! maps ([`sync`]), keeps the datapath attached to the selected interfaces
//! ([`attach`]) and exports metrics and health ([`metrics`]).

pub mod attach;
pub mod conntrack;
pub mod k8s;
pub mod metrics;
pub mod model;
pub mod rpfilter;
pub mod sync;
pub mod table;

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::datapath::{self, LoadOptions};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// An API server: in-cluster config, or this kubeconfig.
    Kubernetes { kubeconfig: Option<PathBuf> },
    /// A multi-document YAML file, followed for changes.
    File(PathBuf),
}

impl std::str::FromStr for SourceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kubernetes" | "k8s" => Ok(SourceSpec::Kubernetes { kubeconfig: None }),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SourceSpec::File(p.into())),
                _ => Err(format!("unknown source {s:?}: expected `kubernetes` or `file:PATH`")),
            },
        }
    }
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub bpffs: PathBuf,
    pub source: SourceSpec,
    pub attach: attach::AttachConfig,
    pub metrics_addr: Option<SocketAddr>,
    /// A sync starts once no change has come for this long...
    pub debounce: Duration,
    /// ...or this long after the first pending change, whichever is first.
    pub max_delay: Duration,
    /// How often the file source checks its file.
    pub file_poll: Duration,
    /// Where the agent writes its status for `lb status`.
    pub status_file: Option<PathBuf>,
    /// Rescan interfaces this often even without netlink news.
    pub iface_rescan: Duration,
    /// Run the conntrack collector this often; None: never.
    pub conntrack_gc: Option<Duration>,
    /// `max_entries` by pinned map name (`--max-*`); empty keeps the defaults.
    pub map_sizes: Vec<(&'static str, u32)>,
    /// This node (`--node-name`, `--node-zone`), for `internalTrafficPolicy: Local`
    /// and topology aware hints.
    pub node: model::NodeInfo,
}

/// What `lb status` reads from the running agent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub pid: u32,
    pub source: String,
    pub started_unix_ms: u64,
    pub ready: bool,
    pub syncs: u64,
    pub last_sync_unix_ms: u64,
    pub last_sync_duration_us: u64,
    pub last_sync_writes: usize,
    pub last_sync_error: Option<String>,
    /// The first sync after start: a full sync on empty maps, a reconcile after a restart.
    pub initial_sync_duration_us: u64,
    pub initial_sync_writes: usize,
    /// From process start to the initial sync done (load, attach, list, sync).
    pub ready_after_ms: u64,
    pub frontends: usize,
    pub endpoints: usize,
    pub invalid_objects: usize,
    /// Why the source's latest read was rejected as a whole (a YAML syntax error in
    /// the `file:` source); the agent keeps programming its last good state meanwhile.
    #[serde(default)]
    pub source_error: Option<String>,
    pub watch_restarts: u64,
    pub attach: Vec<attach::AttachPoint>,
    /// Wanted attachments that are not in place (retried with backoff); the agent is
    /// not ready while any is listed.
    #[serde(default)]
    pub attach_failures: Vec<attach::AttachFailure>,
    /// rp_filter on the node (see [`rpfilter`]): a warning here means ClusterIP
    /// replies are being dropped.
    #[serde(default)]
    pub rp_filter: rpfilter::RpFilterStatus,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// An error and its sources, on one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn write_status(path: &Path, st: &AgentStatus) {
    let res = (|| -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(st).unwrap_or_default())?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        debug!(path = %path.display(), error = %e, "cannot write status file");
    }
}

/// Runs the agent until `shutdown` resolves. Programs, links and maps stay pinned when
/// it returns: a restarted agent picks them up without losing a flow.
pub async fn run(cfg: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let started = unix_ms();
    // Two malloc arenas instead of glibc's 8 per core: the agent's threads allocate
    // little but long-lived memory (the watched objects), and more arenas mostly add
    // fragmentation to the RSS.
    // SAFETY: mallopt only tunes the allocator; it is called before the agent's
    // threads start allocating in earnest.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    datapath::ensure_bpffs(&cfg.bpffs)
        .with_context(|| format!("preparing bpffs at {}; run as root, or pick another --bpffs", cfg.bpffs.display()))?;
    let mut opts = LoadOptions::new(&cfg.bpffs);
    opts.max_entries.clone_from(&cfg.map_sizes);
    let ebpf = datapath::load(&opts).context("loading the datapath; `lb agent --cleanup` removes stale pins")?;
    let mut maps = sync::BpfMaps::from_ebpf(&ebpf).context("opening the datapath maps")?;
    let t0 = Instant::now();
    let mut syncer = maps.reconcile();
    // The conntrack clock is the kernel's jiffies; the datapath needs HZ to count them
    // in seconds, and the collector reads them alike.
    let clock = conntrack::clock().map_err(anyhow::Error::msg).context("reading the kernel's clock; run as root")?;
    syncer.set_clock(clock.recip(), &mut maps).context("writing the conntrack clock to the IDS map")?;
    info!(hz = clock.hz, "conntrack clock: jiffies");
    info!(
        frontends = syncer.frontend_count(),
        took = ?t0.elapsed(),
        bpffs = %cfg.bpffs.display(),
        "datapath loaded; shadow rebuilt from the pinned maps (nothing flushed)"
    );

    let metrics = Arc::new(metrics::Metrics::default());
    match metrics::StatsReader::open(&cfg.bpffs) {
        Ok(r) => metrics.set_stats_reader(r),
        Err(e) => warn!(error = %e, "cannot open counter maps; datapath counters not exported"),
    }
    let _http = match cfg.metrics_addr {
        Some(addr) => Some(
            metrics::serve(addr, metrics.clone())
                .await
                .with_context(|| format!("listening on --metrics-addr {addr}; is another agent running?"))?,
        ),
        None => None,
    };

    // Attachments: their own task, which owns the loaded programs.
    let attach_points: Arc<Mutex<(Vec<attach::AttachPoint>, Vec<attach::AttachFailure>)>> = Arc::default();
    let has_attach = !cfg.attach.ifaces.is_empty() || !cfg.attach.globs.is_empty();
    let mut attacher =
        attach::Attacher::new(ebpf, cfg.attach.clone(), &cfg.bpffs).context("creating the links directory")?;
    // Signalled when the attachments or their failures change, so that the status file
    // follows without waiting for a sync.
    let attach_changed = Arc::new(Notify::new());
    let reconcile = |attacher: &mut attach::Attacher,
                     metrics: &metrics::Metrics,
                     points: &Mutex<(Vec<attach::AttachPoint>, Vec<attach::AttachFailure>)>,
                     changed: &Notify| {
        let (now, errors) = attacher.reconcile();
        for _ in 0..errors {
            metrics.attach_error();
        }
        let failures = attacher.failures();
        metrics.set_attached(now.len());
        metrics.set_attach_failures(&failures);
        metrics.set_rp_filter(attacher.rp_filter_status());
        let mut p = points.lock().unwrap_or_else(|e| e.into_inner());
        let same = |a: &[attach::AttachFailure], b: &[attach::AttachFailure]| {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| (&x.iface, &x.hook, x.attempts) == (&y.iface, &y.hook, y.attempts))
        };
        if p.0 != now || !same(&p.1, &failures) {
            changed.notify_one();
        }
        *p = (now, failures);
    };
    reconcile(&mut attacher, &metrics, &attach_points, &attach_changed);
    let link_events = Arc::new(Notify::new());
    if has_attach {
        attach::watch_links(link_events.clone());
    }
    {
        let (metrics, points, events, every, changed) =
            (metrics.clone(), attach_points.clone(), link_events.clone(), cfg.iface_rescan, attach_changed.clone());
        tokio::spawn(async move {
            // Keeps the programs loaded (and reachable for new interfaces) for the
            // agent's lifetime.
            let mut attacher = attacher;
            if !has_attach {
                std::future::pending::<()>().await;
            }
            loop {
                let retry = attacher.next_retry().map(tokio::time::Instant::from_std);
                tokio::select! {
                    _ = events.notified() => {
                        // Let a burst of link messages (veth pair creation) settle.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ = tokio::time::sleep(every) => {}
                    _ = async { tokio::time::sleep_until(retry.unwrap_or_else(tokio::time::Instant::now)).await }, if retry.is_some() => {}
                }
                reconcile(&mut attacher, &metrics, &points, &changed);
            }
        });
    }

    // The conntrack collector: its own task and map handle; its passes come back to
    // the sync loop, which owns the syncer and releases orphans.
    let (gc_tx, mut gc_rx) = tokio::sync::mpsc::channel::<conntrack::GcPass>(1);
    if let Some(every) = cfg.conntrack_gc {
        match conntrack::open(&cfg.bpffs) {
            Ok(ct) => {
                let ct = Arc::new(Mutex::new(ct));
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(every).await;
                        let ct = ct.clone();
                        let pass = tokio::task::spawn_blocking(move || {
                            let mut ct = ct.lock().unwrap_or_else(|e| e.into_inner());
                            conntrack::collect(&mut ct, conntrack::now_tick())
                        })
                        .await;
                        match pass {
                            Ok(p) => {
                                if gc_tx.send(p).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => warn!(error = %e, "conntrack collector pass failed"),
                        }
                    }
                });
            }
            Err(e) => warn!(error = %chain(&e), "no conntrack collector; expired flows age out of the LRU only"),
        }
    }

    let source = match &cfg.source {
        SourceSpec::File(path) => k8s::file(path.clone(), cfg.file_poll, metrics.clone()),
        SourceSpec::Kubernetes { kubeconfig } => {
            let client = k8s::client(kubeconfig.as_deref()).await.context("connecting to Kubernetes")?;
            k8s::kubernetes(client, metrics.clone()).await.context("starting the Kubernetes watches")?
        }
    };
    info!(source = %source.description, node = ?cfg.node.name, zone = ?cfg.node.zone, "waiting for the initial list");
    let mut shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        r = source.wait_ready() => r.context("waiting for the initial list")?,
        _ = &mut shutdown => {
            info!("shutting down before the first sync; maps and links stay pinned");
            return Ok(());
        }
    }

    let mut status = AgentStatus {
        pid: std::process::id(),
        source: source.description.clone(),
        started_unix_ms: started,
        ..Default::default()
    };
    let mut prev_issues: HashSet<model::Issue> = HashSet::new();
    let mut retry: Option<Duration> = None;
    loop {
        let t_start = Instant::now();
        let snap = source.snapshot();
        let computed = model::compute_on(
            &cfg.node,
            snap.services.iter().map(|s| s.as_ref()),
            snap.slices.iter().map(|s| s.as_ref()),
        );
        let t_computed = t_start.elapsed();
        let res = syncer.sync(&computed.desired, &mut maps);
        let took = t_start.elapsed();

        let current: HashSet<model::Issue> = computed.issues.iter().cloned().collect();
        let new: Vec<&model::Issue> = computed.issues.iter().filter(|i| !prev_issues.contains(*i)).collect();
        for (i, issue) in new.iter().enumerate() {
            if i == 20 {
                warn!("... and {} more problems (see lb_invalid_objects)", new.len() - 20);
                break;
            }
            warn!(kind = issue.kind.name(), object = %issue.object, "{}; skipped, the rest is programmed", issue.detail);
        }
        metrics.issues(&new, &computed.issues);
        prev_issues = current;

        match &res {
            Ok(st) => {
                retry = None;
                status.last_sync_error = None;
                let first = !metrics.is_synced();
                metrics.sync_done(took, true, st.ops(), st.frontends, st.endpoints);
                if st.ops() > 0 || first {
                    info!(
                        frontends = st.frontends,
                        endpoints = st.endpoints,
                        writes = st.ops(),
                        compute = ?t_computed,
                        took = ?took,
                        "synced"
                    );
                } else {
                    debug!(took = ?took, "synced, nothing to write");
                }
                if first {
                    metrics.set_ready();
                    status.initial_sync_duration_us = took.as_micros() as u64;
                    status.initial_sync_writes = st.ops();
                    status.ready_after_ms = unix_ms().saturating_sub(started);
                    info!(after = ?Duration::from_millis(status.ready_after_ms), "initial sync done; ready");
                }
                status.last_sync_writes = st.ops();
                status.frontends = st.frontends;
                status.endpoints = st.endpoints;
            }
            Err(e) => {
                metrics.sync_done(took, false, 0, syncer.frontend_count(), 0);
                let delay = retry.map_or(Duration::from_millis(100), |d| (d * 2).min(Duration::from_secs(10)));
                error!(error = %chain(e), retry_in = ?delay, "sync failed; the maps keep a consistent state");
                status.last_sync_error = Some(chain(e));
                retry = Some(delay);
            }
        }
        metrics.set_programmed(programmed(&syncer, &computed.desired));
        status.ready = metrics.is_ready();
        status.syncs = metrics.syncs();
        status.last_sync_unix_ms = unix_ms();
        status.last_sync_duration_us = took.as_micros() as u64;
        status.invalid_objects = computed.issues.len();
        status.source_error = source.error();
        status.watch_restarts = metrics.watch_restarts_total();
        (status.attach, status.attach_failures) = attach_points.lock().map(|p| p.clone()).unwrap_or_default();
        status.rp_filter = metrics.rp_filter();
        if let Some(p) = &cfg.status_file {
            write_status(p, &status);
        }
        drop(snap);
        if status.last_sync_writes > 10_000 || status.syncs == 1 {
            drop(computed);
            // Listing and decoding thousands of objects leaves freed memory in
            // glibc's arenas; hand it back so that RSS shows the live set.
            // SAFETY: malloc_trim only releases free heap memory.
            unsafe { libc::malloc_trim(0) };
        }

        // Wait for the next change (or retry), then let a burst of changes settle.
        // Collector passes are handled meanwhile, without a sync.
        let wake = tokio::time::Instant::now() + retry.unwrap_or(Duration::from_secs(3600));
        let stop = loop {
            tokio::select! {
                _ = source.changed.notified() => break false,
                _ = tokio::time::sleep_until(wake) => break false,
                Some(pass) = gc_rx.recv() => {
                    metrics.conntrack_pass(&pass);
                    match syncer.release_orphans(&pass.live, &mut maps) {
                        Ok(st) if st.ops() > 0 => info!(writes = st.ops(), left = syncer.orphan_count(), "released draining entries of deleted Services that no flow uses"),
                        Ok(_) => {}
                        Err(e) => warn!(error = %chain(&e), "releasing orphaned draining entries failed; retried at the next pass"),
                    }
                    if pass.expired_flows > 0 {
                        debug!(expired = pass.expired_flows, open = pass.open_flows, took_us = pass.took_us, "conntrack collected");
                    }
                }
                _ = attach_changed.notified() => {
                    (status.attach, status.attach_failures) = attach_points.lock().map(|p| p.clone()).unwrap_or_default();
                    status.ready = metrics.is_ready();
                    if let Some(p) = &cfg.status_file {
                        write_status(p, &status);
                    }
                }
                _ = &mut shutdown => break true,
            }
        };
        if stop {
            break;
        }
        let first = Instant::now();
        loop {
            let left = cfg.max_delay.saturating_sub(first.elapsed());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(cfg.debounce.min(left), source.changed.notified()).await {
                Ok(()) => continue,
                Err(_) => break,
            }
        }
    }
    info!("shutting down; maps and links stay pinned, so traffic keeps flowing");
    Ok(())
}

fn programmed(syncer: &sync::Syncer, desired: &model::Desired) -> Vec<metrics::ProgrammedFrontend> {
    desired
        .frontends
        .iter()
        .filter_map(|(k, f)| {
            let v = syncer.shadow().services.get(&k.map_key())?;
            Some(metrics::ProgrammedFrontend {
                key: *k,
                id: v.id,
                service: f.service.clone(),
                backends: v.count as usize,
            })
        })
        .collect()
}

/// What `--cleanup` removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cleanup {
    pub links: usize,
    pub maps: Vec<String>,
}

/// Removes the pinned links (detaching the datapath), the pinned maps and the status
/// file. Safe to run when nothing is there.
pub fn cleanup(bpffs: &Path, status_file: Option<&Path>) -> Result<Cleanup> {
    let mut out = Cleanup {
        links: attach::remove_links(bpffs)
            .with_context(|| format!("removing pinned links under {}", bpffs.display()))?,
        ..Default::default()
    };
    if let Ok(entries) = std::fs::read_dir(bpffs) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if lb_common::map_names::PREFIXES.iter().any(|p| name.starts_with(p)) {
                std::fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
                out.maps.push(name);
            }
        }
    }
    if let Some(p) = status_file {
        let _ = std::fs::remove_file(p);
    }
    Ok(out)
}
