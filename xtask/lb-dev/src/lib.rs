//! The benchmarks behind `cargo xtask bench agent|soak|veth` (`lb-dev bench ...`); the
//! datapath benchmark and demo are in the binary. A library so that their smoke tests
//! can drive them.

pub mod bench_agent;
pub mod bench_soak;
pub mod bench_veth;
