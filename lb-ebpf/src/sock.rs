//! Socket-level load balancing: cgroup v2 `sock_addr` hooks that translate a ClusterIP
//! once, in the socket call, for every process of the cgroup subtree they are attached
//! to (a node's pods and its host-network processes), as Cilium's socket LB and
//! Calico's connect-time LB do. The kernel then routes to the backend directly: no
//! packet of the connection is parsed, looked up or rewritten again, and no conntrack
//! entry is made (docs/datapath.md, "Socket LB").
//!
//! - `lb_connect4`: connect() of a TCP or UDP socket to a frontend: the destination is
//!   rewritten to the backend `engine::schedule` picks (the per-packet path's
//!   scheduler and lookup table), and the socket is remembered in `SOCK_REVNAT`.
//! - `lb_sendmsg4`: the same for each datagram of an unconnected UDP socket.
//! - `lb_recvmsg4`, `lb_getpeername4`: the address the kernel is about to show the
//!   application, if it is a backend this socket was sent to, becomes the ClusterIP.
//!
//! The hooks run in process context on the caller's CPU, before any packet exists
//! (net/ipv4/af_inet.c, `__inet_stream_connect` via `BPF_CGROUP_RUN_PROG_INET4_CONNECT`;
//! net/ipv4/udp.c, `udp_sendmsg` and `udp_recvmsg`; `inet_getname`).

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, generated::bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP, NO_BACKENDS_DROP, Reason, SVC_F_AFFINITY, ServiceKey4, SockAffinityKey, SockRevKey4,
    SockRevValue4, hash,
};

use crate::{
    engine::schedule,
    maps::{SERVICES, SOCK_AFFINITY, SOCK_REVNAT, count, count_sock_service, prefilter_hit},
};

/// A `sock_addr` program's verdict: 1 lets the call go on (with the address as the
/// program left it), 0 fails it with EPERM or the errno `bpf_set_retval` set
/// (kernel/bpf/cgroup.c, `__cgroup_bpf_run_filter_sock_addr`).
const ALLOW: i32 = 1;
const DENY: i32 = 0;
/// include/uapi/asm-generic/errno.h.
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    xlate_fwd(&ctx, Reason::SockConnect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    xlate_fwd(&ctx, Reason::SockSendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    xlate_rev(&ctx);
    // recvmsg and getpeername cannot be failed by the hook (the kernel ignores it).
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    xlate_rev(&ctx);
    ALLOW
}

/// The socket's address fields: (`user_ip4`, `user_port`, `protocol`). `user_port`
/// holds the port in network byte order in its low 16 bits, like the `_be` ports of
/// packets (include/uapi/linux/bpf.h, `struct bpf_sock_addr`).
#[inline(always)]
fn addr(ctx: &SockAddrContext) -> (u32, u16, u8) {
    // SAFETY: the context the kernel passed; the verifier checks each field access.
    unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port as u16, (*ctx.sock_addr).protocol as u8) }
}

#[inline(always)]
fn set_addr(ctx: &SockAddrContext, addr_be: u32, port_be: u16) {
    // SAFETY: as in `addr`; both fields are writable in these four hooks.
    unsafe {
        (*ctx.sock_addr).user_ip4 = addr_be;
        (*ctx.sock_addr).user_port = port_be as u32;
    }
}

#[inline(always)]
fn xlate_fwd(ctx: &SockAddrContext, verdict: Reason) -> i32 {
    let (vip, port_be, proto) = addr(ctx);
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) || !prefilter_hit(vip, false) {
        count(Reason::SockPass, 0);
        return ALLOW;
    }
    let Some(svc) = (unsafe { SERVICES.get(&ServiceKey4::new(vip, port_be, proto)) }).copied() else {
        count(Reason::SockPass, 0);
        return ALLOW;
    };
    if svc.count == 0 {
        if svc.no_backends == NO_BACKENDS_DROP {
            // Left as it is: its packets meet the per-packet path, which drops them
            // (or, from a host-network process, nobody answers), as a drop should.
            count(Reason::SockPass, 0);
            return ALLOW;
        }
        // kube-proxy's REJECT answers the SYN with ICMP port unreachable, which the
        // client sees as ECONNREFUSED; here connect() (or sendmsg()) returns it at once.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        count(Reason::SockRefused, 0);
        return DENY;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // The socket stands for the 5-tuple, which has no source port yet: a new socket is
    // a new connection, and an unconnected UDP socket keeps its backend while the
    // backend set is unchanged (as its conntrack entry would).
    let flow = hash::flow_hash(cookie as u32, vip, (cookie >> 32) as u16, port_be, proto);
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let aff_key = SockAffinityKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) },
        svc_id: svc.id,
        _pad: 0,
    };
    let Some((_, backend)) = schedule(&svc, flow, affinity.then_some((&SOCK_AFFINITY, &aff_key)), true) else {
        // count > 0 but no slot found: the agent is mid-update. Untranslated, the
        // per-packet path sees it (for a pod) once the update is done.
        count(Reason::SockPass, 0);
        return ALLOW;
    };
    let key =
        SockRevKey4 { cookie, backend_addr_be: backend.addr_be, backend_port_be: backend.port_be, proto, _pad: 0 };
    let value = SockRevValue4 {
        vip_addr_be: vip,
        vip_port_be: port_be,
        _pad: 0,
        svc_id: svc.id,
        backend_id: backend.backend_id,
    };
    // An unconnected socket sends many datagrams to one backend: write once.
    if unsafe { SOCK_REVNAT.get(&key) } != Some(&value) && SOCK_REVNAT.insert(&key, &value, 0).is_err() {
        count(Reason::MapInsertFailed, 0);
    }
    set_addr(ctx, backend.addr_be, backend.port_be);
    count(verdict, 0);
    count_sock_service(svc.id);
    ALLOW
}

#[inline(always)]
fn xlate_rev(ctx: &SockAddrContext) {
    let (addr_be, port_be, proto) = addr(ctx);
    // Only a backend's address can be in `SOCK_REVNAT`: the prefilter's backend half
    // answers "no" for every other without hashing a key. Draining backends keep their
    // bits, so a connection that outlives its backend's removal still reads right.
    if !prefilter_hit(addr_be, true) {
        count(Reason::SockPass, 0);
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SockRevKey4 { cookie, backend_addr_be: addr_be, backend_port_be: port_be, proto, _pad: 0 };
    match unsafe { SOCK_REVNAT.get(&key) } {
        Some(v) => {
            set_addr(ctx, v.vip_addr_be, v.vip_port_be);
            count(Reason::SockRevNat, 0);
        }
        None => count(Reason::SockPass, 0),
    }
}
