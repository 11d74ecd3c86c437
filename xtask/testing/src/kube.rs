//! A bare Kubernetes control plane for the agent's tests and benchmark: `xtask kube
//! up` (etcd and kube-apiserver 1.20.2 on 127.0.0.1, no controllers), taken down on
//! drop. Skipped, with a message ([`require_kube!`]), when the Kubernetes binaries have
//! not been built (`cargo xtask kube build`); CI builds them.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{sys::signal, unistd::Pid};

pub fn kube_bin_dir() -> PathBuf {
    let cache =
        std::env::var_os("LB_KUBE_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/cache/lb/kube-1.20.2".into());
    cache.join("bin")
}

pub fn binaries_built() -> bool {
    ["etcd", "kube-apiserver", "kubectl"].iter().all(|b| kube_bin_dir().join(b).is_file())
}

#[macro_export]
macro_rules! require_kube {
    () => {
        if !$crate::kube::binaries_built() {
            eprintln!(
                "SKIPPED: Kubernetes binaries not found in {}; run `cargo xtask kube build` (about 5 min) to enable this test",
                $crate::kube::kube_bin_dir().display()
            );
            return Ok(());
        }
    };
}

/// The xtask binary (built by `cargo xtask ...`), or `cargo run -p xtask`.
pub fn xtask() -> Command {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let bin = std::env::var_os("LB_XTASK").map(PathBuf::from).unwrap_or_else(|| target.join("debug/xtask"));
    if bin.is_file() {
        Command::new(bin)
    } else {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.current_dir(root).args(["run", "--quiet", "--package", "xtask", "--"]);
        c
    }
}

/// A control plane from `xtask kube up`, taken down on drop.
pub struct Cluster {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Cluster {
    pub fn up(name: &str, port: u16, v1_crd: bool) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("lb-kube-{name}-{}", std::process::id()));
        let mut c = xtask();
        c.args(["kube", "up", "--no-controllers", "--port", &port.to_string(), "--dir"]).arg(&dir);
        if v1_crd {
            c.arg("--v1-crd");
        }
        let out = c.output().context("running `xtask kube up`")?;
        if !out.status.success() {
            bail!(
                "xtask kube up failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self { kubeconfig: dir.join("kubeconfig"), dir })
    }

    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut c = Command::new(kube_bin_dir().join("kubectl"));
        c.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().context("running kubectl")?;
        if let (Some(text), Some(mut si)) = (stdin, child.stdin.take()) {
            si.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn apply(&self, yaml: &str) -> Result<()> {
        self.kubectl(&["apply", "-f", "-"], Some(yaml)).map(drop)
    }

    /// Stops kube-apiserver (SIGTERM, SIGKILL after 2 s, as `xtask kube` does), runs
    /// `while_down`, then starts it again with the same command line and waits for it.
    pub fn restart_apiserver(&self, while_down: impl FnOnce() -> Result<()>) -> Result<()> {
        let pid_file = self.dir.join("kube-apiserver.pid");
        let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
        let cmdline: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))?
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        // The API server process of our own test cluster.
        let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() {
            if t0.elapsed() > Duration::from_secs(2) {
                let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        while_down()?;
        let log = std::fs::OpenOptions::new().append(true).open(self.dir.join("kube-apiserver.log"))?;
        let st = Command::new("setsid")
            .args(["-f", "sh", "-c", "echo $$ > \"$0\"; exec \"$@\""])
            .arg(&pid_file)
            .args(&cmdline)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()?;
        if !st.success() {
            bail!("restarting kube-apiserver failed");
        }
        let t0 = Instant::now();
        while self.kubectl(&["get", "--raw", "/readyz"], None).is_err() {
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("kube-apiserver not ready after restart");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = xtask().args(["kube", "down", "--dir"]).arg(&self.dir).output();
    }
}

/// A TCP forwarder from `127.0.0.1:port` inside a network namespace (a node's) to the
/// same port on the root namespace's loopback, where [`Cluster`] runs the API server:
/// an agent in the node reaches the API server through it with the cluster's own
/// kubeconfig, and nothing is added to either namespace's routes.
///
/// [`ApiGate::cut`] takes the API server away from that node only: live connections
/// are shut down and new ones refused (the listener is closed), while the API server
/// itself keeps serving `kubectl` in the root namespace, so that changes made
/// meanwhile are the agent's to catch up on. [`ApiGate::restore`] listens again.
/// Stopped on drop.
pub struct ApiGate {
    port: u16,
    shared: std::sync::Arc<GateShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct GateShared {
    listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    /// Both ends of every forwarded connection, to shut down on a cut.
    conns: std::sync::Mutex<Vec<std::net::TcpStream>>,
    stop: std::sync::atomic::AtomicBool,
    /// Connections forwarded so far.
    accepted: std::sync::atomic::AtomicU64,
}

impl ApiGate {
    /// Forwards `127.0.0.1:port` in `ns`.
    pub fn new(ns: &crate::netns::Netns, port: u16) -> Result<Self> {
        let shared = std::sync::Arc::new(GateShared::default());
        let mut gate = Self { port, shared: shared.clone(), thread: None };
        gate.restore(ns)?;
        gate.thread = Some(std::thread::spawn(move || gate_accept(&shared, port)));
        Ok(gate)
    }

    /// The API server is away for the node from now on: established connections are
    /// shut down both ways, new ones refused.
    pub fn cut(&self) {
        drop(self.shared.listener.lock().map(|mut l| l.take()));
        if let Ok(mut conns) = self.shared.conns.lock() {
            for c in conns.drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Listens again (also the first time).
    pub fn restore(&self, ns: &crate::netns::Netns) -> Result<()> {
        let port = self.port;
        let l = ns.run(|| {
            let l = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port))
                .with_context(|| format!("the API gate's listener on 127.0.0.1:{port} in the node"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        *self.shared.listener.lock().map_err(|_| anyhow::anyhow!("gate lock poisoned"))? = Some(l);
        Ok(())
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for ApiGate {
    fn drop(&mut self) {
        self.shared.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.cut();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn gate_accept(shared: &std::sync::Arc<GateShared>, port: u16) {
    use std::sync::atomic::Ordering;
    while !shared.stop.load(Ordering::Relaxed) {
        let accepted = shared.listener.lock().ok().and_then(|l| l.as_ref().and_then(|l| l.accept().ok()));
        let Some((inner, _)) = accepted else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        std::thread::spawn(move || {
            let _ = inner.set_nonblocking(false);
            // The connection out is made by a thread of the root namespace.
            let Ok(outer) = std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)) else { return };
            let (Ok(mut a), Ok(mut b), Ok(i2), Ok(o2)) =
                (inner.try_clone(), outer.try_clone(), inner.try_clone(), outer.try_clone())
            else {
                return;
            };
            if let Ok(mut conns) = shared.conns.lock() {
                conns.retain(|c| c.peer_addr().is_ok());
                conns.push(i2);
                conns.push(o2);
            }
            let up = std::thread::spawn(move || {
                let _ = std::io::copy(&mut a, &mut b);
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
            let (mut inner, mut outer) = (inner, outer);
            let _ = std::io::copy(&mut outer, &mut inner);
            let _ = inner.shutdown(std::net::Shutdown::Write);
            let _ = up.join();
        });
    }
}
