//! Throw-away cgroup v2 directories for the socket-level load balancer's tests: the
//! agent attaches its `connect4`/`sendmsg4`/`recvmsg4`/`getpeername4` programs to a
//! cgroup, and a test must hand it one it made, never a hierarchy's root (where the
//! programs would see every socket on the machine).
//!
//! A [`TestCgroup`] is `lbt-<pid>-<n>` directly under the cgroup2 mount; dropping it
//! kills whatever is left in it and removes it, also while unwinding from a panic.
//! [`remove_stale`] clears what a killed run left behind, as [`crate::netns::remove_stale`]
//! does for namespaces.

use std::{
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{sys::signal, unistd::Pid};

/// Every cgroup this module creates is named `lbt-<pid>-<n>`, as the namespaces are:
/// the pid tells [`remove_stale`] whether its creator is still alive.
pub const PREFIX: &str = crate::netns::PREFIX;

/// The cgroup-bpf attach types of the socket-level load balancer
/// (`enum bpf_attach_type`, include/uapi/linux/bpf.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockAttach {
    Connect4 = 10,
    UdpSendmsg4 = 14,
    UdpRecvmsg4 = 19,
    Getpeername4 = 29,
}

impl SockAttach {
    pub const ALL: [SockAttach; 4] =
        [SockAttach::Connect4, SockAttach::UdpSendmsg4, SockAttach::UdpRecvmsg4, SockAttach::Getpeername4];
}

/// Where the cgroup2 hierarchy is mounted, from /proc/self/mountinfo (the `cgroup2`
/// mount that shows its root: `/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one), read as the agent reads it
/// (`socklb::cgroup2_dir`, whose unit tests cover the parsing).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    lb_userspace::agent::socklb::cgroup2_dir(&text, "/").context("no cgroup2 mount in /proc/self/mountinfo")
}

/// A fresh cgroup v2 directory for one test; on drop, what is left in it is killed and
/// the directory removed.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 mount>/lbt-<pid>-<n>`.
    pub fn new() -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let root = cgroup2_mount()?;
        let path = root.join(format!("{PREFIX}{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        // A test cgroup is always a child of the root, never the root itself.
        ensure!(
            path.parent() == Some(root.as_path()) && path != root,
            "{} is not below {}",
            path.display(),
            root.display()
        );
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}; run as root", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pids in it (`cgroup.procs`).
    pub fn procs(&self) -> Vec<u32> {
        procs(&self.path)
    }

    /// Moves `pid` into it.
    pub fn add(&self, pid: u32) -> Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", self.path.display()))
    }

    /// The ids of the programs attached to this cgroup itself (not inherited) for
    /// `attach`, by BPF_PROG_QUERY: what `bpftool cgroup show` lists, without bpftool.
    pub fn attached(&self, attach: SockAttach) -> Result<Vec<u32>> {
        query_programs(&self.path, attach as u32)
    }

    /// The number of socket-LB programs attached to it, over the four hooks.
    pub fn sock_programs(&self) -> Result<usize> {
        SockAttach::ALL.iter().try_fold(0, |n, &a| Ok(n + self.attached(a)?.len()))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = destroy(&self.path) {
            eprintln!("warning: could not remove cgroup {}: {e:#}", self.path.display());
        }
    }
}

fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Kills every process in `dir` (`cgroup.kill` where the kernel has it, 5.14+; else
/// SIGKILL to each pid, repeated, since a process may fork meanwhile), waits for it to
/// empty and removes it.
fn destroy(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let kill = dir.join("cgroup.kill");
    let t0 = Instant::now();
    loop {
        if procs(dir).is_empty() {
            match std::fs::remove_dir(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                // EBUSY while the last task is still exiting.
                Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                    return Err(e).with_context(|| format!("rmdir {}", dir.display()));
                }
                Err(_) => {}
            }
        } else if kill.exists() {
            std::fs::write(&kill, "1").with_context(|| format!("writing {}", kill.display()))?;
        } else {
            for pid in procs(dir) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGKILL);
                }
            }
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("{} still holds {:?} after SIGKILL", dir.display(), procs(dir));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes `lbt-<pid>-*` cgroups whose creating process is gone: left over by a run
/// killed before its drops ran. Those of live processes (a concurrent test) stay.
/// Returns the paths removed.
pub fn remove_stale() -> Result<Vec<PathBuf>> {
    let root = cgroup2_mount()?;
    let mut removed = Vec::new();
    for e in std::fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() || !e.path().is_dir() {
            continue;
        }
        destroy(&e.path())?;
        removed.push(e.path());
    }
    Ok(removed)
}

/// BPF_PROG_QUERY on the cgroup directory `dir` for `attach_type`: the ids of the
/// programs attached there directly.
fn query_programs(dir: &Path, attach_type: u32) -> Result<Vec<u32>> {
    // include/uapi/linux/bpf.h
    const BPF_PROG_QUERY: u32 = 16;
    let f = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let mut ids = [0u32; 64];
    let mut attr = [0u8; 128];
    // `query`: target_fd, attach_type, query_flags (0: attached here, not the
    // effective set), attach_flags (out), prog_ids, prog_cnt (in: room; out: count).
    crate::datapath::put(&mut attr, 0, (f.as_raw_fd() as u32).to_ne_bytes());
    crate::datapath::put(&mut attr, 4, attach_type.to_ne_bytes());
    crate::datapath::put(&mut attr, 16, (ids.as_mut_ptr() as u64).to_ne_bytes());
    crate::datapath::put(&mut attr, 24, (ids.len() as u32).to_ne_bytes());
    crate::datapath::bpf_sys(BPF_PROG_QUERY, &mut attr)
        .with_context(|| format!("BPF_PROG_QUERY {} type {attach_type}", dir.display()))?;
    let n = u32::from_ne_bytes(attr[24..28].try_into().expect("four bytes")) as usize;
    Ok(ids[..n.min(ids.len())].to_vec())
}
