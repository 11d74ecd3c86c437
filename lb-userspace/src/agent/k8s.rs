//! Where Services and EndpointSlices come from: a Kubernetes API server (kube-rs
//! reflectors) or a YAML file that is followed for changes.
//!
//! Both give a [`Source`]: a snapshot of all objects, a [`Notify`] that fires when the
//! snapshot changed, and a readiness wait for the initial list.
//!
//! Both also feed the network programming latency SLI: each EndpointSlice change that
//! the agent programs and that carries [`ANNOTATION_LAST_CHANGE_TRIGGER_TIME`] is handed
//! to [`Metrics::endpoints_changed`] once it is visible in the snapshot, as kube-proxy's
//! `EndpointChangeTracker` does.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    api::DynamicObject,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store, store::Writer},
        watcher::{self, Event},
    },
};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use super::{metrics::Metrics, model::Slice};

/// Set by the EndpointSlice controller to the time of the earliest Pod or Service
/// change that its write of the slice reflects
/// (`v1.EndpointsLastChangeTriggerTime`). kube-proxy reads it from every slice it
/// applies, and so does the agent, for `lb_network_programming_duration_seconds`.
pub const ANNOTATION_LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// A last-change-trigger-time annotation that is not an RFC 3339 time.
#[derive(Debug, thiserror::Error)]
#[error("{ANNOTATION_LAST_CHANGE_TRIGGER_TIME} {value:?} is not an RFC 3339 time")]
pub struct TriggerTimeError {
    pub value: String,
    #[source]
    pub source: jiff::Error,
}

/// The slice's last change trigger time; None when it has no such annotation. The
/// controller writes `time.RFC3339Nano`; any RFC 3339 time with an offset is taken,
/// as Go's `time.Parse(time.RFC3339Nano, ...)` does.
pub fn last_change_trigger_time(
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<Option<SystemTime>, TriggerTimeError> {
    let Some(value) = annotations.and_then(|a| a.get(ANNOTATION_LAST_CHANGE_TRIGGER_TIME)) else {
        return Ok(None);
    };
    match value.trim().parse::<jiff::Timestamp>() {
        Ok(t) => Ok(Some(SystemTime::from(t))),
        Err(source) => Err(TriggerTimeError { value: value.clone(), source }),
    }
}

/// What an EndpointSlice event means for the SLI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SliceChange {
    /// A slice of this Service (`namespace/name`) changed, triggered at this time.
    Changed { service: String, at: SystemTime },
    /// A slice of this Service was deleted.
    Deleted { service: String },
}

/// Whether applying `new` (replacing `prev`) is a change to observe, as kube-proxy's
/// `EndpointSliceUpdate` decides: the slice must belong to a Service and be one the
/// proxy reads (`supportedEndpointSliceAddressTypes`; here IPv4 only), it must differ
/// from what was applied before in what the proxy programs (`esInfoChanged`: an
/// update that only touches other fields, a resync or a re-list of an unchanged slice
/// is no change), and it must carry a trigger time. A malformed trigger time is
/// counted and skipped, never an error for the slice.
/// (<https://github.com/kubernetes/kubernetes/blob/v1.20.2/pkg/proxy/endpoints.go>,
/// `EndpointSliceUpdate` and `getLastChangeTriggerTime`; `esInfoChanged` is in
/// `pkg/proxy/endpointslicecache.go`.)
pub fn applied_change(
    prev: Option<&Slice>,
    new: &Slice,
    trigger: Result<Option<SystemTime>, TriggerTimeError>,
    metrics: &Metrics,
) -> Option<SliceChange> {
    let service = new.service.as_deref()?;
    if !new.address_type.feeds_ipv4() || prev == Some(new) {
        return None;
    }
    match trigger {
        Ok(Some(at)) => Some(SliceChange::Changed { service: format!("{}/{service}", new.namespace), at }),
        Ok(None) => None,
        Err(e) => {
            metrics.trigger_time_error();
            debug!(slice = %format!("{}/{}", new.namespace, new.name), error = %super::chain(&e), "ignored for lb_network_programming_duration_seconds");
            None
        }
    }
}

fn deleted_change(old: &Slice) -> Option<SliceChange> {
    old.service.as_deref().map(|service| SliceChange::Deleted { service: format!("{}/{service}", old.namespace) })
}

fn record(metrics: &Metrics, change: SliceChange) {
    match change {
        SliceChange::Changed { service, at } => metrics.endpoints_changed(&service, at),
        SliceChange::Deleted { service } => metrics.endpoints_deleted(&service),
    }
}

/// All watched objects at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
    /// EndpointSlices in the compact form the model reads.
    pub slices: Vec<Arc<Slice>>,
}

/// Which EndpointSlice API the server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceApi {
    /// `discovery.k8s.io/v1` (Kubernetes 1.21+), typed.
    V1,
    /// `discovery.k8s.io/v1beta1` (Kubernetes 1.20, what kube-proxy 1.20 watched),
    /// watched as `DynamicObject` and decoded into the v1 struct: the JSON is the same
    /// but for `topology`, which is ignored.
    V1beta1,
}

impl SliceApi {
    pub const fn api_version(self) -> &'static str {
        match self {
            SliceApi::V1 => "discovery.k8s.io/v1",
            SliceApi::V1beta1 => "discovery.k8s.io/v1beta1",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "cannot infer a Kubernetes client configuration (no in-cluster service account, no ~/.kube/config); pass --kubeconfig"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot build a Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("the API server serves neither discovery.k8s.io/v1 nor v1beta1 EndpointSlices")]
    NoSliceApi,
    #[error("a reflector stopped before its initial list")]
    WriterDropped(#[source] reflector::store::WriterDropped),
}

enum Inner {
    Kube {
        services: Store<Service>,
        slices: Store<Slice>,
    },
    File {
        state: Arc<Mutex<Snapshot>>,
        ready: Arc<tokio::sync::watch::Sender<bool>>,
        /// Why the latest read of the file was rejected (the state is the last good one).
        error: Arc<Mutex<Option<String>>>,
    },
}

/// A source of Services and EndpointSlices.
pub struct Source {
    /// Fires (a permit is stored) whenever the snapshot may have changed.
    pub changed: Arc<Notify>,
    pub description: String,
    inner: Inner,
    metrics: Arc<Metrics>,
}

impl Source {
    /// All objects now. The EndpointSlice changes recorded for the SLI so far are in
    /// it, so they are marked as being programmed: the next successful
    /// `Metrics::sync_done` observes them. (They are recorded only once visible here,
    /// and marked before the stores are read, so none is observed before the sync
    /// that programs it.)
    pub fn snapshot(&self) -> Snapshot {
        self.metrics.snapshot_taken();
        match &self.inner {
            Inner::Kube { services, slices } => Snapshot { services: services.state(), slices: slices.state() },
            Inner::File { state, .. } => state.lock().map(|s| s.clone()).unwrap_or_default(),
        }
    }

    /// Why the source's latest read was rejected as a whole, while it serves its last
    /// good snapshot (the file source after a YAML syntax error); None when it is fine.
    pub fn error(&self) -> Option<String> {
        match &self.inner {
            Inner::Kube { .. } => None,
            Inner::File { error, .. } => error.lock().ok().and_then(|e| e.clone()),
        }
    }

    /// Waits for the initial list of every watched resource.
    pub async fn wait_ready(&self) -> Result<(), SourceError> {
        match &self.inner {
            Inner::Kube { services, slices } => {
                services.wait_until_ready().await.map_err(SourceError::WriterDropped)?;
                slices.wait_until_ready().await.map_err(SourceError::WriterDropped)?;
            }
            Inner::File { ready, .. } => {
                let mut rx = ready.subscribe();
                let _ = rx.wait_for(|r| *r).await;
            }
        }
        Ok(())
    }
}

/// A client from `kubeconfig`, or inferred (in-cluster, then `$KUBECONFIG` and
/// `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, SourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|source| SourceError::Kubeconfig { path: path.into(), source })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| SourceError::Kubeconfig { path: path.into(), source })?
        }
        None => kube::Config::infer().await.map_err(SourceError::Infer)?,
    };
    Client::try_from(config).map_err(SourceError::Client)
}

/// Asks the server which EndpointSlice version it serves; retries while it cannot be
/// reached (the agent must come up before the API server is back).
pub async fn detect_slice_api(client: &Client) -> Result<SliceApi, SourceError> {
    let mut delay = Duration::from_millis(200);
    loop {
        let mut reached = false;
        for api in [SliceApi::V1, SliceApi::V1beta1] {
            match client.list_api_group_resources(api.api_version()).await {
                Ok(list) => {
                    reached = true;
                    if list.resources.iter().any(|r| r.name == "endpointslices") {
                        return Ok(api);
                    }
                }
                Err(kube::Error::Api(s)) if s.code == 404 => reached = true,
                Err(e) => debug!(error = %e, api = api.api_version(), "API discovery failed"),
            }
        }
        if reached {
            return Err(SourceError::NoSliceApi);
        }
        warn!(retry_in = ?delay, "API server unreachable; retrying discovery");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Watch retry delays: 200 ms doubling to 5 s, reset by the first success.
///
/// kube-rs's `default_backoff()` (client-go's reflector: 800 ms doubling to 30 s)
/// is kind to a struggling API server, but after a restart of the API server it can
/// leave the agent blind for tens of seconds. A node agent has one watch per resource,
/// so retrying sooner costs the server little and brings changes in sooner.
struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Duration::from_millis(200) }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        // Up to 25% jitter, so that many agents do not retry in lockstep.
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        Some(d + d.mul_f64(f64::from(nanos % 1000) / 4000.0))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Keeps only what the agent reads, so that 10,000 Services stay small in memory.
fn slim_meta(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    use super::model::{
        ANNOTATION_NO_ENDPOINTS, ANNOTATION_TOPOLOGY_AWARE_HINTS, ANNOTATION_TOPOLOGY_MODE, LABEL_HEADLESS,
        LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME,
    };
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    // The store is keyed by namespace and name; the watch tracks resource versions
    // itself.
    meta.uid = None;
    meta.resource_version = None;
    meta.creation_timestamp = None;
    meta.generation = None;
    meta.generate_name = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.retain(|k, _| {
            k == ANNOTATION_NO_ENDPOINTS || k == ANNOTATION_TOPOLOGY_AWARE_HINTS || k == ANNOTATION_TOPOLOGY_MODE
        });
    }
    if let Some(l) = meta.labels.as_mut() {
        l.retain(|k, _| k == LABEL_SERVICE_NAME || k == LABEL_HEADLESS || k == LABEL_SERVICE_PROXY_NAME);
    }
}

/// Keeps only the Service fields `model::compute` reads.
fn slim_service(s: &mut Service) {
    slim_meta(&mut s.metadata);
    s.status = None;
    if let Some(spec) = s.spec.take() {
        s.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: spec.cluster_ip,
            cluster_ips: spec.cluster_ips,
            type_: spec.type_,
            publish_not_ready_addresses: spec.publish_not_ready_addresses,
            session_affinity: spec.session_affinity,
            session_affinity_config: spec.session_affinity_config,
            // Node awareness (model::NodeInfo). A 1.20 API server has neither field.
            internal_traffic_policy: spec.internal_traffic_policy,
            traffic_distribution: spec.traffic_distribution,
            ports: spec.ports.map(|ports| {
                ports
                    .into_iter()
                    .map(|p| k8s_openapi::api::core::v1::ServicePort {
                        name: p.name,
                        port: p.port,
                        protocol: p.protocol,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        });
    }
}

/// `discovery.k8s.io/v1beta1` EndpointSlice, as Kubernetes 1.20 serves it, decoded
/// straight from the wire into v1's field types: v1beta1's JSON is v1's plus
/// `topology` (ignored by the decoder). 1.20 has no `hints` and no `zone`, and its
/// `nodeName` is behind the alpha EndpointSliceNodeName gate; later v1beta1 servers
/// (1.21–1.24) send `nodeName` and `hints` under v1's names, so they decode into v1's
/// fields and reach the model like v1's (`Slice::from_k8s`).
///
/// The recipe (../shared/recipes/README.md, beside this repository) watches v1beta1 as `DynamicObject` and
/// converts through `serde_json::Value`; decoding directly skips that second pass,
/// which for 10,000 slices is seconds of CPU and tens of MB of transient heap.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSliceV1beta1 {
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Option<Vec<k8s_openapi::api::discovery::v1::Endpoint>>,
    #[serde(default)]
    pub ports: Option<Vec<k8s_openapi::api::discovery::v1::EndpointPort>>,
}

impl EndpointSliceV1beta1 {
    pub fn into_v1(self) -> EndpointSlice {
        EndpointSlice {
            metadata: self.metadata,
            address_type: self.address_type,
            endpoints: self.endpoints,
            ports: self.ports,
        }
    }

    pub fn to_slice(&self) -> Slice {
        Slice::from_k8s(&self.metadata, &self.address_type, self.ports.as_deref(), self.endpoints.as_deref())
    }
}

impl kube::Resource for EndpointSliceV1beta1 {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;
    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "EndpointSlice".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "discovery.k8s.io".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1beta1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "endpointslices".into()
    }
    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.metadata
    }
}

/// Decodes a v1beta1 EndpointSlice held as a `DynamicObject` (as the recipe watches
/// it) into the v1 struct.
pub fn slice_from_v1beta1(obj: DynamicObject) -> Result<EndpointSlice, serde_json::Error> {
    let mut v = serde_json::to_value(obj)?;
    v["apiVersion"] = serde_json::Value::String("discovery.k8s.io/v1".into());
    v["kind"] = serde_json::Value::String("EndpointSlice".into());
    serde_json::from_value(v)
}

/// Drives a reflector stream: counts relists and errors, and signals changes.
async fn drive<K, S>(resource: &'static str, stream: S, changed: Arc<Notify>, metrics: Arc<Metrics>)
where
    S: futures::Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut lists = 0u64;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => {
                lists += 1;
                if lists > 1 {
                    // A re-list: after "410 Gone" or a lost watch. The store swaps in
                    // the new list atomically at InitDone, so nothing is flushed.
                    metrics.watch_restart(resource);
                    info!(resource, "re-listing");
                }
            }
            Ok(Event::InitApply(_)) => {}
            Ok(Event::InitDone) => {
                debug!(resource, "list complete");
                changed.notify_one();
            }
            Ok(Event::Apply(_) | Event::Delete(_)) => changed.notify_one(),
            Err(e) => {
                metrics.watch_error(resource);
                warn!(resource, error = %e, "watch failed; backing off and resuming (maps keep the last good state)");
            }
        }
    }
}

/// Watches Services and EndpointSlices with reflectors.
pub async fn kubernetes(client: Client, metrics: Arc<Metrics>) -> Result<Source, SourceError> {
    let api = detect_slice_api(&client).await?;
    info!(api = api.api_version(), "watching EndpointSlices");
    let changed = Arc::new(Notify::new());

    let (services, writer) = reflector::store::<Service>();
    let stream = watcher(Api::<Service>::all(client.clone()))
        .backoff(WatchBackoff::default())
        .modify(slim_service)
        .reflect(writer);
    tokio::spawn(drive("services", stream, changed.clone(), metrics.clone()));

    // Slices are stored in the model's compact form, converted as each event arrives
    // (the full struct is dropped right away): `reflector()` needs only `Lookup`,
    // which `Slice` implements.
    let (slices, writer) = reflector::store::<Slice>();
    match api {
        SliceApi::V1 => {
            let stream = watcher(Api::<EndpointSlice>::all(client.clone())).backoff(WatchBackoff::default());
            let stream =
                slice_events(stream, slices.clone(), writer, metrics.clone(), |s| Slice::from(s), |s| &s.metadata);
            tokio::spawn(drive("endpointslices", stream, changed.clone(), metrics.clone()));
        }
        SliceApi::V1beta1 => {
            let stream = watcher(Api::<EndpointSliceV1beta1>::all(client.clone())).backoff(WatchBackoff::default());
            let stream =
                slice_events(stream, slices.clone(), writer, metrics.clone(), EndpointSliceV1beta1::to_slice, |s| {
                    &s.metadata
                });
            tokio::spawn(drive("endpointslices", stream, changed.clone(), metrics.clone()));
        }
    }
    Ok(Source {
        changed,
        description: format!("kubernetes (EndpointSlice {})", api.api_version()),
        inner: Inner::Kube { services, slices },
        metrics,
    })
}

/// EndpointSlice events, compacted into [`Slice`]s and applied to the store, with the
/// SLI's changes recorded once the store shows them.
///
/// A change is decided before the store is written (the previous version is still
/// there to compare with) and recorded after: an `Apply` or `Delete` right after its
/// write, the `InitApply`s of a (re-)list at its `InitDone`, when the store swaps the
/// new list in. So a change is never recorded before a snapshot can see it.
fn slice_events<K, S>(
    stream: S,
    store: Store<Slice>,
    writer: Writer<Slice>,
    metrics: Arc<Metrics>,
    compact: fn(&K) -> Slice,
    meta: fn(&K) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> impl futures::Stream<Item = Result<Event<Slice>, watcher::Error>>
where
    S: futures::Stream<Item = Result<Event<K>, watcher::Error>>,
{
    // Holds the change of the event between the two closures: the stream runs one
    // event through both before taking the next.
    let staged: Arc<Mutex<Option<SliceChange>>> = Arc::default();
    let (decide_staged, decide_metrics) = (staged.clone(), metrics.clone());
    let decided = stream.map_ok(move |ev| {
        let applied = |o: &K| {
            let s = compact(o);
            let prev = store.get(&ObjectRef::new(&s.name).within(&s.namespace));
            let change = applied_change(
                prev.as_deref(),
                &s,
                last_change_trigger_time(meta(o).annotations.as_ref()),
                &decide_metrics,
            );
            (s, change)
        };
        let (ev, change) = match ev {
            Event::Apply(o) => {
                let (s, c) = applied(&o);
                (Event::Apply(s), c)
            }
            Event::InitApply(o) => {
                let (s, c) = applied(&o);
                (Event::InitApply(s), c)
            }
            Event::Delete(o) => {
                let s = compact(&o);
                let c = deleted_change(&s);
                (Event::Delete(s), c)
            }
            Event::Init => (Event::Init, None),
            Event::InitDone => (Event::InitDone, None),
        };
        if let Ok(mut slot) = decide_staged.lock() {
            *slot = change;
        }
        ev
    });
    let mut listed: Vec<SliceChange> = Vec::new();
    reflector::reflector(writer, decided).inspect_ok(move |ev| {
        let change = staged.lock().ok().and_then(|mut slot| slot.take());
        match ev {
            Event::Apply(_) | Event::Delete(_) => {
                if let Some(c) = change {
                    record(&metrics, c);
                }
            }
            Event::Init => listed.clear(),
            Event::InitApply(_) => listed.extend(change),
            Event::InitDone => {
                for c in listed.drain(..) {
                    record(&metrics, c);
                }
            }
        }
    })
}

fn watcher<K>(api: Api<K>) -> impl futures::Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default())
}

/// Objects parsed from a multi-document YAML file, and the problems met.
#[derive(Debug, Default)]
pub struct Parsed {
    pub snapshot: Snapshot,
    pub errors: Vec<String>,
    /// The last change trigger time of each of `snapshot.slices`, in the same order.
    pub trigger_times: Vec<Result<Option<SystemTime>, TriggerTimeError>>,
}

/// A file that is not valid YAML as a whole: none of it is used.
#[derive(Debug, thiserror::Error)]
#[error("document {document} is not valid YAML")]
pub struct YamlError {
    /// 1-based, counting `---` separators.
    pub document: usize,
    #[source]
    pub source: serde_norway::Error,
}

/// Parses Services and EndpointSlices (v1 or v1beta1; also inside `kind: List`) from
/// multi-document YAML. A document that is valid YAML but not a valid object is
/// reported in [`Parsed::errors`] and skipped; a YAML syntax error anywhere rejects the
/// whole file.
///
/// Why all or nothing: a syntax error ends the YAML stream, so the documents after it
/// are unknown, not absent. Programming only the part before it would delete every
/// later Service and cut its flows because of a typo (a file being written, a bad
/// merge); keeping the last good state is what the API source does when it cannot
/// list.
pub fn parse_yaml(text: &str) -> Result<Parsed, YamlError> {
    use serde::Deserialize as _;
    let mut out = Parsed::default();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = match serde_norway::Value::deserialize(doc) {
            Ok(serde_norway::Value::Null) => continue,
            Ok(v) => v,
            Err(source) => return Err(YamlError { document: i + 1, source }),
        };
        let json = match serde_json::to_value(&value) {
            Ok(j) => j,
            Err(e) => {
                out.errors.push(format!("document {}: {e}", i + 1));
                continue;
            }
        };
        add_object(json, &format!("document {}", i + 1), &mut out);
    }
    Ok(out)
}

fn add_object(mut json: serde_json::Value, at: &str, out: &mut Parsed) {
    let kind = json["kind"].as_str().unwrap_or_default().to_string();
    let api_version = json["apiVersion"].as_str().unwrap_or_default().to_string();
    match (kind.as_str(), api_version.as_str()) {
        ("List" | "ServiceList" | "EndpointSliceList", _) => {
            let items = json["items"].as_array().cloned().unwrap_or_default();
            for (j, mut item) in items.into_iter().enumerate() {
                // Typed lists may leave kind/apiVersion off their items.
                if item.get("kind").is_none() && kind != "List" {
                    item["kind"] = kind.trim_end_matches("List").into();
                    item["apiVersion"] = api_version.clone().into();
                }
                add_object(item, &format!("{at} item {}", j + 1), out);
            }
        }
        ("Service", "v1") => match serde_json::from_value::<Service>(json) {
            Ok(s) => out.snapshot.services.push(Arc::new(s)),
            Err(e) => out.errors.push(format!("{at}: Service: {e}")),
        },
        ("EndpointSlice", "discovery.k8s.io/v1" | "discovery.k8s.io/v1beta1") => {
            json["apiVersion"] = "discovery.k8s.io/v1".into();
            match serde_json::from_value::<EndpointSlice>(json) {
                Ok(s) => {
                    out.snapshot.slices.push(Arc::new(Slice::from(&s)));
                    out.trigger_times.push(last_change_trigger_time(s.metadata.annotations.as_ref()));
                }
                Err(e) => out.errors.push(format!("{at}: EndpointSlice: {e}")),
            }
        }
        _ => debug!(%kind, %api_version, "{at}: not a Service or EndpointSlice; ignored"),
    }
}

/// Follows a YAML file: re-read whenever its inode, size or mtime changes (checked
/// every `poll`). Editors that write a new file and rename it are handled too. A file
/// that is missing, unreadable or not valid YAML ([`parse_yaml`]) keeps the last good
/// state; a file that is not valid YAML at start keeps the source not ready (so the
/// pinned maps of a previous agent are not emptied) until it is fixed.
pub fn file(path: PathBuf, poll: Duration, metrics: Arc<Metrics>) -> Source {
    let changed = Arc::new(Notify::new());
    let state = Arc::new(Mutex::new(Snapshot::default()));
    let error: Arc<Mutex<Option<String>>> = Arc::default();
    let (ready, _) = tokio::sync::watch::channel(false);
    let ready = Arc::new(ready);
    let description = format!("file {}", path.display());
    let metrics_for_source = metrics.clone();
    let (c, s, r, err) = (changed.clone(), state.clone(), ready.clone(), error.clone());
    tokio::spawn(async move {
        let mut last: Option<(u64, u64, SystemTime)> = None;
        let mut warned_missing = false;
        loop {
            let stamp = tokio::fs::metadata(&path).await.map(|m| {
                use std::os::unix::fs::MetadataExt as _;
                (m.ino(), m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH))
            });
            match stamp {
                Ok(stamp) if Some(stamp) != last => {
                    warned_missing = false;
                    match tokio::fs::read_to_string(&path).await {
                        Ok(text) => {
                            last = Some(stamp);
                            let parsed = match parse_yaml(&text) {
                                Ok(p) => p,
                                Err(e) => {
                                    let e = super::chain(&e);
                                    metrics.source_error();
                                    error!(file = %path.display(), error = %e, "not valid YAML; keeping the last good state");
                                    if let Ok(mut slot) = err.lock() {
                                        *slot = Some(e);
                                    }
                                    // A sync with the unchanged state publishes the error in
                                    // the status; before the first good read, nothing runs.
                                    if *r.borrow() {
                                        c.notify_one();
                                    }
                                    tokio::time::sleep(poll).await;
                                    continue;
                                }
                            };
                            metrics.set_source_ok();
                            if let Ok(mut slot) = err.lock() {
                                *slot = None;
                            }
                            let Parsed { snapshot, errors, trigger_times } = parsed;
                            for e in &errors {
                                metrics.decode_error("file");
                                warn!(file = %path.display(), "{e}");
                            }
                            info!(
                                file = %path.display(),
                                services = snapshot.services.len(),
                                slices = snapshot.slices.len(),
                                "read"
                            );
                            let new_slices = snapshot.slices.clone();
                            let old = s.lock().map(|mut st| std::mem::replace(&mut *st, snapshot)).unwrap_or_default();
                            // After the state is replaced: a snapshot taken from now on
                            // has these changes.
                            for c in file_changes(&old.slices, &new_slices, trigger_times, &metrics) {
                                record(&metrics, c);
                            }
                            r.send_replace(true);
                            c.notify_one();
                        }
                        Err(e) => warn!(file = %path.display(), error = %e, "cannot read; keeping the last state"),
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if !warned_missing {
                        warn!(file = %path.display(), error = %e, "cannot stat; keeping the last state");
                        warned_missing = true;
                    }
                    // A file that is not there at start means "nothing yet": ready.
                    if !*r.borrow() {
                        r.send_replace(true);
                        c.notify_one();
                    }
                }
            }
            tokio::time::sleep(poll).await;
        }
    });
    Source { changed, description, inner: Inner::File { state, ready, error }, metrics: metrics_for_source }
}

/// The SLI's changes between two reads of the file: each slice compared with the one
/// of the same namespace and name in the previous read, as the watch path compares
/// with its store.
fn file_changes(
    old: &[Arc<Slice>],
    new: &[Arc<Slice>],
    trigger_times: Vec<Result<Option<SystemTime>, TriggerTimeError>>,
    metrics: &Metrics,
) -> Vec<SliceChange> {
    let key = |s: &Slice| (s.namespace.clone(), s.name.clone());
    let before: HashMap<_, &Slice> = old.iter().map(|s| (key(s), s.as_ref())).collect();
    let mut out = Vec::new();
    let mut now = std::collections::HashSet::new();
    for (s, t) in new.iter().zip(trigger_times) {
        now.insert(key(s));
        out.extend(applied_change(before.get(&key(s)).copied(), s, t, metrics));
    }
    for s in old {
        if !now.contains(&key(s)) {
            out.extend(deleted_change(s));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::model::AddressType;
    use super::*;

    #[test]
    fn yaml_with_services_slices_lists_and_junk() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.2]
  conditions: {ready: true}
  topology: {kubernetes.io/hostname: node-1}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: dns, namespace: kube-system}
  spec: {clusterIP: 10.96.0.53, ports: [{port: 53, protocol: UDP}]}
---
apiVersion: v1
kind: Service
metadata: {name: broken}
spec: {ports: "not a list"}
"#;
        let p = parse_yaml(text).unwrap();
        assert_eq!(p.snapshot.services.len(), 2, "{:?}", p.errors);
        assert_eq!(p.snapshot.slices.len(), 1);
        assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
        let c = super::super::model::compute(
            p.snapshot.services.iter().map(|s| s.as_ref()),
            p.snapshot.slices.iter().map(|s| s.as_ref()),
        );
        assert_eq!(c.desired.frontends.len(), 2);
        assert_eq!(c.desired.endpoint_count(), 1);
    }

    #[test]
    fn slim_service_keeps_what_node_awareness_reads() {
        let mut s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default", "annotations": {
                "service.kubernetes.io/topology-aware-hints": "auto",
                "service.kubernetes.io/topology-mode": "Auto",
                "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local",
                     "trafficDistribution": "PreferClose", "ports": [{"port": 80}]},
        }))
        .unwrap();
        slim_service(&mut s);
        let spec = s.spec.as_ref().unwrap();
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.traffic_distribution.as_deref(), Some("PreferClose"));
        let a = s.metadata.annotations.as_ref().unwrap();
        assert_eq!(a.len(), 2, "{a:?}");
    }

    #[test]
    fn yaml_syntax_error_rejects_the_whole_file() {
        let e = parse_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: [\n").unwrap_err();
        assert_eq!(e.document, 1);
        // Half-way: the good documents before the error are not used either.
        let good =
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        let text = format!("{good}---\n{good}---\nkind: [oops\n---\n{good}");
        let e = parse_yaml(&text).unwrap_err();
        assert_eq!(e.document, 3, "{e}");
        assert!(super::super::chain(&e).starts_with("document 3 is not valid YAML: "), "{}", super::super::chain(&e));
        // A valid YAML document that is a bad object is still only skipped.
        let p = parse_yaml(&format!("{good}---\napiVersion: v1\nkind: Service\nspec: 7\n")).unwrap();
        assert_eq!((p.snapshot.services.len(), p.errors.len()), (1, 1), "{:?}", p.errors);
    }

    /// The file source end to end (no datapath): good file, a syntax error half-way
    /// (state kept, error reported), fixed file (new state).
    #[tokio::test]
    async fn file_source_keeps_the_last_good_state_on_a_syntax_error() {
        let dir = std::env::temp_dir().join(format!("lb-k8s-file-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("objects.yaml");
        let svc = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
            )
        };
        let write = |text: &str| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        let names = |src: &Source| {
            let mut v: Vec<String> = src.snapshot().services.iter().filter_map(|s| s.metadata.name.clone()).collect();
            v.sort();
            v
        };
        async fn until(what: &str, mut f: impl FnMut() -> bool) {
            let t0 = std::time::Instant::now();
            while !f() {
                assert!(t0.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let metrics = Arc::new(Metrics::default());
        write(&format!("{}---\n{}", svc("a", "10.96.0.1"), svc("b", "10.96.0.2")));
        let src = file(path.clone(), Duration::from_millis(10), metrics.clone());
        src.wait_ready().await.unwrap();
        assert_eq!(names(&src), ["a", "b"]);
        assert_eq!(src.error(), None);

        write(&format!("{}---\nkind: [oops\n---\n{}", svc("a", "10.96.0.1"), svc("c", "10.96.0.3")));
        until("the error", || src.error().is_some()).await;
        assert_eq!(names(&src), ["a", "b"], "the last good state is kept");
        assert!(src.error().unwrap().contains("document 2 is not valid YAML"), "{:?}", src.error());
        assert!(metrics.render().lines().any(|l| l == "lb_source_error 1"));

        write(&format!("{}---\n{}", svc("a", "10.96.0.1"), svc("c", "10.96.0.3")));
        until("the fixed file", || names(&src) == ["a", "c"]).await;
        assert_eq!(src.error(), None);
        let m = metrics.render();
        assert!(
            m.lines().any(|l| l == "lb_source_error 0") && m.lines().any(|l| l == "lb_source_errors_total 1"),
            "{m}"
        );

        // A slice with a trigger time: recorded once read, taken by the snapshot,
        // observed by the sync.
        let trigger = jiff::Timestamp::now().to_string();
        let slice = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: a-1, namespace: default, labels: {{kubernetes.io/service-name: a}}, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{trigger}'}}}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints: [{{addresses: [10.244.0.2]}}]\n"
        );
        write(&format!("{}---\n{slice}", svc("a", "10.96.0.1")));
        until("the slice", || metrics.pending_triggers() == 1).await;
        assert_eq!(src.snapshot().slices.len(), 1);
        assert_eq!(metrics.pending_triggers(), 0);
        metrics.sync_done(Duration::from_millis(1), true, 1, 1, 1);
        assert!(metrics.render().lines().any(|l| l == "lb_network_programming_duration_seconds_count 1"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn trigger_annotation(v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(ANNOTATION_LAST_CHANGE_TRIGGER_TIME.to_string(), v.to_string())])
    }

    #[test]
    fn trigger_time_parses_rfc3339_and_rejects_junk() {
        let t = |v: &str| last_change_trigger_time(Some(&trigger_annotation(v)));
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
        // As the controller writes it (time.RFC3339Nano), with and without fraction.
        assert_eq!(t("2020-09-13T12:26:40Z").unwrap(), Some(base));
        assert_eq!(t("2020-09-13T12:26:40.5Z").unwrap(), Some(base + Duration::from_millis(500)));
        assert_eq!(t("2020-09-13T12:26:40.000000123Z").unwrap(), Some(base + Duration::from_nanos(123)));
        assert_eq!(t("2020-09-13T14:26:40+02:00").unwrap(), Some(base));
        assert_eq!(last_change_trigger_time(None).unwrap(), None);
        assert_eq!(last_change_trigger_time(Some(&BTreeMap::new())).unwrap(), None);
        for junk in ["", "yesterday", "2020-09-13", "2020-09-13T12:26:40", "2020-13-45T99:99:99Z", "\u{0}"] {
            let e = t(junk).unwrap_err();
            assert!(e.to_string().contains("is not an RFC 3339 time"), "{e}");
        }
    }

    fn slice(ns: &str, name: &str, service: Option<&str>, ip: &str) -> Slice {
        let v: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns,
                         "labels": service.map(|s| serde_json::json!({"kubernetes.io/service-name": s}))},
            "addressType": "IPv4", "ports": [{"port": 80}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        }))
        .unwrap();
        Slice::from(&v)
    }

    #[test]
    fn applied_change_is_kube_proxys_change_needed() {
        let m = Metrics::default();
        let t = SystemTime::now();
        let a = slice("default", "web-1", Some("web"), "10.0.0.1");
        let changed = Some(SliceChange::Changed { service: "default/web".into(), at: t });
        // New, or different in what is programmed: a change.
        assert_eq!(applied_change(None, &a, Ok(Some(t)), &m), changed);
        let b = slice("default", "web-1", Some("web"), "10.0.0.2");
        assert_eq!(applied_change(Some(&a), &b, Ok(Some(t)), &m), changed);
        // The same endpoints (a resync, a re-list, a label-only update): none.
        assert_eq!(applied_change(Some(&a), &a.clone(), Ok(Some(t)), &m), None);
        // No annotation, no service, not IPv4: none.
        assert_eq!(applied_change(None, &a, Ok(None), &m), None);
        assert_eq!(applied_change(None, &slice("default", "x", None, "10.0.0.1"), Ok(Some(t)), &m), None);
        let mut v6 = a.clone();
        v6.address_type = AddressType::IPv6;
        assert_eq!(applied_change(None, &v6, Ok(Some(t)), &m), None);
        // Malformed: counted, skipped.
        let bad = last_change_trigger_time(Some(&trigger_annotation("nope")));
        assert_eq!(applied_change(None, &a, bad, &m), None);
        assert!(m.render().lines().any(|l| l == "lb_trigger_time_errors_total 1"), "{}", m.render());
        assert_eq!(deleted_change(&a), Some(SliceChange::Deleted { service: "default/web".into() }));
    }

    #[test]
    fn file_changes_compare_with_the_previous_read() {
        let m = Metrics::default();
        let t = SystemTime::now();
        let a = Arc::new(slice("default", "web-1", Some("web"), "10.0.0.1"));
        let b = Arc::new(slice("default", "db-1", Some("db"), "10.0.0.9"));
        let a2 = Arc::new(slice("default", "web-1", Some("web"), "10.0.0.2"));
        let c = file_changes(&[], &[a.clone(), b.clone()], vec![Ok(Some(t)), Ok(None)], &m);
        assert_eq!(c, [SliceChange::Changed { service: "default/web".into(), at: t }]);
        // b unchanged, a changed, then a gone.
        let c = file_changes(&[a.clone(), b.clone()], &[a2.clone(), b.clone()], vec![Ok(Some(t)), Ok(Some(t))], &m);
        assert_eq!(c, [SliceChange::Changed { service: "default/web".into(), at: t }]);
        let c = file_changes(&[a2, b.clone()], &[b], vec![Ok(Some(t))], &m);
        assert_eq!(c, [SliceChange::Deleted { service: "default/web".into() }]);
    }

    fn v1_slice(name: &str, ip: &str, trigger: Option<SystemTime>) -> EndpointSlice {
        let mut s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"port": 80}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        }))
        .unwrap();
        if let Some(t) = trigger {
            let t = jiff::Timestamp::try_from(t).unwrap().to_string();
            s.metadata.annotations = Some(trigger_annotation(&t));
        }
        s
    }

    /// The watch path: changes are recorded once the store has them (a list's at its
    /// end), compared with what the store had before.
    #[tokio::test]
    async fn watch_events_record_changes_once_the_store_has_them() {
        let m = Arc::new(Metrics::new(SystemTime::now() - Duration::from_secs(60)));
        let (store, writer) = reflector::store::<Slice>();
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Event<EndpointSlice>, watcher::Error>>();
        let stream = slice_events(rx, store.clone(), writer, m.clone(), |s| Slice::from(s), |s| &s.metadata);
        let mut stream = std::pin::pin!(stream);
        let t = SystemTime::now() - Duration::from_secs(2);
        let send = |ev| tx.unbounded_send(Ok(ev)).unwrap();

        send(Event::Init);
        send(Event::InitApply(v1_slice("web-1", "10.0.0.1", Some(t))));
        // Before the start: ignored, as kube-proxy's trackerStartTime.
        send(Event::InitApply(v1_slice("web-2", "10.0.0.2", Some(SystemTime::now() - Duration::from_secs(3600)))));
        stream.next().await.unwrap().unwrap();
        stream.next().await.unwrap().unwrap();
        stream.next().await.unwrap().unwrap();
        assert_eq!(m.pending_triggers(), 0, "not before the store swaps the list in");
        send(Event::InitDone);
        stream.next().await.unwrap().unwrap();
        assert_eq!(m.pending_triggers(), 1);
        assert_eq!(store.state().len(), 2);

        // The same slice again (a resync, a re-list): no change. A new endpoint: one.
        send(Event::Apply(v1_slice("web-1", "10.0.0.1", Some(t))));
        stream.next().await.unwrap().unwrap();
        assert_eq!(m.pending_triggers(), 1);
        send(Event::Apply(v1_slice("web-1", "10.0.0.3", Some(t + Duration::from_secs(1)))));
        stream.next().await.unwrap().unwrap();
        assert_eq!(m.pending_triggers(), 2);

        // A sync programs both; a failed one would have kept them.
        m.snapshot_taken();
        m.sync_done(Duration::from_millis(1), true, 1, 1, 1);
        assert!(m.render().lines().any(|l| l == "lb_network_programming_duration_seconds_count 2"), "{}", m.render());

        // Deleting a slice drops its Service's pending changes.
        send(Event::Apply(v1_slice("web-2", "10.0.0.4", Some(t + Duration::from_secs(2)))));
        stream.next().await.unwrap().unwrap();
        assert_eq!(m.pending_triggers(), 1);
        send(Event::Delete(v1_slice("web-2", "10.0.0.4", Some(t + Duration::from_secs(2)))));
        stream.next().await.unwrap().unwrap();
        assert_eq!(m.pending_triggers(), 0);
    }

    #[test]
    fn dynamic_v1beta1_object_decodes() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "a", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "", "port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "topology": {"x": "y"}}],
        }))
        .unwrap();
        let s = slice_from_v1beta1(obj).unwrap();
        assert_eq!(s.endpoints.unwrap()[0].addresses, ["10.0.0.1"]);
    }

    #[test]
    fn typed_v1beta1_slice_decodes_from_the_wire() {
        // As a 1.20 API server sends it.
        let wire = r#"{"apiVersion":"discovery.k8s.io/v1beta1","kind":"EndpointSlice",
            "metadata":{"name":"web-abc","namespace":"default","labels":{"kubernetes.io/service-name":"web"},
                        "ownerReferences":[{"apiVersion":"v1","kind":"Service","name":"web","uid":"u"}]},
            "addressType":"IPv4","ports":[{"name":"http","protocol":"TCP","port":8080}],
            "endpoints":[{"addresses":["10.244.0.2"],"conditions":{"ready":true},
                          "topology":{"kubernetes.io/hostname":"node-1"},"targetRef":{"kind":"Pod","name":"web-1"}}]}"#;
        let s: EndpointSliceV1beta1 = serde_json::from_str(wire).unwrap();
        use super::super::model::{AddressType, Conditions, EndpointAddress, Protocol, SliceEndpoint, SlicePort};
        let compact = s.to_slice();
        assert_eq!(compact, Slice::from(&s.into_v1()));
        assert_eq!(
            compact,
            Slice {
                namespace: "default".into(),
                name: "web-abc".into(),
                service: Some("web".into()),
                headless_label: false,
                address_type: AddressType::IPv4,
                ports: vec![SlicePort { name: "http".into(), port: Some(8080), protocol: Ok(Protocol::Tcp) }].into(),
                endpoints: vec![SliceEndpoint {
                    address: EndpointAddress::V4("10.244.0.2".parse().unwrap()),
                    cond: Conditions { ready: true, serving: true, terminating: false },
                    node_name: None,
                    zone_hints: Box::default(),
                }]
                .into(),
            }
        );
    }
}
