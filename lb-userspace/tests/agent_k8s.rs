//! `lb agent --source kubernetes` against a real kube-apiserver 1.20.2 (from
//! `cargo xtask kube up`, on 127.0.0.1 only): create, update and delete of Services
//! and EndpointSlices ending in the expected map contents; the v1beta1 fallback on the
//! plain 1.20 server; the v1 path through the CRD stand-in; an API server restart in
//! the middle; a scale from 1 to 50 endpoints and back.
//!
//! The agent runs in the root network namespace but attaches nothing (no `--iface`):
//! it only writes maps, on a private bpffs.
//!
//! Skipped, with a message, when the Kubernetes binaries have not been built
//! (`cargo xtask kube build`); CI builds them.

use std::{
    ffi::OsStr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_testing::{
    agent::AgentProcess,
    kube::{Cluster, kube_bin_dir},
    require_kube,
};
use lb_userspace::agent::AgentStatus;

/// A running agent on a private bpffs, killed on drop.
struct Agent(AgentProcess);

impl Agent {
    fn start(cluster: &Cluster, name: &str) -> Result<Self> {
        let args = [OsStr::new("agent"), OsStr::new("--source"), OsStr::new("kubernetes"), OsStr::new("--kubeconfig")];
        let mut args: Vec<&OsStr> = args.to_vec();
        args.push(cluster.kubeconfig.as_os_str());
        let agent = Self(AgentProcess::private(
            Path::new(env!("CARGO_BIN_EXE_lb")),
            &format!("k8s-{name}"),
            &args,
            "info,lb_userspace=debug",
        )?);
        agent.0.wait_status("initial sync", Duration::from_secs(30), |s| s.ready)?;
        Ok(agent)
    }
    fn state(&self) -> Option<AgentStatus> {
        self.0.status()
    }
    fn log_text(&self) -> String {
        self.0.log_text()
    }
    fn bpffs(&self) -> &Path {
        self.0.bpffs().expect("a private bpffs")
    }
    /// frontend -> sorted backends.
    fn programmed(&self) -> Vec<(String, Vec<String>)> {
        self.0.programmed()
    }
    fn wait(&self, what: &str, timeout: Duration, mut ok: impl FnMut(&Self) -> bool) -> Result<Duration> {
        let t0 = Instant::now();
        self.0
            .wait_for(what, timeout, || ok(self).then_some(()))
            .with_context(|| format!("programmed {:#?}", self.programmed()))?;
        Ok(t0.elapsed())
    }
    /// Waits until the maps hold exactly `want` (besides the `kubernetes` service).
    fn expect(&self, what: &str, want: &[(&str, &[&str])]) -> Result<Duration> {
        let want: Vec<(String, Vec<String>)> =
            want.iter().map(|(f, b)| (f.to_string(), b.iter().map(|s| s.to_string()).collect())).collect();
        self.wait(what, Duration::from_secs(20), |a| {
            let got: Vec<_> = a.programmed().into_iter().filter(|(f, _)| !f.starts_with("10.96.0.1:443")).collect();
            got == want
        })
    }
}

fn service(name: &str, ip: &str, ports: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  ports: {ports}\n{extra}---\n"
    )
}

/// An EndpointSlice of `svc` in `api_version`, with `eps` as (address, ready).
fn slice(api_version: &str, name: &str, svc: &str, ports: &str, eps: &[(String, bool)]) -> String {
    let mut s = format!(
        "apiVersion: {api_version}\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: {ports}\nendpoints:"
    );
    if eps.is_empty() {
        s.push_str(" []\n");
    } else {
        s.push('\n');
        for (a, ready) in eps {
            s.push_str(&format!("- addresses: [{a}]\n  conditions: {{ready: {ready}}}\n"));
        }
    }
    s.push_str("---\n");
    s
}

fn eps(n: usize) -> Vec<(String, bool)> {
    (0..n).map(|i| (format!("10.244.{}.{}", 1 + i / 200, 2 + i % 200), true)).collect()
}

fn backends(n: usize, port: u16) -> Vec<String> {
    let mut v: Vec<String> = eps(n).into_iter().map(|(a, _)| format!("{a}:{port}")).collect();
    v.sort();
    v
}

const WEB_PORTS: &str =
    "[{name: http, port: 80, targetPort: web}, {name: dns, port: 53, protocol: UDP, targetPort: dns}]";
const WEB_SLICE_PORTS: &str = "[{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]";

/// The scenario shared by both API versions.
fn lifecycle(cluster: &Cluster, agent: &Agent, api_version: &str) -> Result<()> {
    // Create: a two-port service with named targetPorts, one ready and one not ready
    // endpoint.
    cluster.apply(&format!(
        "{}{}",
        service("web", "10.96.100.10", WEB_PORTS, ""),
        slice(
            api_version,
            "web-a",
            "web",
            WEB_SLICE_PORTS,
            &[("10.244.1.2".into(), true), ("10.244.1.3".into(), false)]
        )
    ))?;
    agent.expect(
        "create",
        &[("10.96.100.10:53/UDP", &["10.244.1.2:5353"]), ("10.96.100.10:80/TCP", &["10.244.1.2:8080"])],
    )?;

    // Update the slice: the second endpoint becomes ready, a second slice adds one more.
    cluster.apply(&format!(
        "{}{}",
        slice(
            api_version,
            "web-a",
            "web",
            WEB_SLICE_PORTS,
            &[("10.244.1.2".into(), true), ("10.244.1.3".into(), true)]
        ),
        slice(api_version, "web-b", "web", WEB_SLICE_PORTS, &[("10.244.1.4".into(), true)])
    ))?;
    agent.expect(
        "slice update",
        &[
            ("10.96.100.10:53/UDP", &["10.244.1.2:5353", "10.244.1.3:5353", "10.244.1.4:5353"]),
            ("10.96.100.10:80/TCP", &["10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.4:8080"]),
        ],
    )?;

    // Update the service: affinity on, and a port change (80 -> 8000).
    cluster.apply(&service(
        "web",
        "10.96.100.10",
        "[{name: http, port: 8000, targetPort: web}, {name: dns, port: 53, protocol: UDP, targetPort: dns}]",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
    ))?;
    agent.expect(
        "port change",
        &[
            ("10.96.100.10:53/UDP", &["10.244.1.2:5353", "10.244.1.3:5353", "10.244.1.4:5353"]),
            ("10.96.100.10:8000/TCP", &["10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.4:8080"]),
        ],
    )?;
    let rows = lb_userspace::inspect::services(agent.bpffs())?;
    assert!(
        rows.iter().filter(|r| r.frontend.starts_with("10.96.100.10")).all(|r| r.affinity_timeout_s == Some(60)),
        "{rows:#?}"
    );

    // A slice for a service that does not exist: counted, the rest unaffected.
    cluster.apply(&slice(api_version, "ghost-a", "ghost", WEB_SLICE_PORTS, &[("10.244.9.9".into(), true)]))?;
    agent.wait("unknown service counted", Duration::from_secs(20), |a| {
        a.state().is_some_and(|s| s.invalid_objects == 1)
    })?;
    cluster.kubectl(&["delete", "endpointslice", "ghost-a"], None)?;

    // Delete the slices: no endpoints (frontends stay, rejecting); then the service.
    cluster.kubectl(&["delete", "endpointslice", "web-a", "web-b"], None)?;
    agent.expect("slices deleted", &[("10.96.100.10:53/UDP", &[]), ("10.96.100.10:8000/TCP", &[])])?;
    cluster.kubectl(&["delete", "service", "web"], None)?;
    agent.expect("service deleted", &[])?;

    // Delete and create again: it works the second time too, with a fresh service id.
    cluster.apply(&format!(
        "{}{}",
        service("web", "10.96.100.10", WEB_PORTS, ""),
        slice(api_version, "web-a", "web", WEB_SLICE_PORTS, &[("10.244.1.7".into(), true)])
    ))?;
    agent.expect(
        "re-created",
        &[("10.96.100.10:53/UDP", &["10.244.1.7:5353"]), ("10.96.100.10:80/TCP", &["10.244.1.7:8080"])],
    )?;
    Ok(())
}

/// Scale 1 -> 50 -> 1 endpoints in one slice; returns how long each step took to land.
fn scale(cluster: &Cluster, agent: &Agent, api_version: &str) -> Result<Vec<Duration>> {
    let ports = "[{name: http, port: 80}]";
    let slice_ports = "[{name: http, port: 8080, protocol: TCP}]";
    cluster.apply(&service("scale", "10.96.100.50", ports, ""))?;
    let mut took = Vec::new();
    for n in [1usize, 50, 1] {
        let t0 = Instant::now();
        cluster.apply(&slice(api_version, "scale-a", "scale", slice_ports, &eps(n)))?;
        let want = backends(n, 8080);
        let want_ref: Vec<&str> = want.iter().map(String::as_str).collect();
        agent.expect(
            &format!("scale to {n}"),
            &[
                ("10.96.100.10:53/UDP", &["10.244.1.7:5353"]),
                ("10.96.100.10:80/TCP", &["10.244.1.7:8080"]),
                ("10.96.100.50:80/TCP", &want_ref),
            ],
        )?;
        took.push(t0.elapsed());
    }
    Ok(took)
}

#[test]
fn v1beta1_fallback_on_a_plain_1_20_server() -> Result<()> {
    require_kube!();
    let cluster = Cluster::up("v1beta1", 17543, false)?;
    let agent = Agent::start(&cluster, "v1beta1")?;
    assert!(agent.log_text().contains("discovery.k8s.io/v1beta1"), "{}", agent.log_text());
    assert!(agent.state().is_some_and(|s| s.source.contains("v1beta1")));
    lifecycle(&cluster, &agent, "discovery.k8s.io/v1beta1")?;
    let took = scale(&cluster, &agent, "discovery.k8s.io/v1beta1")?;
    eprintln!("scale 1 -> 50 -> 1 landed after {took:?} (including kubectl)");

    // API server restart in the middle: while it is down the maps keep the last good
    // state; afterwards the watches resume (re-listing if needed) and changes land.
    let before = agent.programmed();
    cluster.restart_apiserver(|| {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(agent.programmed(), before, "maps changed while the API server was down");
        Ok(())
    })?;
    cluster.apply(&slice(
        "discovery.k8s.io/v1beta1",
        "scale-a",
        "scale",
        "[{name: http, port: 8080, protocol: TCP}]",
        &eps(3),
    ))?;
    let want = backends(3, 8080);
    let want_ref: Vec<&str> = want.iter().map(String::as_str).collect();
    let t = agent.expect(
        "change after the API server restart",
        &[
            ("10.96.100.10:53/UDP", &["10.244.1.7:5353"]),
            ("10.96.100.10:80/TCP", &["10.244.1.7:8080"]),
            ("10.96.100.50:80/TCP", &want_ref),
        ],
    )?;
    eprintln!("first change after the API server restart landed after {t:?}");
    assert!(agent.log_text().contains("watch failed"), "the outage should have been noticed");
    Ok(())
}

#[test]
fn v1_through_the_crd_stand_in() -> Result<()> {
    require_kube!();
    let cluster = Cluster::up("v1", 17553, true)?;
    let agent = Agent::start(&cluster, "v1")?;
    assert!(agent.log_text().contains("api=\"discovery.k8s.io/v1\""), "{}", agent.log_text());
    lifecycle(&cluster, &agent, "discovery.k8s.io/v1")?;
    scale(&cluster, &agent, "discovery.k8s.io/v1")?;
    drop(agent);
    no_secret_in_logs_or_status(&cluster)?;
    Ok(())
}

/// The kubeconfig's bearer token shows nowhere the agent writes: not in its log at
/// `trace` for every crate (kube-rs, hyper, tower, rustls), neither with the right
/// token nor with a wrong one that the API server refuses (the error path), and not
/// in `lb status`.
fn no_secret_in_logs_or_status(cluster: &Cluster) -> Result<()> {
    let kubeconfig = std::fs::read_to_string(&cluster.kubeconfig)?;
    let token = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .map(|t| t.trim_matches('"').to_string())
        .context("the test kubeconfig has a token")?;
    ensure!(token.len() >= 16, "token {token:?} too short to search for");
    let wrong_token = format!("{token}ffffwrong");
    let wrong = std::env::temp_dir().join(format!("lb-k8s-wrong-token-{}.yaml", std::process::id()));
    std::fs::write(&wrong, kubeconfig.replace(&token, &wrong_token))?;
    for (kc, secret, ok) in [(&cluster.kubeconfig, &token, true), (&wrong, &wrong_token, false)] {
        let args = [OsStr::new("agent"), OsStr::new("--source=kubernetes"), OsStr::new("--kubeconfig"), kc.as_os_str()];
        let agent = AgentProcess::private(Path::new(env!("CARGO_BIN_EXE_lb")), "k8s-secrets", &args, "trace")?;
        if ok {
            agent.wait_status("initial sync", Duration::from_secs(30), |s| s.ready)?;
        } else {
            agent.wait_for("the API server refusing the token", Duration::from_secs(30), || {
                agent.log_text().contains("401").then_some(())
            })?;
        }
        let log = agent.log_text();
        ensure!(log.len() > 1000, "a trace log this short shows nothing: {log}");
        ensure!(!log.contains(secret.as_str()), "the bearer token is in the agent's log");
        let status = Command::new(env!("CARGO_BIN_EXE_lb"))
            .args(["status", "-o", "json"])
            .env("LB_BPFFS", agent.bpffs().expect("private"))
            .env("LB_STATUS_FILE", agent.status_path())
            .output()?;
        let status = String::from_utf8_lossy(&status.stdout).to_string() + &String::from_utf8_lossy(&status.stderr);
        ensure!(!status.is_empty(), "lb status printed nothing");
        ensure!(!status.contains(secret.as_str()), "the bearer token is in `lb status`: {status}");
    }
    let _ = std::fs::remove_file(&wrong);
    Ok(())
}

/// deploy/lb-agent.yaml: the API server accepts it, its RBAC lets the agent's service
/// account list and watch what the agent watches (and nothing it should not write),
/// and every LB_* variable it sets is a real `lb agent` flag.
#[test]
fn daemonset_manifest_is_valid_and_its_rbac_suffices() -> Result<()> {
    require_kube!();
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/lb-agent.yaml"))?;
    let help = Command::new(env!("CARGO_BIN_EXE_lb")).args(["agent", "--help"]).output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    let vars: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- {name: "))
        .filter_map(|l| l.split(',').next())
        .filter(|v| v.starts_with("LB_"))
        .collect();
    ensure!(vars.len() >= 6, "found only {vars:?} in the manifest");
    for v in &vars {
        ensure!(help.contains(&format!("[env: {v}=")), "{v} is not a flag of `lb agent`");
    }

    let cluster = Cluster::up("manifest", 17583, false)?;
    cluster.kubectl(&["apply", "-f", "-"], Some(&manifest))?;
    let sa = "system:serviceaccount:kube-system:lb-agent";
    for (verb, resource, want) in [
        ("list", "services", "yes"),
        ("watch", "services", "yes"),
        ("list", "endpointslices.discovery.k8s.io", "yes"),
        ("watch", "endpointslices.discovery.k8s.io", "yes"),
        ("create", "services", "no"),
        ("list", "secrets", "no"),
    ] {
        // `kubectl auth can-i` exits 1 for "no"; read its answer instead.
        let out = Command::new(kube_bin_dir().join("kubectl"))
            .arg(format!("--kubeconfig={}", cluster.kubeconfig.display()))
            .args(["auth", "can-i", verb, resource, "--as", sa])
            .output()?;
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(got == want, "can-i {verb} {resource} as {sa}: {got:?}, want {want}");
    }
    let ds = cluster.kubectl(&["-n", "kube-system", "get", "daemonset", "lb-agent", "-o", "name"], None)?;
    ensure!(ds.trim() == "daemonset.apps/lb-agent", "{ds}");
    Ok(())
}
