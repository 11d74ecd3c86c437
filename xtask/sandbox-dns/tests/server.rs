//! The UDP and TCP servers on 127.0.0.1 with a fixed record set, queried over real
//! sockets (no API server).

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use lb_sandbox_dns::{
    records::{Endpoint, Kind, Port, Records, ServiceRecord, Zone},
    server::{self, Stats, TcpLimits},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

const T: Duration = Duration::from_secs(5);

fn records() -> Records {
    let mut r = Records::new(Zone::new("cluster.local", 5).unwrap());
    r.insert(
        "default",
        "web",
        ServiceRecord {
            kind: Kind::ClusterIp(vec![Ipv4Addr::new(10, 96, 0, 10)]),
            ports: vec![Port::new("http", "TCP", 80)],
            endpoints: vec![],
        },
    );
    // 200 endpoints: ~3.3 kB of A records, over any UDP limit.
    let endpoints = (0..200u16).map(|i| Endpoint {
        ip: Ipv4Addr::new(10, 2, (i / 250) as u8, (i % 250) as u8 + 1),
        hostname: None,
        ports: vec![],
    });
    r.insert("default", "big", ServiceRecord { kind: Kind::Headless, ports: vec![], endpoints: endpoints.collect() });
    r
}

fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

async fn start() -> (std::net::SocketAddr, Arc<Stats>) {
    let (udp, tcp) = server::bind("127.0.0.1:0".parse().unwrap()).await.expect("bind 127.0.0.1:0");
    let addr = udp.local_addr().unwrap();
    assert_eq!(tcp.local_addr().unwrap(), addr, "UDP and TCP share the port");
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(records()));
    let stats = Arc::new(Stats::default());
    let limits = TcpLimits { max_connections: 4, idle_timeout: Duration::from_secs(2) };
    let s = stats.clone();
    tokio::spawn(async move {
        let _keep = tx;
        server::serve(udp, tcp, rx, s, limits).await
    });
    (addr, stats)
}

async fn udp_ask(addr: std::net::SocketAddr, packet: &[u8]) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(packet, addr).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = timeout(T, sock.recv(&mut buf)).await.expect("UDP answer in time").unwrap();
    assert!(n <= 512, "a UDP answer to a query without EDNS fits 512 bytes, got {n}");
    Message::from_vec(&buf[..n]).unwrap()
}

async fn tcp_ask(stream: &mut TcpStream, packet: &[u8]) -> Message {
    let mut frame = (packet.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(packet);
    stream.write_all(&frame).await.unwrap();
    let mut len = [0u8; 2];
    timeout(T, stream.read_exact(&mut len)).await.expect("TCP answer in time").unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len).into()];
    timeout(T, stream.read_exact(&mut buf)).await.unwrap().unwrap();
    Message::from_vec(&buf).unwrap()
}

fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn udp_and_tcp_answer_and_udp_truncates_big_answers() {
    let (addr, stats) = start().await;

    // UDP: a ClusterIP.
    let m = udp_ask(addr, &query(1, "web.default.svc.cluster.local.", RecordType::A)).await;
    assert_eq!((m.metadata.id, m.metadata.response_code), (1, ResponseCode::NoError));
    assert_eq!(a_records(&m), [Ipv4Addr::new(10, 96, 0, 10)]);

    // UDP: a miss has NXDOMAIN and the SOA.
    let m = udp_ask(addr, &query(2, "nope.default.svc.cluster.local.", RecordType::A)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities.first().map(|r| r.record_type()), Some(RecordType::SOA));

    // Garbage gets no answer, and does not stop the server.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(b"\x00\x01garbage", addr).await.unwrap();

    // UDP: the big headless service is truncated, with the question kept.
    let big = query(3, "big.default.svc.cluster.local.", RecordType::A);
    let m = udp_ask(addr, &big).await;
    assert!(m.metadata.truncation, "TC must be set");
    assert!(m.answers.is_empty());
    assert_eq!(m.queries.first().map(|q| q.name().to_ascii()), Some("big.default.svc.cluster.local.".into()));

    // TCP: the resolver's retry gets all 200, and the connection serves more.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let m = tcp_ask(&mut stream, &big).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.metadata.id, 3);
    assert_eq!(a_records(&m).len(), 200);
    let m = tcp_ask(&mut stream, &query(4, "web.default.svc.cluster.local.", RecordType::AAAA)).await;
    assert_eq!((m.metadata.id, m.metadata.response_code, m.answers.len()), (4, ResponseCode::NoError, 0));

    // A malformed TCP message is dropped; the connection goes on.
    stream.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
    let m = tcp_ask(&mut stream, &query(5, "web.default.svc.cluster.local.", RecordType::A)).await;
    assert_eq!(m.metadata.id, 5);
    drop(stream);

    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.malformed.load(Relaxed), 2, "the UDP and the TCP garbage");
    assert_eq!(stats.truncated.load(Relaxed), 1);
}

#[tokio::test]
async fn idle_tcp_connections_are_closed() {
    let (addr, stats) = start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // Half a length prefix, then silence: the server must give up after its 2 s.
    stream.write_all(&[0]).await.unwrap();
    let mut buf = [0u8; 1];
    let n = timeout(Duration::from_secs(10), stream.read(&mut buf)).await.expect("closed in time").unwrap_or(0);
    assert_eq!(n, 0, "EOF expected");
    assert_eq!(stats.tcp_timeouts.load(std::sync::atomic::Ordering::Relaxed), 1);
}
