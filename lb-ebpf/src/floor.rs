//! The benchmark floors: an XDP and a tc program that do nothing but pass the packet.
//! The datapath benchmark reports lb's cost on each hook as a ratio to the floor of the
//! same hook, measured in the same run (`BPF_PROG_TEST_RUN` builds an skb for tc, which
//! costs what XDP's harness does not).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// `TC_ACT_UNSPEC`, what `lb_tc` returns for a packet it hands on.
#[classifier]
pub fn floor_tc(_ctx: TcContext) -> i32 {
    -1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &::core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
