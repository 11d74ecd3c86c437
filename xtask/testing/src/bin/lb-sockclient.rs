//! `lb-sockclient`: one socket client of the socket-level load balancer's tests, as a
//! process of its own, since the cgroup programs see a socket by the cgroup of the
//! process that created it: a test's threads all share the test's cgroup.
//!
//! ```text
//! lb-sockclient [--cgroup DIR] [--netns NAME] [--repeat N] [--count N] [--timeout-ms MS] MODE ADDR [PROTO]
//!   tcp ADDR               connect; peer, local, the server's first line
//!   udp-connect ADDR       connect, send, recv; peer, source of the reply, reply
//!   udp-sendto ADDR        sendto, recvfrom (unconnected); source of the reply, reply
//!   udp-hold ADDR          a connected UDP socket kept open, driven from stdin
//!   tcp-hold ADDR          a TCP connection kept open, driven from stdin
//!   connect-errno ADDR tcp|udp   connect only; `connect=ok` or the errno name
//! ```
//!
//! It joins `--cgroup` (writes its pid to `cgroup.procs`) and `--netns` (setns into
//! /run/netns/NAME) before it opens any socket. Output: one `key=value` line per fact,
//! each exchange closed by a line `end`. `--repeat N` does the mode N times, each on a
//! new socket; `--count N` does N exchanges on one socket (the UDP modes). The hold
//! modes print the connect's facts and `end`, then answer each stdin line: `send`
//! (one message, then its reply), `recv` (wait for one), `quit`. A failed call prints
//! `op=<call>` and `err=<errno name>` (`ECONNREFUSED`, `ECONNABORTED`, `EAGAIN` for a
//! timeout) and exits 0; only bad usage or a failed setup exits non-zero.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

struct Opts {
    cgroup: Option<PathBuf>,
    netns: Option<String>,
    repeat: u32,
    count: u32,
    timeout: Duration,
    mode: String,
    addr: SocketAddr,
    proto: Option<String>,
}

fn parse() -> Result<Opts> {
    let mut args = std::env::args().skip(1);
    let (mut cgroup, mut netns, mut repeat, mut count, mut timeout_ms) = (None, None, 1, 1, 3000u64);
    let mut positional = Vec::new();
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--cgroup" => cgroup = Some(PathBuf::from(value("--cgroup")?)),
            "--netns" => netns = Some(value("--netns")?),
            "--repeat" => repeat = value("--repeat")?.parse().context("--repeat")?,
            "--count" => count = value("--count")?.parse().context("--count")?,
            "--timeout-ms" => timeout_ms = value("--timeout-ms")?.parse().context("--timeout-ms")?,
            s if s.starts_with("--") => bail!("unknown option {s}"),
            _ => positional.push(a),
        }
    }
    let mut p = positional.into_iter();
    let mode = p.next().context("missing MODE")?;
    let addr = p.next().context("missing ADDR")?.parse().context("ADDR: ip:port")?;
    let proto = p.next();
    if let Some(extra) = p.next() {
        bail!("unexpected argument {extra}");
    }
    Ok(Opts { cgroup, netns, repeat, count, timeout: Duration::from_millis(timeout_ms), mode, addr, proto })
}

/// The errno's name (`ECONNREFUSED`), or the error itself when it carries none.
fn errno_name(e: &std::io::Error) -> String {
    e.raw_os_error().map_or_else(|| format!("{:?}", e.kind()), |n| format!("{:?}", nix::errno::Errno::from_raw(n)))
}

fn fact(key: &str, value: impl std::fmt::Display) {
    println!("{key}={value}");
}

fn failed(op: &str, e: &std::io::Error) {
    fact("op", op);
    fact("err", errno_name(e));
}

fn end() {
    println!("end");
    let _ = std::io::stdout().flush();
}

/// Reads one `\n`-terminated line (without it).
fn read_line(r: &mut impl std::io::BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        // Reported as `UnexpectedEof`: no errno, the peer closed.
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim_end().to_owned())
}

fn udp_socket(o: &Opts) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(("0.0.0.0", 0))?;
    s.set_read_timeout(Some(o.timeout))?;
    Ok(s)
}

/// One datagram out on a connected socket and its reply; the reply's source is what
/// recvfrom() reports.
fn udp_exchange(s: &UdpSocket) {
    match s.send(b"hello") {
        Ok(_) => fact("send", "ok"),
        // Go on to the recv: a socket the kernel aborted has its error pending there
        // (a UDP socket disconnected by the abort fails send() with EDESTADDRREQ).
        Err(e) => fact("send_err", errno_name(&e)),
    }
    udp_recv(s);
}

/// One datagram: its source (`from`, which the socket LB shows as the ClusterIP) and
/// its text, or the errno.
fn udp_recv(s: &UdpSocket) {
    let mut buf = [0u8; 1500];
    match s.recv_from(&mut buf) {
        Ok((n, from)) => {
            fact("from", from);
            fact("reply", String::from_utf8_lossy(&buf[..n]));
        }
        Err(e) => fact("recv_err", errno_name(&e)),
    }
}

fn tcp_connect(o: &Opts) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&o.addr, o.timeout)?;
    s.set_read_timeout(Some(o.timeout))?;
    s.set_write_timeout(Some(o.timeout))?;
    Ok(s)
}

fn tcp_once(o: &Opts) {
    let s = match tcp_connect(o) {
        Ok(s) => s,
        Err(e) => return failed("connect", &e),
    };
    report_addrs(s.peer_addr(), s.local_addr());
    match read_line(&mut BufReader::new(&s)) {
        Ok(l) => fact("reply", l),
        Err(e) => failed("recv", &e),
    }
}

fn report_addrs(peer: std::io::Result<SocketAddr>, local: std::io::Result<SocketAddr>) {
    match peer {
        Ok(p) => fact("peer", p),
        Err(e) => failed("getpeername", &e),
    }
    if let Ok(l) = local {
        fact("local", l);
    }
}

fn udp_connect(o: &Opts) {
    let s = match udp_socket(o).and_then(|s| s.connect(o.addr).map(|()| s)) {
        Ok(s) => s,
        Err(e) => return failed("connect", &e),
    };
    report_addrs(s.peer_addr(), s.local_addr());
    for i in 0..o.count {
        if i > 0 {
            end();
        }
        udp_exchange(&s);
    }
}

fn udp_sendto(o: &Opts) {
    let s = match udp_socket(o) {
        Ok(s) => s,
        Err(e) => return failed("socket", &e),
    };
    for i in 0..o.count {
        if i > 0 {
            end();
        }
        if let Err(e) = s.send_to(b"hello", o.addr) {
            failed("sendto", &e);
            continue;
        }
        let mut buf = [0u8; 1500];
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                fact("from", from);
                fact("reply", String::from_utf8_lossy(&buf[..n]));
            }
            Err(e) => failed("recvfrom", &e),
        }
    }
}

fn connect_errno(o: &Opts) -> Result<()> {
    let r = match o.proto.as_deref() {
        Some("tcp") => TcpStream::connect_timeout(&o.addr, o.timeout).map(drop),
        Some("udp") => UdpSocket::bind(("0.0.0.0", 0)).and_then(|s| s.connect(o.addr)),
        p => bail!("connect-errno needs tcp or udp, not {p:?}"),
    };
    fact("connect", r.map_or_else(|e| errno_name(&e), |()| "ok".into()));
    Ok(())
}

/// The commands of the hold modes, one per stdin line, until `quit` or EOF.
fn hold(o: &Opts, udp: bool) -> Result<()> {
    enum Sock {
        Udp(UdpSocket),
        Tcp(BufReader<TcpStream>),
    }
    let connected = if udp {
        udp_socket(o).and_then(|s| s.connect(o.addr).map(|()| Sock::Udp(s)))
    } else {
        tcp_connect(o).map(|s| Sock::Tcp(BufReader::new(s)))
    };
    let mut sock = match connected {
        Ok(s) => s,
        Err(e) => {
            failed("connect", &e);
            end();
            return Ok(());
        }
    };
    match &mut sock {
        Sock::Udp(s) => report_addrs(s.peer_addr(), s.local_addr()),
        Sock::Tcp(r) => {
            report_addrs(r.get_ref().peer_addr(), r.get_ref().local_addr());
            // The server's greeting: its name.
            match read_line(r) {
                Ok(l) => fact("reply", l),
                Err(e) => fact("recv_err", errno_name(&e)),
            }
        }
    }
    end();
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        match (line.trim(), &mut sock) {
            ("quit", _) => break,
            ("send", Sock::Udp(s)) => udp_exchange(s),
            ("recv", Sock::Udp(s)) => udp_recv(s),
            ("send", Sock::Tcp(r)) => {
                match r.get_mut().write_all(b"ping\n") {
                    Ok(()) => fact("send", "ok"),
                    Err(e) => fact("send_err", errno_name(&e)),
                }
                match read_line(r) {
                    Ok(l) => fact("reply", l),
                    Err(e) => fact("recv_err", errno_name(&e)),
                }
            }
            ("recv", Sock::Tcp(r)) => match read_line(r) {
                Ok(l) => fact("reply", l),
                Err(e) => fact("recv_err", errno_name(&e)),
            },
            (other, _) => fact("usage_err", format!("unknown command {other:?}")),
        }
        end();
    }
    Ok(())
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("lb-sockclient: {e:#}");
            return ExitCode::from(64);
        }
    };
    if let Err(e) = join(&o).and_then(|()| run(&o)) {
        eprintln!("lb-sockclient: {e:#}");
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}

/// Joins the cgroup and the namespace, before any socket exists.
fn join(o: &Opts) -> Result<()> {
    if let Some(cg) = &o.cgroup {
        let procs = cg.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cg.display()))?;
    }
    if let Some(ns) = &o.netns {
        lb_netns::enter(ns)?;
    }
    // Where it ended up, for the test's failure messages.
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    fact("cgroup", cgroup.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("?"));
    Ok(())
}

fn run(o: &Opts) -> Result<()> {
    for _ in 0..o.repeat {
        match o.mode.as_str() {
            "tcp" => tcp_once(o),
            "udp-connect" => udp_connect(o),
            "udp-sendto" => udp_sendto(o),
            "connect-errno" => connect_errno(o)?,
            "udp-hold" => return hold(o, true),
            "tcp-hold" => return hold(o, false),
            m => bail!("unknown mode {m}"),
        }
        end();
    }
    Ok(())
}
