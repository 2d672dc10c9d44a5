//! `xds:///name` targets: routing driven by an xDS control plane.
//!
//! A background task follows LDS → RDS → CDS → EDS for the target and keeps
//! a routing table: the virtual host for the target's name, its routes, and
//! one balancer per cluster (built with the cluster's LB policy, fed by its
//! EDS endpoints). A new route table is used only once every cluster it
//! names has arrived (A74), so a route never points at an unknown cluster.
//! While the control plane is away the last table keeps serving.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mesh_core::lb::{Random, SplitMix64};
use mesh_core::{ClusterDiscovery, Endpoint, LbPolicy, Route, RouteAction, RouteConfig};
use mesh_tower::balance::{Balancer, BalancerConfig, ResponseBody};
use mesh_tower::discover::{self, Change, ChangeSender};
use tokio::sync::{mpsc, watch};
use tonic::Status;
use tonic::body::Body;
use xds_client::resource::{ClusterResource, EndpointsResource, ListenerResource, RouteSource};
use xds_client::{Bootstrap, ResourceStatus, Watch, XdsClient, XdsClientConfig};

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
        Self { name: name.to_owned(), table, server, seed: Arc::default(), ready_timeout, _task: Arc::new(AbortOnDrop(task)) }
    }

    /// Routes one request: waits for a table, matches a route, picks a
    /// cluster by weight, calls its balancer.
    pub(crate) async fn call(self, request: http::Request<Body>) -> Result<http::Response<ResponseBody>, Status> {
        let table = self.current_table().await?;
        let (balancer, timeout) = self.route(&table, &request)?;
        let call = tower::ServiceExt::oneshot(balancer, request);
        let result = match timeout {
            Some(limit) => tokio::time::timeout(limit, call)
                .await
                .map_err(|_| Status::deadline_exceeded(format!("route timeout {limit:?} exceeded")))?,
            None => call.await,
        };
        result.map_err(crate::status_from)
    }

    /// The balancer and route timeout for a request.
    fn route(&self, table: &Table, request: &http::Request<Body>) -> Result<(Balancer<Body>, Option<Duration>), Status> {
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
            Some(entry) => Ok((entry.balancer.clone(), route.policies.timeout)),
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

/// One cluster being followed.
struct Followed {
    cds: Watch<ClusterResource>,
    eds: Option<(String, Watch<EndpointsResource>)>,
    balancer: Option<(LbPolicy, Balancer<Body>, ChangeSender)>,
    pushed_version: Option<String>,
    forwarders: Vec<AbortOnDrop>,
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
                    let forwarders = vec![forward(&cds, &dirty_tx)];
                    Followed { cds, eds: None, balancer: None, pushed_version: None, forwarders }
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
                                .map(|(_, b, _)| (c.clone(), ClusterEntry { balancer: b.clone() }))
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

fn reconcile_cluster(client: &XdsClient, name: &str, f: &mut Followed, config: &BalancerConfig, dirty: &mpsc::UnboundedSender<()>) {
    let Some(cluster) = f.cds.value() else { return };
    let cluster = &cluster.cluster;
    // (Re)build the balancer when the LB policy changes.
    if f.balancer.as_ref().is_none_or(|(lb, _, _)| *lb != cluster.lb) {
        let (sender, source) = discover::channel();
        let mut cfg = config.clone();
        cfg.lb = cluster.lb.clone();
        cfg.connection.connect_timeout = cluster.policies.connection.connect_timeout;
        let balancer = Balancer::new(format!("xds cluster {name}"), source, cfg);
        f.balancer = Some((cluster.lb.clone(), balancer, sender));
        f.pushed_version = None;
    }
    let Some((_, _, sender)) = &f.balancer else { return };
    match &cluster.discovery {
        ClusterDiscovery::Static => {
            if f.pushed_version.is_none() {
                sender.send(Change::Reset(cluster.endpoints.clone()));
                f.pushed_version = Some("static".into());
            }
        }
        ClusterDiscovery::LogicalDns { .. } => {
            // Warn once per balancer, not on every reconcile.
            if f.pushed_version.is_none() {
                tracing::warn!(cluster = name, "LOGICAL_DNS clusters are not wired into xDS routing yet");
                f.pushed_version = Some("unsupported".into());
            }
        }
        ClusterDiscovery::Eds { service_name } => {
            let eds_name = service_name.clone().unwrap_or_else(|| name.to_owned());
            if f.eds.as_ref().is_none_or(|(n, _)| *n != eds_name) {
                let w: Watch<EndpointsResource> = client.watch(&eds_name);
                f.forwarders.push(forward(&w, dirty));
                f.eds = Some((eds_name, w));
                f.pushed_version = None;
            }
            if let Some((_, w)) = &mut f.eds {
                let state = w.state();
                if let Some(value) = state.value.clone().and_then(xds_client::Typed::<EndpointsResource>::new)
                    && f.pushed_version.as_deref() != Some(state.version.as_str())
                {
                    let endpoints: Vec<Endpoint> = value.endpoints.endpoints.clone();
                    sender.send(Change::Reset(endpoints));
                    f.pushed_version = Some(state.version.clone());
                }
            }
        }
    }
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
