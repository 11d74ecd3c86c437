//! Generated sets of Services and EndpointSlices, valid and malformed mixed, through
//! [`compute`]: it never panics, every malformed object is reported with the issue
//! the generator expects for what it broke, and a valid Service that shares nothing
//! with a malformed object is programmed exactly as when it is computed alone.
//!
//! `LB_MODEL_FUZZ_SEED` and `LB_MODEL_FUZZ_SETS` override the fixed seed and the
//! number of sets (`cargo test -p lb-userspace --lib generated -- --nocapture` prints
//! the totals); a failure prints the seed and the set's objects.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use super::*;

/// The packet fuzzer's generator: seeded, the same on every machine.
use lb_testing::fuzz::Rng;

/// What the generator breaks in a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SvcFault {
    None,
    /// Valid, but not for this proxy (headless, ExternalName, other proxy's label).
    Skipped,
    BadClusterIp,
    NonUnicastClusterIp,
    PortZero,
    PortTooBig,
    PortNegative,
    UnknownProtocol,
    DuplicatePortName,
    NoPorts,
    EmptyPorts,
    NoSpec,
    NoName,
    UnknownType,
    BadAffinity,
    BadAnnotation,
    BadTrafficPolicy,
    /// The same namespace and name twice.
    Duplicate,
    /// The ClusterIP and ports of an earlier valid Service.
    StealsFrontends,
}

const SVC_FAULTS: [SvcFault; 19] = [
    SvcFault::None,
    SvcFault::Skipped,
    SvcFault::BadClusterIp,
    SvcFault::NonUnicastClusterIp,
    SvcFault::PortZero,
    SvcFault::PortTooBig,
    SvcFault::PortNegative,
    SvcFault::UnknownProtocol,
    SvcFault::DuplicatePortName,
    SvcFault::NoPorts,
    SvcFault::EmptyPorts,
    SvcFault::NoSpec,
    SvcFault::NoName,
    SvcFault::UnknownType,
    SvcFault::BadAffinity,
    SvcFault::BadAnnotation,
    SvcFault::BadTrafficPolicy,
    SvcFault::Duplicate,
    SvcFault::StealsFrontends,
];

impl SvcFault {
    fn issue(self) -> Option<IssueKind> {
        Some(match self {
            SvcFault::None | SvcFault::Skipped | SvcFault::StealsFrontends => return None,
            SvcFault::BadClusterIp | SvcFault::NonUnicastClusterIp => IssueKind::InvalidIp,
            SvcFault::PortZero | SvcFault::PortTooBig | SvcFault::PortNegative => IssueKind::InvalidPort,
            SvcFault::UnknownProtocol => IssueKind::UnsupportedProtocol,
            SvcFault::DuplicatePortName => IssueKind::DuplicatePort,
            SvcFault::NoPorts | SvcFault::EmptyPorts | SvcFault::NoSpec | SvcFault::NoName => IssueKind::MissingField,
            SvcFault::UnknownType => IssueKind::InvalidServiceType,
            SvcFault::BadAffinity => IssueKind::InvalidAffinity,
            SvcFault::BadAnnotation => IssueKind::InvalidAnnotation,
            SvcFault::BadTrafficPolicy => IssueKind::InvalidTrafficPolicy,
            SvcFault::Duplicate => IssueKind::DuplicateObject,
        })
    }
    /// Whether its EndpointSlices are read at all.
    fn proxied(self) -> bool {
        !matches!(self, SvcFault::Skipped | SvcFault::NoSpec | SvcFault::NoName | SvcFault::UnknownType)
    }
}

/// What the generator breaks in an EndpointSlice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SliceFault {
    None,
    BadEndpointIp,
    WrongFamilyEndpoint,
    NonUnicastEndpoint,
    PortZero,
    PortTooBig,
    UnknownProtocol,
    DuplicatePort,
    Fqdn,
    UnknownAddressType,
    NoAddress,
    DuplicateEndpoint,
    Duplicate,
    NoName,
    /// No `kubernetes.io/service-name` label: belongs to nobody.
    NoServiceLabel,
    /// Names a Service that does not exist.
    UnknownService,
}

const SLICE_FAULTS: [SliceFault; 16] = [
    SliceFault::None,
    SliceFault::BadEndpointIp,
    SliceFault::WrongFamilyEndpoint,
    SliceFault::NonUnicastEndpoint,
    SliceFault::PortZero,
    SliceFault::PortTooBig,
    SliceFault::UnknownProtocol,
    SliceFault::DuplicatePort,
    SliceFault::Fqdn,
    SliceFault::UnknownAddressType,
    SliceFault::NoAddress,
    SliceFault::DuplicateEndpoint,
    SliceFault::Duplicate,
    SliceFault::NoName,
    SliceFault::NoServiceLabel,
    SliceFault::UnknownService,
];

impl SliceFault {
    fn issue(self) -> Option<IssueKind> {
        Some(match self {
            SliceFault::None => return None,
            SliceFault::BadEndpointIp | SliceFault::WrongFamilyEndpoint | SliceFault::NonUnicastEndpoint => {
                IssueKind::InvalidIp
            }
            SliceFault::PortZero | SliceFault::PortTooBig => IssueKind::InvalidPort,
            SliceFault::UnknownProtocol => IssueKind::UnsupportedProtocol,
            SliceFault::DuplicatePort => IssueKind::DuplicatePort,
            SliceFault::Fqdn | SliceFault::UnknownAddressType => IssueKind::InvalidAddressType,
            SliceFault::NoAddress | SliceFault::NoName => IssueKind::MissingField,
            SliceFault::DuplicateEndpoint => IssueKind::DuplicateEndpoint,
            SliceFault::Duplicate => IssueKind::DuplicateObject,
            SliceFault::NoServiceLabel | SliceFault::UnknownService => IssueKind::UnknownService,
        })
    }
    /// The slice is skipped whole: its Service is programmed as without it.
    fn skipped_whole(self) -> bool {
        matches!(
            self,
            SliceFault::Fqdn
                | SliceFault::UnknownAddressType
                | SliceFault::NoName
                | SliceFault::NoServiceLabel
                | SliceFault::UnknownService
        )
    }
}

/// A port of a generated Service: (name, number, protocol).
type Port = (String, i64, &'static str);

struct Gen {
    rng: Rng,
    /// The next endpoint address (unique over a set, so that no two slices share one).
    next_ep: u32,
    services: Vec<Value>,
    slices: Vec<Value>,
    /// (kind, object) every malformed object must be reported with.
    expected: Vec<(IssueKind, String)>,
    /// Objects that may have issues (malformed, or of a Service that has some).
    tainted: BTreeSet<String>,
    /// Valid Services to compare with their computation alone: (ns, name) -> the
    /// Service and the slices that must count.
    clean: BTreeMap<(String, String), (Value, Vec<Value>)>,
    /// Services whose frontends another one claims: (ClusterIP) -> keys.
    by_ip: BTreeMap<String, Vec<(String, String)>>,
    malformed: usize,
}

const NAMESPACES: [&str; 3] = ["default", "kube-system", "team-a"];
const PORT_NAMES: [&str; 5] = ["http", "https", "dns", "metrics", "grpc"];

impl Gen {
    fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            next_ep: 0,
            services: Vec::new(),
            slices: Vec::new(),
            expected: Vec::new(),
            tainted: BTreeSet::new(),
            clean: BTreeMap::new(),
            by_ip: BTreeMap::new(),
            malformed: 0,
        }
    }

    fn endpoint_ip(&mut self) -> String {
        let n = self.next_ep;
        self.next_ep += 1;
        // 10.128.0.1 upwards: never unspecified, loopback, link-local, multicast.
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 128, 0, 1)) + n).to_string()
    }

    /// Valid conditions, absent or any combination (contradictory ones too: kube-proxy
    /// reads each field on its own, and so does the model).
    fn conditions(&mut self) -> Option<Value> {
        match self.rng.index(4) {
            0 => None,
            1 => Some(json!({})),
            _ => {
                let mut c = serde_json::Map::new();
                for k in ["ready", "serving", "terminating"] {
                    if !self.rng.one_in_usize(3) {
                        c.insert(k.into(), Value::Bool(self.rng.one_in_usize(2)));
                    }
                }
                Some(Value::Object(c))
            }
        }
    }

    fn endpoint(&mut self, addr: &str) -> Value {
        let mut e = json!({"addresses": [addr]});
        if let Some(c) = self.conditions() {
            e["conditions"] = c;
        }
        e
    }

    fn ports(&mut self) -> Vec<Port> {
        let n = 1 + self.rng.index(3);
        let mut names: Vec<&str> = PORT_NAMES.to_vec();
        let mut used = BTreeSet::new();
        let mut out = Vec::new();
        while out.len() < n {
            let num = 1 + self.rng.index(65535) as i64;
            let proto = if self.rng.one_in_usize(3) { "UDP" } else { "TCP" };
            if !used.insert((num, proto)) {
                continue;
            }
            let name = if n == 1 && self.rng.one_in_usize(2) {
                String::new()
            } else {
                names.remove(self.rng.index(names.len())).to_string()
            };
            out.push((name, num, proto));
        }
        out
    }

    fn port_json((name, num, proto): &Port, with_protocol: bool) -> Value {
        let mut p = json!({"port": num});
        if !name.is_empty() {
            p["name"] = json!(name);
        }
        // Unset is TCP.
        if with_protocol || *proto != "TCP" {
            p["protocol"] = json!(proto);
        }
        p
    }

    fn set(&mut self, n_services: usize) {
        let mut valid: Vec<(String, String, Value)> = Vec::new();
        for i in 0..n_services {
            let ns = self.rng.pick(&NAMESPACES).to_string();
            let name = format!("s{i}");
            let ip = format!("10.96.{}.{}", i / 200, 1 + i % 200);
            let ports = self.ports();
            let fault = if self.rng.one_in_usize(2) { SvcFault::None } else { self.rng.pick(&SVC_FAULTS) };
            let fault = if fault == SvcFault::StealsFrontends && valid.is_empty() { SvcFault::None } else { fault };
            let with_protocol = self.rng.one_in_usize(2);
            let mut spec = json!({
                "clusterIP": ip,
                "ports": ports.iter().map(|p| Self::port_json(p, with_protocol)).collect::<Vec<_>>(),
            });
            if self.rng.one_in_usize(3) {
                spec["type"] = json!(self.rng.pick(&["ClusterIP", "NodePort", "LoadBalancer"]));
            }
            if self.rng.one_in_usize(4) {
                spec["clusterIPs"] = json!([ip, format!("fd00::{i:x}")]);
            }
            let mut svc = json!({"apiVersion": "v1", "kind": "Service",
                                 "metadata": {"namespace": ns, "name": name}, "spec": spec});
            let object = format!("Service {ns}/{name}");
            let mut claimed_ip = Some(ip.clone());
            match fault {
                SvcFault::None | SvcFault::Duplicate => {}
                SvcFault::Skipped => match self.rng.index(3) {
                    0 => {
                        svc["spec"]["clusterIP"] = json!("None");
                        svc["spec"].as_object_mut().unwrap().remove("clusterIPs");
                    }
                    1 => svc["spec"] = json!({"type": "ExternalName", "externalName": "example.com"}),
                    _ => svc["metadata"]["labels"] = json!({LABEL_SERVICE_PROXY_NAME: "other"}),
                },
                SvcFault::BadClusterIp | SvcFault::NonUnicastClusterIp => {
                    let bad = if fault == SvcFault::BadClusterIp {
                        self.rng.pick(&["10.96.0.300", "banana", "10.96.0", " 10.96.0.1", "10.96.0.1/32"])
                    } else {
                        self.rng.pick(&[
                            "0.0.0.0",
                            "127.0.0.1",
                            "169.254.1.1",
                            "224.0.0.1",
                            "239.1.2.3",
                            "255.255.255.255",
                        ])
                    };
                    svc["spec"]["clusterIP"] = json!(bad);
                    svc["spec"].as_object_mut().unwrap().remove("clusterIPs");
                    claimed_ip = None;
                }
                SvcFault::PortZero | SvcFault::PortTooBig | SvcFault::PortNegative => {
                    let n = match fault {
                        SvcFault::PortZero => 0,
                        SvcFault::PortTooBig => self.rng.pick(&[65536, 70000, i32::MAX as i64]),
                        _ => self.rng.pick(&[-1, -80, i32::MIN as i64]),
                    };
                    let k = self.rng.index(ports.len());
                    svc["spec"]["ports"][k]["port"] = json!(n);
                }
                SvcFault::UnknownProtocol => {
                    let k = self.rng.index(ports.len());
                    svc["spec"]["ports"][k]["protocol"] = json!(self.rng.pick(&["SCTP", "ICMP", "tcp", ""]));
                }
                SvcFault::DuplicatePortName => {
                    let (name, num, proto) = ports[0].clone();
                    let other = if num == 65535 { 1 } else { num + 1 };
                    let dup = (name, other, proto);
                    if ports.iter().any(|(_, n, p)| *n == other && *p == proto) {
                        // Would be a duplicate frontend first; make it a fresh number.
                        svc["spec"]["ports"].as_array_mut().unwrap().clear();
                        svc["spec"]["ports"].as_array_mut().unwrap().push(Self::port_json(&ports[0], true));
                    }
                    svc["spec"]["ports"].as_array_mut().unwrap().push(Self::port_json(&dup, true));
                }
                SvcFault::NoPorts => {
                    svc["spec"].as_object_mut().unwrap().remove("ports");
                }
                SvcFault::EmptyPorts => svc["spec"]["ports"] = json!([]),
                SvcFault::NoSpec => {
                    svc.as_object_mut().unwrap().remove("spec");
                }
                SvcFault::NoName => {
                    svc["metadata"].as_object_mut().unwrap().remove("name");
                }
                SvcFault::UnknownType => svc["spec"]["type"] = json!(self.rng.pick(&["Foo", "clusterip", "Headless"])),
                SvcFault::BadAffinity => {
                    svc["spec"]["sessionAffinity"] = json!("ClientIP");
                    if self.rng.one_in_usize(3) {
                        svc["spec"]["sessionAffinity"] = json!("Cookie");
                    } else {
                        let t = self.rng.pick(&[0, -5, 86_401, i32::MAX as i64]);
                        svc["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
                    }
                }
                SvcFault::BadAnnotation => {
                    svc["metadata"]["annotations"] = json!({ANNOTATION_NO_ENDPOINTS: "explode"});
                }
                SvcFault::BadTrafficPolicy => svc["spec"]["internalTrafficPolicy"] = json!("Nearby"),
                SvcFault::StealsFrontends => {
                    let (_, _, target) = self.rng.pick(&valid);
                    svc["spec"] = target["spec"].clone();
                    claimed_ip = target["spec"]["clusterIP"].as_str().map(str::to_string);
                }
            }
            let key = (ns.clone(), name.clone());
            let mut slice_objects = vec![object.clone()];
            let mut clean = matches!(fault, SvcFault::None);
            if let Some(kind) = fault.issue() {
                let object = if fault == SvcFault::NoName { format!("Service {ns}/") } else { object.clone() };
                self.expected.push((kind, object.clone()));
                self.tainted.insert(object);
                self.malformed += 1;
            }
            if fault == SvcFault::StealsFrontends {
                self.malformed += 1;
            }
            if let Some(ip) =
                claimed_ip.filter(|_| fault.proxied() && !matches!(fault, SvcFault::NoPorts | SvcFault::EmptyPorts))
            {
                self.by_ip.entry(ip).or_default().push(key.clone());
            }
            self.services.push(svc.clone());
            if fault == SvcFault::Duplicate {
                // Another Service of the same name: a different ClusterIP out of the
                // generated range, so that it collides with nothing.
                let mut dup = svc.clone();
                dup["spec"]["clusterIP"] = json!(format!("10.97.{}.{}", i / 200, 1 + i % 200));
                dup["spec"].as_object_mut().unwrap().remove("clusterIPs");
                self.services.push(dup);
            }

            // Its slices.
            let mut counted_slices = Vec::new();
            for j in 0..self.rng.index(4) {
                let sname = format!("{name}-{j}");
                let sobject = format!("EndpointSlice {ns}/{sname}");
                slice_objects.push(sobject.clone());
                let sfault = if !fault.proxied() || self.rng.one_in_usize(2) {
                    SliceFault::None
                } else {
                    self.rng.pick(&SLICE_FAULTS)
                };
                let mut ports: Vec<Port> =
                    ports.iter().map(|(n, _, p)| (n.clone(), 1 + self.rng.index(65535) as i64, *p)).collect();
                if self.rng.one_in_usize(5) && ports.len() > 1 {
                    // A slice may carry only some of the Service's ports.
                    ports.pop();
                }
                let mut eps: Vec<Value> = (0..self.rng.index(6))
                    .map(|_| {
                        let ip = self.endpoint_ip();
                        self.endpoint(&ip)
                    })
                    .collect();
                let with_protocol = self.rng.one_in_usize(2);
                let mut s = json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {"namespace": ns, "name": sname, "labels": {LABEL_SERVICE_NAME: name}},
                    "addressType": "IPv4",
                    "ports": ports.iter().map(|p| Self::port_json(p, with_protocol)).collect::<Vec<_>>(),
                });
                match sfault {
                    SliceFault::None | SliceFault::Duplicate | SliceFault::Fqdn | SliceFault::UnknownAddressType => {}
                    SliceFault::BadEndpointIp => {
                        let bad = self.rng.pick(&["10.244.0.256", "", "pod-a", "10.244.0.1.5", "10.244.0.1:80"]);
                        eps.insert(self.rng.index(eps.len() + 1), self.endpoint(bad));
                    }
                    SliceFault::WrongFamilyEndpoint => {
                        let bad = self.rng.pick(&["fd00::1", "::ffff:10.0.0.1", "2001:db8::5"]);
                        eps.insert(self.rng.index(eps.len() + 1), self.endpoint(bad));
                    }
                    SliceFault::NonUnicastEndpoint => {
                        let bad = self.rng.pick(&[
                            "0.0.0.0",
                            "127.0.0.1",
                            "127.9.9.9",
                            "169.254.169.254",
                            "224.0.0.251",
                            "255.255.255.255",
                        ]);
                        eps.insert(self.rng.index(eps.len() + 1), self.endpoint(bad));
                    }
                    SliceFault::PortZero | SliceFault::PortTooBig => {
                        let n = if sfault == SliceFault::PortZero { 0 } else { self.rng.pick(&[65536, -1, 1 << 20]) };
                        let k = self.rng.index(ports.len());
                        s["ports"][k]["port"] = json!(n);
                    }
                    SliceFault::UnknownProtocol => {
                        let k = self.rng.index(ports.len());
                        s["ports"][k]["protocol"] = json!(self.rng.pick(&["SCTP", "QUIC", "udp"]));
                    }
                    SliceFault::DuplicatePort => {
                        let mut dup = Self::port_json(&ports[0], true);
                        dup["port"] = json!(1 + self.rng.index(65535));
                        s["ports"].as_array_mut().unwrap().push(dup);
                    }
                    SliceFault::NoAddress => {
                        // An absent `addresses` is a decode error (the field is
                        // required): the file source counts it in lb_decode_errors.
                        let mut e = self.endpoint("x");
                        e["addresses"] = json!([]);
                        eps.insert(self.rng.index(eps.len() + 1), e);
                    }
                    SliceFault::DuplicateEndpoint => {
                        if eps.is_empty() {
                            let ip = self.endpoint_ip();
                            eps.push(self.endpoint(&ip));
                        }
                        let again = json!({"addresses": [eps[0]["addresses"][0]]});
                        eps.push(again);
                    }
                    SliceFault::NoName => {
                        s["metadata"].as_object_mut().unwrap().remove("name");
                    }
                    SliceFault::NoServiceLabel => {
                        s["metadata"].as_object_mut().unwrap().remove("labels");
                    }
                    SliceFault::UnknownService => {
                        s["metadata"]["labels"][LABEL_SERVICE_NAME] = json!(format!("{name}-gone"))
                    }
                }
                match sfault {
                    SliceFault::Fqdn => {
                        s["addressType"] = json!("FQDN");
                        eps = vec![json!({"addresses": ["web.example.com"]})];
                    }
                    SliceFault::UnknownAddressType => s["addressType"] = json!(self.rng.pick(&["IPv5", "ipv4", ""])),
                    _ => {}
                }
                s["endpoints"] = Value::Array(eps);
                if let Some(kind) = sfault.issue() {
                    let o = if sfault == SliceFault::NoName { format!("EndpointSlice {ns}/") } else { sobject.clone() };
                    self.expected.push((kind, o.clone()));
                    self.tainted.insert(o);
                    self.malformed += 1;
                    if !sfault.skipped_whole() {
                        clean = false;
                    }
                } else {
                    counted_slices.push(s.clone());
                }
                if fault == SvcFault::NoName {
                    // Its slices name a Service that is not there.
                    self.expected.push((IssueKind::UnknownService, sobject.clone()));
                }
                self.slices.push(s.clone());
                if sfault == SliceFault::Duplicate {
                    let mut dup = s.clone();
                    let ip = self.endpoint_ip();
                    dup["endpoints"] = json!([self.endpoint(&ip)]);
                    self.slices.push(dup);
                }
            }
            if !clean {
                self.tainted.extend(slice_objects);
            } else {
                self.clean.insert(key, (svc.clone(), counted_slices));
                valid.push((ns, name, svc));
            }
        }
        // Of the Services that claim one ClusterIP, the first by namespace and name
        // keeps its frontends; the others are reported.
        let groups: Vec<Vec<(String, String)>> = self.by_ip.values().filter(|k| k.len() > 1).cloned().collect();
        for mut keys in groups {
            keys.sort();
            for (ns, name) in &keys {
                self.clean.remove(&(ns.clone(), name.clone()));
                self.tainted.insert(format!("Service {ns}/{name}"));
                for j in 0..4 {
                    self.tainted.insert(format!("EndpointSlice {ns}/{name}-{j}"));
                }
            }
            for (ns, name) in keys.iter().skip(1) {
                self.expected.push((IssueKind::DuplicateFrontend, format!("Service {ns}/{name}")));
            }
        }
    }
}

fn decode(services: &[Value], slices: &[Value]) -> (Vec<Service>, Vec<Slice>) {
    let services = services.iter().map(|v| serde_json::from_value(v.clone()).expect("a Service")).collect();
    let slices = slices
        .iter()
        .map(|v| Slice::from(&serde_json::from_value::<EndpointSlice>(v.clone()).expect("an EndpointSlice")))
        .collect();
    (services, slices)
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn generated_objects_malformed_ones_are_reported_and_the_rest_unaffected() {
    let seed = env_or("LB_MODEL_FUZZ_SEED", 0x6b38_7369_6e00_0013);
    let sets = env_or("LB_MODEL_FUZZ_SETS", 3000);
    let mut rng = Rng::new(seed);
    let (mut objects, mut malformed, mut issues, mut compared) = (0usize, 0usize, 0usize, 0usize);
    let mut kinds_seen = BTreeSet::new();
    for set in 0..sets {
        let set_seed = rng.next_u64();
        let mut g = Gen::new(set_seed);
        let n = 1 + g.rng.index(12);
        g.set(n);
        // Any order: shuffle what the agent is handed.
        for i in (1..g.services.len()).rev() {
            g.services.swap(i, g.rng.index(i + 1));
        }
        for i in (1..g.slices.len()).rev() {
            g.slices.swap(i, g.rng.index(i + 1));
        }
        let ctx = || {
            format!(
                "seed {seed:#x} set {set} (set seed {set_seed:#x}; rerun with LB_MODEL_FUZZ_SEED):\nservices {}\nslices {}",
                serde_json::to_string_pretty(&g.services).unwrap(),
                serde_json::to_string_pretty(&g.slices).unwrap()
            )
        };
        let (services, slices) = decode(&g.services, &g.slices);
        let got = std::panic::catch_unwind(|| compute(services.iter(), slices.iter()))
            .unwrap_or_else(|_| panic!("compute panicked: {}", ctx()));
        objects += services.len() + slices.len();
        malformed += g.malformed;
        issues += got.issues.len();
        let reported: BTreeSet<(IssueKind, &str)> = got.issues.iter().map(|i| (i.kind, i.object.as_str())).collect();
        for (kind, object) in &g.expected {
            assert!(
                reported.contains(&(*kind, object.as_str())),
                "{object} should be reported as {}; issues {:#?}\n{}",
                kind.name(),
                got.issues,
                ctx()
            );
            kinds_seen.insert(*kind);
        }
        for i in &got.issues {
            assert!(g.tainted.contains(&i.object), "issue for an object nothing was broken in: {i}\n{}", ctx());
        }
        // Each clean Service: what it gets computed alone, with its valid slices.
        for ((ns, name), (svc, its_slices)) in &g.clean {
            let (s, sl) = decode(std::slice::from_ref(svc), its_slices);
            let alone = compute(s.iter(), sl.iter());
            assert!(alone.issues.is_empty(), "{ns}/{name} alone: {:?}\n{}", alone.issues, ctx());
            let prefix = format!("{ns}/{name}:");
            let mine: BTreeMap<FrontendKey, Frontend> = got
                .desired
                .frontends
                .iter()
                .filter(|(_, f)| f.service.starts_with(&prefix))
                .map(|(k, f)| (*k, f.clone()))
                .collect();
            assert_eq!(mine, alone.desired.frontends, "{ns}/{name} differs from its computation alone\n{}", ctx());
            compared += 1;
        }
    }
    // The generator reaches every kind it can break.
    let reachable: BTreeSet<IssueKind> = SVC_FAULTS
        .iter()
        .filter_map(|f| f.issue())
        .chain(SLICE_FAULTS.iter().filter_map(|f| f.issue()))
        .chain([IssueKind::DuplicateFrontend])
        .collect();
    assert_eq!(kinds_seen, reachable, "with {sets} sets");
    eprintln!(
        "{sets} sets, {objects} objects, {malformed} malformed, {issues} issues, {compared} clean Services \
         compared with their computation alone, 0 panics; kinds {:?}",
        kinds_seen.iter().map(|k| k.name()).collect::<Vec<_>>()
    );
}

fn web_service() -> Service {
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": "web"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]},
    }))
    .unwrap()
}

fn web_slice(name: &str, ips: impl Iterator<Item = std::net::Ipv4Addr>) -> Slice {
    let eps: Vec<Value> = ips.map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})).collect();
    let s: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": name, "labels": {LABEL_SERVICE_NAME: "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": eps,
    }))
    .unwrap();
    Slice::from(&s)
}

fn nth_ip(n: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 128, 0, 1)) + n)
}

/// The API server's most per slice.
#[test]
fn a_slice_of_1000_endpoints() {
    let svc = web_service();
    let slice = web_slice("web-big", (0..1000).map(nth_ip));
    let got = compute([&svc], [&slice]);
    assert!(got.issues.is_empty(), "{:?}", got.issues);
    let f = &got.desired.frontends[&FrontendKey { ip: "10.96.0.10".parse().unwrap(), port: 80, proto: Protocol::Tcp }];
    assert_eq!(f.backends.len(), 1000);
    assert!(f.backends.iter().all(|b| b.port == 8080));
    assert_eq!(f.backends.iter().map(|b| b.ip).collect::<BTreeSet<_>>(), (0..1000).map(nth_ip).collect());
}

/// 10,000 slices of 1 endpoint for one Service, plus one more with a malformed
/// endpoint: the datapath's per-service limit applies (an issue, the first 8192
/// used), the malformed endpoint is reported, and a second Service is unaffected.
#[test]
fn ten_thousand_slices_for_one_service() {
    let svc = web_service();
    let other: Service = serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": "db"},
        "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 5432}]},
    }))
    .unwrap();
    let mut slices: Vec<Slice> =
        (0..10_000).map(|i| web_slice(&format!("web-{i:05}"), std::iter::once(nth_ip(i)))).collect();
    let mut bad = web_slice("web-bad", std::iter::once(nth_ip(20_000)));
    bad.endpoints[0].address = EndpointAddress::Other("10.128.0.300".into());
    slices.push(bad);
    let db: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": "db-1", "labels": {LABEL_SERVICE_NAME: "db"}},
        "addressType": "IPv4", "ports": [{"port": 5432}], "endpoints": [{"addresses": ["10.200.0.1"]}],
    }))
    .unwrap();
    slices.push(Slice::from(&db));
    let t0 = std::time::Instant::now();
    let got = compute([&svc, &other], slices.iter());
    let took = t0.elapsed();
    let kinds: Vec<(IssueKind, &str)> = got.issues.iter().map(|i| (i.kind, i.object.as_str())).collect();
    assert_eq!(
        kinds,
        [(IssueKind::InvalidIp, "EndpointSlice default/web-bad"), (IssueKind::TooManyEndpoints, "Service default/web")]
    );
    let web =
        &got.desired.frontends[&FrontendKey { ip: "10.96.0.10".parse().unwrap(), port: 80, proto: Protocol::Tcp }];
    let limit = lb_common::limits::MAX_BACKENDS_PER_SERVICE as usize;
    assert_eq!(web.backends.len(), limit);
    // The first ones by address; the rest are draining (no new flows, established ones
    // kept), not forgotten.
    assert_eq!(web.backends.iter().next().map(|b| b.ip), Some(nth_ip(0)));
    assert_eq!(web.draining.len(), 10_000 - limit);
    let db =
        &got.desired.frontends[&FrontendKey { ip: "10.96.0.11".parse().unwrap(), port: 5432, proto: Protocol::Tcp }];
    assert_eq!(db.backends.iter().map(|b| b.to_string()).collect::<Vec<_>>(), ["10.200.0.1:5432"]);
    eprintln!("10,001 slices of one Service computed in {took:?}");
}
