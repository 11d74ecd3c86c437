//! `lb-sandbox`: the node side of `cargo xtask sandbox` — our own kubelet for the sandbox's
//! network-namespace nodes, the built-in container images, the loopback relay to the
//! control plane, and small client tools for `exec`. See docs/sandbox.md.

#[path = "../sandbox/mod.rs"]
mod sandbox;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use sandbox::{NodeSpec, images};

#[derive(Parser, Debug)]
#[command(name = "lb-sandbox", about = "sandbox cluster node side: kubelet, images, relay")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the kubelet for nodes lbsb-node1..N (run it where it can reach the apiserver).
    Kubelet {
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long, default_value = sandbox::STATE_DIR)]
        state_dir: PathBuf,
        /// Network namespace to enter first (where the apiserver is reachable). The
        /// process stays in the root mount namespace, so the pod namespaces it makes with
        /// `ip netns add` are visible to everyone.
        #[arg(long)]
        netns: Option<String>,
    },
    /// Relay 127.0.0.1:PORT (root namespace) to an address inside a namespace.
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        netns: String,
        #[arg(long)]
        to: SocketAddr,
    },
    /// Run a built-in container image (what the kubelet starts in pods).
    Image {
        #[command(subcommand)]
        image: ImageCmd,
    },
    /// Client tool: send one UDP datagram and print the answer.
    Udp {
        addr: SocketAddr,
        #[arg(default_value = "hello")]
        msg: String,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Client tool: open an HTTP connection, print `connected <local addr>`, wait for a line
    /// on stdin, then finish the request and print the answer (a connection held across an
    /// event such as an agent restart).
    TcpHold {
        addr: SocketAddr,
        #[arg(default_value = "/hostname")]
        path: String,
    },
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// HTTP "You've hit <name>" on TCP ports, "<name>: <payload>" UDP echo on UDP ports.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
        /// After SIGTERM keep serving (with /readyz failing) for this many seconds.
        #[arg(long, default_value_t = 0)]
        delay_shutdown: u64,
    },
    /// Sleep until killed (client pods).
    Idle,
}

fn main() -> Result<()> {
    // A parent that blocked signals (to handle them on a thread) passes its mask on
    // through exec; pods must die on SIGTERM as real containers do.
    // SAFETY: sets this thread's signal mask to empty, before any other thread exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Kubelet { nodes, kubeconfig, state_dir, netns } => {
            if let Some(ns) = &netns {
                // Before the runtime exists, so every thread it makes inherits the namespace.
                sandbox::enter_netns(ns)?;
            }
            if nodes == 0 || nodes > 200 {
                bail!("--nodes {nodes}: use 1..=200");
            }
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new("info,kube=warn").context("log filter")?)
                .with_ansi(false)
                .init();
            let cfg =
                sandbox::kubelet::Config { nodes: (1..=nodes).map(NodeSpec::new).collect(), kubeconfig, state_dir };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the tokio runtime")?
                .block_on(sandbox::kubelet::run(cfg))
        }
        Cmd::Relay { listen, netns, to } => sandbox::relay::run(listen, &netns, to),
        Cmd::Image { image: ImageCmd::Serve { name, tcp, udp, delay_shutdown } } => {
            images::serve(&name, &tcp, &udp, delay_shutdown)
        }
        Cmd::Image { image: ImageCmd::Idle } => images::idle(),
        Cmd::Udp { addr, msg, timeout_ms } => {
            println!("{}", images::udp_client(addr, &msg, Duration::from_millis(timeout_ms))?);
            Ok(())
        }
        Cmd::TcpHold { addr, path } => match images::tcp_hold(addr, &path) {
            Ok(body) => {
                println!("{}", body.trim());
                Ok(())
            }
            Err(e) => {
                // One line for the e2e report, not a backtrace.
                eprintln!("tcp-hold: {e:#}");
                std::process::exit(1);
            }
        },
    }
}
