//! Fault: the conntrack and affinity LRUs full, with twice as many flows (and affinity
//! clients) as they have entries, under a real `lb agent` in throw-away namespaces.
//! Live Services must keep answering new requests; established flows whose entries
//! were evicted are re-picked mid-flow (`ct_midflow_miss`) and keep working; what the
//! evictions cost is visible on /metrics. Needs root; touches nothing outside the
//! namespaces it creates.

mod faults;

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use faults::{AFF_VIP, Agent, Echo, IO_TIMEOUT, VIP, connect_from, datapath_packets, echo, metric_value, udp_echo};
use lb_common::map_names;
use lb_testing::netns::{CLIENT_IP, POD_IF};

/// Conntrack entries: two per flow.
const CT_ENTRIES: u32 = 1024;
/// Affinity entries: one per (Service, client address).
const AFF_ENTRIES: u32 = 512;
/// Held-open TCP connections to the plain Service, from the client pod's address.
const PLAIN_TCP: usize = 256;
/// UDP flows (one socket each) to the plain Service.
const PLAIN_UDP: usize = 1024;
/// Client addresses of the affinity Service with one held-open connection each: twice
/// its entries.
const AFF_CLIENTS: usize = 2 * AFF_ENTRIES as usize;
/// Client addresses with two: the second, opened right after the first, goes where
/// the client's affinity entry says (the first one's backend), whatever its own
/// 5-tuple hashes to.
const AFF_PAIRS: usize = 128;
/// New connections to each Service while the maps are full (to the affinity Service
/// from client addresses of their own).
const NEW: usize = 100;
/// New UDP flows a second opened meanwhile, to keep the tables evicting
/// (`LB_FAULTS_FILL_RATE`).
const FILL_RATE: f64 = 2000.0;

/// The `i`-th extra client address: 10.245.x.y, routed to the client pod.
fn client_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 245, (i / 200) as u8, (1 + i % 200) as u8)
}

#[test]
fn conntrack_and_affinity_full_live_services_keep_answering() -> Result<()> {
    let topo = faults::topology()?;
    // The affinity clients' addresses on the client pod, routed there by the node.
    let batch: String =
        (0..AFF_CLIENTS + AFF_PAIRS + NEW).map(|i| format!("addr add {}/32 dev {POD_IF}\n", client_addr(i))).collect();
    let batch_file = std::env::temp_dir().join(format!("lb-faults-addrs-{}", std::process::id()));
    std::fs::write(&batch_file, batch)?;
    let added = topo.client.ip(&["-batch", &batch_file.to_string_lossy()]);
    let _ = std::fs::remove_file(&batch_file);
    added?;
    topo.node.ip(&["route", "add", "10.245.0.0/21", "via", &CLIENT_IP.to_string()])?;

    let ct = CT_ENTRIES.to_string();
    let aff = AFF_ENTRIES.to_string();
    let agent = Agent::start(
        &topo,
        "maps",
        &[
            "--iface-glob",
            "to-*",
            "--iface-rescan",
            "200ms",
            "--conntrack-gc",
            "1s",
            "--max-conntrack",
            &ct,
            "--max-affinity",
            &aff,
        ],
    )?;
    agent.wait_ready(4, Duration::from_secs(30))?;
    let echo_servers = Echo::start(&topo.server)?;
    let plain_tcp: SocketAddr = (VIP, 80).into();
    let plain_udp: SocketAddr = (VIP, 53).into();
    let sticky: SocketAddr = (AFF_VIP, 80).into();
    let t0 = Instant::now();

    // Fill: every flow answered as it is opened.
    let mut plain_conns: Vec<TcpStream> = Vec::new();
    let mut udp_socks: Vec<UdpSocket> = Vec::new();
    let mut aff_conns: Vec<(usize, TcpStream)> = Vec::new();
    let mut aff_pairs: Vec<(usize, TcpStream, TcpStream)> = Vec::new();
    topo.client.run(|| {
        for i in 0..PLAIN_TCP {
            let mut c = connect_from(CLIENT_IP, plain_tcp, IO_TIMEOUT).with_context(|| format!("plain TCP {i}"))?;
            echo(&mut c, b"hello").with_context(|| format!("plain TCP {i}"))?;
            plain_conns.push(c);
        }
        for i in 0..PLAIN_UDP {
            let s = UdpSocket::bind((CLIENT_IP, 0))?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            udp_echo(&s, plain_udp, b"hello").with_context(|| format!("UDP flow {i}"))?;
            udp_socks.push(s);
        }
        // The pairs first: the single clients after them evict their affinity entries.
        for i in AFF_CLIENTS..AFF_CLIENTS + AFF_PAIRS {
            let mut one = connect_from(client_addr(i), sticky, IO_TIMEOUT).with_context(|| format!("sticky {i}"))?;
            echo(&mut one, b"hello").with_context(|| format!("sticky client {i}"))?;
            let mut two = connect_from(client_addr(i), sticky, IO_TIMEOUT).with_context(|| format!("sticky {i}"))?;
            echo(&mut two, b"hello").with_context(|| format!("second connection of sticky client {i}"))?;
            aff_pairs.push((i, one, two));
        }
        for i in 0..AFF_CLIENTS {
            let mut c = connect_from(client_addr(i), sticky, IO_TIMEOUT).with_context(|| format!("sticky {i}"))?;
            echo(&mut c, b"hello").with_context(|| format!("sticky client {i}"))?;
            aff_conns.push((i, c));
        }
        Ok(())
    })?;
    let flows = PLAIN_TCP + PLAIN_UDP + AFF_CLIENTS + 2 * AFF_PAIRS;
    let fill_s = t0.elapsed().as_secs_f64();
    ensure!(flows >= 2 * CT_ENTRIES as usize, "{flows} flows: fewer than twice {CT_ENTRIES} entries");
    let st = lb_userspace::inspect::status(agent.bpffs.path(), None)?;
    let fill = |name: &str| st.maps.iter().find(|m| m.name == name).map(|m| (m.entries.unwrap_or(0), m.max_entries));
    let (ct_now, ct_max) = fill(map_names::CONNTRACK).context("conntrack fill")?;
    let (aff_now, aff_max) = fill(map_names::AFFINITY).context("affinity fill")?;
    assert_eq!((ct_max, aff_max), (CT_ENTRIES, AFF_ENTRIES), "the agent's --max-conntrack / --max-affinity");
    ensure!(ct_now <= ct_max as usize && aff_now <= aff_max as usize, "an LRU above its size");
    eprintln!(
        "filled in {fill_s:.1} s: {flows} flows for {ct_max} conntrack entries ({ct_now} in use), {} affinity \
         clients for {aff_max} entries ({aff_now} in use)",
        AFF_CLIENTS + AFF_PAIRS
    );

    let m0 = faults::metrics(&topo.node)?;

    // While full, a filler keeps opening new UDP flows (new source ports), so that
    // every round below meets a table that is evicting; each of its flows must be
    // answered too. Paced: a table that turns over within a round trip loses replies
    // whatever the datapath does (docs/reliability.md has the figure).
    let rate: f64 = faults::env_or("LB_FAULTS_FILL_RATE", FILL_RATE);
    let stop = Arc::new(AtomicBool::new(false));
    let (filled, unanswered) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let filler = {
        let (stop, filled, unanswered) = (stop.clone(), filled.clone(), unanswered.clone());
        topo.client.spawn(move || -> Result<()> {
            let (start, mut n) = (Instant::now(), 0u32);
            while !stop.load(Ordering::Relaxed) {
                let due = start + Duration::from_secs_f64(f64::from(n) / rate);
                n += 1;
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let s = UdpSocket::bind((CLIENT_IP, 0))?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                match udp_echo(&s, plain_udp, b"fill") {
                    Ok(()) => filled.fetch_add(1, Ordering::Relaxed),
                    Err(_) => unanswered.fetch_add(1, Ordering::Relaxed),
                };
            }
            Ok(())
        })
    };

    // New requests to both Services, while the maps are full and evicting.
    let mut new_failed = Vec::new();
    topo.client.run(|| {
        for i in 0..NEW {
            let fresh = client_addr(AFF_CLIENTS + AFF_PAIRS + i);
            for (what, dst, src) in [("plain", plain_tcp, CLIENT_IP), ("sticky", sticky, fresh)] {
                if let Err(e) = connect_from(src, dst, IO_TIMEOUT).and_then(|mut c| echo(&mut c, b"new")) {
                    new_failed.push(format!("new {what} connection {i}: {e:#}"));
                }
            }
        }
        Ok(())
    })?;

    // A second round on every established flow: most lost their entries meanwhile.
    let mut broken_plain = Vec::new();
    for (i, c) in plain_conns.iter_mut().enumerate() {
        if let Err(e) = echo(c, b"again") {
            broken_plain.push(format!("plain TCP {i}: {e:#}"));
        }
    }
    for (i, s) in udp_socks.iter().enumerate() {
        if let Err(e) = udp_echo(s, plain_udp, b"again") {
            broken_plain.push(format!("UDP flow {i}: {e:#}"));
        }
    }
    // A client's second connection went where its affinity entry said, not where its
    // 5-tuple hashes: with both its conntrack and affinity entries evicted, it is
    // re-picked by hash and may land on the other backend, which resets it. Counted,
    // not asserted: no state is left to tell its backend (docs/reliability.md). Its
    // re-pick must not move the client's first connection, right after it, which the
    // client's entry or its own hash still sends to the right backend.
    let mut broken_second = 0;
    let mut broken_sticky = Vec::new();
    for (i, one, two) in aff_pairs.iter_mut() {
        if echo(two, b"again").is_err() {
            broken_second += 1;
        }
        if let Err(e) = echo(one, b"again") {
            broken_sticky.push(format!("first connection of sticky client {i}, after its second: {e:#}"));
        }
    }
    for (i, c) in aff_conns.iter_mut() {
        if let Err(e) = echo(c, b"again") {
            broken_sticky.push(format!("connection of sticky client {i}: {e:#}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    filler.join().expect("filler")?;

    // Let the collector pass once more, then read what the agent exports.
    std::thread::sleep(Duration::from_millis(1500));
    let m1 = faults::metrics(&topo.node)?;
    let delta = |reason: &str| -> Result<u64> { Ok(datapath_packets(&m1, reason)? - datapath_packets(&m0, reason)?) };
    let midflow = datapath_packets(&m1, "ct_midflow_miss")?;
    let midflow_round = delta("ct_midflow_miss")?;
    let recovered = datapath_packets(&m1, "ct_recovered")?;
    let insert_failed = datapath_packets(&m1, "map_insert_failed")?;
    let aff_miss = datapath_packets(&m1, "affinity_miss")?;
    let aff_hit = datapath_packets(&m1, "affinity_hit")?;
    let gauge = |name: &str| metric_value(&m1, name, &[]).with_context(|| format!("no {name} in /metrics"));
    let (ct_cap, ct_in, aff_cap, aff_in) = (
        gauge("lb_conntrack_capacity")?,
        gauge("lb_conntrack_entries")?,
        gauge("lb_affinity_capacity")?,
        gauge("lb_affinity_entries")?,
    );
    eprintln!(
        "while full: {NEW}+{NEW} new connections, {} failed; filler {} UDP flows answered, {} not; second round: \
         {} of {} plain flows broken, {} of {} first sticky connections, {broken_second} of {AFF_PAIRS} second \
         ones; ct_midflow_miss {midflow} ({midflow_round} in the round), ct_recovered {recovered}, \
         map_insert_failed {insert_failed}, affinity_miss {aff_miss}, affinity_hit {aff_hit}; /metrics: conntrack \
         {ct_in}/{ct_cap}, affinity {aff_in}/{aff_cap}",
        new_failed.len(),
        filled.load(Ordering::Relaxed),
        unanswered.load(Ordering::Relaxed),
        broken_plain.len(),
        PLAIN_TCP + PLAIN_UDP,
        broken_sticky.len(),
        AFF_CLIENTS + AFF_PAIRS,
    );
    assert!(new_failed.is_empty(), "new requests failed with the maps full: {new_failed:#?}");
    assert_eq!(unanswered.load(Ordering::Relaxed), 0, "filler UDP flows unanswered");
    assert!(filled.load(Ordering::Relaxed) > 0, "the filler opened no flow");
    assert!(broken_plain.is_empty(), "established flows broken by eviction: {broken_plain:#?}");
    // At most 0.5 %: a flow whose two fresh entries are both evicted before its reply
    // comes back (the LRU evicts in batches of up to 128 per CPU, newest inactive
    // entries included; see docs/reliability.md) has its reply passed un-NATed, and the
    // client resets it. Seen once in a CI run: 2 of 1,152 with this 1,024-entry table.
    let limit = (AFF_CLIENTS + AFF_PAIRS) / 200;
    assert!(broken_sticky.len() <= limit, "clients' first connections broke by eviction: {broken_sticky:#?}");
    // Evictions are visible: established TCP flows found without their entry, and
    // clients found without theirs although each had one (a first connection per
    // client misses once; any miss beyond those is an evicted entry).
    assert!(midflow_round > 0, "no established flow was found evicted");
    assert!(
        aff_miss > (AFF_CLIENTS + AFF_PAIRS + NEW) as u64,
        "no affinity entry was found evicted ({aff_miss} misses)"
    );
    assert_eq!((ct_cap, aff_cap), (f64::from(CT_ENTRIES), f64::from(AFF_ENTRIES)), "capacities on /metrics");
    assert!(ct_in > 0.0 && ct_in <= ct_cap && aff_in > 0.0 && aff_in <= aff_cap, "fill on /metrics");
    drop(plain_conns);
    drop(aff_conns);
    drop(aff_pairs);
    drop(echo_servers);
    Ok(())
}
