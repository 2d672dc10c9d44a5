//! `xds:///name` targets: routing driven by an xDS control plane.
//!
//! A background task follows LDS → RDS → CDS → EDS for the target and keeps
//! a routing table: the virtual host for the target's name, its routes, and
//! one balancer per cluster (built with the cluster's LB policy, reading its
//! EDS watch itself, or its static endpoints, or DNS for LOGICAL_DNS). A new
//! route table is used only once every cluster it names has arrived (A74), so
//! a route never points at an unknown cluster; a cluster whose balancer must be
//! rebuilt keeps the old one until the new one can serve. While the control
//! plane is away the last table keeps serving.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mesh_core::lb::{Random, SplitMix64, hash_key};
use mesh_core::policy::{HashPolicy, RouteHash};
use mesh_core::{ClusterDiscovery, Endpoint, LbPolicy, Route, RouteAction, RouteConfig};
use mesh_tower::balance::{Balancer, BalancerConfig, ConnState, RequestHash, ResponseBody};
use mesh_tower::discover::dns::{DnsConfig, DnsQuery, HickoryResolver, dns};
use mesh_tower::discover::{self, Change};
use tokio::sync::{mpsc, watch};
use tonic::Status;
use tonic::body::Body;
use xds_client::resource::{ClusterResource, EndpointsResource, ListenerResource, RouteSource};
use xds_client::{Bootstrap, ResourceStatus, Typed, Watch, XdsClient, XdsClientConfig};

use crate::{Error, Result};

/// The process-wide xDS client built from the environment's bootstrap.
pub fn shared_client() -> Result<XdsClient> {
    static CLIENT: OnceLock<XdsClient> = OnceLock::new();
    if let Some(client) = CLIENT.get() {
        return Ok(client.clone());
    }
    let bootstrap = Bootstrap::from_env().map_err(|e| Error::InvalidTarget { target: "xds:///".into(), reason: e.to_string() })?;
    Ok(CLIENT.get_or_init(|| XdsClient::new(bootstrap, XdsClientConfig::default())).clone())
}

/// A routed request's cluster balancer, route timeout and hash (from the route's hash policies).
struct Routed {
    balancer: Balancer<Body>,
    timeout: Option<Duration>,
    hash: Option<u64>,
}

/// A random id per channel (the clock's nanoseconds and a process-wide counter, mixed).
fn random_channel_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    SplitMix64::new(nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32)).next_u64()
}

/// The hash of a request under a route's hash policies (gRPC's A42 and Envoy's combination: each policy
/// that yields a value folds it in as `rotl(hash, 1) ^ value`, and a terminal one that yields a value ends
/// the list; a repeated header is hashed as its values joined by `,`; binary `-bin` headers are skipped;
/// the channel id is this channel's own random number). `None` when the route has no hash policy (the
/// balancer then hashes by its own); a random hash when it has some but none applies to this request.
fn route_hash(policies: &[RouteHash], request: &http::Request<Body>, channel_id: u64, seed: &AtomicU64) -> Option<u64> {
    if policies.is_empty() {
        return None;
    }
    let mut hash: Option<u64> = None;
    for RouteHash { policy, terminal } in policies {
        let value = match policy {
            HashPolicy::Header(name) if name.ends_with("-bin") => None,
            HashPolicy::Header(name) => {
                let mut values = request.headers().get_all(name).iter().map(|v| v.as_bytes());
                values.next().map(|first| match values.next() {
                    // The usual case, a single value: hashed in place, no per-request allocation.
                    None => hash_key(first),
                    Some(second) => {
                        let mut joined = first.to_vec();
                        for more in std::iter::once(second).chain(values) {
                            joined.push(b',');
                            joined.extend_from_slice(more);
                        }
                        hash_key(&joined)
                    }
                })
            }
            HashPolicy::ChannelId => Some(channel_id),
        };
        if let Some(value) = value {
            hash = Some(hash.map_or(value, |h| h.rotate_left(1) ^ value));
            if *terminal {
                break;
            }
        }
    }
    Some(hash.unwrap_or_else(|| SplitMix64::new(seed.fetch_add(1, Ordering::Relaxed)).next_u64()))
}

/// One cluster of the routing table.
#[derive(Clone, Debug)]
struct ClusterEntry {
    balancer: Balancer<Body>,
}

/// What requests are routed with.
#[derive(Debug, Default)]
struct Table {
    routes: Vec<Route>,
    clusters: HashMap<String, ClusterEntry>,
}

/// Routes requests of an `xds:///name` target.
#[derive(Clone, Debug)]
pub(crate) struct XdsRouter {
    name: String,
    table: watch::Receiver<Option<Arc<Table>>>,
    server: String,
    seed: Arc<AtomicU64>,
    /// This channel's id for `io.grpc.channel_id` hashing: random, shared by its clones.
    channel_id: u64,
    ready_timeout: Duration,
    _task: Arc<AbortOnDrop>,
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl XdsRouter {
    pub(crate) fn new(client: XdsClient, name: &str, config: BalancerConfig) -> Self {
        let (tx, table) = watch::channel(None);
        let server = client.bootstrap().servers.first().map(|s| s.server_uri.clone()).unwrap_or_default();
        let ready_timeout = config.ready_timeout;
        let task = tokio::spawn(follow(client, name.to_owned(), config, tx)).abort_handle();
        Self {
            name: name.to_owned(),
            table,
            server,
            seed: Arc::default(),
            channel_id: random_channel_id(),
            ready_timeout,
            _task: Arc::new(AbortOnDrop(task)),
        }
    }

    /// Routes one request: waits for a table, matches a route, picks a
    /// cluster by weight, calls its balancer.
    pub(crate) async fn call(self, request: http::Request<Body>) -> Result<http::Response<ResponseBody>, Status> {
        let table = self.current_table().await?;
        let Routed { balancer, timeout, hash } = self.route(&table, &request)?;
        let mut request = request;
        if let Some(hash) = hash {
            request.extensions_mut().insert(RequestHash(hash));
        }
        let call = tower::ServiceExt::oneshot(balancer, request);
        let result = match timeout {
            Some(limit) => tokio::time::timeout(limit, call)
                .await
                .map_err(|_| Status::deadline_exceeded(format!("route timeout {limit:?} exceeded")))?,
            None => call.await,
        };
        result.map_err(crate::status_from)
    }

    /// Where a request goes and under which route policies.
    fn route(&self, table: &Table, request: &http::Request<Body>) -> Result<Routed, Status> {
        let path = request.uri().path();
        let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
        let Some(route) = table.routes.iter().find(|r| r.matcher.matches(path, header)) else {
            return Err(Status::unavailable(format!("xds:///{}: no route matches {path}", self.name)));
        };
        let clusters = match &route.action {
            RouteAction::NonForwarding => {
                return Err(Status::unavailable(format!("xds:///{}: route for {path} is non-forwarding", self.name)));
            }
            RouteAction::Clusters(c) => c,
        };
        let total: u64 = clusters.iter().map(|c| u64::from(c.weight)).sum();
        let mut point = SplitMix64::new(self.seed.fetch_add(1, Ordering::Relaxed)).next_u64() % total.max(1);
        let chosen = clusters.iter().find(|c| {
            let hit = point < u64::from(c.weight);
            point = point.saturating_sub(u64::from(c.weight));
            hit
        });
        let Some(chosen) = chosen.or(clusters.last()) else {
            return Err(Status::unavailable(format!("xds:///{}: route for {path} has no cluster", self.name)));
        };
        match table.clusters.get(&chosen.cluster) {
            Some(entry) => Ok(Routed {
                balancer: entry.balancer.clone(),
                timeout: route.policies.timeout,
                hash: route_hash(&route.policies.hash, request, self.channel_id, &self.seed),
            }),
            None => Err(Status::unavailable(format!("xds:///{}: cluster {} is not available", self.name, chosen.cluster))),
        }
    }

    async fn current_table(&self) -> Result<Arc<Table>, Status> {
        // Fast path: a table is there (every call after the first config).
        if let Some(table) = self.table.borrow().clone() {
            return Ok(table);
        }
        let mut rx = self.table.clone();
        let waited = tokio::time::timeout(self.ready_timeout, rx.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(table)) => Ok(table.clone().unwrap_or_default()),
            _ => Err(Status::unavailable(format!(
                "xds:///{}: no configuration from xDS server {} after {:?}",
                self.name, self.server, self.ready_timeout
            ))),
        }
    }
}

/// Where a cluster's balancer gets its endpoints, and the settings it was built with: a change of any of
/// these (LB policy, connect timeout, TLS policy, static endpoints, EDS name, DNS name) builds a replacement balancer,
/// which takes over once it can serve.
#[derive(Clone, Debug, PartialEq)]
struct BalancerKey {
    lb: LbPolicy,
    connect_timeout: Duration,
    /// Upstream TLS: the connector refuses plaintext for a cluster that asks for it.
    tls: Option<mesh_core::policy::TlsPolicy>,
    source: Source,
}

#[derive(Clone, Debug, PartialEq)]
enum Source {
    Static(Vec<Endpoint>),
    Eds(String),
    LogicalDns { host: String, port: u16 },
}

/// One cluster being followed.
struct Followed {
    cds: Watch<ClusterResource>,
    /// The balancer calls use.
    balancer: Option<(BalancerKey, Balancer<Body>)>,
    /// Its replacement, warming up: it takes over once it can serve (so a rebuild never leaves calls
    /// waiting on an empty set), and wakes the follower as its state changes.
    next: Option<(BalancerKey, Balancer<Body>, AbortOnDrop)>,
    _forwarder: AbortOnDrop,
}

/// Keeps `tx` up to date with the xDS view of `name`.
async fn follow(client: XdsClient, name: String, config: BalancerConfig, tx: watch::Sender<Option<Arc<Table>>>) {
    let (dirty_tx, mut dirty) = mpsc::unbounded_channel::<()>();
    let listener_name = client.bootstrap().listener_name_for_target(&name);
    let lds: Watch<ListenerResource> = client.watch(&listener_name);
    let _lds_forward = forward(&lds, &dirty_tx);
    let mut rds: Option<(String, Watch<RouteConfig>, AbortOnDrop)> = None;
    let mut clusters: HashMap<String, Followed> = HashMap::new();
    loop {
        // Listener → route config.
        let route_config: Option<RouteConfig> = match lds.value().map(|l| l.route.clone()) {
            None => None,
            Some(RouteSource::Inline(rc)) => {
                rds = None;
                Some(rc)
            }
            Some(RouteSource::Rds(rc_name)) => {
                if rds.as_ref().is_none_or(|(n, _, _)| *n != rc_name) {
                    let w: Watch<RouteConfig> = client.watch(&rc_name);
                    let f = forward(&w, &dirty_tx);
                    rds = Some((rc_name, w, f));
                }
                rds.as_ref().and_then(|(_, w, _)| w.value()).map(|rc| (*rc).clone())
            }
        };
        let routes: Option<Vec<Route>> = route_config.and_then(|rc| rc.virtual_host_for(&name).map(|vh| vh.routes.clone()));

        // Clusters the routes name: follow each, build balancers, feed endpoints.
        if let Some(routes) = &routes {
            let wanted: Vec<String> = routes
                .iter()
                .filter_map(|r| match &r.action {
                    RouteAction::Clusters(c) => Some(c.iter().map(|w| w.cluster.clone())),
                    RouteAction::NonForwarding => None,
                })
                .flatten()
                .collect();
            for cluster in &wanted {
                clusters.entry(cluster.clone()).or_insert_with(|| {
                    let cds: Watch<ClusterResource> = client.watch(cluster);
                    let _forwarder = forward(&cds, &dirty_tx);
                    Followed { cds, balancer: None, next: None, _forwarder }
                });
            }
            for (cluster_name, followed) in clusters.iter_mut() {
                reconcile_cluster(&client, cluster_name, followed, &config, &dirty_tx);
            }
            // A74: switch tables only when every named cluster is known.
            let missing: Vec<&String> =
                wanted.iter().filter(|c| clusters.get(*c).is_none_or(|f| f.balancer.is_none() && !is_gone(&f.cds))).collect();
            if missing.is_empty() {
                let table = Table {
                    routes: routes.clone(),
                    clusters: wanted
                        .iter()
                        .filter_map(|c| {
                            clusters
                                .get(c)
                                .and_then(|f| f.balancer.as_ref())
                                .map(|(_, b)| (c.clone(), ClusterEntry { balancer: b.clone() }))
                        })
                        .collect(),
                };
                tx.send_replace(Some(Arc::new(table)));
                clusters.retain(|c, _| wanted.contains(c));
            } else {
                tracing::debug!(target_name = %name, ?missing, "waiting for clusters before switching routes");
            }
        }
        if dirty.recv().await.is_none() {
            return;
        }
        // Coalesce bursts.
        while dirty.try_recv().is_ok() {}
    }
}

fn is_gone<T: xds_client::XdsResource>(w: &Watch<T>) -> bool {
    w.status() == ResourceStatus::DoesNotExist
}

/// Builds the cluster's balancer when it has none, or a replacement when its key changed; the replacement
/// takes over once it can serve. EDS updates do not pass through here: the balancer reads its EDS watch
/// itself ([`eds_source`]).
fn reconcile_cluster(client: &XdsClient, name: &str, f: &mut Followed, config: &BalancerConfig, dirty: &mpsc::UnboundedSender<()>) {
    if let Some((_, next, _)) = &f.next
        && can_serve(next)
        && let Some((key, next, _)) = f.next.take()
    {
        tracing::debug!(cluster = name, "replacement balancer takes over");
        f.balancer = Some((key, next));
    }
    let Some(cluster) = f.cds.value() else { return };
    let cluster = &cluster.cluster;
    let source = match &cluster.discovery {
        ClusterDiscovery::Static => Source::Static(cluster.endpoints.clone()),
        ClusterDiscovery::Eds { service_name } => Source::Eds(service_name.clone().unwrap_or_else(|| name.to_owned())),
        ClusterDiscovery::LogicalDns { host, port } => Source::LogicalDns { host: host.clone(), port: *port },
    };
    let key = BalancerKey {
        lb: cluster.lb.clone(),
        connect_timeout: cluster.policies.connection.connect_timeout,
        tls: cluster.policies.tls.clone(),
        source,
    };
    if f.balancer.as_ref().is_some_and(|(current, _)| *current == key) {
        f.next = None;
        return;
    }
    if f.next.as_ref().is_some_and(|(pending, _, _)| *pending == key) {
        return;
    }
    let mut cfg = config.clone();
    cfg.lb = key.lb.clone();
    cfg.connection.connect_timeout = key.connect_timeout;
    cfg.tls = key.tls.clone();
    let discover = match &key.source {
        Source::Static(endpoints) => discover::fixed(endpoints.clone()),
        Source::Eds(eds_name) => eds_source(client.watch(eds_name)),
        // The name is resolved by the client and every answer is an endpoint, balanced by the cluster's policy
        // and re-resolved at its TTL (Envoy's STRICT_DNS behaviour: Envoy's LOGICAL_DNS connects to the first
        // answer only; spreading over all of them is the mesh's choice).
        Source::LogicalDns { host, port } => match HickoryResolver::system() {
            Ok(resolver) => dns(Arc::new(resolver), DnsQuery::Host { name: host.clone(), port: *port }, DnsConfig::default()),
            Err(error) => {
                tracing::error!(cluster = name, %error, "LOGICAL_DNS cluster: no system resolver; calls fail until one is built");
                // An empty stand-in (calls fail fast instead of the route table waiting for the cluster), under
                // a key that differs, so the next pass of the follower tries again.
                if f.balancer.is_none() {
                    let stand_in = BalancerKey { source: Source::Static(Vec::new()), ..key };
                    f.balancer = Some((stand_in, Balancer::new(format!("xds cluster {name}"), discover::fixed(Vec::new()), cfg)));
                }
                return;
            }
        },
    };
    let balancer = Balancer::new(format!("xds cluster {name}"), discover, cfg);
    if f.balancer.is_none() {
        f.balancer = Some((key, balancer));
    } else {
        let wake = forward_updates(&balancer, dirty);
        f.next = Some((key, balancer, wake));
    }
}

/// Whether a replacement balancer can take traffic: it has its first endpoint set, and that set is empty, has
/// a ready endpoint, or has failed to connect everywhere (calls then fail fast, as they would on it anyway).
fn can_serve(balancer: &Balancer<Body>) -> bool {
    if balancer.endpoints_updated_at().is_none() {
        return false;
    }
    let endpoints = balancer.endpoints();
    endpoints.is_empty()
        || endpoints.iter().any(|e| e.state == ConnState::Ready)
        || endpoints.iter().all(|e| e.state == ConnState::TransientFailure)
}

/// Signals `dirty` whenever `balancer` publishes a new snapshot.
fn forward_updates(balancer: &Balancer<Body>, dirty: &mpsc::UnboundedSender<()>) -> AbortOnDrop {
    let (mut updates, dirty) = (balancer.updates(), dirty.clone());
    let task = tokio::spawn(async move {
        while updates.changed().await.is_ok() {
            if dirty.send(()).is_err() {
                return;
            }
        }
    });
    AbortOnDrop(task.abort_handle())
}

/// A discovery source that follows an EDS watch: each accepted ClusterLoadAssignment replaces the endpoint set,
/// its locality weights and drop overloads.
///
/// The balancer's own task reads the watch, so an update reaches the balancer in one task hand-off from the
/// xDS client. A status change that keeps the value (a NACK, a deletion kept under A88) changes nothing; a
/// dropped value empties the set.
pub fn eds_source(watch: Watch<EndpointsResource>) -> discover::BoxDiscover {
    Box::pin(futures_util::stream::unfold((watch, None::<Arc<xds_client::resource::Resource>>), |(mut watch, mut last)| async move {
        loop {
            match watch.state().value {
                Some(value) if last.as_ref().is_none_or(|last| !Arc::ptr_eq(last, &value)) => {
                    if let Some(typed) = Typed::<EndpointsResource>::new(Arc::clone(&value)) {
                        last = Some(value);
                        return Some((Change::Reset(typed.endpoints.clone()), (watch, last)));
                    }
                }
                // The value was dropped (deleted or NACKed under `fail_on_data_errors`, A88): no endpoints.
                None if last.take().is_some() => return Some((Change::Reset(mesh_core::EndpointSet::default()), (watch, last))),
                _ => {}
            }
            if !watch.changed().await {
                return None;
            }
        }
    }))
}

/// Signals `dirty` on every change of `w`.
fn forward<T: xds_client::XdsResource>(w: &Watch<T>, dirty: &mpsc::UnboundedSender<()>) -> AbortOnDrop {
    let (mut w, dirty) = (w.clone(), dirty.clone());
    let task = tokio::spawn(async move {
        while w.changed().await {
            if dirty.send(()).is_err() {
                return;
            }
        }
    });
    AbortOnDrop(task.abort_handle())
}
