//! ICMP errors about NATed flows: destination unreachable (fragmentation needed, port
//! unreachable, ...), time exceeded and parameter problem quote the IPv4 header and
//! the first 8 bytes (or more) of the packet they are about. When that packet was
//! NATed by us, the quote names the wrong side of the translation: the client's stack
//! finds no socket for "client -> backend" and ignores a "fragmentation needed", so
//! path-MTU discovery through a ClusterIP fails and large transfers hang.
//!
//! This is netfilter's `nf_nat_icmp_reply_translation`
//! (<https://github.com/torvalds/linux/blob/v6.18/net/netfilter/nf_nat_proto.c>): the
//! quoted header is looked up in conntrack as the reverse of the flow's other half,
//! then translated back to what its sender sent, and the outer header is translated as
//! a packet of that flow in the error's direction would be. All checksums are updated
//! incrementally (RFC 1624) through direct writes, so the same code serves XDP and tc:
//! an ICMP message is never CHECKSUM_PARTIAL (the kernel computes ICMP checksums in
//! full, `icmp_push_reply` in net/ipv4/icmp.c), so no skb checksum helper is needed.
//!
//! Nothing here depends on the hook's direction, so a tc egress entry point can call
//! it too (the node's own ICMP errors leave through the pod interface's egress).

use core::num::NonZeroU32;

use lb_common::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_HAIRPIN, CtKey4, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    csum,
    maps::CONNTRACK,
    parse::{Ipv4Hdr, L3, Packet, TCP_CSUM_OFF, UDP_CSUM_OFF, parse_ipv4, ptr_at},
};

/// RFC 792 error types; the only ones that quote a packet.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
/// Type, code, checksum and 4 bytes of type-specific data (the next-hop MTU of a
/// "fragmentation needed").
const ICMP_HDR_LEN: usize = 8;
/// The quote's L4 part we read: ports, and the UDP length and checksum.
const QUOTED_L4_LEN: usize = 8;
/// How far past the ICMP header the inner headers may reach: the largest IPv4 header
/// and a TCP header up to its checksum. What tc must see in the linear area.
const INNER_MAX: usize = 60 + TCP_CSUM_OFF + 2;

/// Layer 4 of the outer packet: an ICMP error header.
struct IcmpErr {
    /// Where the quoted IPv4 header starts.
    inner_off: usize,
}

/// `None`: not an ICMP error (echo, timestamp, ...), or truncated.
#[inline(always)]
fn parse_icmp_error<C: Packet>(ctx: &C, off: usize) -> Option<IcmpErr> {
    let h = ptr_at::<[u8; ICMP_HDR_LEN], C>(ctx, off)?;
    let icmp_type = unsafe { (*h)[0] };
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED && icmp_type != ICMP_PARAMETERPROB {
        return None;
    }
    Some(IcmpErr { inner_off: off + ICMP_HDR_LEN })
}

/// The quoted packet: its IPv4 header and the first 8 bytes of TCP or UDP.
struct Quoted {
    l3: L3,
    l4_off: usize,
    sport_be: u16,
    dport_be: u16,
}

/// `None`: the quote is cut short, is not TCP or UDP, or is a fragment (whose 8 bytes
/// need not be ports).
#[inline(always)]
fn parse_quoted<C: Packet>(ctx: &C, off: usize) -> Option<Quoted> {
    // The quoted total length is the original packet's, longer than the quote: the
    // shared parser's "not shorter than the header" check still holds for it.
    let l3 = parse_ipv4(ctx, off)?;
    if l3.fragment || (l3.proto != IPPROTO_TCP && l3.proto != IPPROTO_UDP) {
        return None;
    }
    let l4_off = off + l3.hdr_len;
    let ports = ptr_at::<[u16; 2], C>(ctx, l4_off)?;
    // The whole 8 bytes, for the UDP checksum: RFC 792 quotes at least that much.
    ptr_at::<[u8; QUOTED_L4_LEN], C>(ctx, l4_off)?;
    let [sport_be, dport_be] = unsafe { *ports };
    Some(Quoted { l3, l4_off, sport_be, dport_be })
}

/// Old and new values of every field the translation may change, network byte order;
/// equal means "leave it".
#[derive(Clone, Copy)]
struct Xlate {
    saddr: (u32, u32),
    daddr: (u32, u32),
    in_saddr: (u32, u32),
    in_daddr: (u32, u32),
    in_sport: (u16, u16),
    in_dport: (u16, u16),
}

/// Translates an ICMP error quoting a NATed flow in place; returns the flow's service
/// id, or `None` (packet untouched) when it is no ICMP error, quotes no flow we know,
/// or is cut short. `l3` is the outer IPv4 header at `l3_off`, protocol ICMP.
///
/// Inlined into `process` like the other helpers: it adds one map lookup and no loop,
/// and both programs load with it (the fixture tests load them). Should the verifier's
/// budget get tight, `#[inline(never)]` would make it a static BPF-to-BPF call.
#[inline(always)]
pub fn translate_error<C: Packet>(ctx: &C, l3_off: usize, l3: &L3) -> Option<NonZeroU32> {
    if l3.fragment {
        // A later fragment holds no ICMP header; a first one may hold a truncated
        // quote. netfilter reassembles first; we have nothing to reassemble with.
        return None;
    }
    let icmp_off = l3_off + l3.hdr_len;
    // The ICMP header is within what main.rs pulls for every tc packet.
    let icmp = parse_icmp_error(ctx, icmp_off)?;
    // The quote may not be: make it readable, for errors only. This invalidates packet
    // pointers, and none is held across it (`IcmpErr` holds an offset).
    ctx.pull(icmp.inner_off + INNER_MAX);
    let q = parse_quoted(ctx, icmp.inner_off)?;

    // The quoted packet went one way; the flow's half for the other way is keyed by
    // its reverse.
    let key = CtKey4::new(q.l3.daddr_be, q.l3.saddr_be, q.dport_be, q.sport_be, q.l3.proto);
    let ct = unsafe { CONNTRACK.get(&key) }.copied()?;
    let hairpin = ct.flags & CT_F_HAIRPIN != 0;
    let x = if ct.dir == CT_DIR_REPLY {
        // The quote is a forward packet after DNAT, client:cport -> backend:tport (for
        // a hairpin, ClusterIP:cport -> client:tport), reported by a router on the way
        // or by the backend, to its sender. Make it the packet the client sent, to
        // ClusterIP:port from itself, and make an error from the backend come from the
        // ClusterIP, as the client's stack expects. Hairpin: the client is its own
        // backend (the reply key's source); the error, addressed to the ClusterIP we
        // put as source, goes to the client.
        let client = if hairpin { q.l3.daddr_be } else { q.l3.saddr_be };
        Xlate {
            saddr: (l3.saddr_be, if l3.saddr_be == q.l3.daddr_be { ct.nat_addr_be } else { l3.saddr_be }),
            daddr: (l3.daddr_be, if hairpin && l3.daddr_be == q.l3.saddr_be { client } else { l3.daddr_be }),
            in_saddr: (q.l3.saddr_be, client),
            in_daddr: (q.l3.daddr_be, ct.nat_addr_be),
            in_sport: (q.sport_be, q.sport_be),
            in_dport: (q.dport_be, ct.nat_port_be),
        }
    } else if ct.dir == CT_DIR_FORWARD {
        // The quote is a reply after reverse NAT, ClusterIP:port -> client:cport,
        // reported by the client (or a router) to the ClusterIP. Make it the packet
        // the backend sent, from backend:tport (to ClusterIP:cport for a hairpin), and
        // send the error to the backend. Hairpin: our forward rewrite made the client
        // appear as the ClusterIP, so an error from it must too.
        Xlate {
            saddr: (l3.saddr_be, if hairpin && l3.saddr_be == q.l3.daddr_be { q.l3.saddr_be } else { l3.saddr_be }),
            daddr: (l3.daddr_be, if l3.daddr_be == q.l3.saddr_be { ct.nat_addr_be } else { l3.daddr_be }),
            in_saddr: (q.l3.saddr_be, ct.nat_addr_be),
            in_daddr: (q.l3.daddr_be, if hairpin { q.l3.saddr_be } else { q.l3.daddr_be }),
            in_sport: (q.sport_be, ct.nat_port_be),
            in_dport: (q.dport_be, q.dport_be),
        }
    } else {
        return None;
    };
    apply(ctx, l3_off, icmp_off, icmp.inner_off, &q, &x)?;
    NonZeroU32::new(ct.svc_id)
}

/// Writes `x` into the packet with every checksum updated. The ICMP checksum covers
/// the whole ICMP message, so every quoted byte that changes (addresses, the inner
/// header checksum, ports, the inner L4 checksum) goes into it; the outer header is
/// outside it. All changed words are 16-bit aligned relative to the ICMP header (IPv4
/// headers are multiples of 4 bytes), as RFC 1624 updates require.
#[inline(always)]
fn apply<C: Packet>(ctx: &C, l3_off: usize, icmp_off: usize, inner_off: usize, q: &Quoted, x: &Xlate) -> Option<()> {
    // One bounds-checked pointer per header, each read and written through: the
    // verifier tracks packet ranges per pointer.
    let outer = ptr_at::<Ipv4Hdr, C>(ctx, l3_off)?;
    let icmp = ptr_at::<[u16; ICMP_HDR_LEN / 2], C>(ctx, icmp_off)?;
    let inner = ptr_at::<Ipv4Hdr, C>(ctx, inner_off)?;
    let l4 = ptr_at::<[u16; QUOTED_L4_LEN / 2], C>(ctx, q.l4_off)?;
    // The TCP checksum is past the 8 bytes RFC 792 asks for; routers quote more
    // (Linux up to 576 bytes in all), and then it is updated, as netfilter's
    // `tcp_manip_pkt` does when the header is there.
    let tcp_csum = if q.l3.proto == IPPROTO_TCP { ptr_at::<u16, C>(ctx, q.l4_off + TCP_CSUM_OFF) } else { None };
    unsafe {
        csum::ipv4_set_addrs(&mut *outer, x.saddr, x.daddr);

        let inner = &mut *inner;
        let icmp = &mut *icmp;
        let l4 = &mut *l4;
        let mut ic = icmp[1];
        // The inner L4 checksum, updated like the packet's own would be: pseudo-header
        // addresses and ports. `None`: not in the quote, or a UDP checksum of 0 (none).
        let mut l4c = if q.l3.proto == IPPROTO_UDP {
            let u = l4[UDP_CSUM_OFF / 2];
            if u == 0 { None } else { Some(u) }
        } else {
            tcp_csum.map(|p| *p)
        };
        let old_l4c = l4c;
        let old_iphc = inner.check;
        let mut iphc = old_iphc;
        if x.in_saddr.0 != x.in_saddr.1 {
            iphc = csum::replace32(iphc, x.in_saddr.0, x.in_saddr.1);
            ic = csum::replace32(ic, x.in_saddr.0, x.in_saddr.1);
            l4c = l4c.map(|v| csum::replace32(v, x.in_saddr.0, x.in_saddr.1));
            inner.saddr_be = x.in_saddr.1;
        }
        if x.in_daddr.0 != x.in_daddr.1 {
            iphc = csum::replace32(iphc, x.in_daddr.0, x.in_daddr.1);
            ic = csum::replace32(ic, x.in_daddr.0, x.in_daddr.1);
            l4c = l4c.map(|v| csum::replace32(v, x.in_daddr.0, x.in_daddr.1));
            inner.daddr_be = x.in_daddr.1;
        }
        inner.check = iphc;
        ic = csum::replace16(ic, old_iphc, iphc);
        if x.in_sport.0 != x.in_sport.1 {
            ic = csum::replace16(ic, x.in_sport.0, x.in_sport.1);
            l4c = l4c.map(|v| csum::replace16(v, x.in_sport.0, x.in_sport.1));
            l4[0] = x.in_sport.1;
        }
        if x.in_dport.0 != x.in_dport.1 {
            ic = csum::replace16(ic, x.in_dport.0, x.in_dport.1);
            l4c = l4c.map(|v| csum::replace16(v, x.in_dport.0, x.in_dport.1));
            l4[1] = x.in_dport.1;
        }
        if let (Some(old), Some(mut new)) = (old_l4c, l4c) {
            if q.l3.proto == IPPROTO_UDP {
                // RFC 768: a computed 0 is sent as 0xffff (0 means "no checksum").
                if new == 0 {
                    new = 0xffff;
                }
                l4[UDP_CSUM_OFF / 2] = new;
            } else if let Some(p) = tcp_csum {
                *p = new;
            }
            ic = csum::replace16(ic, old, new);
        }
        icmp[1] = ic;
    }
    Some(())
}
