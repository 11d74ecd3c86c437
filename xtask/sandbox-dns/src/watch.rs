//! Services and Endpoints from the API server, through kube-rs reflectors, turned
//! into [`Records`] snapshots.
//!
//! core/v1 Endpoints rather than EndpointSlices: the sandbox runs Kubernetes 1.20,
//! which serves slices only as discovery.k8s.io/v1beta1, while Endpoints are v1 on
//! every version (and carry the `hostname` that headless names need).

use std::{path::Path, sync::Arc};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, store::WriterDropped},
        watcher::{self, Event},
    },
};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::records::{Records, Zone};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot read kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot configure a Kubernetes client from $KUBECONFIG, ~/.kube/config or the in-cluster service account")]
    Infer(#[source] kube::Error),
    #[error("cannot build a Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("a reflector stopped before its initial list")]
    WriterDropped(#[source] WriterDropped),
    #[error("the {0} watch stream ended")]
    StreamEnded(&'static str),
}

/// A client from `kubeconfig`, or else `Client::try_default()`: `$KUBECONFIG` or
/// `~/.kube/config` if present, then the in-cluster service account with
/// KUBERNETES_SERVICE_HOST/PORT (which the sandbox points at the API server's real
/// address: there is no cluster DNS to resolve `kubernetes.default` before us).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, WatchError> {
    let Some(path) = kubeconfig else { return Client::try_default().await.map_err(WatchError::Infer) };
    let kc_err = |source| WatchError::Kubeconfig { path: path.display().to_string(), source };
    let kc = kube::config::Kubeconfig::read_from(path).map_err(kc_err)?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.map_err(kc_err)?;
    Client::try_from(config).map_err(WatchError::Client)
}

/// Watches Services and Endpoints in all namespaces and publishes a fresh
/// [`Records`] on `tx` after every change. Until both initial lists are in, `tx`
/// keeps its not-ready set (SERVFAIL). Runs until a watch stream ends, which the
/// backoff makes "never".
pub async fn run(client: Client, zone: Zone, tx: watch::Sender<Arc<Records>>) -> Result<(), WatchError> {
    let changed = Arc::new(Notify::new());

    let (services, writer) = reflector::store::<Service>();
    let service_stream = watcher::watcher(Api::<Service>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|s: &mut Service| slim(&mut s.metadata))
        .reflect(writer);
    let (endpoints, writer) = reflector::store::<Endpoints>();
    let endpoint_stream = watcher::watcher(Api::<Endpoints>::all(client), watcher::Config::default())
        .default_backoff()
        .modify(|e: &mut Endpoints| slim(&mut e.metadata))
        .reflect(writer);

    let publish = async {
        services.wait_until_ready().await.map_err(WatchError::WriterDropped)?;
        endpoints.wait_until_ready().await.map_err(WatchError::WriterDropped)?;
        let mut first = true;
        loop {
            let (records, warnings) = Records::from_kube(zone.clone(), &services.state(), &endpoints.state());
            for w in warnings {
                debug!("{w}");
            }
            if first {
                info!(services = records.service_count(), "initial lists synced; answering");
                first = false;
            }
            tx.send_replace(Arc::new(records));
            // Notify keeps one permit: a burst of events while we rebuilt costs one
            // more rebuild, not one per event.
            changed.notified().await;
        }
    };

    tokio::select! {
        () = drive("services", service_stream, &changed) => Err(WatchError::StreamEnded("services")),
        () = drive("endpoints", endpoint_stream, &changed) => Err(WatchError::StreamEnded("endpoints")),
        r = publish => r,
    }
}

/// Drops what the answers never read (managed fields, annotations such as
/// last-applied-configuration) to keep the stores small.
fn slim(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = None;
}

async fn drive<K, S>(resource: &'static str, stream: S, changed: &Notify)
where
    S: futures::Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init | Event::InitApply(_)) => {}
            Ok(Event::InitDone) => {
                debug!(resource, "list complete");
                changed.notify_one();
            }
            Ok(Event::Apply(_) | Event::Delete(_)) => changed.notify_one(),
            // The watcher re-lists after the backoff; the store keeps the last good
            // state meanwhile, and so do the answers.
            Err(e) => warn!(resource, error = %e, "watch failed; retrying"),
        }
    }
}
