//! Service environment variables, as kubelet's `pkg/kubelet/envvars.FromServices` makes
//! them (Kubernetes 1.20): `<SVC>_SERVICE_HOST`, `<SVC>_SERVICE_PORT[_<PORTNAME>]` and the
//! docker-link `<SVC>_PORT*` family, for every service with a ClusterIP.

use k8s_openapi::api::core::v1::Service;

/// `my-svc` -> `MY_SVC`.
fn env_name(s: &str) -> String {
    s.replace('-', "_").to_uppercase()
}

/// The variables for `services`, in kubelet's order.
pub fn from_services(services: &[Service]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        // IsServiceIPSet: neither headless ("None") nor empty.
        let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty() && *ip != "None") else {
            continue;
        };
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let Some(name) = svc.metadata.name.as_deref() else { continue };
        let prefix = env_name(name);
        out.push((format!("{prefix}_SERVICE_HOST"), ip.to_owned()));
        let svc_port = format!("{prefix}_SERVICE_PORT");
        out.push((svc_port.clone(), first.port.to_string()));
        for p in ports {
            if let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) {
                out.push((format!("{svc_port}_{}", env_name(pn)), p.port.to_string()));
            }
        }
        // makeLinkVariables
        for (i, p) in ports.iter().enumerate() {
            let proto = p.protocol.as_deref().filter(|s| !s.is_empty()).unwrap_or("TCP");
            let lower = proto.to_lowercase();
            let url = format!("{lower}://{ip}:{}", p.port);
            if i == 0 {
                out.push((format!("{prefix}_PORT"), url.clone()));
            }
            let pp = format!("{prefix}_PORT_{}_{}", p.port, proto.to_uppercase());
            out.push((pp.clone(), url));
            out.push((format!("{pp}_PROTO"), lower));
            out.push((format!("{pp}_PORT"), p.port.to_string()));
            out.push((format!("{pp}_ADDR"), ip.to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_names() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "mynapp-svc"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [
                {"port": 80, "targetPort": 8080},
                {"name": "dns-udp", "port": 53, "protocol": "UDP"}]}
        }))
        .expect("valid service");
        let headless: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}
        }))
        .expect("valid service");
        let v = from_services(&[svc, headless]);
        let get = |k: &str| v.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("MYNAPP_SVC_SERVICE_HOST"), Some("10.96.0.10"));
        assert_eq!(get("MYNAPP_SVC_SERVICE_PORT"), Some("80"));
        assert_eq!(get("MYNAPP_SVC_SERVICE_PORT_DNS_UDP"), Some("53"));
        assert_eq!(get("MYNAPP_SVC_PORT"), Some("tcp://10.96.0.10:80"));
        assert_eq!(get("MYNAPP_SVC_PORT_80_TCP"), Some("tcp://10.96.0.10:80"));
        assert_eq!(get("MYNAPP_SVC_PORT_53_UDP_PROTO"), Some("udp"));
        assert_eq!(get("MYNAPP_SVC_PORT_53_UDP_PORT"), Some("53"));
        assert_eq!(get("MYNAPP_SVC_PORT_53_UDP_ADDR"), Some("10.96.0.10"));
        assert!(!v.iter().any(|(n, _)| n.starts_with("H_")));
    }
}
