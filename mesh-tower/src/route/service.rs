//! The per-route service: the route's policies as layers over its weighted split of clusters.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use std::future::Future;
use std::pin::Pin;

use futures_util::future::{BoxFuture, Either};
use mesh_core::lb::{Random, SplitMix64};
use mesh_core::policy::RoutePolicies;
use tower::{Layer, ServiceBuilder};

use super::hash::route_hash;
use crate::balance::{RequestBody, RequestHash, ResponseBody};
use crate::cluster::{Cluster, ClusterFuture, ClusterService};
use crate::fault::FaultLayer;
use crate::hedge::HedgeLayer;
use crate::mirror::MirrorLayer;
use crate::ratelimit::RateLimitLayer;
use crate::replay::ReplayBody;
use crate::retry::RetryLayer;
use crate::stats::TargetStats;
use crate::{BoxError, Error};

/// Requests below the router: their bodies are recorded for replay (retries, transparent resends).
type Request<B> = http::Request<ReplayBody<B>>;

type Boxed<B> = crate::layered::Layered<Request<B>>;

/// The per-route service. A route with no policy to apply is its split, called directly (no allocation per
/// call); one with policies is its layers over the split, boxed at the boundary, so layers can change without
/// changing this type.
pub struct RouteService<B>(Kind<B>);

enum Kind<B> {
    Split(Split<B>),
    Layered(Boxed<B>),
}

impl<B> Clone for RouteService<B> {
    fn clone(&self) -> Self {
        Self(match &self.0 {
            Kind::Split(split) => Kind::Split(split.clone()),
            Kind::Layered(service) => Kind::Layered(service.clone()),
        })
    }
}

impl<B> fmt::Debug for RouteService<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Kind::Split(_) => "RouteService::Split",
            Kind::Layered(_) => "RouteService::Layered",
        })
    }
}

/// Future of a [`RouteService`] call.
pub type RouteFuture = Either<SplitFuture, BoxFuture<'static, Result<http::Response<ResponseBody>, Error>>>;

impl<B: RequestBody> RouteService<B> {
    /// Sends one request through the route (readiness included, for a layered one).
    pub fn send(&self, request: Request<B>) -> RouteFuture {
        match &self.0 {
            Kind::Split(split) => Either::Left(split.send(request)),
            Kind::Layered(service) => Either::Right(service.send(request)),
        }
    }
}

/// Everything a route's service is built from.
pub struct RouteTarget<B> {
    /// The target the route belongs to (names it in errors).
    pub target: Arc<str>,
    /// The route's policies.
    pub policies: RoutePolicies,
    /// The clusters it splits over: name, weight, and the built cluster (`None`: not in the table).
    pub clusters: Vec<(String, u32, Option<Cluster<B>>)>,
    /// The built shadow cluster of each of `policies.mirrors` (`None`: not in the table).
    pub mirrors: Vec<Option<Cluster<B>>>,
    /// Draws for the weighted split and for random hashes, shared by the target's routes.
    pub seed: Arc<AtomicU64>,
    /// The channel's id, for `io.grpc.channel_id` hashing.
    pub channel_id: u64,
    /// The bucket of the route's rate limit (`policies.rate_limit`), shared by the routes with the same limit.
    pub rate_limit: Option<RateLimitLayer>,
    /// The target's counts, for the layers above the split.
    pub stats: Arc<TargetStats>,
}

/// Builds a route's service: its policies as layers, outermost first, over the split.
pub fn new_route<B: RequestBody>(target: RouteTarget<B>) -> RouteService<B> {
    let RouteTarget { target, policies, clusters, mirrors, seed, channel_id, rate_limit, stats } = target;
    // Per-attempt layers wrap each of the route's clusters, below the split: a call's cluster is drawn once and
    // its retries stay in it (Envoy's and gRPC's order), within that cluster's budget.
    let clusters: Vec<(String, u32, Option<ClusterService<B>>)> = clusters
        .into_iter()
        .map(|(name, weight, cluster)| {
            // A route hedges or retries (gRPC A6), within the cluster's budget either way.
            let service = cluster.map(|cluster| match (&policies.hedge, &policies.retry) {
                (Some(policy), _) => {
                    let hedge = HedgeLayer::within(policy.clone(), cluster.budget, cluster.stats);
                    ClusterService::layered(hedge.layer(cluster.service))
                }
                (None, Some(policy)) => {
                    let retry = RetryLayer::within(policy.clone(), cluster.budget, cluster.stats);
                    ClusterService::retried(retry.layer(cluster.service))
                }
                (None, None) => cluster.service,
            });
            (name, weight, service)
        })
        .collect();
    let timeout = policies.timeout;
    let fault = policies.fault.clone().filter(|f| f.injects()).map(|fault| FaultLayer::new(&target, fault, stats.clone()));
    // Copies go to the shadow cluster's own service: its balancer, without the route's retries.
    let mirror = (!policies.mirrors.is_empty()).then(|| {
        let shadows = policies.mirrors.iter().cloned().zip(mirrors.into_iter().map(|c| c.map(|c| c.service))).collect();
        MirrorLayer::new(shadows, timeout, stats)
    });
    // A route with nothing to layer above its split calls the split directly; when its one policy is a rate
    // limit, the split takes the token itself.
    let layered = timeout.is_some() || fault.is_some() || mirror.is_some();
    let name = target.clone();
    let total = clusters_weight(&clusters);
    let (rate_limit, split_limit) = if layered { (rate_limit, None) } else { (None, rate_limit) };
    let inner = SplitInner { target, policies, clusters, total, seed, channel_id, rate_limit: split_limit };
    let split = Split { inner: Arc::new(inner) };
    if !layered {
        return RouteService(Kind::Split(split));
    }
    let service = ServiceBuilder::new()
        // Faults first, once per call (Envoy's fault filter runs before its router and its timeouts), then the
        // rate limit (the filter order mesh-control writes).
        .option_layer(fault)
        .option_layer(rate_limit)
        .map_err(move |error: BoxError| Error::from_layer(error, &name, timeout))
        // Per-route layers go here, outermost first, each also counted in `layered` above. A call that timed
        // out is still mirrored (Envoy shadows whatever the answer).
        .option_layer(mirror)
        .option_layer(timeout.map(tower::timeout::TimeoutLayer::new))
        // The layers above speak `BoxError`; the top of the stack takes the stack's own errors back.
        .map_err(BoxError::from)
        .service(split);
    RouteService(Kind::Layered(crate::layered::Layered::new(service)))
}

/// Picks one of the route's clusters by weight, sets the request's hash, and calls the cluster.
pub struct Split<B> {
    inner: Arc<SplitInner<B>>,
}

struct SplitInner<B> {
    target: Arc<str>,
    policies: RoutePolicies,
    clusters: Vec<(String, u32, Option<ClusterService<B>>)>,
    total: u64,
    seed: Arc<AtomicU64>,
    channel_id: u64,
    /// The route's rate limit, when it is the route's only layer.
    rate_limit: Option<RateLimitLayer>,
}

impl<B> Clone for Split<B> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

fn clusters_weight<S>(clusters: &[(String, u32, S)]) -> u64 {
    clusters.iter().map(|(_, weight, _)| u64::from(*weight)).sum()
}

/// Future of a [`Split`] call.
pub type SplitFuture = Either<ClusterFuture, Failed>;

/// A call that failed before it left: its error, once.
#[derive(Debug)]
pub struct Failed(pub(crate) Option<Error>);

impl Future for Failed {
    type Output = Result<http::Response<ResponseBody>, Error>;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Err(self.get_mut().0.take().expect("a failed call polled after it completed")))
    }
}

impl<B: RequestBody> Split<B> {
    fn send(&self, mut request: Request<B>) -> SplitFuture {
        let inner = &*self.inner;
        if let Some(Err(error)) = inner.rate_limit.as_ref().map(RateLimitLayer::take) {
            return Either::Right(Failed(Some(error)));
        }
        let chosen = match inner.clusters.as_slice() {
            [one] => one,
            clusters => {
                let mut point = SplitMix64::new(inner.seed.fetch_add(1, Ordering::Relaxed)).next_u64() % inner.total.max(1);
                let hit = clusters.iter().find(|(_, weight, _)| {
                    let hit = point < u64::from(*weight);
                    point = point.saturating_sub(u64::from(*weight));
                    hit
                });
                match hit.or(clusters.last()) {
                    Some(chosen) => chosen,
                    None => {
                        let path = request.uri().path().to_owned();
                        return Either::Right(Failed(Some(Error::NonForwarding { target: inner.target.to_string(), path })));
                    }
                }
            }
        };
        let (name, _, service) = chosen;
        let Some(service) = service else {
            return Either::Right(Failed(Some(Error::ClusterNotFound { target: inner.target.to_string(), cluster: name.clone() })));
        };
        if let Some(call) = request.extensions().get::<crate::trace::InCall>() {
            call.cluster(name);
        }
        if let Some(chosen) = request.extensions().get::<crate::telemetry::ChosenCluster>() {
            chosen.set(name);
        }
        if let Some(hash) = route_hash(&inner.policies.hash, &request, inner.channel_id, &inner.seed) {
            request.extensions_mut().insert(RequestHash(hash));
        }
        Either::Left(service.send(request))
    }
}

impl<B: RequestBody> tower::Service<Request<B>> for Split<B> {
    type Response = http::Response<ResponseBody>;
    type Error = Error;
    type Future = SplitFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> SplitFuture {
        self.send(request)
    }
}
