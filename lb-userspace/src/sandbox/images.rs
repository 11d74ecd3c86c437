//! Built-in "container images": what a pod's container runs, chosen from its image name.
//!
//! | image name contains                                   | program |
//! |-------------------------------------------------------|---------|
//! | `udp-echo`                                            | `serve`, UDP echo on every port (containerPorts default to UDP 5005) |
//! | `mynapp`, `serve-hostname`, `agnhost`, `http`, `nginx`, `echo` | `serve`: HTTP on TCP containerPorts, UDP echo on UDP ones |
//! | anything else (`idle`, `busybox`, `client`, `pause`)  | `idle`: sleeps until SIGTERM |
//!
//! `serve` answers HTTP `GET /` with "You've hit <pod name>\n", `/hostname` with the pod
//! name and `/clientip` with the peer's `ip:port`; UDP datagrams come back as
//! "<pod name>: <payload>". agnhost-style `--http-port=N`, `--udp-port=N` and `--port=N`
//! arguments add ports. With no port at all it serves HTTP on 8080. `/readyz` answers 200
//! until SIGTERM and 503 afterwards, `/healthz` always 200.
//!
//! On SIGTERM it exits at once, unless agnhost netexec's `--delay-shutdown=N` is given: then
//! it keeps serving for N seconds (with `/readyz` failing) before it exits, so a deleted pod
//! stays a serving, terminating endpoint for its grace period.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// What a container runs, derived from its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    Serve { tcp: Vec<u16>, udp: Vec<u16>, delay_shutdown: u64 },
    Idle,
}

impl Program {
    /// Picks the program for `image` with its containerPorts `(port, protocol)` and args.
    pub fn for_image(image: &str, ports: &[(u16, String)], args: &[String]) -> Program {
        let img = image.to_lowercase();
        let serves = ["udp-echo", "mynapp", "serve-hostname", "agnhost", "http", "nginx", "echo"];
        if !serves.iter().any(|s| img.contains(s)) {
            return Program::Idle;
        }
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for (p, proto) in ports {
            match proto.to_uppercase().as_str() {
                "UDP" => udp.push(*p),
                "SCTP" => {}
                _ if img.contains("udp-echo") => udp.push(*p),
                _ => tcp.push(*p),
            }
        }
        // agnhost flags, as `--flag=N` or `--flag N`.
        let flag = |name: &str| -> Option<u64> {
            args.iter().enumerate().find_map(|(i, a)| {
                let v = match a.strip_prefix(name)? {
                    "" => args.get(i + 1)?.as_str(),
                    v => v.strip_prefix('=')?,
                };
                v.parse().ok()
            })
        };
        let port = |name: &str| flag(name).and_then(|p| u16::try_from(p).ok());
        if let Some(p) = port("--http-port").or_else(|| port("--port")) {
            tcp.push(p);
        }
        if let Some(p) = port("--udp-port") {
            udp.push(p);
        }
        let delay_shutdown = flag("--delay-shutdown").unwrap_or(0);
        tcp.sort_unstable();
        tcp.dedup();
        udp.sort_unstable();
        udp.dedup();
        if tcp.is_empty() && udp.is_empty() {
            if img.contains("udp-echo") {
                udp.push(5005);
            } else {
                tcp.push(8080);
            }
        }
        Program::Serve { tcp, udp, delay_shutdown }
    }

    /// Arguments for `lb-sandbox image ...`.
    pub fn args(&self, pod: &str) -> Vec<String> {
        match self {
            Program::Idle => vec!["image".into(), "idle".into()],
            Program::Serve { tcp, udp, delay_shutdown } => {
                let mut a = vec!["image".into(), "serve".into(), "--name".into(), pod.into()];
                if *delay_shutdown > 0 {
                    a.extend(["--delay-shutdown".into(), delay_shutdown.to_string()]);
                }
                for p in tcp {
                    a.extend(["--tcp".into(), p.to_string()]);
                }
                for p in udp {
                    a.extend(["--udp".into(), p.to_string()]);
                }
                a
            }
        }
    }
}

/// Set by SIGTERM: `/readyz` fails from then on.
static TERMINATING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_sig: libc::c_int) {
    TERMINATING.store(true, Ordering::Relaxed);
}

/// Runs the `serve` image until SIGTERM (plus `delay_shutdown` seconds) or SIGKILL.
pub fn serve(name: &str, tcp: &[u16], udp: &[u16], delay_shutdown: u64) -> Result<()> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigterm as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
    let mut threads = Vec::new();
    for &p in tcp {
        let l = TcpListener::bind(("0.0.0.0", p)).with_context(|| format!("listening on TCP {p}"))?;
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || http_conn(conn, &name));
            }
        }));
    }
    for &p in udp {
        let s = UdpSocket::bind(("0.0.0.0", p)).with_context(|| format!("listening on UDP {p}"))?;
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = s.recv_from(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]);
                let _ = s.send_to(format!("{name}: {}", msg.trim_end()).as_bytes(), peer);
            }
        }));
    }
    eprintln!("serving as {name}: tcp {tcp:?} udp {udp:?}, delay-shutdown {delay_shutdown}s");
    while !TERMINATING.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if delay_shutdown > 0 {
        // agnhost netexec --delay-shutdown: keep serving (unready) before exiting.
        eprintln!("SIGTERM: /readyz now fails; still serving for {delay_shutdown}s");
        std::thread::sleep(Duration::from_secs(delay_shutdown));
    }
    eprintln!("exiting");
    drop(threads);
    std::process::exit(0);
}

/// One HTTP/1.x exchange per connection (`Connection: close`).
fn http_conn(mut c: TcpStream, name: &str) {
    // Long enough for a client that holds a connection open across an agent restart.
    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&req);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let mut status = "200 OK";
    let body = match path {
        "/hostname" => name.to_owned(),
        "/healthz" => "ok".to_owned(),
        "/readyz" if TERMINATING.load(Ordering::Relaxed) => {
            status = "503 Service Unavailable";
            "shutting down".to_owned()
        }
        "/readyz" => "ok".to_owned(),
        "/clientip" => c.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
        _ => format!("You've hit {name}\n"),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = c.write_all(resp.as_bytes());
}

/// Runs the `idle` image: sleeps until a signal ends the process.
pub fn idle() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Client tool: sends `msg` to `addr` over UDP and prints the first answer.
pub fn udp_client(addr: SocketAddr, msg: &str, timeout: Duration) -> Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0").context("binding a UDP socket")?;
    s.set_read_timeout(Some(timeout))?;
    s.connect(addr).with_context(|| format!("connecting UDP to {addr}"))?;
    s.send(msg.as_bytes()).with_context(|| format!("sending to {addr}"))?;
    let mut buf = [0u8; 2048];
    match s.recv(&mut buf) {
        Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => bail!("connection refused by {addr}"),
        Err(e) => Err(e).with_context(|| format!("no answer from {addr} within {timeout:?}")),
    }
}

/// Client tool: opens a TCP connection to `addr` and sends the first line of an HTTP
/// request; prints `connected <local addr>`; waits for a line on stdin; finishes the
/// request and prints the answer's body. Shows whether a connection made before some
/// event (an agent restart) still works after it.
pub fn tcp_hold(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| format!("connecting to {addr}"))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n").as_bytes())?;
    println!("connected {}", s.local_addr()?);
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"Connection: close\r\n\r\n").context("finishing the request")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).context("reading the answer")?;
    let resp = String::from_utf8_lossy(&resp);
    let Some((head, body)) = resp.split_once("\r\n\r\n") else {
        bail!("no HTTP answer on the held connection: {resp:?}")
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("answer: {head:?}");
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_map_to_programs() {
        let p = |s: &str| (8080u16, s.to_string());
        assert_eq!(
            Program::for_image("mynapp:v1", &[p("TCP")], &[]),
            Program::Serve { tcp: vec![8080], udp: vec![], delay_shutdown: 0 }
        );
        assert_eq!(Program::for_image("busybox", &[p("TCP")], &[]), Program::Idle);
        assert_eq!(
            Program::for_image(
                "k8s.gcr.io/e2e-test-images/agnhost:2.21",
                &[],
                &["netexec".into(), "--http-port=80".into(), "--udp-port=81".into()]
            ),
            Program::Serve { tcp: vec![80], udp: vec![81], delay_shutdown: 0 }
        );
        let args: Vec<String> =
            ["netexec", "--http-port", "80", "--delay-shutdown", "100"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            Program::for_image("agnhost", &[], &args),
            Program::Serve { tcp: vec![80], udp: vec![], delay_shutdown: 100 }
        );
        assert_eq!(
            Program::for_image("udp-echo", &[], &[]),
            Program::Serve { tcp: vec![], udp: vec![5005], delay_shutdown: 0 }
        );
    }
}
