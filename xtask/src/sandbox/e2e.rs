//! `cargo xtask test e2e`: Service tests on the sandbox cluster, each modelled on the test
//! of the same name in Kubernetes 1.20's test/e2e/network/service.go and checking what that
//! test checks. One sandbox serves all tests; every test labels its objects `e2e=<id>` and
//! deletes them afterwards. Prints `N passed, M failed` and fails if any failed.
//!
//! Filter with `LB_E2E_FOCUS=substring`.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{
    Sandbox, UpArgs,
    demo::{ready_endpoints, wait_running},
    image::{AGNHOST_IMAGE, BENCH_IMAGE, CLIENT_IMAGE},
    node_name, wait_for,
};

type TestFn = fn(&Sandbox, &str) -> Result<()>;

const TESTS: &[(&str, TestFn)] = &[
    ("should serve a basic endpoint from pods", basic_endpoint),
    ("should serve multiport endpoints from pods", multiport),
    ("should have session affinity work for service with type clusterIP", affinity),
    ("should be able to switch session affinity for service with type clusterIP", switch_affinity),
    ("should have session affinity timeout work for service with type clusterIP", affinity_timeout),
    ("should be rejected when no endpoints exist", rejected_no_endpoints),
    ("should allow pods to hairpin back to themselves through services", hairpin),
    ("should work after the service has been recreated", recreated),
    ("should work after restarting the agent", restart_agent),
    ("should implement service.kubernetes.io/service-proxy-name", proxy_name),
    ("should implement service.kubernetes.io/headless", headless_label),
    (
        "should be able to connect to terminating and unready endpoints if PublishNotReadyAddresses is true",
        publish_not_ready_true,
    ),
    (
        "should not be able to connect to terminating and unready endpoints if PublishNotReadyAddresses is false",
        publish_not_ready_false,
    ),
    ("should fallback to terminating endpoints when there are no ready endpoints", fallback_terminating),
    ("ClusterIP from the same node and another node, TCP and UDP", same_and_cross_node),
    ("a host-network client reaches a ClusterIP through socket LB, TCP and UDP", host_network_client),
    ("service variables in a pod created after its service", env_after_service),
    ("endpoints follow kubectl scale up and down while a client keeps requesting", scale_while_requesting),
    ("an established connection to a terminating pod keeps working during its grace period", held_to_terminating),
    ("kubectl rollout restart of the lb-agent DaemonSet keeps established flows", rollout_restart),
    (
        "a ClusterIP whose endpoint is the client's own node (kubernetes.default, hostNetwork), TCP and UDP",
        node_backend,
    ),
    (
        "deleting a Service keeps its established TCP connections, as kube-proxy's conntrack does",
        deleted_service_keeps_flows,
    ),
];

pub fn run() -> Result<()> {
    super::require_root()?;
    super::install_teardown_on_signal();
    let focus = std::env::var("LB_E2E_FOCUS").unwrap_or_default();
    eprintln!("e2e: bringing up the sandbox (2 nodes, lb agent on each)");
    let sb = match super::up(&UpArgs::default()) {
        Ok(sb) => sb,
        Err(e) => {
            let _ = super::down(false);
            return Err(e);
        }
    };
    let (mut passed, mut failed) = (0, Vec::new());
    for (i, (name, f)) in TESTS.iter().enumerate() {
        if !name.contains(&focus) {
            continue;
        }
        let id = format!("t{i}");
        let t0 = Instant::now();
        eprintln!("[ RUN  ] {name}");
        let res = f(&sb, &id);
        cleanup(&sb, &id);
        match res {
            Ok(()) => {
                passed += 1;
                println!("[  OK  ] {name} ({:.1?})", t0.elapsed());
            }
            Err(e) => {
                println!("[ FAIL ] {name} ({:.1?}): {e:#}", t0.elapsed());
                failed.push(*name);
            }
        }
    }
    let down = super::down(false);
    println!("\n{passed} passed, {} failed", failed.len());
    for f in &failed {
        println!("  failed: {f}");
    }
    down?;
    if !failed.is_empty() {
        bail!("{} e2e tests failed", failed.len());
    }
    Ok(())
}

fn cleanup(sb: &Sandbox, id: &str) {
    let sel = format!("e2e={id}");
    // ReplicaSets first (no garbage collector runs: their pods are deleted by label below),
    // then the rest; pods at once, as upstream's AfterEach force-deletes terminating ones.
    let _ = sb.kubectl(&["delete", "rs", "-l", &sel, "--wait=false"]);
    let _ = sb.kubectl(&["delete", "svc", "-l", &sel, "--wait=false"]);
    let _ = sb.kubectl(&["delete", "pods", "-l", &sel, "--wait=false", "--grace-period=0", "--force"]);
    // Pods leave once their processes have stopped; later tests want a quiet cluster.
    let _ = wait_for("test pods to go", Duration::from_secs(40), || {
        Ok(sb
            .kubectl(&["get", "pods", "-l", &format!("e2e={id}"), "--no-headers"])
            .map(|o| o.trim().is_empty())
            .unwrap_or(true))
    });
}

// ----- object builders -----

/// A serving pod `name`: agnhost netexec (as upstream's tests use it), its HTTP server on
/// the first TCP port of `ports` = [(name, port, proto)] and its UDP server on the first UDP
/// one; `/hostname` (and the UDP command `hostname`) answer the pod's name.
fn server_pod(
    sb: &Sandbox,
    id: &str,
    name: &str,
    labels: &str,
    ports: &[(&str, u16, &str)],
    node: Option<u8>,
) -> Result<()> {
    let mut args = vec!["netexec".to_string()];
    if let Some((_, p, _)) = ports.iter().find(|(_, _, proto)| *proto == "TCP") {
        args.push(format!("--http-port={p}"));
    }
    if let Some((_, p, _)) = ports.iter().find(|(_, _, proto)| *proto == "UDP") {
        args.push(format!("--udp-port={p}"));
    }
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, proto)| {
            let n = if n.is_empty() { String::new() } else { format!("name: {n}, ") };
            format!("{{{n}containerPort: {p}, protocol: {proto}}}")
        })
        .collect();
    let node = node.map(|i| format!("  nodeName: {}\n", node_name(i))).unwrap_or_default();
    sb.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{e2e: {id}, {labels}}}\nspec:\n{node}  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: {AGNHOST_IMAGE}\n    args: [{}]\n    ports: [{}]\n",
        args.join(", "),
        ports.join(", ")
    ))?;
    Ok(())
}

fn client_pod(sb: &Sandbox, id: &str, name: &str, node: Option<u8>) -> Result<()> {
    let node = node.map(|i| format!("  nodeName: {}\n", node_name(i))).unwrap_or_default();
    sb.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{e2e: {id}}}\nspec:\n{node}  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: {CLIENT_IMAGE}}}\n"
    ))?;
    wait_pod(sb, name)
}

fn wait_pod(sb: &Sandbox, name: &str) -> Result<()> {
    wait_running(sb, name)
}

/// A ClusterIP service `name` selecting `sel`, with `ports` = [(name, port, targetPort, proto)].
fn service(
    sb: &Sandbox,
    id: &str,
    name: &str,
    sel: &str,
    ports: &[(&str, u16, &str, &str)],
    extra_labels: &str,
    spec_extra: &str,
) -> Result<String> {
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, t, proto)| {
            let n = if n.is_empty() { String::new() } else { format!("name: {n}, ") };
            format!("{{{n}port: {p}, targetPort: {t}, protocol: {proto}}}")
        })
        .collect();
    sb.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  labels: {{e2e: {id}{extra_labels}}}\nspec:\n  selector: {{{sel}}}\n  ports: [{}]\n{spec_extra}",
        ports.join(", ")
    ))?;
    cluster_ip(sb, name)
}

fn cluster_ip(sb: &Sandbox, svc: &str) -> Result<String> {
    Ok(sb.kubectl(&["get", "svc", svc, "-o", "jsonpath={.spec.clusterIP}"])?.trim().to_owned())
}

/// Endpoint addresses (ip:port) of the Endpoints object.
fn endpoints(sb: &Sandbox, svc: &str) -> BTreeSet<String> {
    let Ok(t) = sb.kubectl(&["get", "endpoints", svc, "-o", "json"]) else { return BTreeSet::new() };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else { return BTreeSet::new() };
    let mut out = BTreeSet::new();
    for s in v["subsets"].as_array().into_iter().flatten() {
        for a in s["addresses"].as_array().into_iter().flatten() {
            for p in s["ports"].as_array().into_iter().flatten() {
                out.insert(format!("{}:{}", a["targetRef"]["name"].as_str().unwrap_or("?"), p["port"]));
            }
        }
    }
    out
}

/// validateEndpointsPortsOrFail: waits until the endpoints are exactly `want` ("pod:port").
fn expect_endpoints(sb: &Sandbox, svc: &str, want: &[&str]) -> Result<()> {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(&format!("endpoints of {svc} to be {want:?}"), Duration::from_secs(30), || Ok(endpoints(sb, svc) == want))
        .with_context(|| format!("last seen: {:?}", endpoints(sb, svc)))
}

/// One HTTP GET from `client`: Ok(body) or Err with curl's exit code (7 refused, 28 timeout).
fn http(sb: &Sandbox, client: &str, url: &str) -> Result<std::result::Result<String, i32>> {
    let (code, out, _) = sb.exec("default", client, &["curl", "-s", "--max-time", "3", "--noproxy", "*", url])?;
    Ok(if code == 0 { Ok(out.trim().to_owned()) } else { Err(code) })
}

fn hostname(body: &str) -> String {
    body.trim().to_owned()
}

/// Polls until a request succeeds (the agent programs changes asynchronously).
fn http_eventually(sb: &Sandbox, client: &str, url: &str) -> Result<String> {
    let t0 = Instant::now();
    loop {
        match http(sb, client, url)? {
            Ok(b) => return Ok(b),
            Err(c) if t0.elapsed() > Duration::from_secs(20) => {
                bail!("GET {url} from {client} keeps failing (curl exit {c})")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// `n` answers' hostnames.
fn hosts(sb: &Sandbox, client: &str, url: &str, n: usize) -> Result<Vec<String>> {
    http_eventually(sb, client, url)?;
    (0..n)
        .map(|_| match http(sb, client, url)? {
            Ok(b) => Ok(hostname(&b)),
            Err(c) => bail!("GET {url} failed (curl exit {c})"),
        })
        .collect()
}

/// One UDP datagram `hostname` to netexec's UDP server at `addr` (ip:port) from `client`:
/// Ok(the answering pod's name) or Err(what nc said).
fn udp(sb: &Sandbox, client: &str, addr: &str) -> Result<std::result::Result<String, String>> {
    let (ip, port) = addr.rsplit_once(':').context("udp address without a port")?;
    let (code, out, err) =
        sb.exec("default", client, &["sh", "-c", &format!("echo hostname | nc -u -w 2 {ip} {port}")])?;
    let out = out.trim().to_owned();
    Ok(if code == 0 && !out.is_empty() { Ok(out) } else { Err(format!("nc exit {code}: {}", err.trim())) })
}

/// A connection through a ClusterIP held open by `nc` in a client pod (`kubectl exec -i`):
/// the request is half sent when [`Held::open`] returns, [`Held::finish`] completes it.
struct Held {
    child: std::process::Child,
}

impl Held {
    fn open(sb: &Sandbox, client: &str, addr: &str) -> Result<Held> {
        use std::io::{BufRead as _, Write as _};
        let (ip, port) = addr.rsplit_once(':').context("address without a port")?;
        let cmd: Vec<String> = ["nc", "-v", "-N", ip, port].iter().map(|s| s.to_string()).collect();
        let mut child = sb
            .exec_cmd("default", client, &cmd, true)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting nc through kubectl exec")?;
        child.stdin.as_mut().context("nc stdin")?.write_all(b"GET /hostname HTTP/1.0\r\n")?;
        let mut err = std::io::BufReader::new(child.stderr.take().context("nc stderr")?);
        let mut line = String::new();
        err.read_line(&mut line)?;
        if !line.contains("succeeded") {
            let _ = child.kill();
            bail!("nc to {addr} did not connect: {line:?}");
        }
        Ok(Held { child })
    }

    /// Sends the rest of the request; the answer's body (the pod name for /hostname).
    fn finish(mut self) -> Result<String> {
        use std::io::{Read as _, Write as _};
        if let Some(mut i) = self.child.stdin.take() {
            let _ = i.write_all(b"\r\n");
        }
        let mut answer = String::new();
        self.child.stdout.take().context("nc stdout")?.read_to_string(&mut answer)?;
        let st = self.child.wait()?;
        let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_owned());
        match body {
            Some(b) if answer.starts_with("HTTP/1.") && answer.contains(" 200 ") => Ok(b),
            _ => bail!("the held connection ended without an answer ({st}): {answer:?}"),
        }
    }
}

// ----- tests -----

fn basic_endpoint(sb: &Sandbox, id: &str) -> Result<()> {
    let svc = format!("{id}-endpoint-test2");
    let sel = format!("app: {id}-basic");
    let cip = service(sb, id, &svc, &sel, &[("", 80, "80", "TCP")], "", "")?;
    expect_endpoints(sb, &svc, &[])?;
    server_pod(sb, id, &format!("{id}-pod1"), &sel, &[("", 80, "TCP")], None)?;
    expect_endpoints(sb, &svc, &[&format!("{id}-pod1:80")])?;
    server_pod(sb, id, &format!("{id}-pod2"), &sel, &[("", 80, "TCP")], None)?;
    expect_endpoints(sb, &svc, &[&format!("{id}-pod1:80"), &format!("{id}-pod2:80")])?;
    client_pod(sb, id, &format!("{id}-client"), None)?;
    let seen: BTreeSet<String> =
        hosts(sb, &format!("{id}-client"), &format!("http://{cip}:80/hostname"), 12)?.into_iter().collect();
    ensure!(seen.len() == 2, "12 requests reached {seen:?}, expected both pods");
    sb.kubectl(&["delete", "pod", &format!("{id}-pod1")])?;
    expect_endpoints(sb, &svc, &[&format!("{id}-pod2:80")])?;
    sb.kubectl(&["delete", "pod", &format!("{id}-pod2")])?;
    expect_endpoints(sb, &svc, &[])
}

fn multiport(sb: &Sandbox, id: &str) -> Result<()> {
    let svc = format!("{id}-multi-endpoint-test");
    let sel = format!("app: {id}-multi");
    let cip =
        service(sb, id, &svc, &sel, &[("portname1", 80, "svc1", "TCP"), ("portname2", 81, "svc2", "TCP")], "", "")?;
    expect_endpoints(sb, &svc, &[])?;
    server_pod(sb, id, &format!("{id}-pod1"), &sel, &[("svc1", 100, "TCP")], None)?;
    expect_endpoints(sb, &svc, &[&format!("{id}-pod1:100")])?;
    server_pod(sb, id, &format!("{id}-pod2"), &sel, &[("svc2", 101, "TCP")], None)?;
    expect_endpoints(sb, &svc, &[&format!("{id}-pod1:100"), &format!("{id}-pod2:101")])?;
    let c = format!("{id}-client");
    client_pod(sb, id, &c, None)?;
    let a = hostname(&http_eventually(sb, &c, &format!("http://{cip}:80/hostname"))?);
    let b = hostname(&http_eventually(sb, &c, &format!("http://{cip}:81/hostname"))?);
    ensure!(a == format!("{id}-pod1") && b == format!("{id}-pod2"), "port 80 -> {a}, port 81 -> {b}");
    Ok(())
}

fn affinity_setup(sb: &Sandbox, id: &str, affinity: bool) -> Result<(String, String, String)> {
    let svc = format!("{id}-affinity");
    let sel = format!("app: {id}-aff");
    let extra = if affinity { "  sessionAffinity: ClientIP\n" } else { "" };
    let cip = service(sb, id, &svc, &sel, &[("", 80, "8080", "TCP")], "", extra)?;
    for i in 0..3 {
        server_pod(sb, id, &format!("{id}-aff-{i}"), &sel, &[("", 8080, "TCP")], None)?;
    }
    wait_for("3 endpoints", Duration::from_secs(30), || Ok(ready_endpoints(sb, &svc) == 3))?;
    let c = format!("{id}-client");
    client_pod(sb, id, &c, None)?;
    Ok((svc, cip, c))
}

/// checkAffinity: 15 answers in a row from one pod (or, with `want` false, from several).
fn check_affinity(sb: &Sandbox, client: &str, cip: &str, want: bool) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let h: BTreeSet<String> = hosts(sb, client, &format!("http://{cip}:80/hostname"), 15)?.into_iter().collect();
        if (h.len() == 1) == want {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("affinity {want}: 15 answers came from {h:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn affinity(sb: &Sandbox, id: &str) -> Result<()> {
    let (_, cip, c) = affinity_setup(sb, id, true)?;
    check_affinity(sb, &c, &cip, true)
}

fn switch_affinity(sb: &Sandbox, id: &str) -> Result<()> {
    let (svc, cip, c) = affinity_setup(sb, id, false)?;
    check_affinity(sb, &c, &cip, false)?;
    sb.kubectl(&["patch", "svc", &svc, "-p", r#"{"spec":{"sessionAffinity":"ClientIP"}}"#])?;
    check_affinity(sb, &c, &cip, true)?;
    sb.kubectl(&["patch", "svc", &svc, "-p", r#"{"spec":{"sessionAffinity":"None"}}"#])?;
    check_affinity(sb, &c, &cip, false)
}

fn rejected_no_endpoints(sb: &Sandbox, id: &str) -> Result<()> {
    let svc = format!("{id}-no-pods");
    let cip = service(sb, id, &svc, &format!("app: {id}-nothing"), &[("", 80, "80", "TCP")], "", "")?;
    let c = format!("{id}-client");
    client_pod(sb, id, &c, None)?;
    // Wait until the agent has the frontend, then expect "connection refused" fast.
    let t0 = Instant::now();
    loop {
        let s = Instant::now();
        match http(sb, &c, &format!("http://{cip}:80/hostname"))? {
            Err(7) => {
                ensure!(s.elapsed() < Duration::from_secs(2), "refused, but only after {:.1?}", s.elapsed());
                return Ok(());
            }
            r if t0.elapsed() > Duration::from_secs(20) => {
                bail!("expected connection refused (curl exit 7), got {r:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

fn hairpin(sb: &Sandbox, id: &str) -> Result<()> {
    let svc = format!("{id}-hairpin-test");
    let sel = format!("app: {id}-hairpin");
    let cip = service(sb, id, &svc, &sel, &[("", 8080, "8080", "TCP")], "", "")?;
    let pod = format!("{id}-hairpin");
    server_pod(sb, id, &pod, &sel, &[("", 8080, "TCP")], None)?;
    wait_for("1 endpoint", Duration::from_secs(30), || Ok(ready_endpoints(sb, &svc) == 1))?;
    let b = http_eventually(sb, &pod, &format!("http://{cip}:8080/hostname"))?;
    ensure!(hostname(&b) == pod, "hairpin answer {b:?}");
    Ok(())
}

fn recreated(sb: &Sandbox, id: &str) -> Result<()> {
    let svc = format!("{id}-svc");
    let sel = format!("app: {id}-re");
    server_pod(sb, id, &format!("{id}-s"), &sel, &[("", 8080, "TCP")], None)?;
    let c = format!("{id}-client");
    client_pod(sb, id, &c, None)?;
    let cip = service(sb, id, &svc, &sel, &[("", 80, "8080", "TCP")], "", "")?;
    http_eventually(sb, &c, &format!("http://{cip}:80/hostname"))?;
    sb.kubectl(&["delete", "svc", &svc])?;
    // verifyServeHostnameServiceDown: the old ClusterIP stops answering.
    wait_for("the deleted service to stop answering", Duration::from_secs(20), || {
        Ok(http(sb, &c, &format!("http://{cip}:80/hostname"))?.is_err())
    })?;
    let cip2 = service(sb, id, &svc, &sel, &[("", 80, "8080", "TCP")], "", "")?;
    http_eventually(sb, &c, &format!("http://{cip2}:80/hostname"))?;
    Ok(())
}

/// Two services over the same pods, one carrying `label`: only the other one is served.
fn skipped_by_label(sb: &Sandbox, id: &str, label: &str) -> Result<()> {
    let sel = format!("app: {id}-lbl");
    server_pod(sb, id, &format!("{id}-s"), &sel, &[("", 8080, "TCP")], None)?;
    let c = format!("{id}-client");
    client_pod(sb, id, &c, None)?;
    let plain = service(sb, id, &format!("{id}-plain"), &sel, &[("", 80, "8080", "TCP")], "", "")?;
    let skipped =
        service(sb, id, &format!("{id}-skipped"), &sel, &[("", 80, "8080", "TCP")], &format!(", {label}"), "")?;
    http_eventually(sb, &c, &format!("http://{plain}:80/hostname"))?;
    wait_for(
        "2 endpoints objects",
        Duration::from_secs(30),
        || Ok(ready_endpoints(sb, &format!("{id}-skipped")) == 1),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    match http(sb, &c, &format!("http://{skipped}:80/hostname"))? {
        Err(_) => Ok(()),
        Ok(b) => bail!("service labelled {label} answered {b:?}; it must not be proxied"),
    }
}

fn proxy_name(sb: &Sandbox, id: &str) -> Result<()> {
    skipped_by_label(sb, id, "service.kubernetes.io/service-proxy-name: foo-bar")
}

fn headless_label(sb: &Sandbox, id: &str) -> Result<()> {
    skipped_by_label(sb, id, "service.kubernetes.io/headless: \"\"")
}

fn same_and_cross_node(sb: &Sandbox, id: &str) -> Result<()> {
    let sel = format!("app: {id}-xn");
    let pod = format!("{id}-backend");
    server_pod(sb, id, &pod, &sel, &[("http", 8080, "TCP"), ("echo", 9090, "UDP")], Some(1))?;
    let svc = format!("{id}-xn");
    let cip = service(sb, id, &svc, &sel, &[("http", 80, "http", "TCP"), ("echo", 90, "echo", "UDP")], "", "")?;
    for n in [1u8, 2] {
        let c = format!("{id}-client-node{n}");
        client_pod(sb, id, &c, Some(n))?;
        let b = http_eventually(sb, &c, &format!("http://{cip}:80/hostname"))?;
        ensure!(hostname(&b) == pod, "TCP from node {n}: {b:?}");
        let t0 = Instant::now();
        loop {
            match udp(sb, &c, &format!("{cip}:90"))? {
                Ok(a) if a == pod => break,
                r if t0.elapsed() > Duration::from_secs(20) => bail!("UDP from node {n}: {r:?}"),
                _ => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }
    Ok(())
}

// ----- host-network clients -----

/// One HTTP GET from a host-network process of node `node`, in the node's cgroup
/// ([`Sandbox::host_exec`]): Ok(body) or Err(curl's exit code), as [`http`].
fn host_http(sb: &Sandbox, node: u8, url: &str) -> Result<std::result::Result<String, i32>> {
    let (code, out, _) = sb.host_exec(node, &["curl", "-s", "--max-time", "3", "--noproxy", "*", url])?;
    Ok(if code == 0 { Ok(out.trim().to_owned()) } else { Err(code) })
}

/// One UDP datagram `hostname` from a host-network process of node `node` (in its cgroup)
/// to netexec's UDP server at `ip:port`, as [`udp`].
fn host_udp(sb: &Sandbox, node: u8, ip: &str, port: u16) -> Result<std::result::Result<String, String>> {
    let (code, out, err) =
        sb.host_exec(node, &["sh", "-c", &format!("echo hostname | nc.openbsd -u -w 2 {ip} {port}")])?;
    let out = out.trim().to_owned();
    Ok(if code == 0 && !out.is_empty() { Ok(out) } else { Err(format!("nc exit {code}: {}", err.trim())) })
}

/// Asks `ask` until it answers (the agent programs changes asynchronously), then until
/// every pod of `want` has answered; every answer must be one of `want`.
fn reach_all(
    what: &str,
    want: &BTreeSet<String>,
    mut ask: impl FnMut() -> Result<std::result::Result<String, String>>,
) -> Result<()> {
    let t0 = Instant::now();
    let first = loop {
        match ask()? {
            Ok(a) => break a,
            Err(e) if t0.elapsed() > Duration::from_secs(20) => bail!("{what} keeps failing: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    };
    let mut seen = BTreeSet::from([first]);
    let (mut tries, mut failed) = (0, vec![]);
    while !want.is_subset(&seen) && tries < 20 * want.len() {
        tries += 1;
        match ask()? {
            Ok(a) => {
                seen.insert(a);
            }
            Err(e) => failed.push(e),
        }
    }
    ensure!(seen.is_subset(want), "{what} answered by {seen:?}; expected only {want:?}");
    ensure!(
        want.is_subset(&seen),
        "{what}: answers came from {seen:?} ({} failed: {failed:?}), expected all of {want:?}",
        failed.len()
    );
    Ok(())
}

/// Socket-level load balancing serves host-network processes, whose packets cross no pod
/// interface and so never meet the per-packet datapath (kube-proxy serves them from its
/// OUTPUT chain). From each node's network namespace, as a process of the node's cgroup
/// (as its daemons and hostNetwork pods are; `Node::host_cmd`), requests to a ClusterIP
/// whose pods run on node 1 and node 2 reach both, over TCP (curl) and UDP (`nc -u`,
/// a connected socket). And a process in node 1's namespaces but left in xtask's own
/// cgroup (this machine's root one) is not served: nothing is attached above the nodes'
/// subtrees.
fn host_network_client(sb: &Sandbox, id: &str) -> Result<()> {
    let socket_lb = sb.kubectl(&[
        "-n",
        "kube-system",
        "get",
        "ds",
        "lb-agent",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].env[?(@.name==\"LB_SOCKET_LB\")].value}",
    ])?;
    ensure!(socket_lb.trim() != "off", "the DaemonSet runs with LB_SOCKET_LB=off: host-network clients are not served");
    let sel = format!("app: {id}-hn");
    let svc = format!("{id}-hn");
    let cip = service(sb, id, &svc, &sel, &[("http", 80, "http", "TCP"), ("echo", 90, "echo", "UDP")], "", "")?;
    let mut pods = BTreeSet::new();
    for n in [1u8, 2] {
        let pod = format!("{id}-backend-node{n}");
        server_pod(sb, id, &pod, &sel, &[("http", 8080, "TCP"), ("echo", 9090, "UDP")], Some(n))?;
        pods.insert(pod);
    }
    let want: Vec<String> = pods.iter().flat_map(|p| [format!("{p}:8080"), format!("{p}:9090")]).collect();
    expect_endpoints(sb, &svc, &want.iter().map(String::as_str).collect::<Vec<_>>())?;
    let url = format!("http://{cip}:80/hostname");
    for n in [1u8, 2] {
        reach_all(&format!("GET {url} from node {n}'s host network"), &pods, || {
            Ok(host_http(sb, n, &url)?.map(|b| hostname(&b)).map_err(|c| format!("curl exit {c}")))
        })?;
        reach_all(&format!("UDP {cip}:90 from node {n}'s host network"), &pods, || host_udp(sb, n, &cip, 90))?;
    }
    // The same request from node 1's namespaces, but from xtask's own cgroup.
    let out = super::node::Node::new(1)
        .nsenter()
        .args(["curl", "-s", "--max-time", "3", "--noproxy", "*", &url])
        .stdin(std::process::Stdio::null())
        .output()
        .context("running curl on node 1")?;
    ensure!(
        !out.status.success(),
        "a process in node 1's network namespace but outside its cgroup got {:?} from {url}: \
         something serves it from above the node's cgroup subtree",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

fn env_after_service(sb: &Sandbox, id: &str) -> Result<()> {
    let svc = format!("{id}-fooservice");
    let cip = service(sb, id, &svc, &format!("app: {id}-env"), &[("", 8765, "8080", "TCP")], "", "")?;
    let c = format!("{id}-client");
    client_pod(sb, id, &c, None)?;
    let (_, env, _) = sb.exec("default", &c, &["env"])?;
    let p = svc.replace('-', "_").to_uppercase();
    for want in [
        format!("{p}_SERVICE_HOST={cip}"),
        format!("{p}_SERVICE_PORT=8765"),
        format!("{p}_PORT=tcp://{cip}:8765"),
        format!("{p}_PORT_8765_TCP_PROTO=tcp"),
        format!("{p}_PORT_8765_TCP_PORT=8765"),
        format!("{p}_PORT_8765_TCP_ADDR={cip}"),
    ] {
        ensure!(env.lines().any(|l| l == want), "{want} missing from the pod's env");
    }
    Ok(())
}

// ----- session affinity timeout -----

/// execAffinityTestForSessionAffinityTimeout: ClientIP affinity with a short timeoutSeconds;
/// sticky first (checkAffinity), then, once the timeout has passed, requests may land on
/// another pod: up to 10 tries, sleeping past the timeout after each answer from the same pod.
fn affinity_timeout(sb: &Sandbox, id: &str) -> Result<()> {
    // Upstream uses 15 s (AffinityConfirmCount); a shorter one keeps the suite fast.
    const TIMEOUT: u64 = 3;
    let svc = format!("{id}-affinity-timeout");
    let sel = format!("app: {id}-afft");
    let extra =
        format!("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {TIMEOUT}}}}}\n");
    let cip = service(sb, id, &svc, &sel, &[("", 80, "8080", "TCP")], "", &extra)?;
    for i in 0..3 {
        server_pod(sb, id, &format!("{id}-afft-{i}"), &sel, &[("", 8080, "TCP")], None)?;
    }
    wait_for("3 endpoints", Duration::from_secs(30), || Ok(ready_endpoints(sb, &svc) == 3))?;
    let c = format!("{id}-execpod-affinity");
    client_pod(sb, id, &c, None)?;
    let url = format!("http://{cip}:80/hostname");
    http_eventually(sb, &c, &url)?; // CheckServiceReachability
    // The service is sticky until the timeout expires...
    check_affinity(sb, &c, &cip, true)?;
    // ...but answers from other pods after it.
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        if let Ok(b) = http(sb, &c, &url)? {
            seen.insert(hostname(&b));
            if seen.len() > 1 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(TIMEOUT + 2));
        }
    }
    bail!("session is sticky after reaching the timeout ({TIMEOUT}s): every answer came from {seen:?}")
}

// ----- agent restart -----

/// verifyServeHostnameServiceUp: requests from `client` reach exactly the pods `want`.
fn verify_up(sb: &Sandbox, client: &str, cip: &str, port: u16, want: &BTreeSet<String>) -> Result<()> {
    let url = format!("http://{cip}:{port}/hostname");
    let (mut seen, mut failed) = (BTreeSet::new(), 0);
    for _ in 0..(20 * want.len()) {
        match http(sb, client, &url)? {
            Ok(b) => {
                let h = hostname(&b);
                ensure!(want.contains(&h), "{url} from {client} answered by {h}, which is not one of {want:?}");
                seen.insert(h);
                if &seen == want {
                    return Ok(());
                }
            }
            Err(_) => failed += 1,
        }
    }
    bail!("{url} from {client}: answers came from {seen:?} ({failed} failed), expected all of {want:?}")
}

/// "should work after restarting kube-proxy": two services of 3 pods each are up, every
/// node's agent is killed with SIGKILL and started again as `sandbox up` starts it, and both
/// are still up. Also: a connection opened before the kill still works after the restart,
/// the datapath keeps serving while the agents are down, and the restarted agents follow
/// changes (a service made after the restart, a pod deleted after it).
fn restart_agent(sb: &Sandbox, id: &str) -> Result<()> {
    let mut svcs = Vec::new();
    for n in 1..=2 {
        let name = format!("{id}-restart-proxy-{n}");
        let sel = format!("app: {name}");
        let cip = service(sb, id, &name, &sel, &[("", 80, "9376", "TCP")], "", "")?;
        let mut pods = BTreeSet::new();
        for p in 0..3 {
            let pod = format!("{name}-{p}");
            server_pod(sb, id, &pod, &sel, &[("", 9376, "TCP")], None)?;
            pods.insert(pod);
        }
        svcs.push((name, cip, pods));
    }
    ensure!(svcs[0].1 != svcs[1].1, "service IPs conflict: {}", svcs[0].1);
    for (name, _, _) in &svcs {
        wait_for(&format!("3 endpoints of {name}"), Duration::from_secs(30), || Ok(ready_endpoints(sb, name) == 3))?;
    }
    let clients = [format!("{id}-client-node1"), format!("{id}-client-node2")];
    for (n, c) in clients.iter().enumerate() {
        client_pod(sb, id, c, Some(u8::try_from(n + 1)?))?;
    }
    for c in &clients {
        http_eventually(sb, c, &format!("http://{}:80/hostname", svcs[0].1))?;
        for (_, cip, pods) in &svcs {
            verify_up(sb, c, cip, 80, pods)?;
        }
    }

    // A connection through the ClusterIP, opened (request half sent) before the kill.
    let held = Held::open(sb, &clients[1], &format!("{}:80", svcs[0].1))?;

    eprintln!("    killing every node's lb agent with SIGKILL (the kubelet restarts the container)");
    for i in 1..=sb.nodes {
        sb.kill_agent(i)?;
    }
    // The datapath is pinned: it keeps serving with no agent running.
    let down = (|| -> Result<()> {
        for c in &clients {
            for (_, cip, pods) in &svcs {
                verify_up(sb, c, cip, 80, pods)?;
            }
        }
        Ok(())
    })();
    for i in 1..=sb.nodes {
        sb.wait_agent_ready(i)?;
    }
    down.context("while the agents were down")?;
    eprintln!("    agents restarted");
    for c in &clients {
        for (_, cip, pods) in &svcs {
            verify_up(sb, c, cip, 80, pods)?;
        }
    }

    // The held connection still reaches its pod.
    let answer = held.finish().context("a connection opened before the restart failed after it")?;
    ensure!(svcs[0].2.contains(&answer), "the held connection answered {answer:?}");

    // The restarted agents follow changes.
    let (name, cip, pods) = &svcs[0];
    let gone = pods.iter().next().cloned().context("no pod")?;
    sb.kubectl(&["delete", "pod", &gone, "--wait=false"])?;
    let rest: BTreeSet<String> = pods.iter().filter(|p| **p != gone).cloned().collect();
    wait_for(&format!("2 endpoints of {name}"), Duration::from_secs(30), || Ok(ready_endpoints(sb, name) == 2))?;
    for c in &clients {
        verify_up(sb, c, cip, 80, &rest)?;
    }
    let name3 = format!("{id}-restart-proxy-3");
    let cip3 = service(sb, id, &name3, &format!("app: {}", svcs[1].0), &[("", 80, "9376", "TCP")], "", "")?;
    for c in &clients {
        http_eventually(sb, c, &format!("http://{cip3}:80/hostname"))?;
        verify_up(sb, c, &cip3, 80, &svcs[1].2)?;
    }
    Ok(())
}

// ----- scale while requesting -----

/// A ReplicaSet of netexec-like pods (serving through a grace period after SIGTERM, with a
/// failing readiness once deleted) is scaled 2 -> 5 -> 2 while a client requests its ClusterIP
/// without pause. The endpoints must follow, the new pods must get traffic, requests after
/// the scale-down must only reach the survivors, and no request may fail.
fn scale_while_requesting(sb: &Sandbox, id: &str) -> Result<()> {
    let rs = format!("{id}-scale");
    sb.apply(&format!(
        r#"apiVersion: apps/v1
kind: ReplicaSet
metadata: {{name: {rs}, labels: {{e2e: {id}}}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: {rs}}}}}
  template:
    metadata: {{labels: {{app: {rs}, e2e: {id}}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: c
        image: {AGNHOST_IMAGE}
        args: [netexec, --http-port=8080]
        ports: [{{containerPort: 8080}}]
{}
"#,
        serve_through_grace(8, 3)
    ))?;
    let cip = service(sb, id, &rs, &format!("app: {rs}"), &[("", 80, "8080", "TCP")], "", "")?;
    let c = format!("{id}-client");
    client_pod(sb, id, &c, None)?;
    let wait_eps = |n: usize| {
        wait_for(&format!("{n} ready endpoints of {rs}"), Duration::from_secs(60), || Ok(ready_endpoints(sb, &rs) == n))
    };
    wait_eps(2)?;
    let url = format!("http://{cip}:80/hostname");
    http_eventually(sb, &c, &url)?;

    let stop = std::sync::atomic::AtomicBool::new(false);
    let t0 = Instant::now();
    // (start, end, answer) of every request.
    type Request = (Duration, Duration, std::result::Result<String, i32>);
    let log: std::sync::Mutex<Vec<Request>> = std::sync::Mutex::new(Vec::new());
    let answered = || -> BTreeSet<String> {
        log.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter_map(|(_, _, r)| r.clone().ok())
            .collect()
    };
    let phases = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let start = t0.elapsed();
                let r = match http(sb, &c, &url) {
                    Ok(Ok(b)) => Ok(hostname(&b)),
                    Ok(Err(code)) => Err(code),
                    Err(_) => Err(-1),
                };
                log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((start, t0.elapsed(), r));
            }
        });
        let phases = (|| -> Result<(Duration, BTreeSet<String>)> {
            std::thread::sleep(Duration::from_secs(1));
            sb.kubectl(&["scale", "rs", &rs, "--replicas=5"])?;
            wait_eps(5)?;
            // Traffic reaches the new pods.
            wait_for("answers from all 5 pods", Duration::from_secs(20), || Ok(answered().len() == 5))?;
            sb.kubectl(&["scale", "rs", &rs, "--replicas=2"])?;
            wait_eps(2)?;
            // Wait until the removed pods are gone (they serve through their grace period).
            wait_for("the scaled-down pods to go", Duration::from_secs(60), || {
                Ok(sb.kubectl(&["get", "pods", "-l", &format!("app={rs}"), "--no-headers"])?.lines().count() == 2)
            })?;
            let after = t0.elapsed();
            std::thread::sleep(Duration::from_secs(2));
            let survivors: BTreeSet<String> =
                endpoints(sb, &rs).into_iter().map(|e| e.split(':').next().unwrap_or("").to_owned()).collect();
            Ok((after, survivors))
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        phases
    });
    let log = log.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (after, survivors) = phases?;
    let failed: Vec<String> = log
        .iter()
        .filter_map(|(a, b, r)| {
            r.as_ref().err().map(|code| format!("{:.2}s..{:.2}s curl exit {code}", a.as_secs_f64(), b.as_secs_f64()))
        })
        .collect();
    let all: BTreeSet<&String> = log.iter().filter_map(|(_, _, r)| r.as_ref().ok()).collect();
    let late: BTreeSet<&String> =
        log.iter().filter(|(a, _, _)| *a > after).filter_map(|(_, _, r)| r.as_ref().ok()).collect();
    eprintln!(
        "    {} requests, {} failed, answered by {} pods; after the scale-down by {late:?}",
        log.len(),
        failed.len(),
        all.len()
    );
    ensure!(failed.is_empty(), "{} of {} requests failed: {}", failed.len(), log.len(), failed.join(", "));
    ensure!(all.len() == 5, "requests were answered by {all:?}, not by all 5 pods");
    ensure!(
        late.iter().all(|h| survivors.contains(*h)),
        "after the scale-down, answers came from {late:?}; the remaining pods are {survivors:?}"
    );
    ensure!(!late.is_empty(), "no request completed after the scale-down");
    Ok(())
}

// ----- terminating endpoints -----

/// What the webserver of upstream's terminating-endpoint tests (Kubernetes 1.22+) gets from
/// netexec's `--delay-shutdown` and `/readyz`, which agnhost 2.21 lacks: once deleted, the
/// container keeps serving for `grace` seconds (a preStop hook, run before SIGTERM) while
/// its readiness probe fails (`probe`). `indent` spaces before each line.
fn serve_through_grace(indent: usize, grace: u32) -> String {
    let pad = " ".repeat(indent);
    format!(
        "{pad}lifecycle: {{preStop: {{exec: {{command: [sh, -c, 'touch /tmp/terminating; sleep {grace}']}}}}}}\n\
         {pad}readinessProbe: {{exec: {{command: [sh, -c, 'test ! -e /tmp/terminating']}}, periodSeconds: 1, failureThreshold: 1}}\n"
    )
}

/// The upstream tests' webserver: agnhost netexec serving through its grace period after
/// deletion, with a readiness probe that then fails, or (`probe` false) with no probe.
fn terminating_server(sb: &Sandbox, id: &str, name: &str, sel: &str, node: u8, probe: bool) -> Result<()> {
    const GRACE: u32 = 60; // upstream: 300 (publishNotReady tests), 100 (fallback); force-deleted at the end
    let probe = if probe {
        serve_through_grace(4, GRACE)
    } else {
        format!("    lifecycle: {{preStop: {{exec: {{command: [sleep, '{GRACE}']}}}}}}\n")
    };
    sb.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{e2e: {id}, {sel}}}\nspec:\n  nodeName: {node_name}\n  terminationGracePeriodSeconds: {GRACE}\n  containers:\n  - name: agnhost\n    image: {AGNHOST_IMAGE}\n    args: [netexec, --http-port=80]\n    ports: [{{containerPort: 80}}]\n{probe}",
        node_name = node_name(node)
    ))?;
    wait_pod_ready(sb, name, true)
}

fn pod_ready(sb: &Sandbox, name: &str) -> Option<bool> {
    let s =
        sb.kubectl(&["get", "pod", name, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"]).ok()?;
    match s.trim() {
        "True" => Some(true),
        "False" => Some(false),
        _ => None,
    }
}

fn wait_pod_ready(sb: &Sandbox, name: &str, ready: bool) -> Result<()> {
    wait_for(&format!("pod {name} to be {}", if ready { "ready" } else { "unready" }), Duration::from_secs(60), || {
        Ok(pod_ready(sb, name) == Some(ready))
    })
}

/// The EndpointSlice conditions (ready, serving, terminating) of `pod` in `svc`'s slices.
fn slice_conditions(sb: &Sandbox, svc: &str, pod: &str) -> Option<(Option<bool>, Option<bool>, Option<bool>)> {
    let t = sb
        .kubectl(&["get", "endpointslices", "-l", &format!("kubernetes.io/service-name={svc}"), "-o", "json"])
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&t).ok()?;
    v["items"].as_array()?.iter().flat_map(|s| s["endpoints"].as_array().into_iter().flatten()).find_map(|e| {
        (e["targetRef"]["name"].as_str() == Some(pod)).then(|| {
            let c = &e["conditions"];
            (c["ready"].as_bool(), c["serving"].as_bool(), c["terminating"].as_bool())
        })
    })
}

/// Waits until the slice shows `pod` with exactly these conditions (the controller runs
/// with EndpointSliceTerminatingCondition, so serving/terminating must be present).
fn expect_slice(sb: &Sandbox, svc: &str, pod: &str, ready: bool, serving: bool, terminating: bool) -> Result<()> {
    let want = Some((Some(ready), Some(serving), Some(terminating)));
    wait_for(
        &format!("{pod} in the slices of {svc} as ready={ready} serving={serving} terminating={terminating}"),
        Duration::from_secs(30),
        || Ok(slice_conditions(sb, svc, pod) == want),
    )
    .with_context(|| format!("last seen (ready, serving, terminating): {:?}", slice_conditions(sb, svc, pod)))
}

/// execHostnameTest: polls until `curl ADDR/hostname` from `client` answers, then the
/// answer must be `want`.
fn exec_hostname_test(sb: &Sandbox, client: &str, addr: &str, want: &str) -> Result<()> {
    let got = http_eventually(sb, client, &format!("http://{addr}/hostname"))?;
    ensure!(got == want, "{addr}/hostname from {client} answered {got:?}, expected {want:?}");
    Ok(())
}

/// Shared part of the PublishNotReadyAddresses tests: a webserver on node 1, a client on
/// node 2, the webserver deleted (60 s grace) and waited for to turn unready.
fn terminating_unready_setup(sb: &Sandbox, id: &str, svc: &str, publish: bool) -> Result<(String, String, String)> {
    let sel = format!("app: {svc}");
    let extra = format!("  publishNotReadyAddresses: {publish}\n");
    let cip = service(sb, id, svc, &sel, &[("http", 80, "80", "TCP")], "", &extra)?;
    let web = format!("{id}-webserver-pod");
    terminating_server(sb, id, &web, &sel, 1, true)?;
    expect_endpoints(sb, svc, &[&format!("{web}:80")])?;
    let c = format!("{id}-pause-pod-1");
    client_pod(sb, id, &c, Some(2))?;
    exec_hostname_test(sb, &c, &format!("{cip}:80"), &web)?;
    sb.kubectl(&["delete", "pod", &web, "--wait=false"])?;
    wait_pod_ready(sb, &web, false)?;
    Ok((cip, web, c))
}

fn publish_not_ready_true(sb: &Sandbox, id: &str) -> Result<()> {
    let svc = format!("{id}-svc-tolerate-unready");
    let (cip, web, c) = terminating_unready_setup(sb, id, &svc, true)?;
    // publishNotReadyAddresses: the controller publishes the endpoint as ready.
    expect_slice(sb, &svc, &web, true, false, true)?;
    // Upstream: 5 times, every 5 s; here every second.
    for _ in 0..5 {
        exec_hostname_test(sb, &c, &format!("{cip}:80"), &web)?;
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

fn publish_not_ready_false(sb: &Sandbox, id: &str) -> Result<()> {
    let svc = format!("{id}-svc-not-tolerate-unready");
    let (cip, web, c) = terminating_unready_setup(sb, id, &svc, false)?;
    expect_slice(sb, &svc, &web, false, false, true)?;
    let url = format!("http://{cip}:80/hostname");
    // Wait until the change has propagated and the service starts to fail...
    wait_for("the service to stop serving the terminating, unready pod", Duration::from_secs(20), || {
        Ok(http(sb, &c, &url)?.is_err())
    })?;
    // ...then it must keep failing.
    for _ in 0..5 {
        if let Ok(b) = http(sb, &c, &url)? {
            bail!("the terminating, unready endpoint answered {b:?}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

/// "should fallback to terminating endpoints when there are no ready endpoints with
/// internalTrafficPolicy=Cluster" (KEP-1669): the only endpoint is terminating but still
/// serving (no readiness probe), and clients on both nodes still reach it.
fn fallback_terminating(sb: &Sandbox, id: &str) -> Result<()> {
    let svc = format!("{id}-svc-proxy-terminating");
    let sel = format!("app: {svc}");
    let cip = service(sb, id, &svc, &sel, &[("http", 80, "80", "TCP")], "", "")?;
    let web = format!("{id}-echo-hostname-0");
    terminating_server(sb, id, &web, &sel, 1, false)?;
    expect_endpoints(sb, &svc, &[&format!("{web}:80")])?;
    let clients = [format!("{id}-pause-pod-0"), format!("{id}-pause-pod-1")];
    client_pod(sb, id, &clients[0], Some(1))?;
    client_pod(sb, id, &clients[1], Some(2))?;
    for c in &clients {
        exec_hostname_test(sb, c, &format!("{cip}:80"), &web)?;
    }
    sb.kubectl(&["delete", "pod", &web, "--wait=false"])?;
    expect_slice(sb, &svc, &web, false, true, true)?;
    for _ in 0..5 {
        for c in &clients {
            exec_hostname_test(sb, c, &format!("{cip}:80"), &web)?;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

/// The other half of "no failed request to a backend that still exists": a connection
/// established to a pod that then terminates (deleted, unready, gone from the endpoints, but
/// serving through its grace period) still completes, as with kube-proxy, whose conntrack
/// entries keep established TCP flows to a removed endpoint (only UDP ones are flushed).
fn held_to_terminating(sb: &Sandbox, id: &str) -> Result<()> {
    let svc = format!("{id}-held");
    let sel = format!("app: {svc}");
    let cip = service(sb, id, &svc, &sel, &[("http", 80, "80", "TCP")], "", "")?;
    let (a, b) = (format!("{id}-a"), format!("{id}-b"));
    terminating_server(sb, id, &a, &sel, 1, true)?;
    expect_endpoints(sb, &svc, &[&format!("{a}:80")])?;
    let c = format!("{id}-client");
    client_pod(sb, id, &c, Some(2))?;
    exec_hostname_test(sb, &c, &format!("{cip}:80"), &a)?;
    // Only `a` is an endpoint: the held connection is to `a`.
    let held = Held::open(sb, &c, &format!("{cip}:80"))?;
    terminating_server(sb, id, &b, &sel, 1, true)?;
    expect_endpoints(sb, &svc, &[&format!("{a}:80"), &format!("{b}:80")])?;
    sb.kubectl(&["delete", "pod", &a, "--wait=false"])?;
    wait_pod_ready(sb, &a, false)?;
    expect_endpoints(sb, &svc, &[&format!("{b}:80")])?;
    // New connections only reach `b` once the agents have caught up...
    wait_for(&format!("new connections to reach only {b}"), Duration::from_secs(20), || {
        Ok(hosts(sb, &c, &format!("http://{cip}:80/hostname"), 5)?.iter().all(|h| *h == b))
    })?;
    ensure!(pod_ready(sb, &a) == Some(false), "{a} is no longer terminating");
    // ...while the established one still reaches `a`, which is still serving.
    match held.finish() {
        Ok(h) => ensure!(h == a, "the held connection answered {h:?}, expected {a:?}"),
        Err(e) => {
            let gone = sb
                .lb_on_node(2, &["stats"])
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("drop_backend_gone"))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            bail!(
                "a connection established to {a} broke once {a} (terminating, still serving) left the endpoints ({e:#}; client node's `lb stats`: {gone}); kube-proxy keeps such TCP flows until the pod is gone"
            )
        }
    }
    Ok(())
}

// ----- backends on the node itself -----

/// The endpoint is the node the client pod runs on: `kubernetes.default` on the
/// control-plane node (the API server is a host process there), and a hostNetwork
/// netexec. The node's own stack answers through the pod interface's egress, which only
/// the datapath's egress hook reverse-NATs. From the other node too, for comparison.
fn node_backend(sb: &Sandbox, id: &str) -> Result<()> {
    let (c1, c2) = (format!("{id}-client-1"), format!("{id}-client-2"));
    client_pod(sb, id, &c1, Some(1))?;
    client_pod(sb, id, &c2, Some(2))?;
    let api = cluster_ip(sb, "kubernetes")?;
    for c in [&c1, &c2] {
        // /version is readable anonymously (system:public-info-viewer).
        let (code, out, err) = sb.exec(
            "default",
            c,
            &["curl", "-sk", "--max-time", "5", "--noproxy", "*", &format!("https://{api}:443/version")],
        )?;
        ensure!(
            code == 0 && out.contains("gitVersion"),
            "{c}: https://{api}/version gave curl exit {code}: {out} {err}"
        );
    }
    // A hostNetwork server on node 1, behind a ClusterIP (TCP 80 -> 18080, UDP 90 ->
    // 18081). The UDP server binds the node's address, the endpoint's: one bound to every
    // address (agnhost netexec's) answers from the address routing picks toward the pod,
    // the node's address on the pod network, which no proxy can tell is the endpoint's
    // reply (kube-proxy's conntrack no more than ours).
    let pod = format!("{id}-hostnet");
    let sel = format!("app: {pod}");
    sb.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  labels: {{e2e: {id}, {sel}}}\nspec:\n  nodeName: {node1}\n  hostNetwork: true\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: {AGNHOST_IMAGE}\n    args: [netexec, --http-port=18080, --udp-port=18082]\n    ports: [{{containerPort: 18080, protocol: TCP}}]\n  - name: udp\n    image: {BENCH_IMAGE}\n    command: [/usr/local/bin/lb-bench-tool]\n    args: [serve, --port=18081, --bind=$(HOST_IP), --threads=1]\n    env: [{{name: HOST_IP, valueFrom: {{fieldRef: {{fieldPath: status.hostIP}}}}}}]\n    ports: [{{containerPort: 18081, protocol: UDP}}]\n",
        node1 = node_name(1)
    ))?;
    wait_pod(sb, &pod)?;
    let svc = format!("{id}-hostnet");
    let cip = service(sb, id, &svc, &sel, &[("http", 80, "18080", "TCP"), ("udp", 90, "18081", "UDP")], "", "")?;
    wait_for("the hostNetwork pod's endpoints", Duration::from_secs(30), || Ok(endpoints(sb, &svc).len() == 2))?;
    for c in [&c1, &c2] {
        let body = http_eventually(sb, c, &format!("http://{cip}:80/hostname"))?;
        ensure!(!body.is_empty(), "{c}: empty answer");
        let mut last = Err("not tried".to_string());
        for _ in 0..20 {
            last = udp(sb, c, &format!("{cip}:90"))?;
            if last.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        last.map_err(|e| anyhow::anyhow!("{c}: UDP to {cip}:90 (hostNetwork backend): {e}"))?;
    }
    Ok(())
}

/// kube-proxy removes a deleted Service's rules, but the DNAT'd conntrack entries keep
/// established TCP connections going (it flushes conntrack for UDP only).
fn deleted_service_keeps_flows(sb: &Sandbox, id: &str) -> Result<()> {
    let svc = format!("{id}-gone");
    let sel = format!("app: {svc}");
    let cip = service(sb, id, &svc, &sel, &[("http", 80, "80", "TCP")], "", "")?;
    let a = format!("{id}-a");
    server_pod(sb, id, &a, &sel, &[("", 80, "TCP")], Some(1))?;
    expect_endpoints(sb, &svc, &[&format!("{a}:80")])?;
    let c = format!("{id}-client");
    client_pod(sb, id, &c, Some(2))?;
    http_eventually(sb, &c, &format!("http://{cip}:80/hostname"))?;
    let held = Held::open(sb, &c, &format!("{cip}:80"))?;
    sb.kubectl(&["delete", "svc", &svc])?;
    // New connections stop once the agents have caught up...
    wait_for("new connections to the deleted Service to fail", Duration::from_secs(20), || {
        Ok(http(sb, &c, &format!("http://{cip}:80/hostname"))?.is_err())
    })?;
    // ...while the established one still reaches the pod.
    let answer = held.finish().context("the connection established before the Service was deleted broke")?;
    ensure!(answer == a, "the held connection answered {answer:?}");
    Ok(())
}

// ----- DaemonSet rollout -----

/// `kubectl -n kube-system rollout restart ds/lb-agent` (how users upgrade the agent): a
/// connection established before it completes after it, requests from both nodes keep
/// being answered while every node's agent pod is replaced, and the new pods follow a
/// change made after the rollout.
fn rollout_restart(sb: &Sandbox, id: &str) -> Result<()> {
    let svc = format!("{id}-rollout");
    let sel = format!("app: {svc}");
    let cip = service(sb, id, &svc, &sel, &[("", 80, "8080", "TCP")], "", "")?;
    let mut pods = BTreeSet::new();
    for n in 1..=2u8 {
        let pod = format!("{id}-server-{n}");
        server_pod(sb, id, &pod, &sel, &[("", 8080, "TCP")], Some(n))?;
        pods.insert(pod);
    }
    wait_for("2 endpoints", Duration::from_secs(30), || Ok(ready_endpoints(sb, &svc) == 2))?;
    let clients = [format!("{id}-client-node1"), format!("{id}-client-node2")];
    for (n, c) in clients.iter().enumerate() {
        client_pod(sb, id, c, Some(u8::try_from(n + 1)?))?;
        verify_up(sb, c, &cip, 80, &pods)?;
    }
    let held: Vec<Held> = clients.iter().map(|c| Held::open(sb, c, &format!("{cip}:80"))).collect::<Result<_>>()?;
    let before: Vec<String> = (1..=sb.nodes).map(|i| sb.agent_pod(i)).collect::<Result<_>>()?;
    sb.kubectl(&["-n", "kube-system", "rollout", "restart", "ds/lb-agent"])?;
    // Requests go on while the pods are replaced, one node at a time.
    let t0 = Instant::now();
    let (mut ok, mut failed) = (0, vec![]);
    loop {
        for c in &clients {
            match http(sb, c, &format!("http://{cip}:80/hostname"))? {
                Ok(_) => ok += 1,
                Err(code) => failed.push(format!("{c} at {:.1?}: curl exit {code}", t0.elapsed())),
            }
        }
        let status = sb.kubectl(&["-n", "kube-system", "rollout", "status", "ds/lb-agent", "--timeout=1s"]);
        if status.is_ok_and(|s| s.contains("successfully rolled out")) {
            break;
        }
        ensure!(t0.elapsed() < Duration::from_secs(120), "the rollout did not finish in 120 s");
    }
    let after: Vec<String> = (1..=sb.nodes).map(|i| sb.agent_pod(i)).collect::<Result<_>>()?;
    ensure!(before.iter().all(|p| !after.contains(p)), "agent pods before {before:?}, after {after:?}: not replaced");
    eprintln!("    rollout done in {:.1?}: {ok} requests answered, {} failed", t0.elapsed(), failed.len());
    ensure!(failed.is_empty(), "requests failed during the rollout: {}", failed.join(", "));
    for h in held {
        let answer = h.finish().context("a connection established before the rollout broke")?;
        ensure!(pods.contains(&answer), "the held connection answered {answer:?}");
    }
    // The new agents follow changes: a third backend gets traffic.
    let pod3 = format!("{id}-server-3");
    server_pod(sb, id, &pod3, &sel, &[("", 8080, "TCP")], None)?;
    wait_for("3 endpoints", Duration::from_secs(30), || Ok(ready_endpoints(sb, &svc) == 3))?;
    pods.insert(pod3);
    for c in &clients {
        verify_up(sb, c, &cip, 80, &pods)?;
    }
    Ok(())
}
