//! `cargo xtask sandbox up|down|exec|status`: a multi-node Kubernetes sandbox whose nodes
//! and pods are network namespaces (docs/sandbox.md).
//!
//! * `lbsb-fabric`: a bridge joining the control plane and the nodes (10.250.0.0/24).
//! * `lbsb-cp`: etcd, kube-apiserver, kube-controller-manager (via [`crate::kube`]) on
//!   10.250.0.1, and our kubelet (`lb-sandbox kubelet`), which makes the pod namespaces.
//! * `lbsb-node<i>`: fabric address 10.250.0.<10+i>, pod CIDR 10.244.<i>.0/24, routes to the
//!   other nodes' pod CIDRs, and `lb agent` attached to its uplink and pod veths.
//! * The root namespace only gets `lb-sandbox relay` on 127.0.0.1:[`RELAY_PORT`], so that
//!   host kubectl reaches the apiserver.
//!
//! Everything is found again by name (`lbsb-` prefix) and pid files, so `down` works after
//! a crash and `up` starts with it.

pub mod demo;
pub mod e2e;

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::kube;

pub const PREFIX: &str = "lbsb-";
pub const STATE_DIR: &str = "/tmp/lbsb";
const MARKER: &str = ".lbsb";
pub const FABRIC_NS: &str = "lbsb-fabric";
pub const CP_NS: &str = "lbsb-cp";
pub const CP_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
pub const API_PORT: u16 = 16443;
/// Loopback port of the relay in the root namespace.
pub const RELAY_PORT: u16 = 16480;
/// Per-node bpffs mounts (the agent mounts them; this machine has no /sys/fs/bpf mount,
/// and `down` unmounts them).
const BPFFS: &str = "/tmp/lbsb/bpffs";
/// Agent metrics/health port, on each node namespace's own loopback.
const AGENT_METRICS: &str = "127.0.0.1:9090";

#[derive(clap::Subcommand, Debug)]
pub enum SandboxCmd {
    /// Bring up the sandbox cluster (tears down a stale one first); prints `export KUBECONFIG=...`.
    Up(UpArgs),
    /// Remove every namespace, process, pinned map and file of the sandbox (safe after a crash).
    Down,
    /// Run a command in a pod's network namespace with the pod's environment.
    Exec {
        /// Pod name.
        pod: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Show namespaces, processes, nodes and pods.
    Status,
}

#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Number of node namespaces.
    #[arg(long, default_value_t = 2)]
    pub nodes: u8,
    /// Hook for both pod veths and uplinks (xdp, xdp-generic, tc); default: the agent's.
    #[arg(long)]
    pub attach: Option<String>,
    /// Hook for pod veths only (overrides --attach).
    #[arg(long)]
    pub pod_attach: Option<String>,
    /// Hook for node uplinks only (overrides --attach).
    #[arg(long)]
    pub uplink_attach: Option<String>,
    /// Do not start `lb agent` on the nodes (pods are still reachable by pod IP).
    #[arg(long)]
    pub no_agent: bool,
    /// Manifests to `kubectl apply -f` once the cluster is up.
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<PathBuf>,
}

impl Default for UpArgs {
    fn default() -> Self {
        UpArgs { nodes: 2, attach: None, pod_attach: None, uplink_attach: None, no_agent: false, files: vec![] }
    }
}

pub fn run(cmd: SandboxCmd) -> Result<()> {
    require_root()?;
    match cmd {
        SandboxCmd::Up(a) => {
            install_teardown_on_signal();
            match up(&a) {
                Ok(sb) => {
                    eprintln!("sandbox up: {} nodes; try `kubectl get nodes,pods -o wide`", a.nodes);
                    println!("export KUBECONFIG={}", sb.kubeconfig.display());
                    Ok(())
                }
                Err(e) => {
                    eprintln!("sandbox up failed; tearing down (logs are removed too; rerun with the error below)");
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
            let code = Sandbox::open()?.exec_status(&namespace, &pod, &cmd)?;
            std::process::exit(code);
        }
        SandboxCmd::Status => status(),
    }
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the sandbox creates network namespaces and loads BPF programs: run as root (sudo -E cargo xtask sandbox ...)"
        );
    }
    Ok(())
}

/// Serialises teardown between the main thread (on error) and the signal thread.
static TEARDOWN: Mutex<()> = Mutex::new(());

/// Write end of the self-pipe the signal handler writes to.
static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(_sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; one byte from a static.
        unsafe { libc::write(fd, c"x".as_ptr().cast(), 1) };
    }
}

/// Ctrl-C / SIGTERM while this process uses the sandbox: tear it down and exit 130.
/// The handler only writes to a pipe; a thread reading it does the teardown as ordinary
/// code. (Blocking the signals instead would leak the blocked mask into every child.)
pub fn install_teardown_on_signal() {
    if SIGNAL_PIPE.load(std::sync::atomic::Ordering::Relaxed) >= 0 {
        return;
    }
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds; sigaction installs a handler that only calls write(2).
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return;
        }
        SIGNAL_PIPE.store(fds[1], std::sync::atomic::Ordering::Relaxed);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
    let rfd = fds[0];
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        // SAFETY: blocking read of one byte into a local buffer from our pipe.
        let n = unsafe { libc::read(rfd, b.as_mut_ptr().cast(), 1) };
        if n == 1 {
            eprintln!("\ninterrupted: tearing the sandbox down...");
            let _ = down(false);
            std::process::exit(130);
        }
    });
}

/// A running sandbox, as seen from the root namespace.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub dir: PathBuf,
    /// Kubeconfig for root-namespace clients (through the relay).
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub lb: PathBuf,
    pub nodes: u8,
    pub agents: bool,
}

fn node_ns(i: u8) -> String {
    format!("{PREFIX}node{i}")
}

fn node_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, 0, 10 + i)
}

pub fn up(a: &UpArgs) -> Result<Sandbox> {
    if a.nodes == 0 || a.nodes > 200 {
        bail!("--nodes {}: use 1..=200", a.nodes);
    }
    down(false).context("removing a stale sandbox first; try `cargo xtask sandbox down`")?;
    let t0 = Instant::now();
    step("building lb and lb-sandbox (cargo build; the first build takes a few minutes)");
    let (lb, lb_sandbox) = build_binaries()?;
    let bins = kube::ensure_built()?;
    let dir = PathBuf::from(STATE_DIR);
    fs::create_dir_all(dir.join("pods")).with_context(|| format!("creating {STATE_DIR}"))?;
    fs::write(dir.join(MARKER), "lb sandbox state; `cargo xtask sandbox down` removes it\n")?;

    step(&format!("network: fabric bridge, control-plane namespace, {} node namespaces", a.nodes));
    make_topology(a.nodes)?;

    step("control plane: etcd, kube-apiserver, kube-controller-manager in lbsb-cp on 10.250.0.1");
    let kdir = dir.join("kube");
    let cluster = kube::up(&kube::UpOpts {
        dir: kdir.clone(),
        port: API_PORT,
        v1_crd: false,
        controllers: true,
        netns: Some(CP_NS.into()),
        bind: CP_IP,
    })?;

    step(&format!("relay 127.0.0.1:{RELAY_PORT} (root namespace) -> {CP_IP}:{API_PORT} (lbsb-cp)"));
    spawn_detached(
        &dir,
        "relay",
        None,
        &lb_sandbox,
        &[
            "relay".into(),
            "--listen".into(),
            format!("127.0.0.1:{RELAY_PORT}"),
            "--netns".into(),
            CP_NS.into(),
            "--to".into(),
            format!("{CP_IP}:{API_PORT}"),
        ],
    )?;
    let kubeconfig = dir.join("kubeconfig");
    // The apiserver's self-signed cert names 10.250.0.1 and kubernetes.default.svc, not
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
    let sb = Sandbox {
        dir: dir.clone(),
        kubeconfig,
        kubectl: bins.kubectl.clone(),
        lb: lb.clone(),
        nodes: a.nodes,
        agents: !a.no_agent,
    };
    wait_for("kubectl through the relay", Duration::from_secs(20), || {
        Ok(sb.kubectl(&["get", "--raw", "/readyz"]).is_ok())
    })?;

    step("kubelet (lb-sandbox kubelet, in lbsb-cp): registers nodes, runs pods");
    // Not under `ip netns exec` (whose private mount namespace would hide the pod
    // namespaces' bind mounts from everyone else): the kubelet enters lbsb-cp itself.
    spawn_detached(
        &dir,
        "kubelet",
        None,
        &lb_sandbox,
        &[
            "kubelet".into(),
            "--netns".into(),
            CP_NS.into(),
            "--nodes".into(),
            a.nodes.to_string(),
            "--kubeconfig".into(),
            cluster.kubeconfig.display().to_string(),
            "--state-dir".into(),
            dir.display().to_string(),
        ],
    )?;
    wait_for("nodes to register", Duration::from_secs(30), || {
        let out = sb.kubectl(&["get", "nodes", "--no-headers"]).unwrap_or_default();
        Ok(out.lines().filter(|l| l.contains(" Ready")).count() == usize::from(a.nodes))
    })?;

    if a.no_agent {
        step("no agent (--no-agent): ClusterIPs are not served");
    } else {
        step("lb agent on every node (--source kubernetes, uplink eth0, pod veths vp*)");
        for i in 1..=a.nodes {
            start_agent(&dir, &cluster.kubeconfig, &lb, i, a)?;
        }
        for i in 1..=a.nodes {
            wait_agent_ready(&dir, i)?;
        }
    }
    for f in &a.files {
        step(&format!("kubectl apply -f {}", f.display()));
        sb.kubectl(&["apply", "-f", &f.display().to_string()])?;
    }
    fs::write(dir.join("nodes"), format!("{}\n{}\n", a.nodes, !a.no_agent))?;
    eprintln!("sandbox ready in {:.0?}", t0.elapsed());
    Ok(sb)
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

/// Starts `lb agent` in node `i`'s namespace (detached; pid file `agent-lbsb-node<i>.pid`).
fn start_agent(dir: &Path, kubeconfig: &Path, lb: &Path, i: u8, a: &UpArgs) -> Result<()> {
    let ns = node_ns(i);
    let mut args: Vec<String> = vec![
        "--bpffs".into(),
        format!("{BPFFS}/{ns}"),
        "--status-file".into(),
        dir.join(&ns).join("status.json").display().to_string(),
        "agent".into(),
        "--source".into(),
        "kubernetes".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--iface".into(),
        "eth0".into(),
        "--iface-glob".into(),
        "vp*".into(),
        "--metrics-addr".into(),
        AGENT_METRICS.into(),
    ];
    if let Some(m) = a.pod_attach.as_ref().or(a.attach.as_ref()) {
        args.extend(["--pod-attach".into(), m.clone()]);
        if m.starts_with("xdp") {
            // Asked for explicitly: the agent refuses XDP on pod veths otherwise, since it
            // miscomputes CHECKSUM_PARTIAL packets (docs/datapath.md). On the sandbox's
            // veth-only paths nothing completes those checksums, so it still works here.
            args.push("--allow-xdp-on-pods".into());
        }
    }
    if let Some(m) = a.uplink_attach.as_ref().or(a.attach.as_ref()) {
        args.extend(["--uplink-attach".into(), m.clone()]);
    }
    fs::create_dir_all(dir.join(&ns))?;
    spawn_detached(dir, &format!("agent-{ns}"), Some(&ns), lb, &args)
}

fn wait_agent_ready(dir: &Path, i: u8) -> Result<()> {
    let ns = node_ns(i);
    let log = dir.join(format!("agent-{ns}.log"));
    wait_for(&format!("lb agent on {ns} to be ready"), Duration::from_secs(60), || {
        if !pid_alive(dir, &format!("agent-{ns}")) {
            bail!("lb agent on {ns} exited; log {}:\n{}", log.display(), tail(&log, 20));
        }
        Ok(curl_in(&ns, &format!("http://{AGENT_METRICS}/readyz")).is_some_and(|c| c == 200))
    })
}

/// Builds `lb` and `lb-sandbox` (dev profile, shared with the colleagues' builds).
fn build_binaries() -> Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(&cargo)
        .args(["build", "--package", "lb-userspace", "--bin", "lb", "--bin", "lb-sandbox"])
        .status()
        .context("running cargo build")?;
    if !st.success() {
        bail!("cargo build of lb / lb-sandbox failed ({st}); fix the build, then rerun `cargo xtask sandbox up`");
    }
    let target = target_dir()?.join("debug");
    Ok((target.join("lb"), target.join("lb-sandbox")))
}

pub fn target_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return std::path::absolute(PathBuf::from(d)).context("CARGO_TARGET_DIR");
    }
    Ok(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"))
}

fn make_topology(nodes: u8) -> Result<()> {
    for ns in [FABRIC_NS, CP_NS] {
        netns_add(ns)?;
    }
    ip(&["-n", FABRIC_NS, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", FABRIC_NS, "link", "set", "br0", "up"])?;
    // Each veth is created with both ends already inside their namespaces.
    let mut members = vec![("cp".to_string(), CP_NS.to_string(), CP_IP)];
    for i in 1..=nodes {
        netns_add(&node_ns(i))?;
        members.push((format!("node{i}"), node_ns(i), node_ip(i)));
    }
    for (port, ns, addr) in &members {
        ip(&["link", "add", port, "netns", FABRIC_NS, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        ip(&["-n", FABRIC_NS, "link", "set", port, "master", "br0"])?;
        ip(&["-n", FABRIC_NS, "link", "set", port, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    }
    for i in 1..=nodes {
        let ns = node_ns(i);
        sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        // Replies leave the datapath with a ClusterIP source, and nodes have no route to
        // the service range: strict reverse-path filtering would drop them.
        for conf in ["all", "default", "eth0"] {
            sysctl(&ns, &format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
        }
        for j in 1..=nodes {
            if j != i {
                ip(&[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    &format!("10.244.{j}.0/24"),
                    "via",
                    &node_ip(j).to_string(),
                    "dev",
                    "eth0",
                ])?;
            }
        }
    }
    Ok(())
}

fn netns_add(ns: &str) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

fn sysctl(ns: &str, key: &str, val: &str) -> Result<()> {
    run_ok(Command::new("ip").args(["netns", "exec", ns, "sysctl", "-qw", &format!("{key}={val}")]), "sysctl")
}

pub fn ip(args: &[&str]) -> Result<()> {
    run_ok(Command::new("ip").args(args), &format!("ip {}", args.join(" ")))
}

fn run_ok(c: &mut Command, what: &str) -> Result<()> {
    let out = c.stdin(Stdio::null()).output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// HTTP status of `url` fetched from inside `ns`, None if unreachable.
fn curl_in(ns: &str, url: &str) -> Option<u16> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
            "--noproxy",
            "*",
            url,
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok().filter(|c| *c != 0)
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

/// Starts `bin args` detached (own session), optionally inside network namespace `netns`, logging to
/// DIR/NAME.log; the process writes DIR/NAME.pid itself before exec'ing.
fn spawn_detached(dir: &Path, name: &str, netns: Option<&str>, bin: &Path, args: &[String]) -> Result<()> {
    let log_path = dir.join(format!("{name}.log"));
    let pid_path = dir.join(format!("{name}.pid"));
    let log = fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let mut c = Command::new("setsid");
    c.args(["-f", "sh", "-c", "echo $$ > \"$0\"; exec \"$@\""]).arg(&pid_path);
    if let Some(ns) = netns {
        // nsenter enters the network namespace only. `ip netns exec` would also give the
        // process a private mount namespace with a fresh /sys, without /sys/fs/bpf.
        c.arg("nsenter").arg(format!("--net=/run/netns/{ns}"));
    }
    c.arg(bin).args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    for v in
        ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"]
    {
        c.env_remove(v);
    }
    let st = c.status().context("cannot run setsid (util-linux)")?;
    if !st.success() {
        bail!("starting {name} failed ({st}); see {}", log_path.display());
    }
    wait_for(&format!("{name} to start"), Duration::from_secs(10), || Ok(read_pid(dir, name).is_some()))?;
    sleep(Duration::from_millis(300));
    if !pid_alive(dir, name) {
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

/// The pid file's process is alive and is one of ours (an lb binary).
fn pid_alive(dir: &Path, name: &str) -> bool {
    read_pid(dir, name).is_some_and(|p| {
        let stat = fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let zombie = stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        !zombie && cmdline(p).contains("lb")
    })
}

pub fn tail(path: &Path, n: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn our_netns() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Mount points under the state dir (the agents' bpffs), deepest first.
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

fn netns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Removes everything of the sandbox: processes (by pid file and by namespace), pod, node,
/// control-plane and fabric namespaces, pinned BPF dirs, the state dir.
pub fn down(verbose: bool) -> Result<()> {
    let _g = TEARDOWN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = PathBuf::from(STATE_DIR);
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    // The relay is in the root namespace: find it by pid file, check it is ours.
    if let Some(p) = read_pid(&dir, "relay").filter(|p| cmdline(*p).contains("lb-sandbox") && *p != me) {
        // SAFETY: kill(2) on a pid whose command line is our relay.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let namespaces = our_netns();
    // The kubelet first, so it stops making pods while we remove them.
    if let Some(p) = read_pid(&dir, "kubelet").filter(|p| cmdline(*p).contains("lb-sandbox") && *p != me) {
        // SAFETY: as above, our kubelet.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    // Everything else of ours runs inside our namespaces; SIGTERM (agents, apiserver
    // clean up), then SIGKILL what is left.
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let pids: Vec<i32> = namespaces.iter().flat_map(|n| netns_pids(n)).filter(|p| *p != me && *p > 1).collect();
        if pids.is_empty() {
            break;
        }
        if verbose && sig == libc::SIGTERM {
            eprintln!("stopping {} processes in {} sandbox namespaces", pids.len(), namespaces.len());
        }
        for p in &pids {
            // SAFETY: kill(2) on processes inside namespaces named lbsb-*, which only the
            // sandbox creates.
            unsafe { libc::kill(*p, sig) };
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) && namespaces.iter().any(|n| !netns_pids(n).is_empty()) {
            sleep(Duration::from_millis(50));
        }
    }
    // Stragglers outside any named namespace (e.g. pods of a kubelet that crashed after
    // their namespace was deleted): processes running our lb-sandbox binary itself.
    if let Ok(ours) = target_dir().map(|t| t.join("debug/lb-sandbox")).and_then(|p| Ok(fs::canonicalize(p)?)) {
        for pid in fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        {
            let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            let exe = exe.to_string_lossy();
            if pid != me && exe.trim_end_matches(" (deleted)") == ours.to_string_lossy() {
                // SAFETY: kill(2) on a process running the sandbox's own binary.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let kdir = dir.join("kube");
    if kdir.exists() {
        kube::down(&kdir).context("stopping the control plane")?;
    }
    // Pods first, then nodes (their pod veth peers are gone by then), cp, fabric.
    let mut ordered = namespaces.clone();
    ordered.sort_by_key(|n| (!n.starts_with("lbsb-pod-"), n == FABRIC_NS, n.clone()));
    for ns in &ordered {
        if let Err(e) = ip(&["netns", "del", ns])
            && Path::new("/run/netns").join(ns).exists()
        {
            return Err(e);
        }
    }
    // Unmounting a node's bpffs drops its pins (maps and links) with it.
    for m in our_mounts() {
        let c = std::ffi::CString::new(m.clone()).context("mount path")?;
        // SAFETY: umount2 on a path under our state dir, from /proc/self/mountinfo.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            bail!("cannot unmount {m}: {}", std::io::Error::last_os_error());
        }
    }
    if dir.exists() {
        if !dir.join(MARKER).exists() {
            bail!("{STATE_DIR} exists but is not a sandbox state dir (no {MARKER}); remove it yourself");
        }
        fs::remove_dir_all(&dir).with_context(|| format!("removing {STATE_DIR}"))?;
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
    for name in ["relay", "kubelet"] {
        println!("{name}: {}", if pid_alive(&dir, name) { "running" } else { "not running" });
    }
    let sb = Sandbox::open()?;
    for i in 1..=sb.nodes {
        let n = format!("agent-{}", node_ns(i));
        println!(
            "{n}: {}",
            if !sb.agents {
                "not started (--no-agent)"
            } else if pid_alive(&dir, &n) {
                "running"
            } else {
                "not running"
            }
        );
    }
    print!("{}", kube::status(&dir.join("kube"))?);
    println!("export KUBECONFIG={}", sb.kubeconfig.display());
    match sb.kubectl(&["get", "nodes,pods", "-o", "wide"]) {
        Ok(o) => print!("{o}"),
        Err(e) => println!("kubectl: {e:#}"),
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
        let agents = lines.next().is_none_or(|l| l.trim() == "true");
        let bins = kube::cached().context("kube binaries missing; try `cargo xtask kube build`")?;
        Ok(Sandbox {
            kubeconfig: dir.join("kubeconfig"),
            kubectl: bins.kubectl,
            lb: target_dir()?.join("debug/lb"),
            dir,
            nodes: n,
            agents,
        })
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
        use std::io::Write as _;
        let mut child = self
            .kubectl_cmd()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run kubectl")?;
        child.stdin.take().context("kubectl stdin")?.write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl apply failed: {}\n{yaml}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The kubelet's record of a running pod (netns, IP, env).
    pub fn pod_record(&self, ns: &str, pod: &str) -> Result<serde_json::Value> {
        let f = self.dir.join("pods").join(format!("{ns}_{pod}.json"));
        let text = fs::read_to_string(&f)
            .with_context(|| format!("pod {ns}/{pod} is not running in the sandbox (no {})", f.display()))?;
        serde_json::from_str(&text).with_context(|| format!("bad {}", f.display()))
    }

    /// A command that runs `cmd` in the pod's namespace with the pod's environment.
    pub fn exec_cmd(&self, ns: &str, pod: &str, cmd: &[String]) -> Result<Command> {
        let rec = self.pod_record(ns, pod)?;
        let netns = rec["netns"].as_str().context("pod record without netns")?;
        let Some((prog, args)) = cmd.split_first() else { bail!("exec needs a command after --") };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns]).arg(prog).args(args).env_clear();
        for kv in rec["env"].as_array().into_iter().flatten() {
            if let (Some(k), Some(v)) = (kv[0].as_str(), kv[1].as_str()) {
                c.env(k, v);
            }
        }
        Ok(c)
    }

    pub fn exec_status(&self, ns: &str, pod: &str, cmd: &[String]) -> Result<i32> {
        let st = self.exec_cmd(ns, pod, cmd)?.status().context("cannot run ip netns exec")?;
        Ok(st.code().unwrap_or(128))
    }

    /// Runs `cmd` in the pod; (exit code, stdout, stderr).
    pub fn exec(&self, ns: &str, pod: &str, cmd: &[&str]) -> Result<(i32, String, String)> {
        let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        let out = self.exec_cmd(ns, pod, &cmd)?.stdin(Stdio::null()).output().context("cannot run ip netns exec")?;
        Ok((
            out.status.code().unwrap_or(128),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Kills node `i`'s `lb agent` with SIGKILL (as a crash would) and waits until it is gone.
    /// Its pinned maps and attached programs stay.
    pub fn kill_agent(&self, i: u8) -> Result<()> {
        let name = format!("agent-{}", node_ns(i));
        let pid = read_pid(&self.dir, &name)
            .filter(|_| pid_alive(&self.dir, &name))
            .with_context(|| format!("{name} is not running"))?;
        // SAFETY: kill(2) on the pid of our agent (pid file, command line checked by pid_alive).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_for(&format!("{name} to die"), Duration::from_secs(10), || Ok(!pid_alive(&self.dir, &name)))
    }

    /// Starts node `i`'s `lb agent` the way `up` does (default hooks) and waits until it is ready.
    pub fn start_agent(&self, i: u8) -> Result<()> {
        let cluster = kube::Cluster::open(&self.dir.join("kube"))?;
        start_agent(&self.dir, &cluster.kubeconfig, &self.lb, i, &UpArgs::default())?;
        wait_agent_ready(&self.dir, i)
    }

    /// `lb ARGS` against node `i`'s pinned maps.
    pub fn lb_on_node(&self, i: u8, args: &[&str]) -> Result<String> {
        let ns = node_ns(i);
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(&self.lb)
            .arg("--bpffs")
            .arg(format!("{BPFFS}/{ns}"))
            .arg("--status-file")
            .arg(self.dir.join(&ns).join("status.json"))
            .args(args)
            .output()
            .context("cannot run lb")?;
        if !out.status.success() {
            bail!("lb {} on {ns} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
