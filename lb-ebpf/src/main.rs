//! lb datapath: Kubernetes ClusterIP load balancing in XDP (`lb_xdp`) and tc clsact
//! (`lb_tc` on ingress, `lb_tc_egress` on pod interfaces' egress). All run the same
//! parse, lookup and NAT core (`engine::process`); only the way they rewrite packets and
//! fix checksums differs. See docs/datapath.md.
#![no_std]
#![no_main]

mod csum;
mod engine;
mod icmp;
mod maps;
mod parse;
mod reject;
mod sock;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, xdp_action},
    helpers::{
        bpf_redirect,
        generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_load_bytes},
    },
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{IPPROTO_UDP, Reason};

use crate::{
    engine::{Hook, Kind, Rewrite, process},
    maps::{count, count_service},
    parse::{EthHdr, Ipv4Hdr, ptr_at},
    reject::{MAX_QUOTE, REJECT_HDRS, RejectHdrs},
};

/// `TC_ACT_UNSPEC` (`TCX_NEXT`): hand the packet on to the next program on the hook,
/// or to the default action if there is none. Also after a rewrite: `TC_ACT_OK`
/// (`TCX_PASS`) would end the chain, and a network-policy program attached after ours
/// would never see service traffic (include/uapi/linux/bpf.h, `enum tcx_action_base`;
/// net/core/dev.c, `tcx_run`).
const TC_ACT_UNSPEC: i32 = -1;
/// tc can pull this much into the linear area when headers are not there yet: the
/// largest Ethernet + VLAN + IPv4 (with options) + TCP header we parse.
const TC_PULL_LEN: u32 = 14 + 4 + 60 + 20;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match try_lb_xdp(&ctx) {
        Ok(v) => v,
        Err(()) => {
            count(Reason::RewriteFailed, 0);
            xdp_action::XDP_ABORTED
        }
    }
}

#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    match try_lb_tc(&ctx, Hook::Ingress) {
        Ok(v) => v,
        Err(()) => {
            count(Reason::RewriteFailed, 0);
            TC_ACT_SHOT as i32
        }
    }
}

/// tc egress of pod interfaces: replies the node's own stack sends to a pod, for flows
/// whose backend is the node itself (a host-network pod, the API server behind
/// `kubernetes.default`). They reach the pod through this hook only, never through an
/// ingress one.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    match try_lb_tc(&ctx, Hook::Egress) {
        Ok(v) => v,
        Err(()) => {
            count(Reason::RewriteFailed, 0);
            TC_ACT_SHOT as i32
        }
    }
}

fn try_lb_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let action = process(ctx, Hook::Ingress);
    #[cfg(feature = "debug-log")]
    log_action(ctx, &action);
    let verdict = match action.kind {
        Kind::Pass => xdp_action::XDP_PASS,
        Kind::Drop => xdp_action::XDP_DROP,
        Kind::Nat => {
            xdp_nat(ctx, &action.rw)?;
            xdp_action::XDP_PASS
        }
        Kind::Reject => {
            xdp_reject(ctx, action.l3_off, action.ip_hdr_len, len as i32)?;
            xdp_action::XDP_TX
        }
    };
    count(action.reason, len);
    if action.svc_id != 0 {
        count_service(action.svc_id, len);
    }
    Ok(verdict)
}

fn try_lb_tc(ctx: &TcContext, hook: Hook) -> Result<i32, ()> {
    let len = ctx.len();
    // GSO and some drivers leave headers outside the linear area, where direct packet
    // access cannot see them; pull only what we parse, never the whole skb.
    if ctx.data_end() - ctx.data() < TC_PULL_LEN as usize && len > (ctx.data_end() - ctx.data()) as u32 {
        let _ = ctx.pull_data(if len < TC_PULL_LEN { len } else { TC_PULL_LEN });
    }
    let action = process(ctx, hook);
    #[cfg(feature = "debug-log")]
    log_action(ctx, &action);
    let verdict = match action.kind {
        Kind::Pass => TC_ACT_UNSPEC,
        Kind::Drop => TC_ACT_SHOT as i32,
        Kind::Nat => {
            tc_nat(ctx, &action.rw)?;
            TC_ACT_UNSPEC
        }
        Kind::Reject => {
            tc_reject(ctx, action.l3_off, action.ip_hdr_len)?;
            // Back out of the device it came in on: to the pod on a pod veth, to the
            // sending node on an uplink. The tc counterpart of XDP_TX.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
    };
    count(action.reason, len as u64);
    if action.svc_id != 0 {
        count_service(action.svc_id, len as u64);
    }
    Ok(verdict)
}

#[cfg(feature = "debug-log")]
fn log_action<C: aya_ebpf::EbpfContext>(ctx: &C, action: &crate::engine::Action) {
    aya_log_ebpf::debug!(ctx, "lb verdict reason {}", action.reason as u32);
}

// ---- XDP: rewrite in place, incremental checksums (there is no skb to help). ----

fn xdp_nat(ctx: &XdpContext, rw: &Rewrite) -> Result<(), ()> {
    let ip = ptr_at::<Ipv4Hdr, _>(ctx, rw.l3_off).ok_or(())?;
    if !rw.has_l4 {
        unsafe { csum::ipv4_set_addrs(&mut *ip, rw.saddr, rw.daddr) };
        return Ok(());
    }
    // Ports and checksum are read and written through one bounds-checked pointer per
    // protocol: the verifier tracks packet ranges per pointer, not per offset.
    if rw.proto == IPPROTO_UDP {
        let l4 = ptr_at::<[u16; 4], _>(ctx, rw.l4_off).ok_or(())?;
        unsafe { xdp_nat_l4(&mut *ip, &mut *l4, 3, rw, true) };
    } else {
        let l4 = ptr_at::<[u16; 9], _>(ctx, rw.l4_off).ok_or(())?;
        unsafe { xdp_nat_l4(&mut *ip, &mut *l4, 8, rw, false) };
    }
    Ok(())
}

/// `l4` holds the L4 header as 16-bit words: ports at 0 and 1, the checksum at
/// `csum_word`.
#[inline(always)]
fn xdp_nat_l4<const N: usize>(ip: &mut Ipv4Hdr, l4: &mut [u16; N], csum_word: usize, rw: &Rewrite, udp: bool) {
    let mut ipc = ip.check;
    let mut c = l4[csum_word];
    let udp_no_csum = udp && c == 0;
    if rw.saddr.0 != rw.saddr.1 {
        ipc = csum::replace32(ipc, rw.saddr.0, rw.saddr.1);
        c = csum::replace32(c, rw.saddr.0, rw.saddr.1);
        ip.saddr_be = rw.saddr.1;
    }
    if rw.daddr.0 != rw.daddr.1 {
        ipc = csum::replace32(ipc, rw.daddr.0, rw.daddr.1);
        c = csum::replace32(c, rw.daddr.0, rw.daddr.1);
        ip.daddr_be = rw.daddr.1;
    }
    if rw.sport.0 != rw.sport.1 {
        c = csum::replace16(c, rw.sport.0, rw.sport.1);
        l4[0] = rw.sport.1;
    }
    if rw.dport.0 != rw.dport.1 {
        c = csum::replace16(c, rw.dport.0, rw.dport.1);
        l4[1] = rw.dport.1;
    }
    if udp {
        // RFC 768: 0 means "no checksum" and stays so; a computed 0 is sent as 0xffff.
        c = if udp_no_csum {
            0
        } else if c == 0 {
            0xffff
        } else {
            c
        };
    }
    ip.check = ipc;
    l4[csum_word] = c;
}

/// Quote the original IPv4 header and 8 bytes of L4 into a stack buffer.
#[inline(always)]
fn quote_len(ip_hdr_len: usize) -> Result<usize, ()> {
    let q = ip_hdr_len + 8;
    if q > MAX_QUOTE || q < 28 {
        return Err(());
    }
    Ok(q)
}

fn xdp_reject(ctx: &XdpContext, l3_off: usize, ip_hdr_len: usize, orig_len: i32) -> Result<(), ()> {
    let qlen = quote_len(ip_hdr_len)?;
    let mut quote = [0u8; MAX_QUOTE];
    let rc = unsafe { bpf_xdp_load_bytes(ctx.ctx, l3_off as u32, quote.as_mut_ptr() as *mut _, qlen as u32) };
    if rc != 0 {
        return Err(());
    }
    let ip = ptr_at::<Ipv4Hdr, _>(ctx, l3_off).ok_or(())?;
    let eth = ptr_at::<EthHdr, _>(ctx, 0).ok_or(())?;
    let (client, vip, mac_dst, mac_src) = unsafe { ((*ip).saddr_be, (*ip).daddr_be, (*eth).src, (*eth).dst) };
    let vlan = if l3_off > 14 { Some(unsafe { *ptr_at::<[u8; 4], _>(ctx, 14).ok_or(())? }) } else { None };
    let hdrs = reject::build(vip, client, &quote, qlen);

    // Room for the new IPv4 + ICMP headers in front; XDP guarantees 256 bytes of
    // headroom (XDP_PACKET_HEADROOM), whereas tailroom depends on the driver.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(REJECT_HDRS as i32)) } != 0 {
        return Err(());
    }
    let eth = ptr_at::<EthHdr, _>(ctx, 0).ok_or(())?;
    unsafe {
        (*eth).dst = mac_dst;
        (*eth).src = mac_src;
        (*eth).ether_type_be = 0;
    }
    let hdr_off = match vlan {
        Some(tag) => {
            unsafe {
                (*eth).ether_type_be = parse::ETH_P_8021Q.to_be();
                *ptr_at::<[u8; 4], _>(ctx, 14).ok_or(())? = tag;
            }
            18
        }
        None => {
            unsafe { (*eth).ether_type_be = parse::ETH_P_IP.to_be() };
            14
        }
    };
    let dst = ptr_at::<RejectHdrs, _>(ctx, hdr_off).ok_or(())?;
    unsafe { dst.write_unaligned(hdrs) };
    // The quote already follows: it is the start of the original IPv4 packet.
    let want = (hdr_off + REJECT_HDRS + qlen) as i32;
    // From the length at entry, not from data_end: LLVM would fold `data_end - data`
    // into arithmetic on pkt_end, which the verifier forbids.
    let have = orig_len + REJECT_HDRS as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want - have) } != 0 {
        return Err(());
    }
    Ok(())
}

// ---- tc: the kernel's checksum helpers, which also handle CHECKSUM_PARTIAL skbs. ----

/// `bpf_l4_csum_replace` flags (include/uapi/linux/bpf.h).
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

fn tc_nat(ctx: &TcContext, rw: &Rewrite) -> Result<(), ()> {
    if !rw.has_l4 {
        let ip = ptr_at::<Ipv4Hdr, _>(ctx, rw.l3_off).ok_or(())?;
        unsafe { csum::ipv4_set_addrs(&mut *ip, rw.saddr, rw.daddr) };
        return Ok(());
    }
    // The L4 checksum goes through the helper, the only code that knows the skb's
    // ip_summed: under CHECKSUM_PARTIAL the field holds the pseudo-header sum, which
    // changes with the addresses (BPF_F_PSEUDO_HDR) but not with the ports.
    let l4_flags = if rw.proto == IPPROTO_UDP { BPF_F_MARK_MANGLED_0 } else { 0 };
    let addr_flags = l4_flags | BPF_F_PSEUDO_HDR | 4;
    for (old, new) in [rw.saddr, rw.daddr] {
        if old != new {
            ctx.l4_csum_replace(rw.l4_csum_off, old as u64, new as u64, addr_flags).map_err(|_| ())?;
        }
    }
    for (old, new) in [rw.sport, rw.dport] {
        if old != new {
            ctx.l4_csum_replace(rw.l4_csum_off, old as u64, new as u64, l4_flags | 2).map_err(|_| ())?;
        }
    }
    // Everything else is written directly, which saves a helper call per field: the
    // IPv4 header checksum is always complete, so RFC 1624 applies as in XDP. The
    // helpers above invalidated packet pointers, so they are taken afresh here.
    let ip = ptr_at::<Ipv4Hdr, _>(ctx, rw.l3_off).ok_or(())?;
    let ports = ptr_at::<[u16; 2], _>(ctx, rw.l4_off).ok_or(())?;
    unsafe {
        csum::ipv4_set_addrs(&mut *ip, rw.saddr, rw.daddr);
        (*ports)[0] = rw.sport.1;
        (*ports)[1] = rw.dport.1;
    }
    Ok(())
}

fn tc_reject(ctx: &TcContext, l3_off: usize, ip_hdr_len: usize) -> Result<(), ()> {
    let qlen = quote_len(ip_hdr_len)?;
    let mut quote = [0u8; MAX_QUOTE];
    // The raw helper: aya's `load_bytes` clamps the length to [0, 68], and the verifier
    // rejects a possibly zero-sized read; `qlen` is known to be in [28, 68].
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            l3_off as u32,
            quote.as_mut_ptr() as *mut _,
            qlen as u32,
        )
    };
    if rc != 0 {
        return Err(());
    }
    let eth = ptr_at::<EthHdr, _>(ctx, 0).ok_or(())?;
    let (mac_dst, mac_src) = unsafe { ((*eth).src, (*eth).dst) };
    let ip = ptr_at::<Ipv4Hdr, _>(ctx, l3_off).ok_or(())?;
    let (client, vip) = unsafe { ((*ip).saddr_be, (*ip).daddr_be) };
    let hdrs = reject::build(vip, client, &quote, qlen);

    // Resize to L2 + headers + quote and write it all; the L2 header (and VLAN tag, if
    // any) stays where it is.
    let new_len = (l3_off + REJECT_HDRS + qlen) as u32;
    let rc = unsafe { aya_ebpf::helpers::generated::bpf_skb_change_tail(ctx.skb.skb, new_len, 0) };
    if rc != 0 {
        return Err(());
    }
    ctx.store(0, &mac_dst, 0).map_err(|_| ())?;
    ctx.store(6, &mac_src, 0).map_err(|_| ())?;
    ctx.store(l3_off, &hdrs, 0).map_err(|_| ())?;
    let q = unsafe {
        aya_ebpf::helpers::generated::bpf_skb_store_bytes(
            ctx.skb.skb as *mut _,
            (l3_off + REJECT_HDRS) as u32,
            quote.as_ptr() as *const _,
            qlen as u32,
            0,
        )
    };
    if q != 0 {
        return Err(());
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
