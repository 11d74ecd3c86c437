//! Header parsing: one checked accessor (`ptr_at`) and one helper per layer.
//!
//! Every read goes through `ptr_at`, whose bounds check against `data_end` is what the
//! verifier needs to prove that no read leaves the packet; a truncated header at any
//! layer therefore becomes a verdict, never an out-of-bounds read.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};

/// What both program contexts offer the parser: the linear packet bytes.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Makes the first `len` bytes (or the whole packet, if shorter) directly
    /// accessible. Invalidates every packet pointer taken before.
    fn pull(&self, len: usize);
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    /// `lb_xdp` is no multi-buffer (`xdp.frags`) program: its frames are linear.
    #[inline(always)]
    fn pull(&self, _len: usize) {}
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    /// Only when the linear area is too short: pulling also unclones a cloned skb.
    /// Compared through `ptr_at`, not as `data_end - data`, which the verifier forbids
    /// when LLVM turns it into arithmetic on `pkt_end`.
    #[inline(always)]
    fn pull(&self, len: usize) {
        if len == 0 || ptr_at::<u8, Self>(self, len - 1).is_some() {
            return;
        }
        let total = TcContext::len(self) as usize;
        let _ = self.pull_data(if total < len { total } else { len } as u32);
    }
}

/// A pointer to a `T` at `off` bytes into the packet, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T, C: Packet>(ctx: &C, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const IPPROTO_ICMP: u8 = 1;
/// IPv4 `frag_off`: more fragments, and the 13-bit offset (RFC 791).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type_be: u16,
}

#[repr(C)]
pub struct VlanHdr {
    pub tci_be: u16,
    pub ether_type_be: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
}

pub const TCP_HDR_LEN: usize = 20;
pub const TCP_CSUM_OFF: usize = 16;
pub const TCP_FLAGS_OFF: usize = 13;
pub const UDP_HDR_LEN: usize = 8;
pub const UDP_CSUM_OFF: usize = 6;
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// Layer 2: Ethernet and at most one 802.1Q tag.
pub struct L2 {
    /// Where the network header starts: 14, or 18 behind a VLAN tag.
    pub l3_off: usize,
    /// Host byte order.
    pub ether_type: u16,
}

/// `None`: the frame is too short for its Ethernet or VLAN header.
#[inline(always)]
pub fn parse_l2<C: Packet>(ctx: &C) -> Option<L2> {
    let eth = ptr_at::<EthHdr, C>(ctx, 0)?;
    let ether_type = u16::from_be(unsafe { (*eth).ether_type_be });
    if ether_type != ETH_P_8021Q {
        return Some(L2 { l3_off: size_of::<EthHdr>(), ether_type });
    }
    let vlan = ptr_at::<VlanHdr, C>(ctx, size_of::<EthHdr>())?;
    Some(L2 {
        l3_off: size_of::<EthHdr>() + size_of::<VlanHdr>(),
        ether_type: u16::from_be(unsafe { (*vlan).ether_type_be }),
    })
}

pub struct L3 {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub proto: u8,
    /// From IHL: 20..=60 bytes, options included.
    pub hdr_len: usize,
    /// MF set or a non-zero offset.
    pub fragment: bool,
    /// A fragment other than the first: no L4 header (RFC 791 fragment offset > 0).
    pub later_fragment: bool,
    /// Identification, network byte order: names the datagram of a fragment.
    pub id_be: u16,
}

/// `None`: truncated, not version 4, IHL < 5, or a total length shorter than the
/// header.
#[inline(always)]
pub fn parse_ipv4<C: Packet>(ctx: &C, off: usize) -> Option<L3> {
    let ip = ptr_at::<Ipv4Hdr, C>(ctx, off)?;
    let ver_ihl = unsafe { (*ip).ver_ihl };
    let hdr_len = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || hdr_len < size_of::<Ipv4Hdr>() {
        return None;
    }
    // The options, if any, must be inside the packet too.
    ptr_at::<u8, C>(ctx, off + hdr_len - 1)?;
    if (u16::from_be(unsafe { (*ip).tot_len_be }) as usize) < hdr_len {
        return None;
    }
    let frag = u16::from_be(unsafe { (*ip).frag_off_be });
    Some(L3 {
        saddr_be: unsafe { (*ip).saddr_be },
        daddr_be: unsafe { (*ip).daddr_be },
        proto: unsafe { (*ip).proto },
        hdr_len,
        fragment: frag & (IP_MF | IP_OFFSET) != 0,
        later_fragment: frag & IP_OFFSET != 0,
        id_be: unsafe { (*ip).id_be },
    })
}

pub struct L4 {
    /// Offset of the L4 header from the start of the packet.
    pub off: usize,
    pub sport_be: u16,
    pub dport_be: u16,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// Offset of the checksum field from the start of the packet.
    pub csum_off: usize,
}

/// `None`: the TCP or UDP header is truncated.
#[inline(always)]
pub fn parse_l4<C: Packet>(ctx: &C, off: usize, proto: u8) -> Option<L4> {
    // One bounds check per protocol, on the pointer that is then read through: the
    // verifier tracks packet ranges per pointer.
    if proto == lb_common::IPPROTO_TCP {
        let tcp = ptr_at::<[u8; TCP_HDR_LEN], C>(ctx, off)?;
        let tcp = unsafe { &*tcp };
        Some(L4 {
            off,
            sport_be: u16::from_ne_bytes([tcp[0], tcp[1]]),
            dport_be: u16::from_ne_bytes([tcp[2], tcp[3]]),
            tcp_flags: tcp[TCP_FLAGS_OFF],
            csum_off: off + TCP_CSUM_OFF,
        })
    } else {
        let udp = ptr_at::<[u8; UDP_HDR_LEN], C>(ctx, off)?;
        let udp = unsafe { &*udp };
        Some(L4 {
            off,
            sport_be: u16::from_ne_bytes([udp[0], udp[1]]),
            dport_be: u16::from_ne_bytes([udp[2], udp[3]]),
            tcp_flags: 0,
            csum_off: off + UDP_CSUM_OFF,
        })
    }
}
