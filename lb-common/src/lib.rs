//! Types shared by the lb datapath (`lb-ebpf`) and the node agent (`lb-userspace`).
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, has its padding written out as
//! named fields (so that the bytes the kernel hashes are always initialised), and has
//! a `const` size assertion. Fields in network byte order carry a `_be` suffix.
//!
//! IPv4 maps carry a `4` in their pinned names; IPv6 gets its own `*6` maps with
//! 16-byte addresses and the same value types, as Cilium's `lb4_*`/`lb6_*` maps do.
#![no_std]

pub mod hash;

/// Bumped whenever the layout of any pinned map changes. The agent never reuses a
/// pinned map whose name carries another version (see `map_names`): it migrates the
/// state of the previous version into fresh maps (lb-userspace/src/datapath/upgrade.rs,
/// which holds one converter per map for `MAP_LAYOUT_VERSION - 1`), and refuses to
/// start over a newer one.
///
/// v6: `CtValue4::created`.
pub const MAP_LAYOUT_VERSION: u32 = 6;

/// Pinned map names (at most 15 bytes, `BPF_OBJ_NAME_LEN - 1`). The `_v6` suffix is
/// [`MAP_LAYOUT_VERSION`]; change both together (and the `#[map(name)]`s in lb-ebpf).
pub mod map_names {
    pub const SERVICES: &str = "lb4_svc_v6";
    pub const BACKENDS: &str = "lb4_be_v6";
    pub const DRAINING: &str = "lb4_drain_v6";
    pub const AFFINITY: &str = "lb4_aff_v6";
    pub const CONNTRACK: &str = "lb4_ct_v6";
    pub const STATS: &str = "lb_stats_v6";
    pub const SVC_STATS: &str = "lb4_svcst_v6";
    pub const FRAGS: &str = "lb4_frag_v6";
    pub const IDS: &str = "lb_ids_v6";
    pub const TABLES: &str = "lb4_tbl_v6";
    pub const PREFILTER: &str = "lb4_pref_v6";
    /// Socket LB: (socket cookie, backend) -> the ClusterIP the socket asked for.
    pub const SOCK_REVNAT: &str = "lb4_skrev_v6";
    /// Socket LB: (network namespace cookie, service id) -> affinity backend.
    pub const SOCK_AFFINITY: &str = "lb4_skaff_v6";
    /// Socket LB: service id -> per-CPU translations.
    pub const SOCK_SVC_STATS: &str = "lb4_sksvc_v6";
    /// Socket LB: (service id, backend id) pairs whose sockets are to be closed.
    pub const SOCK_STALE: &str = "lb4_skstl_v6";
    /// Every pinned map, for clean-up and layout checks.
    pub const ALL: [&str; 15] = [
        SERVICES,
        BACKENDS,
        DRAINING,
        AFFINITY,
        CONNTRACK,
        STATS,
        SVC_STATS,
        FRAGS,
        IDS,
        TABLES,
        PREFILTER,
        SOCK_REVNAT,
        SOCK_AFFINITY,
        SOCK_SVC_STATS,
        SOCK_STALE,
    ];
    /// Prefixes shared by every version of our maps, to recognise stale layouts.
    pub const PREFIXES: [&str; 15] = [
        "lb4_svc_v",
        "lb4_be_v",
        "lb4_drain_v",
        "lb4_aff_v",
        "lb4_ct_v",
        "lb_stats_v",
        "lb4_svcst_v",
        "lb4_frag_v",
        "lb_ids_v",
        "lb4_tbl_v",
        "lb4_pref_v",
        "lb4_skrev_v",
        "lb4_skaff_v",
        "lb4_sksvc_v",
        "lb4_skstl_v",
    ];
}

/// Default `max_entries` of each map; the agent may override them at load time.
pub mod limits {
    /// Frontends (ClusterIP, port, protocol), plus one address marker per ClusterIP.
    pub const SERVICES: u32 = 262_144;
    /// Backend slots over all services.
    pub const BACKENDS: u32 = 1_048_576;
    /// Backends that have left their service's slots but still exist (terminating, or
    /// not ready), over all services.
    pub const DRAINING: u32 = 262_144;
    pub const AFFINITY: u32 = 262_144;
    /// Each connection takes two entries (forward and reverse).
    pub const CONNTRACK: u32 = 524_288;
    /// Datagrams in flight as fragments (first fragment seen, later ones expected).
    pub const FRAGS: u32 = 8_192;
    /// Service ids run 1..SVC_STATS; id 0 is "unset".
    pub const SVC_STATS: u32 = 262_144;
    /// Most backends one service may have. New flows pick through the service's
    /// lookup table in O(1) whatever the count; slots are u16 in the table
    /// ([`TABLE_LANES`](super::TABLE_LANES)), and a conntrack or affinity entry whose
    /// backend moved slot is found again by a scan of at most this many slots.
    pub const MAX_BACKENDS_PER_SERVICE: u32 = 8192;
    /// 64-bit words of `TABLES`, shared by every service's lookup table (4 buckets a
    /// word): 32 MiB, 16.7 million buckets, e.g. 10,000 services of 10 backends twice
    /// over (a table is written anew beside the old one on every change).
    pub const TABLE_WORDS: u32 = 1 << 22;
    /// Sockets the socket LB translated, one entry per (socket, backend): connected
    /// sockets and unconnected UDP sockets alike. An LRU: entries of closed sockets age
    /// out (a cookie is never reused).
    pub const SOCK_REVNAT: u32 = 262_144;
    /// Network namespaces x affinity services the socket LB remembers a backend for.
    pub const SOCK_AFFINITY: u32 = 65_536;
    /// (service, backend) pairs the agent asks the socket iterator to close at once.
    pub const SOCK_STALE: u32 = 4_096;
}

/// Buckets (u16 slot numbers) per `TABLES` word.
pub const TABLE_LANES: u32 = 4;

/// The prefilter: two bitmaps of 2^[`PREFILTER_BITS_LOG2`] bits, one over the
/// ClusterIPs (words `0..PREFILTER_HALF_WORDS`) and one over the backend addresses
/// (the rest), each address setting the bit [`prefilter_bit`] names. A clear bit means
/// "certainly not ours"; a set bit only "maybe" (addresses share bits).
pub const PREFILTER_BITS_LOG2: u32 = 20;
/// 64-bit words in each half of `PREFILTER`.
pub const PREFILTER_HALF_WORDS: u32 = 1 << (PREFILTER_BITS_LOG2 - 6);
/// `PREFILTER`'s size in words.
pub const PREFILTER_WORDS: u32 = 2 * PREFILTER_HALF_WORDS;

/// The prefilter bit of an address (network byte order), in 0..2^PREFILTER_BITS_LOG2.
#[inline(always)]
pub const fn prefilter_bit(addr_be: u32) -> u32 {
    hash::fmix32(addr_be ^ 0x9e37_79b9) >> (32 - PREFILTER_BITS_LOG2)
}

/// `PREFILTER` word index and bit mask of `addr_be` in the ClusterIP half (`backend`
/// false) or the backend half.
#[inline(always)]
pub const fn prefilter_word(addr_be: u32, backend: bool) -> (u32, u64) {
    let bit = prefilter_bit(addr_be);
    ((bit >> 6) + if backend { PREFILTER_HALF_WORDS } else { 0 }, 1u64 << (bit & 63))
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// `SERVICES` key: one frontend. A key with `port_be == 0 && proto == 0` is the
/// address marker the agent writes once per ClusterIP, so that the datapath can tell
/// "a ClusterIP, but not one of its ports" and give fragments and malformed packets
/// to a ClusterIP their own verdicts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey4 {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey4>() == 8);

impl ServiceKey4 {
    pub const fn new(addr_be: u32, port_be: u16, proto: u8) -> Self {
        Self { addr_be, port_be, proto, _pad: 0 }
    }
    pub const fn address_marker(addr_be: u32) -> Self {
        Self::new(addr_be, 0, 0)
    }
}

/// `ServiceValue::flags`: ClientIP session affinity is on.
pub const SVC_F_AFFINITY: u16 = 1 << 0;

/// `ServiceValue::no_backends`: answer with ICMP port unreachable, like kube-proxy's
/// REJECT, so the client sees ECONNREFUSED at once.
pub const NO_BACKENDS_REJECT: u8 = 0;
/// `ServiceValue::no_backends`: drop silently.
pub const NO_BACKENDS_DROP: u8 = 1;

/// `SERVICES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Service id, unique per frontend, never 0. Keys `BACKENDS`, `AFFINITY`, `SVC_STATS`.
    pub id: u32,
    /// Backend slots 1..=count are valid in `BACKENDS`. 0: no ready backend.
    pub count: u32,
    /// ClientIP affinity timeout in seconds (`sessionAffinityConfig.clientIP.timeoutSeconds`).
    pub affinity_timeout_s: u32,
    /// `SVC_F_*` bits.
    pub flags: u16,
    /// `NO_BACKENDS_*`.
    pub no_backends: u8,
    pub _pad: u8,
    /// The service's lookup table: `table_size` buckets from word `table_off` of
    /// `TABLES`, each the slot (1..=count) new flows of that bucket go to (see
    /// [`hash::bucket`]). The agent writes a changed table to fresh words and then
    /// this entry, so a packet sees the old table or the new one, never a mix.
    pub table_off: u32,
    /// Buckets; 0 with `count` 0.
    pub table_size: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 24);

/// `BACKENDS` key: slot 1..=count of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub svc_id: u32,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);

/// `BACKENDS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendValue {
    /// Agent-assigned id of this backend within its service, never 0 (0 = "unset").
    /// Conntrack and affinity entries remember it to tell whether their backend still
    /// exists after slots have been rearranged.
    pub backend_id: u32,
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<BackendValue>() == 12);

/// `DRAINING` key: a backend of a service that takes no new connections but whose pod
/// still exists (it is terminating, or not ready). Established connections to it keep
/// going, as they do under kube-proxy, whose conntrack entries outlive the endpoint;
/// the agent deletes the entry once the endpoint has gone from the EndpointSlices.
/// The value is the backend's `BackendValue`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DrainKey {
    pub svc_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<DrainKey>() == 8);

/// `AFFINITY` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey4 {
    pub svc_id: u32,
    pub client_addr_be: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey4>() == 8);

/// `AFFINITY` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the client last started a connection to
    /// the service (kube-proxy's `recent` match is set by new connections only).
    pub last_used_ns: u64,
    pub backend_id: u32,
    /// Where the backend stood when it was chosen; checked first, then searched.
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// `SOCK_REVNAT` key: a socket (its cookie, `bpf_get_socket_cookie`) and the backend
/// the socket LB sent it to. `recvmsg4`/`getpeername4` look it up by the address the
/// kernel is about to show the application; the socket iterator by the socket's peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey4 {
    pub cookie: u64,
    pub backend_addr_be: u32,
    pub backend_port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SockRevKey4>() == 16);

/// `SOCK_REVNAT` value: what the application asked for, and which (service, backend)
/// it got. `svc_id` and `backend_id` are laid out as a [`DrainKey`], which the socket
/// iterator reads as one word to look up `SOCK_STALE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevValue4 {
    pub vip_addr_be: u32,
    pub vip_port_be: u16,
    pub _pad: u16,
    pub svc_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevValue4>() == 16);
const _: () = assert!(core::mem::offset_of!(SockRevValue4, svc_id) == 8);

/// `SOCK_AFFINITY` key: ClientIP affinity in the socket layer, where the client's
/// address is not known yet at connect() (the socket is not bound), so the client is
/// its network namespace (`bpf_get_netns_cookie`), as in Cilium's socket LB: one pod,
/// or the node's host network.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAffinityKey {
    pub netns_cookie: u64,
    pub svc_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SockAffinityKey>() == 16);

/// `SockStale::flags`: close TCP sockets too (the backend's pod is gone, not only
/// draining).
pub const SOCK_STALE_TCP: u32 = 1 << 0;

/// `SOCK_STALE` value (key: [`DrainKey`]): which sockets of the pair to close, and how
/// many the iterator closed (atomically added).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockStale {
    pub flags: u32,
    pub _pad: u32,
    pub destroyed: u64,
}
const _: () = assert!(core::mem::size_of::<SockStale>() == 16);
const _: () = assert!(core::mem::offset_of!(SockStale, destroyed) == 8);

/// `CONNTRACK` key: a 5-tuple as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey4 {
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKey4>() == 16);

impl CtKey4 {
    /// The key of a 5-tuple. Built as whole words: zeroing the `[u8; 3]` padding as a
    /// field compiles, in the datapath, to a call of a BPF `memset` function on every
    /// key (seen in `perf` of a conntrack hit: ~10 ns of ~110).
    #[inline(always)]
    pub const fn new(src_addr_be: u32, dst_addr_be: u32, src_port_be: u16, dst_port_be: u16, proto: u8) -> Self {
        let (s, d, sp, dp) = (
            src_addr_be.to_ne_bytes(),
            dst_addr_be.to_ne_bytes(),
            src_port_be.to_ne_bytes(),
            dst_port_be.to_ne_bytes(),
        );
        let bytes = [s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3], sp[0], sp[1], dp[0], dp[1], proto, 0, 0, 0];
        // SAFETY: CtKey4 is repr(C), 16 bytes with no implicit padding, and every bit
        // pattern is valid; the bytes are the fields in declaration order.
        unsafe { core::mem::transmute::<[u8; 16], CtKey4>(bytes) }
    }
}

/// `CtValue4::dir`: client -> frontend; rewrite the destination to the backend.
pub const CT_DIR_FORWARD: u8 = 1;
/// `CtValue4::dir`: backend -> client; rewrite the source to the frontend.
pub const CT_DIR_REPLY: u8 = 2;

/// `CtValue4::flags`: the service had ClientIP affinity when the flow started.
pub const CT_F_AFFINITY: u8 = 1 << 0;
/// `CtValue4::flags`: hairpin, the client is its own backend. Forward packets also get
/// their source rewritten to the ClusterIP, so that the backend's reply leaves the pod
/// instead of being delivered locally (kube-proxy masquerades the same case,
/// KUBE-MARK-MASQ); replies get their destination rewritten back to the client.
pub const CT_F_HAIRPIN: u8 = 1 << 1;
/// `CtValue4::flags`: a packet has gone in the reply direction (TCP: the flow is past
/// its handshake; UDP: the flow is "assured", as netfilter says).
pub const CT_F_REPLIED: u8 = 1 << 2;
/// `CtValue4::flags`: the client sent a FIN.
pub const CT_F_FIN_FWD: u8 = 1 << 3;
/// `CtValue4::flags`: the backend sent a FIN.
pub const CT_F_FIN_REPLY: u8 = 1 << 4;
/// `CtValue4::flags`: either side sent a RST.
pub const CT_F_RST: u8 = 1 << 5;
/// `CtValue4::flags`: (forward half) the backend was found in `DRAINING`, not in the
/// slots, when the entry was last validated.
pub const CT_F_DRAINING: u8 = 1 << 6;
/// The state bits, kept equal in both halves of a flow.
pub const CT_F_STATE: u8 = CT_F_REPLIED | CT_F_FIN_FWD | CT_F_FIN_REPLY | CT_F_RST;

/// `CONNTRACK` value: the NAT state of one direction.
///
/// Both halves of a flow carry the same state bits and are refreshed together (the
/// datapath touches the other half whenever it moves `seen` or the state), so that
/// the LRU ages them as one and a lost half is re-created from the other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue4 {
    /// Forward: the backend's address; reply: the ClusterIP.
    pub nat_addr_be: u32,
    /// Forward: the targetPort; reply: the service port.
    pub nat_port_be: u16,
    /// `CT_DIR_*`.
    pub dir: u8,
    /// `CT_F_*`.
    pub flags: u8,
    pub svc_id: u32,
    pub backend_id: u32,
    pub slot: u32,
    /// [`ct_tick`] when the flow was last refreshed; refreshed at most once a second, so
    /// that a busy flow does not write its entry on every packet.
    pub seen: u32,
    /// (Forward half) `IdState::epoch` when the backend was last found in the maps. The
    /// agent bumps the epoch after every removal of a backend; while it is unchanged
    /// the backend cannot have gone, and a packet skips looking it up.
    pub epoch: u32,
    /// [`ct_tick`] when the flow was created (its first packet), the same in both
    /// halves and never rewritten: `lb conntrack` shows the flow's age from it. 0:
    /// not known (the entry was carried over from a layout without it, or the clock
    /// was not running yet).
    pub created: u32,
}
const _: () = assert!(core::mem::size_of::<CtValue4>() == 32);

/// Conntrack time, in seconds counted by the kernel's jiffies:
/// `(jiffies * jiffy_recip) >> 32`, where `jiffy_recip` is [`jiffy_recip`] of the kernel's HZ
/// (`IdState::jiffy_recip`, written by the agent, which reads HZ and jiffies from
/// /proc/timer_list). The datapath reads the clock on every conntrack hit, and
/// `bpf_jiffies64` is inlined by the verifier into two instructions
/// (kernel/bpf/verifier.c, `do_misc_fixups`), where `bpf_ktime_get_coarse_ns` was a
/// helper call that cost a measured ~20 ns of a ~100 ns hit (`perf`, and the bench).
/// The product fits in 64 bits for any HZ and centuries of uptime.
#[inline(always)]
pub const fn ct_tick(jiffies: u64, jiffy_recip: u32) -> u32 {
    (jiffies.wrapping_mul(jiffy_recip as u64) >> 32) as u32
}

/// `2^32 / hz`: multiplying jiffies by it and shifting by 32 divides them by HZ.
pub const fn jiffy_recip(hz: u32) -> u32 {
    ((1u64 << 32) / if hz == 0 { 1 } else { hz as u64 }) as u32
}

/// Conntrack timeouts, in seconds, after the last packet: kube-proxy's settings of
/// nf_conntrack where it sets them (`--conntrack-tcp-timeout-established` 24 h,
/// `--conntrack-tcp-timeout-close-wait` 1 h), netfilter's defaults elsewhere
/// (net/netfilter/nf_conntrack_proto_tcp.c, nf_conntrack_proto_udp.c).
pub mod ct_timeouts {
    /// SYN sent, nothing back yet (`nf_conntrack_tcp_timeout_syn_sent`).
    pub const TCP_SYN_SENT: u32 = 120;
    pub const TCP_ESTABLISHED: u32 = 86_400;
    /// One side has sent its FIN (kube-proxy's close-wait).
    pub const TCP_CLOSING: u32 = 3_600;
    /// Both FINs seen (`nf_conntrack_tcp_timeout_time_wait`).
    pub const TCP_TIME_WAIT: u32 = 120;
    /// A RST seen (`nf_conntrack_tcp_timeout_close`).
    pub const TCP_CLOSE: u32 = 10;
    /// No reply yet (`nf_conntrack_udp_timeout`).
    pub const UDP: u32 = 30;
    /// Replies seen (`nf_conntrack_udp_timeout_stream`).
    pub const UDP_STREAM: u32 = 120;
}

impl CtValue4 {
    /// Seconds this entry lives after `seen`, from its protocol and state.
    pub const fn timeout_s(&self, proto: u8) -> u32 {
        use ct_timeouts::*;
        let f = self.flags;
        if proto == IPPROTO_UDP {
            return if f & CT_F_REPLIED != 0 { UDP_STREAM } else { UDP };
        }
        if f & CT_F_RST != 0 {
            TCP_CLOSE
        } else if f & CT_F_FIN_FWD != 0 && f & CT_F_FIN_REPLY != 0 {
            TCP_TIME_WAIT
        } else if f & (CT_F_FIN_FWD | CT_F_FIN_REPLY) != 0 {
            TCP_CLOSING
        } else if f & CT_F_REPLIED != 0 {
            TCP_ESTABLISHED
        } else {
            TCP_SYN_SENT
        }
    }
    /// Whether the entry has outlived its timeout at tick `now` ([`ct_tick`]).
    pub const fn expired(&self, proto: u8, now: u32) -> bool {
        now.wrapping_sub(self.seen) > self.timeout_s(proto)
    }
    /// The other half of the flow whose half this is, under `key`: the reply half's key
    /// is the forward half's NAT target talking back to the client (to the ClusterIP
    /// when hairpinned), and the other way round. The datapath re-creates a lost half
    /// with it; the agent's collector deletes both halves together with it.
    pub const fn other_half(&self, key: &CtKey4) -> (CtKey4, CtValue4) {
        let hairpin = self.flags & CT_F_HAIRPIN != 0;
        let mut v = *self;
        if self.dir == CT_DIR_FORWARD {
            let k = CtKey4::new(
                self.nat_addr_be,
                if hairpin { key.dst_addr_be } else { key.src_addr_be },
                self.nat_port_be,
                key.src_port_be,
                key.proto,
            );
            v.nat_addr_be = key.dst_addr_be;
            v.nat_port_be = key.dst_port_be;
            v.dir = CT_DIR_REPLY;
            (k, v)
        } else {
            let k = CtKey4::new(
                if hairpin { key.src_addr_be } else { key.dst_addr_be },
                self.nat_addr_be,
                key.dst_port_be,
                self.nat_port_be,
                key.proto,
            );
            v.nat_addr_be = key.src_addr_be;
            v.nat_port_be = key.src_port_be;
            v.dir = CT_DIR_FORWARD;
            (k, v)
        }
    }
    /// A flow that counts as a connection in `lb services`: not closed by a RST nor by
    /// both FINs.
    pub const fn open(&self) -> bool {
        self.flags & CT_F_RST == 0 && (self.flags & CT_F_FIN_FWD == 0 || self.flags & CT_F_FIN_REPLY == 0)
    }
}

/// `FRAGS` key: one datagram in flight as fragments, as the IPv4 header names it
/// (RFC 791: source, destination, protocol, identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey4 {
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FragKey4>() == 12);

/// `FRAGS` value: the ports the first fragment carried, which the later fragments lack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue4 {
    pub src_port_be: u16,
    pub dst_port_be: u16,
}
const _: () = assert!(core::mem::size_of::<FragValue4>() == 4);

/// `IDS` value (one entry, index 0): the agent's id allocators, so that a restarted
/// agent does not hand out an id that a conntrack or affinity entry still remembers,
/// and the backend epoch, which the datapath reads. Written by the agent before any
/// map entry that uses a newly issued id, and after every removal of a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdState {
    /// The next service id to try (ids are issued round-robin over 1..SVC_STATS).
    pub next_svc_id: u32,
    /// The next backend id to issue (never reused).
    pub next_backend_id: u32,
    /// Bumped after every sync that removed a backend from a service's slots or from
    /// `DRAINING`: a conntrack entry validated under this epoch still has its backend
    /// (`CtValue4::epoch`).
    pub epoch: u32,
    /// [`jiffy_recip`] of the kernel's HZ: the datapath's conntrack clock
    /// ([`ct_tick`]). 0 until the agent has written it: the clock then stands still at
    /// 0 (nothing expires, nothing is refreshed).
    pub jiffy_recip: u32,
}
const _: () = assert!(core::mem::size_of::<IdState>() == 16);

/// Per-CPU counter, one per `STATS` reason and per `SVC_STATS` service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Index into the per-CPU `STATS` array: every verdict and drop reason the datapath
/// gives. The table in docs/datapath.md says when each one is used.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 (ARP, IPv6, a second VLAN tag, ...): XDP_PASS.
    PassNotIpv4 = 0,
    /// IPv4 to an address that is no ClusterIP: XDP_PASS.
    PassNotService = 1,
    /// A ClusterIP, but a port or protocol it does not serve: XDP_PASS.
    PassUnknownPort = 2,
    /// ICMP to a ClusterIP: XDP_PASS (the stack answers or drops it as usual).
    PassIcmp = 3,
    /// A frame too short for its Ethernet or VLAN header, or an IPv4 header that is
    /// truncated or invalid (IHL < 5, total length too small): XDP_PASS, so the stack
    /// counts it in its own error counters. We cannot tell whose it is.
    PassMalformedL3 = 4,
    /// First packet of a flow to a frontend: backend chosen, destination rewritten.
    FwdNew = 5,
    /// A later packet of a known flow: destination rewritten from conntrack.
    FwdEstablished = 6,
    /// A reply from a backend: source rewritten back to the frontend.
    RevNat = 7,
    /// New flow of an affinity service: the client's remembered backend reused.
    AffinityHit = 8,
    /// New flow of an affinity service: no live entry, a backend was chosen and remembered.
    AffinityMiss = 9,
    /// Affinity entry older than the timeout: replaced.
    AffinityExpired = 10,
    /// Affinity entry whose backend has left the service: replaced.
    AffinityStale = 11,
    /// No ready backend, service set to reject: ICMP port unreachable sent back (XDP_TX).
    NoBackendReject = 12,
    /// No ready backend, service set to drop: XDP_DROP.
    NoBackendDrop = 13,
    /// A non-first IPv4 fragment to a ClusterIP whose first fragment was not seen (it
    /// came out of order, or it was lost): XDP_DROP. Fragments whose first fragment was
    /// seen are NATed like it (`FragTracked`).
    DropFragment = 14,
    /// TCP or UDP to a ClusterIP whose L4 header is truncated: XDP_DROP.
    DropMalformedL4 = 15,
    /// A mid-connection TCP packet whose backend has been removed: XDP_DROP, never sent
    /// on to another pod.
    DropBackendGone = 16,
    /// UDP whose conntrack entry points at a removed backend: the entry is discarded and
    /// the packet handled as a new flow (what kube-proxy's conntrack flush for UDP
    /// achieves). A TCP SYN is always scheduled afresh and not counted here.
    CtStaleRescheduled = 17,
    /// Conntrack or affinity insert failed (map full beyond LRU eviction): the packet is
    /// still forwarded, but later packets pick again.
    MapInsertFailed = 18,
    /// Rewriting the packet failed (a helper returned an error): XDP_ABORTED / TC_ACT_SHOT.
    RewriteFailed = 19,
    /// IPv4 with another L4 protocol (SCTP, GRE, ...) to a ClusterIP: XDP_PASS.
    PassOtherProto = 20,
    /// A later packet of a known flow whose backend has left the service's slots but
    /// still exists (`DRAINING`): still sent to it, destination rewritten.
    FwdDraining = 21,
    /// Counted besides the packet's verdict: a non-first fragment took its ports and
    /// NAT decision from the first fragment of its datagram (`FRAGS`).
    FragTracked = 22,
    /// An ICMP error (destination unreachable, time exceeded, parameter problem)
    /// quoting a NATed flow: the outer and the quoted headers translated.
    IcmpErrorNat = 23,
    /// Counted besides the verdict: a conntrack entry past its timeout was found and
    /// discarded; the packet was handled as a new flow.
    CtExpired = 24,
    /// Counted besides the verdict: one half of a flow was missing (LRU eviction) and
    /// was re-created from the other.
    CtRecovered = 25,
    /// Counted besides the verdict: a TCP packet that is not a SYN, to a frontend, with
    /// no conntrack entry (evicted, or expired): scheduled afresh, which lands on the
    /// same backend while the backend set has not changed.
    CtMidflowMiss = 26,
    /// tc egress of a pod interface, a packet that is no reply of a NATed flow (the
    /// egress hook only reverse-NATs replies the node's own stack sends to pods, e.g.
    /// from a host-network backend): TC_ACT_UNSPEC.
    PassEgress = 27,
    /// Socket LB, connect() (TCP or UDP) to a frontend: the destination is rewritten to
    /// the chosen backend before the kernel routes anything; no packet of the
    /// connection is translated again.
    SockConnect = 28,
    /// Socket LB, an unconnected UDP sendmsg() to a frontend: rewritten per datagram.
    SockSendmsg = 29,
    /// Socket LB, recvmsg() or getpeername() about a backend the socket was sent to:
    /// the application is shown the ClusterIP and port instead.
    SockRevNat = 30,
    /// Socket LB, connect() or sendmsg() to a frontend with no ready backend, set to
    /// reject: refused with ECONNREFUSED, as kube-proxy's REJECT rule does.
    SockRefused = 31,
    /// Socket LB: a connect(), sendmsg(), recvmsg() or getpeername() about no
    /// frontend (or no socket the socket LB translated): left alone.
    SockPass = 32,
}

impl Reason {
    pub const COUNT: u32 = 33;
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::PassNotIpv4,
        Reason::PassNotService,
        Reason::PassUnknownPort,
        Reason::PassIcmp,
        Reason::PassMalformedL3,
        Reason::FwdNew,
        Reason::FwdEstablished,
        Reason::RevNat,
        Reason::AffinityHit,
        Reason::AffinityMiss,
        Reason::AffinityExpired,
        Reason::AffinityStale,
        Reason::NoBackendReject,
        Reason::NoBackendDrop,
        Reason::DropFragment,
        Reason::DropMalformedL4,
        Reason::DropBackendGone,
        Reason::CtStaleRescheduled,
        Reason::MapInsertFailed,
        Reason::RewriteFailed,
        Reason::PassOtherProto,
        Reason::FwdDraining,
        Reason::FragTracked,
        Reason::IcmpErrorNat,
        Reason::CtExpired,
        Reason::CtRecovered,
        Reason::CtMidflowMiss,
        Reason::PassEgress,
        Reason::SockConnect,
        Reason::SockSendmsg,
        Reason::SockRevNat,
        Reason::SockRefused,
        Reason::SockPass,
    ];

    /// Whether this reason is a verdict: counted exactly once per packet (with its
    /// bytes) by `lb_xdp`, `lb_tc` and `lb_tc_egress`, or once per call by the socket
    /// LB programs ([`Reason::is_socket`]). The others are counted besides the
    /// verdict, with 0 bytes, as events on the way to it (an affinity lookup, a
    /// conntrack entry expired or re-created, a fragment's ports looked up, a failed
    /// map insert), so a packet may count several of them or none. `RewriteFailed` is a
    /// verdict: the entry points count it instead of the action's reason.
    pub const fn is_verdict(self) -> bool {
        !matches!(
            self,
            Reason::AffinityHit
                | Reason::AffinityMiss
                | Reason::AffinityExpired
                | Reason::AffinityStale
                | Reason::CtStaleRescheduled
                | Reason::MapInsertFailed
                | Reason::FragTracked
                | Reason::CtExpired
                | Reason::CtRecovered
                | Reason::CtMidflowMiss
        )
    }

    /// Whether this reason is counted by the socket LB's cgroup programs (sock.rs),
    /// never by the per-packet ones.
    pub const fn is_socket(self) -> bool {
        matches!(
            self,
            Reason::SockConnect | Reason::SockSendmsg | Reason::SockRevNat | Reason::SockRefused | Reason::SockPass
        )
    }

    /// Stable snake_case name, used for metrics labels and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIpv4 => "pass_not_ipv4",
            Reason::PassNotService => "pass_not_service",
            Reason::PassUnknownPort => "pass_unknown_port",
            Reason::PassIcmp => "pass_icmp",
            Reason::PassMalformedL3 => "pass_malformed_l3",
            Reason::FwdNew => "fwd_new",
            Reason::FwdEstablished => "fwd_established",
            Reason::RevNat => "rev_nat",
            Reason::AffinityHit => "affinity_hit",
            Reason::AffinityMiss => "affinity_miss",
            Reason::AffinityExpired => "affinity_expired",
            Reason::AffinityStale => "affinity_stale",
            Reason::NoBackendReject => "no_backend_reject",
            Reason::NoBackendDrop => "no_backend_drop",
            Reason::DropFragment => "drop_fragment",
            Reason::DropMalformedL4 => "drop_malformed_l4",
            Reason::DropBackendGone => "drop_backend_gone",
            Reason::CtStaleRescheduled => "ct_stale_rescheduled",
            Reason::MapInsertFailed => "map_insert_failed",
            Reason::RewriteFailed => "rewrite_failed",
            Reason::PassOtherProto => "pass_other_proto",
            Reason::FwdDraining => "fwd_draining",
            Reason::FragTracked => "frag_tracked",
            Reason::IcmpErrorNat => "icmp_error_nat",
            Reason::CtExpired => "ct_expired",
            Reason::CtRecovered => "ct_recovered",
            Reason::CtMidflowMiss => "ct_midflow_miss",
            Reason::PassEgress => "pass_egress",
            Reason::SockConnect => "sock_connect",
            Reason::SockSendmsg => "sock_sendmsg",
            Reason::SockRevNat => "sock_rev_nat",
            Reason::SockRefused => "sock_refused",
            Reason::SockPass => "sock_pass",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and have no implicit padding (every
    // padding byte is a named field, checked by the size assertions above).
    unsafe impl aya::Pod for ServiceKey4 {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for DrainKey {}
    unsafe impl aya::Pod for AffinityKey4 {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for CtKey4 {}
    unsafe impl aya::Pod for CtValue4 {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for FragKey4 {}
    unsafe impl aya::Pod for FragValue4 {}
    unsafe impl aya::Pod for IdState {}
    unsafe impl aya::Pod for SockRevKey4 {}
    unsafe impl aya::Pod for SockRevValue4 {}
    unsafe impl aya::Pod for SockAffinityKey {}
    unsafe impl aya::Pod for SockStale {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn layouts_are_what_the_kernel_side_expects() {
        // (size, align) of every shared type: a change here is a map layout change and
        // needs a MAP_LAYOUT_VERSION bump.
        assert_eq!((size_of::<ServiceKey4>(), align_of::<ServiceKey4>()), (8, 4));
        assert_eq!((size_of::<ServiceValue>(), align_of::<ServiceValue>()), (24, 4));
        assert_eq!((size_of::<BackendKey>(), align_of::<BackendKey>()), (8, 4));
        assert_eq!((size_of::<BackendValue>(), align_of::<BackendValue>()), (12, 4));
        assert_eq!((size_of::<DrainKey>(), align_of::<DrainKey>()), (8, 4));
        assert_eq!((size_of::<AffinityKey4>(), align_of::<AffinityKey4>()), (8, 4));
        assert_eq!((size_of::<AffinityValue>(), align_of::<AffinityValue>()), (16, 8));
        assert_eq!((size_of::<CtKey4>(), align_of::<CtKey4>()), (16, 4));
        assert_eq!((size_of::<CtValue4>(), align_of::<CtValue4>()), (32, 4));
        assert_eq!((size_of::<FragKey4>(), align_of::<FragKey4>()), (12, 4));
        assert_eq!((size_of::<FragValue4>(), align_of::<FragValue4>()), (4, 2));
        assert_eq!((size_of::<IdState>(), align_of::<IdState>()), (16, 4));
        assert_eq!((size_of::<Counter>(), align_of::<Counter>()), (16, 8));
        assert_eq!((size_of::<SockRevKey4>(), align_of::<SockRevKey4>()), (16, 8));
        assert_eq!((size_of::<SockRevValue4>(), align_of::<SockRevValue4>()), (16, 4));
        assert_eq!((size_of::<SockAffinityKey>(), align_of::<SockAffinityKey>()), (16, 8));
        assert_eq!((size_of::<SockStale>(), align_of::<SockStale>()), (16, 8));
        assert_eq!(size_of::<Reason>(), 4);
    }

    #[test]
    fn field_offsets_have_no_hidden_padding() {
        assert_eq!(core::mem::offset_of!(ServiceKey4, proto), 6);
        assert_eq!(core::mem::offset_of!(ServiceValue, no_backends), 14);
        assert_eq!(core::mem::offset_of!(CtKey4, proto), 12);
        assert_eq!(core::mem::offset_of!(CtValue4, svc_id), 8);
        assert_eq!(core::mem::offset_of!(CtValue4, seen), 20);
        assert_eq!(core::mem::offset_of!(CtValue4, epoch), 24);
        assert_eq!(core::mem::offset_of!(CtValue4, created), 28);
        assert_eq!(core::mem::offset_of!(ServiceValue, table_off), 16);
        assert_eq!(core::mem::offset_of!(FragKey4, proto), 10);
        assert_eq!(core::mem::offset_of!(BackendValue, port_be), 8);
    }

    #[test]
    fn conntrack_timeouts_follow_the_state() {
        let v = |flags| CtValue4 { flags, seen: 1000, ..Default::default() };
        assert_eq!(v(0).timeout_s(IPPROTO_TCP), ct_timeouts::TCP_SYN_SENT);
        assert_eq!(v(CT_F_REPLIED).timeout_s(IPPROTO_TCP), ct_timeouts::TCP_ESTABLISHED);
        assert_eq!(v(CT_F_REPLIED | CT_F_FIN_FWD).timeout_s(IPPROTO_TCP), ct_timeouts::TCP_CLOSING);
        assert_eq!(v(CT_F_REPLIED | CT_F_FIN_FWD | CT_F_FIN_REPLY).timeout_s(IPPROTO_TCP), ct_timeouts::TCP_TIME_WAIT);
        assert_eq!(v(CT_F_REPLIED | CT_F_RST).timeout_s(IPPROTO_TCP), ct_timeouts::TCP_CLOSE);
        assert_eq!(v(0).timeout_s(IPPROTO_UDP), ct_timeouts::UDP);
        assert_eq!(v(CT_F_REPLIED).timeout_s(IPPROTO_UDP), ct_timeouts::UDP_STREAM);
        assert!(!v(0).expired(IPPROTO_UDP, 1030));
        assert!(v(0).expired(IPPROTO_UDP, 1031));
        assert!(!v(CT_F_REPLIED).expired(IPPROTO_UDP, 1031));
        // Ticks wrap after 136 years, and an entry from before a wrap still expires.
        assert!(CtValue4 { seen: u32::MAX - 5, ..v(0) }.expired(IPPROTO_UDP, 30));
        assert!(!v(CT_F_RST).expired(IPPROTO_TCP, 1010) && v(CT_F_RST).expired(IPPROTO_TCP, 1011));
        assert!(v(CT_F_REPLIED).open() && !v(CT_F_RST).open() && !v(CT_F_FIN_FWD | CT_F_FIN_REPLY).open());
        assert!(v(CT_F_FIN_FWD).open());
    }

    #[test]
    fn conntrack_ticks_are_seconds_of_jiffies() {
        for hz in [100u32, 250, 300, 1000] {
            let r = jiffy_recip(hz);
            // At boot (INITIAL_JIFFIES, 2^32 - 300 HZ on 64-bit), and 10 years on.
            let j0 = (1u64 << 32) - 300 * hz as u64;
            let t0 = ct_tick(j0, r);
            let hour = ct_tick(j0 + hz as u64 * 3600, r) - t0;
            assert!((3599..=3601).contains(&hour), "HZ {hz}: {hour}");
            let ten_years = hz as u64 * 86_400 * 3650;
            let t = ct_tick(j0 + ten_years, r) - t0;
            assert!((t as i64 - 86_400 * 3650).abs() < 300, "HZ {hz}: {t}");
        }
        assert_eq!(ct_tick(123_456, 0), 0, "no HZ written yet: the clock stands");
    }

    #[test]
    fn the_two_halves_of_a_flow_find_each_other() {
        for flags in [0, CT_F_HAIRPIN] {
            // client 10.0.0.5:40000 -> VIP 10.96.0.1:80, backend 10.0.1.7:8080 (the
            // client itself when hairpinned).
            let (client, vip, backend) = (0x0500_000a, 0x0100_600a, if flags != 0 { 0x0500_000a } else { 0x0701_000a });
            let k = CtKey4 {
                src_addr_be: client,
                dst_addr_be: vip,
                src_port_be: 40000u16.to_be(),
                dst_port_be: 80u16.to_be(),
                proto: IPPROTO_TCP,
                _pad: [0; 3],
            };
            let fwd = CtValue4 {
                nat_addr_be: backend,
                nat_port_be: 8080u16.to_be(),
                dir: CT_DIR_FORWARD,
                flags,
                svc_id: 3,
                backend_id: 9,
                slot: 1,
                seen: 7,
                epoch: 2,
                created: 5,
            };
            let (rk, rv) = fwd.other_half(&k);
            assert_eq!((rk.src_addr_be, rk.src_port_be, rk.dst_port_be), (backend, 8080u16.to_be(), 40000u16.to_be()));
            assert_eq!(rk.dst_addr_be, if flags != 0 { vip } else { client });
            assert_eq!((rv.dir, rv.nat_addr_be, rv.nat_port_be, rv.svc_id), (CT_DIR_REPLY, vip, 80u16.to_be(), 3));
            assert_eq!(rv.created, 5, "both halves carry the flow's creation time");
            assert_eq!(rv.other_half(&rk), (k, fwd));
        }
    }

    #[test]
    fn reasons_are_dense_and_named_once() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32, "{r:?} out of order");
        }
        let mut names: std::vec::Vec<_> = Reason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::COUNT as usize);
    }

    #[test]
    fn pinned_names_fit_the_kernel_and_carry_the_version() {
        let suffix = std::format!("_v{MAP_LAYOUT_VERSION}");
        for (name, prefix) in map_names::ALL.iter().zip(map_names::PREFIXES) {
            assert!(name.len() <= 15, "{name} is longer than BPF_OBJ_NAME_LEN - 1");
            assert!(name.ends_with(&suffix), "{name} lacks {suffix}");
            assert!(name.starts_with(prefix));
        }
    }
}
