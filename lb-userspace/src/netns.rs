//! Throw-away network namespaces for real-traffic tests and benchmarks of the datapath:
//! a client pod, a node and a server pod, joined by veth pairs, with the node routing
//! between the pods.
//!
//! Everything is created inside namespaces this module makes; nothing is added to the
//! root namespace, not even transiently (veth pairs are created with both ends already
//! in their namespaces). Each namespace is deleted when its [`Netns`] is dropped, also
//! while unwinding from a panic; [`remove_stale`] clears what a killed run left behind.
//!
//! Code that must run inside a namespace (opening sockets, attaching programs: aya
//! resolves interface names in the calling thread's namespace) runs on a thread of its
//! own that has `setns`-ed there ([`Netns::run`], [`Netns::spawn`]); the caller's
//! thread never changes namespace. A socket stays in the namespace it was created in,
//! so it may be used from any thread afterwards.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
};

use anyhow::{Context as _, Result, bail};
use aya::Ebpf;

use crate::datapath::{self, AttachMode};

/// Every namespace this module creates is named `lbt-<pid>-<n>-<role>`; the pid tells
/// [`remove_stale`] whether its creator is still alive.
pub const PREFIX: &str = "lbt-";

/// Where `ip netns add` bind-mounts named namespaces.
const NETNS_RUN_DIR: &str = "/var/run/netns";

/// The client pod's address, its gateway (the node's end of its veth) and subnet.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const CLIENT_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// The server pod's address and its gateway.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
pub const SERVER_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
/// The pods' interface, in each pod namespace.
pub const POD_IF: &str = "eth0";
/// The node's end of the client pod's veth: its ingress is the client's egress, where
/// client -> ClusterIP packets are caught.
pub const NODE_CLIENT_IF: &str = "to-client";
/// The node's end of the server pod's veth: its ingress carries the backend's replies,
/// which need their source rewritten back to the ClusterIP.
pub const NODE_SERVER_IF: &str = "to-server";

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<Output> {
    run_cmd(Command::new("ip").args(args))
}

fn run_cmd(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` (which must start with [`PREFIX`]) and brings its
    /// loopback up.
    pub fn create(name: String) -> Result<Self> {
        if !name.starts_with(PREFIX) {
            bail!("namespace {name} lacks the {PREFIX} prefix that clean-up relies on");
        }
        ip(&["netns", "add", &name]).context("creating a network namespace; run as root")?;
        // From here on, drop deletes it.
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(&self.name)
    }

    /// `ip -n NAME ARGS`: iproute2 switches into the namespace itself.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// `ip netns exec NAME PROGRAM`, for tools that have no namespace option.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `PROGRAM ARGS` in the namespace; returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = run_cmd(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")]).map(drop)
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

    /// Runs `f` on a new thread inside this namespace and waits for it.
    pub fn run<T: Send, F: FnOnce() -> Result<T> + Send>(&self, f: F) -> Result<T> {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&path)?;
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts `f` on a new thread inside this namespace.
    pub fn spawn<T, F>(&self, f: F) -> JoinHandle<Result<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path)?;
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth ends in it, and with them their
        // peers and any program attached to either.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: could not delete network namespace {}: {e:#}", self.name);
        }
    }
}

/// Moves the calling thread into the namespace bind-mounted at `path`, for good: only
/// call it on a thread made for the purpose.
fn enter(path: &std::path::Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: plain syscall on a file descriptor we own for its duration.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns into {}", path.display()));
    }
    Ok(())
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

/// Deletes `lbt-<pid>-*` namespaces whose creating process is gone: left over by a run
/// that was killed before its drops ran. Namespaces of live processes (a concurrent
/// test or benchmark) are left alone. Returns the names deleted.
pub fn remove_stale() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(NETNS_RUN_DIR),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let name = entry.context(NETNS_RUN_DIR)?.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid == std::process::id() || PathBuf::from(format!("/proc/{pid}")).exists() {
            continue;
        }
        match ip(&["netns", "del", &name]) {
            Ok(_) => removed.push(name),
            // Parallel tests clean up at the same time; one of them wins.
            Err(_) if !PathBuf::from(NETNS_RUN_DIR).join(&name).exists() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Client pod -> node -> server pod. Dropping it deletes all three namespaces.
#[derive(Debug)]
pub struct Topology {
    pub client: Netns,
    pub node: Netns,
    pub server: Netns,
}

impl Topology {
    /// Builds the topology under fresh names `lbt-<pid>-<n>-{client,node,server}`.
    pub fn new() -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = format!("{PREFIX}{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let client = Netns::create(format!("{base}-client"))?;
        let node = Netns::create(format!("{base}-node"))?;
        let server = Netns::create(format!("{base}-server"))?;
        let topo = Self { client, node, server };

        topo.node.sysctl("net.ipv4.ip_forward", "1")?;
        // Replies leave the datapath with the ClusterIP as their source, and the node
        // has no route to the service range (a real node has a default route, which a
        // loose check accepts). New namespaces inherit these from the root namespace,
        // whose values are not ours to rely on; `default` covers the veths made below.
        for conf in ["all", "default"] {
            topo.node.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
        }

        for (pod, node_if, pod_ip, gw) in
            [(&topo.client, NODE_CLIENT_IF, CLIENT_IP, CLIENT_GW), (&topo.server, NODE_SERVER_IF, SERVER_IP, SERVER_GW)]
        {
            // Both ends are created in their namespaces directly: nothing ever appears
            // in the root namespace.
            ip(&[
                "link",
                "add",
                node_if,
                "netns",
                topo.node.name(),
                "type",
                "veth",
                "peer",
                "name",
                POD_IF,
                "netns",
                pod.name(),
            ])?;
            topo.node.ip(&["addr", "add", &format!("{gw}/24"), "dev", node_if])?;
            topo.node.ip(&["link", "set", node_if, "up"])?;
            pod.ip(&["addr", "add", &format!("{pod_ip}/24"), "dev", POD_IF])?;
            pod.ip(&["link", "set", POD_IF, "up"])?;
            // The pod's only way out is its node, which routes between the two pod
            // subnets and nowhere else.
            pod.ip(&["route", "add", "default", "via", &gw.to_string()])?;
        }
        Ok(topo)
    }

    /// Attaches the datapath in `mode` to both node-side veths: client -> ClusterIP
    /// traffic and the server's replies.
    pub fn attach(&self, ebpf: &mut Ebpf, mode: AttachMode) -> Result<()> {
        self.node.run(|| {
            for iface in [NODE_CLIENT_IF, NODE_SERVER_IF] {
                datapath::attach(ebpf, iface, datapath::Hook::Ingress(mode))
                    .with_context(|| format!("attaching {mode} to {iface}"))?;
            }
            Ok(())
        })
    }
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
