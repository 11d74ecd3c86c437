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
pub mod socklb;
pub mod sync;
pub mod table;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Notify, mpsc},
    task::{JoinHandle, JoinSet},
};
use tracing::{debug, error, info, warn};

use crate::datapath::{self, LoadOptions, upgrade};

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
    /// Socket LB: the cgroup whose subtree it serves, or `None` for off.
    pub socket_lb: Option<socklb::CgroupRoot>,
    /// The host's `/proc`: its processes name the network namespaces (pods') whose
    /// sockets the socket LB may have to close.
    pub proc_dir: PathBuf,
    /// Mount a bpffs at `bpffs` if none is there (`--mount-bpffs`); false: refuse.
    pub mount_bpffs: bool,
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
    /// Where the socket LB is attached; `None` when it is off.
    pub socket_lb: Option<socklb::SocketLbStatus>,
    /// The migration of the previous map layout's state this agent did at start, if
    /// any (`datapath::upgrade`).
    #[serde(default)]
    pub upgrade: Option<crate::datapath::upgrade::UpgradeReport>,
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

/// Writes the status atomically (a temporary file renamed over the old one), so that
/// `lb status` never reads half a file. Failures are only logged: the status file is
/// a convenience, not worth stopping the agent for.
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
///
/// The steps, in order: what can fail on the flags alone, before the datapath is
/// touched (a bad kubeconfig or a taken --metrics-addr must change nothing): the
/// bpffs check, [`plan_source`] and [`serve`]; then [`open_datapath`] (load or adopt,
/// set the clock), [`AttachTask::start`] (first reconcile, link watch), the
/// [`conntrack_task`], [`open_source`], then the [`SyncLoop`] (initial list, syncs).
/// The attach, HTTP and collector tasks run in a [`Tasks`] set beside the sync loop:
/// the first of them to fail ends the agent with its error; shutdown (or any error)
/// drops the set, which aborts them all.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let started = unix_ms();
    tune_allocator();
    if !cfg.mount_bpffs {
        require_bpffs(&cfg.bpffs)?;
    }
    // Before anything reads the clock (`open_datapath`): from --proc-dir.
    conntrack::init_clock(&cfg.proc_dir)
        .map_err(anyhow::Error::msg)
        .context("reading the kernel's clock; run as root, with the host's /proc as --proc-dir")?;
    let plan = plan_source(&cfg.source).await?;
    let metrics = Arc::new(metrics::Metrics::default());
    let mut tasks = Tasks::default();
    if let Some(addr) = cfg.metrics_addr {
        tasks.spawn("HTTP", serve(addr, metrics.clone()).await?);
    }
    let Datapath { mut ebpf, maps, syncer, upgrade } = open_datapath(&cfg.bpffs, &cfg.map_sizes)?;
    open_stats(&metrics, &cfg.bpffs);
    let socket_lb = start_socket_lb(&mut ebpf, &cfg, &metrics)?;
    let (attach, attach_state) = AttachTask::start(ebpf, &cfg.attach, &cfg.bpffs, cfg.iface_rescan, metrics.clone())?;
    // Every link now runs this agent's programs (the first reconcile adopted them):
    // the old layout's maps are written no more.
    let upgrade = upgrade.map(finish_upgrade).transpose()?;
    tasks.spawn("attach", attach.run());
    // The collector's passes come back to the sync loop, which owns the syncer and
    // releases orphans.
    let (gc_tx, gc_rx) = mpsc::channel::<conntrack::GcPass>(1);
    if let Some(every) = cfg.conntrack_gc {
        match conntrack_task(&cfg.bpffs, every, gc_tx) {
            Ok(task) => tasks.spawn("conntrack collector", task),
            Err(e) => warn!(error = %chain(&e), "no conntrack collector; expired flows age out of the LRU only"),
        }
    }
    let source = open_source(plan, cfg.file_poll, metrics.clone()).await?;
    info!(source = %source.description, node = ?cfg.node.name, zone = ?cfg.node.zone, "waiting for the initial list");
    let mut sync = SyncLoop::new(SyncConfig::of(&cfg, started), source, syncer, maps, metrics, attach_state, gc_rx);
    if let Some((status, closer)) = socket_lb {
        sync = sync.with_socket_lb(status, closer);
    }
    sync.status.upgrade = upgrade;
    tokio::select! {
        r = sync.run(shutdown) => r,
        e = tasks.failure() => Err(e),
    }
}

/// Two malloc arenas instead of glibc's 8 per core: the agent's threads allocate
/// little but long-lived memory (the watched objects), and more arenas mostly add
/// fragmentation to the RSS.
fn tune_allocator() {
    // SAFETY: mallopt only tunes the allocator; it is called before the agent's
    // threads start allocating in earnest.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

/// `--mount-bpffs off`: `bpffs`, or the nearest directory above it that exists, must
/// already be on a bpffs (the node's, seen through a hostPath volume).
fn require_bpffs(bpffs: &Path) -> Result<()> {
    let existing = bpffs.ancestors().find(|d| d.exists()).unwrap_or(Path::new("/"));
    if !datapath::is_bpffs(existing) {
        anyhow::bail!(
            "{} is not on a bpffs and --mount-bpffs is off: mount one on the node \
             (`mount -t bpf bpf /sys/fs/bpf`, which systemd does at boot) and give the agent \
             the node's /sys/fs/bpf (hostPath), or run with --mount-bpffs on",
            existing.display()
        );
    }
    Ok(())
}

/// The datapath as [`open_datapath`] leaves it: the programs (for the attacher), the
/// maps, and a syncer whose shadow is what the maps hold.
pub struct Datapath {
    pub ebpf: aya::Ebpf,
    pub maps: sync::BpfMaps,
    pub syncer: sync::Syncer,
    /// The previous layout's state, carried into the new maps; to be finished
    /// ([`finish_upgrade`]) once the programs are swapped.
    pub upgrade: Option<upgrade::Upgrade>,
}

/// Loads the datapath, or adopts the one pinned under `bpffs` by an earlier agent
/// (nothing is flushed), rebuilds the shadow from the maps and writes the kernel's
/// clock rate for the conntrack timeouts. Over the previous map layout's pins, the new
/// maps are fresh and the old state is copied into them first (`datapath::upgrade`);
/// over a newer layout's, nothing is touched and the start is refused.
pub fn open_datapath(bpffs: &Path, map_sizes: &[(&'static str, u32)]) -> Result<Datapath> {
    datapath::ensure_bpffs(bpffs)
        .with_context(|| format!("preparing bpffs at {}; run as root, or pick another --bpffs", bpffs.display()))?;
    let mut upgrade = upgrade::prepare(bpffs)?;
    let mut opts = LoadOptions::new(bpffs);
    opts.max_entries = map_sizes.to_vec();
    opts.migrating = upgrade.is_some();
    let ebpf = datapath::load(&opts).context("loading the datapath; `lb cleanup` removes stale pins")?;
    match &mut upgrade {
        Some(up) => {
            info!(
                from = upgrade::PREVIOUS,
                to = lb_common::MAP_LAYOUT_VERSION,
                maps = up.old_maps().count(),
                "map layout upgrade: carrying the pinned state into the new maps"
            );
            up.copy(&ebpf).context("carrying the previous map layout's state; the old maps are left as they were")?;
        }
        // A fresh load, or this layout's own maps: complete as they are.
        None => upgrade::write_marker(bpffs)
            .with_context(|| format!("writing the layout marker under {}", bpffs.display()))?,
    }
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
        bpffs = %bpffs.display(),
        "datapath loaded; shadow rebuilt from the pinned maps (nothing flushed)"
    );
    Ok(Datapath { ebpf, maps, syncer, upgrade })
}

/// The end of a map layout upgrade, after the swap: copies what the old programs wrote
/// meanwhile, removes the old maps' pins and marks the bpffs with the new layout.
fn finish_upgrade(up: upgrade::Upgrade) -> Result<upgrade::UpgradeReport> {
    let report = up.finish().context("finishing the map layout upgrade")?;
    let entries: usize = report.carried.iter().map(|c| c.before_swap + c.after_swap).sum();
    info!(
        from = report.from,
        to = report.to,
        entries,
        copy_ms = report.copy_ms,
        swap_ms = report.swap_ms,
        removed = report.removed.len(),
        "map layout upgrade done: state carried, programs swapped, old maps removed"
    );
    Ok(report)
}

/// `--socket-lb`: attaches the socket LB to the node's cgroup (replacing an earlier
/// agent's links), or detaches whatever an earlier agent left when it is off. A
/// cgroup that cannot be found or attached to ends the agent: serving the node's pods
/// but silently not its host-network processes would be worse. Closing stale sockets
/// needs kernel 6.5+ (`bpf_sock_destroy`); without it the socket LB still works, and
/// connected UDP sockets keep their backend until the application reconnects.
fn start_socket_lb(
    ebpf: &mut aya::Ebpf,
    cfg: &AgentConfig,
    metrics: &metrics::Metrics,
) -> Result<Option<(socklb::SocketLbStatus, Option<socklb::Closer>)>> {
    let bpffs = cfg.bpffs.as_path();
    let Some(root) = cfg.socket_lb.as_ref() else {
        let n = socklb::detach(bpffs).with_context(|| format!("removing socket LB links under {}", bpffs.display()))?;
        if n > 0 {
            info!(links = n, "socket LB off: detached the links an earlier agent left");
        }
        return Ok(None);
    };
    let cgroup = socklb::resolve(root)?;
    let status = socklb::attach(ebpf, bpffs, &cgroup)
        .with_context(|| format!("attaching the socket LB to {}; or run with --socket-lb=off", cgroup.display()))?;
    metrics.set_socket_lb_attached(status.programs.len());
    info!(cgroup = %cgroup.display(), programs = ?status.programs, "socket LB attached");
    let closer = match socklb::Closer::open(bpffs, &cfg.proc_dir) {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %chain(&e), "cannot close the sockets of departed backends; connected UDP sockets keep their backend until they reconnect");
            None
        }
    };
    Ok(Some((status, closer)))
}

/// The metrics, with the datapath's counters if their maps open.
/// The datapath's counters for /metrics, once the maps are there.
fn open_stats(metrics: &metrics::Metrics, bpffs: &Path) {
    match metrics::StatsReader::open(bpffs) {
        Ok(r) => metrics.set_stats_reader(r),
        Err(e) => warn!(error = %e, "cannot open counter maps; datapath counters not exported"),
    }
}

/// Binds `addr` now (so that a taken port fails the start) and returns the task that
/// serves `/metrics`, `/healthz` and `/readyz` there.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<metrics::Metrics>,
) -> Result<impl Future<Output = Result<()>> + Send + 'static> {
    let (_, server) = metrics::serve(addr, metrics)
        .await
        .with_context(|| format!("listening on --metrics-addr {addr}; is another agent running?"))?;
    Ok(async move {
        // The server is a task of its own, which dropping its handle would leave
        // running: abort it with this one.
        let mut server = AbortOnDrop(server);
        (&mut server.0).await.context("the HTTP server panicked")?;
        anyhow::bail!("the HTTP server stopped")
    })
}

struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The agent's side tasks, by name. The first to fail ends the agent: see
/// [`Tasks::failure`]. Dropping the set aborts the tasks still running.
#[derive(Default)]
pub struct Tasks {
    set: JoinSet<Result<()>>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl Tasks {
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = Result<()>> + Send + 'static) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// The first failure among the tasks (an error or a panic), named. A task that
    /// ends without an error just leaves the set (the collector, once the sync loop is
    /// gone); while none fails, and once none is left, this never returns.
    pub async fn failure(&mut self) -> anyhow::Error {
        loop {
            let (id, res) = match self.set.join_next_with_id().await {
                None => return std::future::pending().await,
                Some(Ok((id, res))) => (id, Ok(res)),
                Some(Err(e)) => (e.id(), Err(e)),
            };
            let name = self.names.remove(&id).unwrap_or("agent");
            match res {
                Ok(Ok(())) => debug!(task = name, "task ended"),
                Ok(Err(e)) => return e.context(format!("the {name} task failed")),
                Err(e) => return anyhow::Error::new(e).context(format!("the {name} task panicked")),
            }
        }
    }
}

/// The attachments as last reconciled, shared by the attach task with the sync loop
/// (for the status file); `changed` fires when they or their failures change, so that
/// the status file follows without waiting for a sync.
#[derive(Clone, Default)]
pub struct AttachState {
    now: Arc<Mutex<(Vec<attach::AttachPoint>, Vec<attach::AttachFailure>)>>,
    changed: Arc<Notify>,
}

impl AttachState {
    /// Stores a reconcile's outcome and signals `changed` if it differs from the last
    /// one (see [`attach_differs`]); returns whether it did.
    pub fn publish(&self, points: Vec<attach::AttachPoint>, failures: Vec<attach::AttachFailure>) -> bool {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        let differs = attach_differs((&now.0, &now.1), (&points, &failures));
        if differs {
            self.changed.notify_one();
        }
        *now = (points, failures);
        differs
    }

    pub fn get(&self) -> (Vec<attach::AttachPoint>, Vec<attach::AttachFailure>) {
        self.now.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

/// Whether a reconcile changed what the status shows. A failure counts as changed
/// when it comes, goes or is attempted again, not when only its countdown
/// (`retry_in_s`) or error text moves: that would rewrite the status file on every
/// rescan while an interface keeps failing.
pub fn attach_differs(
    old: (&[attach::AttachPoint], &[attach::AttachFailure]),
    new: (&[attach::AttachPoint], &[attach::AttachFailure]),
) -> bool {
    let key = |f: &attach::AttachFailure| (f.iface.clone(), f.hook.clone(), f.attempts);
    old.0 != new.0 || !old.1.iter().map(key).eq(new.1.iter().map(key))
}

/// Keeps the attachments in line with the interfaces (netlink news, a periodic
/// rescan, retries of failed attaches), and the loaded programs alive for new
/// interfaces, for the agent's lifetime.
pub struct AttachTask {
    attacher: attach::Attacher,
    metrics: Arc<metrics::Metrics>,
    state: AttachState,
    link_events: Arc<Notify>,
    rescan: Duration,
    /// Any interface or glob to follow at all.
    active: bool,
}

impl AttachTask {
    /// Takes the loaded programs, attaches them where wanted now, and starts following
    /// link changes.
    pub fn start(
        ebpf: aya::Ebpf,
        cfg: &attach::AttachConfig,
        bpffs: &Path,
        rescan: Duration,
        metrics: Arc<metrics::Metrics>,
    ) -> Result<(Self, AttachState)> {
        let active = !cfg.ifaces.is_empty() || !cfg.globs.is_empty();
        let attacher = attach::Attacher::new(ebpf, cfg.clone(), bpffs).context("creating the links directory")?;
        let state = AttachState::default();
        let mut task =
            Self { attacher, metrics, state: state.clone(), link_events: Arc::new(Notify::new()), rescan, active };
        task.reconcile();
        if active {
            attach::watch_links(task.link_events.clone());
        }
        Ok((task, state))
    }

    fn reconcile(&mut self) {
        let (now, errors) = self.attacher.reconcile();
        for _ in 0..errors {
            self.metrics.attach_error();
        }
        let failures = self.attacher.failures();
        self.metrics.set_attached(now.len());
        self.metrics.set_attach_failures(&failures);
        self.metrics.set_rp_filter(self.attacher.rp_filter_status());
        self.state.publish(now, failures);
    }

    /// Never returns; aborting it drops the programs (the pinned links keep them
    /// attached).
    pub async fn run(mut self) -> Result<()> {
        if !self.active {
            // Nothing to follow, but the programs stay loaded.
            std::future::pending::<()>().await;
        }
        loop {
            let retry = self.attacher.next_retry().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = self.link_events.notified() => {
                    // Let a burst of link messages (veth pair creation) settle.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ = tokio::time::sleep(self.rescan) => {}
                _ = async { tokio::time::sleep_until(retry.unwrap_or_else(tokio::time::Instant::now)).await }, if retry.is_some() => {}
            }
            self.reconcile();
        }
    }
}

/// The conntrack collector: opens its own handle on the table now, and returns the
/// task that walks it every `every` (on a blocking thread) and sends each pass to the
/// sync loop. The task ends when the sync loop is gone.
pub fn conntrack_task(
    bpffs: &Path,
    every: Duration,
    passes: mpsc::Sender<conntrack::GcPass>,
) -> Result<impl Future<Output = Result<()>> + Send + 'static, conntrack::GcError> {
    let ct = Arc::new(Mutex::new((conntrack::open(bpffs)?, conntrack::Fill::open(bpffs)?)));
    Ok(async move {
        loop {
            tokio::time::sleep(every).await;
            let ct = ct.clone();
            let pass = tokio::task::spawn_blocking(move || {
                let (ct, fill) = &mut *ct.lock().unwrap_or_else(|e| e.into_inner());
                let mut pass = conntrack::collect(ct, conntrack::now_tick());
                fill.measure(&mut pass);
                pass
            })
            .await;
            match pass {
                Ok(p) => {
                    if passes.send(p).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => warn!(error = %e, "conntrack collector pass failed"),
            }
        }
    })
}

/// A source whose configuration has been read ([`plan_source`]), not yet started.
pub enum SourcePlan {
    File(PathBuf),
    Kubernetes(kube::Client),
}

/// Reads what the source needs (the kubeconfig) without contacting anything, so that
/// a bad one fails the start before the datapath is touched.
pub async fn plan_source(spec: &SourceSpec) -> Result<SourcePlan> {
    Ok(match spec {
        SourceSpec::File(path) => SourcePlan::File(path.clone()),
        SourceSpec::Kubernetes { kubeconfig } => SourcePlan::Kubernetes(
            k8s::client(kubeconfig.as_deref())
                .await
                .context("configuring the Kubernetes client; fix --kubeconfig, or use --source file:PATH")?,
        ),
    })
}

/// Starts watching the source (the Kubernetes watches, or following the file); the
/// sync loop waits for its initial list.
pub async fn open_source(plan: SourcePlan, file_poll: Duration, metrics: Arc<metrics::Metrics>) -> Result<k8s::Source> {
    Ok(match plan {
        SourcePlan::File(path) => k8s::file(path, file_poll, metrics),
        SourcePlan::Kubernetes(client) => {
            k8s::kubernetes(client, metrics).await.context("starting the Kubernetes watches")?
        }
    })
}

/// When a sync starts after a change: once changes have been quiet for `debounce`,
/// or `max_delay` after the first one, whichever comes first. A rolling update
/// changes an EndpointSlice many times a second; one sync covers a burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Debounce {
    pub debounce: Duration,
    pub max_delay: Duration,
}

impl Debounce {
    /// Returns once the changes signalled on `changed` have settled (the change that
    /// woke the caller counts as the first).
    pub async fn settle(&self, changed: &Notify) {
        let first = tokio::time::Instant::now();
        loop {
            let left = self.max_delay.saturating_sub(first.elapsed());
            if left.is_zero() {
                return;
            }
            if tokio::time::timeout(self.debounce.min(left), changed.notified()).await.is_err() {
                return;
            }
        }
    }
}

/// The delay before retrying a failed sync: 100 ms, doubling up to 10 s.
pub fn next_retry(prev: Option<Duration>) -> Duration {
    prev.map_or(Duration::from_millis(100), |d| (d * 2).min(Duration::from_secs(10)))
}

/// What the sync loop needs of [`AgentConfig`].
#[derive(Clone, Debug)]
pub struct SyncConfig {
    pub node: model::NodeInfo,
    pub status_file: Option<PathBuf>,
    pub debounce: Debounce,
    /// When the agent started (Unix ms), for `ready_after_ms`.
    pub started_unix_ms: u64,
}

impl SyncConfig {
    pub fn of(cfg: &AgentConfig, started_unix_ms: u64) -> Self {
        Self {
            node: cfg.node.clone(),
            status_file: cfg.status_file.clone(),
            debounce: Debounce { debounce: cfg.debounce, max_delay: cfg.max_delay },
            started_unix_ms,
        }
    }
}

/// What woke the sync loop between syncs.
enum Wake {
    /// The source changed, or the retry of a failed sync is due.
    Sync,
    Collected(conntrack::GcPass),
    AttachChanged,
    Shutdown,
}

/// Programs the maps from the source: waits for the initial list, then syncs on every
/// (settled) change, retries failed syncs with backoff, and keeps the status file.
/// Generic over the map writer so that a sync can be tested without a kernel.
pub struct SyncLoop<W> {
    cfg: SyncConfig,
    source: k8s::Source,
    syncer: sync::Syncer,
    maps: W,
    metrics: Arc<metrics::Metrics>,
    attach: AttachState,
    collected: mpsc::Receiver<conntrack::GcPass>,
    status: AgentStatus,
    /// The issues of the previous sync, so that each is logged once.
    prev_issues: HashSet<model::Issue>,
    /// Set while syncs fail: the delay before the next attempt.
    retry: Option<Duration>,
    /// Closes the sockets of departed backends, with the socket LB on.
    closer: Option<socklb::Closer>,
}

impl<W: sync::MapWriter> SyncLoop<W> {
    pub fn new(
        cfg: SyncConfig,
        source: k8s::Source,
        syncer: sync::Syncer,
        maps: W,
        metrics: Arc<metrics::Metrics>,
        attach: AttachState,
        collected: mpsc::Receiver<conntrack::GcPass>,
    ) -> Self {
        let status = AgentStatus {
            pid: std::process::id(),
            source: source.description.clone(),
            started_unix_ms: cfg.started_unix_ms,
            ..Default::default()
        };
        Self {
            cfg,
            source,
            syncer,
            maps,
            metrics,
            attach,
            collected,
            status,
            prev_issues: HashSet::new(),
            retry: None,
            closer: None,
        }
    }

    /// With the socket LB on: its status goes into the status file, and after every
    /// sync the sockets of departed backends are closed through `closer`.
    pub fn with_socket_lb(mut self, status: socklb::SocketLbStatus, closer: Option<socklb::Closer>) -> Self {
        self.status.socket_lb = Some(status);
        self.closer = closer;
        self
    }

    /// Until `shutdown`: a shutdown before the initial list ends it without a sync.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        tokio::select! {
            r = self.source.wait_ready() => r.context("waiting for the initial list")?,
            _ = &mut shutdown => {
                info!("shutting down before the first sync; maps and links stay pinned");
                return Ok(());
            }
        }
        loop {
            self.step();
            if !self.wait(&mut shutdown).await {
                break;
            }
            self.cfg.debounce.settle(&self.source.changed).await;
        }
        info!("shutting down; maps and links stay pinned, so traffic keeps flowing");
        Ok(())
    }

    /// One sync of the source's current snapshot: compute, write the difference, log
    /// new issues, update the metrics and the status (file).
    pub fn step(&mut self) {
        let t_start = Instant::now();
        let snap = self.source.snapshot();
        let computed = model::compute_on(
            &self.cfg.node,
            snap.services.iter().map(|s| s.as_ref()),
            snap.slices.iter().map(|s| s.as_ref()),
        );
        let t_computed = t_start.elapsed();
        let res = self.syncer.sync(&computed.desired, &mut self.maps);
        let took = t_start.elapsed();
        self.report_issues(&computed.issues);
        match &res {
            Ok(st) => self.synced(st, took, t_computed),
            Err(e) => self.failed(e, took),
        }
        // After the write: a socket closed now reconnects to a backend of the new set.
        self.close_departed();
        self.metrics.set_programmed(programmed(&self.syncer, &computed.desired));
        let status = &mut self.status;
        status.ready = self.metrics.is_ready();
        status.syncs = self.metrics.syncs();
        status.last_sync_unix_ms = unix_ms();
        status.last_sync_duration_us = took.as_micros() as u64;
        status.invalid_objects = computed.issues.len();
        status.source_error = self.source.error();
        status.watch_restarts = self.metrics.watch_restarts_total();
        (status.attach, status.attach_failures) = self.attach.get();
        status.rp_filter = self.metrics.rp_filter();
        self.write_status();
        drop(snap);
        if self.status.last_sync_writes > 10_000 || self.status.syncs == 1 {
            drop(computed);
            // Listing and decoding thousands of objects leaves freed memory in
            // glibc's arenas; hand it back so that RSS shows the live set.
            // SAFETY: malloc_trim only releases free heap memory.
            unsafe { libc::malloc_trim(0) };
        }
    }

    /// Closes the sockets the socket LB sent to the backends this sync removed (UDP), or
    /// whose pods are gone (TCP too).
    fn close_departed(&mut self) {
        let Some(closer) = &mut self.closer else {
            // Nothing to close: skip classifying what left (a set of every owned id).
            self.syncer.forget_departed();
            return;
        };
        let departed = self.syncer.take_departed();
        if departed.is_empty() {
            return;
        }
        match closer.close(&departed) {
            Ok(socklb::Closed { udp, tcp, netns_refused }) => {
                self.metrics.sockets_destroyed(udp, tcp);
                self.metrics.socket_netns_refused(netns_refused);
                if udp + tcp > 0 {
                    info!(udp, tcp, backends = departed.len(), "closed the sockets of departed backends");
                }
                if netns_refused > 0 {
                    warn!(
                        netns_refused,
                        "the kernel kept the agent out of some network namespaces, whose sockets to departed \
                         backends stay open; give the agent CAP_SYS_PTRACE (to open /proc/<pid>/ns/net) and \
                         CAP_SYS_ADMIN (to enter it), as deploy/lb-agent.yaml does"
                    );
                }
            }
            Err(e) => {
                self.metrics.socket_close_error();
                warn!(error = %chain(&e), "closing the sockets of departed backends failed; they stay open");
            }
        }
    }

    /// Logs the issues that are new since the last sync (the first 20 of them).
    fn report_issues(&mut self, issues: &[model::Issue]) {
        let new: Vec<&model::Issue> = issues.iter().filter(|i| !self.prev_issues.contains(*i)).collect();
        for (i, issue) in new.iter().enumerate() {
            if i == 20 {
                warn!("... and {} more problems (see lb_invalid_objects)", new.len() - 20);
                break;
            }
            warn!(kind = issue.kind.name(), object = %issue.object, "{}; skipped, the rest is programmed", issue.detail);
        }
        self.metrics.issues(&new, issues);
        self.prev_issues = issues.iter().cloned().collect();
    }

    fn synced(&mut self, st: &sync::SyncStats, took: Duration, t_computed: Duration) {
        self.retry = None;
        let status = &mut self.status;
        status.last_sync_error = None;
        let first = !self.metrics.is_synced();
        self.metrics.sync_done(took, true, st.ops(), st.frontends, st.endpoints);
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
            self.metrics.set_ready();
            status.initial_sync_duration_us = took.as_micros() as u64;
            status.initial_sync_writes = st.ops();
            status.ready_after_ms = unix_ms().saturating_sub(self.cfg.started_unix_ms);
            info!(after = ?Duration::from_millis(status.ready_after_ms), "initial sync done; ready");
        }
        status.last_sync_writes = st.ops();
        status.frontends = st.frontends;
        status.endpoints = st.endpoints;
    }

    fn failed(&mut self, e: &sync::SyncError, took: Duration) {
        self.metrics.sync_done(took, false, 0, self.syncer.frontend_count(), 0);
        let delay = next_retry(self.retry);
        error!(error = %chain(e), retry_in = ?delay, "sync failed; the maps keep a consistent state");
        self.status.last_sync_error = Some(chain(e));
        self.retry = Some(delay);
    }

    /// Waits for the next change (or retry); collector passes and attach changes are
    /// handled meanwhile, without a sync. False on shutdown.
    async fn wait<S: Future<Output = ()>>(&mut self, shutdown: &mut Pin<&mut S>) -> bool {
        let wake = tokio::time::Instant::now() + self.retry.unwrap_or(Duration::from_secs(3600));
        loop {
            let woke = tokio::select! {
                _ = self.source.changed.notified() => Wake::Sync,
                _ = tokio::time::sleep_until(wake) => Wake::Sync,
                Some(pass) = self.collected.recv() => Wake::Collected(pass),
                _ = self.attach.changed.notified() => Wake::AttachChanged,
                _ = shutdown.as_mut() => Wake::Shutdown,
            };
            match woke {
                Wake::Sync => return true,
                Wake::Shutdown => return false,
                Wake::Collected(pass) => self.collected(&pass),
                Wake::AttachChanged => self.attach_changed(),
            }
        }
    }

    /// A collector pass: release the draining entries of deleted Services that no
    /// flow uses any more.
    fn collected(&mut self, pass: &conntrack::GcPass) {
        self.metrics.conntrack_pass(pass);
        match self.syncer.release_orphans(&pass.live, &mut self.maps) {
            Ok(st) if st.ops() > 0 => info!(
                writes = st.ops(),
                left = self.syncer.orphan_count(),
                "released draining entries of deleted Services that no flow uses"
            ),
            Ok(_) => {}
            Err(e) => {
                warn!(error = %chain(&e), "releasing orphaned draining entries failed; retried at the next pass")
            }
        }
        if pass.expired_flows > 0 {
            debug!(expired = pass.expired_flows, open = pass.open_flows, took_us = pass.took_us, "conntrack collected");
        }
    }

    /// The attachments changed: the status (file) follows at once.
    fn attach_changed(&mut self) {
        (self.status.attach, self.status.attach_failures) = self.attach.get();
        self.status.ready = self.metrics.is_ready();
        self.write_status();
    }

    fn write_status(&self) {
        if let Some(p) = &self.cfg.status_file {
            write_status(p, &self.status);
        }
    }
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

/// What `lb cleanup` removed.
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
            .with_context(|| format!("removing pinned links under {}", bpffs.display()))?
            + socklb::detach(bpffs).with_context(|| format!("removing socket LB links under {}", bpffs.display()))?,
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
    for m in upgrade::markers(bpffs) {
        std::fs::remove_dir(&m).with_context(|| format!("removing {}", m.display()))?;
    }
    if let Some(p) = status_file {
        let _ = std::fs::remove_file(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;
    use tokio::time::Instant as TokioInstant;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn retry_backoff_doubles_from_100ms_up_to_10s() {
        let mut d = None;
        let mut seen = Vec::new();
        for _ in 0..10 {
            d = Some(next_retry(d));
            seen.push(d.unwrap().as_millis());
        }
        assert_eq!(seen, [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]);
    }

    /// Signals `changed` at these offsets (from now), on a task of its own.
    fn changes_at(changed: &Arc<Notify>, offsets: Vec<Duration>) {
        let (changed, t0) = (changed.clone(), TokioInstant::now());
        tokio::spawn(async move {
            for at in offsets {
                tokio::time::sleep_until(t0 + at).await;
                changed.notify_one();
            }
        });
    }

    async fn settle_time(d: Debounce, changed: &Notify) -> Duration {
        let t0 = TokioInstant::now();
        d.settle(changed).await;
        t0.elapsed()
    }

    const D: Debounce = Debounce { debounce: Duration::from_millis(5), max_delay: Duration::from_millis(50) };

    #[tokio::test(start_paused = true)]
    async fn settle_waits_out_the_debounce_after_a_lone_change() {
        let changed = Arc::new(Notify::new());
        assert_eq!(settle_time(D, &changed).await, 5 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn settle_extends_while_changes_come_within_the_debounce() {
        let changed = Arc::new(Notify::new());
        changes_at(&changed, vec![3 * MS, 6 * MS, 10 * MS]);
        assert_eq!(settle_time(D, &changed).await, 15 * MS, "10 ms, the last change, plus 5 ms quiet");
    }

    #[tokio::test(start_paused = true)]
    async fn settle_ends_at_the_max_delay_under_a_steady_stream() {
        let changed = Arc::new(Notify::new());
        changes_at(&changed, (1..1000).map(|i| i * 2 * MS).collect());
        assert_eq!(settle_time(D, &changed).await, 50 * MS);
        // A max delay equal to the debounce (the clamp's floor) is one debounce.
        let d = Debounce { debounce: 5 * MS, max_delay: 5 * MS };
        assert_eq!(settle_time(d, &changed).await, 5 * MS);
    }

    fn point(iface: &str) -> attach::AttachPoint {
        attach::AttachPoint {
            iface: iface.into(),
            ifindex: 2,
            mode: datapath::AttachMode::Tc,
            egress: false,
            link_id: Some(7),
            program_id: Some(9),
        }
    }

    fn failure(attempts: u32, retry_in_s: u64, error: &str) -> attach::AttachFailure {
        attach::AttachFailure {
            iface: "eth0".into(),
            ifindex: 3,
            hook: "xdp".into(),
            error: error.into(),
            attempts,
            retry_in_s,
        }
    }

    #[test]
    fn attach_change_is_a_point_or_a_failure_coming_going_or_retried() {
        let (p, f) = (vec![point("veth1")], vec![failure(1, 4, "EBUSY")]);
        let same = |q: &[attach::AttachPoint], g: &[attach::AttachFailure]| !attach_differs((&p, &f), (q, g));
        assert!(same(&p, &f));
        assert!(same(&p, &[failure(1, 1, "EBUSY: still")]), "only the countdown and the text moved");
        assert!(!same(&p, &[failure(2, 1, "EBUSY")]), "attempted again");
        assert!(!same(&p, &[]), "failure gone");
        assert!(!same(&p, &[failure(1, 4, "EBUSY"), failure(1, 4, "EBUSY")]), "failure added");
        assert!(!same(&[], &f), "point gone");
        assert!(!same(&[point("veth1"), point("veth2")], &f), "point added");
        let mut moved = point("veth1");
        moved.link_id = Some(8);
        assert!(!same(&[moved], &f), "relinked");
    }

    #[test]
    fn attach_state_signals_changes_only() {
        let st = AttachState::default();
        let pending = |st: &AttachState| st.changed.notified().now_or_never().is_some();
        assert!(!st.publish(vec![], vec![]), "empty after empty");
        assert!(!pending(&st));
        assert!(st.publish(vec![point("veth1")], vec![]));
        assert!(pending(&st));
        assert!(!pending(&st), "one signal per change");
        assert!(!st.publish(vec![point("veth1")], vec![]));
        assert!(!pending(&st));
        assert_eq!(st.get(), (vec![point("veth1")], vec![]));
    }

    #[tokio::test]
    async fn tasks_end_on_the_first_failure_by_name() {
        let mut tasks = Tasks::default();
        tasks.spawn("quick", async { Ok(()) });
        tasks.spawn("forever", std::future::pending());
        tasks.spawn("doomed", async {
            tokio::time::sleep(20 * MS).await;
            anyhow::bail!("boom")
        });
        let e = tasks.failure().await;
        assert_eq!(format!("{e:#}"), "the doomed task failed: boom");
        // The one left never ends: no failure.
        assert!(tokio::time::timeout(50 * MS, tasks.failure()).await.is_err());

        let mut tasks = Tasks::default();
        tasks.spawn("buggy", async { panic!("oops") });
        let e = tasks.failure().await;
        assert!(format!("{e:#}").starts_with("the buggy task panicked"), "{e:#}");

        let mut empty = Tasks::default();
        assert!(tokio::time::timeout(20 * MS, empty.failure()).await.is_err(), "an empty set fails nothing");
    }

    #[tokio::test]
    async fn dropping_the_tasks_aborts_them() {
        let mut tasks = Tasks::default();
        let (tx, mut rx) = mpsc::channel::<()>(1);
        tasks.spawn("holder", async move {
            let _tx = tx;
            std::future::pending().await
        });
        drop(tasks);
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), rx.recv()).await, Ok(None));
    }

    /// Map writes counted, or refused.
    #[derive(Default)]
    struct FakeMaps {
        writes: usize,
        fail: bool,
    }

    impl sync::MapWriter for FakeMaps {
        fn apply(&mut self, _op: &sync::Op) -> Result<(), sync::WriteError> {
            if self.fail {
                return Err("injected write failure".into());
            }
            self.writes += 1;
            Ok(())
        }
    }

    fn objects(backends: &[&str]) -> String {
        let eps: String =
            backends.iter().map(|a| format!("- addresses: [{a}]\n  conditions: {{ready: true}}\n")).collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: 10.96.0.10\n  \
             ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  \
             labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints:\n{eps}"
        )
    }

    fn write_atomic(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// The status after syncs that succeed, fail (retried with backoff) and succeed
    /// again, and after an attach change; and the status file following it.
    #[tokio::test]
    async fn a_sync_step_updates_the_status_and_its_file() {
        let dir = std::env::temp_dir().join(format!("lb-agent-sync-step-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (file, status_file) = (dir.join("objects.yaml"), dir.join("run/status.json"));
        write_atomic(&file, &objects(&["10.244.1.1", "10.244.1.2"]));
        let metrics = Arc::new(metrics::Metrics::default());
        let source = k8s::file(file.clone(), 10 * MS, metrics.clone());
        source.wait_ready().await.unwrap();
        let cfg = SyncConfig {
            node: model::NodeInfo::default(),
            status_file: Some(status_file.clone()),
            debounce: D,
            started_unix_ms: unix_ms() - 1000,
        };
        let attach = AttachState::default();
        let (_tx, rx) = mpsc::channel(1);
        let mut lp =
            SyncLoop::new(cfg, source, sync::Syncer::new(1024), FakeMaps::default(), metrics, attach.clone(), rx);
        let on_disk = || -> AgentStatus { serde_json::from_slice(&std::fs::read(&status_file).unwrap()).unwrap() };

        lp.step();
        let st = lp.status.clone();
        assert!(st.ready && st.syncs == 1 && st.last_sync_error.is_none(), "{st:?}");
        assert_eq!((st.frontends, st.endpoints, st.invalid_objects), (1, 2, 0), "{st:?}");
        assert!(st.initial_sync_writes > 0 && lp.maps.writes > 0, "{st:?}");
        assert_eq!(st.last_sync_writes, st.initial_sync_writes);
        assert!(st.ready_after_ms >= 1000, "{st:?}");
        assert_eq!(st.pid, std::process::id());
        assert!(st.source.starts_with("file "), "{st:?}");
        assert_eq!(lp.retry, None);
        assert_eq!(on_disk().syncs, 1);

        // A third endpoint, whose writes fail: retried at 100 ms, then 200 ms.
        write_atomic(&file, &objects(&["10.244.1.1", "10.244.1.2", "10.244.1.3"]));
        let t0 = Instant::now();
        while lp.source.snapshot().slices.first().is_none_or(|s| s.endpoints.len() != 3) {
            assert!(t0.elapsed() < Duration::from_secs(10), "the file source did not see the change");
            tokio::time::sleep(10 * MS).await;
        }
        lp.maps.fail = true;
        lp.step();
        let st = lp.status.clone();
        assert!(st.last_sync_error.as_deref().is_some_and(|e| e.contains("injected write failure")), "{st:?}");
        assert_eq!(lp.retry, Some(100 * MS));
        assert_eq!((st.syncs, st.endpoints), (2, 2), "the failed sync keeps the last good counts");
        assert!(st.ready, "ready stays once synced");
        assert_eq!(on_disk().last_sync_error, st.last_sync_error);
        lp.step();
        assert_eq!(lp.retry, Some(200 * MS));

        lp.maps.fail = false;
        lp.step();
        let st = lp.status.clone();
        assert_eq!((st.syncs, st.endpoints, st.last_sync_error.as_deref()), (4, 3, None), "{st:?}");
        assert_eq!(lp.retry, None);
        assert!(st.last_sync_writes > 0 && st.last_sync_writes != st.initial_sync_writes, "{st:?}");

        // An attach change reaches the status file without a sync.
        assert!(attach.publish(vec![point("veth1")], vec![]));
        lp.attach_changed();
        let disk = on_disk();
        assert_eq!((disk.attach, disk.syncs), (vec![point("veth1")], 4));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn status_file_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("lb-agent-status-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("a/b/status.json");
        write_status(&path, &AgentStatus { syncs: 3, ..Default::default() });
        write_status(&path, &AgentStatus { syncs: 4, ..Default::default() });
        let st: AgentStatus = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(st.syncs, 4);
        assert!(!path.with_extension("tmp").exists(), "temporary file left");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
