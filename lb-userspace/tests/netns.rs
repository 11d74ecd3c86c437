//! Real traffic through the datapath: a client pod, a node and a server pod, each a
//! network namespace of their own (`lb_testing::netns`), joined by veth pairs, the
//! datapath attached on the node side of both pod veths. Needs root; touches nothing
//! outside the namespaces it creates, and deletes them on the way out (also on panic).
//!
//! Each attach mode (tc, generic XDP, native XDP) runs three scenarios:
//!
//! - `offloads_on`: the pods' default veth offloads. TCP and UDP are sent
//!   CHECKSUM_PARTIAL, and nothing on a veth-only path ever completes or verifies that
//!   checksum (a receiver trusts CHECKSUM_PARTIAL). This proves the NAT and conntrack
//!   work, but not the checksums.
//! - `tx_csum_off_in_pods`: `ethtool -K eth0 tx off` in both pods, so every packet
//!   carries a full checksum that the receiving stack verifies after our rewrite.
//! - `checksum_completed_on_the_node`: offloads on in the pods, but `tx off` on the
//!   node's veths, so the kernel completes CHECKSUM_PARTIAL checksums in software when
//!   the node forwards them, as a physical NIC or a tunnel device would on a real
//!   node. The tc path is correct; the XDP paths are not, and cannot be: an XDP
//!   program cannot tell a partial checksum from a full one (see
//!   docs/datapath-veth.md). The test asserts what happens in each mode.
//!
//! Every scenario ends with the reject case. It answers with ECONNREFUSED in tc and
//! generic XDP; native XDP's XDP_TX answer is lost by the veth (see `check_rejects`).

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, NO_BACKENDS_REJECT, Reason, ServiceValue};
use lb_testing::{
    Datapath,
    netns::{self, CLIENT_IP, NODE_CLIENT_IF, NODE_SERVER_IF, POD_IF, SERVER_IP, Topology},
};
use lb_userspace::datapath::AttachMode;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// TCP 80 -> server:8080.
const TCP_PORT: u16 = 80;
const TCP_TARGET_PORT: u16 = 8080;
/// UDP 53 -> server:5353.
const UDP_PORT: u16 = 53;
const UDP_TARGET_PORT: u16 = 5353;
/// Frontends with no backend, set to reject.
const TCP_REJECT_PORT: u16 = 81;
const UDP_REJECT_PORT: u16 = 54;

/// Bound on every blocking socket call where traffic is expected to flow: a broken
/// datapath fails the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Where traffic is expected to be lost: long enough for the first TCP SYN
/// retransmission (1 s), short enough to keep the test quick.
const LOSS_TIMEOUT: Duration = Duration::from_millis(1500);
/// An ICMP-answered connect takes a round trip over veths; a timeout would take seconds.
const REFUSED_WITHIN: Duration = Duration::from_millis(500);
/// Enough TCP data for many full-sized (and, with offloads, GSO) segments both ways.
const TCP_BYTES: usize = 4 << 20;
const UDP_DATAGRAMS: usize = 8;

fn service(id: u32, count: u32) -> ServiceValue {
    ServiceValue { id, count, no_backends: NO_BACKENDS_REJECT, ..Default::default() }
}

/// A datapath attached to a fresh topology. `dp` is declared first so that it is
/// dropped first: programs are detached before their interfaces go away.
struct Fixture {
    dp: Datapath,
    topo: Topology,
    mode: AttachMode,
}

impl Fixture {
    /// `pod_tx_csum` and `node_tx_csum`: TX checksum offload on the pods' and on the
    /// node's veth ends. Set before attaching, as a pod would have it from the start.
    fn new(mode: AttachMode, pod_tx_csum: bool, node_tx_csum: bool) -> Result<Self> {
        netns::remove_stale().context("removing namespaces of earlier crashed runs")?;
        let topo = Topology::new().context("building the namespaces")?;
        let mut dp = Datapath::load()?;
        dp.put_service(&VIP.to_string(), TCP_PORT, IPPROTO_TCP, service(1, 1))?;
        dp.put_backends(1, &[(1, &SERVER_IP.to_string(), TCP_TARGET_PORT)])?;
        dp.put_service(&VIP.to_string(), UDP_PORT, IPPROTO_UDP, service(2, 1))?;
        dp.put_backends(2, &[(1, &SERVER_IP.to_string(), UDP_TARGET_PORT)])?;
        dp.put_service(&VIP.to_string(), TCP_REJECT_PORT, IPPROTO_TCP, service(3, 0))?;
        dp.put_service(&VIP.to_string(), UDP_REJECT_PORT, IPPROTO_UDP, service(4, 0))?;
        if !pod_tx_csum {
            topo.client.ethtool_k(POD_IF, "tx", false)?;
            topo.server.ethtool_k(POD_IF, "tx", false)?;
        }
        if !node_tx_csum {
            topo.node.ethtool_k(NODE_CLIENT_IF, "tx", false)?;
            topo.node.ethtool_k(NODE_SERVER_IF, "tx", false)?;
        }
        topo.attach(&mut dp.ebpf, mode)?;
        Ok(Self { dp, topo, mode })
    }

    fn stats(&mut self) -> Stats {
        Stats(Reason::ALL.iter().map(|&r| self.dp.stat(r).packets).collect())
    }

    /// (server, client) `InCsumErrors` of `group` ("Tcp" or "Udp").
    fn csum_errors(&self, group: &str) -> Result<(u64, u64)> {
        Ok((self.topo.server.snmp(group, "InCsumErrors")?, self.topo.client.snmp(group, "InCsumErrors")?))
    }
}

/// Packet counts of every `Reason`, to diff around an exchange.
struct Stats(Vec<u64>);

impl Stats {
    fn since(&self, before: &Stats, reason: Reason) -> u64 {
        self.0[reason as usize] - before.0[reason as usize]
    }
}

/// What the server saw of a TCP connection.
struct TcpSeen {
    /// Client address as the server sees it: no SNAT, so the client pod's own.
    peer: SocketAddr,
    /// The backend's socket address the connection arrived on.
    local: SocketAddr,
    /// The client's own source address.
    client_local: SocketAddr,
}

/// Client connects to the ClusterIP, sends `len` bytes, the server echoes them; the
/// bytes must come back unchanged.
fn tcp_exchange(f: &Fixture, len: usize, timeout: Duration) -> Result<TcpSeen> {
    let listener = f.topo.server.run(|| TcpListener::bind((SERVER_IP, TCP_TARGET_PORT)).context("bind"))?;
    // std has no accept timeout: poll a non-blocking listener until the deadline.
    listener.set_nonblocking(true)?;
    let server = thread::spawn(move || -> Result<(SocketAddr, SocketAddr)> {
        let deadline = Instant::now() + timeout;
        let (mut s, peer) = loop {
            match listener.accept() {
                Ok(x) => break x,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("server accept"),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let local = s.local_addr()?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = s.read(&mut buf).context("server read")?;
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).context("server write")?;
        }
        s.shutdown(Shutdown::Write)?;
        Ok((peer, local))
    });

    let result = (|| {
        let target = SocketAddr::from((VIP, TCP_PORT));
        let mut client =
            f.topo.client.run(|| TcpStream::connect_timeout(&target, timeout).context("connect to the ClusterIP"))?;
        client.set_read_timeout(Some(timeout))?;
        client.set_write_timeout(Some(timeout))?;
        let client_local = client.local_addr()?;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        // Write from a second thread while this one reads: the echo would otherwise
        // stall once both directions' socket buffers are full.
        let mut writer = client.try_clone()?;
        let to_send = data.clone();
        let sender = thread::spawn(move || -> Result<()> {
            writer.write_all(&to_send).context("client write")?;
            writer.shutdown(Shutdown::Write).context("client shutdown")
        });
        let mut echoed = Vec::with_capacity(len);
        let read = client.read_to_end(&mut echoed).context("client read");
        sender.join().expect("sender thread")?;
        read?;
        ensure!(echoed == data, "echo differs: {} bytes back of {len}", echoed.len());
        Ok(client_local)
    })();
    // Join the server either way, so that no thread outlives the namespaces.
    let served = server.join().expect("server thread");
    let client_local = result?;
    let (peer, local) = served?;
    Ok(TcpSeen { peer, local, client_local })
}

/// `count` datagrams of growing size to the ClusterIP, each echoed; replies must come
/// from the ClusterIP. Returns the client addresses the server saw, and the client's
/// own port.
fn udp_exchange(f: &Fixture, count: usize, timeout: Duration) -> Result<(Vec<SocketAddr>, u16)> {
    let server_sock = f.topo.server.run(|| UdpSocket::bind((SERVER_IP, UDP_TARGET_PORT)).context("bind"))?;
    server_sock.set_read_timeout(Some(timeout))?;
    let server = thread::spawn(move || -> Result<Vec<SocketAddr>> {
        let mut buf = [0u8; 2048];
        let mut peers = Vec::new();
        for _ in 0..count {
            let (n, peer) = server_sock.recv_from(&mut buf).context("server recv")?;
            server_sock.send_to(&buf[..n], peer).context("server send")?;
            peers.push(peer);
        }
        Ok(peers)
    });

    let result = (|| {
        let sock = f.topo.client.run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("bind"))?;
        sock.set_read_timeout(Some(timeout))?;
        let port = sock.local_addr()?.port();
        let target = SocketAddr::from((VIP, UDP_PORT));
        let mut buf = [0u8; 2048];
        for i in 0..count {
            // Up to 1400 bytes: unfragmented (tests/node_paths.rs sends larger ones).
            let payload: Vec<u8> = (0..(16 + i * 1384 / count.max(1))).map(|b| (b + i) as u8).collect();
            sock.send_to(&payload, target).context("client send")?;
            let (n, from) = sock.recv_from(&mut buf).with_context(|| format!("client recv of datagram {i}"))?;
            ensure!(from == target, "reply {i} came from {from}, not from the ClusterIP {target}");
            ensure!(buf[..n] == payload[..], "reply {i} differs");
        }
        Ok(port)
    })();
    let served = server.join().expect("server thread");
    let port = result?;
    Ok((served?, port))
}

/// A TCP connect and a UDP exchange with rejecting frontends must fail with
/// ECONNREFUSED, at once.
///
/// Except with native XDP on a veth: the datapath answers (XDP_TX) and counts the
/// reject, but the veth drops the answer. It queues XDP_TX frames to its peer only if
/// the peer has NAPI enabled (an XDP program or GRO on the pod's eth0) and flushes
/// them only if the peer has an XDP program; a plain pod has neither. The client then
/// sees what a silent drop would give: a connect timeout. See
/// docs/datapath-veth.md.
fn check_rejects(f: &mut Fixture) -> Result<()> {
    let mode = f.mode;
    let native = mode == AttachMode::Xdp;
    let before = f.stats();
    let tx_errors_before = veth_xdp_tx_errors(f)?;
    let timeout = if native { LOSS_TIMEOUT } else { IO_TIMEOUT };

    let target = SocketAddr::from((VIP, TCP_REJECT_PORT));
    let start = Instant::now();
    let res = f.topo.client.run(|| Ok(TcpStream::connect_timeout(&target, timeout)));
    let took = start.elapsed();
    match res? {
        Ok(_) => bail!("{mode}: connect to rejecting {target} succeeded"),
        Err(e) if native => ensure!(
            e.kind() == ErrorKind::TimedOut,
            "{mode}: TCP connect to rejecting {target}: {e}; expected the veth to lose the XDP_TX answer \
             (if it now arrives, update docs/datapath-veth.md and this test)"
        ),
        Err(e) => ensure!(
            e.kind() == ErrorKind::ConnectionRefused && took < REFUSED_WITHIN,
            "{mode}: TCP connect to rejecting {target}: {e} after {took:?}, expected ECONNREFUSED within {REFUSED_WITHIN:?}"
        ),
    }

    let target = SocketAddr::from((VIP, UDP_REJECT_PORT));
    let sock = f.topo.client.run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("bind"))?;
    sock.set_read_timeout(Some(timeout))?;
    // Connected, so that the ICMP error is reported on this socket.
    sock.connect(target)?;
    let start = Instant::now();
    sock.send(b"anyone?")?;
    let mut buf = [0u8; 64];
    let res = sock.recv(&mut buf);
    let took = start.elapsed();
    match res {
        Ok(_) => bail!("{mode}: rejecting UDP {target} answered"),
        Err(e) if native => ensure!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{mode}: UDP to rejecting {target}: {e}; expected the veth to lose the XDP_TX answer"
        ),
        Err(e) => ensure!(
            e.kind() == ErrorKind::ConnectionRefused && took < REFUSED_WITHIN,
            "{mode}: UDP to rejecting {target}: {e} after {took:?}, expected ECONNREFUSED within {REFUSED_WITHIN:?}"
        ),
    }

    let after = f.stats();
    let rejects = after.since(&before, Reason::NoBackendReject);
    if native {
        // The SYN and its retransmissions, and the datagram: each answered, each lost.
        ensure!(rejects >= 2, "{mode}: {rejects} rejects counted, expected at least 2");
        let lost = veth_xdp_tx_errors(f)? - tx_errors_before;
        ensure!(lost == rejects, "{mode}: {rejects} rejects sent but {lost} XDP_TX errors on {NODE_CLIENT_IF}");
    } else {
        ensure!(rejects == 2, "{mode}: {rejects} rejects counted, expected 2");
    }
    Ok(())
}

/// XDP_TX frames the node's veth to the client failed to pass to its peer
/// (`ethtool -S`, summed over queues).
fn veth_xdp_tx_errors(f: &Fixture) -> Result<u64> {
    let stats = f.topo.node.exec("ethtool", &["-S", NODE_CLIENT_IF])?;
    let mut total = 0;
    for line in stats.lines() {
        if let Some((name, value)) = line.trim().split_once(':')
            && name.starts_with("rx_queue_")
            && name.ends_with("_xdp_tx_errors")
        {
            total += value.trim().parse::<u64>().with_context(|| format!("ethtool -S line {line:?}"))?;
        }
    }
    Ok(total)
}

/// TCP and UDP through the ClusterIP work, with the addresses and counters to show
/// that the datapath, not something else, did it.
fn check_exchanges(f: &mut Fixture) -> Result<()> {
    let mode = f.mode;
    let before = f.stats();
    let seen = tcp_exchange(f, TCP_BYTES, IO_TIMEOUT).with_context(|| format!("{mode}: TCP via the ClusterIP"))?;
    ensure!(
        seen.peer == SocketAddr::from((CLIENT_IP, seen.client_local.port())),
        "{mode}: server saw the client as {}, expected {CLIENT_IP}:{}",
        seen.peer,
        seen.client_local.port()
    );
    ensure!(
        seen.local == SocketAddr::from((SERVER_IP, TCP_TARGET_PORT)),
        "{mode}: connection arrived on {}",
        seen.local
    );
    let after = f.stats();
    ensure!(after.since(&before, Reason::FwdNew) == 1, "{mode}: one new TCP flow expected");
    ensure!(after.since(&before, Reason::FwdEstablished) > 0, "{mode}: no established forward packets counted");
    ensure!(after.since(&before, Reason::RevNat) > 0, "{mode}: no replies reverse-NATed");

    let before = after;
    let (peers, port) =
        udp_exchange(f, UDP_DATAGRAMS, IO_TIMEOUT).with_context(|| format!("{mode}: UDP via the ClusterIP"))?;
    let expected = SocketAddr::from((CLIENT_IP, port));
    ensure!(peers.iter().all(|p| *p == expected), "{mode}: server saw {peers:?}, expected {expected}");
    let after = f.stats();
    let n = UDP_DATAGRAMS as u64;
    // Each datagram crosses each hook once: forward on the client's veth, reply on
    // the server's.
    ensure!(after.since(&before, Reason::FwdNew) == 1, "{mode}: one new UDP flow expected");
    ensure!(after.since(&before, Reason::FwdEstablished) == n - 1, "{mode}: UDP forward count");
    ensure!(after.since(&before, Reason::RevNat) == n, "{mode}: UDP reply count");
    ensure!(after.0[Reason::RewriteFailed as usize] == 0, "{mode}: rewrites failed");
    Ok(())
}

fn offloads_on(mode: AttachMode) -> Result<()> {
    let mut f = Fixture::new(mode, true, true)?;
    check_exchanges(&mut f)?;
    check_rejects(&mut f)
}

fn tx_csum_off_in_pods(mode: AttachMode) -> Result<()> {
    let mut f = Fixture::new(mode, false, true)?;
    let (tcp0, udp0) = (f.csum_errors("Tcp")?, f.csum_errors("Udp")?);
    check_exchanges(&mut f)?;
    // The exchanges succeeding already means the rewritten checksums were accepted;
    // the counters say no packet was dropped and retransmitted on the way.
    ensure!(f.csum_errors("Tcp")? == tcp0, "{mode}: TCP checksum errors (server, client)");
    ensure!(f.csum_errors("Udp")? == udp0, "{mode}: UDP checksum errors (server, client)");
    check_rejects(&mut f)
}

fn checksum_completed_on_the_node(mode: AttachMode) -> Result<()> {
    let mut f = Fixture::new(mode, true, false)?;
    let (tcp0, udp0) = (f.csum_errors("Tcp")?, f.csum_errors("Udp")?);
    if mode == AttachMode::Tc {
        // bpf_l3/l4_csum_replace update a partial checksum's pseudo-header part, so
        // the checksum the node completes is right.
        check_exchanges(&mut f)?;
        ensure!(f.csum_errors("Tcp")? == tcp0 && f.csum_errors("Udp")? == udp0, "tc: checksum errors");
        return Ok(());
    }
    // XDP rewrites the checksum field as if it held a full checksum, but it holds the
    // pseudo-header sum the completion starts from: the completed checksum is wrong and
    // the server drops every packet (docs/datapath-veth.md).
    let tcp = tcp_exchange(&f, 1024, LOSS_TIMEOUT);
    let Err(e) = tcp else {
        bail!("{mode}: TCP through a checksum-completing node now works: update the findings and this test")
    };
    ensure!(
        e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == ErrorKind::TimedOut)),
        "{mode}: expected the connect to time out, got {e:#}"
    );
    let tcp1 = f.csum_errors("Tcp")?;
    ensure!(tcp1.0 > tcp0.0, "{mode}: the server counted no TCP checksum errors for the dropped SYNs");

    let udp = udp_exchange(&f, 1, LOSS_TIMEOUT);
    ensure!(udp.is_err(), "{mode}: UDP through a checksum-completing node now works: update the findings");
    ensure!(f.csum_errors("Udp")?.0 > udp0.0, "{mode}: the server counted no UDP checksum errors");
    // Whatever the checksum, the NAT decision was made and counted: once for UDP, and
    // once per SYN, since the client retransmits its unanswered SYN and a SYN is always
    // scheduled afresh.
    let s = f.stats();
    ensure!(s.0[Reason::FwdNew as usize] >= 2, "{mode}: at least one TCP and one UDP flow expected");
    Ok(())
}

fn run(scenario: fn(AttachMode) -> Result<()>, mode: AttachMode) {
    if let Err(e) = scenario(mode) {
        panic!("{mode}: {e:#}");
    }
}

#[test]
fn tc_offloads_on() {
    run(offloads_on, AttachMode::Tc);
}

#[test]
fn tc_tx_csum_off_in_pods() {
    run(tx_csum_off_in_pods, AttachMode::Tc);
}

#[test]
fn tc_checksum_completed_on_the_node() {
    run(checksum_completed_on_the_node, AttachMode::Tc);
}

#[test]
fn xdp_generic_offloads_on() {
    run(offloads_on, AttachMode::XdpGeneric);
}

#[test]
fn xdp_generic_tx_csum_off_in_pods() {
    run(tx_csum_off_in_pods, AttachMode::XdpGeneric);
}

#[test]
fn xdp_generic_checksum_completed_on_the_node_is_wrong() {
    run(checksum_completed_on_the_node, AttachMode::XdpGeneric);
}

#[test]
fn xdp_native_offloads_on() {
    run(offloads_on, AttachMode::Xdp);
}

#[test]
fn xdp_native_tx_csum_off_in_pods() {
    run(tx_csum_off_in_pods, AttachMode::Xdp);
}

#[test]
fn xdp_native_checksum_completed_on_the_node_is_wrong() {
    run(checksum_completed_on_the_node, AttachMode::Xdp);
}
