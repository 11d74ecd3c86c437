//! Writing the desired state into the maps by diff, in an order that never leaves a
//! frontend pointing at an empty or half-written slot.
//!
//! [`Syncer`] keeps a shadow: a faithful mirror of what it has written to `SERVICES`
//! and `BACKENDS`, updated op by op as each write succeeds, so that a failed write
//! leaves it exact and the next sync retries only what is missing. After a restart
//! the shadow is rebuilt from the pinned maps ([`Syncer::from_maps`]) instead of
//! flushing them, so established flows and affinity entries keep their service and
//! backend ids.
//!
//! Order of writes for one frontend (the datapath reads `count`, then slots
//! `1..=count`; see lb-ebpf/src/engine.rs):
//! 1. slots that change within `1..=new_count` (new backends, and backends that move
//!    into the hole a removed one leaves, the "last" ones first),
//! 2. the `SERVICES` entry (count, flags, timeout), which raises or lowers `count`,
//! 3. deletion of the slots above `new_count`.
//!
//! So slots are always written before `count` is raised, `count` is lowered before
//! slots go, and a backend that stays is visible in some slot at every moment (a
//! mover is written to its new slot before its old one is cut off), which is what
//! conntrack and affinity entries need to find it again by backend id. Slot order
//! does not matter to backend choice: tables name backends by (address, port), and
//! their words are written with the slots the backends have then.
//!
//! `DRAINING` (backends the slices still list but that take no new connections; the
//! datapath keeps established flows going to them) is written around those steps:
//! new entries before step 1, stale ones after step 3, so that a backend moving from
//! the slots to draining (or back) is in one or the other at every moment. A draining
//! entry is keyed by the backend id the backend has in the slots, and holds that id
//! alive (see [`BackendIds`]) until it goes.
//!
//! A frontend that leaves the desired state (its Service was deleted) keeps its
//! established TCP flows, as under kube-proxy: it only deletes its iptables rules, and
//! the DNAT'd nf_conntrack entries carry on until they time out; it flushes conntrack
//! for UDP only (kubernetes pkg/proxy/iptables/proxier.go, `syncProxyRules`, whose
//! clean-up of stale services and endpoints in pkg/proxy/conntrack only deletes UDP
//! entries). So the frontend's slot backends are first put into `DRAINING` under its
//! service id, then its entry and slots go; its draining entries stay. The datapath
//! then finds an established TCP flow's backend there (`FwdDraining`). These "orphan"
//! entries hold the service id (not issued again while they exist) and their backend
//! ids, until [`Syncer::release_orphans`] (called by the conntrack garbage collector
//! with the flows still alive) or [`ORPHAN_MAX_AGE`] releases them. UDP flows never
//! look in `DRAINING`: the datapath reschedules them, like kube-proxy's flush.
//!
//! New flows pick their backend through the frontend's lookup table (see
//! [`super::table`]): `table_size` u16 slot numbers in the shared `TABLES` array from
//! word `table_off`, both in the `SERVICES` entry. A changed table is written to fresh
//! words first ([`Op::PutTable`]), and the `SERVICES` entry that points at them (step
//! 2 above) publishes it: one map update, so a packet reads the old table or the new
//! one, never a mix. The new table's slots are written before it (step 1), and the
//! old table's words are reused only after [`TABLE_QUARANTINE`], long after any packet
//! that read the old entry has finished.
//!
//! Conntrack hits skip looking their backend up while the epoch (`IdState::epoch`,
//! in `IDS`) is the one they last found it under. So every sync that removes a backend
//! from a service's slots (or overwrites its slot) or from `DRAINING` writes a bumped
//! epoch after all its removals ([`Op::PutIds`]); the first sync of every agent bumps
//! it too, in case its predecessor died between a removal and the bump.
//!
//! The prefilter bitmaps (`PREFILTER`: ClusterIPs, backend addresses) let traffic that
//! is for no service skip every hash lookup. Bits for the addresses a sync will need
//! are set before its first other write, and bits no address needs any more are
//! cleared after its last.
//!
//! Ids survive restarts: the allocators' state ([`IdState`]: the service id cursor and
//! the next backend id) is kept in the pinned `IDS` map, written ([`Op::PutIds`]) at
//! the head of every batch of writes that uses an id issued since the last write, so
//! that a crash can never leave in the maps an id that a restarted agent would issue
//! again to another service or backend, which a stale conntrack entry would then
//! match.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    time::{Duration, Instant},
};

use std::sync::Arc;

use lb_common::{
    BackendKey, BackendValue, Counter, DrainKey, IdState, PREFILTER_WORDS, SVC_F_AFFINITY, ServiceKey4, ServiceValue,
    ct_timeouts, prefilter_word,
};

use super::{
    model::{Desired, Frontend, FrontendKey},
    table::{Addr, Table},
};

/// How long the words of a replaced or deleted table stay unused before they may hold
/// another table: a packet that read the `SERVICES` entry pointing at them finishes
/// within microseconds (BPF programs run under RCU and do not sleep).
pub const TABLE_QUARANTINE: Duration = Duration::from_secs(2);

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutService(ServiceKey4, ServiceValue),
    DeleteService(ServiceKey4),
    PutBackend(BackendKey, BackendValue),
    DeleteBackend(BackendKey),
    PutDraining(DrainKey, BackendValue),
    DeleteDraining(DrainKey),
    /// Zero the `SVC_STATS` counters of a freshly allocated service id.
    ResetStats(u32),
    /// Persist the id allocators (`IDS`, index 0). Comes first in a batch that uses a
    /// newly issued id, and after the removals of a sync with a bumped epoch.
    PutIds(IdState),
    /// Write `TABLES` words from the first: a lookup table no `SERVICES` entry points
    /// at yet.
    PutTable(u32, Arc<[u64]>),
    /// Write one `PREFILTER` word.
    PutPrefilter(u32, u64),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::PutService(k, v) => write!(f, "put service {} -> id {} count {}", fmt_key(k), v.id, v.count),
            Op::DeleteService(k) => write!(f, "delete service {}", fmt_key(k)),
            Op::PutBackend(k, v) => write!(
                f,
                "put backend {}/{} -> {}:{} (id {})",
                k.svc_id,
                k.slot,
                std::net::Ipv4Addr::from(v.addr_be.to_ne_bytes()),
                u16::from_be(v.port_be),
                v.backend_id
            ),
            Op::DeleteBackend(k) => write!(f, "delete backend {}/{}", k.svc_id, k.slot),
            Op::PutDraining(k, v) => write!(
                f,
                "put draining {}/id {} -> {}:{}",
                k.svc_id,
                k.backend_id,
                std::net::Ipv4Addr::from(v.addr_be.to_ne_bytes()),
                u16::from_be(v.port_be)
            ),
            Op::DeleteDraining(k) => write!(f, "delete draining {}/id {}", k.svc_id, k.backend_id),
            Op::ResetStats(id) => write!(f, "reset stats of service {id}"),
            Op::PutIds(s) => write!(
                f,
                "put ids: next service id {}, next backend id {}, epoch {}",
                s.next_svc_id, s.next_backend_id, s.epoch
            ),
            Op::PutTable(off, words) => write!(f, "put table words {off}..{}", *off as usize + words.len()),
            Op::PutPrefilter(i, w) => write!(f, "put prefilter word {i} = {w:#x}"),
        }
    }
}

fn fmt_key(k: &ServiceKey4) -> String {
    format!("{}:{}/{}", std::net::Ipv4Addr::from(k.addr_be.to_ne_bytes()), u16::from_be(k.port_be), k.proto)
}

pub type WriteError = Box<dyn std::error::Error + Send + Sync>;

/// Where ops go: the pinned maps ([`BpfMaps`]), or a fake in tests.
pub trait MapWriter {
    fn apply(&mut self, op: &Op) -> Result<(), WriteError>;
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("map write failed: {op}")]
    Write {
        op: String,
        #[source]
        source: WriteError,
    },
    #[error("out of service ids: all {limit} ids of the SVC_STATS map are in use; raise its size")]
    OutOfServiceIds { limit: u32 },
    #[error("out of backend ids (u32 exhausted); run `lb cleanup`, then restart the agent")]
    OutOfBackendIds,
    #[error(
        "TABLES is full: no {words} free words for a lookup table ({free} free of {limit}); raise --max-table-words"
    )]
    OutOfTableSpace { words: u32, free: u32, limit: u32 },
}

/// What one sync wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncStats {
    pub services_put: usize,
    pub services_deleted: usize,
    pub backends_put: usize,
    pub backends_deleted: usize,
    pub draining_put: usize,
    pub draining_deleted: usize,
    /// `IDS` writes.
    pub ids_put: usize,
    /// `TABLES` writes (one per table) and `PREFILTER` words written.
    pub tables_put: usize,
    pub prefilter_put: usize,
    pub frontends: usize,
    pub endpoints: usize,
}

impl SyncStats {
    pub fn ops(&self) -> usize {
        self.services_put
            + self.services_deleted
            + self.backends_put
            + self.backends_deleted
            + self.draining_put
            + self.draining_deleted
            + self.ids_put
            + self.tables_put
            + self.prefilter_put
    }
}

/// A mirror of `SERVICES`, `BACKENDS` and `DRAINING` as written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shadow {
    /// Frontends and address markers.
    pub services: HashMap<ServiceKey4, ServiceValue>,
    /// Slots by service id.
    pub slots: HashMap<u32, BTreeMap<u32, BackendValue>>,
    /// Draining backends by service id, then backend id.
    pub draining: HashMap<u32, BTreeMap<u32, BackendValue>>,
    /// The lookup table each service id's `SERVICES` entry points at.
    pub tables: HashMap<u32, Table>,
    /// `PREFILTER` as written.
    pub prefilter: Vec<u64>,
}

/// Where the lookup tables live in `TABLES`: free ranges of words, and the ranges of
/// replaced tables waiting out [`TABLE_QUARANTINE`].
#[derive(Clone, Debug)]
struct TableSpace {
    limit: u32,
    /// Start -> length.
    free: BTreeMap<u32, u32>,
    quarantined: Vec<(Instant, u32, u32)>,
}

impl TableSpace {
    fn new(limit: u32) -> Self {
        Self {
            limit,
            free: if limit > 0 { BTreeMap::from([(0, limit)]) } else { BTreeMap::new() },
            quarantined: vec![],
        }
    }

    fn free_words(&self) -> u32 {
        self.free.values().sum::<u32>() + self.quarantined.iter().map(|q| q.2).sum::<u32>()
    }

    /// Marks `off..off+len` used (a table found in the maps after a restart).
    fn take(&mut self, off: u32, len: u32) -> bool {
        let Some((&start, &flen)) = self.free.range(..=off).next_back() else { return false };
        if off + len > start + flen {
            return false;
        }
        self.free.remove(&start);
        if off > start {
            self.free.insert(start, off - start);
        }
        if start + flen > off + len {
            self.free.insert(off + len, start + flen - off - len);
        }
        true
    }

    /// First fit, after giving back what has waited out its quarantine.
    fn alloc(&mut self, len: u32, now: Instant) -> Result<u32, SyncError> {
        let (done, wait): (Vec<_>, Vec<_>) =
            self.quarantined.drain(..).partition(|(at, _, _)| now.saturating_duration_since(*at) >= TABLE_QUARANTINE);
        self.quarantined = wait;
        for (_, off, l) in done {
            self.release_now(off, l);
        }
        let found = self.free.iter().find(|(_, l)| **l >= len).map(|(o, _)| *o);
        let Some(off) = found else {
            return Err(SyncError::OutOfTableSpace { words: len, free: self.free_words(), limit: self.limit });
        };
        self.take(off, len);
        Ok(off)
    }

    /// Frees words no `SERVICES` entry ever pointed at.
    fn release_now(&mut self, off: u32, len: u32) {
        let (mut off, mut len) = (off, len);
        if let Some((&p, &pl)) = self.free.range(..off).next_back()
            && p + pl == off
        {
            self.free.remove(&p);
            off = p;
            len += pl;
        }
        if let Some(nl) = self.free.remove(&(off + len)) {
            len += nl;
        }
        self.free.insert(off, len);
    }

    /// Frees the words of a table that was published, after the quarantine.
    fn release(&mut self, off: u32, len: u32, now: Instant) {
        self.quarantined.push((now, off, len));
    }
}

/// `TABLES` words a table of `size` buckets takes.
fn words_for(size: u32) -> u32 {
    size.div_ceil(lb_common::TABLE_LANES)
}

fn is_marker(k: &ServiceKey4) -> bool {
    k.port_be == 0 && k.proto == 0
}

/// Service ids: 1..limit, where `limit` is the size of `SVC_STATS`, which they index.
/// Issued round-robin from a cursor that is persisted in `IDS`: ids in use are
/// skipped, and the cursor wraps at `limit`, so a freed id comes back only after the
/// cursor has gone round the whole space, long after any conntrack or affinity entry
/// of its previous frontend has aged out, restarts included.
#[derive(Clone, Debug)]
struct ServiceIds {
    /// The next id to try, in 1..limit.
    cursor: u32,
    limit: u32,
    /// Ids a frontend, slots or `DRAINING` entries (orphans included) hold.
    held: HashSet<u32>,
}

impl ServiceIds {
    fn new(limit: u32) -> Self {
        Self { cursor: 1, limit: limit.max(2), held: HashSet::new() }
    }

    /// `id` if it is a valid cursor, else 1 (wrapped).
    fn wrap(&self, id: u32) -> u32 {
        if (1..self.limit).contains(&id) { id } else { 1 }
    }

    fn alloc(&mut self) -> Result<u32, SyncError> {
        for _ in 1..self.limit {
            let id = self.cursor;
            self.cursor = self.wrap(id.saturating_add(1));
            if self.held.insert(id) {
                return Ok(id);
            }
        }
        Err(SyncError::OutOfServiceIds { limit: self.limit })
    }

    fn release(&mut self, id: u32) {
        self.held.remove(&id);
    }
}

/// Backend ids, global over services and never reused for another backend: one per
/// (address, port). An id stays live while any slot or `DRAINING` entry holds it (a
/// refcount). A backend that leaves keeps its id for `RETIRE_GRACE`, so that a
/// pod flapping out of and back into readiness gets its old id back and its
/// established flows, which validate their backend by id, carry on.
#[derive(Clone, Debug)]
struct BackendIds {
    next: u32,
    /// (addr_be, port_be) -> (id, slots and draining entries that hold it).
    live: HashMap<(u32, u16), (u32, u32)>,
    retired: HashMap<(u32, u16), (u32, Instant)>,
    /// Handed out during this sync; retired at its end if still unused.
    pending: Vec<(u32, u16)>,
}

const RETIRE_GRACE: Duration = Duration::from_secs(600);

/// How long orphan `DRAINING` entries (those of a deleted frontend) are kept at most,
/// in case the conntrack garbage collector never releases them: conntrack's own
/// timeout for an established TCP flow, which is also kube-proxy's default for
/// nf_conntrack's (`conntrack.tcpEstablishedTimeout`, pkg/proxy/apis/config/v1alpha1/defaults.go).
pub const ORPHAN_MAX_AGE: Duration = Duration::from_secs(ct_timeouts::TCP_ESTABLISHED as u64);

/// Orphans younger than this are kept by [`Syncer::release_orphans`] whatever `live`
/// says: a conntrack scan that began before their frontend went may have passed a flow
/// created just before it went.
pub const ORPHAN_MIN_AGE: Duration = Duration::from_secs(30);

impl BackendIds {
    fn id_for(&mut self, addr: u32, port: u16) -> Result<u32, SyncError> {
        if let Some((id, _)) = self.live.get(&(addr, port)) {
            return Ok(*id);
        }
        let id = match self.retired.remove(&(addr, port)) {
            Some((id, _)) => id,
            None => {
                let id = self.next;
                self.next = self.next.checked_add(1).ok_or(SyncError::OutOfBackendIds)?;
                id
            }
        };
        self.live.insert((addr, port), (id, 0));
        self.pending.push((addr, port));
        Ok(id)
    }
    fn incref(&mut self, v: &BackendValue) {
        let e = self.live.entry((v.addr_be, v.port_be)).or_insert((v.backend_id, 0));
        e.1 += 1;
    }
    fn decref(&mut self, v: &BackendValue, now: Instant) {
        let k = (v.addr_be, v.port_be);
        if let Some(e) = self.live.get_mut(&k) {
            e.1 = e.1.saturating_sub(1);
            if e.1 == 0 {
                let id = e.0;
                self.live.remove(&k);
                self.retired.insert(k, (id, now));
            }
        }
    }
    fn end_sync(&mut self, now: Instant) {
        for k in std::mem::take(&mut self.pending) {
            if let Some((id, 0)) = self.live.get(&k).copied() {
                self.live.remove(&k);
                self.retired.insert(k, (id, now));
            }
        }
        self.retired.retain(|_, (_, at)| now.duration_since(*at) < RETIRE_GRACE);
    }
}

/// Diffs desired state against the shadow and writes the difference.
#[derive(Clone, Debug)]
pub struct Syncer {
    shadow: Shadow,
    svc_ids: ServiceIds,
    backend_ids: BackendIds,
    /// What `IDS` holds (as last written or read).
    persisted: IdState,
    /// Service ids that no frontend owns but whose `DRAINING` entries are kept for the
    /// established flows of their deleted frontend, with when they were orphaned.
    orphans: BTreeMap<u32, Instant>,
    space: TableSpace,
    /// The backend epoch as last written (or read).
    epoch: u32,
    /// A backend has been removed since the epoch was last bumped (or this syncer is
    /// new: its predecessor may have died between a removal and the bump).
    removed: bool,
    /// Tables written ([`Op::PutTable`]) but not yet published, by first word.
    pending_tables: HashMap<u32, Table>,
    /// `IdState::jiffy_recip`: the datapath's conntrack clock.
    jiffy_recip: u32,
    /// The ClusterIP of each orphan service id: its established flows' packets are
    /// still addressed to it, so its prefilter bit stays while the orphan does.
    orphan_vips: HashMap<u32, u32>,
    /// After a restart with orphans, whose ClusterIPs the maps do not record: the
    /// ClusterIP bits found, kept until those orphans have all gone.
    inherited_vip_bits: Option<Vec<u64>>,
    /// (service id, backend id) pairs that left a slot or `DRAINING` since the last
    /// [`Syncer::take_departed`]: the sockets the socket LB sent to them may need closing.
    departed: Vec<DrainKey>,
}

/// How a backend that left a service's slots stands now (see [`Syncer::take_departed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Departure {
    /// Still listed, draining (terminating or unready): its pod exists. UDP sockets
    /// sent to it are closed, TCP connections keep going, as under kube-proxy.
    Draining,
    /// Gone from a live Service: its pod is gone too. UDP and TCP sockets are closed.
    Gone,
}

impl Syncer {
    /// Drops what [`Syncer::take_departed`] would tell, unread (the socket LB is off).
    pub fn forget_departed(&mut self) {
        self.departed.clear();
    }

    /// The backends that left a service since the last call, each once, with where
    /// they stand now; a backend that only moved slot is not one. A deleted Service's
    /// backends are [`Departure::Draining`] even once their orphan entries are released:
    /// the pods may well live on, and kube-proxy keeps such TCP flows.
    pub fn take_departed(&mut self) -> Vec<(DrainKey, Departure)> {
        if self.departed.is_empty() {
            return Vec::new();
        }
        let owned = self.owned_ids();
        let mut seen = HashSet::new();
        let departed = std::mem::take(&mut self.departed);
        departed
            .into_iter()
            .filter(|k| seen.insert(*k))
            .filter(|k| {
                !self.shadow.slots.get(&k.svc_id).is_some_and(|s| s.values().any(|b| b.backend_id == k.backend_id))
            })
            .map(|k| {
                let draining = self.shadow.draining.get(&k.svc_id).is_some_and(|d| d.contains_key(&k.backend_id));
                (k, if draining || !owned.contains(&k.svc_id) { Departure::Draining } else { Departure::Gone })
            })
            .collect()
    }

    /// A syncer for empty maps. `svc_id_limit` is `SVC_STATS`' `max_entries`.
    pub fn new(svc_id_limit: u32) -> Self {
        Self::with_table_words(svc_id_limit, lb_common::limits::TABLE_WORDS)
    }

    /// [`Syncer::new`] for a `TABLES` of `table_words` words.
    pub fn with_table_words(svc_id_limit: u32, table_words: u32) -> Self {
        Self {
            shadow: Shadow { prefilter: vec![0; PREFILTER_WORDS as usize], ..Default::default() },
            svc_ids: ServiceIds::new(svc_id_limit),
            backend_ids: BackendIds { next: 1, live: HashMap::new(), retired: HashMap::new(), pending: Vec::new() },
            persisted: IdState::default(),
            orphans: BTreeMap::new(),
            space: TableSpace::new(table_words),
            epoch: 0,
            removed: true,
            pending_tables: HashMap::new(),
            jiffy_recip: 0,
            orphan_vips: HashMap::new(),
            inherited_vip_bits: None,
            departed: Vec::new(),
        }
    }

    /// Rebuilds the shadow and the id allocators from what the pinned maps hold, so
    /// that the first sync after a restart writes only what changed meanwhile.
    ///
    /// `ids` is what `IDS` holds: the allocators go on from there. Zero fields (maps
    /// of an agent that did not persist them) fall back to the largest id in the maps
    /// plus one. The backend id is the larger of both, so it never goes backwards;
    /// a valid persisted service cursor is taken as it is, since after a wrap it is
    /// rightly below ids in use (they are skipped when it reaches them).
    ///
    /// `DRAINING` entries (and slots) of service ids that no frontend owns are
    /// orphans of deleted frontends: kept until the conntrack collector finds no flow
    /// using them, without [`ORPHAN_MIN_AGE`]'s wait (see below), and at most
    /// [`ORPHAN_MAX_AGE`] from now.
    ///
    /// `tables` reads `TABLES` words (offset, count); a frontend whose table does not
    /// read back (it names an empty slot, or overlaps another) gets a new one on the
    /// next sync. `prefilter` is what `PREFILTER` holds.
    #[expect(clippy::too_many_arguments, reason = "one argument per map")]
    pub fn from_maps(
        services: impl IntoIterator<Item = (ServiceKey4, ServiceValue)>,
        backends: impl IntoIterator<Item = (BackendKey, BackendValue)>,
        draining: impl IntoIterator<Item = (DrainKey, BackendValue)>,
        ids: IdState,
        svc_id_limit: u32,
        table_words: u32,
        tables: impl Fn(u32, u32) -> Vec<u64>,
        prefilter: Vec<u64>,
    ) -> Self {
        let mut s = Self::with_table_words(svc_id_limit, table_words);
        let mut max_svc = 0;
        for (k, v) in services {
            if !is_marker(&k) {
                max_svc = max_svc.max(v.id);
            }
            s.shadow.services.insert(k, v);
        }
        let mut max_backend = 0;
        for (k, v) in backends {
            max_backend = max_backend.max(v.backend_id);
            max_svc = max_svc.max(k.svc_id);
            s.backend_ids.incref(&v);
            s.shadow.slots.entry(k.svc_id).or_default().insert(k.slot, v);
        }
        for (k, v) in draining {
            max_backend = max_backend.max(v.backend_id).max(k.backend_id);
            max_svc = max_svc.max(k.svc_id);
            s.backend_ids.incref(&v);
            s.shadow.draining.entry(k.svc_id).or_default().insert(k.backend_id, v);
        }
        let owned = s.owned_ids();
        // Orphans found in the maps lost their frontend before this agent started, so
        // no flow of theirs can begin from now on, and every conntrack scan this agent
        // makes sees all their flows: the reason for ORPHAN_MIN_AGE (a scan that began
        // before the frontend went) does not apply to them. Aged from now instead,
        // each restart would hold them 30 s more, and an agent restarting faster than
        // that (a crash loop) would pile them up without end.
        let now = Instant::now();
        let inherited = now.checked_sub(ORPHAN_MIN_AGE).unwrap_or(now);
        s.orphans = s
            .shadow
            .slots
            .keys()
            .chain(s.shadow.draining.keys())
            .filter(|id| !owned.contains(id))
            .map(|id| (*id, inherited))
            .collect();
        s.svc_ids.held = owned.into_iter().chain(s.orphans.keys().copied()).collect();
        s.svc_ids.cursor = if (1..s.svc_ids.limit).contains(&ids.next_svc_id) {
            ids.next_svc_id
        } else {
            s.svc_ids.wrap(max_svc.saturating_add(1))
        };
        s.backend_ids.next = ids.next_backend_id.max(max_backend.saturating_add(1)).max(1);
        s.persisted = ids;
        s.epoch = ids.epoch;
        s.jiffy_recip = ids.jiffy_recip;
        let mut fronts: Vec<(u32, ServiceValue)> = s
            .shadow
            .services
            .iter()
            .filter(|(k, v)| !is_marker(k) && v.table_size > 0)
            .map(|(_, v)| (v.id, *v))
            .collect();
        fronts.sort_unstable_by_key(|(id, _)| *id);
        for (id, v) in fronts {
            let len = words_for(v.table_size);
            let slots = s.shadow.slots.get(&id);
            let table = Table::from_words(&tables(v.table_off, len), v.table_size, |slot| {
                slots.and_then(|m| m.get(&slot)).filter(|_| slot <= v.count).map(|b| (b.addr_be, b.port_be))
            });
            // A table that does not read back stays allocated (its entry points at it)
            // but unknown: the next sync replaces it.
            if s.space.take(v.table_off, len)
                && let Some(t) = table
            {
                s.shadow.tables.insert(id, t);
            }
        }
        if prefilter.len() == PREFILTER_WORDS as usize {
            if !s.orphans.is_empty() {
                s.inherited_vip_bits = Some(prefilter[..lb_common::PREFILTER_HALF_WORDS as usize].to_vec());
            }
            s.shadow.prefilter = prefilter;
        }
        s
    }

    /// What `IDS` should hold.
    fn id_state(&self) -> IdState {
        IdState {
            next_svc_id: self.svc_ids.cursor,
            next_backend_id: self.backend_ids.next,
            epoch: self.epoch,
            jiffy_recip: self.jiffy_recip,
        }
    }

    /// Sets the datapath's conntrack clock (`IdState::jiffy_recip`, from the kernel's
    /// HZ) and writes `IDS` now if that changes it: before the first sync, so that
    /// the first flows already age.
    pub fn set_clock<W: MapWriter>(&mut self, jiffy_recip: u32, w: &mut W) -> Result<(), SyncError> {
        self.jiffy_recip = jiffy_recip;
        let ids = self.id_state();
        if ids != self.persisted {
            let op = Op::PutIds(ids);
            w.apply(&op).map_err(|source| SyncError::Write { op: op.to_string(), source })?;
            self.persisted = ids;
        }
        Ok(())
    }

    /// The epoch as last written.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// `PREFILTER` words as the addresses of the shadow (and `extra`) need them.
    fn prefilter_words(&self, extra: Option<&Desired>) -> Vec<u64> {
        let mut w = vec![0u64; PREFILTER_WORDS as usize];
        let mut set = |addr_be: u32, backend: bool| {
            let (i, mask) = prefilter_word(addr_be, backend);
            w[i as usize] |= mask;
        };
        for k in self.shadow.services.keys() {
            set(k.addr_be, false);
        }
        for vip in self.orphan_vips.values() {
            set(*vip, false);
        }
        for b in self.shadow.slots.values().chain(self.shadow.draining.values()).flat_map(|m| m.values()) {
            set(b.addr_be, true);
        }
        if let Some(d) = extra {
            for (k, fe) in &d.frontends {
                set(k.map_key().addr_be, false);
                for b in fe.backends.iter().chain(&fe.draining) {
                    set(u32::from_ne_bytes(b.ip.octets()), true);
                }
            }
        }
        if let Some(inherited) = self.inherited_vip_bits.as_ref().filter(|_| !self.orphans.is_empty()) {
            for (word, bits) in w.iter_mut().zip(inherited) {
                *word |= bits;
            }
        }
        w
    }

    /// Writes the prefilter words that differ from `want` (`set_only`: only adding
    /// bits).
    fn write_prefilter<W: MapWriter>(
        &mut self,
        want: &[u64],
        set_only: bool,
        w: &mut W,
        stats: &mut SyncStats,
        now: Instant,
    ) -> Result<(), SyncError> {
        let mut ops: Vec<Op> = want
            .iter()
            .zip(&self.shadow.prefilter)
            .enumerate()
            .filter_map(|(i, (want, cur))| {
                let next = if set_only { cur | want } else { *want };
                (next != *cur).then_some(Op::PutPrefilter(i as u32, next))
            })
            .collect();
        self.apply(w, &mut ops, stats, now)
    }

    /// The end of every batch of writes: bits no address needs go, and after a
    /// removal the epoch moves on.
    fn finish<W: MapWriter>(&mut self, w: &mut W, stats: &mut SyncStats, now: Instant) -> Result<(), SyncError> {
        if self.orphans.is_empty() {
            self.inherited_vip_bits = None;
        }
        let want = self.prefilter_words(None);
        self.write_prefilter(&want, false, w, stats, now)?;
        if self.removed {
            let ids = IdState { epoch: self.epoch.wrapping_add(1), ..self.id_state() };
            let op = Op::PutIds(ids);
            w.apply(&op).map_err(|source| SyncError::Write { op: op.to_string(), source })?;
            self.persisted = ids;
            self.epoch = ids.epoch;
            self.removed = false;
            stats.ids_put += 1;
        }
        Ok(())
    }

    /// Service ids of the frontends.
    fn owned_ids(&self) -> HashSet<u32> {
        self.shadow.services.iter().filter(|(k, _)| !is_marker(k)).map(|(_, v)| v.id).collect()
    }

    pub fn shadow(&self) -> &Shadow {
        &self.shadow
    }

    /// Frontends (not markers) currently programmed.
    pub fn frontend_count(&self) -> usize {
        self.shadow.services.keys().filter(|k| !is_marker(k)).count()
    }

    /// Orphan `DRAINING` entries: those of deleted frontends, kept for their
    /// established flows.
    pub fn orphan_count(&self) -> usize {
        self.orphans.keys().filter_map(|id| self.shadow.draining.get(id)).map(BTreeMap::len).sum()
    }

    /// Deletes the orphan `DRAINING` entries (see the module doc) that no live flow
    /// uses: those whose (service id, backend id) is not in `live`, which the caller
    /// (the conntrack garbage collector) collects from the conntrack entries still
    /// alive. Orphans younger than [`ORPHAN_MIN_AGE`] stay whatever `live` says; those
    /// older than [`ORPHAN_MAX_AGE`] go whatever it says. A service id left with no
    /// entry can be issued again (once the cursor comes round to it).
    pub fn release_orphans<W: MapWriter>(
        &mut self,
        live: &HashSet<(u32, u32)>,
        w: &mut W,
    ) -> Result<SyncStats, SyncError> {
        let now = Instant::now();
        let mut stats = SyncStats::default();
        let res =
            self.release_orphans_at(Some(live), w, &mut stats, now).and_then(|()| self.finish(w, &mut stats, now));
        self.backend_ids.end_sync(now);
        res.map(|()| stats)
    }

    /// With `live` `None`, only the orphans past [`ORPHAN_MAX_AGE`] go.
    fn release_orphans_at<W: MapWriter>(
        &mut self,
        live: Option<&HashSet<(u32, u32)>>,
        w: &mut W,
        stats: &mut SyncStats,
        now: Instant,
    ) -> Result<(), SyncError> {
        let mut ops = Vec::new();
        let ids: Vec<(u32, Instant)> = self.orphans.iter().map(|(id, at)| (*id, *at)).collect();
        for (id, at) in ids {
            let age = now.saturating_duration_since(at);
            if age < ORPHAN_MIN_AGE {
                continue;
            }
            let expired = age >= ORPHAN_MAX_AGE;
            if !expired && live.is_none() {
                continue;
            }
            if let Some(d) = self.shadow.draining.get(&id) {
                ops.extend(
                    d.keys()
                        .filter(|&&b| expired || live.is_some_and(|l| !l.contains(&(id, b))))
                        .map(|&backend_id| Op::DeleteDraining(DrainKey { svc_id: id, backend_id })),
                );
            }
            self.apply(w, &mut ops, stats, now)?;
            self.settle_orphan(id, now);
        }
        Ok(())
    }

    /// After the frontend of service `id` went, or some of its orphans did: `id` is an
    /// orphan while entries under it remain, and free once none does.
    fn settle_orphan(&mut self, id: u32, now: Instant) {
        if self.id_in_use(id) {
            self.orphans.entry(id).or_insert(now);
        } else {
            self.orphans.remove(&id);
            self.orphan_vips.remove(&id);
            self.svc_ids.release(id);
        }
    }

    /// Service `id` has no frontend (any more): keeps its slot backends' established
    /// flows going by putting them into `DRAINING` under `id`, then deletes its entry
    /// (`key`, if it still has one) and its slots. Its draining entries stay, as
    /// orphans.
    fn orphan<W: MapWriter>(
        &mut self,
        id: u32,
        key: Option<ServiceKey4>,
        w: &mut W,
        stats: &mut SyncStats,
        now: Instant,
    ) -> Result<(), SyncError> {
        let mut ops = Vec::new();
        let mut seen = HashSet::new();
        if let Some(k) = key {
            self.orphan_vips.insert(id, k.addr_be);
        }
        if let Some(slots) = self.shadow.slots.get(&id) {
            for v in slots.values() {
                if seen.insert(v.backend_id)
                    && self.shadow.draining.get(&id).and_then(|d| d.get(&v.backend_id)) != Some(v)
                {
                    ops.push(Op::PutDraining(DrainKey { svc_id: id, backend_id: v.backend_id }, *v));
                }
            }
        }
        if let Err(e) = self.apply(w, &mut ops, stats, now) {
            // Most likely `DRAINING` is full. A deleted Service must not keep serving
            // new connections because of that: cut its flows, as before orphans.
            ops.clear();
            tracing::warn!(
                svc_id = id,
                error = %super::chain(&e),
                "cannot keep the established flows of a deleted service (is DRAINING full? see --max-draining); they are cut"
            );
        }
        ops.extend(key.map(Op::DeleteService));
        self.delete_slots_ops(id, 0, &mut ops);
        let res = self.apply(w, &mut ops, stats, now);
        // If the entry could not be deleted, the frontend still owns `id`; the next
        // sync tries again.
        if !key.is_some_and(|k| self.shadow.services.contains_key(&k)) {
            self.settle_orphan(id, now);
        }
        res
    }

    /// Writes what differs between `desired` and the shadow. On error, the shadow
    /// still matches the maps exactly; call again to retry.
    pub fn sync<W: MapWriter>(&mut self, desired: &Desired, w: &mut W) -> Result<SyncStats, SyncError> {
        let now = Instant::now();
        let res = self.sync_inner(desired, w, now);
        self.backend_ids.end_sync(now);
        res
    }

    fn sync_inner<W: MapWriter>(&mut self, desired: &Desired, w: &mut W, now: Instant) -> Result<SyncStats, SyncError> {
        let mut stats =
            SyncStats { frontends: desired.frontends.len(), endpoints: desired.endpoint_count(), ..Default::default() };
        let wanted: HashMap<ServiceKey4, &FrontendKey> = desired.frontends.keys().map(|k| (k.map_key(), k)).collect();
        let mut ops = Vec::new();
        // 0. Prefilter bits for every address this sync may write, before it does.
        let want = self.prefilter_words(Some(desired));
        self.write_prefilter(&want, true, w, &mut stats, now)?;

        // 1. Frontends that are gone, first, which also makes room in the maps. Their
        //    established flows go on (see the module doc).
        let mut gone: Vec<ServiceKey4> =
            self.shadow.services.keys().filter(|k| !is_marker(k) && !wanted.contains_key(k)).copied().collect();
        gone.sort_unstable();
        for key in gone {
            let id = self.shadow.services[&key].id;
            self.orphan(id, Some(key), w, &mut stats, now)?;
        }
        // Ids no frontend owns that still have slots (left by an interrupted write or a
        // crash), or draining entries not yet known as orphans (after a failed write):
        // orphans too.
        let owned = self.owned_ids();
        let mut strays: Vec<u32> = self
            .shadow
            .slots
            .keys()
            .chain(self.shadow.draining.keys().filter(|id| !self.orphans.contains_key(id)))
            .filter(|id| !owned.contains(id))
            .copied()
            .collect::<HashSet<u32>>()
            .into_iter()
            .collect();
        strays.sort_unstable();
        for id in strays {
            self.orphan(id, None, w, &mut stats, now)?;
        }
        // Orphans past their maximum age, in case the garbage collector never ran.
        self.release_orphans_at(None, w, &mut stats, now)?;

        // 2. New and changed frontends: new draining entries, slots and count, stale
        //    draining entries, in that order.
        for (fkey, fe) in &desired.frontends {
            let key = fkey.map_key();
            let cur = self.shadow.services.get(&key).copied();
            let id = match cur {
                Some(cur) => cur.id,
                None => self.svc_ids.alloc()?,
            };
            let res = self.sync_frontend(key, cur, id, fe, w, &mut stats, now);
            if res.is_err() && cur.is_none() && !self.shadow.services.contains_key(&key) && !self.id_in_use(id) {
                // Nothing holds the new id: it is free again.
                self.svc_ids.release(id);
            }
            res?;
        }

        // 3. Address markers: present for every ClusterIP with a frontend, removed
        //    once its last frontend has gone.
        let vips: HashSet<u32> = wanted.keys().map(|k| k.addr_be).collect();
        let mut stale: Vec<ServiceKey4> =
            self.shadow.services.keys().filter(|k| is_marker(k) && !vips.contains(&k.addr_be)).copied().collect();
        stale.sort_unstable();
        ops.extend(stale.into_iter().map(Op::DeleteService));
        for vip in &vips {
            let m = ServiceKey4::address_marker(*vip);
            if self.shadow.services.get(&m) != Some(&ServiceValue::default()) {
                ops.push(Op::PutService(m, ServiceValue::default()));
            }
        }
        self.apply(w, &mut ops, &mut stats, now)?;
        // 4. Prefilter bits nothing needs any more, and the epoch after removals.
        self.finish(w, &mut stats, now)?;
        Ok(stats)
    }

    /// Plans and writes one frontend of the desired state, under service `id`.
    #[expect(clippy::too_many_arguments, reason = "the state of one step of `sync_inner`")]
    fn sync_frontend<W: MapWriter>(
        &mut self,
        key: ServiceKey4,
        cur: Option<ServiceValue>,
        id: u32,
        fe: &Frontend,
        w: &mut W,
        stats: &mut SyncStats,
        now: Instant,
    ) -> Result<(), SyncError> {
        let limit = lb_common::limits::MAX_BACKENDS_PER_SERVICE as usize;
        let capped;
        let fe = if fe.backends.len() > limit {
            tracing::warn!(
                service = %fe.service,
                backends = fe.backends.len(),
                limit,
                "more ready endpoints than the datapath's per-service limit; only the first {limit} (by address) get new connections"
            );
            capped = Frontend { backends: fe.backends.iter().take(limit).cloned().collect(), ..fe.clone() };
            &capped
        } else {
            fe
        };
        let mut ops = Vec::new();
        let keep = self.put_draining_ops(id, fe, &mut ops)?;
        let planned = match cur {
            Some(cur) => self.plan_update(key, cur, fe, &mut ops, now),
            None => self.plan_new(key, id, fe, &mut ops, now),
        };
        let res = planned.and_then(|()| {
            // Under a new id these are leftovers (should not happen; be safe).
            self.delete_draining_ops(id, &keep, &mut ops);
            self.apply(w, &mut ops, stats, now)
        });
        // Tables written but never published (a write failed before the entry): their
        // words are free again at once, as no packet can have read them.
        for (off, t) in std::mem::take(&mut self.pending_tables) {
            self.space.release_now(off, words_for(t.size()));
        }
        res
    }

    /// Allocates words for `table` (whose backends sit in the slots `slot_of` says)
    /// and plans their write; returns the `SERVICES` fields that point at it.
    fn plan_table(
        &mut self,
        table: Table,
        slot_of: &HashMap<Addr, u32>,
        ops: &mut Vec<Op>,
        now: Instant,
    ) -> Result<(u32, u32), SyncError> {
        if table.buckets.is_empty() {
            return Ok((0, 0));
        }
        let words = table.words(slot_of).expect("every backend of a planned table has a slot below 2^16");
        let off = self.space.alloc(words.len() as u32, now)?;
        ops.push(Op::PutTable(off, words.into()));
        let size = table.size();
        self.pending_tables.insert(off, table);
        Ok((off, size))
    }

    fn id_in_use(&self, id: u32) -> bool {
        self.shadow.slots.get(&id).is_some_and(|s| !s.is_empty())
            || self.shadow.draining.get(&id).is_some_and(|s| !s.is_empty())
    }

    /// Puts the draining entries of `fe` (service `id`) that the map lacks; returns the
    /// backend ids of all of them.
    fn put_draining_ops(&mut self, id: u32, fe: &Frontend, ops: &mut Vec<Op>) -> Result<HashSet<u32>, SyncError> {
        let mut keep = HashSet::with_capacity(fe.draining.len());
        for b in &fe.draining {
            let v = self.backend_value(b)?;
            keep.insert(v.backend_id);
            if self.shadow.draining.get(&id).and_then(|d| d.get(&v.backend_id)) != Some(&v) {
                ops.push(Op::PutDraining(DrainKey { svc_id: id, backend_id: v.backend_id }, v));
            }
        }
        Ok(keep)
    }

    /// Deletes the draining entries of service `id` whose backend id is not in `keep`.
    fn delete_draining_ops(&self, id: u32, keep: &HashSet<u32>, ops: &mut Vec<Op>) {
        if let Some(d) = self.shadow.draining.get(&id) {
            ops.extend(
                d.keys()
                    .filter(|b| !keep.contains(b))
                    .map(|&backend_id| Op::DeleteDraining(DrainKey { svc_id: id, backend_id })),
            );
        }
    }

    fn delete_slots_ops(&self, id: u32, above: u32, ops: &mut Vec<Op>) {
        if let Some(slots) = self.shadow.slots.get(&id) {
            ops.extend(
                slots
                    .keys()
                    .filter(|&&s| s > above || s == 0)
                    .map(|&slot| Op::DeleteBackend(BackendKey { svc_id: id, slot })),
            );
        }
    }

    fn service_value(id: u32, count: u32, fe: &Frontend, (table_off, table_size): (u32, u32)) -> ServiceValue {
        ServiceValue {
            id,
            count,
            affinity_timeout_s: fe.affinity_timeout_s.unwrap_or(0),
            flags: if fe.affinity_timeout_s.is_some() { SVC_F_AFFINITY } else { 0 },
            no_backends: fe.no_endpoints.map_value(),
            _pad: 0,
            table_off,
            table_size,
        }
    }

    fn backend_value(&mut self, b: &super::model::Backend) -> Result<BackendValue, SyncError> {
        let addr_be = u32::from_ne_bytes(b.ip.octets());
        let port_be = b.port.to_be();
        Ok(BackendValue { backend_id: self.backend_ids.id_for(addr_be, port_be)?, addr_be, port_be, _pad: [0; 2] })
    }

    fn plan_new(
        &mut self,
        key: ServiceKey4,
        id: u32,
        fe: &Frontend,
        ops: &mut Vec<Op>,
        now: Instant,
    ) -> Result<(), SyncError> {
        ops.push(Op::ResetStats(id));
        // Leftover slots under a reused id (should not happen; be safe).
        self.delete_slots_ops(id, 0, ops);
        let marker = ServiceKey4::address_marker(key.addr_be);
        if !self.shadow.services.contains_key(&marker) {
            ops.push(Op::PutService(marker, ServiceValue::default()));
        }
        let mut n = 0;
        let mut slot_of = HashMap::with_capacity(fe.backends.len());
        for b in &fe.backends {
            n += 1;
            let v = self.backend_value(b)?;
            slot_of.insert((v.addr_be, v.port_be), n);
            ops.push(Op::PutBackend(BackendKey { svc_id: id, slot: n }, v));
        }
        let addrs: Vec<Addr> = slot_of.keys().copied().collect();
        let table = self.plan_table(Table::build(&addrs), &slot_of, ops, now)?;
        ops.push(Op::PutService(key, Self::service_value(id, n, fe, table)));
        Ok(())
    }

    fn plan_update(
        &mut self,
        key: ServiceKey4,
        cur: ServiceValue,
        fe: &Frontend,
        ops: &mut Vec<Op>,
        now: Instant,
    ) -> Result<(), SyncError> {
        let id = cur.id;
        let want: HashSet<(u32, u16)> =
            fe.backends.iter().map(|b| (u32::from_ne_bytes(b.ip.octets()), b.port.to_be())).collect();
        let n = want.len() as u32;
        let empty = BTreeMap::new();
        let slots = self.shadow.slots.get(&id).unwrap_or(&empty);
        let old_count = cur.count;

        // Fast path: nothing about the backends changed.
        let unchanged = n == old_count
            && slots.len() as u32 == n
            && (1..=n).all(|p| slots.get(&p).is_some_and(|b| want.contains(&(b.addr_be, b.port_be))));
        let mut table = (cur.table_off, cur.table_size);
        if unchanged && (n == 0 || self.shadow.tables.contains_key(&id)) {
            // Same backends in the same slots: the table stands.
        } else if unchanged {
            // The table did not read back after a restart: a new one.
            let slot_of: HashMap<Addr, u32> = slots.iter().map(|(p, b)| ((b.addr_be, b.port_be), *p)).collect();
            let addrs: Vec<Addr> = slot_of.keys().copied().collect();
            table = self.plan_table(Table::build(&addrs), &slot_of, ops, now)?;
        } else {
            let mut layout: Vec<Option<BackendValue>> = vec![None; n as usize];
            let mut placed: HashSet<(u32, u16)> = HashSet::with_capacity(n as usize);
            // Backends that stay, in a slot that stays: untouched.
            for p in 1..=old_count.min(n) {
                if let Some(b) = slots.get(&p)
                    && want.contains(&(b.addr_be, b.port_be))
                    && placed.insert((b.addr_be, b.port_be))
                {
                    layout[p as usize - 1] = Some(*b);
                }
            }
            // Backends that stay but sit above the new count move down into holes,
            // keeping their id; then the new ones.
            let mut to_place: Vec<BackendValue> = Vec::new();
            for (&p, b) in slots.range(n + 1..) {
                if p <= old_count && want.contains(&(b.addr_be, b.port_be)) && placed.insert((b.addr_be, b.port_be)) {
                    to_place.push(*b);
                }
            }
            for b in &fe.backends {
                let k = (u32::from_ne_bytes(b.ip.octets()), b.port.to_be());
                if placed.insert(k) {
                    let v = self.backend_value(b)?;
                    to_place.push(v);
                }
            }
            let mut it = to_place.into_iter();
            for slot in layout.iter_mut().filter(|s| s.is_none()) {
                *slot = it.next();
            }
            let slots = self.shadow.slots.get(&id).unwrap_or(&empty);
            let mut slot_of = HashMap::with_capacity(layout.len());
            for (i, v) in layout.iter().enumerate() {
                let p = i as u32 + 1;
                if let Some(v) = v {
                    slot_of.insert((v.addr_be, v.port_be), p);
                    if slots.get(&p) != Some(v) {
                        ops.push(Op::PutBackend(BackendKey { svc_id: id, slot: p }, *v));
                    }
                }
            }
            let addrs: Vec<Addr> = slot_of.keys().copied().collect();
            let next = match self.shadow.tables.get(&id) {
                Some(t) => t.update(&addrs),
                None => Table::build(&addrs),
            };
            table = self.plan_table(next, &slot_of, ops, now)?;
        }
        let value = Self::service_value(id, n, fe, table);
        if value != cur {
            ops.push(Op::PutService(key, value));
        }
        self.delete_slots_ops(id, n, ops);
        Ok(())
    }

    /// Applies `ops` in order, recording each in the shadow as it succeeds. If ids were
    /// issued since `IDS` was last written, writes it first: the ops may use them, and
    /// a restarted agent must not issue them again.
    fn apply<W: MapWriter>(
        &mut self,
        w: &mut W,
        ops: &mut Vec<Op>,
        stats: &mut SyncStats,
        now: Instant,
    ) -> Result<(), SyncError> {
        let ids = self.id_state();
        // Prefilter bits use no id.
        let uses_ids = ops.iter().any(|o| !matches!(o, Op::PutPrefilter(..)));
        if uses_ids && ids != self.persisted {
            let op = Op::PutIds(ids);
            if let Err(source) = w.apply(&op) {
                ops.clear();
                return Err(SyncError::Write { op: op.to_string(), source });
            }
            self.persisted = ids;
            stats.ids_put += 1;
        }
        for op in ops.drain(..) {
            w.apply(&op).map_err(|source| SyncError::Write { op: op.to_string(), source })?;
            match op {
                Op::PutService(k, v) => {
                    let old = self.shadow.services.insert(k, v);
                    if !is_marker(&k) {
                        self.published(old, Some(v), now);
                    }
                    stats.services_put += 1;
                }
                Op::DeleteService(k) => {
                    let old = self.shadow.services.remove(&k);
                    if !is_marker(&k) {
                        self.published(old, None, now);
                    }
                    stats.services_deleted += 1;
                }
                Op::PutBackend(k, v) => {
                    self.backend_ids.incref(&v);
                    if let Some(old) = self.shadow.slots.entry(k.svc_id).or_default().insert(k.slot, v) {
                        if old.backend_id != v.backend_id {
                            self.departed.push(DrainKey { svc_id: k.svc_id, backend_id: old.backend_id });
                        }
                        self.removed |= old.backend_id != v.backend_id;
                        self.backend_ids.decref(&old, now);
                    }
                    stats.backends_put += 1;
                }
                Op::DeleteBackend(k) => {
                    if let Some(slots) = self.shadow.slots.get_mut(&k.svc_id) {
                        if let Some(old) = slots.remove(&k.slot) {
                            self.departed.push(DrainKey { svc_id: k.svc_id, backend_id: old.backend_id });
                            self.removed = true;
                            self.backend_ids.decref(&old, now);
                        }
                        if slots.is_empty() {
                            self.shadow.slots.remove(&k.svc_id);
                        }
                    }
                    stats.backends_deleted += 1;
                }
                Op::PutDraining(k, v) => {
                    self.backend_ids.incref(&v);
                    if let Some(old) = self.shadow.draining.entry(k.svc_id).or_default().insert(k.backend_id, v) {
                        self.backend_ids.decref(&old, now);
                    }
                    stats.draining_put += 1;
                }
                Op::DeleteDraining(k) => {
                    if let Some(d) = self.shadow.draining.get_mut(&k.svc_id) {
                        if let Some(old) = d.remove(&k.backend_id) {
                            self.departed.push(k);
                            self.removed = true;
                            self.backend_ids.decref(&old, now);
                        }
                        if d.is_empty() {
                            self.shadow.draining.remove(&k.svc_id);
                        }
                    }
                    stats.draining_deleted += 1;
                }
                Op::ResetStats(_) => {}
                Op::PutIds(s) => {
                    self.persisted = s;
                    stats.ids_put += 1;
                }
                Op::PutTable(..) => stats.tables_put += 1,
                Op::PutPrefilter(i, v) => {
                    if let Some(word) = self.shadow.prefilter.get_mut(i as usize) {
                        *word = v;
                    }
                    stats.prefilter_put += 1;
                }
            }
        }
        Ok(())
    }

    /// A frontend's `SERVICES` entry went from `old` to `new`: the table it now points
    /// at is the shadow's, and the words of the one it pointed at before are released.
    fn published(&mut self, old: Option<ServiceValue>, new: Option<ServiceValue>, now: Instant) {
        let at = |v: &ServiceValue| (v.table_size > 0).then_some((v.table_off, v.table_size));
        let (old_t, new_t) = (old.as_ref().and_then(at), new.as_ref().and_then(at));
        if old_t == new_t {
            return;
        }
        if let Some((off, size)) = old_t {
            self.space.release(off, words_for(size), now);
            if let Some(o) = &old {
                self.shadow.tables.remove(&o.id);
            }
        }
        if let (Some(v), Some((off, _))) = (new, new_t)
            && let Some(t) = self.pending_tables.remove(&off)
        {
            self.shadow.tables.insert(v.id, t);
        }
    }
}

/// What `SERVICES` and `BACKENDS` hold.
pub type MapContents = (Vec<(ServiceKey4, ServiceValue)>, Vec<(BackendKey, BackendValue)>);

/// The pinned `SERVICES`, `BACKENDS`, `DRAINING`, `SVC_STATS` and `IDS` maps, as a
/// [`MapWriter`].
pub struct BpfMaps {
    pub services: aya::maps::HashMap<aya::maps::MapData, ServiceKey4, ServiceValue>,
    pub backends: aya::maps::HashMap<aya::maps::MapData, BackendKey, BackendValue>,
    pub draining: aya::maps::HashMap<aya::maps::MapData, DrainKey, BackendValue>,
    pub svc_stats: aya::maps::PerCpuArray<aya::maps::MapData, Counter>,
    pub ids: aya::maps::Array<aya::maps::MapData, IdState>,
    /// `TABLES`, mapped: tables are written with one copy each.
    pub tables: crate::datapath::MappedWords,
    pub prefilter: aya::maps::Array<aya::maps::MapData, u64>,
    nr_cpus: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("cannot open pinned map {path}; is the datapath loaded (`lb agent`) with this --bpffs?")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {name} is missing from the loaded datapath")]
    Missing { name: &'static str },
    #[error("map {name} has an unexpected type")]
    Type {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot count the possible CPUs")]
    Cpus(#[source] std::io::Error),
    #[error("cannot map the lookup tables")]
    Tables(#[source] crate::datapath::WordsError),
}

impl BpfMaps {
    /// Opens the maps pinned under `pin_dir`.
    pub fn open(pin_dir: &std::path::Path) -> Result<Self, MapsError> {
        use lb_common::map_names as n;
        let open = |name: &'static str| {
            let path = pin_dir.join(name);
            aya::maps::MapData::from_pin(&path).map_err(|source| MapsError::Open { path, source })
        };
        Self::from_data([
            open(n::SERVICES)?,
            open(n::BACKENDS)?,
            open(n::DRAINING)?,
            open(n::SVC_STATS)?,
            open(n::IDS)?,
            open(n::TABLES)?,
            open(n::PREFILTER)?,
        ])
    }

    /// New handles on the maps of a loaded datapath (they stay usable by it).
    pub fn from_ebpf(ebpf: &aya::Ebpf) -> Result<Self, MapsError> {
        use lb_common::map_names as n;
        let dup = |name: &'static str| -> Result<aya::maps::MapData, MapsError> {
            let map = ebpf.map(name).ok_or(MapsError::Missing { name })?;
            let data = map_data(map).ok_or(MapsError::Missing { name })?;
            dup_map(data).map_err(|source| MapsError::Type { name, source })
        };
        Self::from_data([
            dup(n::SERVICES)?,
            dup(n::BACKENDS)?,
            dup(n::DRAINING)?,
            dup(n::SVC_STATS)?,
            dup(n::IDS)?,
            dup(n::TABLES)?,
            dup(n::PREFILTER)?,
        ])
    }

    /// The maps in the order `open` and `from_ebpf` list them.
    fn from_data(maps: [aya::maps::MapData; 7]) -> Result<Self, MapsError> {
        let [services, backends, draining, svc_stats, ids, tables, prefilter] = maps;
        use aya::maps::Map;
        use lb_common::map_names as n;
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, e)| MapsError::Cpus(e))?;
        Ok(Self {
            services: Map::HashMap(services)
                .try_into()
                .map_err(|source| MapsError::Type { name: n::SERVICES, source })?,
            backends: Map::HashMap(backends)
                .try_into()
                .map_err(|source| MapsError::Type { name: n::BACKENDS, source })?,
            draining: Map::HashMap(draining)
                .try_into()
                .map_err(|source| MapsError::Type { name: n::DRAINING, source })?,
            svc_stats: Map::PerCpuArray(svc_stats)
                .try_into()
                .map_err(|source| MapsError::Type { name: n::SVC_STATS, source })?,
            ids: Map::Array(ids).try_into().map_err(|source| MapsError::Type { name: n::IDS, source })?,
            tables: crate::datapath::MappedWords::new(tables, n::TABLES).map_err(MapsError::Tables)?,
            prefilter: Map::Array(prefilter)
                .try_into()
                .map_err(|source| MapsError::Type { name: n::PREFILTER, source })?,
            nr_cpus,
        })
    }

    /// `SVC_STATS`' size: service ids must stay below it.
    pub fn svc_id_limit(&self) -> u32 {
        self.svc_stats.len()
    }

    /// Everything in `SERVICES` and `BACKENDS`, for [`Syncer::from_maps`].
    pub fn read_all(&self) -> MapContents {
        (self.services.iter().filter_map(Result::ok).collect(), self.backends.iter().filter_map(Result::ok).collect())
    }

    /// Everything in `DRAINING`.
    pub fn read_draining(&self) -> Vec<(DrainKey, BackendValue)> {
        self.draining.iter().filter_map(Result::ok).collect()
    }

    /// What `IDS` holds; zero if unreadable (the syncer then derives the ids from the
    /// other maps).
    pub fn read_ids(&self) -> IdState {
        self.ids.get(&0, 0).unwrap_or_default()
    }

    /// `TABLES` words `off..off+len` (none if out of range: the table then does not
    /// read back, and the next sync writes a new one).
    pub fn read_table(&self, off: u32, len: u32) -> Vec<u64> {
        self.tables.read(off, len).unwrap_or_default()
    }

    /// A syncer whose shadow and id allocators are what the maps hold now.
    pub fn reconcile(&self) -> Syncer {
        let (s, b) = self.read_all();
        let prefilter = (0..self.prefilter.len()).map(|i| self.prefilter.get(&i, 0).unwrap_or(0)).collect();
        Syncer::from_maps(
            s,
            b,
            self.read_draining(),
            self.read_ids(),
            self.svc_id_limit(),
            self.tables.len(),
            |off, len| self.read_table(off, len),
            prefilter,
        )
    }

    /// Packets and bytes of one service id, summed over CPUs.
    pub fn service_counter(&self, id: u32) -> Option<Counter> {
        crate::datapath::counter_total(&self.svc_stats, id).ok()
    }
}

/// A second handle on `data`'s map, by duplicating its fd. Not `MapData::from_id`:
/// BPF_MAP_GET_FD_BY_ID asks CAP_SYS_ADMIN (kernel/bpf/syscall.c,
/// `bpf_map_get_fd_by_id`), which the agent otherwise needs only to enter pods'
/// network namespaces.
pub fn dup_map(data: &aya::maps::MapData) -> Result<aya::maps::MapData, aya::maps::MapError> {
    use std::os::fd::AsFd as _;
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|io_error| aya::sys::SyscallError { call: "fcntl(F_DUPFD_CLOEXEC)", io_error })?;
    aya::maps::MapData::from_fd(fd)
}

/// The `MapData` inside any `Map` variant we use.
pub fn map_data(map: &aya::maps::Map) -> Option<&aya::maps::MapData> {
    use aya::maps::Map;
    match map {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::PerCpuArray(d) | Map::Array(d) | Map::PerCpuHashMap(d) => Some(d),
        _ => None,
    }
}

impl MapWriter for BpfMaps {
    fn apply(&mut self, op: &Op) -> Result<(), WriteError> {
        match op {
            Op::PutService(k, v) => self.services.insert(k, v, 0)?,
            Op::DeleteService(k) => match self.services.remove(k) {
                Err(aya::maps::MapError::KeyNotFound) => {}
                r => r?,
            },
            Op::PutBackend(k, v) => self.backends.insert(k, v, 0)?,
            Op::DeleteBackend(k) => match self.backends.remove(k) {
                Err(aya::maps::MapError::KeyNotFound) => {}
                r => r?,
            },
            Op::PutDraining(k, v) => self.draining.insert(k, v, 0)?,
            Op::DeleteDraining(k) => match self.draining.remove(k) {
                Err(aya::maps::MapError::KeyNotFound) => {}
                r => r?,
            },
            Op::ResetStats(id) => {
                if *id < self.svc_stats.len() {
                    let zero = aya::maps::PerCpuValues::try_from(vec![Counter::default(); self.nr_cpus])?;
                    self.svc_stats.set(*id, zero, 0)?;
                }
            }
            Op::PutIds(s) => self.ids.set(0, s, 0)?,
            Op::PutTable(off, words) => self.tables.write(*off, words)?,
            Op::PutPrefilter(i, w) => self.prefilter.set(*i, w, 0)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
