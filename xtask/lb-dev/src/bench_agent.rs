//! `cargo xtask bench agent`: how fast and how lean the agent is against a real API
//! server.
//!
//! - **Network programming latency**: from the start of a write to the API server (an
//!   EndpointSlice update that swaps one endpoint) until the BPF map holds it, for
//!   `changes` changes one after another; p50, p99, max.
//! - **Full sync**: `services` Services of `endpoints` endpoints each are created in
//!   the API server, then a fresh agent is started on empty maps: the time until it
//!   has programmed all of them, its initial sync alone, and its RSS.
//!
//! The caller brings the API server (`cargo xtask kube up --no-controllers`) and the
//! `lb` binary; everything the bench creates lives in the namespace `lb-bench`, which
//! is deleted at the end.

use std::{
    ffi::OsStr,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use lb_common::BackendKey;
use serde::Serialize;
use serde_json::json;

use lb_testing::agent::AgentProcess;
use lb_userspace::agent::{
    AgentStatus,
    k8s::{self, SliceApi},
    model::{FrontendKey, Protocol},
    sync::BpfMaps,
};

const NS: &str = "lb-bench";

#[derive(Clone, Debug)]
pub struct BenchOpts {
    pub kubeconfig: PathBuf,
    /// The `lb` binary to run as the agent.
    pub lb: PathBuf,
    pub changes: usize,
    pub services: usize,
    pub endpoints: usize,
    /// Concurrent API requests while creating the full-sync objects.
    pub concurrency: usize,
}

impl BenchOpts {
    pub fn new(kubeconfig: impl Into<PathBuf>, lb: impl Into<PathBuf>) -> Self {
        Self {
            kubeconfig: kubeconfig.into(),
            lb: lb.into(),
            changes: 1000,
            services: 10_000,
            endpoints: 10,
            concurrency: 16,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub changes: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FullSync {
    pub services: usize,
    pub endpoints: usize,
    /// Creating the objects in the API server (not the agent's time).
    pub api_create_s: f64,
    /// Agent start to all frontends in the maps (load, list, compute, write).
    pub ready_s: f64,
    /// The initial compute-and-write alone, as the agent reports it.
    pub initial_sync_s: f64,
    pub initial_sync_writes: usize,
    pub rss_mb: f64,
    pub peak_rss_mb: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub slice_api: String,
    pub latency: Latency,
    pub full_sync: FullSync,
}

impl Report {
    pub fn table(&self) -> String {
        let l = &self.latency;
        let f = &self.full_sync;
        format!(
            "EndpointSlice API: {}\n\
             network programming latency over {} changes: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target p99 < 50 ms)\n\
             full sync of {} services x {} endpoints: ready {:.2} s after start, initial sync {:.3} s ({} map writes) (target < 2 s)\n\
             agent RSS {:.1} MB, peak {:.1} MB (target < 100 MB); creating the objects in the API server took {:.1} s\n",
            self.slice_api,
            l.changes,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.max_ms,
            f.services,
            f.endpoints,
            f.ready_s,
            f.initial_sync_s,
            f.initial_sync_writes,
            f.rss_mb,
            f.peak_rss_mb,
            f.api_create_s
        )
    }
}

/// Runs both benchmarks. Blocking; makes its own tokio runtime.
pub fn run(opts: &BenchOpts) -> Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run_async(opts))
}

/// `lb agent --source kubernetes` on a private bpffs ([`AgentProcess::private`]).
fn start_agent(opts: &BenchOpts, tag: &str) -> Result<AgentProcess> {
    let args = [OsStr::new("agent"), OsStr::new("--source"), OsStr::new("kubernetes"), OsStr::new("--kubeconfig")];
    let mut args: Vec<&OsStr> = args.to_vec();
    args.push(opts.kubeconfig.as_os_str());
    AgentProcess::private(&opts.lb, &format!("bench-{tag}"), &args, "warn,lb_userspace::agent=info")
        .with_context(|| format!("starting {}", opts.lb.display()))
}

/// Waits for the agent's status without holding up the runtime's other tasks.
fn wait_status(
    agent: &AgentProcess,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&AgentStatus) -> bool,
) -> Result<AgentStatus> {
    tokio::task::block_in_place(|| agent.wait_status(what, timeout, ok))
}

pub(crate) fn slice_resource(api: SliceApi) -> ApiResource {
    let version = match api {
        SliceApi::V1 => "v1",
        SliceApi::V1beta1 => "v1beta1",
    };
    ApiResource {
        group: "discovery.k8s.io".into(),
        version: version.into(),
        api_version: api.api_version().into(),
        kind: "EndpointSlice".into(),
        plural: "endpointslices".into(),
    }
}

fn slice_json(api: SliceApi, name: &str, svc: &str, addrs: &[Ipv4Addr]) -> serde_json::Value {
    json!({
        "apiVersion": api.api_version(), "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": addrs.iter().map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}})).collect::<Vec<_>>(),
    })
}

fn service_json(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

async fn ensure_namespace(client: &Client) -> Result<()> {
    ensure_namespace_named(client, NS).await
}

/// Creates the namespace `ns`, waiting for a previous run's to finish terminating.
pub(crate) async fn ensure_namespace_named(client: &Client, ns: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    // A previous run's namespace may still be terminating.
    let t0 = Instant::now();
    loop {
        match api.get_opt(ns).await? {
            None => break,
            Some(ns) if ns.metadata.deletion_timestamp.is_none() => return Ok(()),
            Some(_) if t0.elapsed() > Duration::from_secs(120) => bail!("namespace {ns} still terminating"),
            Some(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let ns: Namespace =
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))?;
    api.create(&PostParams::default(), &ns).await?;
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run_async(opts: &BenchOpts) -> Result<Report> {
    let client = k8s::client(Some(&opts.kubeconfig)).await?;
    let api = k8s::detect_slice_api(&client).await?;
    ensure_namespace(&client).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let slices: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &slice_resource(api));

    // --- Network programming latency ---------------------------------------------
    let svc: Service = serde_json::from_value(service_json("latency"))?;
    let svc = services.create(&PostParams::default(), &svc).await.context("creating the latency Service")?;
    let vip: Ipv4Addr = svc.spec.and_then(|s| s.cluster_ip).context("no clusterIP")?.parse()?;
    let base = Ipv4Addr::new(10, 250, 0, 1);
    let first: DynamicObject = serde_json::from_value(slice_json(api, "latency-1", "latency", &[base]))?;
    slices.create(&PostParams::default(), &first).await?;

    let agent = start_agent(opts, "latency")?;
    wait_status(&agent, "initial sync", Duration::from_secs(60), |s| s.ready)?;
    let maps = BpfMaps::open(agent.bpffs().context("a private bpffs")?)?;
    let key = FrontendKey { ip: vip, port: 80, proto: Protocol::Tcp }.map_key();
    let holds = |addr: Ipv4Addr| -> bool {
        let Ok(v) = maps.services.get(&key, 0) else { return false };
        let want = u32::from_ne_bytes(addr.octets());
        (1..=v.count)
            .any(|slot| maps.backends.get(&BackendKey { svc_id: v.id, slot }, 0).is_ok_and(|b| b.addr_be == want))
    };
    let mut lat = Vec::with_capacity(opts.changes);
    for i in 0..opts.changes {
        let new = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 251, 0, 0)) + i as u32 + 1);
        let patch = json!({"endpoints": [
            {"addresses": [base.to_string()], "conditions": {"ready": true}},
            {"addresses": [new.to_string()], "conditions": {"ready": true}},
        ]});
        let t0 = Instant::now();
        slices.patch("latency-1", &PatchParams::default(), &Patch::Merge(&patch)).await?;
        while !holds(new) {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("change {i} did not reach the map within 30 s");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    drop(maps);
    drop(agent);
    let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
    lat.sort_by(f64::total_cmp);
    let latency = Latency {
        changes: lat.len(),
        p50_ms: percentile(&lat, 50.0),
        p90_ms: percentile(&lat, 90.0),
        p99_ms: percentile(&lat, 99.0),
        max_ms: lat.last().copied().unwrap_or(0.0),
        mean_ms: mean,
    };

    // --- Full sync -----------------------------------------------------------------
    let t0 = Instant::now();
    let n = opts.services;
    let per = opts.endpoints;
    let results: Vec<Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                let name = format!("s{i}");
                let svc: Service = serde_json::from_value(service_json(&name))?;
                services
                    .create(&PostParams::default(), &svc)
                    .await
                    .with_context(|| format!("creating Service {name}"))?;
                let addrs: Vec<Ipv4Addr> = (0..per)
                    .map(|j| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * per + j) as u32))
                    .collect();
                let s: DynamicObject = serde_json::from_value(slice_json(api, &format!("{name}-1"), &name, &addrs))?;
                slices
                    .create(&PostParams::default(), &s)
                    .await
                    .with_context(|| format!("creating EndpointSlice {name}-1"))?;
                Ok(())
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .collect()
        .await;
    for r in results {
        r?;
    }
    let api_create_s = t0.elapsed().as_secs_f64();

    let started = Instant::now();
    let agent = start_agent(opts, "full")?;
    let want = n + 1; // and `latency`
    let st = wait_status(&agent, "full sync", Duration::from_secs(300), |s| s.ready && s.frontends >= want)?;
    let ready_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_mb, peak_rss_mb) = agent.rss_mb();
    drop(agent);
    let full_sync = FullSync {
        services: n,
        endpoints: per,
        api_create_s,
        ready_s,
        initial_sync_s: st.initial_sync_duration_us as f64 / 1e6,
        initial_sync_writes: st.initial_sync_writes,
        rss_mb,
        peak_rss_mb,
    };

    // Namespace deletion runs in the background of the API server.
    let _ = Api::<Namespace>::all(client).delete(NS, &DeleteParams::default()).await;
    Ok(Report { slice_api: api.api_version().into(), latency, full_sync })
}

/// Writes the report where the other benchmarks write theirs.
pub fn write_json(report: &Report, path: &Path) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(report)?).with_context(|| format!("writing {}", path.display()))
}
