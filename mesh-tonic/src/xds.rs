//! `xds:///name` targets: routing driven by an xDS control plane.
//!
//! A background task follows LDS → RDS → CDS for the target and feeds a route-table [`Publisher`]: each
//! cluster of the routes becomes a [`ClusterTarget`] (its LB policy, connect timeout and TLS policy, and its
//! endpoints from EDS, from the cluster itself, or from DNS for LOGICAL_DNS), built and rebuilt by the
//! publisher exactly when that target changes. A new route table is published only once every cluster it
//! names has arrived (A74), so a route never points at an unknown cluster; a cluster being rebuilt keeps
//! serving until its replacement can. While the control plane is away the last table keeps serving.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use mesh_core::{ClusterDiscovery, Route, RouteAction, RouteConfig};
use mesh_tower::balance::BalancerConfig;
use mesh_tower::cluster::{ClusterTarget, Discovery, NewCluster, Source, StandardDiscovery};
use mesh_tower::discover::dns::{DnsConfig, DnsQuery};
use mesh_tower::discover::{self, BoxDiscover, Change};
use mesh_tower::route::{Publisher, Router};
use mesh_tower::tls::{CredentialsSource, MakeMtls};
use tokio::sync::mpsc;
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

/// Keeps an `xds:///` target's tables coming; dropping it stops following.
#[derive(Debug)]
pub(crate) struct Follower {
    _task: AbortOnDrop,
}

#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The bootstrap's `file_watcher` certificate provider instances, each watching its files (gRPC's A29). An
/// instance whose files cannot be read now is left out with an error logged: a cluster naming it fails its
/// connections with that reason, never goes out without TLS.
pub(crate) fn certificate_providers(bootstrap: &xds_client::Bootstrap) -> std::collections::BTreeMap<String, CredentialsSource> {
    let mut providers = std::collections::BTreeMap::new();
    for (name, provider) in &bootstrap.certificate_providers {
        let Some(config) = &provider.file_watcher else {
            tracing::warn!(instance = %name, plugin = %provider.plugin_name, "certificate provider plugin not supported; only file_watcher");
            continue;
        };
        let path = |file: &Option<String>| file.as_ref().map(std::path::PathBuf::from);
        let watcher = mesh_tower::tls::FileWatcher {
            certificate_file: path(&config.certificate_file),
            private_key_file: path(&config.private_key_file),
            ca_certificate_file: path(&config.ca_certificate_file),
            spiffe_trust_bundle_map_file: path(&config.spiffe_trust_bundle_map_file),
            refresh_interval: config.refresh_interval,
        };
        match watcher.start() {
            Ok(source) => drop(providers.insert(name.clone(), source)),
            Err(error) => tracing::error!(instance = %name, %error, "certificate provider instance unusable"),
        }
    }
    providers
}

/// Starts following `xds:///name`: the router of its tables, and the task that publishes them.
pub(crate) fn follow(
    client: XdsClient,
    name: &str,
    config: BalancerConfig,
    connectors: MakeMtls,
    metrics: Option<mesh_tower::telemetry::ClientMetrics>,
) -> (Router<Body>, Follower) {
    let server = client.bootstrap().servers.first().map(|s| s.server_uri.clone()).unwrap_or_default();
    let (dirty_tx, dirty) = mpsc::unbounded_channel::<()>();
    let mut new_cluster = NewCluster::new(Arc::new(XdsDiscovery { client: client.clone() }), connectors);
    if let Some(metrics) = metrics {
        new_cluster = new_cluster.with_metrics(metrics);
    }
    let target = format!("xds:///{name}");
    let (publisher, router) =
        Publisher::new(&target, &format!("xDS server {server}"), config.ready_timeout, new_cluster, Some(dirty_tx.clone()));
    let task = tokio::spawn(run(client, name.to_owned(), config, publisher, dirty_tx, dirty));
    (router, Follower { _task: AbortOnDrop(task.abort_handle()) })
}

/// EDS sources from the xDS client; static and DNS ones as every target has them.
struct XdsDiscovery {
    client: XdsClient,
}

impl Discovery for XdsDiscovery {
    fn discover(&self, cluster: &str, source: &Source) -> mesh_tower::Result<BoxDiscover> {
        match source {
            Source::Eds(name) => Ok(eds_source(self.client.watch(name))),
            other => StandardDiscovery.discover(cluster, other),
        }
    }
}

/// What a CDS cluster builds: the channel's balancer settings with the cluster's LB policy, connect timeout,
/// TLS policy and outlier detection, and its endpoint source.
fn cluster_target(
    name: &str,
    cluster: &mesh_core::Cluster,
    channel: &BalancerConfig,
    adaptive: Option<&mesh_core::policy::AdaptiveConcurrency>,
) -> ClusterTarget {
    let mut balancer = channel.clone();
    balancer.lb = cluster.lb.clone();
    balancer.connection.connect_timeout = cluster.policies.connection.connect_timeout;
    // The cluster's own TLS policy; else the channel's (mTLS asked for on the channel, as with grpcurl).
    balancer.tls = cluster.policies.tls.clone().or_else(|| channel.tls.clone());
    balancer.outlier_detection = cluster.policies.outlier_detection.clone();
    let source = match &cluster.discovery {
        ClusterDiscovery::Static => Source::Static(cluster.endpoints.clone()),
        ClusterDiscovery::Eds { service_name } => Source::Eds(service_name.clone().unwrap_or_else(|| name.to_owned())),
        // The name is resolved by the client and every answer is an endpoint, balanced by the cluster's policy
        // and re-resolved at its TTL (Envoy's STRICT_DNS behaviour: Envoy's LOGICAL_DNS connects to the first
        // answer only; spreading over all of them is the mesh's choice).
        ClusterDiscovery::LogicalDns { host, port } => {
            Source::Dns { server: None, query: DnsQuery::Host { name: host.clone(), port: *port }, config: DnsConfig::default() }
        }
    };
    // The listener's adaptive concurrency filter gives each cluster a limiter of its own (a cluster's own
    // setting, from a static or DNS target's builder, would come first).
    let adaptive = cluster.policies.adaptive_concurrency.clone().or_else(|| adaptive.cloned());
    ClusterTarget { name: name.to_owned(), balancer, source, breakers: cluster.policies.circuit_breakers.clone(), adaptive }
}

/// Follows the target's listener, route config and clusters, and publishes a table whenever they change.
async fn run(
    client: XdsClient,
    name: String,
    config: BalancerConfig,
    mut publisher: Publisher<Body, MakeMtls>,
    dirty_tx: mpsc::UnboundedSender<()>,
    mut dirty: mpsc::UnboundedReceiver<()>,
) {
    let listener_name = client.bootstrap().listener_name_for_target(&name);
    let lds: Watch<ListenerResource> = client.watch(&listener_name);
    let _lds_forward = forward(&lds, &dirty_tx);
    let mut rds: Option<(String, Watch<RouteConfig>, AbortOnDrop)> = None;
    let mut clusters: HashMap<String, (Watch<ClusterResource>, AbortOnDrop)> = HashMap::new();
    let mut unsupported = Unsupported::default();
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
        let mut routes: Option<Vec<Route>> = route_config.and_then(|rc| rc.virtual_host_for(&name).map(|vh| vh.routes.clone()));
        // The listener's fault filter applies to every route, unless a route overrides it; without the filter,
        // overrides have nothing to override (A39).
        let listener = lds.value();
        if let Some(listener) = &listener {
            unsupported.listener(listener);
        }
        unsupported.server_listener(&listener_name, listener.is_none() && lds.status() == ResourceStatus::Acked);
        let listener_fault = listener.as_ref().and_then(|l| l.fault.clone());
        for route in routes.iter_mut().flatten() {
            route.policies.fault = listener_fault.as_ref().map(|base| route.policies.fault.take().unwrap_or_else(|| base.clone()));
            // The listener's rate limit is one bucket for the target's calls, whatever their route.
            route.policies.rate_limit = listener.as_ref().and_then(|l| l.rate_limit.clone());
        }

        // Clusters the routes name: follow each, hand its target to the publisher.
        if let Some(routes) = &routes {
            let wanted: Vec<String> = routes
                .iter()
                .filter_map(|r| match &r.action {
                    RouteAction::Clusters(c) => {
                        Some(c.iter().map(|w| w.cluster.clone()).chain(r.policies.mirrors.iter().map(|m| m.cluster.clone())))
                    }
                    RouteAction::NonForwarding => None,
                })
                .flatten()
                .collect();
            for cluster in &wanted {
                clusters.entry(cluster.clone()).or_insert_with(|| {
                    let cds: Watch<ClusterResource> = client.watch(cluster);
                    let forwarder = forward(&cds, &dirty_tx);
                    (cds, forwarder)
                });
            }
            for (cluster_name, (cds, _)) in &clusters {
                if let Some(cluster) = cds.value() {
                    let adaptive = listener.as_ref().and_then(|l| l.adaptive_concurrency.as_ref());
                    publisher.cluster(&cluster_target(cluster_name, &cluster.cluster, &config, adaptive));
                }
            }
            // A74: switch tables only when every named cluster is known (built, or gone from the server).
            let missing: Vec<&String> =
                wanted.iter().filter(|c| !publisher.has_cluster(c) && clusters.get(*c).is_none_or(|(cds, _)| !is_gone(cds))).collect();
            if missing.is_empty() {
                publisher.publish(routes);
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

/// Says, once per change, which accepted policies this client does not enforce yet (the mesh's rule: config is
/// enforced, NACKed, or logged as unsupported, never silently ignored).
#[derive(Default)]
struct Unsupported {
    /// How many RBAC filters the listener carried when last said.
    rbac_filters: usize,
    /// Whether the listener was last said to be a server's.
    server_listener: bool,
}

impl Unsupported {
    /// RBAC is a server-side filter (A41): a client listener's RBAC filters are decoded but not enforced here.
    fn listener(&mut self, listener: &ListenerResource) {
        if listener.rbac.len() != self.rbac_filters {
            if !listener.rbac.is_empty() {
                tracing::warn!(
                    listener = %listener.name,
                    filters = listener.rbac.len(),
                    "RBAC filters on a client listener are not enforced: authorization applies where calls are received"
                );
            }
            self.rbac_filters = listener.rbac.len();
        }
    }

    /// An accepted listener that is not an API listener is a server's (A36): a client has no routes from it.
    fn server_listener(&mut self, name: &str, is: bool) {
        if is != self.server_listener {
            if is {
                tracing::warn!(listener = name, "the listener is a server listener (no api_listener): a client cannot route by it");
            }
            self.server_listener = is;
        }
    }
}

fn is_gone<T: xds_client::XdsResource>(w: &Watch<T>) -> bool {
    w.status() == ResourceStatus::DoesNotExist
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
pub(crate) fn forward<T: xds_client::XdsResource>(w: &Watch<T>, dirty: &mpsc::UnboundedSender<()>) -> AbortOnDrop {
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
