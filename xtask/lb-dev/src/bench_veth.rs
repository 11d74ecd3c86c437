//! TCP throughput from a client pod to a server pod over veths, directly and through
//! the ClusterIP with the datapath attached in each mode: the evidence for which attach
//! mode to default to on pod veths. Uses the `netns` topology and iperf3 (one stream),
//! so nothing runs outside the namespaces it creates.
//!
//! The direct baseline is measured first and last in the same run and averaged: the
//! machine is shared and noisy, so only ratios within one run mean much.

use std::{
    io::Read,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{IPPROTO_TCP, NO_BACKENDS_REJECT, Reason, ServiceValue};
use serde_json::{Value, json};

use lb_testing::{
    Datapath,
    netns::{self, SERVER_IP, Topology},
};
use lb_userspace::datapath::AttachMode;

const VIP: &str = "10.96.0.10";
const SERVICE_PORT: u16 = 80;
const IPERF_PORT: u16 = 5201;

/// One measured path.
#[derive(Clone, Copy)]
enum Path {
    /// Client to the pod IP, no program anywhere.
    Direct,
    /// Client to the ClusterIP, the datapath attached on both node-side veths.
    ClusterIp(AttachMode),
}

impl Path {
    fn name(self) -> String {
        match self {
            Path::Direct => "direct to pod IP, no program".into(),
            Path::ClusterIp(mode) => format!("ClusterIP, lb as {mode}"),
        }
    }
}

struct Measurement {
    path: Path,
    gbps: f64,
    retransmits: u64,
    /// Packets the datapath handled (forward and reply), 0 without it: with tc and
    /// generic XDP these are GSO/GRO aggregates, with native XDP single frames.
    program_packets: u64,
}

/// An iperf3 server in a namespace, killed (by its own pid) if still running on drop.
struct IperfServer(Child);

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Measures each path for `seconds` and prints a table; returns the same as JSON.
pub fn run(seconds: u32) -> Result<Value> {
    if seconds == 0 {
        bail!("seconds must be at least 1");
    }
    netns::remove_stale().context("removing namespaces of earlier crashed runs")?;
    let paths = [
        Path::Direct,
        Path::ClusterIp(AttachMode::Tc),
        Path::ClusterIp(AttachMode::XdpGeneric),
        Path::ClusterIp(AttachMode::Xdp),
        Path::Direct,
    ];
    let mut results = Vec::new();
    for path in paths {
        let m = measure(path, seconds).with_context(|| format!("measuring {}", path.name()))?;
        eprintln!("{:<32} {:>6.2} Gbit/s", path.name(), m.gbps);
        results.push(m);
    }
    let direct: Vec<f64> = results.iter().filter(|m| matches!(m.path, Path::Direct)).map(|m| m.gbps).collect();
    let baseline = direct.iter().sum::<f64>() / direct.len() as f64;

    println!("TCP, one iperf3 stream, {seconds} s per path; baseline = mean of the direct runs ({baseline:.2} Gbit/s)");
    println!("{:<32} {:>8} {:>8} {:>8} {:>12}", "path", "Gbit/s", "ratio", "retrans", "prog. pkts");
    for m in &results {
        println!(
            "{:<32} {:>8.2} {:>8.2} {:>8} {:>12}",
            m.path.name(),
            m.gbps,
            m.gbps / baseline,
            m.retransmits,
            m.program_packets
        );
    }

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Ok(json!({
        "seconds": seconds,
        "kernel": kernel.trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "baseline_gbps": baseline,
        "results": results.iter().map(|m| json!({
            "path": m.path.name(),
            "attach": match m.path { Path::Direct => Value::Null, Path::ClusterIp(mode) => json!(mode) },
            "gbps": m.gbps,
            "ratio": m.gbps / baseline,
            "retransmits": m.retransmits,
            "program_packets": m.program_packets,
        })).collect::<Vec<_>>(),
    }))
}

/// One iperf3 run on a fresh topology (a native XDP attach changes the peer veth's
/// offloads, so no path inherits another's device state).
fn measure(path: Path, seconds: u32) -> Result<Measurement> {
    let topo = Topology::new()?;
    // Declared after `topo`, so dropped before it: programs detach before the veths go.
    let mut dp = None;
    let target = match path {
        Path::Direct => format!("{SERVER_IP}:{IPERF_PORT}"),
        Path::ClusterIp(mode) => {
            let mut d = Datapath::load()?;
            let svc = ServiceValue {
                id: 1,
                count: 1,
                affinity_timeout_s: 0,
                flags: 0,
                no_backends: NO_BACKENDS_REJECT,
                ..Default::default()
            };
            d.put_service(VIP, SERVICE_PORT, IPPROTO_TCP, svc)?;
            d.put_backends(1, &[(1, &SERVER_IP.to_string(), IPERF_PORT)])?;
            topo.attach(&mut d.ebpf, mode)?;
            dp = Some(d);
            format!("{VIP}:{SERVICE_PORT}")
        }
    };
    let (host, port) = target.split_once(':').expect("host:port");

    let _server = IperfServer(
        topo.server
            .command("iperf3")
            .args(["-s", "-1", "-B", &SERVER_IP.to_string(), "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s; is iperf3 installed?")?,
    );
    wait_listening(&topo, IPERF_PORT)?;

    let client = topo
        .client
        .command("iperf3")
        .args(["-c", host, "-p", port, "-t", &seconds.to_string(), "-J", "--connect-timeout", "3000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting iperf3 -c")?;
    let out = wait_with_deadline(client, Duration::from_secs(seconds as u64 + 15))?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 -c output: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(err) = report.get("error") {
        bail!("iperf3 -c: {err}");
    }
    let end = &report["end"];
    let gbps = end["sum_received"]["bits_per_second"].as_f64().context("iperf3 report lacks end.sum_received")? / 1e9;
    let retransmits = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    let program_packets = match dp.as_mut() {
        None => 0,
        Some(d) => [Reason::FwdNew, Reason::FwdEstablished, Reason::RevNat].iter().map(|&r| d.stat(r).packets).sum(),
    };
    Ok(Measurement { path, gbps, retransmits, program_packets })
}

/// Polls `ss` in the server namespace until something listens on `port`.
fn wait_listening(topo: &Topology, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let filter = format!("sport = :{port}");
    loop {
        let out = topo.server.exec("ss", &["-Hltn", &filter])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("iperf3 -s did not start listening on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `child`, killing it (by its own pid) if it outlives `limit`. Its output
/// is drained meanwhile, so that a full pipe cannot stall it.
fn wait_with_deadline(mut child: Child, limit: Duration) -> Result<std::process::Output> {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("iperf3 -c still running after {limit:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    Ok(std::process::Output { status, stdout, stderr })
}
