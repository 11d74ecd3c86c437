//! Named network namespaces, the one helper set of lb's tests, benchmarks and sandbox
//! (`lb-testing`'s topologies and `xtask sandbox`'s nodes are both built on it).
//!
//! Namespaces are made with `ip netns add`, which bind-mounts them under
//! [`NETNS_RUN_DIR`], so they outlive the process that made them until deleted; an
//! owned [`Netns`] deletes its namespace on drop, also while unwinding from a panic.
//! Nothing here touches the root namespace: veth pairs are created with both ends
//! already in their namespaces by the callers.
//!
//! Code that must run inside a namespace (opening sockets, attaching programs: aya
//! resolves interface names in the calling thread's namespace) runs on a thread of its
//! own that has `setns`-ed there ([`run_in`], [`spawn_in`]); the caller's thread never
//! changes namespace. A socket stays in the namespace it was created in, so it may be
//! used from any thread afterwards.

pub mod interrupt;

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread::JoinHandle,
};

use anyhow::{Context as _, Result, bail};

/// Where `ip netns add` bind-mounts named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Runs `cmd` with no stdin, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// The bind mount of the namespace `name`.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Creates the namespace `name` and brings its loopback up; it stays until [`delete`].
pub fn add(name: &str) -> Result<()> {
    ip(&["netns", "add", name]).with_context(|| format!("creating network namespace {name}; run as root"))?;
    ip(&["-n", name, "link", "set", "lo", "up"]).map(drop)
}

/// Deletes the namespace `name`: with it the veth ends in it, their peers and any
/// program attached to either.
pub fn delete(name: &str) -> Result<()> {
    ip(&["netns", "del", name]).map(drop)
}

/// `ip netns exec NAME PROGRAM`, for tools that have no namespace option.
pub fn command(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", name]).arg(program);
    cmd
}

/// `nsenter --net=/run/netns/NAME PROGRAM`: only the network namespace changes. `ip
/// netns exec` also mounts a fresh sysfs on /sys in a mount namespace of its own, which
/// hides whatever is mounted below it (a hybrid host's cgroup2 at
/// /sys/fs/cgroup/unified), so a program that must see the cgroup hierarchy (the agent
/// with `--cgroup-root`) runs this way. /sys/class/net then shows the root namespace's
/// interfaces; /proc/sys/net and netlink follow the namespace.
pub fn command_net_only(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", path(name).display())).arg("--").arg(program);
    cmd
}

/// `sysctl -w KEY=VALUE` inside the namespace `name` (per-namespace keys only: the
/// `net.*` ones).
pub fn sysctl(name: &str, key: &str, value: &str) -> Result<()> {
    run(command(name, "sysctl").args(["-qw", &format!("{key}={value}")])).map(drop)
}

/// The namespaces whose names start with `prefix`, sorted.
pub fn list(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(NETNS_RUN_DIR)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Moves the calling thread into the namespace `name` for good: only call it on a
/// thread made for the purpose (sockets opened afterwards live in that namespace).
pub fn enter(name: &str) -> Result<()> {
    let p = path(name);
    let f = File::open(&p).with_context(|| format!("opening {}; does netns {name} exist?", p.display()))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns into {name} (run as root)"))
}

/// Runs `f` on a new thread inside the namespace `name` and waits for it.
pub fn run_in<T: Send, F: FnOnce() -> Result<T> + Send>(name: &str, f: F) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(move || {
            enter(name)?;
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Starts `f` on a new thread inside the namespace `name`.
pub fn spawn_in<T, F>(name: &str, f: F) -> JoinHandle<Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let name = name.to_owned();
    std::thread::spawn(move || {
        enter(&name)?;
        f()
    })
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` ([`add`]); dropping the handle deletes it.
    pub fn create(name: String) -> Result<Self> {
        add(&name)?;
        Ok(Self { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS`: iproute2 switches into the namespace itself.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// [`command`] in this namespace.
    pub fn command(&self, program: &str) -> Command {
        command(&self.name, program)
    }

    /// [`command_net_only`] in this namespace.
    pub fn command_net_only(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_net_only(&self.name, program)
    }

    /// Runs `PROGRAM ARGS` in the namespace; returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = run(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        sysctl(&self.name, key, value)
    }

    /// `ethtool -K IFACE FEATURE on|off`.
    pub fn ethtool_k(&self, iface: &str, feature: &str, on: bool) -> Result<()> {
        self.exec("ethtool", &["-K", iface, feature, if on { "on" } else { "off" }]).map(drop)
    }

    /// One counter of `/proc/net/snmp` or `/proc/net/netstat` as this namespace sees it,
    /// e.g. (`"Tcp"`, `"InCsumErrors"`) or (`"TcpExt"`, `"TCPTimeouts"`).
    pub fn snmp(&self, group: &str, counter: &str) -> Result<u64> {
        let mut text = self.exec("cat", &["/proc/net/snmp", "/proc/net/netstat"])?;
        text.push('\n');
        parse_snmp(&text, group, counter)
            .with_context(|| format!("{group}:{counter} missing from /proc/net/snmp in {}", self.name))
    }

    /// [`run_in`] this namespace.
    pub fn run<T: Send, F: FnOnce() -> Result<T> + Send>(&self, f: F) -> Result<T> {
        run_in(&self.name, f)
    }

    /// [`spawn_in`] this namespace.
    pub fn spawn<T, F>(&self, f: F) -> JoinHandle<Result<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        spawn_in(&self.name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = delete(&self.name) {
            eprintln!("warning: could not delete network namespace {}: {e:#}", self.name);
        }
    }
}

/// `/proc/net/snmp` holds pairs of lines, `Group: names...` then `Group: values...`.
fn parse_snmp(text: &str, group: &str, counter: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let names = names.split_whitespace().skip(1);
        let mut values = values.split_whitespace().skip(1);
        for name in names {
            let value = values.next()?;
            if name == counter {
                return value.parse().ok();
            }
        }
    }
    None
}

/// Deletes `<prefix><pid>-*` namespaces whose creating process is gone: left over by a
/// run that was killed before its drops ran. Namespaces of live processes (a concurrent
/// test or benchmark) are left alone. Returns the names deleted.
pub fn remove_stale(prefix: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in list(prefix) {
        let Some(pid) = name.strip_prefix(prefix).and_then(|rest| rest.split('-').next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match delete(&name) {
            Ok(()) => removed.push(name),
            // Parallel tests clean up at the same time; one of them wins.
            Err(_) if !path(&name).exists() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snmp_pairs() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm InCsumErrors\nTcp: 1 7\n\
                    Udp: InDatagrams InCsumErrors\nUdp: 3 2\n";
        assert_eq!(parse_snmp(text, "Tcp", "InCsumErrors"), Some(7));
        assert_eq!(parse_snmp(text, "Udp", "InCsumErrors"), Some(2));
        assert_eq!(parse_snmp(text, "Ip", "DefaultTTL"), Some(64));
        assert_eq!(parse_snmp(text, "Tcp", "Nope"), None);
    }
}
