//! Path-MTU discovery through a ClusterIP, with real traffic in throw-away network
//! namespaces (`lb_testing::netns`): issue 9, ICMP errors for NATed flows.
//!
//! ```text
//! client ──1500── node ──1500── router ──1300── server
//!          lb_tc on both node veths' ingress (the agent's pod and uplink hooks)
//! ```
//!
//! The client sends full 1500-byte segments; the router cannot forward them onto the
//! 1300-byte link and answers "fragmentation needed" (DF is set), quoting the segment
//! as it left the node: client -> server:8080. That error comes back through the
//! node's router-facing ingress, where the datapath must translate the quote to
//! client -> ClusterIP:80; otherwise the client's stack finds no socket for it, never
//! lowers its path MTU, and the upload hangs (no blackhole probing by default,
//! net.ipv4.tcp_mtu_probing = 0).
//!
//! The server advertises MSS 1460 (`advmss` on its default route), as a pod on a 1500-byte
//! network would if the small link were further away: with its own 1300-byte MTU it
//! would advertise 1260 and the client would never send a segment too large.
//!
//! Needs root; touches nothing outside the namespaces it creates, which are deleted
//! on the way out, also on panic (`Netns` drop).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_common::{IPPROTO_TCP, Reason, ServiceValue};
use lb_testing::{
    Datapath,
    netns::{self, Netns, PREFIX},
};
use lb_userspace::datapath::{self, AttachMode};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const CLIENT_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const NODE_UPLINK_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 1);
const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 2);
const SERVER_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);

/// The node's veth to the client pod, and to the router (its uplink).
const NODE_CLIENT_IF: &str = "to-client";
const NODE_UPLINK_IF: &str = "to-router";
const ROUTER_NODE_IF: &str = "to-node";
const ROUTER_SERVER_IF: &str = "to-server";
const POD_IF: &str = "eth0";

const SMALL_MTU: &str = "1300";
const UPLOAD: usize = 1 << 20;
/// A working upload takes well under a second; a hung one stops here.
const TIMEOUT: Duration = Duration::from_secs(20);

/// `dp` first, so that it is dropped first: programs detached before the interfaces go.
struct Fixture {
    dp: Datapath,
    client: Netns,
    node: Netns,
    router: Netns,
    server: Netns,
}

/// A veth pair with each end created in its namespace directly (nothing ever appears
/// in the root namespace), addressed and up.
fn link(a: &Netns, a_if: &str, a_addr: Ipv4Addr, b: &Netns, b_if: &str, b_addr: Ipv4Addr, mtu: &str) -> Result<()> {
    netns::ip(&["link", "add", a_if, "netns", a.name(), "type", "veth", "peer", "name", b_if, "netns", b.name()])?;
    for (ns, iface, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.ip(&["link", "set", iface, "mtu", mtu])?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", iface])?;
        ns.ip(&["link", "set", iface, "up"])?;
    }
    Ok(())
}

impl Fixture {
    /// `on_node`: the small MTU is the node's own uplink, so the node itself sends the
    /// "fragmentation needed", out of the client pod's interface egress (where
    /// `lb_tc_egress` must translate it); otherwise it is the router's link to the
    /// server, and the error comes back in through the node's uplink ingress.
    fn new(on_node: bool) -> Result<Self> {
        netns::remove_stale().context("removing namespaces of earlier crashed runs")?;
        static N: AtomicU32 = AtomicU32::new(0);
        let base = format!("{PREFIX}{}-pmtu{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        // Each one is deleted on drop from here on, also if a later step fails.
        let client = Netns::create(format!("{base}-client"))?;
        let node = Netns::create(format!("{base}-node"))?;
        let router = Netns::create(format!("{base}-router"))?;
        let server = Netns::create(format!("{base}-server"))?;
        let mut dp = Datapath::load()?;
        dp.put_service(&VIP.to_string(), PORT, IPPROTO_TCP, ServiceValue { id: 1, count: 1, ..Default::default() })?;
        dp.put_backends(1, &[(1, &SERVER_IP.to_string(), TARGET_PORT)])?;
        let f = Self { dp, client, node, router, server };

        for ns in [&f.node, &f.router] {
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            // The reverse-NATed replies and translated errors: see netns::Topology.
            for conf in ["all", "default"] {
                ns.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
            }
        }
        // Not inherited from the root namespace's settings: PMTU discovery must be the
        // only way the client can learn the path MTU.
        f.client.sysctl("net.ipv4.tcp_mtu_probing", "0")?;
        f.client.sysctl("net.ipv4.ip_no_pmtu_disc", "0")?;

        link(&f.node, NODE_CLIENT_IF, CLIENT_GW, &f.client, POD_IF, CLIENT_IP, "1500")?;
        link(&f.node, NODE_UPLINK_IF, NODE_UPLINK_IP, &f.router, ROUTER_NODE_IF, ROUTER_IP, "1500")?;
        link(
            &f.router,
            ROUTER_SERVER_IF,
            SERVER_GW,
            &f.server,
            POD_IF,
            SERVER_IP,
            if on_node { "1500" } else { SMALL_MTU },
        )?;
        if on_node {
            f.node.ip(&["link", "set", NODE_UPLINK_IF, "mtu", SMALL_MTU])?;
        }
        f.client.ip(&["route", "add", "default", "via", &CLIENT_GW.to_string()])?;
        f.node.ip(&["route", "add", "10.244.2.0/24", "via", &ROUTER_IP.to_string()])?;
        f.router.ip(&["route", "add", "default", "via", &NODE_UPLINK_IP.to_string()])?;
        f.server.ip(&["route", "add", "default", "via", &SERVER_GW.to_string(), "advmss", "1460"])?;
        Ok(f)
    }

    fn attach(&mut self) -> Result<()> {
        let ebpf = &mut self.dp.ebpf;
        self.node.run(|| {
            for iface in [NODE_CLIENT_IF, NODE_UPLINK_IF] {
                datapath::attach(ebpf, iface, datapath::Hook::Ingress(AttachMode::Tc))
                    .with_context(|| format!("attaching tc to {iface}"))?;
            }
            // The pod interface's egress, as the agent attaches it.
            datapath::attach(ebpf, NODE_CLIENT_IF, datapath::Hook::TcEgress).context("attaching tc egress")?;
            Ok(())
        })
    }
}

/// The client sends `UPLOAD` bytes to `target` and closes its side; the server counts
/// them and answers with the count. Every socket call is bounded by `TIMEOUT`.
fn upload(f: &Fixture, target: SocketAddr) -> Result<Duration> {
    let listener = f.server.run(|| TcpListener::bind((SERVER_IP, TARGET_PORT)).context("bind"))?;
    listener.set_nonblocking(true)?;
    let server = thread::spawn(move || -> Result<usize> {
        let deadline = Instant::now() + TIMEOUT;
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("server accept"),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut total = 0;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = s.read(&mut buf).context("server read")?;
            if n == 0 {
                break;
            }
            total += n;
        }
        s.write_all(&(total as u64).to_be_bytes()).context("server write")?;
        Ok(total)
    });
    let start = Instant::now();
    let result = (|| {
        let mut c = f.client.run(|| TcpStream::connect_timeout(&target, TIMEOUT).context("connect"))?;
        c.set_write_timeout(Some(TIMEOUT))?;
        c.set_read_timeout(Some(TIMEOUT))?;
        let data: Vec<u8> = (0..UPLOAD).map(|i| (i % 251) as u8).collect();
        c.write_all(&data).context("client write")?;
        c.shutdown(Shutdown::Write)?;
        let mut count = [0u8; 8];
        c.read_exact(&mut count).context("client read of the server's byte count")?;
        ensure!(u64::from_be_bytes(count) == UPLOAD as u64, "server got {} bytes", u64::from_be_bytes(count));
        Ok(start.elapsed())
    })();
    // Join the server either way (its accept and reads are bounded), so that no thread
    // outlives the namespaces.
    let served = server.join().expect("server thread");
    let took = result?;
    ensure!(served? == UPLOAD, "server count");
    Ok(took)
}

#[test]
fn large_upload_through_a_clusterip_over_a_smaller_mtu_link() {
    large_upload(false);
}

#[test]
fn large_upload_through_a_clusterip_over_the_nodes_smaller_mtu_uplink() {
    large_upload(true);
}

fn large_upload(on_node: bool) {
    let mut f = Fixture::new(on_node).expect("topology");
    f.attach().expect("attach");
    let nat0 = f.dp.stat(Reason::IcmpErrorNat).packets;

    let via_vip = upload(&f, SocketAddr::from((VIP, PORT)));
    let nat = f.dp.stat(Reason::IcmpErrorNat).packets - nat0;
    let took = via_vip.unwrap_or_else(|e| panic!("upload via the ClusterIP ({nat} ICMP errors translated): {e:#}"));
    eprintln!("1 MiB via the ClusterIP in {took:?}, {nat} ICMP errors translated");
    assert!(nat > 0, "the upload worked without any ICMP error translated: is the 1300-byte link in the path?");
    let mtu = f.client.exec("ip", &["route", "get", &VIP.to_string()]).unwrap();
    assert!(mtu.contains(&format!("mtu {SMALL_MTU}")), "client's route to the ClusterIP has no learned PMTU: {mtu}");

    // The reference: the same upload to the pod directly, whose errors need no NAT.
    let nat1 = f.dp.stat(Reason::IcmpErrorNat).packets;
    let took = upload(&f, SocketAddr::from((SERVER_IP, TARGET_PORT))).expect("upload to the pod IP");
    eprintln!("1 MiB to the pod IP in {took:?}");
    assert_eq!(f.dp.stat(Reason::IcmpErrorNat).packets, nat1, "errors about a non-NATed flow translated");
    let mtu = f.client.exec("ip", &["route", "get", &SERVER_IP.to_string()]).unwrap();
    assert!(mtu.contains(&format!("mtu {SMALL_MTU}")), "no learned PMTU toward the pod: {mtu}");
}
