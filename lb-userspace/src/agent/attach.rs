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
    ffi::CStr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::rpfilter::{PROC_IPV4_CONF, RpFilter, RpFilterStatus};
use crate::datapath::{AttachMode, TC_EGRESS_PROGRAM, TC_PROGRAM, XDP_PROGRAM};

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

/// Pin-name token of the egress hook.
const EGRESS_TOKEN: &str = "tc-egress";

impl AttachPoint {
    /// `<ifindex>_<mode>_<ifname>`: bpffs reserves names with dots, so a dot in the
    /// interface name (a VLAN such as `eth0.100`) is written `%2e` (and `%` as `%25`).
    pub fn pin_name(&self) -> String {
        let mode = if self.egress { EGRESS_TOKEN.to_string() } else { self.mode.to_string() };
        format!("{}_{}_{}", self.ifindex, mode, self.iface.replace('%', "%25").replace('.', "%2e"))
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
    /// "eth0 (xdp)", "veth1 (tc-egress)".
    pub fn hook_name(&self) -> String {
        if self.egress { EGRESS_TOKEN.to_string() } else { self.mode.to_string() }
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

/// Interfaces of the calling thread's network namespace: (name, ifindex).
pub fn interfaces() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns a null-terminated array that we free below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return out;
        }
        let mut p = head;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push((CStr::from_ptr((*p).if_name).to_string_lossy().into_owned(), (*p).if_index));
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("program {0} is missing from the datapath object")]
    MissingProgram(&'static str),
    #[error("attaching to {iface} ({mode}) failed")]
    Attach {
        iface: String,
        mode: AttachMode,
        #[source]
        source: aya::programs::ProgramError,
    },
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
        let rp = RpFilter::new(PROC_IPV4_CONF, cfg.fix_rp_filter);
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
        for ap in attached {
            match self.rp.disable_on(&ap.iface) {
                Ok(Some(was)) => {
                    info!(iface = %ap.iface, was, "rp_filter set to 0: replies are reverse-NATed before routing")
                }
                Ok(None) => {}
                Err(e) => {
                    if !self.rp_status.ifaces_failed.contains(&ap.iface) {
                        warn!(iface = %ap.iface, error = %e, "cannot set rp_filter to 0; replies through this interface may be dropped");
                    }
                    st.ifaces_failed.push(ap.iface.clone());
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
                let prog: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?;
                let id = prog.attach_to_link(link).map_err(|e| reuse(e.into()))?;
                // Out of aya's hands: dropping it closes our fd; the pin keeps the link.
                drop(prog.take_link(id).map_err(|e| reuse(e.into()))?.try_into_fd());
            }
            AttachMode::Tc => {
                let link = SchedClassifierLink::try_from(fd).map_err(|e| reuse(e.into()))?;
                let prog: &mut SchedClassifier =
                    program(&mut self.ebpf, if egress { TC_EGRESS_PROGRAM } else { TC_PROGRAM })?;
                let id = prog.attach_to_link(link).map_err(|e| reuse(e.into()))?;
                drop(prog.take_link(id).map_err(|e| reuse(e.into()))?.try_into_fd());
            }
        }
        Ok(())
    }

    fn attach_new(&mut self, ap: &AttachPoint) -> Result<(), AttachError> {
        let err = |source| AttachError::Attach { iface: ap.iface.clone(), mode: ap.mode, source };
        let fd = match ap.mode {
            AttachMode::Xdp | AttachMode::XdpGeneric => {
                let flags = if ap.mode == AttachMode::Xdp { XdpMode::Driver } else { XdpMode::Skb };
                let prog: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?;
                let id = prog.attach_to_if_index(ap.ifindex, flags).map_err(err)?;
                prog.take_link(id).map_err(err)?.try_into_fd()
            }
            AttachMode::Tc => {
                let (name, kind) = if ap.egress {
                    (TC_EGRESS_PROGRAM, TcAttachType::Egress)
                } else {
                    (TC_PROGRAM, TcAttachType::Ingress)
                };
                let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
                let id = prog
                    .attach_with_options(&ap.iface, kind, TcAttachOptions::TcxOrder(LinkOrder::default()))
                    .map_err(err)?;
                prog.take_link(id).map_err(err)?.try_into_fd()
            }
        };
        match fd {
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

/// Turns an owned link into an `FdLink` (None for a netlink attachment, which stays
/// attached on its own).
trait IntoFd {
    fn try_into_fd(self) -> Option<FdLink>;
}
impl IntoFd for XdpLink {
    fn try_into_fd(self) -> Option<FdLink> {
        FdLink::try_from(self).ok()
    }
}
impl IntoFd for SchedClassifierLink {
    fn try_into_fd(self) -> Option<FdLink> {
        FdLink::try_from(self).ok()
    }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, AttachError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .ok_or(AttachError::MissingProgram(name))?
        .try_into()
        .map_err(|_| AttachError::MissingProgram(name))
}

/// Removes every pinned link under `bpffs` (which detaches the datapath).
pub fn remove_links(bpffs: &Path) -> std::io::Result<usize> {
    let dir = bpffs.join(LINKS_DIR);
    let mut n = 0;
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                std::fs::remove_file(e.path())?;
                n += 1;
            }
            std::fs::remove_dir(&dir)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(n)
}

/// Signals `notify` on every rtnetlink link message (RTMGRP_LINK): an interface
/// appeared, went, or changed. Runs on its own thread; returns false if the socket
/// cannot be opened (the caller's periodic rescan still catches changes).
pub fn watch_links(notify: Arc<Notify>) -> bool {
    // SAFETY: plain socket syscalls on a socket we own; the buffer outlives recv.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        warn!(error = %std::io::Error::last_os_error(), "no rtnetlink socket; interfaces are rescanned periodically only");
        return false;
    }
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = libc::RTMGRP_LINK as u32;
    let rc = unsafe {
        libc::bind(
            fd,
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot join RTMGRP_LINK; interfaces are rescanned periodically only");
        unsafe { libc::close(fd) };
        return false;
    }
    std::thread::Builder::new()
        .name("lb-netlink".into())
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    // ENOBUFS: we missed messages; a rescan covers them.
                    debug!(error = %e, "rtnetlink recv");
                }
                notify.notify_one();
            }
        })
        .is_ok()
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
}
