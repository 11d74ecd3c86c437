//! A running `lb agent` process, as the agent's integration tests and `lb-dev bench
//! agent` drive it: started with its output in a log file, watched through its status
//! file (`--status-file`, what `lb status` reads) and its maps, killed on drop.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_userspace::agent::AgentStatus;
use nix::{sys::signal, unistd::Pid};

use crate::PrivateBpffs;

/// How often waits poll: the status file is small, and `lb-dev bench agent` measures
/// programming latency with it.
const POLL: Duration = Duration::from_millis(5);

/// Reads an agent's status file; None while it is missing or half-written.
pub fn read_status(path: &Path) -> Option<AgentStatus> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// A running `lb agent`, killed (SIGKILL) on drop.
pub struct AgentProcess {
    child: Mutex<Child>,
    log: PathBuf,
    status: PathBuf,
    /// Set by [`AgentProcess::private`]: the bpffs, log and status file it made, removed
    /// on drop.
    private: Option<PrivateBpffs>,
}

impl AgentProcess {
    /// Starts `cmd` (an `lb agent` command line, perhaps behind `ip netns exec`) with
    /// stdout and stderr appended to `log`; `status` is its `--status-file`. `LB_LOG`
    /// defaults to debug for the agent.
    pub fn spawn(mut cmd: Command, log: &Path, status: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        if !cmd.get_envs().any(|(k, _)| k == "LB_LOG") {
            cmd.env("LB_LOG", "info,lb_userspace=debug");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        Ok(Self { child: Mutex::new(child), log: log.into(), status: status.into(), private: None })
    }

    /// `LB ARGS` (the `lb` binary, `agent` and its flags) on a fresh private bpffs, with
    /// the log and status file in the temp dir named after `tag`; all removed on drop.
    pub fn private<S: AsRef<OsStr>>(lb: &Path, tag: &str, args: &[S], log_filter: &str) -> Result<Self> {
        let bpffs = PrivateBpffs::new()?;
        let base = std::env::temp_dir().join(format!("lb-agent-{tag}-{}", std::process::id()));
        let (status, log) = (base.with_extension("json"), base.with_extension("log"));
        let _ = std::fs::remove_file(&status);
        let _ = std::fs::remove_file(&log);
        let mut cmd = Command::new(lb);
        cmd.args(args).env("LB_BPFFS", bpffs.path()).env("LB_STATUS_FILE", &status).env("LB_LOG", log_filter);
        let mut agent = Self::spawn(cmd, &log, &status)?;
        agent.private = Some(bpffs);
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    /// The agent's bpffs, for one made by [`AgentProcess::private`].
    pub fn bpffs(&self) -> Option<&Path> {
        self.private.as_ref().map(PrivateBpffs::path)
    }

    pub fn status(&self) -> Option<AgentStatus> {
        read_status(&self.status)
    }

    /// Its `--status-file`, for `lb status`.
    pub fn status_path(&self) -> &Path {
        &self.status
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Frontend -> sorted backends in the private bpffs's maps ([`crate::backend_sets`]).
    pub fn programmed(&self) -> Vec<(String, Vec<String>)> {
        self.bpffs().map(crate::backend_sets).unwrap_or_default()
    }

    /// Polls `f` until it returns Some. Fails, with the agent's log, after `timeout` or
    /// as soon as the agent has exited.
    pub fn wait_for<T>(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
        let t0 = Instant::now();
        loop {
            if let Some(v) = f() {
                return Ok(v);
            }
            if let Some(st) = self.child.lock().unwrap_or_else(|e| e.into_inner()).try_wait()? {
                bail!("agent exited ({st}) while waiting for {what}; log {}:\n{}", self.log.display(), self.log_text());
            }
            if t0.elapsed() > timeout {
                bail!("timed out waiting for {what}; agent log {}:\n{}", self.log.display(), self.log_text());
            }
            std::thread::sleep(POLL);
        }
    }

    /// Polls the status file until `ok` holds for it ([`AgentProcess::wait_for`]).
    pub fn wait_status(&self, what: &str, timeout: Duration, ok: impl Fn(&AgentStatus) -> bool) -> Result<AgentStatus> {
        self.wait_for(what, timeout, || self.status().filter(|s| ok(s)))
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = c.kill();
        let _ = c.wait();
    }

    /// SIGTERM, then waits up to 10 s for a clean exit.
    pub fn term(&mut self) -> Result<()> {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let pid = Pid::from_raw(i32::try_from(c.id()).context("pid")?);
        signal::kill(pid, signal::Signal::SIGTERM).context("signalling the agent")?;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Some(st) = c.try_wait()? {
                if !st.success() {
                    bail!("agent exited with {st} after SIGTERM; log:\n{}", self.log_text());
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("agent ignored SIGTERM")
    }

    /// (VmRSS, VmHWM) in MB.
    pub fn rss_mb(&self) -> (f64, f64) {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let kb = |key: &str| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
        if self.private.is_some() {
            let _ = std::fs::remove_file(&self.log);
            let _ = std::fs::remove_file(&self.status);
        }
    }
}

/// The `lb` binary of this build: next to the test executable's `deps/` directory
/// (target/<profile>/lb), which `cargo test` builds for lb-userspace's tests. Tests of
/// other crates that need it build it first when it is missing.
pub fn lb_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LB_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().context("the test executable's path")?;
    let dir = exe.parent().and_then(Path::parent).context("the target directory")?;
    let lb = dir.join("lb");
    if !lb.is_file() {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.args(["build", "--package", "lb-userspace", "--bin", "lb"]);
        if release {
            c.arg("--release");
        }
        let st = c.status().context("building lb")?;
        anyhow::ensure!(st.success() && lb.is_file(), "building {} failed", lb.display());
    }
    Ok(lb)
}

/// The `lb` binary of an earlier commit of this repository, for upgrade tests, built
/// once as `<target>/debug/lb-<commit>` and reused. The commit's tree is extracted with
/// `git archive` (no worktree is registered) into `<target>/old-lb/<commit>/`, its
/// packages and binary renamed (`lb-<commit>`) in its manifests, and built into this
/// build's own target directory: the crates both Cargo.locks share are compiled once
/// (a target directory of its own took 4 min 40 s), and the renames keep its artifacts
/// apart from this build's. Needs the commit in the clone's history (no shallow
/// checkout).
pub fn old_lb_binary(commit: &str) -> Result<PathBuf> {
    // One build at a time: the tests of one binary run on threads of one process.
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().context("the test executable's path")?;
    // target/<profile>/deps/<test>
    let target = exe.ancestors().nth(3).context("the target directory")?;
    let name = format!("lb-{commit}");
    let lb = target.join("debug").join(&name);
    if lb.is_file() {
        return Ok(lb);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let t0 = Instant::now();
    let src = target.join("old-lb").join(commit);
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    let archive = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let st =
        Command::new("tar").arg("-x").arg("-C").arg(&src).stdin(archive.stdout.context("git's stdout")?).status()?;
    anyhow::ensure!(
        st.success() && src.join("lb-userspace/Cargo.toml").is_file(),
        "cannot extract commit {commit} (`git fetch --unshallow` if this clone is shallow)"
    );
    // Cargo hashes a workspace package by its path from the workspace root, so the old
    // tree's lb-common and lb-userspace would share (and overwrite) this build's
    // artifacts: renamed packages (their crate names kept) get their own.
    let (common, userspace) = (format!("lb-common-{commit}"), format!("lb-userspace-{commit}"));
    for (file, from, to) in [
        (
            "Cargo.toml",
            "lb-common = { path = \"lb-common\"",
            format!("lb-common = {{ package = \"{common}\", path = \"lb-common\""),
        ),
        (
            "Cargo.toml",
            "lb-userspace = { path = \"lb-userspace\"",
            format!("lb-userspace = {{ package = \"{userspace}\", path = \"lb-userspace\""),
        ),
        ("lb-common/Cargo.toml", "name = \"lb-common\"\n", format!("name = \"{common}\"\n")),
        ("lb-userspace/Cargo.toml", "name = \"lb-userspace\"\n", format!("name = \"{userspace}\"\n")),
        ("lb-userspace/Cargo.toml", "[[bin]]\nname = \"lb\"\n", format!("[[bin]]\nname = \"{name}\"\n")),
    ] {
        let path = src.join(file);
        let text = std::fs::read_to_string(&path)?;
        anyhow::ensure!(
            text.contains(from),
            "{} has no {from:?}: this build cannot rename its packages",
            path.display()
        );
        std::fs::write(&path, text.replacen(from, &to, 1))?;
    }
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&src)
        .args(["build", "--package", &userspace, "--bin", &name, "--target-dir"])
        .arg(target)
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("building the old lb")?;
    anyhow::ensure!(st.success() && lb.is_file(), "building lb of commit {commit} failed");
    eprintln!("built lb of {commit} in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(lb)
}
