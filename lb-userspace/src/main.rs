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
    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `lb_userspace=debug`).
    #[arg(long, global = true, env = "LB_LOG", default_value = "info")]
    log: String,
    /// Log format.
    #[arg(long, global = true, env = "LB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `-o/--output`, on the commands that print (not on `agent`, which only logs).
#[derive(Args, Debug)]
struct OutputArgs {
    /// Output format.
    #[arg(long, short, env = "LB_OUTPUT", value_enum, default_value_t = Output::Table)]
    output: Output,
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
    /// Remove everything the agent pinned (its links, which detaches the datapath, its
    /// maps) and its status file, then list what was removed. Stop the agent first;
    /// safe to run when nothing is there.
    Cleanup(OutputArgs),
    /// List frontends with their backends and counters, like `ipvsadm -Ln`.
    Services(OutputArgs),
    /// List conntrack entries (forward and reply).
    Conntrack(OutputArgs),
    /// List ClientIP affinity entries.
    Affinity(OutputArgs),
    /// Show datapath counters by verdict reason.
    Stats(OutputArgs),
    /// Show attach points, program ids, map fill levels and the agent's last sync.
    Status(OutputArgs),
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
    /// Start a sync once changes have been quiet this long (a duration: `5ms`, `1s`).
    #[arg(long, env = "LB_DEBOUNCE", default_value = "5ms", value_parser = duration)]
    debounce: Duration,
    /// Start a sync at most this long after the first pending change (at least
    /// --debounce).
    #[arg(long, env = "LB_MAX_DELAY", default_value = "50ms", value_parser = duration)]
    max_delay: Duration,
    /// How often the file source checks its file (at least 10ms).
    #[arg(long, env = "LB_FILE_POLL", default_value = "100ms", value_parser = duration)]
    file_poll: Duration,
    /// Rescan interfaces this often besides netlink notifications (at least 100ms).
    #[arg(long, env = "LB_IFACE_RESCAN", default_value = "5s", value_parser = duration)]
    iface_rescan: Duration,
    /// Walk the conntrack table this often, deleting flows past their timeout and
    /// releasing what deleted Services' flows no longer use (0: never). The datapath
    /// checks timeouts on every lookup either way.
    #[arg(long, env = "LB_CONNTRACK_GC", default_value = "30s", value_parser = duration)]
    conntrack_gc: Duration,
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
    /// Size of the frontend map and the per-service counters: ClusterIP ports plus one
    /// marker per ClusterIP. The maps are preallocated and charged to the agent's memory
    /// cgroup (docs/agent.md gives the bytes per entry). Changing a size on a node with
    /// pinned maps needs `lb cleanup` first.
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
    /// Size of the socket LB's LRU of translated sockets (one entry per socket and
    /// backend).
    #[arg(long, env = "LB_MAX_SOCK_REVNAT", default_value_t = lb_common::limits::SOCK_REVNAT,
          value_parser = clap::value_parser!(u32).range(16..))]
    max_sock_revnat: u32,
    /// Socket-level load balancing: translate a ClusterIP once, at connect() (and per
    /// datagram for unconnected UDP), for every process of the node's cgroup subtree:
    /// its pods and its host-network processes. Needed for host-network clients; makes
    /// a connection through a ClusterIP cost what one to a pod IP does. `off` detaches
    /// what an earlier agent attached. The per-packet datapath serves the rest either
    /// way (traffic from other nodes, processes outside the cgroup).
    #[arg(long, env = "LB_SOCKET_LB", default_value = "off", value_parser = on_off, action = clap::ArgAction::Set)]
    socket_lb: bool,
    /// The node's cgroup v2 directory, whose subtree the socket LB serves: `auto`
    /// finds the kubelet's cgroup root from the agent's own cgroup (the agent runs in a
    /// pod) under a cgroup2 mount it can see; or a path. Never a machine's root cgroup
    /// that hosts more than this node.
    #[arg(long, env = "LB_CGROUP_ROOT", default_value = "auto")]
    cgroup_root: agent::socklb::CgroupRoot,
    /// The host's /proc (the DaemonSet mounts it at /host/proc): its processes name the
    /// network namespaces, pods', in which the socket LB closes the sockets of departed
    /// backends. The agent's own /proc sees only its container's processes. rp_filter
    /// is read and written under its `sys/net/ipv4/conf`.
    #[arg(long, env = "LB_PROC_DIR", default_value = "/proc")]
    proc_dir: PathBuf,
    /// Mount a bpffs at --bpffs if none is there. `off` (the DaemonSet): refuse to
    /// start instead, since a bpffs mounted inside a container dies with it, and with it
    /// the pins that keep traffic flowing while the agent restarts.
    #[arg(long, env = "LB_MOUNT_BPFFS", default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
    mount_bpffs: bool,
}

/// `on`/`off` (also `true`/`false`, as a YAML-minded DaemonSet may write them).
fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

/// A duration flag's value: jiff's friendly format (`5ms`, `1.5s`, `2m 30s`, `1 minute`)
/// or ISO 8601 (`PT5S`); a bare `0` is zero too.
fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let d: jiff::SignedDuration = s.parse().map_err(|e| format!("{e}; expected a duration such as 5ms, 2s or 1m"))?;
    Duration::try_from(d).map_err(|_| "a negative duration; expected one such as 5ms, 2s or 1m".into())
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
        Cmd::Cleanup(o) => {
            print(o.output, &agent::cleanup(bpffs, Some(&cli.status_file))?, |c| cleanup_table(c, bpffs))
        }
        Cmd::Services(o) => print(o.output, &inspect::services(bpffs)?, |r| inspect::services_table(r)),
        Cmd::Conntrack(o) => print(o.output, &inspect::conntrack(bpffs)?, |r| inspect::conntrack_table(r)),
        Cmd::Affinity(o) => print(o.output, &inspect::affinity(bpffs)?, |r| inspect::affinity_table(r)),
        Cmd::Stats(o) => print(o.output, &inspect::stats(bpffs)?, |r| inspect::stats_table(r)),
        Cmd::Status(o) => print(o.output, &inspect::status(bpffs, Some(&cli.status_file))?, inspect::status_table),
    }
}

fn cleanup_table(c: &agent::Cleanup, bpffs: &Path) -> String {
    let mut s = format!("removed {} links and {} maps under {}\n", c.links, c.maps.len(), bpffs.display());
    for m in &c.maps {
        s.push_str(&format!("  {m}\n"));
    }
    s
}

fn agent_main(a: AgentArgs, bpffs: &Path, status_file: &Path) -> Result<()> {
    agent::attach::check_pod_mode(a.pod_attach, a.allow_xdp_on_pods).map_err(anyhow::Error::msg)?;
    let cfg = agent_config(a, bpffs, status_file);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(agent::run(cfg, shutdown_signal()))
}

/// The agent's configuration from its flags, with the durations clamped to what
/// makes sense (a max delay under the debounce would cut every burst short; a tighter
/// poll or rescan only burns CPU).
fn agent_config(a: AgentArgs, bpffs: &Path, status_file: &Path) -> AgentConfig {
    let source = match a.source {
        SourceSpec::Kubernetes { .. } => SourceSpec::Kubernetes { kubeconfig: a.kubeconfig },
        other => other,
    };
    AgentConfig {
        bpffs: bpffs.into(),
        source,
        attach: AttachConfig {
            ifaces: a.ifaces,
            globs: a.iface_globs,
            uplink_mode: a.uplink_attach,
            pod_mode: a.pod_attach,
            fix_rp_filter: a.fix_rp_filter,
            proc_dir: a.proc_dir.clone(),
        },
        metrics_addr: a.metrics_addr,
        debounce: a.debounce,
        max_delay: a.max_delay.max(a.debounce),
        file_poll: a.file_poll.max(Duration::from_millis(10)),
        status_file: Some(status_file.into()),
        iface_rescan: a.iface_rescan.max(Duration::from_millis(100)),
        conntrack_gc: (!a.conntrack_gc.is_zero()).then_some(a.conntrack_gc),
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
                (m::SOCK_SVC_STATS, a.max_services),
                (m::SOCK_REVNAT, a.max_sock_revnat),
                (m::SOCK_AFFINITY, a.max_affinity),
            ]
        },
        socket_lb: a.socket_lb.then_some(a.cgroup_root),
        proc_dir: a.proc_dir,
        mount_bpffs: a.mount_bpffs,
        // An empty value (an unset downward-API field) means unknown.
        node: agent::model::NodeInfo {
            name: a.node_name.filter(|n| !n.is_empty()),
            zone: a.node_zone.filter(|z| !z.is_empty()),
        },
    }
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("lb").chain(args.iter().copied()))
    }

    fn agent(args: &[&str]) -> AgentArgs {
        match parse(&[&["agent"], args].concat()).unwrap().cmd {
            Cmd::Agent(a) => a,
            c => panic!("not agent: {c:?}"),
        }
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every flag is documented and settable from the environment (the DaemonSet
    /// configures the agent that way).
    #[test]
    fn every_flag_has_a_doc_and_an_env() {
        fn check(cmd: &clap::Command, path: &str) {
            for a in cmd.get_arguments() {
                if matches!(a.get_id().as_str(), "help" | "version") {
                    continue;
                }
                assert!(a.get_help().is_some(), "{path} --{} has no doc", a.get_id());
                let env = a.get_env().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
                assert!(env.starts_with("LB_"), "{path} --{} has no LB_ env ({env:?})", a.get_id());
            }
            for sub in cmd.get_subcommands() {
                check(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        check(&Cli::command(), "lb");
    }

    #[test]
    fn durations_parse_in_friendly_form_and_zero() {
        assert_eq!(duration("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("2m 30s"), Ok(Duration::from_secs(150)));
        assert_eq!(duration("PT5S"), Ok(Duration::from_secs(5)));
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert_eq!(duration("0s"), Ok(Duration::ZERO));
        for bad in ["5", "5x", "", "-1s", "ms"] {
            assert!(duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn duration_flags_have_the_old_defaults() {
        let a = agent(&[]);
        assert_eq!(
            (a.debounce, a.max_delay, a.file_poll, a.iface_rescan, a.conntrack_gc),
            (
                Duration::from_millis(5),
                Duration::from_millis(50),
                Duration::from_millis(100),
                Duration::from_secs(5),
                Duration::from_secs(30)
            )
        );
        let a = agent(&["--debounce=20ms", "--max-delay", "1s", "--file-poll=1s", "--iface-rescan=200ms"]);
        assert_eq!(a.debounce, Duration::from_millis(20));
        assert_eq!(a.max_delay, Duration::from_secs(1));
        assert_eq!(agent(&["--conntrack-gc", "0"]).conntrack_gc, Duration::ZERO);
        let e = parse(&["agent", "--debounce", "5"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{e}");
        assert!(e.to_string().contains("--debounce"), "{e}");
        // The old integer flags are gone.
        assert!(parse(&["agent", "--debounce-ms", "5"]).is_err());
    }

    #[test]
    fn durations_are_clamped() {
        let cfg = |args: &[&str]| agent_config(agent(args), Path::new("/b"), Path::new("/s"));
        let c = cfg(&[]);
        assert_eq!((c.debounce, c.max_delay), (Duration::from_millis(5), Duration::from_millis(50)));
        assert_eq!(c.conntrack_gc, Some(Duration::from_secs(30)));
        let c = cfg(&["--debounce=80ms", "--max-delay=1ms", "--file-poll=1ms", "--iface-rescan=0"]);
        assert_eq!(c.max_delay, Duration::from_millis(80), "max delay under the debounce");
        assert_eq!(c.file_poll, Duration::from_millis(10));
        assert_eq!(c.iface_rescan, Duration::from_millis(100));
        assert_eq!(cfg(&["--conntrack-gc=0s"]).conntrack_gc, None);
        assert_eq!(cfg(&["--conntrack-gc=0"]).conntrack_gc, None);
        assert_eq!(cfg(&["--conntrack-gc=1s"]).conntrack_gc, Some(Duration::from_secs(1)));
    }

    #[test]
    fn output_only_on_the_commands_that_print() {
        for cmd in ["services", "conntrack", "affinity", "stats", "status", "cleanup"] {
            let cli = parse(&[cmd, "-o", "json"]).unwrap_or_else(|e| panic!("{cmd}: {e}"));
            assert!(format!("{:?}", cli.cmd).contains("Json"), "{cmd}: {:?}", cli.cmd);
        }
        for args in [&["agent", "-o", "json"][..], &["-o", "json", "services"], &["agent", "--output=json"]] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument, "{args:?}: {e}");
        }
        // The global flags stay global.
        let cli = parse(&["services", "--bpffs=/x", "--status-file=/y", "--log=debug", "--log-format=json"]).unwrap();
        assert_eq!((cli.bpffs.as_path(), cli.status_file.as_path()), (Path::new("/x"), Path::new("/y")));
    }

    #[test]
    fn cleanup_is_a_subcommand() {
        assert!(matches!(parse(&["cleanup"]).unwrap().cmd, Cmd::Cleanup(_)));
        let e = parse(&["agent", "--cleanup"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument, "{e}");
    }

    #[test]
    fn cleanup_table_lists_the_maps() {
        let c = agent::Cleanup { links: 2, maps: vec!["lb4_svc_v4".into(), "lb_ct_v1".into()] };
        assert_eq!(
            cleanup_table(&c, Path::new("/sys/fs/bpf/lb")),
            "removed 2 links and 2 maps under /sys/fs/bpf/lb\n  lb4_svc_v4\n  lb_ct_v1\n"
        );
    }
}
