//! `lb-bench-tool`: the workload of `cargo xtask bench peers`, which compares lb with
//! kube-proxy on the sandbox cluster. The xtask copies this binary into a pod image and
//! drives it with `kubectl exec`: `serve` runs in the backend pods, the clients run in a
//! client pod against a ClusterIP.
//!
//! The clients are netperf's two request/response patterns, since those are what a
//! service proxy changes: TCP_CRR (`crr`: a new connection per transaction, so every
//! connection goes through the proxy's backend choice and connection tracking) and TCP_RR
//! (`rr`: transactions on a kept-alive connection, the per-packet cost). netperf itself
//! can't tell which backend answered, so the server here replies with its name; `watch`
//! and `probe` use that to time how long a change to a Service takes to reach the
//! datapath.
//!
//! The wire protocol is in [`proto`]. Plain threads and std::net, no async runtime: each
//! client thread does one blocking transaction at a time, as netperf does.

mod client;
mod proto;
mod server;
mod stats;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "lb-bench-tool", version, about = "Workload server and clients for `cargo xtask bench peers`")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Answer every 32-byte request, over TCP and UDP, with a line naming this server.
    Serve {
        /// Port to listen on, for both TCP and UDP.
        #[arg(long)]
        port: u16,
        /// Address to listen on. A UDP server bound to every address answers from the
        /// address routing picks, which on a multi-homed host (a hostNetwork pod) may
        /// not be the one the datagram came to.
        #[arg(long, default_value_t = std::net::Ipv4Addr::UNSPECIFIED)]
        bind: std::net::Ipv4Addr,
        /// TCP connections served at once: each thread serves one connection until it
        /// closes. Further connections wait in the listen backlog.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
        threads: u32,
        /// The name to answer with. Default: the hostname (in a pod, the pod's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// TCP_CRR: connect, request, reply, close, in a loop on each client thread.
    ///
    /// Prints one JSON object; exits 1 if no connection succeeded.
    /// Connections close normally (FIN): set net.ipv4.tcp_tw_reuse=1 in the client's network namespace, or TIME_WAIT caps the rate near 470/s.
    Crr {
        /// Server address (IP:PORT).
        #[arg(long)]
        target: SocketAddr,
        /// Client threads, each with one connection at a time.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
        clients: u32,
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        duration: u64,
        /// Timeout of the connect and of the reply, in milliseconds; a connection that
        /// exceeds it counts as an error.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        timeout_ms: u64,
    },
    /// TCP_RR: requests and replies back to back on kept-alive connections.
    ///
    /// Prints one JSON object; exits 1 if any connection failed.
    Rr {
        /// Server address (IP:PORT).
        #[arg(long)]
        target: SocketAddr,
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        duration: u64,
        /// Connections, each on its own thread with one transaction in flight.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        connections: u32,
    },
    /// Time a Service change: new connections until a reply comes from --want.
    ///
    /// Prints `ready <name>` at the first reply (make the change after it), then
    /// `seen <unix_ns> <tries>` at the first reply from --want: unix_ns is when that
    /// request's connect started (only requests started after `ready` count), tries
    /// counts the requests after `ready`. Prints `timeout` and exits 2 on timeout.
    Watch {
        /// Server address (IP:PORT), typically a ClusterIP.
        #[arg(long)]
        target: SocketAddr,
        /// The server name to wait for; `-` waits instead for the first failing request
        /// (refused or timed out), for a change that removes the endpoints.
        #[arg(long)]
        want: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
        /// Pause after each successful request, in microseconds (failures retry after 1 ms).
        #[arg(long, default_value_t = 0)]
        interval_us: u64,
        /// Threads making requests at once (a request stalled across the change must not
        /// hide the first reply from the new server).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
        parallel: u32,
    },
    /// Wait until every target has answered one request.
    ///
    /// Prints one JSON object with the wall-clock time of the last answer; exits 2 if some
    /// target never answered.
    Probe {
        /// File with one TCP target (IP:PORT) per line; `-` reads standard input. Blank
        /// lines and lines starting with `#` are skipped.
        #[arg(long)]
        targets_file: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
        parallel: u32,
    },
}

fn main() -> ExitCode {
    let res = match Cli::parse().cmd {
        Cmd::Serve { port, bind, threads, name } => server::serve(bind, port, threads, name),
        Cmd::Crr { target, clients, duration, timeout_ms } => {
            client::crr(target, clients, Duration::from_secs(duration), Duration::from_millis(timeout_ms))
        }
        Cmd::Rr { target, duration, connections } => client::rr(target, connections, Duration::from_secs(duration)),
        Cmd::Watch { target, want, timeout, interval_us, parallel } => {
            client::watch(target, &want, Duration::from_secs(timeout), Duration::from_micros(interval_us), parallel)
        }
        Cmd::Probe { targets_file, timeout, parallel } => {
            client::probe(&targets_file, Duration::from_secs(timeout), parallel)
        }
    };
    res.unwrap_or_else(|e| {
        eprintln!("lb-bench-tool: {e:#}");
        ExitCode::FAILURE
    })
}
