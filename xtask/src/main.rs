//! Project tasks: `cargo xtask <command>`. xtask itself depends on nothing that needs the
//! BPF toolchain, so it builds on a fresh machine and can install that toolchain.

mod kube;
mod plot;
mod sandbox;
mod setup;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "lb project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Install everything a fresh machine needs to build and test (idempotent).
    Setup,
    /// Build the datapath and the `lb` binaries (release).
    Build,
    /// Run the test suite (needs root: it loads BPF programs and makes namespaces).
    Test {
        /// Which part: all (default: every cargo test, the soak, then e2e, the bench
        /// smoke, then upstream), unit, datapath, soak (`bench soak --ci`: 2 min of
        /// churn and traffic, verdict checked), e2e, bench (`bench peers --smoke`: every
        /// row is produced), upstream (Kubernetes' own Service e2e tests, expected-pass
        /// list).
        #[arg(default_value = "all")]
        suite: String,
        /// upstream: the service proxy to test (lb, iptables, ipvs, none).
        #[arg(long, value_enum, default_value_t = sandbox::Proxy::Lb)]
        proxy: sandbox::Proxy,
        /// upstream: run all 39 `[sig-network] Services` tests and write target/upstream-<proxy>.json.
        #[arg(long)]
        all: bool,
    },
    /// Build the sandbox's container images (docker archives in target/images) and import
    /// them into every running sandbox node's containerd.
    Image,
    /// Benchmarks: `datapath` (ns/packet through BPF_PROG_TEST_RUN), `agent` (network
    /// programming latency, full sync), `soak` (30 min of EndpointSlice churn at 20/s with
    /// traffic: RSS, fds, latency, failed requests; `--ci` 2 min, `--duration`), `veth`
    /// (iperf3 through a ClusterIP per attach mode),
    /// `peers` (lb beside kube-proxy on the sandbox cluster; `bench peers --help`).
    Bench {
        /// Which benchmark: datapath.
        what: String,
        /// Extra arguments for the benchmark binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Demonstrations: `sandbox` (default: the seed walkthrough on the sandbox cluster) or
    /// `datapath` (crafted packets through the real program).
    Demo {
        #[arg(default_value = "sandbox")]
        what: String,
    },
    /// Packet fuzzer: generated packets through every datapath entry point with
    /// BPF_PROG_TEST_RUN, each run checked (verdict counted once, unchanged or validly
    /// rewritten, maps consistent); the first failure is printed as a fixture.
    Fuzz {
        /// Generated packets (each through lb_xdp, lb_tc and lb_tc_egress).
        #[arg(long, default_value_t = 1_000_000, env = "LB_FUZZ_PACKETS")]
        packets: u64,
        /// PRNG seed; random and printed when not given.
        #[arg(long, env = "LB_FUZZ_SEED")]
        seed: Option<u64>,
        /// Check the maps' consistency every this many packets (1: after every packet,
        /// to find the one that broke them).
        #[arg(long, default_value_t = 2_000, env = "LB_FUZZ_CHECK_EVERY",
              value_parser = clap::value_parser!(u64).range(1..))]
        check_every: u64,
    },
    /// A real Kubernetes control plane (etcd, kube-apiserver, controller-manager).
    Kube {
        #[command(subcommand)]
        cmd: kube::KubeCmd,
    },
    /// A multi-node sandbox cluster of network namespaces (up, down, exec, status).
    Sandbox {
        #[command(subcommand)]
        cmd: sandbox::SandboxCmd,
    },
}

fn main() -> Result<()> {
    // Before any thread starts: Ctrl-C tears down what a command registered.
    lb_netns::interrupt::install();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build => {
            setup::ensure()?;
            cargo(&["build", "--release", "--package", "lb-userspace"])
        }
        Cmd::Test { suite, proxy, all } => test(&suite, proxy, all),
        Cmd::Image => sandbox::image::run(),
        Cmd::Bench { what, args } => {
            setup::ensure()?;
            match what.as_str() {
                "datapath" => {
                    let out = target_dir()?.join("bench/datapath.json");
                    let mut args = args;
                    if !args.iter().any(|a| a == "--out") {
                        args.extend(["--out".to_string(), out.display().to_string()]);
                    }
                    lb_dev(&["bench", "datapath"], &args)
                }
                "agent" => bench_agent(args),
                "soak" => bench_soak(args),
                "veth" => {
                    let mut args = args;
                    if !args.iter().any(|a| a == "--out") {
                        args.extend(["--out".to_string(), target_dir()?.join("bench/veth.json").display().to_string()]);
                    }
                    lb_dev(&["bench", "veth"], &args)
                }
                "peers" => {
                    #[derive(Parser)]
                    #[command(name = "cargo xtask bench peers")]
                    struct Peers {
                        #[command(flatten)]
                        a: sandbox::peers::PeersArgs,
                    }
                    let p = Peers::parse_from(std::iter::once("peers".to_string()).chain(args));
                    sandbox::peers::run(&p.a)
                }
                other => bail!("unknown benchmark {other:?}: datapath, agent, soak, veth or peers"),
            }
        }
        Cmd::Demo { what } => {
            setup::ensure()?;
            match what.as_str() {
                "datapath" => lb_dev(&["demo", "datapath"], &[]),
                "sandbox" => sandbox::demo::run(),
                other => {
                    bail!("unknown demo {other:?}; try `cargo xtask demo` (the sandbox) or `cargo xtask demo datapath`")
                }
            }
        }
        Cmd::Fuzz { packets, seed, check_every } => {
            setup::ensure()?;
            let mut args = vec![
                "--packets".to_string(),
                packets.to_string(),
                "--check-every".to_string(),
                check_every.to_string(),
            ];
            if let Some(seed) = seed {
                args.extend(["--seed".to_string(), seed.to_string()]);
            }
            lb_dev(&["fuzz"], &args)
        }
        Cmd::Kube { cmd } => kube::run(cmd),
        Cmd::Sandbox { cmd } => sandbox::run(cmd),
    }
}

fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} loads BPF programs and creates network namespaces: run it as root (sudo -E cargo xtask ...)");
    }
    Ok(())
}

fn test(suite: &str, proxy: sandbox::Proxy, all: bool) -> Result<()> {
    setup::ensure()?;
    match suite {
        // The default members: lb-ebpf builds only for the BPF target.
        "unit" => cargo(&["test", "--lib", "--bins"]),
        "datapath" => {
            require_root("the datapath suite")?;
            cargo(&[
                "test",
                "--package",
                "lb-userspace",
                "--test",
                "datapath",
                "--test",
                "icmp",
                "--test",
                "netns",
                "--test",
                "node_paths",
                "--test",
                "pmtu_netns",
                "--test",
                "fuzz",
            ])
        }
        "all" => {
            require_root("the test suite")?;
            // The agent's Kubernetes tests and the e2e suite need a real API server:
            // build it now (about 6 minutes the first time, cached in /var/cache/lb).
            // What each part costs is printed as it ends (CI's budget, docs/sandbox.md).
            let part = |name: &str, t0: std::time::Instant| eprintln!("== {name}: {:.0?}", t0.elapsed());
            let t = std::time::Instant::now();
            kube::ensure_built()?;
            part("kubernetes binaries (cached after the first build)", t);
            let t = std::time::Instant::now();
            cargo(&["test"])?;
            part("cargo test (build and run)", t);
            let t = std::time::Instant::now();
            bench_soak(vec!["--ci".to_string()])?;
            part("soak --ci (2 min of churn at 20 changes/s and traffic; release build included)", t);
            let t = std::time::Instant::now();
            sandbox::e2e::run()?;
            part("e2e on real nodes (sandbox up included)", t);
            let t = std::time::Instant::now();
            sandbox::peers::run(&sandbox::peers::PeersArgs::smoke())?;
            part("bench peers --smoke (every row produced; sandbox up included)", t);
            // Last, so that its `N passed, M failed` line ends the output (it prints how
            // long e2e.test took itself).
            sandbox::upstream::run(sandbox::Proxy::Lb, false)
        }
        "soak" => {
            require_root("the soak")?;
            kube::ensure_built()?;
            bench_soak(vec!["--ci".to_string()])
        }
        "e2e" => {
            require_root("the e2e suite")?;
            sandbox::e2e::run()
        }
        "bench" => {
            require_root("the bench smoke")?;
            sandbox::peers::run(&sandbox::peers::PeersArgs::smoke())
        }
        "upstream" => {
            require_root("the upstream suite")?;
            kube::ensure_built()?;
            sandbox::upstream::run(proxy, all)
        }
        other => bail!("unknown suite {other:?}: all, unit, datapath, soak, e2e, bench or upstream"),
    }
}

/// Runs the dev tool (bench, demo; the `lb-dev` crate), built in release mode.
fn lb_dev(sub: &[&str], extra: &[String]) -> Result<()> {
    require_root("this command")?;
    let mut args = vec!["run", "--quiet", "--release", "--package", "lb-dev", "--bin", "lb-dev", "--"];
    args.extend_from_slice(sub);
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

/// `cargo xtask bench agent`: a private API server (no controllers: the benchmark
/// writes EndpointSlices itself), the release `lb` as the agent, torn down afterwards.
fn bench_agent(args: Vec<String>) -> Result<()> {
    bench_with_api_server("agent", 17573, args)
}

/// `cargo xtask bench soak`: like [`bench_agent`]; `lb-dev bench soak` makes the
/// namespaces, runs the agent in its node namespace and fails on a failed verdict.
/// 17633..=17636: kube-apiserver and etcd; the agent's /metrics is on 17634 of the node
/// namespace's own loopback.
fn bench_soak(args: Vec<String>) -> Result<()> {
    bench_with_api_server("soak", 17633, args)
}

/// `lb-dev bench <what>` against a private API server without controllers on `port`,
/// with the release `lb`, results in `target/bench/<what>.json` unless `--out` is given.
fn bench_with_api_server(what: &str, port: u16, mut args: Vec<String>) -> Result<()> {
    require_root(&format!("the {what} benchmark"))?;
    cargo(&["build", "--release", "--package", "lb-userspace", "--bins"])?;
    let target = target_dir()?;
    let dir = std::path::PathBuf::from(format!("/tmp/lb-bench-{what}-kube"));
    let opts = kube::UpOpts { dir: dir.clone(), port, controllers: false, ..Default::default() };
    let _down_on_interrupt = {
        let dir = dir.clone();
        lb_netns::interrupt::on_interrupt(move || {
            let _ = kube::down(&dir);
        })
    };
    let cluster = kube::up(&opts).with_context(|| format!("starting the {what} benchmark's API server"))?;
    if !args.iter().any(|a| a == "--out") {
        args.extend(["--out".to_string(), target.join(format!("bench/{what}.json")).display().to_string()]);
    }
    let mut all = vec![
        "--kubeconfig".to_string(),
        cluster.kubeconfig.display().to_string(),
        "--lb".to_string(),
        target.join("release/lb").display().to_string(),
    ];
    all.extend(args);
    let res = lb_dev(&["bench", what], &all);
    let down = kube::down(&dir);
    res.and(down)
}

/// The workspace's target directory, as cargo sees it (honours CARGO_TARGET_DIR).
fn target_dir() -> Result<std::path::PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let dir = v["target_directory"].as_str().context("cargo metadata has no target_directory")?;
    Ok(dir.into())
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status =
        Command::new(&cargo).args(args).status().with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
