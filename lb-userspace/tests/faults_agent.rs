//! Faults of the agent and its API server, under a real `lb agent` in throw-away
//! namespaces (tc on the pod veths), with established TCP flows through the node the
//! whole time:
//!
//! - **SIGKILL inside large syncs** (`--source file:`): a generated world of a few
//!   hundred Services and thousands of endpoints changes wholesale, and the agent is
//!   killed at a random point of the sync that follows, 100 times
//!   (`LB_FAULT_KILLS`). After each restart the maps hold exactly the desired state
//!   ([`check_exact`]: every frontend, slot, draining entry and lookup table, no
//!   slot or draining entry of a frontend that is not desired once the orphans'
//!   grace has passed, no backend id given to a second address) and no established
//!   flow was cut.
//! - **The API server away for 60 s during churn** (a real kube-apiserver 1.20.2):
//!   the node reaches it through [`lb_testing::kube::ApiGate`], which is cut while
//!   `kubectl` keeps changing Services and EndpointSlices behind it. Meanwhile the
//!   maps keep the last state and the datapath serves it; when the gate opens the
//!   agent catches up with everything it missed (deletions included) and the maps
//!   converge to the API server's state, checked exactly.
//!
//! Needs root; touches nothing outside the namespaces it creates (the API server is
//! the test's own, on 127.0.0.1).

mod faults;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use faults::{AFF_VIP, Agent, BACKENDS, Echo, IO_TIMEOUT, TCP_TARGET, VIP, connect_from, echo, env_or};
use lb_common::{ServiceKey4, TABLE_LANES};
use lb_testing::{
    PrivateBpffs, Scratch,
    agent::AgentProcess,
    fuzz::Rng,
    kube::{ApiGate, Cluster},
    netns::{CLIENT_IP, Topology},
    require_kube,
};
use lb_userspace::agent::sync::BpfMaps;

/// Frontend (`ip:port/TCP`) -> (backends, draining), as `lb services` names them.
type Want = BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)>;

/// Service `i` of the generated world: `churn-i` on 10.96.100.x and up (inside the
/// test API server's 10.96.0.0/16), TCP 80 -> 8080.
fn churn_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (100 + i / 250) as u8, (1 + i % 250) as u8)
}

/// Endpoint address `k` of the generated world (no pod answers on these: only the
/// stable Services carry traffic).
fn pool_addr(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 246, (k / 250) as u8, (1 + k % 250) as u8)
}

/// Endpoints per slice, at most: bigger sets are split over several slices.
const SLICE_MAX: usize = 40;
const POOL: usize = 6000;

/// Generated Services, each with its endpoints (address, ready), changing wholesale.
struct World {
    /// Services that exist, by index; indices `0..cap` come and go.
    svcs: BTreeMap<usize, Vec<(Ipv4Addr, bool)>>,
    /// Slices each Service had when last written (to delete the ones that went).
    slices: BTreeMap<usize, usize>,
    cap: usize,
    max_eps: usize,
    rng: Rng,
}

impl World {
    fn new(services: usize, max_eps: usize, seed: u64) -> Self {
        let cap = services + services / 4;
        let mut w = Self { svcs: BTreeMap::new(), slices: BTreeMap::new(), cap, max_eps, rng: Rng::new(seed) };
        for i in 0..services {
            let eps = w.endpoints();
            w.svcs.insert(i, eps);
        }
        w
    }

    fn endpoints(&mut self) -> Vec<(Ipv4Addr, bool)> {
        let n = self.rng.index(self.max_eps + 1);
        let mut seen = BTreeSet::new();
        (0..n)
            .filter_map(|_| {
                let a = pool_addr(self.rng.index(POOL));
                seen.insert(a).then(|| (a, !self.rng.one_in(8)))
            })
            .collect()
    }

    /// Changes each Service index with a chance of one in `one_in`: a Service that
    /// exists is deleted (one in four) or gets a new endpoint set, one that does not is
    /// created; returns the indices touched.
    fn churn(&mut self, one_in: usize) -> BTreeSet<usize> {
        let mut touched = BTreeSet::new();
        for i in 0..self.cap {
            if !self.rng.one_in_usize(one_in) {
                continue;
            }
            touched.insert(i);
            if self.svcs.contains_key(&i) && self.rng.one_in(4) {
                self.svcs.remove(&i);
            } else {
                let eps = self.endpoints();
                self.svcs.insert(i, eps);
            }
        }
        touched
    }

    /// Service `i` and its slices (`api` the slices' apiVersion); empty if it does
    /// not exist.
    fn objects(&self, i: usize, api: &str) -> String {
        let Some(eps) = self.svcs.get(&i) else { return String::new() };
        let mut s = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: churn-{i}, namespace: default}}\nspec:\n  \
             clusterIP: {}\n  ports: [{{name: http, port: 80, protocol: TCP}}]\n---\n",
            churn_vip(i)
        );
        for (j, chunk) in slices_of(eps).enumerate() {
            s.push_str(&format!(
                "apiVersion: {api}\nkind: EndpointSlice\nmetadata:\n  name: churn-{i}-{j}\n  namespace: default\n  \
                 labels: {{kubernetes.io/service-name: churn-{i}}}\naddressType: IPv4\n\
                 ports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:"
            ));
            if chunk.is_empty() {
                s.push_str(" []\n");
            } else {
                s.push('\n');
                for (a, ready) in chunk {
                    s.push_str(&format!("- addresses: [\"{a}\"]\n  conditions: {{ready: {ready}}}\n"));
                }
            }
            s.push_str("---\n");
        }
        s
    }

    /// Writes Services `touched` to the API server as they stand now: applies the
    /// ones that exist, deletes the ones that went and slices no longer needed.
    fn write_to(&mut self, cluster: &Cluster, touched: &BTreeSet<usize>, api: &str) -> Result<()> {
        let mut apply = String::new();
        let mut gone_services = Vec::new();
        let mut gone_slices = Vec::new();
        for &i in touched {
            let had = self.slices.remove(&i).unwrap_or(0);
            let now = self.svcs.get(&i).map_or(0, |eps| slices_of(eps).count());
            if now == 0 {
                gone_services.push(format!("churn-{i}"));
            } else {
                apply.push_str(&self.objects(i, api));
                self.slices.insert(i, now);
            }
            gone_slices.extend((now..had).map(|j| format!("churn-{i}-{j}")));
        }
        if !apply.is_empty() {
            cluster.apply(&apply)?;
        }
        for (kind, names) in [("endpointslice", gone_slices), ("service", gone_services)] {
            if !names.is_empty() {
                let mut args = vec!["delete", kind, "--ignore-not-found", "--wait=false"];
                args.extend(names.iter().map(String::as_str));
                cluster.kubectl(&args, None)?;
            }
        }
        Ok(())
    }

    /// Every Service and slice, for the file source (with the stable Services).
    fn file(&self) -> String {
        let mut s = faults::services_yaml();
        s.push_str("\n---\n");
        for i in self.svcs.keys() {
            s.push_str(&self.objects(*i, "discovery.k8s.io/v1"));
        }
        s
    }

    /// What the maps should hold for the generated Services.
    fn want(&self) -> Want {
        self.svcs
            .iter()
            .map(|(i, eps)| {
                let set = |ready: bool| -> BTreeSet<String> {
                    eps.iter().filter(|(_, r)| *r == ready).map(|(a, _)| format!("{a}:8080")).collect()
                };
                (format!("{}:80/TCP", churn_vip(*i)), (set(true), set(false)))
            })
            .collect()
    }
}

fn slices_of(eps: &[(Ipv4Addr, bool)]) -> impl Iterator<Item = &[(Ipv4Addr, bool)]> {
    let empty: &[(Ipv4Addr, bool)] = &[];
    let chunks: Vec<&[(Ipv4Addr, bool)]> = if eps.is_empty() { vec![empty] } else { eps.chunks(SLICE_MAX).collect() };
    chunks.into_iter()
}

/// What the maps should hold for [`faults::services_yaml`]'s two Services.
fn stable_want() -> Want {
    let b: BTreeSet<String> = BACKENDS.iter().map(|a| format!("{a}:{TCP_TARGET}")).collect();
    let u: BTreeSet<String> = BACKENDS.iter().map(|a| format!("{a}:{}", faults::UDP_TARGET)).collect();
    BTreeMap::from([
        (format!("{VIP}:80/TCP"), (b.clone(), BTreeSet::new())),
        (format!("{VIP}:53/UDP"), (u, BTreeSet::new())),
        (format!("{AFF_VIP}:80/TCP"), (b, BTreeSet::new())),
    ])
}

/// What the maps hold, as [`Want`], for the frontends `keep` admits.
fn programmed(bpffs: &Path, keep: impl Fn(&str) -> bool) -> Want {
    lb_userspace::inspect::services(bpffs)
        .map(|rows| {
            rows.into_iter()
                .map(|r| {
                    let f = format!("{}/{}", r.frontend, r.protocol);
                    let b = r.backends.into_iter().map(|b| b.address).collect();
                    let d = r.draining.into_iter().map(|b| b.address).collect();
                    (f, (b, d))
                })
                .filter(|(f, _)| keep(f))
                .collect()
        })
        .unwrap_or_default()
}

/// Differences between two states, briefly, for error messages.
fn diff(want: &Want, got: &Want) -> String {
    let mut out = Vec::new();
    for (f, w) in want {
        match got.get(f) {
            None => out.push(format!("{f} missing")),
            Some(g) if g != w => out.push(format!(
                "{f}: {} backends / {} draining, want {} / {}",
                g.0.len(),
                g.1.len(),
                w.0.len(),
                w.1.len()
            )),
            Some(_) => {}
        }
    }
    out.extend(got.keys().filter(|f| !want.contains_key(*f)).map(|f| format!("{f} not desired")));
    let n = out.len();
    out.truncate(8);
    format!("{n} differences: {}", out.join("; "))
}

/// What [`check_exact`] found besides the desired state.
#[derive(Default)]
struct Exact {
    /// `DRAINING` entries of service ids no frontend owns: a deleted frontend's,
    /// kept for its established flows until the collector releases them.
    orphans: usize,
}

/// The maps under `bpffs` hold exactly `want` (for the frontends `ours` admits, the
/// others must be absent): frontends, slots 1..=count and nothing beyond, draining
/// entries, lookup tables that name only valid slots and every one of them, no slot
/// of a service id that no frontend owns, no service id on two frontends. `ids`
/// carries backend id -> address over a whole run: an id never names a second one.
fn check_exact(bpffs: &Path, want: &Want, ids: &mut HashMap<u32, (u32, u16)>) -> Result<Exact> {
    let got = programmed(bpffs, |_| true);
    ensure!(&got == want, "maps differ from the desired state: {}", diff(want, &got));
    let maps = BpfMaps::open(bpffs)?;
    let (services, backends) = maps.read_all();
    let draining = maps.read_draining();
    let mut owners: HashMap<u32, (ServiceKey4, u32, u32, u32)> = HashMap::new();
    for (k, v) in &services {
        if k.port_be == 0 && k.proto == 0 {
            continue;
        }
        ensure!(v.id != 0, "frontend {k:?} has service id 0");
        if let Some(other) = owners.insert(v.id, (*k, v.count, v.table_off, v.table_size)) {
            bail!("service id {} on two frontends: {k:?} and {:?}", v.id, other.0);
        }
    }
    let mut slots: HashMap<u32, BTreeSet<u32>> = HashMap::new();
    for (k, v) in &backends {
        ensure!(owners.contains_key(&k.svc_id), "slot {k:?} -> {v:?} of a service id no frontend owns");
        slots.entry(k.svc_id).or_default().insert(k.slot);
        let addr = (v.addr_be, v.port_be);
        ensure!(*ids.entry(v.backend_id).or_insert(addr) == addr, "backend id {} names a second address", v.backend_id);
    }
    let mut exact = Exact::default();
    for (k, v) in &draining {
        let addr = (v.addr_be, v.port_be);
        ensure!(*ids.entry(k.backend_id).or_insert(addr) == addr, "backend id {} names a second address", k.backend_id);
        if !owners.contains_key(&k.svc_id) {
            exact.orphans += 1;
        }
    }
    let mut words: Vec<(u32, u32, u32)> = Vec::new();
    for (id, (key, count, off, size)) in &owners {
        let have = slots.remove(id).unwrap_or_default();
        ensure!(have == (1..=*count).collect::<BTreeSet<u32>>(), "{key:?}: slots {have:?} for count {count}");
        if *count == 0 {
            continue;
        }
        let n = size.div_ceil(TABLE_LANES);
        let table = maps.read_table(*off, n);
        ensure!(table.len() == n as usize, "{key:?}: table at {off}+{n} does not read back");
        let buckets: BTreeSet<u32> = (0..*size)
            .map(|b| ((table[(b / TABLE_LANES) as usize] >> (16 * (b % TABLE_LANES))) & 0xffff) as u32)
            .collect();
        ensure!(
            buckets == (1..=*count).collect::<BTreeSet<u32>>(),
            "{key:?}: table names slots {buckets:?} of {count}"
        );
        words.push((*off, n, *id));
    }
    words.sort();
    for w in words.windows(2) {
        ensure!(w[0].0 + w[0].1 <= w[1].0, "lookup tables of service ids {} and {} overlap", w[0].2, w[1].2);
    }
    Ok(exact)
}

/// Long TCP flows from the client pod to the stable Services, each echoing a message
/// every 20 ms on a thread of its own; a flow that fails once is cut.
struct Flows {
    stop: Arc<AtomicBool>,
    echoes: Arc<AtomicU64>,
    cut: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Flows {
    fn start(topo: &Topology, n: usize) -> Result<Self> {
        let targets: [SocketAddr; 2] = [(VIP, 80).into(), (AFF_VIP, 80).into()];
        let conns: Vec<(SocketAddr, TcpStream)> = topo.client.run(|| {
            (0..n)
                .map(|i| {
                    let dst = targets[i % targets.len()];
                    let mut c = connect_from(CLIENT_IP, dst, IO_TIMEOUT)?;
                    echo(&mut c, b"hello")?;
                    Ok((dst, c))
                })
                .collect()
        })?;
        let (stop, echoes, cut) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::default());
        let threads = conns
            .into_iter()
            .enumerate()
            .map(|(i, (dst, mut c))| {
                let (stop, echoes, cut): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<Mutex<Vec<String>>>) =
                    (stop.clone(), echoes.clone(), Arc::clone(&cut));
                std::thread::spawn(move || {
                    let mut k = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        k += 1;
                        if let Err(e) = echo(&mut c, format!("flow {i} message {k}").as_bytes()) {
                            cut.lock().unwrap().push(format!("flow {i} to {dst} after {k} messages: {e:#}"));
                            return;
                        }
                        echoes.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        Ok(Self { stop, echoes, cut, threads })
    }

    fn cut(&self) -> Vec<String> {
        self.cut.lock().unwrap().clone()
    }

    fn echoes(&self) -> u64 {
        self.echoes.load(Ordering::Relaxed)
    }

    /// Stops them; the flows that were cut.
    fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        self.cut()
    }
}

/// `SERVICES` and `BACKENDS` as they are (not `DRAINING`, which the conntrack
/// collector changes too, releasing orphans).
type Raw = (HashMap<ServiceKey4, lb_common::ServiceValue>, HashMap<lb_common::BackendKey, lb_common::BackendValue>);

fn raw(maps: &BpfMaps) -> Raw {
    let (s, b) = maps.read_all();
    (s.into_iter().collect(), b.into_iter().collect())
}

/// Where a kill landed, told by the maps it left (frozen: nothing writes them until
/// the next agent starts).
#[derive(Debug, Default)]
struct Landed {
    /// Nothing of the new state was visible yet (the sync's first writes replace
    /// nothing a reader sees: new slots and tables come before the entries that name
    /// them).
    before: usize,
    /// Part of it was written.
    inside: usize,
    /// It had finished.
    after: usize,
}

#[test]
fn sigkill_at_random_points_inside_large_syncs_leaves_exact_maps_and_flows_intact() -> Result<()> {
    let kills: usize = env_or("LB_FAULT_KILLS", 100);
    let services: usize = env_or("LB_FAULT_SERVICES", 200);
    let seed: u64 = env_or("LB_FAULT_SEED", 13);
    eprintln!("seed {seed} (LB_FAULT_SEED), {kills} kills (LB_FAULT_KILLS), {services} Services (LB_FAULT_SERVICES)");
    let topo = faults::topology()?;
    let mut world = World::new(services, 40, seed);
    let want = |w: &World| -> Want {
        let mut m = w.want();
        m.extend(stable_want());
        m
    };
    let args = ["--iface-glob", "to-*", "--iface-rescan", "200ms", "--conntrack-gc", "1s"];
    let mut agent = Agent::start_with(&topo, "kill", &args, &world.file())?;
    let _echo = Echo::start(&topo.server)?;
    let mut ids = HashMap::new();
    let converge = |agent: &Agent, want: &Want, what: &str| -> Result<Duration> {
        let t0 = Instant::now();
        agent
            .process
            .wait_for(what, Duration::from_secs(60), || {
                (programmed(agent.bpffs.path(), |_| true) == *want).then_some(())
            })
            .with_context(|| diff(want, &programmed(agent.bpffs.path(), |_| true)))?;
        Ok(t0.elapsed())
    };
    let mut current = want(&world);
    converge(&agent, &current, "the first sync")?;
    check_exact(agent.bpffs.path(), &current, &mut ids)?;
    let endpoints: usize = current.values().map(|(b, d)| b.len() + d.len()).sum();
    let flows = Flows::start(&topo, 8)?;

    // Where in a sync of a wholesale change the maps are being written: from the first
    // write (the maps differ from the state before) to the last (nothing changes for
    // 500 ms after it). The kills fall at uniform points of that phase, timed from
    // its start.
    let maps = BpfMaps::open(agent.bpffs.path())?;
    let first_write = |agent: &Agent, before: &Raw| -> Result<Instant> {
        agent
            .process
            .wait_for("the sync's first write", Duration::from_secs(60), || (raw(&maps) != *before).then(Instant::now))
    };
    let mut took = Vec::new();
    for _ in 0..3 {
        let before = raw(&maps);
        world.churn(2);
        current = want(&world);
        agent.write_objects(&world.file())?;
        let t0 = first_write(&agent, &before)?;
        let (mut last, mut last_write) = (raw(&maps), Instant::now());
        while last_write.elapsed() < Duration::from_millis(500) {
            let now = raw(&maps);
            if now != last {
                (last, last_write) = (now, Instant::now());
            }
        }
        converge(&agent, &current, "a timing sync")?;
        took.push(last_write - t0);
    }
    let window = took.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} frontends, {endpoints} endpoints; writing a change of half of them took {took:?}: kills fall in \
         0..{window:?} after the first write",
        current.len()
    );

    let mut landed = Landed::default();
    let mut restart_took = Vec::new();
    let mut orphans_max = 0;
    let mut rng = Rng::new(seed ^ 0x5eed);
    for k in 0..kills {
        let (before, before_raw) = (current.clone(), raw(&maps));
        world.churn(2);
        current = want(&world);
        agent.write_objects(&world.file())?;
        let t0 = first_write(&agent, &before_raw)?;
        let at = window.mul_f64(rng.below(1000) as f64 / 1000.0);
        std::thread::sleep(at.saturating_sub(t0.elapsed()));
        let bpffs = agent.bpffs.path().to_path_buf();
        agent.restart(&topo, || {
            let frozen = programmed(&bpffs, |_| true);
            match (frozen == before, frozen == current) {
                (true, _) => landed.before += 1,
                (_, true) => landed.after += 1,
                _ => landed.inside += 1,
            }
            Ok(())
        })?;
        let t = converge(&agent, &current, &format!("the maps after kill {k}"))?;
        restart_took.push(t);
        let exact = check_exact(agent.bpffs.path(), &current, &mut ids).with_context(|| format!("after kill {k}"))?;
        orphans_max = orphans_max.max(exact.orphans);
        let cut = flows.cut();
        ensure!(cut.is_empty(), "established flows cut by kill {k}: {cut:?}");
    }
    // The orphans of deleted frontends go once their grace is over and no flow uses
    // them (ORPHAN_MIN_AGE, 30 s, then the next collector pass).
    let grace = lb_userspace::agent::sync::ORPHAN_MIN_AGE + Duration::from_secs(15);
    agent.process.wait_for("the orphans' release", grace, || {
        check_exact(agent.bpffs.path(), &current, &mut ids.clone()).ok().filter(|e| e.orphans == 0)
    })?;
    check_exact(agent.bpffs.path(), &current, &mut ids)?;
    let echoes = flows.echoes();
    let cut = flows.stop();
    ensure!(cut.is_empty(), "established flows cut: {cut:?}");
    restart_took.sort();
    let p = |q: f64| restart_took[((restart_took.len() - 1) as f64 * q) as usize];
    eprintln!(
        "{kills} SIGKILLs: {} before a sync began, {} inside one, {} after it ended; after each restart the maps \
         were exact (restart to converged: p50 {:?}, max {:?}); at most {orphans_max} orphan draining entries, \
         0 after their grace; 8 flows, {echoes} echoes, 0 cut",
        landed.before,
        landed.inside,
        landed.after,
        p(0.5),
        p(1.0)
    );
    ensure!(landed.inside >= kills / 4, "only {landed:?} kills landed inside a sync: the window is off");
    Ok(())
}

/// `lb agent --source kubernetes` in the node namespace, reaching the API server
/// through the gate, on a private bpffs.
fn kube_agent(topo: &Topology, cluster: &Cluster, dir: &Scratch, bpffs: &PrivateBpffs) -> Result<AgentProcess> {
    let (status, log) = (dir.path("status.json"), dir.path("agent.log"));
    let mut c = topo.node.command(faults::lb());
    c.args(["agent", "--source", "kubernetes", "--iface-glob", "to-*", "--iface-rescan", "200ms"])
        .args(["--metrics-addr", faults::METRICS_ADDR, "--kubeconfig"])
        .arg(&cluster.kubeconfig)
        .env("LB_BPFFS", bpffs.path())
        .env("LB_STATUS_FILE", &status)
        .env("LB_LOG", "info");
    AgentProcess::spawn(c, &log, &status)
}

/// One new connection through the plain Service, echoed.
fn new_connection(topo: &Topology) -> Result<()> {
    topo.client.run(|| {
        let mut c = connect_from(CLIENT_IP, (VIP, 80).into(), IO_TIMEOUT)?;
        echo(&mut c, b"new")
    })
}

#[test]
fn api_server_away_60s_during_churn_the_datapath_serves_and_the_agent_catches_up() -> Result<()> {
    require_kube!();
    const PORT: u16 = 17613;
    let away = Duration::from_secs(env_or("LB_FAULT_API_AWAY_S", 60));
    let seed: u64 = env_or("LB_FAULT_SEED", 13);
    let api = "discovery.k8s.io/v1beta1";
    let cluster = Cluster::up("faults-api", PORT, false)?;
    let topo = faults::topology()?;
    let gate = ApiGate::new(&topo.node, PORT)?;
    cluster.apply(&faults::services_yaml().replace("discovery.k8s.io/v1", api))?;
    let mut world = World::new(60, 30, seed);
    let all: BTreeSet<usize> = (0..world.cap).collect();
    world.write_to(&cluster, &all, api)?;

    let (dir, bpffs) = (Scratch::new("faults-api")?, PrivateBpffs::new()?);
    let agent = kube_agent(&topo, &cluster, &dir, &bpffs)?;
    let _echo = Echo::start(&topo.server)?;
    // The desired state: the generated and the stable Services, and whatever the maps
    // hold for the API server's own `kubernetes` Service (it has no slices here).
    let ours = |f: &str| !f.starts_with("10.96.0.1:");
    let want = |w: &World| -> Want {
        let mut m = w.want();
        m.extend(stable_want());
        m.extend(programmed(bpffs.path(), |f| !ours(f)));
        m
    };
    let converge = |w: &World, what: &str, timeout: Duration| -> Result<Duration> {
        let t0 = Instant::now();
        let mut want = w.want();
        want.extend(stable_want());
        agent
            .wait_for(what, timeout, || (programmed(bpffs.path(), ours) == want).then_some(()))
            .with_context(|| diff(&want, &programmed(bpffs.path(), ours)))?;
        Ok(t0.elapsed())
    };
    converge(&world, "the initial sync", Duration::from_secs(60))?;
    let mut ids = HashMap::new();
    check_exact(bpffs.path(), &want(&world), &mut ids)?;
    let flows = Flows::start(&topo, 4)?;

    // Churn with the API server there: each change lands.
    let mut changes = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let touched = world.churn(10);
        changes += touched.len();
        world.write_to(&cluster, &touched, api)?;
    }
    converge(&world, "the churn before the outage", Duration::from_secs(30))?;
    check_exact(bpffs.path(), &want(&world), &mut ids)?;
    eprintln!("before the outage: {changes} Services changed in 10 s, all landed");

    // Away: the churn goes on behind the gate; the maps keep the last state, and new
    // connections through it are served.
    let last = programmed(bpffs.path(), |_| true);
    gate.cut();
    let (mut behind, mut served, mut checks) = (0, 0, 0);
    let t0 = Instant::now();
    let mut next_check = Duration::ZERO;
    while t0.elapsed() < away {
        let touched = world.churn(10);
        behind += touched.len();
        world.write_to(&cluster, &touched, api)?;
        if t0.elapsed() >= next_check {
            next_check += Duration::from_secs(1);
            let now = programmed(bpffs.path(), |_| true);
            ensure!(now == last, "the maps changed with the API server away: {}", diff(&last, &now));
            new_connection(&topo).with_context(|| format!("a new connection {:?} into the outage", t0.elapsed()))?;
            served += 1;
            checks += 1;
            ensure!(agent.status().is_some(), "no status from the agent");
        }
    }
    let cut_for = t0.elapsed();
    let target = want(&world);
    ensure!(target != last, "nothing changed behind the gate");
    eprintln!(
        "away {cut_for:.1?}: {behind} Service changes behind the gate; maps unchanged at {checks} checks, \
         {served} new connections served"
    );

    // Back: the agent catches up with everything it missed.
    gate.restore(&topo.node)?;
    let caught_up = converge(&world, "catching up after the outage", Duration::from_secs(60))?;
    check_exact(bpffs.path(), &target, &mut ids)?;
    ensure!(agent.log_text().contains("watch"), "the outage left no trace in the agent's log");

    // And follows again.
    let t0 = Instant::now();
    let mut after = 0;
    while t0.elapsed() < Duration::from_secs(10) {
        let touched = world.churn(10);
        after += touched.len();
        world.write_to(&cluster, &touched, api)?;
    }
    converge(&world, "the churn after the outage", Duration::from_secs(30))?;
    let exact = check_exact(bpffs.path(), &want(&world), &mut ids)?;
    new_connection(&topo)?;
    let echoes = flows.echoes();
    let cut = flows.stop();
    ensure!(cut.is_empty(), "established flows cut: {cut:?}");
    eprintln!(
        "back: caught up with {behind} changes {caught_up:.1?} after the gate opened, maps exact; then {after} \
         more changes landed ({} orphan draining entries in their grace); 4 flows, {echoes} echoes, 0 cut; \
         {} connections through the gate",
        exact.orphans,
        gate.accepted()
    );
    Ok(())
}
