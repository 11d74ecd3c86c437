//! `cargo xtask bench peers`: lb beside kube-proxy on one sandbox cluster, the same pods
//! and the same client for every proxy (docs/benchmarks.md).
//!
//! * **Peers**, in turn within each round: `direct` (the client addresses the pod IP: the
//!   ceiling), `lb` (deploy/lb-agent.yaml with `LB_SOCKET_LB=off`: the per-packet
//!   datapath alone, tc on the pod veths and the uplinks), `lb-socket` (the manifest as it
//!   ships, `LB_SOCKET_LB=on`: pods' connections to a ClusterIP are translated once, at
//!   connect(), by the cgroup v2 programs on each node's cgroup subtree), `iptables` and
//!   `ipvs` (kube-proxy 1.20.2 as a DaemonSet). Between two peers
//!   [`Sandbox::remove_proxy`] cleans the nodes and checks that nothing of the previous
//!   one is left, and a ClusterIP must not answer.
//! * **Workloads**, from a client pod on node 1 to a server pod on node 1 (`same`) and on
//!   node 2 (`cross`): iperf3 TCP with 1 and 4 streams, iperf3 UDP at a fixed offered rate,
//!   netperf's TCP_CRR pattern (connect, 32-byte request, answer, close; several clients)
//!   and TCP_RR (requests on one kept-alive connection), with lb-bench-tool
//!   (xtask/bench-tool). The machine's system and softirq CPU time from /proc/stat is
//!   sampled around each run.
//! * **Scale:** the cluster holds 10, 1,000, 10,000 Services (extra ones select the server
//!   pods, so they have endpoints too; kube-controller-manager writes their Endpoints and
//!   EndpointSlices), created in ascending order once; at each scale every round runs.
//! * **Programming:** from a proxy's start to every Service answering; and from an
//!   EndpointSlice update (the Service's one endpoint replaced by another pod) to the first
//!   request that reaches the new pod, over `--changes` updates spread over the rounds.
//! * **Memory:** the proxy's RSS on node 1, and for lb its BPF maps' memlock.
//!
//! Writes target/bench/peers.json, peers.md (the tables of docs/benchmarks.md) and
//! peers-{cross,same}.svg. Nothing is asserted on a figure: `--smoke` (what `cargo xtask
//! test` runs) only checks that every row was produced.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};

use super::{LbAttach, Proxy, Sandbox, UpArgs, image::BENCH_IMAGE, node::Node, wait_for};

const NS: &str = "bench";
const SERVE_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;

#[derive(clap::Args, Debug, Clone)]
pub struct PeersArgs {
    /// Rounds; the peers run interleaved within each round, and medians are over rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Seconds of each throughput, connection-rate and latency run.
    #[arg(long, default_value_t = 10)]
    pub duration: u32,
    /// Services in the cluster, ascending, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [10u32, 1000, 10000])]
    pub scales: Vec<u32>,
    /// Endpoint changes timed per peer, at the smallest and the largest scale (spread
    /// over the rounds).
    #[arg(long, default_value_t = 50)]
    pub changes: u32,
    /// Peers, comma-separated: direct, lb, lb-socket, iptables, ipvs. Default: all of them
    /// (a peer this machine cannot run gets a row saying why).
    #[arg(long, value_delimiter = ',')]
    pub proxies: Vec<String>,
    /// iperf3's offered UDP rate (`-b`).
    #[arg(long, default_value = "1G")]
    pub udp_rate: String,
    /// Parallel clients of the connection-rate run.
    #[arg(long, default_value_t = 4)]
    pub crr_clients: u32,
    /// Tiny sizes (1 round, 2-second runs, 10 Services, 4 changes): checks that every
    /// row is produced; what `cargo xtask test` runs.
    #[arg(long)]
    pub smoke: bool,
    /// Output directory (default: target/bench).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only render the tables and plots again from a peers.json of an earlier run.
    #[arg(long, value_name = "PEERS_JSON")]
    pub from_json: Option<PathBuf>,
    /// Leave the sandbox up at the end, also after a failure, to look into it
    /// (`cargo xtask sandbox down` removes it).
    #[arg(long)]
    pub keep: bool,
}

impl PeersArgs {
    /// `--smoke` with every other flag at its default.
    pub fn smoke() -> PeersArgs {
        use clap::{Args as _, FromArgMatches as _};
        let cmd = PeersArgs::augment_args(clap::Command::new("peers"));
        let m = cmd.get_matches_from(["peers", "--smoke"]);
        PeersArgs::from_arg_matches(&m).expect("the defaults parse")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Peer {
    Direct,
    Lb,
    LbSocket,
    Iptables,
    Ipvs,
}

const ALL_PEERS: [Peer; 5] = [Peer::Direct, Peer::Lb, Peer::LbSocket, Peer::Iptables, Peer::Ipvs];

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Direct => "direct",
            Peer::Lb => "lb",
            Peer::LbSocket => "lb-socket",
            Peer::Iptables => "iptables",
            Peer::Ipvs => "ipvs",
        }
    }

    fn parse(s: &str) -> Result<Peer> {
        ALL_PEERS
            .into_iter()
            .find(|p| p.name() == s)
            .with_context(|| format!("unknown peer {s:?}: use direct, lb, lb-socket, iptables, ipvs"))
    }

    /// The sandbox proxy this peer runs (`None` for `direct`).
    fn proxy(self) -> Proxy {
        match self {
            Peer::Direct => Proxy::None,
            Peer::Lb | Peer::LbSocket => Proxy::Lb,
            Peer::Iptables => Proxy::Iptables,
            Peer::Ipvs => Proxy::Ipvs,
        }
    }

    /// lb's settings for this peer: socket-level load balancing off for `lb` (the
    /// per-packet datapath alone), on for `lb-socket`; the manifest's hooks for both.
    fn attach(self) -> LbAttach {
        let socket = match self {
            Peer::Lb => Some("off".into()),
            Peer::LbSocket => Some("on".into()),
            _ => None,
        };
        LbAttach { socket, ..LbAttach::default() }
    }

    /// Why this machine cannot run the peer, if it cannot.
    fn unavailable(self) -> Option<String> {
        match self {
            Peer::LbSocket if Node::new(1).cgroup2().is_none() => Some(
                "unavailable: this machine mounts no cgroup2 hierarchy, where socket-level load balancing attaches"
                    .into(),
            ),
            Peer::Ipvs if !Path::new("/proc/net/ip_vs").exists() => Some(
                "unavailable: this kernel has no IPVS (CONFIG_IP_VS; /proc/net/ip_vs is missing), and kube-proxy \
                 would fall back to iptables"
                    .into(),
            ),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Same,
    Cross,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Same => "same",
            Placement::Cross => "cross",
        }
    }
}

const PLACEMENTS: [Placement; 2] = [Placement::Same, Placement::Cross];

struct Settings {
    rounds: u32,
    duration: u32,
    scales: Vec<u32>,
    changes: u32,
    peers: Vec<Peer>,
    unavailable: Vec<(Peer, String)>,
    udp_rate: String,
    crr_clients: u32,
    out: PathBuf,
    smoke: bool,
}

impl Settings {
    fn from_args(a: &PeersArgs) -> Result<Settings> {
        let (rounds, duration, scales, changes) =
            if a.smoke { (1, 2, vec![10], 4) } else { (a.rounds, a.duration, a.scales.clone(), a.changes) };
        ensure!(rounds >= 1, "--rounds must be at least 1");
        ensure!(duration >= 1, "--duration must be at least 1 second");
        ensure!(!scales.is_empty() && scales.windows(2).all(|w| w[0] < w[1]), "--scales must be ascending");
        ensure!(*scales.last().unwrap_or(&0) <= 30_000, "--scales: at most 30,000 Services (lb's map sizes)");
        let explicit = !a.proxies.is_empty();
        let wanted: Vec<Peer> = if explicit {
            a.proxies.iter().map(|s| Peer::parse(s)).collect::<Result<_>>()?
        } else {
            ALL_PEERS.to_vec()
        };
        let (mut peers, mut unavailable) = (vec![], vec![]);
        for p in wanted {
            match p.unavailable() {
                // Asked for by name: say so and stop rather than print a row of nothing.
                Some(why) if explicit => bail!("peer {}: {why}", p.name()),
                Some(why) => unavailable.push((p, why)),
                None => peers.push(p),
            }
        }
        ensure!(!peers.is_empty(), "no peer to run");
        let out = match &a.out {
            Some(o) => o.clone(),
            None => super::target_dir()?.join("bench"),
        };
        Ok(Settings {
            rounds,
            duration,
            scales,
            changes,
            peers,
            unavailable,
            udp_rate: a.udp_rate.clone(),
            crr_clients: a.crr_clients.max(1),
            out,
            smoke: a.smoke,
        })
    }
}

/// The workload tools this machine must have (they go into the bench image).
fn preflight() -> Result<()> {
    for (bin, pkg) in [("/usr/bin/iperf3", "iperf3"), ("/usr/sbin/conntrack", "conntrack"), ("/usr/bin/curl", "curl")] {
        if !Path::new(bin).exists() {
            bail!("bench peers needs {bin} (package {pkg}); try `cargo xtask setup`");
        }
    }
    Ok(())
}

pub fn run(a: &PeersArgs) -> Result<()> {
    if let Some(p) = &a.from_json {
        return rerender(a, p);
    }
    super::require_root()?;
    let s = Settings::from_args(a)?;
    preflight()?;
    super::install_teardown_on_signal();
    eprintln!(
        "bench peers: {} round(s), {} s runs, Services {:?}, peers {}",
        s.rounds,
        s.duration,
        s.scales,
        s.peers.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
    );
    let res = super::up(&UpArgs { proxy: Proxy::None, ..UpArgs::default() })
        .context("bringing up the sandbox (2 nodes, no proxy)")
        .and_then(|mut sb| bench(&mut sb, &s));
    let down = if a.keep {
        eprintln!("--keep: the sandbox stays up; `cargo xtask sandbox down` removes it");
        Ok(())
    } else {
        super::down(false).context("tearing the sandbox down")
    };
    let rows = res?;
    down?;
    report(&s, &rows)
}

/// `--from-json`: the tables and plots of an earlier run, with its settings.
fn rerender(a: &PeersArgs, path: &Path) -> Result<()> {
    let doc: Value =
        serde_json::from_str(&fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)
            .with_context(|| format!("{} is not a peers.json", path.display()))?;
    let set = &doc["settings"];
    let num =
        |k: &str| set[k].as_u64().and_then(|v| u32::try_from(v).ok()).with_context(|| format!("settings.{k} missing"));
    let rows = doc["rows"].as_array().cloned().context("no rows")?;
    let mut peers: Vec<Peer> = rows.iter().filter_map(|r| Peer::parse(r["proxy"].as_str()?).ok()).collect();
    peers.sort();
    peers.dedup();
    let unavailable = doc["unavailable"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| Some((Peer::parse(u["proxy"].as_str()?).ok()?, u["status"].as_str()?.to_string())))
        .collect();
    let s = Settings {
        rounds: num("rounds")?,
        duration: num("duration_s")?,
        scales: set["scales"]
            .as_array()
            .context("settings.scales")?
            .iter()
            .filter_map(|v| u32::try_from(v.as_u64()?).ok())
            .collect(),
        changes: num("changes")?,
        peers,
        unavailable,
        udp_rate: set["udp_rate"].as_str().unwrap_or("?").to_string(),
        crr_clients: num("crr_clients")?,
        out: match &a.out {
            Some(o) => o.clone(),
            None => super::target_dir()?.join("bench"),
        },
        smoke: false,
    };
    let meta = |k: &str| doc[k].as_str().unwrap_or_default().to_string();
    render(&s, &rows, &meta("machine"), &meta("date"), &meta("commit"))
}

/// The bench's pods and Services, once per sandbox.
struct Workload {
    /// Pod IPs of the servers: same node as the client, other node.
    pod_ip: BTreeMap<&'static str, String>,
    /// ClusterIPs of `bench-same` and `bench-cross`.
    cluster_ip: BTreeMap<&'static str, String>,
    /// ClusterIP of `bench-prog` (selectorless; the bench writes its EndpointSlice).
    prog_ip: String,
    /// Services in the cluster that are not extra ones.
    base_services: u32,
}

/// The bench's namespace, pods and Services, as one `kubectl apply` List.
fn manifest() -> String {
    let container = |name: &str, command: Vec<String>| json!({"name": name, "image": BENCH_IMAGE, "imagePullPolicy": "IfNotPresent", "command": command});
    let server = |name: &str, placement: &str, node: String| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS,
                         "labels": {"app": "bench-srv", "placement": placement, "bench-extra": "yes"}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 0, "containers": [
                container("serve", ["/usr/local/bin/lb-bench-tool", "serve", "--port", &SERVE_PORT.to_string(), "--name", name].map(String::from).to_vec()),
                container("iperf3", ["/usr/bin/iperf3", "--server", "--port", &IPERF_PORT.to_string()].map(String::from).to_vec()),
            ]}
        })
    };
    let service = |name: &str, placement: &str| {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"app": "bench-srv", "placement": placement}, "ports": [
                {"name": "rr", "port": SERVE_PORT, "targetPort": SERVE_PORT, "protocol": "TCP"},
                {"name": "iperf", "port": IPERF_PORT, "targetPort": IPERF_PORT, "protocol": "TCP"},
                {"name": "iperf-udp", "port": IPERF_PORT, "targetPort": IPERF_PORT, "protocol": "UDP"},
            ]}
        })
    };
    let items = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
        server("srv-same", "same", super::node_name(1)),
        server("srv-cross", "cross", super::node_name(2)),
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": NS},
            "spec": {"nodeName": super::node_name(1), "terminationGracePeriodSeconds": 0,
                     "containers": [{
                         "name": "client", "image": BENCH_IMAGE, "imagePullPolicy": "IfNotPresent",
                         "command": ["/bin/sleep", "2147483647"],
                         // To set tcp_tw_reuse in its own network namespace (setup_workload).
                         "securityContext": {"privileged": true}}]}
        }),
        service("bench-same", "same"),
        service("bench-cross", "cross"),
        // Selectorless: the bench writes its EndpointSlice (`prog_slice`).
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "bench-prog", "namespace": NS},
            "spec": {"ports": [{"name": "rr", "port": SERVE_PORT, "protocol": "TCP"}]}
        }),
    ];
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// The selectorless `bench-prog` Service's one EndpointSlice, naming `ip`.
fn prog_slice(ip: &str) -> String {
    json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": "bench-prog", "namespace": NS, "labels": {
            "kubernetes.io/service-name": "bench-prog",
            // Not the endpointslice controller's: it leaves the slice to us.
            "endpointslice.kubernetes.io/managed-by": "lb-bench"}},
        "addressType": "IPv4",
        "ports": [{"name": "rr", "port": SERVE_PORT, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]
    })
    .to_string()
}

fn setup_workload(sb: &Sandbox) -> Result<Workload> {
    super::step(
        "bench pods: srv-same and client on node 1, srv-cross on node 2; Services bench-same, bench-cross, bench-prog",
    );
    ensure!(sb.nodes >= 2, "bench peers needs 2 nodes");
    sb.apply(&manifest())?;
    wait_for("the bench pods to run", Duration::from_secs(120), || {
        let out = sb.kubectl(&["-n", NS, "get", "pods", "-o", "jsonpath={range .items[*]}{.status.phase} {end}"])?;
        Ok(out.split_whitespace().filter(|p| *p == "Running").count() == 3)
    })?;
    let pod_ip = |pod: &str| -> Result<String> {
        let ip = sb.kubectl(&["-n", NS, "get", "pod", pod, "-o", "jsonpath={.status.podIP}"])?;
        ensure!(!ip.trim().is_empty(), "pod {pod} has no IP");
        Ok(ip.trim().to_string())
    };
    let svc_ip = |svc: &str| -> Result<String> {
        Ok(sb.kubectl(&["-n", NS, "get", "svc", svc, "-o", "jsonpath={.spec.clusterIP}"])?.trim().to_string())
    };
    let w = Workload {
        pod_ip: BTreeMap::from([("same", pod_ip("srv-same")?), ("cross", pod_ip("srv-cross")?)]),
        cluster_ip: BTreeMap::from([("same", svc_ip("bench-same")?), ("cross", svc_ip("bench-cross")?)]),
        prog_ip: svc_ip("bench-prog")?,
        base_services: count_services(sb)?,
    };
    sb.apply(&prog_slice(&w.pod_ip["same"]))?;
    // The connection-rate client closes first, as netperf's TCP_CRR does, so its ports sit
    // in TIME_WAIT: reusing them (the pod's own namespace's sysctl) lifts the ~470/s cap.
    client(sb, &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse"])?;
    // iperf3 and the servers listen a moment after the containers start.
    wait_for("the servers to answer", Duration::from_secs(30), || {
        Ok(PLACEMENTS.iter().all(|p| {
            let ip = &w.pod_ip[p.name()];
            client(sb, &["nc", "-z", "-w", "1", ip, &SERVE_PORT.to_string()]).is_ok()
                && client(sb, &["nc", "-z", "-w", "1", ip, &IPERF_PORT.to_string()]).is_ok()
        }))
    })?;
    Ok(w)
}

fn count_services(sb: &Sandbox) -> Result<u32> {
    let out = sb.kubectl(&["get", "svc", "-A", "--no-headers", "-o", "name"])?;
    Ok(u32::try_from(out.lines().filter(|l| !l.trim().is_empty()).count())?)
}

/// Grows the cluster to `total` Services with extra ones that select both server pods.
fn scale_to(sb: &Sandbox, w: &Workload, total: u32) -> Result<()> {
    let have = count_services(sb)?;
    if have >= total {
        return Ok(());
    }
    let t0 = Instant::now();
    super::step(&format!("scale: {have} -> {total} Services (extra ones with endpoints)"));
    let first = have - w.base_services;
    let last = total - w.base_services;
    let mut start = first;
    while start < last {
        let end = (start + 500).min(last);
        let items: Vec<Value> = (start..end)
            .map(|i| {
                json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": format!("x-{i:05}"), "namespace": NS, "labels": {"bench-extra": "yes"}},
                    "spec": {"selector": {"bench-extra": "yes"},
                             "ports": [{"name": "rr", "port": 80, "targetPort": SERVE_PORT, "protocol": "TCP"}]}
                })
            })
            .collect();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        sb.kubectl_stdin(&["create", "-f", "-", "-o", "name"], &list.to_string())?;
        start = end;
    }
    // The controllers write each Service's Endpoints and EndpointSlice; every extra
    // slice must name both pods before anything is measured.
    let want = usize::try_from(last)?;
    wait_for(&format!("EndpointSlices of {total} Services listing both pods"), Duration::from_secs(1200), || {
        let out = sb.kubectl(&[
            "-n",
            NS,
            "get",
            "endpointslices",
            "-l",
            "bench-extra=yes",
            "-o",
            "jsonpath={range .items[*]}{.endpoints[*].addresses[0]};{end}",
        ])?;
        Ok(out.split(';').filter(|s| s.split_whitespace().count() == 2).count() >= want)
    })?;
    eprintln!("    {total} Services in {:.0?}", t0.elapsed());
    Ok(())
}

/// Runs `cmd` in the client pod; stdout, or an error with stderr.
fn client(sb: &Sandbox, cmd: &[&str]) -> Result<String> {
    let (code, out, err) = sb.exec(NS, "client", cmd)?;
    if code != 0 {
        bail!("`{}` in the client pod failed ({code}): {}{}", cmd.join(" "), err.trim(), out.trim());
    }
    Ok(out)
}

fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

/// The machine's CPU time so far (from /proc/stat's `cpu` line), seconds.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    system: f64,
    softirq: f64,
}

fn cpu_now() -> Cpu {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0.0)).collect();
    let hz = clk_tck();
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0) / hz.max(1.0);
    // user nice system idle iowait irq softirq
    Cpu { system: get(2), softirq: get(6) }
}

fn cpu_since(c: Cpu) -> Cpu {
    let n = cpu_now();
    Cpu { system: n.system - c.system, softirq: n.softirq - c.softirq }
}

/// One row of peers.json.
fn row(round: u32, scale: u32, peer: Peer, placement: Option<Placement>, workload: &str, m: Value) -> Value {
    let mut r = json!({"round": round, "scale": scale, "proxy": peer.name(), "workload": workload});
    if let Some(p) = placement {
        r["placement"] = json!(p.name());
    }
    if let (Some(o), Value::Object(m)) = (r.as_object_mut(), m) {
        o.extend(m);
    }
    r
}

fn bench(sb: &mut Sandbox, s: &Settings) -> Result<Vec<Value>> {
    let w = setup_workload(sb)?;
    let mut rows = vec![];
    let (min_scale, max_scale) = (s.scales[0], *s.scales.last().unwrap_or(&0));
    for &scale in &s.scales {
        scale_to(sb, &w, scale)?;
        let targets = probe_targets(sb)?;
        for round in 1..=s.rounds {
            for &peer in &s.peers {
                eprintln!("--- {scale} Services, round {round}/{}, {}", s.rounds, peer.name());
                rows.extend(run_peer(
                    sb,
                    s,
                    &w,
                    &targets,
                    scale,
                    round,
                    peer,
                    scale == min_scale || scale == max_scale,
                )?);
                // Partial results survive an interrupted run.
                write_json(s, &rows)?;
            }
        }
    }
    Ok(rows)
}

/// `ClusterIP:port` of every TCP Service of the bench namespace (the probe's targets).
fn probe_targets(sb: &Sandbox) -> Result<String> {
    let out = sb.kubectl(&[
        "-n",
        NS,
        "get",
        "svc",
        "-o",
        "jsonpath={range .items[*]}{.spec.clusterIP}:{.spec.ports[0].port}{\"\\n\"}{end}",
    ])?;
    Ok(out)
}

#[expect(clippy::too_many_arguments, reason = "one call site; the run's coordinates")]
fn run_peer(
    sb: &mut Sandbox,
    s: &Settings,
    w: &Workload,
    targets: &str,
    scale: u32,
    round: u32,
    peer: Peer,
    time_changes: bool,
) -> Result<Vec<Value>> {
    let mut rows = vec![];
    // Nothing of the previous peer may be left, and no ClusterIP may answer.
    let left = sb.proxy_leftovers()?;
    ensure!(left.is_empty(), "before {}: left over from the previous proxy: {}", peer.name(), left.join("; "));
    ensure!(
        client(sb, &["nc", "-z", "-w", "1", &w.cluster_ip["same"], &SERVE_PORT.to_string()]).is_err(),
        "before {}: the ClusterIP {} answers with no proxy installed",
        peer.name(),
        w.cluster_ip["same"]
    );
    if peer != Peer::Direct {
        rows.push(row(round, scale, peer, None, "startup", start_proxy(sb, peer, targets)?));
        rows.push(row(round, scale, peer, None, "memory", proxy_memory(peer)?));
    }
    // A workload that fails is a row saying so (the smoke check counts it as missing);
    // the other workloads and peers still run.
    let mut measured = |placement: Option<Placement>, workload: &str, res: Result<Value>| {
        let m = res.unwrap_or_else(|e| {
            eprintln!("    {} {workload} failed: {e:#}", peer.name());
            json!({"error": format!("{e:#}")})
        });
        rows.push(row(round, scale, peer, placement, workload, m));
    };
    for p in PLACEMENTS {
        let ip = if peer == Peer::Direct { &w.pod_ip[p.name()] } else { &w.cluster_ip[p.name()] };
        for (name, streams) in [("tcp1", 1), ("tcp4", 4)] {
            measured(Some(p), name, iperf_tcp(sb, s, ip, streams));
        }
        measured(Some(p), "udp", iperf_udp(sb, s, ip));
        measured(Some(p), "crr", crr(sb, s, ip));
        measured(Some(p), "rr", rr(sb, s, ip));
    }
    if peer != Peer::Direct && time_changes {
        let n = s.changes.div_ceil(s.rounds).min(s.changes - (round - 1) * s.changes.div_ceil(s.rounds));
        measured(None, "prog", programming(sb, w, n));
    }
    if peer != Peer::Direct {
        sb.remove_proxy().with_context(|| format!("removing {}", peer.name()))?;
    }
    Ok(rows)
}

/// `lb-bench-tool ARGS` in the client pod, in the background, stdout and stderr piped;
/// stdin piped too with `input` (`kubectl exec -i`), else closed.
fn spawn_tool(sb: &Sandbox, args: &[&str], input: bool) -> Result<Child> {
    let mut cmd = vec!["lb-bench-tool".to_string()];
    cmd.extend(args.iter().map(|a| a.to_string()));
    let stdin = if input { Stdio::piped() } else { Stdio::null() };
    Ok(sb.exec_cmd(NS, "client", &cmd, input).stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?)
}

/// Installs the peer's proxy while a probe in the client pod waits for every Service to
/// answer; the time from the proxy process's start (and from the DaemonSet's creation) to
/// the last Service answering.
fn start_proxy(sb: &mut Sandbox, peer: Peer, targets: &str) -> Result<Value> {
    let mut probe =
        spawn_tool(sb, &["probe", "--targets-file", "-", "--timeout", "600"], true).context("starting the probe")?;
    probe.stdin.take().context("probe stdin")?.write_all(targets.as_bytes())?;
    // The probe is reading its targets and trying the first ones before the proxy exists.
    std::thread::sleep(Duration::from_millis(500));
    let applied = now_ns();
    let installed = sb.install_proxy(peer.proxy(), &peer.attach());
    if let Err(e) = installed {
        let _ = probe.kill();
        return Err(e.context(format!("{} failed to start", peer.name())));
    }
    let out = probe.wait_with_output().context("waiting for the probe")?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!("probe output: {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })?;
    let all = v["all_answered_unix_ns"]
        .as_i64()
        .with_context(|| format!("not every Service answered through {}: {v}", peer.name()))?;
    let pid = proxy_pid(1, peer).with_context(|| format!("no {} process on node 1", peer.name()))?;
    let started = process_start_ns(pid)?;
    Ok(json!({
        "targets": v["targets"],
        "start_to_all_s": (i128::from(all) - started) as f64 / 1e9,
        "apply_to_all_s": (i128::from(all) - applied) as f64 / 1e9,
    }))
}

/// The proxy's process on node `i` (lb's agent or kube-proxy), found by command line in
/// the node's network namespace (both run with the host network).
fn proxy_pid(i: u8, peer: Peer) -> Option<i32> {
    let net = fs::metadata(format!("/run/netns/{}", Node::new(i).name)).ok().map(|m| {
        use std::os::unix::fs::MetadataExt as _;
        m.ino()
    })?;
    fs::read_dir("/proc").ok()?.flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()).find(|p| {
        let cmd = super::cmdline(*p);
        let mut args = cmd.split(' ');
        let arg0 = args.next().unwrap_or_default();
        let is = match peer {
            Peer::Lb | Peer::LbSocket => arg0.ends_with("/lb") && args.next() == Some("agent"),
            Peer::Iptables | Peer::Ipvs => arg0.ends_with("/kube-proxy"),
            _ => false,
        };
        use std::os::unix::fs::MetadataExt as _;
        is && fs::metadata(format!("/proc/{p}/ns/net")).is_ok_and(|m| m.ino() == net)
    })
}

/// When process `pid` started (CLOCK_REALTIME ns; /proc's 10 ms resolution).
fn process_start_ns(pid: i32) -> Result<i128> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("bad /proc/pid/stat")?.1;
    // Field 22 (starttime) is the 20th after the command name.
    let ticks: f64 = after.split_whitespace().nth(19).context("no starttime")?.parse()?;
    let btime: f64 = fs::read_to_string("/proc/stat")?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .context("no btime")?
        .trim()
        .parse()?;
    let hz = clk_tck();
    Ok(((btime + ticks / hz) * 1e9) as i128)
}

/// The proxy's resident memory on node 1, and the BPF maps it holds (their memlock, from
/// /proc/PID/fdinfo: what the kernel charges for them).
fn proxy_memory(peer: Peer) -> Result<Value> {
    let pid = proxy_pid(1, peer).with_context(|| format!("no {} process on node 1", peer.name()))?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    let mut maps = BTreeMap::new();
    for e in fs::read_dir(format!("/proc/{pid}/fdinfo")).into_iter().flatten().flatten() {
        let info = fs::read_to_string(e.path()).unwrap_or_default();
        let field = |k: &str| info.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string());
        if let (Some(id), Some(mem)) = (field("map_id:"), field("memlock:")) {
            maps.insert(id, mem.parse::<f64>().unwrap_or(0.0));
        }
    }
    Ok(json!({"rss_mb": rss_kb / 1024.0, "bpf_map_mb": maps.values().sum::<f64>() / 1048576.0, "bpf_maps": maps.len()}))
}

/// `iperf3 --json` to `ip` for the run's duration, plus `extra`.
fn iperf_json(sb: &Sandbox, s: &Settings, ip: &str, extra: &[&str]) -> Result<Value> {
    let (port, time) = (IPERF_PORT.to_string(), s.duration.to_string());
    let mut args = vec!["--client", ip, "--port", &port, "--time", &time];
    args.extend_from_slice(extra);
    let args = &args;
    let mut cmd = vec!["iperf3", "--json"];
    cmd.extend_from_slice(args);
    let (code, out, err) = sb.exec(NS, "client", &cmd)?;
    let v: Value = serde_json::from_str(&out)
        .with_context(|| format!("iperf3 {} printed no JSON ({code}): {}", args.join(" "), err.trim()))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 {}: {e}", args.join(" "));
    }
    ensure!(code == 0, "iperf3 {} failed ({code}): {}", args.join(" "), err.trim());
    Ok(v)
}

fn iperf_tcp(sb: &Sandbox, s: &Settings, ip: &str, streams: u32) -> Result<Value> {
    let cpu = cpu_now();
    let v = iperf_json(sb, s, ip, &["--parallel", &streams.to_string()])?;
    let c = cpu_since(cpu);
    let recv = &v["end"]["sum_received"];
    let bytes = recv["bytes"].as_f64().context("iperf3: no end.sum_received.bytes")?;
    let gb = (bytes / 1e9).max(1e-9);
    Ok(json!({
        "gbps": recv["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
        "retransmits": v["end"]["sum_sent"]["retransmits"],
        "sys_s_per_gb": c.system / gb,
        "softirq_s_per_gb": c.softirq / gb,
        "cpu_s_per_gb": (c.system + c.softirq) / gb,
    }))
}

fn iperf_udp(sb: &Sandbox, s: &Settings, ip: &str) -> Result<Value> {
    let v = iperf_json(sb, s, ip, &["--udp", "--bitrate", &s.udp_rate, "--length", "1400"])?;
    // iperf 3.12: the receiver's view is end.sum_received (end.sum on older versions).
    let sum = if v["end"]["sum_received"].is_object() { &v["end"]["sum_received"] } else { &v["end"]["sum"] };
    Ok(json!({
        "gbps": sum["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
        "loss_pct": sum["lost_percent"].as_f64().or_else(|| v["end"]["sum"]["lost_percent"].as_f64()).unwrap_or(f64::NAN),
        "offered": s.udp_rate,
    }))
}

fn tool_json(sb: &Sandbox, args: &[&str]) -> Result<Value> {
    let mut cmd = vec!["lb-bench-tool"];
    cmd.extend_from_slice(args);
    let out = client(sb, &cmd)?;
    serde_json::from_str(&out).with_context(|| format!("lb-bench-tool {}: not JSON: {out}", args.join(" ")))
}

fn crr(sb: &Sandbox, s: &Settings, ip: &str) -> Result<Value> {
    let cpu = cpu_now();
    let target = format!("{ip}:{SERVE_PORT}");
    let v = tool_json(
        sb,
        &["crr", "--target", &target, "--clients", &s.crr_clients.to_string(), "--duration", &s.duration.to_string()],
    )?;
    let c = cpu_since(cpu);
    let conns = v["connections"].as_f64().unwrap_or(0.0);
    ensure!(conns > 0.0, "crr to {target}: no connection completed: {v}");
    let k = conns / 1000.0;
    Ok(json!({
        "cps": v["cps"], "p50_us": v["p50_us"], "p99_us": v["p99_us"], "errors": v["errors"],
        "cpu_s_per_kconn": (c.system + c.softirq) / k,
        "sys_s_per_kconn": c.system / k,
        "softirq_s_per_kconn": c.softirq / k,
    }))
}

fn rr(sb: &Sandbox, s: &Settings, ip: &str) -> Result<Value> {
    let target = format!("{ip}:{SERVE_PORT}");
    let v = tool_json(sb, &["rr", "--target", &target, "--duration", &s.duration.to_string()])?;
    ensure!(v["transactions"].as_f64().unwrap_or(0.0) > 0.0, "rr to {target}: no transaction: {v}");
    Ok(json!({"tps": v["tps"], "p50_us": v["p50_us"], "p90_us": v["p90_us"], "p99_us": v["p99_us"]}))
}

/// The API server as curl reaches it from the root namespace (through the relay).
struct Api {
    ca: String,
    token: String,
}

impl Api {
    fn from_kubeconfig(path: &Path) -> Result<Api> {
        let kc = fs::read_to_string(path)?;
        let field = |k: &str| -> Result<String> {
            kc.lines()
                .find_map(|l| l.trim().strip_prefix(k))
                .map(|v| v.trim().trim_matches('"').to_string())
                .with_context(|| format!("no {k} in {}", path.display()))
        };
        Ok(Api { ca: field("certificate-authority:")?, token: field("token:")? })
    }

    /// Merge-patches the `bench-prog` EndpointSlice to list only `ip`; returns when the
    /// request was sent (curl's own pretransfer time after its start), CLOCK_REALTIME ns.
    fn set_prog_endpoint(&self, ip: &str) -> Result<i128> {
        let body = json!({"endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]}).to_string();
        let url = format!(
            "https://kubernetes.default.svc:{}/apis/discovery.k8s.io/v1beta1/namespaces/{NS}/endpointslices/bench-prog",
            super::RELAY_PORT
        );
        let t0 = now_ns();
        let out = std::process::Command::new("curl")
            .args(["--silent", "--show-error", "--fail", "--output", "/dev/null"])
            .args(["--write-out", "%{time_pretransfer}"])
            .args([
                "--cacert",
                &self.ca,
                "--resolve",
                &format!("kubernetes.default.svc:{}:127.0.0.1", super::RELAY_PORT),
            ])
            .args(["-H", &format!("Authorization: Bearer {}", self.token)])
            .args(["-H", "Content-Type: application/merge-patch+json", "-X", "PATCH", "--data", &body, &url])
            .stdin(Stdio::null())
            .output()
            .context("running curl")?;
        ensure!(out.status.success(), "PATCH of bench-prog failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        let pre: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().context("curl's time_pretransfer")?;
        Ok(t0 + (pre * 1e9) as i128)
    }
}

/// `n` endpoint changes of `bench-prog`: each replaces its one endpoint by the other
/// server pod (one endpoint removed, one added, in one update), so the first reply from
/// the new pod marks the change without doubt. Latency: update sent -> that request's
/// connect().
fn programming(sb: &Sandbox, w: &Workload, n: u32) -> Result<Value> {
    let api = Api::from_kubeconfig(&sb.kubeconfig)?;
    let pods = [("srv-same", &w.pod_ip["same"]), ("srv-cross", &w.pod_ip["cross"])];
    // Start from a known endpoint.
    api.set_prog_endpoint(pods[0].1)?;
    let mut cur = 0;
    let mut lat_ms = vec![];
    let target = format!("{}:{SERVE_PORT}", w.prog_ip);
    for _ in 0..n {
        let next = 1 - cur;
        // The previous change (or the previous peer's last one) may still be on its way
        // to this proxy: start timing only once the Service answers from the current pod.
        let t0 = Instant::now();
        let (mut watch, mut lines) = loop {
            let mut watch =
                spawn_tool(sb, &["watch", "--target", &target, "--want", pods[next].0, "--timeout", "120"], false)
                    .context("starting the watch")?;
            let mut lines = BufReader::new(watch.stdout.take().context("watch stdout")?).lines();
            let ready = lines.next().transpose()?.unwrap_or_default();
            if ready.split_whitespace().nth(1) == Some(pods[cur].0) {
                break (watch, lines);
            }
            let _ = watch.kill();
            let _ = watch.wait();
            ensure!(
                t0.elapsed() < Duration::from_secs(60),
                "bench-prog kept answering {ready:?} for 60 s (want ready {})",
                pods[cur].0
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        let sent = api.set_prog_endpoint(pods[next].1)?;
        let seen = lines.next().transpose()?.unwrap_or_default();
        let _ = watch.wait();
        let at: i128 = seen
            .strip_prefix("seen ")
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("watch of {target} after the change: {seen:?}"))?;
        lat_ms.push((at - sent) as f64 / 1e6);
        cur = next;
    }
    Ok(json!({"latencies_ms": lat_ms}))
}

fn write_json(s: &Settings, rows: &[Value]) -> Result<()> {
    fs::create_dir_all(&s.out).with_context(|| format!("creating {}", s.out.display()))?;
    let unavailable: Vec<Value> =
        s.unavailable.iter().map(|(p, why)| json!({"proxy": p.name(), "status": why})).collect();
    let doc = json!({
        "bench": "peers",
        "machine": machine(),
        "date": date(),
        "commit": commit(),
        "settings": {"rounds": s.rounds, "duration_s": s.duration, "scales": s.scales, "changes": s.changes,
                     "udp_rate": s.udp_rate, "crr_clients": s.crr_clients, "smoke": s.smoke},
        "unavailable": unavailable,
        "rows": rows,
    });
    let path = s.out.join("peers.json");
    fs::write(&path, serde_json::to_string_pretty(&doc)?).with_context(|| format!("writing {}", path.display()))
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

/// Now, in RFC 3339 UTC to the second.
fn date() -> String {
    jiff::Timestamp::now().round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default()
}

/// USER_HZ, the unit of /proc/stat and /proc/<pid>/stat times.
fn clk_tck() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "describe", "--always", "--dirty"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// median, min, max
fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
    Some((mid, v[0], v[v.len() - 1]))
}

/// Nearest-rank percentile.
fn percentile(v: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}

/// The rows' values of `metric` for one cell, one per round.
fn values(
    rows: &[Value],
    scale: u32,
    proxy: &str,
    placement: Option<&str>,
    workload: &str,
    metric: &str,
) -> Vec<(u64, f64)> {
    rows.iter()
        .filter(|r| {
            r["scale"] == json!(scale)
                && r["proxy"] == json!(proxy)
                && r["workload"] == json!(workload)
                && placement.is_none_or(|p| r["placement"] == json!(p))
        })
        .filter_map(|r| Some((r["round"].as_u64()?, r[metric].as_f64()?)))
        .collect()
}

/// Median over rounds of the per-round ratio `proxy / base` (ratios judged within a round).
fn ratio(
    rows: &[Value],
    scale: u32,
    proxy: &str,
    base: &str,
    placement: Option<&str>,
    workload: &str,
    metric: &str,
) -> Option<f64> {
    let b: BTreeMap<u64, f64> = values(rows, scale, base, placement, workload, metric).into_iter().collect();
    let r: Vec<f64> = values(rows, scale, proxy, placement, workload, metric)
        .into_iter()
        .filter_map(|(round, v)| Some(v / *b.get(&round)?))
        .collect();
    stats(&r).map(|s| s.0)
}

fn fmt_num(x: f64) -> String {
    // No "-0.00".
    let x = x + 0.0;
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

struct Table<'a> {
    title: &'a str,
    workload: &'a str,
    metric: &'a str,
    /// Ratio to this peer in each cell.
    base: Option<&'a str>,
    placements: bool,
}

fn report(s: &Settings, rows: &[Value]) -> Result<()> {
    write_json(s, rows)?;
    render(s, rows, &machine(), &date(), &commit())?;
    if s.smoke {
        check_rows(s, rows)?;
    }
    Ok(())
}

/// Writes peers.md and the plots.
fn render(s: &Settings, rows: &[Value], machine: &str, date: &str, commit: &str) -> Result<()> {
    fs::create_dir_all(&s.out).with_context(|| format!("creating {}", s.out.display()))?;
    let peers: Vec<&str> = s.peers.iter().map(|p| p.name()).collect();
    let mut md = String::new();
    md.push_str(&format!(
        "Machine: {}. Date: {}. Commit: {}. {} round(s) of {} s runs; median [min–max] over rounds; ratios are \
         per round, then the median.\n\n",
        machine, date, commit, s.rounds, s.duration
    ));
    for (p, why) in &s.unavailable {
        md.push_str(&format!("- `{}`: {why}\n", p.name()));
    }
    md.push('\n');
    let tables = [
        Table {
            title: "TCP throughput, 1 stream (Gbit/s, × direct)",
            workload: "tcp1",
            metric: "gbps",
            base: Some("direct"),
            placements: true,
        },
        Table {
            title: "TCP throughput, 4 streams (Gbit/s, × direct)",
            workload: "tcp4",
            metric: "gbps",
            base: Some("direct"),
            placements: true,
        },
        Table {
            title: &format!("UDP at {} offered (Gbit/s received)", s.udp_rate),
            workload: "udp",
            metric: "gbps",
            base: Some("direct"),
            placements: true,
        },
        Table { title: "UDP loss (%)", workload: "udp", metric: "loss_pct", base: None, placements: true },
        Table {
            title: &format!("Connection rate, {} clients (connections/s, × iptables)", s.crr_clients),
            workload: "crr",
            metric: "cps",
            base: Some("iptables"),
            placements: true,
        },
        Table {
            title: &format!(
                "Connection rate, {} clients (connections/s, × lb, the per-packet datapath)",
                s.crr_clients
            ),
            workload: "crr",
            metric: "cps",
            base: Some("lb"),
            placements: true,
        },
        Table {
            title: "Connection-rate requests that timed out (connect or answer over 1 s)",
            workload: "crr",
            metric: "errors",
            base: None,
            placements: true,
        },
        Table {
            title: "Request latency on a kept-alive connection, p50 (µs)",
            workload: "rr",
            metric: "p50_us",
            base: None,
            placements: true,
        },
        Table {
            title: "Request latency on a kept-alive connection, p99 (µs, × iptables)",
            workload: "rr",
            metric: "p99_us",
            base: Some("iptables"),
            placements: true,
        },
        Table {
            title: "CPU (system + softirq) per GB, 1 TCP stream (s, × iptables)",
            workload: "tcp1",
            metric: "cpu_s_per_gb",
            base: Some("iptables"),
            placements: true,
        },
        Table {
            title: "CPU (system + softirq) per 1,000 connections (s, × iptables)",
            workload: "crr",
            metric: "cpu_s_per_kconn",
            base: Some("iptables"),
            placements: true,
        },
        Table {
            title: "Proxy start to every Service answering (s)",
            workload: "startup",
            metric: "start_to_all_s",
            base: None,
            placements: false,
        },
        Table {
            title: "DaemonSet created to every Service answering (s)",
            workload: "startup",
            metric: "apply_to_all_s",
            base: None,
            placements: false,
        },
        Table {
            title: "Proxy RSS on node 1 (MB)",
            workload: "memory",
            metric: "rss_mb",
            base: None,
            placements: false,
        },
        Table {
            title: "BPF map memory on node 1 (MB)",
            workload: "memory",
            metric: "bpf_map_mb",
            base: None,
            placements: false,
        },
    ];
    for t in &tables {
        let base_ok = t.base.is_none_or(|b| peers.contains(&b));
        md.push_str(&format!(
            "#### {}\n\n| Services | {}{} |\n|---|{}{}\n",
            t.title,
            if t.placements { "node | " } else { "" },
            peers.join(" | "),
            if t.placements { "---|" } else { "" },
            "---|".repeat(peers.len())
        ));
        for &scale in &s.scales {
            for pl in if t.placements { vec![Some("same"), Some("cross")] } else { vec![None] } {
                let mut cells = vec![];
                for p in &peers {
                    let v: Vec<f64> =
                        values(rows, scale, p, pl, t.workload, t.metric).into_iter().map(|x| x.1).collect();
                    let cell = match stats(&v) {
                        None => "–".to_string(),
                        Some((m, lo, hi)) => {
                            let mut c = fmt_num(m);
                            if v.len() > 1 {
                                c.push_str(&format!(" [{}–{}]", fmt_num(lo), fmt_num(hi)));
                            }
                            if let (Some(b), true) = (t.base, base_ok)
                                && let Some(r) = ratio(rows, scale, p, b, pl, t.workload, t.metric)
                                && *p != b
                            {
                                c.push_str(&format!(" **{r:.2}×**"));
                            }
                            c
                        }
                    };
                    cells.push(cell);
                }
                md.push_str(&format!(
                    "| {} | {}{} |\n",
                    scale,
                    pl.map(|p| format!("{p} | ")).unwrap_or_default(),
                    cells.join(" | ")
                ));
            }
        }
        md.push('\n');
    }
    // Programming latency: pooled over the rounds.
    md.push_str(
        "#### Network programming latency: EndpointSlice update to the first request reaching the new pod (ms)\n\n",
    );
    md.push_str(&format!(
        "| Services | {} |\n|---|{}\n",
        peers.iter().filter(|p| **p != "direct").copied().collect::<Vec<_>>().join(" | "),
        "---|".repeat(peers.iter().filter(|p| **p != "direct").count())
    ));
    for &scale in &s.scales {
        let mut cells = vec![];
        let mut any = false;
        for p in peers.iter().filter(|p| **p != "direct") {
            let lat: Vec<f64> = rows
                .iter()
                .filter(|r| r["scale"] == json!(scale) && r["proxy"] == json!(p) && r["workload"] == json!("prog"))
                .flat_map(|r| r["latencies_ms"].as_array().cloned().unwrap_or_default())
                .filter_map(|v| v.as_f64())
                .collect();
            match (percentile(&lat, 50.0), percentile(&lat, 99.0)) {
                (Some(p50), Some(p99)) => {
                    any = true;
                    cells.push(format!("p50 {} / p99 {} (n={})", fmt_num(p50), fmt_num(p99), lat.len()));
                }
                _ => {
                    let failed = rows.iter().find_map(|r| {
                        (r["scale"] == json!(scale) && r["proxy"] == json!(p) && r["workload"] == json!("prog"))
                            .then(|| r["error"].as_str())
                            .flatten()
                    });
                    if let Some(e) = failed {
                        any = true;
                        cells.push(format!("no change seen within 120 s, or not settled within 60 s ({e})"));
                    } else {
                        cells.push("–".into());
                    }
                }
            }
        }
        if any {
            md.push_str(&format!("| {scale} | {} |\n", cells.join(" | ")));
        }
    }
    md.push('\n');
    let md_path = s.out.join("peers.md");
    fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    for pl in ["cross", "same"] {
        let panel = |title: &str, y: &str, workload: &str, metric: &str| crate::plot::Panel {
            title: title.into(),
            y_label: y.into(),
            series: peers
                .iter()
                .map(|p| crate::plot::Series {
                    name: (*p).into(),
                    points: s
                        .scales
                        .iter()
                        .filter_map(|&sc| {
                            let v: Vec<f64> =
                                values(rows, sc, p, Some(pl), workload, metric).into_iter().map(|x| x.1).collect();
                            Some((f64::from(sc), stats(&v)?.0))
                        })
                        .collect(),
                })
                .collect(),
        };
        let node = if pl == "cross" { "client and server on different nodes" } else { "client and server on one node" };
        crate::plot::draw(
            &s.out.join(format!("peers-{pl}.svg")),
            &format!("ClusterIP through each proxy ({node})"),
            &[
                panel("TCP throughput, 1 stream", "Gbit/s", "tcp1", "gbps"),
                panel("Connection rate", "connections/s", "crr", "cps"),
                panel("Request latency p99", "µs", "rr", "p99_us"),
            ],
        )?;
    }
    print!("{md}");
    eprintln!("wrote {} and peers-{{cross,same}}.svg", md_path.display());
    Ok(())
}

/// The smoke run's check: every peer produced every row, with numbers in it.
fn check_rows(s: &Settings, rows: &[Value]) -> Result<()> {
    let mut missing = vec![];
    // IPVS may be missing from a kernel, and is reported so; socket LB needs only a
    // cgroup2 mount, and its row must be there.
    if let Some((_, why)) = s.unavailable.iter().find(|(p, _)| *p == Peer::LbSocket) {
        missing.push(format!("lb-socket ({why})"));
    }
    for &scale in &s.scales {
        for p in &s.peers {
            let mut want: Vec<(Option<&str>, &str, &str)> = vec![];
            for pl in ["same", "cross"] {
                for (wl, m) in [("tcp1", "gbps"), ("tcp4", "gbps"), ("udp", "gbps"), ("crr", "cps"), ("rr", "p99_us")] {
                    want.push((Some(pl), wl, m));
                }
            }
            if *p != Peer::Direct {
                want.extend([(None, "startup", "start_to_all_s"), (None, "memory", "rss_mb")]);
            }
            for (pl, wl, m) in want {
                if values(rows, scale, p.name(), pl, wl, m).iter().all(|(_, v)| !v.is_finite() || *v <= 0.0) {
                    missing.push(format!("{scale}/{}/{}/{wl}.{m}", p.name(), pl.unwrap_or("-")));
                }
            }
            if *p != Peer::Direct
                && !rows.iter().any(|r| {
                    r["proxy"] == json!(p.name())
                        && r["workload"] == json!("prog")
                        && r["latencies_ms"].as_array().is_some_and(|a| !a.is_empty())
                })
            {
                missing.push(format!("{scale}/{}/prog", p.name()));
            }
        }
    }
    ensure!(missing.is_empty(), "bench peers produced no figure for: {}", missing.join(", "));
    eprintln!("bench peers smoke: every row produced ({} rows)", rows.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[5.0], 99.0), Some(5.0));
        assert_eq!(stats(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(stats(&[4.0, 1.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(stats(&[f64::NAN]), None);
    }

    #[test]
    fn ratios_are_per_round() {
        let rows = vec![
            row(1, 10, Peer::Direct, Some(Placement::Cross), "tcp1", json!({"gbps": 10.0})),
            row(1, 10, Peer::Lb, Some(Placement::Cross), "tcp1", json!({"gbps": 9.0})),
            row(2, 10, Peer::Direct, Some(Placement::Cross), "tcp1", json!({"gbps": 20.0})),
            row(2, 10, Peer::Lb, Some(Placement::Cross), "tcp1", json!({"gbps": 19.0})),
        ];
        let r = ratio(&rows, 10, "lb", "direct", Some("cross"), "tcp1", "gbps").unwrap();
        assert!((r - (0.9 + 0.95) / 2.0).abs() < 1e-9, "{r}");
        assert!(ratio(&rows, 10, "lb", "direct", Some("same"), "tcp1", "gbps").is_none());
    }

    #[test]
    fn settings_refuse_bad_input() {
        let base = PeersArgs {
            rounds: 3,
            duration: 10,
            scales: vec![10, 1000],
            changes: 50,
            proxies: vec![],
            udp_rate: "1G".into(),
            crr_clients: 4,
            smoke: false,
            out: Some("/tmp/x".into()),
            keep: false,
            from_json: None,
        };
        assert!(Settings::from_args(&PeersArgs { scales: vec![1000, 10], ..base.clone() }).is_err());
        assert!(Settings::from_args(&PeersArgs { rounds: 0, ..base.clone() }).is_err());
        assert!(Settings::from_args(&PeersArgs { proxies: vec!["nope".into()], ..base.clone() }).is_err());
        let s = Settings::from_args(&PeersArgs { proxies: vec!["lb".into(), "lb-socket".into()], ..base.clone() });
        if Peer::LbSocket.unavailable().is_none() {
            assert_eq!(s.unwrap().peers, vec![Peer::Lb, Peer::LbSocket]);
        } else {
            // Asked for by name, an unavailable peer is an error.
            assert!(s.is_err());
        }
        let all = Settings::from_args(&base).unwrap();
        assert_eq!(all.peers.len() + all.unavailable.len(), ALL_PEERS.len());
        let smoke = Settings::from_args(&PeersArgs { smoke: true, ..base }).unwrap();
        assert_eq!((smoke.rounds, smoke.scales.clone()), (1, vec![10]));
        assert!(PeersArgs::smoke().smoke);
    }

    #[test]
    fn manifest_and_slice_are_what_kubectl_gets() {
        let m: Value = serde_json::from_str(&manifest()).unwrap();
        let kinds: Vec<&str> = m["items"].as_array().unwrap().iter().map(|i| i["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["Namespace", "Pod", "Pod", "Pod", "Service", "Service", "Service"]);
        assert_eq!(m["items"][1]["spec"]["nodeName"], "lbsb-node1");
        assert_eq!(m["items"][2]["spec"]["nodeName"], "lbsb-node2");
        let slice: Value = serde_json::from_str(&prog_slice("10.244.1.5")).unwrap();
        assert_eq!(slice["endpoints"][0]["addresses"][0], "10.244.1.5");
    }
}
