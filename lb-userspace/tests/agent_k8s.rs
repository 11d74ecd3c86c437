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
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_userspace::{agent::AgentStatus, inspect, testing::PrivateBpffs};

fn kube_bin_dir() -> PathBuf {
    let cache =
        std::env::var_os("LB_KUBE_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/cache/lb/kube-1.20.2".into());
    cache.join("bin")
}

fn binaries_built() -> bool {
    ["etcd", "kube-apiserver", "kubectl"].iter().all(|b| kube_bin_dir().join(b).is_file())
}

macro_rules! require_kube {
    () => {
        if !binaries_built() {
            eprintln!(
                "SKIPPED: Kubernetes binaries not found in {}; run `cargo xtask kube build` (about 5 min) to enable this test",
                kube_bin_dir().display()
            );
            return Ok(());
        }
    };
}

/// The xtask binary (built by `cargo xtask ...`), or `cargo run -p xtask`.
fn xtask() -> Command {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let bin = std::env::var_os("LB_XTASK").map(PathBuf::from).unwrap_or_else(|| target.join("debug/xtask"));
    if bin.is_file() {
        Command::new(bin)
    } else {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.current_dir(root).args(["run", "--quiet", "--package", "xtask", "--"]);
        c
    }
}

/// A control plane from `xtask kube up`, taken down on drop.
struct Cluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn up(name: &str, port: u16, v1_crd: bool) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("lb-kube-{name}-{}", std::process::id()));
        let mut c = xtask();
        c.args(["kube", "up", "--no-controllers", "--port", &port.to_string(), "--dir"]).arg(&dir);
        if v1_crd {
            c.arg("--v1-crd");
        }
        let out = c.output().context("running `xtask kube up`")?;
        if !out.status.success() {
            bail!(
                "xtask kube up failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self { kubeconfig: dir.join("kubeconfig"), dir })
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut c = Command::new(kube_bin_dir().join("kubectl"));
        c.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().context("running kubectl")?;
        if let (Some(text), Some(mut si)) = (stdin, child.stdin.take()) {
            si.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn apply(&self, yaml: &str) -> Result<()> {
        self.kubectl(&["apply", "-f", "-"], Some(yaml)).map(drop)
    }

    /// Stops kube-apiserver (SIGTERM, SIGKILL after 2 s, as `xtask kube` does), runs
    /// `while_down`, then starts it again with the same command line and waits for it.
    fn restart_apiserver(&self, while_down: impl FnOnce() -> Result<()>) -> Result<()> {
        let pid_file = self.dir.join("kube-apiserver.pid");
        let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
        let cmdline: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))?
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        // SAFETY: signalling the API server process of our own test cluster.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t0 = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() {
            if t0.elapsed() > Duration::from_secs(2) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        while_down()?;
        let log = std::fs::OpenOptions::new().append(true).open(self.dir.join("kube-apiserver.log"))?;
        let st = Command::new("setsid")
            .args(["-f", "sh", "-c", "echo $$ > \"$0\"; exec \"$@\""])
            .arg(&pid_file)
            .args(&cmdline)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()?;
        if !st.success() {
            bail!("restarting kube-apiserver failed");
        }
        let t0 = Instant::now();
        while self.kubectl(&["get", "--raw", "/readyz"], None).is_err() {
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("kube-apiserver not ready after restart");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = xtask().args(["kube", "down", "--dir"]).arg(&self.dir).output();
    }
}

/// A running agent on a private bpffs, killed on drop.
struct Agent {
    child: Child,
    log: PathBuf,
    status: PathBuf,
    bpffs: PrivateBpffs,
}

impl Agent {
    fn start(cluster: &Cluster, name: &str) -> Result<Self> {
        let bpffs = PrivateBpffs::new()?;
        let log = std::env::temp_dir().join(format!("lb-agent-k8s-{name}-{}.log", std::process::id()));
        let status = std::env::temp_dir().join(format!("lb-agent-k8s-{name}-{}.json", std::process::id()));
        let f = std::fs::File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_lb"))
            .args(["agent", "--source", "kubernetes", "--kubeconfig"])
            .arg(&cluster.kubeconfig)
            .env("LB_BPFFS", bpffs.path())
            .env("LB_STATUS_FILE", &status)
            .env("LB_LOG", "info,lb_userspace=debug")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()?;
        let agent = Self { child, log, status, bpffs };
        agent.wait("initial sync", Duration::from_secs(30), |_| agent.state().is_some_and(|s| s.ready))?;
        Ok(agent)
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn state(&self) -> Option<AgentStatus> {
        serde_json::from_slice(&std::fs::read(&self.status).ok()?).ok()
    }
    /// frontend -> sorted backends.
    fn programmed(&self) -> Vec<(String, Vec<String>)> {
        inspect::backend_sets(self.bpffs.path())
    }
    fn wait(&self, what: &str, timeout: Duration, mut ok: impl FnMut(&Self) -> bool) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            if ok(self) {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > timeout {
                bail!(
                    "timed out waiting for {what}; programmed {:#?}\nagent log:\n{}",
                    self.programmed(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.status);
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
    let rows = inspect::services(agent.bpffs.path())?;
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
    Ok(())
}

/// `bench_agent` in small (a smoke test of the benchmark code); the full size with
/// `LB_BENCH_AGENT_FULL=1` (1,000 changes, 10,000 services x 10 endpoints), and
/// `LB_BENCH_AGENT_LB=target/release/lb` for numbers worth reporting.
#[test]
fn bench_agent_runs() -> Result<()> {
    require_kube!();
    let cluster = Cluster::up("bench", 17563, false)?;
    let mut opts = lb_userspace::bench_agent::BenchOpts::new(&cluster.kubeconfig, env!("CARGO_BIN_EXE_lb"));
    // The agent binary to measure, e.g. target/release/lb (default: this build's).
    if let Some(lb) = std::env::var_os("LB_BENCH_AGENT_LB") {
        opts.lb = lb.into();
    }
    let full = std::env::var_os("LB_BENCH_AGENT_FULL").is_some();
    if !full {
        opts.changes = 50;
        opts.services = 100;
    }
    let report = lb_userspace::bench_agent::run(&opts)?;
    eprintln!("{}", report.table());
    assert_eq!(report.latency.changes, opts.changes);
    assert!(report.full_sync.initial_sync_writes >= opts.services * (opts.endpoints + 1));
    if full {
        // The target. Holding the slices as k8s-openapi structs gave ~103 MB;
        // the model's compact `Slice` ~57 MB (v1beta1, release build).
        assert!(report.full_sync.rss_mb < 100.0, "agent RSS {:.1} MB at full size", report.full_sync.rss_mb);
    }
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
