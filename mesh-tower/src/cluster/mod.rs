//! Clusters: what one is built from ([`ClusterTarget`]), and the per-cluster service built from it
//! ([`NewCluster`]).
//!
//! A cluster's service is a stack over its balancer. Per-cluster policies go into [`NewCluster::new_cluster`],
//! each one `layer` call in one place: the circuit breaker and concurrency limit, then outlier detection
//! reading the endpoints' outcome counters (issue 15). A cluster is rebuilt exactly when its target changes:
//! the target is plain data compared whole ([`crate::route::Publisher::cluster`]).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use mesh_core::Endpoint;
use mesh_core::policy::{AdaptiveConcurrency, CircuitBreakers};
use tokio::sync::watch;

use crate::balance::{Balancer, BalancerConfig, EndpointStatus, RequestBody, ResponseBody};
use tower::Layer;

use crate::adaptive::AdaptiveLayer;
use crate::connect::{Connect, TcpConnector};
use crate::discover::dns::{DnsConfig, DnsQuery, HickoryResolver, dns};
use crate::discover::{self, BoxDiscover};
use crate::replay::ReplayBody;
use crate::retry::{Budget, Retry};
use crate::stats::ClusterStats;
use crate::telemetry::ClientMetrics;
use crate::{Error, Result};

/// Everything a cluster's service is built from: plain data, compared whole.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterTarget {
    /// The cluster's name: it names the cluster in errors, logs and spans.
    pub name: String,
    /// The balancer's settings: LB policy, connection policy, ready timeout, upstream TLS.
    pub balancer: BalancerConfig,
    /// Where its endpoints come from.
    pub source: Source,
    /// Circuit-breaker thresholds (`max_requests` is enforced; see [`crate::breaker`]).
    pub breakers: CircuitBreakers,
    /// An adaptive limit on calls in flight ([`crate::adaptive`]); `None`: none.
    pub adaptive: Option<AdaptiveConcurrency>,
}

/// Where a cluster's endpoints come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A fixed list (a `static:///` target, an xDS STATIC cluster).
    Static(Vec<Endpoint>),
    /// A DNS name, re-resolved at its TTL (a `dns:///` target, an xDS LOGICAL_DNS cluster).
    Dns {
        /// The DNS server to ask; `None` asks the system's.
        server: Option<SocketAddr>,
        /// What to look up.
        query: DnsQuery,
        /// Re-resolution timing.
        config: DnsConfig,
    },
    /// An EDS resource of this name: only a [`Discovery`] that speaks xDS can follow it (mesh-tonic's).
    Eds(String),
}

/// Turns a cluster's [`Source`] into a discovery stream.
pub trait Discovery: Send + Sync + 'static {
    /// The stream of endpoint changes for `cluster`'s `source`.
    fn discover(&self, cluster: &str, source: &Source) -> Result<BoxDiscover>;
}

/// Static lists and DNS, with hickory (the system's resolver or the target's server). EDS sources fail: they
/// need an xDS client.
#[derive(Clone, Copy, Debug, Default)]
pub struct StandardDiscovery;

impl Discovery for StandardDiscovery {
    fn discover(&self, cluster: &str, source: &Source) -> Result<BoxDiscover> {
        match source {
            Source::Static(endpoints) => Ok(discover::fixed(endpoints.clone())),
            Source::Dns { server, query, config } => {
                let resolver = match server {
                    Some(server) => HickoryResolver::with_name_servers(&[*server])?,
                    None => HickoryResolver::system()?,
                };
                Ok(dns(Arc::new(resolver), query.clone(), config.clone()))
            }
            Source::Eds(name) => Err(Error::InvalidTarget {
                target: cluster.to_owned(),
                reason: format!("EDS resource {name:?} needs an xDS client to follow it"),
            }),
        }
    }
}

/// Makes the connector of a cluster's connections from its target.
pub trait MakeConnect: Send + Sync + 'static {
    /// The connector.
    type Connect: Connect;

    /// The connector for `cluster`'s endpoints.
    fn make_connect(&self, cluster: &ClusterTarget) -> Self::Connect;
}

/// Plain TCP with the cluster's keepalive settings.
#[derive(Clone, Copy, Debug, Default)]
pub struct MakeTcp;

impl MakeConnect for MakeTcp {
    type Connect = TcpConnector;

    fn make_connect(&self, cluster: &ClusterTarget) -> TcpConnector {
        TcpConnector::from_policy(&cluster.balancer.connection)
    }
}

/// Every cluster gets this connector (a test's fake network, or a connector shared by all clusters).
#[derive(Clone, Debug)]
pub struct SameConnector<C>(pub C);

impl<C: Connect> MakeConnect for SameConnector<C> {
    type Connect = C;

    fn make_connect(&self, _: &ClusterTarget) -> C {
        self.0.clone()
    }
}

/// The per-cluster service. A cluster with no policy to apply is its balancer, called directly (no
/// allocation per call beyond the balancer's own); one with policies is its layers over the balancer, boxed
/// at the boundary, so layers can change without changing this type.
pub struct ClusterService<B>(Kind<B>);

/// Requests below the router: their bodies are recorded for replay (retries, transparent resends).
type Request<B> = http::Request<ReplayBody<B>>;

type Boxed<B> = crate::layered::Layered<Request<B>>;

enum Kind<B> {
    Balancer(Arc<dyn Leaf<B>>),
    /// A route's retries over the cluster, sent to by reference (no boxed boundary).
    Retried(Arc<Retry<ClusterService<B>>>),
    Layered(Boxed<B>),
}

/// A balancer with its connector type erased.
trait Leaf<B>: Send + Sync {
    fn send(&self, request: Request<B>) -> crate::balance::ResponseFuture;
}

impl<B: RequestBody, C: Connect> Leaf<B> for Balancer<B, C> {
    fn send(&self, request: Request<B>) -> crate::balance::ResponseFuture {
        Balancer::send_replay(self, request)
    }
}

impl<B> Clone for ClusterService<B> {
    fn clone(&self) -> Self {
        Self(match &self.0 {
            Kind::Balancer(balancer) => Kind::Balancer(balancer.clone()),
            Kind::Retried(retry) => Kind::Retried(retry.clone()),
            Kind::Layered(service) => Kind::Layered(service.clone()),
        })
    }
}

impl<B> fmt::Debug for ClusterService<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Kind::Balancer(_) => "ClusterService::Balancer",
            Kind::Retried(_) => "ClusterService::Retried",
            Kind::Layered(_) => "ClusterService::Layered",
        })
    }
}

/// Future of a [`ClusterService`] call: the balancer's (one pointer), or a layered stack's, boxed, so the
/// common case's future stays small as it moves through the queue and the caller's future.
pub type ClusterFuture = futures_util::future::Either<
    crate::balance::ResponseFuture,
    futures_util::future::BoxFuture<'static, Result<http::Response<ResponseBody>>>,
>;

impl<B: RequestBody> ClusterService<B> {
    /// A cluster with no layers: calls go straight to `balancer`.
    pub fn balancer<C: Connect>(balancer: Balancer<B, C>) -> Self {
        Self(Kind::Balancer(Arc::new(balancer)))
    }

    /// A cluster whose calls go through `service` (its layers over its balancer).
    pub fn layered<S>(service: S) -> Self
    where
        S: tower::Service<Request<B>, Response = http::Response<ResponseBody>, Error = Error> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        Self(Kind::Layered(crate::layered::Layered::new(service)))
    }

    /// A cluster whose calls go through a route's retries (`retry` over the cluster's own service).
    pub fn retried(retry: Retry<ClusterService<B>>) -> Self {
        Self(Kind::Retried(Arc::new(retry)))
    }

    /// Sends one request through the cluster (readiness included, for a layered one).
    pub fn send(&self, request: Request<B>) -> ClusterFuture {
        match &self.0 {
            Kind::Balancer(balancer) => futures_util::future::Either::Left(balancer.send(request)),
            Kind::Retried(retry) => futures_util::future::Either::Right(retry.send(request)),
            Kind::Layered(service) => futures_util::future::Either::Right(service.send(request)),
        }
    }
}

/// What a cluster shows of itself: its endpoints, and when they change.
pub trait Inspect: Send + Sync + 'static {
    /// Its endpoints and their state.
    fn endpoints(&self) -> Vec<EndpointStatus>;
    /// When it applied its latest endpoint set (`None` before the first).
    fn endpoints_updated_at(&self) -> Option<SystemTime>;
    /// Changes whenever its endpoints or their connection states change.
    fn updates(&self) -> watch::Receiver<u64>;
}

impl<B: RequestBody, C: Connect> Inspect for Balancer<B, C> {
    fn endpoints(&self) -> Vec<EndpointStatus> {
        Balancer::endpoints(self)
    }

    fn endpoints_updated_at(&self) -> Option<SystemTime> {
        Balancer::endpoints_updated_at(self)
    }

    fn updates(&self) -> watch::Receiver<u64> {
        Balancer::updates(self)
    }
}

/// A built cluster: its service, a view of its balancer, and what every route's layers over it share.
pub struct Cluster<B> {
    /// What calls go through.
    pub service: ClusterService<B>,
    /// Its endpoints, for status and warm-up.
    pub inspect: Arc<dyn Inspect>,
    /// The retry budget every route's retries to it draw on (Envoy's: a cluster's budget).
    pub budget: Budget,
    /// What its layers, and the routes' layers over it, have done.
    pub stats: Arc<ClusterStats>,
}

impl<B> Clone for Cluster<B> {
    fn clone(&self) -> Self {
        Self { service: self.service.clone(), inspect: self.inspect.clone(), budget: self.budget.clone(), stats: self.stats.clone() }
    }
}

impl<B> fmt::Debug for Cluster<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster").field("endpoints", &self.inspect.endpoints().len()).finish()
    }
}

impl<B> Cluster<B> {
    /// Whether it can take traffic: it has its first endpoint set, and that set is empty, has a ready
    /// endpoint, or has failed to connect everywhere (calls then fail fast, as they would on it anyway).
    pub fn can_serve(&self) -> bool {
        use crate::balance::ConnState;
        if self.inspect.endpoints_updated_at().is_none() {
            return false;
        }
        let endpoints = self.inspect.endpoints();
        endpoints.is_empty()
            || endpoints.iter().any(|e| e.state == ConnState::Ready)
            || endpoints.iter().all(|e| e.state == ConnState::TransientFailure)
    }
}

impl<B: RequestBody> tower::Service<Request<B>> for ClusterService<B> {
    type Response = http::Response<ResponseBody>;
    type Error = Error;
    type Future = ClusterFuture;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<()>> {
        // Always ready: a layered stack waits for its readiness inside each call.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.send(request)
    }
}

/// Builds per-cluster services from targets: discovery from [`Discovery`], connections from [`MakeConnect`].
pub struct NewCluster<M> {
    discovery: Arc<dyn Discovery>,
    make_connect: M,
    metrics: Option<ClientMetrics>,
}

impl<M> fmt::Debug for NewCluster<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NewCluster")
    }
}

impl<M: MakeConnect> NewCluster<M> {
    /// A builder over `discovery` and `make_connect`.
    pub fn new(discovery: Arc<dyn Discovery>, make_connect: M) -> Self {
        Self { discovery, make_connect, metrics: None }
    }

    /// This builder, its clusters' balancers (and the router over them) recording per-attempt and per-call
    /// metrics in `metrics` ([`crate::telemetry`]).
    pub fn with_metrics(mut self, metrics: ClientMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The metrics its clusters record in, if any.
    pub fn metrics(&self) -> Option<&ClientMetrics> {
        self.metrics.as_ref()
    }

    /// Builds `target`'s cluster. `Err` carries a stand-in when its source could not be started (a resolver
    /// that could not be built): a cluster with no endpoints, whose calls fail fast, to be built again later.
    pub fn new_cluster<B: RequestBody>(&self, target: &ClusterTarget) -> Result<Cluster<B>, (Cluster<B>, Error)> {
        let (discover, failed) = match self.discovery.discover(&target.name, &target.source) {
            Ok(discover) => (discover, None),
            Err(error) => (discover::fixed(Vec::new()), Some(error)),
        };
        let connector = self.make_connect.make_connect(target);
        let mut config = target.balancer.clone();
        // Envoy's pending cap, when the cluster sets one other than the default (the default is not enforced, as
        // `max_requests`'s is not: see DESIGN.md); it costs only calls that wait.
        let max_pending = target.breakers.max_pending_requests;
        if max_pending != CircuitBreakers::default().max_pending_requests {
            config.max_pending_requests = Some(max_pending);
        }
        // The breaker, in the balancer (Envoy's circuit breakers are the cluster's, below its filters): installed
        // when the cluster sets `max_requests` below Envoy's default (1024), which is not enforced (DESIGN.md);
        // it costs a call two shared atomics and no allocation.
        let max_requests = target.breakers.max_requests;
        if max_requests < CircuitBreakers::default().max_requests {
            config.max_requests = Some(max_requests);
        }
        let mut balancer = Balancer::with_connector(target.name.clone(), discover, config, connector);
        if let Some(metrics) = &self.metrics {
            balancer = balancer.with_metrics(metrics.cluster(&target.name));
        }
        // Per-cluster layers go here, outermost first (the adaptive limit; the breaker and outlier detection are
        // in the balancer): a cluster with a layer to apply is layered (one boxed future per call); one without
        // calls its balancer directly.
        let stats = balancer.stats();
        let adaptive = target.adaptive.clone().map(|config| AdaptiveLayer::new(&target.name, config, stats.clone()));
        let mut service = ClusterService::balancer(balancer.clone());
        if let Some(adaptive) = adaptive {
            service = ClusterService::layered(adaptive.layer(service));
        }
        let budget = Budget::for_cluster(&target.breakers);
        let cluster = Cluster { service, inspect: Arc::new(balancer), budget, stats };
        match failed {
            None => Ok(cluster),
            Some(error) => Err((cluster, error)),
        }
    }
}
