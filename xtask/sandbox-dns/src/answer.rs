//! The DNS logic: a pure function from a query and the [`Records`] to a response.
//!
//! What is answered follows the Kubernetes DNS specification as kube-dns and
//! CoreDNS's `kubernetes` plugin implement it, for what the Service e2e tests and
//! the sandbox's users need:
//!
//! | name | answer |
//! | --- | --- |
//! | `<svc>.<ns>.svc.<zone>` | A: the ClusterIP; headless: the ready endpoint addresses; ExternalName: CNAME |
//! | `<ep>.<svc>.<ns>.svc.<zone>` | A of a headless endpoint (`ep` = its hostname, or its address as `a-b-c-d`) |
//! | `_<port>._<proto>.<svc>.<ns>.svc.<zone>` | SRV per named port (per endpoint for headless Services) |
//! | `<a-b-c-d>.<ns>.pod.<zone>` | A `a.b.c.d` (CoreDNS `pods insecure`, which the DNS e2e tests query) |
//! | `d.c.b.a.in-addr.arpa` | PTR for ClusterIPs and headless endpoint addresses |
//!
//! A name in the zone that does not exist gets NXDOMAIN with the zone's SOA (its
//! minimum is the TTL, so resolvers cache the miss as briefly as the hits); an
//! existing name without records of the asked type (AAAA: the cluster is IPv4 only)
//! gets NOERROR, no answers, and the SOA.
//!
//! Names outside the zone get NXDOMAIN too, not REFUSED (the sandbox has no
//! outside network, so there is nothing to recurse to). REFUSED would be slower
//! or wrong for both common stub resolvers:
//! - glibc (`res_send.c`) takes REFUSED like SERVFAIL, as "server rejected query",
//!   and tries the next nameserver; when all did, `__res_context_search` gets
//!   TRY_AGAIN without a SERVFAIL rcode, stops walking the search list ("anything
//!   else implies that we're done") and `getent hosts` fails with a temporary error
//!   (exit 2, "try again") instead of a clean "not found".
//! - musl (`res_msend.c`) accepts only NOERROR and NXDOMAIN, retries SERVFAIL, and
//!   *ignores* every other rcode: a REFUSED answer makes it wait out its whole
//!   timeout (5 s per attempt) for each name.
//!
//! With NXDOMAIN both resolvers move on to the next search domain at once
//! (glibc: HOST_NOT_FOUND, "keep trying"), so `getent hosts foo` with the search
//! list `ns.svc.cluster.local svc.cluster.local cluster.local` costs one round trip
//! per suffix and then one for `foo.` itself.

use std::net::Ipv4Addr;

use hickory_proto::{
    op::{Message, MessageType, Metadata, OpCode, ResponseCode},
    rr::{
        DNSClass, Name, RData, Record, RecordType,
        rdata::{A, CNAME, PTR, SOA, SRV},
    },
};

use crate::records::{Kind, Records, ServiceRecord};

// SOA timers as CoreDNS's kubernetes plugin sets them; only `minimum` (the TTL of
// negative answers, RFC 2308) matters to stub resolvers.
const SOA_REFRESH: i32 = 7200;
const SOA_RETRY: i32 = 1800;
const SOA_EXPIRE: i32 = 86400;

/// Which zone a name fell in: it decides whether negative answers carry our SOA
/// (the cluster zone) or are plain (the reverse zone, whose apex is not ours).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Zone {
    Cluster,
    Reverse,
}

/// What a name is, before looking at the query type.
#[derive(Debug)]
enum Node {
    /// The zone apex (`cluster.local`): has the SOA.
    Apex,
    /// A name that exists only because names below it do (`svc.cluster.local`,
    /// `ns.svc.cluster.local`): NODATA for every type.
    Empty,
    Addresses(Vec<Ipv4Addr>),
    Cname(Name),
    /// (port, target, target's addresses for the additional section)
    Srv(Vec<(u16, Name, Vec<Ipv4Addr>)>),
    Ptr(Name),
}

#[derive(Debug)]
enum Lookup {
    /// Not in a zone we serve.
    Outside,
    NxDomain(Zone),
    Found(Zone, Node),
}

/// Computes the response to `request`. Never fails: what cannot be answered gets an
/// error rcode (FORMERR, NOTIMP, REFUSED, SERVFAIL).
pub fn answer(records: &Records, request: &Message) -> Message {
    let mut resp = Message::new(request.metadata.id, MessageType::Response, request.metadata.op_code);
    resp.metadata = Metadata::response_from_request(&request.metadata);
    resp.queries = request.queries.clone();

    if request.metadata.op_code != OpCode::Query {
        resp.metadata.response_code = ResponseCode::NotImp;
        return resp;
    }
    // RFC 9619: QDCOUNT must be 1 for QUERY; nobody sends more.
    let [query] = request.queries.as_slice() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return resp;
    };
    if !records.is_ready() {
        resp.metadata.response_code = ResponseCode::ServFail;
        return resp;
    }
    if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
        // CHAOS `version.bind` and the like: not data we have.
        resp.metadata.response_code = ResponseCode::Refused;
        return resp;
    }

    let ttl = records.zone().ttl();
    let qname = query.name();
    let qtype = query.query_type();
    let (zone, node) = match lookup(records, qname) {
        Lookup::Outside => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            return resp;
        }
        Lookup::NxDomain(zone) => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.metadata.authoritative = zone == Zone::Cluster;
            if zone == Zone::Cluster {
                resp.authorities.push(soa(records));
            }
            return resp;
        }
        Lookup::Found(zone, node) => (zone, node),
    };
    resp.metadata.authoritative = true;

    let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;
    let owner = qname.clone();
    match node {
        Node::Apex if wants(RecordType::SOA) => resp.answers.push(soa(records)),
        Node::Addresses(ips) if wants(RecordType::A) => {
            resp.answers.extend(ips.into_iter().map(|ip| Record::from_rdata(owner.clone(), ttl, RData::A(A(ip)))));
        }
        // A CNAME answers every type. A target in the cluster zone (an ExternalName naming
        // another Service's FQDN, as upstream's "change the type from ClusterIP to
        // ExternalName" test does) is followed here, as CoreDNS does, so that the answer
        // carries its addresses; outside targets are left to the resolver (the sandbox
        // cannot resolve outside names).
        Node::Cname(target) => {
            resp.answers.push(Record::from_rdata(owner, ttl, RData::CNAME(CNAME(target.clone()))));
            let mut at = target;
            for _ in 0..MAX_CNAME_CHAIN {
                match lookup(records, &at) {
                    Lookup::Found(_, Node::Cname(next)) => {
                        resp.answers.push(Record::from_rdata(at, ttl, RData::CNAME(CNAME(next.clone()))));
                        at = next;
                    }
                    Lookup::Found(_, Node::Addresses(ips)) if wants(RecordType::A) => {
                        resp.answers
                            .extend(ips.into_iter().map(|ip| Record::from_rdata(at.clone(), ttl, RData::A(A(ip)))));
                        break;
                    }
                    _ => break,
                }
            }
        }
        Node::Srv(targets) if wants(RecordType::SRV) => {
            // Equal weights summing to about 100, as CoreDNS does.
            let weight = u16::try_from(100 / targets.len().max(1)).unwrap_or(1).max(1);
            for (port, target, ips) in targets {
                resp.answers.push(Record::from_rdata(
                    owner.clone(),
                    ttl,
                    RData::SRV(SRV::new(0, weight, port, target.clone())),
                ));
                resp.additionals
                    .extend(ips.into_iter().map(|ip| Record::from_rdata(target.clone(), ttl, RData::A(A(ip)))));
            }
        }
        Node::Ptr(target) if wants(RecordType::PTR) => {
            resp.answers.push(Record::from_rdata(owner, ttl, RData::PTR(PTR(target))));
        }
        // The name exists but has nothing of this type: NODATA.
        _ => {
            if zone == Zone::Cluster {
                resp.authorities.push(soa(records));
            }
        }
    }
    resp
}

/// In-zone CNAMEs followed for one answer at most (ExternalName chains, loops).
const MAX_CNAME_CHAIN: usize = 8;

fn soa(records: &Records) -> Record {
    let zone = records.zone();
    let apex = zone.apex().clone();
    let mname = zone.name("ns.dns").unwrap_or_else(|| apex.clone());
    let rname = zone.name("hostmaster").unwrap_or_else(|| apex.clone());
    Record::from_rdata(
        apex,
        zone.ttl(),
        RData::SOA(SOA::new(mname, rname, records.serial(), SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, zone.ttl())),
    )
}

/// Classifies `qname` (any case) against the records.
fn lookup(records: &Records, qname: &Name) -> Lookup {
    // DNS names compare case-insensitively; Kubernetes names are lowercase. Labels
    // that are not UTF-8 cannot match any object and fall through to NXDOMAIN.
    let labels: Vec<String> = qname.iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect();

    if let [rest @ .., a, b] = labels.as_slice()
        && a == "in-addr"
        && b == "arpa"
    {
        return reverse(records, rest);
    }

    let apex = records.zone().labels();
    if labels.len() < apex.len() || labels[labels.len() - apex.len()..] != *apex {
        return Lookup::Outside;
    }
    let rel: Vec<&str> = labels[..labels.len() - apex.len()].iter().map(String::as_str).collect();
    let found = |node| Lookup::Found(Zone::Cluster, node);
    let nx = Lookup::NxDomain(Zone::Cluster);
    match rel.as_slice() {
        [] => found(Node::Apex),
        ["svc"] | ["pod"] => found(Node::Empty),
        [ns, "svc"] => {
            if records.has_namespace(ns) {
                found(Node::Empty)
            } else {
                nx
            }
        }
        [name, ns, "svc"] => match records.service(ns, name) {
            None => nx,
            Some(svc) => found(match &svc.kind {
                Kind::ClusterIp(ips) => Node::Addresses(ips.clone()),
                Kind::Headless => Node::Addresses(headless_addresses(svc, None)),
                Kind::ExternalName(target) => Node::Cname(target.clone()),
            }),
        },
        [label, name, ns, "svc"] => {
            let Some(svc) = records.service(ns, name) else { return nx };
            if let Some(proto) = label.strip_prefix('_') {
                // `_tcp.<svc>...`: exists as the parent of `_<port>._tcp.<svc>...`.
                return if svc
                    .ports
                    .iter()
                    .chain(svc.endpoints.iter().flat_map(|e| &e.ports))
                    .any(|p| p.protocol == proto)
                {
                    found(Node::Empty)
                } else {
                    nx
                };
            }
            if svc.kind != Kind::Headless {
                return nx;
            }
            let ips = headless_addresses(svc, Some(label));
            if ips.is_empty() { nx } else { found(Node::Addresses(ips)) }
        }
        [port, proto, name, ns, "svc"] => {
            let (Some(port), Some(proto)) = (port.strip_prefix('_'), proto.strip_prefix('_')) else { return nx };
            let Some(svc) = records.service(ns, name) else { return nx };
            let targets = srv_targets(records, svc, name, ns, port, proto);
            if targets.is_empty() { nx } else { found(Node::Srv(targets)) }
        }
        // We do not watch pods or namespaces; like CoreDNS in `pods insecure` mode,
        // a pod name is just its address.
        [_ns, "pod"] => found(Node::Empty),
        [ip, _ns, "pod"] => match parse_dashed(ip) {
            Some(ip) => found(Node::Addresses(vec![ip])),
            None => nx,
        },
        _ => nx,
    }
}

/// PTR names: `d.c.b.a` (the labels before `in-addr.arpa`).
fn reverse(records: &Records, rest: &[String]) -> Lookup {
    let [d, c, b, a] = rest else { return Lookup::Outside };
    let octets: Option<Vec<u8>> = [a, b, c, d].iter().map(|o| o.parse::<u8>().ok()).collect();
    let Some(&[a, b, c, d]) = octets.as_deref() else { return Lookup::Outside };
    match records.reverse(Ipv4Addr::new(a, b, c, d)) {
        Some(target) => Lookup::Found(Zone::Reverse, Node::Ptr(target.clone())),
        // Not ours: the rest of in-addr.arpa would be the (absent) upstream's.
        None => Lookup::Outside,
    }
}

/// The ready addresses of a headless Service, optionally only those whose
/// endpoint label (hostname or dashed address) is `label`; deduplicated.
fn headless_addresses(svc: &ServiceRecord, label: Option<&str>) -> Vec<Ipv4Addr> {
    let mut ips = Vec::new();
    for ep in &svc.endpoints {
        if label.is_some_and(|l| ep.label() != l) {
            continue;
        }
        if !ips.contains(&ep.ip) {
            ips.push(ep.ip);
        }
    }
    ips
}

fn srv_targets(
    records: &Records,
    svc: &ServiceRecord,
    name: &str,
    ns: &str,
    port: &str,
    proto: &str,
) -> Vec<(u16, Name, Vec<Ipv4Addr>)> {
    let zone = records.zone();
    let matches = |p: &&crate::records::Port| p.name == port && p.protocol == proto;
    match &svc.kind {
        Kind::ClusterIp(ips) => {
            let Some(target) = zone.name(&format!("{name}.{ns}.svc")) else { return Vec::new() };
            svc.ports.iter().filter(matches).map(|p| (p.port, target.clone(), ips.clone())).collect()
        }
        // One SRV per endpoint, pointing at the endpoint's own name, with the
        // endpoint's port (the target port, which may differ per pod).
        Kind::Headless => svc
            .endpoints
            .iter()
            .flat_map(|ep| {
                let target = zone.name(&format!("{}.{name}.{ns}.svc", ep.label()));
                ep.ports.iter().filter(matches).filter_map(move |p| Some((p.port, target.clone()?, vec![ep.ip])))
            })
            .collect(),
        Kind::ExternalName(_) => Vec::new(),
    }
}

/// `10-0-0-1` → 10.0.0.1.
fn parse_dashed(label: &str) -> Option<Ipv4Addr> {
    label.replace('-', ".").parse().ok().filter(|_| label.split('-').count() == 4)
}
