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

use super::{Sandbox, UpArgs, demo::ready_endpoints, wait_for};

type TestFn = fn(&Sandbox, &str) -> Result<()>;

const TESTS: &[(&str, TestFn)] = &[
    ("should serve a basic endpoint from pods", basic_endpoint),
    ("should serve multiport endpoints from pods", multiport),
    ("should have session affinity work for service with type clusterIP", affinity),
    ("should be able to switch session affinity for service with type clusterIP", switch_affinity),
    ("should be rejected when no endpoints exist", rejected_no_endpoints),
    ("should allow pods to hairpin back to themselves through services", hairpin),
    ("should work after the service has been recreated", recreated),
    ("should implement service.kubernetes.io/service-proxy-name", proxy_name),
    ("should implement service.kubernetes.io/headless", headless_label),
    ("ClusterIP from the same node and another node, TCP and UDP", same_and_cross_node),
    ("service variables in a pod created after its service", env_after_service),
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
    let _ = sb.kubectl(&["delete", "svc,pods,rs", "-l", &format!("e2e={id}"), "--wait=false"]);
    // Pods leave once their processes have stopped; later tests want a quiet cluster.
    let _ = wait_for("test pods to go", Duration::from_secs(40), || {
        Ok(sb.kubectl(&["get", "pods", "-l", &format!("e2e={id}"), "--no-headers"]).map(|o| o.trim().is_empty()).unwrap_or(true))
    });
}

// ----- object builders -----

/// A serving pod `name` (image mynapp) with `ports` = [(name, port, proto)], optionally on a node.
fn server_pod(sb: &Sandbox, id: &str, name: &str, labels: &str, ports: &[(&str, u16, &str)], node: Option<u8>) -> Result<()> {
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, proto)| {
            let n = if n.is_empty() { String::new() } else { format!("name: {n}, ") };
            format!("{{{n}containerPort: {p}, protocol: {proto}}}")
        })
        .collect();
    let node = node.map(|i| format!("  nodeName: lbsb-node{i}\n")).unwrap_or_default();
    sb.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{e2e: {id}, {labels}}}\nspec:\n{node}  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: agnhost\n    ports: [{}]\n",
        ports.join(", ")
    ))?;
    Ok(())
}

fn client_pod(sb: &Sandbox, id: &str, name: &str, node: Option<u8>) -> Result<()> {
    let node = node.map(|i| format!("  nodeName: lbsb-node{i}\n")).unwrap_or_default();
    sb.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{e2e: {id}}}\nspec:\n{node}  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: idle}}\n"
    ))?;
    wait_pod(sb, name)
}

fn wait_pod(sb: &Sandbox, name: &str) -> Result<()> {
    wait_for(&format!("pod {name}"), Duration::from_secs(60), || Ok(sb.pod_record("default", name).is_ok()))
}

/// A ClusterIP service `name` selecting `sel`, with `ports` = [(name, port, targetPort, proto)].
fn service(sb: &Sandbox, id: &str, name: &str, sel: &str, ports: &[(&str, u16, &str, &str)], extra_labels: &str, spec_extra: &str) -> Result<String> {
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
    body.trim().trim_start_matches("You've hit ").to_owned()
}

/// Polls until a request succeeds (the agent programs changes asynchronously).
fn http_eventually(sb: &Sandbox, client: &str, url: &str) -> Result<String> {
    let t0 = Instant::now();
    loop {
        match http(sb, client, url)? {
            Ok(b) => return Ok(b),
            Err(c) if t0.elapsed() > Duration::from_secs(20) => bail!("GET {url} from {client} keeps failing (curl exit {c})"),
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

fn udp(sb: &Sandbox, client: &str, addr: &str, msg: &str) -> Result<std::result::Result<String, String>> {
    let lb_sandbox = super::target_dir()?.join("debug/lb-sandbox");
    let (code, out, err) = sb.exec("default", client, &[&lb_sandbox.display().to_string(), "udp", addr, msg, "--timeout-ms", "1500"])?;
    Ok(if code == 0 { Ok(out.trim().to_owned()) } else { Err(err.trim().to_owned()) })
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
    let seen: BTreeSet<String> = hosts(sb, &format!("{id}-client"), &format!("http://{cip}:80/"), 12)?.into_iter().collect();
    ensure!(seen.len() == 2, "12 requests reached {seen:?}, expected both pods");
    sb.kubectl(&["delete", "pod", &format!("{id}-pod1")])?;
    expect_endpoints(sb, &svc, &[&format!("{id}-pod2:80")])?;
    sb.kubectl(&["delete", "pod", &format!("{id}-pod2")])?;
    expect_endpoints(sb, &svc, &[])
}

fn multiport(sb: &Sandbox, id: &str) -> Result<()> {
    let svc = format!("{id}-multi-endpoint-test");
    let sel = format!("app: {id}-multi");
    let cip = service(sb, id, &svc, &sel, &[("portname1", 80, "svc1", "TCP"), ("portname2", 81, "svc2", "TCP")], "", "")?;
    expect_endpoints(sb, &svc, &[])?;
    server_pod(sb, id, &format!("{id}-pod1"), &sel, &[("svc1", 100, "TCP")], None)?;
    expect_endpoints(sb, &svc, &[&format!("{id}-pod1:100")])?;
    server_pod(sb, id, &format!("{id}-pod2"), &sel, &[("svc2", 101, "TCP")], None)?;
    expect_endpoints(sb, &svc, &[&format!("{id}-pod1:100"), &format!("{id}-pod2:101")])?;
    let c = format!("{id}-client");
    client_pod(sb, id, &c, None)?;
    let a = hostname(&http_eventually(sb, &c, &format!("http://{cip}:80/"))?);
    let b = hostname(&http_eventually(sb, &c, &format!("http://{cip}:81/"))?);
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
        let h: BTreeSet<String> = hosts(sb, client, &format!("http://{cip}:80/"), 15)?.into_iter().collect();
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
        match http(sb, &c, &format!("http://{cip}:80/"))? {
            Err(7) => {
                ensure!(s.elapsed() < Duration::from_secs(2), "refused, but only after {:.1?}", s.elapsed());
                return Ok(());
            }
            r if t0.elapsed() > Duration::from_secs(20) => bail!("expected connection refused (curl exit 7), got {r:?}"),
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
    let b = http_eventually(sb, &pod, &format!("http://{cip}:8080/"))?;
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
    http_eventually(sb, &c, &format!("http://{cip}:80/"))?;
    sb.kubectl(&["delete", "svc", &svc])?;
    // verifyServeHostnameServiceDown: the old ClusterIP stops answering.
    wait_for("the deleted service to stop answering", Duration::from_secs(20), || Ok(http(sb, &c, &format!("http://{cip}:80/"))?.is_err()))?;
    let cip2 = service(sb, id, &svc, &sel, &[("", 80, "8080", "TCP")], "", "")?;
    http_eventually(sb, &c, &format!("http://{cip2}:80/"))?;
    Ok(())
}

/// Two services over the same pods, one carrying `label`: only the other one is served.
fn skipped_by_label(sb: &Sandbox, id: &str, label: &str) -> Result<()> {
    let sel = format!("app: {id}-lbl");
    server_pod(sb, id, &format!("{id}-s"), &sel, &[("", 8080, "TCP")], None)?;
    let c = format!("{id}-client");
    client_pod(sb, id, &c, None)?;
    let plain = service(sb, id, &format!("{id}-plain"), &sel, &[("", 80, "8080", "TCP")], "", "")?;
    let skipped = service(sb, id, &format!("{id}-skipped"), &sel, &[("", 80, "8080", "TCP")], &format!(", {label}"), "")?;
    http_eventually(sb, &c, &format!("http://{plain}:80/"))?;
    wait_for("2 endpoints objects", Duration::from_secs(30), || Ok(ready_endpoints(sb, &format!("{id}-skipped")) == 1))?;
    std::thread::sleep(Duration::from_millis(500));
    match http(sb, &c, &format!("http://{skipped}:80/"))? {
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
        let b = http_eventually(sb, &c, &format!("http://{cip}:80/"))?;
        ensure!(hostname(&b) == pod, "TCP from node {n}: {b:?}");
        let t0 = Instant::now();
        loop {
            match udp(sb, &c, &format!("{cip}:90"), "ping")? {
                Ok(a) if a == format!("{pod}: ping") => break,
                r if t0.elapsed() > Duration::from_secs(20) => bail!("UDP from node {n}: {r:?}"),
                _ => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }
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
