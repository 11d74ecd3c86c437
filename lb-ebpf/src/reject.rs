//! The "no ready backend" answer: ICMP destination unreachable, port unreachable
//! (RFC 792), quoting the offending IPv4 header and the first 8 bytes of its payload.
//! Linux turns this into ECONNREFUSED for TCP and UDP sockets alike
//! (<https://github.com/torvalds/linux/blob/v6.18/net/ipv4/icmp.c>, `icmp_err_convert`),
//! which is what a client of kube-proxy's REJECT rule sees.

use crate::{
    csum::fold_sum,
    parse::{IPPROTO_ICMP, Ipv4Hdr},
};

/// Largest quote: a 60-byte IPv4 header plus 8 bytes of L4.
pub const MAX_QUOTE: usize = 68;
/// What is inserted between the L2 header and the quote.
pub const REJECT_HDRS: usize = core::mem::size_of::<RejectHdrs>();

#[repr(C)]
pub struct RejectHdrs {
    pub ip: Ipv4Hdr,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub icmp_check: u16,
    pub unused: u32,
}
const _: () = assert!(REJECT_HDRS == 28);

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

#[inline(always)]
fn sum_words(bytes: *const u8, len: usize) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < MAX_QUOTE / 4 {
        if i * 4 >= len {
            break;
        }
        sum += unsafe { (bytes.add(i * 4) as *const u32).read_unaligned() } as u64;
        i += 1;
    }
    sum
}

/// The new IPv4 and ICMP headers, from the ClusterIP to the client, checksums filled in.
/// `quote` holds `quote_len` bytes (a multiple of 4) of the original packet from its
/// IPv4 header on.
#[inline(always)]
pub fn build(vip_be: u32, client_be: u32, quote: &[u8; MAX_QUOTE], quote_len: usize) -> RejectHdrs {
    let tot_len = (REJECT_HDRS + quote_len) as u16;
    let mut h = RejectHdrs {
        ip: Ipv4Hdr {
            ver_ihl: 0x45,
            // Precedence "internetwork control", as the kernel's own ICMP errors.
            tos: 0xc0,
            tot_len_be: tot_len.to_be(),
            id_be: 0,
            frag_off_be: 0,
            ttl: 64,
            proto: IPPROTO_ICMP,
            check: 0,
            saddr_be: vip_be,
            daddr_be: client_be,
        },
        icmp_type: ICMP_DEST_UNREACH,
        icmp_code: ICMP_PORT_UNREACH,
        icmp_check: 0,
        unused: 0,
    };
    let ip_sum = sum_words(&h.ip as *const Ipv4Hdr as *const u8, 20);
    h.ip.check = !fold_sum(ip_sum);
    let icmp_sum =
        u16::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_PORT_UNREACH]) as u64 + sum_words(quote.as_ptr(), quote_len);
    h.icmp_check = !fold_sum(icmp_sum);
    h
}
