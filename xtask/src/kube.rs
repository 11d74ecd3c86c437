//! `cargo xtask kube build|up|down|status`: a real Kubernetes 1.20.2 control plane
//! (etcd, kube-apiserver, kube-controller-manager, kubectl) built from Debian bookworm's own
//! packages, offline, for integration tests of the load balancer.
//!
//! Follows the worked example in /work/shared/recipes (README.md, build-kube-apiserver.sh,
//! start-apiserver.sh, stop-apiserver.sh).
//!
//! * Binaries are cached outside the repository in [`DEFAULT_CACHE_DIR`] (override with
//!   `LB_KUBE_CACHE`), built by `xtask/scripts/kube-build.sh` (embedded in this binary).
//! * `up` runs everything on 127.0.0.1 (or on `--bind` inside `--netns`), as detached
//!   processes with logs and pid files in the state dir. Ports used: `port` (kube-apiserver),
//!   `port+1..=port+3` (etcd client, peer, metrics), `port+4` (kube-controller-manager),
//!   `port+5` (kube-scheduler, with real nodes).
//! * Nothing is added to the root network namespace; all traffic is loopback (or inside the
//!   given namespace). Proxy environment variables are removed from every child.

#![allow(dead_code)] // library-style API for other xtask code and tests; not all of it is used by `run`.

use anyhow::{Context, Result, anyhow, bail};
use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub const KUBE_VERSION: &str = "1.20.2";
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/lb/kube-1.20.2";
pub const DEFAULT_DIR: &str = "/tmp/lb-kube";
pub const DEFAULT_PORT: u16 = 16443;
/// EndpointSlice `serving`/`terminating` conditions (KEP-1672), alpha in 1.20: without
/// them a terminating endpoint simply vanishes from its slice, and the proxy cannot fall
/// back to serving-terminating endpoints (KEP-1669) as a real 1.22+ cluster lets it.
const FEATURE_GATES: &str = "--feature-gates=EndpointSliceTerminatingCondition=true";
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Name of the stand-in CRD installed by `up --v1-crd`.
pub const V1_CRD_NAME: &str = "endpointslices.discovery.k8s.io";

const BUILD_SCRIPT: &str = include_str!("../scripts/kube-build.sh");
/// CRD stand-in for discovery.k8s.io/v1 EndpointSlice (from the recipe; project-owned copy).
pub const V1_CRD_JSON: &str = include_str!("../scripts/kube-endpointslice-v1-crd.json");

const MARKER: &str = ".lb-kube";
const STATE_FILE: &str = "state.json";
const COMPONENTS: [&str; 4] = ["kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"];
pub const PROXY_VARS: [&str; 8] =
    ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"];
const READY_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(clap::Subcommand, Debug)]
pub enum KubeCmd {
    /// Build (or reuse cached) etcd, kube-apiserver, kube-controller-manager, kubectl binaries.
    Build,
    /// Start etcd + kube-apiserver (+ controller-manager unless --no-controllers) on 127.0.0.1, print `export KUBECONFIG=...`.
    Up {
        /// State dir (logs, pids, certs, kubeconfig). A previous instance there is removed first.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// kube-apiserver port; etcd uses port+1..port+3, kube-controller-manager port+4.
        #[arg(long, default_value_t = DEFAULT_PORT)]
        port: u16,
        /// Disable discovery.k8s.io/v1beta1 and install the v1 EndpointSlice CRD stand-in.
        #[arg(long)]
        v1_crd: bool,
        /// Do not start kube-controller-manager.
        #[arg(long)]
        no_controllers: bool,
        /// Run everything inside this existing network namespace (`ip netns exec NAME`).
        #[arg(long)]
        netns: Option<String>,
        /// Address to listen on (must exist in --netns if given).
        #[arg(long, default_value_t = Ipv4Addr::LOCALHOST)]
        bind: Ipv4Addr,
    },
    /// Stop everything `up` started and remove its state dir.
    Down {
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Print whether it is up (exit status 1 if not).
    Status {
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
}

pub fn run(cmd: KubeCmd) -> Result<()> {
    match cmd {
        KubeCmd::Build => {
            if let Some(b) = cached() {
                println!("kube {KUBE_VERSION} binaries already built in {} (cached; nothing to do)", b.dir.display());
                return Ok(());
            }
            let b = ensure_built()?;
            println!("kube {KUBE_VERSION} binaries in {}", b.dir.display());
            Ok(())
        }
        KubeCmd::Up { dir, port, v1_crd, no_controllers, netns, bind } => {
            let opts = UpOpts { dir, port, v1_crd, controllers: !no_controllers, netns, bind, nodes: false };
            let c = up(&opts)?;
            eprintln!("kube-apiserver ready at {} (state dir {})", c.server, c.dir.display());
            if let Some(ns) = &c.netns {
                eprintln!("note: it listens inside netns {ns}; run clients with `ip netns exec {ns} ...`");
            }
            println!("export KUBECONFIG={}", c.kubeconfig.display());
            Ok(())
        }
        KubeCmd::Down { dir } => {
            down(&dir)?;
            eprintln!("lb-kube at {} is down", dir.display());
            Ok(())
        }
        KubeCmd::Status { dir } => {
            let st = status(&dir)?;
            print!("{st}");
            if st.ready { Ok(()) } else { bail!("lb-kube at {} is not up", dir.display()) }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Binaries {
    pub dir: PathBuf,
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kubectl: PathBuf,
    /// The node side, for the sandbox's real nodes and the peer.
    pub kubelet: PathBuf,
    pub kube_proxy: PathBuf,
    /// Upstream's e2e test binary (`cargo xtask test upstream`).
    pub e2e_test: PathBuf,
}

impl Binaries {
    fn in_dir(dir: PathBuf) -> Self {
        Binaries {
            etcd: dir.join("etcd"),
            kube_apiserver: dir.join("kube-apiserver"),
            kube_controller_manager: dir.join("kube-controller-manager"),
            kube_scheduler: dir.join("kube-scheduler"),
            kubectl: dir.join("kubectl"),
            kubelet: dir.join("kubelet"),
            kube_proxy: dir.join("kube-proxy"),
            e2e_test: dir.join("e2e.test"),
            dir,
        }
    }
    fn complete(&self) -> bool {
        [
            &self.etcd,
            &self.kube_apiserver,
            &self.kube_controller_manager,
            &self.kube_scheduler,
            &self.kubectl,
            &self.kubelet,
            &self.kube_proxy,
            &self.e2e_test,
            &self.dir.join("agnhost"),
            &self.dir.join("pause"),
        ]
        .iter()
        .all(|p| p.is_file())
            && self.dir.join(".complete").is_file()
    }
}

/// The binary cache: `$LB_KUBE_CACHE` or [`DEFAULT_CACHE_DIR`].
pub fn cache_dir() -> PathBuf {
    std::env::var_os("LB_KUBE_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR))
}

/// The cached binaries, if a complete build is present.
pub fn cached() -> Option<Binaries> {
    let b = Binaries::in_dir(cache_dir().join("bin"));
    b.complete().then_some(b)
}

/// Returns the cached binaries, building them first (about 5 minutes) if needed.
pub fn ensure_built() -> Result<Binaries> {
    if let Some(b) = cached() {
        return Ok(b);
    }
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| {
        format!("cannot create {}: run as root, or set LB_KUBE_CACHE to a writable dir", cache.display())
    })?;
    eprintln!("building kube {KUBE_VERSION} from Debian packages into {} (about 5 minutes cold)", cache.display());
    let t0 = Instant::now();
    let st = Command::new("bash")
        .arg("-c")
        .arg(BUILD_SCRIPT)
        .arg("kube-build.sh")
        .arg(&cache)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .context("cannot run bash for the kube build script; is bash installed?")?;
    let log = cache.join("build.log");
    if !st.success() {
        bail!(
            "kube build failed ({st}); full log: {}\n--- tail of build log ---\n{}\n\
             try: check network access to the Debian mirror in /etc/apt/sources.list.d/debian.sources, \
             then rerun `cargo xtask kube build`",
            log.display(),
            tail_file(&log, 40)
        );
    }
    let b = cached().ok_or_else(|| {
        anyhow!("kube build finished but {} is incomplete; see {}", cache.join("bin").display(), log.display())
    })?;
    eprintln!("kube binaries ready in {:.0?}", t0.elapsed());
    Ok(b)
}

// ---------------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct UpOpts {
    /// State dir; removed and recreated by `up` (must be empty or a previous lb-kube dir).
    pub dir: PathBuf,
    /// kube-apiserver port; etcd uses port+1..=port+3, kube-controller-manager port+4.
    pub port: u16,
    /// Start with `--runtime-config=discovery.k8s.io/v1beta1=false` and install the v1 CRD stand-in.
    pub v1_crd: bool,
    /// Start kube-controller-manager.
    pub controllers: bool,
    /// Run inside this existing network namespace (`ip netns exec NAME ...`).
    pub netns: Option<String>,
    /// Listen address (127.0.0.1 by default; inside `netns` if set).
    pub bind: Ipv4Addr,
    /// A cluster for real nodes (the sandbox): kube-scheduler, the full default controller
    /// set, and the API server's lease endpoint reconciler, so that the `kubernetes`
    /// Service has the API server's address as its endpoint. Needs a routable `bind`.
    pub nodes: bool,
}

impl Default for UpOpts {
    fn default() -> Self {
        UpOpts {
            dir: PathBuf::from(DEFAULT_DIR),
            port: DEFAULT_PORT,
            v1_crd: false,
            controllers: true,
            netns: None,
            bind: Ipv4Addr::LOCALHOST,
            nodes: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Cluster {
    /// Absolute state dir.
    pub dir: PathBuf,
    /// Kubeconfig (token auth, CA pinned).
    pub kubeconfig: PathBuf,
    /// `https://BIND:PORT`.
    pub server: String,
    /// Bearer token of `admin` (group system:masters).
    pub token: String,
    /// CA that signed the apiserver's serving cert.
    pub ca_file: PathBuf,
    pub netns: Option<String>,
    pub bins: Binaries,
    pub opts: UpOpts,
}

/// Starts a fresh control plane (removing a stale one in the same dir first).
pub fn up(opts: &UpOpts) -> Result<Cluster> {
    let bins = ensure_built()?;
    if opts.port > u16::MAX - 5 || opts.port == 0 {
        bail!("--port {} leaves no room for port+1..port+5; try --port {DEFAULT_PORT}", opts.port);
    }
    match &opts.netns {
        Some(ns) => check_netns(ns, opts.bind)?,
        // Root namespace: loopback only, never a routable address.
        None if !opts.bind.is_loopback() => {
            bail!("--bind {} without --netns: the root namespace is loopback-only; try --bind 127.0.0.1", opts.bind)
        }
        None => {}
    }
    down(&opts.dir)
        .context("cannot remove the previous instance; try `cargo xtask kube down --dir ...` or another --dir")?;
    if opts.netns.is_none() {
        check_ports(opts.bind, opts.port)?;
    }
    let dir = create_dir(&opts.dir)?;
    let mut opts = opts.clone();
    opts.dir = dir.clone();
    let c = Cluster {
        kubeconfig: dir.join("kubeconfig"),
        server: format!("https://{}:{}", opts.bind, opts.port),
        token: random_hex(16)?,
        ca_file: dir.join("certs/ca.crt"),
        netns: opts.netns.clone(),
        bins,
        dir,
        opts,
    };
    let t0 = Instant::now();
    if let Err(e) = c.start_all() {
        let _ = kill_instance(&c.dir);
        return Err(e.context(format!("lb-kube up failed; processes stopped, logs kept in {}", c.dir.display())));
    }
    eprintln!("lb-kube up in {:.1?}", t0.elapsed());
    Ok(c)
}

/// Stops everything started in `dir` (by pid file and by command line) and removes `dir`.
pub fn down(dir: &Path) -> Result<()> {
    let dir = abs(dir)?;
    kill_instance(&dir)?;
    if dir.exists() {
        if !dir.join(MARKER).exists() && !is_empty_dir(&dir) {
            bail!("{} is not an lb-kube state dir (no {MARKER}); refusing to delete it", dir.display());
        }
        fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Status {
    pub dir: PathBuf,
    /// `/readyz` answered 200.
    pub ready: bool,
    pub server: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    /// (component, pid, alive)
    pub processes: Vec<(String, Option<u32>, bool)>,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.ready { "up" } else { "down" };
        writeln!(f, "lb-kube at {}: {state}", self.dir.display())?;
        if let Some(s) = &self.server {
            writeln!(f, "  server {s} ({})", if self.ready { "readyz 200" } else { "not ready" })?;
        }
        for (name, pid, alive) in &self.processes {
            match pid {
                Some(p) => writeln!(f, "  {name}: pid {p} {}", if *alive { "running" } else { "not running" })?,
                None => writeln!(f, "  {name}: not started")?,
            }
        }
        if let (true, Some(k)) = (self.ready, &self.kubeconfig) {
            writeln!(f, "export KUBECONFIG={}", k.display())?;
        }
        Ok(())
    }
}

pub fn status(dir: &Path) -> Result<Status> {
    let dir = abs(dir)?;
    let mut st = Status { dir: dir.clone(), ready: false, server: None, kubeconfig: None, processes: vec![] };
    let running = find_instance(&dir, None);
    for name in COMPONENTS.iter().rev() {
        let pid = read_pid(&dir, name)
            .filter(|p| running.contains(p))
            .or_else(|| running.iter().copied().find(|p| component_of(*p) == Some(name)))
            .or_else(|| read_pid(&dir, name));
        let alive = pid.is_some_and(|p| running.contains(&p));
        st.processes.push((name.to_string(), pid, alive));
    }
    if let Ok(c) = Cluster::open(&dir) {
        st.ready = c.readyz() == Some(200);
        st.server = Some(c.server.clone());
        st.kubeconfig = Some(c.kubeconfig.clone());
    }
    Ok(st)
}

impl Cluster {
    /// Re-opens a cluster started (possibly by another process) in `dir`.
    pub fn open(dir: &Path) -> Result<Cluster> {
        let dir = abs(dir)?;
        let path = dir.join(STATE_FILE);
        let text = fs::read_to_string(&path).with_context(|| {
            format!("no lb-kube instance in {} (missing {STATE_FILE}); try `cargo xtask kube up`", dir.display())
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("bad {}", path.display()))?;
        let s = |k: &str| v[k].as_str().map(str::to_owned).ok_or_else(|| anyhow!("{}: missing {k}", path.display()));
        let opts = UpOpts {
            dir: dir.clone(),
            port: v["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| anyhow!("{}: bad port", path.display()))?,
            v1_crd: v["v1_crd"].as_bool().unwrap_or(false),
            controllers: v["controllers"].as_bool().unwrap_or(true),
            netns: v["netns"].as_str().map(str::to_owned),
            bind: s("bind")?.parse().with_context(|| format!("{}: bad bind", path.display()))?,
            nodes: v["nodes"].as_bool().unwrap_or(false),
        };
        Ok(Cluster {
            kubeconfig: PathBuf::from(s("kubeconfig")?),
            server: s("server")?,
            token: s("token")?,
            ca_file: PathBuf::from(s("ca_file")?),
            netns: opts.netns.clone(),
            bins: Binaries::in_dir(PathBuf::from(s("bin_dir")?)),
            dir,
            opts,
        })
    }

    /// A `kubectl --kubeconfig=...` command (wrapped in `ip netns exec` if needed).
    pub fn kubectl(&self) -> Command {
        let mut c = self.ns_command(&self.bins.kubectl);
        c.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        c
    }

    /// Runs kubectl with `args`, returning stdout; errors carry stderr.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl().args(args).output().context("cannot run kubectl")?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops and restarts kube-apiserver only (etcd and controllers keep running), waits for /readyz.
    pub fn restart_apiserver(&self) -> Result<()> {
        self.stop_apiserver()?;
        self.start_apiserver()
    }

    /// Stops kube-apiserver only (SIGTERM, SIGKILL after 2 s).
    pub fn stop_apiserver(&self) -> Result<()> {
        let pids = find_instance(&self.dir, Some("kube-apiserver"));
        terminate(&pids, &self.dir, Duration::from_secs(2));
        if !find_instance(&self.dir, Some("kube-apiserver")).is_empty() {
            bail!("kube-apiserver of {} survived SIGKILL", self.dir.display());
        }
        let _ = fs::remove_file(self.dir.join("kube-apiserver.pid"));
        Ok(())
    }

    /// Starts kube-apiserver (if not running) and waits for /readyz == 200.
    pub fn start_apiserver(&self) -> Result<()> {
        let running = read_pid(&self.dir, "kube-apiserver").is_some_and(|p| is_ours(p, &self.dir));
        if !running {
            self.spawn("kube-apiserver", &self.bins.kube_apiserver, &self.apiserver_args())?;
        }
        self.wait_ready(READY_TIMEOUT)
    }

    /// Stops everything and removes the state dir.
    pub fn down(&self) -> Result<()> {
        down(&self.dir)
    }

    /// HTTP status of GET /readyz, None if unreachable.
    pub fn readyz(&self) -> Option<u16> {
        self.curl_code("/readyz")
    }

    /// Polls /readyz until 200; on timeout or apiserver exit, errors with the log tail.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        let log = self.dir.join("kube-apiserver.log");
        loop {
            let code = self.readyz();
            if code == Some(200) {
                return Ok(());
            }
            let alive = read_pid(&self.dir, "kube-apiserver").is_some_and(|p| is_ours(p, &self.dir));
            if !alive || t0.elapsed() > timeout {
                let why = if alive {
                    format!("not ready after {timeout:?} (last /readyz: {code:?})")
                } else {
                    "exited".into()
                };
                bail!(
                    "kube-apiserver {why}; log {}\n--- tail of kube-apiserver.log ---\n{}\n--- tail of etcd.log ---\n{}",
                    log.display(),
                    tail_file(&log, 30),
                    tail_file(&self.dir.join("etcd.log"), 10)
                );
            }
            sleep(Duration::from_millis(200));
        }
    }

    // ----- internals -----

    fn etcd_port(&self) -> u16 {
        self.opts.port + 1
    }

    fn start_all(&self) -> Result<()> {
        let d = &self.dir;
        let certs = d.join("certs");
        fs::create_dir_all(&certs)?;
        fs::create_dir_all(d.join("cm-certs"))?;
        run_ok(
            Command::new("openssl").args(["genrsa", "-out"]).arg(certs.join("sa.key")).arg("2048"),
            "openssl genrsa (is openssl installed?)",
        )?;
        run_ok(
            Command::new("openssl")
                .args(["rsa", "-pubout", "-in"])
                .arg(certs.join("sa.key"))
                .arg("-out")
                .arg(certs.join("sa.pub")),
            "openssl rsa -pubout",
        )?;
        fs::write(certs.join("tokens.csv"), format!("{},admin,admin,system:masters\n", self.token))?;
        self.make_serving_cert(&certs)?;
        self.write_state()?;

        eprintln!("starting etcd on {}:{}...", self.opts.bind, self.etcd_port());
        self.spawn("etcd", &self.bins.etcd, &self.etcd_args())?;
        eprintln!("starting kube-apiserver on {}...", self.server);
        self.spawn("kube-apiserver", &self.bins.kube_apiserver, &self.apiserver_args())?;
        self.wait_ready(READY_TIMEOUT)?;
        fs::write(&self.kubeconfig, self.kubeconfig_yaml())?;

        if self.opts.v1_crd {
            eprintln!("installing the discovery.k8s.io/v1 EndpointSlice CRD stand-in...");
            let f = d.join("endpointslice-v1-crd.json");
            fs::write(&f, V1_CRD_JSON)?;
            self.kubectl_output(&["apply", "-f", &f.to_string_lossy()])?;
            self.kubectl_output(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{V1_CRD_NAME}"),
            ])?;
            self.wait_code("/apis/discovery.k8s.io/v1/endpointslices", Duration::from_secs(60))
                .context("discovery.k8s.io/v1 endpointslices not served after installing the CRD")?;
        }
        if self.opts.controllers {
            eprintln!("starting kube-controller-manager...");
            self.spawn("kube-controller-manager", &self.bins.kube_controller_manager, &self.controller_manager_args())?;
            // Pods can only be created once the serviceaccount controller made `default`.
            self.wait_code("/api/v1/namespaces/default/serviceaccounts/default", Duration::from_secs(60))
                .with_context(|| {
                    format!(
                        "controller-manager did not create serviceaccount default; see {}\n{}",
                        d.join("kube-controller-manager.log").display(),
                        tail_file(&d.join("kube-controller-manager.log"), 20)
                    )
                })?;
        }
        if self.opts.nodes {
            eprintln!("starting kube-scheduler...");
            self.spawn("kube-scheduler", &self.bins.kube_scheduler, &self.scheduler_args())?;
        }
        Ok(())
    }

    fn scheduler_args(&self) -> Vec<String> {
        let k = self.kubeconfig.display();
        vec![
            format!("--kubeconfig={k}"),
            format!("--authentication-kubeconfig={k}"),
            format!("--authorization-kubeconfig={k}"),
            format!("--bind-address={}", self.opts.bind),
            format!("--secure-port={}", self.opts.port + 5),
            "--port=0".into(),
            format!("--cert-dir={}", self.dir.join("sched-certs").display()),
            "--leader-elect=false".into(),
        ]
    }

    /// A CA and the API server's serving certificate, for every name clients use: the
    /// bind address, the `kubernetes` Service's ClusterIP and DNS names, and 127.0.0.1
    /// (the sandbox's loopback relay; `e2e.test`'s client ignores `tls-server-name`).
    fn make_serving_cert(&self, certs: &Path) -> Result<()> {
        let p = |f: &str| certs.join(f).display().to_string();
        run_ok(
            Command::new("openssl").args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650"]).args([
                "-subj",
                "/CN=lb-kube-ca",
                "-keyout",
                &p("ca.key"),
                "-out",
                &p("ca.crt"),
            ]),
            "openssl req (CA)",
        )?;
        run_ok(
            Command::new("openssl")
                .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver"])
                .args(["-keyout", &p("apiserver.key"), "-out", &p("apiserver.csr")]),
            "openssl req (serving key)",
        )?;
        let service_ip = "10.96.0.1";
        fs::write(
            certs.join("apiserver.ext"),
            format!(
                "subjectAltName=IP:{},IP:{service_ip},IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,\
                 DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n\
                 extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
                self.opts.bind
            ),
        )?;
        run_ok(
            Command::new("openssl").args(["x509", "-req", "-days", "3650", "-CAcreateserial"]).args([
                "-in",
                &p("apiserver.csr"),
                "-CA",
                &p("ca.crt"),
                "-CAkey",
                &p("ca.key"),
                "-extfile",
                &p("apiserver.ext"),
                "-out",
                &p("apiserver.crt"),
            ]),
            "openssl x509 (serving cert)",
        )
    }

    fn wait_code(&self, path: &str, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let code = self.curl_code(path);
            if code == Some(200) {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                bail!("GET {path} still answers {code:?} after {timeout:?}");
            }
            sleep(Duration::from_millis(250));
        }
    }

    fn write_state(&self) -> Result<()> {
        let v = serde_json::json!({
            "server": self.server, "token": self.token, "kubeconfig": self.kubeconfig,
            "ca_file": self.ca_file, "port": self.opts.port, "bind": self.opts.bind.to_string(),
            "netns": self.opts.netns, "v1_crd": self.opts.v1_crd, "controllers": self.opts.controllers,
            "nodes": self.opts.nodes,
            "bin_dir": self.bins.dir,
        });
        fs::write(self.dir.join(STATE_FILE), serde_json::to_string_pretty(&v)?)?;
        Ok(())
    }

    fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lb-kube\n  cluster:\n    server: \"{}\"\n    certificate-authority: \"{}\"\n\
             users:\n- name: admin\n  user:\n    token: \"{}\"\ncontexts:\n- name: lb-kube\n  context:\n    cluster: lb-kube\n    user: admin\n    namespace: default\n\
             current-context: lb-kube\n",
            self.server,
            self.ca_file.display(),
            self.token
        )
    }

    fn etcd_args(&self) -> Vec<String> {
        let (b, p, d) = (self.opts.bind, self.etcd_port(), &self.dir);
        vec![
            "--name=lb-kube".into(),
            format!("--data-dir={}", d.join("etcd-data").display()),
            format!("--listen-client-urls=http://{b}:{p}"),
            format!("--advertise-client-urls=http://{b}:{p}"),
            format!("--listen-peer-urls=http://{b}:{}", p + 1),
            format!("--initial-advertise-peer-urls=http://{b}:{}", p + 1),
            format!("--initial-cluster=lb-kube=http://{b}:{}", p + 1),
            format!("--listen-metrics-urls=http://{b}:{}", p + 2),
        ]
    }

    fn apiserver_args(&self) -> Vec<String> {
        let (b, d) = (self.opts.bind, &self.dir);
        let c = d.join("certs");
        let mut a = vec![
            format!("--etcd-servers=http://{b}:{}", self.etcd_port()),
            format!("--bind-address={b}"),
            format!("--advertise-address={b}"),
            format!("--secure-port={}", self.opts.port),
            format!("--cert-dir={}", c.display()),
            format!("--tls-cert-file={}", c.join("apiserver.crt").display()),
            format!("--tls-private-key-file={}", c.join("apiserver.key").display()),
            format!("--token-auth-file={}", c.join("tokens.csv").display()),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", c.join("sa.pub").display()),
            format!("--service-account-signing-key-file={}", c.join("sa.key").display()),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            // The lease reconciler publishes --advertise-address as the endpoint of the
            // `kubernetes` Service; without nodes (and on loopback) there is nothing to publish.
            format!("--endpoint-reconciler-type={}", if self.opts.nodes { "lease" } else { "none" }),
            // exec, logs and port-forward reach kubelets by the address they register.
            "--kubelet-preferred-address-types=InternalIP".into(),
            // As kubeadm sets it: node agents such as lb's DaemonSet run privileged.
            "--allow-privileged=true".into(),
            FEATURE_GATES.into(),
        ];
        if self.opts.v1_crd {
            a.push("--runtime-config=discovery.k8s.io/v1beta1=false".into());
        }
        a
    }

    fn controller_manager_args(&self) -> Vec<String> {
        let (b, d) = (self.opts.bind, &self.dir);
        let k = self.kubeconfig.display();
        vec![
            format!("--kubeconfig={k}"),
            format!("--authentication-kubeconfig={k}"),
            format!("--authorization-kubeconfig={k}"),
            format!("--bind-address={b}"),
            format!("--secure-port={}", self.opts.port + 4),
            "--port=0".into(),
            format!("--cert-dir={}", d.join("cm-certs").display()),
            "--leader-elect=false".into(),
            if self.opts.nodes {
                // Everything kube-controller-manager runs by default (nodelifecycle lifts the
                // kubelet's not-ready taint; the e2e framework needs namespace, garbage
                // collection, daemonset, deployment, job, statefulset).
                "--controllers=*".into()
            } else {
                "--controllers=replicaset,endpoint,endpointslice,serviceaccount,serviceaccount-token".into()
            },
            format!("--service-account-private-key-file={}", d.join("certs/sa.key").display()),
            format!("--root-ca-file={}", self.ca_file.display()),
            // The default 20 writes/s would take 17 minutes to give `bench peers`' 10,000
            // Services their Endpoints and EndpointSlices; a large cluster's control
            // plane is tuned the same way.
            "--kube-api-qps=200".into(),
            "--kube-api-burst=400".into(),
            FEATURE_GATES.into(),
        ]
    }

    /// `bin` as a command, run via `ip netns exec NS` when a namespace is set; no proxy env.
    fn ns_command(&self, bin: &Path) -> Command {
        let mut c = match &self.netns {
            Some(ns) => lb_netns::command(ns, bin),
            None => Command::new(bin),
        };
        for v in PROXY_VARS {
            c.env_remove(v);
        }
        c
    }

    /// Starts `bin args` detached (own session, reparented to init), logging to DIR/NAME.log;
    /// the process itself writes DIR/NAME.pid before exec'ing.
    fn spawn(&self, name: &str, bin: &Path, args: &[String]) -> Result<u32> {
        let log_path = self.dir.join(format!("{name}.log"));
        let pid_path = self.dir.join(format!("{name}.pid"));
        let _ = fs::remove_file(&pid_path);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let inner = self.ns_command(bin);
        let mut c = Command::new("setsid");
        c.args(["-f", "sh", "-c", "echo $$ > \"$0\"; exec \"$@\""])
            .arg(&pid_path)
            .arg(inner.get_program())
            .args(inner.get_args())
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for v in PROXY_VARS {
            c.env_remove(v);
        }
        let st = c.status().with_context(|| format!("cannot start {name} via setsid (util-linux)"))?;
        if !st.success() {
            bail!("starting {name} failed ({st}); see {}", log_path.display());
        }
        let t0 = Instant::now();
        loop {
            if let Some(pid) = read_pid(&self.dir, name) {
                return Ok(pid);
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("{name} did not write {}; see {}", pid_path.display(), log_path.display());
            }
            sleep(Duration::from_millis(20));
        }
    }

    fn curl_code(&self, path: &str) -> Option<u16> {
        let mut c = self.ns_command(Path::new("curl"));
        c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", "--noproxy", "*", "-H"])
            .arg(format!("Authorization: Bearer {}", self.token));
        if self.ca_file.is_file() {
            c.arg("--cacert").arg(&self.ca_file);
        } else {
            c.arg("-k"); // before the CA has been extracted (first start only)
        }
        let out = c.arg(format!("{}{path}", self.server)).stderr(Stdio::null()).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok().filter(|c| *c != 0)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn check_netns(ns: &str, bind: Ipv4Addr) -> Result<()> {
    if ns.is_empty() || ns.contains('/') || !lb_netns::path(ns).exists() {
        bail!("network namespace {ns:?} not found in /run/netns; create it first (ip netns add {ns})");
    }
    lb_netns::ip(&["-n", ns, "link", "set", "lo", "up"]).context("ip link set lo up in the namespace")?;
    let out = Command::new("ip").args(["-n", ns, "-4", "-o", "addr", "show"]).output().context("cannot run ip")?;
    let addrs = String::from_utf8_lossy(&out.stdout);
    if !addrs.split_whitespace().any(|w| w.split('/').next() == Some(&bind.to_string())) {
        bail!("address {bind} is not configured in netns {ns}; pass --bind with one of its addresses");
    }
    Ok(())
}

/// Creates `dir` with its marker file and returns it absolute.
fn create_dir(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create state dir {}", dir.display()))?;
    let dir = fs::canonicalize(dir)?;
    fs::write(dir.join(MARKER), "lb-kube state dir; `cargo xtask kube down` removes it\n")?;
    Ok(dir)
}

/// All ports `up` needs (port..=port+4) must be free on `bind` (root namespace only).
fn check_ports(bind: Ipv4Addr, port: u16) -> Result<()> {
    for p in port..=port + 4 {
        if let Err(e) = TcpListener::bind((bind, p)) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                bail!(
                    "{bind}:{p} is in use (another lb-kube instance?); try `--port {}` or `cargo xtask kube down`",
                    port.saturating_add(10).min(u16::MAX - 4)
                );
            }
            bail!("cannot listen on {bind}:{p}: {e}; try `--bind 127.0.0.1`");
        }
    }
    Ok(())
}

fn abs(dir: &Path) -> Result<PathBuf> {
    if dir.as_os_str().is_empty() {
        bail!("empty --dir");
    }
    match fs::canonicalize(dir) {
        Ok(d) => Ok(d),
        Err(_) => std::path::absolute(dir).with_context(|| format!("bad path {}", dir.display())),
    }
}

fn is_empty_dir(dir: &Path) -> bool {
    fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(false)
}

fn read_pid(dir: &Path, name: &str) -> Option<u32> {
    fs::read_to_string(dir.join(format!("{name}.pid"))).ok()?.trim().parse().ok()
}

/// Live (non-zombie) process that is one of our components with `dir/` in its arguments.
fn is_ours(pid: u32, dir: &Path) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // state is the field after the parenthesised comm
    if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.trim_start())
        && (rest.starts_with('Z') || rest.starts_with('X'))
    {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
    let Some(argv0) = args.first() else {
        return false;
    };
    let base = argv0.rsplit('/').next().unwrap_or(argv0);
    let needle = format!("{}/", dir.display());
    COMPONENTS.contains(&base) && args.iter().skip(1).any(|a| a.contains(&needle))
}

/// Our component processes for `dir` (all, or only `only`): from pid files and a /proc scan.
fn find_instance(dir: &Path, only: Option<&str>) -> Vec<u32> {
    let mut pids: Vec<u32> = COMPONENTS.iter().filter_map(|n| read_pid(dir, n)).collect();
    if let Ok(rd) = fs::read_dir("/proc") {
        pids.extend(rd.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()));
    }
    let me = std::process::id();
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|p| *p != me && is_ours(*p, dir) && only.is_none_or(|n| component_of(*p) == Some(n)));
    pids
}

fn kill_instance(dir: &Path) -> Result<()> {
    let pids = find_instance(dir, None);
    terminate(&pids, dir, Duration::from_secs(5));
    let left = find_instance(dir, None);
    if !left.is_empty() {
        bail!("processes {left:?} of {} survived SIGKILL", dir.display());
    }
    for n in COMPONENTS {
        let _ = fs::remove_file(dir.join(format!("{n}.pid")));
    }
    Ok(())
}

fn component_of(pid: u32) -> Option<&'static str> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next()?).into_owned();
    let base = argv0.rsplit('/').next().unwrap_or(&argv0).to_owned();
    COMPONENTS.iter().copied().find(|c| *c == base)
}

/// SIGTERM, wait up to `grace`, then SIGKILL and wait up to 5 s. (A SIGTERMed kube-apiserver
/// waits up to a minute for open watches, so the grace periods are short.)
fn terminate(pids: &[u32], dir: &Path, grace: Duration) {
    use nix::sys::signal::Signal;
    for (sig, wait) in [(Signal::SIGTERM, grace), (Signal::SIGKILL, Duration::from_secs(5))] {
        let live: Vec<u32> = pids.iter().copied().filter(|p| is_ours(*p, dir)).collect();
        if live.is_empty() {
            return;
        }
        for p in &live {
            if let Ok(p) = i32::try_from(*p) {
                // A pid we verified runs one of our binaries for `dir`.
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
            }
        }
        let t0 = Instant::now();
        while t0.elapsed() < wait && live.iter().any(|p| is_ours(*p, dir)) {
            sleep(Duration::from_millis(50));
        }
    }
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn random_hex(n: usize) -> Result<String> {
    let mut buf = vec![0u8; n];
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).context("cannot read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn tail_file(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(b) => {
            let s = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
