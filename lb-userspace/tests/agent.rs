//! The node agent against real maps and real interfaces (root needed):
//! - the diff writer on a loaded datapath, with packets through `BPF_PROG_TEST_RUN`;
//! - `lb agent --source file:` end to end: programming, updates, SIGKILL and restart
//!   without a flush, `lb cleanup`;
//! - attaching inside throw-away namespaces, following veths that come and go, and a
//!   long TCP stream through a ClusterIP that survives `kill -9` of the agent.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{BackendKey, ServiceKey4};
use lb_testing::{
    Datapath, Hook, PrivateBpffs, Scratch, Verdict,
    agent::{AgentProcess, read_status as status},
    netns::{self, NODE_CLIENT_IF, NODE_SERVER_IF, SERVER_IP, Topology},
};
use lb_userspace::{
    agent::model::{Backend, Desired, Frontend, FrontendKey, NoEndpoints, Protocol},
    agent::sync::BpfMaps,
    inspect,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn frontend(backends: &[(Ipv4Addr, u16)]) -> Frontend {
    frontend_d(backends, &[])
}

/// A frontend with `draining` backends besides the selected ones.
fn frontend_d(backends: &[(Ipv4Addr, u16)], draining: &[(Ipv4Addr, u16)]) -> Frontend {
    Frontend {
        service: "default/web:http".into(),
        affinity_timeout_s: None,
        no_endpoints: NoEndpoints::Reject,
        backends: backends.iter().map(|&(ip, port)| Backend { ip, port }).collect(),
        draining: draining.iter().map(|&(ip, port)| Backend { ip, port }).collect(),
    }
}

fn key(port: u16) -> FrontendKey {
    FrontendKey { ip: VIP, port, proto: Protocol::Tcp }
}

/// A TCP SYN from `sport` to VIP:80.
fn syn(sport: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 244, 1, 2], VIP.octets(), 64)
        .tcp(sport, 80, 1, 64_000)
        .syn();
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).expect("building a packet");
    out
}

/// A mid-connection TCP segment (ACK with data) from `sport` to VIP:80.
fn ack(sport: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 244, 1, 2], VIP.octets(), 64)
        .tcp(sport, 80, 2, 64_000)
        .ack(1);
    let mut out = Vec::with_capacity(b.size(4));
    b.write(&mut out, b"data").expect("building a packet");
    out
}

/// Where the datapath sent the packet.
fn destination(packet: &[u8]) -> (Ipv4Addr, u16) {
    let p = etherparse::SlicedPacket::from_ethernet(packet).expect("parse");
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { panic!("not IPv4") };
    let Some(etherparse::TransportSlice::Tcp(tcp)) = p.transport else { panic!("not TCP") };
    (ip.header().destination_addr(), tcp.destination_port())
}

#[test]
fn sync_programs_real_maps_and_the_datapath_follows() -> Result<()> {
    let mut dp = Datapath::load()?;
    let mut maps = BpfMaps::from_ebpf(&dp.ebpf)?;
    let mut syncer = maps.reconcile();
    assert_eq!(syncer.frontend_count(), 0);

    let b = |i: u8| (Ipv4Addr::new(10, 244, 2, i), 8080);
    let mut d = Desired::default();
    d.frontends.insert(key(80), frontend(&[b(1), b(2), b(3)]));
    let st = syncer.sync(&d, &mut maps)?;
    assert_eq!((st.frontends, st.endpoints), (1, 3));

    // New flows land on the backends; an established flow keeps its backend.
    let (v, out, _) = dp.run(Hook::Xdp, &syn(40_000), 1)?;
    assert_eq!(v, Verdict::Pass);
    let first = destination(&out);
    assert!([b(1), b(2), b(3)].contains(&first), "{first:?}");
    let seen: std::collections::BTreeSet<_> =
        (0..64).map(|i| destination(&dp.run(Hook::Xdp, &syn(41_000 + i), 1).unwrap().1)).collect();
    assert_eq!(seen.len(), 3, "64 flows should reach all 3 backends: {seen:?}");

    // Remove the backend flow 40000 uses; everything else stays, and the shrunk
    // service is what the maps hold.
    let left: Vec<_> = [b(1), b(2), b(3)].into_iter().filter(|x| *x != first).collect();
    let mut d2 = Desired::default();
    d2.frontends.insert(key(80), frontend(&left));
    let st = syncer.sync(&d2, &mut maps)?;
    // The slot, the entry (count and its new table), the table; the epoch after.
    assert!(st.services_put + st.backends_put + st.backends_deleted <= 3 && st.tables_put == 1, "{st:?}");
    let (services, backends) = maps.read_all();
    let svc = services.iter().find(|(k, _)| *k == key(80).map_key()).expect("frontend").1;
    assert_eq!(svc.count, 2);
    assert!(services.iter().any(|(k, _)| *k == ServiceKey4::address_marker(u32::from_ne_bytes(VIP.octets()))));
    assert_eq!(backends.len(), 2);
    for slot in 1..=2 {
        let be = backends.iter().find(|(k, _)| *k == BackendKey { svc_id: svc.id, slot }).expect("slot").1;
        assert!(left.contains(&(Ipv4Addr::from(be.addr_be.to_ne_bytes()), u16::from_be(be.port_be))));
    }
    // A new flow from the same client port (conntrack says: backend gone, SYN may be
    // rescheduled) goes to a remaining backend.
    let (_, out, _) = dp.run(Hook::Xdp, &syn(40_000), 1)?;
    assert!(left.contains(&destination(&out)));

    // "Restart": a syncer rebuilt from the maps writes nothing for the same state...
    let mut maps2 = BpfMaps::from_ebpf(&dp.ebpf)?;
    let mut syncer2 = maps2.reconcile();
    let st = syncer2.sync(&d2, &mut maps2)?;
    assert_eq!((st.ops(), st.ids_put), (1, 1), "only the epoch a new agent bumps: {st:?}");
    // ...and deleting everything empties the maps.
    syncer2.sync(&Desired::default(), &mut maps2)?;
    let (services, backends) = maps2.read_all();
    assert!(services.is_empty() && backends.is_empty(), "{services:?} {backends:?}");
    Ok(())
}

/// kube-proxy's behaviour for a pod that leaves the endpoints but still exists: its
/// established connections keep going (`DRAINING`), new ones go elsewhere; once it
/// has left the slices, its connections are cut.
#[test]
fn established_flow_to_a_terminating_backend_drains_then_is_cut() -> Result<()> {
    let mut dp = Datapath::load()?;
    let mut maps = BpfMaps::from_ebpf(&dp.ebpf)?;
    let mut syncer = maps.reconcile();
    let b = |i: u8| (Ipv4Addr::new(10, 244, 3, i), 8080);
    let all = [b(1), b(2), b(3)];
    let mut d = Desired::default();
    d.frontends.insert(key(80), frontend(&all));
    syncer.sync(&d, &mut maps)?;

    // A TCP flow established to backend A.
    let (v, out, _) = dp.run(Hook::Xdp, &syn(45_000), 1)?;
    assert_eq!(v, Verdict::Pass);
    let a = destination(&out);
    let (v, out, _) = dp.run(Hook::Xdp, &ack(45_000), 1)?;
    assert_eq!((v, destination(&out)), (Verdict::Pass, a));
    let others: Vec<_> = all.into_iter().filter(|x| *x != a).collect();

    // A turns terminating: out of the slots, draining.
    let mut d2 = Desired::default();
    d2.frontends.insert(key(80), frontend_d(&others, &[a]));
    let st = syncer.sync(&d2, &mut maps)?;
    assert_eq!(st.draining_put, 1, "{st:?}");
    let row = slots_and_draining(&maps, &syncer);
    assert_eq!(row, (2, 1));
    let draining_before = dp.stat(lb_common::Reason::FwdDraining).packets;
    let (v, out, _) = dp.run(Hook::Xdp, &ack(45_000), 1)?;
    assert_eq!((v, destination(&out)), (Verdict::Pass, a), "the established flow should still reach A");
    assert_eq!(dp.stat(lb_common::Reason::FwdDraining).packets, draining_before + 1);
    // New connections never go to A.
    for sport in 46_000..46_064 {
        let (v, out, _) = dp.run(Hook::Xdp, &syn(sport), 1)?;
        assert_eq!(v, Verdict::Pass);
        assert!(others.contains(&destination(&out)), "a new flow went to the draining backend");
    }

    // A leaves the slices (the pod is gone): its flow is dropped, never moved.
    let mut d3 = Desired::default();
    d3.frontends.insert(key(80), frontend(&others));
    let st = syncer.sync(&d3, &mut maps)?;
    assert_eq!(st.draining_deleted, 1, "{st:?}");
    assert!(maps.read_draining().is_empty());
    let gone_before = dp.stat(lb_common::Reason::DropBackendGone).packets;
    let (v, _, _) = dp.run(Hook::Xdp, &ack(45_000), 1)?;
    assert_eq!(v, Verdict::Drop);
    assert_eq!(dp.stat(lb_common::Reason::DropBackendGone).packets, gone_before + 1);

    // Deleting the service used to leave no draining entry behind; now its backends
    // stay draining, as orphans, for its established flows (see
    // `deleting_a_service_keeps_its_established_tcp_flows`).
    syncer.sync(&d2, &mut maps)?;
    assert_eq!(maps.read_draining().len(), 1);
    syncer.sync(&Desired::default(), &mut maps)?;
    assert_eq!(maps.read_draining().len(), 3);
    assert_eq!(syncer.orphan_count(), 3);
    Ok(())
}

/// The id of a backend removed just before a restart must not go to a new backend: a
/// stale conntrack entry names its backend by id and slot, and would match. At the old
/// head `from_maps` issued the largest id in the maps plus one, which was the removed
/// backend's, and the stale flow's next segment went to the new pod.
#[test]
fn a_restart_does_not_give_a_removed_backends_id_to_a_new_one() -> Result<()> {
    let mut dp = Datapath::load()?;
    let mut maps = BpfMaps::from_ebpf(&dp.ebpf)?;
    let mut syncer = maps.reconcile();
    let b = |i: u8| (Ipv4Addr::new(10, 244, 4, i), 8080);
    let mut d = Desired::default();
    d.frontends.insert(key(80), frontend(&[b(1), b(2), b(3)]));
    syncer.sync(&d, &mut maps)?;
    let svc = maps.read_all().0.iter().find(|(k, _)| *k == key(80).map_key()).expect("frontend").1;
    let slot3 = |maps: &BpfMaps| {
        maps.read_all().1.into_iter().find(|(k, _)| *k == BackendKey { svc_id: svc.id, slot: 3 }).map(|(_, v)| v)
    };
    let old = slot3(&maps).context("slot 3")?;
    assert_eq!((Ipv4Addr::from(old.addr_be.to_ne_bytes()), old.backend_id), (b(3).0, 3), "the largest id");
    // A TCP flow to backend 3.
    let mut sport = None;
    for p in 47_000..47_256 {
        if destination(&dp.run(Hook::Xdp, &syn(p), 1)?.1) == b(3) {
            sport = Some(p);
            break;
        }
    }
    let sport = sport.context("no flow went to backend 3")?;
    assert_eq!(destination(&dp.run(Hook::Xdp, &ack(sport), 1)?.1), b(3));

    // Its pod goes (not even terminating): the flow is cut.
    let mut d2 = Desired::default();
    d2.frontends.insert(key(80), frontend(&[b(1), b(2)]));
    syncer.sync(&d2, &mut maps)?;
    assert_eq!(dp.run(Hook::Xdp, &ack(sport), 1)?.0, Verdict::Drop);

    // A restart, then a new pod, which takes slot 3, the one the stale entry names.
    drop((syncer, maps));
    let mut maps = BpfMaps::from_ebpf(&dp.ebpf)?;
    let mut syncer = maps.reconcile();
    let mut d3 = Desired::default();
    d3.frontends.insert(key(80), frontend(&[b(1), b(2), b(4)]));
    syncer.sync(&d3, &mut maps)?;
    let new = slot3(&maps).context("slot 3")?;
    assert_eq!(Ipv4Addr::from(new.addr_be.to_ne_bytes()), b(4).0);
    assert_eq!(new.backend_id, 4, "the removed backend's id was issued again");
    assert_eq!(maps.read_ids().next_backend_id, 5);
    let gone_before = dp.stat(lb_common::Reason::DropBackendGone).packets;
    let (v, _, _) = dp.run(Hook::Xdp, &ack(sport), 1)?;
    assert_eq!(v, Verdict::Drop, "the stale flow went to a pod that never saw its connection");
    assert_eq!(dp.stat(lb_common::Reason::DropBackendGone).packets, gone_before + 1);
    Ok(())
}

/// kube-proxy deletes a Service's iptables rules but leaves the DNAT'd TCP conntrack
/// entries alone, so established connections go on (it flushes UDP ones only). So do
/// we: the deleted frontend's backends drain, as orphans, across a restart and while
/// the Service comes back under a fresh id.
#[test]
fn deleting_a_service_keeps_its_established_tcp_flows() -> Result<()> {
    let mut dp = Datapath::load()?;
    let mut maps = BpfMaps::from_ebpf(&dp.ebpf)?;
    let mut syncer = maps.reconcile();
    let b = |i: u8| (Ipv4Addr::new(10, 244, 5, i), 8080);
    let mut d = Desired::default();
    d.frontends.insert(key(80), frontend(&[b(1), b(2)]));
    syncer.sync(&d, &mut maps)?;
    let old_id = maps.read_all().0.iter().find(|(k, _)| *k == key(80).map_key()).expect("frontend").1.id;
    let (_, out, _) = dp.run(Hook::Xdp, &syn(48_000), 1)?;
    let a = destination(&out);
    assert_eq!(destination(&dp.run(Hook::Xdp, &ack(48_000), 1)?.1), a);

    // The Service goes: no frontend, no marker, no slot; its backends drain.
    let st = syncer.sync(&Desired::default(), &mut maps)?;
    assert_eq!((st.draining_put, st.draining_deleted), (2, 0), "{st:?}");
    let (services, backends) = maps.read_all();
    assert!(services.is_empty() && backends.is_empty(), "{services:?} {backends:?}");
    assert!(maps.read_draining().iter().all(|(k, _)| k.svc_id == old_id));
    let fwd = |dp: &mut Datapath| -> Result<(Verdict, (Ipv4Addr, u16))> {
        let (v, out, _) = dp.run(Hook::Xdp, &ack(48_000), 1)?;
        Ok((v, destination(&out)))
    };
    let draining_before = dp.stat(lb_common::Reason::FwdDraining).packets;
    assert_eq!(fwd(&mut dp)?, (Verdict::Pass, a), "the established flow was cut");
    assert_eq!(dp.stat(lb_common::Reason::FwdDraining).packets, draining_before + 1);
    // A new connection is not balanced any more: it passes unchanged.
    assert_eq!(destination(&dp.run(Hook::Xdp, &syn(48_001), 1)?.1), (VIP, 80));

    // A restart recognises the orphans and keeps them.
    drop((syncer, maps));
    let mut maps = BpfMaps::from_ebpf(&dp.ebpf)?;
    let mut syncer = maps.reconcile();
    assert_eq!(syncer.orphan_count(), 2);
    let st = syncer.sync(&Desired::default(), &mut maps)?;
    assert_eq!((st.ops(), st.ids_put), (1, 1), "only the epoch a new agent bumps: {st:?}");
    assert_eq!(fwd(&mut dp)?, (Verdict::Pass, a));

    // The Service comes back: a fresh id; the old flow still goes on, new ones are
    // balanced again.
    syncer.sync(&d, &mut maps)?;
    let new_id = maps.read_all().0.iter().find(|(k, _)| *k == key(80).map_key()).expect("frontend").1.id;
    assert_ne!(new_id, old_id);
    assert_eq!(fwd(&mut dp)?, (Verdict::Pass, a));
    assert!([b(1), b(2)].contains(&destination(&dp.run(Hook::Xdp, &syn(48_002), 1)?.1)));
    // The collector's call needs no wait for inherited orphans (their frontend went
    // before this agent started, so every scan it makes sees their flows): the one the
    // flow uses stays, the other goes.
    let used: std::collections::HashSet<(u32, u32)> = maps
        .read_draining()
        .iter()
        .filter(|(_, v)| (Ipv4Addr::from(v.addr_be.to_ne_bytes()), u16::from_be(v.port_be)) == a)
        .map(|(k, _)| (k.svc_id, k.backend_id))
        .collect();
    assert_eq!(used.len(), 1, "{:?}", maps.read_draining());
    assert_eq!(syncer.release_orphans(&used, &mut maps)?.draining_deleted, 1);
    assert_eq!(maps.read_draining().len(), 1);
    assert_eq!(fwd(&mut dp)?, (Verdict::Pass, a), "the established flow was cut");
    Ok(())
}

/// (slots, draining entries) of the one frontend, as the maps hold them, checking that
/// the draining entry carries the id the backend had.
fn slots_and_draining(maps: &BpfMaps, syncer: &lb_userspace::agent::sync::Syncer) -> (usize, usize) {
    let (services, backends) = maps.read_all();
    let svc = services.iter().find(|(k, _)| *k == key(80).map_key()).expect("frontend").1;
    let draining = maps.read_draining();
    assert!(draining.iter().all(|(k, v)| k.svc_id == svc.id && k.backend_id == v.backend_id));
    assert_eq!(syncer.shadow().draining.get(&svc.id).map_or(0, |d| d.len()), draining.len());
    (backends.iter().filter(|(k, _)| k.svc_id == svc.id).count(), draining.len())
}

fn lb() -> &'static str {
    env!("CARGO_BIN_EXE_lb")
}

/// frontend -> sorted backends, as `lb services` sees them.
fn programmed(bpffs: &Path) -> Vec<(String, Vec<String>)> {
    lb_testing::backend_sets(bpffs)
}

fn yaml(backends: &[&str], affinity: bool) -> String {
    let eps: String = backends.iter().map(|a| format!("- addresses: [{a}]\n  conditions: {{ready: true}}\n")).collect();
    let aff = if affinity { "  sessionAffinity: ClientIP\n" } else { "" };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {VIP}\n{aff}  \
         ports: [{{name: http, port: 80, targetPort: web}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints:\n{eps}"
    )
}

/// Writes `text` to `path` atomically, as a config manager would.
fn write_file(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[test]
fn file_source_end_to_end_with_kill_9_and_cleanup() -> Result<()> {
    let bpffs = PrivateBpffs::new()?;
    let dir = Scratch::new("file")?;
    let file = dir.0.join("objects.yaml");
    let status_file = dir.0.join("status.json");
    write_file(&file, &yaml(&["10.244.2.1", "10.244.2.2"], false))?;
    let agent_cmd = || {
        let mut c = Command::new(lb());
        c.args(["agent", "--source"])
            .arg(format!("file:{}", file.display()))
            .arg("--file-poll=20ms")
            .env("LB_BPFFS", bpffs.path())
            .env("LB_STATUS_FILE", &status_file);
        c
    };
    let log = dir.0.join("agent.log");
    let mut agent = AgentProcess::spawn(agent_cmd(), &log, &status_file)?;
    let want =
        |b: &[&str]| vec![("10.96.0.10:80/TCP".to_string(), b.iter().map(|s| s.to_string()).collect::<Vec<_>>())];
    agent.wait_for("initial programming", Duration::from_secs(20), || {
        (programmed(bpffs.path()) == want(&["10.244.2.1:8080", "10.244.2.2:8080"])).then_some(())
    })?;
    // The status file is written after the maps, so it may lag them a little.
    agent.wait_for("status file", Duration::from_secs(10), || {
        status(&status_file).is_some_and(|s| s.ready && s.frontends == 1 && s.endpoints == 2).then_some(())
    })?;

    // Scale up, change affinity: both take effect.
    write_file(&file, &yaml(&["10.244.2.1", "10.244.2.2", "10.244.2.3"], true))?;
    agent.wait_for("scale-up and affinity", Duration::from_secs(10), || {
        let rows = inspect::services(bpffs.path()).ok()?;
        (rows.len() == 1 && rows[0].backends.len() == 3 && rows[0].affinity_timeout_s == Some(10_800)).then_some(())
    })?;
    let before = inspect::services(bpffs.path())?;

    // SIGKILL; change the file while no agent runs; the maps keep the last state.
    agent.kill9();
    write_file(&file, &yaml(&["10.244.2.1", "10.244.2.3", "10.244.2.4"], true))?;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(programmed(bpffs.path()), want(&["10.244.2.1:8080", "10.244.2.2:8080", "10.244.2.3:8080"]));

    // The restarted agent reconciles: same service id, surviving backends keep their
    // ids, only the difference is written.
    let _ = std::fs::remove_file(&status_file);
    let mut agent = AgentProcess::spawn(agent_cmd(), &log, &status_file)?;
    let st =
        agent.wait_for("ready after restart", Duration::from_secs(20), || status(&status_file).filter(|s| s.ready))?;
    // The diff: one slot, the new backend's id (IDS), its table (one write) and the entry
    // pointing at it, at most two prefilter words set and two cleared, and the epoch
    // the new agent bumps (IDS again).
    assert!(st.last_sync_writes <= 9, "restart wrote {} ops; expected only the diff", st.last_sync_writes);
    let after = inspect::services(bpffs.path())?;
    assert_eq!(programmed(bpffs.path()), want(&["10.244.2.1:8080", "10.244.2.3:8080", "10.244.2.4:8080"]));
    assert_eq!(after[0].id, before[0].id, "service id changed across restart");
    for b in &after[0].backends {
        if let Some(old) = before[0].backends.iter().find(|o| o.address == b.address) {
            assert_eq!(old.backend_id, b.backend_id, "backend {} changed id", b.address);
        } else {
            assert!(before[0].backends.iter().all(|o| o.backend_id != b.backend_id), "backend id reused");
        }
    }

    // A pod turns terminating: out of the slots, listed as draining by `lb services`.
    let terminating = yaml(&["10.244.2.1", "10.244.2.3", "10.244.2.4"], true).replace(
        "- addresses: [10.244.2.4]\n  conditions: {ready: true}",
        "- addresses: [10.244.2.4]\n  conditions: {ready: false, serving: true, terminating: true}",
    );
    write_file(&file, &terminating)?;
    let rows = agent.wait_for("terminating pod draining", Duration::from_secs(10), || {
        let rows = inspect::services(bpffs.path()).ok()?;
        (programmed(bpffs.path()) == want(&["10.244.2.1:8080", "10.244.2.3:8080"]) && rows[0].draining.len() == 1)
            .then_some(rows)
    })?;
    assert_eq!(rows[0].draining[0].address, "10.244.2.4:8080");
    let id4 = after[0].backends.iter().find(|b| b.address == "10.244.2.4:8080").expect("backend 4").backend_id;
    assert_eq!(rows[0].draining[0].backend_id, id4, "a draining backend keeps its id");
    assert!(
        inspect::services_table(&rows).contains("10.244.2.4:8080")
            && inspect::services_table(&rows).contains("draining")
    );
    let json = serde_json::to_value(&rows)?;
    assert_eq!(json[0]["draining"][0]["address"], "10.244.2.4:8080");

    // Bad objects do not stop it; deleting the service empties the maps.
    write_file(
        &file,
        &format!(
            "{}---\nkind: Service\napiVersion: v1\nmetadata: {{name: bad}}\nspec: {{clusterIP: 10.96.0.999, ports: [{{port: 80}}]}}\n",
            yaml(&["10.244.2.1"], false)
        ),
    )?;
    agent.wait_for("bad object counted, rest programmed", Duration::from_secs(10), || {
        let s = status(&status_file)?;
        (s.invalid_objects == 1 && programmed(bpffs.path()) == want(&["10.244.2.1:8080"])).then_some(())
    })?;
    write_file(&file, "")?;
    agent.wait_for("empty maps", Duration::from_secs(10), || programmed(bpffs.path()).is_empty().then_some(()))?;
    agent.term()?;

    let out = Command::new(lb())
        .args(["cleanup"])
        .env("LB_BPFFS", bpffs.path())
        .env("LB_STATUS_FILE", &status_file)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let left: Vec<_> = std::fs::read_dir(bpffs.path())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("lb"))
        .collect();
    assert!(left.is_empty(), "left after lb cleanup: {left:?}");
    Ok(())
}

/// Echo server on SERVER_IP:8080 in the server namespace; stops when `stop` is set.
fn echo_server(topo: &Topology, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>> {
    let listener = topo.server.run(|| TcpListener::bind((SERVER_IP, 8080)).context("bind"))?;
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut buf = [0u8; 4096];
                        while !stop.load(Ordering::Relaxed) {
                            match s.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if e.kind() == std::io::ErrorKind::WouldBlock
                                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => break,
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }))
}

fn node_agent(topo: &Topology, bpffs: &Path, file: &Path, status_file: &Path, mode: &str) -> Command {
    let mut c = topo.node.command(lb());
    c.args([
        "agent",
        "--iface-glob",
        "to-*",
        "--pod-attach",
        mode,
        "--iface-rescan",
        "200ms",
        "--file-poll",
        "20ms",
        "--source",
    ])
    .arg(format!("file:{}", file.display()))
    .env("LB_BPFFS", bpffs)
    .env("LB_STATUS_FILE", status_file);
    if mode != "tc" {
        // These veths stand for pod veths; the stream test checks XDP's link
        // adoption, not checksums (both ends are on this node).
        c.env("LB_ALLOW_XDP_ON_PODS", "true");
    }
    c
}

/// A TCP stream through the ClusterIP keeps going, with no reset and no stall over
/// 1 s, while the agent is SIGKILLed and started again.
fn stream_survives_agent_restart(mode: &str) -> Result<()> {
    netns::remove_stale()?;
    let topo = Topology::new()?;
    let bpffs = PrivateBpffs::new()?;
    let dir = Scratch::new(&format!("stream-{mode}"))?;
    let file = dir.0.join("objects.yaml");
    let status_file = dir.0.join("status.json");
    write_file(&file, &yaml(&[&SERVER_IP.to_string()], false))?;
    let log = dir.0.join("agent.log");
    let mut agent =
        AgentProcess::spawn(node_agent(&topo, bpffs.path(), &file, &status_file, mode), &log, &status_file)?;
    let links = bpffs.path().join("links");
    agent.wait_for("both veths attached and the service programmed", Duration::from_secs(20), || {
        let s = status(&status_file)?;
        (s.ready && s.attach.len() == 4).then_some(())
    })?;
    let pins: Vec<String> =
        std::fs::read_dir(&links)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    // Each pod veth: the ingress hook in `mode`, and tc egress.
    assert_eq!(pins.len(), 4, "{pins:?}");
    assert_eq!(pins.iter().filter(|p| p.contains(&format!("_{mode}_"))).count(), 2, "{pins:?}");
    assert_eq!(pins.iter().filter(|p| p.contains("_tc-egress_")).count(), 2, "{pins:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(&topo, stop.clone())?;
    let target = SocketAddr::from((VIP, 80));
    let mut conn = topo
        .client
        .run(|| TcpStream::connect_timeout(&target, Duration::from_secs(3)).context("connect to the ClusterIP"))?;
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    conn.set_nodelay(true)?;

    // Ping-pong 64-byte messages every 10 ms; the longest gap between two echoes is
    // the stall the stream saw.
    let mut max_gap = Duration::ZERO;
    let mut last = Instant::now();
    let mut seq = 0u64;
    let mut exchange = |conn: &mut TcpStream, until: Instant| -> Result<()> {
        while Instant::now() < until {
            let msg = [(seq % 251) as u8; 64];
            conn.write_all(&msg).context("write (reset?)")?;
            let mut back = [0u8; 64];
            conn.read_exact(&mut back).context("read (reset or stall > 3 s)")?;
            if back != msg {
                bail!("echo corrupted at message {seq}");
            }
            seq += 1;
            max_gap = max_gap.max(last.elapsed());
            last = Instant::now();
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    };
    exchange(&mut conn, Instant::now() + Duration::from_millis(500))?;
    let prog_ids_before: Vec<Option<u32>> =
        status(&status_file).map(|s| s.attach.iter().map(|a| a.program_id).collect()).unwrap_or_default();

    agent.kill9();
    // Still attached with nobody running: the pins hold the links.
    exchange(&mut conn, Instant::now() + Duration::from_millis(500))?;
    let _ = std::fs::remove_file(&status_file);
    let mut agent =
        AgentProcess::spawn(node_agent(&topo, bpffs.path(), &file, &status_file, mode), &log, &status_file)?;
    // Keep the stream going while the new agent adopts the links.
    let t0 = Instant::now();
    loop {
        exchange(&mut conn, Instant::now() + Duration::from_millis(100))?;
        if status(&status_file).is_some_and(|s| s.ready && s.attach.len() == 4) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("restarted agent not ready; log:\n{}", agent.log_text());
        }
    }
    exchange(&mut conn, Instant::now() + Duration::from_millis(500))?;
    let st = status(&status_file).unwrap_or_default();
    let prog_ids_after: Vec<Option<u32>> = st.attach.iter().map(|a| a.program_id).collect();
    assert_ne!(prog_ids_before, prog_ids_after, "the restarted agent should have swapped its program in");
    assert_eq!(st.last_sync_writes, 0, "restart should write nothing: the maps already hold the state");
    assert!(max_gap < Duration::from_secs(1), "stream stalled for {max_gap:?}");
    assert!(agent.log_text().contains("adopted the pinned link"), "{}", agent.log_text());

    // A veth that goes away loses its pin; a new one matching the glob is attached.
    topo.node.ip(&["link", "add", "to-extra", "type", "veth", "peer", "name", "extra-peer"])?;
    agent.wait_for("new veth attached", Duration::from_secs(10), || {
        std::fs::read_dir(&links)
            .ok()?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with("_to-extra"))
            .then_some(())
    })?;
    topo.node.ip(&["link", "del", "to-extra"])?;
    agent.wait_for("gone veth detached", Duration::from_secs(10), || {
        (!std::fs::read_dir(&links).ok()?.flatten().any(|e| e.file_name().to_string_lossy().ends_with("_to-extra")))
            .then_some(())
    })?;

    stop.store(true, Ordering::Relaxed);
    drop(conn);
    let _ = server.join();
    agent.term()?;
    // `lb cleanup` detaches: traffic to the ClusterIP no longer reaches the server.
    let out = topo.node.command(lb()).args(["cleanup"]).env("LB_BPFFS", bpffs.path()).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!links.exists() || std::fs::read_dir(&links)?.next().is_none());
    Ok(())
}

#[test]
fn tcp_stream_survives_agent_kill_9_tc() -> Result<()> {
    stream_survives_agent_restart("tc")
}

#[test]
fn tcp_stream_survives_agent_kill_9_xdp() -> Result<()> {
    stream_survives_agent_restart("xdp")
}

/// `net.ipv4.conf.<conf>.rp_filter` in the node namespace.
fn node_rp_filter(topo: &Topology, conf: &str) -> Result<u8> {
    let v = topo.node.exec("cat", &[&format!("/proc/sys/net/ipv4/conf/{conf}/rp_filter")])?;
    v.trim().parse().with_context(|| format!("rp_filter of {conf}: {v:?}"))
}

/// One echo through the ClusterIP from the client pod, within `timeout`.
fn echo_once(topo: &Topology, timeout: Duration) -> Result<()> {
    let target = SocketAddr::from((VIP, 80));
    topo.client.run(|| {
        let mut c = TcpStream::connect_timeout(&target, timeout).context("connect to the ClusterIP")?;
        c.set_read_timeout(Some(timeout))?;
        c.write_all(b"ping")?;
        let mut back = [0u8; 4];
        c.read_exact(&mut back).context("echo")?;
        if &back != b"ping" {
            bail!("echo corrupted");
        }
        Ok(())
    })
}

/// Strict rp_filter on the node drops every reply the datapath reverse-NATs
/// (docs/datapath-veth.md, finding 3). The agent turns it off on the interfaces it
/// attaches to, and reports (default: fixes) a strict `conf.all`, which the kernel
/// would otherwise apply on top (the maximum of `all` and the interface wins).
#[test]
fn rp_filter_is_turned_off_where_the_agent_attaches() -> Result<()> {
    netns::remove_stale()?;
    let topo = Topology::new()?;
    // A node set up strict everywhere, as some distributions do. Only in the test's
    // own node namespace.
    for conf in ["all", NODE_CLIENT_IF, NODE_SERVER_IF] {
        topo.node.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "1")?;
    }
    let bpffs = PrivateBpffs::new()?;
    let dir = Scratch::new("rpfilter")?;
    let file = dir.0.join("objects.yaml");
    let status_file = dir.0.join("status.json");
    write_file(&file, &yaml(&[&SERVER_IP.to_string()], false))?;
    let log = dir.0.join("agent.log");
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(&topo, stop.clone())?;

    // Told not to fix `all`: the interfaces are set to 0, `all` stays strict, the
    // agent says so, and the ClusterIP indeed does not answer.
    let mut cmd = node_agent(&topo, bpffs.path(), &file, &status_file, "tc");
    cmd.arg("--fix-rp-filter=false");
    let mut agent = AgentProcess::spawn(cmd, &log, &status_file)?;
    let st = agent.wait_for("attached, with the strict `all` reported", Duration::from_secs(20), || {
        status(&status_file).filter(|s| s.ready && s.attach.len() == 4 && s.rp_filter.all.is_some())
    })?;
    assert_eq!(st.rp_filter.all, Some(1));
    assert!(st.rp_filter.warning.as_deref().is_some_and(|w| w.contains("strict")), "{:?}", st.rp_filter);
    assert_eq!(node_rp_filter(&topo, NODE_CLIENT_IF)?, 0);
    assert_eq!(node_rp_filter(&topo, NODE_SERVER_IF)?, 0);
    assert_eq!(node_rp_filter(&topo, "all")?, 1);
    assert!(agent.log_text().contains("rp_filter is 1 (strict)"), "{}", agent.log_text());
    assert!(
        echo_once(&topo, Duration::from_millis(1500)).is_err(),
        "strict conf.all should drop the reverse-NATed SYN-ACK"
    );
    agent.term()?;

    // By default the agent turns the strict `all` off, and the ClusterIP works.
    for conf in [NODE_CLIENT_IF, NODE_SERVER_IF] {
        topo.node.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "1")?;
    }
    let _ = std::fs::remove_file(&status_file);
    let agent = AgentProcess::spawn(node_agent(&topo, bpffs.path(), &file, &status_file, "tc"), &log, &status_file)?;
    let st = agent.wait_for("attached, with `all` fixed", Duration::from_secs(20), || {
        status(&status_file).filter(|s| s.ready && s.attach.len() == 4 && s.rp_filter.all.is_some())
    })?;
    assert_eq!(
        (st.rp_filter.all, st.rp_filter.all_fixed_from, st.rp_filter.warning.as_deref()),
        (Some(0), Some(1), None)
    );
    for conf in ["all", NODE_CLIENT_IF, NODE_SERVER_IF] {
        assert_eq!(node_rp_filter(&topo, conf)?, 0, "{conf}");
    }
    echo_once(&topo, Duration::from_secs(3))?;

    // A value put back later (e.g. by systemd-sysctl for a new interface) is undone
    // at the next rescan.
    topo.node.sysctl(&format!("net.ipv4.conf.{NODE_SERVER_IF}.rp_filter"), "1")?;
    agent.wait_for("rp_filter reset on rescan", Duration::from_secs(10), || {
        (node_rp_filter(&topo, NODE_SERVER_IF).ok()? == 0).then_some(())
    })?;
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    drop(agent);
    let out = topo.node.command(lb()).args(["cleanup"]).env("LB_BPFFS", bpffs.path()).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// XDP on pod veths corrupts CHECKSUM_PARTIAL packets (docs/datapath-veth.md): the
/// agent refuses it, before touching anything, unless told otherwise; `--help`
/// explains the defaults.
#[test]
fn xdp_on_pod_interfaces_is_refused_without_consent() -> Result<()> {
    for mode in ["xdp", "xdp-generic"] {
        let out = Command::new(lb())
            .args(["agent", "--source", "file:/nonexistent", "--iface-glob", "veth*", "--pod-attach", mode])
            // Not creatable: should the check be missing, nothing is mounted anywhere.
            .env("LB_BPFFS", "/proc/lb-not-a-bpffs")
            .env_remove("LB_ALLOW_XDP_ON_PODS")
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{mode} accepted: {err}");
        assert!(err.contains(&format!("--pod-attach {mode} refused")) && err.contains("--allow-xdp-on-pods"), "{err}");
    }
    // With consent it gets past the check (and fails later, on the bpffs).
    let out = Command::new(lb())
        .args(["agent", "--source", "file:/nonexistent", "--pod-attach", "xdp", "--allow-xdp-on-pods"])
        .env("LB_BPFFS", "/proc/lb-not-a-bpffs")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("refused") && err.contains("bpffs"), "{err}");
    // tc, the default, needs nothing.
    let help = Command::new(lb()).args(["agent", "--help"]).output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("Attach defaults:") && help.contains("--allow-xdp-on-pods"), "{help}");
    Ok(())
}

/// Two Services from v1 objects through `--source file:`, on node `node-b` in
/// `zone-b`: `internalTrafficPolicy: Local` (one local endpoint, then none), and
/// topology aware hints.
fn node_yaml(local_node_of_second: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: local, namespace: default}}\n\
         spec: {{clusterIP: 10.96.0.20, internalTrafficPolicy: Local, ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: local-1, namespace: default, labels: {{kubernetes.io/service-name: local}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n\
         - {{addresses: [10.244.1.1], nodeName: node-a, conditions: {{ready: true}}}}\n\
         - {{addresses: [10.244.2.1], nodeName: {local_node_of_second}, conditions: {{ready: true}}}}\n---\n\
         apiVersion: v1\nkind: Service\n\
         metadata: {{name: zonal, namespace: default, annotations: {{service.kubernetes.io/topology-aware-hints: auto}}}}\n\
         spec: {{clusterIP: 10.96.0.21, ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: zonal-1, namespace: default, labels: {{kubernetes.io/service-name: zonal}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n\
         - {{addresses: [10.244.1.2], nodeName: node-a, zone: zone-a, hints: {{forZones: [{{name: zone-a}}]}}}}\n\
         - {{addresses: [10.244.2.2], nodeName: node-b, zone: zone-b, hints: {{forZones: [{{name: zone-b}}]}}}}\n\
         - {{addresses: [10.244.3.2], nodeName: node-c, zone: zone-b, hints: {{forZones: [{{name: zone-b}}]}}}}\n"
    )
}

#[test]
fn file_source_node_awareness_and_last_good_state_on_yaml_errors() -> Result<()> {
    let bpffs = PrivateBpffs::new()?;
    let dir = Scratch::new("node")?;
    let file = dir.0.join("objects.yaml");
    let status_file = dir.0.join("status.json");
    write_file(&file, &node_yaml("node-b"))?;
    let mut c = Command::new(lb());
    c.args(["agent", "--source"])
        .arg(format!("file:{}", file.display()))
        .args(["--file-poll=20ms", "--node-name=node-b"])
        .env("LB_NODE_ZONE", "zone-b")
        .env("LB_BPFFS", bpffs.path())
        .env("LB_STATUS_FILE", &status_file);
    let mut agent = AgentProcess::spawn(c, &dir.0.join("agent.log"), &status_file)?;
    let want = |local: &[&str]| {
        vec![
            ("10.96.0.20:80/TCP".to_string(), local.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            ("10.96.0.21:80/TCP".to_string(), vec!["10.244.2.2:8080".to_string(), "10.244.3.2:8080".to_string()]),
        ]
    };
    agent.wait_for("Local and hinted backends", Duration::from_secs(20), || {
        (programmed(bpffs.path()) == want(&["10.244.2.1:8080"])).then_some(())
    })?;
    let rows = inspect::services(bpffs.path())?;
    let zonal = rows.iter().find(|r| r.frontend.starts_with("10.96.0.21")).expect("zonal frontend");
    assert_eq!(zonal.draining.iter().map(|d| d.address.as_str()).collect::<Vec<_>>(), ["10.244.1.2:8080"]);

    // The local endpoint moves to another node: Local drops.
    write_file(&file, &node_yaml("node-c"))?;
    let rows = agent.wait_for("Local without a local endpoint", Duration::from_secs(10), || {
        // The rows are read after the backends are seen gone: a service's backend count
        // and its no-endpoints flag change in one write, so they then agree.
        (programmed(bpffs.path()) == want(&[])).then(|| inspect::services(bpffs.path()).ok()).flatten()
    })?;
    let local = rows.iter().find(|r| r.frontend.starts_with("10.96.0.20")).expect("local frontend");
    assert_eq!(local.no_endpoints, "drop");
    agent.wait_for("status", Duration::from_secs(10), || {
        status(&status_file).is_some_and(|s| s.ready && s.source_error.is_none()).then_some(())
    })?;

    // A syntax error half-way through the file: nothing changes, the error is reported.
    let good = node_yaml("node-b");
    let (first, rest) = good.split_once("---\n").expect("documents");
    write_file(&file, &format!("{first}---\nkind: [unterminated\n---\n{rest}"))?;
    let st = agent.wait_for("source error in the status", Duration::from_secs(10), || {
        status(&status_file).filter(|s| s.source_error.is_some())
    })?;
    assert!(st.source_error.as_deref().is_some_and(|e| e.contains("not valid YAML")), "{:?}", st.source_error);
    assert_eq!(programmed(bpffs.path()), want(&[]), "the last good state must stay programmed");

    // Fixed: the new state is programmed and the error clears.
    write_file(&file, &good)?;
    agent.wait_for("fixed file", Duration::from_secs(10), || {
        (programmed(bpffs.path()) == want(&["10.244.2.1:8080"])
            && status(&status_file).is_some_and(|s| s.source_error.is_none()))
        .then_some(())
    })?;
    assert!(agent.log_text().contains("not valid YAML; keeping the last good state"));
    agent.term()?;
    Ok(())
}

/// An attach that fails is retried with backoff, and the agent is not ready, says why
/// in its status and metrics, until it holds: without the uplink hook every cross-node
/// reply would go un-NATed. Here another XDP program holds the uplink (an XDP hook
/// takes one link), then goes.
#[test]
fn a_failed_attach_is_retried_and_the_agent_is_not_ready_meanwhile() -> Result<()> {
    netns::remove_stale()?;
    let topo = Topology::new()?;
    let bpffs = PrivateBpffs::new()?;
    let dir = Scratch::new("attach-retry")?;
    let file = dir.0.join("objects.yaml");
    let status_file = dir.0.join("status.json");
    write_file(&file, &yaml(&[&SERVER_IP.to_string()], false))?;

    // The squatter: another copy of the datapath, on its own bpffs, holding the
    // uplink's XDP hook.
    let mut squatter = Datapath::load()?;
    topo.node.run(|| {
        lb_userspace::datapath::attach(
            &mut squatter.ebpf,
            NODE_SERVER_IF,
            lb_userspace::datapath::Hook::Ingress(lb_userspace::datapath::AttachMode::XdpGeneric),
        )
        .context("squatting the XDP hook")
    })?;

    let mut cmd = topo.node.command(lb());
    cmd.args(["agent", "--iface", NODE_SERVER_IF, "--uplink-attach", "xdp-generic", "--file-poll", "20ms", "--source"])
        .arg(format!("file:{}", file.display()))
        .env("LB_BPFFS", bpffs.path())
        .env("LB_STATUS_FILE", &status_file);
    let agent = AgentProcess::spawn(cmd, &dir.0.join("agent.log"), &status_file)?;
    let st = agent.wait_for("a second failed attempt, reported", Duration::from_secs(20), || {
        status(&status_file).filter(|s| s.syncs > 0 && s.attach_failures.first().is_some_and(|f| f.attempts >= 2))
    })?;
    assert!(!st.ready, "ready with its uplink hook missing: {st:?}");
    let f = &st.attach_failures[0];
    assert_eq!((f.iface.as_str(), f.hook.as_str()), (NODE_SERVER_IF, "xdp-generic"), "{f:?}");
    assert!(!f.error.is_empty(), "{f:?}");
    assert!(st.attach.is_empty(), "{:?}", st.attach);

    // The hook frees up: the next retry (backoff 1, 2, 4 s) attaches, and the agent
    // becomes ready without anything else changing.
    drop(squatter);
    let st = agent.wait_for("the retried attach, and ready", Duration::from_secs(20), || {
        status(&status_file).filter(|s| s.ready && s.attach.len() == 1)
    })?;
    assert!(st.attach_failures.is_empty(), "{:?}", st.attach_failures);
    assert_eq!(st.attach[0].mode, lb_userspace::datapath::AttachMode::XdpGeneric);
    Ok(())
}

/// The conntrack collector on a real table: flows past their timeout go, both halves
/// together; live flows stay and name the (service, backend) pairs they use; closed
/// flows stay until their shorter timeout but do not count as open.
#[test]
fn conntrack_collector_deletes_expired_flows_by_pairs() -> Result<()> {
    use lb_common::{
        CT_DIR_FORWARD, CT_F_FIN_FWD, CT_F_FIN_REPLY, CT_F_REPLIED, CtKey4, CtValue4, IPPROTO_TCP, ct_timeouts,
    };
    use lb_userspace::agent::conntrack;
    let mut dp = Datapath::load()?;
    let now = conntrack::now_tick();
    let flow = |client: u8, svc_id: u32, backend_id: u32, flags: u8, age: u32| {
        let k = CtKey4 {
            src_addr_be: u32::from_ne_bytes([10, 244, 1, client]),
            dst_addr_be: u32::from_ne_bytes(VIP.octets()),
            src_port_be: 40000u16.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let v = CtValue4 {
            nat_addr_be: u32::from_ne_bytes([10, 244, 2, 10]),
            nat_port_be: 8080u16.to_be(),
            dir: CT_DIR_FORWARD,
            flags,
            svc_id,
            backend_id,
            slot: 1,
            seen: now.wrapping_sub(age),
            epoch: 0,
            created: 0,
        };
        let (rk, rv) = v.other_half(&k);
        [(k, v), (rk, rv)]
    };
    let live = flow(1, 1, 11, CT_F_REPLIED, 10);
    let expired = flow(2, 2, 21, CT_F_REPLIED, ct_timeouts::TCP_ESTABLISHED + 5);
    let closed = flow(3, 3, 31, CT_F_REPLIED | CT_F_FIN_FWD | CT_F_FIN_REPLY, 5);
    let lone = flow(4, 4, 41, 0, ct_timeouts::TCP_SYN_SENT + 5);
    for (k, v) in live.iter().chain(&expired).chain(&closed).chain(&lone[..1]) {
        dp.put_conntrack(*k, *v)?;
    }
    let mut ct = conntrack::open(dp.pin_dir())?;
    let pass = conntrack::collect(&mut ct, now);
    assert_eq!(pass.entries, 7);
    assert_eq!(pass.expired_flows, 2, "{pass:?}");
    assert_eq!(pass.open_flows, 1, "{pass:?}");
    assert_eq!(pass.live, [(1, 11), (3, 31)].into_iter().collect(), "{pass:?}");
    let left: std::collections::HashSet<CtKey4> = dp.conntrack().into_iter().map(|(k, _)| k).collect();
    let want: std::collections::HashSet<CtKey4> = live.iter().chain(&closed).map(|(k, _)| *k).collect();
    assert_eq!(left, want);
    Ok(())
}

/// A deleted Service's backends stay draining while live flows use them: the agent's
/// conntrack collector reports the (service, backend) pairs live flows use, and the
/// syncer releases the other draining entries (after `ORPHAN_MIN_AGE`), then the last
/// one once its flow is gone.
#[test]
fn the_collector_ends_a_deleted_services_draining_entries_when_its_flows_end() -> Result<()> {
    use lb_common::{CT_DIR_FORWARD, CT_F_REPLIED, CtKey4, CtValue4, DrainKey, IPPROTO_TCP, map_names};
    use lb_userspace::agent::{conntrack, sync::ORPHAN_MIN_AGE};
    let bpffs = PrivateBpffs::new()?;
    let dir = Scratch::new("gc-orphans")?;
    let file = dir.0.join("objects.yaml");
    let status_file = dir.0.join("status.json");
    write_file(&file, &yaml(&["10.244.2.1", "10.244.2.2"], false))?;
    let mut cmd = Command::new(lb());
    cmd.args(["agent", "--file-poll=20ms", "--conntrack-gc=1s", "--source"])
        .arg(format!("file:{}", file.display()))
        .env("LB_BPFFS", bpffs.path())
        .env("LB_STATUS_FILE", &status_file);
    let agent = AgentProcess::spawn(cmd, &dir.0.join("agent.log"), &status_file)?;
    let row = agent.wait_for("programming", Duration::from_secs(20), || {
        inspect::services(bpffs.path()).ok()?.into_iter().find(|r| r.backends.len() == 2)
    })?;
    // A live flow to the first backend, as the datapath would have written it.
    let b = &row.backends[0];
    let key = CtKey4 {
        src_addr_be: u32::from_ne_bytes([10, 244, 1, 2]),
        dst_addr_be: u32::from_ne_bytes(VIP.octets()),
        src_port_be: 40000u16.to_be(),
        dst_port_be: 80u16.to_be(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let value = CtValue4 {
        nat_addr_be: u32::from_ne_bytes([10, 244, 2, 1]),
        nat_port_be: 8080u16.to_be(),
        dir: CT_DIR_FORWARD,
        flags: CT_F_REPLIED,
        svc_id: row.id,
        backend_id: b.backend_id,
        slot: b.slot,
        seen: conntrack::now_tick(),
        epoch: 0,
        created: 0,
    };
    let mut ct = conntrack::open(bpffs.path())?;
    ct.insert(key, value, 0)?;

    // The Service goes: both backends drain under its old id.
    write_file(&file, "")?;
    let draining = || -> Vec<DrainKey> {
        aya::maps::MapData::from_pin(bpffs.path().join(map_names::DRAINING))
            .ok()
            .and_then(|m| {
                aya::maps::HashMap::<_, DrainKey, lb_common::BackendValue>::try_from(aya::maps::Map::HashMap(m)).ok()
            })
            .map(|m| m.keys().filter_map(Result::ok).collect())
            .unwrap_or_default()
    };
    agent.wait_for("both backends draining", Duration::from_secs(10), || (draining().len() == 2).then_some(()))?;
    // Once the orphans are old enough, the one no flow uses goes; the other stays.
    let t0 = Instant::now();
    let left =
        agent.wait_for("the unused draining entry released", ORPHAN_MIN_AGE + Duration::from_secs(15), || {
            let d = draining();
            (d.len() == 1).then_some(d)
        })?;
    assert!(t0.elapsed() + Duration::from_secs(2) >= ORPHAN_MIN_AGE, "released before ORPHAN_MIN_AGE");
    assert_eq!(left, vec![DrainKey { svc_id: row.id, backend_id: b.backend_id }]);
    // The flow ends: the last one goes at the collector's next pass.
    ct.remove(&key)?;
    agent.wait_for("the last draining entry released", Duration::from_secs(10), || {
        draining().is_empty().then_some(())
    })?;
    Ok(())
}
