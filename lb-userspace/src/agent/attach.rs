//! Attaching the datapath to interfaces, following interfaces that come and go, and
//! keeping the attachments alive across agent restarts.
//!
//! Uplinks get one hook (XDP or tc ingress); pod interfaces get two: tc ingress, the
//! full datapath, and tc egress (`lb_tc_egress`), which reverse-NATs the replies the
//! node's own stack sends to a pod when a Service's backend is the node itself (a
//! host-network pod, the API server behind `kubernetes.default`): those replies leave
//! through the pod interface's egress and cross no ingress hook.
//!
//! Every attachment is a BPF link (XDP link, or tcx on kernels >= 6.6) pinned under
//! `<bpffs>/links/` as `<ifindex>_<mode>_<ifname>` (mode `tc-egress` for the egress
//! hook). A failed attach is retried with backoff, and the agent is not ready while any
//! wanted attachment is missing. A pinned link outlives the agent
//! process, so a killed agent leaves the datapath attached and its flows flowing.
//! The next agent finds the pin and swaps its own, freshly loaded program in with
//! `BPF_LINK_UPDATE` (atomic: no packet sees "no program"); the maps are the same
//! pinned maps, so conntrack and affinity carry on.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    programs::{
        SchedClassifier, Xdp,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::rpfilter::{PROC_IPV4_CONF, RpFilter, RpFilterStatus};
use crate::datapath::{self, AttachMode, DatapathError, Hook, TcLink};

/// Directory, under the agent's bpffs, of the pinned links.
pub const LINKS_DIR: &str = "links";

/// Which interfaces to attach to, and how.
#[derive(Clone, Debug)]
pub struct AttachConfig {
    /// Uplinks, by exact name.
    pub ifaces: Vec<String>,
    /// Pod interfaces, by glob (`*`, `?`).
    pub globs: Vec<String>,
    pub uplink_mode: UplinkMode,
    pub pod_mode: AttachMode,
    /// Set `net.ipv4.conf.all.rp_filter` to 0 if it is strict (see [`super::rpfilter`]).
    pub fix_rp_filter: bool,
    /// `--proc-dir`: rp_filter is read and written under `<proc_dir>/sys/net/ipv4/conf`
    /// (the DaemonSet mounts the node's `/proc/sys/net` writable there, as the runtime
    /// mounts the container's own `/proc/sys` read-only).
    pub proc_dir: PathBuf,
}

/// `--uplink-attach`: one hook for every uplink, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkMode {
    /// Native XDP on a device with hardware behind it (`/sys/class/net/IF/device`), tc
    /// on a virtual one (veth, bridge, bond, VLAN). Native XDP on a veth makes the veth
    /// run its NAPI path on MTU-sized frames, GRO lost: `cargo xtask bench peers`
    /// measured cross-node TCP through a ClusterIP at 1.6 Gbit/s with XDP on the nodes'
    /// veth uplinks against 8.9 direct (docs/benchmarks.md), as
    /// ../shared/notes/xdp-on-veth.md found for pod veths.
    Auto,
    Fixed(AttachMode),
}

impl UplinkMode {
    /// The hook for uplink `iface`.
    pub fn for_iface(self, iface: &str) -> AttachMode {
        match self {
            UplinkMode::Fixed(m) => m,
            UplinkMode::Auto if has_device(iface) => AttachMode::Xdp,
            UplinkMode::Auto => AttachMode::Tc,
        }
    }
}

/// The interface is backed by a device (a NIC or a virtio/SR-IOV function): sysfs links
/// it as `device`; virtual interfaces have none.
fn has_device(iface: &str) -> bool {
    !iface.contains('/') && Path::new("/sys/class/net").join(iface).join("device").exists()
}

impl std::fmt::Display for UplinkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UplinkMode::Auto => f.write_str("auto"),
            UplinkMode::Fixed(m) => m.fmt(f),
        }
    }
}

impl std::str::FromStr for UplinkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(UplinkMode::Auto),
            other => other
                .parse()
                .map(UplinkMode::Fixed)
                .map_err(|_| format!("unknown uplink attach mode {other:?}: expected auto, xdp, xdp-generic or tc")),
        }
    }
}

/// Refuses XDP on pod interfaces unless `allowed`: a pod's TCP and UDP packets are
/// CHECKSUM_PARTIAL, and XDP, which has no skb, rewrites their checksum field as if
/// it were complete, so the packets are dropped wherever a device later completes the
/// checksum (docs/datapath-veth.md, finding 1; docs/datapath.md).
pub fn check_pod_mode(mode: AttachMode, allowed: bool) -> Result<(), String> {
    match mode {
        AttachMode::Tc => Ok(()),
        AttachMode::Xdp | AttachMode::XdpGeneric if allowed => {
            warn!(%mode, "XDP on pod interfaces (--allow-xdp-on-pods): checksums of pods' packets will be wrong once a device completes them");
            Ok(())
        }
        AttachMode::Xdp | AttachMode::XdpGeneric => Err(format!(
            "--pod-attach {mode} refused: XDP on a pod veth rewrites the partial checksums of pods' packets as if they \
             were complete, so they are dropped as soon as a NIC or tunnel completes them (and native XDP on a veth \
             loses ICMP rejects and most throughput); see docs/datapath.md. Use --pod-attach tc (the default), or \
             pass --allow-xdp-on-pods (LB_ALLOW_XDP_ON_PODS=true) to accept this."
        )),
    }
}

/// One attachment, as pinned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachPoint {
    pub iface: String,
    pub ifindex: u32,
    pub mode: AttachMode,
    /// tc egress (`lb_tc_egress`), on pod interfaces; `mode` is then `tc`.
    #[serde(default)]
    pub egress: bool,
    /// Link and program ids, if the link could be inspected.
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
}

/// Pin-name token of the egress hook: [`Hook::TcEgress`]'s name.
const EGRESS_TOKEN: &str = "tc-egress";

impl AttachPoint {
    /// `<ifindex>_<mode>_<ifname>`: bpffs reserves names with dots, so a dot in the
    /// interface name (a VLAN such as `eth0.100`) is written `%2e` (and `%` as `%25`).
    pub fn pin_name(&self) -> String {
        format!("{}_{}_{}", self.ifindex, self.hook(), self.iface.replace('%', "%25").replace('.', "%2e"))
    }
    /// Which program, on which hook.
    pub fn hook(&self) -> Hook {
        Hook::new(self.mode, self.egress)
    }
    /// (ifindex, mode, egress, interface).
    pub fn from_pin_name(name: &str) -> Option<(u32, AttachMode, bool, String)> {
        let mut it = name.splitn(3, '_');
        let ifindex = it.next()?.parse().ok()?;
        let (mode, egress) = match it.next()? {
            EGRESS_TOKEN => (AttachMode::Tc, true),
            m => (m.parse().ok()?, false),
        };
        Some((ifindex, mode, egress, it.next()?.replace("%2e", ".").replace("%25", "%")))
    }
    /// `xdp`, `xdp-generic`, `tc` or `tc-egress`.
    pub fn hook_name(&self) -> String {
        self.hook().to_string()
    }
}

/// A wanted attachment that is not in place, as `lb status` and the metrics show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachFailure {
    pub iface: String,
    pub ifindex: u32,
    /// `xdp`, `xdp-generic`, `tc` or `tc-egress`.
    pub hook: String,
    pub error: String,
    pub attempts: u32,
    /// Seconds until the next attempt.
    pub retry_in_s: u64,
}

/// First retry after a failed attach; doubled per failure up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
struct Failed {
    ifindex: u32,
    error: String,
    attempts: u32,
    next_try: Instant,
}

/// Which attachment: interface, ifindex, hook.
type Want = (String, bool);

/// Pinned links under `links_dir`, with their kernel ids.
pub fn pinned_links(links_dir: &Path) -> Vec<(PathBuf, AttachPoint)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(links_dir) else { return out };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((ifindex, mode, egress, iface)) = AttachPoint::from_pin_name(&name) else { continue };
        let info = PinnedLink::from_pin(e.path()).ok().and_then(|p| FdLink::from(p).info().ok());
        out.push((
            e.path(),
            AttachPoint {
                iface,
                ifindex,
                mode,
                egress,
                link_id: info.as_ref().map(|i| i.id()),
                program_id: info.as_ref().map(|i| i.program_id()),
            },
        ));
    }
    out.sort_by(|a, b| (a.1.ifindex, &a.1.iface, a.1.egress).cmp(&(b.1.ifindex, &b.1.iface, b.1.egress)));
    out
}

/// The interface `name` is still there, as `ifindex`, in the calling thread's network
/// namespace.
fn still_there(name: &str, ifindex: u32) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok_and(|i| i == ifindex)
}

/// `*` and `?` globbing, as a shell does for interface names.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn m(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => m(&p[1..], n) || (!n.is_empty() && m(p, &n[1..])),
            (Some(b'?'), Some(_)) => m(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &n[1..]),
            _ => false,
        }
    }
    m(pattern.as_bytes(), name.as_bytes())
}

/// Interfaces of the calling thread's network namespace: (name, ifindex). if_nameindex(3)
/// asks the kernel (netlink, in glibc) from this thread, so it sees the thread's
/// namespace, where /sys/class/net shows the namespace sysfs was mounted in. Empty if
/// it fails: the next rescan tries again.
pub fn interfaces() -> Vec<(String, u32)> {
    nix::net::if_::if_nameindex()
        .map(|ifs| ifs.iter().map(|i| (i.name().to_string_lossy().into_owned(), i.index())).collect())
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The attach itself, or a program missing from the object. Boxed: aya's
    /// `ProgramError` makes it the largest variant by far.
    #[error(transparent)]
    Datapath(Box<DatapathError>),
    #[error("reusing the pinned link {path} failed")]
    Reuse {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("pinning the link for {iface} at {path} failed")]
    Pin {
        iface: String,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
}

impl From<DatapathError> for AttachError {
    fn from(e: DatapathError) -> Self {
        AttachError::Datapath(Box::new(e))
    }
}

/// Owns the loaded programs and keeps the attachments in line with the config.
pub struct Attacher {
    ebpf: Ebpf,
    cfg: AttachConfig,
    links_dir: PathBuf,
    /// Attachments made or adopted by this process, by pin name.
    ours: BTreeSet<String>,
    /// Wanted attachments whose attach failed: retried with backoff.
    failed: BTreeMap<Want, Failed>,
    rp: RpFilter,
    rp_status: RpFilterStatus,
}

impl Attacher {
    pub fn new(ebpf: Ebpf, cfg: AttachConfig, bpffs: &Path) -> std::io::Result<Self> {
        let links_dir = bpffs.join(LINKS_DIR);
        std::fs::create_dir_all(&links_dir)?;
        let rp = RpFilter::new(cfg.proc_dir.join(PROC_IPV4_CONF), cfg.fix_rp_filter);
        Ok(Self {
            ebpf,
            cfg,
            links_dir,
            ours: BTreeSet::new(),
            failed: BTreeMap::new(),
            rp,
            rp_status: RpFilterStatus::default(),
        })
    }

    /// rp_filter as last checked by [`Attacher::reconcile`].
    pub fn rp_filter_status(&self) -> &RpFilterStatus {
        &self.rp_status
    }

    /// Keeps rp_filter off on every attached interface (checked on each reconcile, so
    /// a value put back later, e.g. by systemd-sysctl's udev rule for new interfaces,
    /// is undone at the next rescan), and checks `conf.all`. Only runs while something
    /// is attached: the agent changes no sysctl of a namespace it does not serve.
    fn apply_rp_filter(&mut self, attached: &[AttachPoint]) {
        if attached.is_empty() {
            return;
        }
        let mut st = RpFilterStatus::default();
        // Once per interface (pod interfaces have two attachments).
        let ifaces: BTreeSet<&str> = attached.iter().map(|ap| ap.iface.as_str()).collect();
        for iface in ifaces {
            match self.rp.disable_on(iface) {
                Ok(Some(was)) => {
                    info!(%iface, was, "rp_filter set to 0: replies are reverse-NATed before routing")
                }
                Ok(None) => {}
                // Its pin outlived it: the interface went since the last reconcile
                // (the next one detaches it).
                Err(_) if nix::net::if_::if_nametoindex(iface).is_err() => {}
                Err(e) => {
                    if !self.rp_status.ifaces_failed.iter().any(|f| f == iface) {
                        warn!(%iface, error = %e, "cannot set rp_filter to 0; replies through this interface may be dropped");
                    }
                    st.ifaces_failed.push(iface.to_owned());
                }
            }
        }
        match self.rp.check_all() {
            Ok(all) => {
                if let Some(was) = all.all_fixed_from {
                    warn!(was, now = ?all.all, "net.ipv4.conf.all.rp_filter was strict, which drops every reverse-NATed reply; changed (--fix-rp-filter)");
                }
                if let Some(w) = &all.warning
                    && self.rp_status.warning.as_ref() != Some(w)
                {
                    warn!("{w}");
                }
                st.all = all.all;
                st.all_fixed_from = all.all_fixed_from.or(self.rp_status.all_fixed_from);
                st.warning = all.warning;
            }
            Err(e) => {
                if self.rp_status.all.is_some() || self.rp_status.warning.is_none() {
                    warn!(error = %e, "cannot read net.ipv4.conf.all.rp_filter");
                }
                st.warning = Some(format!("cannot read net.ipv4.conf.all.rp_filter: {e}"));
            }
        }
        self.rp_status = st;
    }

    /// What should be attached now: uplinks by name (uplink mode), then pod interfaces
    /// by glob (pod mode on ingress, and tc egress). `lo` only if named. Keyed by
    /// (interface, egress).
    pub fn wanted(&self, ifaces: &[(String, u32)]) -> BTreeMap<Want, (u32, AttachMode)> {
        let mut out = BTreeMap::new();
        for (name, idx) in ifaces {
            if self.cfg.ifaces.iter().any(|i| i == name) {
                out.insert((name.clone(), false), (*idx, self.cfg.uplink_mode.for_iface(name)));
            } else if name != "lo" && self.cfg.globs.iter().any(|g| glob_match(g, name)) {
                out.insert((name.clone(), false), (*idx, self.cfg.pod_mode));
                out.insert((name.clone(), true), (*idx, AttachMode::Tc));
            }
        }
        out
    }

    /// Wanted attachments not in place, with the last error.
    pub fn failures(&self) -> Vec<AttachFailure> {
        let now = Instant::now();
        let wanted = self.wanted(&interfaces());
        self.failed
            .iter()
            .map(|((iface, egress), f)| {
                let (ifindex, mode) = wanted.get(&(iface.clone(), *egress)).copied().unwrap_or((0, AttachMode::Tc));
                let ap = AttachPoint {
                    iface: iface.clone(),
                    ifindex,
                    mode,
                    egress: *egress,
                    link_id: None,
                    program_id: None,
                };
                AttachFailure {
                    iface: iface.clone(),
                    ifindex,
                    hook: ap.hook_name(),
                    error: f.error.clone(),
                    attempts: f.attempts,
                    retry_in_s: f.next_try.saturating_duration_since(now).as_secs(),
                }
            })
            .collect()
    }

    /// When the next failed attach is due for a retry.
    pub fn next_retry(&self) -> Option<Instant> {
        self.failed.values().map(|f| f.next_try).min()
    }

    /// Brings the attachments in line with the interfaces present. Returns the
    /// attachments now in place and the number of failures.
    pub fn reconcile(&mut self) -> (Vec<AttachPoint>, usize) {
        let wanted = self.wanted(&interfaces());
        let mut errors = 0;
        let pinned = pinned_links(&self.links_dir);
        let mut have = BTreeSet::new();
        for (path, ap) in pinned {
            let want = (ap.iface.clone(), ap.egress);
            let keep = wanted.get(&want).is_some_and(|(idx, mode)| *idx == ap.ifindex && *mode == ap.mode);
            let name = ap.pin_name();
            if !keep {
                info!(iface = %ap.iface, hook = %ap.hook_name(), "detaching (interface gone or no longer selected)");
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!(path = %path.display(), error = %e, "cannot remove pinned link");
                }
                self.ours.remove(&name);
                continue;
            }
            if !self.ours.contains(&name) {
                // Left by a previous agent: swap our program in.
                match self.adopt(&path, ap.mode, ap.egress) {
                    Ok(()) => {
                        info!(iface = %ap.iface, hook = %ap.hook_name(), "adopted the pinned link; program replaced atomically");
                        self.ours.insert(name);
                    }
                    Err(e) => {
                        errors += 1;
                        warn!(iface = %ap.iface, error = %crate::agent::chain(&e), "cannot adopt pinned link; re-attaching");
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                }
            }
            have.insert(want);
        }
        // Failures of attachments no longer wanted (the interface went, or came back
        // as another one) are forgotten.
        self.failed.retain(|w, f| wanted.get(w).is_some_and(|(idx, _)| *idx == f.ifindex));
        let now = Instant::now();
        for (want, (ifindex, mode)) in &wanted {
            if have.contains(want) {
                self.failed.remove(want);
                continue;
            }
            if self.failed.get(want).is_some_and(|f| f.next_try > now) {
                continue;
            }
            let (iface, egress) = want;
            let ap = AttachPoint {
                iface: iface.clone(),
                ifindex: *ifindex,
                mode: *mode,
                egress: *egress,
                link_id: None,
                program_id: None,
            };
            match self.attach_new(&ap) {
                Ok(()) => {
                    info!(iface, hook = %ap.hook_name(), "attached");
                    self.ours.insert(ap.pin_name());
                    self.failed.remove(want);
                }
                // Gone (or replaced) since `interfaces()` listed it: no failure to
                // retry, and no reason to be unready; the next reconcile sees what is
                // there now. Pods come and go by the second on a busy node
                // (tests/faults_links.rs: at 50 a second, about half the attaches).
                Err(e) if !still_there(iface, *ifindex) => {
                    debug!(iface, hook = %ap.hook_name(), error = %crate::agent::chain(&e), "interface went before its attach");
                    self.failed.remove(want);
                }
                Err(e) => {
                    errors += 1;
                    let attempts = self.failed.get(want).map_or(1, |f| f.attempts + 1);
                    let backoff = RETRY_FIRST.saturating_mul(1 << (attempts - 1).min(16)).min(RETRY_MAX);
                    let error = crate::agent::chain(&e);
                    warn!(iface, hook = %ap.hook_name(), error, attempts, retry_in = ?backoff, "attach failed; not ready until it holds");
                    self.failed
                        .insert(want.clone(), Failed { ifindex: *ifindex, error, attempts, next_try: now + backoff });
                }
            }
        }
        let now: Vec<AttachPoint> = pinned_links(&self.links_dir).into_iter().map(|(_, ap)| ap).collect();
        self.apply_rp_filter(&now);
        (now, errors)
    }

    fn adopt(&mut self, path: &Path, mode: AttachMode, egress: bool) -> Result<(), AttachError> {
        let reuse = |source: Box<dyn std::error::Error + Send + Sync>| AttachError::Reuse { path: path.into(), source };
        let fd: FdLink = PinnedLink::from_pin(path).map_err(|e| reuse(e.into()))?.into();
        match mode {
            AttachMode::Xdp | AttachMode::XdpGeneric => {
                let link = XdpLink::try_from(fd).map_err(|e| reuse(e.into()))?;
                let prog: &mut Xdp = datapath::program(&mut self.ebpf, datapath::XDP_PROGRAM)?;
                let id = prog.attach_to_link(link).map_err(|e| reuse(e.into()))?;
                // Out of aya's hands: dropping it closes our fd; the pin keeps the link.
                drop(FdLink::try_from(prog.take_link(id).map_err(|e| reuse(e.into()))?));
            }
            AttachMode::Tc => {
                let link = SchedClassifierLink::try_from(fd).map_err(|e| reuse(e.into()))?;
                let prog: &mut SchedClassifier = datapath::program(&mut self.ebpf, Hook::new(mode, egress).program())?;
                let id = prog.attach_to_link(link).map_err(|e| reuse(e.into()))?;
                drop(FdLink::try_from(prog.take_link(id).map_err(|e| reuse(e.into()))?));
            }
        }
        Ok(())
    }

    /// Attaches `ap` through [`datapath::attach_to`] and pins its link. tc takes a tcx
    /// link only ([`TcLink::Tcx`]): a netlink filter could be neither pinned nor
    /// updated in place, and each restart would stack one more.
    fn attach_new(&mut self, ap: &AttachPoint) -> Result<(), AttachError> {
        let attached = datapath::attach_to(&mut self.ebpf, &ap.iface, ap.ifindex, ap.hook(), TcLink::Tcx)?;
        match attached.take_fd(&mut self.ebpf)? {
            Some(fd) => {
                let path = self.links_dir.join(ap.pin_name());
                fd.pin(&path).map_err(|source| AttachError::Pin { iface: ap.iface.clone(), path, source })?;
            }
            None => {
                warn!(iface = %ap.iface, "attached without a BPF link (old kernel): it will not survive an agent restart")
            }
        }
        Ok(())
    }
}

/// Removes every pinned link under `bpffs` (which detaches the datapath).
pub fn remove_links(bpffs: &Path) -> std::io::Result<usize> {
    remove_pin_dir(&bpffs.join(LINKS_DIR))
}

/// Removes the pins in `dir`, then `dir`: each link detaches once its last pin and fd
/// are gone. Returns how many there were; a missing `dir` is none.
pub fn remove_pin_dir(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                std::fs::remove_file(e.path())?;
                n += 1;
            }
            std::fs::remove_dir(dir)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(n)
}

/// Signals `notify` on every rtnetlink link message (RTNLGRP_LINK): an interface
/// appeared, went, or changed. The socket is opened here, in the calling thread's
/// network namespace; its messages are read by a task on the current tokio runtime.
/// A receive buffer overrun (ENOBUFS) comes through as a message too (netlink-proto's
/// `NetlinkFramed` turns it into `NLMSG_OVERRUN`), so missed events still bring a
/// rescan. Returns false if there is no socket or no runtime (the caller's periodic
/// rescan still catches changes).
pub fn watch_links(notify: Arc<Notify>) -> bool {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        warn!("no tokio runtime for rtnetlink; interfaces are rescanned periodically only");
        return false;
    };
    // Binds the socket with RTNLGRP_LINK's bit in `nl_groups` (rtnetlink's
    // connection.rs); the handle, for requests, is not needed.
    let (connection, _handle, mut messages) =
        match rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link]) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot join RTNLGRP_LINK; interfaces are rescanned periodically only");
                return false;
            }
        };
    // Reads the socket and forwards what it reads to `messages`; it ends if the socket
    // fails or `messages` is dropped.
    rt.spawn(connection);
    rt.spawn(async move {
        while messages.next().await.is_some() {
            notify.notify_one();
        }
        warn!("rtnetlink link events stopped; interfaces are rescanned periodically only");
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth1234"));
        assert!(glob_match("veth*", "veth"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(glob_match("lxc?", "lxc1"));
        assert!(!glob_match("lxc?", "lxc12"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
    }

    #[test]
    fn pin_names_round_trip() {
        for mode in [AttachMode::Xdp, AttachMode::XdpGeneric, AttachMode::Tc] {
            for iface in ["veth.a_b", "eth0.100", "odd%2e"] {
                let ap = AttachPoint {
                    iface: iface.into(),
                    ifindex: 42,
                    mode,
                    egress: false,
                    link_id: None,
                    program_id: None,
                };
                assert!(!ap.pin_name().contains('.'), "bpffs refuses dots: {}", ap.pin_name());
                assert_eq!(AttachPoint::from_pin_name(&ap.pin_name()), Some((42, mode, false, iface.into())));
                let eg = AttachPoint { mode: AttachMode::Tc, egress: true, ..ap };
                assert_eq!(AttachPoint::from_pin_name(&eg.pin_name()), Some((42, AttachMode::Tc, true, iface.into())));
            }
        }
        assert_eq!(AttachPoint::from_pin_name("junk"), None);
    }

    #[test]
    fn xdp_on_pods_needs_consent() {
        assert_eq!(check_pod_mode(AttachMode::Tc, false), Ok(()));
        assert_eq!("auto".parse::<UplinkMode>(), Ok(UplinkMode::Auto));
        assert_eq!("xdp".parse::<UplinkMode>(), Ok(UplinkMode::Fixed(AttachMode::Xdp)));
        assert!("nope".parse::<UplinkMode>().unwrap_err().contains("auto, xdp, xdp-generic or tc"));
        assert_eq!(UplinkMode::Fixed(AttachMode::XdpGeneric).for_iface("lo"), AttachMode::XdpGeneric);
        // Loopback is virtual: no `device` in sysfs.
        assert_eq!(UplinkMode::Auto.for_iface("lo"), AttachMode::Tc);
        assert_eq!(UplinkMode::Auto.for_iface("../x"), AttachMode::Tc);
        for mode in [AttachMode::Xdp, AttachMode::XdpGeneric] {
            let e = check_pod_mode(mode, false).unwrap_err();
            assert!(e.contains("--allow-xdp-on-pods") && e.contains("docs/datapath.md"), "{e}");
            assert_eq!(check_pod_mode(mode, true), Ok(()));
        }
    }

    #[test]
    fn lists_interfaces() {
        assert!(interfaces().iter().any(|(n, _)| n == "lo"));
    }

    /// A link message reaches `watch_links`'s `Notify`: in a private network namespace
    /// of this test's thread (unshare(2) moves only the calling thread), where the
    /// rtnetlink socket is opened and `ip` (forked from this thread) sets `lo` up.
    /// Skipped without the rights to make the namespace.
    #[test]
    fn link_events_notify() {
        std::thread::spawn(|| {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                eprintln!("skipped: no private network namespace ({e}); run as root");
                return;
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let notify = Arc::new(Notify::new());
                assert!(watch_links(notify.clone()));
                let st = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("ip");
                assert!(st.success());
                tokio::time::timeout(Duration::from_secs(5), notify.notified()).await.expect("no link event in 5 s");
            });
        })
        .join()
        .expect("test thread");
    }
}
