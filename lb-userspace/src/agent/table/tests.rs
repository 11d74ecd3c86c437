use super::*;

fn backends(n: u32) -> Vec<Addr> {
    (0..n).map(|i| (u32::from_be_bytes([10, 244, (i >> 8) as u8, i as u8]).to_be(), 8080u16.to_be())).collect()
}

/// 10,000 flows from distinct clients to one ClusterIP, as a node sees them.
fn flows() -> Vec<u32> {
    let vip = u32::from_be_bytes([10, 96, 0, 10]).to_be();
    (0..10_000u32)
        .map(|i| {
            let client = u32::from_be_bytes([10, (i >> 16) as u8 + 1, (i >> 8) as u8, i as u8]).to_be();
            hash::flow_hash(client, vip, (40_000 + (i % 20_000) as u16).to_be(), 80u16.to_be(), 6)
        })
        .collect()
}

/// Chi-square critical value at p = 0.01 for `df` degrees of freedom (Wilson-Hilferty).
fn chi2_p01(df: usize) -> f64 {
    let k = df as f64;
    let z = 2.326_348; // the normal quantile at 0.99
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

#[test]
fn spread_passes_chi_square_p001_at_10_100_1000_backends() {
    let flows = flows();
    for n in [2u32, 10, 100, 1000] {
        let t = Table::build(&backends(n));
        let mut counts: HashMap<Addr, u32> = HashMap::new();
        for f in &flows {
            *counts.entry(t.pick(*f).unwrap()).or_default() += 1;
        }
        let expected = flows.len() as f64 / f64::from(n);
        let chi2: f64 = backends(n)
            .iter()
            .map(|b| (f64::from(counts.get(b).copied().unwrap_or(0)) - expected).powi(2) / expected)
            .sum();
        let crit = chi2_p01(n as usize - 1);
        assert!(chi2 < crit, "n={n}: chi2 {chi2:.1} >= {crit:.1}");
    }
}

fn moved(a: &Table, b: &Table, flows: &[u32]) -> f64 {
    flows.iter().filter(|f| a.pick(**f) != b.pick(**f)).count() as f64 / flows.len() as f64
}

fn balanced(t: &Table, n: usize) {
    let loads = t.loads();
    assert_eq!(loads.len(), n, "every backend has buckets");
    let (lo, hi) = (loads.values().min().unwrap(), loads.values().max().unwrap());
    assert!(hi - lo <= 1, "loads {lo}..{hi}");
}

#[test]
fn removing_one_of_n_moves_its_flows_only_and_adding_one_moves_its_share() {
    let flows = flows();
    for n in [10u32, 100, 1000] {
        let be = backends(n);
        let t = Table::build(&be);
        balanced(&t, n as usize);
        for removed in [0usize, n as usize / 2, n as usize - 1] {
            let mut left = be.clone();
            left.remove(removed);
            let u = t.update(&left);
            assert_eq!(u.size(), t.size(), "n={n}: one removal never resizes");
            balanced(&u, n as usize - 1);
            // Exactly the removed backend's buckets changed hands.
            let changed = t.buckets.iter().zip(&u.buckets).filter(|(a, b)| a != b).count();
            assert_eq!(changed, t.loads()[&be[removed]], "n={n}");
            let m = moved(&t, &u, &flows);
            assert!(m <= 1.0 / f64::from(n) + 0.01, "n={n}: removing one moved {m:.4}");
        }
        let mut more = be.clone();
        more.push((u32::from_be_bytes([10, 245, 0, 1]).to_be(), 8080u16.to_be()));
        let u = t.update(&more);
        assert_eq!(u.size(), t.size());
        balanced(&u, n as usize + 1);
        let changed = t.buckets.iter().zip(&u.buckets).filter(|(a, b)| a != b).count();
        assert_eq!(changed, u.loads()[&more[n as usize]], "n={n}: only the new backend's buckets change");
        let m = moved(&t, &u, &flows);
        assert!(m <= 1.0 / f64::from(n + 1) + 0.01, "n={n}: adding one moved {m:.4}");
    }
}

#[test]
fn sizes_hold_while_n_stays_within_a_factor_and_resize_beyond() {
    assert_eq!(size_for(1), MIN_SIZE);
    assert_eq!(size_for(10), 641);
    assert!(size_for(8192) >= 8192 * BUCKETS_PER_BACKEND);
    let mut t = Table::build(&backends(10));
    // Grow one at a time: the size changes only once the table is too small.
    let mut resizes = 0;
    for n in 11..=100 {
        let u = t.update(&backends(n));
        if u.size() != t.size() {
            resizes += 1;
            assert!(!fits(t.size(), n as usize));
        }
        balanced(&u, n as usize);
        t = u;
    }
    // 641 buckets serve up to 20 backends (32 each); the rebuilt tables are sized for
    // 64 each, so N must double again before the next: at n = 21, 43 and 86.
    assert_eq!(resizes, 3);
    // Down to one: shrinks once far below.
    for n in (1..100).rev() {
        t = t.update(&backends(n));
        balanced(&t, n as usize);
    }
    assert!(t.size() <= MAX_PER_BACKEND && fits(t.size(), 1), "shrunk to {}", t.size());
    assert!(t.update(&[]).buckets.is_empty());
}

#[test]
fn a_new_table_depends_on_the_set_only() {
    let mut be = backends(37);
    let t = Table::build(&be);
    be.reverse();
    be.push(be[3]);
    assert_eq!(Table::build(&be), t);
}

#[test]
fn words_pack_slots_in_lanes_and_read_back() {
    let be = backends(5);
    let t = Table::build(&be);
    let slot_of: HashMap<Addr, u32> = be.iter().enumerate().map(|(i, a)| (*a, i as u32 + 1)).collect();
    let words = t.words(&slot_of).unwrap();
    assert_eq!(words.len(), (t.size() as usize).div_ceil(4));
    for (b, a) in t.buckets.iter().enumerate() {
        assert_eq!((words[b / 4] >> (16 * (b % 4))) as u16 as u32, slot_of[a]);
    }
    let back = Table::from_words(&words, t.size(), |s| be.get(s as usize - 1).copied()).unwrap();
    assert_eq!(back, t);
    // A bucket naming an empty slot is no table.
    assert!(Table::from_words(&words, t.size(), |s| (s != 3).then(|| be[s as usize - 1])).is_none());
    // A backend without a slot cannot be written.
    let mut partial = slot_of.clone();
    partial.remove(&be[0]);
    assert!(t.words(&partial).is_none());
}
