//! Developer tool behind `cargo xtask bench ...` and `cargo xtask demo datapath`: runs
//! the real datapath through BPF_PROG_TEST_RUN. Needs root.

use std::{fmt::Write as _, net::Ipv4Addr, path::PathBuf, sync::Barrier};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use clap::{Parser, Subcommand, ValueEnum};
use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, NO_BACKENDS_REJECT, Reason, SVC_F_AFFINITY, ServiceValue, map_names};
use lb_testing::{BPF_F_NO_COMMON_LRU, Datapath, Hook, Verdict, conntrack_map_info, run_on};
/// The benchmark floor programs (`floor` for XDP, `floor_tc` for tc: pass, nothing else).
static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_FLOOR_OBJECT"));

#[derive(Parser, Debug)]
#[command(name = "lb-dev", about = "lb developer tool: datapath benchmark and demo")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
    /// Demonstrations.
    Demo {
        #[command(subcommand)]
        what: Demo,
    },
    /// Packet fuzzer: generated packets through lb_xdp, lb_tc and lb_tc_egress, every
    /// run checked (`lb_testing::fuzz`); stops at the first failure and prints it as a
    /// fixture.
    Fuzz {
        /// Generated packets (each goes through all three entry points).
        #[arg(long, default_value_t = 1_000_000, env = "LB_FUZZ_PACKETS")]
        packets: u64,
        /// PRNG seed; random (and printed) when not given.
        #[arg(long, env = "LB_FUZZ_SEED")]
        seed: Option<u64>,
        /// Check the maps' consistency every this many packets (1: after every packet,
        /// to find the one that broke them).
        #[arg(long, default_value_t = 2_000, env = "LB_FUZZ_CHECK_EVERY",
              value_parser = clap::value_parser!(u64).range(1..))]
        check_every: u64,
    },
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// ns per packet through BPF_PROG_TEST_RUN: floor, conntrack hit, new flow,
    /// non-service traffic, for lb_xdp and lb_tc, at several service counts; conntrack
    /// hit and new flow also on two CPUs at once.
    Datapath {
        /// Repetitions per measurement (the kernel reports the mean).
        #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
        /// Service counts to load, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "10,1000,100000")]
        services: Vec<u32>,
        /// Backends per service.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
        backends: u32,
        /// Measurements per cell; the median is reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=15))]
        rounds: u32,
        /// Backend counts for the new-flow case's backends dimension (10 services of each),
        /// comma separated; empty for none.
        #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000",
              value_parser = clap::value_parser!(u32).range(1..=8192))]
        new_flow_backends: Vec<u32>,
        /// Conntrack map kind: one LRU list shared by all CPUs (the loader's map, as in
        /// production), one per CPU (BPF_F_NO_COMMON_LRU), or both, one full set each.
        #[arg(long, value_enum, default_value_t = CtLru::Both)]
        ct_lru: CtLru,
        /// Where to write the JSON results.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Agent: network programming latency (API write to map) and full sync time and RSS,
    /// against a running API server.
    Agent {
        /// kubeconfig of the API server to use (its objects in namespace lb-bench).
        #[arg(long)]
        kubeconfig: PathBuf,
        /// The `lb` binary to run as the agent (a release build for real numbers).
        #[arg(long)]
        lb: PathBuf,
        /// Changes to time for the latency percentiles.
        #[arg(long, default_value_t = 1000)]
        changes: usize,
        /// Services for the full sync.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Endpoints per service for the full sync.
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        /// Where to write the JSON results.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Soak: EndpointSlice churn at 20 changes/s and 100 requests/s through the
    /// ClusterIPs, against a running API server; the agent's RSS, fds and programming
    /// latency per window, and every failed request. Exits non-zero on a failed verdict.
    Soak {
        /// kubeconfig of the API server to use (on 127.0.0.1; objects in namespace lb-soak).
        #[arg(long, env = "LB_SOAK_KUBECONFIG")]
        kubeconfig: PathBuf,
        /// The `lb` binary to run as the agent (a release build for real numbers).
        #[arg(long, env = "LB_SOAK_LB")]
        lb: PathBuf,
        /// How long to churn (`30m`, `90s`).
        #[arg(long, default_value = "30m", env = "LB_SOAK_DURATION", value_parser = lb_dev::bench_soak::parse_duration)]
        duration: std::time::Duration,
        /// CI length: 2 minutes (overrides --duration).
        #[arg(long, env = "LB_SOAK_CI")]
        ci: bool,
        /// Sampling window (`10s`).
        #[arg(long, default_value = "10s", env = "LB_SOAK_WINDOW", value_parser = lb_dev::bench_soak::parse_duration)]
        window: std::time::Duration,
        /// API writes per second (the Kubernetes scalability SLO's 20).
        #[arg(long, default_value_t = 20.0, env = "LB_SOAK_CHANGES_PER_S")]
        changes_per_s: f64,
        /// Requests per second through the ClusterIPs (half TCP, half UDP).
        #[arg(long, default_value_t = 100.0, env = "LB_SOAK_REQUESTS_PER_S")]
        requests_per_s: f64,
        /// Stable Services, with traffic (1..=20).
        #[arg(long, default_value_t = 8, env = "LB_SOAK_SERVICES")]
        services: usize,
        /// PRNG seed of the churn.
        #[arg(long, default_value_t = 1, env = "LB_SOAK_SEED")]
        seed: u64,
        /// The agent's /metrics port, on the node namespace's loopback.
        #[arg(long, default_value_t = 17634, env = "LB_SOAK_METRICS_PORT")]
        metrics_port: u16,
        /// Where to write the JSON results.
        #[arg(long, env = "LB_SOAK_OUT")]
        out: Option<PathBuf>,
    },
    /// iperf3 TCP throughput through a ClusterIP on veths, per attach mode (tc,
    /// xdp-generic, xdp), against direct pod-to-pod in the same run.
    Veth {
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=60))]
        seconds: u32,
        /// Where to write the JSON results.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CtLru {
    /// One LRU list for all CPUs.
    Common,
    /// One LRU list per CPU (BPF_F_NO_COMMON_LRU).
    Percpu,
    /// Common, then percpu.
    Both,
}

impl CtLru {
    fn kinds(self) -> &'static [CtLru] {
        match self {
            CtLru::Common => &[CtLru::Common],
            CtLru::Percpu => &[CtLru::Percpu],
            CtLru::Both => &[CtLru::Common, CtLru::Percpu],
        }
    }
    fn name(self) -> &'static str {
        match self {
            CtLru::Common => "common",
            CtLru::Percpu => "percpu",
            CtLru::Both => "both",
        }
    }
    /// `map_flags` of the conntrack map; 0 leaves its creation to the loader.
    fn flags(self) -> u32 {
        if self == CtLru::Percpu { BPF_F_NO_COMMON_LRU } else { 0 }
    }
}

#[derive(Subcommand, Debug)]
enum Demo {
    /// Load the program, push crafted packets through both entry points, print the
    /// headers before and after and the verdicts.
    Datapath,
}

fn main() -> Result<()> {
    // Before any thread starts (see lb_netns::interrupt): the soak cleans up on Ctrl-C.
    lb_netns::interrupt::install();
    match Cli::parse().cmd {
        Cmd::Bench { what: Bench::Datapath { repeat, services, backends, rounds, ct_lru, new_flow_backends, out } } => {
            bench_datapath(repeat, &services, backends, rounds, ct_lru, &new_flow_backends, out)
        }
        Cmd::Bench { what: Bench::Veth { seconds, out } } => {
            let json = lb_dev::bench_veth::run(seconds)?;
            write_json(out, &json)
        }
        Cmd::Bench { what: Bench::Agent { kubeconfig, lb, changes, services, endpoints, out } } => {
            let mut opts = lb_dev::bench_agent::BenchOpts::new(kubeconfig, lb);
            opts.changes = changes;
            opts.services = services;
            opts.endpoints = endpoints;
            let report = lb_dev::bench_agent::run(&opts)?;
            print!("{}", report.table());
            if let Some(out) = out {
                lb_dev::bench_agent::write_json(&report, &out)?;
                println!("wrote {}", out.display());
            }
            Ok(())
        }
        Cmd::Bench {
            what:
                Bench::Soak {
                    kubeconfig,
                    lb,
                    duration,
                    ci,
                    window,
                    changes_per_s,
                    requests_per_s,
                    services,
                    seed,
                    metrics_port,
                    out,
                },
        } => {
            let mut opts = lb_dev::bench_soak::SoakOpts::new(kubeconfig, lb);
            opts.duration = if ci { std::time::Duration::from_secs(120) } else { duration };
            opts.window = window;
            opts.changes_per_s = changes_per_s;
            opts.requests_per_s = requests_per_s;
            opts.services = services;
            opts.seed = seed;
            opts.metrics_port = metrics_port;
            let report = lb_dev::bench_soak::run(&opts)?;
            print!("{}", report.table());
            if let Some(out) = out {
                lb_dev::bench_soak::write_json(&report, &out)?;
                println!("wrote {}", out.display());
            }
            anyhow::ensure!(report.verdict.ok, "the soak's verdict failed (see above)");
            Ok(())
        }
        Cmd::Demo { what: Demo::Datapath } => demo_datapath(),
        Cmd::Fuzz { packets, seed, check_every } => {
            // A random seed from the clock and the pid: enough to differ run to run.
            let seed = seed.unwrap_or_else(|| {
                let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                lb_testing::fuzz::Rng::new(t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)).next_u64()
            });
            println!("fuzz: {packets} packets, seed {seed} (replay with --seed {seed})");
            let opts = lb_testing::fuzz::Options { check_every, ..lb_testing::fuzz::Options::new(packets, seed) };
            let report = lb_testing::fuzz::run(&opts)?;
            print!("{}", report.table());
            Ok(())
        }
    }
}

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn syn(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1, 64240)
        .syn()
        .write(&mut v, &[])
        .unwrap_or_default();
    v
}

fn ack(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 2, 64240)
        .ack(1)
        .write(&mut v, payload)
        .unwrap_or_default();
    v
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut v, payload)
        .unwrap_or_default();
    v
}

/// ClusterIP number `i`: 10.96.0.0/12 has room for a million.
fn vip(i: u32) -> [u8; 4] {
    [10, 96 + (i >> 16) as u8, (i >> 8) as u8, i as u8]
}

fn addr(a: [u8; 4]) -> String {
    Ipv4Addr::from(a).to_string()
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The no-op floor of `hook` (XDP, or tc for both tc hooks).
fn floor_ns(floor: &Ebpf, hook: Hook, packet: &[u8], repeat: u32, rounds: u32) -> Result<u64> {
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions { data_in: Some(packet), data_out: Some(&mut out), repeat, ..Default::default() };
        let res = if hook == Hook::Xdp {
            let p: &Xdp = floor.program("floor").context("floor program")?.try_into()?;
            p.test_run(opts)?
        } else {
            let p: &SchedClassifier = floor.program("floor_tc").context("floor_tc program")?.try_into()?;
            p.test_run(opts)?
        };
        samples.push(res.duration.as_nanos() as u64);
    }
    Ok(median(samples))
}

/// The floor program of each hook, loaded.
fn load_floor() -> Result<Ebpf> {
    let mut floor = Ebpf::load(FLOOR_OBJECT).context("loading the floor programs")?;
    let fp: &mut Xdp = floor.program_mut("floor").context("floor program")?.try_into()?;
    fp.load().context("verifying the floor program")?;
    let tp: &mut SchedClassifier = floor.program_mut("floor_tc").context("floor_tc program")?.try_into()?;
    tp.load().context("verifying the floor_tc program")?;
    Ok(floor)
}

fn timed(ebpf: &Ebpf, hook: Hook, packet: &[u8], repeat: u32, rounds: u32, want: Verdict) -> Result<u64> {
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let (verdict, _, ns) = run_on(ebpf, hook, packet, repeat)?;
        anyhow::ensure!(
            verdict == want,
            "{hook:?}: verdict {verdict:?}, expected {want:?}: the benchmark is not measuring what it says"
        );
        samples.push(ns);
    }
    Ok(median(samples))
}

/// The CPUs of the two-CPU cases.
const CPUS: [usize; 2] = [0, 1];
/// Client source ports of the second CPU's conntrack-hit and new-flow packets.
const HIT2_PORT: u16 = 40004;
const NEW2_PORT: u16 = 40005;

/// Pins the calling thread to `cpu`. BPF_PROG_TEST_RUN runs the program on the calling
/// thread's CPU with migration disabled for the whole run, so this pins the run.
fn pin_to_cpu(cpu: usize) -> Result<()> {
    use nix::sched::{CpuSet, sched_getcpu, sched_setaffinity};
    let mut set = CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    // Pid 0: the calling thread.
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).with_context(|| format!("pinning a thread to CPU {cpu}"))?;
    let on = sched_getcpu().context("sched_getcpu")?;
    anyhow::ensure!(on == cpu, "pinned to CPU {cpu}, running on {on}");
    Ok(())
}

/// `timed` on two CPUs at once: `packets[i]` through `hook` on `CPUS[i]`, both runs of
/// a round released together by a barrier. Returns each CPU's median.
fn timed_2cpu(
    ebpf: &Ebpf,
    hook: Hook,
    packets: [&[u8]; 2],
    repeat: u32,
    rounds: u32,
    want: Verdict,
) -> Result<[u64; 2]> {
    let barrier = Barrier::new(CPUS.len());
    let run = |cpu: usize, packet: &[u8]| -> Result<u64> {
        // A thread that failed keeps meeting the other at every barrier, or the other
        // would wait forever; the first error is reported after the last round.
        let mut err = pin_to_cpu(cpu).err();
        let mut samples = Vec::new();
        for _ in 0..rounds {
            barrier.wait();
            if err.is_some() {
                continue;
            }
            match run_on(ebpf, hook, packet, repeat) {
                Ok((verdict, _, ns)) if verdict == want => samples.push(ns),
                Ok((verdict, ..)) => {
                    err = Some(anyhow::anyhow!(
                        "{hook:?} on CPU {cpu}: verdict {verdict:?}, expected {want:?}: \
                         the benchmark is not measuring what it says"
                    ))
                }
                Err(e) => err = Some(e.context(format!("{hook:?} on CPU {cpu}"))),
            }
        }
        err.map_or_else(|| Ok(median(samples)), Err)
    };
    let results: Vec<Result<u64>> = std::thread::scope(|s| {
        let threads: Vec<_> =
            CPUS.iter().zip(packets).map(|(&cpu, packet)| s.spawn(move || run(cpu, packet))).collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("benchmark thread panicked"))))
            .collect()
    });
    let mut ns = [0; 2];
    for (slot, r) in ns.iter_mut().zip(results) {
        *slot = r?;
    }
    Ok(ns)
}

/// Fails unless `reason` grew by at least `min` on each of `CPUS` between two
/// `Datapath::stat_per_cpu` readings: proof that each thread's run took the path it
/// is named after, on its own CPU.
fn ensure_per_cpu(
    dp: &mut Datapath,
    reason: Reason,
    before: &[lb_common::Counter],
    min: u64,
    what: &str,
) -> Result<()> {
    let after = dp.stat_per_cpu(reason);
    for cpu in CPUS {
        let grew = after.get(cpu).zip(before.get(cpu)).map_or(0, |(a, b)| a.packets.saturating_sub(b.packets));
        anyhow::ensure!(grew >= min, "{what}: {reason:?} grew by {grew} on CPU {cpu}, expected at least {min}");
    }
    Ok(())
}

fn bench_datapath(
    repeat: u32,
    scales: &[u32],
    backends: u32,
    rounds: u32,
    ct_lru: CtLru,
    new_flow_backends: &[u32],
    out: Option<PathBuf>,
) -> Result<()> {
    let client = [10, 244, 0, 5];
    let target = vip(target_id(0, scales) - 1);
    let hit = ack(client, 40000, target, 80, b"payload");
    let new = syn(client, 40001, target, 80);
    let other = ack(client, 40002, [192, 0, 2, 1], 80, b"payload");
    // The second CPU's flows of the two-CPU cases: other source ports, so that the
    // conntrack-hit case hits two established flows, one per CPU.
    let hit2 = ack(client, HIT2_PORT, target, 80, b"payload");
    let new2 = syn(client, NEW2_PORT, target, 80);
    let two_cpus = std::thread::available_parallelism().is_ok_and(|n| n.get() >= CPUS.len());
    if !two_cpus {
        eprintln!("  fewer than {} CPUs: no two-CPU cases", CPUS.len());
    }

    let floor = load_floor()?;

    println!(
        "lb datapath benchmark: BPF_PROG_TEST_RUN, repeat {repeat}, median of {rounds}, {backends} backends/service"
    );
    let mut rows = Vec::new();
    let mut table = String::new();
    writeln!(
        table,
        "{:>9} {:<26} {:>6} {:>6} {:>9} {:>10}",
        "services", "case", "hook", "ct_lru", "ns/pkt", "x floor"
    )?;
    for &n in scales {
        for &kind in ct_lru.kinds() {
            // SERVICES holds a frontend and an address marker per service.
            let dp_sizes = [
                (map_names::SERVICES, (2 * n + 64).max(1024)),
                (map_names::BACKENDS, (n * backends + 64 * 64).max(1024)),
                (map_names::TABLES, ((n + 1) * (agent_table_size(backends).div_ceil(4) + 1)).max(1 << 16)),
            ];
            let mut dp = Datapath::load_full(&dp_sizes, false, kind.flags())?;
            let t0 = std::time::Instant::now();
            load_services(&mut dp, n, backends, target, target_id(n, scales))?;
            eprintln!(
                "  loaded {n} services x {backends} backends in {:.1} s ({} LRU conntrack)",
                t0.elapsed().as_secs_f64(),
                kind.name()
            );
            let bypass = dp.load_sharing_maps(true)?;
            // Both copies on the one conntrack map, of the kind this set is named after.
            let (ct, ct_bypass) = (conntrack_map_info(&dp.ebpf)?, conntrack_map_info(&bypass)?);
            anyhow::ensure!(
                ct.id() == ct_bypass.id() && ct.map_flags() & BPF_F_NO_COMMON_LRU == kind.flags(),
                "conntrack maps {} (flags {:#x}) and {} (bypass copy), expected one map with {} LRU",
                ct.id(),
                ct.map_flags(),
                ct_bypass.id(),
                kind.name()
            );
            let floors =
                [floor_ns(&floor, Hook::Xdp, &hit, repeat, rounds)?, floor_ns(&floor, Hook::Tc, &hit, repeat, rounds)?];
            let lru = kind.name();
            // `per_cpu`: the two-CPU cases' medians per CPU; `ns` is then the slower.
            // Ratios are to the floor of the same hook.
            let mut push = |case: &str, hook: Hook, ns: u64, per_cpu: Option<[u64; 2]>| {
                let hook_s = format!("{hook:?}").to_lowercase();
                let floor_ns = if hook == Hook::Xdp { floors[0] } else { floors[1] };
                let ratio = ns as f64 / floor_ns.max(1) as f64;
                let _ = write!(table, "{n:>9} {case:<26} {hook_s:>6} {lru:>6} {ns:>9} {ratio:>10.2}");
                let mut row = serde_json::json!({
                    "services": n, "case": case, "hook": hook_s, "ct_lru": lru,
                    "cpus": per_cpu.map_or(1, |p| p.len()), "ns": ns, "x_floor": ratio,
                });
                if let Some(p) = per_cpu {
                    let _ = write!(table, "   per CPU {}", p.map(|ns| ns.to_string()).join(" / "));
                    row["ns_per_cpu"] = serde_json::json!(p);
                }
                let _ = writeln!(table);
                rows.push(row);
            };
            push("(a) no-op floor", Hook::Xdp, floors[0], None);
            push("(a) no-op floor", Hook::Tc, floors[1], None);
            for hook in Hook::BOTH {
                dp.clear_conntrack()?;
                run_on(&dp.ebpf, hook, &syn(client, 40000, target, 80), 1)?;
                let b = timed(&dp.ebpf, hook, &hit, repeat, rounds, Verdict::Pass)?;
                anyhow::ensure!(dp.stat(Reason::FwdEstablished).packets > 0, "conntrack-hit case never hit conntrack");
                push("(b) conntrack hit", hook, b, None);
                let fwd_new = dp.stat(Reason::FwdNew).packets;
                let c = timed(&bypass, hook, &new, repeat, rounds, Verdict::Pass)?;
                let grew = dp.stat(Reason::FwdNew).packets - fwd_new;
                anyhow::ensure!(
                    grew >= u64::from(repeat) * u64::from(rounds),
                    "new-flow case took the new-flow path only {grew} times"
                );
                push("(c) new flow", hook, c, None);
                let d = timed(&dp.ebpf, hook, &other, repeat, rounds, Verdict::Pass)?;
                push("(d) non-service", hook, d, None);
                if !two_cpus {
                    continue;
                }
                let all = u64::from(repeat) * u64::from(rounds);
                dp.clear_conntrack()?;
                for port in [40000, HIT2_PORT] {
                    run_on(&dp.ebpf, hook, &syn(client, port, target, 80), 1)?;
                }
                let before = dp.stat_per_cpu(Reason::FwdEstablished);
                let b2 = timed_2cpu(&dp.ebpf, hook, [&hit, &hit2], repeat, rounds, Verdict::Pass)?;
                // The first repetition's rewrite starts the return leg of the cycle (see
                // `add_return_services`) as a new flow; every other one is a hit.
                ensure_per_cpu(&mut dp, Reason::FwdEstablished, &before, all - 1, "two-CPU conntrack-hit case")?;
                push("(b2) conntrack hit, 2 CPUs", hook, b2[0].max(b2[1]), Some(b2));
                let before = dp.stat_per_cpu(Reason::FwdNew);
                let c2 = timed_2cpu(&bypass, hook, [&new, &new2], repeat, rounds, Verdict::Pass)?;
                ensure_per_cpu(&mut dp, Reason::FwdNew, &before, all, "two-CPU new-flow case")?;
                push("(c2) new flow, 2 CPUs", hook, c2[0].max(c2[1]), Some(c2));
            }
            // What every packet to a pod pays on the pod interface's egress hook when it is
            // no reply of a NATed flow: one conntrack lookup that misses.
            let to_pod = ack([192, 0, 2, 1], 80, client, 40003, b"payload");
            let e = timed(&dp.ebpf, Hook::TcEgress, &to_pod, repeat, rounds, Verdict::Pass)?;
            push("(e) egress, no reply", Hook::TcEgress, e, None);
        }
    }
    rows.extend(bench_backends(&floor, repeat, rounds, new_flow_backends, &mut table)?);
    print!("{table}");

    // Targets from the issue, judged on what was just measured, per conntrack kind.
    let mut verdicts = Vec::new();
    let (lo, hi) = (scales.iter().copied().min().unwrap_or(0), scales.iter().copied().max().unwrap_or(0));
    for &kind in ct_lru.kinds() {
        let get = |n: u32, case: &str, hook: &str| {
            rows.iter()
                .find(|r| {
                    r["services"] == n
                        && r["case"].as_str().is_some_and(|c| c.starts_with(case))
                        && r["hook"] == hook
                        && r["ct_lru"] == kind.name()
                })
                .and_then(|r| r["ns"].as_u64())
        };
        let lru = if ct_lru.kinds().len() > 1 { format!(", {} LRU", kind.name()) } else { String::new() };
        for hook in ["xdp", "tc"] {
            for &n in scales {
                let floor = get(n, "(a)", hook).unwrap_or(1) as f64;
                let hit_limit = if hook == "xdp" { 3.0 } else { 4.0 };
                if let Some(b) = get(n, "(b)", hook) {
                    verdicts.push(target_line(
                        &format!("{hook} (b) conntrack hit <= {hit_limit}x floor @{n}{lru}"),
                        b as f64 / floor,
                        hit_limit,
                    ));
                }
                if let Some(c) = get(n, "(c)", hook) {
                    verdicts.push(target_line(
                        &format!("{hook} (c) new flow <= 12x floor @{n}{lru}"),
                        c as f64 / floor,
                        12.0,
                    ));
                }
                if let Some(d) = get(n, "(d)", hook) {
                    verdicts.push(target_line(
                        &format!("{hook} (d) non-service <= 1.5x floor @{n}{lru}"),
                        d as f64 / floor,
                        1.5,
                    ));
                }
            }
            for case in ["(b)", "(c)"] {
                if let (Some(a), Some(b)) = (get(lo, case, hook), get(hi, case, hook)) {
                    verdicts.push(target_line(
                        &format!("{hook} {case} {hi} vs {lo} services <= 1.2x{lru}"),
                        b as f64 / a.max(1) as f64,
                        1.2,
                    ));
                }
            }
        }
    }
    // The backends dimension: flat in the number of backends.
    let by_backends = |nb: u32, hook: &str| {
        rows.iter()
            .find(|r| r["backends"] == nb && r["hook"] == hook)
            .and_then(|r| Some((r["ns"].as_u64()?, r["floor_ns"].as_u64()?)))
    };
    if let (Some(&lo), Some(&hi)) = (new_flow_backends.iter().min(), new_flow_backends.iter().max()) {
        for hook in ["xdp", "tc"] {
            if let (Some((a, _)), Some((b, floor))) = (by_backends(lo, hook), by_backends(hi, hook)) {
                verdicts.push(target_line(
                    &format!("{hook} (c) new flow {hi} vs {lo} backends <= 1.2x"),
                    b as f64 / a.max(1) as f64,
                    1.2,
                ));
                verdicts.push(target_line(
                    &format!("{hook} (c) new flow <= 12x floor @{hi} backends"),
                    b as f64 / floor.max(1) as f64,
                    12.0,
                ));
            }
        }
    }
    println!("\ntargets:");
    for (line, _) in &verdicts {
        println!("  {line}");
    }
    let json = serde_json::json!({
            "repeat": repeat, "rounds": rounds, "backends_per_service": backends, "ct_lru": ct_lru.name(),
            "results": rows,
            "targets": verdicts.iter().map(|(l, ok)| serde_json::json!({"target": l, "met": ok})).collect::<Vec<_>>(),
    });
    write_json(out, &json)
}

fn write_json(out: Option<PathBuf>, json: &serde_json::Value) -> Result<()> {
    let Some(out) = out else { return Ok(()) };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(json)?).with_context(|| format!("writing {}", out.display()))?;
    println!("\nwrote {}", out.display());
    Ok(())
}

fn target_id(_n: u32, scales: &[u32]) -> u32 {
    7 % scales.iter().copied().min().unwrap_or(1).max(1) + 1
}

/// BPF_PROG_TEST_RUN reruns the program on the packet as the previous repetition left
/// it, so a DNAT'd packet would be "non-service" from the second repetition on. Make
/// the rewrite a cycle instead: for every backend B (`targets`) of the target service
/// `vip_id`, a service B:8080 whose one backend is the ClusterIP:80, with a table of
/// the target's size that sends every bucket to it (one table shared by all of them:
/// tables are plain words). Every repetition is then a real lookup, a read of a table
/// as large as the target's, and a rewrite.
fn add_return_services(dp: &mut Datapath, vip: [u8; 4], vip_id: u32, targets: &[[u8; 4]], first_id: u32) -> Result<()> {
    let size = dp.table(vip_id).context("the target service has no table")?.size();
    let words = vec![0x0001_0001_0001_0001u64; size.div_ceil(lb_common::TABLE_LANES) as usize];
    let off = dp.put_table_words(&words)?;
    for (b, back) in targets.iter().enumerate() {
        let id = first_id + b as u32;
        dp.put_service(&addr(*back), 8080, IPPROTO_TCP, ServiceValue { id, count: 1, ..Default::default() })?;
        dp.put_backends(id, &[(id, &addr(vip), 80)])?;
        dp.point_at_table(id, off, size)?;
    }
    Ok(())
}

/// Address of backend `b` (< 2^14) of service `i` (< 256 when `b` >= 64).
fn backend_addr(i: u32, b: u32) -> [u8; 4] {
    if b < 64 { [10, 128 + b as u8, (i >> 8) as u8, i as u8] } else { [10, 192 + (b >> 8) as u8, b as u8, i as u8] }
}

/// Loads `n` services of `backends` backends each (ids 1..=n; backend ids from
/// `id * 16384`), and the return services of the target.
fn load_services(dp: &mut Datapath, n: u32, backends: u32, target: [u8; 4], target_id: u32) -> Result<()> {
    for i in 0..n {
        let id = i + 1;
        dp.put_service(&addr(vip(i)), 80, IPPROTO_TCP, ServiceValue { id, count: backends, ..Default::default() })?;
        let be: Vec<(u32, String, u16)> =
            (0..backends).map(|b| (id * 16384 + b, addr(backend_addr(i, b)), 8080)).collect();
        let be: Vec<(u32, &str, u16)> = be.iter().map(|(i, a, p)| (*i, a.as_str(), *p)).collect();
        dp.put_backends(id, &be)?;
    }
    let targets: Vec<[u8; 4]> = (0..backends).map(|b| backend_addr(target_id - 1, b)).collect();
    add_return_services(dp, target, target_id, &targets, n + 1)
}

/// The new-flow case at each backend count of `counts` (10 services of that many
/// backends each), both hooks, the loader's conntrack map: rows for the backends
/// dimension, with their own floor.
fn bench_backends(
    floor: &Ebpf,
    repeat: u32,
    rounds: u32,
    counts: &[u32],
    table: &mut String,
) -> Result<Vec<serde_json::Value>> {
    let client = [10, 244, 0, 5];
    let n = 10;
    let target = vip(target_id(0, &[n]) - 1);
    let new = syn(client, 40001, target, 80);
    let mut rows = Vec::new();
    for &nb in counts {
        let words = 2 * (n + nb) * (agent_table_size(nb).div_ceil(4) + 1) + 1024;
        let sizes = [
            (map_names::SERVICES, (2 * (n + nb) + 64).max(1024)),
            (map_names::BACKENDS, (n * nb + nb + 64).max(1024)),
            (map_names::TABLES, words.max(1 << 16)),
        ];
        let mut dp = Datapath::load_with(&sizes)?;
        load_services(&mut dp, n, nb, target, target_id(n, &[n]))?;
        let bypass = dp.load_sharing_maps(true)?;
        for hook in Hook::BOTH {
            let floor_ns = floor_ns(floor, hook, &new, repeat, rounds)?;
            let before = dp.stat(Reason::FwdNew).packets;
            let c = timed(&bypass, hook, &new, repeat, rounds, Verdict::Pass)?;
            let grew = dp.stat(Reason::FwdNew).packets - before;
            anyhow::ensure!(
                grew >= u64::from(repeat) * u64::from(rounds),
                "new-flow case took the new-flow path only {grew} times"
            );
            let hook_s = format!("{hook:?}").to_lowercase();
            let ratio = c as f64 / floor_ns.max(1) as f64;
            let case = format!("(c) new flow, {nb} backends");
            writeln!(table, "{n:>9} {case:<26} {hook_s:>6} {:>6} {c:>9} {ratio:>10.2}", "common")?;
            rows.push(serde_json::json!({
                "services": n, "backends": nb, "case": "(c) new flow", "hook": hook_s, "ct_lru": "common",
                "cpus": 1, "ns": c, "x_floor": ratio, "floor_ns": floor_ns,
            }));
        }
    }
    Ok(rows)
}

/// The size of the table the agent gives `n` backends.
fn agent_table_size(n: u32) -> u32 {
    lb_userspace::agent::table::size_for(n as usize)
}

fn target_line(what: &str, ratio: f64, limit: f64) -> (String, bool) {
    let ok = ratio <= limit;
    (format!("{what}: {ratio:.2} -> {}", if ok { "met" } else { "MISSED" }), ok)
}

/// One line per header set: "TCP 10.244.0.5:40000 -> 10.96.0.10:80 [S]".
fn describe(frame: &[u8]) -> String {
    let Ok(h) = PacketHeaders::from_ethernet_slice(frame) else {
        return format!("{} bytes, not parseable", frame.len());
    };
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else { return "not IPv4".into() };
    let (s, d) = (Ipv4Addr::from(ip.source), Ipv4Addr::from(ip.destination));
    match &h.transport {
        Some(TransportHeader::Tcp(t)) => {
            let flags = [(t.syn, 'S'), (t.ack, '.'), (t.fin, 'F'), (t.rst, 'R')]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, c)| *c)
                .collect::<String>();
            format!("TCP  {s}:{} -> {d}:{} [{flags}] csum {:#06x}", t.source_port, t.destination_port, t.checksum)
        }
        Some(TransportHeader::Udp(u)) => {
            format!("UDP  {s}:{} -> {d}:{} csum {:#06x}", u.source_port, u.destination_port, u.checksum)
        }
        Some(TransportHeader::Icmpv4(i)) => format!("ICMP {s} -> {d} {:?}", i.icmp_type),
        _ => format!("IPv4 {s} -> {d} proto {}", ip.protocol.0),
    }
}

fn demo_datapath() -> Result<()> {
    println!("lb datapath demo: the real lb_xdp and lb_tc programs, packets through BPF_PROG_TEST_RUN\n");
    let mut dp = Datapath::load().context("loading the datapath (are you root?)")?;
    println!("loaded and verified lb_xdp (XDP) and lb_tc (tc clsact); maps pinned on a private bpffs\n");
    println!("services programmed:");
    let web = [10, 96, 0, 10];
    dp.put_service(&addr(web), 80, IPPROTO_TCP, ServiceValue { id: 1, count: 3, ..Default::default() })?;
    dp.put_backends(1, &[(11, "10.244.1.11", 8080), (12, "10.244.2.12", 8080), (13, "10.244.1.13", 8080)])?;
    println!("  10.96.0.10:80/TCP  -> 10.244.1.11:8080, 10.244.2.12:8080, 10.244.1.13:8080");
    dp.put_service(&addr(web), 53, IPPROTO_UDP, ServiceValue { id: 2, count: 1, ..Default::default() })?;
    dp.put_backends(2, &[(21, "10.244.1.21", 5353)])?;
    println!("  10.96.0.10:53/UDP  -> 10.244.1.21:5353");
    let sticky =
        ServiceValue { id: 3, count: 3, flags: SVC_F_AFFINITY, affinity_timeout_s: 10800, ..Default::default() };
    dp.put_service("10.96.0.20", 80, IPPROTO_TCP, sticky)?;
    dp.put_backends(3, &[(31, "10.244.1.31", 8080), (32, "10.244.2.32", 8080), (33, "10.244.1.33", 8080)])?;
    println!("  10.96.0.20:80/TCP  -> 3 backends, sessionAffinity: ClientIP (10800 s)");
    let empty = ServiceValue { id: 4, count: 0, no_backends: NO_BACKENDS_REJECT, ..Default::default() };
    dp.put_service("10.96.0.30", 80, IPPROTO_TCP, empty)?;
    println!("  10.96.0.30:80/TCP  -> no ready endpoints (reject)\n");

    let c1 = [10, 244, 0, 5];
    let steps: Vec<(&str, Vec<u8>)> = vec![
        ("new TCP connection to the ClusterIP", syn(c1, 40000, web, 80)),
        ("the same connection's next packet (conntrack)", ack(c1, 40000, web, 80, b"GET /")),
        ("the backend's reply (reverse NAT)", ack([0; 4], 8080, c1, 40000, b"200 OK")),
        ("another connection, other source port", syn(c1, 40001, web, 80)),
        ("UDP to the ClusterIP", udp(c1, 5000, web, 53, b"query")),
        ("affinity service, connection 1", syn(c1, 41000, [10, 96, 0, 20], 80)),
        ("affinity service, connection 2 (same client)", syn(c1, 41001, [10, 96, 0, 20], 80)),
        ("affinity service, connection 3 (same client)", syn(c1, 41002, [10, 96, 0, 20], 80)),
        ("service without endpoints", syn(c1, 42000, [10, 96, 0, 30], 80)),
        ("ClusterIP on a port it does not serve", syn(c1, 43000, web, 8443)),
        ("traffic that is not for a service", syn(c1, 44000, [192, 0, 2, 1], 443)),
    ];
    for hook in Hook::BOTH {
        dp.clear_conntrack()?;
        println!("== through {} ==", if hook == Hook::Xdp { "lb_xdp (XDP)" } else { "lb_tc (tc)" });
        let mut backend_of_first: Option<[u8; 4]> = None;
        for (what, mut pkt) in steps.clone() {
            if what.starts_with("the backend's reply") {
                // Reply from whichever backend the first connection got.
                let be = backend_of_first.context("no backend chosen for the first connection")?;
                pkt = ack(be, 8080, c1, 40000, b"200 OK");
            }
            let before = dp.stats();
            let (verdict, out, _) = dp.run(hook, &pkt, 1)?;
            let after = dp.stats();
            let reasons: Vec<&str> = before
                .iter()
                .zip(&after)
                .filter(|((_, b), (_, a))| a.packets > b.packets)
                .map(|((r, _), _)| r.name())
                .collect();
            let verdict_s = match (hook, verdict) {
                (Hook::Xdp, Verdict::Pass) => "XDP_PASS",
                (Hook::Xdp, Verdict::Drop) => "XDP_DROP",
                (Hook::Xdp, Verdict::Bounce) => "XDP_TX",
                (Hook::Xdp, Verdict::Aborted) => "XDP_ABORTED",
                (Hook::Tc | Hook::TcEgress, Verdict::Pass) => "tc next (TC_ACT_UNSPEC)",
                (Hook::Tc | Hook::TcEgress, Verdict::Drop) => "TC_ACT_SHOT",
                (Hook::Tc | Hook::TcEgress, Verdict::Bounce) => "TC_ACT_REDIRECT",
                (Hook::Tc | Hook::TcEgress, Verdict::Aborted) => "aborted",
            };
            println!("  {what}");
            println!("    in : {}", describe(&pkt));
            println!("    out: {}   {verdict_s}  ({})", describe(&out), reasons.join(", "));
            if backend_of_first.is_none()
                && let Ok(h) = PacketHeaders::from_ethernet_slice(&out)
                && let Some(NetHeaders::Ipv4(ip, _)) = h.net
            {
                backend_of_first = Some(ip.destination);
            }
        }
        println!();
    }
    println!("counters (STATS, summed over CPUs):");
    for (r, c) in dp.stats() {
        if c.packets > 0 {
            println!("  {:<22} {:>4} packets {:>6} bytes", r.name(), c.packets, c.bytes);
        }
    }
    println!("\nconntrack entries: {}", dp.conntrack().len());
    Ok(())
}
