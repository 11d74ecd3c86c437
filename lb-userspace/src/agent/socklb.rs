//! The socket LB in the agent (lb-ebpf/src/sock.rs is the datapath side): which cgroup
//! v2 directory serves as the node's (`--cgroup-root`), attaching the four `sock_addr`
//! programs to it as pinned BPF links, and closing the sockets of backends that left
//! (`datapath::sock_iter`).
//!
//! The programs see every process of the cgroup's subtree: on a node, the kubelet's
//! `--cgroup-root` (where the kubelet, containerd and, through runc, every pod live)
//! and the host-network processes started in it. Never a cgroup above the node's:
//! on a machine that hosts several nodes (the sandbox) that would translate for
//! processes that are not the node's.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
};

use aya::{Ebpf, maps::MapData};
use lb_common::{DrainKey, SOCK_STALE_TCP, SockStale, map_names};
use serde::{Deserialize, Serialize};

use super::sync::Departure;
use crate::datapath::{self, DatapathError, SOCK_PROGRAMS, sock_iter::SockIters};

/// Directory, under the agent's bpffs, of the socket LB's pinned cgroup links (one per
/// program, named after it).
pub const CGROUP_LINKS_DIR: &str = "cgroup-links";

/// `--cgroup-root`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupRoot {
    /// The kubelet's cgroup root, found from the agent's own cgroup (see [`node_cgroup`]).
    Auto,
    /// A cgroup v2 directory, as the agent's mount namespace sees it.
    Path(PathBuf),
}

impl FromStr for CgroupRoot {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(CgroupRoot::Auto),
            "" => Err("expected `auto` or a cgroup v2 directory".into()),
            p => Ok(CgroupRoot::Path(p.into())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SocketLbError {
    #[error("--cgroup-root auto: {0}; set --cgroup-root (LB_CGROUP_ROOT) to the node's cgroup v2 directory")]
    Auto(String),
    #[error("{0} is not a cgroup v2 directory (it has no cgroup.controllers); set --cgroup-root to one")]
    NotCgroup2(PathBuf),
    #[error(transparent)]
    Attach(#[from] Box<DatapathError>),
    #[error("pinning the socket LB link of {program} at {path}")]
    Pin {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the socket closer")]
    Closer(#[from] datapath::sock_iter::SockIterError),
    #[error("opening pinned map {path}")]
    Map {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("writing {what} in SOCK_STALE")]
    Stale {
        what: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The node's cgroup v2 path, from this process's `/proc/self/cgroup`: everything
/// before the first `kubepods*` component (`kubepods`, or `kubepods.slice` under the
/// systemd driver), which is the kubelet's `--cgroup-root`. The agent runs in a pod,
/// so its own cgroup is under it. `None` without a v2 line (`0::`) or a `kubepods`
/// component (not in a pod; or in a private cgroup namespace, whose `0::/` hides it).
pub fn node_cgroup(proc_self_cgroup: &str) -> Option<String> {
    let path = proc_self_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mut prefix = String::new();
    for c in path.split('/').filter(|c| !c.is_empty()) {
        if c.starts_with("kubepods") {
            return Some(if prefix.is_empty() { "/".into() } else { prefix });
        }
        prefix.push('/');
        prefix.push_str(c);
    }
    None
}

/// Where cgroup v2 path `cg` is in this mount namespace: under a `cgroup2` mount of
/// `/proc/self/mountinfo` (proc(5)) whose root covers it.
pub fn cgroup2_dir(mountinfo: &str, cg: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let f: Vec<&str> = pre.split_whitespace().collect();
        let (root, mount) = (*f.get(3)?, unescape(f.get(4)?));
        let rest =
            if root == "/" { Some(cg) } else { cg.strip_prefix(root).filter(|r| r.is_empty() || r.starts_with('/')) }?;
        Some(Path::new(&mount).join(rest.trim_start_matches('/')))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 directory `--cgroup-root` names.
pub fn resolve(root: &CgroupRoot) -> Result<PathBuf, SocketLbError> {
    let dir = match root {
        CgroupRoot::Path(p) => p.clone(),
        CgroupRoot::Auto => {
            let read =
                |p: &str| std::fs::read_to_string(p).map_err(|e| SocketLbError::Auto(format!("reading {p}: {e}")));
            let cg = node_cgroup(&read("/proc/self/cgroup")?).ok_or_else(|| {
                SocketLbError::Auto(
                    "this process's cgroup v2 path has no kubepods component (not in a pod, or in a private cgroup namespace)"
                        .into(),
                )
            })?;
            cgroup2_dir(&read("/proc/self/mountinfo")?, &cg).ok_or_else(|| {
                SocketLbError::Auto(format!(
                    "no cgroup2 mount shows {cg} (mount the host's cgroup2 hierarchy into the agent, as deploy/lb-agent.yaml does)"
                ))
            })?
        }
    };
    if !dir.join("cgroup.controllers").is_file() {
        return Err(SocketLbError::NotCgroup2(dir));
    }
    Ok(dir)
}

/// What the status file says of the socket LB.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketLbStatus {
    /// The cgroup v2 directory the programs are attached to.
    pub cgroup: PathBuf,
    pub programs: Vec<String>,
}

/// Attaches the four programs to `cgroup` and pins their links as
/// `<bpffs>/cgroup-links/<program>`. A link pinned there by an earlier agent is
/// replaced only after the new one is attached (the pin is renamed over the old one,
/// which then detaches): while both are attached, the new program sees the address the
/// old one translated, which is no frontend, so nothing is translated twice.
pub fn attach(ebpf: &mut Ebpf, bpffs: &Path, cgroup: &Path) -> Result<SocketLbStatus, SocketLbError> {
    let dir = bpffs.join(CGROUP_LINKS_DIR);
    let pin_err = |program, path: &Path, source| SocketLbError::Pin { program, path: path.into(), source };
    std::fs::create_dir_all(&dir).map_err(|e| pin_err(SOCK_PROGRAMS[0], &dir, e))?;
    for program in SOCK_PROGRAMS {
        let link = datapath::attach_cgroup(ebpf, program, cgroup).map_err(Box::new)?;
        // bpffs refuses names with a dot (kernel/bpf/inode.c, `bpf_lookup`).
        let (tmp, path) = (dir.join(format!("{program}_new")), dir.join(program));
        let _ = std::fs::remove_file(&tmp);
        link.pin(&tmp).map_err(|e| pin_err(program, &tmp, std::io::Error::other(e)))?;
        std::fs::rename(&tmp, &path).map_err(|e| pin_err(program, &path, e))?;
    }
    Ok(SocketLbStatus { cgroup: cgroup.into(), programs: SOCK_PROGRAMS.iter().map(|p| p.to_string()).collect() })
}

/// Removes the pinned cgroup links under `bpffs` (which detaches the socket LB).
/// Returns how many there were.
pub fn detach(bpffs: &Path) -> std::io::Result<usize> {
    super::attach::remove_pin_dir(&bpffs.join(CGROUP_LINKS_DIR))
}

/// Closes the sockets the socket LB sent to backends that left: writes the pairs
/// into `SOCK_STALE`, runs the UDP and the TCP iterator, reads what each closed, and
/// removes the pairs again.
pub struct Closer {
    iters: SockIters,
    /// The host's `/proc`, whose processes name the network namespaces to walk.
    proc_dir: PathBuf,
    stale: aya::maps::HashMap<MapData, DrainKey, SockStale>,
}

impl Closer {
    pub fn open(bpffs: &Path, proc_dir: &Path) -> Result<Self, SocketLbError> {
        let path = bpffs.join(map_names::SOCK_STALE);
        let map = MapData::from_pin(&path).map_err(|source| SocketLbError::Map { path: path.clone(), source })?;
        let stale = aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map))
            .map_err(|source| SocketLbError::Map { path, source })?;
        Ok(Self { iters: SockIters::load(bpffs)?, proc_dir: proc_dir.into(), stale })
    }

    /// Closes the UDP sockets of every departed pair, and the TCP ones of those
    /// [`Departure::Gone`].
    pub fn close(&mut self, departed: &[(DrainKey, Departure)]) -> Result<Closed, SocketLbError> {
        let mut closed = Closed::default();
        for chunk in departed.chunks(lb_common::limits::SOCK_STALE as usize) {
            for (k, d) in chunk {
                let flags = if *d == Departure::Gone { SOCK_STALE_TCP } else { 0 };
                self.stale
                    .insert(k, SockStale { flags, ..Default::default() }, 0)
                    .map_err(|source| SocketLbError::Stale { what: "a pair", source })?;
            }
            let res = self.run(chunk);
            for (k, _) in chunk {
                let _ = self.stale.remove(k);
            }
            let c = res?;
            closed.udp += c.udp;
            closed.tcp += c.tcp;
            closed.netns_refused = closed.netns_refused.max(c.netns_refused);
        }
        Ok(closed)
    }

    fn run(&self, chunk: &[(DrainKey, Departure)]) -> Result<Closed, SocketLbError> {
        let total = |m: &aya::maps::HashMap<MapData, DrainKey, SockStale>| -> u64 {
            chunk.iter().filter_map(|(k, _)| m.get(k, 0).ok()).map(|v| v.destroyed).sum()
        };
        // One walk of /proc for both iterators.
        let others = datapath::sock_iter::other_netns(&self.proc_dir);
        let entered = self.iters.run_everywhere(false, &others)?;
        let udp = total(&self.stale);
        let entered_tcp = self.iters.run_everywhere(true, &others)?;
        let netns_refused = others.refused + entered.max(entered_tcp);
        Ok(Closed { udp, tcp: total(&self.stale) - udp, netns_refused })
    }
}

/// What one [`Closer::close`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Closed {
    pub udp: u64,
    pub tcp: u64,
    /// Processes or namespaces the kernel kept the agent out of (no CAP_SYS_PTRACE to
    /// open `/proc/<pid>/ns/net`, no CAP_SYS_ADMIN to enter it): sockets there that
    /// point at departed backends stay open.
    pub netns_refused: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_cgroup_is_the_kubelets_cgroup_root() {
        let cg = |p: &str| node_cgroup(&format!("12:cpu,cpuacct:/whatever\n0::{p}\n"));
        assert_eq!(cg("/lbsb/lbsb-node1/kubepods/besteffort/pod1/abc").as_deref(), Some("/lbsb/lbsb-node1"));
        assert_eq!(cg("/kubepods/burstable/pod1/abc").as_deref(), Some("/"));
        assert_eq!(cg("/kubepods.slice/kubepods-besteffort.slice/x.scope").as_deref(), Some("/"));
        assert_eq!(cg("/user.slice/session-1.scope"), None, "not in a pod");
        assert_eq!(cg("/"), None, "a private cgroup namespace");
        assert_eq!(node_cgroup("1:name=systemd:/kubepods/x\n"), None, "no cgroup v2 line");
    }

    #[test]
    fn the_cgroup2_mount_that_shows_the_path() {
        let mi = "\
25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(cgroup2_dir(mi, "/lbsb/lbsb-node1"), Some("/sys/fs/cgroup/unified/lbsb/lbsb-node1".into()));
        assert_eq!(cgroup2_dir(mi, "/"), Some("/sys/fs/cgroup/unified".into()));
        // A container's bind mount of a subtree, with an escaped space in its path.
        let mi = "40 1 0:26 /lbsb /host\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_dir(mi, "/lbsb/lbsb-node2"), Some("/host cg/lbsb-node2".into()));
        assert_eq!(cgroup2_dir(mi, "/lbsbx"), None, "a root is a whole component");
        assert_eq!(cgroup2_dir("25 1 0:23 / /x rw - tmpfs tmpfs rw\n", "/"), None);
        assert_eq!(cgroup2_dir("1 0 0:1 / / rw - ext4 /dev/sda rw\n", "/"), None);
    }

    #[test]
    fn cgroup_root_flag() {
        assert_eq!("auto".parse::<CgroupRoot>(), Ok(CgroupRoot::Auto));
        assert_eq!("/sys/fs/cgroup".parse::<CgroupRoot>(), Ok(CgroupRoot::Path("/sys/fs/cgroup".into())));
        assert!("".parse::<CgroupRoot>().is_err());
    }
}
