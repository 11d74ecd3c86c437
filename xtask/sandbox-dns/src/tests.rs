//! Tests of the answers (table-driven, no sockets) and of the wire handling
//! (decode, EDNS, truncation, malformed input).

use std::{net::Ipv4Addr, sync::atomic::Ordering::Relaxed};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType},
};

use crate::{
    answer::answer,
    records::{Endpoint, Kind, Port, Records, ServiceRecord, Zone},
    server::{MAX_UDP_PAYLOAD, Stats, Transport, respond},
};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn cluster_ip(addr: &str, ports: Vec<Port>) -> ServiceRecord {
    ServiceRecord { kind: Kind::ClusterIp(vec![ip(addr)]), ports, endpoints: vec![] }
}

fn headless(n: u8) -> ServiceRecord {
    let endpoints =
        (1..=n).map(|i| Endpoint { ip: Ipv4Addr::new(10, 1, 0, i), hostname: None, ports: vec![] }).collect();
    ServiceRecord { kind: Kind::Headless, ports: vec![], endpoints }
}

fn fixture() -> Records {
    let mut r = Records::new(Zone::new("cluster.local", 5).unwrap());
    r.insert("default", "kubernetes", cluster_ip("10.96.0.1", vec![Port::new("https", "TCP", 443)]));
    r.insert(
        "default",
        "web",
        cluster_ip("10.96.0.10", vec![Port::new("http", "TCP", 80), Port::new("dns", "UDP", 53)]),
    );
    r.insert("other", "web", cluster_ip("10.96.1.10", vec![]));
    r.insert(
        "default",
        "db",
        ServiceRecord {
            kind: Kind::Headless,
            ports: vec![Port::new("pg", "TCP", 5432)],
            endpoints: vec![
                Endpoint {
                    ip: ip("10.0.0.1"),
                    hostname: Some("db-0".into()),
                    ports: vec![Port::new("pg", "TCP", 5432)],
                },
                Endpoint { ip: ip("10.0.0.2"), hostname: None, ports: vec![Port::new("pg", "TCP", 5433)] },
            ],
        },
    );
    r.insert(
        "default",
        "ext",
        ServiceRecord {
            kind: Kind::ExternalName(Name::from_ascii("example.com.").unwrap()),
            ports: vec![],
            endpoints: vec![],
        },
    );
    r.insert(
        "default",
        "alias",
        ServiceRecord {
            kind: Kind::ExternalName(Name::from_ascii("web.default.svc.cluster.local.").unwrap()),
            ports: vec![],
            endpoints: vec![],
        },
    );
    r.insert(
        "default",
        "loop",
        ServiceRecord {
            kind: Kind::ExternalName(Name::from_ascii("loop.default.svc.cluster.local.").unwrap()),
            ports: vec![],
            endpoints: vec![],
        },
    );
    r.insert("default", "fifty", headless(50));
    r.insert("default", "many", headless(100));
    r
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m
}

/// A record as the table writes it.
fn show(r: &Record) -> String {
    match &r.data {
        RData::A(a) => format!("A {}", a.0),
        RData::CNAME(c) => format!("CNAME {}", c.0),
        RData::PTR(p) => format!("PTR {}", p.0),
        RData::SRV(s) => format!("SRV {} {} {} {}", s.priority, s.weight, s.port, s.target),
        RData::SOA(s) => format!("SOA {} {} {}", s.mname, s.rname, s.minimum),
        other => format!("{:?} {other}", r.record_type()),
    }
}

struct Case {
    what: &'static str,
    name: &'static str,
    qtype: RecordType,
    rcode: ResponseCode,
    answers: &'static [&'static str],
    /// Whether the authority section has the zone's SOA (negative answers in the
    /// cluster zone).
    soa: bool,
    aa: bool,
}

const NX: ResponseCode = ResponseCode::NXDomain;
const OK: ResponseCode = ResponseCode::NoError;
use RecordType::{A, AAAA, CNAME, PTR, SOA, SRV};

const CASES: &[Case] = &[
    Case {
        what: "ClusterIP A",
        name: "web.default.svc.cluster.local.",
        qtype: A,
        rcode: OK,
        answers: &["A 10.96.0.10"],
        soa: false,
        aa: true,
    },
    Case {
        what: "same name, other namespace",
        name: "web.other.svc.cluster.local.",
        qtype: A,
        rcode: OK,
        answers: &["A 10.96.1.10"],
        soa: false,
        aa: true,
    },
    Case {
        what: "headless A: the ready endpoints",
        name: "db.default.svc.cluster.local.",
        qtype: A,
        rcode: OK,
        answers: &["A 10.0.0.1", "A 10.0.0.2"],
        soa: false,
        aa: true,
    },
    Case {
        what: "hostname A of a headless endpoint",
        name: "db-0.db.default.svc.cluster.local.",
        qtype: A,
        rcode: OK,
        answers: &["A 10.0.0.1"],
        soa: false,
        aa: true,
    },
    Case {
        what: "dashed-address A of a headless endpoint without hostname",
        name: "10-0-0-2.db.default.svc.cluster.local.",
        qtype: A,
        rcode: OK,
        answers: &["A 10.0.0.2"],
        soa: false,
        aa: true,
    },
    Case {
        what: "unknown hostname under a headless service",
        name: "db-9.db.default.svc.cluster.local.",
        qtype: A,
        rcode: NX,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "no endpoint names under a ClusterIP service",
        name: "x.web.default.svc.cluster.local.",
        qtype: A,
        rcode: NX,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "ExternalName CNAME",
        name: "ext.default.svc.cluster.local.",
        qtype: A,
        rcode: OK,
        answers: &["CNAME example.com."],
        soa: false,
        aa: true,
    },
    Case {
        what: "ExternalName naming another Service: CNAME, then its ClusterIP",
        name: "alias.default.svc.cluster.local.",
        qtype: A,
        rcode: OK,
        answers: &["CNAME web.default.svc.cluster.local.", "A 10.96.0.10"],
        soa: false,
        aa: true,
    },
    Case {
        what: "ExternalName naming itself: the chain stops",
        name: "loop.default.svc.cluster.local.",
        qtype: A,
        rcode: OK,
        answers: &[
            "CNAME loop.default.svc.cluster.local.",
            "CNAME loop.default.svc.cluster.local.",
            "CNAME loop.default.svc.cluster.local.",
            "CNAME loop.default.svc.cluster.local.",
            "CNAME loop.default.svc.cluster.local.",
            "CNAME loop.default.svc.cluster.local.",
            "CNAME loop.default.svc.cluster.local.",
            "CNAME loop.default.svc.cluster.local.",
            "CNAME loop.default.svc.cluster.local.",
        ],
        soa: false,
        aa: true,
    },
    Case {
        what: "ExternalName CNAME asked as CNAME",
        name: "ext.default.svc.cluster.local.",
        qtype: CNAME,
        rcode: OK,
        answers: &["CNAME example.com."],
        soa: false,
        aa: true,
    },
    Case {
        what: "PTR of a ClusterIP",
        name: "10.0.96.10.in-addr.arpa.",
        qtype: PTR,
        rcode: OK,
        answers: &["PTR web.default.svc.cluster.local."],
        soa: false,
        aa: true,
    },
    Case {
        what: "PTR of a headless endpoint",
        name: "1.0.0.10.in-addr.arpa.",
        qtype: PTR,
        rcode: OK,
        answers: &["PTR db-0.db.default.svc.cluster.local."],
        soa: false,
        aa: true,
    },
    Case {
        what: "PTR of an unknown address: not our zone",
        name: "9.9.9.9.in-addr.arpa.",
        qtype: PTR,
        rcode: NX,
        answers: &[],
        soa: false,
        aa: false,
    },
    Case {
        what: "missing service: NXDOMAIN with SOA",
        name: "nope.default.svc.cluster.local.",
        qtype: A,
        rcode: NX,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "AAAA of an existing name: NODATA",
        name: "web.default.svc.cluster.local.",
        qtype: AAAA,
        rcode: OK,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "AAAA of a headless service: NODATA",
        name: "db.default.svc.cluster.local.",
        qtype: AAAA,
        rcode: OK,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "search-path miss (ndots:5 tries <name>.<ns>.svc.cluster.local first)",
        name: "web.default.svc.cluster.local.default.svc.cluster.local.",
        qtype: A,
        rcode: NX,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "search-path miss for a short name (web.svc.cluster.local)",
        name: "web.svc.cluster.local.",
        qtype: A,
        rcode: NX,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "search-path miss for a short name (web.cluster.local)",
        name: "web.cluster.local.",
        qtype: A,
        rcode: NX,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "outside the cluster domain: NXDOMAIN, no SOA, not authoritative",
        name: "example.com.",
        qtype: A,
        rcode: NX,
        answers: &[],
        soa: false,
        aa: false,
    },
    Case {
        what: "a suffix of the domain is outside",
        name: "local.",
        qtype: A,
        rcode: NX,
        answers: &[],
        soa: false,
        aa: false,
    },
    Case {
        what: "case-insensitive names",
        name: "WEB.Default.SVC.Cluster.LOCAL.",
        qtype: A,
        rcode: OK,
        answers: &["A 10.96.0.10"],
        soa: false,
        aa: true,
    },
    Case {
        what: "case-insensitive hostname",
        name: "DB-0.DB.default.svc.cluster.local.",
        qtype: A,
        rcode: OK,
        answers: &["A 10.0.0.1"],
        soa: false,
        aa: true,
    },
    Case {
        what: "existing namespace: empty non-terminal",
        name: "default.svc.cluster.local.",
        qtype: A,
        rcode: OK,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "unknown namespace",
        name: "nons.svc.cluster.local.",
        qtype: A,
        rcode: NX,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "svc.<domain> exists",
        name: "svc.cluster.local.",
        qtype: A,
        rcode: OK,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "apex SOA",
        name: "cluster.local.",
        qtype: SOA,
        rcode: OK,
        answers: &["SOA ns.dns.cluster.local. hostmaster.cluster.local. 5"],
        soa: false,
        aa: true,
    },
    Case {
        what: "SRV of a ClusterIP service's named port",
        name: "_http._tcp.web.default.svc.cluster.local.",
        qtype: SRV,
        rcode: OK,
        answers: &["SRV 0 100 80 web.default.svc.cluster.local."],
        soa: false,
        aa: true,
    },
    Case {
        what: "SRV with a udp port",
        name: "_dns._udp.web.default.svc.cluster.local.",
        qtype: SRV,
        rcode: OK,
        answers: &["SRV 0 100 53 web.default.svc.cluster.local."],
        soa: false,
        aa: true,
    },
    Case {
        what: "SRV of a headless service: one per endpoint, endpoint names and ports",
        name: "_pg._tcp.db.default.svc.cluster.local.",
        qtype: SRV,
        rcode: OK,
        answers: &[
            "SRV 0 50 5432 db-0.db.default.svc.cluster.local.",
            "SRV 0 50 5433 10-0-0-2.db.default.svc.cluster.local.",
        ],
        soa: false,
        aa: true,
    },
    Case {
        what: "SRV with the wrong protocol",
        name: "_http._udp.web.default.svc.cluster.local.",
        qtype: SRV,
        rcode: NX,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "SRV name asked as A: NODATA",
        name: "_http._tcp.web.default.svc.cluster.local.",
        qtype: A,
        rcode: OK,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "_tcp under a service is an empty non-terminal",
        name: "_tcp.web.default.svc.cluster.local.",
        qtype: SRV,
        rcode: OK,
        answers: &[],
        soa: true,
        aa: true,
    },
    Case {
        what: "pod A (pods insecure)",
        name: "10-244-1-5.default.pod.cluster.local.",
        qtype: A,
        rcode: OK,
        answers: &["A 10.244.1.5"],
        soa: false,
        aa: true,
    },
    Case {
        what: "pod name that is not an address",
        name: "10-244-1.default.pod.cluster.local.",
        qtype: A,
        rcode: NX,
        answers: &[],
        soa: true,
        aa: true,
    },
];

#[test]
fn answer_table() {
    let records = fixture();
    let mut failures = Vec::new();
    for c in CASES {
        let req = query(c.name, c.qtype);
        let resp = answer(&records, &req);
        let answers: Vec<String> = resp.answers.iter().map(show).collect();
        let soa = resp.authorities.iter().any(|r| r.record_type() == RecordType::SOA);
        let got = (resp.metadata.response_code, answers.clone(), soa, resp.metadata.authoritative);
        let want = (c.rcode, c.answers.iter().map(|s| s.to_string()).collect::<Vec<_>>(), c.soa, c.aa);
        if got != want {
            failures.push(format!("{} ({} {:?}):\n   got  {got:?}\n   want {want:?}", c.what, c.name, c.qtype));
        }
        // Every response echoes the question and the id, and answers under the
        // name as asked (case included: resolvers using 0x20 compare it).
        assert_eq!(resp.metadata.id, 0x1234, "{}", c.what);
        assert_eq!(resp.metadata.message_type, MessageType::Response, "{}", c.what);
        assert!(resp.metadata.recursion_desired, "{}: RD is copied", c.what);
        assert_eq!(resp.queries, req.queries, "{}", c.what);
        // ... or, after a CNAME, under its target (an in-zone chain, RFC 1034 3.6.2).
        let mut owner = req.queries[0].name().clone();
        for r in &resp.answers {
            assert!(
                r.name.eq_case(&owner),
                "{}: owner {} is neither the query name nor a CNAME target",
                c.what,
                r.name
            );
            assert_eq!(r.ttl, 5, "{}", c.what);
            if let RData::CNAME(t) = &r.data {
                owner = t.0.clone();
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), CASES.len(), failures.join("\n"));
}

#[test]
fn srv_answers_carry_target_addresses() {
    let resp = answer(&fixture(), &query("_pg._tcp.db.default.svc.cluster.local.", SRV));
    let extra: Vec<String> = resp.additionals.iter().map(|r| format!("{} {}", r.name, show(r))).collect();
    assert_eq!(
        extra,
        ["db-0.db.default.svc.cluster.local. A 10.0.0.1", "10-0-0-2.db.default.svc.cluster.local. A 10.0.0.2"]
    );
}

#[test]
fn nxdomain_soa_is_the_zone_apex_with_the_ttl_as_minimum() {
    let records = Records::new(Zone::new("sandbox.test", 7).unwrap());
    let resp = answer(&records, &query("nope.default.svc.sandbox.test.", A));
    assert_eq!(resp.metadata.response_code, NX);
    let [soa] = resp.authorities.as_slice() else { panic!("one SOA expected: {:?}", resp.authorities) };
    assert_eq!(soa.name.to_ascii(), "sandbox.test.");
    assert_eq!(soa.ttl, 7);
    assert_eq!(show(soa), "SOA ns.dns.sandbox.test. hostmaster.sandbox.test. 7");
    // A name in cluster.local is outside this zone.
    let resp = answer(&records, &query("web.default.svc.cluster.local.", A));
    assert!(resp.authorities.is_empty() && !resp.metadata.authoritative);
}

#[test]
fn not_ready_answers_servfail() {
    let records = Records::not_ready(Zone::new("cluster.local", 5).unwrap());
    for name in ["web.default.svc.cluster.local.", "nope.default.svc.cluster.local.", "example.com."] {
        let resp = answer(&records, &query(name, A));
        assert_eq!(resp.metadata.response_code, ResponseCode::ServFail, "{name}");
        assert!(resp.answers.is_empty() && resp.authorities.is_empty(), "{name}");
    }
}

#[test]
fn odd_requests_get_error_rcodes() {
    let records = fixture();
    let mut no_question = query("web.default.svc.cluster.local.", A);
    no_question.queries.clear();
    assert_eq!(answer(&records, &no_question).metadata.response_code, ResponseCode::FormErr);

    let mut two = query("web.default.svc.cluster.local.", A);
    two.add_query(Query::query(Name::from_ascii("db.default.svc.cluster.local.").unwrap(), A));
    assert_eq!(answer(&records, &two).metadata.response_code, ResponseCode::FormErr);

    let mut status = query("web.default.svc.cluster.local.", A);
    status.metadata.op_code = OpCode::Status;
    assert_eq!(answer(&records, &status).metadata.response_code, ResponseCode::NotImp);

    let mut chaos = query("version.bind.", RecordType::TXT);
    chaos.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(answer(&records, &chaos).metadata.response_code, ResponseCode::Refused);
}

// --- wire level ---

fn wire(m: &Message) -> Vec<u8> {
    m.to_vec().unwrap()
}

fn with_edns(mut m: Message, payload: u16) -> Message {
    let mut e = Edns::new();
    e.set_max_payload(payload);
    m.edns = Some(e);
    m
}

#[test]
fn malformed_packets_are_counted_and_dropped() {
    let records = fixture();
    let stats = Stats::default();
    let good = wire(&query("web.default.svc.cluster.local.", A));
    let mut bad: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff],
        vec![0; 11],
        // Header claims one question, none follows.
        vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0],
        // A name whose compression pointer points at itself.
        vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01],
        // A label longer than the packet.
        vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0x3f, b'a', 0, 1, 0, 1],
    ];
    // Every proper prefix of a good query is malformed.
    bad.extend((0..good.len()).map(|n| good[..n].to_vec()));
    for (i, p) in bad.iter().enumerate() {
        for t in [Transport::Udp, Transport::Tcp] {
            assert_eq!(respond(&records, p, t, &stats), None, "packet {i} {p:02x?} over {t:?} must be dropped");
        }
    }
    assert_eq!(stats.malformed.load(Relaxed), 2 * bad.len() as u64);
    assert_eq!(stats.udp_queries.load(Relaxed), 0);

    // A response sent to us is dropped too (no answer loops between servers).
    let mut resp = query("web.default.svc.cluster.local.", A);
    resp.metadata.message_type = MessageType::Response;
    assert_eq!(respond(&records, &wire(&resp), Transport::Udp, &stats), None);

    // Garbage of every byte value in every position does not panic.
    for pos in 0..good.len() {
        for b in [0x00, 0x3f, 0x40, 0x7f, 0xc0, 0xff] {
            let mut p = good.clone();
            p[pos] = b;
            let _ = respond(&records, &p, Transport::Udp, &stats);
        }
    }
    // And the good one still answers.
    let out = respond(&records, &good, Transport::Udp, &stats).expect("answer");
    assert_eq!(Message::from_vec(&out).unwrap().answers.len(), 1);
}

#[test]
fn udp_truncates_over_512_without_edns_and_over_the_edns_size_with_it() {
    let records = fixture();
    let stats = Stats::default();
    let decode = |b: Option<Vec<u8>>| {
        let b = b.expect("an answer");
        (b.len(), Message::from_vec(&b).unwrap())
    };

    // 50 endpoints: ~850 bytes.
    let q = query("fifty.default.svc.cluster.local.", A);
    let (len, m) = decode(respond(&records, &wire(&q), Transport::Udp, &stats));
    assert!(m.metadata.truncation && m.answers.is_empty() && len <= 512, "no EDNS: TC, len {len}");
    assert_eq!(m.queries, q.queries);
    assert_eq!(m.metadata.id, 0x1234);

    let (len, m) = decode(respond(&records, &wire(&with_edns(q.clone(), 4096)), Transport::Udp, &stats));
    assert!(!m.metadata.truncation && m.answers.len() == 50 && len > 512, "EDNS 4096: fits, len {len}");
    assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(MAX_UDP_PAYLOAD), "EDNS is answered with ours");

    let (_, m) = decode(respond(&records, &wire(&with_edns(q.clone(), 600)), Transport::Udp, &stats));
    assert!(m.metadata.truncation && m.answers.is_empty(), "EDNS 600 is honoured");

    // 100 endpoints: ~1650 bytes, over our 1232 cap whatever the client offers.
    let q = query("many.default.svc.cluster.local.", A);
    let (len, m) = decode(respond(&records, &wire(&with_edns(q.clone(), 4096)), Transport::Udp, &stats));
    assert!(m.metadata.truncation && m.answers.is_empty(), "over 1232: TC, len {len}");
    assert!(m.edns.is_some(), "the OPT record survives truncation");

    let (len, m) = decode(respond(&records, &wire(&q), Transport::Tcp, &stats));
    assert!(!m.metadata.truncation && m.answers.len() == 100 && len > 1232, "TCP: all 100, len {len}");
    assert_eq!(stats.truncated.load(Relaxed), 3);
}

#[test]
fn edns_version_above_zero_gets_badvers() {
    let records = fixture();
    let stats = Stats::default();
    let mut q = with_edns(query("web.default.svc.cluster.local.", A), 1232);
    q.edns.as_mut().unwrap().set_version(1);
    let m = Message::from_vec(&respond(&records, &wire(&q), Transport::Udp, &stats).unwrap()).unwrap();
    // 16 on the wire: its high bits travel in the OPT record. hickory decodes 16 as
    // BADSIG (the TSIG meaning of the same number), so compare the number.
    assert_eq!(u16::from(m.metadata.response_code), 16);
    assert!(m.edns.is_some(), "BADVERS needs an OPT record to carry it");
    assert!(m.answers.is_empty());
}
