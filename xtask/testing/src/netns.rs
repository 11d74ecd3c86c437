//! Throw-away network namespaces for real-traffic tests and benchmarks of the datapath:
//! a client pod, a node and a server pod, joined by veth pairs, with the node routing
//! between the pods.
//!
//! Everything is created inside namespaces this module makes; nothing is added to the
//! root namespace, not even transiently (veth pairs are created with both ends already
//! in their namespaces). Each namespace is deleted when its [`Netns`] is dropped, also
//! while unwinding from a panic; [`remove_stale`] clears what a killed run left behind.
//!
//! The namespaces themselves are [`lb_netns`]'s, the helper set the sandbox uses too:
//! code that must run inside one runs on a thread of its own ([`Netns::run`],
//! [`Netns::spawn`]).

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};
use aya::Ebpf;
pub use lb_netns::{Netns, ip};
use lb_userspace::datapath::{self, AttachMode};

/// Every namespace this module creates is named `lbt-<pid>-<n>-<role>`; the pid tells
/// [`remove_stale`] whether its creator is still alive.
pub const PREFIX: &str = "lbt-";

/// The client pod's address, its gateway (the node's end of its veth) and subnet.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const CLIENT_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// The server pod's address and its gateway.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
pub const SERVER_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
/// The pods' interface, in each pod namespace.
pub const POD_IF: &str = "eth0";
/// The node's end of the client pod's veth: its ingress is the client's egress, where
/// client -> ClusterIP packets are caught.
pub const NODE_CLIENT_IF: &str = "to-client";
/// The node's end of the server pod's veth: its ingress carries the backend's replies,
/// which need their source rewritten back to the ClusterIP.
pub const NODE_SERVER_IF: &str = "to-server";

/// Deletes `lbt-<pid>-*` namespaces whose creating process is gone (see
/// [`lb_netns::remove_stale`]).
pub fn remove_stale() -> Result<Vec<String>> {
    lb_netns::remove_stale(PREFIX)
}

/// Client pod -> node -> server pod. Dropping it deletes all three namespaces.
#[derive(Debug)]
pub struct Topology {
    pub client: Netns,
    pub node: Netns,
    pub server: Netns,
}

impl Topology {
    /// Builds the topology under fresh names `lbt-<pid>-<n>-{client,node,server}`.
    pub fn new() -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = format!("{PREFIX}{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));

        let client = Netns::create(format!("{base}-client"))?;
        let node = Netns::create(format!("{base}-node"))?;
        let server = Netns::create(format!("{base}-server"))?;
        let topo = Self { client, node, server };

        topo.node.sysctl("net.ipv4.ip_forward", "1")?;
        // Replies leave the datapath with the ClusterIP as their source, and the node
        // has no route to the service range (a real node has a default route, which a
        // loose check accepts). New namespaces inherit these from the root namespace,
        // whose values are not ours to rely on; `default` covers the veths made below.
        for conf in ["all", "default"] {
            topo.node.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
        }

        for (pod, node_if, pod_ip, gw) in
            [(&topo.client, NODE_CLIENT_IF, CLIENT_IP, CLIENT_GW), (&topo.server, NODE_SERVER_IF, SERVER_IP, SERVER_GW)]
        {
            // Both ends are created in their namespaces directly: nothing ever appears
            // in the root namespace.
            ip(&[
                "link",
                "add",
                node_if,
                "netns",
                topo.node.name(),
                "type",
                "veth",
                "peer",
                "name",
                POD_IF,
                "netns",
                pod.name(),
            ])?;
            topo.node.ip(&["addr", "add", &format!("{gw}/24"), "dev", node_if])?;
            topo.node.ip(&["link", "set", node_if, "up"])?;
            pod.ip(&["addr", "add", &format!("{pod_ip}/24"), "dev", POD_IF])?;
            pod.ip(&["link", "set", POD_IF, "up"])?;
            // The pod's only way out is its node, which routes between the two pod
            // subnets and nowhere else.
            pod.ip(&["route", "add", "default", "via", &gw.to_string()])?;
        }
        Ok(topo)
    }

    /// Attaches the datapath in `mode` to both node-side veths: client -> ClusterIP
    /// traffic and the server's replies.
    pub fn attach(&self, ebpf: &mut Ebpf, mode: AttachMode) -> Result<()> {
        self.node.run(|| {
            for iface in [NODE_CLIENT_IF, NODE_SERVER_IF] {
                datapath::attach(ebpf, iface, datapath::Hook::Ingress(mode))
                    .with_context(|| format!("attaching {mode} to {iface}"))?;
            }
            Ok(())
        })
    }
}
