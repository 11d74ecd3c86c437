//! scratch experiment
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, NO_BACKENDS_REJECT, Reason, ServiceValue};
use lb_userspace::{
    datapath::AttachMode,
    netns::{self, CLIENT_IP, NODE_CLIENT_IF, NODE_SERVER_IF, POD_IF, SERVER_IP, Topology},
    testing::Datapath,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const IO_TIMEOUT: Duration = Duration::from_secs(3);

fn svc(id: u32, count: u32) -> ServiceValue {
    ServiceValue { id, count, affinity_timeout_s: 0, flags: 0, no_backends: NO_BACKENDS_REJECT, _pad: 0 }
}

fn tcp_exchange(topo: &Topology, port: u16, len: usize) -> Result<(SocketAddr, SocketAddr)> {
    let listener = topo.server.run(|| Ok(TcpListener::bind((SERVER_IP, 8080))?))?;
    listener.set_nonblocking(true)?;
    let server = std::thread::spawn(move || -> Result<(SocketAddr, SocketAddr)> {
        let deadline = Instant::now() + IO_TIMEOUT;
        let (mut s, peer) = loop {
            match listener.accept() {
                Ok(x) => break x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(e).context("accept"),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let local = s.local_addr()?;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = s.read(&mut buf).context("server read")?;
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).context("server write")?;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        Ok((peer, local))
    });
    let target = SocketAddr::V4(SocketAddrV4::new(VIP, port));
    let client = topo.client.run(|| Ok(TcpStream::connect_timeout(&target, IO_TIMEOUT)?));
    let mut client = match client {
        Ok(c) => c,
        Err(e) => {
            let _ = server.join();
            return Err(e).context("connect");
        }
    };
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    client.set_write_timeout(Some(IO_TIMEOUT))?;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut w = client.try_clone()?;
    let d2 = data.clone();
    let writer = std::thread::spawn(move || -> Result<()> {
        w.write_all(&d2).context("client write")?;
        w.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    let mut got = Vec::new();
    let r = client.read_to_end(&mut got);
    writer.join().unwrap()?;
    r.context("client read")?;
    let res = server.join().unwrap()?;
    if got != data {
        bail!("echo mismatch: {} of {} bytes", got.len(), data.len());
    }
    Ok(res)
}

#[test]
#[ignore]
fn experiment() {
    let mode: AttachMode = std::env::var("MODE").unwrap_or("tc".into()).parse().unwrap();
    let topo = Topology::new().unwrap();
    let mut dp = Datapath::load().unwrap();
    dp.put_service("10.96.0.10", 80, IPPROTO_TCP, svc(1, 1)).unwrap();
    dp.put_backends(1, &[(1, "10.244.2.10", 8080)]).unwrap();
    dp.put_service("10.96.0.10", 53, IPPROTO_UDP, svc(2, 1)).unwrap();
    dp.put_backends(2, &[(1, "10.244.2.10", 5353)]).unwrap();
    for (var, ns, iface) in [
        ("CLIENT", &topo.client, POD_IF),
        ("SERVER", &topo.server, POD_IF),
        ("NODEC", &topo.node, NODE_CLIENT_IF),
        ("NODES", &topo.node, NODE_SERVER_IF),
    ] {
        if let Ok(v) = std::env::var(var) {
            for kv in v.split(',') {
                let (k, val) = kv.split_once('=').unwrap();
                ns.ethtool_k(iface, k, val == "on").unwrap();
            }
        }
    }
    topo.attach(&mut dp.ebpf, mode).unwrap();
    let mut dump = None;
    if std::env::var("DUMP").is_ok() {
        let c = topo.server.command("tcpdump").args(["-nn", "-vv", "-c", "6", "-i", "eth0", "tcp"]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(800));
        dump = Some(c);
    }
    let before = (topo.server.snmp("Tcp", "InCsumErrors").unwrap(), topo.client.snmp("Tcp", "InCsumErrors").unwrap());
    let t = Instant::now();
    let r = tcp_exchange(&topo, 80, 1 << 20);
    println!("mode {mode}: tcp {:?} in {:?}", r, t.elapsed());
    let after = (topo.server.snmp("Tcp", "InCsumErrors").unwrap(), topo.client.snmp("Tcp", "InCsumErrors").unwrap());
    println!("InCsumErrors server {} -> {}, client {} -> {}", before.0, after.0, before.1, after.1);
    for (r, c) in dp.stats() {
        if c.packets > 0 {
            println!("  {:?}: {}", r, c.packets);
        }
    }
    if let Some(mut c) = dump {
        std::thread::sleep(Duration::from_millis(300));
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = (netns::remove_stale, Reason::FwdNew, UdpSocket::bind::<&str>);
}
