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

use std::{collections::HashSet, path::Path, time::Instant};

use aya::maps::{HashMap as BpfHashMap, MapData};
use lb_common::{CT_DIR_FORWARD, CtKey4, CtValue4, map_names};

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
}

/// Now in conntrack ticks (`lb_common::ct_tick` of CLOCK_MONOTONIC), the datapath's
/// clock for `CtValue4::seen`.
pub fn now_tick() -> u32 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    lb_common::ct_tick(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
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
    // Keys first: deleting while the kernel iterates would restart the walk.
    let entries: Vec<(CtKey4, CtValue4)> = ct.iter().filter_map(Result::ok).collect();
    pass.entries = entries.len();
    let mut dead = Vec::new();
    for (k, v) in &entries {
        if v.expired(k.proto, now) {
            dead.push(*k);
            // The other half goes with it; it carries the same state and was refreshed
            // with it, so it is expired too (or already gone).
            dead.push(v.other_half(k).0);
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
    fn the_clock_is_the_monotonic_one() {
        let a = lb_common::ct_ticks_to_s(now_tick());
        let up: f64 = std::fs::read_to_string("/proc/uptime").unwrap().split(' ').next().unwrap().parse().unwrap();
        // CLOCK_MONOTONIC and /proc/uptime (CLOCK_BOOTTIME) differ by time spent
        // suspended, which a test machine has little of.
        assert!((a as f64) <= up + 2.0, "{a} vs uptime {up}");
    }
}
