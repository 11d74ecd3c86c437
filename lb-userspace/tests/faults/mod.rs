//! What the node-fault tests share (faults_maps.rs, faults_links.rs): a real `lb
//! agent` in the node namespace of a [`Topology`] with `--source file:`, echo
//! backends, its /metrics, and the kernel objects it owns (programs and links), counted
//! from the kernel's own lists so that a leak shows whatever the agent believes.

#![allow(dead_code, reason = "each test file uses its own part")]

use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_common::map_names;
pub use lb_testing::Scratch;
use lb_testing::{
    PrivateBpffs,
    agent::{AgentProcess, read_status},
    netns::{Netns, Topology},
};
use lb_userspace::agent::AgentStatus;

/// The plain Service (TCP 80 and UDP 53) and the ClientIP-affinity one (TCP 80).
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const AFF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// The two backends: the server pod's address and a second one on the same pod.
pub const BACKENDS: [Ipv4Addr; 2] = [lb_testing::netns::SERVER_IP, Ipv4Addr::new(10, 244, 2, 11)];
pub const TCP_TARGET: u16 = 8080;
pub const UDP_TARGET: u16 = 5353;
/// The agent's /metrics inside the node namespace (a loopback of its own).
pub const METRICS_ADDR: &str = "127.0.0.1:9464";
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);

pub fn lb() -> &'static str {
    env!("CARGO_BIN_EXE_lb")
}

/// The two Services, each on both backends, as the file source reads them.
pub fn services_yaml() -> String {
    let eps: String =
        BACKENDS.iter().map(|a| format!("- addresses: [\"{a}\"]\n  conditions: {{ready: true}}\n")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: plain, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  \
         ports: [{{name: http, port: 80, protocol: TCP}}, {{name: dns, port: 53, protocol: UDP}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: plain-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: plain}}\naddressType: IPv4\n\
         ports: [{{name: http, port: {TCP_TARGET}, protocol: TCP}}, {{name: dns, port: {UDP_TARGET}, protocol: UDP}}]\n\
         endpoints:\n{eps}---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: sticky, namespace: default}}\nspec:\n  clusterIP: {AFF_VIP}\n  \
         sessionAffinity: ClientIP\n  ports: [{{name: http, port: 80, protocol: TCP}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: sticky-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: sticky}}\naddressType: IPv4\n\
         ports: [{{name: http, port: {TCP_TARGET}, protocol: TCP}}]\nendpoints:\n{eps}"
    )
}

/// A topology whose server pod holds both [`BACKENDS`].
pub fn topology() -> Result<Topology> {
    lb_testing::netns::remove_stale()?;
    let topo = Topology::new()?;
    topo.server.ip(&["addr", "add", &format!("{}/24", BACKENDS[1]), "dev", lb_testing::netns::POD_IF])?;
    Ok(topo)
}

/// `lb agent` in the node namespace with its own bpffs, status file and log, the
/// Services of [`services_yaml`], and `args` after the common flags.
pub struct Agent {
    pub process: AgentProcess,
    pub bpffs: PrivateBpffs,
    pub status_file: PathBuf,
    pub log: PathBuf,
    pub dir: Scratch,
    args: Vec<String>,
}

impl Agent {
    pub fn start(topo: &Topology, tag: &str, args: &[&str]) -> Result<Self> {
        Self::start_with(topo, tag, args, &services_yaml())
    }

    /// [`Agent::start`] with `objects` in its objects file.
    pub fn start_with(topo: &Topology, tag: &str, args: &[&str], objects: &str) -> Result<Self> {
        let dir = Scratch::new(tag)?;
        let bpffs = PrivateBpffs::new()?;
        std::fs::write(dir.0.join("objects.yaml"), objects)?;
        let status_file = dir.0.join("status.json");
        let log = dir.0.join("agent.log");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let process = Self::spawn(topo, &dir.0, bpffs.path(), &args)?;
        Ok(Self { process, bpffs, status_file, log, dir, args })
    }

    fn spawn(topo: &Topology, dir: &Path, bpffs: &Path, args: &[String]) -> Result<AgentProcess> {
        let (status_file, log) = (dir.join("status.json"), dir.join("agent.log"));
        let mut c: Command = topo.node.command(lb());
        c.args(["agent", "--file-poll", "20ms", "--metrics-addr", METRICS_ADDR])
            .args(args)
            .arg("--source")
            .arg(format!("file:{}", dir.join("objects.yaml").display()))
            .env("LB_BPFFS", bpffs)
            .env("LB_STATUS_FILE", &status_file)
            .env("LB_LOG", "info");
        AgentProcess::spawn(c, &log, &status_file)
    }

    /// SIGKILL, then `before_start` (with no agent running), then a new agent on the
    /// same bpffs, which finds the pinned maps and links.
    pub fn restart(&mut self, topo: &Topology, before_start: impl FnOnce() -> Result<()>) -> Result<()> {
        self.process.kill9();
        let _ = std::fs::remove_file(&self.status_file);
        before_start()?;
        self.process = Self::spawn(topo, &self.dir.0, self.bpffs.path(), &self.args)?;
        Ok(())
    }

    pub fn status(&self) -> Option<AgentStatus> {
        read_status(&self.status_file)
    }

    /// Replaces the objects file at once (a rename), so that the agent never reads
    /// half of it.
    pub fn write_objects(&self, objects: &str) -> Result<()> {
        let tmp = self.dir.path("objects.yaml.new");
        std::fs::write(&tmp, objects)?;
        std::fs::rename(&tmp, self.dir.path("objects.yaml"))?;
        Ok(())
    }

    /// Waits until the agent is ready with `attached` attachments and both Services'
    /// three frontends programmed.
    pub fn wait_ready(&self, attached: usize, timeout: Duration) -> Result<AgentStatus> {
        self.process.wait_status(&format!("ready with {attached} attachments"), timeout, |s| {
            s.ready && s.attach.len() == attached && s.frontends == 3
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn links_dir(&self) -> PathBuf {
        self.bpffs.path().join(lb_userspace::agent::attach::LINKS_DIR)
    }

    /// Pin names under the links directory, sorted.
    pub fn pins(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.links_dir())
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// The agent's /metrics page, fetched inside the node namespace.
pub fn metrics(node: &Netns) -> Result<String> {
    node.run(|| {
        let addr: SocketAddr = METRICS_ADDR.parse()?;
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).context("connect /metrics")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: lb\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })
}

/// GET `path` of the agent's HTTP server inside the node namespace; the status line's
/// code.
pub fn http_status(path: &str) -> Result<u16> {
    let addr: SocketAddr = METRICS_ADDR.parse()?;
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).context("connect")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: lb\r\n\r\n").as_bytes())?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let code = body.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    code.with_context(|| format!("no status line in {body:?}"))
}

/// The sum of the series `name` whose labels include all of `labels`
/// (`reason="ct_midflow_miss"`); None when there is none.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (n, l) = series.split_once('{').map_or((series, ""), |(n, l)| (n, l.trim_end_matches('}')));
        if n == name && labels.iter().all(|want| l.split(',').any(|have| have == *want)) {
            *sum.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// A datapath counter (`lb_datapath_packets{reason=...}`) from the metrics page.
pub fn datapath_packets(text: &str, reason: &str) -> Result<u64> {
    metric_value(text, "lb_datapath_packets_total", &[&format!("reason=\"{reason}\"")])
        .map(|v| v as u64)
        .with_context(|| format!("no lb_datapath_packets_total{{reason=\"{reason}\"}} in /metrics"))
}

/// Echo backends in the server namespace: TCP on 0.0.0.0:[`TCP_TARGET`] (a thread per
/// connection, small stacks: the map tests hold hundreds open) and UDP on each
/// backend address's [`UDP_TARGET`] (bound per address, so that a reply leaves from the
/// address the datagram was NATed to). Stopped on drop.
pub struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub accepted: Arc<AtomicU64>,
}

impl Echo {
    pub fn start(server: &Netns) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let listener = server.run(|| {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, TCP_TARGET)).context("bind TCP")?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let mut threads = Vec::new();
        {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            let stop = stop.clone();
                            let _ = std::thread::Builder::new().stack_size(64 << 10).spawn(move || echo_conn(s, &stop));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
        }
        for addr in BACKENDS {
            let sock = server.run(|| UdpSocket::bind((addr, UDP_TARGET)).context("bind UDP"))?;
            sock.set_read_timeout(Some(Duration::from_millis(200)))?;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], peer);
                    }
                }
            }));
        }
        Ok(Self { stop, threads, accepted })
    }
}

fn echo_conn(mut s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP connection from `src` (any local address of the calling thread's namespace;
/// port 0) to `dst`, its connect bounded by `timeout` (SO_SNDTIMEO bounds connect(2)).
pub fn connect_from(src: Ipv4Addr, dst: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt};
    let SocketAddr::V4(dst) = dst else { bail!("IPv4 only") };
    let fd: OwnedFd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros().into());
    setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0))).with_context(|| format!("bind {src}"))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst)).with_context(|| format!("connect {src} -> {dst}"))?;
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// One message on `s` and its echo.
pub fn echo(s: &mut TcpStream, msg: &[u8]) -> Result<()> {
    s.write_all(msg).context("write")?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).context("read the echo")?;
    ensure!(back == msg, "echo differs");
    Ok(())
}

/// One datagram from `sock` to `dst` and its echo, which must come from `dst`.
pub fn udp_echo(sock: &UdpSocket, dst: SocketAddr, msg: &[u8]) -> Result<()> {
    sock.send_to(msg, dst).context("send")?;
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).context("no echo")?;
    ensure!(from == dst, "echo from {from}, not from {dst}");
    ensure!(&buf[..n] == msg, "echo differs");
    Ok(())
}

/// The kernel objects of one agent's datapath: the programs that use any of its
/// pinned maps (whatever process holds them), and the BPF links running those programs. Read
/// from the kernel's lists (`BPF_PROG_GET_NEXT_ID`, `BPF_LINK_GET_NEXT_ID`): other
/// tests' datapaths, running concurrently, use other maps and are not counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelObjects {
    pub programs: BTreeSet<u32>,
    pub links: BTreeSet<u32>,
}

impl KernelObjects {
    pub fn of(bpffs: &Path) -> Result<Self> {
        let mut maps = BTreeSet::new();
        for name in map_names::ALL {
            let m = aya::maps::MapData::from_pin(bpffs.join(name)).with_context(|| format!("the pinned map {name}"))?;
            maps.insert(m.info().with_context(|| format!("{name} info"))?.id());
        }
        let mut programs = BTreeSet::new();
        // A program can be unloaded between the id walk and its info: skip it.
        for p in aya::programs::loaded_programs().flatten() {
            if p.map_ids().ok().flatten().is_some_and(|ids| ids.iter().any(|id| maps.contains(id))) {
                programs.insert(p.id());
            }
        }
        let mut links = BTreeSet::new();
        for l in aya::programs::loaded_links().flatten() {
            if programs.contains(&l.program_id()) {
                links.insert(l.id());
            }
        }
        Ok(Self { programs, links })
    }
}

/// The process's open file descriptors.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|rd| rd.count()).unwrap_or(0)
}

/// The process's CPU time (user + system), in clock ticks (`/proc/PID/stat`).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(14) + get(15)
}

/// Clock ticks per second, for [`cpu_ticks`].
pub fn ticks_per_s() -> u64 {
    // SAFETY: sysconf only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// An environment variable as a number, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
