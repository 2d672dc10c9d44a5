//! A scriptable xDS ADS management server for end-to-end tests of xDS
//! clients.
//!
//! [`AdsServer`] is a real tonic gRPC server on 127.0.0.1 serving both
//! `StreamAggregatedResources` (state of the world, "SotW") and
//! `DeltaAggregatedResources` (incremental). Tests put resources into its
//! snapshot store with [`AdsServer::set`] / [`AdsServer::remove`]; every
//! change bumps that type's version ("1", "2", ...) and is pushed at once to
//! every open stream subscribed to it. Every request received and every
//! response sent is recorded for assertions ([`AdsServer::requests`],
//! [`AdsServer::sent`], [`AdsServer::wait_for`]).
//!
//! Protocol behaviour (Envoy's xDS protocol):
//! - SotW: each response carries the type's `version_info` and a fresh nonce.
//!   A request whose `response_nonce` is the last nonce sent on that stream
//!   for that type is an ACK (no `error_detail`) or a NACK; a request with
//!   another non-empty nonce is stale. Every request's `resource_names`
//!   replaces the stream's subscription for the type (a request always
//!   carries the full list). An empty list on the first request for a type,
//!   or `"*"`, is a wildcard subscription (all resources of the type).
//!   Responses carry every subscribed resource the store has, and are sent
//!   whenever that set (or one of its versions) differs from what the stream
//!   was last sent. Listener and Cluster subscriptions (and wildcards) get a
//!   response on every subscription change even when nothing is known (an
//!   empty list tells the client the resources do not exist); for other
//!   types nothing is sent for unknown names (the client's does-not-exist
//!   timer decides).
//! - Delta: `resource_names_subscribe` / `resource_names_unsubscribe` edit the
//!   subscription (`"*"` or an empty first subscribe list means wildcard);
//!   `initial_resource_versions` seed what the client already has, so
//!   resources whose version matches are not resent. Responses carry only
//!   changed resources (each with its own version: the type version at which
//!   it last changed) and `removed_resources` for subscribed resources the
//!   client has that are gone. Nothing is sent for unknown names. Each
//!   response has a fresh nonce; a request naming an outstanding nonce is an
//!   ACK or NACK.
//!
//! [`AdsServer::stop`] kills the server abruptly: the listener closes and
//! every connection is dropped without a gRPC status, as if the control
//! plane process died. [`AdsServer::restart`] listens again on the same
//! address with the same store.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::{self, Write as _};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status, Streaming};

/// Type URLs of the four resource types.
pub mod type_url {
    /// `envoy.config.listener.v3.Listener` (LDS).
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// `envoy.config.route.v3.RouteConfiguration` (RDS).
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// `envoy.config.cluster.v3.Cluster` (CDS).
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
}

/// Builders of typical resources, packed as `Any` (the `*_proto` variants
/// return the message itself, for tests that tweak fields first).
pub mod build {
    use std::net::SocketAddr;

    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy};
    use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
    use envoy_types::pb::envoy::config::core::v3::socket_address::{PortSpecifier, Protocol};
    use envoy_types::pb::envoy::config::core::v3::{
        Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality, SocketAddress, address,
    };
    use envoy_types::pb::envoy::config::endpoint::v3::cluster_load_assignment::{Policy, policy::DropOverload};
    use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint};
    use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
    use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
    use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
    use envoy_types::pb::envoy::config::route::v3::weighted_cluster::ClusterWeight;
    use envoy_types::pb::envoy::config::route::v3::{
        Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster, route,
    };
    use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, HttpFilter, Rds, http_filter,
    };
    use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent::DenominatorType};
    use envoy_types::pb::google::protobuf::{Any, UInt32Value};

    /// Packs any message into an `Any` with its canonical type URL.
    pub fn pack<T: prost::Name>(message: T) -> Any {
        envoy_types::util::pack_any(message)
    }

    /// `ConfigSource` pointing at the ADS stream (v3), as RDS and EDS use.
    pub fn ads_config_source() -> ConfigSource {
        ConfigSource {
            config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
            resource_api_version: ApiVersion::V3 as i32,
            ..Default::default()
        }
    }

    /// The terminal router HTTP filter.
    pub fn router_filter() -> HttpFilter {
        HttpFilter {
            name: "envoy.filters.http.router".to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack(Router::default()))),
            ..Default::default()
        }
    }

    fn api_listener(name: &str, route_specifier: RouteSpecifier) -> Listener {
        let hcm = HttpConnectionManager {
            stat_prefix: name.to_owned(),
            route_specifier: Some(route_specifier),
            http_filters: vec![router_filter()],
            ..Default::default()
        };
        Listener { name: name.to_owned(), api_listener: Some(ApiListener { api_listener: Some(pack(hcm)) }), ..Default::default() }
    }

    /// An API listener whose HttpConnectionManager gets route configuration
    /// `route_config_name` by RDS over ADS, with the router filter.
    pub fn listener_proto(name: &str, route_config_name: &str) -> Listener {
        api_listener(
            name,
            RouteSpecifier::Rds(Rds { config_source: Some(ads_config_source()), route_config_name: route_config_name.to_owned() }),
        )
    }

    /// [`listener_proto`], packed.
    pub fn listener(name: &str, route_config_name: &str) -> Any {
        pack(listener_proto(name, route_config_name))
    }

    /// An API listener with `route_config` inline in its
    /// HttpConnectionManager, with the router filter.
    pub fn listener_inline(name: &str, route_config: RouteConfiguration) -> Any {
        pack(api_listener(name, RouteSpecifier::RouteConfig(route_config)))
    }

    /// A route configuration with one virtual host for `domains` and one
    /// route matching every path (prefix `""`). With one entry in
    /// `weighted` the route sends to that cluster (its weight is ignored);
    /// otherwise to weighted clusters (none at all is invalid, for NACK
    /// tests).
    pub fn route_config_proto(name: &str, domains: &[&str], weighted: &[(&str, u32)]) -> RouteConfiguration {
        let cluster_specifier = match weighted {
            [(cluster, _)] => ClusterSpecifier::Cluster((*cluster).to_owned()),
            _ => ClusterSpecifier::WeightedClusters(WeightedCluster {
                clusters: weighted
                    .iter()
                    .map(|(cluster, weight)| ClusterWeight {
                        name: (*cluster).to_owned(),
                        weight: Some(UInt32Value { value: *weight }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
        };
        let route = Route {
            r#match: Some(RouteMatch { path_specifier: Some(PathSpecifier::Prefix(String::new())), ..Default::default() }),
            action: Some(route::Action::Route(RouteAction { cluster_specifier: Some(cluster_specifier), ..Default::default() })),
            ..Default::default()
        };
        RouteConfiguration {
            name: name.to_owned(),
            virtual_hosts: vec![VirtualHost {
                name: format!("{name}-vhost"),
                domains: domains.iter().map(|d| (*d).to_owned()).collect(),
                routes: vec![route],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// [`route_config_proto`], packed.
    pub fn route_config(name: &str, domains: &[&str], weighted: &[(&str, u32)]) -> Any {
        pack(route_config_proto(name, domains, weighted))
    }

    /// An EDS cluster getting its endpoints over ADS (`service_name` =
    /// `name`) with load-balancing policy `lb`: `"round_robin"`,
    /// `"ring_hash"` or `"least_request"`.
    ///
    /// # Panics
    /// On any other `lb` (a mistake in the test itself).
    pub fn cluster_eds_proto(name: &str, lb: &str) -> Cluster {
        let lb_policy = match lb {
            "round_robin" => LbPolicy::RoundRobin,
            "ring_hash" => LbPolicy::RingHash,
            "least_request" => LbPolicy::LeastRequest,
            other => panic!("unknown lb policy {other:?}: use round_robin, ring_hash or least_request"),
        };
        Cluster {
            name: name.to_owned(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            eds_cluster_config: Some(EdsClusterConfig { eds_config: Some(ads_config_source()), service_name: name.to_owned() }),
            lb_policy: lb_policy as i32,
            ..Default::default()
        }
    }

    /// [`cluster_eds_proto`], packed.
    pub fn cluster_eds(name: &str, lb: &str) -> Any {
        pack(cluster_eds_proto(name, lb))
    }

    /// A LOGICAL_DNS cluster: the client resolves `host` and connects to `port` on the answers.
    pub fn cluster_logical_dns(name: &str, host: &str, port: u16) -> Any {
        let mut assignment = endpoints_proto(name, &[(SocketAddr::from(([127, 0, 0, 1], port)), 1)]);
        if let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = assignment.endpoints[0].lb_endpoints[0].host_identifier.as_mut()
            && let Some(address::Address::SocketAddress(socket)) = endpoint.address.as_mut().and_then(|a| a.address.as_mut())
        {
            host.clone_into(&mut socket.address);
        }
        pack(Cluster {
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::LogicalDns as i32)),
            eds_cluster_config: None,
            load_assignment: Some(assignment),
            ..cluster_eds_proto(name, "round_robin")
        })
    }

    /// Endpoints of `cluster_name`: one locality (weight 1, priority 0)
    /// holding each address with its weight, all HEALTHY. No addresses give
    /// no localities at all.
    pub fn endpoints_proto(cluster_name: &str, endpoints: &[(SocketAddr, u32)]) -> ClusterLoadAssignment {
        let lb_endpoints: Vec<LbEndpoint> = endpoints
            .iter()
            .map(|(addr, weight)| LbEndpoint {
                health_status: HealthStatus::Healthy as i32,
                load_balancing_weight: Some(UInt32Value { value: *weight }),
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            protocol: Protocol::Tcp as i32,
                            address: addr.ip().to_string(),
                            port_specifier: Some(PortSpecifier::PortValue(u32::from(addr.port()))),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            })
            .collect();
        let localities = if lb_endpoints.is_empty() {
            Vec::new()
        } else {
            vec![LocalityLbEndpoints {
                locality: Some(Locality { region: "test-region".to_owned(), zone: "test-zone".to_owned(), ..Default::default() }),
                lb_endpoints,
                load_balancing_weight: Some(UInt32Value { value: 1 }),
                priority: 0,
                ..Default::default()
            }]
        };
        ClusterLoadAssignment { cluster_name: cluster_name.to_owned(), endpoints: localities, ..Default::default() }
    }

    /// Endpoints of `cluster_name`, each of weight 1 (see
    /// [`endpoints_proto`]).
    pub fn endpoints(cluster_name: &str, addrs: &[SocketAddr]) -> Any {
        let weighted: Vec<(SocketAddr, u32)> = addrs.iter().map(|a| (*a, 1)).collect();
        pack(endpoints_proto(cluster_name, &weighted))
    }

    /// Endpoints of `cluster_name` in several localities (zone, locality weight, addresses), all priority 0,
    /// with `drops` as the policy's drop overloads (category, parts per million).
    pub fn endpoints_by_locality(cluster_name: &str, localities: &[(&str, u32, &[SocketAddr])], drops: &[(&str, u32)]) -> Any {
        let localities = localities
            .iter()
            .map(|(zone, weight, addrs)| {
                let weighted: Vec<(SocketAddr, u32)> = addrs.iter().map(|a| (*a, 1)).collect();
                let mut one = endpoints_proto(cluster_name, &weighted).endpoints.remove(0);
                one.locality = Some(Locality { region: "test-region".to_owned(), zone: (*zone).to_owned(), ..Default::default() });
                one.load_balancing_weight = Some(UInt32Value { value: *weight });
                one
            })
            .collect();
        let drop_overloads = drops
            .iter()
            .map(|(category, ppm)| DropOverload {
                category: (*category).to_owned(),
                drop_percentage: Some(FractionalPercent { numerator: *ppm, denominator: DenominatorType::Million as i32 }),
            })
            .collect();
        pack(ClusterLoadAssignment {
            cluster_name: cluster_name.to_owned(),
            endpoints: localities,
            policy: Some(Policy { drop_overloads, ..Default::default() }),
            ..Default::default()
        })
    }

    /// Endpoints of `cluster_name` with the given weights (see
    /// [`endpoints_proto`]).
    pub fn endpoints_weighted(cluster_name: &str, endpoints: &[(SocketAddr, u32)]) -> Any {
        pack(endpoints_proto(cluster_name, endpoints))
    }
}

/// What a recorded request was, relative to the stream's state when it
/// arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// No `response_nonce`: a first request or a subscription change.
    Subscribe,
    /// Named the nonce awaiting an answer, without `error_detail`.
    Ack,
    /// Named the nonce awaiting an answer, with `error_detail`.
    Nack,
    /// Named a nonce that is not (or no longer) awaiting an answer.
    Stale,
}

/// One request received, as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// Stream it came on (1, 2, ... over the server's life, across restarts).
    pub stream_id: u64,
    /// Whether it came on a delta stream.
    pub delta: bool,
    /// Its classification.
    pub kind: RequestKind,
    /// Resource type.
    pub type_url: String,
    /// SotW `version_info` (empty for delta).
    pub version_info: String,
    /// `response_nonce`.
    pub response_nonce: String,
    /// SotW `resource_names`; delta `resource_names_subscribe`.
    pub resource_names: Vec<String>,
    /// Delta `resource_names_unsubscribe` (empty for SotW).
    pub unsubscribe: Vec<String>,
    /// Delta `initial_resource_versions` (empty for SotW).
    pub initial_resource_versions: BTreeMap<String, String>,
    /// `error_detail.message`, when `error_detail` is set.
    pub error_detail: Option<String>,
    /// `node.id`, when the request carries a node (usually only the first
    /// request of a stream does).
    pub node_id: Option<String>,
}

impl Recorded {
    /// Whether it is an ACK.
    pub fn is_ack(&self) -> bool {
        self.kind == RequestKind::Ack
    }

    /// Whether it carries `error_detail` (a NACK, possibly stale).
    pub fn is_nack(&self) -> bool {
        self.error_detail.is_some()
    }
}

impl fmt::Display for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stream {} {} {:?} {} version={:?} nonce={:?} names={:?}",
            self.stream_id,
            if self.delta { "delta" } else { "sotw" },
            self.kind,
            short_type(&self.type_url),
            self.version_info,
            self.response_nonce,
            self.resource_names
        )?;
        if !self.unsubscribe.is_empty() {
            write!(f, " unsubscribe={:?}", self.unsubscribe)?;
        }
        if !self.initial_resource_versions.is_empty() {
            write!(f, " initial={:?}", self.initial_resource_versions)?;
        }
        if let Some(error) = &self.error_detail {
            write!(f, " error={error:?}")?;
        }
        if let Some(node) = &self.node_id {
            write!(f, " node={node:?}")?;
        }
        Ok(())
    }
}

/// One response sent, as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// Stream it went on.
    pub stream_id: u64,
    /// Whether it went on a delta stream.
    pub delta: bool,
    /// Resource type.
    pub type_url: String,
    /// SotW `version_info`; delta `system_version_info`.
    pub version: String,
    /// Its nonce.
    pub nonce: String,
    /// Names of the resources it carries, in order.
    pub resources: Vec<String>,
    /// Delta `removed_resources` (empty for SotW).
    pub removed: Vec<String>,
}

impl fmt::Display for Sent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stream {} {} {} version={:?} nonce={:?} resources={:?}",
            self.stream_id,
            if self.delta { "delta" } else { "sotw" },
            short_type(&self.type_url),
            self.version,
            self.nonce,
            self.resources
        )?;
        if !self.removed.is_empty() {
            write!(f, " removed={:?}", self.removed)?;
        }
        Ok(())
    }
}

fn short_type(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

/// A running (or stopped) ADS server with its snapshot store and logs.
///
/// Dropping it kills the server like [`AdsServer::stop`], without waiting.
#[derive(Debug)]
pub struct AdsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    running: Option<Running>,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

#[derive(Debug)]
struct Running {
    kill: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl AdsServer {
    /// Starts a server on `127.0.0.1:0` with an empty store.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a server on `addr` with an empty store (for example the
    /// address of a server stopped or dropped earlier: an address in use is
    /// retried for up to 2 s; use [`AdsServer::restart`] to keep the store).
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut server = Self { addr, shared: Arc::new(Shared::new()), running: None, tls: None };
        server.listen(addr).await?;
        Ok(server)
    }

    /// Starts a server on a Unix socket at `path` (as Istio's agent serves proxyless gRPC) with an empty
    /// store, speaking TLS only when `tls` is given. [`AdsServer::addr`] means nothing for it.
    pub async fn start_unix(path: &std::path::Path, tls: Option<tonic::transport::ServerTlsConfig>) -> anyhow::Result<Self> {
        let listener = tokio::net::UnixListener::bind(path)?;
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls.clone() {
            builder = builder.tls_config(tls)?;
        }
        let shared = Arc::new(Shared::new());
        let (kill, kill_rx) = watch::channel(false);
        let service = AdsService { shared: shared.clone(), kill: kill_rx };
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let served = builder.add_service(AggregatedDiscoveryServiceServer::new(service)).serve_with_incoming(incoming).await;
            if let Err(error) = served {
                tracing::error!(%error, "ADS server failed");
            }
        });
        let unbound = SocketAddr::from(([0, 0, 0, 0], 0));
        Ok(Self { addr: unbound, shared, running: Some(Running { kill, task }), tls })
    }

    /// Starts a server on `127.0.0.1:0` that speaks TLS only (`tls` names its identity and, for mutual TLS,
    /// the CA its clients' certificates must chain to).
    pub async fn start_tls(tls: tonic::transport::ServerTlsConfig) -> anyhow::Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut server = Self { addr, shared: Arc::new(Shared::new()), running: None, tls: Some(tls) };
        server.listen(addr).await?;
        Ok(server)
    }

    async fn listen(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let listener = bind(addr).await?;
        self.addr = listener.local_addr()?;
        let (kill, kill_rx) = watch::channel(false);
        let service = AdsService { shared: self.shared.clone(), kill: kill_rx.clone() };
        let incoming = TcpListenerStream::new(listener).map(move |stream| {
            stream.map(|stream| {
                // Without TCP_NODELAY small responses wait for delayed ACKs.
                let _ = stream.set_nodelay(true);
                KillableIo::new(stream, kill_rx.clone())
            })
        });
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls.clone() {
            builder = builder.tls_config(tls)?;
        }
        let task = tokio::spawn(async move {
            let served = builder.add_service(AggregatedDiscoveryServiceServer::new(service)).serve_with_incoming(incoming).await;
            if let Err(error) = served {
                tracing::error!(%error, "ADS server failed");
            }
        });
        self.running = Some(Running { kill, task });
        Ok(())
    }

    /// Where it listens (or listened, when stopped).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, for clients.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Whether it is listening.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Kills the server abruptly, as if the control plane died: stops
    /// listening and drops every connection without a gRPC status. The store
    /// and the logs are kept. Does nothing when already stopped.
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            // Connections first, so no stream ends with a clean status.
            running.kill.send_replace(true);
            running.task.abort();
            let _ = running.task.await;
        }
        let streams: Vec<JoinHandle<()>> = self.shared.lock().streams.drain().map(|(_, handle)| handle).collect();
        for handle in &streams {
            handle.abort();
        }
        for handle in streams {
            let _ = handle.await;
        }
    }

    /// Listens again on the same address with the same store and logs
    /// (stopping first if running). Stream ids go on from where they were.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        self.listen(self.addr).await
    }

    /// Sets resource `name` of `type_url` (any bytes: a deliberately invalid
    /// `Any` scripts a NACK) and pushes it; returns the type's new version.
    pub fn set(&self, type_url: &str, name: &str, resource: Any) -> String {
        self.set_many(type_url, [(name, resource)])
    }

    /// Sets several resources of `type_url` as one change (one version
    /// bump, one push); returns the type's new version.
    pub fn set_many<N: Into<String>>(&self, type_url: &str, resources: impl IntoIterator<Item = (N, Any)>) -> String {
        self.shared.change(|store| {
            let types = store.entry(type_url.to_owned()).or_default();
            types.version += 1;
            let version = types.version;
            for (name, resource) in resources {
                types.resources.insert(name.into(), Entry { resource, version });
            }
            version.to_string()
        })
    }

    /// Removes resource `name` of `type_url` and pushes the removal; returns
    /// whether it was there (nothing changes, no version bump, if not).
    pub fn remove(&self, type_url: &str, name: &str) -> bool {
        self.remove_many(type_url, [name]) > 0
    }

    /// Removes several resources of `type_url` as one change; returns how
    /// many were there.
    pub fn remove_many<'a>(&self, type_url: &str, names: impl IntoIterator<Item = &'a str>) -> usize {
        self.shared.change(|store| {
            let Some(types) = store.get_mut(type_url) else { return 0 };
            let removed = names.into_iter().filter(|name| types.resources.remove(*name).is_some()).count();
            if removed > 0 {
                types.version += 1;
            }
            removed
        })
    }

    /// Bumps the version of `type_url` and of all its resources, pushing
    /// them all again unchanged; returns the new version.
    pub fn bump(&self, type_url: &str) -> String {
        self.shared.change(|store| {
            let types = store.entry(type_url.to_owned()).or_default();
            types.version += 1;
            let version = types.version;
            for entry in types.resources.values_mut() {
                entry.version = version;
            }
            version.to_string()
        })
    }

    /// Current version of `type_url` (`"0"` before its first change).
    pub fn version(&self, type_url: &str) -> String {
        self.shared.lock().store.get(type_url).map_or(0, |t| t.version).to_string()
    }

    /// Resource `name` of `type_url`, if set.
    pub fn get(&self, type_url: &str, name: &str) -> Option<Any> {
        self.shared.lock().store.get(type_url).and_then(|t| t.resources.get(name)).map(|e| e.resource.clone())
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// Requests carrying `error_detail`, in order.
    pub fn nacks(&self) -> Vec<Recorded> {
        self.shared.lock().requests.iter().filter(|r| r.is_nack()).cloned().collect()
    }

    /// ACKs, in order.
    pub fn acks(&self) -> Vec<Recorded> {
        self.shared.lock().requests.iter().filter(|r| r.is_ack()).cloned().collect()
    }

    /// Every response sent so far, in order.
    pub fn sent(&self) -> Vec<Sent> {
        self.shared.lock().sent.clone()
    }

    /// Forgets the recorded requests and responses (streams keep their
    /// state).
    pub fn clear_log(&self) {
        let mut state = self.shared.lock();
        state.requests.clear();
        state.sent.clear();
    }

    /// ADS streams (SotW and delta) open now.
    pub fn connections(&self) -> usize {
        self.shared.lock().streams.len()
    }

    /// Waits until `predicate` holds over the recorded requests, and returns
    /// them; fails after `timeout` with a message listing every request and
    /// response. The predicate runs without any lock held (it may call this
    /// server's other methods), on every new request and every 50 ms.
    pub async fn wait_for(&self, mut predicate: impl FnMut(&[Recorded]) -> bool, timeout: Duration) -> anyhow::Result<Vec<Recorded>> {
        self.wait_until(timeout, "requests", || {
            let requests = self.requests();
            predicate(&requests).then_some(requests)
        })
        .await
    }

    /// Waits for an ACK of `version` of `type_url` (SotW: its
    /// `version_info`; delta: the `system_version_info` of the response its
    /// nonce answers), and returns it.
    pub async fn wait_for_ack(&self, type_url: &str, version: &str, timeout: Duration) -> anyhow::Result<Recorded> {
        self.wait_until(timeout, &format!("an ACK of {type_url} version {version:?}"), || {
            let state = self.shared.lock();
            state
                .requests
                .iter()
                .find(|r| {
                    r.is_ack()
                        && r.type_url == type_url
                        && (r.version_info == version
                            || state.sent.iter().any(|s| s.nonce == r.response_nonce && s.stream_id == r.stream_id && s.version == version))
                })
                .cloned()
        })
        .await
    }

    /// Waits for a NACK of `type_url` (a request with `error_detail`), and
    /// returns the first one.
    pub async fn wait_for_nack(&self, type_url: &str, timeout: Duration) -> anyhow::Result<Recorded> {
        self.wait_until(timeout, &format!("a NACK of {type_url}"), || {
            self.shared.lock().requests.iter().find(|r| r.is_nack() && r.type_url == type_url).cloned()
        })
        .await
    }

    /// Waits until `predicate` holds over the recorded responses, and
    /// returns them; fails after `timeout` like [`AdsServer::wait_for`].
    pub async fn wait_for_sent(&self, mut predicate: impl FnMut(&[Sent]) -> bool, timeout: Duration) -> anyhow::Result<Vec<Sent>> {
        self.wait_until(timeout, "responses", || {
            let sent = self.sent();
            predicate(&sent).then_some(sent)
        })
        .await
    }

    async fn wait_until<T>(&self, timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut log = self.shared.log.subscribe();
        loop {
            log.borrow_and_update();
            if let Some(found) = check() {
                return Ok(found);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            // A tick as well, for predicates that look at anything else.
            let _ = tokio::time::timeout_at(deadline.min(now + Duration::from_millis(50)), log.changed()).await;
        }
        let state = self.shared.lock();
        let mut message = format!("ADS server: {what} did not match within {timeout:?}\n{} requests:\n", state.requests.len());
        for request in &state.requests {
            let _ = writeln!(message, "  {request}");
        }
        let _ = writeln!(message, "{} responses:", state.sent.len());
        for sent in &state.sent {
            let _ = writeln!(message, "  {sent}");
        }
        let _ = write!(message, "{} streams open", state.streams.len());
        anyhow::bail!(message)
    }
}

impl Drop for AdsServer {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.kill.send_replace(true);
            running.task.abort();
        }
        let streams: Vec<JoinHandle<()>> = self.shared.lock().streams.drain().map(|(_, handle)| handle).collect();
        for handle in streams {
            handle.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// Shared state.

#[derive(Debug)]
struct Entry {
    resource: Any,
    /// Type version at which it last changed.
    version: u64,
}

#[derive(Debug, Default)]
struct TypeStore {
    version: u64,
    resources: BTreeMap<String, Entry>,
}

type Store = HashMap<String, TypeStore>;

#[derive(Debug, Default)]
struct State {
    store: Store,
    requests: Vec<Recorded>,
    sent: Vec<Sent>,
    streams: HashMap<u64, JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Bumped on every store change; streams watch it.
    changes: watch::Sender<u64>,
    /// Bumped on every request or response recorded; `wait_for` watches it.
    log: watch::Sender<u64>,
    next_stream: AtomicU64,
    next_nonce: AtomicU64,
}

impl Shared {
    fn new() -> Self {
        Self {
            state: Mutex::default(),
            changes: watch::channel(0).0,
            log: watch::channel(0).0,
            next_stream: AtomicU64::new(1),
            next_nonce: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn change<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let out = f(&mut self.lock().store);
        self.changes.send_modify(|n| *n += 1);
        out
    }

    fn nonce(&self) -> String {
        self.next_nonce.fetch_add(1, Ordering::Relaxed).to_string()
    }

    fn record_request(&self, request: Recorded) {
        tracing::debug!(%request, "ADS request");
        self.lock().requests.push(request);
        self.log.send_modify(|n| *n += 1);
    }

    fn record_sent(&self, sent: Sent) {
        tracing::debug!(%sent, "ADS response");
        self.lock().sent.push(sent);
        self.log.send_modify(|n| *n += 1);
    }

    /// Spawns a stream task, registered until it ends.
    fn spawn_stream<F: Future<Output = ()> + Send + 'static>(self: &Arc<Self>, task: impl FnOnce(u64) -> F) {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let guard = StreamGuard { shared: self.clone(), id };
        let future = task(id);
        // The lock is held across the spawn so the guard, which takes it,
        // cannot remove the entry before it is inserted.
        let mut state = self.lock();
        let handle = tokio::spawn(async move {
            let _guard = guard;
            future.await;
        });
        state.streams.insert(id, handle);
        drop(state);
        self.log.send_modify(|n| *n += 1);
    }
}

struct StreamGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let handle = self.shared.lock().streams.remove(&self.id);
        drop(handle);
        self.shared.log.send_modify(|n| *n += 1);
    }
}

// ---------------------------------------------------------------------------
// The gRPC service.

#[derive(Debug)]
struct AdsService {
    shared: Arc<Shared>,
    /// Set when this incarnation of the server is stopped.
    kill: watch::Receiver<bool>,
}

type ResponseStream<T> = ReceiverStream<Result<T, Status>>;

/// Responses buffered per stream before the stream task waits for the client.
const STREAM_BUFFER: usize = 16;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        if *self.kill.borrow() {
            return Err(Status::unavailable("ADS server stopped"));
        }
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let shared = self.shared.clone();
        let kill = self.kill.clone();
        self.shared.spawn_stream(move |id| SotwStream { shared, id, tx, types: HashMap::new() }.run(inbound, kill));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        if *self.kill.borrow() {
            return Err(Status::unavailable("ADS server stopped"));
        }
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let shared = self.shared.clone();
        let kill = self.kill.clone();
        self.shared.spawn_stream(move |id| DeltaStream { shared, id, tx, types: HashMap::new() }.run(inbound, kill));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What woke a stream task.
enum Event<T> {
    Request(T),
    /// The store changed.
    Changed,
    /// The client closed, the stream broke, or the server was stopped.
    End,
}

/// Waits for the next request, store change or end.
async fn next_event<T>(inbound: &mut Streaming<T>, changes: &mut watch::Receiver<u64>, kill: &mut watch::Receiver<bool>) -> Event<T> {
    tokio::select! {
        message = inbound.message() => match message {
            Ok(Some(request)) => Event::Request(request),
            Ok(None) => Event::End,
            Err(status) => {
                tracing::debug!(%status, "ADS stream broke");
                Event::End
            }
        },
        changed = changes.changed() => if changed.is_ok() { Event::Changed } else { Event::End },
        _ = kill.wait_for(|killed| *killed) => Event::End,
    }
}

fn is_listener_or_cluster(type_url: &str) -> bool {
    type_url == type_url::LISTENER || type_url == type_url::CLUSTER
}

fn error_message(error: Option<&envoy_types::pb::google::rpc::Status>) -> Option<String> {
    error.map(|status| status.message.clone())
}

// ---------------------------------------------------------------------------
// State of the world.

#[derive(Debug, Default)]
struct SotwType {
    names: BTreeSet<String>,
    wildcard: bool,
    /// An empty list still means wildcard (no names requested yet).
    legacy_wildcard: bool,
    /// Nonce awaiting ACK/NACK.
    nonce: Option<String>,
    /// Name -> resource version last sent.
    sent: BTreeMap<String, u64>,
    /// Respond even if nothing differs (subscription changed on a type
    /// whose responses state what does not exist).
    force: bool,
}

struct SotwStream {
    shared: Arc<Shared>,
    id: u64,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    types: HashMap<String, SotwType>,
}

impl SotwStream {
    async fn run(mut self, mut inbound: Streaming<DiscoveryRequest>, mut kill: watch::Receiver<bool>) {
        let mut changes = self.shared.changes.subscribe();
        loop {
            let dirty: Vec<String> = match next_event(&mut inbound, &mut changes, &mut kill).await {
                Event::Request(request) => match self.on_request(request) {
                    Ok(type_url) => vec![type_url],
                    Err(status) => {
                        let _ = self.tx.send(Err(status)).await;
                        return;
                    }
                },
                Event::Changed => self.types.keys().cloned().collect(),
                Event::End => return,
            };
            for type_url in dirty {
                if !self.respond(&type_url).await {
                    return;
                }
            }
        }
    }

    fn on_request(&mut self, request: DiscoveryRequest) -> Result<String, Status> {
        let error_detail = error_message(request.error_detail.as_ref());
        let first = !self.types.contains_key(&request.type_url);
        let sub = self.types.entry(request.type_url.clone()).or_default();
        let kind = if request.response_nonce.is_empty() {
            RequestKind::Subscribe
        } else if sub.nonce.as_deref() == Some(request.response_nonce.as_str()) {
            sub.nonce = None;
            if error_detail.is_some() { RequestKind::Nack } else { RequestKind::Ack }
        } else {
            RequestKind::Stale
        };
        self.shared.record_request(Recorded {
            stream_id: self.id,
            delta: false,
            kind,
            type_url: request.type_url.clone(),
            version_info: request.version_info,
            response_nonce: request.response_nonce,
            resource_names: request.resource_names.clone(),
            unsubscribe: Vec::new(),
            initial_resource_versions: BTreeMap::new(),
            error_detail,
            node_id: request.node.map(|node| node.id),
        });
        if request.type_url.is_empty() {
            self.types.remove("");
            return Err(Status::invalid_argument("ADS requests must set type_url"));
        }

        // Every request carries the whole subscription.
        if first {
            sub.legacy_wildcard = true;
        }
        let mut names: BTreeSet<String> = request.resource_names.into_iter().collect();
        if !names.is_empty() {
            sub.legacy_wildcard = false;
        }
        let wildcard = names.remove("*") || (sub.legacy_wildcard && names.is_empty());
        let changed = first || wildcard != sub.wildcard || names != sub.names;
        sub.wildcard = wildcard;
        sub.names = names;
        if !sub.wildcard {
            let names = &sub.names;
            sub.sent.retain(|name, _| names.contains(name));
        }
        if changed && (sub.wildcard || is_listener_or_cluster(&request.type_url)) {
            sub.force = true;
        }
        Ok(request.type_url)
    }

    /// Sends `type_url`'s subscribed resources if they differ from what
    /// was last sent; false once the client is gone.
    async fn respond(&mut self, type_url: &str) -> bool {
        let Some(sub) = self.types.get_mut(type_url) else { return true };
        let (version, resources) = {
            let state = self.shared.lock();
            match state.store.get(type_url) {
                None => (0, Vec::new()),
                Some(types) => {
                    let resources: Vec<(String, u64, Any)> = if sub.wildcard {
                        types.resources.iter().map(|(name, e)| (name.clone(), e.version, e.resource.clone())).collect()
                    } else {
                        sub.names
                            .iter()
                            .filter_map(|name| types.resources.get(name).map(|e| (name.clone(), e.version, e.resource.clone())))
                            .collect()
                    };
                    (types.version, resources)
                }
            }
        };
        let versions: BTreeMap<String, u64> = resources.iter().map(|(name, version, _)| (name.clone(), *version)).collect();
        if !sub.force && versions == sub.sent {
            return true;
        }
        let nonce = self.shared.nonce();
        sub.force = false;
        sub.sent = versions;
        sub.nonce = Some(nonce.clone());
        let response = DiscoveryResponse {
            version_info: version.to_string(),
            type_url: type_url.to_owned(),
            nonce: nonce.clone(),
            resources: resources.iter().map(|(_, _, any)| any.clone()).collect(),
            ..Default::default()
        };
        self.shared.record_sent(Sent {
            stream_id: self.id,
            delta: false,
            type_url: type_url.to_owned(),
            version: version.to_string(),
            nonce,
            resources: resources.into_iter().map(|(name, _, _)| name).collect(),
            removed: Vec::new(),
        });
        self.tx.send(Ok(response)).await.is_ok()
    }
}

// ---------------------------------------------------------------------------
// Delta.

/// Outstanding nonces kept per type (older ones count as stale).
const MAX_PENDING_NONCES: usize = 64;

#[derive(Debug, Default)]
struct DeltaType {
    names: BTreeSet<String>,
    wildcard: bool,
    /// Name -> version the client has (as sent, or as it told us).
    known: BTreeMap<String, String>,
    /// Nonces awaiting ACK/NACK.
    pending: VecDeque<String>,
}

struct DeltaStream {
    shared: Arc<Shared>,
    id: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    types: HashMap<String, DeltaType>,
}

impl DeltaStream {
    async fn run(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>, mut kill: watch::Receiver<bool>) {
        let mut changes = self.shared.changes.subscribe();
        loop {
            let dirty: Vec<String> = match next_event(&mut inbound, &mut changes, &mut kill).await {
                Event::Request(request) => match self.on_request(request) {
                    Ok(type_url) => vec![type_url],
                    Err(status) => {
                        let _ = self.tx.send(Err(status)).await;
                        return;
                    }
                },
                Event::Changed => self.types.keys().cloned().collect(),
                Event::End => return,
            };
            for type_url in dirty {
                if !self.respond(&type_url).await {
                    return;
                }
            }
        }
    }

    fn on_request(&mut self, request: DeltaDiscoveryRequest) -> Result<String, Status> {
        let error_detail = error_message(request.error_detail.as_ref());
        let first = !self.types.contains_key(&request.type_url);
        let sub = self.types.entry(request.type_url.clone()).or_default();
        let kind = if request.response_nonce.is_empty() {
            RequestKind::Subscribe
        } else if let Some(at) = sub.pending.iter().position(|n| *n == request.response_nonce) {
            // Answering a nonce answers every older one too.
            sub.pending.drain(..=at);
            if error_detail.is_some() { RequestKind::Nack } else { RequestKind::Ack }
        } else {
            RequestKind::Stale
        };
        self.shared.record_request(Recorded {
            stream_id: self.id,
            delta: true,
            kind,
            type_url: request.type_url.clone(),
            version_info: String::new(),
            response_nonce: request.response_nonce,
            resource_names: request.resource_names_subscribe.clone(),
            unsubscribe: request.resource_names_unsubscribe.clone(),
            initial_resource_versions: request.initial_resource_versions.clone().into_iter().collect(),
            error_detail,
            node_id: request.node.map(|node| node.id),
        });
        if request.type_url.is_empty() {
            self.types.remove("");
            return Err(Status::invalid_argument("ADS requests must set type_url"));
        }

        if first {
            sub.wildcard = request.resource_names_subscribe.is_empty();
            sub.known = request.initial_resource_versions.into_iter().collect();
        }
        for name in request.resource_names_subscribe {
            if name == "*" {
                sub.wildcard = true;
            } else {
                sub.names.insert(name);
            }
        }
        for name in request.resource_names_unsubscribe {
            if name == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(&name);
            }
        }
        if !sub.wildcard {
            // Forget what is no longer subscribed, so a later subscription
            // sends it again.
            let names = &sub.names;
            sub.known.retain(|name, _| names.contains(name));
        }
        Ok(request.type_url)
    }

    /// Sends changed and removed subscribed resources of `type_url`, if any;
    /// false once the client is gone.
    async fn respond(&mut self, type_url: &str) -> bool {
        let Some(sub) = self.types.get_mut(type_url) else { return true };
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let version = {
            let state = self.shared.lock();
            let empty = TypeStore::default();
            let types = state.store.get(type_url).unwrap_or(&empty);
            let candidates: BTreeSet<&String> = if sub.wildcard {
                types.resources.keys().chain(sub.known.keys()).chain(sub.names.iter()).collect()
            } else {
                sub.names.iter().collect()
            };
            for name in candidates {
                match types.resources.get(name) {
                    Some(entry) => {
                        let version = entry.version.to_string();
                        if sub.known.get(name) != Some(&version) {
                            resources.push(Resource {
                                name: name.clone(),
                                version: version.clone(),
                                resource: Some(entry.resource.clone()),
                                ..Default::default()
                            });
                        }
                    }
                    None if sub.known.contains_key(name) => removed.push(name.clone()),
                    None => {}
                }
            }
            types.version.to_string()
        };
        if resources.is_empty() && removed.is_empty() {
            return true;
        }
        for resource in &resources {
            sub.known.insert(resource.name.clone(), resource.version.clone());
        }
        for name in &removed {
            sub.known.remove(name);
        }
        let nonce = self.shared.nonce();
        sub.pending.push_back(nonce.clone());
        if sub.pending.len() > MAX_PENDING_NONCES {
            sub.pending.pop_front();
        }
        self.shared.record_sent(Sent {
            stream_id: self.id,
            delta: true,
            type_url: type_url.to_owned(),
            version: version.clone(),
            nonce: nonce.clone(),
            resources: resources.iter().map(|r| r.name.clone()).collect(),
            removed: removed.clone(),
        });
        let response = DeltaDiscoveryResponse {
            system_version_info: version,
            resources,
            type_url: type_url.to_owned(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        self.tx.send(Ok(response)).await.is_ok()
    }
}

// ---------------------------------------------------------------------------
// Connections that `stop` can kill.

/// Binds `addr`, retrying for a while when it is in use: a server dropped
/// (not stopped) just before releases its listener only once its task has
/// been dropped by the runtime.
async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => anyhow::bail!("ADS server cannot bind {addr}: {e}"),
        }
    }
}

/// A TCP connection that fails (and closes its socket) once the server is
/// stopped, so hyper's connection tasks, which outlive the accept loop,
/// end at once.
struct KillableIo {
    inner: Option<TcpStream>,
    info: TcpConnectInfo,
    killed: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl KillableIo {
    fn new(stream: TcpStream, mut kill: watch::Receiver<bool>) -> Self {
        let info = stream.connect_info();
        let killed = Box::pin(async move {
            // Also done when the sender is gone (server dropped).
            let _ = kill.wait_for(|killed| *killed).await;
        });
        Self { inner: Some(stream), info, killed }
    }

    /// The live stream, or the error to return once killed.
    fn live(&mut self, cx: &mut Context<'_>) -> io::Result<&mut TcpStream> {
        if self.inner.is_some() && self.killed.as_mut().poll(cx).is_ready() {
            // Dropping the socket closes it now.
            self.inner = None;
        }
        self.inner.as_mut().ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionAborted, "ADS server stopped"))
    }
}

impl Connected for KillableIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for KillableIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().live(cx) {
            Ok(stream) => Pin::new(stream).poll_read(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut().live(cx) {
            Ok(stream) => Pin::new(stream).poll_write(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut().live(cx) {
            Ok(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().live(cx) {
            Ok(stream) => Pin::new(stream).poll_flush(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().live(cx) {
            Ok(stream) => Pin::new(stream).poll_shutdown(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}
