//! Paths a real node has and the basic namespace tests (tests/netns.rs) do not: a
//! Service whose backend is the node itself, another tc program after ours, UDP
//! datagrams larger than the MTU, and a conntrack table too small for its flows. Same
//! topology as tests/netns.rs (client pod, node, server pod, each a namespace; the
//! datapath on the node side of both pod veths, ingress and egress, as the agent
//! attaches it). Needs root; touches nothing outside the namespaces it creates.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, Reason, ServiceValue, map_names};
use lb_testing::{
    Datapath, ProbeVerdict, TcxProbe,
    netns::{self, NODE_CLIENT_IF, NODE_SERVER_IF, SERVER_GW, SERVER_IP, Topology},
};
use lb_userspace::datapath::{self, AttachMode};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const IO_TIMEOUT: Duration = Duration::from_secs(3);
const LOSS_TIMEOUT: Duration = Duration::from_millis(1500);

/// The datapath on both node-side veths; `egress` adds `lb_tc_egress` on them, as the
/// agent does on pod interfaces.
fn attach(topo: &Topology, dp: &mut Datapath, egress: bool) -> Result<()> {
    topo.attach(&mut dp.ebpf, AttachMode::Tc)?;
    if egress {
        topo.node.run(|| {
            for iface in [NODE_CLIENT_IF, NODE_SERVER_IF] {
                datapath::attach(&mut dp.ebpf, iface, datapath::Hook::TcEgress)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// VIP:port/proto -> `backend`:target_port, service id `id`.
fn service(dp: &mut Datapath, id: u32, proto: u8, port: u16, backend: Ipv4Addr, target_port: u16) -> Result<()> {
    dp.put_service(&VIP.to_string(), port, proto, ServiceValue { id, count: 1, ..Default::default() })?;
    dp.put_backends(id, &[(id * 100 + 1, &backend.to_string(), target_port)])
}

/// A TCP echo server on `addr` in `ns`, for `conns` connections, one thread each.
fn tcp_echo(ns: &netns::Netns, addr: SocketAddr, conns: usize) -> Result<thread::JoinHandle<Result<()>>> {
    let listener = ns.run(|| TcpListener::bind(addr).context("bind"))?;
    listener.set_nonblocking(true)?;
    Ok(thread::spawn(move || -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut workers = Vec::new();
        while workers.len() < conns {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(Duration::from_secs(20)))?;
                    workers.push(thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = s.shutdown(Shutdown::Write);
                    }));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e).context("accept"),
            }
        }
        for w in workers {
            let _ = w.join();
        }
        Ok(())
    }))
}

/// Connects from the client to `target`, sends `len` bytes and reads the echo back.
fn tcp_roundtrip(topo: &Topology, target: SocketAddr, len: usize, timeout: Duration) -> Result<()> {
    let mut c = topo.client.run(|| TcpStream::connect_timeout(&target, timeout).context("connect"))?;
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut w = c.try_clone()?;
    let to_send = data.clone();
    let sender = thread::spawn(move || -> Result<()> {
        w.write_all(&to_send).context("write")?;
        w.shutdown(Shutdown::Write).context("shutdown")
    });
    let mut back = Vec::with_capacity(len);
    let read = c.read_to_end(&mut back).context("read");
    sender.join().expect("sender")?;
    read?;
    ensure!(back == data, "echo differs: {} of {len} bytes", back.len());
    Ok(())
}

/// One UDP datagram of `len` bytes from the client to `target` and its echo, which
/// must come from `target`.
fn udp_roundtrip(topo: &Topology, server: &UdpSocket, target: SocketAddr, len: usize) -> Result<()> {
    let sock = topo.client.run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("bind"))?;
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    server.set_read_timeout(Some(IO_TIMEOUT))?;
    let payload: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    sock.send_to(&payload, target).context("send")?;
    let mut buf = vec![0u8; 65536];
    let (n, peer) = server.recv_from(&mut buf).context("server recv")?;
    ensure!(buf[..n] == payload[..], "server got {n} bytes of {len}");
    server.send_to(&buf[..n], peer).context("server send")?;
    let (n, from) = sock.recv_from(&mut buf).context("client recv")?;
    ensure!(from == target, "reply from {from}, not from {target}");
    ensure!(buf[..n] == payload[..], "reply differs ({n} bytes of {len})");
    Ok(())
}

/// The backend is the node itself (a host-network pod; the API server behind
/// `kubernetes.default` on a control-plane node). The node's stack answers through the
/// pod's interface egress, where only `lb_tc_egress` can reverse-NAT the reply: with
/// it, TCP and UDP work; without it, the client sees the node's address answer and the
/// handshake fails.
#[test]
fn backend_on_the_node_itself_tcp_and_udp() -> Result<()> {
    netns::remove_stale()?;
    for egress in [true, false] {
        let topo = Topology::new()?;
        let mut dp = Datapath::load()?;
        service(&mut dp, 1, IPPROTO_TCP, 443, SERVER_GW, 6443)?;
        service(&mut dp, 2, IPPROTO_UDP, 53, SERVER_GW, 5353)?;
        attach(&topo, &mut dp, egress)?;
        let server = tcp_echo(&topo.node, (SERVER_GW, 6443).into(), 1)?;
        let udp = topo.node.run(|| UdpSocket::bind((SERVER_GW, 5353)).context("bind"))?;
        let tcp = tcp_roundtrip(&topo, (VIP, 443).into(), 1 << 20, if egress { IO_TIMEOUT } else { LOSS_TIMEOUT });
        let udp = udp_roundtrip(&topo, &udp, (VIP, 53).into(), 512);
        if egress {
            tcp.context("TCP to a ClusterIP whose backend is the node")?;
            udp.context("UDP to a ClusterIP whose backend is the node")?;
            server.join().expect("server")?;
        } else {
            // Proves the test can fail: the reply leaves un-NATed.
            ensure!(tcp.is_err(), "TCP worked without the egress hook");
            ensure!(udp.is_err(), "UDP worked without the egress hook");
            drop(server);
        }
    }
    Ok(())
}

/// A program attached after ours on the same tcx hook sees service traffic: we hand
/// packets on (TCX_NEXT) after the rewrite, so a policy program that drops them drops
/// them, and one that counts them counts them.
#[test]
fn the_next_program_on_the_hook_sees_service_traffic() -> Result<()> {
    netns::remove_stale()?;
    let topo = Topology::new()?;
    let mut dp = Datapath::load()?;
    service(&mut dp, 1, IPPROTO_TCP, 80, SERVER_IP, 8080)?;
    attach(&topo, &mut dp, true)?;

    let counter = topo.node.run(|| TcxProbe::attach(NODE_CLIENT_IF, false, ProbeVerdict::Next))?;
    let natted = |dp: &mut Datapath| dp.stat(Reason::FwdNew).packets + dp.stat(Reason::FwdEstablished).packets;
    let before = (natted(&mut dp), counter.seen()?);
    let server = tcp_echo(&topo.server, (SERVER_IP, 8080).into(), 1)?;
    tcp_roundtrip(&topo, (VIP, 80).into(), 64 << 10, IO_TIMEOUT)
        .context("through the ClusterIP with a counter after us")?;
    server.join().expect("server")?;
    let natted_now = natted(&mut dp) - before.0;
    let seen = counter.seen()? - before.1;
    ensure!(natted_now > 0, "nothing was NATed");
    ensure!(seen >= natted_now, "the next program saw {seen} packets, we NATed {natted_now} on its hook");

    let dropper = topo.node.run(|| TcxProbe::attach(NODE_CLIENT_IF, false, ProbeVerdict::Drop))?;
    let server = tcp_echo(&topo.server, (SERVER_IP, 8080).into(), 1)?;
    let r = tcp_roundtrip(&topo, (VIP, 80).into(), 1024, LOSS_TIMEOUT);
    ensure!(r.is_err(), "a dropping program after ours did not stop service traffic");
    ensure!(dropper.seen()? > 0, "the dropping program saw nothing");
    drop(server);
    Ok(())
}

/// A 3,000-byte UDP datagram through a ClusterIP, MTU 1500: both the request and the
/// echo go as fragments. The first fragment is NATed and remembered; the later ones
/// take its decision.
#[test]
fn udp_datagrams_larger_than_the_mtu_both_ways() -> Result<()> {
    netns::remove_stale()?;
    let topo = Topology::new()?;
    let mut dp = Datapath::load()?;
    service(&mut dp, 2, IPPROTO_UDP, 53, SERVER_IP, 5353)?;
    attach(&topo, &mut dp, true)?;
    let server = topo.server.run(|| UdpSocket::bind((SERVER_IP, 5353)).context("bind"))?;
    let before = dp.stat(Reason::FragTracked).packets;
    for len in [3000, 8000, 1400] {
        udp_roundtrip(&topo, &server, (VIP, 53).into(), len).with_context(|| format!("{len}-byte datagram"))?;
    }
    let tracked = dp.stat(Reason::FragTracked).packets - before;
    // 3,000 bytes: 1 later fragment each way; 8,000: 5 each way.
    ensure!(tracked >= 12, "{tracked} later fragments NATed from the fragment table, expected 12");
    ensure!(dp.stat(Reason::DropFragment).packets == 0, "fragments dropped");
    Ok(())
}

/// Twice as many TCP connections as the conntrack table has room for. LRU eviction
/// makes room for new flows; a connection whose entry went is scheduled afresh (the
/// same backend: the choice is a pure function of the flow while the backend set
/// stands), counted, and keeps working; a half lost alone is re-created from the other.
#[test]
fn conntrack_full_keeps_live_services_answering() -> Result<()> {
    const ENTRIES: u32 = 256;
    // Each connection takes two entries.
    const CONNS: usize = ENTRIES as usize;
    netns::remove_stale()?;
    let topo = Topology::new()?;
    let mut dp = Datapath::load_with(&[(map_names::CONNTRACK, ENTRIES)])?;
    service(&mut dp, 1, IPPROTO_TCP, 80, SERVER_IP, 8080)?;
    attach(&topo, &mut dp, true)?;
    let server = tcp_echo(&topo.server, (SERVER_IP, 8080).into(), CONNS + 1)?;
    let target: SocketAddr = (VIP, 80).into();
    let mut conns = Vec::with_capacity(CONNS);
    for i in 0..CONNS {
        let mut c = topo
            .client
            .run(|| TcpStream::connect_timeout(&target, IO_TIMEOUT).context("connect"))
            .with_context(|| format!("connection {i}"))?;
        c.set_read_timeout(Some(IO_TIMEOUT))?;
        c.write_all(b"hello")?;
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).with_context(|| format!("echo on connection {i}"))?;
        conns.push(c);
    }
    let entries = dp.conntrack().len();
    ensure!(entries <= ENTRIES as usize, "{entries} entries in a table of {ENTRIES}");
    let before = (dp.stat(Reason::CtMidflowMiss).packets, dp.stat(Reason::CtRecovered).packets);
    // A new second: every flow's first packet refreshes both of its halves.
    thread::sleep(Duration::from_millis(1100));
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(b"again")?;
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).with_context(|| format!("second round on connection {i}"))?;
        ensure!(&buf == b"again", "connection {i} echoed {buf:?}");
    }
    let missed = dp.stat(Reason::CtMidflowMiss).packets - before.0;
    let recovered = dp.stat(Reason::CtRecovered).packets - before.1;
    ensure!(missed > 0, "no flow was found evicted with {CONNS} connections in {ENTRIES} entries");
    eprintln!(
        "{CONNS} connections, {ENTRIES} entries: {missed} rescheduled mid-connection, {recovered} halves re-created"
    );
    // The Service still takes new connections.
    tcp_roundtrip(&topo, target, 4096, IO_TIMEOUT).context("a new connection with the table full")?;
    drop(conns);
    server.join().expect("server")?;
    Ok(())
}
