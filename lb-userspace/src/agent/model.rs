//! From watched objects to desired datapath state: a pure function, as kube-proxy
//! computes it.
//!
//! The rules follow kube-proxy (paths in kubernetes/kubernetes):
//! - which Services get a frontend: `pkg/proxy/servicechangetracker.go`
//!   (`shouldSkipService`: no ClusterIP / `None`, or type ExternalName) and the
//!   informer's label selector `!service.kubernetes.io/service-proxy-name,
//!   !service.kubernetes.io/headless` (`noProxyName` and `noHeadlessEndpoints` in
//!   `cmd/kube-proxy/app/server.go`, applied to Services and EndpointSlices alike);
//! - how EndpointSlice ports map to Service ports: `pkg/proxy/endpointslicecache.go`
//!   (`endpointInfoByServicePort`: by port *name* and protocol, with the number taken
//!   from the slice, which is how named targetPorts are resolved per slice; the first
//!   address of an endpoint; duplicates merged);
//! - which endpoints get traffic: `pkg/proxy/topology.go` (`CategorizeEndpoints`):
//!   ready ones, else serving-and-terminating ones (KEP-1669,
//!   <https://github.com/kubernetes/enhancements/tree/master/keps/sig-network/1669-proxy-terminating-endpoints>),
//!   never non-serving ones;
//! - `publishNotReadyAddresses`: the EndpointSlice controller marks every endpoint of
//!   such a Service ready (`pkg/controller/endpointslice/utils.go`); we honour the field
//!   directly too, so hand-written slices behave the same;
//! - ClientIP affinity: default 10800 s, at most 86400 s
//!   (`v1.DefaultClientIPServiceAffinitySeconds`, `MaxClientIPServiceAffinitySeconds`);
//! - node awareness (see [`NodeInfo`]): `internalTrafficPolicy: Local` (KEP-2086,
//!   <https://github.com/kubernetes/enhancements/tree/master/keps/sig-network/2086-service-internal-traffic-policy>)
//!   and topology aware hints (KEP-2433,
//!   <https://github.com/kubernetes/enhancements/tree/master/keps/sig-network/2433-topology-aware-hints>,
//!   and `trafficDistribution`, KEP-4444,
//!   <https://github.com/kubernetes/enhancements/tree/master/keps/sig-network/4444-service-traffic-distribution>),
//!   as `pkg/proxy/topology.go` (`CategorizeEndpoints`, `canUseTopology`) of
//!   Kubernetes 1.27–1.31 applies them.
//!
//! Bad objects never stop the computation: each problem becomes an [`Issue`] and the
//! rest is still programmed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, NO_BACKENDS_DROP, NO_BACKENDS_REJECT, ServiceKey4};
use serde::Serialize;

/// Label that hands a Service to another proxy (kube-proxy skips it).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// `v1.IsHeadlessService`: set by the EndpointSlice controller on slices of headless
/// Services, and by users on a Service to keep kube-proxy away from it. kube-proxy's
/// informers select `!service.kubernetes.io/headless` (any value), so a Service or
/// slice carrying it is invisible to it.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label naming the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The Service annotation that asks for topology aware hints (KEP-2433); deprecated
/// by [`ANNOTATION_TOPOLOGY_MODE`] in 1.27 but, as in kube-proxy
/// (`pkg/proxy/serviceport.go`), it wins when both are set.
pub const ANNOTATION_TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
/// Its 1.27+ name.
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
/// Annotation choosing what a frontend with no usable endpoint does: `reject` (the
/// default, ICMP port unreachable like kube-proxy's REJECT) or `drop`.
pub const ANNOTATION_NO_ENDPOINTS: &str = "lb.io/no-endpoints";

/// `v1.DefaultClientIPServiceAffinitySeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// `v1.MaxClientIPServiceAffinitySeconds`.
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn ipproto(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }
    pub const fn from_ipproto(p: u8) -> Option<Self> {
        match p {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One frontend: a ClusterIP, a port and a protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FrontendKey {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl FrontendKey {
    pub fn map_key(&self) -> ServiceKey4 {
        ServiceKey4::new(u32::from_ne_bytes(self.ip.octets()), self.port.to_be(), self.proto.ipproto())
    }
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.proto)
    }
}

/// A backend: an endpoint address and the port its slice gives for the service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// What a frontend with no usable endpoint does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NoEndpoints {
    #[default]
    Reject,
    Drop,
}

impl NoEndpoints {
    pub const fn map_value(self) -> u8 {
        match self {
            NoEndpoints::Reject => NO_BACKENDS_REJECT,
            NoEndpoints::Drop => NO_BACKENDS_DROP,
        }
    }
}

/// Desired state of one frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Frontend {
    /// `namespace/name:portname`, for logs and metrics.
    pub service: String,
    /// ClientIP affinity timeout, if the Service has ClientIP affinity.
    pub affinity_timeout_s: Option<u32>,
    pub no_endpoints: NoEndpoints,
    /// The backends new connections go to (the service's slots).
    pub backends: BTreeSet<Backend>,
    /// Every other endpoint its EndpointSlices still list (terminating, not ready,
    /// not serving, or hinted for another zone): it takes no new connections, but
    /// established ones keep going to it, as under kube-proxy, until it leaves the
    /// slices. Never in `backends`. Other nodes' endpoints of an
    /// `internalTrafficPolicy: Local` Service are left out (see `Selection`).
    pub draining: BTreeSet<Backend>,
}

/// Everything the datapath should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
}

impl Desired {
    pub fn endpoint_count(&self) -> usize {
        self.frontends.values().map(|f| f.backends.len()).sum()
    }
}

/// Why an object (or part of it) was not programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueKind {
    /// An address that is not an IP (ClusterIP or endpoint), an endpoint address of
    /// the wrong family, or one no packet can be sent to (see [`unusable_ip`]).
    InvalidIp,
    /// Port 0 or out of range, on a Service or an EndpointSlice.
    InvalidPort,
    /// The same address twice for one service port.
    DuplicateEndpoint,
    /// An EndpointSlice whose Service does not exist (or that names none).
    UnknownService,
    /// SCTP (or another protocol the datapath does not handle).
    UnsupportedProtocol,
    /// Two Services claim the same ClusterIP, port and protocol.
    DuplicateFrontend,
    /// A session affinity timeout outside 1..=86400, or an unknown affinity.
    InvalidAffinity,
    /// An unknown value of the `lb.io/no-endpoints` annotation.
    InvalidAnnotation,
    /// More endpoints for one frontend than the datapath scans.
    TooManyEndpoints,
    /// An `internalTrafficPolicy` other than `Cluster` or `Local`.
    InvalidTrafficPolicy,
    /// A Service with `internalTrafficPolicy: Local` while the agent does not know its
    /// node (no `--node-name`): its frontends get no backends and drop.
    NodeNameUnknown,
    /// A field the object cannot do without: a Service without `spec` or `spec.ports`,
    /// an object without `metadata.name`, an endpoint without an address.
    MissingField,
    /// An EndpointSlice `addressType` the datapath cannot use: `FQDN` (valid in the
    /// API, not a packet destination), or none of IPv4, IPv6 and FQDN. IPv6 slices are
    /// not an issue, just not for the IPv4 datapath.
    InvalidAddressType,
    /// A Service `type` other than ClusterIP, NodePort, LoadBalancer or ExternalName.
    InvalidServiceType,
    /// Two objects of one kind with the same namespace and name (a file source can
    /// hold them, an API server cannot): the first is used.
    DuplicateObject,
    /// Two ports of one Service or EndpointSlice with the same name and protocol,
    /// which endpoints are matched by: the first is used.
    DuplicatePort,
}

impl IssueKind {
    pub const ALL: [IssueKind; 16] = [
        IssueKind::InvalidIp,
        IssueKind::InvalidPort,
        IssueKind::DuplicateEndpoint,
        IssueKind::UnknownService,
        IssueKind::UnsupportedProtocol,
        IssueKind::DuplicateFrontend,
        IssueKind::InvalidAffinity,
        IssueKind::InvalidAnnotation,
        IssueKind::TooManyEndpoints,
        IssueKind::InvalidTrafficPolicy,
        IssueKind::NodeNameUnknown,
        IssueKind::MissingField,
        IssueKind::InvalidAddressType,
        IssueKind::InvalidServiceType,
        IssueKind::DuplicateObject,
        IssueKind::DuplicatePort,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            IssueKind::InvalidIp => "invalid_ip",
            IssueKind::InvalidPort => "invalid_port",
            IssueKind::DuplicateEndpoint => "duplicate_endpoint",
            IssueKind::UnknownService => "unknown_service",
            IssueKind::UnsupportedProtocol => "unsupported_protocol",
            IssueKind::DuplicateFrontend => "duplicate_frontend",
            IssueKind::InvalidAffinity => "invalid_affinity",
            IssueKind::InvalidAnnotation => "invalid_annotation",
            IssueKind::TooManyEndpoints => "too_many_endpoints",
            IssueKind::InvalidTrafficPolicy => "invalid_traffic_policy",
            IssueKind::NodeNameUnknown => "node_name_unknown",
            IssueKind::MissingField => "missing_field",
            IssueKind::InvalidAddressType => "invalid_address_type",
            IssueKind::InvalidServiceType => "invalid_service_type",
            IssueKind::DuplicateObject => "duplicate_object",
            IssueKind::DuplicatePort => "duplicate_port",
        }
    }
}

/// A problem with one object; the rest is still programmed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Issue {
    pub kind: IssueKind,
    /// `Service ns/name` or `EndpointSlice ns/name`.
    pub object: String,
    pub detail: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.object, self.detail, self.kind.name())
    }
}

/// Why a Service gets no frontend although it is valid (not an issue, just counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub headless: usize,
    pub external_name: usize,
    /// Labelled `service.kubernetes.io/service-proxy-name`.
    pub other_proxy: usize,
    /// Labelled `service.kubernetes.io/headless` (any value) although it may have a
    /// ClusterIP.
    pub headless_label: usize,
    /// No ClusterIP assigned yet.
    pub no_cluster_ip: usize,
    /// IPv6 ClusterIPs (the datapath is IPv4 only for now).
    pub ipv6_cluster_ips: usize,
}

/// What the agent knows of the node it runs on, for node-aware endpoint selection.
///
/// kube-proxy learns both from its Node object (`--hostname-override` or the hostname,
/// and the Node's `topology.kubernetes.io/zone` label). The agent takes them as flags
/// (`--node-name` from the downward API's `spec.nodeName`, `--node-zone`) rather than
/// watching Nodes: one more watch of every Node from every node is API load for a
/// label that seldom changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node's name, as EndpointSlice endpoints' `nodeName` gives it.
    pub name: Option<String>,
    /// The Node's `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

/// The result of [`compute`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Computed {
    pub desired: Desired,
    pub issues: Vec<Issue>,
    pub skipped: Skipped,
}

/// What [`compute`] reads of an EndpointSlice, and nothing else.
///
/// The agent keeps one of these per watched slice instead of the k8s-openapi struct:
/// at 10,000 slices of 10 endpoints the full structs were ~42 MB of the agent's heap
/// (an `Endpoint` alone is ~300 bytes of mostly-empty fields), these are a few MB.
/// Built with [`Slice::from_k8s`] (v1 and v1beta1 share the field types).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    pub namespace: Box<str>,
    pub name: Box<str>,
    /// The `kubernetes.io/service-name` label.
    pub service: Option<Box<str>>,
    /// Carries the `service.kubernetes.io/headless` label.
    pub headless_label: bool,
    pub address_type: AddressType,
    pub ports: Box<[SlicePort]>,
    pub endpoints: Box<[SliceEndpoint]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressType {
    IPv4,
    /// v1beta1's deprecated family-less `IP`.
    Ip,
    /// Not for the IPv4 datapath, and not an issue.
    IPv6,
    /// Valid in the API, but no packet can be sent to a name: an issue.
    Fqdn,
    /// Anything else (a file source does not validate): an issue.
    Unknown,
}

impl AddressType {
    /// Whether the slice's addresses may feed the IPv4 datapath.
    pub const fn feeds_ipv4(self) -> bool {
        matches!(self, AddressType::IPv4 | AddressType::Ip)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// Empty when unset, as kube-proxy matches it.
    pub name: Box<str>,
    pub port: Option<i32>,
    /// The protocol, or the unsupported one it names.
    pub protocol: Result<Protocol, Box<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first address (kube-proxy uses only that one).
    pub address: EndpointAddress,
    pub cond: Conditions,
    /// `nodeName` (v1; absent from 1.20's v1beta1), for `internalTrafficPolicy: Local`.
    pub node_name: Option<Box<str>>,
    /// `hints.forZones[].name` (v1, 1.21+), for topology aware hints. Empty when the
    /// endpoint has no zone hint (an empty box does not allocate).
    pub zone_hints: Box<[Box<str>]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointAddress {
    V4(Ipv4Addr),
    /// Not an IPv4 address, kept as written for the issue it may raise.
    Other(Box<str>),
    /// `addresses` empty or absent (the API requires one): an issue.
    Missing,
}

/// Endpoint conditions with the API's defaults applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Slice {
    /// From the fields of a v1 (or v1beta1) EndpointSlice.
    pub fn from_k8s(
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        address_type: &str,
        ports: Option<&[k8s_openapi::api::discovery::v1::EndpointPort]>,
        endpoints: Option<&[k8s_openapi::api::discovery::v1::Endpoint]>,
    ) -> Self {
        let (ns, name) = ns_name(meta);
        let labels = meta.labels.as_ref();
        Slice {
            namespace: ns.into(),
            name: name.into(),
            service: labels.and_then(|l| l.get(LABEL_SERVICE_NAME)).map(|s| s.as_str().into()),
            headless_label: labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)),
            address_type: match address_type {
                "IPv4" => AddressType::IPv4,
                "IP" => AddressType::Ip,
                "IPv6" => AddressType::IPv6,
                "FQDN" => AddressType::Fqdn,
                _ => AddressType::Unknown,
            },
            ports: ports
                .unwrap_or_default()
                .iter()
                .map(|p| SlicePort {
                    name: p.name.as_deref().unwrap_or_default().into(),
                    port: p.port,
                    protocol: parse_protocol(p.protocol.as_deref()).map_err(Into::into),
                })
                .collect(),
            endpoints: endpoints
                .unwrap_or_default()
                .iter()
                .map(|ep| {
                    let c = ep.conditions.as_ref();
                    // Unset ready and serving mean true, unset terminating false
                    // (EndpointConditions API doc; endpointslicecache.go).
                    SliceEndpoint {
                        address: match ep.addresses.first() {
                            None => EndpointAddress::Missing,
                            Some(addr) => match addr.parse() {
                                Ok(ip) => EndpointAddress::V4(ip),
                                Err(_) => EndpointAddress::Other(addr.as_str().into()),
                            },
                        },
                        cond: Conditions {
                            ready: c.and_then(|c| c.ready).unwrap_or(true),
                            serving: c.and_then(|c| c.serving).unwrap_or(true),
                            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                        },
                        node_name: ep.node_name.as_deref().filter(|n| !n.is_empty()).map(Into::into),
                        zone_hints: ep
                            .hints
                            .as_ref()
                            .and_then(|h| h.for_zones.as_ref())
                            .into_iter()
                            .flatten()
                            .filter(|z| !z.name.is_empty())
                            .map(|z| z.name.as_str().into())
                            .collect(),
                    }
                })
                .collect(),
        }
    }
}

impl From<&EndpointSlice> for Slice {
    fn from(s: &EndpointSlice) -> Self {
        Slice::from_k8s(&s.metadata, &s.address_type, s.ports.as_deref(), s.endpoints.as_deref())
    }
}

/// The agent's store keys slices by namespace and name, like the reflector's
/// `ObjectRef`.
impl kube::runtime::reflector::Lookup for Slice {
    type DynamicType = ();
    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "EndpointSlice".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "discovery.k8s.io".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "endpointslices".into()
    }
    fn name(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(std::borrow::Cow::Borrowed(&self.name))
    }
    fn namespace(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(std::borrow::Cow::Borrowed(&self.namespace))
    }
    fn resource_version(&self) -> Option<std::borrow::Cow<'_, str>> {
        None
    }
    fn uid(&self) -> Option<std::borrow::Cow<'_, str>> {
        None
    }
}

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (meta.namespace.clone().unwrap_or_else(|| "default".into()), meta.name.clone().unwrap_or_default())
}

/// Why `ip` cannot be a ClusterIP or an endpoint, if it cannot: no packet can be sent
/// to it, or the kernel would not route it from a pod. Kubernetes' own
/// `ValidateEndpointIP` (pkg/apis/core/validation) refuses unspecified, loopback,
/// link-local and link-local multicast endpoint addresses, but only in newer API
/// servers and not for a file source; multicast and broadcast are refused here too,
/// since a connection to them makes no sense.
pub fn unusable_ip(ip: Ipv4Addr) -> Option<&'static str> {
    Some(if ip.octets()[0] == 0 {
        "unspecified (0.0.0.0/8)"
    } else if ip.is_loopback() {
        "loopback (127.0.0.0/8)"
    } else if ip.is_link_local() {
        "link-local (169.254.0.0/16)"
    } else if ip.is_multicast() {
        "multicast (224.0.0.0/4)"
    } else if ip.is_broadcast() {
        "broadcast"
    } else {
        return None;
    })
}

fn parse_protocol(p: Option<&str>) -> Result<Protocol, String> {
    // The API server defaults an unset protocol to TCP.
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(other.to_string()),
    }
}

/// A service port as the endpoints are matched to it: by name and protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PortRef {
    name: String,
    proto: Protocol,
}

struct ServiceInfo<'a> {
    svc: &'a Service,
    /// Whether it gets frontends (false: skipped, but its slices are not "unknown").
    proxied: bool,
}

/// What the selection reads of one endpoint, borrowed from its [`Slice`].
#[derive(Clone, Copy, Debug)]
struct EpRef<'a> {
    cond: Conditions,
    node_name: Option<&'a str>,
    zone_hints: &'a [Box<str>],
}

type PortEndpoints<'a> = HashMap<PortRef, BTreeMap<Backend, EpRef<'a>>>;

/// [`compute_on`] for a node that is not known: no `internalTrafficPolicy: Local`
/// endpoint is local, and topology hints are ignored.
pub fn compute<'a, S, E>(services: S, slices: E) -> Computed
where
    S: IntoIterator<Item = &'a Service>,
    E: IntoIterator<Item = &'a Slice>,
{
    compute_on(&NodeInfo::default(), services, slices)
}

/// Computes the desired state of `node` from all Services and EndpointSlices (in their
/// compact form, [`Slice`]). Pure: the same input always gives the same output,
/// whatever the order of the objects (but for two objects of one kind and name, which
/// only a file can hold: the first given is used).
pub fn compute_on<'a, S, E>(node: &NodeInfo, services: S, slices: E) -> Computed
where
    S: IntoIterator<Item = &'a Service>,
    E: IntoIterator<Item = &'a Slice>,
{
    let mut out = Computed::default();
    let mut issues = BTreeSet::new();

    // Services by (namespace, name), in a fixed order so that conflicts resolve the
    // same way every time.
    let mut by_name: BTreeMap<(String, String), ServiceInfo<'a>> = BTreeMap::new();
    for svc in services {
        let key = ns_name(&svc.metadata);
        let object = format!("Service {}/{}", key.0, key.1);
        if key.1.is_empty() {
            issues.insert(Issue { kind: IssueKind::MissingField, object, detail: "has no metadata.name".into() });
            continue;
        }
        if by_name.contains_key(&key) {
            // Only a file can hold two; which one is "right" is unknowable, and the
            // first is what a reader of the file sees first.
            issues.insert(Issue {
                kind: IssueKind::DuplicateObject,
                object,
                detail: "is listed more than once; the first is used".into(),
            });
            continue;
        }
        let proxied = classify(svc, &object, &mut out.skipped, &mut issues);
        by_name.insert(key, ServiceInfo { svc, proxied });
    }

    // Endpoints per (namespace, service name) and service port, merged over slices.
    let mut endpoints: HashMap<(String, String), PortEndpoints<'a>> = HashMap::new();
    let mut slices: Vec<&Slice> = slices.into_iter().collect();
    // Stable: of two slices with one name, the first given stays first.
    slices.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut prev_name: Option<(&str, &str)> = None;
    for slice in slices {
        let (ns, name) = (&*slice.namespace, &*slice.name);
        let object = format!("EndpointSlice {ns}/{name}");
        if name.is_empty() {
            issues.insert(Issue { kind: IssueKind::MissingField, object, detail: "has no metadata.name".into() });
            continue;
        }
        if prev_name.replace((ns, name)) == Some((ns, name)) {
            issues.insert(Issue {
                kind: IssueKind::DuplicateObject,
                object,
                detail: "is listed more than once; the first is used".into(),
            });
            continue;
        }
        // kube-proxy does not watch slices labelled headless (`noHeadlessEndpoints`).
        if slice.headless_label {
            continue;
        }
        let Some(svc_name) = slice.service.as_deref() else {
            issues.insert(Issue {
                kind: IssueKind::UnknownService,
                object,
                detail: format!("has no {LABEL_SERVICE_NAME} label"),
            });
            continue;
        };
        let svc_key = (ns.to_string(), svc_name.to_string());
        match by_name.get(&svc_key) {
            None => {
                issues.insert(Issue {
                    kind: IssueKind::UnknownService,
                    object,
                    detail: format!("belongs to Service {ns}/{svc_name}, which does not exist"),
                });
                continue;
            }
            Some(info) if !info.proxied => continue,
            Some(_) => {}
        }
        // Only IPv4 slices feed the (IPv4) datapath; "IP" is v1beta1's deprecated
        // family-less type, whose IPv4 addresses we take.
        match slice.address_type {
            AddressType::IPv4 | AddressType::Ip => {}
            AddressType::IPv6 => continue,
            t @ (AddressType::Fqdn | AddressType::Unknown) => {
                let detail = if t == AddressType::Fqdn {
                    "has addressType FQDN, which no packet can be sent to"
                } else {
                    "has an addressType that is none of IPv4, IPv6 and FQDN"
                };
                issues.insert(Issue { kind: IssueKind::InvalidAddressType, object, detail: detail.into() });
                continue;
            }
        }
        let svc_eps = endpoints.entry(svc_key).or_default();
        let mut seen_ports = HashSet::new();
        for port in slice.ports.iter() {
            let name = &port.name;
            let proto = match &port.protocol {
                Ok(p) => *p,
                Err(p) => {
                    issues.insert(Issue {
                        kind: IssueKind::UnsupportedProtocol,
                        object: object.clone(),
                        detail: format!("port {name:?} has protocol {p}, which lb does not handle"),
                    });
                    continue;
                }
            };
            // kube-proxy: "TODO: handle nil ports to mean 'all'"; it ignores them.
            let Some(num) = port.port else { continue };
            let Some(num) = u16::try_from(num).ok().filter(|n| *n != 0) else {
                issues.insert(Issue {
                    kind: IssueKind::InvalidPort,
                    object: object.clone(),
                    detail: format!("port {name:?} has number {num}"),
                });
                continue;
            };
            if !seen_ports.insert((name, proto)) {
                // kube-proxy would merge both numbers' endpoints into one service
                // port; the API server refuses such a slice.
                issues.insert(Issue {
                    kind: IssueKind::DuplicatePort,
                    object: object.clone(),
                    detail: format!("port {name:?}/{proto} is listed more than once; the first is used"),
                });
                continue;
            }
            let port_eps = svc_eps.entry(PortRef { name: name.to_string(), proto }).or_default();
            for ep in slice.endpoints.iter() {
                let ip = match &ep.address {
                    EndpointAddress::V4(ip) => match unusable_ip(*ip) {
                        None => *ip,
                        Some(why) => {
                            issues.insert(Issue {
                                kind: IssueKind::InvalidIp,
                                object: object.clone(),
                                detail: format!("endpoint address {ip} is {why}"),
                            });
                            continue;
                        }
                    },
                    EndpointAddress::Missing => {
                        issues.insert(Issue {
                            kind: IssueKind::MissingField,
                            object: object.clone(),
                            detail: "an endpoint has no addresses".into(),
                        });
                        continue;
                    }
                    EndpointAddress::Other(addr)
                        if slice.address_type == AddressType::Ip && addr.parse::<std::net::Ipv6Addr>().is_ok() =>
                    {
                        continue;
                    }
                    EndpointAddress::Other(addr) => {
                        issues.insert(Issue {
                            kind: IssueKind::InvalidIp,
                            object: object.clone(),
                            detail: format!("endpoint address {addr:?} is not an IPv4 address"),
                        });
                        continue;
                    }
                };
                let cond = ep.cond;
                let backend = Backend { ip, port: num };
                let info = EpRef { cond, node_name: ep.node_name.as_deref(), zone_hints: &ep.zone_hints };
                match port_eps.get_mut(&backend) {
                    None => {
                        port_eps.insert(backend, info);
                    }
                    Some(prev) => {
                        issues.insert(Issue {
                            kind: IssueKind::DuplicateEndpoint,
                            object: object.clone(),
                            detail: format!("endpoint {backend} for port {name:?} appears more than once"),
                        });
                        // Keep the most usable view of it.
                        prev.cond.ready |= cond.ready;
                        prev.cond.serving |= cond.serving;
                        prev.cond.terminating &= cond.terminating;
                        prev.node_name = prev.node_name.or(info.node_name);
                        if prev.zone_hints.is_empty() {
                            prev.zone_hints = info.zone_hints;
                        }
                    }
                }
            }
        }
    }

    for ((ns, name), info) in &by_name {
        if !info.proxied {
            continue;
        }
        let eps = endpoints.get(&(ns.clone(), name.clone()));
        service_frontends(node, ns, name, info.svc, eps, &mut out, &mut issues);
    }
    out.issues = issues.into_iter().collect();
    out
}

/// Whether a Service gets frontends; counts why not.
fn classify(svc: &Service, object: &str, skipped: &mut Skipped, issues: &mut BTreeSet<Issue>) -> bool {
    if svc.metadata.labels.as_ref().is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
        skipped.other_proxy += 1;
        return false;
    }
    if svc.metadata.labels.as_ref().is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        skipped.headless_label += 1;
        return false;
    }
    let Some(spec) = svc.spec.as_ref() else {
        issues.insert(Issue { kind: IssueKind::MissingField, object: object.into(), detail: "has no spec".into() });
        return false;
    };
    match spec.type_.as_deref() {
        Some("ExternalName") => {
            skipped.external_name += 1;
            return false;
        }
        // Unset is ClusterIP (the API server's default).
        None | Some("ClusterIP" | "NodePort" | "LoadBalancer") => {}
        Some(other) => {
            issues.insert(Issue {
                kind: IssueKind::InvalidServiceType,
                object: object.into(),
                detail: format!("has type {other:?}, none of ClusterIP, NodePort, LoadBalancer, ExternalName"),
            });
            return false;
        }
    }
    match spec.cluster_ip.as_deref() {
        Some("None") => {
            skipped.headless += 1;
            false
        }
        None | Some("") if spec.cluster_ips.as_ref().is_none_or(|v| v.is_empty()) => {
            skipped.no_cluster_ip += 1;
            false
        }
        _ => true,
    }
}

fn service_frontends(
    node: &NodeInfo,
    ns: &str,
    name: &str,
    svc: &Service,
    endpoints: Option<&PortEndpoints<'_>>,
    out: &mut Computed,
    issues: &mut BTreeSet<Issue>,
) {
    let object = format!("Service {ns}/{name}");
    let Some(spec) = svc.spec.as_ref() else { return };
    let mut ips = Vec::new();
    let listed: Vec<&str> = match spec.cluster_ips.as_ref().filter(|v| !v.is_empty()) {
        Some(v) => v.iter().map(String::as_str).collect(),
        None => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    for s in listed {
        if s.is_empty() || s == "None" {
            continue;
        }
        match s.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => match unusable_ip(ip) {
                None => ips.push(ip),
                Some(why) => {
                    issues.insert(Issue {
                        kind: IssueKind::InvalidIp,
                        object: object.clone(),
                        detail: format!("clusterIP {ip} is {why}"),
                    });
                }
            },
            Ok(std::net::IpAddr::V6(_)) => out.skipped.ipv6_cluster_ips += 1,
            Err(_) => {
                issues.insert(Issue {
                    kind: IssueKind::InvalidIp,
                    object: object.clone(),
                    detail: format!("clusterIP {s:?} is not an IP address"),
                });
            }
        }
    }
    if ips.is_empty() {
        return;
    }
    if spec.ports.as_ref().is_none_or(|p| p.is_empty()) {
        // Only headless Services (skipped before) may have none.
        issues.insert(Issue {
            kind: IssueKind::MissingField,
            object: object.clone(),
            detail: "has a clusterIP but no spec.ports".into(),
        });
        return;
    }

    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") | Some("") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            Some(match t {
                None => DEFAULT_AFFINITY_TIMEOUT_S,
                Some(t) if t > 0 && t as u32 <= MAX_AFFINITY_TIMEOUT_S => t as u32,
                Some(t) => {
                    // API validation rejects this; a file source may not. Clamp.
                    let clamped = if t <= 0 { DEFAULT_AFFINITY_TIMEOUT_S } else { MAX_AFFINITY_TIMEOUT_S };
                    issues.insert(Issue {
                        kind: IssueKind::InvalidAffinity,
                        object: object.clone(),
                        detail: format!("sessionAffinity timeoutSeconds {t} is outside 1..=86400; using {clamped}"),
                    });
                    clamped
                }
            })
        }
        Some(other) => {
            issues.insert(Issue {
                kind: IssueKind::InvalidAffinity,
                object: object.clone(),
                detail: format!("unknown sessionAffinity {other:?}; using None"),
            });
            None
        }
    };
    let no_endpoints = match svc.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_NO_ENDPOINTS)) {
        None => NoEndpoints::Reject,
        Some(v) if v == "reject" => NoEndpoints::Reject,
        Some(v) if v == "drop" => NoEndpoints::Drop,
        Some(v) => {
            issues.insert(Issue {
                kind: IssueKind::InvalidAnnotation,
                object: object.clone(),
                detail: format!("{ANNOTATION_NO_ENDPOINTS}: {v:?} is neither reject nor drop; using reject"),
            });
            NoEndpoints::Reject
        }
    };
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let policy = match spec.internal_traffic_policy.as_deref() {
        None | Some("" | "Cluster") => Policy::Cluster { hints: wants_hints(svc) },
        Some("Local") => {
            if node.name.is_none() {
                // kube-proxy always knows its node (it falls back to the hostname).
                // Without it no endpoint can be told local; sending the traffic to
                // remote ones would break the promise of Local (it never leaves the
                // node), so the frontends drop, as with no local endpoint.
                issues.insert(Issue {
                    kind: IssueKind::NodeNameUnknown,
                    object: object.clone(),
                    detail: "has internalTrafficPolicy Local but the agent has no --node-name; its traffic is \
                             dropped"
                        .into(),
                });
            }
            Policy::Local
        }
        Some(other) => {
            issues.insert(Issue {
                kind: IssueKind::InvalidTrafficPolicy,
                object: object.clone(),
                detail: format!("internalTrafficPolicy {other:?} is neither Cluster nor Local; using Cluster"),
            });
            Policy::Cluster { hints: wants_hints(svc) }
        }
    };

    let mut seen_ports = HashSet::new();
    let mut seen_names = HashSet::new();
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let proto = match parse_protocol(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(p) => {
                issues.insert(Issue {
                    kind: IssueKind::UnsupportedProtocol,
                    object: object.clone(),
                    detail: format!("port {port_name:?} has protocol {p}, which lb does not handle"),
                });
                continue;
            }
        };
        let Some(num) = u16::try_from(port.port).ok().filter(|n| *n != 0) else {
            issues.insert(Issue {
                kind: IssueKind::InvalidPort,
                object: object.clone(),
                detail: format!("port {port_name:?} has number {}", port.port),
            });
            continue;
        };
        if !seen_ports.insert((num, proto)) {
            issues.insert(Issue {
                kind: IssueKind::DuplicateFrontend,
                object: object.clone(),
                detail: format!("port {num}/{proto} is listed twice; the first is used"),
            });
            continue;
        }
        if !seen_names.insert((port_name.clone(), proto)) {
            // Both would get the same endpoints (they are matched by name and
            // protocol); the API server refuses such a Service.
            issues.insert(Issue {
                kind: IssueKind::DuplicatePort,
                object: object.clone(),
                detail: format!("port name {port_name:?}/{proto} is used twice; port {num} is skipped"),
            });
            continue;
        }
        let candidates = endpoints.and_then(|e| e.get(&PortRef { name: port_name.clone(), proto }));
        let Selection { backends, eligible, no_local } = select(candidates, publish_not_ready, policy, node);
        if backends.len() > lb_common::limits::MAX_BACKENDS_PER_SERVICE as usize {
            issues.insert(Issue {
                kind: IssueKind::TooManyEndpoints,
                object: object.clone(),
                detail: format!(
                    "port {port_name:?} has {} endpoints; the datapath uses the first {}",
                    backends.len(),
                    lb_common::limits::MAX_BACKENDS_PER_SERVICE
                ),
            });
        }
        let backends: BTreeSet<Backend> =
            backends.into_iter().take(lb_common::limits::MAX_BACKENDS_PER_SERVICE as usize).collect();
        let draining: BTreeSet<Backend> = eligible.into_iter().filter(|b| !backends.contains(b)).collect();
        // KEP-2086: Local with endpoints elsewhere but none here drops (kube-proxy's
        // iptables and ipvs modes alike); with no endpoint anywhere it is the usual
        // "no endpoints" reject.
        let no_endpoints = if no_local { NoEndpoints::Drop } else { no_endpoints };
        for &ip in &ips {
            let key = FrontendKey { ip, port: num, proto };
            let frontend = Frontend {
                service: format!("{ns}/{name}:{port_name}"),
                affinity_timeout_s,
                no_endpoints,
                backends: backends.clone(),
                draining: draining.clone(),
            };
            if let Some(existing) = out.desired.frontends.get(&key) {
                issues.insert(Issue {
                    kind: IssueKind::DuplicateFrontend,
                    object: object.clone(),
                    detail: format!("frontend {key} is already served by {}; ignored here", existing.service),
                });
                continue;
            }
            out.desired.frontends.insert(key, frontend);
        }
    }
}

/// How a Service's endpoints are chosen (KEP-2086 `internalTrafficPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    /// All endpoints; `hints`: the Service asks for topology aware hints.
    Cluster { hints: bool },
    /// Only this node's endpoints. It wins over hints, as in kube-proxy (hints only
    /// filter `clusterEndpoints` in `CategorizeEndpoints`).
    Local,
}

/// Whether a Service asks for topology aware routing: the hints annotation (the
/// deprecated name wins when both are present, `pkg/proxy/serviceport.go`) with any
/// value but empty or `disabled`/`Disabled` (`canUseTopology`, 1.27–1.29; the
/// EndpointSlice controller only writes hints for `auto`/`Auto`), or KEP-4444
/// `trafficDistribution: PreferClose` (1.30+; `PreferSameZone` is its 1.33 name).
fn wants_hints(svc: &Service) -> bool {
    let annotation = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_TOPOLOGY_AWARE_HINTS).or_else(|| a.get(ANNOTATION_TOPOLOGY_MODE)));
    if annotation.is_some_and(|v| !matches!(v.as_str(), "" | "disabled" | "Disabled")) {
        return true;
    }
    let distribution = svc.spec.as_ref().and_then(|s| s.traffic_distribution.as_deref());
    matches!(distribution, Some("PreferClose" | "PreferSameZone"))
}

struct Selection {
    /// The endpoints new connections go to.
    backends: BTreeSet<Backend>,
    /// The endpoints this node may send to at all (the local ones for Local, all of
    /// them otherwise): those not in `backends` drain.
    ///
    /// Remote endpoints of a Local Service are not drained: an endpoint's `nodeName`
    /// never changes, so this node never sent them a flow, and a DaemonSet's Service
    /// would otherwise fill the draining map with every other node's pod. Endpoints
    /// of other zones are drained: hints move between zones as the controller
    /// rebalances, and flows to a healthy pod must survive that.
    eligible: BTreeSet<Backend>,
    /// Local, no usable endpoint on this node, some elsewhere: drop.
    no_local: bool,
}

/// Ready endpoints (all of them with `publishNotReadyAddresses`); if there are none,
/// serving and terminating ones (KEP-1669); never non-serving ones. Local keeps the
/// node's own endpoints first; Cluster with hints those hinted for the node's zone
/// when kube-proxy's `canUseTopology` allows it.
fn select(
    candidates: Option<&BTreeMap<Backend, EpRef<'_>>>,
    publish_not_ready: bool,
    policy: Policy,
    node: &NodeInfo,
) -> Selection {
    let Some(c) = candidates else {
        return Selection { backends: BTreeSet::new(), eligible: BTreeSet::new(), no_local: false };
    };
    let ready = |e: &EpRef<'_>| e.cond.ready || publish_not_ready;
    let usable = |keep: &dyn Fn(&EpRef<'_>) -> bool| -> BTreeSet<Backend> {
        let r: BTreeSet<Backend> = c.iter().filter(|(_, e)| keep(e) && ready(e)).map(|(b, _)| *b).collect();
        if !r.is_empty() {
            return r;
        }
        c.iter().filter(|(_, e)| keep(e) && e.cond.serving && e.cond.terminating).map(|(b, _)| *b).collect()
    };
    match policy {
        Policy::Local => {
            let here = node.name.as_deref();
            let local = |e: &EpRef<'_>| here.is_some() && e.node_name == here;
            let backends = usable(&local);
            let no_local = backends.is_empty() && !usable(&|_| true).is_empty();
            let eligible = c.iter().filter(|(_, e)| local(e)).map(|(b, _)| *b).collect();
            Selection { backends, eligible, no_local }
        }
        Policy::Cluster { hints } => {
            let eligible = c.keys().copied().collect();
            let zone = node.zone.as_deref().filter(|z| !z.is_empty());
            if let Some(zone) = zone.filter(|z| hints && can_use_topology(c, ready, z)) {
                let in_zone: BTreeSet<Backend> = c
                    .iter()
                    .filter(|(_, e)| ready(e) && e.zone_hints.iter().any(|h| **h == *zone))
                    .map(|(b, _)| *b)
                    .collect();
                // Not empty: `can_use_topology` found a ready endpoint for the zone.
                return Selection { backends: in_zone, eligible, no_local: false };
            }
            Selection { backends: usable(&|_| true), eligible, no_local: false }
        }
    }
}

/// kube-proxy's `canUseTopology` (`pkg/proxy/topology.go`, 1.27–1.31), given that the
/// Service asks for hints and the node's zone is known: every ready endpoint has a zone
/// hint, and at least one is hinted for `zone`. Otherwise hints are ignored (all
/// endpoints), so that a half-hinted Service never loses endpoints.
fn can_use_topology(c: &BTreeMap<Backend, EpRef<'_>>, ready: impl Fn(&EpRef<'_>) -> bool, zone: &str) -> bool {
    let mut for_zone = false;
    for e in c.values().filter(|e| ready(e)) {
        if e.zone_hints.is_empty() {
            return false;
        }
        for_zone |= e.zone_hints.iter().any(|h| **h == *zone);
    }
    for_zone
}

#[cfg(test)]
mod generated;
#[cfg(test)]
mod tests;
