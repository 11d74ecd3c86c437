//! The benchmarks behind `cargo xtask bench agent|veth` (`lb-dev bench ...`); the
//! datapath benchmark and demo are in the binary. A library so that their smoke tests
//! can drive them.

pub mod bench_agent;
pub mod bench_veth;
