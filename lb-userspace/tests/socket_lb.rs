//! Socket-level load balancing (`lb agent --socket-lb on --cgroup-root DIR`) with real
//! sockets and the real agent: the agent, run in the node namespace with the per-packet
//! datapath on the pod veths as usual, attaches its cgroup programs to a cgroup the test
//! made ([`TestCgroup`]); `lb-sockclient` processes join that cgroup (or not) and a
//! namespace (the client pod's, or the node's for a host-network process) before they
//! open a socket, and backends answer with their names ([`IdentityServer`]).
//!
//! What is checked: connect() (TCP, UDP) and unconnected sendto() to a ClusterIP reach
//! a backend on this node and one behind another node, from a pod and from the host;
//! getpeername() and recvfrom() show the ClusterIP; ClientIP affinity holds per
//! namespace, and without it connections spread; a Service without endpoints refuses
//! at connect()/sendto(); a connected UDP socket whose backend goes is aborted, and a
//! TCP one only once its backend is gone rather than draining; socket-translated
//! traffic is not translated again per packet, while a process outside the cgroup
//! still is; `--socket-lb off` attaches nothing and `lb cleanup` detaches the programs.
//!
//! Needs root; everything lives in namespaces and a cgroup the test creates, removed on
//! the way out (also on panic).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};
use lb_testing::{
    Scratch,
    agent::{AgentProcess, read_status},
    cgroup::{self, SockAttach, TestCgroup},
    netns::{self, Netns, SERVER_IP, Topology, ip},
    sock::{Facts, HoldClient, IdentityServer, Place, client, client_once},
};

/// The Services' ClusterIPs; each has TCP 80 and UDP 53, both to target port 8080.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const VIP_SPREAD: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const TARGET_PORT: u16 = 8080;

/// More backends in the server pod namespace, besides `SERVER_IP`.
const SERVER_IP_2: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
const SERVER_IP_3: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 12);

/// The second node: reached from the node over `NODE_PEER_IF`, routing to its own pod
/// subnet 10.244.3.0/24.
const NODE_PEER_IF: &str = "to-node2";
const NODE_LINK_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const PEER_LINK_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const REMOTE_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 1);
const REMOTE_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 10);

/// The agent's /metrics, inside the node namespace (each test has its own).
const METRICS_ADDR: &str = "127.0.0.1:9464";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(15);

fn lb() -> &'static str {
    env!("CARGO_BIN_EXE_lb")
}

fn tcp(vip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((vip, TCP_PORT))
}

fn udp(vip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((vip, UDP_PORT))
}

/// A Service as the file source gets it: `ready` endpoints, `terminating` ones (still
/// serving: draining), ClientIP affinity with this timeout.
struct Svc {
    name: &'static str,
    vip: Ipv4Addr,
    affinity_s: Option<u32>,
    ready: Vec<Ipv4Addr>,
    terminating: Vec<Ipv4Addr>,
}

impl Svc {
    fn new(name: &'static str, vip: Ipv4Addr, ready: &[Ipv4Addr]) -> Self {
        Self { name, vip, affinity_s: None, ready: ready.to_vec(), terminating: Vec::new() }
    }
}

/// v1 Services and EndpointSlices, multi-document, for `--source file:`.
fn yaml(svcs: &[Svc]) -> String {
    let mut out = String::new();
    for s in svcs {
        let aff = s.affinity_s.map_or(String::new(), |t| {
            format!("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}\n")
        });
        let mut eps: String = s
            .ready
            .iter()
            .map(|a| format!("- addresses: [{a}]\n  conditions: {{ready: true, serving: true, terminating: false}}\n"))
            .collect();
        eps.extend(s.terminating.iter().map(|a| {
            format!("- addresses: [{a}]\n  conditions: {{ready: false, serving: true, terminating: true}}\n")
        }));
        let eps = if eps.is_empty() { "endpoints: []\n".to_string() } else { format!("endpoints:\n{eps}") };
        out.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
             clusterIP: {vip}\n{aff}  ports:\n  \
             - {{name: http, port: {TCP_PORT}, protocol: TCP, targetPort: {TARGET_PORT}}}\n  \
             - {{name: dns, port: {UDP_PORT}, protocol: UDP, targetPort: {TARGET_PORT}}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  \
             namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n\
             ports: [{{name: http, port: {TARGET_PORT}, protocol: TCP}}, {{name: dns, port: {TARGET_PORT}, protocol: UDP}}]\n\
             {eps}---\n",
            name = s.name,
            vip = s.vip,
        ));
    }
    out
}

/// What `lb services` should show for `svcs`: frontend -> sorted ready backends.
fn expected(svcs: &[Svc]) -> Vec<(String, Vec<String>)> {
    let mut v: Vec<(String, Vec<String>)> = svcs
        .iter()
        .flat_map(|s| {
            let mut b: Vec<String> = s.ready.iter().map(|a| format!("{a}:{TARGET_PORT}")).collect();
            b.sort();
            [(format!("{}:{TCP_PORT}/TCP", s.vip), b.clone()), (format!("{}:{UDP_PORT}/UDP", s.vip), b)]
        })
        .collect();
    v.sort();
    v
}

/// Writes `text` to `path` atomically, as a config manager would.
fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A second node behind the first: a node namespace joined to the Topology's node by a
/// routed veth, and a pod namespace on it. Built only inside namespaces; deleted on
/// drop (the veths go with their namespaces).
struct RemoteNode {
    pod: Netns,
    _node: Netns,
}

impl RemoteNode {
    fn new(topo: &Topology) -> Result<Self> {
        // `lbt-<pid>-<n>-node2[-pod]`: `netns::remove_stale` knows the prefix.
        let node = Netns::create(format!("{}2", topo.node.name()))?;
        let pod = Netns::create(format!("{}2-pod", topo.node.name()))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        for conf in ["all", "default"] {
            node.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
        }
        let veth = |a_if: &str, a: &Netns, b_if: &str, b: &Netns| {
            ip(&["link", "add", a_if, "netns", a.name(), "type", "veth", "peer", "name", b_if, "netns", b.name()])
        };
        veth(NODE_PEER_IF, &topo.node, "to-node1", &node)?;
        topo.node.ip(&["addr", "add", &format!("{NODE_LINK_IP}/24"), "dev", NODE_PEER_IF])?;
        topo.node.ip(&["link", "set", NODE_PEER_IF, "up"])?;
        topo.node.ip(&["route", "add", "10.244.3.0/24", "via", &PEER_LINK_IP.to_string()])?;
        node.ip(&["addr", "add", &format!("{PEER_LINK_IP}/24"), "dev", "to-node1"])?;
        node.ip(&["link", "set", "to-node1", "up"])?;
        // Back to the first node's pods (and, from its own link, the first node).
        for subnet in ["10.244.1.0/24", "10.244.2.0/24"] {
            node.ip(&["route", "add", subnet, "via", &NODE_LINK_IP.to_string()])?;
        }
        veth("to-pod", &node, netns::POD_IF, &pod)?;
        node.ip(&["addr", "add", &format!("{REMOTE_GW}/24"), "dev", "to-pod"])?;
        node.ip(&["link", "set", "to-pod", "up"])?;
        pod.ip(&["addr", "add", &format!("{REMOTE_POD_IP}/24"), "dev", netns::POD_IF])?;
        pod.ip(&["link", "set", netns::POD_IF, "up"])?;
        pod.ip(&["route", "add", "default", "via", &REMOTE_GW.to_string()])?;
        Ok(Self { pod, _node: node })
    }
}

/// The agent on a fresh topology, with backends and a test cgroup. Fields drop in
/// order: the agent first, then the servers, the cgroup (killing any client left in
/// it), the namespaces, the files.
struct Fixture {
    agent: AgentProcess,
    _servers: Vec<IdentityServer>,
    cgroup: TestCgroup,
    remote: Option<RemoteNode>,
    topo: Topology,
    bpffs: lb_testing::PrivateBpffs,
    file: PathBuf,
    status_file: PathBuf,
    dir: Scratch,
}

/// `--socket-lb on|off`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SocketLb {
    On,
    Off,
}

impl Fixture {
    /// Backends answer on every address in `backends` (`REMOTE_POD_IP` on the second
    /// node, the rest in the server pod); the agent is ready and has `svcs` programmed.
    fn new(tag: &str, socket_lb: SocketLb, backends: &[Ipv4Addr], svcs: &[Svc]) -> Self {
        Self::try_new(tag, socket_lb, backends, svcs, None).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Fixture::new`], with the agent's capabilities limited to `caps` (setpriv's
    /// names: `bpf`, `net_admin`) when given; an error when the agent does not get
    /// ready.
    fn try_new(
        tag: &str,
        socket_lb: SocketLb,
        backends: &[Ipv4Addr],
        svcs: &[Svc],
        caps: Option<&[&str]>,
    ) -> Result<Self> {
        netns::remove_stale().unwrap();
        cgroup::remove_stale().unwrap();
        let topo = Topology::new().unwrap();
        let remote = backends.contains(&REMOTE_POD_IP).then(|| RemoteNode::new(&topo).unwrap());
        for extra in [SERVER_IP_2, SERVER_IP_3] {
            topo.server.ip(&["addr", "add", &format!("{extra}/24"), "dev", netns::POD_IF]).unwrap();
        }
        let _servers = backends
            .iter()
            .map(|&b| {
                let ns = if b == REMOTE_POD_IP { &remote.as_ref().expect("remote node").pod } else { &topo.server };
                IdentityServer::start(ns, SocketAddrV4::new(b, TARGET_PORT), &b.to_string()).unwrap()
            })
            .collect();
        let cgroup = TestCgroup::new().unwrap();
        let bpffs = lb_testing::PrivateBpffs::new().unwrap();
        let dir = Scratch::new(tag)?;
        let file = dir.0.join("objects.yaml");
        let status_file = dir.0.join("status.json");
        write_file(&file, &yaml(svcs));
        let agent = Self::spawn_agent(&topo, &bpffs, &cgroup, &file, &status_file, &dir, socket_lb, caps);
        let f = Self { agent, _servers, cgroup, remote, topo, bpffs, file, status_file, dir };
        let want = expected(svcs);
        f.agent.wait_for("the Services programmed", START_TIMEOUT, || {
            let mut got = f.agent_programmed();
            got.sort();
            (got == want).then_some(())
        })?;
        f.agent.wait_for("the agent ready (socket-LB attached)", START_TIMEOUT, || {
            read_status(&f.status_file).filter(|s| s.ready).map(drop)
        })?;
        Ok(f)
    }

    #[expect(clippy::too_many_arguments, reason = "the fixture's parts, each used once")]
    fn spawn_agent(
        topo: &Topology,
        bpffs: &lb_testing::PrivateBpffs,
        cgroup: &TestCgroup,
        file: &Path,
        status_file: &Path,
        dir: &Scratch,
        socket_lb: SocketLb,
        caps: Option<&[&str]>,
    ) -> AgentProcess {
        // Not `ip netns exec`, whose own /sys hides the cgroup2 mount below it.
        let mut c = match caps {
            None => topo.node.command_net_only(lb()),
            // A root process's capabilities after execve are its bounding set
            // (capabilities(7), "Transformation of capabilities during execve()"), so
            // the agent runs with exactly `caps`, as under the DaemonSet's
            // `capabilities: {drop: [ALL], add: [...]}`.
            Some(caps) => {
                let mut c = topo.node.command_net_only("setpriv");
                let set: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
                c.arg(format!("--bounding-set=-all,{}", set.join(","))).arg("--").arg(lb());
                c
            }
        };
        c.args(["agent", "--iface-glob", "to-*", "--iface-rescan", "200ms", "--file-poll", "20ms"])
            .args(["--metrics-addr", METRICS_ADDR])
            .args(["--socket-lb", if socket_lb == SocketLb::On { "on" } else { "off" }])
            // Only ever the cgroup this test made, never a hierarchy's root.
            .arg("--cgroup-root")
            .arg(cgroup.path())
            .arg("--source")
            .arg(format!("file:{}", file.display()))
            .env("LB_BPFFS", bpffs.path())
            .env("LB_STATUS_FILE", status_file);
        AgentProcess::spawn(c, &dir.0.join("agent.log"), status_file).unwrap()
    }

    fn wait_programmed(&self, svcs: &[Svc], timeout: Duration) {
        let want = expected(svcs);
        self.agent
            .wait_for("the Services programmed", timeout, || {
                let mut got = self.agent_programmed();
                got.sort();
                (got == want).then_some(())
            })
            .unwrap();
    }

    fn agent_programmed(&self) -> Vec<(String, Vec<String>)> {
        lb_testing::backend_sets(self.bpffs.path())
    }

    /// Rewrites the file source and waits for the maps to follow.
    fn update(&self, svcs: &[Svc]) {
        write_file(&self.file, &yaml(svcs));
        self.wait_programmed(svcs, CHANGE_TIMEOUT);
    }

    /// A client in the test cgroup, in the client pod.
    fn pod(&self) -> Place<'_> {
        Place { cgroup: Some(self.cgroup.path()), netns: Some(&self.topo.client) }
    }

    /// A host-network client in the test cgroup: in the node namespace.
    fn host(&self) -> Place<'_> {
        Place { cgroup: Some(self.cgroup.path()), netns: Some(&self.topo.node) }
    }

    /// A client in the client pod but outside the test cgroup.
    fn pod_outside(&self) -> Place<'_> {
        Place { cgroup: None, netns: Some(&self.topo.client) }
    }

    /// `lb <command> -o json` against this fixture's agent.
    fn lb_json(&self, command: &str) -> Vec<serde_json::Value> {
        let out = Command::new(lb())
            .args([command, "-o", "json"])
            .env("LB_BPFFS", self.bpffs.path())
            .env("LB_STATUS_FILE", &self.status_file)
            .output()
            .unwrap();
        assert!(out.status.success(), "lb {command}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `lb stats -o json`.
    fn stats(&self) -> Counters {
        let rows = self.lb_json("stats");
        Counters(
            rows.iter().map(|r| (r["reason"].as_str().unwrap().to_owned(), r["packets"].as_u64().unwrap())).collect(),
        )
    }

    /// The agent's /metrics page, fetched inside the node namespace.
    fn metrics(&self) -> String {
        self.topo
            .node
            .run(|| {
                let addr: SocketAddr = METRICS_ADDR.parse()?;
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).context("connect /metrics")?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"GET /metrics HTTP/1.0\r\nHost: lb\r\n\r\n")?;
                let mut body = String::new();
                s.read_to_string(&mut body)?;
                Ok(body)
            })
            .unwrap()
    }

    /// The sum of the series `name` whose labels include all of `labels`
    /// (`protocol="udp"`); None when there is none.
    fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        metric_value(&self.metrics(), name, labels)
    }

    fn log(&self) -> String {
        self.agent.log_text()
    }
}

/// Datapath counters by reason name, as `lb stats -o json` gives them.
#[derive(Debug)]
struct Counters(BTreeMap<String, u64>);

impl Counters {
    /// The packets of `reason`; a reason `lb stats` does not know is a failure.
    fn get(&self, reason: &str) -> u64 {
        *self.0.get(reason).unwrap_or_else(|| panic!("no counter {reason} in `lb stats -o json`: {self:?}"))
    }

    fn since(&self, before: &Counters, reason: &str) -> u64 {
        self.get(reason) - before.get(reason)
    }
}

/// The sum of the samples of `name` whose labels include each of `labels`, in
/// Prometheus text.
fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
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

/// The backends `facts` reached (their `reply`s).
fn replies(facts: &[Facts]) -> BTreeSet<String> {
    facts.iter().map(|f| f.must("reply").to_owned()).collect()
}

/// One TCP connect, one connected UDP exchange and three datagrams of an unconnected
/// UDP socket from `place` to `vip`, each reaching `backend` and showing the ClusterIP
/// as the peer and the replies' source.
fn check_paths(place: Place<'_>, vip: Ipv4Addr, backend: Ipv4Addr, what: &str) {
    let want = backend.to_string();
    let t = client_once(place, &["tcp", &tcp(vip).to_string()]).unwrap();
    assert_eq!(t.get("peer"), Some(tcp(vip).to_string().as_str()), "{what}: TCP getpeername: {t:?}");
    assert_eq!(t.get("reply"), Some(want.as_str()), "{what}: TCP backend: {t:?}");

    let u = client_once(place, &["udp-connect", &udp(vip).to_string()]).unwrap();
    assert_eq!(u.get("peer"), Some(udp(vip).to_string().as_str()), "{what}: UDP getpeername: {u:?}");
    assert_eq!(u.get("from"), Some(udp(vip).to_string().as_str()), "{what}: connected UDP recvfrom: {u:?}");
    assert_eq!(u.get("reply"), Some(want.as_str()), "{what}: connected UDP backend: {u:?}");

    let s = client(place, &["udp-sendto", &udp(vip).to_string(), "--count", "3"]).unwrap();
    assert_eq!(s.len(), 3, "{what}: {s:?}");
    for d in &s {
        assert_eq!(d.get("from"), Some(udp(vip).to_string().as_str()), "{what}: sendto's reply source: {d:?}");
        assert_eq!(d.get("reply"), Some(want.as_str()), "{what}: sendto backend: {d:?}");
    }
}

#[test]
fn tcp_and_udp_from_a_pod_and_the_host_reach_local_and_remote_backends() {
    let svcs = [Svc::new("web", VIP, &[SERVER_IP]), Svc::new("far", VIP_REMOTE, &[REMOTE_POD_IP])];
    let f = Fixture::new("paths", SocketLb::On, &[SERVER_IP, REMOTE_POD_IP], &svcs);
    assert!(f.remote.is_some());
    assert_eq!(f.cgroup.sock_programs().unwrap(), 4, "one program per socket hook on the test cgroup");
    let before = f.stats();
    for (place, who) in [(f.pod(), "pod"), (f.host(), "host")] {
        check_paths(place, VIP, SERVER_IP, &format!("{who} -> same node"));
        check_paths(place, VIP_REMOTE, REMOTE_POD_IP, &format!("{who} -> other node"));
    }
    // A connect to a pod address is not a frontend: passed unchanged.
    let direct = SocketAddr::from((SERVER_IP, TARGET_PORT));
    let r = client_once(f.pod(), &["tcp", &direct.to_string()]).unwrap();
    assert_eq!((r.get("peer"), r.get("reply")), (Some(direct.to_string().as_str()), Some("10.244.2.10")), "{r:?}");
    let after = f.stats();
    let grew = |r: &str| after.since(&before, r);
    assert!(grew("sock_pass") >= 1, "sock_pass +{}", grew("sock_pass"));
    // 2 places x 2 Services x (TCP + connected UDP) connects; 2 x 2 x 3 datagrams.
    assert!(grew("sock_connect") >= 8, "sock_connect +{}", grew("sock_connect"));
    assert!(grew("sock_sendmsg") >= 12, "sock_sendmsg +{}", grew("sock_sendmsg"));
    assert!(grew("sock_rev_nat") >= 8, "sock_rev_nat +{}", grew("sock_rev_nat"));
    // Translated at connect(): the per-packet path saw backend addresses only.
    assert_eq!(grew("fwd_new"), 0, "the per-packet path translated socket-LB traffic again");
    let m = f.metric("lb_datapath_packets_total", &[r#"reason="sock_connect""#]);
    assert!(m.is_some_and(|v| v >= 8.0), "lb_datapath_packets_total{{reason=sock_connect}} = {m:?}");
}

#[test]
fn client_ip_affinity_holds_per_netns_and_connections_spread_without_it() {
    let three = [SERVER_IP, SERVER_IP_2, SERVER_IP_3];
    let mut sticky = Svc::new("sticky", VIP, &three);
    sticky.affinity_s = Some(300);
    let svcs = [sticky, Svc::new("spread", VIP_SPREAD, &three)];
    let f = Fixture::new("affinity", SocketLb::On, &three, &svcs);

    // Without affinity, 30 connects over 3 backends all landing on one is 3/3^30.
    for (mode, addr) in [("tcp", tcp(VIP_SPREAD)), ("udp-connect", udp(VIP_SPREAD))] {
        let r = replies(&client(f.pod(), &[mode, &addr.to_string(), "--repeat", "30"]).unwrap());
        assert!(r.len() >= 2, "{mode}: 30 connects without affinity all went to {r:?}");
    }
    // With it, every socket of one namespace reaches one backend: two processes, many
    // sockets each.
    for (place, who) in [(f.pod(), "pod"), (f.host(), "host")] {
        for (mode, addr) in [("tcp", tcp(VIP)), ("udp-connect", udp(VIP))] {
            let mut r = replies(&client(place, &[mode, &addr.to_string(), "--repeat", "10"]).unwrap());
            r.extend(replies(&client(place, &[mode, &addr.to_string(), "--repeat", "10"]).unwrap()));
            assert_eq!(r.len(), 1, "{who} {mode}: ClientIP affinity should keep one backend, got {r:?}");
        }
    }
    // `lb affinity` shows the socket LB's clients as namespaces: the pod's and the host's,
    // one entry each for the sticky frontends (TCP and UDP have their own service ids).
    let rows = f.lb_json("affinity");
    let clients: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r["client"].as_str().unwrap()).filter(|c| c.starts_with("netns:")).collect();
    assert_eq!(clients.len(), 2, "the pod's and the host's namespace: {rows:?}");
    assert_eq!(rows.iter().filter(|r| r["client"].as_str().unwrap().starts_with("netns:")).count(), 4, "{rows:?}");
}

#[test]
fn a_service_without_endpoints_refuses_at_connect_and_sendto() {
    let svcs = [Svc::new("web", VIP, &[SERVER_IP]), Svc::new("empty", VIP_EMPTY, &[])];
    let f = Fixture::new("refuse", SocketLb::On, &[SERVER_IP], &svcs);
    let before = f.stats();
    for (place, who) in [(f.pod(), "pod"), (f.host(), "host")] {
        for proto in ["tcp", "udp"] {
            let addr = if proto == "tcp" { tcp(VIP_EMPTY) } else { udp(VIP_EMPTY) };
            let r = client_once(place, &["connect-errno", &addr.to_string(), proto]).unwrap();
            assert_eq!(r.get("connect"), Some("ECONNREFUSED"), "{who} {proto} connect: {r:?}");
        }
        let r = client_once(place, &["udp-sendto", &udp(VIP_EMPTY).to_string()]).unwrap();
        assert_eq!((r.get("op"), r.get("err")), (Some("sendto"), Some("ECONNREFUSED")), "{who} sendto: {r:?}");
    }
    let after = f.stats();
    let grew = |r: &str| after.since(&before, r);
    assert!(grew("sock_refused") >= 6, "sock_refused +{}", grew("sock_refused"));
    // Refused before any packet: the per-packet reject never saw one.
    assert_eq!(grew("no_backend_reject") + grew("fwd_new"), 0, "{after:?}");
    // The Service with endpoints still works from the same cgroup.
    check_paths(f.pod(), VIP, SERVER_IP, "pod -> web");
}

/// kube-proxy flushes the UDP conntrack entries of a backend that goes; the socket
/// equivalent is to destroy the connected sockets translated to it: the app sees
/// ECONNABORTED and opens a new socket, which reaches a live backend.
#[test]
fn a_backend_removed_under_a_connected_udp_socket_aborts_it() {
    let three = [SERVER_IP, SERVER_IP_2, SERVER_IP_3];
    let f = Fixture::new("udp-abort", SocketLb::On, &three, &[Svc::new("web", VIP, &three)]);
    let destroyed = |f: &Fixture| f.metric("lb_socket_lb_destroyed_total", &[r#"protocol="udp""#]);
    let before = destroyed(&f).unwrap_or_else(|| panic!("no lb_socket_lb_destroyed_total{{protocol=udp}}"));

    let mut holds = Vec::new();
    for (place, who) in [(f.pod(), "pod"), (f.host(), "host")] {
        let mut h = HoldClient::start(place, "udp-hold", udp(VIP)).unwrap();
        assert_eq!(h.connected.get("peer"), Some(udp(VIP).to_string().as_str()), "{who}: {:?}", h.connected);
        let r = h.cmd("send").unwrap();
        let backend = r.must("reply").to_owned();
        assert_eq!(r.get("from"), Some(udp(VIP).to_string().as_str()), "{who}: {r:?}");
        holds.push((h, who, backend));
    }
    // Remove the backends the sockets use (one or two of three): one stays.
    let used: BTreeSet<String> = holds.iter().map(|(_, _, b)| b.clone()).collect();
    let left: Vec<Ipv4Addr> = three.iter().copied().filter(|b| !used.contains(&b.to_string())).collect();
    f.update(&[Svc::new("web", VIP, &left)]);
    // Waited for, not asserted yet: should some socket not be destroyed, the checks
    // below say which.
    let _ = f.agent.wait_for("lb_socket_lb_destroyed_total{protocol=udp} +2", CHANGE_TIMEOUT, || {
        destroyed(&f).is_some_and(|v| v >= before + holds.len() as f64).then_some(())
    });
    // Every socket is tried before anything is asserted: the failure names each one.
    let missed: Vec<String> = holds
        .iter_mut()
        .filter_map(|(h, who, backend)| {
            let r = h.cmd("send").unwrap();
            (!r.any_is(&["send_err", "recv_err"], "ECONNABORTED"))
                .then(|| format!("{who} (to removed backend {backend}): {r:?}"))
        })
        .collect();
    assert!(missed.is_empty(), "sockets not aborted:\n{}\nagent log:\n{}", missed.join("\n"), f.log());
    let after = destroyed(&f).unwrap();
    assert!(after >= before + holds.len() as f64, "lb_socket_lb_destroyed_total{{protocol=udp}}: {before} -> {after}");
    // New sockets reach a backend that is still there.
    let live: BTreeSet<String> = left.iter().map(Ipv4Addr::to_string).collect();
    for (place, who) in [(f.pod(), "pod"), (f.host(), "host")] {
        let r = client_once(place, &["udp-connect", &udp(VIP).to_string()]).unwrap();
        assert!(live.contains(r.must("reply")), "{who}: a new socket reached {r:?}, not one of {live:?}");
    }
}

/// A TCP connection to a backend that is only terminating (still serving) goes on; once
/// the backend is gone from the slice altogether, it is destroyed.
#[test]
fn tcp_to_a_draining_backend_goes_on_and_to_a_gone_one_is_aborted() {
    let two = [SERVER_IP, SERVER_IP_2];
    let f = Fixture::new("tcp-abort", SocketLb::On, &two, &[Svc::new("web", VIP, &two)]);
    let destroyed = |f: &Fixture| f.metric("lb_socket_lb_destroyed_total", &[r#"protocol="tcp""#]);
    let before = destroyed(&f).unwrap_or_else(|| panic!("no lb_socket_lb_destroyed_total{{protocol=tcp}}"));

    // A connection from the pod, to X, and one from the host to the same X (the first
    // of some tries: two backends, no affinity).
    let pod = HoldClient::start(f.pod(), "tcp-hold", tcp(VIP)).unwrap();
    assert_eq!(pod.connected.get("peer"), Some(tcp(VIP).to_string().as_str()), "{:?}", pod.connected);
    let x = pod.connected.must("reply").to_owned();
    let host = (0..40)
        .map(|_| HoldClient::start(f.host(), "tcp-hold", tcp(VIP)).unwrap())
        .find(|h| h.connected.get("reply") == Some(x.as_str()))
        .unwrap_or_else(|| panic!("40 host connections and none to {x}"));
    let mut holds = [(pod, "pod"), (host, "host")];
    let other: Ipv4Addr = two.iter().copied().find(|b| b.to_string() != x).unwrap();
    let x_ip: Ipv4Addr = x.parse().unwrap();

    // X terminates: it drains; the connections keep going, new ones go to the other.
    let mut draining = Svc::new("web", VIP, &[other]);
    draining.terminating = vec![x_ip];
    f.update(&[draining]);
    for (h, who) in &mut holds {
        let r = h.cmd("send").unwrap();
        assert_eq!(r.get("reply"), Some(x.as_str()), "{who}: the connection to draining backend {x} was cut: {r:?}");
    }
    let r = replies(&client(f.pod(), &["tcp", &tcp(VIP).to_string(), "--repeat", "5"]).unwrap());
    assert_eq!(r, BTreeSet::from([other.to_string()]), "new connections must avoid the draining backend");

    // X is gone: its connections are destroyed.
    f.update(&[Svc::new("web", VIP, &[other])]);
    let _ = f.agent.wait_for("lb_socket_lb_destroyed_total{protocol=tcp} +2", CHANGE_TIMEOUT, || {
        destroyed(&f).is_some_and(|v| v >= before + 2.0).then_some(())
    });
    let missed: Vec<String> = holds
        .iter_mut()
        .filter_map(|(h, who)| {
            let r = h.cmd("send").unwrap();
            (!r.any_is(&["send_err", "recv_err"], "ECONNABORTED")).then(|| format!("{who}: {r:?}"))
        })
        .collect();
    assert!(
        missed.is_empty(),
        "connections to gone backend {x} not aborted:\n{}\nagent log:\n{}",
        missed.join("\n"),
        f.log()
    );
    let after = destroyed(&f).unwrap();
    assert!(after >= before + 2.0, "lb_socket_lb_destroyed_total{{protocol=tcp}}: {before} -> {after}");
}

/// Traffic translated at connect() goes to a pod address, which the per-packet path
/// passes on untouched; a process of the same pod that is not in the cgroup still gets
/// the per-packet translation.
#[test]
fn socket_translated_traffic_skips_the_per_packet_path_which_serves_the_rest() {
    let f = Fixture::new("per-packet", SocketLb::On, &[SERVER_IP], &[Svc::new("web", VIP, &[SERVER_IP])]);
    let before = f.stats();
    for mode in ["tcp", "udp-connect"] {
        let addr = if mode == "tcp" { tcp(VIP) } else { udp(VIP) };
        let r = replies(&client(f.pod(), &[mode, &addr.to_string(), "--repeat", "5"]).unwrap());
        assert_eq!(r, BTreeSet::from([SERVER_IP.to_string()]), "{mode}");
    }
    let mid = f.stats();
    assert_eq!(mid.get("fwd_new"), before.get("fwd_new"), "socket-LB flows were translated again per packet: {mid:?}");
    assert!(mid.get("sock_connect") >= before.get("sock_connect") + 10, "{mid:?}");

    // Outside the cgroup: connect() is not translated, the tc hook on the pod veth is.
    for mode in ["tcp", "udp-connect"] {
        let addr = if mode == "tcp" { tcp(VIP) } else { udp(VIP) };
        let r = client_once(f.pod_outside(), &[mode, &addr.to_string()]).unwrap();
        assert_eq!(r.get("reply"), Some(SERVER_IP.to_string().as_str()), "outside the cgroup, {mode}: {r:?}");
        assert_eq!(r.get("peer"), Some(addr.to_string().as_str()), "{r:?}");
    }
    let after = f.stats();
    assert!(
        after.get("fwd_new") >= mid.get("fwd_new") + 2,
        "the per-packet path did not serve the outside client: {after:?}"
    );
    assert_eq!(after.get("sock_connect"), mid.get("sock_connect"), "a socket outside the cgroup was translated");
}

/// The harness itself, on any kernel: a test cgroup takes a process, and dropping it
/// kills the process and removes the directory.
#[test]
fn a_test_cgroup_is_removed_with_what_runs_in_it() {
    let cg = TestCgroup::new().unwrap();
    let path = cg.path().to_owned();
    assert_ne!(path, cgroup::cgroup2_mount().unwrap(), "never the hierarchy's root");
    let mut sleeper = Command::new("sleep").arg("600").spawn().unwrap();
    cg.add(sleeper.id()).unwrap();
    assert_eq!(cg.procs(), vec![sleeper.id()]);
    assert_eq!(cg.sock_programs().unwrap(), 0);
    drop(cg);
    assert!(!path.exists(), "{} left behind", path.display());
    let st = sleeper.wait().unwrap();
    assert!(!st.success(), "the process in the cgroup should have been killed: {st}");
}

/// `lb cleanup` with `LB_BPFFS`; fails the test if it fails.
fn cleanup(f: &Fixture) {
    let out = f.topo.node.command_net_only(lb()).args(["cleanup"]).env("LB_BPFFS", f.bpffs.path()).output().unwrap();
    assert!(out.status.success(), "lb cleanup: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn socket_lb_off_attaches_nothing_and_cleanup_detaches_the_programs() {
    let svcs = [Svc::new("web", VIP, &[SERVER_IP])];
    let mut f = Fixture::new("off", SocketLb::Off, &[SERVER_IP], &svcs);
    for a in SockAttach::ALL {
        assert_eq!(f.cgroup.attached(a).unwrap(), Vec::<u32>::new(), "--socket-lb off attached {a:?}");
    }
    // The cgroup's connects are served per packet.
    let before = f.stats();
    let r = client_once(f.pod(), &["tcp", &tcp(VIP).to_string()]).unwrap();
    assert_eq!(r.get("reply"), Some(SERVER_IP.to_string().as_str()), "{r:?}");
    let after = f.stats();
    assert!(after.get("fwd_new") > before.get("fwd_new"), "{after:?}");
    assert_eq!(after.since(&before, "sock_connect"), 0, "{after:?}");
    f.agent.term().unwrap();
    cleanup(&f);

    // On: one program on each hook, until `lb cleanup` removes the pinned links.
    let _ = std::fs::remove_file(&f.status_file);
    f.agent = Fixture::spawn_agent(&f.topo, &f.bpffs, &f.cgroup, &f.file, &f.status_file, &f.dir, SocketLb::On, None);
    f.wait_programmed(&svcs, START_TIMEOUT);
    f.agent
        .wait_for("ready with socket-LB", START_TIMEOUT, || read_status(&f.status_file).filter(|s| s.ready).map(drop))
        .unwrap();
    for a in SockAttach::ALL {
        assert_eq!(f.cgroup.attached(a).unwrap().len(), 1, "{a:?} on the test cgroup");
    }
    check_paths(f.host(), VIP, SERVER_IP, "host -> web");
    f.agent.term().unwrap();
    cleanup(&f);
    assert_eq!(f.cgroup.sock_programs().unwrap(), 0, "`lb cleanup` left socket programs on the cgroup");
}

/// The capabilities deploy/lb-agent.yaml adds (`capabilities: {drop: [ALL], add: ...}`),
/// in setpriv's spelling.
fn manifest_caps() -> Vec<String> {
    let manifest = include_str!("../../deploy/lb-agent.yaml");
    let line = manifest
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("add: ["))
        .unwrap_or_else(|| panic!("deploy/lb-agent.yaml has no `add: [...]` capabilities line"));
    line.trim_end_matches(']').split(',').map(|c| c.trim().to_ascii_lowercase()).collect()
}

/// How many processes' `/proc/<pid>/ns/net` this test, with all of root's capabilities,
/// cannot open: the floor under `lb_socket_lb_netns_refused_total` on this host.
fn unreadable_even_for_root() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter(|e| {
            std::fs::metadata(e.path().join("ns/net"))
                .is_err_and(|err| err.kind() == std::io::ErrorKind::PermissionDenied)
        })
        .count()
}

/// What the agent could do with one set of capabilities.
#[derive(Debug)]
struct CapOutcome {
    /// Why it did not get ready (the error's first line), if it did not.
    failed: Option<String>,
    /// Interfaces attached and failed attaches, from the status file.
    attached: usize,
    attach_failures: usize,
    /// TCP and UDP from the pod reach the backend through the ClusterIP.
    paths: bool,
    /// A connected UDP socket whose backend left was aborted.
    aborted: bool,
    /// `lb_socket_lb_netns_refused_total`.
    netns_refused: f64,
}

fn with_caps(caps: &[&str]) -> CapOutcome {
    let two = [SERVER_IP, SERVER_IP_2];
    let f = match Fixture::try_new("caps", SocketLb::On, &two, &[Svc::new("web", VIP, &two)], Some(caps)) {
        Ok(f) => f,
        Err(e) => {
            let text = format!("{e:#}");
            let why = text.lines().find(|l| l.contains("Error") || l.contains("error")).unwrap_or(&text).to_owned();
            return CapOutcome {
                failed: Some(why),
                attached: 0,
                attach_failures: 0,
                paths: false,
                aborted: false,
                netns_refused: 0.0,
            };
        }
    };
    let st = read_status(&f.status_file).unwrap();
    let paths = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let t = client_once(f.pod(), &["tcp", &tcp(VIP).to_string()]).unwrap();
        let u = client_once(f.pod(), &["udp-connect", &udp(VIP).to_string()]).unwrap();
        t.get("peer") == Some(tcp(VIP).to_string().as_str())
            && two.iter().any(|b| t.get("reply") == Some(b.to_string().as_str()))
            && two.iter().any(|b| u.get("reply") == Some(b.to_string().as_str()))
    }))
    .unwrap_or(false);
    // The UDP abort of `a_backend_removed_under_a_connected_udp_socket_aborts_it`.
    let mut h = HoldClient::start(f.pod(), "udp-hold", udp(VIP)).unwrap();
    let backend = h.cmd("send").unwrap().get("reply").map(str::to_owned);
    let left: Vec<Ipv4Addr> = two.iter().copied().filter(|b| Some(b.to_string()) != backend).collect();
    f.update(&[Svc::new("web", VIP, &left)]);
    let refused = |f: &Fixture| f.metric("lb_socket_lb_netns_refused_total", &[]).unwrap_or(0.0);
    // Either outcome settles within a sync: the socket aborted, or a namespace refused.
    let _ = f.agent.wait_for("the socket closer's run", CHANGE_TIMEOUT, || {
        let destroyed = f.metric("lb_socket_lb_destroyed_total", &[r#"protocol="udp""#]).unwrap_or(0.0);
        (destroyed > 0.0 || refused(&f) > 0.0).then_some(())
    });
    let r = h.cmd("send").unwrap();
    CapOutcome {
        failed: None,
        attached: st.attach.len(),
        attach_failures: st.attach_failures.len(),
        paths,
        aborted: r.any_is(&["send_err", "recv_err"], "ECONNABORTED"),
        netns_refused: refused(&f),
    }
}

/// Least privilege, measured: the agent given exactly the manifest's capabilities
/// (and not root's full set) does its whole job. CAP_SYS_ADMIN, which the kernel also
/// accepts in place of CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN for bpf(2)
/// (include/linux/capability.h, `bpf_capable`, `perfmon_capable`; kernel/bpf/syscall.c,
/// `bpf_net_capable`), is there only to enter pods' network namespaces: without it,
/// and without CAP_SYS_PTRACE, the datapath works on and only the closing of pods'
/// sockets to departed backends is lost, and counted. Of the datapath's three, each is
/// needed. This is the kernel's view (Linux 6.18); the sandbox's containerd and runc
/// add their own restrictions on top (docs/reliability.md).
#[test]
fn the_manifests_capabilities_suffice_and_each_is_needed() {
    let caps = manifest_caps();
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    assert_eq!(caps, ["bpf", "perfmon", "net_admin", "sys_admin", "sys_ptrace"], "deploy/lb-agent.yaml changed");
    let works = |o: &CapOutcome| o.failed.is_none() && o.paths && o.attach_failures == 0 && o.attached > 0;
    let all = with_caps(&caps);
    eprintln!("all of {caps:?}: {all:?}");
    // Some processes keep their namespaces even from full root (this machine's PID 1,
    // a container init with capabilities beyond our bounding set): those are the host's,
    // not a capability the manifest lacks.
    let host = unreadable_even_for_root() as f64;
    assert!(works(&all) && all.aborted && all.netns_refused == host, "{all:?}, {host} refused to full root");

    // Without either namespace capability: the datapath whole, the abort lost, counted.
    for without in ["sys_admin", "sys_ptrace"] {
        let some: Vec<&str> = caps.iter().copied().filter(|c| *c != without).collect();
        let o = with_caps(&some);
        eprintln!("without {without}: {o:?}");
        assert!(works(&o) && !o.aborted && o.netns_refused > host, "without CAP_{}: {o:?}", without.to_uppercase());
    }
    let datapath = ["bpf", "perfmon", "net_admin"];
    let o = with_caps(&datapath);
    eprintln!("only {datapath:?}: {o:?}");
    assert!(works(&o) && !o.aborted && o.netns_refused > host, "{datapath:?} alone: {o:?}");
    for without in datapath {
        let some: Vec<&str> = datapath.iter().copied().filter(|c| *c != without).collect();
        let o = with_caps(&some);
        eprintln!("{some:?}: {o:?}");
        assert!(
            !works(&o),
            "without CAP_{} (and CAP_SYS_ADMIN), the datapath still works: {o:?}",
            without.to_uppercase()
        );
    }
}
