//! lb's test harness, apart from the product (as Katran keeps its testing library):
//! used by lb-userspace's integration tests and by `lb-dev` (demo and benchmarks).
//!
//! - the datapath on a private bpffs, with map helpers and `BPF_PROG_TEST_RUN`
//!   ([`Datapath`], [`run_on`]; re-exported from `datapath`);
//! - [`fixtures`]: the fixture tests' map state and addresses; [`fuzz`]: generated
//!   packets through every entry point, checked packet by packet;
//! - [`netns`]: client, node and server namespaces joined by veths ([`netns::Topology`]);
//! - [`agent`]: a running `lb agent` process;
//! - [`kube`]: a bare control plane from `xtask kube up`;
//! - [`cgroup`]: throw-away cgroup v2 directories ([`cgroup::TestCgroup`]), for the
//!   socket-level load balancer's programs;
//! - [`sock`]: backends that answer with their name and `lb-sockclient` processes,
//!   which open their sockets inside a given cgroup and namespace;
//! - [`Scratch`]: a test's scratch directory.

pub mod agent;
pub mod cgroup;
pub mod datapath;
pub mod fixtures;
pub mod fuzz;
pub mod kube;
pub mod netns;
pub mod sock;

pub use datapath::*;
pub use sock::sockclient_binary;

/// A scratch directory under the temp dir (objects files, the agent's log and status
/// file), `lb-<name>-<pid>`, emptied first and removed on drop unless `LB_TEST_KEEP`
/// is set.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new(name: &str) -> std::io::Result<Self> {
        let p = std::env::temp_dir().join(format!("lb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }

    /// `name` inside it.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("LB_TEST_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Frontend (`ip:port/proto`) -> sorted backend addresses, as `lb services` shows them,
/// in a form tests can compare. Empty when the maps can't be read.
pub fn backend_sets(bpffs: &std::path::Path) -> Vec<(String, Vec<String>)> {
    lb_userspace::inspect::services(bpffs)
        .map(|rows| {
            rows.into_iter()
                .map(|r| {
                    let mut b: Vec<String> = r.backends.into_iter().map(|b| b.address).collect();
                    b.sort();
                    (format!("{}/{}", r.frontend, r.protocol), b)
                })
                .collect()
        })
        .unwrap_or_default()
}
