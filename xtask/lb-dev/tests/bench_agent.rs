//! The agent benchmark's code, in small, against a real kube-apiserver (`xtask kube
//! up`); skipped, with a message, when the Kubernetes binaries have not been built.

use anyhow::Result;
use lb_testing::{agent::lb_binary, kube::Cluster, require_kube};

/// `bench_agent` in small (a smoke test of the benchmark code); the full size with
/// `LB_BENCH_AGENT_FULL=1` (1,000 changes, 10,000 services x 10 endpoints), and
/// `LB_BENCH_AGENT_LB=target/release/lb` for numbers worth reporting.
#[test]
fn bench_agent_runs() -> Result<()> {
    require_kube!();
    let cluster = Cluster::up("bench", 17563, false)?;
    let mut opts = lb_dev::bench_agent::BenchOpts::new(&cluster.kubeconfig, lb_binary()?);
    // The agent binary to measure, e.g. target/release/lb (default: this build's).
    if let Some(lb) = std::env::var_os("LB_BENCH_AGENT_LB") {
        opts.lb = lb.into();
    }
    let full = std::env::var_os("LB_BENCH_AGENT_FULL").is_some();
    if !full {
        opts.changes = 50;
        opts.services = 100;
    }
    let report = lb_dev::bench_agent::run(&opts)?;
    eprintln!("{}", report.table());
    assert_eq!(report.latency.changes, opts.changes);
    assert!(report.full_sync.initial_sync_writes >= opts.services * (opts.endpoints + 1));
    if full {
        // The target. Holding the slices as k8s-openapi structs gave ~103 MB;
        // the model's compact `Slice` ~57 MB (v1beta1, release build).
        assert!(report.full_sync.rss_mb < 100.0, "agent RSS {:.1} MB at full size", report.full_sync.rss_mb);
    }
    Ok(())
}
