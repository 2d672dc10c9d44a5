//! The per-route service: the route's policies as layers over its weighted split of clusters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use mesh_core::lb::{Random, SplitMix64};
use mesh_core::policy::RoutePolicies;
use tower::util::{BoxCloneSyncService, Oneshot};
use tower::{ServiceBuilder, ServiceExt};

use super::hash::route_hash;
use crate::balance::{RequestBody, RequestHash, ResponseBody};
use crate::cluster::ClusterService;
use crate::{BoxError, Error};

/// The per-route service: boxed at the boundary, so its layers can change without changing its type.
pub type RouteService<B> = BoxCloneSyncService<http::Request<B>, http::Response<ResponseBody>, Error>;

/// Everything a route's service is built from.
pub struct RouteTarget<B> {
    /// The target the route belongs to (names it in errors).
    pub target: Arc<str>,
    /// The route's policies.
    pub policies: RoutePolicies,
    /// The clusters it splits over: name, weight, and the cluster's service (`None`: not in the table).
    pub clusters: Vec<(String, u32, Option<ClusterService<B>>)>,
    /// Draws for the weighted split and for random hashes, shared by the target's routes.
    pub seed: Arc<AtomicU64>,
    /// The channel's id, for `io.grpc.channel_id` hashing.
    pub channel_id: u64,
}

/// Builds a route's service: its policies as layers, outermost first, over the split.
pub fn new_route<B: RequestBody>(target: RouteTarget<B>) -> RouteService<B> {
    let timeout = target.policies.timeout;
    let name = target.target.clone();
    let service = ServiceBuilder::new()
        .map_err(move |error: BoxError| Error::from_layer(error, &name, timeout))
        // Per-route layers go here, outermost first (issue 15: retries and hedging within the route timeout,
        // fault injection, rate limits, mirroring).
        .option_layer(timeout.map(tower::timeout::TimeoutLayer::new))
        // The layers above speak `BoxError`; the top of the stack takes the stack's own errors back.
        .map_err(BoxError::from)
        .service(Split::new(target));
    BoxCloneSyncService::new(service)
}

/// Picks one of the route's clusters by weight, sets the request's hash, and calls the cluster.
pub(crate) struct Split<B> {
    inner: Arc<SplitInner<B>>,
}

struct SplitInner<B> {
    target: Arc<str>,
    policies: RoutePolicies,
    clusters: Vec<(String, u32, Option<ClusterService<B>>)>,
    total: u64,
    seed: Arc<AtomicU64>,
    channel_id: u64,
}

impl<B> Clone for Split<B> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<B> Split<B> {
    fn new(target: RouteTarget<B>) -> Self {
        let total = target.clusters.iter().map(|(_, weight, _)| u64::from(*weight)).sum();
        let RouteTarget { target, policies, clusters, seed, channel_id } = target;
        Self { inner: Arc::new(SplitInner { target, policies, clusters, total, seed, channel_id }) }
    }
}

type SplitFuture<B> = Either<Oneshot<ClusterService<B>, http::Request<B>>, Ready<Result<http::Response<ResponseBody>, Error>>>;

impl<B: RequestBody> tower::Service<http::Request<B>> for Split<B> {
    type Response = http::Response<ResponseBody>;
    type Error = Error;
    type Future = SplitFuture<B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<B>) -> SplitFuture<B> {
        let inner = &*self.inner;
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
                        return Either::Right(ready(Err(Error::NonForwarding { target: inner.target.to_string(), path })));
                    }
                }
            }
        };
        let (name, _, service) = chosen;
        let Some(service) = service else {
            return Either::Right(ready(Err(Error::ClusterNotFound { target: inner.target.to_string(), cluster: name.clone() })));
        };
        if let Some(hash) = route_hash(&inner.policies.hash, &request, inner.channel_id, &inner.seed) {
            request.extensions_mut().insert(RequestHash(hash));
        }
        Either::Left(service.clone().oneshot(request))
    }
}
