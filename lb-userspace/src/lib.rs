//! lb userspace: loading and attaching the datapath ([`datapath`]), the node agent that
//! programs it from Kubernetes ([`agent`]) and the inspection commands ([`inspect`]).
//! This is what the `lb` binary is built from, and all it exports; the test harness,
//! the benchmarks and the developer tool live in the dev-only crates under `xtask/`.

pub mod agent;
pub mod datapath;
pub mod inspect;
