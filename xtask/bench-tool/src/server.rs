//! `serve`: the backend pods' server.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    os::fd::AsRawFd,
    process::ExitCode,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::proto;

/// std listens with a backlog of 128, which a burst of TCP_CRR clients overflows into SYN
/// retransmits (1 s each), which would read as proxy latency. The kernel caps this at
/// net.core.somaxconn, 4096 by default.
const BACKLOG: libc::c_int = 4096;
/// A connection silent for this long is dropped, so one whose client vanished without a
/// FIN or RST (its path rerouted mid-benchmark, say) doesn't hold a thread forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub fn serve(bind: Ipv4Addr, port: u16, threads: u32, name: Option<String>) -> Result<ExitCode> {
    let name = match name {
        Some(name) => name,
        None => hostname().context("no --name given, and the hostname is unknown")?,
    };
    let reply = proto::reply_for(&name)?;
    let addr = SocketAddrV4::new(bind, port);
    // std sets SO_REUSEADDR before binding, so a restarted server binds at once.
    let listener = TcpListener::bind(addr).with_context(|| format!("listening on tcp {addr}"))?;
    // Linux lets listen() be called again on a listening socket, to change its backlog.
    // SAFETY: the fd is the listener's, open for the call's duration.
    if unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) } != 0 {
        return Err(io::Error::last_os_error()).context("raising the listen backlog");
    }
    let udp = UdpSocket::bind(addr).with_context(|| format!("binding udp {addr}"))?;
    eprintln!("lb-bench-tool: serving as {name:?} on tcp and udp {addr}, {threads} tcp threads");

    thread::scope(|s| {
        s.spawn(|| serve_udp(&udp, &reply));
        for _ in 0..threads {
            s.spawn(|| accept_loop(&listener, &reply));
        }
    });
    bail!("the server threads stopped")
}

/// Serves one connection at a time until it closes. Errors only drop the connection: a
/// client's reset or timeout is routine.
fn accept_loop(listener: &TcpListener, reply: &[u8]) {
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nodelay(true);
                let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
                let _ = proto::serve_conn(&mut stream, reply);
            }
            // ECONNABORTED passes; EMFILE and ENOBUFS may persist, so don't spin on them.
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Any datagram gets the reply: UDP probes only need to know who answered.
fn serve_udp(sock: &UdpSocket, reply: &[u8]) {
    let mut buf = [0; 2048];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let _ = sock.send_to(reply, peer);
            }
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// The UTS hostname; in a pod, the pod's name.
fn hostname() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for the length passed; one byte is kept for a terminator
    // that glibc omits when the name is truncated.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) } != 0 {
        return Err(io::Error::last_os_error()).context("gethostname");
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
}
