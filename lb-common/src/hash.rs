//! Backend selection hashing, shared by the datapath and by host-side tests and tools.
//!
//! New flows pick a backend by rendezvous (highest-random-weight) hashing: every backend
//! of the service gets the score `hrw_score(flow, backend)` and the highest wins.
//! Removing one backend of N moves exactly the flows that were on it (1/N of them) and
//! nothing else; adding one takes 1/(N+1) evenly from the others. Unlike a Maglev table,
//! it needs no per-service lookup table (N slots, not ~100·N), so 10,000 services of
//! 10 endpoints stay a 100,000-entry map that the agent writes in well under a second.
//! The price is O(N) work on a *new* flow only; established flows hit conntrack.
//!
//! The score keys on the backend's address and port, not on the agent's backend id, so
//! every node (and every agent restart) sends the same flow to the same pod.
//!
//! The mixing is MurmurHash3's x86_32 body and finaliser over 32-bit words
//! (<https://github.com/aappleby/smhasher/blob/master/src/MurmurHash3.cpp>).

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;
/// Fixed seed: the choice must agree across nodes and restarts.
const SEED: u32 = 0x6c62_2d31; // "lb-1"

#[inline(always)]
const fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// MurmurHash3's `fmix32` finaliser: every input bit affects every output bit.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
const fn finish(h: u32, words: u32) -> u32 {
    fmix32(h ^ (words * 4))
}

/// Hash of a flow's 5-tuple: the input to rendezvous hashing for every new flow. With
/// ClientIP affinity it picks the backend a client is then pinned to.
#[inline(always)]
pub const fn flow_hash(src_addr_be: u32, dst_addr_be: u32, src_port_be: u16, dst_port_be: u16, proto: u8) -> u32 {
    let ports = ((src_port_be as u32) << 16) | dst_port_be as u32;
    let mut h = mix(SEED, src_addr_be);
    h = mix(h, dst_addr_be);
    h = mix(h, ports);
    h = mix(h, proto as u32);
    finish(h, 4)
}

/// Rendezvous score of one backend for one flow hash. The highest score wins; ties go
/// to the lower slot.
#[inline(always)]
pub const fn hrw_score(flow: u32, backend_addr_be: u32, backend_port_be: u16) -> u32 {
    let mut h = mix(SEED, flow);
    h = mix(h, backend_addr_be);
    h = mix(h, backend_port_be as u32);
    finish(h, 3)
}

/// Host-side reference of the datapath's choice: the index into `backends` of the
/// winner, or `None` when there are none. `backends` are (addr_be, port_be) in slot
/// order.
pub fn pick(flow: u32, backends: &[(u32, u16)]) -> Option<usize> {
    let mut best: Option<(usize, u32)> = None;
    for (i, &(addr, port)) in backends.iter().enumerate() {
        let s = hrw_score(flow, addr, port);
        match best {
            Some((_, b)) if b >= s => {}
            _ => best = Some((i, s)),
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn backends(n: u32) -> Vec<(u32, u16)> {
        (0..n).map(|i| (u32::from_be_bytes([10, 244, 1, 10 + i as u8]).to_be(), 8080u16.to_be())).collect()
    }

    fn client(i: u32) -> u32 {
        // 10,000 distinct synthetic clients spread over 10.0.0.0/8.
        u32::from_be_bytes([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]).to_be()
    }

    /// Chi-square critical values at p = 0.01 for df = 1..=15.
    const CHI2_P01: [f64; 15] = [
        6.635, 9.210, 11.345, 13.277, 15.086, 16.812, 18.475, 20.090, 21.666, 23.209, 24.725, 26.217, 27.688, 29.141,
        30.578,
    ];

    fn chi_square(counts: &[u32], total: u32) -> f64 {
        let expected = total as f64 / counts.len() as f64;
        counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum()
    }

    #[test]
    fn spread_over_backends_is_even_chi_square_p001() {
        let vip = u32::from_be_bytes([10, 96, 0, 10]).to_be();
        for n in [2u32, 3, 5, 10, 16] {
            let be = backends(n);
            // 10,000 clients each with one connection, and one client with 10,000 ports.
            let mut by_client = std::vec![0u32; n as usize];
            let mut by_port = std::vec![0u32; n as usize];
            for i in 0..10_000 {
                let f = flow_hash(client(i), vip, 40_000u16.to_be(), 80u16.to_be(), 6);
                by_client[pick(f, &be).unwrap()] += 1;
                let f = flow_hash(client(7), vip, (30_000 + i as u16).to_be(), 80u16.to_be(), 6);
                by_port[pick(f, &be).unwrap()] += 1;
            }
            let crit = CHI2_P01[n as usize - 2];
            let (x1, x2) = (chi_square(&by_client, 10_000), chi_square(&by_port, 10_000));
            assert!(x1 < crit, "n={n}: client spread {by_client:?} chi2={x1:.2} >= {crit}");
            assert!(x2 < crit, "n={n}: port spread {by_port:?} chi2={x2:.2} >= {crit}");
        }
    }

    #[test]
    fn removing_one_backend_moves_only_its_clients() {
        let vip = u32::from_be_bytes([10, 96, 0, 10]).to_be();
        for n in [2u32, 4, 10, 50] {
            let be = backends(n);
            let before: Vec<(u32, u16)> = (0..10_000)
                .map(|i| be[pick(flow_hash(client(i), vip, 1u16.to_be(), 80u16.to_be(), 6), &be).unwrap()])
                .collect();
            for removed in [0usize, (n / 2) as usize, n as usize - 1] {
                let mut left = be.clone();
                left.remove(removed);
                let moved = (0..10_000)
                    .filter(|&i| {
                        let now = left[pick(flow_hash(client(i), vip, 1u16.to_be(), 80u16.to_be(), 6), &left).unwrap()];
                        now != before[i as usize]
                    })
                    .count();
                let on_removed = before.iter().filter(|&&b| b == be[removed]).count();
                // Exactly the removed backend's clients move, and they are about 1/N.
                assert_eq!(moved, on_removed, "n={n} removed={removed}");
                let share = moved as f64 / 10_000.0;
                assert!(share < 1.5 / n as f64, "n={n}: {share} of clients moved");
            }
        }
    }

    #[test]
    fn slot_order_does_not_change_the_choice() {
        let mut be = backends(7);
        let flows: Vec<u32> = (0..1000).map(|i| flow_hash(client(i), 1, 2, 3, 17)).collect();
        let chosen: Vec<_> = flows.iter().map(|&f| be[pick(f, &be).unwrap()]).collect();
        be.reverse();
        let again: Vec<_> = flows.iter().map(|&f| be[pick(f, &be).unwrap()]).collect();
        assert_eq!(chosen, again);
    }

    #[test]
    fn hashes_are_sensitive_to_every_field() {
        let base = flow_hash(1, 2, 3, 4, 6);
        assert_ne!(base, flow_hash(5, 2, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 5, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 5, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 5, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 4, 17));
        assert_ne!(flow_hash(1, 2, 3, 4, 6), flow_hash(2, 1, 4, 3, 6));
        assert_eq!(pick(base, &[]), None);
    }
}
