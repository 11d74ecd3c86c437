//! `cargo xtask sandbox up|down|exec|status`: a Kubernetes 1.20.2 cluster of real parts
//! (docs/sandbox.md): nodes are network plus mount namespaces running containerd, runc,
//! the CNI plugins and the kubelet; the control plane runs on node 1, as on kind's
//! control-plane node; the service proxy is lb's DaemonSet (or kube-proxy, or none).
//!
//! * `lbsb-fabric`: a bridge joining the nodes (10.250.0.0/24).
//! * `lbsb-node<i>`: fabric address 10.250.0.<10+i>, pod CIDR 10.244.<i>.0/24 on the CNI
//!   bridge `cni0`, routes to the other nodes' pod CIDRs; node 1 also runs etcd,
//!   kube-apiserver (10.250.0.11:16443), kube-controller-manager and kube-scheduler.
//! * The root namespace only gets the relay on 127.0.0.1:[`RELAY_PORT`], so that kubectl
//!   and `e2e.test` on the host reach the API server.
//!
//! Everything is found again by name (`lbsb-` prefix), pid files, mount-namespace handles
//! and the cgroup subtree `/lbsb`, so `down` works after a crash and `up` starts with it.

pub mod demo;
pub mod e2e;
pub mod image;
pub mod node;
pub mod peers;
pub mod relay;
pub mod upstream;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::kube;
use node::Node;

pub const PREFIX: &str = "lbsb-";
pub const STATE_DIR: &str = "/tmp/lbsb";
/// Bind-mounted handles of the nodes' mount namespaces (a private bind mount itself).
pub const NS_DIR: &str = "/tmp/lbsb/ns";
const MARKER: &str = ".lbsb";
pub const FABRIC_NS: &str = "lbsb-fabric";
/// An address on the fabric that no node has: the next hop of the service range.
const FABRIC_NOWHERE: &str = "10.250.0.254";
pub const API_PORT: u16 = 16443;
/// Loopback port of the relay in the root namespace.
pub const RELAY_PORT: u16 = 16480;
/// The sandbox's cgroup subtree, in every hierarchy: `/lbsb/lbsb-node<i>`.
pub const CGROUP_ROOT: &str = "lbsb";
/// The `kube-dns` Service's ClusterIP (the kubelet's `--cluster-dns`).
pub const CLUSTER_DNS: &str = "10.96.0.10";
const LB_MANIFEST: &str = include_str!("../../../deploy/lb-agent.yaml");
const DNS_MANIFEST: &str = include_str!("manifests/dns.yaml");
const KUBE_PROXY_MANIFEST: &str = include_str!("manifests/kube-proxy.yaml");

#[derive(clap::Subcommand, Debug)]
pub enum SandboxCmd {
    /// Bring up the sandbox cluster (tears down a stale one first); prints `export KUBECONFIG=...`.
    Up(UpArgs),
    /// Remove every namespace, process, mount, cgroup and file of the sandbox (safe after a crash).
    Down,
    /// `kubectl exec` into a pod (the sandbox's kubeconfig, no -it needed).
    Exec {
        /// Pod name.
        pod: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Show nodes, their containerd and kubelet, and the pods.
    Status,
    /// The root namespace's loopback relay to the API server (started by `up`).
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        netns: String,
        #[arg(long)]
        to: std::net::SocketAddr,
    },
}

/// Which service proxy the nodes run.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Proxy {
    /// lb's DaemonSet (deploy/lb-agent.yaml).
    #[default]
    Lb,
    /// kube-proxy 1.20.2, iptables mode, as a DaemonSet.
    Iptables,
    /// kube-proxy 1.20.2, IPVS mode, as a DaemonSet.
    Ipvs,
    /// No service proxy (pods are still reachable by pod IP).
    None,
}

impl Proxy {
    pub fn name(self) -> &'static str {
        match self {
            Proxy::Lb => "lb",
            Proxy::Iptables => "iptables",
            Proxy::Ipvs => "ipvs",
            Proxy::None => "none",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Number of nodes (node 1 also runs the control plane).
    #[arg(long, default_value_t = 2)]
    pub nodes: u8,
    /// The service proxy on every node.
    #[arg(long, value_enum, default_value_t = Proxy::Lb)]
    pub proxy: Proxy,
    /// lb: hook for both pod interfaces and uplinks (xdp, xdp-generic, tc); default: the manifest's.
    #[arg(long)]
    pub attach: Option<String>,
    /// lb: hook for pod interfaces only (overrides --attach).
    #[arg(long)]
    pub pod_attach: Option<String>,
    /// lb: hook for node uplinks only (overrides --attach).
    #[arg(long)]
    pub uplink_attach: Option<String>,
    /// lb: socket-level load balancing (cgroup v2 programs on each node's cgroup subtree,
    /// for pods and host-network processes); default: the manifest's (on).
    #[arg(long, value_parser = ["on", "off"])]
    pub socket_lb: Option<String>,
    /// Manifests to `kubectl apply -f` once the cluster is up.
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<PathBuf>,
}

impl Default for UpArgs {
    fn default() -> Self {
        UpArgs {
            nodes: 2,
            proxy: Proxy::Lb,
            attach: None,
            pod_attach: None,
            uplink_attach: None,
            socket_lb: None,
            files: vec![],
        }
    }
}

pub fn run(cmd: SandboxCmd) -> Result<()> {
    if let SandboxCmd::Relay { listen, netns, to } = cmd {
        return relay::run(listen, &netns, to);
    }
    require_root()?;
    match cmd {
        SandboxCmd::Up(a) => {
            install_teardown_on_signal();
            match up(&a) {
                Ok(sb) => {
                    eprintln!(
                        "sandbox up: {} nodes, proxy {}; try `kubectl get nodes,pods -A -o wide`",
                        a.nodes,
                        a.proxy.name()
                    );
                    println!("export KUBECONFIG={}", sb.kubeconfig.display());
                    Ok(())
                }
                Err(e) => {
                    eprintln!("sandbox up failed; tearing down (rerun with the error below)");
                    let _ = down(false);
                    Err(e)
                }
            }
        }
        SandboxCmd::Down => {
            down(true)?;
            eprintln!("sandbox is down");
            Ok(())
        }
        SandboxCmd::Exec { pod, namespace, cmd } => {
            let st = Sandbox::open()?.exec_cmd(&namespace, &pod, &cmd, false).status().context("running kubectl")?;
            std::process::exit(st.code().unwrap_or(128));
        }
        SandboxCmd::Status => status(),
        SandboxCmd::Relay { .. } => unreachable!("handled above"),
    }
}

pub(crate) fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if !nix::unistd::geteuid().is_root() {
        bail!("the sandbox creates namespaces, mounts and cgroups: run as root (sudo -E cargo xtask sandbox ...)");
    }
    Ok(())
}

/// What `up` needs of this machine, each missing piece named with its fix.
fn preflight() -> Result<()> {
    let mut missing = vec![];
    for (bin, pkg) in [
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
        ("nsenter", "util-linux"),
        ("unshare", "util-linux"),
        ("ldd", "libc-bin"),
        ("curl", "curl"),
    ] {
        if !Command::new("sh").args(["-c", &format!("command -v {bin}")]).output().is_ok_and(|o| o.status.success()) {
            missing.push(format!("{bin} (package {pkg})"));
        }
    }
    for (path, what) in [
        ("/usr/lib/cni/bridge", "the CNI bridge plugin (package containernetworking-plugins)"),
        ("/usr/lib/cni/host-local", "the CNI host-local plugin (package containernetworking-plugins)"),
        ("/usr/lib/cni/loopback", "the CNI loopback plugin (package containernetworking-plugins)"),
        ("/bin/busybox", "busybox (package busybox-static)"),
        ("/usr/bin/nc.openbsd", "nc (package netcat-openbsd)"),
        ("/sys/fs/bpf", "the bpf filesystem mount point (a kernel with CONFIG_BPF_SYSCALL)"),
        ("/proc/sys/net/bridge", "bridge netfilter (kernel br_netfilter)"),
    ] {
        if !Path::new(path).exists() {
            missing.push(what.to_string());
        }
    }
    if node::cgroup_hierarchies().is_empty() {
        missing.push("mounted cgroup hierarchies (/sys/fs/cgroup)".into());
    }
    if !missing.is_empty() {
        bail!("the sandbox needs: {}; try `cargo xtask setup`", missing.join(", "));
    }
    Ok(())
}

/// Serialises teardown between the main thread (on error) and the signal thread.
static TEARDOWN: Mutex<()> = Mutex::new(());

/// Ctrl-C / SIGTERM while this process uses the sandbox: tear it down and exit 130
/// ([`lb_netns::interrupt`], installed by `main`).
pub fn install_teardown_on_signal() {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        // For the rest of the process: whatever it does next may have left a sandbox.
        std::mem::forget(lb_netns::interrupt::on_interrupt(|| {
            let _ = down(false);
        }));
    });
}

/// A running sandbox, as seen from the root namespace.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub dir: PathBuf,
    /// Kubeconfig for root-namespace clients (through the relay).
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub nodes: u8,
    pub proxy: Proxy,
}

/// The name of node `i` (its Node object, network namespace and cgroup leaf): the one
/// place sandbox names are made ([`PREFIX`]).
pub fn node_name(i: u8) -> String {
    Node::new(i).name
}

/// The index of the node called `name` ([`node_name`]'s inverse).
pub fn node_index(name: &str) -> Option<u8> {
    name.strip_prefix(PREFIX)?.strip_prefix("node")?.parse().ok()
}

pub fn up(a: &UpArgs) -> Result<Sandbox> {
    if a.nodes == 0 || a.nodes > 50 {
        bail!("--nodes {}: use 1..=50", a.nodes);
    }
    preflight()?;
    if a.proxy == Proxy::Ipvs && !Path::new("/proc/net/ip_vs").exists() {
        // kube-proxy would log the failed check and quietly run its iptables proxier.
        bail!(
            "--proxy ipvs needs a kernel with IPVS (CONFIG_IP_VS); this one has none (/proc/net/ip_vs is missing); \
             try --proxy iptables"
        );
    }
    down(false).context("removing a stale sandbox first; try `cargo xtask sandbox down`")?;
    let t0 = Instant::now();
    let bins = kube::ensure_built()?;
    step(
        "building the lb agent, the sandbox DNS and the bench tool (cargo build --release; the first build takes a few minutes)",
    );
    let Binaries { lb, dns, bench } = build_binaries()?;
    let dir = PathBuf::from(STATE_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {STATE_DIR}"))?;
    fs::write(dir.join(MARKER), "lb sandbox state; `cargo xtask sandbox down` removes it\n")?;

    step("images: pause, agnhost, client, mynapp, dns, kube-proxy, bench, lb-agent (docker archives, no registry)");
    let images = image::build_all(&image::Inputs { kube_bin: bins.dir.clone(), lb, dns, bench }, &dir.join("images"))?;

    step(&format!("network: fabric bridge and {} node namespaces", a.nodes));
    make_topology(a.nodes)?;

    let cp = Node::new(1);
    step(&format!(
        "control plane on {}: etcd, kube-apiserver {}:{API_PORT}, kube-controller-manager, kube-scheduler",
        cp.name, cp.ip
    ));
    let cluster = kube::up(&kube::UpOpts {
        dir: dir.join("kube"),
        port: API_PORT,
        v1_crd: false,
        controllers: true,
        netns: Some(cp.name.clone()),
        bind: cp.ip,
        nodes: true,
    })?;

    step(&format!("relay 127.0.0.1:{RELAY_PORT} (root namespace) -> {}:{API_PORT} ({})", cp.ip, cp.name));
    let me = std::env::current_exe().context("locating the xtask binary")?;
    spawn_detached(
        &dir,
        "relay",
        &mut Command::new("env"),
        &me,
        &[
            "sandbox".into(),
            "relay".into(),
            "--listen".into(),
            format!("127.0.0.1:{RELAY_PORT}"),
            "--netns".into(),
            cp.name.clone(),
            "--to".into(),
            format!("{}:{API_PORT}", cp.ip),
        ],
    )?;
    let kubeconfig = dir.join("kubeconfig");
    // The apiserver's self-signed cert names 10.250.0.11 and kubernetes.default.svc, not
    // 127.0.0.1: verify it under the name it has.
    fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lb-sandbox\n  cluster:\n    server: \"https://127.0.0.1:{RELAY_PORT}\"\n    certificate-authority: \"{}\"\n    tls-server-name: kubernetes.default.svc\n\
             users:\n- name: admin\n  user:\n    token: \"{}\"\ncontexts:\n- name: lb-sandbox\n  context:\n    cluster: lb-sandbox\n    user: admin\n    namespace: default\ncurrent-context: lb-sandbox\n",
            cluster.ca_file.display(),
            cluster.token
        ),
    )?;
    // The proxy is recorded once it is installed (`install_proxy`).
    let sb =
        Sandbox { dir: dir.clone(), kubeconfig, kubectl: bins.kubectl.clone(), nodes: a.nodes, proxy: Proxy::None };
    sb.record()?;
    wait_for("kubectl through the relay", Duration::from_secs(20), || {
        Ok(sb.kubectl(&["get", "--raw", "/readyz"]).is_ok())
    })?;

    for i in 1..=a.nodes {
        let n = Node::new(i);
        step(&format!(
            "{}: mount namespace, cgroup /{CGROUP_ROOT}/{}, containerd, image import, kubelet",
            n.name, n.name
        ));
        n.start(&cluster.kubeconfig, &bins.kubelet, &images)?;
    }
    wait_for("every node to be Ready", Duration::from_secs(120), || {
        let out = sb.kubectl(&["get", "nodes", "--no-headers"]).unwrap_or_default();
        Ok(out.lines().filter(|l| l.split_whitespace().nth(1) == Some("Ready")).count() == usize::from(a.nodes))
    })
    .with_context(|| sb.kubectl(&["get", "nodes", "-o", "wide"]).unwrap_or_default())?;

    let mut sb = sb;
    sb.install_proxy(a.proxy, &LbAttach::from_args(a))?;
    let apiserver = apiserver_vars();
    step(&format!("cluster DNS: lb-sandbox-dns behind the kube-dns Service ({CLUSTER_DNS}, UDP and TCP 53)"));
    let mut vars = apiserver.to_vec();
    vars.push(("{{IMAGE}}", image::DNS_IMAGE.to_string()));
    vars.push(("{{CLUSTER_DNS}}", CLUSTER_DNS.to_string()));
    sb.apply(&fill(DNS_MANIFEST, &vars))?;
    wait_for("the cluster DNS to be available", Duration::from_secs(120), || {
        Ok(sb
            .kubectl(&[
                "-n",
                "kube-system",
                "get",
                "deploy",
                "lb-sandbox-dns",
                "-o",
                "jsonpath={.status.availableReplicas}",
            ])
            .is_ok_and(|o| o.trim().parse::<u32>().is_ok_and(|n| n >= 1)))
    })?;
    for f in &a.files {
        step(&format!("kubectl apply -f {}", f.display()));
        sb.kubectl(&["apply", "-f", &f.display().to_string()])?;
    }
    eprintln!("sandbox ready in {:.0?}", t0.elapsed());
    Ok(sb)
}

/// The placeholders every manifest of the sandbox may use for the API server address.
fn apiserver_vars() -> Vec<(&'static str, String)> {
    let cp = Node::new(1);
    vec![("{{APISERVER_HOST}}", cp.ip.to_string()), ("{{APISERVER_PORT}}", API_PORT.to_string())]
}

/// lb's hooks, when not the manifest's (`--attach`, `--pod-attach`, `--uplink-attach`,
/// `--socket-lb`).
#[derive(Debug, Clone, Default)]
pub struct LbAttach {
    pub pod: Option<String>,
    pub uplink: Option<String>,
    /// `LB_SOCKET_LB`: "on" or "off".
    pub socket: Option<String>,
}

impl LbAttach {
    pub fn from_args(a: &UpArgs) -> LbAttach {
        LbAttach {
            pod: a.pod_attach.clone().or_else(|| a.attach.clone()),
            uplink: a.uplink_attach.clone().or_else(|| a.attach.clone()),
            socket: a.socket_lb.clone(),
        }
    }

    /// The agent's LB_* variables these settings change.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![];
        if let Some(m) = &self.pod {
            env.push(("LB_POD_ATTACH", m.clone()));
            if m.starts_with("xdp") {
                // Asked for explicitly: the agent refuses XDP on pod veths otherwise, since
                // it miscomputes CHECKSUM_PARTIAL packets (docs/datapath.md).
                env.push(("LB_ALLOW_XDP_ON_PODS", "true".into()));
            }
        }
        if let Some(m) = &self.uplink {
            env.push(("LB_UPLINK_ATTACH", m.clone()));
        }
        if let Some(s) = &self.socket {
            env.push(("LB_SOCKET_LB", s.clone()));
        }
        env
    }
}

/// deploy/lb-agent.yaml with `env` set in the agent container's `env:` list, as `kubectl
/// set env` would set it: an entry the manifest has is replaced, another one added after
/// `LB_SOURCE`. Done to the manifest before it is applied, so the DaemonSet's first pods
/// already run with them (`kubectl set env` on the created DaemonSet would roll every pod
/// once, the first ones having run, and attached, with the manifest's settings).
fn lb_manifest(env: &[(&str, String)]) -> Result<String> {
    let mut lines: Vec<String> = LB_MANIFEST.lines().map(str::to_owned).collect();
    let entry_at = |lines: &[String], name: &str| {
        let prefix = format!("- {{name: {name},");
        lines.iter().position(|l| l.trim_start().starts_with(&prefix))
    };
    for (name, value) in env {
        // A JSON string is a YAML double-quoted scalar: "on", "true" stay strings.
        let value = serde_json::to_string(value)?;
        let (at, replace) = match entry_at(&lines, name) {
            Some(i) => (i, true),
            None => (entry_at(&lines, "LB_SOURCE").context("deploy/lb-agent.yaml has no LB_SOURCE entry")?, false),
        };
        let indent: String = lines[at].chars().take_while(|c| c.is_whitespace()).collect();
        let line = format!("{indent}- {{name: {name}, value: {value}}}");
        if replace {
            lines[at] = line;
        } else {
            lines.insert(at + 1, line);
        }
    }
    Ok(lines.join("\n") + "\n")
}

/// kube-proxy's chains of its own (the kubelet makes KUBE-MARK-*, KUBE-FIREWALL,
/// KUBE-POSTROUTING and KUBE-KUBELET-CANARY itself, so those stay).
const KUBE_PROXY_CHAINS: [&str; 7] = [
    "KUBE-SERVICES",
    "KUBE-SVC-",
    "KUBE-SEP-",
    "KUBE-NODEPORTS",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-PROXY-CANARY",
];

impl Sandbox {
    /// Records the node count and the proxy for later `Sandbox::open` calls.
    fn record(&self) -> Result<()> {
        fs::write(self.dir.join("nodes"), format!("{}\n{}\n", self.nodes, self.proxy.name()))
            .context("writing the sandbox's nodes file")
    }

    /// Installs `proxy` on every node (after [`Sandbox::remove_proxy`] of the one before)
    /// and waits until its DaemonSet is ready everywhere.
    pub fn install_proxy(&mut self, proxy: Proxy, attach: &LbAttach) -> Result<()> {
        if self.proxy != Proxy::None && self.proxy != proxy {
            bail!("{} is installed; remove it first", self.proxy.name());
        }
        let apiserver = apiserver_vars();
        match proxy {
            Proxy::Lb => {
                let env = attach.env();
                let set: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
                step(&format!(
                    "lb: kubectl apply -f deploy/lb-agent.yaml (the DaemonSet, with the local image{})",
                    if set.is_empty() { String::new() } else { format!("; {}", set.join(" ")) }
                ));
                self.apply(&fill(LB_AGENT_ENV, &apiserver))?;
                self.apply(&lb_manifest(&env)?)?;
                self.proxy = proxy;
                self.record()?;
                self.wait_daemonset("lb-agent")?;
            }
            Proxy::Iptables | Proxy::Ipvs => {
                step(&format!("kube-proxy 1.20.2 ({} mode) as a DaemonSet", proxy.name()));
                self.apply(&kube_proxy_manifest(proxy))?;
                self.proxy = proxy;
                self.record()?;
                self.wait_daemonset("kube-proxy")?;
            }
            Proxy::None => step("no service proxy (--proxy none): ClusterIPs are not served"),
        }
        Ok(())
    }

    /// Removes the installed proxy and everything it left on the nodes: lb's pinned
    /// programs and maps (`lb cleanup` in each node), kube-proxy's chains, IPVS
    /// services and `kube-ipvs0` (`kube-proxy --cleanup` in each node), and the nodes'
    /// conntrack tables; then checks that nothing is left ([`Sandbox::proxy_leftovers`]).
    pub fn remove_proxy(&mut self) -> Result<()> {
        let (manifest, app, cleanup) = match self.proxy {
            Proxy::None => return Ok(()),
            Proxy::Lb => {
                let lb = target_dir()?.join("release/lb");
                (
                    LB_MANIFEST.to_string(),
                    "app.kubernetes.io/name=lb-agent",
                    vec![lb.display().to_string(), "cleanup".into(), "--bpffs=/sys/fs/bpf/lb".into()],
                )
            }
            p @ (Proxy::Iptables | Proxy::Ipvs) => {
                let bins = kube::cached().context("kube binaries missing; try `cargo xtask kube build`")?;
                (
                    kube_proxy_manifest(p),
                    "k8s-app=kube-proxy",
                    vec![bins.dir.join("kube-proxy").display().to_string(), "--cleanup".into()],
                )
            }
        };
        step(&format!("removing {} from every node", self.proxy.name()));
        self.delete(&manifest)?;
        wait_for(&format!("the {} pods to be gone", self.proxy.name()), Duration::from_secs(120), || {
            Ok(self.kubectl(&["-n", "kube-system", "get", "pods", "-l", app, "-o", "name"])?.trim().is_empty())
        })?;
        for i in 1..=self.nodes {
            let n = Node::new(i);
            // The node's own mount namespace (its bpffs) and network namespace (its rules).
            run_ok(
                n.nsenter().args(&cleanup).env("LB_LOG_FORMAT", "text"),
                &format!("{} on {}", cleanup.join(" "), n.name),
            )?;
            if matches!(self.proxy, Proxy::Iptables | Proxy::Ipvs) {
                // kube-proxy 1.20's --cleanup leaves its canary chains behind.
                for (bin, table) in
                    ["iptables-nft", "ip6tables-nft"].iter().flat_map(|b| ["mangle", "nat", "filter"].map(|t| (*b, t)))
                {
                    for op in ["-F", "-X"] {
                        let _ = n
                            .nsenter()
                            .args([bin, "-w", "-t", table, op, "KUBE-PROXY-CANARY"])
                            .stderr(Stdio::null())
                            .status();
                    }
                }
            }
            run_ok(n.nsenter().args(["conntrack", "-F"]), &format!("conntrack -F on {}", n.name))?;
        }
        self.proxy = Proxy::None;
        self.record()?;
        let left = self.proxy_leftovers()?;
        if !left.is_empty() {
            bail!("the previous proxy left state behind: {}", left.join("; "));
        }
        Ok(())
    }

    /// What any service proxy left on the nodes: kube-proxy chains, IPVS services, the
    /// `kube-ipvs0` dummy, lb's pins, XDP programs on uplinks.
    pub fn proxy_leftovers(&self) -> Result<Vec<String>> {
        let mut left = vec![];
        for i in 1..=self.nodes {
            let n = Node::new(i);
            let out = |args: &[&str]| -> String {
                n.nsenter()
                    .args(args)
                    .stdin(Stdio::null())
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            // kube-proxy 1.20 drives iptables-nft (its image ships only that).
            let rules = out(&["iptables-nft-save"]);
            let chains: Vec<&str> = rules
                .lines()
                .filter(|l| l.starts_with(':'))
                .filter_map(|l| l[1..].split_whitespace().next())
                .filter(|c| KUBE_PROXY_CHAINS.iter().any(|k| c.starts_with(k)))
                .collect();
            if !chains.is_empty() {
                left.push(format!("{}: iptables chains {}", n.name, chains.join(" ")));
            }
            let links = out(&["ip", "-d", "link", "show"]);
            if links.contains("kube-ipvs0") {
                left.push(format!("{}: interface kube-ipvs0", n.name));
            }
            for l in links.lines().filter(|l| l.contains("prog/xdp")) {
                left.push(format!("{}: XDP program: {}", n.name, l.trim()));
            }
            if Path::new("/proc/net/ip_vs").exists() {
                let ipvs = out(&["ipvsadm", "-Ln"]);
                if ipvs.lines().any(|l| l.starts_with("TCP") || l.starts_with("UDP")) {
                    left.push(format!("{}: IPVS services", n.name));
                }
            }
            let pins = out(&["ls", "-A", "/sys/fs/bpf/lb"]);
            if !pins.trim().is_empty() {
                left.push(format!(
                    "{}: lb pins in /sys/fs/bpf/lb: {}",
                    n.name,
                    pins.split_whitespace().collect::<Vec<_>>().join(" ")
                ));
            }
        }
        Ok(left)
    }

    /// `kubectl delete --ignore-not-found -f -` with `yaml` on stdin.
    pub fn delete(&self, yaml: &str) -> Result<String> {
        self.kubectl_stdin(&["delete", "--ignore-not-found", "-f", "-"], yaml)
    }
}

fn kube_proxy_manifest(proxy: Proxy) -> String {
    let mut vars = apiserver_vars();
    vars.push(("{{MODE}}", proxy.name().to_string()));
    vars.push(("{{IMAGE}}", image::KUBE_PROXY_IMAGE.to_string()));
    fill(KUBE_PROXY_MANIFEST, &vars)
}

/// The agent's API server address: a proxy cannot reach the API server through the
/// ClusterIP it is about to program, so it is given the address itself (as kubeadm gives
/// kube-proxy a kubeconfig naming the control-plane endpoint). deploy/lb-agent.yaml reads
/// this ConfigMap with `envFrom`, optionally.
const LB_AGENT_ENV: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: lb-agent-env\n  namespace: kube-system\ndata:\n  KUBERNETES_SERVICE_HOST: \"{{APISERVER_HOST}}\"\n  KUBERNETES_SERVICE_PORT: \"{{APISERVER_PORT}}\"\n";

fn fill(template: &str, vars: &[(&str, String)]) -> String {
    vars.iter().fold(template.to_string(), |t, (k, v)| t.replace(k, v))
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

/// The sandbox's own binaries, built in release mode.
pub(crate) struct Binaries {
    /// The agent image's `lb`.
    pub lb: PathBuf,
    pub dns: PathBuf,
    /// `bench peers`' workload client and server.
    pub bench: PathBuf,
}

/// Builds the release `lb`, `lb-sandbox-dns` and `lb-bench-tool`.
pub(crate) fn build_binaries() -> Result<Binaries> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(&cargo)
        .args(["build", "--release", "--package", "lb-userspace", "--package", "lb-sandbox-dns"])
        .args(["--package", "lb-bench-tool", "--bin", "lb", "--bin", "lb-sandbox-dns", "--bin", "lb-bench-tool"])
        .status()
        .context("running cargo build")?;
    if !st.success() {
        bail!(
            "cargo build of lb / lb-sandbox-dns / lb-bench-tool failed ({st}); fix the build, then rerun `cargo xtask sandbox up`"
        );
    }
    let target = target_dir()?.join("release");
    Ok(Binaries { lb: target.join("lb"), dns: target.join("lb-sandbox-dns"), bench: target.join("lb-bench-tool") })
}

pub fn target_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return std::path::absolute(PathBuf::from(d)).context("CARGO_TARGET_DIR");
    }
    Ok(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"))
}

fn make_topology(nodes: u8) -> Result<()> {
    lb_netns::add(FABRIC_NS)?;
    ip(&["-n", FABRIC_NS, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", FABRIC_NS, "link", "set", "br0", "up"])?;
    for i in 1..=nodes {
        let n = Node::new(i);
        lb_netns::add(&n.name)?;
        let port = format!("node{i}");
        // Each veth is created with both ends already inside their namespaces.
        ip(&["link", "add", &port, "netns", FABRIC_NS, "type", "veth", "peer", "name", "eth0", "netns", &n.name])?;
        ip(&["-n", FABRIC_NS, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", FABRIC_NS, "link", "set", &port, "up"])?;
        ip(&["-n", &n.name, "addr", "add", &format!("{}/24", n.ip), "dev", "eth0"])?;
        ip(&["-n", &n.name, "link", "set", "eth0", "up"])?;
        lb_netns::sysctl(&n.name, "net.ipv4.ip_forward", "1")?;
        // kube-proxy's same-node replies are bridged: it needs bridged traffic in iptables.
        lb_netns::sysctl(&n.name, "net.bridge.bridge-nf-call-iptables", "1")?;
        // Replies leave the datapath with a ClusterIP source, and nodes have no route to
        // the service range: strict reverse-path filtering would drop them.
        for conf in ["all", "default", "eth0"] {
            lb_netns::sysctl(&n.name, &format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
        }
        // Host-network processes need a route covering the service range (else connect()
        // fails with "Network is unreachable" before any proxy sees it); it ends on the
        // fabric, never outside the sandbox. Through one absent gateway rather than on-link:
        // unproxied ClusterIP packets then make one unresolved neighbour, not one per
        // ClusterIP (the neighbour table's gc_thresh3 is shared by every namespace of
        // this machine).
        ip(&["-n", &n.name, "route", "add", kube::SERVICE_CIDR, "via", FABRIC_NOWHERE, "dev", "eth0", "onlink"])?;
    }
    for i in 1..=nodes {
        for j in (1..=nodes).filter(|j| *j != i) {
            let (n, m) = (Node::new(i), Node::new(j));
            ip(&["-n", &n.name, "route", "add", &m.pod_cidr(), "via", &m.ip.to_string(), "dev", "eth0"])?;
        }
    }
    Ok(())
}

pub fn ip(args: &[&str]) -> Result<()> {
    lb_netns::ip(args).map(drop)
}

/// SIGKILL to `pid`; one already gone is no error.
pub fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
}

pub fn run_ok(c: &mut Command, what: &str) -> Result<()> {
    let out = c.stdin(Stdio::null()).output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let t0 = Instant::now();
    let mut last_note = Instant::now();
    loop {
        if f()? {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}; see the logs in {STATE_DIR}");
        }
        if last_note.elapsed() > Duration::from_secs(10) {
            eprintln!("    ... still waiting for {what} ({:.0?})", t0.elapsed());
            last_note = Instant::now();
        }
        sleep(Duration::from_millis(200));
    }
}

/// Starts `wrapper bin args` detached (own session), logging to DIR/NAME.log; the process
/// writes DIR/NAME.pid itself before exec'ing. `wrapper` is the command that enters the
/// namespaces (nsenter ...), or `env` for none.
pub fn spawn_detached(dir: &Path, name: &str, wrapper: &mut Command, bin: &Path, args: &[String]) -> Result<()> {
    let log_path = dir.join(format!("{name}.log"));
    let pid_path = dir.join(format!("{name}.pid"));
    let log = fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let mut c = Command::new("setsid");
    c.args(["-f", "sh", "-c", "echo $$ > \"$0\"; exec \"$@\""]).arg(&pid_path);
    c.arg(wrapper.get_program()).args(wrapper.get_args());
    c.arg(bin).args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    for v in kube::PROXY_VARS {
        c.env_remove(v);
    }
    let st = c.status().context("cannot run setsid (util-linux)")?;
    if !st.success() {
        bail!("starting {name} failed ({st}); see {}", log_path.display());
    }
    let base = bin.file_name().map(|b| b.to_string_lossy().into_owned()).unwrap_or_default();
    wait_for(&format!("{name} to start"), Duration::from_secs(10), || Ok(read_pid(dir, name).is_some()))?;
    sleep(Duration::from_millis(300));
    if !pid_alive(dir, name, &base) {
        sleep(Duration::from_millis(200)); // let its last words reach the log
        bail!("{name} exited at once; log {}:\n{}", log_path.display(), tail(&log_path, 20));
    }
    Ok(())
}

fn read_pid(dir: &Path, name: &str) -> Option<i32> {
    fs::read_to_string(dir.join(format!("{name}.pid"))).ok()?.trim().parse().ok()
}

fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline")).map(|b| String::from_utf8_lossy(&b).replace('\0', " ")).unwrap_or_default()
}

/// The pid file's process is alive (not a zombie) and runs `bin`.
pub fn pid_alive(dir: &Path, name: &str, bin: &str) -> bool {
    read_pid(dir, name).is_some_and(|p| {
        let stat = fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let zombie = stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        !zombie && cmdline(p).contains(bin)
    })
}

pub fn tail(path: &Path, n: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn our_netns() -> Vec<String> {
    lb_netns::list(PREFIX)
}

/// Mount points under the state dir (the mount-namespace handles and their dir), deepest first.
fn our_mounts() -> Vec<String> {
    let mut v: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&format!("{STATE_DIR}/")))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.len()));
    v.dedup();
    v
}

fn ns_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Every process of the sandbox: in a node's network or mount namespace (daemons, shims,
/// host-network pods), or in its cgroup subtree (every pod's processes).
fn sandbox_pids(namespaces: &[String]) -> Vec<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let mut inodes: Vec<u64> = namespaces.iter().filter_map(|n| ns_inode(&lb_netns::path(n))).collect();
    for e in fs::read_dir(NS_DIR).into_iter().flatten().flatten() {
        // A mounted handle's inode is the namespace's; an unmounted one is a plain file.
        if node::is_mountpoint(&e.path()) {
            inodes.extend(ns_inode(&e.path()));
        }
    }
    let mut pids = node::cgroup_pids();
    for pid in fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        for ns in ["net", "mnt"] {
            if ns_inode(Path::new(&format!("/proc/{pid}/ns/{ns}"))).is_some_and(|i| inodes.contains(&i)) {
                pids.push(pid);
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|p| *p != me && *p > 1);
    pids
}

/// Removes everything of the sandbox: processes, node and fabric namespaces, the nodes'
/// mount namespaces (and every mount in them: bpffs, overlays, tmpfs), cgroups, the state dir.
pub fn down(verbose: bool) -> Result<()> {
    let _g = TEARDOWN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = PathBuf::from(STATE_DIR);
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    // The relay is in the root namespace: find it by pid file, check it is ours.
    if let Some(p) = read_pid(&dir, "relay").filter(|p| cmdline(*p).contains("sandbox relay") && *p != me) {
        // A pid whose command line is our relay.
        kill9(p);
    }
    let namespaces = our_netns();
    let kdir = dir.join("kube");
    if kdir.exists() {
        kube::down(&kdir).context("stopping the control plane")?;
    }
    // Kubelets first (they would restart what we kill), then everything else; SIGKILL: the
    // cluster is going away as a whole, nothing in it needs a graceful end.
    for round in 0..50 {
        let pids = sandbox_pids(&namespaces);
        if pids.is_empty() {
            break;
        }
        if verbose && round == 0 {
            eprintln!("stopping {} sandbox processes", pids.len());
        }
        for p in &pids {
            // Processes inside the sandbox's namespaces or cgroups, which only the
            // sandbox creates.
            kill9(*p);
        }
        sleep(Duration::from_millis(100));
    }
    let left = sandbox_pids(&namespaces);
    if !left.is_empty() {
        bail!("sandbox processes {left:?} survived SIGKILL");
    }
    // Nodes before the fabric (their uplink peers go with them).
    let mut ordered = namespaces.clone();
    ordered.sort_by_key(|n| (n == FABRIC_NS, n.clone()));
    for ns in &ordered {
        if let Err(e) = lb_netns::delete(ns)
            && lb_netns::path(ns).exists()
        {
            return Err(e);
        }
    }
    // Unmounting a node's handle drops its mount namespace (no process holds it now), and
    // with it the bpffs (and so the agent's pins), the overlays and the private dirs.
    for m in our_mounts() {
        // A path under our state dir, from /proc/self/mountinfo.
        nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("cannot unmount {m}"))?;
    }
    let mut t0 = Instant::now();
    while let Err(e) = node::remove_cgroups() {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(e);
        }
        sleep(Duration::from_millis(100));
    }
    t0 = Instant::now();
    if dir.exists() {
        if !dir.join(MARKER).exists() {
            bail!("{STATE_DIR} exists but is not a sandbox state dir (no {MARKER}); remove it yourself");
        }
        // Overlay upper dirs can be busy for a moment after their mount namespace went.
        while let Err(e) = fs::remove_dir_all(&dir) {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(e).with_context(|| format!("removing {STATE_DIR}"));
            }
            sleep(Duration::from_millis(200));
        }
    }
    if verbose && !namespaces.is_empty() {
        eprintln!("removed namespaces: {}", namespaces.join(" "));
    }
    Ok(())
}

fn status() -> Result<()> {
    let dir = PathBuf::from(STATE_DIR);
    let ns = our_netns();
    println!("namespaces: {}", if ns.is_empty() { "(none)".into() } else { ns.join(" ") });
    if !dir.exists() {
        println!("sandbox: down");
        return Ok(());
    }
    println!("relay: {}", if pid_alive(&dir, "relay", "sandbox relay") { "running" } else { "NOT RUNNING" });
    let sb = Sandbox::open()?;
    println!("proxy: {}", sb.proxy.name());
    let mut broken = vec![];
    for i in 1..=sb.nodes {
        let n = Node::new(i);
        let parts: Vec<String> = ["containerd", "kubelet"]
            .iter()
            .map(|d| {
                let ok = pid_alive(&n.dir, d, d);
                if !ok {
                    broken.push(format!("{} {d}", n.name));
                }
                format!("{d} {}", if ok { "running" } else { "NOT RUNNING" })
            })
            .collect();
        println!("{}: {}", n.name, parts.join(", "));
    }
    print!("{}", kube::status(&dir.join("kube"))?);
    println!("export KUBECONFIG={}", sb.kubeconfig.display());
    match sb.kubectl(&["get", "nodes,pods", "-A", "-o", "wide"]) {
        Ok(o) => print!("{o}"),
        Err(e) => println!("kubectl: {e:#}"),
    }
    if !broken.is_empty() {
        bail!("not running: {}", broken.join(", "));
    }
    Ok(())
}

impl Sandbox {
    /// The sandbox brought up by `up` (possibly by another process).
    pub fn open() -> Result<Sandbox> {
        let dir = PathBuf::from(STATE_DIR);
        let nodes = fs::read_to_string(dir.join("nodes")).context("no sandbox is up; try `cargo xtask sandbox up`")?;
        let mut lines = nodes.lines();
        let n =
            lines.next().and_then(|l| l.trim().parse().ok()).context("bad nodes file; try `cargo xtask sandbox up`")?;
        let proxy = match lines.next().map(str::trim) {
            Some("iptables") => Proxy::Iptables,
            Some("ipvs") => Proxy::Ipvs,
            Some("none") => Proxy::None,
            _ => Proxy::Lb,
        };
        let bins = kube::cached().context("kube binaries missing; try `cargo xtask kube build`")?;
        Ok(Sandbox { kubeconfig: dir.join("kubeconfig"), kubectl: bins.kubectl, dir, nodes: n, proxy })
    }

    pub fn kubectl_cmd(&self) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        c
    }

    /// kubectl ARGS, returning stdout; errors carry stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl_cmd().args(args).stdin(Stdio::null()).output().context("cannot run kubectl")?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` with `yaml` on stdin.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml)
    }

    /// kubectl ARGS with `input` on stdin, returning stdout; errors carry stderr.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        use std::io::Write as _;
        let mut child = self
            .kubectl_cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run kubectl")?;
        child.stdin.take().context("kubectl stdin")?.write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            let shown: String = input.chars().take(2000).collect();
            bail!("kubectl {} failed: {}\n{shown}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until DaemonSet `name` in kube-system has a ready pod on every node.
    pub fn wait_daemonset(&self, name: &str) -> Result<()> {
        let want = self.nodes.to_string();
        wait_for(&format!("DaemonSet {name} to be ready on every node"), Duration::from_secs(120), || {
            let out = self.kubectl(&[
                "-n",
                "kube-system",
                "get",
                "ds",
                name,
                "-o",
                "jsonpath={.status.numberReady}/{.status.updatedNumberScheduled}",
            ])?;
            Ok(out.trim() == format!("{want}/{want}"))
        })
        .with_context(|| self.kubectl(&["-n", "kube-system", "get", "pods", "-o", "wide"]).unwrap_or_default())
    }

    /// `kubectl exec [-i] -n NS POD -- CMD` as a command.
    pub fn exec_cmd(&self, ns: &str, pod: &str, cmd: &[String], stdin: bool) -> Command {
        let mut c = self.kubectl_cmd();
        c.args(["exec", "-n", ns, pod]);
        if stdin {
            c.arg("-i");
        }
        c.arg("--").args(cmd);
        c
    }

    /// Runs `cmd` in the pod; (exit code, stdout, stderr).
    pub fn exec(&self, ns: &str, pod: &str, cmd: &[&str]) -> Result<(i32, String, String)> {
        let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        let out =
            self.exec_cmd(ns, pod, &cmd, false).stdin(Stdio::null()).output().context("cannot run kubectl exec")?;
        Ok((
            out.status.code().unwrap_or(128),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Runs `cmd` as a host-network process of node `i`, in the node's cgroup, where
    /// socket-level load balancing serves it ([`Node::host_cmd`]); (exit code, stdout,
    /// stderr).
    pub fn host_exec(&self, i: u8, cmd: &[&str]) -> Result<(i32, String, String)> {
        let n = Node::new(i);
        let out = n
            .host_cmd()?
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {} on {}", cmd.join(" "), n.name))?;
        if out.status.code() == Some(node::JOIN_FAILED) {
            bail!("cannot join the cgroup of {}: {}", n.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok((
            out.status.code().unwrap_or(128),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// The lb agent pod on node `i`.
    pub fn agent_pod(&self, i: u8) -> Result<String> {
        let out = self.kubectl(&[
            "-n",
            "kube-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=lb-agent",
            "--field-selector",
            &format!("spec.nodeName={}", node_name(i)),
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?;
        out.split_whitespace().next().map(str::to_owned).with_context(|| format!("no lb-agent pod on {}", node_name(i)))
    }

    /// Kills node `i`'s `lb agent` process with SIGKILL (as a crash would); the kubelet
    /// restarts the container. Its pinned maps and attached programs stay.
    pub fn kill_agent(&self, i: u8) -> Result<()> {
        let n = Node::new(i);
        let net = ns_inode(&lb_netns::path(&n.name)).context("node namespace missing")?;
        let pids: Vec<i32> = fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|p| {
                let args: Vec<String> = cmdline(*p).split(' ').map(str::to_owned).collect();
                args.first().is_some_and(|a| a.ends_with("/lb"))
                    && args.get(1).is_some_and(|a| a == "agent")
                    && ns_inode(Path::new(&format!("/proc/{p}/ns/net"))) == Some(net)
            })
            .collect();
        if pids.is_empty() {
            bail!("no lb agent process runs on {}", n.name);
        }
        for p in &pids {
            // The lb agent process in this node's network namespace.
            kill9(*p);
        }
        wait_for(&format!("the lb agent on {} to die", n.name), Duration::from_secs(10), || {
            Ok(pids.iter().all(|p| !Path::new(&format!("/proc/{p}")).exists() || cmdline(*p).is_empty()))
        })
    }

    /// Waits until node `i`'s agent pod is ready again (after [`Sandbox::kill_agent`]).
    pub fn wait_agent_ready(&self, i: u8) -> Result<()> {
        sleep(Duration::from_secs(1));
        wait_for(&format!("the lb agent on {} to be ready", node_name(i)), Duration::from_secs(90), || {
            let pod = self.agent_pod(i)?;
            let ready = self.kubectl(&[
                "-n",
                "kube-system",
                "get",
                "pod",
                &pod,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])?;
            Ok(ready.trim() == "True")
        })
    }

    /// `lb ARGS` inside node `i`'s agent pod, where the pinned maps are.
    pub fn lb_on_node(&self, i: u8, args: &[&str]) -> Result<String> {
        let pod = self.agent_pod(i)?;
        let mut cmd = vec!["lb".to_string()];
        cmd.extend(args.iter().map(|s| s.to_string()));
        let out = self.exec_cmd("kube-system", &pod, &cmd, false).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("lb {} on {} failed: {}", args.join(" "), node_name(i), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lb_manifest_sets_the_agents_env() {
        assert_eq!(lb_manifest(&[]).unwrap(), LB_MANIFEST);
        let attach = LbAttach { pod: Some("xdp".into()), uplink: None, socket: Some("off".into()) };
        let m = lb_manifest(&attach.env()).unwrap();
        let entries = |name: &str| -> Vec<String> {
            m.lines().filter(|l| l.contains(&format!("{{name: {name},"))).map(|l| l.trim().to_owned()).collect()
        };
        assert_eq!(entries("LB_SOCKET_LB"), [r#"- {name: LB_SOCKET_LB, value: "off"}"#]);
        assert_eq!(entries("LB_POD_ATTACH"), [r#"- {name: LB_POD_ATTACH, value: "xdp"}"#]);
        assert_eq!(entries("LB_ALLOW_XDP_ON_PODS"), [r#"- {name: LB_ALLOW_XDP_ON_PODS, value: "true"}"#]);
        // Added entries keep the list's indentation.
        let source = m.lines().find(|l| l.contains("{name: LB_SOURCE,")).unwrap();
        let added = m.lines().find(|l| l.contains("{name: LB_ALLOW_XDP_ON_PODS,")).unwrap();
        let indent = |l: &str| l.len() - l.trim_start().len();
        assert_eq!(indent(source), indent(added));
        assert_eq!(m.lines().count(), LB_MANIFEST.lines().count() + 1);
    }
}
