//! Table-driven tests of [`compute`]: each case is a set of objects (as the API server
//! would send them) and the frontends, backends and issues they must give.

use serde_json::{Value, json};

use super::*;

fn svc(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name}, "spec": spec})
}

fn svc_meta(ns: &str, name: &str, meta: Value, spec: Value) -> Value {
    let mut v = svc(ns, name, spec);
    for (k, val) in meta.as_object().unwrap() {
        v["metadata"][k] = val.clone();
    }
    v
}

/// A slice of `service` with `ports` [(name, port, proto)] and endpoints
/// [(address, ready, serving, terminating)].
fn slice(ns: &str, name: &str, service: &str, ports: Value, endpoints: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
    })
}

fn ep(addr: &str) -> Value {
    json!({"addresses": [addr], "conditions": {"ready": true}})
}

fn ep_cond(addr: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({"addresses": [addr], "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
}

fn http_port() -> Value {
    json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
}

fn cluster_ip(ip: &str) -> Value {
    json!({"type": "ClusterIP", "clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]})
}

struct Case {
    name: &'static str,
    services: Vec<Value>,
    slices: Vec<Value>,
    /// "ip:port/PROTO" -> sorted "ip:port" backends.
    frontends: Vec<(&'static str, Vec<&'static str>)>,
    issues: Vec<IssueKind>,
}

fn run(case: &Case) -> Computed {
    let services: Vec<Service> = case
        .services
        .iter()
        .map(|v| {
            serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{}: bad Service fixture: {e}", case.name))
        })
        .collect();
    let slices: Vec<EndpointSlice> = case
        .slices
        .iter()
        .map(|v| serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{}: bad slice fixture: {e}", case.name)))
        .collect();
    let slices: Vec<Slice> = slices.iter().map(Slice::from).collect();
    compute(services.iter(), slices.iter())
}

fn frontends_of(c: &Computed) -> Vec<(String, Vec<String>)> {
    c.desired
        .frontends
        .iter()
        .map(|(k, f)| (k.to_string(), f.backends.iter().map(|b| b.to_string()).collect()))
        .collect()
}

#[test]
fn table() {
    let cases = vec![
        Case {
            name: "clusterip with ready endpoints",
            services: vec![svc("default", "web", cluster_ip("10.96.0.10"))],
            slices: vec![slice("default", "web-1", "web", http_port(), json!([ep("10.244.0.2"), ep("10.244.0.3")]))],
            frontends: vec![("10.96.0.10:80/TCP", vec!["10.244.0.2:8080", "10.244.0.3:8080"])],
            issues: vec![],
        },
        Case {
            name: "endpoints merged over several slices",
            services: vec![svc("default", "web", cluster_ip("10.96.0.10"))],
            slices: vec![
                slice("default", "web-1", "web", http_port(), json!([ep("10.244.0.2")])),
                slice("default", "web-2", "web", http_port(), json!([ep("10.244.0.3")])),
            ],
            frontends: vec![("10.96.0.10:80/TCP", vec!["10.244.0.2:8080", "10.244.0.3:8080"])],
            issues: vec![],
        },
        Case {
            name: "no slice: frontend with no backends",
            services: vec![svc("default", "web", cluster_ip("10.96.0.10"))],
            slices: vec![],
            frontends: vec![("10.96.0.10:80/TCP", vec![])],
            issues: vec![],
        },
        Case {
            name: "nodeport and loadbalancer get their clusterIP",
            services: vec![
                svc(
                    "default",
                    "np",
                    json!({"type": "NodePort", "clusterIP": "10.96.0.11", "ports": [{"port": 80, "nodePort": 30080}]}),
                ),
                svc(
                    "default",
                    "lb",
                    json!({"type": "LoadBalancer", "clusterIP": "10.96.0.12", "ports": [{"port": 443}]}),
                ),
            ],
            slices: vec![
                slice("default", "np-1", "np", json!([{"name": "", "port": 80}]), json!([ep("10.244.1.1")])),
                slice("default", "lb-1", "lb", json!([{"port": 8443}]), json!([ep("10.244.1.2")])),
            ],
            frontends: vec![
                ("10.96.0.11:80/TCP", vec!["10.244.1.1:80"]),
                ("10.96.0.12:443/TCP", vec!["10.244.1.2:8443"]),
            ],
            issues: vec![],
        },
        Case {
            name: "multi-port with named targetPorts resolved per slice",
            services: vec![svc(
                "default",
                "multi",
                json!({"clusterIP": "10.96.0.20", "ports": [
                    {"name": "http", "port": 80, "targetPort": "web"},
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
                ]}),
            )],
            // Two slices whose pods name their ports alike but number them differently.
            slices: vec![
                slice(
                    "default",
                    "multi-a",
                    "multi",
                    json!([{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
                    json!([ep("10.244.0.2")]),
                ),
                slice(
                    "default",
                    "multi-b",
                    "multi",
                    json!([{"name": "http", "port": 9090, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]),
                    json!([ep("10.244.0.3")]),
                ),
            ],
            frontends: vec![
                ("10.96.0.20:53/UDP", vec!["10.244.0.2:5353", "10.244.0.3:53"]),
                ("10.96.0.20:80/TCP", vec!["10.244.0.2:8080", "10.244.0.3:9090"]),
            ],
            issues: vec![],
        },
        Case {
            name: "port name must match, protocol too",
            services: vec![svc(
                "default",
                "s",
                json!({"clusterIP": "10.96.0.21", "ports": [{"name": "a", "port": 80}]}),
            )],
            slices: vec![slice(
                "default",
                "s-1",
                "s",
                json!([{"name": "b", "port": 8080}, {"name": "a", "port": 8081, "protocol": "UDP"}]),
                json!([ep("10.244.0.2")]),
            )],
            frontends: vec![("10.96.0.21:80/TCP", vec![])],
            issues: vec![],
        },
        Case {
            name: "dual-stack clusterIPs: the IPv4 one",
            services: vec![svc(
                "default",
                "ds",
                json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.22"], "ports": [{"port": 80}]}),
            )],
            slices: vec![slice("default", "ds-1", "ds", json!([{"port": 80}]), json!([ep("10.244.0.2")]))],
            frontends: vec![("10.96.0.22:80/TCP", vec!["10.244.0.2:80"])],
            issues: vec![],
        },
        Case {
            name: "headless, externalname, other proxy and unassigned are skipped",
            services: vec![
                svc("default", "headless", json!({"clusterIP": "None", "ports": [{"port": 80}]})),
                svc(
                    "default",
                    "ext",
                    json!({"type": "ExternalName", "externalName": "example.com", "ports": [{"port": 80}]}),
                ),
                svc_meta(
                    "default",
                    "other",
                    json!({"labels": {"service.kubernetes.io/service-proxy-name": "foo"}}),
                    json!({"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}),
                ),
                svc("default", "pending", json!({"ports": [{"port": 80}]})),
            ],
            slices: vec![
                // Slices of skipped services are not "unknown".
                slice("default", "headless-1", "headless", json!([{"port": 80}]), json!([ep("10.244.0.2")])),
                slice("default", "other-1", "other", json!([{"port": 80}]), json!([ep("10.244.0.3")])),
            ],
            frontends: vec![],
            issues: vec![],
        },
        Case {
            // kube-proxy's informers select `!service.kubernetes.io/headless` whatever
            // its value, on Services and slices: a labelled Service with a ClusterIP
            // gets no frontend, and its slices are not "unknown".
            name: "service.kubernetes.io/headless label: skipped with any value",
            services: vec![
                svc_meta(
                    "default",
                    "empty",
                    json!({"labels": {"service.kubernetes.io/headless": ""}}),
                    cluster_ip("10.96.0.31"),
                ),
                svc_meta(
                    "default",
                    "valued",
                    json!({"labels": {"service.kubernetes.io/headless": "yes"}}),
                    cluster_ip("10.96.0.32"),
                ),
                svc("default", "plain", cluster_ip("10.96.0.33")),
            ],
            slices: vec![
                slice("default", "empty-1", "empty", http_port(), json!([ep("10.244.0.2")])),
                slice("default", "valued-1", "valued", http_port(), json!([ep("10.244.0.3")])),
                slice("default", "plain-1", "plain", http_port(), json!([ep("10.244.0.4")])),
            ],
            frontends: vec![("10.96.0.33:80/TCP", vec!["10.244.0.4:8080"])],
            issues: vec![],
        },
        Case {
            // A labelled slice of a proxied Service is not watched by kube-proxy
            // either: its endpoints are not used.
            name: "service.kubernetes.io/headless label on a slice: its endpoints unused",
            services: vec![svc("default", "web", cluster_ip("10.96.0.10"))],
            slices: vec![
                {
                    let mut s = slice("default", "web-1", "web", http_port(), json!([ep("10.244.0.2")]));
                    s["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
                    s
                },
                slice("default", "web-2", "web", http_port(), json!([ep("10.244.0.3")])),
            ],
            frontends: vec![("10.96.0.10:80/TCP", vec!["10.244.0.3:8080"])],
            issues: vec![],
        },
        Case {
            name: "not ready endpoints get no traffic",
            services: vec![svc("default", "web", cluster_ip("10.96.0.10"))],
            slices: vec![slice(
                "default",
                "web-1",
                "web",
                http_port(),
                json!([
                    ep("10.244.0.2"),
                    ep_cond("10.244.0.3", false, false, false),
                    ep_cond("10.244.0.4", false, true, false),
                ]),
            )],
            frontends: vec![("10.96.0.10:80/TCP", vec!["10.244.0.2:8080"])],
            issues: vec![],
        },
        Case {
            name: "unset conditions mean ready",
            services: vec![svc("default", "web", cluster_ip("10.96.0.10"))],
            slices: vec![slice(
                "default",
                "web-1",
                "web",
                http_port(),
                json!([{"addresses": ["10.244.0.2"]}, {"addresses": ["10.244.0.3"], "conditions": {}}]),
            )],
            frontends: vec![("10.96.0.10:80/TCP", vec!["10.244.0.2:8080", "10.244.0.3:8080"])],
            issues: vec![],
        },
        Case {
            name: "terminating fallback when none is ready (KEP-1669)",
            services: vec![svc("default", "web", cluster_ip("10.96.0.10"))],
            slices: vec![slice(
                "default",
                "web-1",
                "web",
                http_port(),
                json!([
                    ep_cond("10.244.0.2", false, true, true),
                    ep_cond("10.244.0.3", false, false, true),
                    ep_cond("10.244.0.4", false, true, false),
                ]),
            )],
            frontends: vec![("10.96.0.10:80/TCP", vec!["10.244.0.2:8080"])],
            issues: vec![],
        },
        Case {
            name: "terminating endpoints unused while one is ready",
            services: vec![svc("default", "web", cluster_ip("10.96.0.10"))],
            slices: vec![slice(
                "default",
                "web-1",
                "web",
                http_port(),
                json!([ep_cond("10.244.0.2", false, true, true), ep("10.244.0.5"),]),
            )],
            frontends: vec![("10.96.0.10:80/TCP", vec!["10.244.0.5:8080"])],
            issues: vec![],
        },
        Case {
            name: "publishNotReadyAddresses takes all",
            services: vec![svc(
                "default",
                "web",
                json!({"clusterIP": "10.96.0.10", "publishNotReadyAddresses": true, "ports": [{"name": "http", "port": 80}]}),
            )],
            slices: vec![slice(
                "default",
                "web-1",
                "web",
                http_port(),
                json!([ep("10.244.0.2"), ep_cond("10.244.0.3", false, false, false),]),
            )],
            frontends: vec![("10.96.0.10:80/TCP", vec!["10.244.0.2:8080", "10.244.0.3:8080"])],
            issues: vec![],
        },
        Case {
            name: "sctp port skipped with an issue, others kept",
            services: vec![svc(
                "default",
                "s",
                json!({"clusterIP": "10.96.0.40", "ports": [
                {"name": "a", "port": 80}, {"name": "b", "port": 9999, "protocol": "SCTP"}]}),
            )],
            slices: vec![slice(
                "default",
                "s-1",
                "s",
                json!([{"name": "a", "port": 80}, {"name": "b", "port": 9999, "protocol": "SCTP"}]),
                json!([ep("10.244.0.2")]),
            )],
            frontends: vec![("10.96.0.40:80/TCP", vec!["10.244.0.2:80"])],
            issues: vec![IssueKind::UnsupportedProtocol, IssueKind::UnsupportedProtocol],
        },
        Case {
            name: "invalid endpoint ip skipped, the rest kept",
            services: vec![svc("default", "web", cluster_ip("10.96.0.10"))],
            slices: vec![slice(
                "default",
                "web-1",
                "web",
                http_port(),
                json!([ep("10.244.0.2"), ep("not-an-ip"), ep("10.244.0.300")]),
            )],
            frontends: vec![("10.96.0.10:80/TCP", vec!["10.244.0.2:8080"])],
            issues: vec![IssueKind::InvalidIp, IssueKind::InvalidIp],
        },
        Case {
            name: "invalid clusterIP: an issue, other services kept",
            services: vec![
                svc("default", "bad", cluster_ip("10.96.0.999")),
                svc("default", "good", cluster_ip("10.96.0.11")),
            ],
            slices: vec![],
            frontends: vec![("10.96.0.11:80/TCP", vec![])],
            issues: vec![IssueKind::InvalidIp],
        },
        Case {
            name: "port 0 on service and slice",
            services: vec![svc(
                "default",
                "s",
                json!({"clusterIP": "10.96.0.41", "ports": [{"name": "zero", "port": 0}, {"name": "a", "port": 80}]}),
            )],
            slices: vec![slice("default", "s-1", "s", json!([{"name": "a", "port": 0}]), json!([ep("10.244.0.2")]))],
            frontends: vec![("10.96.0.41:80/TCP", vec![])],
            issues: vec![IssueKind::InvalidPort, IssueKind::InvalidPort],
        },
        Case {
            name: "duplicate endpoint counted once and merged",
            services: vec![svc("default", "web", cluster_ip("10.96.0.10"))],
            slices: vec![
                slice("default", "web-1", "web", http_port(), json!([ep("10.244.0.2")])),
                slice("default", "web-2", "web", http_port(), json!([ep_cond("10.244.0.2", false, false, false)])),
            ],
            frontends: vec![("10.96.0.10:80/TCP", vec!["10.244.0.2:8080"])],
            issues: vec![IssueKind::DuplicateEndpoint],
        },
        Case {
            name: "slice for unknown service, slice without label",
            services: vec![svc("default", "web", cluster_ip("10.96.0.10"))],
            slices: vec![
                slice("default", "ghost-1", "ghost", http_port(), json!([ep("10.244.0.9")])),
                slice("other", "web-1", "web", http_port(), json!([ep("10.244.0.8")])),
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"namespace": "default", "name": "nolabel"},
                       "addressType": "IPv4", "endpoints": []}),
                slice("default", "web-1", "web", http_port(), json!([ep("10.244.0.2")])),
            ],
            frontends: vec![("10.96.0.10:80/TCP", vec!["10.244.0.2:8080"])],
            issues: vec![IssueKind::UnknownService, IssueKind::UnknownService, IssueKind::UnknownService],
        },
        Case {
            name: "ipv6 and fqdn slices ignored",
            services: vec![svc("default", "web", cluster_ip("10.96.0.10"))],
            slices: vec![{
                let mut s = slice("default", "web-6", "web", http_port(), json!([ep("fd00::2")]));
                s["addressType"] = json!("IPv6");
                s
            }],
            frontends: vec![("10.96.0.10:80/TCP", vec![])],
            issues: vec![],
        },
        Case {
            name: "two services on one frontend: first by name wins",
            services: vec![
                svc("default", "b", cluster_ip("10.96.0.10")),
                svc("default", "a", cluster_ip("10.96.0.10")),
            ],
            slices: vec![
                slice("default", "a-1", "a", http_port(), json!([ep("10.244.0.1")])),
                slice("default", "b-1", "b", http_port(), json!([ep("10.244.0.2")])),
            ],
            frontends: vec![("10.96.0.10:80/TCP", vec!["10.244.0.1:8080"])],
            issues: vec![IssueKind::DuplicateFrontend],
        },
    ];
    for case in &cases {
        let got = run(case);
        let want: Vec<(String, Vec<String>)> =
            case.frontends.iter().map(|(k, b)| (k.to_string(), b.iter().map(|s| s.to_string()).collect())).collect();
        assert_eq!(frontends_of(&got), want, "case {:?}", case.name);
        for (k, f) in &got.desired.frontends {
            assert!(
                f.backends.is_disjoint(&f.draining),
                "case {:?}: {k} has a backend that is also draining",
                case.name
            );
        }
        let mut kinds: Vec<IssueKind> = got.issues.iter().map(|i| i.kind).collect();
        kinds.sort();
        let mut want_kinds = case.issues.clone();
        want_kinds.sort();
        assert_eq!(kinds, want_kinds, "case {:?}: issues {:#?}", case.name, got.issues);
    }
}

/// Endpoints the slices still list but that take no new connections drain; endpoints
/// that have left the slices are gone.
#[test]
fn draining_backends() {
    /// (name, endpoints, publishNotReadyAddresses, selected, draining)
    type DrainCase = (&'static str, Value, bool, Vec<&'static str>, Vec<&'static str>);
    let cases: Vec<DrainCase> = vec![
        (
            "terminating pod while others are ready drains",
            json!([ep("10.244.0.2"), ep_cond("10.244.0.3", false, true, true)]),
            false,
            vec!["10.244.0.2:8080"],
            vec!["10.244.0.3:8080"],
        ),
        (
            "unready pod drains",
            json!([ep("10.244.0.2"), ep_cond("10.244.0.3", false, true, false)]),
            false,
            vec!["10.244.0.2:8080"],
            vec!["10.244.0.3:8080"],
        ),
        (
            "not serving (terminating, past readiness) drains",
            json!([ep("10.244.0.2"), ep_cond("10.244.0.3", false, false, true)]),
            false,
            vec!["10.244.0.2:8080"],
            vec!["10.244.0.3:8080"],
        ),
        (
            "pod removed from the slice is not present at all",
            json!([ep("10.244.0.2")]),
            false,
            vec!["10.244.0.2:8080"],
            vec![],
        ),
        (
            "terminating fallback: serving ones selected, never also draining; the rest drain",
            json!([
                ep_cond("10.244.0.2", false, true, true),
                ep_cond("10.244.0.3", false, false, true),
                ep_cond("10.244.0.4", false, true, false)
            ]),
            false,
            vec!["10.244.0.2:8080"],
            vec!["10.244.0.3:8080", "10.244.0.4:8080"],
        ),
        (
            "publishNotReadyAddresses selects all, nothing drains",
            json!([ep("10.244.0.2"), ep_cond("10.244.0.3", false, false, true)]),
            true,
            vec!["10.244.0.2:8080", "10.244.0.3:8080"],
            vec![],
        ),
        (
            "all ready: nothing drains",
            json!([ep("10.244.0.2"), ep("10.244.0.3")]),
            false,
            vec!["10.244.0.2:8080", "10.244.0.3:8080"],
            vec![],
        ),
    ];
    for (name, eps, publish, selected, draining) in cases {
        let mut spec = cluster_ip("10.96.0.10");
        spec["publishNotReadyAddresses"] = json!(publish);
        let c = Case {
            name,
            services: vec![svc("default", "web", spec)],
            slices: vec![slice("default", "web-1", "web", http_port(), eps)],
            frontends: vec![],
            issues: vec![],
        };
        let got = run(&c);
        let f =
            &got.desired.frontends[&FrontendKey { ip: Ipv4Addr::new(10, 96, 0, 10), port: 80, proto: Protocol::Tcp }];
        let s = |set: &BTreeSet<Backend>| set.iter().map(|b| b.to_string()).collect::<Vec<_>>();
        assert_eq!(s(&f.backends), selected, "case {name:?}");
        assert_eq!(s(&f.draining), draining, "case {name:?}");
        assert!(f.backends.is_disjoint(&f.draining), "case {name:?}");
    }
    // Per service port: a draining endpoint of one port does not drain on another.
    let services = [serde_json::from_value::<Service>(svc(
        "default",
        "m",
        json!({"clusterIP": "10.96.0.20", "ports": [
        {"name": "a", "port": 80}, {"name": "b", "port": 81}]}),
    ))
    .unwrap()];
    let slices = [
        Slice::from(
            &serde_json::from_value::<EndpointSlice>(slice(
                "default",
                "m-1",
                "m",
                json!([{"name": "a", "port": 8080}]),
                json!([ep("10.244.0.2"), ep_cond("10.244.0.3", false, true, true)]),
            ))
            .unwrap(),
        ),
        Slice::from(
            &serde_json::from_value::<EndpointSlice>(slice(
                "default",
                "m-2",
                "m",
                json!([{"name": "b", "port": 8081}]),
                json!([ep("10.244.0.3")]),
            ))
            .unwrap(),
        ),
    ];
    let got = compute(services.iter(), slices.iter());
    let draining: Vec<(String, Vec<String>)> = got
        .desired
        .frontends
        .iter()
        .map(|(k, f)| (k.to_string(), f.draining.iter().map(|b| b.to_string()).collect()))
        .collect();
    assert_eq!(
        draining,
        [
            ("10.96.0.20:80/TCP".to_string(), vec!["10.244.0.3:8080".to_string()]),
            ("10.96.0.20:81/TCP".to_string(), vec![])
        ]
    );
}

#[test]
fn affinity_defaults_and_limits() {
    let cases: Vec<(Value, Option<u32>, usize)> = vec![
        (json!({}), None, 0),
        (json!({"sessionAffinity": "None"}), None, 0),
        (json!({"sessionAffinity": "ClientIP"}), Some(10_800), 0),
        (
            json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}}}),
            Some(30),
            0,
        ),
        (
            json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}}}),
            Some(86_400),
            0,
        ),
        (
            json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 100000}}}),
            Some(86_400),
            1,
        ),
        (
            json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
            Some(10_800),
            1,
        ),
        (json!({"sessionAffinity": "Cookie"}), None, 1),
    ];
    for (extra, want, n_issues) in cases {
        let mut spec = json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let s: Service = serde_json::from_value(svc("default", "a", spec)).unwrap();
        let got = compute([&s], []);
        let f = got.desired.frontends.values().next().unwrap();
        assert_eq!(f.affinity_timeout_s, want, "{extra}");
        assert_eq!(got.issues.len(), n_issues, "{extra}: {:?}", got.issues);
        assert!(got.issues.iter().all(|i| i.kind == IssueKind::InvalidAffinity));
    }
}

#[test]
fn no_endpoints_annotation() {
    for (ann, want, n_issues) in [
        (None, NoEndpoints::Reject, 0),
        (Some("reject"), NoEndpoints::Reject, 0),
        (Some("drop"), NoEndpoints::Drop, 0),
        (Some("bogus"), NoEndpoints::Reject, 1),
    ] {
        let meta = match ann {
            Some(a) => json!({"annotations": {ANNOTATION_NO_ENDPOINTS: a}}),
            None => json!({}),
        };
        let s: Service = serde_json::from_value(svc_meta("default", "a", meta, cluster_ip("10.96.0.10"))).unwrap();
        let got = compute([&s], []);
        assert_eq!(got.desired.frontends.values().next().unwrap().no_endpoints, want);
        assert_eq!(got.issues.len(), n_issues);
    }
}

#[test]
fn order_of_objects_does_not_matter() {
    let services: Vec<Service> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| serde_json::from_value(svc("default", n, cluster_ip(&format!("10.96.0.{}", 10 + i)))).unwrap())
        .collect();
    let slices: Vec<EndpointSlice> = (0..6)
        .map(|i| {
            let svc = ["a", "b", "c"][i % 3];
            serde_json::from_value(slice(
                "default",
                &format!("{svc}-{i}"),
                svc,
                http_port(),
                json!([ep(&format!("10.244.0.{i}"))]),
            ))
            .unwrap()
        })
        .collect();
    let slices: Vec<Slice> = slices.iter().map(Slice::from).collect();
    let a = compute(services.iter(), slices.iter());
    let b = compute(services.iter().rev(), slices.iter().rev());
    assert_eq!(a, b);
    assert_eq!(a.desired.endpoint_count(), 6);
}

#[test]
fn v1beta1_slice_json_decodes_into_the_v1_struct() {
    // What a 1.20 API server sends for discovery.k8s.io/v1beta1, with the apiVersion
    // rewritten as the agent's fallback does: `topology` is dropped, the rest fits.
    let v = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.0.2"], "conditions": {"ready": true},
                       "topology": {"kubernetes.io/hostname": "node-1"}, "targetRef": {"kind": "Pod", "name": "web-1"}}],
    });
    let s: EndpointSlice = serde_json::from_value(v).unwrap();
    let svc: Service = serde_json::from_value(svc("default", "web", cluster_ip("10.96.0.10"))).unwrap();
    let got = compute([&svc], [&Slice::from(&s)]);
    assert_eq!(frontends_of(&got), vec![("10.96.0.10:80/TCP".to_string(), vec!["10.244.0.2:8080".to_string()])]);
}

#[test]
fn skipped_services_are_counted_by_reason() {
    let services: Vec<Service> = [
        svc("default", "headless", json!({"clusterIP": "None", "ports": [{"port": 80}]})),
        svc_meta(
            "default",
            "labelled",
            json!({"labels": {"service.kubernetes.io/headless": ""}}),
            cluster_ip("10.96.0.31"),
        ),
        svc_meta(
            "default",
            "other",
            json!({"labels": {"service.kubernetes.io/service-proxy-name": "foo"}}),
            cluster_ip("10.96.0.32"),
        ),
        svc("default", "ext", json!({"type": "ExternalName", "externalName": "example.com"})),
    ]
    .into_iter()
    .map(|v| serde_json::from_value(v).unwrap())
    .collect();
    let got = compute(services.iter(), []);
    assert!(got.desired.frontends.is_empty());
    assert_eq!(
        got.skipped,
        Skipped { headless: 1, headless_label: 1, other_proxy: 1, external_name: 1, ..Default::default() }
    );
}

/// A ready endpoint on `node`, hinted for `zones` (none: no `hints` at all).
fn ep_at(addr: &str, node: &str, zones: &[&str]) -> Value {
    ep_at_cond(addr, node, zones, true, true, false)
}

fn ep_at_cond(addr: &str, node: &str, zones: &[&str], ready: bool, serving: bool, terminating: bool) -> Value {
    let mut v = ep_cond(addr, ready, serving, terminating);
    v["nodeName"] = json!(node);
    if !zones.is_empty() {
        v["hints"] = json!({"forZones": zones.iter().map(|z| json!({"name": z})).collect::<Vec<_>>()});
    }
    v
}

fn node(name: Option<&str>, zone: Option<&str>) -> NodeInfo {
    NodeInfo { name: name.map(Into::into), zone: zone.map(Into::into) }
}

struct NodeCase {
    name: &'static str,
    node: NodeInfo,
    /// Extra Service spec fields (internalTrafficPolicy, trafficDistribution).
    spec: Value,
    /// Service annotations.
    annotations: Value,
    endpoints: Value,
    backends: Vec<&'static str>,
    draining: Vec<&'static str>,
    no_endpoints: NoEndpoints,
    issues: Vec<IssueKind>,
}

fn run_node_case(c: &NodeCase) {
    let mut spec = cluster_ip("10.96.0.10");
    for (k, v) in c.spec.as_object().unwrap() {
        spec[k] = v.clone();
    }
    let s: Service =
        serde_json::from_value(svc_meta("default", "web", json!({"annotations": c.annotations}), spec)).unwrap();
    let es: EndpointSlice =
        serde_json::from_value(slice("default", "web-1", "web", http_port(), c.endpoints.clone())).unwrap();
    let got = compute_on(&c.node, [&s], [&Slice::from(&es)]);
    let f = &got.desired.frontends[&FrontendKey { ip: Ipv4Addr::new(10, 96, 0, 10), port: 80, proto: Protocol::Tcp }];
    let strs = |set: &BTreeSet<Backend>| set.iter().map(|b| b.to_string()).collect::<Vec<_>>();
    assert_eq!(strs(&f.backends), c.backends, "case {:?}: backends", c.name);
    assert_eq!(strs(&f.draining), c.draining, "case {:?}: draining", c.name);
    assert_eq!(f.no_endpoints, c.no_endpoints, "case {:?}: no_endpoints", c.name);
    assert_eq!(got.issues.iter().map(|i| i.kind).collect::<Vec<_>>(), c.issues, "case {:?}: {:?}", c.name, got.issues);
}

/// KEP-2086 internalTrafficPolicy: Local.
#[test]
fn internal_traffic_policy_local() {
    let local = json!({"internalTrafficPolicy": "Local"});
    let two_nodes = json!([ep_at("10.244.1.2", "node-a", &[]), ep_at("10.244.2.2", "node-b", &[])]);
    let cases = vec![
        NodeCase {
            name: "Local: only this node's endpoint",
            node: node(Some("node-a"), None),
            spec: local.clone(),
            annotations: json!({}),
            endpoints: two_nodes.clone(),
            backends: vec!["10.244.1.2:8080"],
            // The other node's endpoint never had a flow from here: not drained.
            draining: vec![],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "Local without a local endpoint drops (kube-proxy), even if the annotation says reject",
            node: node(Some("node-c"), None),
            spec: local.clone(),
            annotations: json!({ANNOTATION_NO_ENDPOINTS: "reject"}),
            endpoints: two_nodes.clone(),
            backends: vec![],
            draining: vec![],
            no_endpoints: NoEndpoints::Drop,
            issues: vec![],
        },
        NodeCase {
            name: "Local with no endpoint anywhere rejects as usual",
            node: node(Some("node-a"), None),
            spec: local.clone(),
            annotations: json!({}),
            endpoints: json!([]),
            backends: vec![],
            draining: vec![],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "Local: a local terminating endpoint serves when no local one is ready (KEP-1669)",
            node: node(Some("node-a"), None),
            spec: local.clone(),
            annotations: json!({}),
            endpoints: json!([
                ep_at_cond("10.244.1.2", "node-a", &[], false, true, true),
                ep_at("10.244.2.2", "node-b", &[]),
            ]),
            backends: vec!["10.244.1.2:8080"],
            draining: vec![],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "Local: an unready local endpoint drains",
            node: node(Some("node-a"), None),
            spec: local.clone(),
            annotations: json!({}),
            endpoints: json!([
                ep_at("10.244.1.2", "node-a", &[]),
                ep_at_cond("10.244.1.3", "node-a", &[], false, false, false),
                ep_at("10.244.2.2", "node-b", &[]),
            ]),
            backends: vec!["10.244.1.2:8080"],
            draining: vec!["10.244.1.3:8080"],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "Local without --node-name: nothing is local, drop, counted",
            node: node(None, Some("zone-a")),
            spec: local.clone(),
            annotations: json!({}),
            endpoints: two_nodes.clone(),
            backends: vec![],
            draining: vec![],
            no_endpoints: NoEndpoints::Drop,
            issues: vec![IssueKind::NodeNameUnknown],
        },
        NodeCase {
            name: "Cluster (explicit) uses every endpoint",
            node: node(Some("node-a"), None),
            spec: json!({"internalTrafficPolicy": "Cluster"}),
            annotations: json!({}),
            endpoints: two_nodes.clone(),
            backends: vec!["10.244.1.2:8080", "10.244.2.2:8080"],
            draining: vec![],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "unknown policy: Cluster, counted",
            node: node(Some("node-a"), None),
            spec: json!({"internalTrafficPolicy": "Nearby"}),
            annotations: json!({}),
            endpoints: two_nodes.clone(),
            backends: vec!["10.244.1.2:8080", "10.244.2.2:8080"],
            draining: vec![],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![IssueKind::InvalidTrafficPolicy],
        },
        NodeCase {
            name: "endpoints without nodeName are never local",
            node: node(Some("node-a"), None),
            spec: local.clone(),
            annotations: json!({}),
            endpoints: json!([ep("10.244.1.2")]),
            backends: vec![],
            draining: vec![],
            no_endpoints: NoEndpoints::Drop,
            issues: vec![],
        },
    ];
    for c in &cases {
        run_node_case(c);
    }
}

/// KEP-2433 topology aware hints and KEP-4444 trafficDistribution, by kube-proxy's
/// `canUseTopology`; Local wins over hints.
#[test]
fn topology_aware_hints() {
    let auto = json!({ANNOTATION_TOPOLOGY_AWARE_HINTS: "auto"});
    let hinted = json!([
        ep_at("10.244.1.2", "node-a", &["zone-a"]),
        ep_at("10.244.2.2", "node-b", &["zone-b"]),
        ep_at("10.244.3.2", "node-c", &["zone-b"]),
    ]);
    let all = vec!["10.244.1.2:8080", "10.244.2.2:8080", "10.244.3.2:8080"];
    let here = node(Some("node-b"), Some("zone-b"));
    let cases = vec![
        NodeCase {
            name: "hints used: only zone-b's endpoints; zone-a's drains",
            node: here.clone(),
            spec: json!({}),
            annotations: auto.clone(),
            endpoints: hinted.clone(),
            backends: vec!["10.244.2.2:8080", "10.244.3.2:8080"],
            draining: vec!["10.244.1.2:8080"],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "Auto, and the 1.27 annotation name",
            node: here.clone(),
            spec: json!({}),
            annotations: json!({ANNOTATION_TOPOLOGY_MODE: "Auto"}),
            endpoints: hinted.clone(),
            backends: vec!["10.244.2.2:8080", "10.244.3.2:8080"],
            draining: vec!["10.244.1.2:8080"],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "trafficDistribution PreferClose without the annotation",
            node: here.clone(),
            spec: json!({"trafficDistribution": "PreferClose"}),
            annotations: json!({}),
            endpoints: hinted.clone(),
            backends: vec!["10.244.2.2:8080", "10.244.3.2:8080"],
            draining: vec!["10.244.1.2:8080"],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "the Service does not ask: hints ignored",
            node: here.clone(),
            spec: json!({}),
            annotations: json!({}),
            endpoints: hinted.clone(),
            backends: all.clone(),
            draining: vec![],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "annotation Disabled: hints ignored",
            node: here.clone(),
            spec: json!({}),
            annotations: json!({ANNOTATION_TOPOLOGY_AWARE_HINTS: "Disabled", ANNOTATION_TOPOLOGY_MODE: "Auto"}),
            endpoints: hinted.clone(),
            backends: all.clone(),
            draining: vec![],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "one ready endpoint without a hint: hints ignored",
            node: here.clone(),
            spec: json!({}),
            annotations: auto.clone(),
            endpoints: json!([
                ep_at("10.244.1.2", "node-a", &["zone-a"]),
                ep_at("10.244.2.2", "node-b", &["zone-b"]),
                ep_at("10.244.3.2", "node-c", &[]),
            ]),
            backends: all.clone(),
            draining: vec![],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "an unready endpoint without a hint does not matter",
            node: here.clone(),
            spec: json!({}),
            annotations: auto.clone(),
            endpoints: json!([
                ep_at("10.244.1.2", "node-a", &["zone-a"]),
                ep_at("10.244.2.2", "node-b", &["zone-b"]),
                ep_at_cond("10.244.3.2", "node-c", &[], false, false, false),
            ]),
            backends: vec!["10.244.2.2:8080"],
            draining: vec!["10.244.1.2:8080", "10.244.3.2:8080"],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "no endpoint hinted for our zone: hints ignored",
            node: node(Some("node-d"), Some("zone-c")),
            spec: json!({}),
            annotations: auto.clone(),
            endpoints: hinted.clone(),
            backends: all.clone(),
            draining: vec![],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "zone unknown (no --node-zone): hints ignored",
            node: node(Some("node-b"), None),
            spec: json!({}),
            annotations: auto.clone(),
            endpoints: hinted.clone(),
            backends: all.clone(),
            draining: vec![],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "an endpoint hinted for several zones",
            node: node(Some("node-a"), Some("zone-a")),
            spec: json!({}),
            annotations: auto.clone(),
            endpoints: json!([
                ep_at("10.244.1.2", "node-a", &["zone-b"]),
                ep_at("10.244.2.2", "node-b", &["zone-b", "zone-a"]),
            ]),
            backends: vec!["10.244.2.2:8080"],
            draining: vec!["10.244.1.2:8080"],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
        NodeCase {
            name: "Local wins over hints",
            node: node(Some("node-a"), Some("zone-b")),
            spec: json!({"internalTrafficPolicy": "Local"}),
            annotations: auto.clone(),
            endpoints: hinted.clone(),
            backends: vec!["10.244.1.2:8080"],
            draining: vec![],
            no_endpoints: NoEndpoints::Reject,
            issues: vec![],
        },
    ];
    for c in &cases {
        run_node_case(c);
    }
}

#[test]
fn v1_slice_carries_node_name_and_hints_into_the_compact_form() {
    let s: EndpointSlice = serde_json::from_value(slice(
        "default",
        "web-1",
        "web",
        http_port(),
        json!([ep_at("10.244.1.2", "node-a", &["zone-a", "zone-b"]), ep("10.244.2.2")]),
    ))
    .unwrap();
    let c = Slice::from(&s);
    assert_eq!(c.endpoints[0].node_name.as_deref(), Some("node-a"));
    assert_eq!(&*c.endpoints[0].zone_hints, [Box::from("zone-a"), Box::from("zone-b")]);
    assert_eq!(c.endpoints[1].node_name, None);
    assert!(c.endpoints[1].zone_hints.is_empty());
}
