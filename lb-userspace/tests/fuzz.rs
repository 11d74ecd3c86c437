//! The datapath packet fuzzer (`lb_testing::fuzz`) in `cargo test`: 100,000 generated
//! packets with a fixed seed, each through `lb_xdp`, `lb_tc` and `lb_tc_egress`, every
//! run checked. `cargo xtask fuzz` runs a million with a random seed.
//!
//! Needs root (BPF program load).

use lb_testing::fuzz::{Options, run};

#[test]
fn a_hundred_thousand_generated_packets_through_every_entry_point() {
    let opts = Options::new(100_000, 0x1b_f022_2026_1213);
    let report = run(&opts).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{}", report.table());
    assert_eq!(report.runs.values().sum::<u64>() + report.refused.values().sum::<u64>(), 3 * 100_000);
    // Every generator ran, and the paths the fixtures set up were taken.
    for r in ["fwd_new", "fwd_established", "rev_nat", "fwd_draining", "drop_backend_gone", "icmp_error_nat"] {
        assert!(report.reasons.contains_key(&("xdp", r)), "no {r} in\n{}", report.table());
    }
}
