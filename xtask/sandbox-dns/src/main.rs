//! `lb-sandbox-dns`: the sandbox cluster's DNS server. See the library docs.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, ValueEnum};
use lb_sandbox_dns::{
    health,
    records::{Records, Zone},
    server::{self, Stats, TcpLimits},
    watch,
};
use tokio::net::TcpListener;
use tracing::info;

#[derive(Parser, Debug)]
#[command(
    name = "lb-sandbox-dns",
    version,
    about = "Cluster DNS for the lb sandbox: Services and Endpoints as DNS names"
)]
struct Cli {
    /// Address to serve DNS on, over both UDP and TCP.
    #[arg(long, env = "LB_DNS_LISTEN", default_value = "0.0.0.0:53")]
    listen: SocketAddr,
    /// Address of the HTTP server with /healthz (always 200), /readyz (200 once the
    /// Services and Endpoints are listed, else 503) and /metrics.
    #[arg(long, env = "LB_DNS_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    health_addr: SocketAddr,
    /// The cluster domain (the kubelet's --cluster-domain).
    #[arg(long, env = "LB_DNS_DOMAIN", default_value = "cluster.local")]
    domain: String,
    /// TTL of every answer, and of cached misses (the SOA minimum), in seconds.
    #[arg(long, env = "LB_DNS_TTL", default_value_t = 5)]
    ttl: u32,
    /// Kubeconfig to reach the API server with. Default: $KUBECONFIG or
    /// ~/.kube/config if present, else the in-cluster service account.
    #[arg(long, env = "LB_DNS_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// TCP connections served at once; further ones are closed on accept.
    #[arg(long, env = "LB_DNS_TCP_MAX_CONNECTIONS", default_value_t = 128)]
    tcp_max_connections: usize,
    /// Seconds a TCP connection may sit idle between queries, or take to send one
    /// or to read its answer, before it is closed.
    #[arg(long, env = "LB_DNS_TCP_IDLE_TIMEOUT", default_value_t = 10)]
    tcp_idle_timeout: u64,
    /// Log filter, in tracing's EnvFilter syntax (`debug` shows dropped packets).
    #[arg(long, env = "LB_DNS_LOG", default_value = "info")]
    log: String,
    /// Log format.
    #[arg(long, env = "LB_DNS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logs(&cli.log, cli.log_format)?;
    let zone = Zone::new(&cli.domain, cli.ttl).context("bad --domain; try --domain cluster.local")?;
    anyhow::ensure!(cli.tcp_max_connections > 0, "--tcp-max-connections must be at least 1; try 128");

    let client = watch::client(cli.kubeconfig.as_deref())
        .await
        .context("cannot reach Kubernetes; try --kubeconfig /etc/kubernetes/admin.conf, or run in a pod")?;
    let (udp, tcp) = server::bind(cli.listen).await.with_context(|| {
        format!(
            "cannot listen on {} (UDP and TCP); port 53 needs root or CAP_NET_BIND_SERVICE, \
             try --listen 127.0.0.1:5353",
            cli.listen
        )
    })?;
    let health_listener = TcpListener::bind(cli.health_addr)
        .await
        .with_context(|| format!("cannot listen on --health-addr {}; try another port", cli.health_addr))?;
    info!(listen = %cli.listen, health = %cli.health_addr, domain = %zone.apex(), ttl = cli.ttl, "serving DNS");

    // Answers read the newest snapshot; SERVFAIL until the reflectors have synced.
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(Records::not_ready(zone.clone())));
    let stats = Arc::new(Stats::default());
    let limits = TcpLimits {
        max_connections: cli.tcp_max_connections,
        idle_timeout: Duration::from_secs(cli.tcp_idle_timeout.max(1)),
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        r = server::serve(udp, tcp, rx.clone(), stats.clone(), limits) => r.context("the DNS server stopped"),
        r = health::serve(health_listener, rx, stats) => r.context("the health server stopped"),
        r = watch::run(client, zone, tx) => r.context(
            "watching Services and Endpoints stopped; check the API server and RBAC (list/watch services, endpoints)",
        ),
        _ = term.recv() => { info!("SIGTERM; exiting"); Ok(()) }
        r = tokio::signal::ctrl_c() => { r.context("waiting for Ctrl-C")?; info!("interrupted; exiting"); Ok(()) }
    }
}

fn init_logs(filter: &str, format: LogFormat) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("bad --log filter {filter:?}; try `info` or `lb_sandbox_dns=debug`"))?;
    use std::io::IsTerminal as _;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
    Ok(())
}
