//! The conntrack collector: deletes flows past their timeout (both halves together)
//! and reports which (service id, backend id) pairs live flows still use, so that the
//! syncer can release the draining entries of deleted Services nothing uses any more
//! ([`super::sync::Syncer::release_orphans`]).
//!
//! The datapath checks expiry on every lookup (`CtValue4::expired`), so correctness
//! does not wait for the collector: it frees the LRU's room early, keeps `lb services`
//! and the metrics about live flows only, and ends orphans. netfilter's conntrack has
//! the same split (a timeout per entry, checked on lookup, and a GC worker:
//! net/netfilter/nf_conntrack_core.c, `gc_worker`).

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Instant,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use lb_common::{AffinityKey4, AffinityValue, CT_DIR_FORWARD, CtKey4, CtValue4, map_names};

/// One pass of the collector.
#[derive(Clone, Debug, Default)]
pub struct GcPass {
    /// Entries seen (both halves of every flow, plus lone halves).
    pub entries: usize,
    /// Flows deleted as expired.
    pub expired_flows: usize,
    /// Live flows (forward halves not expired) that are still open: no RST, not both
    /// FINs.
    pub open_flows: usize,
    /// (service id, backend id) of every live forward half.
    pub live: HashSet<(u32, u32)>,
    pub took_us: u64,
    /// The fill of the two LRU maps the datapath writes on new flows, from
    /// [`Fill::measure`]; absent when the maps could not be read.
    pub fill: Option<MapFill>,
}

/// Entries and capacity of the conntrack and affinity LRUs. The kernel counts no LRU
/// evictions (an insert into a full LRU hash map evicts and succeeds,
/// kernel/bpf/hashtab.c, `prealloc_lru_pop`), so a table at capacity is the agent's
/// sign that the datapath is evicting; `ct_midflow_miss`, `ct_recovered` and
/// `affinity_miss` count what the evictions cost (docs/reliability.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapFill {
    pub ct_entries: usize,
    pub ct_capacity: u32,
    pub affinity_entries: usize,
    pub affinity_capacity: u32,
}

/// Reads [`MapFill`] beside the collector's walk: the affinity map's keys are counted
/// (one syscall per entry, as the conntrack walk costs two), the capacities are the
/// maps' `max_entries`.
pub struct Fill {
    affinity: BpfHashMap<MapData, AffinityKey4, AffinityValue>,
    ct_capacity: u32,
    affinity_capacity: u32,
}

impl Fill {
    /// The pinned maps under `bpffs`.
    pub fn open(bpffs: &Path) -> Result<Self, GcError> {
        let open = |name: &str| {
            let path = bpffs.join(name);
            MapData::from_pin(&path).map_err(|source| GcError::Open { path, source })
        };
        let max = |m: &MapData| m.info().map(|i| i.max_entries()).unwrap_or(0);
        let ct_capacity = max(&open(map_names::CONNTRACK)?);
        let aff = open(map_names::AFFINITY)?;
        let affinity_capacity = max(&aff);
        let affinity = BpfHashMap::try_from(aya::maps::Map::LruHashMap(aff))
            .map_err(|source| GcError::Open { path: bpffs.join(map_names::AFFINITY), source })?;
        Ok(Self { affinity, ct_capacity, affinity_capacity })
    }

    /// Sets `pass.fill`: the conntrack entries the walk saw, the affinity entries now.
    pub fn measure(&self, pass: &mut GcPass) {
        pass.fill = Some(MapFill {
            ct_entries: pass.entries,
            ct_capacity: self.ct_capacity,
            affinity_entries: self.affinity.keys().filter(Result::is_ok).count(),
            affinity_capacity: self.affinity_capacity,
        });
    }
}

/// The kernel's jiffies clock as userspace can follow it: HZ, and one (jiffies,
/// CLOCK_MONOTONIC) pair read together from /proc/timer_list, from which jiffies at any
/// later time follow (the kernel advances jiffies from the same timekeeping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JiffyClock {
    pub hz: u32,
    jiffies0: u64,
    mono0_ns: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("reading /proc/timer_list (the kernel's jiffies and HZ; the agent must run as root)")]
    Read(#[source] std::io::Error),
    #[error(
        "/proc/timer_list has no `now at` or `jiffies:` line (a container runtime masks it in an \
         unprivileged container: give the agent the host's /proc with --proc-dir)"
    )]
    Format,
    #[error("cannot tell the kernel's HZ from jiffies {jiffies} at {mono_s} s of uptime")]
    Hz { jiffies: u64, mono_s: u64 },
}

/// HZ values Linux can be built with (kernel/Kconfig.hz), most common first.
const HZ_CHOICES: [u32; 6] = [250, 1000, 100, 300, 24, 48];

impl JiffyClock {
    /// From the text of /proc/timer_list.
    ///
    /// HZ is the one that explains the jiffies count: on 64-bit kernels jiffies start
    /// at `INITIAL_JIFFIES` = 2^32 - 300·HZ (include/linux/jiffies.h) and advance HZ a
    /// second, so jiffies − INITIAL_JIFFIES matches the uptime (CLOCK_MONOTONIC, the
    /// `now at` line) for the true HZ only, and misses it by hours for any other.
    pub fn parse(timer_list: &str) -> Result<Self, ClockError> {
        let mono0_ns: u64 = timer_list
            .lines()
            .find_map(|l| l.strip_prefix("now at ")?.strip_suffix(" nsecs")?.trim().parse().ok())
            .ok_or(ClockError::Format)?;
        let jiffies0: u64 = timer_list
            .lines()
            .find_map(|l| l.strip_prefix("jiffies:")?.trim().parse().ok())
            .ok_or(ClockError::Format)?;
        let mono_s = mono0_ns as f64 / 1e9;
        let err = |hz: u32| {
            let initial = (1u64 << 32) - 300 * u64::from(hz);
            (jiffies0 as f64 - initial as f64 - mono_s * f64::from(hz)).abs() / f64::from(hz)
        };
        let hz = HZ_CHOICES
            .into_iter()
            .min_by(|a, b| err(*a).total_cmp(&err(*b)))
            .filter(|hz| err(*hz) < 120.0)
            .ok_or(ClockError::Hz { jiffies: jiffies0, mono_s: mono_s as u64 })?;
        Ok(Self { hz, jiffies0, mono0_ns })
    }

    /// Reads /proc/timer_list.
    pub fn read() -> Result<Self, ClockError> {
        Self::read_from(Path::new("/proc"))
    }

    /// Reads `<proc_dir>/timer_list`.
    pub fn read_from(proc_dir: &Path) -> Result<Self, ClockError> {
        Self::parse(&std::fs::read_to_string(proc_dir.join("timer_list")).map_err(ClockError::Read)?)
    }

    /// What `IdState::jiffy_recip` must hold.
    pub fn recip(&self) -> u32 {
        lb_common::jiffy_recip(self.hz)
    }

    /// jiffies at CLOCK_MONOTONIC `mono_ns`.
    pub fn jiffies_at(&self, mono_ns: u64) -> u64 {
        let d = i128::from(mono_ns) - i128::from(self.mono0_ns);
        (i128::from(self.jiffies0) + d * i128::from(self.hz) / 1_000_000_000) as u64
    }

    /// Now, in the datapath's conntrack ticks.
    pub fn now_tick(&self) -> u32 {
        lb_common::ct_tick(self.jiffies_at(crate::datapath::monotonic_ns()), self.recip())
    }
}

static CLOCK: std::sync::OnceLock<Result<JiffyClock, String>> = std::sync::OnceLock::new();

/// Reads the clock from `<proc_dir>/timer_list`, once per process, before anything
/// asks [`clock`]: the agent's `--proc-dir`. An unprivileged container's runtime masks
/// its own `/proc/timer_list` (runc's default `maskedPaths` bind /dev/null over it),
/// while the host's proc mounted elsewhere (`/host/proc`) shows it.
pub fn init_clock(proc_dir: &Path) -> Result<JiffyClock, String> {
    CLOCK.get_or_init(|| JiffyClock::read_from(proc_dir).map_err(|e| super::chain(&e))).clone()
}

/// The clock, read once per process: from `$LB_PROC_DIR/timer_list` if that is set
/// (the DaemonSet sets it, so `kubectl exec ... lb conntrack` reads the host's), else
/// /proc/timer_list.
pub fn clock() -> Result<JiffyClock, String> {
    let dir = std::env::var_os("LB_PROC_DIR").map_or_else(|| PathBuf::from("/proc"), PathBuf::from);
    init_clock(&dir)
}

/// Now in conntrack ticks (`lb_common::ct_tick`), the datapath's clock for
/// `CtValue4::seen`; 0 if the kernel's clock cannot be read (the agent refuses to
/// start then, see `run`).
pub fn now_tick() -> u32 {
    clock().map_or(0, |c| c.now_tick())
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("opening the pinned conntrack map {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The pinned conntrack map under `bpffs`.
pub fn open(bpffs: &Path) -> Result<BpfHashMap<MapData, CtKey4, CtValue4>, GcError> {
    let path = bpffs.join(map_names::CONNTRACK);
    let err = |source| GcError::Open { path: path.clone(), source };
    let data = MapData::from_pin(&path).map_err(err)?;
    BpfHashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(err)
}

/// Walks the table once at tick `now`.
pub fn collect(ct: &mut BpfHashMap<MapData, CtKey4, CtValue4>, now: u32) -> GcPass {
    let t0 = Instant::now();
    let mut pass = GcPass::default();
    // The walk first, deletions after: deleting while the kernel iterates would restart
    // it. Only the dead keys are kept, not the table: a copy of every entry made the
    // agent's heap grow with the table (117 bytes per entry, 30 MB for a full default
    // table), which is what the soak's RSS followed while the table filled.
    let mut dead = Vec::new();
    for (k, v) in ct.iter().filter_map(Result::ok) {
        pass.entries += 1;
        if v.expired(k.proto, now) {
            dead.push(k);
            // The other half goes with it; it carries the same state and was refreshed
            // with it, so it is expired too (or already gone).
            dead.push(v.other_half(&k).0);
            if v.dir == CT_DIR_FORWARD {
                pass.expired_flows += 1;
            }
        } else if v.dir == CT_DIR_FORWARD {
            pass.live.insert((v.svc_id, v.backend_id));
            if v.open() {
                pass.open_flows += 1;
            }
        }
    }
    for k in dead {
        // A half already gone (evicted, or deleted as its partner) is fine.
        let _ = ct.remove(&k);
    }
    pass.took_us = t0.elapsed().as_micros() as u64;
    pass
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hz_is_the_one_that_explains_the_jiffies() {
        // This machine's /proc/timer_list (HZ 250, 33,334 s up), cut down.
        let text = "Timer List Version: v0.10\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at 33334336106477 nsecs\n\n\
                    cpu: 0\n  .last_jiffies   : 4303225814\njiffies: 4303226463\n";
        let c = JiffyClock::parse(text).unwrap();
        assert_eq!(c.hz, 250);
        assert_eq!(c.jiffies_at(33_334_336_106_477 + 4_000_000_000), 4_303_226_463 + 1000);
        // The same uptime with HZ 1000.
        let j = (1u64 << 32) - 300_000 + 33_334 * 1000;
        let c = JiffyClock::parse(&format!("now at 33334336106477 nsecs\njiffies: {j}\n")).unwrap();
        assert_eq!(c.hz, 1000);
        assert!(matches!(JiffyClock::parse("now at 5 nsecs\njiffies: 7\n"), Err(ClockError::Hz { .. })));
        assert!(matches!(JiffyClock::parse("jiffies: 7\n"), Err(ClockError::Format)));
    }

    #[test]
    fn the_clock_reads_this_kernel() {
        let c = JiffyClock::read().unwrap();
        if let Ok(cfg) = std::fs::read_to_string(format!("/boot/config-{}", uname_release())) {
            assert!(cfg.contains(&format!("\nCONFIG_HZ={}\n", c.hz)), "HZ {} disagrees with the kernel config", c.hz);
        }
        // Followed from the first read, jiffies agree with a fresh one.
        let again = JiffyClock::read().unwrap();
        let drift = c.jiffies_at(again.mono0_ns) as i64 - again.jiffies0 as i64;
        assert!(drift.abs() <= i64::from(c.hz) / 10 + 2, "{drift} jiffies off");
    }

    fn uname_release() -> String {
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim().to_string()
    }
}
