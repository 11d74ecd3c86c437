//! `lb`: the node agent that replaces kube-proxy's ClusterIP handling with an XDP/tc
//! datapath, and the commands that inspect that datapath.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::{self, AgentConfig, SourceSpec, attach::AttachConfig},
    datapath::AttachMode,
    inspect,
};

#[derive(Parser, Debug)]
#[command(name = "lb", version, about = "eBPF/XDP ClusterIP load balancer: node agent and inspection", long_about = None)]
struct Cli {
    /// bpffs directory where the maps and links are pinned (mounted if needed).
    #[arg(long, global = true, env = "LB_BPFFS", default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// Where the agent writes its status, which `lb status` reads.
    #[arg(long, global = true, env = "LB_STATUS_FILE", default_value = "/run/lb/status.json")]
    status_file: PathBuf,
    /// Output format of the inspection commands.
    #[arg(long, short, global = true, env = "LB_OUTPUT", value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `lb_userspace=debug`).
    #[arg(long, global = true, env = "LB_LOG", default_value = "info")]
    log: String,
    /// Log format.
    #[arg(long, global = true, env = "LB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
#[expect(clippy::large_enum_variant, reason = "parsed once at start; boxing the agent's flags buys nothing")]
enum Cmd {
    /// Run the node agent: load and attach the datapath, watch Services and
    /// EndpointSlices, and program the maps.
    #[command(after_help = ATTACH_DEFAULTS)]
    Agent(AgentArgs),
    /// List frontends with their backends and counters, like `ipvsadm -Ln`.
    Services,
    /// List conntrack entries (forward and reply).
    Conntrack,
    /// List ClientIP affinity entries.
    Affinity,
    /// Show datapath counters by verdict reason.
    Stats,
    /// Show attach points, program ids, map fill levels and the agent's last sync.
    Status,
}

/// The `lb agent --help` paragraph on the hook defaults.
const ATTACH_DEFAULTS: &str = "\
Attach defaults:
  Pod interfaces (--iface-glob) get tc, uplinks (--iface) get native XDP. A pod's
  packets reach its veth with CHECKSUM_PARTIAL, which XDP (native or generic) cannot
  see: its NAT then writes checksums that any later device completing them (a NIC, a
  tunnel) turns into drops. Native XDP on a veth also loses the ICMP reject of a
  service without endpoints and about 3/4 of a stream's throughput. tc has none of
  these problems; XDP fits uplinks, whose frames come from the wire with complete
  checksums. So `--pod-attach xdp|xdp-generic` is refused unless --allow-xdp-on-pods
  is given. Measurements: docs/datapath.md and docs/datapath-veth.md.";

#[derive(Args, Debug)]
struct AgentArgs {
    /// Where Services and EndpointSlices come from: `kubernetes`, or `file:PATH` (a
    /// multi-document YAML file, followed for changes).
    #[arg(long, env = "LB_SOURCE", default_value = "kubernetes")]
    source: SourceSpec,
    /// kubeconfig for the `kubernetes` source (default: in-cluster, then
    /// $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "LB_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Uplink interface to attach to, by name (repeatable).
    #[arg(long = "iface", env = "LB_IFACE", value_delimiter = ',')]
    ifaces: Vec<String>,
    /// Pod interfaces to attach to, by glob such as `veth*` or `lxc*` (repeatable);
    /// followed as they come and go.
    #[arg(long = "iface-glob", env = "LB_IFACE_GLOB", value_delimiter = ',')]
    iface_globs: Vec<String>,
    /// Hook for pod interfaces (`--iface-glob`): tc, or xdp / xdp-generic with
    /// --allow-xdp-on-pods (see "Attach defaults" below).
    #[arg(long, env = "LB_POD_ATTACH", default_value = "tc")]
    pod_attach: AttachMode,
    /// Accept `--pod-attach xdp|xdp-generic` although XDP corrupts the checksums of
    /// pods' packets once a device completes them (docs/datapath.md).
    #[arg(long, env = "LB_ALLOW_XDP_ON_PODS")]
    allow_xdp_on_pods: bool,
    /// Hook for uplinks (`--iface`): auto (native XDP on NICs, tc on virtual devices
    /// such as veths, where native XDP loses GRO), xdp, xdp-generic or tc.
    #[arg(long, env = "LB_UPLINK_ATTACH", default_value = "auto")]
    uplink_attach: agent::attach::UplinkMode,
    /// If net.ipv4.conf.all.rp_filter is 1 (strict), set it to 0. The agent always sets
    /// rp_filter to 0 on the interfaces it attaches to, but the kernel applies the
    /// maximum of `all` and the interface, and strict drops every reply the datapath
    /// reverse-NATs. `--fix-rp-filter=false` only warns (log, `lb_rp_filter_problem`,
    /// `lb status`).
    #[arg(long, env = "LB_FIX_RP_FILTER", default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    fix_rp_filter: bool,
    /// Serve Prometheus /metrics, /healthz and /readyz here (e.g. 127.0.0.1:9090).
    #[arg(long, env = "LB_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Start a sync once changes have been quiet this long (milliseconds).
    #[arg(long, env = "LB_DEBOUNCE_MS", default_value_t = 5)]
    debounce_ms: u64,
    /// Start a sync at most this long after the first pending change (milliseconds).
    #[arg(long, env = "LB_MAX_DELAY_MS", default_value_t = 50)]
    max_delay_ms: u64,
    /// How often the file source checks its file (milliseconds).
    #[arg(long, env = "LB_FILE_POLL_MS", default_value_t = 100)]
    file_poll_ms: u64,
    /// Rescan interfaces this often besides netlink notifications (milliseconds).
    #[arg(long, env = "LB_IFACE_RESCAN_MS", default_value_t = 5000)]
    iface_rescan_ms: u64,
    /// Walk the conntrack table this often, deleting flows past their timeout and
    /// releasing what deleted Services' flows no longer use (seconds; 0: never). The
    /// datapath checks timeouts on every lookup either way.
    #[arg(long, env = "LB_CONNTRACK_GC_S", default_value_t = 30)]
    conntrack_gc_s: u64,
    /// This node's name, as EndpointSlices' `nodeName` gives it (the DaemonSet sets it
    /// from the downward API's `spec.nodeName`). Needed for `internalTrafficPolicy:
    /// Local`: without it such Services drop their traffic (and are counted as
    /// `node_name_unknown`), since no endpoint can be told local.
    #[arg(long, env = "LB_NODE_NAME")]
    node_name: Option<String>,
    /// This node's zone (its `topology.kubernetes.io/zone` label), for topology aware
    /// hints; without it hints are ignored, as kube-proxy does on an unlabelled node.
    /// A flag rather than a watch of Node objects, which would cost API load on every
    /// node for a label that seldom changes.
    #[arg(long, env = "LB_NODE_ZONE")]
    node_zone: Option<String>,
    /// Remove everything the agent pinned (links, which detaches the datapath, and
    /// maps) and exit.
    #[arg(long, env = "LB_CLEANUP")]
    cleanup: bool,
    /// Size of the frontend map and the per-service counters: ClusterIP ports plus one
    /// marker per ClusterIP. The maps are preallocated and charged to the agent's memory
    /// cgroup (docs/agent.md gives the bytes per entry). Changing a size on a node with
    /// pinned maps needs `lb agent --cleanup` first.
    #[arg(long, env = "LB_MAX_SERVICES", default_value_t = lb_common::limits::SERVICES,
          value_parser = clap::value_parser!(u32).range(16..))]
    max_services: u32,
    /// Size of the backend-slot map (endpoints over all services).
    #[arg(long, env = "LB_MAX_BACKENDS", default_value_t = lb_common::limits::BACKENDS,
          value_parser = clap::value_parser!(u32).range(16..))]
    max_backends: u32,
    /// Size of the map of draining backends (terminating or unready, still holding flows).
    #[arg(long, env = "LB_MAX_DRAINING", default_value_t = lb_common::limits::DRAINING,
          value_parser = clap::value_parser!(u32).range(16..))]
    max_draining: u32,
    /// Size of the conntrack LRU (two entries per connection).
    #[arg(long, env = "LB_MAX_CONNTRACK", default_value_t = lb_common::limits::CONNTRACK,
          value_parser = clap::value_parser!(u32).range(16..))]
    max_conntrack: u32,
    /// Size of the ClientIP affinity LRU (one entry per client and service).
    #[arg(long, env = "LB_MAX_AFFINITY", default_value_t = lb_common::limits::AFFINITY,
          value_parser = clap::value_parser!(u32).range(16..))]
    max_affinity: u32,
    /// Size of the lookup-table array, in 8-byte words of four buckets: every service's
    /// table (at least 251 buckets, 64 per backend when built), plus room for the new
    /// table of each service that changes at once.
    #[arg(long, env = "LB_MAX_TABLE_WORDS", default_value_t = lb_common::limits::TABLE_WORDS,
          value_parser = clap::value_parser!(u32).range(1024..))]
    max_table_words: u32,
}

fn init_logs(filter: &str, format: LogFormat) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("bad --log filter {filter:?}; try `info` or `lb_userspace=debug`"))?;
    use std::io::IsTerminal as _;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
    Ok(())
}

fn print<T: serde::Serialize>(output: Output, value: &T, table: impl FnOnce(&T) -> String) -> Result<()> {
    match output {
        Output::Table => print!("{}", table(value)),
        Output::Json => println!("{}", serde_json::to_string_pretty(value).context("encoding JSON")?),
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logs(&cli.log, cli.log_format)?;
    let bpffs = cli.bpffs.as_path();
    match cli.cmd {
        Cmd::Agent(a) => agent_main(a, bpffs, &cli.status_file),
        Cmd::Services => print(cli.output, &inspect::services(bpffs)?, |r| inspect::services_table(r)),
        Cmd::Conntrack => print(cli.output, &inspect::conntrack(bpffs)?, |r| inspect::conntrack_table(r)),
        Cmd::Affinity => print(cli.output, &inspect::affinity(bpffs)?, |r| inspect::affinity_table(r)),
        Cmd::Stats => print(cli.output, &inspect::stats(bpffs)?, |r| inspect::stats_table(r)),
        Cmd::Status => print(cli.output, &inspect::status(bpffs, Some(&cli.status_file))?, inspect::status_table),
    }
}

fn agent_main(a: AgentArgs, bpffs: &Path, status_file: &Path) -> Result<()> {
    if a.cleanup {
        let c = agent::cleanup(bpffs, Some(status_file))?;
        tracing::info!(links = c.links, maps = ?c.maps, bpffs = %bpffs.display(), "cleaned up");
        return Ok(());
    }
    agent::attach::check_pod_mode(a.pod_attach, a.allow_xdp_on_pods).map_err(anyhow::Error::msg)?;
    let source = match a.source {
        SourceSpec::Kubernetes { .. } => SourceSpec::Kubernetes { kubeconfig: a.kubeconfig },
        other => other,
    };
    let cfg = AgentConfig {
        bpffs: bpffs.into(),
        source,
        attach: AttachConfig {
            ifaces: a.ifaces,
            globs: a.iface_globs,
            uplink_mode: a.uplink_attach,
            pod_mode: a.pod_attach,
            fix_rp_filter: a.fix_rp_filter,
        },
        metrics_addr: a.metrics_addr,
        debounce: Duration::from_millis(a.debounce_ms),
        max_delay: Duration::from_millis(a.max_delay_ms.max(a.debounce_ms)),
        file_poll: Duration::from_millis(a.file_poll_ms.max(10)),
        status_file: Some(status_file.into()),
        iface_rescan: Duration::from_millis(a.iface_rescan_ms.max(100)),
        conntrack_gc: (a.conntrack_gc_s > 0).then(|| Duration::from_secs(a.conntrack_gc_s)),
        map_sizes: {
            use lb_common::map_names as m;
            vec![
                (m::SERVICES, a.max_services),
                (m::SVC_STATS, a.max_services),
                (m::BACKENDS, a.max_backends),
                (m::DRAINING, a.max_draining),
                (m::CONNTRACK, a.max_conntrack),
                (m::AFFINITY, a.max_affinity),
                (m::TABLES, a.max_table_words),
            ]
        },
        // An empty value (an unset downward-API field) means unknown.
        node: agent::model::NodeInfo {
            name: a.node_name.filter(|n| !n.is_empty()),
            zone: a.node_zone.filter(|z| !z.is_empty()),
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(agent::run(cfg, shutdown_signal()))
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
