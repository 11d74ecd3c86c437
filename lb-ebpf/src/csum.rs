//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')),
//! for the XDP path, which has no skb and so no kernel checksum helpers.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// `check` is the checksum field as stored in the packet; `old`/`new` the 16-bit words
/// as stored (same byte order on both sides, so none needs swapping).
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + (new as u32);
    !fold(sum)
}

#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let c = replace16(check, old as u16, new as u16);
    replace16(c, (old >> 16) as u16, (new >> 16) as u16)
}

/// Ones'-complement sum of 32-bit words, folded, not inverted.
#[inline(always)]
pub fn fold_sum(sum: u64) -> u16 {
    let mut s = (sum & 0xffff_ffff) + (sum >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    fold(s as u32)
}

/// Rewrites an IPv4 header's addresses, (old, new) each (equal: left alone), keeping
/// its header checksum right. The IPv4 header checksum is always complete, in XDP and
/// tc alike, so RFC 1624 applies.
#[inline(always)]
pub fn ipv4_set_addrs(ip: &mut crate::parse::Ipv4Hdr, saddr: (u32, u32), daddr: (u32, u32)) {
    let mut check = ip.check;
    if saddr.0 != saddr.1 {
        check = replace32(check, saddr.0, saddr.1);
        ip.saddr_be = saddr.1;
    }
    if daddr.0 != daddr.1 {
        check = replace32(check, daddr.0, daddr.1);
        ip.daddr_be = daddr.1;
    }
    ip.check = check;
}
