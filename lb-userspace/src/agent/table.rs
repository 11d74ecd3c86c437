//! Per-service lookup tables: the datapath picks a new flow's backend with one array
//! read, `table[hash::bucket(flow_hash, size)]`, whatever the number of backends
//! (Katran and Cilium index a Maglev table the same way).
//!
//! Maglev's tables are a pure function of the backend set, but removing one of N
//! backends moves a few percent of the flows beyond the removed backend's 1/N
//! (measured here: +4 to 7 % at N = 10 and 100, whatever the table size), and a table
//! whose size follows N moves nearly every flow when the size changes. So tables are
//! kept and changed in place instead, as Katran's shadow state is:
//! - a new table deals its buckets round-robin over the backends in a hashed order:
//!   every backend gets `size / N` or one more;
//! - on a change, the buckets of backends that left, and the surplus of backends over
//!   their new share, are dealt to the backends under theirs (the new ones first), so
//!   that removing one backend moves exactly its own buckets (1/N of the flows) and
//!   adding one moves exactly its new share (1/(N+1)), and every backend still has
//!   `size / N` buckets or one more;
//! - the size stays while N stays within a factor of it ([`fits`]), so no single
//!   change of N resizes; a resize (a new table) happens only after N has grown past
//!   `size / MIN_PER_BACKEND` or shrunk below `size / MAX_PER_BACKEND`.
//!
//! Tables live in the pinned `TABLES` map, so an agent restart reads them back and
//! goes on from there. Two nodes may hold different tables for one Service (their
//! agents saw different histories); each flow is balanced by its client's node only,
//! so they need not agree.

use std::collections::{HashMap, HashSet};

use lb_common::hash;

/// A backend as tables name it: (address, port), network byte order.
pub type Addr = (u32, u16);

/// The smallest table: small services share no table, and a prime size keeps the
/// multiply-shift bucket function as even as the hash for any pattern of flows.
pub const MIN_SIZE: u32 = 251;
/// Buckets per backend in a new table.
pub const BUCKETS_PER_BACKEND: u32 = 64;
/// Fewer buckets per backend than this and the table is rebuilt larger: with `b`
/// buckets each, a backend's share is off by at most 1/b of itself.
pub const MIN_PER_BACKEND: u32 = 32;
/// More than this (and above [`MIN_SIZE`]) and the table is rebuilt smaller, to give
/// back the memory.
pub const MAX_PER_BACKEND: u32 = 1024;

/// Seed of the bucket order a new table deals in.
const SEED: u32 = 0x7462_6c31; // "tbl1"

fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d: &u64| d * d <= u64::from(n)).all(|d| u64::from(n) % d != 0)
}

/// Size of a new table for `n` backends: the first prime from
/// `max(MIN_SIZE, BUCKETS_PER_BACKEND * n)`.
pub fn size_for(n: usize) -> u32 {
    let mut m = (n as u32).saturating_mul(BUCKETS_PER_BACKEND).max(MIN_SIZE);
    while !is_prime(m) {
        m += 1;
    }
    m
}

/// Whether a table of `size` buckets may keep serving `n` backends.
pub fn fits(size: u32, n: usize) -> bool {
    let n = n as u64;
    let size64 = u64::from(size);
    n > 0 && size64 >= n * u64::from(MIN_PER_BACKEND) && (size64 <= n * u64::from(MAX_PER_BACKEND) || size <= MIN_SIZE)
}

/// One service's table: the backend of each bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub buckets: Vec<Addr>,
}

impl Table {
    pub fn size(&self) -> u32 {
        self.buckets.len() as u32
    }

    /// A new table for `backends` (duplicates count once); empty without backends.
    pub fn build(backends: &[Addr]) -> Table {
        let mut set: Vec<Addr> = backends.to_vec();
        set.sort_unstable();
        set.dedup();
        if set.is_empty() {
            return Table::default();
        }
        let size = size_for(set.len());
        let mut buckets = vec![set[0]; size as usize];
        for (i, b) in dealing_order(0..size).into_iter().enumerate() {
            buckets[b as usize] = set[i % set.len()];
        }
        Table { buckets }
    }

    /// The table for `backends` next: this one changed as little as balance allows, or
    /// a new one if the size no longer fits.
    pub fn update(&self, backends: &[Addr]) -> Table {
        let mut set: Vec<Addr> = backends.to_vec();
        set.sort_unstable();
        set.dedup();
        let n = set.len();
        if self.buckets.is_empty() || !fits(self.size(), n) {
            return Table::build(&set);
        }
        let size = self.buckets.len();
        let want: HashSet<Addr> = set.iter().copied().collect();
        // Buckets by backend, in the order they were dealt to it.
        let mut held: HashMap<Addr, Vec<u32>> = set.iter().map(|a| (*a, Vec::new())).collect();
        let mut free: Vec<u32> = Vec::new();
        for (b, a) in self.buckets.iter().enumerate() {
            match held.get_mut(a) {
                Some(v) if want.contains(a) => v.push(b as u32),
                _ => free.push(b as u32),
            }
        }
        // Shares: size / n each, and one more for the `size % n` backends that hold
        // the most now (ties to the lower address), so that as few buckets move as
        // possible.
        let (q, r) = (size / n, size % n);
        let mut by_load: Vec<Addr> = set.clone();
        by_load.sort_by(|a, b| held[b].len().cmp(&held[a].len()).then(a.cmp(b)));
        let share: HashMap<Addr, usize> =
            by_load.iter().enumerate().map(|(i, a)| (*a, q + usize::from(i < r))).collect();
        // Surplus over the share goes back, the most recently dealt buckets first.
        for a in &set {
            let v = held.get_mut(a).expect("every backend of the set has an entry");
            while v.len() > share[a] {
                free.extend(v.pop());
            }
        }
        // Deal the free buckets, in hashed order, to the backends under their share.
        let mut buckets = self.buckets.clone();
        let mut needy: Vec<(Addr, usize)> =
            set.iter().filter(|a| held[*a].len() < share[*a]).map(|a| (*a, share[a] - held[a].len())).collect();
        let mut i = 0;
        for b in dealing_order(free) {
            while needy[i % needy.len()].1 == 0 {
                i += 1;
            }
            let k = i % needy.len();
            buckets[b as usize] = needy[k].0;
            needy[k].1 -= 1;
            i += 1;
        }
        Table { buckets }
    }

    /// Buckets per backend.
    pub fn loads(&self) -> HashMap<Addr, usize> {
        let mut m = HashMap::new();
        for a in &self.buckets {
            *m.entry(*a).or_default() += 1;
        }
        m
    }

    /// The backend the datapath picks for a flow of hash `flow`.
    pub fn pick(&self, flow: u32) -> Option<Addr> {
        self.buckets.get(hash::bucket(flow, self.size()) as usize).copied()
    }

    /// The table as `TABLES` words: bucket `b` is lane `b % 4` (bits 16·lane..) of word
    /// `b / 4`, holding the slot of its backend in `slot_of`. `None` if a backend has
    /// no slot or a slot does not fit in 16 bits.
    pub fn words(&self, slot_of: &HashMap<Addr, u32>) -> Option<Vec<u64>> {
        let mut words = vec![0u64; self.buckets.len().div_ceil(lb_common::TABLE_LANES as usize)];
        for (b, a) in self.buckets.iter().enumerate() {
            let slot = u16::try_from(*slot_of.get(a)?).ok()?;
            words[b / 4] |= u64::from(slot) << (16 * (b % 4));
        }
        Some(words)
    }

    /// The table `words` (of `size` buckets) hold, with `backend_at` naming the backend
    /// in each slot; `None` if a bucket names an empty slot.
    pub fn from_words(words: &[u64], size: u32, backend_at: impl Fn(u32) -> Option<Addr>) -> Option<Table> {
        let buckets = (0..size as usize)
            .map(|b| {
                let slot = (words.get(b / 4)? >> (16 * (b % 4))) as u16;
                backend_at(u32::from(slot))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Table { buckets })
    }
}

/// `buckets` sorted by a hash of their index: dealt in this order, consecutive
/// buckets (neighbouring ranges of the flow hash) go to unrelated backends.
fn dealing_order(buckets: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut v: Vec<u32> = buckets.into_iter().collect();
    v.sort_unstable_by_key(|b| (hash::fmix32(b ^ SEED), *b));
    v
}

#[cfg(test)]
mod tests;
