//! The datapath's maps. Pinned by name under the agent's bpffs directory; each name
//! carries the layout version (`lb_common::map_names`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    AffinityKey4, AffinityValue, BackendKey, BackendValue, Counter, CtKey4, CtValue4, DrainKey, FragKey4, FragValue4,
    IdState, PREFILTER_WORDS, Reason, ServiceKey4, ServiceValue, SockAffinityKey, SockRevKey4, SockRevValue4,
    SockStale, limits,
};

/// (ClusterIP, port, proto) -> service entry; also (ClusterIP, 0, 0) -> address marker.
/// Written by the agent, read by the datapath.
#[map(name = "lb4_svc_v6")]
pub static SERVICES: HashMap<ServiceKey4, ServiceValue> = HashMap::pinned(limits::SERVICES, 0);

/// (service id, slot 1..=count) -> backend IP and targetPort. Written by the agent
/// (slots before `count` is raised, `count` lowered before slots go), read by the datapath.
#[map(name = "lb4_be_v6")]
pub static BACKENDS: HashMap<BackendKey, BackendValue> = HashMap::pinned(limits::BACKENDS, 0);

/// (service id, backend id) -> backend, for backends that take no new connections but
/// whose pods still exist; established flows to them continue. Written by the agent.
#[map(name = "lb4_drain_v6")]
pub static DRAINING: HashMap<DrainKey, BackendValue> = HashMap::pinned(limits::DRAINING, 0);

/// (service id, client IP) -> backend id and the start of the client's last connection.
/// Written by the datapath on every new flow of an affinity service; read by `lb affinity`.
#[map(name = "lb4_aff_v6")]
pub static AFFINITY: LruHashMap<AffinityKey4, AffinityValue> = LruHashMap::pinned(limits::AFFINITY, 0);

/// 5-tuple as seen on the wire -> NAT state; one forward and one reply entry per flow.
/// Written by the datapath on a new flow; read by `lb conntrack`.
#[map(name = "lb4_ct_v6")]
pub static CONNTRACK: LruHashMap<CtKey4, CtValue4> = LruHashMap::pinned(limits::CONNTRACK, 0);

/// (source, destination, protocol, IP id) -> the ports of the datagram's first
/// fragment, for its later fragments, which carry none. Written and read by the
/// datapath; entries age out of the LRU (a datagram's fragments arrive within
/// milliseconds of each other).
#[map(name = "lb4_frag_v6")]
pub static FRAGS: LruHashMap<FragKey4, FragValue4> = LruHashMap::pinned(limits::FRAGS, 0);

/// Index 0: the agent's id allocators and the backend epoch (`IdState`). Written by the
/// agent; the datapath reads the epoch.
#[map(name = "lb_ids_v6")]
pub static IDS: Array<IdState> = Array::pinned(1, 0);

/// Every service's lookup table: `ServiceValue::table_size` u16 slot numbers from word
/// `table_off`, four a word. Written by the agent through an mmap (a changed table to
/// fresh words, then the `SERVICES` entry that points at them), read by the datapath on
/// new flows.
#[map(name = "lb4_tbl_v6")]
pub static TABLES: Array<u64> = Array::pinned(limits::TABLE_WORDS, BPF_F_MMAPABLE);

/// `BPF_F_MMAPABLE`: the agent writes tables through an mmap of the array, one copy per
/// table instead of one syscall per word (include/uapi/linux/bpf.h).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The prefilter bitmaps (`lb_common::prefilter_word`): ClusterIPs, then backend
/// addresses. Written by the agent (bits set before the entries that need them,
/// cleared after those have gone), read by the datapath on every packet.
#[map(name = "lb4_pref_v6")]
pub static PREFILTER: Array<u64> = Array::pinned(PREFILTER_WORDS, 0);

/// Whether the prefilter's bit for `addr_be` is set in the ClusterIP half (`backend`
/// false) or the backend half.
#[inline(always)]
pub fn prefilter_hit(addr_be: u32, backend: bool) -> bool {
    let (word, mask) = lb_common::prefilter_word(addr_be, backend);
    PREFILTER.get(word).is_some_and(|w| *w & mask != 0)
}

/// The backend epoch and the clock's `jiffy_recip` (`IdState`), from one lookup.
#[inline(always)]
pub fn epoch_and_clock() -> (u32, u32) {
    IDS.get(0).map_or((0, 0), |s| (s.epoch, s.jiffy_recip))
}

/// `Reason` -> per-CPU packets and bytes. Written by the datapath, read by the agent's
/// metrics and `lb stats`.
#[map(name = "lb_stats_v6")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::pinned(Reason::COUNT, 0);

/// Service id -> per-CPU packets and bytes, forward and reply. Written by the datapath,
/// read by the agent's metrics and `lb services`.
#[map(name = "lb4_svcst_v6")]
pub static SVC_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(limits::SVC_STATS, 0);

/// Socket LB: (socket cookie, backend) -> the ClusterIP and port the socket asked
/// for, and its (service, backend). Written by `lb_connect4`/`lb_sendmsg4`; read by
/// `lb_recvmsg4`/`lb_getpeername4` (what the application is shown) and by the agent's
/// socket iterator (which sockets to close when a backend goes).
#[map(name = "lb4_skrev_v6")]
pub static SOCK_REVNAT: LruHashMap<SockRevKey4, SockRevValue4> = LruHashMap::pinned(limits::SOCK_REVNAT, 0);

/// Socket LB: ClientIP affinity by network namespace (`SockAffinityKey`). Written by
/// the datapath.
#[map(name = "lb4_skaff_v6")]
pub static SOCK_AFFINITY: LruHashMap<SockAffinityKey, AffinityValue> = LruHashMap::pinned(limits::SOCK_AFFINITY, 0);

/// Socket LB: service id -> per-CPU connect() and sendmsg() translations (`packets`;
/// `bytes` stays 0). Written by the datapath, read by the agent's metrics and `lb
/// services`.
#[map(name = "lb4_sksvc_v6")]
pub static SOCK_SVC_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(limits::SVC_STATS, 0);

/// Socket LB: (service id, backend id) -> `SockStale`. Written by the agent just
/// before it runs its socket iterators, which close the sockets translated to these
/// pairs and count them; the agent then deletes the entries. The datapath's sock_addr
/// programs do not read it; it is declared here so that the agent finds it, created
/// and pinned, beside the others.
#[map(name = "lb4_skstl_v6")]
pub static SOCK_STALE: HashMap<DrainKey, SockStale> = HashMap::pinned(limits::SOCK_STALE, 0);

#[inline(always)]
pub fn count_sock_service(svc_id: u32) {
    bump(&SOCK_SVC_STATS, svc_id, 0);
}

#[inline(always)]
pub fn count(reason: Reason, bytes: u64) {
    bump(&STATS, reason as u32, bytes);
}

#[inline(always)]
pub fn count_service(svc_id: u32, bytes: u64) {
    bump(&SVC_STATS, svc_id, bytes);
}

#[inline(always)]
fn bump(map: &PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // Per-CPU: no other CPU writes this slot, so a plain add is race free.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
