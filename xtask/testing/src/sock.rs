//! Real sockets for the socket-level load balancer's tests: backends that answer with
//! their own name ([`IdentityServer`]), and `lb-sockclient` processes, which join a
//! cgroup and a network namespace before opening their socket ([`client`],
//! [`HoldClient`]), since the cgroup programs go by the cgroup of the process that made
//! a socket, and a test's own threads are all in the test's cgroup.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::netns::Netns;

/// How long the harness waits for a client's answer: above the client's own socket
/// timeouts (3 s), so that a timeout shows as the client's `err=EAGAIN`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// The `lb-sockclient` binary of this build (target/<profile>/lb-sockclient), built
/// once per test process with `cargo build` (which does nothing when it is up to
/// date): lb-userspace's tests do not build lb-testing's binaries. `LB_SOCKCLIENT_BIN`
/// overrides it.
pub fn sockclient_binary() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if let Some(p) = std::env::var_os("LB_SOCKCLIENT_BIN") {
        return Ok(p.into());
    }
    BUILT.get_or_init(|| build_sockclient().map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
}

fn build_sockclient() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("the test executable's path")?;
    let dir = exe.parent().and_then(Path::parent).context("the target directory")?;
    let bin = dir.join("lb-sockclient");
    let release = dir.file_name().is_some_and(|n| n == "release");
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(["build", "--package", "lb-testing", "--bin", "lb-sockclient"]);
    // What `cargo test` set for this test binary is not the nested build's: build
    // scripts that read it (ring's reads CARGO_PKG_*) would rebuild every run.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_")
            || k.starts_with("CARGO_MANIFEST_")
            || ["CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&k.as_ref())
        {
            c.env_remove(k.as_ref());
        }
    }
    if release {
        c.arg("--release");
    }
    match c.status() {
        Ok(st) if st.success() && bin.is_file() => Ok(bin),
        // No cargo (a test binary run by hand): an earlier build will do.
        _ if bin.is_file() => Ok(bin),
        r => bail!("building {} failed: {r:?}", bin.display()),
    }
}

/// One exchange's `key=value` facts, as `lb-sockclient` printed them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts(pub BTreeMap<String, String>);

impl Facts {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The value of `key`, or a panic naming the facts there are.
    pub fn must(&self, key: &str) -> &str {
        self.get(key).unwrap_or_else(|| panic!("no {key}= in the client's answer {self:?}"))
    }

    /// Whether any of `keys` is `value` (an errno may show on send or on recv).
    pub fn any_is(&self, keys: &[&str], value: &str) -> bool {
        keys.iter().any(|k| self.get(k) == Some(value))
    }
}

/// Splits `lb-sockclient` output into exchanges (closed by `end` lines).
pub fn parse_facts(out: &str) -> Vec<Facts> {
    let mut all = Vec::new();
    let mut cur = Facts::default();
    for line in out.lines() {
        if line == "end" {
            all.push(std::mem::take(&mut cur));
        } else if let Some((k, v)) = line.split_once('=') {
            cur.0.insert(k.to_owned(), v.to_owned());
        }
    }
    if !cur.0.is_empty() {
        all.push(cur);
    }
    all
}

/// Where a client runs: in `cgroup` (None: the test's own) and `netns` (None: the
/// test's own).
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    pub cgroup: Option<&'a Path>,
    pub netns: Option<&'a Netns>,
}

impl Place<'_> {
    fn command(&self, args: &[&str]) -> Result<Command> {
        let mut c = Command::new(sockclient_binary()?);
        if let Some(cg) = self.cgroup {
            c.arg("--cgroup").arg(cg);
        }
        if let Some(ns) = self.netns {
            c.args(["--netns", ns.name()]);
        }
        c.args(args);
        Ok(c)
    }

    /// That the client said it is in the cgroup it was told to join (`cgroup=` is the
    /// first fact it prints).
    fn check_joined(&self, first: Option<&Facts>) -> Result<()> {
        let Some(cg) = self.cgroup else { return Ok(()) };
        let name = cg.file_name().and_then(|n| n.to_str()).context("cgroup name")?;
        let got = first.and_then(|f| f.get("cgroup"));
        anyhow::ensure!(
            got.is_some_and(|g| g.rsplit('/').next() == Some(name)),
            "the client is in cgroup {got:?}, not {}",
            cg.display()
        );
        Ok(())
    }
}

/// Runs `lb-sockclient ARGS` at `place` to the end; its exchanges. Fails on a non-zero
/// exit (bad usage, a failed setup), with its stderr; socket errors are facts.
pub fn client(place: Place<'_>, args: &[&str]) -> Result<Vec<Facts>> {
    let mut c = place.command(args)?;
    let out = c.stdin(Stdio::null()).output().with_context(|| format!("running {c:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{c:?} failed ({}): {}{stdout}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let facts = parse_facts(&stdout);
    place.check_joined(facts.first())?;
    Ok(facts)
}

/// One exchange of `lb-sockclient ARGS` (a mode without `--repeat`/`--count`).
pub fn client_once(place: Place<'_>, args: &[&str]) -> Result<Facts> {
    let mut v = client(place, args)?;
    match v.len() {
        1 => Ok(v.remove(0)),
        n => bail!("expected one exchange from {args:?}, got {n}: {v:?}"),
    }
}

/// A `lb-sockclient udp-hold|tcp-hold` process: its socket stays open between
/// [`HoldClient::cmd`]s. Killed on drop.
pub struct HoldClient {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    /// The connect's facts (peer, local, for TCP the greeting).
    pub connected: Facts,
}

impl HoldClient {
    /// `mode` is `udp-hold` or `tcp-hold`.
    pub fn start(place: Place<'_>, mode: &str, addr: SocketAddr) -> Result<Self> {
        let mut c = place.command(&[mode, &addr.to_string()])?;
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {c:?}"))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut h = Self { child, stdin, lines, connected: Facts::default() };
        h.connected = h.answer().context("the hold client's connect")?;
        place.check_joined(Some(&h.connected))?;
        Ok(h)
    }

    /// Sends one command (`send`, `recv`) and returns its facts.
    pub fn cmd(&mut self, cmd: &str) -> Result<Facts> {
        writeln!(self.stdin, "{cmd}").context("writing to the client")?;
        self.stdin.flush()?;
        self.answer().with_context(|| format!("the answer to {cmd}"))
    }

    fn answer(&mut self) -> Result<Facts> {
        let mut facts = Facts::default();
        loop {
            let line = self.lines.recv_timeout(ANSWER_TIMEOUT).map_err(|e| {
                let st = self.child.try_wait().ok().flatten();
                anyhow::anyhow!("no answer from the client ({e}; exit status {st:?}; so far {facts:?})")
            })?;
            if line == "end" {
                return Ok(facts);
            }
            if let Some((k, v)) = line.split_once('=') {
                facts.0.insert(k.to_owned(), v.to_owned());
            }
        }
    }
}

impl Drop for HoldClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backend on `addr` in a namespace, TCP and UDP on the same port, that answers with
/// its name: a TCP connection gets `NAME\n` on accept and again for each line it sends;
/// each UDP datagram gets a datagram `NAME` back. Stopped on drop.
pub struct IdentityServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub addr: SocketAddrV4,
    pub name: String,
}

/// How often the server's threads look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

impl IdentityServer {
    pub fn start(ns: &Netns, addr: SocketAddrV4, name: &str) -> Result<Self> {
        let (tcp, udp) = ns.run(|| {
            let t = TcpListener::bind(addr).with_context(|| format!("binding TCP {addr}"))?;
            let u = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
            Ok((t, u))
        })?;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(STOP_POLL))?;
        let stop = Arc::new(AtomicBool::new(false));
        let greeting = format!("{name}\n");
        let tcp_thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((s, _)) => {
                            let (stop, greeting) = (stop.clone(), greeting.clone());
                            std::thread::spawn(move || serve_tcp(s, &greeting, &stop));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        let udp_thread = {
            let (stop, name) = (stop.clone(), name.to_owned());
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(name.as_bytes(), peer);
                    }
                }
            })
        };
        Ok(Self { stop, threads: vec![tcp_thread, udp_thread], addr, name: name.to_owned() })
    }
}

fn serve_tcp(mut s: TcpStream, greeting: &str, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(STOP_POLL));
    if s.write_all(greeting.as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // One answer per line received.
                for _ in buf[..n].iter().filter(|&&b| b == b'\n') {
                    if s.write_all(greeting.as_bytes()).is_err() {
                        return;
                    }
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
}

impl Drop for IdentityServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
