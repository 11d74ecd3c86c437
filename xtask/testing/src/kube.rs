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
