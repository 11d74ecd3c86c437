//! The wire protocol: the client sends exactly [`REQUEST_LEN`] bytes, the server answers
//! with one line, `<name>\n`, and the connection can carry any number of such exchanges.
//! A fixed-size request needs no parsing on the server, and both messages fit one
//! segment, so a transaction is one packet each way as in netperf's TCP_RR.

use std::{
    borrow::Cow,
    io::{self, ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

pub const REQUEST_LEN: usize = 32;
/// Any 32 bytes would do: the server only counts them. Text reads well in a capture.
pub const REQUEST: &[u8; REQUEST_LEN] = b"lb-bench request, 32 bytes.....\n";
/// The longest name a server may have (a DNS name, which pod names are).
pub const MAX_NAME: usize = 253;
/// Room for the longest reply: the name and its newline.
pub type ReplyBuf = [u8; MAX_NAME + 1];

/// The reply line of a server named `name`.
pub fn reply_for(name: &str) -> Result<Vec<u8>> {
    ensure!(!name.is_empty() && name.len() <= MAX_NAME, "the server name must be 1 to {MAX_NAME} bytes: {name:?}");
    ensure!(!name.contains('\n'), "the server name can't contain a newline: {name:?}");
    Ok(format!("{name}\n").into_bytes())
}

/// The length of the name in a reply, once `buf` holds the reply's whole line.
pub fn name_len(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

/// The name in a reply, for printing and comparing.
pub fn name(buf: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(buf)
}

/// Serves one connection until the client closes it. A partial request at the close gets
/// no reply, as it would have no reader.
pub fn serve_conn(stream: &mut (impl Read + Write), reply: &[u8]) -> io::Result<()> {
    let mut req = [0; REQUEST_LEN];
    loop {
        match stream.read_exact(&mut req) {
            Ok(()) => stream.write_all(reply)?,
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// One transaction on an open connection. Returns the length of the name, which is then at
/// the start of `buf`. A server only writes after a request, so nothing is read past the
/// newline and the connection stays in step for the next transaction.
pub fn transact(stream: &mut (impl Read + Write), buf: &mut ReplyBuf) -> io::Result<usize> {
    stream.write_all(REQUEST)?;
    let mut filled = 0;
    loop {
        let n = match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(io::Error::new(ErrorKind::UnexpectedEof, "connection closed before the reply")),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // A read timeout shows as EAGAIN, whose message ("Resource temporarily
            // unavailable") doesn't say what happened.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(io::Error::new(ErrorKind::TimedOut, "no reply within the timeout"));
            }
            Err(e) => return Err(e),
        };
        if let Some(len) = name_len(&buf[filled..filled + n]) {
            return Ok(filled + len);
        }
        filled += n;
        if filled == buf.len() {
            return Err(io::Error::new(ErrorKind::InvalidData, "reply line longer than the longest name"));
        }
    }
}

/// Connects with TCP_NODELAY (a transaction is a single small write, which Nagle would
/// only delay) and with `io_timeout` on each read and write.
pub fn connect(addr: SocketAddr, connect_timeout: Duration, io_timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, connect_timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    Ok(stream)
}

/// One transaction on a new connection, TCP_CRR's unit: connect, request, reply, close.
/// Returns the name's length in `buf` and when the reply was read (before the close).
pub fn request(
    addr: SocketAddr,
    connect_timeout: Duration,
    io_timeout: Duration,
    buf: &mut ReplyBuf,
) -> Result<(usize, Instant)> {
    let mut stream = connect(addr, connect_timeout, io_timeout).with_context(|| format!("connecting to {addr}"))?;
    let len = transact(&mut stream, buf).with_context(|| format!("request to {addr}"))?;
    let replied = Instant::now();
    close(stream);
    Ok((len, replied))
}

/// A normal close (FIN), as netperf's TCP_CRR does. The client closes first, so each
/// connection's 4-tuple stays in TIME_WAIT for 60 s; with all connections going to one
/// IP:port, the 28,232 default ephemeral ports allow only ~470 new connections/s unless
/// `net.ipv4.tcp_tw_reuse` is 1 in the client's network namespace (it is per namespace;
/// `bench peers` sets it in its client pod). Measured with it at 0: 1,760 connections/s,
/// connect() hunting through 17.6k TIME_WAIT ports. Closing with an RST instead avoided
/// that but made kube-proxy's conntrack drop SYNs of reused ports (connect timeouts).
fn close(stream: TcpStream) {
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that reads from `input`, at most `chunk` bytes at a time as TCP may
    /// deliver them, and collects what is written.
    struct Pipe {
        input: io::Cursor<Vec<u8>>,
        chunk: usize,
        output: Vec<u8>,
    }

    impl Pipe {
        fn new(input: &[u8]) -> Self {
            Pipe { input: io::Cursor::new(input.to_vec()), chunk: usize::MAX, output: Vec::new() }
        }
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.chunk);
            self.input.read(&mut buf[..n])
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn server_answers_each_whole_request() {
        let reply = reply_for("backend-0").expect("valid name");
        let mut input = REQUEST.repeat(3);
        input.extend_from_slice(&REQUEST[..10]);
        for chunk in [usize::MAX, 5] {
            let mut conn = Pipe { chunk, ..Pipe::new(&input) };
            serve_conn(&mut conn, &reply).expect("EOF ends the connection cleanly");
            assert_eq!(conn.output, b"backend-0\n".repeat(3));
        }
    }

    #[test]
    fn client_reads_one_reply_line() {
        let mut buf = [0; MAX_NAME + 1];
        let mut conn = Pipe::new(b"backend-1\n");
        let len = transact(&mut conn, &mut buf).expect("a whole reply");
        assert_eq!(name(&buf[..len]), "backend-1");
        assert_eq!(conn.output, REQUEST);
        let mut conn = Pipe { chunk: 1, ..Pipe::new(b"backend-22\n") };
        let len = transact(&mut conn, &mut buf).expect("a reply in pieces");
        assert_eq!(name(&buf[..len]), "backend-22");

        let mut conn = Pipe::new(b"backend-1");
        assert_eq!(transact(&mut conn, &mut buf).unwrap_err().kind(), ErrorKind::UnexpectedEof);
        let mut conn = Pipe::new(&[b'x'; MAX_NAME + 2]);
        assert_eq!(transact(&mut conn, &mut buf).unwrap_err().kind(), ErrorKind::InvalidData);
    }

    #[test]
    fn names_and_lines() {
        assert_eq!(REQUEST.len(), REQUEST_LEN);
        assert_eq!(name_len(b"a\n"), Some(1));
        assert_eq!(name_len(b"\n"), Some(0));
        assert_eq!(name_len(b"abc"), None);
        assert!(reply_for("").is_err());
        assert!(reply_for("a\nb").is_err());
        assert!(reply_for(&"x".repeat(MAX_NAME + 1)).is_err());
        assert_eq!(reply_for(&"x".repeat(MAX_NAME)).expect("longest name").len(), MAX_NAME + 1);
    }
}
