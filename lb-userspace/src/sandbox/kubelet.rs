//! Our own small kubelet: one process for all sandbox nodes.
//!
//! * Registers a Node object per node (Ready, InternalIP = fabric address, podCIDR).
//! * Binds unscheduled pods to the node with the fewest pods (`pods/NAME/binding`), before
//!   any IP is reported: the endpoint controllers need the node name.
//! * Runs each pod in its own network namespace `lbsb-pod-<ns>-<name>`, joined to its node
//!   by a veth (`vp<uid8>` on the node, `eth0` in the pod) with an address from the node's
//!   pod CIDR; the pod's only route is its node.
//! * Starts each container as a built-in program ([`super::images`]) with the pod's env plus
//!   the service variables of [`super::envvars`], reports status with a merge-patch of
//!   `pods/NAME/status`, and runs readiness probes (httpGet, tcpSocket) from the node's
//!   namespace.
//! * On deletion: SIGTERM, up to the grace period, SIGKILL, remove the namespace, then delete
//!   the Pod object with grace 0, so terminating endpoints exist meanwhile, as in a cluster.
//!
//! Each pod is handled by one task (an "actor") that owns its processes; the watch loop
//! only routes pod updates to it.

use std::{
    collections::{BTreeSet, HashMap},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use futures::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{Container, Node, Pod, Probe, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{
    process::{Child, Command},
    sync::{mpsc, watch},
};
use tracing::{info, warn};

use super::{NodeSpec, envvars, images::Program, ip};

pub struct Config {
    pub nodes: Vec<NodeSpec>,
    pub kubeconfig: PathBuf,
    pub state_dir: PathBuf,
}

struct Ctx {
    client: Client,
    cfg: Config,
    /// This binary, run as `image ...` for containers.
    exe: PathBuf,
    /// Pod uid -> node name, for every pod bound (by us or seen bound) and not yet gone.
    bound: Mutex<HashMap<String, String>>,
    /// Host parts in use per node index.
    ips: Mutex<HashMap<u8, BTreeSet<u8>>>,
    /// Pod uid -> its actor's inbox (None = the object is gone).
    actors: Mutex<HashMap<String, watch::Sender<Option<Pod>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking holder leaves plain maps in a usable state.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub async fn run(cfg: Config) -> Result<()> {
    let kc = kube::config::Kubeconfig::read_from(&cfg.kubeconfig)
        .with_context(|| format!("reading {}; did `cargo xtask sandbox up` finish?", cfg.kubeconfig.display()))?;
    let conf = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .context("bad kubeconfig")?;
    let client = Client::try_from(conf).context("building the API client")?;
    std::fs::create_dir_all(cfg.state_dir.join("pods")).context("creating the pods state dir")?;
    register_nodes(&client, &cfg.nodes).await?;
    let exe = std::env::current_exe().context("finding lb-sandbox's own path")?;
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        cfg,
        exe,
        bound: Mutex::new(HashMap::new()),
        ips: Mutex::new(HashMap::new()),
        actors: Mutex::new(HashMap::new()),
    });
    let mut stream = watcher(Api::<Pod>::all(client), watcher::Config::default()).default_backoff().boxed();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    info!("kubelet running for {} nodes", ctx.cfg.nodes.len());
    loop {
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => on_apply(&ctx, p),
                Some(Ok(watcher::Event::Delete(p))) => on_delete(&ctx, &p),
                Some(Ok(_)) => {}
                Some(Err(e)) => warn!("pod watch: {e}"),
                None => break,
            },
            _ = term.recv() => {
                info!("SIGTERM: exiting (sandbox down removes pods' namespaces and processes)");
                break;
            }
        }
    }
    Ok(())
}

async fn register_nodes(client: &Client, nodes: &[NodeSpec]) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    for n in nodes {
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name, "labels": {"kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux"}},
            "spec": {"podCIDR": n.pod_cidr(), "podCIDRs": [n.pod_cidr()]},
        }))?;
        match api.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).with_context(|| format!("registering node {}", n.name)),
        }
        let now = super::rfc3339_now();
        let status = serde_json::json!({"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "lb-sandbox kubelet is posting ready status",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "addresses": [{"type": "InternalIP", "address": n.fabric_ip.to_string()},
                          {"type": "Hostname", "address": n.name}],
            "nodeInfo": {"kubeletVersion": "v1.20.2-lb-sandbox", "kubeProxyVersion": "lb",
                         "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
                         "containerRuntimeVersion": "lb-sandbox://netns", "osImage": "lb sandbox",
                         "kernelVersion": "", "machineID": "", "systemUUID": "", "bootID": ""},
        }});
        api.patch_status(&n.name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("setting node {} Ready", n.name))?;
        info!(node = %n.name, cidr = %n.pod_cidr(), "node registered");
    }
    Ok(())
}

fn on_apply(ctx: &Arc<Ctx>, pod: Pod) {
    let (Some(uid), Some(name)) = (pod.metadata.uid.clone(), pod.metadata.name.clone()) else { return };
    let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let deleting = pod.metadata.deletion_timestamp.is_some();
    if let Some(tx) = lock(&ctx.actors).get(&uid) {
        let _ = tx.send(Some(pod));
        return;
    }
    let Some(node_name) = node_name else {
        if deleting {
            // Never scheduled: nothing to stop.
            tokio::spawn(delete_now(ctx.clone(), ns, name, uid));
            return;
        }
        let node = {
            let mut bound = lock(&ctx.bound);
            if bound.contains_key(&uid) {
                return; // binding in flight
            }
            let mut counts: HashMap<&str, usize> = ctx.cfg.nodes.iter().map(|n| (n.name.as_str(), 0)).collect();
            for n in bound.values() {
                if let Some(c) = counts.get_mut(n.as_str()) {
                    *c += 1;
                }
            }
            let Some(best) = ctx.cfg.nodes.iter().min_by_key(|n| (counts[n.name.as_str()], n.index)) else { return };
            bound.insert(uid.clone(), best.name.clone());
            best.name.clone()
        };
        tokio::spawn(bind(ctx.clone(), ns, name, uid, node));
        return;
    };
    let Some(node) = ctx.cfg.nodes.iter().find(|n| n.name == node_name).cloned() else {
        return; // some other node's pod (none exist in the sandbox)
    };
    lock(&ctx.bound).insert(uid.clone(), node_name);
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
    if matches!(phase, "Succeeded" | "Failed") && !deleting {
        return;
    }
    let (tx, rx) = watch::channel(Some(pod.clone()));
    lock(&ctx.actors).insert(uid.clone(), tx);
    let ctx2 = ctx.clone();
    tokio::spawn(async move {
        let key = format!("{ns}/{name}");
        if let Err(e) = pod_actor(&ctx2, &node, pod, rx).await {
            warn!(pod = %key, "{e:#}");
        }
        lock(&ctx2.actors).remove(&uid);
        lock(&ctx2.bound).remove(&uid);
    });
}

fn on_delete(ctx: &Arc<Ctx>, pod: &Pod) {
    let Some(uid) = pod.metadata.uid.as_deref() else { return };
    match lock(&ctx.actors).get(uid) {
        Some(tx) => {
            let _ = tx.send(None);
        }
        None => {
            lock(&ctx.bound).remove(uid);
        }
    }
}

async fn bind(ctx: Arc<Ctx>, ns: String, name: String, uid: String, node: String) {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let binding = serde_json::json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "uid": uid},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    match api.create_subresource::<_, serde_json::Value>("binding", &name, &PostParams::default(), &binding).await {
        Ok(_) => info!(pod = %format!("{ns}/{name}"), %node, "bound"),
        Err(e) => {
            warn!(pod = %format!("{ns}/{name}"), "binding to {node} failed: {e}");
            lock(&ctx.bound).remove(&uid);
        }
    }
}

/// Deletes the Pod object for good (grace 0), only if it is still the same pod.
async fn delete_now(ctx: Arc<Ctx>, ns: String, name: String, uid: String) {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &dp).await {
        Ok(_) => info!(pod = %format!("{ns}/{name}"), "deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => warn!(pod = %format!("{ns}/{name}"), "final delete failed: {e}"),
    }
}

/// What the kubelet knows of one running pod.
struct Running {
    netns: String,
    ip: Ipv4Addr,
    host_index: u8,
    file: PathBuf,
    containers: Vec<Ctr>,
}

struct Ctr {
    name: String,
    image: String,
    program: Program,
    env: Vec<(String, String)>,
    child: Option<Child>,
    restarts: u32,
    log: PathBuf,
}

async fn pod_actor(ctx: &Arc<Ctx>, node: &NodeSpec, pod: Pod, mut rx: watch::Receiver<Option<Pod>>) -> Result<()> {
    let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        delete_now(ctx.clone(), ns, name, uid).await;
        return Ok(());
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let mut rt = match start_pod(ctx, node, &pod).await {
        Ok(rt) => rt,
        Err(e) => {
            // Leave nothing half-made; the pod stays Pending until it is deleted.
            cleanup_netns(&pod_netns(&ns, &name));
            warn!(pod = %format!("{ns}/{name}"), "start failed: {e:#}");
            wait_deletion(&mut rx).await;
            delete_now(ctx.clone(), ns, name, uid).await;
            return Ok(());
        }
    };
    let containers = spec.containers.clone();
    let has_probes = containers.iter().any(|c| c.readiness_probe.is_some());
    let started_at = super::rfc3339_now();
    let mut ready = !has_probes;
    patch_status(ctx, &ns, &name, &rt, node, ready, &started_at).await;
    let (ptx, mut prx) = mpsc::unbounded_channel::<bool>();
    let stop = Arc::new(AtomicBool::new(false));
    if has_probes {
        let probes = probes_of(&containers);
        let (netns, ip, stop) = (node.netns.clone(), rt.ip, stop.clone());
        std::thread::spawn(move || {
            if let Err(e) = probe_loop(&netns, ip, &probes, &ptx, &stop) {
                warn!("readiness probes stopped: {e:#}");
            }
        });
    }
    let restart_policy = spec.restart_policy.clone().unwrap_or_else(|| "Always".into());
    // Why we stop: Some(grace) for a graceful delete, None when the object vanished.
    let grace: Option<u64> = loop {
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() { break None; }
                let cur = rx.borrow_and_update().clone();
                match cur {
                    None => break None,
                    Some(p) if p.metadata.deletion_timestamp.is_some() => {
                        let g = p.metadata.deletion_grace_period_seconds
                            .or(spec.termination_grace_period_seconds)
                            .unwrap_or(30);
                        break Some(u64::try_from(g).unwrap_or(0));
                    }
                    Some(_) => {}
                }
            }
            Some(r) = prx.recv() => {
                if r != ready {
                    ready = r;
                    info!(pod = %format!("{ns}/{name}"), ready, "readiness changed");
                    patch_status(ctx, &ns, &name, &rt, node, ready, &started_at).await;
                }
            }
            (i, st) = wait_any(&mut rt.containers) => {
                let c = &mut rt.containers[i];
                c.child = None;
                warn!(pod = %format!("{ns}/{name}"), container = %c.name, "exited: {st}");
                if restart_policy != "Never" {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    c.restarts += 1;
                    c.child = spawn_container(ctx, &rt.netns, c).map_err(|e| warn!("restart failed: {e:#}")).ok();
                }
            }
        }
    };
    info!(pod = %format!("{ns}/{name}"), ?grace, "stopping");
    // SIGTERM, then up to the grace period (less if the object vanishes) before SIGKILL.
    // Readiness probes keep running meanwhile, as kubelet's do: a server that fails /readyz
    // after SIGTERM makes its terminating endpoint non-serving.
    signal_all(&rt.containers, libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(grace.unwrap_or(0));
    loop {
        let all_done = rt
            .containers
            .iter_mut()
            .all(|c| c.child.as_mut().is_none_or(|ch| ch.try_wait().map(|s| s.is_some()).unwrap_or(true)));
        if all_done || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            r = rx.changed() => if r.is_err() || rx.borrow().is_none() { break },
            Some(r) = prx.recv() => {
                if r != ready {
                    ready = r;
                    info!(pod = %format!("{ns}/{name}"), ready, "readiness changed while terminating");
                    patch_status(ctx, &ns, &name, &rt, node, ready, &started_at).await;
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    signal_all(&rt.containers, libc::SIGKILL);
    for c in &mut rt.containers {
        if let Some(mut ch) = c.child.take() {
            let _ = ch.wait().await;
        }
    }
    cleanup_netns(&rt.netns);
    let _ = std::fs::remove_file(&rt.file);
    if let Some(set) = lock(&ctx.ips).get_mut(&node.index) {
        set.remove(&rt.host_index);
    }
    if grace.is_some() {
        delete_now(ctx.clone(), ns, name, uid).await;
    }
    Ok(())
}

async fn wait_deletion(rx: &mut watch::Receiver<Option<Pod>>) {
    loop {
        if rx.borrow().as_ref().is_none_or(|p| p.metadata.deletion_timestamp.is_some()) {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves when one container's process exits: (index, exit status text).
async fn wait_any(ctrs: &mut [Ctr]) -> (usize, String) {
    let waits: Vec<_> = ctrs
        .iter_mut()
        .enumerate()
        .filter_map(|(i, c)| c.child.as_mut().map(|ch| Box::pin(async move { (i, ch.wait().await) })))
        .collect();
    if waits.is_empty() {
        return std::future::pending().await;
    }
    let ((i, st), _, _) = futures::future::select_all(waits).await;
    (i, st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()))
}

fn signal_all(ctrs: &[Ctr], sig: i32) {
    for c in ctrs {
        if let Some(pid) = c.child.as_ref().and_then(Child::id).and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on our own, not yet reaped child (so the pid is not reused).
            unsafe { libc::kill(pid, sig) };
        }
    }
}

pub fn pod_netns(ns: &str, name: &str) -> String {
    let mut n = format!("{}pod-{ns}-{name}", super::PREFIX);
    n.truncate(200);
    n
}

fn cleanup_netns(netns: &str) {
    // Deleting the namespace deletes the pod's veth and with it the node-side peer.
    if std::path::Path::new("/run/netns").join(netns).exists()
        && let Err(e) = ip(&["netns", "del", netns])
    {
        warn!("{e:#}");
    }
}

async fn start_pod(ctx: &Arc<Ctx>, node: &NodeSpec, pod: &Pod) -> Result<Running> {
    let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let host = {
        let mut ips = lock(&ctx.ips);
        let used = ips.entry(node.index).or_default();
        let h =
            (2u8..=254).find(|h| !used.contains(h)).ok_or_else(|| anyhow!("node {} has no free pod IP", node.name))?;
        used.insert(h);
        h
    };
    let ip_addr = Ipv4Addr::new(10, 244, node.index, host);
    let netns = pod_netns(&ns, &name);
    let veth: String = format!("vp{}", uid.chars().filter(char::is_ascii_hexdigit).take(8).collect::<String>());
    let gw = node.pod_gw.to_string();
    cleanup_netns(&netns);
    let setup = || -> Result<()> {
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        // Both ends are created inside their namespaces: nothing touches the root namespace.
        ip(&["link", "add", &veth, "netns", &node.netns, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        ip(&["-n", &node.netns, "addr", "add", &format!("{gw}/32"), "dev", &veth])?;
        ip(&["-n", &node.netns, "link", "set", &veth, "up"])?;
        ip(&["-n", &node.netns, "route", "add", &format!("{ip_addr}/32"), "dev", &veth, "src", &gw])?;
        ip(&["-n", &netns, "addr", "add", &format!("{ip_addr}/32"), "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "route", "add", &gw, "dev", "eth0", "scope", "link"])?;
        // The pod's only way out is its node, which has no route out of the sandbox.
        ip(&["-n", &netns, "route", "add", "default", "via", &gw, "dev", "eth0"])?;
        Ok(())
    };
    if let Err(e) = tokio::task::block_in_place(setup) {
        lock(&ctx.ips).entry(node.index).or_default().remove(&host);
        return Err(e.context(format!("setting up the network of pod {ns}/{name}")));
    }
    let svc_env = service_env(ctx, &ns, spec.enable_service_links.unwrap_or(true)).await;
    let mut containers = Vec::new();
    for c in &spec.containers {
        let env = container_env(pod, c, &svc_env, ip_addr, node);
        let ports: Vec<(u16, String)> = c
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((u16::try_from(p.container_port).ok()?, p.protocol.clone().unwrap_or_else(|| "TCP".into())))
            })
            .collect();
        let mut args = c.command.clone().unwrap_or_default();
        args.extend(c.args.clone().unwrap_or_default());
        let image = c.image.clone().unwrap_or_default();
        let program = Program::for_image(&image, &ports, &args);
        containers.push(Ctr {
            name: c.name.clone(),
            log: ctx.cfg.state_dir.join("pods").join(format!("{ns}_{name}_{}.log", c.name)),
            image,
            program,
            env,
            child: None,
            restarts: 0,
        });
    }
    let file = ctx.cfg.state_dir.join("pods").join(format!("{ns}_{name}.json"));
    let record = serde_json::json!({
        "namespace": ns, "name": name, "uid": uid, "node": node.name, "node_netns": node.netns,
        "netns": netns, "ip": ip_addr.to_string(), "veth": veth,
        "env": containers.first().map(|c| c.env.clone()).unwrap_or_default(),
    });
    std::fs::write(&file, serde_json::to_vec_pretty(&record)?)
        .with_context(|| format!("writing {}", file.display()))?;
    for c in &mut containers {
        c.child = Some(spawn_container(ctx, &netns, c)?);
    }
    info!(pod = %format!("{ns}/{name}"), node = %node.name, ip = %ip_addr, %netns, "started");
    Ok(Running { netns, ip: ip_addr, host_index: host, file, containers })
}

fn spawn_container(ctx: &Ctx, netns: &str, c: &Ctr) -> Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&c.log)?;
    let pod_name = c.env.iter().find(|(k, _)| k == "HOSTNAME").map(|(_, v)| v.clone()).unwrap_or_default();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .arg(&ctx.exe)
        .args(c.program.args(&pod_name))
        .env_clear()
        .envs(c.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    cmd.spawn().with_context(|| format!("starting container {} ({})", c.name, c.image))
}

/// Services visible to a pod, as kubelet's getServiceEnvVarMap: the pod namespace's
/// services (if service links are on) and the `kubernetes` master service.
async fn service_env(ctx: &Ctx, ns: &str, links: bool) -> Vec<(String, String)> {
    let mut svcs: Vec<Service> = Vec::new();
    let master: Api<Service> = Api::namespaced(ctx.client.clone(), "default");
    if (ns != "default" || !links)
        && let Ok(Some(k)) = master.get_opt("kubernetes").await
    {
        svcs.push(k);
    }
    if links {
        match Api::<Service>::namespaced(ctx.client.clone(), ns).list(&ListParams::default()).await {
            Ok(l) => svcs.extend(l.items),
            Err(e) => warn!("listing services of {ns} for env vars: {e}"),
        }
    }
    envvars::from_services(&svcs)
}

fn container_env(
    pod: &Pod,
    c: &Container,
    svc_env: &[(String, String)],
    ip: Ipv4Addr,
    node: &NodeSpec,
) -> Vec<(String, String)> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
        ("HOSTNAME".into(), name.clone()),
    ];
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| match env.iter_mut().find(|(n, _)| *n == k) {
        Some(e) => e.1 = v,
        None => env.push((k, v)),
    };
    for (k, v) in svc_env {
        set(&mut env, k.clone(), v.clone());
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            expand(v, &env)
        } else if let Some(f) = e.value_from.as_ref().and_then(|vf| vf.field_ref.as_ref()) {
            match f.field_path.as_str() {
                "metadata.name" => name.clone(),
                "metadata.namespace" => pod.metadata.namespace.clone().unwrap_or_default(),
                "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
                "spec.nodeName" => node.name.clone(),
                "spec.serviceAccountName" => {
                    pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default()
                }
                "status.podIP" | "status.podIPs" => ip.to_string(),
                "status.hostIP" => node.fabric_ip.to_string(),
                _ => String::new(),
            }
        } else {
            String::new()
        };
        set(&mut env, e.name.clone(), value);
    }
    env
}

/// Kubernetes' `$(VAR)` expansion against variables defined earlier; `$$` escapes.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('(')
            && let Some(end) = r.find(')')
            && let Some((_, v)) = env.iter().find(|(k, _)| *k == r[..end])
        {
            out.push_str(v);
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

async fn patch_status(ctx: &Ctx, ns: &str, name: &str, rt: &Running, node: &NodeSpec, ready: bool, started_at: &str) {
    let now = super::rfc3339_now();
    let r = if ready { "True" } else { "False" };
    let statuses: Vec<_> = rt
        .containers
        .iter()
        .map(|c| {
            serde_json::json!({"name": c.name, "ready": ready, "started": true, "restartCount": c.restarts,
                "image": c.image, "imageID": format!("lb-sandbox://{}", c.image), "containerID": format!("lb-sandbox://{}", c.name),
                "state": {"running": {"startedAt": started_at}}})
        })
        .collect();
    let patch = serde_json::json!({"status": {
        "phase": "Running", "podIP": rt.ip.to_string(), "podIPs": [{"ip": rt.ip.to_string()}],
        "hostIP": node.fabric_ip.to_string(), "startTime": started_at,
        "conditions": [
            {"type": "Initialized", "status": "True", "lastTransitionTime": started_at},
            {"type": "Ready", "status": r, "lastTransitionTime": now},
            {"type": "ContainersReady", "status": r, "lastTransitionTime": now},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": started_at},
        ],
        "containerStatuses": statuses,
    }});
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    if let Err(e) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        warn!(pod = %format!("{ns}/{name}"), "status update failed: {e}");
    }
}

// ----- readiness probes -----

#[derive(Debug, Clone)]
enum Check {
    Http {
        port: u16,
        path: String,
    },
    Tcp {
        port: u16,
    },
    /// exec probes are not run; they count as passing.
    Pass,
}

#[derive(Debug, Clone)]
struct ProbeSpec {
    check: Check,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
}

fn probes_of(containers: &[Container]) -> Vec<ProbeSpec> {
    containers.iter().filter_map(|c| c.readiness_probe.as_ref().map(|p| probe_spec(c, p))).collect()
}

fn probe_spec(c: &Container, p: &Probe) -> ProbeSpec {
    let port = |ios: &IntOrString| -> u16 {
        match ios {
            IntOrString::Int(i) => u16::try_from(*i).unwrap_or(0),
            IntOrString::String(n) => c
                .ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(n))
                .and_then(|cp| u16::try_from(cp.container_port).ok())
                .or_else(|| n.parse().ok())
                .unwrap_or(0),
        }
    };
    let check = if let Some(h) = &p.http_get {
        Check::Http { port: port(&h.port), path: h.path.clone().unwrap_or_else(|| "/".into()) }
    } else if let Some(t) = &p.tcp_socket {
        Check::Tcp { port: port(&t.port) }
    } else {
        Check::Pass
    };
    let secs = |v: Option<i32>, d: u64| Duration::from_secs(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(d));
    ProbeSpec {
        check,
        initial_delay: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10).max(Duration::from_millis(200)),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_millis(200)),
        success_threshold: p.success_threshold.and_then(|v| u32::try_from(v).ok()).unwrap_or(1).max(1),
        failure_threshold: p.failure_threshold.and_then(|v| u32::try_from(v).ok()).unwrap_or(3).max(1),
    }
}

/// Probes from the node's namespace (as kubelet probes from the host) until `stop`.
fn probe_loop(
    node_netns: &str,
    ip: Ipv4Addr,
    probes: &[ProbeSpec],
    tx: &mpsc::UnboundedSender<bool>,
    stop: &AtomicBool,
) -> Result<()> {
    super::enter_netns(node_netns)?;
    let delay = probes.iter().map(|p| p.initial_delay).max().unwrap_or_default();
    let period = probes.iter().map(|p| p.period).min().unwrap_or(Duration::from_secs(10));
    sleep_unless(delay, stop);
    let mut ok = vec![false; probes.len()];
    let mut succ = vec![0u32; probes.len()];
    let mut fail = vec![0u32; probes.len()];
    let mut reported = false;
    while !stop.load(Ordering::Relaxed) {
        for (i, p) in probes.iter().enumerate() {
            if run_check(&p.check, ip, p.timeout) {
                succ[i] += 1;
                fail[i] = 0;
                if succ[i] >= p.success_threshold {
                    ok[i] = true;
                }
            } else {
                fail[i] += 1;
                succ[i] = 0;
                if fail[i] >= p.failure_threshold {
                    ok[i] = false;
                }
            }
        }
        let all = ok.iter().all(|o| *o);
        if all != reported {
            reported = all;
            if tx.send(all).is_err() {
                break;
            }
        }
        sleep_unless(period, stop);
    }
    Ok(())
}

fn sleep_unless(d: Duration, stop: &AtomicBool) {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < d && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50).min(d));
    }
}

fn run_check(check: &Check, ip: Ipv4Addr, timeout: Duration) -> bool {
    match check {
        Check::Pass => true,
        Check::Tcp { port } => TcpStream::connect_timeout(&SocketAddr::from((ip, *port)), timeout).is_ok(),
        Check::Http { port, path } => {
            let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::from((ip, *port)), timeout) else { return false };
            let _ = s.set_read_timeout(Some(timeout));
            let _ = s.set_write_timeout(Some(timeout));
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.20\r\nConnection: close\r\n\r\n"
            );
            if s.write_all(req.as_bytes()).is_err() {
                return false;
            }
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]);
            // kubelet: 200 <= code < 400 is success.
            head.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()).is_some_and(|c| (200..400).contains(&c))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn expands_dependent_vars() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(super::expand("$(A)-$(B)-$$(A)", &env), "x-$(B)-$(A)");
    }
}
