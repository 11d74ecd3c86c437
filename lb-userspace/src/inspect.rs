//! `lb services|conntrack|affinity|stats|status`: read the pinned maps (they can be
//! read while the agent runs) and print them as a table or as JSON.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use lb_common::{
    AffinityKey4, AffinityValue, BackendKey, BackendValue, CT_DIR_FORWARD, CT_F_AFFINITY, CT_F_HAIRPIN, Counter,
    CtKey4, CtValue4, DrainKey, NO_BACKENDS_DROP, Reason, SVC_F_AFFINITY, ServiceKey4, ServiceValue, map_names,
};
use serde::Serialize;

use crate::agent::{AgentStatus, attach};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot open pinned map {path}; is `lb agent` running (or has it run) with this --bpffs?")]
    Open {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
}

fn ip(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

fn proto_name(p: u8) -> String {
    match p {
        lb_common::IPPROTO_TCP => "TCP".into(),
        lb_common::IPPROTO_UDP => "UDP".into(),
        other => other.to_string(),
    }
}

fn open(pin_dir: &Path, name: &str) -> Result<MapData, InspectError> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).map_err(|source| InspectError::Open { path, source })
}

fn hash<K: aya::Pod, V: aya::Pod>(pin_dir: &Path, name: &str) -> Result<BpfHashMap<MapData, K, V>, InspectError> {
    let path = pin_dir.join(name);
    let data = open(pin_dir, name)?;
    // LRU and plain hash maps read the same way.
    let map = match data.info().and_then(|i| i.map_type()) {
        Ok(aya::maps::MapType::LruHash) => Map::LruHashMap(data),
        _ => Map::HashMap(data),
    };
    BpfHashMap::try_from(map).map_err(|source| InspectError::Open { path, source })
}

fn per_cpu(pin_dir: &Path, name: &str) -> Result<PerCpuArray<MapData, Counter>, InspectError> {
    let path = pin_dir.join(name);
    PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, name)?)).map_err(|source| InspectError::Open { path, source })
}

fn sum_counter(a: &PerCpuArray<MapData, Counter>, i: u32) -> Counter {
    crate::datapath::counter_total(a, i).unwrap_or_default()
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendRow {
    pub slot: u32,
    pub address: String,
    pub backend_id: u32,
    /// Conntrack forward entries pointing at this backend.
    pub connections: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceRow {
    pub protocol: String,
    pub frontend: String,
    pub id: u32,
    pub affinity_timeout_s: Option<u32>,
    pub no_endpoints: &'static str,
    pub packets: u64,
    pub bytes: u64,
    /// connect() and unconnected sendmsg() calls the socket LB translated (their
    /// packets are not in `packets`).
    pub socket_translations: u64,
    pub backends: Vec<BackendRow>,
    /// Backends out of the slots whose pods still exist: no new connections, the
    /// established ones keep going.
    pub draining: Vec<DrainingRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DrainingRow {
    pub address: String,
    pub backend_id: u32,
    /// Conntrack forward entries pointing at this backend.
    pub connections: usize,
}

/// Every frontend with its backends and counters, sorted by address and port.
pub fn services(pin_dir: &Path) -> Result<Vec<ServiceRow>, InspectError> {
    let svcs: BpfHashMap<MapData, ServiceKey4, ServiceValue> = hash(pin_dir, map_names::SERVICES)?;
    let bes: BpfHashMap<MapData, BackendKey, BackendValue> = hash(pin_dir, map_names::BACKENDS)?;
    let stats = per_cpu(pin_dir, map_names::SVC_STATS)?;
    let sock_stats = per_cpu(pin_dir, map_names::SOCK_SVC_STATS).ok();
    // Live flows only: entries past their timeout, and flows closed by a RST or both
    // FINs, still sit in the LRU until the collector or an eviction takes them.
    let mut conns: HashMap<(u32, u32), usize> = HashMap::new();
    if let Ok(ct) = hash::<CtKey4, CtValue4>(pin_dir, map_names::CONNTRACK) {
        let now = crate::agent::conntrack::now_tick();
        for (k, v) in ct.iter().filter_map(Result::ok) {
            if v.dir == CT_DIR_FORWARD && v.open() && !v.expired(k.proto, now) {
                *conns.entry((v.svc_id, v.backend_id)).or_default() += 1;
            }
        }
    }
    let mut slots: HashMap<u32, BTreeMap<u32, BackendValue>> = HashMap::new();
    for (k, v) in bes.iter().filter_map(Result::ok) {
        slots.entry(k.svc_id).or_default().insert(k.slot, v);
    }
    // Maps pinned by a datapath without DRAINING: nothing drains.
    let mut draining: HashMap<u32, Vec<BackendValue>> = HashMap::new();
    if let Ok(d) = hash::<DrainKey, BackendValue>(pin_dir, map_names::DRAINING) {
        for (k, v) in d.iter().filter_map(Result::ok) {
            draining.entry(k.svc_id).or_default().push(v);
        }
    }
    let mut rows: Vec<(ServiceKey4, ServiceRow)> = Vec::new();
    for (k, v) in svcs.iter().filter_map(Result::ok) {
        if k.port_be == 0 && k.proto == 0 {
            continue;
        }
        let c = sum_counter(&stats, v.id);
        let backends = slots
            .get(&v.id)
            .map(|s| {
                // Not `range(1..=count)`: that panics for count 0, which a frontend
                // has while the agent lowers it before deleting the slots.
                s.iter()
                    .filter(|(slot, _)| (1..=v.count).contains(*slot))
                    .map(|(slot, b)| BackendRow {
                        slot: *slot,
                        address: format!("{}:{}", ip(b.addr_be), u16::from_be(b.port_be)),
                        backend_id: b.backend_id,
                        connections: conns.get(&(v.id, b.backend_id)).copied().unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut drain_rows: Vec<DrainingRow> = draining
            .get(&v.id)
            .into_iter()
            .flatten()
            .map(|b| DrainingRow {
                address: format!("{}:{}", ip(b.addr_be), u16::from_be(b.port_be)),
                backend_id: b.backend_id,
                connections: conns.get(&(v.id, b.backend_id)).copied().unwrap_or(0),
            })
            .collect();
        drain_rows.sort_by_key(|d| d.backend_id);
        rows.push((
            k,
            ServiceRow {
                protocol: proto_name(k.proto),
                frontend: format!("{}:{}", ip(k.addr_be), u16::from_be(k.port_be)),
                id: v.id,
                affinity_timeout_s: (v.flags & SVC_F_AFFINITY != 0).then_some(v.affinity_timeout_s),
                no_endpoints: if v.no_backends == NO_BACKENDS_DROP { "drop" } else { "reject" },
                packets: c.packets,
                bytes: c.bytes,
                socket_translations: sock_stats.as_ref().map_or(0, |m| sum_counter(m, v.id).packets),
                backends,
                draining: drain_rows,
            },
        ));
    }
    rows.sort_by_key(|(k, _)| (u32::from_be(k.addr_be), u16::from_be(k.port_be), k.proto));
    Ok(rows.into_iter().map(|(_, r)| r).collect())
}

/// `ipvsadm -Ln` style.
pub fn services_table(rows: &[ServiceRow]) -> String {
    let mut o = String::new();
    let _ =
        writeln!(o, "Prot LocalAddress:Port        Id      Flags                 Packets         Bytes    SocketLB");
    let _ = writeln!(o, "  -> RemoteAddress:Port       Slot    BackendId         ActiveConn");
    for r in rows {
        let mut flags = match r.affinity_timeout_s {
            Some(t) => format!("affinity={t}s"),
            None => String::new(),
        };
        if r.backends.is_empty() {
            if !flags.is_empty() {
                flags.push(' ');
            }
            flags.push_str(r.no_endpoints);
        }
        let _ = writeln!(
            o,
            "{:<4} {:<23} {:<7} {:<17} {:>11} {:>13} {:>11}",
            r.protocol, r.frontend, r.id, flags, r.packets, r.bytes, r.socket_translations
        );
        for b in &r.backends {
            let _ = writeln!(o, "  -> {:<23} {:<7} {:<17} {:>10}", b.address, b.slot, b.backend_id, b.connections);
        }
        for b in &r.draining {
            let _ =
                writeln!(o, "  -> {:<23} {:<7} {:<17} {:>10}  draining", b.address, "-", b.backend_id, b.connections);
        }
    }
    o
}

#[derive(Clone, Debug, Serialize)]
pub struct ConntrackRow {
    pub protocol: String,
    pub source: String,
    pub destination: String,
    pub direction: &'static str,
    /// Forward: the backend; reply: the frontend.
    pub nat: String,
    pub svc_id: u32,
    pub backend_id: u32,
    pub slot: u32,
    pub affinity: bool,
    pub hairpin: bool,
    /// `syn_sent`, `established`, `closing`, `time_wait`, `closed` (TCP); `unreplied`,
    /// `assured` (UDP).
    pub state: &'static str,
    /// Seconds since the flow was last refreshed.
    pub idle_s: u32,
    /// Seconds until it expires without further packets (0: expired, awaiting collection).
    pub expires_in_s: u32,
    /// Seconds since the flow was created (`CtValue4::created`); null when not known
    /// (an entry carried over from map layout v5, which did not record it).
    pub age_s: Option<u32>,
}

/// The flow state a conntrack entry's flags name, in netfilter's words.
pub fn ct_state(proto: u8, flags: u8) -> &'static str {
    use lb_common::{CT_F_FIN_FWD, CT_F_FIN_REPLY, CT_F_REPLIED, CT_F_RST, IPPROTO_UDP};
    if proto == IPPROTO_UDP {
        return if flags & CT_F_REPLIED != 0 { "assured" } else { "unreplied" };
    }
    if flags & CT_F_RST != 0 {
        "closed"
    } else if flags & CT_F_FIN_FWD != 0 && flags & CT_F_FIN_REPLY != 0 {
        "time_wait"
    } else if flags & (CT_F_FIN_FWD | CT_F_FIN_REPLY) != 0 {
        "closing"
    } else if flags & CT_F_REPLIED != 0 {
        "established"
    } else {
        "syn_sent"
    }
}

pub fn conntrack(pin_dir: &Path) -> Result<Vec<ConntrackRow>, InspectError> {
    let ct: BpfHashMap<MapData, CtKey4, CtValue4> = hash(pin_dir, map_names::CONNTRACK)?;
    let now = crate::agent::conntrack::now_tick();
    let mut rows: Vec<ConntrackRow> = ct
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| ConntrackRow {
            state: ct_state(k.proto, v.flags),
            idle_s: now.wrapping_sub(v.seen),
            expires_in_s: v.timeout_s(k.proto).saturating_sub(now.wrapping_sub(v.seen)),
            age_s: (v.created != 0).then(|| now.wrapping_sub(v.created)),
            protocol: proto_name(k.proto),
            source: format!("{}:{}", ip(k.src_addr_be), u16::from_be(k.src_port_be)),
            destination: format!("{}:{}", ip(k.dst_addr_be), u16::from_be(k.dst_port_be)),
            direction: if v.dir == CT_DIR_FORWARD { "forward" } else { "reply" },
            nat: format!("{}:{}", ip(v.nat_addr_be), u16::from_be(v.nat_port_be)),
            svc_id: v.svc_id,
            backend_id: v.backend_id,
            slot: v.slot,
            affinity: v.flags & CT_F_AFFINITY != 0,
            hairpin: v.flags & CT_F_HAIRPIN != 0,
        })
        .collect();
    rows.sort_by(|a, b| (a.svc_id, &a.source, a.direction).cmp(&(b.svc_id, &b.source, b.direction)));
    Ok(rows)
}

pub fn conntrack_table(rows: &[ConntrackRow]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<5} {:<21} {:<21} {:<8} {:<21} {:>6} {:>8} {:>5} {:<11} {:>8} {:>7} flags",
        "Prot", "Source", "Destination", "Dir", "NAT", "SvcId", "Backend", "Slot", "State", "Age", "Expires"
    );
    for r in rows {
        let mut flags = Vec::new();
        if r.affinity {
            flags.push("affinity");
        }
        if r.hairpin {
            flags.push("hairpin");
        }
        let _ = writeln!(
            o,
            "{:<5} {:<21} {:<21} {:<8} {:<21} {:>6} {:>8} {:>5} {:<11} {:>8} {:>6}s {}",
            r.protocol,
            r.source,
            r.destination,
            r.direction,
            r.nat,
            r.svc_id,
            r.backend_id,
            r.slot,
            r.state,
            r.age_s.map_or_else(|| "-".to_string(), |a| format!("{a}s")),
            r.expires_in_s,
            flags.join(",")
        );
    }
    let _ = writeln!(o, "{} entries", rows.len());
    o
}

#[derive(Clone, Debug, Serialize)]
pub struct AffinityRow {
    pub svc_id: u32,
    pub client: String,
    pub backend_id: u32,
    pub slot: u32,
    /// Seconds since the client's last packet.
    pub idle_s: f64,
}

pub fn affinity(pin_dir: &Path) -> Result<Vec<AffinityRow>, InspectError> {
    let m: BpfHashMap<MapData, AffinityKey4, AffinityValue> = hash(pin_dir, map_names::AFFINITY)?;
    let now = crate::datapath::monotonic_ns();
    let row = |svc_id, client, v: AffinityValue| AffinityRow {
        svc_id,
        client,
        backend_id: v.backend_id,
        slot: v.slot,
        idle_s: now.saturating_sub(v.last_used_ns) as f64 / 1e9,
    };
    let mut rows: Vec<AffinityRow> =
        m.iter().filter_map(Result::ok).map(|(k, v)| row(k.svc_id, ip(k.client_addr_be).to_string(), v)).collect();
    // The socket LB's clients are network namespaces (`netns:<cookie>`); maps pinned
    // before it have none.
    if let Ok(sm) = hash::<lb_common::SockAffinityKey, AffinityValue>(pin_dir, map_names::SOCK_AFFINITY) {
        rows.extend(
            sm.iter().filter_map(Result::ok).map(|(k, v)| row(k.svc_id, format!("netns:{}", k.netns_cookie), v)),
        );
    }
    rows.sort_by(|a, b| (a.svc_id, &a.client).cmp(&(b.svc_id, &b.client)));
    Ok(rows)
}

pub fn affinity_table(rows: &[AffinityRow]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{:>6} {:<20} {:>9} {:>5} {:>10}", "SvcId", "Client", "BackendId", "Slot", "Idle(s)");
    for r in rows {
        let _ = writeln!(o, "{:>6} {:<20} {:>9} {:>5} {:>10.1}", r.svc_id, r.client, r.backend_id, r.slot, r.idle_s);
    }
    let _ = writeln!(o, "{} entries", rows.len());
    o
}

#[derive(Clone, Debug, Serialize)]
pub struct StatRow {
    pub reason: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

pub fn stats(pin_dir: &Path) -> Result<Vec<StatRow>, InspectError> {
    let m = per_cpu(pin_dir, map_names::STATS)?;
    Ok(Reason::ALL
        .iter()
        .map(|r| {
            let c = sum_counter(&m, *r as u32);
            StatRow { reason: r.name(), packets: c.packets, bytes: c.bytes }
        })
        .collect())
}

pub fn stats_table(rows: &[StatRow]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{:<22} {:>14} {:>16}", "Reason", "Packets", "Bytes");
    for r in rows {
        let _ = writeln!(o, "{:<22} {:>14} {:>16}", r.reason, r.packets, r.bytes);
    }
    o
}

#[derive(Clone, Debug, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: Option<usize>,
    pub max_entries: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub bpffs: PathBuf,
    pub attach: Vec<attach::AttachPoint>,
    pub maps: Vec<MapFill>,
    /// From the agent's status file, if it has written one.
    pub agent: Option<AgentStatus>,
    /// Whether the agent process that wrote the status file still runs.
    pub agent_running: Option<bool>,
}

fn count_entries<K: aya::Pod, V: aya::Pod>(pin_dir: &Path, name: &str) -> Option<usize> {
    hash::<K, V>(pin_dir, name).ok().map(|m| m.keys().filter(Result::is_ok).count())
}

pub fn status(pin_dir: &Path, status_file: Option<&Path>) -> Result<Status, InspectError> {
    let mut maps = Vec::new();
    for name in map_names::ALL {
        let data = open(pin_dir, name)?;
        let max_entries = data.info().map(|i| i.max_entries()).unwrap_or(0);
        let entries = match name {
            map_names::SERVICES => count_entries::<ServiceKey4, ServiceValue>(pin_dir, name),
            map_names::BACKENDS => count_entries::<BackendKey, BackendValue>(pin_dir, name),
            map_names::DRAINING => count_entries::<DrainKey, BackendValue>(pin_dir, name),
            map_names::AFFINITY => count_entries::<AffinityKey4, AffinityValue>(pin_dir, name),
            map_names::CONNTRACK => count_entries::<CtKey4, CtValue4>(pin_dir, name),
            _ => None,
        };
        maps.push(MapFill { name, entries, max_entries });
    }
    let agent: Option<AgentStatus> =
        status_file.and_then(|p| std::fs::read(p).ok()).and_then(|b| serde_json::from_slice(&b).ok());
    let agent_running = agent.as_ref().map(|a| Path::new(&format!("/proc/{}", a.pid)).exists());
    Ok(Status {
        bpffs: pin_dir.into(),
        attach: attach::pinned_links(&pin_dir.join(attach::LINKS_DIR)).into_iter().map(|(_, a)| a).collect(),
        maps,
        agent,
        agent_running,
    })
}

pub fn status_table(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "bpffs: {}", s.bpffs.display());
    let _ = writeln!(o, "\nAttach points:");
    if s.attach.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    for a in &s.attach {
        let id = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
        let _ = writeln!(
            o,
            "  {:<16} ifindex {:<5} {:<12} link {:<6} program {}",
            a.iface,
            a.ifindex,
            a.hook_name(),
            id(a.link_id),
            id(a.program_id)
        );
    }
    let _ = writeln!(o, "\nMaps:");
    for m in &s.maps {
        match m.entries {
            Some(n) => {
                let pct = if m.max_entries > 0 { n as f64 * 100.0 / m.max_entries as f64 } else { 0.0 };
                let _ = writeln!(o, "  {:<14} {:>9} / {:<9} ({pct:.1}%)", m.name, n, m.max_entries);
            }
            None => {
                let _ = writeln!(o, "  {:<14} {:>9}   {:<9} (per-CPU array)", m.name, "", m.max_entries);
            }
        }
    }
    let _ = writeln!(o, "\nAgent:");
    match &s.agent {
        None => {
            let _ = writeln!(o, "  no status file (agent not started with this --status-file?)");
        }
        Some(a) => {
            let running = if s.agent_running == Some(true) { "running" } else { "not running" };
            let ago =
                (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()
                    as u64)
                    .saturating_sub(a.last_sync_unix_ms) as f64
                    / 1000.0;
            let _ = writeln!(o, "  pid {} ({running}), source {}", a.pid, a.source);
            let _ = writeln!(
                o,
                "  ready {}, syncs {}, last sync {ago:.1}s ago took {}us ({} writes)",
                a.ready, a.syncs, a.last_sync_duration_us, a.last_sync_writes
            );
            let _ = writeln!(
                o,
                "  frontends {}, endpoints {}, invalid objects {}, watch restarts {}",
                a.frontends, a.endpoints, a.invalid_objects, a.watch_restarts
            );
            match &a.socket_lb {
                Some(sl) => {
                    let _ =
                        writeln!(o, "  socket LB on: {} attached to {}", sl.programs.join(", "), sl.cgroup.display());
                }
                None => {
                    let _ = writeln!(o, "  socket LB off");
                }
            }
            if let Some(e) = &a.last_sync_error {
                let _ = writeln!(o, "  last sync error: {e}");
            }
            if let Some(e) = &a.source_error {
                let _ = writeln!(o, "  source error (last good state kept): {e}");
            }
            for f in &a.attach_failures {
                let _ = writeln!(
                    o,
                    "  NOT READY: attach to {} ({}) failing after {} attempts, retry in {}s: {}",
                    f.iface, f.hook, f.attempts, f.retry_in_s, f.error
                );
            }
            if let Some(all) = a.rp_filter.all {
                let fixed = a
                    .rp_filter
                    .all_fixed_from
                    .map(|v| format!(" (was {v}, changed by --fix-rp-filter)"))
                    .unwrap_or_default();
                let _ = writeln!(o, "  net.ipv4.conf.all.rp_filter {all}{fixed}");
            }
            if let Some(w) = &a.rp_filter.warning {
                let _ = writeln!(o, "  WARNING: {w}");
            }
            if !a.rp_filter.ifaces_failed.is_empty() {
                let _ = writeln!(
                    o,
                    "  WARNING: rp_filter could not be set to 0 on {}",
                    a.rp_filter.ifaces_failed.join(", ")
                );
            }
        }
    }
    o
}
