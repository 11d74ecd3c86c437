//! Closing the sockets the socket LB sent to a backend that has gone: a BPF socket
//! iterator (`iter/udp`, `iter/tcp`) that calls the `bpf_sock_destroy` kfunc (kernel
//! 6.5+, net/core/filter.c) on every socket whose `SOCK_REVNAT` entry names a
//! (service, backend) pair the agent listed in `SOCK_STALE`.
//!
//! A connected UDP socket is translated once, at connect(); if its backend leaves, it
//! would send to the old pod forever (Cilium's socket LB has this open as
//! cilium/cilium#48096; its fix needs CONFIG_INET_DIAG_DESTROY). Destroyed, the socket
//! reports ECONNABORTED and is disconnected, so the application reconnects, through
//! the socket LB, to a live backend. TCP sockets are destroyed only when the backend's
//! pod is gone (not while it drains), as kube-proxy keeps established TCP flows to a
//! terminating pod.
//!
//! **Why the program is assembled here, not in lb-ebpf:** aya 0.14 cannot relocate a
//! kfunc call (no `BPF_PSEUDO_KFUNC_CALL` support in aya-obj), and the `aya 0.15+` that
//! might needs a newer rustc. The program is 36 instructions; the kfunc's and the
//! iterator's BTF ids come from the running kernel's BTF (`/sys/kernel/btf/vmlinux`),
//! and the two maps are the pinned ones the datapath uses. It reads only the first
//! fields of `struct sock_common` (`skc_daddr` at 0, `skc_dport` at 12), which every
//! socket type begins with (include/net/sock.h) and which the verifier checks
//! against BTF on every load.

use std::{
    io::Read as _,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use aya::{Btf, maps::MapData};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, SOCK_STALE_TCP, map_names};

#[derive(Debug, thiserror::Error)]
pub enum SockIterError {
    #[error("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")]
    Btf(#[source] aya::BtfError),
    #[error("the kernel has no {0} (bpf_sock_destroy needs Linux 6.5 or later)")]
    Missing(&'static str, #[source] aya::BtfError),
    #[error("opening pinned map {path}")]
    Map {
        path: std::path::PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the kernel rejected the {iter} socket iterator: {log}")]
    Load {
        iter: &'static str,
        log: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{call} for the {iter} socket iterator")]
    Run {
        iter: &'static str,
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The two loaded iterator programs (UDP, TCP). Loading verifies them once; each
/// [`SockIters::run`] makes a fresh iterator instance of both.
#[derive(Debug)]
pub struct SockIters {
    udp: OwnedFd,
    tcp: OwnedFd,
}

impl SockIters {
    /// Loads both programs against the pinned maps under `pin_dir`.
    pub fn load(pin_dir: &Path) -> Result<Self, SockIterError> {
        let btf = Btf::from_sys_fs().map_err(SockIterError::Btf)?;
        let func = |name: &'static str| {
            btf.id_by_type_name_kind(name, aya_obj::btf::BtfKind::Func).map_err(|e| SockIterError::Missing(name, e))
        };
        let destroy = func("bpf_sock_destroy")?;
        let open = |name: &str| {
            let path = pin_dir.join(name);
            MapData::from_pin(&path).map_err(|source| SockIterError::Map { path, source })
        };
        // The programs hold their own references to the maps once loaded.
        let revnat = open(map_names::SOCK_REVNAT)?;
        let stale = open(map_names::SOCK_STALE)?;
        let (revnat, stale) = (revnat.fd().as_fd().as_raw_fd(), stale.fd().as_fd().as_raw_fd());
        let udp = load("udp", func("bpf_iter_udp")?, &program(IPPROTO_UDP, revnat, stale, destroy))?;
        let tcp = load("tcp", func("bpf_iter_tcp")?, &program(IPPROTO_TCP, revnat, stale, destroy))?;
        Ok(Self { udp, tcp })
    }

    /// [`SockIters::run`] in the caller's network namespace and in each of `others`
    /// ([`other_netns`]); returns how many of them the kernel did not let it enter: the socket iterators only walk the sockets of the namespace
    /// they are created in (net/ipv4/udp.c, `bpf_iter_udp_batch` and
    /// net/ipv4/tcp_ipv4.c, `bpf_iter_tcp_batch`, check `seq_file_net`), and a pod's
    /// sockets live in the pod's. A socket is closed only if its cookie is in this
    /// agent's `SOCK_REVNAT`, so namespaces of other nodes or of no pod lose nothing.
    pub fn run_everywhere(&self, tcp: bool, others: &OtherNetns) -> Result<usize, SockIterError> {
        self.run(tcp)?;
        // A thread of its own, which may change namespace without touching the agent's.
        std::thread::scope(|s| {
            s.spawn(|| -> Result<usize, SockIterError> {
                let mut refused = 0;
                for ns in &others.files {
                    match nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET) {
                        Ok(()) => self.run(tcp)?,
                        // Entering a network namespace takes CAP_SYS_ADMIN over its owning
                        // user namespace (net/core/net_namespace.c, `netns_install`).
                        Err(nix::errno::Errno::EPERM) => refused += 1,
                        // Gone meanwhile: nothing to close there.
                        Err(_) => {}
                    }
                }
                Ok(refused)
            })
            .join()
            .unwrap_or_else(|_| {
                Err(SockIterError::Run {
                    iter: "udp/tcp",
                    call: "setns",
                    source: std::io::Error::other("the iterator thread panicked"),
                })
            })
        })
    }

    /// Walks every UDP (`tcp` false) or TCP socket of the calling thread's network
    /// namespace once, closing those `SOCK_STALE` names. The counts land in
    /// `SOCK_STALE`'s values.
    pub fn run(&self, tcp: bool) -> Result<(), SockIterError> {
        let (iter, prog) = if tcp { ("tcp", &self.tcp) } else { ("udp", &self.udp) };
        {
            let err = |call, source| SockIterError::Run { iter, call, source };
            let link = link_create(prog.as_raw_fd()).map_err(|e| err("BPF_LINK_CREATE", e))?;
            let fd = iter_create(link.as_raw_fd()).map_err(|e| err("BPF_ITER_CREATE", e))?;
            // The program writes nothing: one read runs it over every socket and
            // returns 0 at the end.
            let mut f = std::fs::File::from(fd);
            let mut buf = [0u8; 64];
            while f.read(&mut buf).map_err(|e| err("read", e))? > 0 {}
        }
        Ok(())
    }
}

/// The network namespaces [`other_netns`] found.
#[derive(Debug, Default)]
pub struct OtherNetns {
    /// An open handle on each, once.
    pub files: Vec<std::fs::File>,
    /// Processes whose namespace the kernel did not let the agent see (EACCES/EPERM):
    /// `/proc/<pid>/ns/*` needs ptrace read access to the process
    /// (fs/proc/namespaces.c, `proc_ns_get_link`), which another user's process grants
    /// only with CAP_SYS_PTRACE. Their sockets are not walked.
    pub refused: usize,
}

/// The network namespaces of the processes under `proc_dir` (the host's `/proc`) but
/// the caller's, each once (by the nsfs inode of `<pid>/ns/net`).
pub fn other_netns(proc_dir: &Path) -> OtherNetns {
    use std::os::unix::fs::MetadataExt as _;
    let own = std::fs::metadata("/proc/thread-self/ns/net").map(|m| (m.dev(), m.ino())).ok();
    let mut seen = std::collections::HashSet::new();
    let mut out = OtherNetns::default();
    let Ok(entries) = std::fs::read_dir(proc_dir) else { return out };
    let denied = |e: &std::io::Error| e.kind() == std::io::ErrorKind::PermissionDenied;
    for e in entries.flatten() {
        if !e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let path = e.path().join("ns/net");
        let id = match std::fs::metadata(&path) {
            Ok(m) => (m.dev(), m.ino()),
            Err(e) if denied(&e) => {
                out.refused += 1;
                continue;
            }
            // The process is gone, or a kernel thread.
            Err(_) => continue,
        };
        if Some(id) == own || !seen.insert(id) {
            continue;
        }
        match std::fs::File::open(&path) {
            Ok(f) => out.files.push(f),
            Err(e) if denied(&e) => out.refused += 1,
            Err(_) => {}
        }
    }
    out
}

// ---- The program. ----

/// One `struct bpf_insn` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: dst | (src << 4), off, imm }
}

// Opcodes (include/uapi/linux/bpf_common.h, bpf.h).
const LDX_DW: u8 = 0x79;
const LDX_W: u8 = 0x61;
const LDX_H: u8 = 0x69;
const STX_DW: u8 = 0x7b;
const STX_W: u8 = 0x63;
const STX_H: u8 = 0x6b;
const ST_B: u8 = 0x72;
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const ADD64_K: u8 = 0x07;
const AND64_K: u8 = 0x57;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
/// `BPF_STX | BPF_ATOMIC | BPF_DW`, imm `BPF_ADD`: `lock *(u64 *)(dst + off) += src`.
const ATOMIC_ADD_DW: u8 = 0xdb;
const PSEUDO_MAP_FD: u8 = 1;
const PSEUDO_KFUNC_CALL: u8 = 2;
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_GET_SOCKET_COOKIE: i32 = 46;

/// The iterator program for `proto` (the `SockRevKey4::proto` it looks up):
///
/// ```text
/// sk = ctx->sk (udp_sk / sk_common, both at 8); if !sk: return 0
/// key = SockRevKey4 { cookie(sk), sk->skc_daddr, sk->skc_dport, proto }
/// rev = SOCK_REVNAT[key];                 if !rev: return 0
/// st = SOCK_STALE[(rev.svc_id, rev.backend_id)]; if !st: return 0
/// if tcp && !(st.flags & SOCK_STALE_TCP): return 0
/// if bpf_sock_destroy(sk) == 0: st.destroyed += 1 (atomic)
/// ```
fn program(proto: u8, revnat: RawFd, stale: RawFd, destroy_btf_id: u32) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_DW, 6, 1, 8, 0),
        insn(JEQ_K, 6, 0, 0, 0), // -> exit, patched below
        insn(MOV64_X, 1, 6, 0, 0),
        insn(CALL, 0, 0, 0, FN_GET_SOCKET_COOKIE),
        insn(STX_DW, 10, 0, -16, 0),
        insn(LDX_W, 2, 6, 0, 0),
        insn(STX_W, 10, 2, -8, 0),
        insn(LDX_H, 3, 6, 12, 0),
        insn(STX_H, 10, 3, -4, 0),
        insn(ST_B, 10, 0, -2, proto as i32),
        insn(ST_B, 10, 0, -1, 0),
        insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, revnat),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_X, 2, 10, 0, 0),
        insn(ADD64_K, 2, 0, 0, -16),
        insn(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM),
        insn(JEQ_K, 0, 0, 0, 0), // -> exit
        // svc_id and backend_id, adjacent at 8 as in a DrainKey (lb-common asserts it).
        insn(LDX_DW, 2, 0, 8, 0),
        insn(STX_DW, 10, 2, -24, 0),
        insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, stale),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_X, 2, 10, 0, 0),
        insn(ADD64_K, 2, 0, 0, -24),
        insn(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM),
        insn(JEQ_K, 0, 0, 0, 0), // -> exit
        insn(MOV64_X, 7, 0, 0, 0),
    ];
    if proto == IPPROTO_TCP {
        p.extend([insn(LDX_W, 1, 7, 0, 0), insn(AND64_K, 1, 0, 0, SOCK_STALE_TCP as i32), insn(JEQ_K, 1, 0, 0, 0)]);
    }
    p.extend([
        insn(MOV64_X, 1, 6, 0, 0),
        insn(CALL, 0, PSEUDO_KFUNC_CALL, 0, destroy_btf_id as i32),
        insn(JNE_K, 0, 0, 0, 0), // -> exit
        insn(MOV64_K, 1, 0, 0, 1),
        insn(ATOMIC_ADD_DW, 7, 1, 8, 0),
        insn(MOV64_K, 0, 0, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    // Every conditional jump with off 0 above goes to `r0 = 0; exit`.
    let exit = p.len() as i32 - 2;
    for (pc, i) in p.iter_mut().enumerate() {
        if matches!(i.code, JEQ_K | JNE_K) {
            i.off = (exit - pc as i32 - 1) as i16;
        }
    }
    p
}

// ---- bpf(2), for what aya has no API for: loading raw instructions. ----

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;

/// The `BPF_PROG_LOAD` part of `union bpf_attr`, up to `attach_btf_obj_fd`, padded to
/// the size the kernel accepts with trailing zeroes.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    attach_btf_obj_fd: u32,
    _pad: [u32; 9],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-initialised prefix of `union bpf_attr` for `cmd`, and
    // its size is passed; the kernel checks that bytes past what it knows are zero.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: these three commands return a new fd on success.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

fn load(iter: &'static str, attach_btf_id: u32, insns: &[Insn]) -> Result<OwnedFd, SockIterError> {
    let mut log = vec![0u8; 64 * 1024];
    let license = c"GPL";
    let mut name = [0u8; 16];
    let n = format!("lb_sk_{iter}");
    name[..n.len()].copy_from_slice(n.as_bytes());
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_TRACING,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_TRACE_ITER,
        attach_btf_id,
        ..Default::default()
    };
    bpf(BPF_PROG_LOAD, &mut attr).map_err(|source| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        // The verifier's last lines say why.
        let tail: Vec<&str> = text.lines().rev().take(6).collect();
        SockIterError::Load { iter, log: tail.into_iter().rev().collect::<Vec<_>>().join(" | "), source }
    })
}

fn link_create(prog_fd: RawFd) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        _rest: [u64; 6],
    }
    let mut attr =
        LinkCreate { prog_fd: prog_fd as u32, target_fd: 0, attach_type: BPF_TRACE_ITER, flags: 0, _rest: [0; 6] };
    bpf(BPF_LINK_CREATE, &mut attr)
}

fn iter_create(link_fd: RawFd) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct IterCreate {
        link_fd: u32,
        flags: u32,
    }
    let mut attr = IterCreate { link_fd: link_fd as u32, flags: 0 };
    bpf(BPF_ITER_CREATE, &mut attr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_on_the_exit() {
        for proto in [IPPROTO_UDP, IPPROTO_TCP] {
            let p = program(proto, 3, 4, 99);
            let exit = p.len() - 2;
            assert_eq!((p[exit].code, p[exit + 1].code), (MOV64_K, EXIT));
            for (pc, i) in p.iter().enumerate().filter(|(_, i)| matches!(i.code, JEQ_K | JNE_K)) {
                assert_eq!(pc as i64 + 1 + i.off as i64, exit as i64, "jump at {pc}");
            }
            let kfunc = p.iter().find(|i| i.code == CALL && i.regs >> 4 == PSEUDO_KFUNC_CALL).unwrap();
            assert_eq!(kfunc.imm, 99);
        }
    }
}
