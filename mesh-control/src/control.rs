//! The control plane: sources (mesh file, Kubernetes) → translation → snapshots → ADS; status over HTTP.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::Node;
use mesh_core::model::Endpoint;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::ads::{AdsServer, CacheStatus, Snapshot, SnapshotCache};
use crate::mesh::{FileError, KubeRef, Mesh};
use crate::translate::{self, Shape};

/// Resolves Kubernetes-backed endpoints (empty when there is no Kubernetes source).
pub type KubeResolver = Arc<dyn Fn(&KubeRef) -> Vec<Endpoint> + Send + Sync>;

/// The running control plane's shared state. Cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    cache: SnapshotCache,
    views: Arc<RwLock<BTreeSet<String>>>,
    state: Arc<Mutex<State>>,
    /// Held from reading the state to the last snapshot set, so publications never overtake each other.
    publishing: Arc<Mutex<()>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").field("status", &self.status()).finish_non_exhaustive()
    }
}

struct State {
    mesh: Mesh,
    source: String,
    version: u64,
    loaded_at: u64,
    last_error: Option<FileError>,
    /// Every view name ever served, so nodes keyed to a view that went away get the full mesh again.
    known_views: BTreeSet<String>,
    kube: KubeResolver,
    /// The mesh file's bytes as [`ControlPlane::from_file`] read them: the baseline of [`ControlPlane::watch_file`], so
    /// an edit made between loading and watching is not missed.
    file_bytes: Option<Vec<u8>>,
    /// Kubernetes Service ports found by discovery; each one the mesh file does not name is served with default
    /// policies as `<service>.<namespace>.svc.cluster.local:<port>`.
    discovered: Vec<KubeRef>,
    /// A Kubernetes source was started and has not delivered its first complete lists: not ready yet.
    kube_pending: bool,
    /// The mesh CA, whose certificates sidecars get over SDS.
    ca: Option<Arc<crate::ca::Ca>>,
    /// Each sidecar view's certificate (by view name, "" for none), kept until its half life.
    sidecar_certs: std::collections::BTreeMap<String, crate::ca::Issued>,
}

/// What `/status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The mesh file (or `<embedded example>`).
    pub mesh_file: String,
    /// Accepted versions of the mesh so far (1 after the first load).
    pub version: u64,
    /// When the serving mesh was accepted (Unix seconds).
    pub loaded_at: u64,
    /// Services being served.
    pub services: Vec<String>,
    /// The last rejected change, if the latest change was rejected: file, line, field, reason.
    pub last_error: Option<RejectedChange>,
    /// Connected clients and what they acknowledged or rejected.
    pub ads: CacheStatus,
}

/// A rejected mesh file, as data.
#[derive(Clone, Debug, Serialize)]
pub struct RejectedChange {
    /// The file.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// The field.
    pub field: String,
    /// Why.
    pub reason: String,
    /// The whole message, `file:line: field: reason`.
    pub message: String,
}

impl ControlPlane {
    /// A control plane serving `mesh`, read from `source` (a file name for status and errors).
    pub fn new(mesh: Mesh, source: impl Into<String>) -> Self {
        let views: Arc<RwLock<BTreeSet<String>>> = Arc::default();
        let key_views = views.clone();
        let cache = SnapshotCache::new(move |node: &Node| {
            let views = key_views.read().unwrap_or_else(|e| e.into_inner());
            node_key(node, &views)
        });
        let state = State {
            mesh,
            source: source.into(),
            version: 1,
            loaded_at: now(),
            last_error: None,
            known_views: BTreeSet::new(),
            kube: Arc::new(|_: &KubeRef| Vec::new()),
            discovered: Vec::new(),
            file_bytes: None,
            kube_pending: false,
            ca: None,
            sidecar_certs: Default::default(),
        };
        let cp = Self { cache, views, state: Arc::new(Mutex::new(state)), publishing: Arc::default() };
        cp.publish();
        cp
    }

    /// A control plane serving the mesh file at `path` (read once here; [`ControlPlane::watch_file`] follows it).
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| crate::Error::Io { path: path.to_owned(), source })?;
        let file = path.display().to_string();
        let text = String::from_utf8(bytes.clone()).map_err(|_| FileError {
            file: file.clone(),
            line: 0,
            field: String::new(),
            reason: "not UTF-8 text".to_owned(),
        })?;
        let cp = Self::new(crate::mesh::parse(&file, &text)?, file);
        cp.lock().file_bytes = Some(bytes);
        Ok(cp)
    }

    /// The snapshot cache the ADS server serves from.
    pub fn cache(&self) -> &SnapshotCache {
        &self.cache
    }

    /// The mesh being served.
    pub fn mesh(&self) -> Mesh {
        self.lock().mesh.clone()
    }

    /// Uses `kube` for Kubernetes-backed endpoints and serves every port in `discovered` that the mesh file does
    /// not name, with default policies, as [`discovered_name`]; republishes.
    pub fn set_kubernetes(&self, kube: KubeResolver, discovered: Vec<KubeRef>) {
        {
            let mut state = self.lock();
            state.kube = kube;
            state.discovered = discovered;
            state.kube_pending = false;
        }
        self.publish();
    }

    /// Whether it serves a complete config: false while a Kubernetes source has not yet listed every Service and
    /// EndpointSlice (`GET /ready` answers 503 then).
    pub fn is_ready(&self) -> bool {
        !self.lock().kube_pending
    }

    /// Validates `text` as the new mesh; on success serves it, otherwise keeps the last good mesh and records the
    /// error (it is logged and shown by `/status`).
    pub fn update(&self, file: &str, text: &str) -> Result<(), FileError> {
        match crate::mesh::parse(file, text) {
            Ok(mesh) => {
                {
                    let mut state = self.lock();
                    state.mesh = mesh;
                    state.source = file.to_owned();
                    state.version += 1;
                    state.loaded_at = now();
                    state.last_error = None;
                }
                self.publish();
                tracing::info!(file, version = self.lock().version, "mesh file accepted");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(file = %e.file, line = e.line, field = %e.field, reason = %e.reason, "mesh file rejected; still serving the last good one");
                self.lock().last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Current status.
    pub fn status(&self) -> Status {
        let state = self.lock();
        Status {
            mesh_file: state.source.clone(),
            version: state.version,
            loaded_at: state.loaded_at,
            services: state.mesh.services.keys().cloned().collect(),
            last_error: state.last_error.as_ref().map(|e| RejectedChange {
                file: e.file.clone(),
                line: e.line,
                field: e.field.clone(),
                reason: e.reason.clone(),
                message: e.to_string(),
            }),
            ads: self.cache.status(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Translates the mesh for every (shape, view) key and hands the snapshots to the cache.
    fn publish(&self) {
        let _publishing = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let (mesh, kube, views) = {
            let mut state = self.lock();
            let names: BTreeSet<String> = state.mesh.views.keys().cloned().collect();
            state.known_views.extend(names.iter().cloned());
            (with_discovered(&state.mesh, &state.discovered), state.kube.clone(), state.known_views.clone())
        };
        for shape in [Shape::Proxyless, Shape::Sidecar] {
            let all = snapshot(&mesh, shape, None, kube.as_ref());
            for view in &views {
                let mut snap = match mesh.views.get(view) {
                    Some(services) => snapshot(&mesh, shape, Some(services), kube.as_ref()),
                    None => all.clone(),
                };
                if shape == Shape::Sidecar {
                    self.add_secrets(&mut snap, view);
                }
                self.cache.set(&key(shape, view), snap);
            }
            let mut all = all;
            if shape == Shape::Sidecar {
                self.add_secrets(&mut all, "");
            }
            self.cache.set(&key(shape, ""), all.clone());
            if shape == Shape::Proxyless {
                self.cache.set_default(all);
            }
        }
        // Only now may new streams be keyed to a new view: its snapshots exist. (Streams keep the key they connected
        // with: a client that connected before its view existed sees the whole mesh until it reconnects.)
        *self.views.write().unwrap_or_else(|e| e.into_inner()) = mesh.views.keys().cloned().collect();
    }

    /// Serves sidecars (Envoy) their certificates from `ca` over SDS: a sidecar of view `V` is
    /// `spiffe://<trust-domain>/ns/default/sa/V`, one without a view `.../sa/mesh-sidecar`. Certificates are
    /// renewed at half life and pushed as the secrets change. Whoever reaches the ADS port as a sidecar gets its
    /// view's key: serve ADS on loopback (the default) or a trusted network only.
    pub fn serve_certificates(&self, ca: Arc<crate::ca::Ca>) {
        self.lock().ca = Some(ca);
        self.publish();
        let cp = self.clone();
        tokio::spawn(async move {
            loop {
                let next = cp.lock().sidecar_certs.values().map(|i| i.renew_at).min();
                let wait = next.and_then(|t| t.duration_since(SystemTime::now()).ok()).unwrap_or(Duration::from_secs(60));
                tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
                cp.publish();
            }
        });
    }

    /// The SDS secrets of the sidecars of `view`, when there is a CA: its certificate (issued again past its half
    /// life) and the roots.
    fn add_secrets(&self, snap: &mut Snapshot, view: &str) {
        let mut state = self.lock();
        let Some(ca) = state.ca.clone() else { return };
        let fresh = state.sidecar_certs.get(view).is_some_and(|i| SystemTime::now() < i.renew_at);
        if !fresh {
            let domain = ca.trust_domain().unwrap_or("mesh.local").to_owned();
            let name = if view.is_empty() { "mesh-sidecar" } else { view };
            let identity = format!("spiffe://{domain}/ns/default/sa/{name}");
            match ca.issue(&identity, &[], crate::ca::DEFAULT_WORKLOAD_LIFETIME, SystemTime::now()) {
                Ok(issued) => drop(state.sidecar_certs.insert(view.to_owned(), issued)),
                Err(error) => return tracing::warn!(%error, view, "no certificate for the view's sidecars"),
            }
        }
        let Some(issued) = state.sidecar_certs.get(view) else { return };
        for r in translate::secrets(&issued.chain, issued.key.as_deref().unwrap_or_default(), &issued.bundle) {
            snap.insert(r.type_url, r.name, r.resource);
        }
    }

    /// Serves ADS on `listener` until the process ends.
    pub async fn serve_ads(&self, listener: TcpListener) -> crate::Result<()> {
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(AdsServer::new(self.cache.clone()).into_service())
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    }

    /// Watches `path` and applies every change (polled every 200 ms, so a change is served well within a second).
    pub fn watch_file(&self, path: PathBuf) -> tokio::task::JoinHandle<()> {
        let cp = self.clone();
        let baseline = self.lock().file_bytes.clone();
        tokio::spawn(async move {
            let mut last = baseline.or_else(|| std::fs::read(&path).ok());
            let mut interval = tokio::time::interval(Duration::from_millis(200));
            loop {
                interval.tick().await;
                let current = match std::fs::read(&path) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        if last.is_some() {
                            tracing::warn!(path = %path.display(), error = %e, "cannot read the mesh file; still serving the last good one");
                            last = None;
                        }
                        continue;
                    }
                };
                if last.as_ref() == Some(&current) {
                    continue;
                }
                last = Some(current.clone());
                match String::from_utf8(current) {
                    Ok(text) => {
                        let _ = cp.update(&path.display().to_string(), &text);
                    }
                    Err(_) => {
                        let e = FileError {
                            file: path.display().to_string(),
                            line: 0,
                            field: String::new(),
                            reason: "not UTF-8 text".to_owned(),
                        };
                        tracing::warn!(error = %e, "mesh file rejected; still serving the last good one");
                        cp.lock().last_error = Some(e);
                    }
                }
            }
        })
    }

    /// `/metrics` in Prometheus' text format: xDS pushes, ACKs, NACKs, the mean time from a push to its ACK,
    /// connected clients, and accepted and rejected mesh files. Written here rather than through an OpenTelemetry
    /// exporter: a handful of counters read at scrape time, off every request path.
    pub fn metrics(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let counters = self.cache.counters();
        let (pushes, acks, nacks) = (counters.pushes.load(Relaxed), counters.acks.load(Relaxed), counters.nacks.load(Relaxed));
        let latency_s = counters.ack_latency_us.load(Relaxed) as f64 / 1e6;
        let status = self.status();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        };
        metric("mesh_control_xds_pushes_total", "counter", "xDS responses sent to clients.", pushes.to_string());
        metric("mesh_control_xds_acks_total", "counter", "xDS responses clients acknowledged.", acks.to_string());
        metric("mesh_control_xds_nacks_total", "counter", "xDS responses clients rejected.", nacks.to_string());
        metric(
            "mesh_control_xds_push_to_ack_seconds_sum",
            "counter",
            "Time from each acknowledged push to its ACK.",
            latency_s.to_string(),
        );
        metric("mesh_control_xds_connected_clients", "gauge", "ADS streams connected now.", status.ads.streams.len().to_string());
        metric("mesh_control_mesh_version", "gauge", "Accepted versions of the mesh file.", status.version.to_string());
        metric(
            "mesh_control_mesh_rejected",
            "gauge",
            "1 while the latest mesh file change is rejected.",
            u8::from(status.last_error.is_some()).to_string(),
        );
        out
    }

    /// Serves `/status` (JSON), `/metrics`, `/ready`, `/healthz` and, given the process's log filter, `/logging`
    /// ([`mesh_core::logging::answer`]) over HTTP/1.1 on `listener`.
    pub async fn serve_admin(&self, listener: TcpListener, logging: Option<mesh_core::logging::LogFilter>) {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (cp, logging) = (self.clone(), logging.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let response = cp.admin(req.method(), req.uri(), logging.as_ref());
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    }

    fn admin(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        logging: Option<&mesh_core::logging::LogFilter>,
    ) -> http::Response<http_body_util::Full<bytes::Bytes>> {
        let (status, content_type, body) = match uri.path() {
            "/logging" => {
                let (status, text) = mesh_core::logging::answer(logging, method.as_str(), uri.query());
                (status, "text/plain", text)
            }
            "/status" => {
                let json = serde_json::to_string_pretty(&self.status()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
                (200, "application/json", json)
            }
            "/metrics" => (200, "text/plain; version=0.0.4", self.metrics()),
            "/ready" if !self.is_ready() => (503, "text/plain", "waiting for the first complete Kubernetes lists\n".to_owned()),
            "/ready" | "/healthz" => (200, "text/plain", "ok\n".to_owned()),
            _ => (404, "text/plain", "not found: try /status, /ready, /metrics, /logging\n".to_owned()),
        };
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap_or_default()
    }
}

fn snapshot(
    mesh: &Mesh,
    shape: Shape,
    view: Option<&BTreeSet<String>>,
    kube: &(dyn Fn(&KubeRef) -> Vec<Endpoint> + Send + Sync),
) -> Snapshot {
    let mut snap = Snapshot::new();
    for r in translate::resources(mesh, shape, view, kube) {
        snap.insert(r.type_url, r.name, r.resource);
    }
    snap
}

/// The name a discovered Kubernetes Service port is served under: what gRPC clients in Kubernetes dial
/// (`xds:///greeter.default.svc.cluster.local:50051`), as Istio names it. A port given by name is shown by name.
pub fn discovered_name(r: &KubeRef) -> String {
    let port = match &r.port {
        crate::mesh::KubePort::Number(n) => n.to_string(),
        crate::mesh::KubePort::Name(n) => n.clone(),
    };
    format!("{}.{}.svc.cluster.local:{port}", r.service, r.namespace)
}

/// `mesh` plus a default service for every discovered port it does not name (a mesh-file service of the same
/// name wins: that is how the file sets policies for a discovered service).
fn with_discovered(mesh: &Mesh, discovered: &[KubeRef]) -> Mesh {
    if discovered.is_empty() {
        return mesh.clone();
    }
    let mut mesh = mesh.clone();
    for r in discovered {
        let name = discovered_name(r);
        mesh.services.entry(name).or_insert_with_key(|name| {
            crate::mesh::Service::with_defaults(name.clone(), crate::mesh::EndpointSource::Kubernetes(r.clone()))
        });
    }
    mesh
}

fn key(shape: Shape, view: &str) -> String {
    format!("{}/{view}", shape.name())
}

/// Which snapshot a node sees: Envoy gets the sidecar shape (socket listeners), everyone else the proxyless shape
/// (`api_listener`s); node metadata `mesh.shape` (`sidecar` / `proxyless`) overrides. Node metadata `mesh.view`, else the
/// node's `cluster`, picks a view when the mesh has one by that name.
fn node_key(node: &Node, views: &BTreeSet<String>) -> String {
    use envoy_types::pb::google::protobuf::value::Kind;
    let meta = |key: &str| {
        node.metadata.as_ref().and_then(|m| m.fields.get(key)).and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
    };
    let shape = match meta("mesh.shape") {
        Some("sidecar") => Shape::Sidecar,
        Some("proxyless") => Shape::Proxyless,
        _ if node.user_agent_name == "envoy" => Shape::Sidecar,
        _ => Shape::Proxyless,
    };
    let view = meta("mesh.view").unwrap_or(&node.cluster);
    let view = if views.contains(view) { view } else { "" };
    key(shape, view)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A gRPC xDS bootstrap (JSON) pointing at `xds` (insecure credentials, `xds_v3`; `delta` adds our `delta_ads`
/// server feature), with the template xDS-enabled servers name their listener by
/// ([`crate::translate::SERVER_LISTENER_TEMPLATE`]).
pub fn bootstrap_json(xds: SocketAddr, node_id: &str, delta: bool) -> String {
    let features: &[&str] = if delta { &["xds_v3", "delta_ads"] } else { &["xds_v3"] };
    let bootstrap = serde_json::json!({
        "xds_servers": [{ "server_uri": xds.to_string(), "channel_creds": [{ "type": "insecure" }], "server_features": features }],
        "node": { "id": node_id, "cluster": "", "locality": {} },
        "server_listener_resource_name_template": crate::translate::SERVER_LISTENER_TEMPLATE,
    });
    format!("{bootstrap:#}\n")
}

/// Writes [`bootstrap_json`] to `path`.
pub fn write_bootstrap(path: &Path, xds: SocketAddr, node_id: &str) -> crate::Result<()> {
    std::fs::write(path, bootstrap_json(xds, node_id, false)).map_err(|source| crate::Error::Io { path: path.to_owned(), source })
}

/// The certificate provider instance the clusters of strict services reference (`translate::cluster`).
pub const CERTIFICATE_PROVIDER: &str = "default";

/// [`bootstrap_json`] with a `file_watcher` certificate provider instance, [`CERTIFICATE_PROVIDER`], reading
/// `certs/cert.pem`, `certs/key.pem` and `certs/ca.pem` every minute: what a strict service's clusters need.
pub fn bootstrap_json_with_certificates(xds: SocketAddr, node_id: &str, certs: &Path) -> String {
    let mut bootstrap: serde_json::Value = serde_json::from_str(&bootstrap_json(xds, node_id, false)).unwrap_or_default();
    let file = |name: &str| certs.join(name).display().to_string();
    bootstrap["certificate_providers"] = serde_json::json!({
        CERTIFICATE_PROVIDER: {
            "plugin_name": "file_watcher",
            "config": {
                "certificate_file": file("cert.pem"),
                "private_key_file": file("key.pem"),
                "ca_certificate_file": file("ca.pem"),
                "refresh_interval": "60s",
            },
        },
    });
    format!("{bootstrap:#}\n")
}

/// Follows Kubernetes Services and EndpointSlices: Kubernetes-backed services and subsets get their endpoints
/// (ready → HEALTHY, terminating but serving → DRAINING, otherwise UNHEALTHY; zone → locality) and every change is
/// republished.
pub fn follow_kubernetes(cp: &ControlPlane, client: ::kube::Client, namespace: Option<String>) -> tokio::task::JoinHandle<()> {
    follow(cp, crate::kube::KubeSource::new(client, namespace).start())
}

/// Republishes `cp` with every Kubernetes state `updates` publishes, from the first complete one on.
pub(crate) fn follow(
    cp: &ControlPlane,
    mut updates: tokio::sync::watch::Receiver<Arc<crate::kube::KubeState>>,
) -> tokio::task::JoinHandle<()> {
    let cp = cp.clone();
    cp.lock().kube_pending = true;
    tokio::spawn(async move {
        loop {
            let state = updates.borrow_and_update().clone();
            // Until every watch has listed once, publishing would push empty endpoint sets to clients.
            if state.is_synced() {
                let discovered = state
                    .services()
                    .flat_map(|key| {
                        state.service_ports(key).into_iter().map(|port| KubeRef {
                            namespace: key.namespace.clone(),
                            service: key.name.clone(),
                            port: crate::mesh::KubePort::Number(port),
                        })
                    })
                    .collect();
                cp.set_kubernetes(Arc::new(move |r: &KubeRef| kube_endpoints(&state, r)), discovered);
            }
            if updates.changed().await.is_err() {
                return;
            }
        }
    })
}

/// The endpoints of a Kubernetes reference in `state`.
pub fn kube_endpoints(state: &crate::kube::KubeState, r: &KubeRef) -> Vec<Endpoint> {
    use crate::kube::{PortRef, ServiceKey};
    use crate::mesh::KubePort;
    use mesh_core::model::HealthStatus;
    let key = ServiceKey { namespace: r.namespace.clone(), name: r.service.clone() };
    let port = match &r.port {
        KubePort::Name(n) => PortRef::Name(n.clone()),
        KubePort::Number(n) => PortRef::Number(*n),
    };
    state
        .endpoints(&key, &port)
        .into_iter()
        .map(|e| {
            let mut endpoint = Endpoint::new(e.addr);
            endpoint.health = match (e.ready, e.serving, e.terminating) {
                (true, _, _) => HealthStatus::Healthy,
                (false, true, true) => HealthStatus::Draining,
                _ => HealthStatus::Unhealthy,
            };
            if let Some(zone) = e.zone {
                endpoint.locality = mesh_core::Locality { zone, ..Default::default() }.into();
            }
            endpoint
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

    use super::node_key;

    fn node(user_agent: &str, cluster: &str, metadata: &[(&str, &str)]) -> Node {
        let fields = metadata.iter().map(|(k, v)| ((*k).to_owned(), Value { kind: Some(Kind::StringValue((*v).to_owned())) })).collect();
        Node {
            id: "n".into(),
            cluster: cluster.into(),
            user_agent_name: user_agent.into(),
            metadata: Some(Struct { fields }),
            ..Default::default()
        }
    }

    #[test]
    fn the_node_picks_shape_and_view() {
        let views: BTreeSet<String> = ["web".to_owned()].into();
        assert_eq!(node_key(&node("envoy", "", &[]), &views), "sidecar/");
        assert_eq!(node_key(&node("gRPC Python", "", &[]), &views), "proxyless/");
        assert_eq!(node_key(&node("envoy", "", &[("mesh.shape", "proxyless")]), &views), "proxyless/");
        assert_eq!(node_key(&node("grpc-go", "", &[("mesh.shape", "sidecar")]), &views), "sidecar/");
        assert_eq!(node_key(&node("grpc-go", "web", &[]), &views), "proxyless/web");
        assert_eq!(node_key(&node("grpc-go", "other", &[("mesh.view", "web")]), &views), "proxyless/web");
        // An unknown view sees the whole mesh.
        assert_eq!(node_key(&node("envoy", "unknown", &[]), &views), "sidecar/");
    }
}
