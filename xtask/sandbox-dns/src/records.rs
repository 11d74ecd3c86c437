//! The in-memory view that answers are computed from.
//!
//! [`Records`] is rebuilt from the reflector stores after every watch event and
//! swapped in whole (the sandbox has tens of Services, so a rebuild costs
//! microseconds and readers never see a half-applied change). It holds only what
//! the answers need, in lowercase, so [`crate::answer`] is a pure function that unit
//! tests can drive without an API server.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use hickory_proto::rr::Name;
use k8s_openapi::api::core::v1::{Endpoints, Service};

#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error("invalid cluster domain {domain:?}: {reason}")]
    Domain { domain: String, reason: String },
}

/// The cluster zone: its apex and the TTL of every answer.
#[derive(Clone, Debug)]
pub struct Zone {
    /// The apex as a fully qualified, lowercase name (`cluster.local.`).
    apex: Name,
    /// The apex's labels, lowercase, left to right (`["cluster", "local"]`).
    labels: Vec<String>,
    ttl: u32,
}

impl Zone {
    /// `domain` is e.g. `cluster.local` (a trailing dot is accepted).
    pub fn new(domain: &str, ttl: u32) -> Result<Self, RecordsError> {
        let err = |reason: &str| RecordsError::Domain { domain: domain.to_owned(), reason: reason.to_owned() };
        let trimmed = domain.trim_end_matches('.').to_ascii_lowercase();
        if trimmed.is_empty() {
            return Err(err("empty (the root zone cannot be the cluster domain)"));
        }
        let labels: Vec<String> = trimmed.split('.').map(str::to_owned).collect();
        if labels
            .iter()
            .any(|l| l.is_empty() || l.len() > 63 || !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(err("labels must be 1-63 characters of a-z, 0-9 and '-'"));
        }
        let apex = Name::from_ascii(format!("{trimmed}.")).map_err(|e| err(&e.to_string()))?;
        Ok(Zone { apex, labels, ttl })
    }

    pub fn apex(&self) -> &Name {
        &self.apex
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    /// `<rel>.<apex>` as a fully qualified name, or `None` if it is not a valid
    /// name (a label over 63 bytes: Kubernetes names are DNS-1123 labels, so only
    /// a misconfigured object gets here).
    pub fn name(&self, rel: &str) -> Option<Name> {
        Name::from_ascii(format!("{rel}.{}", self.apex)).ok()
    }
}

/// A Service or endpoint port, as SRV records need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    /// Lowercase: `tcp`, `udp` or `sctp`, as in `_<port>._<proto>` names.
    pub protocol: String,
    pub port: u16,
}

impl Port {
    pub fn new(name: &str, protocol: &str, port: u16) -> Self {
        Port { name: name.to_ascii_lowercase(), protocol: protocol.to_ascii_lowercase(), port }
    }
}

/// One ready address of a headless Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    /// `hostname` from the Endpoints address (set for pods with
    /// `hostname`/`subdomain`, e.g. StatefulSet members).
    pub hostname: Option<String>,
    pub ports: Vec<Port>,
}

impl Endpoint {
    /// The first label of this endpoint's own name: its hostname, or else its
    /// address with dashes (`10-0-0-1`), as kube-dns and CoreDNS name endpoints in
    /// SRV targets.
    pub fn label(&self) -> String {
        match &self.hostname {
            Some(h) => h.clone(),
            None => self.ip.to_string().replace('.', "-"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// ClusterIP, NodePort and LoadBalancer: A records are the IPv4 cluster IPs
    /// (empty while the IP is not yet allocated, or for IPv6-only Services).
    ClusterIp(Vec<Ipv4Addr>),
    /// `clusterIP: None`: A records are the ready endpoint addresses.
    Headless,
    /// A CNAME to this (fully qualified) name.
    ExternalName(Name),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    pub kind: Kind,
    /// The Service's ports (SRV for ClusterIP Services).
    pub ports: Vec<Port>,
    /// Ready endpoints; only kept for headless Services, whose names resolve to them.
    pub endpoints: Vec<Endpoint>,
}

/// Everything the answers are computed from.
#[derive(Clone, Debug)]
pub struct Records {
    zone: Zone,
    ready: bool,
    serial: u32,
    /// namespace → service name → record. BTreeMaps so that conflicts (two names
    /// for one reverse address) resolve the same way on every rebuild.
    namespaces: BTreeMap<String, BTreeMap<String, ServiceRecord>>,
    /// PTR targets by address: ClusterIPs and headless endpoint addresses.
    reverse: HashMap<Ipv4Addr, Name>,
}

impl Records {
    /// An empty, ready record set (every in-zone name is NXDOMAIN).
    pub fn new(zone: Zone) -> Self {
        let serial = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(1);
        Records { zone, ready: true, serial, namespaces: BTreeMap::new(), reverse: HashMap::new() }
    }

    /// The set served before the reflectors have listed everything: every query gets
    /// SERVFAIL, because an NXDOMAIN now would be a lie that resolvers cache.
    pub fn not_ready(zone: Zone) -> Self {
        Records { ready: false, ..Records::new(zone) }
    }

    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    pub fn serial(&self) -> u32 {
        self.serial
    }

    pub fn service_count(&self) -> usize {
        self.namespaces.values().map(BTreeMap::len).sum()
    }

    pub fn has_namespace(&self, ns: &str) -> bool {
        self.namespaces.contains_key(ns)
    }

    pub fn service(&self, ns: &str, name: &str) -> Option<&ServiceRecord> {
        self.namespaces.get(ns)?.get(name)
    }

    pub fn reverse(&self, ip: Ipv4Addr) -> Option<&Name> {
        self.reverse.get(&ip)
    }

    /// Adds (or replaces) a Service. Reverse entries keep the first name given for
    /// an address.
    pub fn insert(&mut self, ns: &str, name: &str, mut svc: ServiceRecord) {
        let ns = ns.to_ascii_lowercase();
        let name = name.to_ascii_lowercase();
        if !matches!(svc.kind, Kind::Headless) {
            svc.endpoints.clear();
        }
        match &svc.kind {
            Kind::ClusterIp(ips) => {
                if let Some(target) = self.zone.name(&format!("{name}.{ns}.svc")) {
                    for ip in ips {
                        self.reverse.entry(*ip).or_insert_with(|| target.clone());
                    }
                }
            }
            Kind::Headless => {
                for ep in &svc.endpoints {
                    if let Some(target) = self.zone.name(&format!("{}.{name}.{ns}.svc", ep.label())) {
                        self.reverse.entry(ep.ip).or_insert(target);
                    }
                }
            }
            Kind::ExternalName(_) => {}
        }
        self.namespaces.entry(ns).or_default().insert(name, svc);
    }

    /// Builds a ready record set from the reflector stores' contents. Objects that
    /// cannot be served (an unparsable externalName) are skipped and described in
    /// the returned warnings.
    pub fn from_kube(zone: Zone, services: &[Arc<Service>], endpoints: &[Arc<Endpoints>]) -> (Self, Vec<String>) {
        let mut warnings = Vec::new();
        let eps: HashMap<(&str, &str), &Endpoints> = endpoints
            .iter()
            .filter_map(|e| Some(((e.metadata.namespace.as_deref()?, e.metadata.name.as_deref()?), e.as_ref())))
            .collect();
        let mut sorted: Vec<(&str, &str, &Service)> = services
            .iter()
            .filter_map(|s| Some((s.metadata.namespace.as_deref()?, s.metadata.name.as_deref()?, s.as_ref())))
            .collect();
        sorted.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));

        let mut records = Records::new(zone);
        for (ns, name, svc) in sorted {
            let Some(spec) = &svc.spec else { continue };
            let kind = if spec.type_.as_deref() == Some("ExternalName") {
                let target =
                    spec.external_name.as_deref().unwrap_or_default().trim_end_matches('.').to_ascii_lowercase();
                match Name::from_ascii(format!("{target}.")) {
                    Ok(n) if !target.is_empty() => Kind::ExternalName(n),
                    _ => {
                        warnings.push(format!("service {ns}/{name}: externalName {target:?} is not a DNS name"));
                        continue;
                    }
                }
            } else if spec.cluster_ip.as_deref() == Some("None") {
                Kind::Headless
            } else {
                // clusterIPs (1.20+) lists both families on dual-stack Services;
                // clusterIP alone is what older objects have.
                let mut ips: Vec<Ipv4Addr> = Vec::new();
                for ip in spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter()) {
                    if let Ok(ip) = ip.parse::<Ipv4Addr>()
                        && !ips.contains(&ip)
                    {
                        ips.push(ip);
                    }
                }
                Kind::ClusterIp(ips)
            };
            let ports = spec
                .ports
                .iter()
                .flatten()
                .filter_map(|p| named_port(p.name.as_deref(), p.protocol.as_deref(), p.port))
                .collect();
            let endpoints = match (&kind, eps.get(&(ns, name))) {
                (Kind::Headless, Some(e)) => ready_endpoints(e),
                _ => Vec::new(),
            };
            records.insert(ns, name, ServiceRecord { kind, ports, endpoints });
        }
        (records, warnings)
    }
}

/// A Service or endpoint port that can carry an SRV record: named, with a valid number
/// (protocol TCP when unset, as the API defaults it).
fn named_port(name: Option<&str>, protocol: Option<&str>, port: i32) -> Option<Port> {
    let name = name.filter(|n| !n.is_empty())?;
    Some(Port::new(name, protocol.unwrap_or("TCP"), u16::try_from(port).ok()?))
}

/// `subsets[].addresses` (the ready ones; the endpoints controller already moves
/// not-ready pods there when the Service sets `publishNotReadyAddresses`), IPv4 only.
fn ready_endpoints(e: &Endpoints) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for subset in e.subsets.iter().flatten() {
        let ports: Vec<Port> = subset
            .ports
            .iter()
            .flatten()
            .filter_map(|p| named_port(p.name.as_deref(), p.protocol.as_deref(), p.port))
            .collect();
        for addr in subset.addresses.iter().flatten() {
            let Ok(ip) = addr.ip.parse::<Ipv4Addr>() else { continue };
            let hostname = addr.hostname.as_deref().filter(|h| !h.is_empty()).map(str::to_ascii_lowercase);
            // One pod in several subsets (ports ready in different containers) is
            // one endpoint with the union of its ports.
            match out.iter_mut().find(|ep: &&mut Endpoint| ep.ip == ip && ep.hostname == hostname) {
                Some(ep) => ep.ports.extend(ports.iter().cloned()),
                None => out.push(Endpoint { ip, hostname, ports: ports.clone() }),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Zone {
        Zone::new("cluster.local", 5).unwrap()
    }

    #[test]
    fn zone_rejects_bad_domains() {
        assert!(Zone::new("", 5).is_err());
        assert!(Zone::new(".", 5).is_err());
        assert!(Zone::new("a..b", 5).is_err());
        assert!(Zone::new("clu_ster.local", 5).is_err());
        let z = Zone::new("Cluster.Local.", 5).unwrap();
        assert_eq!(z.labels(), ["cluster", "local"]);
        assert_eq!(z.apex().to_ascii(), "cluster.local.");
    }

    #[test]
    fn from_kube_maps_service_kinds_and_endpoints() {
        let svc = |v: serde_json::Value| Arc::new(serde_json::from_value::<Service>(v).unwrap());
        let services = vec![
            svc(serde_json::json!({
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::a"],
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"port": 81}]}
            })),
            svc(serde_json::json!({
                "metadata": {"name": "db", "namespace": "default"},
                "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}
            })),
            svc(serde_json::json!({
                "metadata": {"name": "ext", "namespace": "default"},
                "spec": {"type": "ExternalName", "externalName": "Example.COM"}
            })),
            svc(serde_json::json!({
                "metadata": {"name": "bad", "namespace": "default"},
                "spec": {"type": "ExternalName", "externalName": ""}
            })),
        ];
        let endpoints = vec![Arc::new(
            serde_json::from_value::<Endpoints>(serde_json::json!({
                "metadata": {"name": "db", "namespace": "default"},
                "subsets": [
                    {"addresses": [{"ip": "10.0.0.1", "hostname": "db-0"}, {"ip": "10.0.0.2"}, {"ip": "fd00::1"}],
                     "notReadyAddresses": [{"ip": "10.0.0.3"}],
                     "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]},
                    {"addresses": [{"ip": "10.0.0.1", "hostname": "db-0"}],
                     "ports": [{"name": "metrics", "port": 9187}]}
                ]
            }))
            .unwrap(),
        )];
        let (r, warnings) = Records::from_kube(zone(), &services, &endpoints);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(r.is_ready());
        assert_eq!(r.service_count(), 3);

        let web = r.service("default", "web").unwrap();
        assert_eq!(web.kind, Kind::ClusterIp(vec!["10.96.0.10".parse().unwrap()]));
        assert_eq!(web.ports, vec![Port::new("http", "tcp", 80)]);

        let db = r.service("default", "db").unwrap();
        assert_eq!(db.kind, Kind::Headless);
        assert_eq!(
            db.endpoints,
            vec![
                Endpoint {
                    ip: "10.0.0.1".parse().unwrap(),
                    hostname: Some("db-0".into()),
                    ports: vec![Port::new("pg", "tcp", 5432), Port::new("metrics", "tcp", 9187)],
                },
                Endpoint { ip: "10.0.0.2".parse().unwrap(), hostname: None, ports: vec![Port::new("pg", "tcp", 5432)] },
            ]
        );

        let ext = r.service("default", "ext").unwrap();
        assert_eq!(ext.kind, Kind::ExternalName(Name::from_ascii("example.com.").unwrap()));

        assert_eq!(r.reverse("10.96.0.10".parse().unwrap()).unwrap().to_ascii(), "web.default.svc.cluster.local.");
        assert_eq!(
            r.reverse("10.0.0.2".parse().unwrap()).unwrap().to_ascii(),
            "10-0-0-2.db.default.svc.cluster.local."
        );
        assert!(r.reverse("10.0.0.3".parse().unwrap()).is_none(), "not-ready addresses are not served");
    }
}
