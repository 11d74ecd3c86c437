//! `lb-sandbox-dns`: cluster DNS for the lb sandbox cluster, whose Debian packages
//! have no CoreDNS. It answers the Kubernetes DNS names of Services (ClusterIP,
//! headless, ExternalName), headless endpoints, SRV for named ports, pod names and
//! PTR for ClusterIPs, from Services and Endpoints watched with kube-rs.
//!
//! Sandbox code, kept apart from the product agent in lb-userspace. The DNS logic
//! ([`answer::answer`] over [`records::Records`]) is pure; [`server`], [`health`]
//! and [`watch`] are the thin I/O around it.

pub mod answer;
pub mod health;
pub mod records;
pub mod server;
pub mod watch;

#[cfg(test)]
mod tests;
