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
//! arguments add ports. With no port at all it serves HTTP on 8080.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// What a container runs, derived from its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    Serve { tcp: Vec<u16>, udp: Vec<u16> },
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
        for a in args {
            let num = |flag: &str| a.strip_prefix(flag).and_then(|v| v.parse::<u16>().ok());
            if let Some(p) = num("--http-port=").or_else(|| num("--port=")) {
                tcp.push(p);
            }
            if let Some(p) = num("--udp-port=") {
                udp.push(p);
            }
        }
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
        Program::Serve { tcp, udp }
    }

    /// Arguments for `lb-sandbox image ...`.
    pub fn args(&self, pod: &str) -> Vec<String> {
        match self {
            Program::Idle => vec!["image".into(), "idle".into()],
            Program::Serve { tcp, udp } => {
                let mut a = vec!["image".into(), "serve".into(), "--name".into(), pod.into()];
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

/// Runs the `serve` image until killed.
pub fn serve(name: &str, tcp: &[u16], udp: &[u16]) -> Result<()> {
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
    eprintln!("serving as {name}: tcp {tcp:?} udp {udp:?}");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// One HTTP/1.x exchange per connection (`Connection: close`).
fn http_conn(mut c: TcpStream, name: &str) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
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
    let body = match path {
        "/hostname" => name.to_owned(),
        "/clientip" => c.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
        _ => format!("You've hit {name}\n"),
    };
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_map_to_programs() {
        let p = |s: &str| (8080u16, s.to_string());
        assert_eq!(Program::for_image("mynapp:v1", &[p("TCP")], &[]), Program::Serve { tcp: vec![8080], udp: vec![] });
        assert_eq!(Program::for_image("busybox", &[p("TCP")], &[]), Program::Idle);
        assert_eq!(
            Program::for_image("k8s.gcr.io/e2e-test-images/agnhost:2.21", &[], &["netexec".into(), "--http-port=80".into(), "--udp-port=81".into()]),
            Program::Serve { tcp: vec![80], udp: vec![81] }
        );
        assert_eq!(Program::for_image("udp-echo", &[], &[]), Program::Serve { tcp: vec![], udp: vec![5005] });
    }
}
