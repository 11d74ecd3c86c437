//! DNS over UDP and TCP around [`crate::answer::answer`]: decoding, EDNS, UDP
//! truncation, and bounded TCP connections.

use std::{
    fmt::Write as _,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use hickory_proto::op::{Edns, Message, MessageType, Metadata, ResponseCode};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Semaphore, watch},
};
use tracing::{debug, warn};

use crate::{answer::answer, records::Records};

/// The largest UDP response we send to EDNS clients, whatever they advertise: the
/// 2020 DNS flag day value, which fits every path MTU without IP fragmentation.
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// Without EDNS a UDP response is limited to 512 bytes (RFC 1035 4.2.1).
const CLASSIC_UDP_PAYLOAD: u16 = 512;
/// Receive buffer: larger than any sane query, so a longer datagram arrives cut
/// and is counted as malformed.
const UDP_RECV_BUF: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Counters, served as Prometheus text on `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub udp_queries: AtomicU64,
    pub tcp_queries: AtomicU64,
    /// Packets that did not decode as a DNS query; dropped without an answer.
    pub malformed: AtomicU64,
    /// UDP answers sent with TC set (the client retries over TCP).
    pub truncated: AtomicU64,
    pub servfail: AtomicU64,
    pub nxdomain: AtomicU64,
    /// TCP connections closed at once because `--tcp-max-connections` were open.
    pub tcp_rejected: AtomicU64,
    /// TCP connections closed because the client was idle or slow.
    pub tcp_timeouts: AtomicU64,
}

impl Stats {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, v) in [
            ("lb_dns_queries_total{transport=\"udp\"}", "DNS queries answered.", &self.udp_queries),
            ("lb_dns_queries_total{transport=\"tcp\"}", "", &self.tcp_queries),
            ("lb_dns_malformed_total", "Packets dropped because they did not decode as a query.", &self.malformed),
            ("lb_dns_truncated_total", "UDP answers sent truncated (TC).", &self.truncated),
            ("lb_dns_servfail_total", "SERVFAIL answers (before the first sync).", &self.servfail),
            ("lb_dns_nxdomain_total", "NXDOMAIN answers.", &self.nxdomain),
            ("lb_dns_tcp_rejected_total", "TCP connections refused over the connection limit.", &self.tcp_rejected),
            ("lb_dns_tcp_timeouts_total", "TCP connections closed on a read or write timeout.", &self.tcp_timeouts),
        ] {
            let family = name.split('{').next().unwrap_or(name);
            if !help.is_empty() {
                let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} counter");
            }
            let _ = writeln!(out, "{name} {}", v.load(Relaxed));
        }
        out
    }
}

/// Decodes one query, answers it and encodes the response for `transport`.
/// `None`: drop the packet (it was not a query; already counted and logged).
pub fn respond(records: &Records, packet: &[u8], transport: Transport, stats: &Stats) -> Option<Vec<u8>> {
    let request = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(e) => {
            stats.malformed.fetch_add(1, Relaxed);
            debug!(error = %e, len = packet.len(), ?transport, "dropping malformed packet");
            return None;
        }
    };
    // Never answer a response: two servers could bounce packets between them.
    if request.metadata.message_type != MessageType::Query {
        stats.malformed.fetch_add(1, Relaxed);
        debug!(id = request.metadata.id, ?transport, "dropping a response sent to us");
        return None;
    }
    let counter = match transport {
        Transport::Udp => &stats.udp_queries,
        Transport::Tcp => &stats.tcp_queries,
    };
    counter.fetch_add(1, Relaxed);

    let mut resp = if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
        // RFC 6891 6.1.3: we speak EDNS version 0 only.
        let mut r = Message::new(request.metadata.id, MessageType::Response, request.metadata.op_code);
        r.metadata = Metadata::response_from_request(&request.metadata);
        r.queries = request.queries.clone();
        r.metadata.response_code = ResponseCode::BADVERS;
        r
    } else {
        answer(records, &request)
    };
    // RFC 6891 7: answer EDNS with EDNS, stating what we accept.
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        resp.edns = Some(edns);
    }
    match resp.metadata.response_code {
        ResponseCode::ServFail => stats.servfail.fetch_add(1, Relaxed),
        ResponseCode::NXDomain => stats.nxdomain.fetch_add(1, Relaxed),
        _ => 0,
    };

    let limit = match transport {
        Transport::Udp => request
            .edns
            .as_ref()
            .map_or(CLASSIC_UDP_PAYLOAD, |e| e.max_payload().clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD)),
        Transport::Tcp => u16::MAX,
    } as usize;
    let bytes = match resp.to_vec() {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "cannot encode a response; sending SERVFAIL");
            let mut fail = resp.truncate();
            fail.metadata.truncation = false;
            fail.metadata.response_code = ResponseCode::ServFail;
            return fail.to_vec().ok();
        }
    };
    if bytes.len() <= limit {
        return Some(bytes);
    }
    // Too big: send the question alone with TC, so the resolver asks again over TCP
    // (glibc and musl both discard partial answers in a TC response anyway).
    stats.truncated.fetch_add(1, Relaxed);
    debug!(len = bytes.len(), limit, ?transport, "truncating");
    resp.truncate().to_vec().ok()
}

/// Binds UDP and TCP on the same address. With port 0, both get the same
/// (kernel-chosen) port, as tests need; a few tries, because the TCP port may be
/// taken even when the UDP one was free.
pub async fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let mut last_err = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(addr).await?;
        let local = udp.local_addr()?;
        match TcpListener::bind(local).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("no free port for UDP and TCP")))
}

#[derive(Clone, Copy, Debug)]
pub struct TcpLimits {
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// How long a connection may wait for the next query, or take to deliver one
    /// or to take its answer.
    pub idle_timeout: Duration,
}

/// Serves UDP and TCP until an accept loop fails for good.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    records: watch::Receiver<Arc<Records>>,
    stats: Arc<Stats>,
    limits: TcpLimits,
) -> io::Result<()> {
    tokio::select! {
        r = serve_udp(udp, records.clone(), stats.clone()) => r,
        r = serve_tcp(tcp, records, stats, limits) => r,
    }
}

/// One task answers every datagram in turn: an answer is a map lookup and an
/// encode, far cheaper than spawning a task for it.
pub async fn serve_udp(socket: UdpSocket, records: watch::Receiver<Arc<Records>>, stats: Arc<Stats>) -> io::Result<()> {
    let mut buf = vec![0u8; UDP_RECV_BUF];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // Transient (e.g. an ICMP error surfaced on the socket); pause so a
                // persistent one cannot spin the loop.
                debug!(error = %e, "UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let snapshot = records.borrow().clone();
        if let Some(out) = respond(&snapshot, &buf[..n], Transport::Udp, &stats)
            && let Err(e) = socket.send_to(&out, peer).await
        {
            debug!(error = %e, %peer, "UDP send failed");
        }
    }
}

pub async fn serve_tcp(
    listener: TcpListener,
    records: watch::Receiver<Arc<Records>>,
    stats: Arc<Stats>,
    limits: TcpLimits,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: wait for connections to close.
                warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            stats.tcp_rejected.fetch_add(1, Relaxed);
            debug!(%peer, "too many TCP connections; closing");
            continue;
        };
        let (records, stats) = (records.clone(), stats.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = tcp_connection(stream, &records, &stats, limits.idle_timeout).await {
                debug!(%peer, error = %e, "TCP connection ended");
            }
        });
    }
}

/// Length-prefixed queries (RFC 1035 4.2.2, RFC 7766) until EOF, a timeout or an
/// I/O error.
async fn tcp_connection(
    mut stream: TcpStream,
    records: &watch::Receiver<Arc<Records>>,
    stats: &Stats,
    idle: Duration,
) -> io::Result<()> {
    let timed_out = || {
        stats.tcp_timeouts.fetch_add(1, Relaxed);
        io::Error::new(io::ErrorKind::TimedOut, "client idle or too slow")
    };
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        buf.resize(usize::from(u16::from_be_bytes(len)), 0);
        tokio::time::timeout(idle, stream.read_exact(&mut buf)).await.map_err(|_| timed_out())??;
        let snapshot = records.borrow().clone();
        // A malformed message is dropped; the framing is intact, so go on reading.
        let Some(out) = respond(&snapshot, &buf, Transport::Tcp, stats) else { continue };
        let mut frame = Vec::with_capacity(out.len() + 2);
        frame.extend_from_slice(&u16::try_from(out.len()).unwrap_or(u16::MAX).to_be_bytes());
        frame.extend_from_slice(&out);
        tokio::time::timeout(idle, stream.write_all(&frame)).await.map_err(|_| timed_out())??;
    }
}
