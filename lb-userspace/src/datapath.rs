//! Loading the embedded datapath object, checking and reusing pinned maps, and
//! attaching its programs to interfaces.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

pub mod sock_iter;
pub mod upgrade;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapInfo, MapType},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::FdLink,
        tc::{self, TcAttachOptions},
    },
    util::KernelVersion,
};
use lb_common::{MAP_LAYOUT_VERSION, map_names};

/// The datapath object, built by build.rs from the lb-ebpf crate.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

pub const XDP_PROGRAM: &str = "lb_xdp";
pub const TC_PROGRAM: &str = "lb_tc";
/// tc egress of pod interfaces: reverse NAT of replies from the node's own stack.
pub const TC_EGRESS_PROGRAM: &str = "lb_tc_egress";
/// The socket LB's cgroup v2 `sock_addr` programs (lb-ebpf/src/sock.rs).
pub const SOCK_PROGRAMS: [&str; 4] = ["lb_connect4", "lb_sendmsg4", "lb_recvmsg4", "lb_getpeername4"];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot prepare the bpffs directory {path}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pinned map {path} has layout version {found}, this lb expects v{MAP_LAYOUT_VERSION}; \
         it is not reused. Stop the old agent and run `lb cleanup`, or remove the file"
    )]
    StaleLayout { path: PathBuf, found: String },
    #[error(
        "pinned map {path} does not match this lb's layout ({what}); it is not reused. \
         Run `lb cleanup`, or remove the file"
    )]
    LayoutMismatch { path: PathBuf, what: String },
    #[error(
        "pinned map {path} has {found} entries but {wanted} are asked for (its --max-* flag); a pinned map \
         keeps its size. Start with the old size, or stop the agent and run `lb cleanup` first (which \
         cuts the node's established flows)"
    )]
    SizeMismatch { path: PathBuf, found: u32, wanted: u32 },
    #[error("cannot inspect pinned map {path}")]
    PinnedMap {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("loading the lb datapath object failed")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel rejected program {name} (verifier log above the cause)")]
    Verify {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {0} is missing from the datapath object")]
    MissingProgram(&'static str),
    #[error("attaching {program} to cgroup {cgroup}")]
    AttachCgroup {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to {iface} as {hook}")]
    Attach {
        program: &'static str,
        iface: String,
        hook: Hook,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// How a program is hooked to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// Native (driver) XDP.
    Xdp,
    /// Generic (skb) XDP: any interface, after the skb has been built.
    XdpGeneric,
    /// tc clsact ingress.
    Tc,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Xdp => "xdp",
            AttachMode::XdpGeneric => "xdp-generic",
            AttachMode::Tc => "tc",
        })
    }
}

impl FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "xdp" => Ok(AttachMode::Xdp),
            "xdp-generic" => Ok(AttachMode::XdpGeneric),
            "tc" => Ok(AttachMode::Tc),
            other => Err(format!("unknown attach mode {other:?}: expected xdp, xdp-generic or tc")),
        }
    }
}

/// Where the maps are pinned and how big they are.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub pin_dir: PathBuf,
    /// `max_entries` overrides by pinned map name.
    pub max_entries: Vec<(&'static str, u32)>,
    /// Benchmarks only: ignore conntrack hits, so every packet takes the new-flow path
    /// (`BENCH_CT_BYPASS` in lb-ebpf/src/engine.rs).
    pub bench_ct_bypass: bool,
    /// The previous layout's maps are pinned beside the new ones, to be carried over
    /// ([`upgrade`]): they are not a stale layout.
    pub migrating: bool,
}

impl LoadOptions {
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        Self { pin_dir: pin_dir.into(), max_entries: Vec::new(), bench_ct_bypass: false, migrating: false }
    }
}

/// Expected (type, key size, value size) of every pinned map.
fn expected_layout(name: &str) -> Option<(MapType, u32, u32)> {
    use lb_common::*;
    use std::mem::size_of as s;
    let sz = |n: usize| n as u32;
    Some(match name {
        map_names::SERVICES => (MapType::Hash, sz(s::<ServiceKey4>()), sz(s::<ServiceValue>())),
        map_names::BACKENDS => (MapType::Hash, sz(s::<BackendKey>()), sz(s::<BackendValue>())),
        map_names::DRAINING => (MapType::Hash, sz(s::<DrainKey>()), sz(s::<BackendValue>())),
        map_names::AFFINITY => (MapType::LruHash, sz(s::<AffinityKey4>()), sz(s::<AffinityValue>())),
        map_names::CONNTRACK => (MapType::LruHash, sz(s::<CtKey4>()), sz(s::<CtValue4>())),
        map_names::STATS | map_names::SVC_STATS | map_names::SOCK_SVC_STATS => {
            (MapType::PerCpuArray, 4, sz(s::<Counter>()))
        }
        map_names::SOCK_REVNAT => (MapType::LruHash, sz(s::<SockRevKey4>()), sz(s::<SockRevValue4>())),
        map_names::SOCK_AFFINITY => (MapType::LruHash, sz(s::<SockAffinityKey>()), sz(s::<AffinityValue>())),
        map_names::SOCK_STALE => (MapType::Hash, sz(s::<DrainKey>()), sz(s::<SockStale>())),
        map_names::FRAGS => (MapType::LruHash, sz(s::<FragKey4>()), sz(s::<FragValue4>())),
        map_names::IDS => (MapType::Array, 4, sz(s::<IdState>())),
        map_names::TABLES | map_names::PREFILTER => (MapType::Array, 4, 8),
        _ => return None,
    })
}

/// Refuses pinned maps of another layout version (but the previous one's while
/// `migrating`), whose type or key and value sizes differ from this build's, or whose
/// number of entries differs from what `max_entries` asks, before the loader would
/// silently reuse them (aya takes a pinned map as it is).
pub fn check_pinned(pin_dir: &Path, migrating: bool, max_entries: &[(&'static str, u32)]) -> Result<(), DatapathError> {
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(DatapathError::Bpffs { path: pin_dir.into(), source }),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some((mtype, ksz, vsz)) = expected_layout(&name) {
            let map =
                MapData::from_pin(&path).map_err(|source| DatapathError::PinnedMap { path: path.clone(), source })?;
            let info = map.info().map_err(|source| DatapathError::PinnedMap { path: path.clone(), source })?;
            check_info(&path, &info, mtype, ksz, vsz)?;
            // The loader applies the last override of a name.
            if let Some(&(_, wanted)) = max_entries.iter().rev().find(|(n, _)| *n == name) {
                let found = info.max_entries();
                if found != wanted {
                    return Err(DatapathError::SizeMismatch { path, found, wanted });
                }
            }
        } else if let Some(prefix) = map_names::PREFIXES.iter().find(|p| name.starts_with(**p)) {
            if migrating && name[prefix.len()..] == upgrade::PREVIOUS.to_string() {
                continue;
            }
            return Err(DatapathError::StaleLayout { found: name[prefix.len() - 1..].to_string(), path });
        }
    }
    Ok(())
}

fn check_info(path: &Path, info: &MapInfo, mtype: MapType, ksz: u32, vsz: u32) -> Result<(), DatapathError> {
    let found = info.map_type().ok();
    let what = if found != Some(mtype) {
        format!("type {found:?}, expected {mtype:?}")
    } else if info.key_size() != ksz || info.value_size() != vsz {
        format!("key/value size {}/{}, expected {ksz}/{vsz}", info.key_size(), info.value_size())
    } else {
        return Ok(());
    };
    Err(DatapathError::LayoutMismatch { path: path.into(), what })
}

/// Mounts a bpffs at `dir` unless one is there already (the agent's `--bpffs` may live
/// outside /sys/fs/bpf, and a fresh node may have none mounted).
pub fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    let err = |source| DatapathError::Bpffs { path: dir.into(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    if is_bpffs(dir) {
        return Ok(());
    }
    // `mount -t bpf bpf DIR`: the source is only a label for bpffs.
    nix::mount::mount(Some("bpf"), dir, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| err(e.into()))
}

/// `dir` is on a bpffs: statfs(2) reports BPF_FS_MAGIC (include/uapi/linux/magic.h).
pub fn is_bpffs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir).is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Loads the datapath: maps are created or reused under `opts.pin_dir` (which must be
/// on a bpffs), and both programs are verified and loaded, not yet attached.
pub fn load(opts: &LoadOptions) -> Result<Ebpf, DatapathError> {
    check_pinned(&opts.pin_dir, opts.migrating, &opts.max_entries)?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&opts.pin_dir);
    for (name, n) in &opts.max_entries {
        loader.map_max_entries(name, *n);
    }
    if opts.bench_ct_bypass {
        loader.override_global("BENCH_CT_BYPASS", &1u8, true);
    }
    let mut ebpf = loader.load(OBJECT).map_err(DatapathError::Load)?;
    load_program::<Xdp>(&mut ebpf, XDP_PROGRAM)?;
    load_program::<SchedClassifier>(&mut ebpf, TC_PROGRAM)?;
    load_program::<SchedClassifier>(&mut ebpf, TC_EGRESS_PROGRAM)?;
    for name in SOCK_PROGRAMS {
        load_program::<CgroupSockAddr>(&mut ebpf, name)?;
    }
    Ok(ebpf)
}

trait Loadable {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError>;
}
impl Loadable for Xdp {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}
impl Loadable for CgroupSockAddr {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}
impl Loadable for SchedClassifier {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

fn load_program<P>(ebpf: &mut Ebpf, name: &'static str) -> Result<(), DatapathError>
where
    P: Loadable,
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog: &mut P = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Verify { name, source })?;
    prog.load_it().map_err(|source| DatapathError::Verify { name, source })
}

/// One of the datapath's hooks on an interface: which program, attached how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `lb_xdp` (native or generic XDP) or `lb_tc` on tc ingress: every interface.
    Ingress(AttachMode),
    /// `lb_tc_egress` on tc egress: pod interfaces (see agent/attach.rs).
    TcEgress,
}

impl Hook {
    /// The hook of an attachment pinned as (`mode`, `egress`), as agent/attach.rs names
    /// them.
    pub fn new(mode: AttachMode, egress: bool) -> Self {
        if egress { Hook::TcEgress } else { Hook::Ingress(mode) }
    }

    /// The program attached on this hook.
    pub fn program(self) -> &'static str {
        match self {
            Hook::Ingress(AttachMode::Xdp | AttachMode::XdpGeneric) => XDP_PROGRAM,
            Hook::Ingress(AttachMode::Tc) => TC_PROGRAM,
            Hook::TcEgress => TC_EGRESS_PROGRAM,
        }
    }
}

/// `xdp`, `xdp-generic`, `tc`, `tc-egress`: the token of the agent's pin names.
impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hook::Ingress(mode) => mode.fmt(f),
            Hook::TcEgress => f.write_str("tc-egress"),
        }
    }
}

/// How a tc hook is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcLink {
    /// A tcx link (kernel >= 6.6) or nothing: a link can be pinned, and updated in
    /// place by the next agent, while a netlink filter could only be stacked again
    /// (agent/attach.rs).
    Tcx,
    /// A tcx link where the kernel has tcx, else the clsact qdisc and a netlink
    /// `cls_bpf` filter: the choice of aya's `SchedClassifier::attach`, for tests and
    /// dev tools, which keep no link past the `Ebpf`.
    TcxOrNetlink,
}

/// An attachment made by [`attach_to`]. Its link belongs to the program inside the
/// `Ebpf`, which detaches it when it is dropped, unless [`Attached::take_fd`] takes it
/// out.
#[derive(Debug)]
pub struct Attached {
    iface: String,
    hook: Hook,
    id: LinkId,
}

#[derive(Debug)]
enum LinkId {
    Xdp(aya::programs::xdp::XdpLinkId),
    Tc(aya::programs::tc::SchedClassifierLinkId),
}

impl Attached {
    /// Takes the link out of the `Ebpf`, as a BPF link fd to pin. `None` if the kernel
    /// only took a netlink attachment (XDP on a kernel without XDP links, < 5.9, which
    /// aya falls back to): it has no fd, and it stays attached on its own (aya's owned
    /// link only detaches what it still wraps, and `FdLink::try_from` unwraps it).
    pub fn take_fd(self, ebpf: &mut Ebpf) -> Result<Option<FdLink>, DatapathError> {
        let Attached { iface, hook, id } = self;
        let err = |source| DatapathError::Attach { program: hook.program(), iface: iface.clone(), hook, source };
        Ok(match id {
            LinkId::Xdp(id) => FdLink::try_from(program::<Xdp>(ebpf, hook.program())?.take_link(id).map_err(err)?).ok(),
            LinkId::Tc(id) => {
                FdLink::try_from(program::<SchedClassifier>(ebpf, hook.program())?.take_link(id).map_err(err)?).ok()
            }
        })
    }
}

/// Attaches `hook`'s program to interface `iface`, index `ifindex`, of the calling
/// thread's network namespace: the one attach of the agent (which pins the link, see
/// agent/attach.rs), the tests and the dev tools. XDP attaches by index; tc by name, as
/// aya 0.14's `SchedClassifier` has no attach by index.
pub fn attach_to(
    ebpf: &mut Ebpf,
    iface: &str,
    ifindex: u32,
    hook: Hook,
    tc_link: TcLink,
) -> Result<Attached, DatapathError> {
    let name = hook.program();
    let err = |source| DatapathError::Attach { program: name, iface: iface.into(), hook, source };
    let id = match hook {
        Hook::Ingress(mode @ (AttachMode::Xdp | AttachMode::XdpGeneric)) => {
            let flags = if mode == AttachMode::Xdp { XdpMode::Driver } else { XdpMode::Skb };
            // An XDP link where the kernel has them (>= 5.9), else netlink: aya's
            // fallback, on EINVAL from BPF_LINK_CREATE.
            LinkId::Xdp(program::<Xdp>(ebpf, name)?.attach_to_if_index(ifindex, flags).map_err(err)?)
        }
        Hook::Ingress(AttachMode::Tc) | Hook::TcEgress => {
            let kind = if hook == Hook::TcEgress { TcAttachType::Egress } else { TcAttachType::Ingress };
            let options = match tc_link {
                TcLink::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
                // The kernel version test of aya's `SchedClassifier::attach`: tcx came
                // in 6.6 (kernel/bpf/tcx.c).
                TcLink::TcxOrNetlink if has_tcx() => TcAttachOptions::TcxOrder(LinkOrder::default()),
                TcLink::TcxOrNetlink => {
                    // A netlink filter needs the clsact qdisc; EEXIST (already there)
                    // is fine, and any other failure shows in the attach that follows.
                    let _ = tc::qdisc_add_clsact(iface);
                    TcAttachOptions::Netlink(tc::NlOptions::default())
                }
            };
            LinkId::Tc(program::<SchedClassifier>(ebpf, name)?.attach_with_options(iface, kind, options).map_err(err)?)
        }
    };
    Ok(Attached { iface: iface.into(), hook, id })
}

/// [`attach_to`] by interface name, tcx where the kernel has it: the link lives as long
/// as the `Ebpf`. For tests and dev tools.
pub fn attach(ebpf: &mut Ebpf, iface: &str, hook: Hook) -> Result<Attached, DatapathError> {
    let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|e| DatapathError::Attach {
        program: hook.program(),
        iface: iface.into(),
        hook,
        source: match e {
            nix::errno::Errno::ENODEV => aya::programs::ProgramError::UnknownInterface { name: iface.into() },
            e => aya::programs::ProgramError::IOError(e.into()),
        },
    })?;
    attach_to(ebpf, iface, ifindex, hook, TcLink::TcxOrNetlink)
}

/// Attaches the socket LB program `name` (one of [`SOCK_PROGRAMS`]) to the cgroup v2
/// directory `cgroup` as a BPF link, and returns the link to pin. It applies to every
/// process of the cgroup's subtree. A cgroup link is always attached as if with
/// `BPF_F_ALLOW_MULTI` (other programs on the cgroup, and the previous agent's link
/// while it is replaced, keep running), and `BPF_LINK_CREATE` takes no flags for it
/// (kernel/bpf/cgroup.c, `cgroup_bpf_link_attach`): hence aya's `Single`, which is 0.
pub fn attach_cgroup(ebpf: &mut Ebpf, name: &'static str, cgroup: &Path) -> Result<FdLink, DatapathError> {
    let err = |source| DatapathError::AttachCgroup { program: name, cgroup: cgroup.into(), source };
    let dir = std::fs::File::open(cgroup).map_err(|e| err(aya::programs::ProgramError::IOError(e)))?;
    let prog = program::<CgroupSockAddr>(ebpf, name)?;
    let id = prog.attach(&dir, CgroupAttachMode::Single).map_err(err)?;
    FdLink::try_from(prog.take_link(id).map_err(err)?)
        .map_err(|e| err(aya::programs::ProgramError::IOError(std::io::Error::other(e))))
}

fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

pub(crate) fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Verify { name, source })
}

/// With the `debug-log` feature: forwards the datapath's aya-log records to the `log`
/// crate. Keep the returned logger alive for as long as the programs run: dropping it
/// closes the log map's fd.
#[cfg(feature = "debug-log")]
pub fn init_logger(ebpf: &mut Ebpf) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
    aya_log::EbpfLogger::init(ebpf)
}

/// `BPF_F_MMAPABLE` (include/uapi/linux/bpf.h): the array's values can be mmapped.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

#[derive(Debug, thiserror::Error)]
pub enum WordsError {
    #[error("map {name} is not an mmappable array of u64 (flags {flags:#x}, value size {value_size})")]
    NotMappable { name: &'static str, flags: u32, value_size: u32 },
    #[error("reading map {name}'s info")]
    Info {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("mmap of map {name}")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("words {off}..{end} are outside {name}'s {len}")]
    OutOfRange { name: &'static str, off: u64, end: u64, len: u32 },
}

/// An array of u64 created with `BPF_F_MMAPABLE` (`TABLES`), mapped into this process:
/// a lookup table of thousands of words is written with one copy instead of a syscall
/// per word. The kernel reads the same pages. Only words no `SERVICES` entry points at
/// are written (see agent/sync.rs), so a packet never reads a word being written; the
/// write that publishes them is a syscall, which orders these stores before it.
pub struct MappedWords {
    ptr: std::ptr::NonNull<u64>,
    len: u32,
    bytes: usize,
    name: &'static str,
    // The mapping holds the map alive by itself; the fd is kept for `info`.
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory owned by this value; `&mut self` is needed
// to write it.
unsafe impl Send for MappedWords {}
unsafe impl Sync for MappedWords {}

impl MappedWords {
    pub fn new(map: MapData, name: &'static str) -> Result<Self, WordsError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let info = map.info().map_err(|source| WordsError::Info { name, source })?;
        if info.map_flags() & BPF_F_MMAPABLE == 0 || info.value_size() != 8 {
            return Err(WordsError::NotMappable { name, flags: info.map_flags(), value_size: info.value_size() });
        }
        let len = info.max_entries();
        let page =
            nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096).max(4096) as usize;
        let bytes = (len as usize * 8).div_ceil(page) * page;
        // SAFETY: a new shared mapping of the map's fd, checked below; the kernel backs
        // an mmappable array's values with pages that can be mapped (kernel/bpf/arraymap.c,
        // `array_map_mmap`).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(WordsError::Mmap { name, source: std::io::Error::last_os_error() });
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u64>())
            .ok_or(WordsError::Mmap { name, source: std::io::Error::other("null mapping") })?;
        Ok(Self { ptr, len, bytes, name, _map: map })
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: u32, n: usize) -> Result<(), WordsError> {
        let end = u64::from(off) + n as u64;
        if end > u64::from(self.len) {
            return Err(WordsError::OutOfRange { name: self.name, off: u64::from(off), end, len: self.len });
        }
        Ok(())
    }

    /// Writes `words` from word `off`.
    pub fn write(&mut self, off: u32, words: &[u64]) -> Result<(), WordsError> {
        self.check(off, words.len())?;
        // SAFETY: in bounds (checked), and the mapping lives as long as `self`.
        unsafe { std::ptr::copy_nonoverlapping(words.as_ptr(), self.ptr.as_ptr().add(off as usize), words.len()) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Words `off..off + n`.
    pub fn read(&self, off: u32, n: u32) -> Result<Vec<u64>, WordsError> {
        self.check(off, n as usize)?;
        // SAFETY: in bounds (checked); volatile, as the kernel may write the pages too.
        Ok((0..n as usize).map(|i| unsafe { self.ptr.as_ptr().add(off as usize + i).read_volatile() }).collect())
    }
}

impl Drop for MappedWords {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// One per-CPU `Counter` (a `STATS` reason or a `SVC_STATS` service id) summed over
/// CPUs: the one place the agent's metrics, `lb stats`/`lb services` and the tests add
/// up the datapath's counters. An index the map does not hold reads as an error.
pub fn counter_total<T: std::borrow::Borrow<MapData>>(
    map: &aya::maps::PerCpuArray<T, lb_common::Counter>,
    index: u32,
) -> Result<lb_common::Counter, aya::maps::MapError> {
    Ok(map.get(&index, 0)?.iter().fold(lb_common::Counter::default(), |a, c| lb_common::Counter {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
    }))
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads (affinity timestamps),
/// and the base the conntrack clock's jiffies are followed from.
pub fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC cannot fail on Linux (clock_gettime(2)); 0 would only make
    // ages read large.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
        .unwrap_or(0)
}
