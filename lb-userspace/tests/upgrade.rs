//! Upgrading the agent across a map layout change on a live node (root needed): the
//! agent of commit [`OLD`] (map layout v5, built from git by the harness) programs a
//! ClusterIP and carries a long TCP stream and a UDP request/response exchange; it is
//! stopped as a DaemonSet update stops it, and this build's agent (v6) starts over the
//! same bpffs, migrates the pinned state and swaps the programs. No reset, no stall,
//! no lost datagram, the flows keep their backends, the v5 pins are gone. Then the
//! way back: the v5 agent, and this agent over a v7 layout, refuse to start and change
//! nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_testing::{
    PrivateBpffs, Scratch,
    agent::{AgentProcess, old_lb_binary, read_status as status},
    netns::{self, SERVER_IP, Topology},
};

/// The last commit with map layout v5.
const OLD: &str = "9be0374";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A second backend address, on the server pod too: the flows' backends are a choice.
const SERVER_IP2: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);

fn lb() -> &'static str {
    env!("CARGO_BIN_EXE_lb")
}

/// One Service, TCP 80 -> 8080 and UDP 53 -> 5353, on two backends.
fn yaml() -> String {
    let eps: String = [SERVER_IP, SERVER_IP2]
        .iter()
        .map(|a| format!("- addresses: [{a}]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  \
         ports:\n  - {{name: http, port: 80, targetPort: web}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: dns}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\n\
         ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints:\n{eps}"
    )
}

/// `lb agent` (the binary `lb`) on the node's pod veths, in `mode`.
fn node_agent(lb: &str, topo: &Topology, bpffs: &Path, file: &Path, status_file: &Path, mode: &str) -> Command {
    let mut c = topo.node.command(lb);
    c.args(["agent", "--iface-glob", "to-*", "--pod-attach", mode, "--iface-rescan", "200ms", "--file-poll", "20ms"])
        .arg("--source")
        .arg(format!("file:{}", file.display()))
        .env("LB_BPFFS", bpffs)
        .env("LB_STATUS_FILE", status_file);
    if mode != "tc" {
        // The veths stand for pod veths; this checks XDP links' adoption, not checksums.
        c.env("LB_ALLOW_XDP_ON_PODS", "true");
    }
    c
}

/// TCP echo on :8080 and UDP echo on :5353 of both addresses of the server pod, until
/// `stop`. One UDP socket per address: a socket bound to 0.0.0.0 would answer from the
/// pod's primary address, which is not the backend the client's datagram went to.
fn servers(topo: &Topology, stop: Arc<AtomicBool>) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let tcp = topo.server.run(|| TcpListener::bind(("0.0.0.0", 8080)).context("bind tcp"))?;
    tcp.set_nonblocking(true)?;
    let s1 = stop.clone();
    let t = std::thread::spawn(move || {
        while !s1.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = tcp.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let stop = s1.clone();
            std::thread::spawn(move || {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) if s.write_all(&buf[..n]).is_err() => break,
                        Ok(_) => {}
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        }
                        Err(_) => break,
                    }
                }
            });
        }
    });
    let mut threads = vec![t];
    for addr in [SERVER_IP, SERVER_IP2] {
        let udp = topo.server.run(|| UdpSocket::bind((addr, 5353)).context("bind udp"))?;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        }));
    }
    Ok(threads)
}

/// What the client saw: the TCP stream's errors and longest gap between two echoes,
/// and the UDP requests sent and answered.
#[derive(Debug, Default)]
struct Seen {
    tcp_error: Option<String>,
    tcp_echoes: u64,
    tcp_max_gap: Duration,
    udp_sent: u64,
    udp_answered: u64,
}

/// The client's traffic through the ClusterIP, on threads of their own, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    seen: Arc<Mutex<Seen>>,
    tcp_port: u16,
    udp_port: u16,
}

impl Traffic {
    /// A TCP stream (64-byte ping-pong every 10 ms) and a UDP exchange (a numbered
    /// request every 10 ms, from one socket; answers counted by number).
    fn start(topo: &Topology) -> Result<Self> {
        let tcp = topo.client.run(|| {
            TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(3)).context("connect")
        })?;
        let udp = topo.client.run(|| {
            let s = UdpSocket::bind(("0.0.0.0", 0))?;
            s.connect((VIP, 53))?;
            Ok(s)
        })?;
        tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
        tcp.set_nodelay(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let (tcp_port, udp_port) = (tcp.local_addr()?.port(), udp.local_addr()?.port());
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut threads = Vec::new();
        {
            let (stop, seen, mut conn) = (stop.clone(), seen.clone(), tcp);
            threads.push(std::thread::spawn(move || {
                let mut last = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let msg = [(seq % 251) as u8; 64];
                    let mut back = [0u8; 64];
                    let r = conn.write_all(&msg).and_then(|_| conn.read_exact(&mut back));
                    let mut s = seen.lock().unwrap();
                    match r {
                        Err(e) => {
                            s.tcp_error = Some(format!("after {seq} echoes: {e}"));
                            return;
                        }
                        Ok(()) if back != msg => {
                            s.tcp_error = Some(format!("echo {seq} corrupted"));
                            return;
                        }
                        Ok(()) => {}
                    }
                    seq += 1;
                    s.tcp_echoes = seq;
                    s.tcp_max_gap = s.tcp_max_gap.max(last.elapsed());
                    drop(s);
                    last = Instant::now();
                    std::thread::sleep(Duration::from_millis(10));
                }
            }));
        }
        let udp = Arc::new(udp);
        let sent = Arc::new(AtomicU64::new(0));
        {
            let (stop, udp, sent) = (stop.clone(), udp.clone(), sent.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let n = sent.load(Ordering::Relaxed);
                    if udp.send(&n.to_be_bytes()).is_ok() {
                        sent.store(n + 1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }));
        }
        {
            let (stop, seen) = (stop.clone(), seen.clone());
            threads.push(std::thread::spawn(move || {
                let mut answered = BTreeSet::new();
                let mut buf = [0u8; 64];
                // Until stopped, and then a last second for answers on the way.
                let mut drain_until = None;
                loop {
                    if stop.load(Ordering::Relaxed) && drain_until.is_none() {
                        drain_until = Some(Instant::now() + Duration::from_secs(1));
                    }
                    if drain_until.is_some_and(|t| Instant::now() > t) {
                        break;
                    }
                    if let Ok(8) = udp.recv(&mut buf) {
                        answered.insert(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                    }
                }
                let mut s = seen.lock().unwrap();
                s.udp_sent = sent.load(Ordering::Relaxed);
                s.udp_answered = answered.len() as u64;
            }));
        }
        Ok(Self { stop, threads, seen, tcp_port, udp_port })
    }

    fn tcp_echoes(&self) -> u64 {
        self.seen.lock().unwrap().tcp_echoes
    }

    fn check_alive(&self) -> Result<()> {
        if let Some(e) = &self.seen.lock().unwrap().tcp_error {
            bail!("the TCP stream broke: {e}");
        }
        Ok(())
    }

    /// Keeps it running for `d`, failing early if the stream broke.
    fn run_for(&self, d: Duration) -> Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < d {
            self.check_alive()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        self.check_alive()
    }

    fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// Forward conntrack entries of the client's two flows as `lb conntrack -o json` of
/// binary `lb` shows them: client port -> (NAT target, service id, backend id).
fn flows(lb: &str, bpffs: &Path, ports: [u16; 2]) -> Result<BTreeMap<u16, (String, u64, u64, serde_json::Value)>> {
    let out = Command::new(lb).args(["conntrack", "-o", "json"]).env("LB_BPFFS", bpffs).output()?;
    anyhow::ensure!(out.status.success(), "lb conntrack: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).context("lb conntrack -o json")?;
    let mut m = BTreeMap::new();
    for r in rows {
        let src = r["source"].as_str().unwrap_or_default();
        let Some(port) = src.strip_prefix(&format!("{}:", netns::CLIENT_IP)).and_then(|p| p.parse().ok()) else {
            continue;
        };
        if r["direction"] == "forward" && ports.contains(&port) {
            let nat = r["nat"].as_str().unwrap_or_default().to_string();
            m.insert(
                port,
                (nat, r["svc_id"].as_u64().unwrap_or(0), r["backend_id"].as_u64().unwrap_or(0), r["age_s"].clone()),
            );
        }
    }
    Ok(m)
}

/// Every entry of the bpffs (maps, markers, links), with the kernel id of each pinned
/// object: what "nothing changed" compares.
fn snapshot(bpffs: &Path) -> BTreeMap<String, Option<u32>> {
    let mut out = BTreeMap::new();
    let mut walk = vec![bpffs.to_path_buf()];
    while let Some(dir) = walk.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let rel = e.path().strip_prefix(bpffs).unwrap().display().to_string();
            if e.path().is_dir() {
                walk.push(e.path());
                out.insert(rel, None);
            } else if let Ok(m) = aya::maps::MapData::from_pin(e.path()) {
                out.insert(rel, m.info().ok().map(|i| i.id()));
            } else {
                let link = aya::programs::links::PinnedLink::from_pin(e.path()).ok();
                let info = link.and_then(|l| aya::programs::links::FdLink::from(l).info().ok());
                out.insert(rel, info.map(|i| i.program_id()));
            }
        }
    }
    out
}

/// Runs `lb agent` of `lb` once, expecting it to refuse to start: its exit status
/// and output.
fn refused_start(lb: &str, topo: &Topology, bpffs: &Path, file: &Path, dir: &Path, mode: &str) -> Result<String> {
    let status_file = dir.join("refused.json");
    let mut c = node_agent(lb, topo, bpffs, file, &status_file, mode);
    let mut child = c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()?;
    let t0 = Instant::now();
    while child.try_wait()?.is_none() {
        if t0.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            bail!("{lb} agent did not refuse to start within 15 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(!out.status.success(), "{lb} agent started over the other layout:\n{text}");
    Ok(text)
}

fn upgrade_keeps_the_flows(mode: &str) -> Result<()> {
    let old = old_lb_binary(OLD)?;
    let old = old.to_str().context("old lb path")?;
    netns::remove_stale()?;
    let topo = Topology::new()?;
    topo.server.ip(&["addr", "add", &format!("{SERVER_IP2}/24"), "dev", netns::POD_IF])?;
    let bpffs = PrivateBpffs::new()?;
    let dir = Scratch::new(mode)?;
    let file = dir.0.join("objects.yaml");
    std::fs::write(&file, yaml())?;
    let status_file = dir.0.join("status.json");
    let log = dir.0.join("agent.log");
    let stop = Arc::new(AtomicBool::new(false));
    let servers = servers(&topo, stop.clone())?;

    let mut v5 =
        AgentProcess::spawn(node_agent(old, &topo, bpffs.path(), &file, &status_file, mode), &log, &status_file)?;
    v5.wait_for("the v5 agent ready", Duration::from_secs(30), || {
        status(&status_file).filter(|s| s.ready && s.attach.len() == 4)
    })?;
    let progs_v5: Vec<Option<u32>> = status(&status_file).unwrap().attach.iter().map(|a| a.program_id).collect();
    let traffic = Traffic::start(&topo)?;
    traffic.run_for(Duration::from_secs(1))?;
    let ports = [traffic.tcp_port, traffic.udp_port];
    let before = flows(old, bpffs.path(), ports)?;
    assert_eq!(before.len(), 2, "both flows in the v5 conntrack: {before:?}");

    // A DaemonSet update: SIGTERM, and the pinned datapath goes on alone.
    v5.term()?;
    traffic.run_for(Duration::from_millis(500))?;
    let _ = std::fs::remove_file(&status_file);
    let echoes = traffic.tcp_echoes();
    let t0 = Instant::now();
    let mut v6 =
        AgentProcess::spawn(node_agent(lb(), &topo, bpffs.path(), &file, &status_file, mode), &log, &status_file)?;
    let st = loop {
        traffic.check_alive()?;
        if let Some(s) = status(&status_file).filter(|s| s.ready && s.attach.len() == 4 && s.upgrade.is_some()) {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the v6 agent did not finish the upgrade; log:\n{}", v6.log_text());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let ready_after = t0.elapsed();
    traffic.run_for(Duration::from_secs(1))?;
    let after = flows(lb(), bpffs.path(), ports)?;
    let during = traffic.tcp_echoes() - echoes;
    let seen = traffic.stop();

    let up = st.upgrade.clone().unwrap();
    let carried = |m: &str| up.carried.iter().find(|c| c.map == m).map(|c| (c.before_swap, c.after_swap));
    eprintln!(
        "upgrade {mode}: ready after {ready_after:?}, copy {} ms, swap {} ms, carried {:?}, removed {}; TCP echoes {} \
         ({during} during the upgrade), max gap {:?}, error {:?}; UDP sent {} answered {}",
        up.copy_ms,
        up.swap_ms,
        up.carried,
        up.removed.len(),
        seen.tcp_echoes,
        seen.tcp_max_gap,
        seen.tcp_error,
        seen.udp_sent,
        seen.udp_answered
    );
    assert_eq!(seen.tcp_error, None, "the TCP stream broke");
    assert!(seen.tcp_max_gap < Duration::from_secs(1), "the stream stalled for {:?}", seen.tcp_max_gap);
    assert!(seen.udp_sent > 200, "too few datagrams to tell: {seen:?}");
    assert_eq!(seen.udp_sent - seen.udp_answered, 0, "datagrams lost: {seen:?}");
    assert_eq!((up.from, up.to), (5, 6));
    // Two halves per flow, our two flows at least.
    assert!(carried(lb_common::map_names::CONNTRACK).is_some_and(|(b, _)| b >= 4), "{:?}", up.carried);
    assert!(carried(lb_common::map_names::SERVICES).is_some_and(|(b, _)| b >= 3), "{:?}", up.carried);
    // Same NAT target, service and backend ids: the entries were carried, not
    // re-created (a re-created entry would have its age).
    for (port, (nat, svc, be, age)) in &before {
        let (nat6, svc6, be6, age6) =
            after.get(port).with_context(|| format!("flow from port {port} gone: {after:?}"))?;
        assert_eq!((nat, svc, be), (nat6, svc6, be6), "flow from port {port} changed backend");
        assert_eq!(*age, serde_json::Value::Null, "v5 rows have no age");
        assert_eq!(*age6, serde_json::Value::Null, "a carried entry's age is unknown: {after:?}");
    }
    let progs_v6: Vec<Option<u32>> = st.attach.iter().map(|a| a.program_id).collect();
    assert!(progs_v6.iter().all(|p| p.is_some() && !progs_v5.contains(p)), "{progs_v5:?} -> {progs_v6:?}");
    let names: Vec<String> = snapshot(bpffs.path()).into_keys().collect();
    assert!(!names.iter().any(|n| n.ends_with("_v5")), "v5 pins left: {names:?}");
    assert!(names.contains(&"layout_v6".to_string()), "{names:?}");
    assert_eq!(
        lb_testing::backend_sets(bpffs.path()),
        vec![
            (format!("{VIP}:53/UDP"), vec![format!("{SERVER_IP}:5353"), format!("{SERVER_IP2}:5353")]),
            (format!("{VIP}:80/TCP"), vec![format!("{SERVER_IP}:8080"), format!("{SERVER_IP2}:8080")]),
        ]
    );
    assert!(v6.log_text().contains("map layout upgrade done"), "{}", v6.log_text());
    let table = Command::new(lb()).arg("conntrack").env("LB_BPFFS", bpffs.path()).output()?;
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let header = table.lines().next().unwrap_or_default();
    assert!(header.contains(" Age ") && header.contains("Expires"), "{table}");

    // New flows get their creation time.
    let traffic = Traffic::start(&topo)?;
    traffic.run_for(Duration::from_millis(300))?;
    let fresh = flows(lb(), bpffs.path(), [traffic.tcp_port, traffic.udp_port])?;
    let seen = traffic.stop();
    assert_eq!(seen.tcp_error, None);
    assert!(fresh.len() == 2 && fresh.values().all(|f| f.3.is_u64()), "new flows have an age: {fresh:?}");

    // The way back: the v5 agent refuses the v6 state and changes nothing; the
    // datapath pinned there keeps serving.
    v6.term()?;
    let pinned = snapshot(bpffs.path());
    let out = refused_start(old, &topo, bpffs.path(), &file, &dir.0, mode)?;
    eprintln!("v5 agent over v6 state:\n{out}");
    assert!(out.contains("layout version") && out.contains("lb cleanup"), "{out}");
    assert_eq!(snapshot(bpffs.path()), pinned, "the v5 agent changed the pinned state");
    let traffic = Traffic::start(&topo)?;
    traffic.run_for(Duration::from_millis(300))?;
    let seen = traffic.stop();
    assert!(seen.tcp_error.is_none() && seen.tcp_echoes > 5, "{seen:?}");

    stop.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    Ok(())
}

#[test]
fn upgrade_from_layout_v5_keeps_tcp_and_udp_flows_tc() -> Result<()> {
    upgrade_keeps_the_flows("tc")
}

#[test]
fn upgrade_from_layout_v5_keeps_tcp_and_udp_flows_xdp() -> Result<()> {
    upgrade_keeps_the_flows("xdp")
}

/// State of a newer layout (v7, as this build's pins renamed the way a v7 agent would
/// name them) is refused with a message naming the way out, and nothing is changed.
#[test]
fn a_newer_layout_is_refused_and_left_alone() -> Result<()> {
    netns::remove_stale()?;
    let topo = Topology::new()?;
    let bpffs = PrivateBpffs::new()?;
    let dir = Scratch::new("downgrade")?;
    let file = dir.0.join("objects.yaml");
    std::fs::write(&file, yaml())?;
    let status_file = dir.0.join("status.json");
    let log = dir.0.join("agent.log");
    let mut agent =
        AgentProcess::spawn(node_agent(lb(), &topo, bpffs.path(), &file, &status_file, "tc"), &log, &status_file)?;
    agent.wait_for("the agent ready", Duration::from_secs(30), || status(&status_file).filter(|s| s.ready))?;
    agent.term()?;
    for e in std::fs::read_dir(bpffs.path())?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(base) = name.strip_suffix("_v6").or_else(|| name.strip_suffix("layout_v6").map(|_| "layout")) {
            let to = if base == "layout" { "layout_v7".to_string() } else { format!("{base}_v7") };
            std::fs::rename(e.path(), bpffs.path().join(to))?;
        }
    }
    let pinned = snapshot(bpffs.path());
    assert!(pinned.contains_key("layout_v7") && pinned.contains_key("lb4_ct_v7"), "{pinned:?}");
    let out = refused_start(lb(), &topo, bpffs.path(), &file, &dir.0, "tc")?;
    assert!(
        out.contains("newer than this agent's v6") && out.contains("lb cleanup") && out.contains("nothing was changed"),
        "{out}"
    );
    assert_eq!(snapshot(bpffs.path()), pinned, "the refused agent changed the pinned state");
    // Only the marker left: still refused (a newer layout may name its maps otherwise).
    for (name, _) in pinned.iter().filter(|(n, _)| n.ends_with("_v7") && !n.starts_with("layout")) {
        std::fs::remove_file(bpffs.path().join(name))?;
    }
    let out = refused_start(lb(), &topo, bpffs.path(), &file, &dir.0, "tc")?;
    assert!(out.contains("layout_v7") && out.contains("newer"), "{out}");
    // The way out the message names: `lb cleanup`, then this agent starts afresh.
    let out = Command::new(lb()).arg("cleanup").env("LB_BPFFS", bpffs.path()).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // (The bpffs's own `maps.debug` and `progs.debug` stay.)
    let left: Vec<String> = snapshot(bpffs.path()).into_keys().filter(|k| !k.ends_with(".debug")).collect();
    assert!(left.is_empty(), "lb cleanup left {left:?}");
    let _ = std::fs::remove_file(&status_file);
    let agent =
        AgentProcess::spawn(node_agent(lb(), &topo, bpffs.path(), &file, &status_file, "tc"), &log, &status_file)?;
    agent.wait_for("the agent ready after lb cleanup", Duration::from_secs(30), || {
        status(&status_file).filter(|s| s.ready && s.upgrade.is_none())
    })?;
    assert!(snapshot(bpffs.path()).contains_key("layout_v6"));
    Ok(())
}

/// The migration's two copies on real maps, without agents: v5 maps made and pinned
/// here, the v6 datapath loaded over them, entries the "old programs" write after the
/// first copy, and entries the "new programs" refresh meanwhile.
#[test]
fn the_second_copy_takes_what_the_old_programs_wrote_after_the_first() -> Result<()> {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use lb_common::{CtKey4, CtValue4, IPPROTO_UDP, MAP_LAYOUT_VERSION, map_names};
    use lb_userspace::datapath::{self, LoadOptions, upgrade};

    let bpffs = PrivateBpffs::new()?;
    // BPF_MAP_TYPE_LRU_HASH (include/uapi/linux/bpf.h), the v5 CONNTRACK's sizes.
    let obj = aya_obj::Map::new_from_params(9, 16, 28, 1024, 0);
    let old_ct = MapData::create(obj, "lb4_ct_v5", None)?;
    old_ct.pin(bpffs.path().join("lb4_ct_v5"))?;
    let mut old: BpfHashMap<MapData, CtKey4, upgrade::v5::CtValue4> =
        Map::from_map_data(MapData::from_pin(bpffs.path().join("lb4_ct_v5"))?)?.try_into()?;
    let key = |port: u16| CtKey4::new(0x0200_000a, 0x0a00_600a, port.to_be(), 53u16.to_be(), IPPROTO_UDP);
    let v5 = |seen, backend_id| upgrade::v5::CtValue4 { dir: 1, svc_id: 1, backend_id, seen, ..Default::default() };
    for (port, seen) in [(1000, 100), (1001, 100)] {
        old.insert(key(port), v5(seen, 7), 0)?;
    }

    // Refused as a stale layout unless migrating.
    assert!(datapath::load(&LoadOptions::new(bpffs.path())).is_err());
    let mut up = upgrade::prepare(bpffs.path())?.context("v5 maps found")?;
    let mut opts = LoadOptions::new(bpffs.path());
    opts.migrating = true;
    let ebpf = datapath::load(&opts)?;
    up.copy(&ebpf)?;
    let mut new: BpfHashMap<MapData, CtKey4, CtValue4> =
        Map::from_map_data(MapData::from_pin(bpffs.path().join(map_names::CONNTRACK))?)?.try_into()?;
    assert_eq!(new.get(&key(1000), 0)?.seen, 100);

    // Between the copies: the old programs refresh flow 1000, start flow 1002 and
    // refresh flow 1001; the new ones refresh flow 1001 later still.
    old.insert(key(1000), v5(200, 7), 0)?;
    old.insert(key(1002), v5(200, 8), 0)?;
    old.insert(key(1001), v5(150, 7), 0)?;
    let mut refreshed = new.get(&key(1001), 0)?;
    refreshed.seen = 300;
    new.insert(key(1001), refreshed, 0)?;
    let report = up.finish()?;

    assert_eq!(new.get(&key(1000), 0)?.seen, 200, "the old programs' later refresh is kept");
    assert_eq!(new.get(&key(1001), 0)?.seen, 300, "the new programs' later refresh wins");
    let late = new.get(&key(1002), 0)?;
    assert_eq!((late.backend_id, late.seen, late.created), (8, 200, 0), "the flow started in between is carried");
    let ct = report.carried.iter().find(|c| c.map == map_names::CONNTRACK).context("conntrack carried")?;
    assert_eq!((ct.before_swap, ct.after_swap), (2, 2));
    assert_eq!(report.removed, vec!["lb4_ct_v5".to_string()]);
    assert!(!bpffs.path().join("lb4_ct_v5").exists());
    assert!(bpffs.path().join(upgrade::marker_name(MAP_LAYOUT_VERSION)).is_dir());
    // The next start finds a complete v6 state.
    assert!(upgrade::prepare(bpffs.path())?.is_none());
    Ok(())
}
