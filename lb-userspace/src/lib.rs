//! lb userspace: loading and attaching the datapath, and (in later modules) the node
//! agent that programs it from Kubernetes.

pub mod agent;
pub mod bench_agent;
pub mod bench_veth;
pub mod datapath;
pub mod inspect;
pub mod netns;
pub mod testing;
