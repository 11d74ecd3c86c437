//! Flow hashing, shared by the datapath and by host-side tests and tools.
//!
//! A new flow's backend is the one its bucket names in the service's lookup table:
//! `table[bucket(flow_hash(5-tuple), size)]` (the agent builds the tables, see
//! lb-userspace/src/agent/table.rs). The hash keys on the 5-tuple only, so the choice
//! of a flow is the same on every packet and after a conntrack entry is lost, for as
//! long as the table is unchanged.
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

/// Hash of a flow's 5-tuple: its bucket in the service's lookup table ([`bucket`]). With
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

/// The bucket of a flow in a lookup table of `size` buckets: `flow * size / 2^32`
/// (Lemire's multiply-shift range reduction), a multiplication rather than a division
/// on every new flow, and as even as the hash.
#[inline(always)]
pub const fn bucket(flow: u32, size: u32) -> u32 {
    ((flow as u64 * size as u64) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_sensitive_to_every_field() {
        let base = flow_hash(1, 2, 3, 4, 6);
        assert_ne!(base, flow_hash(5, 2, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 5, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 5, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 5, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 4, 17));
        assert_ne!(flow_hash(1, 2, 3, 4, 6), flow_hash(2, 1, 4, 3, 6));
    }

    #[test]
    fn buckets_cover_the_table_evenly() {
        assert_eq!((bucket(0, 251), bucket(u32::MAX, 251)), (0, 250));
        let mut counts = [0u32; 7];
        for i in 0..70_000u32 {
            counts[bucket(fmix32(i), 7) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (9_500..10_500).contains(c)), "{counts:?}");
    }
}
