//! `/healthz`, `/readyz` and `/metrics` over HTTP/1 (hyper), for the kubelet's
//! probes and for people.

use std::{convert::Infallible, io, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, warn};

use crate::{records::Records, server::Stats};

/// Probes are one request each; a connection that lingers longer than this is cut.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The response to one request: pure, so it is tested without sockets.
pub fn route(method: &Method, path: &str, records: &Records, stats: &Stats) -> (StatusCode, String) {
    if method != Method::GET && method != Method::HEAD {
        return (StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match path {
        // Alive as long as this process answers: a restart would not make the API
        // server list faster.
        "/healthz" => (StatusCode::OK, "ok\n".into()),
        "/readyz" if records.is_ready() => (StatusCode::OK, format!("ready: {} services\n", records.service_count())),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first list of Services and Endpoints\n".into(),
        ),
        "/metrics" => (StatusCode::OK, stats.render()),
        _ => (StatusCode::NOT_FOUND, "not found; try /healthz, /readyz or /metrics\n".into()),
    }
}

pub async fn serve(listener: TcpListener, records: watch::Receiver<Arc<Records>>, stats: Arc<Stats>) -> io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "health accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (records, stats) = (records.clone(), stats.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let snapshot = records.borrow().clone();
                let (status, body) = route(req.method(), req.uri().path(), &snapshot, &stats);
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                resp.headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "health connection failed"),
                Err(_) => debug!(%peer, "health connection timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Zone;

    #[test]
    fn readyz_follows_records_readiness() {
        let zone = Zone::new("cluster.local", 5).unwrap();
        let stats = Stats::default();
        let not_ready = Records::not_ready(zone.clone());
        let ready = Records::new(zone);
        assert_eq!(route(&Method::GET, "/healthz", &not_ready, &stats).0, StatusCode::OK);
        assert_eq!(route(&Method::GET, "/readyz", &not_ready, &stats).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(route(&Method::GET, "/readyz", &ready, &stats).0, StatusCode::OK);
        assert_eq!(route(&Method::GET, "/nope", &ready, &stats).0, StatusCode::NOT_FOUND);
        assert_eq!(route(&Method::POST, "/readyz", &ready, &stats).0, StatusCode::METHOD_NOT_ALLOWED);
        let (status, body) = route(&Method::GET, "/metrics", &ready, &stats);
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("lb_dns_malformed_total 0"), "{body}");
    }
}
