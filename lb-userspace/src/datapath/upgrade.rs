//! Carrying the datapath's state across a change of the map layout
//! ([`MAP_LAYOUT_VERSION`]), so that an upgraded agent keeps every established flow.
//!
//! Pinned map names carry the layout version (`lb4_ct_v6`), and a map of another
//! version is never reused: its key or value layout may differ. An agent that finds the
//! previous version's maps (`v{N-1}`) under its bpffs migrates instead:
//!
//! 1. [`prepare`] (before loading): finds the old maps and opens them.
//! 2. The datapath is loaded with fresh `vN` maps, and [`Upgrade::copy`] carries the
//!    old maps into them through [`CARRIED`], one converter per map: a map whose layout
//!    did not change is copied entry by entry as it is, `CONNTRACK` is converted. The
//!    new maps then hold what the old agent had programmed (services, slots, lookup
//!    tables, drain set, the id allocators) and what its datapath had learnt
//!    (conntrack, affinity, socket LB translations): the shadow the new agent rebuilds
//!    from them (`sync::Syncer::from_maps`) has the same service and backend ids, so
//!    the carried conntrack and affinity entries stay valid.
//! 3. The agent swaps the programs as a restart does: every pinned interface link is
//!    updated in place (`BPF_LINK_UPDATE`, agent/attach.rs) and every cgroup link
//!    replaced (agent/socklb.rs). From then on only the new programs run, on the new
//!    maps.
//! 4. [`Upgrade::finish`] copies the maps the old programs wrote (conntrack, affinity,
//!    fragments, socket LB) once more, for the flows they started between step 2 and
//!    the swap (an entry the new programs have refreshed since wins), removes the old
//!    pins (the old maps are freed with their last reference), and writes the layout
//!    marker.
//!
//! The marker is a directory `layout_v<N>` in the bpffs (a bpffs holds no regular
//! files). It says that the state there is complete in layout N: while the previous
//! version's maps are present without it, a migration was interrupted, and the next
//! agent starts it over from the old maps (which are removed only after the marker
//! would be due). Pinned maps or a marker of a *newer* layout than this agent's refuse
//! the start ([`UpgradeError::Newer`]): this agent cannot read them, and replacing
//! them would drop every flow.
//!
//! Not carried: the counters (`STATS`, `SVC_STATS`, `SOCK_SVC_STATS`), which start from
//! zero as on any fresh load (Prometheus takes a reset counter as a restart), and
//! `SOCK_STALE`, which only holds pairs while the agent's socket iterator runs.
//!
//! For the next layout change: bump `MAP_LAYOUT_VERSION`, move the changed type's
//! current form into a `v{N-1}` module here (as [`v5::CtValue4`]), and rewrite
//! [`CARRIED`] for the maps of `v{N-1}`, with a converter for each map whose layout
//! changed. A migration spans one version: older state needs the agent of each version
//! between, or `lb cleanup`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, Map, MapData, MapError},
};
use lb_common::{
    AffinityKey4, AffinityValue, BackendKey, BackendValue, CtKey4, CtValue4, DrainKey, FragKey4, FragValue4, IdState,
    MAP_LAYOUT_VERSION, ServiceKey4, ServiceValue, SockAffinityKey, SockRevKey4, SockRevValue4, map_names,
};
use serde::{Deserialize, Serialize};

use super::MappedWords;

/// The layout this agent migrates from.
pub const PREVIOUS: u32 = MAP_LAYOUT_VERSION - 1;

/// Name of the layout marker directory of version `v`.
pub fn marker_name(v: u32) -> String {
    format!("{MARKER_PREFIX}{v}")
}

/// `layout_v<N>`: see the module documentation.
pub const MARKER_PREFIX: &str = "layout_v";

/// Map layout v5 (lb 9be0374), where it differs from v6.
pub mod v5 {
    /// `CONNTRACK` value of v5: v6's without `created`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CtValue4 {
        pub nat_addr_be: u32,
        pub nat_port_be: u16,
        pub dir: u8,
        pub flags: u8,
        pub svc_id: u32,
        pub backend_id: u32,
        pub slot: u32,
        pub seen: u32,
        pub epoch: u32,
    }
    const _: () = assert!(core::mem::size_of::<CtValue4>() == 28);
    // SAFETY: repr(C), Copy, no implicit padding (28 bytes of named fields).
    unsafe impl aya::Pod for CtValue4 {}

    /// The v6 entry: the same fields, and `created` 0 ("not known").
    pub fn conntrack(v: CtValue4) -> lb_common::CtValue4 {
        let CtValue4 { nat_addr_be, nat_port_be, dir, flags, svc_id, backend_id, slot, seen, epoch } = v;
        lb_common::CtValue4 { nat_addr_be, nat_port_be, dir, flags, svc_id, backend_id, slot, seen, epoch, created: 0 }
    }
}

/// One map of the previous layout, and how it is carried into this one.
pub struct Carried {
    /// Pinned name in the previous layout.
    pub old: &'static str,
    /// Pinned name in this layout.
    pub new: &'static str,
    /// Copies the old map's entries into the new map.
    pub copy: CopyFn,
    /// Copied again after the swap: the datapath writes it.
    pub again: bool,
}

/// `(old map, new map, pass)` -> entries written.
pub type CopyFn = fn(MapData, MapData, Pass) -> Result<usize, MapError>;

/// The maps of [`PREVIOUS`] that are carried (every other is dropped: see the module
/// documentation). v5 -> v6: only `CONNTRACK`'s value changed.
pub const CARRIED: &[Carried] = &[
    // What the agent programmed: copied before the swap; the first sync goes on from it.
    Carried { old: "lb4_svc_v5", new: map_names::SERVICES, copy: same::<ServiceKey4, ServiceValue>, again: false },
    Carried { old: "lb4_be_v5", new: map_names::BACKENDS, copy: same::<BackendKey, BackendValue>, again: false },
    Carried { old: "lb4_drain_v5", new: map_names::DRAINING, copy: same::<DrainKey, BackendValue>, again: false },
    Carried { old: "lb4_tbl_v5", new: map_names::TABLES, copy: words, again: false },
    Carried { old: "lb4_pref_v5", new: map_names::PREFILTER, copy: array::<u64>, again: false },
    Carried { old: "lb_ids_v5", new: map_names::IDS, copy: array::<IdState>, again: false },
    // What the datapath learnt: copied before the swap and again after it.
    Carried { old: "lb4_ct_v5", new: map_names::CONNTRACK, copy: conntrack_v5, again: true },
    Carried { old: "lb4_aff_v5", new: map_names::AFFINITY, copy: affinity::<AffinityKey4>, again: true },
    Carried { old: "lb4_frag_v5", new: map_names::FRAGS, copy: same::<FragKey4, FragValue4>, again: true },
    Carried { old: "lb4_skrev_v5", new: map_names::SOCK_REVNAT, copy: same::<SockRevKey4, SockRevValue4>, again: true },
    Carried { old: "lb4_skaff_v5", new: map_names::SOCK_AFFINITY, copy: affinity::<SockAffinityKey>, again: true },
];

/// Maps of [`PREVIOUS`] left behind, and why.
pub const NOT_CARRIED: &[(&str, &str)] = &[
    ("lb_stats_v5", "counters start from zero, as on any load"),
    ("lb4_svcst_v5", "counters start from zero, as on any load"),
    ("lb4_sksvc_v5", "counters start from zero, as on any load"),
    ("lb4_skstl_v5", "holds pairs only while the socket iterator runs"),
];

/// Before the swap (into fresh maps), or after it (into maps the new programs write).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Before,
    After,
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(
        "{path} is pinned state of map layout v{found}, newer than this agent's v{MAP_LAYOUT_VERSION}: a downgrade is \
         refused, and nothing was changed (the datapath pinned there keeps running). Run the newer agent again, or \
         run `lb cleanup` and then this agent, which drops every established flow through a ClusterIP"
    )]
    Newer { path: PathBuf, found: u32 },
    #[error(
        "{path} is pinned state of map layout v{found}; this agent (v{MAP_LAYOUT_VERSION}) migrates from v{PREVIOUS} \
         only. Upgrade through an agent of each layout in between, or run `lb cleanup` (which drops every \
         established flow through a ClusterIP)"
    )]
    TooOld { path: PathBuf, found: u32 },
    #[error("reading the bpffs directory {path}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the v{PREVIOUS} map {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("map {name} is missing from the loaded datapath")]
    Missing { name: &'static str },
    #[error("carrying {old} into {new} (a map smaller than the old one's contents? its --max-* flag must hold them)")]
    Copy {
        old: &'static str,
        new: &'static str,
        #[source]
        source: MapError,
    },
    #[error("removing {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The layout version of a bpffs entry: a map of ours (`lb4_ct_v6`) or a marker.
fn version_of(name: &str) -> Option<u32> {
    let rest = map_names::PREFIXES.iter().chain(std::iter::once(&MARKER_PREFIX)).find_map(|p| name.strip_prefix(p))?;
    rest.parse().ok()
}

/// What [`prepare`] found, as the status file reports a migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReport {
    pub from: u32,
    pub to: u32,
    /// Entries written per map (new name), both passes.
    pub carried: Vec<CarriedCount>,
    /// The first copy (before the swap).
    pub copy_ms: u64,
    /// From the end of the first copy to the end of the second: the swap of every link,
    /// while the old programs still ran on some hooks.
    pub swap_ms: u64,
    /// Old pins removed (maps; the old programs' links were replaced by the swap).
    pub removed: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedCount {
    pub map: String,
    pub before_swap: usize,
    pub after_swap: usize,
}

/// A migration under way: the old maps, opened.
pub struct Upgrade {
    pin_dir: PathBuf,
    old: Vec<(&'static Carried, PathBuf)>,
    /// Handles on the new maps (the `Ebpf` goes to the attacher before the second copy).
    new_maps: Vec<MapData>,
    report: UpgradeReport,
    copied_at: Option<Instant>,
}

/// Checks the layout of what is pinned under `pin_dir` before anything is loaded.
/// `Ok(None)`: nothing to migrate (a fresh bpffs, or this layout's maps). `Ok(Some)`:
/// the previous layout's maps, to carry over once the datapath is loaded. A newer
/// layout, or one older than [`PREVIOUS`], is an error, and nothing has been changed.
///
/// Cleans up after an interrupted migration: without this layout's marker, this
/// layout's maps beside the previous layout's are an attempt that did not finish, and
/// are removed so that the migration starts over from the old maps; with the marker,
/// leftover old pins are what a finished migration had not yet removed.
pub fn prepare(pin_dir: &Path) -> Result<Option<Upgrade>, UpgradeError> {
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(UpgradeError::Bpffs { path: pin_dir.into(), source }),
    };
    let mut found: Vec<(u32, PathBuf, bool)> = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(v) = version_of(&name) {
            found.push((v, e.path(), name.starts_with(MARKER_PREFIX)));
        }
    }
    found.sort();
    if let Some((v, path, _)) = found.iter().rev().find(|(v, _, _)| *v > MAP_LAYOUT_VERSION) {
        return Err(UpgradeError::Newer { path: path.clone(), found: *v });
    }
    if let Some((v, path, _)) = found.iter().find(|(v, _, _)| *v < PREVIOUS) {
        return Err(UpgradeError::TooOld { path: path.clone(), found: *v });
    }
    let old: Vec<PathBuf> = found.iter().filter(|(v, _, m)| *v == PREVIOUS && !m).map(|(_, p, _)| p.clone()).collect();
    if old.is_empty() {
        return Ok(None);
    }
    let marked = found.iter().any(|(v, _, m)| *v == MAP_LAYOUT_VERSION && *m);
    if marked {
        tracing::info!(pins = old.len(), "removing v{PREVIOUS} pins a finished migration left");
        for p in &old {
            remove(p)?;
        }
        return Ok(None);
    }
    for (_, p, _) in found.iter().filter(|(v, _, _)| *v == MAP_LAYOUT_VERSION) {
        tracing::warn!(path = %p.display(), "removing a pin of an interrupted migration; migrating again from v{PREVIOUS}");
        remove(p)?;
    }
    let old = CARRIED.iter().map(|c| (c, pin_dir.join(c.old))).filter(|(_, p)| old.contains(p)).collect();
    Ok(Some(Upgrade {
        pin_dir: pin_dir.into(),
        old,
        new_maps: Vec::new(),
        report: UpgradeReport { from: PREVIOUS, to: MAP_LAYOUT_VERSION, ..Default::default() },
        copied_at: None,
    }))
}

fn remove(p: &Path) -> Result<(), UpgradeError> {
    let r = if p.is_dir() { std::fs::remove_dir(p) } else { std::fs::remove_file(p) };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(UpgradeError::Remove { path: p.into(), source: e }),
        _ => Ok(()),
    }
}

/// Marks `pin_dir` as holding this layout's complete state (see the module
/// documentation); done by every agent once its maps are in place.
pub fn write_marker(pin_dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(pin_dir.join(marker_name(MAP_LAYOUT_VERSION))) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

/// The layout markers under `pin_dir`, for `lb cleanup`.
pub fn markers(pin_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else { return Vec::new() };
    entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(MARKER_PREFIX)).map(|e| e.path()).collect()
}

impl Upgrade {
    /// The old pins that will be migrated.
    pub fn old_maps(&self) -> impl Iterator<Item = &Path> {
        self.old.iter().map(|(_, p)| p.as_path())
    }

    /// The first copy: every carried map into the freshly loaded `ebpf`'s maps.
    pub fn copy(&mut self, ebpf: &Ebpf) -> Result<(), UpgradeError> {
        let t0 = Instant::now();
        for (c, _) in &self.old {
            let map = ebpf.map(c.new).ok_or(UpgradeError::Missing { name: c.new })?;
            let data = crate::agent::sync::map_data(map).ok_or(UpgradeError::Missing { name: c.new })?;
            let dup = crate::agent::sync::dup_map(data).map_err(|source| UpgradeError::Copy {
                old: c.old,
                new: c.new,
                source,
            })?;
            self.new_maps.push(dup);
        }
        self.pass(Pass::Before)?;
        self.report.copy_ms = t0.elapsed().as_millis() as u64;
        self.copied_at = Some(Instant::now());
        Ok(())
    }

    fn pass(&mut self, pass: Pass) -> Result<(), UpgradeError> {
        for (i, (c, path)) in self.old.iter().enumerate() {
            if pass == Pass::After && !c.again {
                continue;
            }
            let err = |source| UpgradeError::Copy { old: c.old, new: c.new, source };
            let old = MapData::from_pin(path).map_err(|source| UpgradeError::Open { path: path.clone(), source })?;
            let new = crate::agent::sync::dup_map(&self.new_maps[i]).map_err(err)?;
            let n = (c.copy)(old, new, pass).map_err(err)?;
            match self.report.carried.iter_mut().find(|r| r.map == c.new) {
                Some(r) => r.after_swap += n,
                None => self.report.carried.push(CarriedCount { map: c.new.into(), before_swap: n, after_swap: 0 }),
            }
        }
        Ok(())
    }

    /// After the swap: the second copy, then the old pins go and the marker is written.
    pub fn finish(mut self) -> Result<UpgradeReport, UpgradeError> {
        self.pass(Pass::After)?;
        self.report.swap_ms = self.copied_at.map_or(Duration::ZERO, |t| t.elapsed()).as_millis() as u64;
        let old_names = CARRIED.iter().map(|c| c.old).chain(NOT_CARRIED.iter().map(|(n, _)| *n));
        for name in old_names {
            let p = self.pin_dir.join(name);
            if p.exists() {
                remove(&p)?;
                self.report.removed.push(name.into());
            }
        }
        remove(&self.pin_dir.join(marker_name(PREVIOUS)))?;
        write_marker(&self.pin_dir).map_err(|source| UpgradeError::Remove { path: self.pin_dir.clone(), source })?;
        Ok(self.report)
    }
}

fn typed<T: TryFrom<Map, Error = MapError>>(data: MapData) -> Result<T, MapError> {
    T::try_from(Map::from_map_data(data)?)
}

/// Copies every entry of a hash map whose layout is unchanged. After the swap, an
/// entry already in the new map is left alone: the new programs wrote it.
fn same<K: Pod, V: Pod>(old: MapData, new: MapData, pass: Pass) -> Result<usize, MapError> {
    merge::<K, V, V>(old, new, pass, |v| v, |_, _| false)
}

/// Copies a hash map through `convert`. After the swap, an entry already in the new
/// map is replaced only if `newer(old, new)`: the old programs refreshed it last.
fn merge<K: Pod, VO: Pod, V: Pod>(
    old: MapData,
    new: MapData,
    pass: Pass,
    convert: impl Fn(VO) -> V,
    newer: impl Fn(&V, &V) -> bool,
) -> Result<usize, MapError> {
    let old: HashMap<MapData, K, VO> = typed(old)?;
    let mut new: HashMap<MapData, K, V> = typed(new)?;
    let mut n = 0;
    // The old programs still write the old map while this walks it: an entry gone
    // between its key and its lookup is skipped (it was evicted or expired).
    let keys: Vec<K> = old.keys().filter_map(Result::ok).collect();
    for k in keys {
        let Ok(v) = old.get(&k, 0) else { continue };
        let v = convert(v);
        if pass == Pass::After
            && let Ok(cur) = new.get(&k, 0)
            && !newer(&v, &cur)
        {
            continue;
        }
        new.insert(k, v, 0)?;
        n += 1;
    }
    Ok(n)
}

/// `a` is a later conntrack tick than `b` (ticks wrap).
fn later(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

fn conntrack_v5(old: MapData, new: MapData, pass: Pass) -> Result<usize, MapError> {
    merge::<CtKey4, v5::CtValue4, CtValue4>(old, new, pass, v5::conntrack, |o, n| later(o.seen, n.seen))
}

fn affinity<K: Pod>(old: MapData, new: MapData, pass: Pass) -> Result<usize, MapError> {
    merge::<K, AffinityValue, AffinityValue>(old, new, pass, |v| v, |o, n| o.last_used_ns > n.last_used_ns)
}

/// Copies an array, index by index (up to the smaller length). Only nonzero values
/// count as carried.
fn array<V: Pod + PartialEq + Default>(old: MapData, new: MapData, _pass: Pass) -> Result<usize, MapError> {
    let old: Array<MapData, V> = typed(old)?;
    let mut new: Array<MapData, V> = typed(new)?;
    let mut n = 0;
    for i in 0..old.len().min(new.len()) {
        let v = old.get(&i, 0)?;
        if v != V::default() {
            new.set(i, v, 0)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Copies `TABLES` through mmaps of both arrays (4 Mi words: one copy, not a syscall
/// per word). A smaller new array takes what fits; a service whose table falls outside
/// it reads back as unknown and gets a new table on the first sync.
fn words(old: MapData, new: MapData, _pass: Pass) -> Result<usize, MapError> {
    let io = |e: super::WordsError| MapError::IoError(std::io::Error::other(e));
    let old = MappedWords::new(old, "old TABLES").map_err(io)?;
    let mut new = MappedWords::new(new, map_names::TABLES).map_err(io)?;
    const CHUNK: u32 = 1 << 16;
    let len = old.len().min(new.len());
    let mut n = 0;
    let mut off = 0;
    while off < len {
        let w = old.read(off, CHUNK.min(len - off)).map_err(io)?;
        n += w.iter().filter(|w| **w != 0).count();
        new.write(off, &w).map_err(io)?;
        off += w.len() as u32;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_previous_map_is_carried_or_dropped_with_a_reason() {
        let suffix = format!("_v{PREVIOUS}");
        let mut olds: Vec<&str> = CARRIED.iter().map(|c| c.old).chain(NOT_CARRIED.iter().map(|(n, _)| *n)).collect();
        assert!(olds.iter().all(|n| n.ends_with(&suffix)), "{olds:?}");
        olds.sort_unstable();
        olds.dedup();
        assert_eq!(olds.len(), map_names::ALL.len(), "a map of v{PREVIOUS} is neither carried nor dropped");
        for (name, prefix) in map_names::ALL.iter().zip(map_names::PREFIXES) {
            let c = CARRIED.iter().find(|c| c.new == *name);
            let old = format!("{prefix}{PREVIOUS}");
            assert!(olds.contains(&old.as_str()), "{old}");
            if let Some(c) = c {
                assert_eq!(c.old, old, "{name} is carried from a map of another kind");
            }
        }
    }

    #[test]
    fn v5_conntrack_keeps_every_field() {
        let v = v5::CtValue4 {
            nat_addr_be: 1,
            nat_port_be: 2,
            dir: 3,
            flags: 4,
            svc_id: 5,
            backend_id: 6,
            slot: 7,
            seen: 8,
            epoch: 9,
        };
        let n = v5::conntrack(v);
        assert_eq!(
            (n.nat_addr_be, n.nat_port_be, n.dir, n.flags, n.svc_id, n.backend_id, n.slot, n.seen, n.epoch, n.created),
            (1, 2, 3, 4, 5, 6, 7, 8, 9, 0)
        );
    }

    #[test]
    fn versions_come_from_map_names_and_markers() {
        assert_eq!(version_of("lb4_ct_v5"), Some(5));
        assert_eq!(version_of("lb_ids_v12"), Some(12));
        assert_eq!(version_of(&marker_name(7)), Some(7));
        assert_eq!(version_of("links"), None);
        assert_eq!(version_of("lb4_ct_vx"), None);
        assert!(later(10, 9) && !later(9, 9) && later(3, u32::MAX - 2));
    }
}
