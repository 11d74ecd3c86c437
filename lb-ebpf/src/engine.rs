//! The parse, lookup and NAT decision shared by `lb_xdp` and `lb_tc`. It reads the
//! packet, consults and updates the maps, and returns what to do; the entry points
//! apply it with their own rewrite and checksum mechanics.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_loop},
    maps::LruHashMap,
};
use lb_common::{
    AffinityKey4, AffinityValue, BackendKey, BackendValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_AFFINITY, CT_F_DRAINING,
    CT_F_FIN_FWD, CT_F_FIN_REPLY, CT_F_HAIRPIN, CT_F_REPLIED, CT_F_RST, CT_F_STATE, CtKey4, CtValue4, DrainKey,
    FragKey4, FragValue4, IPPROTO_TCP, IPPROTO_UDP, NO_BACKENDS_DROP, Reason, SVC_F_AFFINITY, ServiceKey4,
    ServiceValue, TABLE_LANES, hash, limits,
};

use crate::{
    maps::{AFFINITY, BACKENDS, CONNTRACK, DRAINING, FRAGS, SERVICES, TABLES, count, epoch_and_clock, prefilter_hit},
    parse::{
        ETH_P_IP, IPPROTO_ICMP, L3, L4, Packet, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN, parse_ipv4,
        parse_l2, parse_l4,
    },
};

/// Which hook runs the engine.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// XDP, or tc ingress: the full datapath.
    Ingress,
    /// tc egress of a pod interface: only replies of NATed flows are rewritten. They
    /// come from the node's own stack (a host-network backend on this node, which
    /// replies through the pod's interface rather than through any ingress hook).
    Egress,
}

/// Old and new values of the header fields a NAT rewrite may touch, all in network
/// byte order. Equal old and new means "leave it".
#[derive(Clone, Copy, Default)]
pub struct Rewrite {
    pub l3_off: usize,
    pub l4_off: usize,
    pub l4_csum_off: usize,
    pub proto: u8,
    pub saddr: (u32, u32),
    pub daddr: (u32, u32),
    pub sport: (u16, u16),
    pub dport: (u16, u16),
    /// The packet carries the L4 header: false for a fragment after the first, whose
    /// only rewrite is the addresses (the first fragment's L4 checksum, which covers
    /// the whole datagram, took the address change already).
    pub has_l4: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not ours, or nothing to do: hand the packet on unchanged.
    Pass,
    Drop,
    /// Rewrite the headers as `rw` says and hand the packet on.
    Nat,
    /// No backend and the service rejects: answer the client with ICMP port
    /// unreachable quoting the IPv4 header (`ip_hdr_len` bytes) and 8 bytes of L4.
    Reject,
}

/// What to do with a packet. A plain struct with every field always initialised,
/// rather than an enum with payloads: LLVM may copy a payload enum's unused bytes
/// through registers the verifier considers uninitialised ("R5 !read_ok").
#[derive(Clone, Copy)]
pub struct Action {
    pub kind: Kind,
    pub reason: Reason,
    pub svc_id: u32,
    /// For `Reject`.
    pub l3_off: usize,
    pub ip_hdr_len: usize,
    /// For `Nat`.
    pub rw: Rewrite,
}

impl Action {
    #[inline(always)]
    pub fn pass(reason: Reason) -> Self {
        Self { kind: Kind::Pass, reason, svc_id: 0, l3_off: 0, ip_hdr_len: 0, rw: Rewrite::default() }
    }
    #[inline(always)]
    pub fn drop(reason: Reason) -> Self {
        Self { kind: Kind::Drop, ..Self::pass(reason) }
    }
    #[inline(always)]
    fn nat(reason: Reason, svc_id: u32, rw: Rewrite) -> Self {
        Self { kind: Kind::Nat, svc_id, rw, ..Self::pass(reason) }
    }
    #[inline(always)]
    fn reject(l3_off: usize, ip_hdr_len: usize, svc_id: u32) -> Self {
        Self { kind: Kind::Reject, svc_id, l3_off, ip_hdr_len, ..Self::pass(Reason::NoBackendReject) }
    }
}

#[inline(always)]
fn backend_at(svc_id: u32, slot: u32) -> Option<BackendValue> {
    unsafe { BACKENDS.get(&BackendKey { svc_id, slot }) }.copied()
}

/// State of one slot scan, on the caller's stack, shared with `scan_slot`.
#[repr(C)]
struct Scan {
    svc_id: u32,
    /// The backend id to find.
    want_id: u32,
    /// Slot of the result; 0: none yet.
    found_slot: u32,
    found: BackendValue,
}

/// One `bpf_loop` iteration over slot `index + 1`. Returns 1 to stop early.
///
/// The scan runs through `bpf_loop` (kernel 5.17+) rather than a bounded `for`: the
/// verifier checks a callback once, whereas it walks every iteration of an unrolled
/// loop, which at the backend limit would exceed its 1M-instruction budget.
extern "C" fn scan_slot(index: u64, ctx: *mut c_void) -> i64 {
    let scan = unsafe { &mut *(ctx as *mut Scan) };
    let slot = index as u32 + 1;
    match backend_at(scan.svc_id, slot) {
        Some(b) if b.backend_id == scan.want_id => {
            scan.found_slot = slot;
            scan.found = b;
            1
        }
        _ => 0,
    }
}

/// Slot and value of backend `want_id` in slots 1..=count of `svc_id`. O(count), but
/// only for a flow or affinity entry whose backend the agent moved to another slot
/// (when a removal left a hole), once: the caller remembers the slot found.
#[inline(always)]
fn scan(svc_id: u32, count: u32, want_id: u32) -> Option<(u32, BackendValue)> {
    let mut st = Scan { svc_id, want_id, found_slot: 0, found: BackendValue::default() };
    let n = if count > limits::MAX_BACKENDS_PER_SERVICE { limits::MAX_BACKENDS_PER_SERVICE } else { count };
    unsafe {
        bpf_loop(n, scan_slot as *mut c_void, &mut st as *mut Scan as *mut c_void, 0);
    }
    if st.found_slot == 0 { None } else { Some((st.found_slot, st.found)) }
}

/// Where backend `backend_id` of `svc_id` stands now: at `hint_slot` (its slot when the
/// flow started) or, after the agent rearranged slots, anywhere in 1..=count.
#[inline(always)]
fn find_backend(
    svc_id: u32,
    backend_id: u32,
    hint_slot: u32,
    svc: Option<&ServiceValue>,
) -> Option<(u32, BackendValue)> {
    if let Some(b) = backend_at(svc_id, hint_slot)
        && b.backend_id == backend_id
    {
        return Some((hint_slot, b));
    }
    if backend_id == 0 {
        return None;
    }
    scan(svc_id, svc?.count, backend_id)
}

/// The service's lookup table: one array read names the slot of the flow's bucket
/// (`lb_common::hash::bucket`), whatever the number of backends; then its backend.
#[inline(always)]
pub fn pick_backend(svc: &ServiceValue, flow: u32) -> Option<(u32, BackendValue)> {
    let bucket = hash::bucket(flow, svc.table_size);
    let word = TABLES.get(svc.table_off.wrapping_add(bucket / TABLE_LANES))?;
    let slot = ((*word >> (16 * (bucket % TABLE_LANES))) & 0xffff) as u32;
    Some((slot, backend_at(svc.id, slot)?))
}

/// The backend of a new connection to `svc`: an affinity entry's (`aff`: the map and
/// the client's key) while it is live and its backend still in the service, else the
/// lookup table's bucket of `flow`; an affinity entry remembers the choice when
/// `record`. The one scheduler of the per-packet path (clients by IP) and of the
/// socket LB (clients by network namespace, sock.rs).
///
/// `record` is false for an established TCP flow found without its conntrack entry
/// (evicted): it is re-picked, but it is no new connection, so it neither refreshes
/// the client's entry nor, when that was evicted too, writes one. Written, a re-pick
/// by the flow's hash would move the client's other established connections, found
/// evicted later, to the backend this one hashes to (tests/faults_maps.rs).
#[inline(always)]
pub fn schedule<K>(
    svc: &ServiceValue,
    flow: u32,
    aff: Option<(&LruHashMap<K, AffinityValue>, &K)>,
    record: bool,
) -> Option<(u32, BackendValue)> {
    let mut chosen = None;
    let mut now = 0;
    if let Some((map, key)) = aff {
        now = unsafe { bpf_ktime_get_ns() };
        // Refreshed by every new connection, not by the packets of one: kube-proxy's
        // `-m recent --rcheck --seconds T` in KUBE-SVC-* and `--set` in KUBE-SEP-* sit
        // in the nat table, which sees only a connection's first packet
        // (pkg/proxy/iptables/proxier.go), so T counts from the client's last new
        // connection to the Service.
        if let Some(a) = unsafe { map.get(key) }.copied() {
            let timeout_ns = svc.affinity_timeout_s as u64 * 1_000_000_000;
            if now.wrapping_sub(a.last_used_ns) > timeout_ns {
                count(Reason::AffinityExpired, 0);
            } else if let Some(found) = find_backend(svc.id, a.backend_id, a.slot, Some(svc)) {
                count(Reason::AffinityHit, 0);
                chosen = Some(found);
            } else {
                count(Reason::AffinityStale, 0);
            }
        } else {
            count(Reason::AffinityMiss, 0);
        }
    }
    let (slot, backend) = match chosen {
        Some(c) => c,
        None => pick_backend(svc, flow)?,
    };
    if let Some((map, key)) = aff
        && record
    {
        let v = AffinityValue { last_used_ns: now, backend_id: backend.backend_id, slot };
        if map.insert(key, &v, 0).is_err() {
            count(Reason::MapInsertFailed, 0);
        }
    }
    Some((slot, backend))
}

#[inline(always)]
fn ct_key(l3: &L3, l4: &L4) -> CtKey4 {
    CtKey4::new(l3.saddr_be, l3.daddr_be, l4.sport_be, l4.dport_be, l3.proto)
}

/// Benchmarks only: when the loader sets this to 1, conntrack hits are ignored, so that
/// `BPF_PROG_TEST_RUN` with `repeat` measures the new-flow path on every repetition
/// (the lookup still happens, so its cost is included). It lives in .rodata, which the
/// kernel freezes: with the default 0 the verifier prunes the branch as dead code, so
/// production programs pay nothing for it.
#[unsafe(no_mangle)]
static BENCH_CT_BYPASS: u8 = 0;

pub fn process<C: Packet>(ctx: &C, hook: Hook) -> Action {
    let Some(l2) = parse_l2(ctx) else {
        return Action::pass(Reason::PassMalformedL3);
    };
    if l2.ether_type != ETH_P_IP {
        return Action::pass(Reason::PassNotIpv4);
    }
    let Some(l3) = parse_ipv4(ctx, l2.l3_off) else {
        return Action::pass(Reason::PassMalformedL3);
    };
    let not_ours = if hook == Hook::Egress { Reason::PassEgress } else { Reason::PassNotService };
    // The prefilter: a clear bit is "certainly no ClusterIP" / "certainly no backend",
    // answered from two array reads without hashing a key. The agent sets the bits of
    // every ClusterIP and of every backend (slots and draining) before the entries
    // that need them. A packet can be ours only as a packet to a ClusterIP (forward,
    // ingress only) or from a backend (a reply, on either hook).
    let to_vip = hook == Hook::Ingress && prefilter_hit(l3.daddr_be, false);
    let from_backend = prefilter_hit(l3.saddr_be, true);
    let is_vip = || to_vip && unsafe { SERVICES.get(&ServiceKey4::address_marker(l3.daddr_be)) }.is_some();

    if l3.proto != IPPROTO_TCP && l3.proto != IPPROTO_UDP {
        // An ICMP error quoting a NATed flow is translated in place (icmp.rs) and then
        // handed on as it is; any other ICMP keeps the verdicts below.
        if l3.proto == IPPROTO_ICMP
            && let Some(svc_id) = crate::icmp::translate_error(ctx, l2.l3_off, &l3)
        {
            return Action { svc_id: svc_id.get(), ..Action::pass(Reason::IcmpErrorNat) };
        }
        if !is_vip() {
            return Action::pass(not_ours);
        }
        return Action::pass(if l3.proto == IPPROTO_ICMP { Reason::PassIcmp } else { Reason::PassOtherProto });
    }
    if !to_vip && !from_backend {
        return Action::pass(not_ours);
    }
    let l4_off = l2.l3_off + l3.hdr_len;
    let frag_key =
        FragKey4 { src_addr_be: l3.saddr_be, dst_addr_be: l3.daddr_be, id_be: l3.id_be, proto: l3.proto, _pad: 0 };
    let l4 = if l3.later_fragment {
        // No ports in this fragment: take the first fragment's, as Cilium does
        // (bpf/lib/ipv4.h, ipv4_handle_fragmentation). Without them no frontend or flow
        // can be matched; we do no reassembly.
        match unsafe { FRAGS.get(&frag_key) } {
            Some(f) => {
                count(Reason::FragTracked, 0);
                L4 { off: l4_off, sport_be: f.src_port_be, dport_be: f.dst_port_be, tcp_flags: 0, csum_off: 0 }
            }
            None => return if is_vip() { Action::drop(Reason::DropFragment) } else { Action::pass(not_ours) },
        }
    } else {
        match parse_l4(ctx, l4_off, l3.proto) {
            Some(l4) => l4,
            None => {
                return if is_vip() { Action::drop(Reason::DropMalformedL4) } else { Action::pass(not_ours) };
            }
        }
    };
    let action = flow(&l3, &l4, l2.l3_off, hook, not_ours, to_vip, is_vip);
    if l3.fragment && !l3.later_fragment && action.kind == Kind::Nat {
        // The first fragment of a datagram we NAT: its later fragments will need the ports.
        let f = FragValue4 { src_port_be: l4.sport_be, dst_port_be: l4.dport_be };
        if FRAGS.insert(&frag_key, &f, 0).is_err() {
            count(Reason::MapInsertFailed, 0);
        }
    }
    action
}

/// Now, in conntrack ticks (`lb_common::ct_tick`: seconds of jiffies). `bpf_jiffies64`
/// is inlined by the verifier (a load of `jiffies_64`); the agent's collector reads
/// the same clock from /proc/timer_list.
#[inline(always)]
fn now_tick(jiffy_recip: u32) -> u32 {
    lb_common::ct_tick(unsafe { aya_ebpf::helpers::generated::bpf_jiffies64() }, jiffy_recip)
}

#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one call site; what process() found")]
fn flow(
    l3: &L3,
    l4: &L4,
    l3_off: usize,
    hook: Hook,
    not_ours: Reason,
    maybe_vip: bool,
    is_vip: impl Fn() -> bool,
) -> Action {
    let key = ct_key(l3, l4);
    let ct = CONNTRACK.get_ptr_mut(&key);
    // SAFETY: a plain read of a constant the loader may set.
    let bypass = unsafe { core::ptr::read_volatile(&BENCH_CT_BYPASS) } != 0;
    // A SYN starts a new connection even when its 5-tuple is still in conntrack (the
    // client reused a source port): it is scheduled afresh, so that a change of
    // affinity or of the backend set since the old connection takes effect. A
    // retransmitted SYN schedules to the same backend, as the choice is a pure function
    // of the flow, the backend set and the affinity entry.
    let syn = l3.proto == IPPROTO_TCP && l4.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    let mut now = 0;
    // Read before any backend lookup: a backend found under this epoch existed when it
    // was current (the agent removes, then bumps).
    let (epoch, jiffy_recip) = epoch_and_clock();
    if let Some(ctp) = ct
        && !bypass
    {
        // SAFETY: a pointer into the map's value, valid for this program run.
        let ct = unsafe { *ctp };
        now = now_tick(jiffy_recip);
        if ct.expired(l3.proto, now) {
            // netfilter's conntrack would have forgotten this flow by now; so do we.
            let _ = CONNTRACK.remove(&key);
            count(Reason::CtExpired, 0);
        } else if !(syn && ct.dir == CT_DIR_FORWARD) && (hook == Hook::Ingress || ct.dir == CT_DIR_REPLY) {
            match established(l3, l4, &key, &ct, ctp, l3_off, epoch) {
                Some(action) => {
                    if action.kind == Kind::Nat {
                        track(ctp, &key, &ct, l3.proto, l4.tcp_flags, now);
                    }
                    return action;
                }
                None => {
                    // The flow's backend is gone and this packet may start a new flow.
                    let _ = CONNTRACK.remove(&key);
                    forget_reply_half(&key, &ct);
                    count(Reason::CtStaleRescheduled, 0);
                }
            }
        } else if syn && ct.dir == CT_DIR_FORWARD {
            forget_reply_half(&key, &ct);
        }
    }
    if hook == Hook::Egress {
        return Action::pass(not_ours);
    }

    // The frontend first: a packet the prefilter lets through here is most likely for
    // a ClusterIP's port, and then that is the only `SERVICES` lookup; the address
    // marker only tells the rest (another port of a ClusterIP, or no ClusterIP).
    let svc_key = ServiceKey4::new(l3.daddr_be, l4.dport_be, l3.proto);
    let found = if maybe_vip { unsafe { SERVICES.get(&svc_key) }.copied() } else { None };
    let Some(svc) = found else {
        return Action::pass(if is_vip() { Reason::PassUnknownPort } else { not_ours });
    };
    if now == 0 {
        now = now_tick(jiffy_recip);
    }
    new_flow(l3, l4, &key, &svc, l3_off, syn, now, epoch)
}

/// Deletes the reply half of the forward entry `ct` (under `key`) that a new flow is
/// about to replace (a SYN on a reused 5-tuple, a UDP flow whose backend is gone), if it
/// still is that flow's. Left behind, it would reverse-NAT the old backend's stray
/// packets, and `track` would write the old flow's state into the new flow's forward
/// half (found by the fuzzer, `cargo xtask fuzz`). `new_flow` writes the new reply half
/// after this, also when it has the same key.
#[inline(always)]
fn forget_reply_half(key: &CtKey4, ct: &CtValue4) {
    let (rkey, _) = ct.other_half(key);
    if let Some(r) = unsafe { CONNTRACK.get(&rkey) }
        && r.dir == CT_DIR_REPLY
        && r.svc_id == ct.svc_id
        && r.backend_id == ct.backend_id
    {
        let _ = CONNTRACK.remove(&rkey);
    }
}

/// State bits a packet of direction `dir` with TCP flags `tcp_flags` adds.
#[inline(always)]
fn state_bits(dir: u8, proto: u8, tcp_flags: u8) -> u8 {
    let mut f = if dir == CT_DIR_REPLY { CT_F_REPLIED } else { 0 };
    if proto == IPPROTO_TCP {
        if tcp_flags & TCP_FLAG_RST != 0 {
            f |= CT_F_RST;
        }
        if tcp_flags & TCP_FLAG_FIN != 0 {
            f |= if dir == CT_DIR_REPLY { CT_F_FIN_REPLY } else { CT_F_FIN_FWD };
        }
    }
    f
}

/// Moves a flow's state and refresh time, in both halves, when either has changed:
/// at most one write per half per tick (1.07 s) for a busy flow, and one per state change
/// (first reply, FIN, RST). Touching the other half keeps the LRU from evicting it
/// while this one lives; a half found missing is re-created from this one.
#[inline(always)]
fn track(ctp: *mut CtValue4, key: &CtKey4, ct: &CtValue4, proto: u8, tcp_flags: u8, now: u32) {
    let flags = ct.flags | state_bits(ct.dir, proto, tcp_flags);
    if flags == ct.flags && ct.seen == now {
        return;
    }
    // SAFETY: the map value this packet's lookup returned; plain stores. The bits are
    // or-ed in: `established` may have just rewritten the entry's other flags.
    unsafe {
        (*ctp).flags |= flags & CT_F_STATE;
        (*ctp).seen = now;
    }
    let (okey, oval) = ct.other_half(key);
    match CONNTRACK.get_ptr_mut(&okey) {
        Some(o) => unsafe {
            (*o).flags = ((*o).flags & !CT_F_STATE) | (flags & CT_F_STATE);
            (*o).seen = now;
        },
        None => {
            let v = CtValue4 { flags, seen: now, ..oval };
            if CONNTRACK.insert(&okey, &v, 0).is_ok() {
                count(Reason::CtRecovered, 0);
            } else {
                count(Reason::MapInsertFailed, 0);
            }
        }
    }
}

#[inline(always)]
fn established(
    l3: &L3,
    l4: &L4,
    key: &CtKey4,
    ct: &CtValue4,
    ctp: *mut CtValue4,
    l3_off: usize,
    epoch: u32,
) -> Option<Action> {
    if ct.dir == CT_DIR_REPLY {
        let client = if ct.flags & CT_F_HAIRPIN != 0 { key.src_addr_be } else { key.dst_addr_be };
        return Some(Action::nat(
            Reason::RevNat,
            ct.svc_id,
            Rewrite {
                l3_off,
                l4_off: l4.off,
                l4_csum_off: l4.csum_off,
                proto: l3.proto,
                saddr: (l3.saddr_be, ct.nat_addr_be),
                daddr: (l3.daddr_be, client),
                sport: (l4.sport_be, ct.nat_port_be),
                dport: (l4.dport_be, l4.dport_be),
                has_l4: !l3.later_fragment,
            },
        ));
    }
    let hairpin = ct.flags & CT_F_HAIRPIN != 0;
    if ct.epoch == epoch {
        // No backend has been removed since this entry's backend was last found: it
        // is still there, and the entry holds its address.
        let reason = if ct.flags & CT_F_DRAINING != 0 { Reason::FwdDraining } else { Reason::FwdEstablished };
        let b =
            BackendValue { backend_id: ct.backend_id, addr_be: ct.nat_addr_be, port_be: ct.nat_port_be, _pad: [0; 2] };
        return Some(Action::nat(reason, ct.svc_id, forward_rewrite(l3, l4, l3_off, &b, hairpin)));
    }
    // Forward: the flow keeps its backend for as long as that backend is in the service.
    let mut slot = ct.slot;
    let backend = if let Some(b) = backend_at(ct.svc_id, ct.slot)
        && b.backend_id == ct.backend_id
    {
        Some(b)
    } else {
        let svc_key = ServiceKey4::new(l3.daddr_be, l4.dport_be, l3.proto);
        let svc = unsafe { SERVICES.get(&svc_key) };
        find_backend(ct.svc_id, ct.backend_id, ct.slot, svc).map(|(s, b)| {
            slot = s;
            b
        })
    };
    let mut reason = Reason::FwdEstablished;
    let backend = match backend {
        Some(b) => b,
        None => {
            if l3.proto == IPPROTO_UDP {
                // kube-proxy flushes UDP conntrack entries of removed endpoints, so the
                // next datagram is balanced afresh; so do we.
                return None;
            }
            // A pod that left the endpoints but still exists (terminating, unready)
            // keeps its established connections, as under kube-proxy; so does a
            // backend of a deleted Service, whose flows kube-proxy's conntrack keeps.
            match unsafe { DRAINING.get(&DrainKey { svc_id: ct.svc_id, backend_id: ct.backend_id }) } {
                Some(b) => {
                    reason = Reason::FwdDraining;
                    *b
                }
                None => return Some(Action::drop(Reason::DropBackendGone)),
            }
        }
    };
    // Found under this epoch: the next packets skip the lookups until the agent removes
    // a backend again. (The backend's address cannot have changed: an id names one
    // address and port.)
    // SAFETY: the map value this packet's lookup returned; plain stores.
    unsafe {
        (*ctp).epoch = epoch;
        (*ctp).slot = slot;
        (*ctp).flags = if reason == Reason::FwdDraining { ct.flags | CT_F_DRAINING } else { ct.flags & !CT_F_DRAINING };
    }
    Some(Action::nat(reason, ct.svc_id, forward_rewrite(l3, l4, l3_off, &backend, hairpin)))
}

#[inline(always)]
fn forward_rewrite(l3: &L3, l4: &L4, l3_off: usize, b: &BackendValue, hairpin: bool) -> Rewrite {
    Rewrite {
        l3_off,
        l4_off: l4.off,
        l4_csum_off: l4.csum_off,
        proto: l3.proto,
        // Hairpin: the reply must leave the pod, so it has to be addressed to the
        // ClusterIP rather than to the pod itself.
        saddr: (l3.saddr_be, if hairpin { l3.daddr_be } else { l3.saddr_be }),
        daddr: (l3.daddr_be, b.addr_be),
        sport: (l4.sport_be, l4.sport_be),
        dport: (l4.dport_be, b.port_be),
        has_l4: !l3.later_fragment,
    }
}

#[expect(clippy::too_many_arguments, reason = "one call site; the packet and the state read before")]
#[inline(always)]
fn new_flow(
    l3: &L3,
    l4: &L4,
    key: &CtKey4,
    svc: &ServiceValue,
    l3_off: usize,
    syn: bool,
    tick: u32,
    epoch: u32,
) -> Action {
    if svc.count == 0 {
        return if svc.no_backends == NO_BACKENDS_DROP {
            Action::drop(Reason::NoBackendDrop)
        } else {
            Action::reject(l3_off, l3.hdr_len, svc.id)
        };
    }
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let aff_key = AffinityKey4 { svc_id: svc.id, client_addr_be: l3.saddr_be };
    // The 5-tuple even with affinity: once a client's entry has expired, its next
    // connection must be free to land on another pod, as with kube-proxy (the e2e
    // "session affinity timeout" test checks exactly that); the entry then keeps the
    // client's later connections on the pod chosen here.
    let flow = hash::flow_hash(l3.saddr_be, l3.daddr_be, l4.sport_be, l4.dport_be, l3.proto);
    let midflow = l3.proto == IPPROTO_TCP && !syn;
    // count > 0 but no slot found: the agent is mid-update; treat as empty.
    let Some((slot, backend)) = schedule(svc, flow, affinity.then_some((&AFFINITY, &aff_key)), !midflow) else {
        return Action::drop(Reason::NoBackendDrop);
    };

    let hairpin = backend.addr_be == l3.saddr_be;
    let mut flags = if affinity { CT_F_AFFINITY } else { 0 };
    if hairpin {
        flags |= CT_F_HAIRPIN;
    }
    if midflow {
        // Mid-connection with no entry: it was evicted or expired. The backend chosen
        // is the one the flow had as long as the backend set is unchanged (the choice
        // is a pure function of the 5-tuple); take the flow as established.
        count(Reason::CtMidflowMiss, 0);
        flags |= CT_F_REPLIED;
    }
    flags |= state_bits(CT_DIR_FORWARD, l3.proto, l4.tcp_flags);
    let fwd = CtValue4 {
        nat_addr_be: backend.addr_be,
        nat_port_be: backend.port_be,
        dir: CT_DIR_FORWARD,
        flags,
        svc_id: svc.id,
        backend_id: backend.backend_id,
        slot,
        seen: tick,
        epoch,
        created: tick,
    };
    let (reply_key, reply) = fwd.other_half(key);
    if CONNTRACK.insert(key, &fwd, 0).is_err() || CONNTRACK.insert(&reply_key, &reply, 0).is_err() {
        count(Reason::MapInsertFailed, 0);
    }
    Action::nat(Reason::FwdNew, svc.id, forward_rewrite(l3, l4, l3_off, &backend, hairpin))
}
