//! Faults of the node's interfaces under a real `lb agent` in throw-away namespaces:
//! the uplink set down and up, then deleted and re-created under its name; pod
//! interfaces created and deleted at 50 a second while a flow runs through a
//! long-lived pod veth. The agent must follow (attachments pinned, the ClusterIP
//! answering) and leak nothing: the kernel's own lists of programs and links, filtered
//! to this agent's datapath, must come back to what they were. Needs root; touches
//! nothing outside the namespaces it creates.

mod faults;

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use faults::{Agent, BACKENDS, Echo, IO_TIMEOUT, KernelObjects, VIP, connect_from, echo};
use lb_testing::netns::{CLIENT_IP, NODE_CLIENT_IF, NODE_SERVER_IF, POD_IF, SERVER_GW, Topology};
use lb_userspace::agent::attach::AttachPoint;

const SETTLE: Duration = Duration::from_secs(15);

/// Interfaces of the node namespace: name -> ifindex.
fn node_links(topo: &Topology) -> Result<Vec<(String, u32)>> {
    let out = topo.node.ip(&["-o", "link", "show"])?;
    let mut v = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `12: to-client@if2: <BROADCAST,...`
        let mut it = line.splitn(3, ": ");
        let (Some(idx), Some(name)) = (it.next(), it.next()) else { continue };
        let name = name.split('@').next().unwrap_or(name);
        v.push((name.to_owned(), idx.trim().parse().with_context(|| format!("ifindex in {line:?}"))?));
    }
    Ok(v)
}

/// The pins the agent should hold for the node's interfaces now: the uplinks' one
/// hook in `uplink_mode`, the pod interfaces' tc ingress and egress.
fn expected_pins(topo: &Topology, uplinks: &[&str], pod_glob_prefix: &str, uplink_mode: &str) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for (name, ifindex) in node_links(topo)? {
        let ap = |mode: &str, egress| AttachPoint {
            iface: name.clone(),
            ifindex,
            mode: mode.parse().expect("mode"),
            egress,
            link_id: None,
            program_id: None,
        };
        if uplinks.contains(&name.as_str()) {
            v.push(ap(uplink_mode, false).pin_name());
        } else if name.starts_with(pod_glob_prefix) {
            v.push(ap("tc", false).pin_name());
            v.push(ap("tc", true).pin_name());
        }
    }
    v.sort();
    Ok(v)
}

/// One connection through the ClusterIP and an echo on it, within `timeout`.
fn echo_once(topo: &Topology, timeout: Duration) -> Result<()> {
    topo.client.run(|| {
        let mut c = connect_from(CLIENT_IP, (VIP, 80).into(), timeout)?;
        echo(&mut c, b"ping")
    })
}

/// Retries [`echo_once`] until it works, for at most `within`.
fn echo_within(topo: &Topology, within: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        match echo_once(topo, Duration::from_millis(500)) {
            Ok(()) => return Ok(t0.elapsed()),
            Err(e) if t0.elapsed() > within => return Err(e).context(format!("no answer within {within:?}")),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Deletes the server pod's veth (both ends go) and makes it again under the same
/// names, addresses and route, as a node's uplink that a driver reset or a
/// re-provisioned VM gives back.
fn recreate_server_veth(topo: &Topology) -> Result<()> {
    topo.node.ip(&["link", "del", NODE_SERVER_IF])?;
    lb_testing::netns::ip(&[
        "link",
        "add",
        NODE_SERVER_IF,
        "netns",
        topo.node.name(),
        "type",
        "veth",
        "peer",
        "name",
        POD_IF,
        "netns",
        topo.server.name(),
    ])?;
    topo.node.ip(&["addr", "add", &format!("{SERVER_GW}/24"), "dev", NODE_SERVER_IF])?;
    topo.node.ip(&["link", "set", NODE_SERVER_IF, "up"])?;
    for a in BACKENDS {
        topo.server.ip(&["addr", "add", &format!("{a}/24"), "dev", POD_IF])?;
    }
    topo.server.ip(&["link", "set", POD_IF, "up"])?;
    topo.server.ip(&["route", "add", "default", "via", &SERVER_GW.to_string()])?;
    Ok(())
}

/// Waits until the agent's pins are exactly what the node's interfaces call for, it is
/// ready, and the kernel holds exactly one link per pin for its programs, `programs`.
fn wait_settled(
    agent: &Agent,
    topo: &Topology,
    uplinks: &[&str],
    uplink_mode: &str,
    programs: &BTreeSet<u32>,
) -> Result<KernelObjects> {
    let mut last = String::new();
    let got = agent.process.wait_for("pins and kernel links matching the interfaces", SETTLE, || {
        let want = expected_pins(topo, uplinks, "to-", uplink_mode).ok()?;
        let pins = agent.pins();
        let k = KernelObjects::of(agent.bpffs.path()).ok()?;
        let ready = agent.status().is_some_and(|s| s.ready && s.attach.len() == want.len());
        last = format!("want {want:?}, pins {pins:?}, kernel {k:?}, ready {ready}");
        (pins == want && ready && k.links.len() == want.len() && &k.programs == programs).then_some(k)
    });
    got.with_context(|| format!("last seen: {last}"))
}

/// The uplink down and up, then deleted and re-created with its name, `rounds` times:
/// the attachment is kept across down/up (same link), re-made on the new interface,
/// and the old one's link released; the ClusterIP answers again each time.
fn uplink_down_up_and_recreated(mode: &str) -> Result<()> {
    let topo = faults::topology()?;
    let uplinks = [NODE_SERVER_IF];
    let agent = Agent::start(
        &topo,
        &format!("uplink-{mode}"),
        &["--iface", NODE_SERVER_IF, "--uplink-attach", mode, "--iface-glob", NODE_CLIENT_IF],
    )?;
    let _echo = Echo::start(&topo.server)?;
    agent.wait_ready(3, Duration::from_secs(30))?;
    echo_within(&topo, Duration::from_secs(5)).context("through the ClusterIP at start")?;
    let k0 = KernelObjects::of(agent.bpffs.path())?;
    ensure!(!k0.programs.is_empty(), "no program of the agent's datapath found in the kernel");
    let k0 = wait_settled(&agent, &topo, &uplinks, mode, &k0.programs)?;
    let (pins0, fds0) = (agent.pins(), faults::fd_count(agent.pid()));

    // Down: the link stays attached (tcx and XDP links live with the device, not its
    // state), nothing answers; up: the same link carries traffic again.
    topo.node.ip(&["link", "set", NODE_SERVER_IF, "down"])?;
    ensure!(echo_once(&topo, Duration::from_millis(800)).is_err(), "the ClusterIP answered with its uplink down");
    topo.node.ip(&["link", "set", NODE_SERVER_IF, "up"])?;
    let back = echo_within(&topo, Duration::from_secs(10)).context("after the uplink came up")?;
    let k = wait_settled(&agent, &topo, &uplinks, mode, &k0.programs)?;
    assert_eq!((agent.pins(), &k), (pins0.clone(), &k0), "down/up should change no attachment");
    eprintln!("{mode}: uplink down/up: answering again {back:?} after up, same links {:?}", k.links);

    let rounds: usize = faults::env_or("LB_FAULTS_UPLINK_ROUNDS", 5);
    let mut took = Vec::new();
    for round in 0..rounds {
        let before = agent.pins();
        let t0 = Instant::now();
        recreate_server_veth(&topo)?;
        let k = wait_settled(&agent, &topo, &uplinks, mode, &k0.programs).with_context(|| format!("round {round}"))?;
        echo_within(&topo, Duration::from_secs(10)).with_context(|| format!("after re-creation {round}"))?;
        took.push(t0.elapsed());
        let pins = agent.pins();
        ensure!(pins != before, "round {round}: the uplink's pin did not move to the new interface: {pins:?}");
        // The link on the gone interface is released, not only unpinned: the kernel
        // holds exactly one link per attachment, for the same programs.
        assert_eq!(k.links.len(), k0.links.len(), "round {round}: kernel links {:?} vs {:?}", k.links, k0.links);
        assert_eq!(k.programs, k0.programs, "round {round}: programs");
    }
    let fds = faults::fd_count(agent.pid());
    eprintln!(
        "{mode}: uplink re-created {rounds} times: settled and answering after {took:?}; programs {:?} throughout; \
         {} links; agent fds {fds0} -> {fds}",
        k0.programs,
        k0.links.len()
    );
    ensure!(fds <= fds0 + 4, "agent fds grew from {fds0} to {fds}");

    // Re-created while no agent runs: the next agent finds the pin of an interface
    // that is gone, releases it, attaches to the new one, and adopts the rest; the
    // killed agent's programs go with their last link.
    let mut agent = agent;
    agent.restart(&topo, || recreate_server_veth(&topo))?;
    agent.wait_ready(3, Duration::from_secs(30))?;
    let k1 = agent.process.wait_for("the killed agent's programs released", SETTLE, || {
        let k = KernelObjects::of(agent.bpffs.path()).ok()?;
        (k.programs.len() == k0.programs.len()).then_some(k)
    })?;
    ensure!(k1.programs.is_disjoint(&k0.programs), "programs of the killed agent still loaded: {k1:?}");
    wait_settled(&agent, &topo, &uplinks, mode, &k1.programs).context("after a restart with the uplink re-created")?;
    let back = echo_within(&topo, Duration::from_secs(10)).context("after a restart with the uplink re-created")?;
    eprintln!(
        "{mode}: uplink re-created with no agent running: the next one settled, programs {:?}, {back:?}",
        k1.programs
    );
    Ok(())
}

#[test]
fn uplink_down_up_and_recreated_tc() -> Result<()> {
    uplink_down_up_and_recreated("tc")
}

#[test]
fn uplink_down_up_and_recreated_xdp() -> Result<()> {
    uplink_down_up_and_recreated("xdp")
}

/// Pod interfaces (veth pairs whose node end matches `--iface-glob`) created and
/// deleted at 50 a second each, for `LB_FAULTS_CHURN_S` seconds (default 30), while a
/// TCP ping-pong runs through the ClusterIP on the long-lived pod veths. Afterwards:
/// pins exactly for the interfaces there, the kernel's links and programs of the
/// datapath back to the baseline, the agent alive, idle (not spinning), its fds and
/// RSS where they were; the flow never broke.
#[test]
fn pod_interface_churn_at_50_per_second() -> Result<()> {
    /// How many churned pairs live at once: each lives `LIVE` ticks (200 ms).
    const LIVE: u64 = 10;
    let rate: f64 = faults::env_or("LB_FAULTS_CHURN_RATE", 50.0);
    let secs: f64 = faults::env_or("LB_FAULTS_CHURN_S", 30.0);
    let topo = faults::topology()?;
    let agent = Agent::start(&topo, "churn", &["--iface-glob", "to-*"])?;
    let _echo = Echo::start(&topo.server)?;
    agent.wait_ready(4, Duration::from_secs(30))?;
    let k0 = KernelObjects::of(agent.bpffs.path())?;
    ensure!(!k0.programs.is_empty(), "no program of the agent's datapath found in the kernel");
    let k0 = wait_settled(&agent, &topo, &[], "tc", &k0.programs)?;
    let pid = agent.pid();
    let (fds0, rss0) = (faults::fd_count(pid), agent.process.rss_mb().0);

    // The steady flow: 64-byte ping-pongs every 10 ms on one connection.
    let stop = Arc::new(AtomicBool::new(false));
    let mut conn = topo.client.run(|| connect_from(CLIENT_IP, (VIP, 80).into(), IO_TIMEOUT))?;
    conn.set_nodelay(true)?;
    let flow = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<(u64, Duration)> {
            let (mut n, mut max_gap, mut last) = (0u64, Duration::ZERO, Instant::now());
            while !stop.load(Ordering::Relaxed) {
                echo(&mut conn, &[(n % 251) as u8; 64]).with_context(|| format!("steady flow, message {n}"))?;
                n += 1;
                max_gap = max_gap.max(last.elapsed());
                last = Instant::now();
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok((n, max_gap))
        })
    };

    // /readyz sampled every 10 ms: an interface that goes before its attach is no
    // failure, and must not make the agent unready.
    let readyz_stop = Arc::new(AtomicBool::new(false));
    let readyz = topo.node.spawn({
        let stop = readyz_stop.clone();
        move || -> Result<(u64, Vec<u16>)> {
            let (mut n, mut bad) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let code = faults::http_status("/readyz")?;
                n += 1;
                if code != 200 {
                    bad.push(code);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok((n, bad))
        }
    });

    // `ip -batch` processes read the churn line by line: no fork per operation. Several:
    // a veth's deletion waits for RCU grace periods outside the RTNL lock, and one
    // process alone manages about 16 pairs a second here. A pair is deleted by the
    // process that made it, after it.
    let workers: usize = faults::env_or("LB_FAULTS_CHURN_WORKERS", 4);
    let mut ips = Vec::new();
    for _ in 0..workers {
        let mut p = Command::new("ip")
            .args(["-n", topo.node.name(), "-force", "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ip -batch")?;
        let stderr = p.stderr.take().context("ip stderr")?;
        let errors =
            std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>());
        let stdin = p.stdin.take().context("ip stdin")?;
        ips.push((p, stdin, errors));
    }
    let cpu0 = faults::cpu_ticks(pid);
    let t0 = Instant::now();
    let total = (rate * secs) as u64;
    if total == 0 {
        bail!("no churn: LB_FAULTS_CHURN_S * LB_FAULTS_CHURN_RATE is 0");
    }
    let worker = |n: u64| (n % workers as u64) as usize;
    let mut max_late = Duration::ZERO;
    for n in 0..total {
        let due = t0 + Duration::from_secs_f64(n as f64 / rate);
        let now = Instant::now();
        max_late = max_late.max(now.saturating_duration_since(due));
        std::thread::sleep(due.saturating_duration_since(now));
        let w = &mut ips[worker(n)].1;
        w.write_all(format!("link add to-ch{n} type veth peer name chp{n}\nlink set to-ch{n} up\n").as_bytes())?;
        w.flush()?;
        if n >= LIVE {
            let w = &mut ips[worker(n - LIVE)].1;
            w.write_all(format!("link del to-ch{}\n", n - LIVE).as_bytes())?;
            w.flush()?;
        }
    }
    for n in total.saturating_sub(LIVE)..total {
        ips[worker(n)].1.write_all(format!("link del to-ch{n}\n").as_bytes())?;
    }
    let mut errors = Vec::new();
    for (mut p, stdin, errs) in ips {
        drop(stdin);
        let st = p.wait()?;
        let errs = errs.join().expect("stderr reader");
        ensure!(st.success() || !errs.is_empty(), "ip -batch failed ({st}) without a message");
        errors.extend(errs);
    }
    let churn_s = t0.elapsed().as_secs_f64();
    let cpu_churn = faults::cpu_ticks(pid) - cpu0;
    ensure!(errors.is_empty(), "ip -batch: {} errors, first {:?}", errors.len(), &errors[..errors.len().min(5)]);
    let left: Vec<String> = node_links(&topo)?
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("to-ch") || n.starts_with("chp"))
        .collect();
    ensure!(left.is_empty(), "churned interfaces left: {left:?}");

    let t_settle = Instant::now();
    let k = wait_settled(&agent, &topo, &[], "tc", &k0.programs)?;
    let settled_in = t_settle.elapsed();
    readyz_stop.store(true, Ordering::Relaxed);
    let (probes, unready) = readyz.join().expect("readyz thread")?;
    // Idle now: CPU over 3 s. A reconcile loop spinning on stale state would burn a core.
    let (c0, s0) = (faults::cpu_ticks(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let idle_cpu = (faults::cpu_ticks(pid) - c0) as f64 / faults::ticks_per_s() as f64 / s0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (msgs, max_gap) = flow.join().expect("flow thread")?;
    let m = faults::metrics(&topo.node)?;
    let metric = |name: &str| faults::metric_value(&m, name, &[]).with_context(|| format!("no {name}"));
    let (attach_errors, rp_problem) = (metric("lb_attach_errors_total")?, metric("lb_rp_filter_problem")?);
    let (fds, rss) = (faults::fd_count(pid), agent.process.rss_mb().0);
    let st = agent.status().context("status")?;
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    let attached = log.lines().filter(|l| l.contains(": attached ")).count();
    let failed = log.lines().filter(|l| l.contains("attach failed")).count();
    eprintln!(
        "churn: {total} pairs created and {total} deleted in {churn_s:.1} s ({:.1}/s each; pacing at most {max_late:?} \
         late); agent CPU {:.1} % during churn, {:.2} % idle after; settled {settled_in:?} after; steady flow {msgs} \
         messages, longest gap {max_gap:?}; agent fds {fds0} -> {fds}, RSS {rss0:.1} -> {rss:.1} MB; log: ~{attached} \
         attaches, {failed} attach failures; /readyz {} of {probes} probes not 200; lb_attach_errors_total \
         {attach_errors}, lb_rp_filter_problem {rp_problem}; kernel {} links, programs {:?}",
        total as f64 / churn_s,
        100.0 * cpu_churn as f64 / faults::ticks_per_s() as f64 / churn_s,
        100.0 * idle_cpu,
        unready.len(),
        k.links.len(),
        k.programs,
    );
    assert!(st.ready && st.attach_failures.is_empty(), "agent not ready after churn: {:?}", st.attach_failures);
    assert!(unready.is_empty(), "/readyz answered {:?} during the churn", &unready[..unready.len().min(10)]);
    assert_eq!((failed, attach_errors, rp_problem), (0, 0.0, 0.0), "interfaces that went counted as failures");
    assert_eq!(k.programs, k0.programs, "programs of the datapath changed");
    assert_eq!(k.links.len(), k0.links.len(), "kernel links: {:?} vs {:?} at the start", k.links, k0.links);
    ensure!(idle_cpu < 0.2, "the agent uses {:.0} % of a CPU with nothing changing", 100.0 * idle_cpu);
    ensure!(fds <= fds0 + 4, "agent fds grew from {fds0} to {fds}");
    ensure!(rss < rss0 + 32.0, "agent RSS grew from {rss0:.1} to {rss:.1} MB");
    Ok(())
}
