//! Malformed Services and EndpointSlices given to a real `lb agent`, through the
//! `file:` source and through a real kube-apiserver 1.20.2 (those of them it accepts):
//! each is skipped and counted by reason, the good Services beside them are
//! programmed exactly, and the agent stays up, also when the file then turns into
//! more garbage and invalid YAML.
//!
//! The file-source agent runs in a throw-away network namespace (its /metrics is
//! fetched there); the API-server agent in the root namespace, talking to the API
//! server on 127.0.0.1 as tests/agent_k8s.rs does. Neither attaches to anything.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use lb_testing::{PrivateBpffs, Scratch, agent::AgentProcess, kube::Cluster, netns::Netns, require_kube};

fn lb() -> &'static str {
    env!("CARGO_BIN_EXE_lb")
}

const METRICS_ADDR: &str = "127.0.0.1:9464";
/// What the maps hold for `web`, `db` and `junk` (the malformed Services keep
/// their good ports, and `junk2`'s malformed slices their good endpoints).
fn checked(bpffs: &Path) -> Vec<(String, Vec<String>)> {
    let ours = ["10.96.0.10:", "10.96.0.11:", "10.96.0.12:"];
    lb_testing::backend_sets(bpffs).into_iter().filter(|(f, _)| ours.iter().any(|o| f.starts_with(o))).collect()
}

fn service(name: &str, spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n---\n")
}

/// A slice of `svc` (no label if None) with `rest` (addressType, ports, endpoints).
fn slice(api: &str, name: &str, svc: Option<&str>, rest: &str) -> String {
    let labels = svc.map(|s| format!(", labels: {{kubernetes.io/service-name: {s}}}")).unwrap_or_default();
    format!(
        "apiVersion: {api}\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default{labels}}}\n{rest}\n---\n"
    )
}

fn endpoints(ips: impl IntoIterator<Item = String>) -> String {
    let v: Vec<String> = ips.into_iter().map(|ip| format!("{{addresses: [{ip}]}}")).collect();
    format!("[{}]", v.join(", "))
}

/// The good objects: `web` and `db`, two endpoints each, and `junk`, a valid
/// Service that the malformed slices below claim, with one good slice of 1,000
/// endpoints (the API server's most); `junk2` is not checked.
fn good(api: &str) -> String {
    let big = endpoints((0..1000).map(|i| format!("10.245.{}.{}", i / 250, 1 + i % 250)));
    [
        service("web", "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}"),
        slice(
            api,
            "web-1",
            Some("web"),
            "addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.1.2]}, \
             {addresses: [10.244.1.3], conditions: {ready: true, serving: false, terminating: true}}]",
        ),
        service("db", "{clusterIP: 10.96.0.11, ports: [{port: 5432, protocol: TCP}]}"),
        slice(
            api,
            "db-1",
            Some("db"),
            "addressType: IPv4\nports: [{port: 5432}]\nendpoints: [{addresses: [10.244.2.2], conditions: {}}, \
             {addresses: [10.244.2.3], conditions: {ready: false, serving: true, terminating: true}}, \
             {addresses: [10.244.2.4], conditions: {ready: false}}]",
        ),
        service("junk", "{clusterIP: 10.96.0.12, ports: [{name: p, port: 81}]}"),
        // Claimed by the two malformed slices whose good parts still count.
        service("junk2", "{clusterIP: 10.96.0.13, ports: [{name: p, port: 81}]}"),
        slice(
            api,
            "junk-big",
            Some("junk"),
            &format!("addressType: IPv4\nports: [{{name: p, port: 8081}}]\nendpoints: {big}"),
        ),
    ]
    .concat()
}

/// What the good objects must give: frontend -> backends. `web`: the ready one and
/// the contradictory ready-and-terminating one (kube-proxy reads `ready` alone);
/// `db`: the one with empty conditions (ready) only.
fn want() -> Vec<(String, Vec<String>)> {
    let mut big: Vec<String> = (0..1000).map(|i| format!("10.245.{}.{}:8081", i / 250, 1 + i % 250)).collect();
    big.sort();
    vec![
        ("10.96.0.10:80/TCP".into(), vec!["10.244.1.2:8080".into(), "10.244.1.3:8080".into()]),
        ("10.96.0.11:5432/TCP".into(), vec!["10.244.2.2:5432".into()]),
        ("10.96.0.12:81/TCP".into(), big),
    ]
}

/// One malformed object: its YAML, the reason it must be counted under and the
/// object the issue names.
struct Bad {
    what: &'static str,
    yaml: String,
    reason: &'static str,
    object: &'static str,
}

fn bad(what: &'static str, yaml: String, reason: &'static str, object: &'static str) -> Bad {
    Bad { what, yaml, reason, object }
}

/// Every malformed object, for the file source; the API server takes some of them.
fn malformed(api: &str) -> Vec<Bad> {
    let s = |name, rest: &str| slice(api, name, Some("junk"), rest);
    let s2 = |name, rest: &str| slice(api, name, Some("junk2"), rest);
    let p = "ports: [{name: p, port: 8081}]";
    vec![
        bad(
            "clusterIP not an IP",
            service("b-ip", "{clusterIP: banana, ports: [{port: 80}]}"),
            "invalid_ip",
            "Service default/b-ip",
        ),
        bad(
            "multicast clusterIP",
            service("b-mc", "{clusterIP: 224.0.0.1, ports: [{port: 80}]}"),
            "invalid_ip",
            "Service default/b-mc",
        ),
        bad(
            "service port 0",
            service("b-p0", "{clusterIP: 10.96.0.20, ports: [{port: 0}]}"),
            "invalid_port",
            "Service default/b-p0",
        ),
        bad(
            "service port 65536",
            service("b-p65536", "{clusterIP: 10.96.0.21, ports: [{port: 65536}]}"),
            "invalid_port",
            "Service default/b-p65536",
        ),
        bad(
            "SCTP service port",
            service("b-sctp", "{clusterIP: 10.96.0.22, ports: [{port: 80, protocol: SCTP}]}"),
            "unsupported_protocol",
            "Service default/b-sctp",
        ),
        bad(
            "unknown service protocol",
            service("b-proto", "{clusterIP: 10.96.0.23, ports: [{port: 80, protocol: QUIC}]}"),
            "unsupported_protocol",
            "Service default/b-proto",
        ),
        bad(
            "duplicate service port names",
            service("b-dupname", "{clusterIP: 10.96.0.24, ports: [{name: a, port: 80}, {name: a, port: 81}]}"),
            "duplicate_port",
            "Service default/b-dupname",
        ),
        bad(
            "two unnamed service ports",
            service("b-unnamed", "{clusterIP: 10.96.0.25, ports: [{port: 80}, {port: 81}]}"),
            "duplicate_port",
            "Service default/b-unnamed",
        ),
        bad(
            "service without ports",
            service("b-noports", "{clusterIP: 10.96.0.26}"),
            "missing_field",
            "Service default/b-noports",
        ),
        bad(
            "unknown service type",
            service("b-type", "{type: Magic, clusterIP: 10.96.0.27, ports: [{port: 80}]}"),
            "invalid_service_type",
            "Service default/b-type",
        ),
        bad(
            "service named twice",
            service("web", "{clusterIP: 10.96.0.28, ports: [{port: 80}]}"),
            "duplicate_object",
            "Service default/web",
        ),
        bad(
            "clusterIP of another service",
            service("zz-thief", "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}"),
            "duplicate_frontend",
            "Service default/zz-thief",
        ),
        bad(
            "FQDN slice",
            s("j-fqdn", &format!("addressType: FQDN\n{p}\nendpoints: [{{addresses: [web.example.com]}}]")),
            "invalid_address_type",
            "EndpointSlice default/j-fqdn",
        ),
        bad(
            "unspecified endpoint",
            s("j-zero", &format!("addressType: IPv4\n{p}\nendpoints: [{{addresses: [0.0.0.0]}}]")),
            "invalid_ip",
            "EndpointSlice default/j-zero",
        ),
        bad(
            "loopback endpoint",
            s("j-lo", &format!("addressType: IPv4\n{p}\nendpoints: [{{addresses: [127.0.0.1]}}]")),
            "invalid_ip",
            "EndpointSlice default/j-lo",
        ),
        bad(
            "broadcast endpoint",
            s("j-bcast", &format!("addressType: IPv4\n{p}\nendpoints: [{{addresses: [255.255.255.255]}}]")),
            "invalid_ip",
            "EndpointSlice default/j-bcast",
        ),
        bad(
            "IPv6 address in an IPv4 slice",
            s("j-v6", &format!("addressType: IPv4\n{p}\nendpoints: [{{addresses: ['fd00::1']}}]")),
            "invalid_ip",
            "EndpointSlice default/j-v6",
        ),
        bad(
            "endpoint not an IP",
            s("j-ip", &format!("addressType: IPv4\n{p}\nendpoints: [{{addresses: [10.0.0.300]}}]")),
            "invalid_ip",
            "EndpointSlice default/j-ip",
        ),
        bad(
            "slice port 0",
            s("j-p0", "addressType: IPv4\nports: [{name: p, port: 0}]\nendpoints: [{addresses: [10.244.9.1]}]"),
            "invalid_port",
            "EndpointSlice default/j-p0",
        ),
        bad(
            "slice port 65536",
            s("j-p65536", "addressType: IPv4\nports: [{name: p, port: 65536}]\nendpoints: [{addresses: [10.244.9.2]}]"),
            "invalid_port",
            "EndpointSlice default/j-p65536",
        ),
        bad(
            "SCTP slice port",
            s(
                "j-sctp",
                "addressType: IPv4\nports: [{name: p, port: 8081, protocol: SCTP}]\nendpoints: [{addresses: [10.244.9.3]}]",
            ),
            "unsupported_protocol",
            "EndpointSlice default/j-sctp",
        ),
        bad(
            "duplicate slice ports",
            s2(
                "j-dupport",
                "addressType: IPv4\nports: [{name: p, port: 8081}, {name: p, port: 9999}]\nendpoints: [{addresses: [10.246.0.1]}]",
            ),
            "duplicate_port",
            "EndpointSlice default/j-dupport",
        ),
        bad(
            "endpoint without addresses",
            s("j-noaddr", &format!("addressType: IPv4\n{p}\nendpoints: [{{addresses: []}}]")),
            "missing_field",
            "EndpointSlice default/j-noaddr",
        ),
        bad(
            "the same endpoint twice",
            s2(
                "j-dupep",
                &format!(
                    "addressType: IPv4\n{p}\nendpoints: [{{addresses: [10.246.0.2]}}, {{addresses: [10.246.0.2]}}]"
                ),
            ),
            "duplicate_endpoint",
            "EndpointSlice default/j-dupep",
        ),
        bad(
            "slice without service label",
            slice(api, "j-nolabel", None, &format!("addressType: IPv4\n{p}\nendpoints: []")),
            "unknown_service",
            "EndpointSlice default/j-nolabel",
        ),
        bad(
            "service port without a number",
            service("b-noport", "{clusterIP: 10.96.0.29, ports: [{name: x}]}"),
            "invalid_port",
            "Service default/b-noport",
        ),
        bad(
            "endpoint without an addresses field",
            s("j-noaddrs", &format!("addressType: IPv4\n{p}\nendpoints: [{{conditions: {{ready: true}}}}]")),
            "missing_field",
            "EndpointSlice default/j-noaddrs",
        ),
        bad(
            "slice without addressType",
            s("j-notype", &format!("{p}\nendpoints: []")),
            "invalid_address_type",
            "EndpointSlice default/j-notype",
        ),
        bad(
            "slice of a missing service",
            slice(api, "j-gone", Some("gone"), &format!("addressType: IPv4\n{p}\nendpoints: []")),
            "unknown_service",
            "EndpointSlice default/j-gone",
        ),
    ]
}

/// Objects the file source cannot decode at all (counted in lb_decode_errors_total).
/// Absent required fields are not among them: k8s-openapi decodes them as their
/// defaults (a port 0, no addresses, an empty addressType), which the model reports.
fn undecodable() -> String {
    [
        "apiVersion: v1\nkind: Service\nmetadata: {name: u-spec, namespace: default}\nspec: [1, 2]\n---\n",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: u-eps, namespace: default}\n\
         addressType: IPv4\nendpoints: many\n---\n",
    ]
    .concat()
}

/// Writes `text` to `path` atomically, as a config manager would.
fn write_file(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The series of a /metrics page: `name{labels}` -> value.
fn series(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

fn reason(r: &str) -> String {
    format!("lb_invalid_objects_total{{reason=\"{r}\"}}")
}

#[test]
fn file_source_skips_and_counts_malformed_objects_and_keeps_the_good_ones() -> Result<()> {
    let dir = Scratch::new("malformed-file")?;
    let file = dir.0.join("objects.yaml");
    let api = "discovery.k8s.io/v1";
    let bads = malformed(api);
    // Good ones first, so that the duplicate `web` is the second one.
    let text = format!("{}{}{}", good(api), bads.iter().map(|b| b.yaml.as_str()).collect::<String>(), undecodable());
    write_file(&file, &text)?;

    let ns = Netns::create(format!("lbt-{}-malformed", std::process::id()))?;
    ns.ip(&["link", "set", "lo", "up"])?;
    let bpffs = PrivateBpffs::new()?;
    let status = dir.0.join("status.json");
    let mut cmd = ns.command_net_only(lb());
    cmd.args(["agent", "--file-poll", "20ms", "--metrics-addr", METRICS_ADDR, "--source"])
        .arg(format!("file:{}", file.display()))
        .env("LB_BPFFS", bpffs.path())
        .env("LB_STATUS_FILE", &status);
    let agent = AgentProcess::spawn(cmd, &dir.0.join("agent.log"), &status)?;
    let metrics = || -> Result<BTreeMap<String, f64>> {
        ns.run(|| {
            let addr: SocketAddr = METRICS_ADDR.parse()?;
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).context("connect /metrics")?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: lb\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(series(&body))
        })
    };
    let programmed = || checked(bpffs.path());
    agent
        .wait_for("the good services", Duration::from_secs(30), || (programmed() == want()).then_some(()))
        .with_context(|| {
            format!("programmed {:?}", programmed().iter().map(|(f, b)| (f, b.len())).collect::<Vec<_>>())
        })?;
    let st = agent.wait_status("ready", Duration::from_secs(10), |s| s.ready && s.invalid_objects > 0)?;

    // Every reason counted at least as often as objects were broken for it.
    let m = metrics()?;
    let mut by_reason: BTreeMap<&str, f64> = BTreeMap::new();
    for b in &bads {
        *by_reason.entry(b.reason).or_default() += 1.0;
    }
    for (r, n) in &by_reason {
        let got = m.get(&reason(r)).copied().unwrap_or(0.0);
        ensure!(got >= *n, "{r}: {got} counted, {n} objects broken that way; {m:#?}");
    }
    let decode = m.get("lb_decode_errors_total{source=\"file\"}").copied();
    ensure!(decode == Some(2.0), "decode errors {decode:?}; {m:#?}");
    // Each object once (the log names only the first 20 new ones of a sync).
    ensure!(st.invalid_objects >= bads.len(), "{} issues for {} malformed objects", st.invalid_objects, bads.len());
    let first_counts: BTreeMap<String, f64> =
        m.into_iter().filter(|(k, _)| k.starts_with("lb_invalid_objects_total")).collect();
    eprintln!(
        "file source: {} malformed + 2 undecodable objects, {} issues; {:?}",
        bads.len(),
        st.invalid_objects,
        first_counts.iter().filter(|(_, v)| **v > 0.0).collect::<Vec<_>>()
    );

    // Invalid YAML: the last good state stays, the error is shown, the counts stay.
    write_file(
        &file,
        &format!("{text}---\nkind: [Service\n---\n{}", service("late", "{clusterIP: 10.96.0.40, ports: [{port: 80}]}")),
    )?;
    agent.wait_status("the YAML error", Duration::from_secs(10), |s| s.source_error.is_some())?;
    let m = metrics()?;
    ensure!(m.get("lb_source_error") == Some(&1.0), "{m:#?}");
    ensure!(programmed() == want(), "the last good state is kept");
    let counts: BTreeMap<String, f64> =
        m.into_iter().filter(|(k, _)| k.starts_with("lb_invalid_objects_total")).collect();
    ensure!(counts == first_counts, "an unreadable file counts nothing: {counts:?} vs {first_counts:?}");

    // More garbage, valid YAML: new issues counted, the good Services untouched.
    let more = [
        service("c-ip", "{clusterIP: 10.96.0.300, ports: [{port: 80}]}"),
        service("c-lo", "{clusterIP: 127.0.0.2, ports: [{port: 80}]}"),
        slice(
            api,
            "j-mc",
            Some("junk"),
            "addressType: IPv4\nports: [{name: p, port: 8081}]\nendpoints: [{addresses: [239.1.1.1]}]",
        ),
        slice(api, "j-unknowntype", Some("junk"), "addressType: IPv5\nports: []\nendpoints: []"),
        "--- 42\n---\n\"just a string\"\n---\n".into(),
    ]
    .concat();
    write_file(&file, &format!("{text}{more}"))?;
    agent.wait_status("the fixed file", Duration::from_secs(10), |s| s.source_error.is_none())?;
    let m = agent.wait_for("the new issues", Duration::from_secs(10), || {
        let m = metrics().ok()?;
        let ip = m.get(&reason("invalid_ip")).copied()?;
        let at = m.get(&reason("invalid_address_type")).copied()?;
        (ip >= first_counts[&reason("invalid_ip")] + 3.0 && at >= first_counts[&reason("invalid_address_type")] + 1.0)
            .then_some(m)
    })?;
    ensure!(programmed() == want(), "good services changed");
    ensure!(m.get("lb_source_error") == Some(&0.0), "{m:#?}");
    let st = agent.status().context("status")?;
    ensure!(st.ready && st.frontends >= 4, "{st:?}");
    eprintln!("after more garbage: {} issues, agent pid {} alive", st.invalid_objects, agent.pid());
    Ok(())
}

/// The same objects through a real API server (1.20.2, v1beta1 EndpointSlices): the
/// ones it accepts reach the agent, which skips and counts them; the ones it refuses
/// are listed (docs/reliability.md records them).
#[test]
fn api_server_objects_malformed_ones_are_skipped_and_counted() -> Result<()> {
    require_kube!();
    let cluster = Cluster::up("malformed", 17603, false)?;
    let api = "discovery.k8s.io/v1beta1";
    cluster.kubectl(&["create", "-f", "-"], Some(&good(api)))?;
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for b in malformed(api) {
        match cluster.kubectl(&["create", "--validate=false", "-f", "-"], Some(&b.yaml)) {
            Ok(_) => accepted.push(b),
            Err(e) => {
                let e = format!("{e:#}");
                let why = e.lines().find(|l| l.contains("invalid") || l.contains("Invalid") || l.contains("exists"));
                refused.push((b.what, why.unwrap_or(e.lines().next().unwrap_or_default()).trim().to_string()));
            }
        }
    }
    let args = [OsStr::new("agent"), OsStr::new("--source"), OsStr::new("kubernetes"), OsStr::new("--kubeconfig")];
    let mut args: Vec<&OsStr> = args.to_vec();
    args.push(cluster.kubeconfig.as_os_str());
    let agent = AgentProcess::private(Path::new(lb()), "malformed", &args, "info")?;
    let programmed = || checked(agent.bpffs().expect("a private bpffs"));
    agent
        .wait_for("the good services", Duration::from_secs(30), || (programmed() == want()).then_some(()))
        .with_context(|| {
            format!("programmed {:?}", programmed().iter().map(|(f, b)| (f, b.len())).collect::<Vec<_>>())
        })?;
    agent.wait_for("every accepted object's issue", Duration::from_secs(20), || {
        let log = agent.log_text();
        accepted
            .iter()
            .all(|b| {
                log.lines().any(|l| {
                    l.contains(&format!("kind=\"{}\"", b.reason)) && l.contains(&format!("object={}", b.object))
                })
            })
            .then_some(())
    })?;
    let st = agent.status().context("status")?;
    ensure!(st.ready && st.invalid_objects >= accepted.len(), "{st:?}");
    ensure!(!accepted.is_empty(), "the API server refused everything: {refused:?}");
    eprintln!(
        "API server 1.20.2 (kubectl --validate=false) accepted {} malformed objects, each skipped and counted by the agent:",
        accepted.len()
    );
    for b in &accepted {
        eprintln!("  accepted: {} -> {}", b.what, b.reason);
    }
    eprintln!("and refused {}:", refused.len());
    for (what, why) in &refused {
        eprintln!("  refused: {what}: {why}");
    }
    Ok(())
}
