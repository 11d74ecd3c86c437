//! The diff planner against a fake map writer that checks, after every single op, what
//! the datapath relies on.

use std::{collections::BTreeSet, net::Ipv4Addr};

use super::*;
use crate::agent::model::{Backend, Frontend, FrontendKey, NoEndpoints, Protocol};

/// Maps in memory. After every op it checks that each frontend's slots 1..=count are
/// all there, that its ClusterIP has its marker, that every backend in `sticky`
/// (frontend key -> (addr_be, port_be)) stays visible within 1..=count, that every
/// backend in `reachable` stays reachable by its established flows: within 1..=count
/// of its frontend (while that has the service id the flows know) or in `DRAINING`,
/// under the backend id it had, and that `IDS` is ahead of every backend id in the
/// maps (written before the entries that use a new id).
#[derive(Default)]
struct FakeMaps {
    services: HashMap<ServiceKey4, ServiceValue>,
    backends: HashMap<BackendKey, BackendValue>,
    draining: HashMap<DrainKey, BackendValue>,
    ids: IdState,
    tables: HashMap<u32, u64>,
    prefilter: HashMap<u32, u64>,
    sticky: Vec<(ServiceKey4, (u32, u16))>,
    /// (frontend, its service id, backend as it was in the maps before the sync).
    reachable: Vec<(ServiceKey4, u32, BackendValue)>,
    log: Vec<Op>,
    /// Fail the op with this index (counting all ops ever applied).
    fail_at: Option<usize>,
    applied: usize,
}

impl FakeMaps {
    fn check(&self) -> Result<(), String> {
        for (k, v) in &self.services {
            if is_marker(k) {
                continue;
            }
            if !self.services.contains_key(&ServiceKey4::address_marker(k.addr_be)) {
                return Err(format!("frontend {} without address marker", fmt_key(k)));
            }
            for slot in 1..=v.count {
                if !self.backends.contains_key(&BackendKey { svc_id: v.id, slot }) {
                    return Err(format!("frontend {} count {} but slot {slot} is empty", fmt_key(k), v.count));
                }
            }
            // Every bucket of the table the entry points at names a slot in 1..=count
            // that holds a backend: a new flow never finds an empty bucket.
            if v.count > 0 && v.table_size == 0 {
                return Err(format!("frontend {} has backends but no table", fmt_key(k)));
            }
            for b in 0..v.table_size {
                let word = self.tables.get(&(v.table_off + b / 4)).copied().unwrap_or(0);
                let slot = u32::from((word >> (16 * (b % 4))) as u16);
                if slot == 0 || slot > v.count || !self.backends.contains_key(&BackendKey { svc_id: v.id, slot }) {
                    return Err(format!("frontend {}: bucket {b} names slot {slot} of {}", fmt_key(k), v.count));
                }
            }
            let bit = |a: u32, backend: bool| {
                let (i, mask) = lb_common::prefilter_word(a, backend);
                self.prefilter.get(&i).is_some_and(|w| w & mask != 0)
            };
            if !bit(k.addr_be, false) {
                return Err(format!("frontend {} without its prefilter bit", fmt_key(k)));
            }
        }
        for b in self.backends.values().chain(self.draining.values()) {
            let (i, mask) = lb_common::prefilter_word(b.addr_be, true);
            if self.prefilter.get(&i).is_none_or(|w| w & mask == 0) {
                return Err(format!("backend {} without its prefilter bit", Ipv4Addr::from(b.addr_be.to_ne_bytes())));
            }
        }
        for k in self.services.keys() {
            let (i, mask) = lb_common::prefilter_word(k.addr_be, false);
            if self.prefilter.get(&i).is_none_or(|w| w & mask == 0) {
                return Err(format!("ClusterIP of {} without its prefilter bit", fmt_key(k)));
            }
        }
        for (k, (addr, port)) in &self.sticky {
            let Some(v) = self.services.get(k) else { continue };
            let visible = (1..=v.count).any(|slot| {
                self.backends
                    .get(&BackendKey { svc_id: v.id, slot })
                    .is_some_and(|b| b.addr_be == *addr && b.port_be == *port)
            });
            if !visible {
                return Err(format!("staying backend of {} vanished from 1..=count", fmt_key(k)));
            }
        }
        for (k, id, b) in &self.reachable {
            let in_slots = self.services.get(k).is_some_and(|v| {
                v.id == *id
                    && (1..=v.count).any(|slot| self.backends.get(&BackendKey { svc_id: v.id, slot }) == Some(b))
            });
            let draining = self.draining.get(&DrainKey { svc_id: *id, backend_id: b.backend_id }) == Some(b);
            if !in_slots && !draining {
                return Err(format!(
                    "backend {}:{} (id {}) of {} is neither in 1..=count nor draining",
                    Ipv4Addr::from(b.addr_be.to_ne_bytes()),
                    u16::from_be(b.port_be),
                    b.backend_id,
                    fmt_key(k)
                ));
            }
        }
        if let Some(b) =
            self.backends.values().chain(self.draining.values()).find(|b| b.backend_id >= self.ids.next_backend_id)
        {
            return Err(format!(
                "backend id {} in the maps, IDS says next is {}",
                b.backend_id, self.ids.next_backend_id
            ));
        }
        Ok(())
    }
}

impl MapWriter for FakeMaps {
    fn apply(&mut self, op: &Op) -> Result<(), WriteError> {
        if self.fail_at == Some(self.applied) {
            self.fail_at = None;
            return Err("injected failure".into());
        }
        self.applied += 1;
        match *op {
            Op::PutService(k, v) => {
                self.services.insert(k, v);
            }
            Op::DeleteService(k) => {
                self.services.remove(&k);
            }
            Op::PutBackend(k, v) => {
                self.backends.insert(k, v);
            }
            Op::DeleteBackend(k) => {
                self.backends.remove(&k);
            }
            Op::PutDraining(k, v) => {
                self.draining.insert(k, v);
            }
            Op::DeleteDraining(k) => {
                self.draining.remove(&k);
            }
            Op::ResetStats(_) => {}
            Op::PutIds(s) => self.ids = s,
            Op::PutTable(off, ref words) => {
                let end = off + words.len() as u32;
                if let Some((k, _)) = self.services.iter().find(|(k, v)| {
                    !is_marker(k)
                        && v.table_size > 0
                        && v.table_off < end
                        && off < v.table_off + words_for(v.table_size)
                }) {
                    return Err(format!("{op} overwrites the published table of {}", fmt_key(k)).into());
                }
                for (i, w) in words.iter().enumerate() {
                    self.tables.insert(off + i as u32, *w);
                }
            }
            Op::PutPrefilter(i, w) => drop(self.prefilter.insert(i, w)),
        }
        self.log.push(op.clone());
        self.check().map_err(|e| format!("after {op}: {e}"))?;
        Ok(())
    }
}

fn ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0af4_0000 + i)
}

fn fe_key(vip: u8, port: u16) -> FrontendKey {
    FrontendKey { ip: Ipv4Addr::new(10, 96, 0, vip), port, proto: Protocol::Tcp }
}

fn frontend(backends: impl IntoIterator<Item = u32>) -> Frontend {
    frontend_d(backends, [])
}

/// A frontend with `backends` selected and `draining` draining.
fn frontend_d(backends: impl IntoIterator<Item = u32>, draining: impl IntoIterator<Item = u32>) -> Frontend {
    let backends: BTreeSet<Backend> = backends.into_iter().map(|i| Backend { ip: ip(i), port: 8080 }).collect();
    Frontend {
        service: "default/x:".into(),
        affinity_timeout_s: None,
        no_endpoints: NoEndpoints::Reject,
        draining: draining
            .into_iter()
            .map(|i| Backend { ip: ip(i), port: 8080 })
            .filter(|b| !backends.contains(b))
            .collect(),
        backends,
    }
}

fn desired(fes: Vec<(FrontendKey, Frontend)>) -> Desired {
    Desired { frontends: fes.into_iter().collect() }
}

/// Maps contents as (frontend -> set of backends) plus checks that the maps hold
/// nothing else.
fn contents(m: &FakeMaps) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    let mut owned = 0;
    for (k, v) in &m.services {
        if is_marker(k) {
            continue;
        }
        let set: BTreeSet<String> = (1..=v.count)
            .map(|slot| {
                let b = m.backends[&BackendKey { svc_id: v.id, slot }];
                format!("{}:{}", Ipv4Addr::from(b.addr_be.to_ne_bytes()), u16::from_be(b.port_be))
            })
            .collect();
        assert_eq!(set.len() as u32, v.count, "duplicate backend in {}", fmt_key(k));
        owned += v.count as usize;
        out.insert(fmt_key(k), set);
    }
    assert_eq!(owned, m.backends.len(), "stray BACKENDS entries");
    out
}

/// `DRAINING` as (frontend -> set of backends), checking that it holds nothing else but
/// orphans (entries of service ids no frontend owns) and that each entry carries the
/// backend id the slots give that backend.
fn draining_contents(m: &FakeMaps) -> BTreeMap<String, BTreeSet<String>> {
    let ids: HashMap<(u32, u16), u32> = m.backends.values().map(|b| ((b.addr_be, b.port_be), b.backend_id)).collect();
    let mut out = BTreeMap::new();
    let mut owned = 0;
    for (k, v) in m.services.iter().filter(|(k, _)| !is_marker(k)) {
        let set: BTreeSet<String> = m
            .draining
            .iter()
            .filter(|(dk, _)| dk.svc_id == v.id)
            .map(|(dk, b)| {
                assert_eq!(dk.backend_id, b.backend_id, "draining key and value disagree");
                if let Some(id) = ids.get(&(b.addr_be, b.port_be)) {
                    assert_eq!(*id, b.backend_id, "a draining backend has another id in the slots");
                }
                format!("{}:{}", Ipv4Addr::from(b.addr_be.to_ne_bytes()), u16::from_be(b.port_be))
            })
            .collect();
        owned += set.len();
        if !set.is_empty() {
            out.insert(fmt_key(k), set);
        }
    }
    assert_eq!(owned + orphans(m).len(), m.draining.len(), "stray DRAINING entries");
    out
}

/// `DRAINING` entries of service ids that no frontend owns.
fn orphans(m: &FakeMaps) -> BTreeSet<(u32, u32)> {
    let owned: HashSet<u32> = m.services.iter().filter(|(k, _)| !is_marker(k)).map(|(_, v)| v.id).collect();
    m.draining.keys().filter(|k| !owned.contains(&k.svc_id)).map(|k| (k.svc_id, k.backend_id)).collect()
}

/// The backends a frontend holds in the maps: slots 1..=count, and draining.
fn held(m: &FakeMaps, k: &FrontendKey) -> Vec<(u32, BackendValue)> {
    let Some(v) = m.services.get(&k.map_key()) else { return Vec::new() };
    (1..=v.count)
        .filter_map(|slot| m.backends.get(&BackendKey { svc_id: v.id, slot }))
        .chain(m.draining.iter().filter(|(dk, _)| dk.svc_id == v.id).map(|(_, b)| b))
        .map(|b| (v.id, *b))
        .collect()
}

fn expected(d: &Desired) -> BTreeMap<String, BTreeSet<String>> {
    d.frontends
        .iter()
        .map(|(k, f)| (fmt_key(&k.map_key()), f.backends.iter().map(|b| b.to_string()).collect()))
        .collect()
}

fn expected_draining(d: &Desired) -> BTreeMap<String, BTreeSet<String>> {
    d.frontends
        .iter()
        .filter(|(_, f)| !f.draining.is_empty())
        .map(|(k, f)| (fmt_key(&k.map_key()), f.draining.iter().map(|b| b.to_string()).collect()))
        .collect()
}

fn shadow_draining(s: &Syncer) -> HashMap<DrainKey, BackendValue> {
    s.shadow()
        .draining
        .iter()
        .flat_map(|(id, d)| d.iter().map(move |(b, v)| (DrainKey { svc_id: *id, backend_id: *b }, *v)))
        .collect()
}

/// Syncs to `to`, checking invariants op by op with the backends common to the
/// current and the new state marked sticky, and every backend the maps hold for a
/// frontend (in its slots or draining) that the slices still list, or for a frontend
/// that goes, marked reachable; returns the ops.
fn step(s: &mut Syncer, m: &mut FakeMaps, from: &Desired, to: &Desired) -> Vec<Op> {
    m.sticky.clear();
    m.reachable.clear();
    for (k, f) in &to.frontends {
        if let Some(old) = from.frontends.get(k) {
            for b in f.backends.intersection(&old.backends) {
                m.sticky.push((k.map_key(), (u32::from_ne_bytes(b.ip.octets()), b.port.to_be())));
            }
        }
        let listed: HashSet<(u32, u16)> =
            f.backends.iter().chain(&f.draining).map(|b| (u32::from_ne_bytes(b.ip.octets()), b.port.to_be())).collect();
        for (id, b) in held(m, k) {
            if listed.contains(&(b.addr_be, b.port_be)) {
                m.reachable.push((k.map_key(), id, b));
            }
        }
    }
    // A deleted Service keeps its established flows (as under kube-proxy).
    let gone: Vec<(ServiceKey4, u32, BackendValue)> = from
        .frontends
        .keys()
        .filter(|k| !to.frontends.contains_key(k))
        .flat_map(|k| held(m, k).into_iter().map(|(id, b)| (k.map_key(), id, b)))
        .collect();
    m.reachable.extend(gone.iter().copied());
    m.log.clear();
    let ids_before = m.ids;
    let epoch_before = s.epoch();
    s.sync(to, m).unwrap_or_else(|e| panic!("{e}: {:?}", std::error::Error::source(&e)));
    assert_eq!(contents(m), expected(to));
    assert_eq!(draining_contents(m), expected_draining(to));
    assert_eq!(s.shadow().services, m.services);
    assert_eq!(shadow_draining(s), m.draining);
    for (_, id, b) in gone {
        assert_eq!(
            m.draining.get(&DrainKey { svc_id: id, backend_id: b.backend_id }),
            Some(&b),
            "not kept as an orphan"
        );
    }
    // The syncer knows its orphans, and holds their service ids.
    let known: BTreeSet<(u32, u32)> = s
        .orphans
        .keys()
        .flat_map(|id| s.shadow().draining.get(id).into_iter().flat_map(move |d| d.keys().map(move |b| (*id, *b))))
        .collect();
    assert_eq!(known, orphans(m));
    assert!(known.iter().all(|(id, _)| s.svc_ids.held.contains(id)));
    assert_eq!(m.ids, s.persisted);
    assert_eq!(m.ids.epoch, s.epoch());
    // Every table the shadow knows is the one in the maps, read back.
    for (k, v) in m.services.iter().filter(|(k, v)| !is_marker(k) && v.count > 0) {
        let t = &s.shadow().tables[&v.id];
        let words: Vec<u64> = (v.table_off..v.table_off + words_for(v.table_size))
            .map(|i| m.tables.get(&i).copied().unwrap_or(0))
            .collect();
        let back = Table::from_words(&words, v.table_size, |slot| {
            m.backends.get(&BackendKey { svc_id: v.id, slot }).map(|b| (b.addr_be, b.port_be))
        });
        assert_eq!(back.as_ref(), Some(t), "table of {} differs from the shadow's", fmt_key(k));
    }
    let log = std::mem::take(&mut m.log);
    // A sync that removed a backend ends with the epoch bumped, after all else.
    let bumped = log.iter().filter(|o| matches!(o, Op::PutIds(i) if i.epoch != epoch_before)).count();
    assert!(bumped <= 1, "{log:#?}");
    if bumped == 1 {
        assert!(matches!(log.last(), Some(Op::PutIds(i)) if i.epoch == epoch_before.wrapping_add(1)), "{log:#?}");
    }
    core_ops(log, ids_before)
}

/// `ops` without the table and prefilter writes and without a final `IDS` write that
/// only bumps the epoch: the ops the older tests check the order of (the fake checks
/// tables and prefilter after every op).
fn core_ops(mut ops: Vec<Op>, ids_before: IdState) -> Vec<Op> {
    if let Some(Op::PutIds(i)) = ops.last() {
        let before = ops.iter().rev().skip(1).find_map(|o| if let Op::PutIds(p) = o { Some(*p) } else { None });
        let before = before.unwrap_or(ids_before);
        if (i.next_svc_id, i.next_backend_id) == (before.next_svc_id, before.next_backend_id) {
            ops.pop();
        }
    }
    ops.retain(|o| !matches!(o, Op::PutTable(..) | Op::PutPrefilter(..)));
    ops
}

#[test]
fn new_frontend_writes_slots_then_marker_then_entry() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let d = desired(vec![(fe_key(10, 80), frontend([1, 2]))]);
    let ops = step(&mut s, &mut m, &Desired::default(), &d);
    let kinds: Vec<&str> = ops
        .iter()
        .map(|o| match o {
            Op::PutIds(_) => "ids",
            Op::ResetStats(_) => "reset",
            Op::PutService(k, _) if is_marker(k) => "marker",
            Op::PutService(..) => "service",
            Op::PutBackend(..) => "backend",
            _ => "other",
        })
        .collect();
    // The new ids are persisted first.
    assert_eq!(kinds, ["ids", "reset", "marker", "backend", "backend", "service"]);
    assert_eq!(m.ids, IdState { next_svc_id: 2, next_backend_id: 3, ..m.ids });
    // A second sync of the same state writes nothing.
    assert!(step(&mut s, &mut m, &d, &d).is_empty());
}

#[test]
fn removing_a_middle_backend_moves_the_last_one_into_its_slot() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2, 3]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let id = m.services[&fe_key(10, 80).map_key()].id;
    // Slots hold backends 1, 2, 3 in order (the set iterates sorted).
    let slot_of = |m: &FakeMaps, i: u32| {
        (1..=3).find(|&slot| {
            m.backends
                .get(&BackendKey { svc_id: id, slot })
                .is_some_and(|b| b.addr_be == u32::from_ne_bytes(ip(i).octets()))
        })
    };
    assert_eq!(slot_of(&m, 2), Some(2));
    let last_id = m.backends[&BackendKey { svc_id: id, slot: 3 }].backend_id;
    let b = desired(vec![(fe_key(10, 80), frontend([1, 3]))]);
    let ops = step(&mut s, &mut m, &a, &b);
    assert_eq!(ops.len(), 3, "{ops:#?}");
    assert!(matches!(ops[0], Op::PutBackend(BackendKey { slot: 2, .. }, v) if v.backend_id == last_id));
    assert!(matches!(ops[1], Op::PutService(_, v) if v.count == 2));
    assert!(matches!(ops[2], Op::DeleteBackend(BackendKey { slot: 3, .. })));
}

#[test]
fn adding_writes_the_slot_before_raising_count() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend([1]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let b = desired(vec![(fe_key(10, 80), frontend([1, 2]))]);
    let ops = step(&mut s, &mut m, &a, &b);
    assert!(matches!(
        ops[..],
        [
            Op::PutIds(IdState { next_backend_id: 3, .. }),
            Op::PutBackend(BackendKey { slot: 2, .. }, BackendValue { backend_id: 2, .. }),
            Op::PutService(_, ServiceValue { count: 2, .. })
        ]
    ));
}

#[test]
fn replacing_a_backend_overwrites_in_place() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2, 3]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let b = desired(vec![(fe_key(10, 80), frontend([1, 3, 4]))]);
    let ops = step(&mut s, &mut m, &a, &b);
    // One slot rewritten (after persisting the new backend's id), and the entry, same
    // count, pointed at the new table.
    assert!(
        matches!(
            ops[..],
            [
                Op::PutIds(_),
                Op::PutBackend(BackendKey { slot: 2, .. }, _),
                Op::PutService(_, ServiceValue { count: 3, .. })
            ]
        ),
        "{ops:#?}"
    );
}

/// Deleting a frontend used to delete its entry, slots and draining entries, cutting
/// its established flows; now (as under kube-proxy, which leaves TCP conntrack entries
/// alone) its slot backends move to `DRAINING` first and stay there as orphans.
#[test]
fn deleting_a_frontend_drains_its_backends_then_removes_entry_slots_and_marker_last() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2])), (fe_key(10, 443), frontend([1]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    // Another port of the same ClusterIP remains: the marker stays.
    let b = desired(vec![(fe_key(10, 443), frontend([1]))]);
    let ops = step(&mut s, &mut m, &a, &b);
    assert_eq!(
        ops.iter().map(kind).collect::<Vec<_>>(),
        ["put_draining", "put_draining", "delete_service", "delete_backend", "delete_backend"],
        "{ops:#?}"
    );
    assert!(matches!(ops[2], Op::DeleteService(k) if !is_marker(&k)));
    assert!(m.services.contains_key(&ServiceKey4::address_marker(fe_key(10, 80).map_key().addr_be)));
    let ops = step(&mut s, &mut m, &b, &Desired::default());
    assert!(matches!(ops.last(), Some(Op::DeleteService(k)) if is_marker(k)));
    assert!(m.services.is_empty() && m.backends.is_empty());
    assert_eq!(m.draining.len(), 3, "the orphans of both");
}

#[test]
fn affinity_and_no_endpoints_changes_rewrite_only_the_entry() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let mut f = frontend([1, 2]);
    f.affinity_timeout_s = Some(30);
    f.no_endpoints = NoEndpoints::Drop;
    let b = desired(vec![(fe_key(10, 80), f)]);
    let ops = step(&mut s, &mut m, &a, &b);
    assert!(
        matches!(ops[..], [Op::PutService(_, v)] if v.flags == SVC_F_AFFINITY && v.affinity_timeout_s == 30 && v.no_backends == lb_common::NO_BACKENDS_DROP)
    );
}

#[test]
fn ids_are_stable_unique_and_not_reused_soon() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2])), (fe_key(11, 80), frontend([2, 3]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let id_a = m.services[&fe_key(10, 80).map_key()].id;
    let id_b = m.services[&fe_key(11, 80).map_key()].id;
    assert_ne!(id_a, id_b);
    // The same pod is the same backend id in both services; different pods differ.
    let backend_ids =
        |m: &FakeMaps| -> HashMap<u32, u32> { m.backends.values().map(|b| (b.addr_be, b.backend_id)).collect() };
    let ids = backend_ids(&m);
    assert_eq!(ids.len(), 3);
    assert_eq!(ids.values().collect::<HashSet<_>>().len(), 3);
    // Delete and re-create the first service: a new service id, the old one not reused.
    let b = desired(vec![(fe_key(11, 80), frontend([2, 3]))]);
    step(&mut s, &mut m, &a, &b);
    step(&mut s, &mut m, &b, &a);
    let id_a2 = m.services[&fe_key(10, 80).map_key()].id;
    assert!(id_a2 != id_a && id_a2 != id_b);
    assert_eq!(m.services[&fe_key(11, 80).map_key()].id, id_b, "untouched service keeps its id");
    // A backend that left and came back within the grace keeps its id.
    assert_eq!(backend_ids(&m), ids);
}

/// Frontends without backends here: a deleted one leaves no orphan, so its id is free
/// at once (see `release_orphans_keeps_those_with_live_flows_and_frees_the_id_after_the_last`
/// for the other case).
#[test]
fn service_ids_wrap_to_the_oldest_freed_one() {
    let mut s = Syncer::new(4); // ids 1..=3
    let mut m = FakeMaps::default();
    let mut cur = Desired::default();
    let mut seen = Vec::new();
    for vip in 1..=6 {
        let next = desired(vec![(fe_key(vip, 80), frontend([]))]);
        step(&mut s, &mut m, &cur, &next);
        seen.push(m.services[&fe_key(vip, 80).map_key()].id);
        cur = next;
    }
    assert_eq!(seen, [1, 2, 3, 1, 2, 3]);
    let full = desired((1..=3).map(|v| (fe_key(v, 80), frontend([]))).collect());
    step(&mut s, &mut m, &cur, &desired(vec![]));
    step(&mut s, &mut m, &Desired::default(), &full);
    let too_many = desired((1..=4).map(|v| (fe_key(v, 80), frontend([]))).collect());
    assert!(matches!(s.sync(&too_many, &mut m), Err(SyncError::OutOfServiceIds { limit: 4 })));
}

/// A small deterministic PRNG (xorshift), so the random walk is reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_walk_keeps_every_invariant_and_converges() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut s = Syncer::new(1 << 16);
    let mut m = FakeMaps::default();
    let mut cur = Desired::default();
    for round in 0..400 {
        let mut next = cur.clone();
        for _ in 0..1 + rng.below(4) {
            let key = fe_key(1 + rng.below(6) as u8, 80 + rng.below(2) as u16);
            match rng.below(5) {
                0 => {
                    next.frontends.remove(&key);
                }
                _ => {
                    let n = rng.below(12) as u32;
                    let base = rng.below(8) as u32;
                    let backends: Vec<u32> = (0..n).map(|i| base + i * (1 + rng.below(2) as u32)).collect();
                    // Some of the rest of the pods still exist and drain.
                    let draining: Vec<u32> = (0..20).filter(|_| rng.below(3) == 0).collect();
                    next.frontends.insert(key, frontend_d(backends, draining));
                }
            }
        }
        let before: HashMap<(ServiceKey4, u32, u16), u32> = m
            .services
            .iter()
            .filter(|(k, _)| !is_marker(k))
            .flat_map(|(k, v)| {
                let m = &m;
                (1..=v.count).map(move |slot| {
                    let b = m.backends[&BackendKey { svc_id: v.id, slot }];
                    ((*k, b.addr_be, b.port_be), b.backend_id)
                })
            })
            .collect();
        step(&mut s, &mut m, &cur, &next);
        // The garbage collector comes by now and then, with some orphans' flows alive.
        if rng.below(4) == 0 {
            let all = orphans(&m);
            let live: HashSet<(u32, u32)> = all.iter().filter(|_| rng.below(2) == 0).copied().collect();
            release(&mut s, &mut m, &live);
            assert_eq!(orphans(&m), live.into_iter().collect(), "round {round}");
        }
        // A backend that stayed in a frontend kept its backend id.
        for (k, v) in m.services.iter().filter(|(k, _)| !is_marker(k)) {
            for slot in 1..=v.count {
                let b = m.backends[&BackendKey { svc_id: v.id, slot }];
                if let Some(old) = before.get(&(*k, b.addr_be, b.port_be)) {
                    assert_eq!(*old, b.backend_id, "round {round}: backend id changed");
                }
            }
        }
        cur = next;
    }
}

#[test]
fn scale_1_to_50_to_1() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let mut cur = Desired::default();
    for n in [1u32, 50, 1, 50, 0, 1] {
        let next = desired(vec![(fe_key(10, 80), frontend(0..n))]);
        step(&mut s, &mut m, &cur, &next);
        assert_eq!(m.services[&fe_key(10, 80).map_key()].count, n);
        cur = next;
    }
}

#[test]
fn a_failed_write_leaves_the_shadow_exact_and_the_next_sync_converges() {
    for fail_at in 0..30 {
        let mut s = Syncer::new(1024);
        let mut m = FakeMaps::default();
        let a = desired(vec![(fe_key(10, 80), frontend_d(0..5, [6])), (fe_key(11, 53), frontend_d([7, 8], [9]))]);
        step(&mut s, &mut m, &Desired::default(), &a);
        let b = desired(vec![(fe_key(10, 80), frontend_d([1, 3, 9, 10], [0, 2, 4])), (fe_key(12, 80), frontend([2]))]);
        m.fail_at = Some(m.applied + fail_at);
        let _ = s.sync(&b, &mut m);
        assert_eq!(s.shadow().services, m.services, "fail_at {fail_at}");
        let shadow_slots: HashMap<BackendKey, BackendValue> = s
            .shadow()
            .slots
            .iter()
            .flat_map(|(id, sl)| sl.iter().map(move |(slot, v)| (BackendKey { svc_id: *id, slot: *slot }, *v)))
            .collect();
        assert_eq!(shadow_slots, m.backends, "fail_at {fail_at}");
        assert_eq!(shadow_draining(&s), m.draining, "fail_at {fail_at}");
        m.fail_at = None;
        step(&mut s, &mut m, &a, &b);
    }
}

#[test]
fn reconcile_from_maps_writes_nothing_when_nothing_changed() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend_d(0..5, [20, 21])), (fe_key(11, 53), frontend_d([7, 8], [1]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    assert_eq!(m.draining.len(), 3);
    // "Restart": a new syncer from what the maps hold.
    let mut s2 = restart(&m, 1024);
    assert!(step(&mut s2, &mut m, &a, &a).is_empty());
    // The draining entries hold their backend ids: still live, not retired.
    for b in m.draining.values() {
        assert_eq!(s2.backend_ids.live.get(&(b.addr_be, b.port_be)).map(|e| e.0), Some(b.backend_id));
    }
    // Changes after the restart keep ids and never reuse a live one.
    let ids_before: HashMap<ServiceKey4, u32> = m.services.iter().map(|(k, v)| (*k, v.id)).collect();
    let b = desired(vec![
        (fe_key(10, 80), frontend(2..6)),
        (fe_key(11, 53), frontend([7, 8])),
        (fe_key(12, 80), frontend([1])),
    ]);
    step(&mut s2, &mut m, &a, &b);
    for (k, id) in ids_before {
        assert_eq!(m.services[&k].id, id);
    }
    let new_id = m.services[&fe_key(12, 80).map_key()].id;
    assert!(m.services.iter().filter(|(k, _)| **k != fe_key(12, 80).map_key()).all(|(_, v)| v.id != new_id));
    let new_backend = m.backends.values().find(|b| b.addr_be == u32::from_ne_bytes(ip(5).octets())).unwrap();
    assert!(
        m.backends
            .values()
            .filter(|b| b.addr_be != new_backend.addr_be)
            .all(|b| b.backend_id != new_backend.backend_id)
    );
}

#[test]
fn reconcile_cleans_half_written_state() {
    // A crash left: a frontend whose count runs past its slots, a stray slot above
    // count, and slots of an id no frontend owns.
    let k = fe_key(10, 80).map_key();
    let bv = |i: u32, id: u32| BackendValue {
        backend_id: id,
        addr_be: u32::from_ne_bytes(ip(i).octets()),
        port_be: 8080u16.to_be(),
        _pad: [0; 2],
    };
    let mut m = FakeMaps::default();
    m.services.insert(ServiceKey4::address_marker(k.addr_be), ServiceValue::default());
    m.services.insert(k, ServiceValue { id: 5, count: 3, ..Default::default() });
    m.backends.insert(BackendKey { svc_id: 5, slot: 1 }, bv(1, 1));
    m.backends.insert(BackendKey { svc_id: 5, slot: 3 }, bv(3, 3));
    m.backends.insert(BackendKey { svc_id: 5, slot: 4 }, bv(4, 4));
    m.backends.insert(BackendKey { svc_id: 9, slot: 1 }, bv(1, 1));
    let mut s = restart(&m, 1024);
    let d = desired(vec![(fe_key(10, 80), frontend([1, 2, 3]))]);
    // The fake's op-by-op checks would trip over the broken start state; check the end.
    let mut w = FakeMaps { services: m.services.clone(), backends: m.backends.clone(), ..Default::default() };
    struct NoCheck<'a>(&'a mut FakeMaps);
    impl MapWriter for NoCheck<'_> {
        fn apply(&mut self, op: &Op) -> Result<(), WriteError> {
            match *op {
                Op::PutService(k, v) => drop(self.0.services.insert(k, v)),
                Op::DeleteService(k) => drop(self.0.services.remove(&k)),
                Op::PutBackend(k, v) => drop(self.0.backends.insert(k, v)),
                Op::DeleteBackend(k) => drop(self.0.backends.remove(&k)),
                Op::PutDraining(k, v) => drop(self.0.draining.insert(k, v)),
                Op::DeleteDraining(k) => drop(self.0.draining.remove(&k)),
                Op::ResetStats(_) => {}
                Op::PutIds(s) => self.0.ids = s,
                Op::PutTable(..) | Op::PutPrefilter(..) => {}
            }
            Ok(())
        }
    }
    s.sync(&d, &mut NoCheck(&mut w)).unwrap();
    assert_eq!(contents(&w), expected(&d));
    assert_eq!(w.services[&k].id, 5);
    // Backend 1 and 3 kept their ids; the new one got a fresh one above all seen.
    let by_addr: HashMap<u32, u32> = w.backends.values().map(|b| (b.addr_be, b.backend_id)).collect();
    assert_eq!(by_addr[&u32::from_ne_bytes(ip(1).octets())], 1);
    assert_eq!(by_addr[&u32::from_ne_bytes(ip(3).octets())], 3);
    assert!(by_addr[&u32::from_ne_bytes(ip(2).octets())] > 4);
    // The slot of id 9 might have carried flows: it is kept as an orphan.
    assert_eq!(w.draining.keys().copied().collect::<Vec<_>>(), [DrainKey { svc_id: 9, backend_id: 1 }]);
    assert_eq!(s.orphans.keys().copied().collect::<Vec<_>>(), [9]);
    assert_eq!(w.ids.next_backend_id, 6);
}

fn addr(i: u32) -> (u32, u16) {
    (u32::from_ne_bytes(ip(i).octets()), 8080u16.to_be())
}

/// What one op is, for order checks.
fn kind(o: &Op) -> &'static str {
    match o {
        Op::PutDraining(..) => "put_draining",
        Op::DeleteDraining(..) => "delete_draining",
        Op::PutService(k, _) if is_marker(k) => "marker",
        Op::PutService(..) => "service",
        Op::DeleteService(..) => "delete_service",
        Op::PutBackend(..) => "backend",
        Op::DeleteBackend(..) => "delete_backend",
        Op::ResetStats(_) => "reset",
        Op::PutIds(_) => "ids",
        Op::PutTable(..) => "table",
        Op::PutPrefilter(..) => "prefilter",
    }
}

#[test]
fn a_backend_leaving_the_slots_drains_first_under_its_id() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2, 3]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let id = m.services[&fe_key(10, 80).map_key()].id;
    let id2 = m.backends.values().find(|b| (b.addr_be, b.port_be) == addr(2)).unwrap().backend_id;
    // Pod 2 turns terminating: DRAINING entry first, then the slots and the count.
    let b = desired(vec![(fe_key(10, 80), frontend_d([1, 3], [2]))]);
    let ops = step(&mut s, &mut m, &a, &b);
    assert_eq!(
        ops.iter().map(kind).collect::<Vec<_>>(),
        ["put_draining", "backend", "service", "delete_backend"],
        "{ops:#?}"
    );
    assert!(
        matches!(ops[0], Op::PutDraining(DrainKey { svc_id, backend_id }, v) if svc_id == id && backend_id == id2 && v.backend_id == id2)
    );
    // Its id stays held while it drains.
    assert_eq!(s.backend_ids.live.get(&addr(2)).map(|e| e.0), Some(id2));
    assert!(!s.backend_ids.retired.contains_key(&addr(2)));
    // Ready again (a flap): back into the slots under the same id, then no longer draining.
    let ops = step(&mut s, &mut m, &b, &a);
    assert_eq!(ops.iter().map(kind).collect::<Vec<_>>(), ["backend", "service", "delete_draining"], "{ops:#?}");
    assert!(m.backends.values().any(|b| (b.addr_be, b.port_be) == addr(2) && b.backend_id == id2));
    // Terminating again, then gone from the slices: its entry goes, last.
    step(&mut s, &mut m, &a, &b);
    let c = desired(vec![(fe_key(10, 80), frontend([1, 3, 4]))]);
    let ops = step(&mut s, &mut m, &b, &c);
    assert_eq!(ops.iter().map(kind).collect::<Vec<_>>(), ["ids", "backend", "service", "delete_draining"], "{ops:#?}");
    assert!(m.draining.is_empty());
    // Now released: no slot or draining entry holds it any more.
    assert!(!s.backend_ids.live.contains_key(&addr(2)));
}

#[test]
fn a_new_frontend_with_draining_endpoints_and_its_deletion() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    // Unready pods from the start: they drain (harmless, no flow uses them).
    let a = desired(vec![(fe_key(10, 80), frontend_d([1], [2, 3])), (fe_key(11, 80), frontend_d([2], [1]))]);
    let ops = step(&mut s, &mut m, &Desired::default(), &a);
    assert_eq!(ops.iter().filter(|o| kind(o) == "put_draining").count(), 3);
    // The same pod has one id everywhere: pod 2 drains in one service under the id it
    // has in the other's slots.
    let id_of =
        |m: &FakeMaps, i: u32| m.backends.values().find(|b| (b.addr_be, b.port_be) == addr(i)).unwrap().backend_id;
    let svc10 = m.services[&fe_key(10, 80).map_key()].id;
    assert_eq!(m.draining[&DrainKey { svc_id: svc10, backend_id: id_of(&m, 2) }].backend_id, id_of(&m, 2));
    // Deleting the service used to remove its draining entries too; now its slot
    // backend joins them in `DRAINING` first, then its entry, its slot and its
    // ClusterIP's marker go, and all three entries stay as orphans.
    let b = desired(vec![(fe_key(11, 80), frontend_d([2], [1]))]);
    let id1 = id_of(&m, 1);
    let ops = step(&mut s, &mut m, &a, &b);
    assert_eq!(
        ops.iter().map(kind).collect::<Vec<_>>(),
        ["put_draining", "delete_service", "delete_backend", "delete_service"],
        "{ops:#?}"
    );
    assert!(
        matches!(ops[0], Op::PutDraining(DrainKey { svc_id, backend_id }, _) if svc_id == svc10 && backend_id == id1)
    );
    assert!(is_marker(match &ops[3] {
        Op::DeleteService(k) => k,
        _ => unreachable!(),
    }));
    assert_eq!(m.draining.keys().filter(|k| k.svc_id == svc10).count(), 3);
    step(&mut s, &mut m, &b, &Desired::default());
    assert!(m.backends.is_empty() && m.services.is_empty());
    assert_eq!(m.draining.len(), 5);
    // No flow left: the garbage collector releases them all.
    let st = release(&mut s, &mut m, &HashSet::new());
    assert_eq!(st.draining_deleted, 5);
    assert!(m.draining.is_empty() && s.orphans.is_empty() && s.svc_ids.held.is_empty());
}

/// Used to be "reconcile deletes draining entries of unknown services": such entries are
/// orphans of a deleted frontend (see `a_restart_recognises_orphans`), kept until
/// released.
#[test]
fn reconcile_keeps_draining_entries_of_unknown_services_as_orphans() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend_d([1], [2]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let stray = BackendValue { backend_id: 77, addr_be: addr(9).0, port_be: addr(9).1, _pad: [0; 2] };
    m.draining.insert(DrainKey { svc_id: 40, backend_id: 77 }, stray);
    // As the agent that wrote it would have left them.
    m.ids.next_backend_id = 78;
    let (i, mask) = lb_common::prefilter_word(stray.addr_be, true);
    *m.prefilter.entry(i).or_default() |= mask;
    let mut s2 = restart(&m, 1024);
    assert!(step(&mut s2, &mut m, &a, &a).is_empty());
    assert_eq!(orphans(&m).into_iter().collect::<Vec<_>>(), [(40, 77)]);
    // Ids above every id seen, draining ones included, for new backends.
    let b = desired(vec![(fe_key(10, 80), frontend_d([1, 5], [2]))]);
    step(&mut s2, &mut m, &a, &b);
    assert!(m.backends.values().all(|b| b.backend_id != 77 && (b.addr_be, b.port_be) != addr(5) || b.backend_id > 77));
    let st = release(&mut s2, &mut m, &HashSet::new());
    assert_eq!((st.draining_deleted, orphans(&m).len()), (1, 0));
}

/// Orphans inherited from a previous agent go on the first collector pass with no
/// flow of theirs, without waiting out ORPHAN_MIN_AGE again: an agent restarting
/// every few seconds would otherwise keep every deleted frontend's entries forever
/// (tests/faults_agent.rs saw 51,925 pile up over 100 restarts). An orphan made
/// after the restart still waits.
#[test]
fn inherited_orphans_are_released_at_once_new_ones_wait() {
    let mut m = FakeMaps::default();
    let mut s = Syncer::new(1024);
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2])), (fe_key(11, 80), frontend([3]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let b = desired(vec![(fe_key(11, 80), frontend([3]))]);
    step(&mut s, &mut m, &a, &b);
    assert_eq!(orphans(&m).len(), 2, "the deleted frontend's two backends drain");

    let mut s2 = restart(&m, 1024);
    assert!(step(&mut s2, &mut m, &b, &b).is_empty());
    let c = Desired::default();
    step(&mut s2, &mut m, &b, &c);
    assert_eq!(orphans(&m).len(), 3, "and now the other frontend's one");
    let mut stats = SyncStats::default();
    m.sticky.clear();
    m.reachable.clear();
    s2.release_orphans_at(Some(&HashSet::new()), &mut m, &mut stats, Instant::now()).expect("release");
    assert_eq!((stats.draining_deleted, orphans(&m).len()), (2, 1), "inherited ones go, the new one waits");
    let st = release(&mut s2, &mut m, &HashSet::new());
    assert_eq!((st.draining_deleted, orphans(&m).len()), (1, 0));
}

/// "Restarts" the agent: a new syncer from what the maps hold, `IDS` included.
fn restart(m: &FakeMaps, limit: u32) -> Syncer {
    Syncer::from_maps(
        m.services.iter().map(|(k, v)| (*k, *v)),
        m.backends.iter().map(|(k, v)| (*k, *v)),
        m.draining.iter().map(|(k, v)| (*k, *v)),
        m.ids,
        limit,
        lb_common::limits::TABLE_WORDS,
        |off, len| (off..off + len).map(|i| m.tables.get(&i).copied().unwrap_or(0)).collect(),
        (0..lb_common::PREFILTER_WORDS).map(|i| m.prefilter.get(&i).copied().unwrap_or(0)).collect(),
    )
}

/// The garbage collector's call, as if the orphans were old enough to be released.
fn release(s: &mut Syncer, m: &mut FakeMaps, live: &HashSet<(u32, u32)>) -> SyncStats {
    m.sticky.clear();
    m.reachable.clear();
    let mut stats = SyncStats::default();
    s.release_orphans_at(Some(live), m, &mut stats, Instant::now() + ORPHAN_MIN_AGE).expect("release");
    stats
}

fn svc_id(m: &FakeMaps, k: FrontendKey) -> u32 {
    m.services[&k.map_key()].id
}

fn backend_id(m: &FakeMaps, i: u32) -> u32 {
    m.backends.values().find(|b| (b.addr_be, b.port_be) == addr(i)).expect("backend").backend_id
}

/// The bug: `from_maps` derived the next ids from the largest in the maps, so after a
/// restart the id of the service or backend with the largest id, removed just before,
/// was issued again, and a stale conntrack entry (which knows a flow's service id,
/// backend id and slot) then matched the new service or backend. At the old head, the
/// new service got id 2 and the new backend id 3.
#[test]
fn a_restart_does_not_reissue_the_ids_of_removed_services_and_backends() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2, 3])), (fe_key(11, 80), frontend([1]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    assert_eq!((svc_id(&m, fe_key(10, 80)), svc_id(&m, fe_key(11, 80))), (1, 2));
    assert_eq!(backend_id(&m, 3), 3);
    // The service and the backend with the largest ids go (the backend's pod is gone:
    // not even draining), and the service's orphans are released.
    let b = desired(vec![(fe_key(10, 80), frontend([1, 2]))]);
    step(&mut s, &mut m, &a, &b);
    release(&mut s, &mut m, &HashSet::new());
    assert!(m.draining.is_empty());
    assert_eq!(m.ids, IdState { next_svc_id: 3, next_backend_id: 4, ..m.ids });

    let mut s2 = restart(&m, 1024);
    let c = desired(vec![(fe_key(10, 80), frontend([1, 2, 4])), (fe_key(12, 80), frontend([1]))]);
    step(&mut s2, &mut m, &b, &c);
    assert_eq!(svc_id(&m, fe_key(12, 80)), 3, "the removed service's id was issued again");
    assert_eq!(backend_id(&m, 4), 4, "the removed backend's id was issued again");
    // Backend 4 took the slot backend 3 had: only its id tells a stale flow apart.
    assert_eq!(m.backends[&BackendKey { svc_id: 1, slot: 3 }].backend_id, 4);
}

/// Maps written by an agent that did not persist `IDS`: the ids go on from the
/// largest in the maps, and are persisted with the first write that issues one.
#[test]
fn a_restart_without_persisted_ids_derives_them_from_the_maps() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2])), (fe_key(11, 80), frontend([3]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    m.ids = IdState::default();
    let mut s2 = restart(&m, 1024);
    assert!(
        step(&mut s2, &mut m, &a, &a).iter().all(|o| matches!(o, Op::PutIds(_))),
        "nothing to write but IDS (with the epoch a new agent bumps)"
    );
    let b = desired(vec![
        (fe_key(10, 80), frontend([1, 2, 4])),
        (fe_key(11, 80), frontend([3])),
        (fe_key(12, 80), frontend([])),
    ]);
    let ops = step(&mut s2, &mut m, &a, &b);
    assert_eq!(kind(&ops[0]), "ids", "{ops:#?}");
    assert_eq!((backend_id(&m, 4), svc_id(&m, fe_key(12, 80))), (4, 3));
    assert_eq!(m.ids, IdState { next_svc_id: 4, next_backend_id: 5, ..m.ids });
    // A persisted state behind the maps (it cannot be, but) never takes ids backwards.
    m.ids = IdState { next_svc_id: 0, next_backend_id: 2, ..m.ids };
    let s3 = restart(&m, 1024);
    assert_eq!((s3.svc_ids.cursor, s3.backend_ids.next), (4, 5));
}

/// `IDS` is written before any entry that uses an id issued since it was last written,
/// and only then.
#[test]
fn ids_are_persisted_before_the_entries_that_use_them() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let id10 = svc_id(&m, fe_key(10, 80));
    // A new service with a new backend, a new draining backend and a new slot backend
    // in the other: each batch starts with the ids it issued.
    let b = desired(vec![(fe_key(10, 80), frontend_d([1, 2, 3], [4])), (fe_key(11, 80), frontend([5]))]);
    let ops = step(&mut s, &mut m, &a, &b);
    let mut persisted = m.ids;
    persisted.next_svc_id = id10 + 1;
    persisted.next_backend_id = 3;
    for op in &ops {
        let (svc, backend) = match *op {
            Op::PutIds(st) => {
                assert!(st.next_svc_id >= persisted.next_svc_id && st.next_backend_id >= persisted.next_backend_id);
                persisted = st;
                continue;
            }
            Op::PutBackend(k, v) => (k.svc_id, v.backend_id),
            Op::PutDraining(k, v) => (k.svc_id, v.backend_id),
            Op::PutService(_, v) => (v.id, 0),
            Op::ResetStats(id) => (id, 0),
            _ => continue,
        };
        assert!(svc < persisted.next_svc_id && backend < persisted.next_backend_id, "{op} before its ids: {ops:#?}");
    }
    assert_eq!(ops.iter().filter(|o| kind(o) == "ids").count(), 2, "one per frontend that issued ids: {ops:#?}");
    assert_eq!(kind(&ops[0]), "ids");
    // Nothing issued (a backend goes, a service goes): IDS is not written.
    let c = desired(vec![(fe_key(10, 80), frontend([1, 3]))]);
    let ops = step(&mut s, &mut m, &b, &c);
    assert!(ops.iter().all(|o| kind(o) != "ids"), "{ops:#?}");
    // A failed IDS write writes nothing else, and the next sync retries it first.
    let d = desired(vec![(fe_key(10, 80), frontend([1, 3, 6]))]);
    m.fail_at = Some(m.applied);
    let before = (m.backends.clone(), m.ids);
    assert!(s.sync(&d, &mut m).is_err());
    assert_eq!((m.backends.clone(), m.ids), before);
    let ops = step(&mut s, &mut m, &c, &d);
    assert_eq!(kind(&ops[0]), "ids");
}

/// Service ids go round-robin from the persisted cursor: ids in use are skipped, the
/// cursor wraps, and a restart carries on where it was instead of starting again after
/// the largest id in use.
#[test]
fn service_ids_go_round_robin_across_restarts_skipping_ids_in_use() {
    let mut s = Syncer::new(5); // ids 1..=4
    let mut m = FakeMaps::default();
    let one = |vips: &[u8]| desired(vips.iter().map(|&v| (fe_key(v, 80), frontend([]))).collect());
    let a = one(&[1, 2, 3]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let ids = |m: &FakeMaps, vips: &[u8]| vips.iter().map(|&v| svc_id(m, fe_key(v, 80))).collect::<Vec<_>>();
    assert_eq!(ids(&m, &[1, 2, 3]), [1, 2, 3]);
    // 2 and 3 go; a restart; a new one gets 4 (not 2, the lowest free one, nor 2 as
    // the largest id in use plus one).
    let b = one(&[1]);
    step(&mut s, &mut m, &a, &b);
    let mut s = restart(&m, 5);
    let c = one(&[1, 4]);
    step(&mut s, &mut m, &b, &c);
    assert_eq!(ids(&m, &[4]), [4]);
    // The cursor wraps to 1, which is in use, and goes on to 2; then 3.
    let d = one(&[1, 4, 5, 6]);
    step(&mut s, &mut m, &c, &d);
    assert_eq!(ids(&m, &[5, 6]), [2, 3]);
    assert_eq!(m.ids.next_svc_id, 4);
    // Full; 4 goes; after a restart the next one gets 4 again (the cursor is there),
    // then the space is full.
    let e = one(&[1, 5, 6]);
    step(&mut s, &mut m, &d, &e);
    let mut s = restart(&m, 5);
    let f = one(&[1, 5, 6, 7]);
    step(&mut s, &mut m, &e, &f);
    assert_eq!(ids(&m, &[7]), [4]);
    assert!(matches!(s.sync(&one(&[1, 5, 6, 7, 8]), &mut m), Err(SyncError::OutOfServiceIds { limit: 5 })));
    // A persisted cursor out of range (a smaller SVC_STATS) wraps.
    m.ids.next_svc_id = 9;
    let s = restart(&m, 5);
    assert_eq!(s.svc_ids.cursor, 1);
}

/// kube-proxy leaves the conntrack entries of a deleted Service's TCP flows alone: they
/// go on. Here the deleted frontend's slot backends move to `DRAINING` (before its
/// entry and slots go) and its draining ones stay; nothing in `DRAINING` is deleted.
#[test]
fn deleting_a_frontend_keeps_its_backends_draining_as_orphans() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend_d([1, 2], [3])), (fe_key(11, 80), frontend([2]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let id = svc_id(&m, fe_key(10, 80));
    let (b1, b2, b3) = (backend_id(&m, 1), backend_id(&m, 2), m.draining.values().next().expect("draining").backend_id);
    let b = desired(vec![(fe_key(11, 80), frontend([2]))]);
    let ops = step(&mut s, &mut m, &a, &b);
    let put: BTreeSet<(u32, u32)> = ops
        .iter()
        .filter_map(|o| match o {
            Op::PutDraining(k, v) => {
                assert_eq!(k.backend_id, v.backend_id);
                Some((k.svc_id, k.backend_id))
            }
            _ => None,
        })
        .collect();
    assert_eq!(put, [(id, b1), (id, b2)].into());
    assert!(ops.iter().all(|o| kind(o) != "delete_draining"), "{ops:#?}");
    let first_delete = ops.iter().position(|o| kind(o).starts_with("delete")).expect("deletes");
    assert!(ops[..first_delete].iter().all(|o| kind(o) == "put_draining"), "{ops:#?}");
    assert_eq!(orphans(&m), [(id, b1), (id, b2), (id, b3)].into());
    assert_eq!(s.orphan_count(), 3);
    // The orphans hold the service id and the backend ids.
    assert!(s.svc_ids.held.contains(&id));
    assert_eq!(s.backend_ids.live.get(&addr(1)).map(|e| e.0), Some(b1));
    // A sync of the same state changes nothing.
    assert!(step(&mut s, &mut m, &b, &b).is_empty());
}

#[test]
fn release_orphans_keeps_those_with_live_flows_and_frees_the_id_after_the_last() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let id = svc_id(&m, fe_key(10, 80));
    let (b1, b2) = (backend_id(&m, 1), backend_id(&m, 2));
    step(&mut s, &mut m, &a, &Desired::default());
    // Too young: kept whatever `live` says (a scan may have missed its newest flows).
    assert_eq!(s.release_orphans(&HashSet::new(), &mut m).expect("release").ops(), 0);
    assert_eq!(orphans(&m).len(), 2);
    // A flow to backend 1 still lives: its entry stays; the other goes.
    let st = release(&mut s, &mut m, &[(id, b1), (id + 1, b2)].into());
    assert_eq!(st.draining_deleted, 1);
    assert_eq!(orphans(&m), [(id, b1)].into());
    assert!(s.svc_ids.held.contains(&id));
    // The service comes back meanwhile: a fresh id; the orphan stays.
    step(&mut s, &mut m, &Desired::default(), &a);
    let id2 = svc_id(&m, fe_key(10, 80));
    assert_ne!(id2, id);
    assert_eq!(orphans(&m), [(id, b1)].into());
    // Same pods, same backend ids.
    assert_eq!((backend_id(&m, 1), backend_id(&m, 2)), (b1, b2));
    // Its flow ended: the entry goes, and the id is free again.
    let st = release(&mut s, &mut m, &HashSet::new());
    assert_eq!(st.draining_deleted, 1);
    assert!(orphans(&m).is_empty() && s.orphans.is_empty());
    assert!(!s.svc_ids.held.contains(&id) && s.svc_ids.held.contains(&id2));
    // Reusable: once the cursor comes round to it.
    let mut s = Syncer::new(4);
    let mut m = FakeMaps::default();
    let one = |v: u8| desired(vec![(fe_key(v, 80), frontend([1]))]);
    step(&mut s, &mut m, &Desired::default(), &one(1));
    step(&mut s, &mut m, &one(1), &Desired::default());
    step(&mut s, &mut m, &Desired::default(), &one(2));
    step(&mut s, &mut m, &one(2), &one(3));
    assert_eq!(svc_id(&m, fe_key(3, 80)), 3);
    // 1 and 2 are held by orphans: no id left.
    assert!(matches!(s.sync(&one(4), &mut m), Err(SyncError::OutOfServiceIds { limit: 4 })));
    release(&mut s, &mut m, &HashSet::new());
    step(&mut s, &mut m, &one(3), &one(4));
    assert_eq!(svc_id(&m, fe_key(4, 80)), 1);
}

#[test]
fn orphans_go_after_their_maximum_age_without_the_collector() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    step(&mut s, &mut m, &a, &Desired::default());
    m.reachable.clear();
    let t0 = Instant::now();
    let mut stats = SyncStats::default();
    // Before: a sync keeps them, and so does the collector with their flows alive.
    s.sync_inner(&Desired::default(), &mut m, t0 + ORPHAN_MAX_AGE - Duration::from_secs(60)).expect("sync");
    assert_eq!(orphans(&m).len(), 2);
    let live: HashSet<(u32, u32)> = orphans(&m).into_iter().collect();
    s.release_orphans_at(Some(&live), &mut m, &mut stats, t0 + ORPHAN_MAX_AGE - Duration::from_secs(60))
        .expect("release");
    assert_eq!(orphans(&m).len(), 2);
    // After: the next sync deletes them.
    let st = s.sync_inner(&Desired::default(), &mut m, t0 + ORPHAN_MAX_AGE + Duration::from_secs(1)).expect("sync");
    assert_eq!(st.draining_deleted, 2);
    assert!(m.draining.is_empty() && s.orphans.is_empty() && s.svc_ids.held.is_empty());
}

/// After a restart, `DRAINING` entries of service ids without a frontend are orphans:
/// kept, holding their ids, and released like any other.
#[test]
fn a_restart_recognises_orphans() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend_d([1, 2], [3])), (fe_key(11, 80), frontend([4]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let id = svc_id(&m, fe_key(10, 80));
    let b = desired(vec![(fe_key(11, 80), frontend([4]))]);
    step(&mut s, &mut m, &a, &b);
    let before = orphans(&m);
    assert_eq!(before.len(), 3);

    let mut s2 = restart(&m, 1024);
    assert_eq!(s2.orphans.keys().copied().collect::<Vec<_>>(), [id]);
    assert_eq!(s2.orphan_count(), 3);
    assert!(step(&mut s2, &mut m, &b, &b).is_empty(), "the orphans are not deleted");
    // The service comes back: a fresh id, not the orphans'.
    let ops = step(&mut s2, &mut m, &b, &a);
    assert_ne!(svc_id(&m, fe_key(10, 80)), id);
    assert!(ops.iter().all(|o| kind(o) != "delete_draining"), "{ops:#?}");
    assert_eq!(orphans(&m), before);
    // Released by the collector.
    let live: HashSet<(u32, u32)> = before.iter().take(1).copied().collect();
    release(&mut s2, &mut m, &live);
    assert_eq!(orphans(&m), live.into_iter().collect());
}

/// Every change of a frontend's backends writes its table to fresh words and then the
/// entry (the fake refuses a write into a published table, and checks every bucket
/// after every op); the epoch moves on after removals only, last; prefilter bits come
/// before the entries that need them and go after the last one has.
#[test]
fn tables_switch_by_the_entry_and_the_epoch_follows_removals() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2, 3]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    let e0 = m.ids.epoch;
    assert_eq!(e0, 1, "a new agent bumps the epoch once");
    let v0 = m.services[&fe_key(10, 80).map_key()];
    // Adding a backend: a new table, no epoch bump.
    let b = desired(vec![(fe_key(10, 80), frontend([1, 2, 3, 4]))]);
    s.sync(&b, &mut m).unwrap();
    let v1 = m.services[&fe_key(10, 80).map_key()];
    assert_ne!(v1.table_off, v0.table_off);
    assert_eq!(v1.table_size, v0.table_size, "one more backend keeps the table's size");
    assert_eq!(m.ids.epoch, e0);
    let kinds: Vec<&str> = m.log.iter().map(kind).collect();
    let (t, svc) =
        (kinds.iter().position(|k| *k == "table").unwrap(), kinds.iter().position(|k| *k == "service").unwrap());
    assert!(t < svc, "{kinds:?}");
    // Only the new backend's buckets changed hands.
    let (ta, tb) = (Table::build(&[addr(1), addr(2), addr(3)]), &s.shadow().tables[&v1.id]);
    let changed = ta.buckets.iter().zip(&tb.buckets).filter(|(x, y)| x != y).count();
    assert_eq!(changed, tb.loads()[&addr(4)]);
    // Removing one: the epoch moves on, once, as the last write (`step` checks that).
    step(&mut s, &mut m, &b, &a);
    assert_eq!(m.ids.epoch, e0 + 1);
    // The old words are reused only after the quarantine: two quick changes take
    // fresh words each time.
    let v2 = m.services[&fe_key(10, 80).map_key()];
    assert!(v2.table_off != v1.table_off && v2.table_off != v0.table_off);
    // The ClusterIP and backend bits go once nothing needs them.
    let vip_bit = lb_common::prefilter_word(fe_key(10, 80).map_key().addr_be, false);
    let be4_bit = lb_common::prefilter_word(addr(4).0, true);
    assert_eq!(m.prefilter.get(&be4_bit.0).copied().unwrap_or(0) & be4_bit.1, 0, "backend 4 is gone");
    step(&mut s, &mut m, &a, &Desired::default());
    release(&mut s, &mut m, &HashSet::new());
    s.sync(&Desired::default(), &mut m).unwrap();
    assert!(m.prefilter.values().all(|w| *w == 0), "bits left: {:?}", m.prefilter);
    assert_eq!(m.prefilter.get(&vip_bit.0).copied().unwrap_or(0) & vip_bit.1, 0);
}

/// A restarted agent reads the tables back: nothing is rewritten, and the next change
/// is an update of the table it found (minimal moves), not a new one.
#[test]
fn a_restart_reads_the_tables_back() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let a = desired(vec![(fe_key(10, 80), frontend(1..=20))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    // Churn so the table is no longer a fresh build.
    let b = desired(vec![(fe_key(10, 80), frontend(2..=21))]);
    step(&mut s, &mut m, &a, &b);
    let before = s.shadow().tables.clone();
    let mut s2 = restart(&m, 1024);
    assert_eq!(s2.shadow().tables, before);
    m.log.clear();
    s2.sync(&b, &mut m).unwrap();
    assert!(!m.log.iter().any(|o| matches!(o, Op::PutTable(..))), "{:#?}", m.log);
    let id = m.services[&fe_key(10, 80).map_key()].id;
    let c = desired(vec![(fe_key(10, 80), frontend(2..=22))]);
    step(&mut s2, &mut m, &b, &c);
    let (t0, t1) = (&before[&id], &s2.shadow().tables[&id]);
    let changed = t0.buckets.iter().zip(&t1.buckets).filter(|(x, y)| x != y).count();
    assert_eq!(changed, t1.loads()[&addr(22)]);
}

#[test]
fn table_space_reuses_words_after_the_quarantine_and_coalesces() {
    let now = Instant::now();
    let mut t = TableSpace::new(100);
    let a = t.alloc(40, now).unwrap();
    let b = t.alloc(40, now).unwrap();
    assert_eq!((a, b), (0, 40));
    assert!(matches!(t.alloc(40, now), Err(SyncError::OutOfTableSpace { words: 40, free: 20, limit: 100 })));
    t.release(a, 40, now);
    assert!(t.alloc(40, now + Duration::from_millis(10)).is_err(), "still in quarantine");
    assert_eq!(t.alloc(40, now + TABLE_QUARANTINE).unwrap(), 0);
    t.release_now(0, 40);
    t.release_now(b, 40);
    assert_eq!(t.free, BTreeMap::from([(0, 100)]));
    assert!(t.take(10, 20) && !t.take(15, 10));
    assert_eq!(t.free, BTreeMap::from([(0, 10), (30, 70)]));
}

/// The socket LB closes the sockets of departed backends by what `take_departed` says:
/// a backend that leaves the slots but drains is `Draining` (UDP sockets only), one that
/// is gone from a live Service is `Gone` (TCP too), a slot move is no departure, and a
/// deleted Service's backends never count as `Gone`.
#[test]
fn departed_backends_are_told_apart_by_where_they_stand() {
    let mut s = Syncer::new(1024);
    let mut m = FakeMaps::default();
    let id_of = |s: &Syncer, i: u32| {
        s.shadow()
            .slots
            .values()
            .chain(s.shadow().draining.values())
            .flat_map(|m| m.values())
            .find(|b| b.addr_be == u32::from_ne_bytes(ip(i).octets()))
            .map(|b| b.backend_id)
            .unwrap()
    };
    let a = desired(vec![(fe_key(10, 80), frontend([1, 2, 3]))]);
    step(&mut s, &mut m, &Desired::default(), &a);
    assert!(s.take_departed().is_empty(), "a new frontend has no departures");
    let svc = m.services[&fe_key(10, 80).map_key()].id;
    let (b1, b2, b3) = (id_of(&s, 1), id_of(&s, 2), id_of(&s, 3));

    // 1 goes away (3 moves into its slot), 2 drains.
    let b = desired(vec![(fe_key(10, 80), frontend_d([3], [2]))]);
    step(&mut s, &mut m, &a, &b);
    let mut d = s.take_departed();
    d.sort_by_key(|(k, _)| k.backend_id);
    let key = |backend_id| DrainKey { svc_id: svc, backend_id };
    assert_eq!(d, vec![(key(b1), Departure::Gone), (key(b2), Departure::Draining)], "3 only moved slot");
    assert!(!d.iter().any(|(k, _)| k.backend_id == b3));
    assert!(s.take_departed().is_empty(), "each departure is told once");

    // 2's pod is gone.
    let c = desired(vec![(fe_key(10, 80), frontend([3]))]);
    step(&mut s, &mut m, &b, &c);
    assert_eq!(s.take_departed(), vec![(key(b2), Departure::Gone)]);

    // The Service is deleted: its last backend drains under the orphaned id, and stays
    // `Draining` when the orphan entries go.
    step(&mut s, &mut m, &c, &Desired::default());
    assert_eq!(s.take_departed(), vec![(key(b3), Departure::Draining)]);
    s.release_orphans(&HashSet::new(), &mut m).unwrap();
    assert!(s.take_departed().iter().all(|(_, d)| *d == Departure::Draining));
}
