//! Routing: every target's calls go through a route table, whatever its kind.
//!
//! A [`Router`] matches each request's path and headers against its current [`Table`] (first match wins) and
//! calls the route's built service ([`new_route`]): the route's policies as layers (the route timeout today;
//! retries, hedging, faults and rate limits later) over a weighted split of its clusters, each cluster a built
//! service over its balancer ([`crate::cluster::NewCluster`]). A [`Publisher`] builds tables: it keeps the
//! built clusters, rebuilds a cluster exactly when its [`ClusterTarget`] changes (the replacement takes over
//! once it can serve, so a rebuild never leaves calls waiting on an empty set), and publishes a table of
//! freshly built routes over them. Calls in flight keep the services they started on; a new table takes the
//! next call.
//!
//! An `xds:///` target's table comes from LDS and RDS, its clusters from CDS (mesh-tonic follows them); a
//! `static:///` or `dns:///` target is a table with one route, matching every request, to one cluster.
//!
//! Generic over the request body; nothing here knows gRPC's or tonic's types.

mod hash;
mod service;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_core::lb::{Random, SplitMix64};
use mesh_core::policy::RateLimit;
use mesh_core::{Route, RouteAction, RouteMatch};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use service::{RouteFuture, RouteService, RouteTarget, Split, SplitFuture, new_route};

use crate::Error;
use crate::balance::{EndpointStatus, RequestBody, ResponseBody};
use crate::classify::Outcome;
use crate::cluster::{Cluster, ClusterTarget, MakeConnect, NewCluster};
use crate::deadline::{self, Deadline};
use crate::ratelimit::RateLimitLayer;
use crate::replay::{DEFAULT_REPLAY_LIMIT, ReplayBody};
use crate::stats::{ClusterCounts, TargetCounts, TargetStats};
use crate::telemetry::{AccessLog, CallRecord, ClientMetrics};
use crate::trace::{CallSpan, Tracer};

/// What requests are routed with: built routes in order, and the clusters they call.
pub struct Table<B> {
    /// Each route's matcher, name (`None`: unnamed) and built service (`None`: non-forwarding).
    routes: Vec<BuiltRoute<B>>,
    clusters: Vec<(String, Cluster<B>)>,
    /// Draws for routes that take a fraction of their matches (shared with the routes' splits).
    seed: Arc<AtomicU64>,
}

impl<B> fmt::Debug for Table<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table").field("routes", &self.routes.len()).field("clusters", &self.clusters.len()).finish()
    }
}

/// A route of a table: its matcher, name (`None`: unnamed) and built service (`None`: non-forwarding).
type BuiltRoute<B> = (RouteMatch, Option<Arc<str>>, Option<RouteService<B>>);

/// Routes each request by the current table of its target. Cheap to clone; clones share the table.
pub struct Router<B> {
    target: Arc<str>,
    /// Where tables come from (names it in [`Error::NoConfig`]).
    from: Arc<str>,
    /// Longest wait for a first table.
    ready_timeout: Duration,
    table: watch::Receiver<Option<Arc<Table<B>>>>,
    /// The latest table this clone has seen: a call checks for a newer one with one atomic load, instead of
    /// taking the channel's lock and a reference count every call shares.
    current: Option<Arc<Table<B>>>,
    /// What the target's route layers counted.
    stats: Arc<TargetStats>,
    /// Per-call metrics; `None`: off.
    metrics: Option<ClientMetrics>,
    /// Per-call client spans; `None`: off.
    tracer: Option<Tracer>,
    /// Access lines for a sampled share of calls; `None`: off.
    access: Option<AccessLog>,
}

impl<B> Clone for Router<B> {
    fn clone(&self) -> Self {
        Self {
            target: self.target.clone(),
            from: self.from.clone(),
            ready_timeout: self.ready_timeout,
            table: self.table.clone(),
            current: self.current.clone(),
            stats: self.stats.clone(),
            metrics: self.metrics.clone(),
            tracer: self.tracer.clone(),
            access: self.access.clone(),
        }
    }
}

impl<B> fmt::Debug for Router<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router").field("target", &self.target).finish()
    }
}

impl<B> Router<B> {
    /// This router, writing an access line for the share of calls `access` samples, or none with `None`.
    pub fn with_access_log(mut self, access: Option<AccessLog>) -> Self {
        self.access = access;
        self
    }

    /// This router, starting a client span per call with `tracer` ([`crate::trace`]), or none with `None`.
    pub fn with_tracer(mut self, tracer: Option<Tracer>) -> Self {
        self.tracer = tracer;
        self
    }

    /// The target it routes.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The current table's clusters and their endpoints (empty before the first table).
    pub fn clusters(&self) -> Vec<(String, Vec<EndpointStatus>)> {
        let table = self.table.borrow().clone();
        table.map_or_else(Vec::new, |t| t.clusters.iter().map(|(name, c)| (name.clone(), c.inspect.endpoints())).collect())
    }

    /// What the target's route layers above the split (rate limits, faults) have counted.
    pub fn target_counts(&self) -> TargetCounts {
        self.stats.counts()
    }

    /// What the current table's clusters, and the routes' layers over them, have counted.
    pub fn counts(&self) -> Vec<(String, ClusterCounts)> {
        let table = self.table.borrow().clone();
        table.map_or_else(Vec::new, |t| t.clusters.iter().map(|(name, c)| (name.clone(), c.stats.counts())).collect())
    }

    /// Every endpoint of the current table's clusters.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.clusters().into_iter().flat_map(|(_, endpoints)| endpoints).collect()
    }
}

impl<B: RequestBody> Router<B> {
    /// Routes `request` by `table`; a call timed in metrics started at `started`, and is traced in `span`.
    fn route(&self, table: &Table<B>, request: http::Request<B>, started: Instant, span: Option<CallSpan>) -> RouterFuture {
        // Recorded once per call, for the retries and transparent resends below.
        let request = request.map(|body| ReplayBody::new(body, DEFAULT_REPLAY_LIMIT));
        let path = request.uri().path();
        let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
        let draw = || SplitMix64::new(table.seed.fetch_add(1, Ordering::Relaxed)).below(1_000_000) as u32;
        let found = table.routes.iter().find(|(matcher, _, _)| matcher.matches(path, header) && matcher.takes(draw));
        let route = found.and_then(|(_, name, _)| name.as_ref());
        let call = crate::telemetry::call_record(self.metrics.as_ref(), self.access.as_ref(), &self.target, request.uri(), route, started);
        if let (Some(span), Some(route)) = (&span, route) {
            span.route(route);
        }
        let Some((_, _, service)) = found else {
            return RouterFuture::failed(Error::NoRoute { target: self.target.to_string(), path: path.to_owned() }, call, span);
        };
        let Some(service) = service else {
            return RouterFuture::failed(Error::NonForwarding { target: self.target.to_string(), path: path.to_owned() }, call, span);
        };
        let mut request = request;
        if let Some(cluster) = call.as_ref().and_then(CallRecord::chosen_cluster) {
            request.extensions_mut().insert(cluster);
        }
        // The caller's own deadline, when it sent one: the call ends there, and retries send what is left.
        let limit = request.headers().get(deadline::GRPC_TIMEOUT).and_then(|v| deadline::parse(v.as_bytes()));
        let Some(limit) = limit else {
            return RouterFuture { state: State::Routed(service.send(request)), call, span };
        };
        request.extensions_mut().insert(Deadline(tokio::time::Instant::now() + limit));
        let (sent, target) = (service.send(request), self.target.clone());
        RouterFuture {
            state: State::Waiting(Box::pin(async move {
                tokio::time::timeout(limit, sent).await.unwrap_or_else(|_| Err(Error::Deadline { target: target.to_string(), limit }))
            })),
            call,
            span,
        }
    }
}

impl<B: RequestBody> tower::Service<http::Request<B>> for Router<B> {
    type Response = http::Response<ResponseBody>;
    type Error = Error;
    type Future = RouterFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // Waiting for a table happens per call, bounded by the ready timeout.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<B>) -> RouterFuture {
        match self.table.has_changed() {
            Ok(true) => self.current = self.table.borrow_and_update().clone(),
            Ok(false) => {}
            // The publisher is gone (a static target's publishes once): its last table stays.
            Err(_) if self.current.is_none() => self.current = self.table.borrow().clone(),
            Err(_) => {}
        }
        // The span covers the wait for a first table too.
        let span = self.tracer.as_ref().map(|tracer| CallSpan::start(tracer, &mut request));
        // Fast path: a table is there (every call after the first config).
        if let Some(table) = &self.current {
            return self.route(table, request, Instant::now(), span);
        }
        let this = self.clone();
        RouterFuture {
            state: State::Waiting(Box::pin(async move {
                let mut rx = this.table.clone();
                let started = tokio::time::Instant::now();
                let table = match tokio::time::timeout(this.ready_timeout, rx.wait_for(Option::is_some)).await {
                    Ok(Ok(table)) => table.clone(),
                    _ => None,
                };
                let Some(table) = table else {
                    let error = Error::NoConfig { target: this.target.to_string(), from: this.from.to_string(), waited: started.elapsed() };
                    let outcome = Outcome::Grpc(error.grpc_code());
                    let call = crate::telemetry::call_record(
                        this.metrics.as_ref(),
                        this.access.as_ref(),
                        &this.target,
                        request.uri(),
                        None,
                        started,
                    );
                    if let Some(call) = call {
                        call.end(outcome, None, span.as_ref());
                    }
                    if let Some(span) = span {
                        span.end(outcome, None);
                    }
                    return Err(error);
                };
                let routed = this.route(&table, request, started, span);
                // The call waited for its first table: a `config` delay (A121).
                let delay = crate::balance::Delay { kind: crate::balance::DelayKind::Config, waited: started.elapsed() };
                if let Some(call) = &routed.call {
                    call.delayed(&delay);
                }
                if let Some(span) = &routed.span {
                    span.delayed(&delay);
                }
                routed.await
            })),
            call: None,
            span: None,
        }
    }
}

type Response = Result<http::Response<ResponseBody>, Error>;

/// Future of a [`Router`] call.
pub struct RouterFuture {
    state: State,
    /// The call's metrics, recorded when its response body ends (or here, when it fails).
    call: Option<CallRecord>,
    /// The call's client span, ended likewise.
    span: Option<CallSpan>,
}

enum State {
    Routed(RouteFuture),
    /// The first table has not arrived and the call waits for it, or the call runs under its caller's deadline.
    Waiting(Pin<Box<dyn Future<Output = Response> + Send>>),
    Failed(Option<Error>),
}

impl RouterFuture {
    fn failed(error: Error, call: Option<CallRecord>, span: Option<CallSpan>) -> Self {
        Self { state: State::Failed(Some(error)), call, span }
    }
}

impl fmt::Debug for RouterFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RouterFuture")
    }
}

impl Future for RouterFuture {
    type Output = Response;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response> {
        let this = self.get_mut();
        let polled = match &mut this.state {
            State::Routed(call) => Pin::new(call).poll(cx),
            State::Waiting(wait) => wait.as_mut().poll(cx),
            State::Failed(error) => Poll::Ready(Err(error.take().expect("a RouterFuture polled after it completed"))),
        };
        let Poll::Ready(response) = polled else { return Poll::Pending };
        let (mut call, span) = (this.call.take(), this.span.take());
        Poll::Ready(match response {
            Ok(response) => {
                if let (Some(call), Some(attempts)) = (&mut call, response.extensions().get::<crate::stats::CallAttempts>()) {
                    call.attempts(attempts);
                }
                if let Some(delay) = response.extensions().get::<crate::balance::Delay>() {
                    if let Some(call) = &call {
                        call.delayed(delay);
                    }
                    if let Some(span) = &span {
                        span.delayed(delay);
                    }
                }
                Ok(response.map(|body| body.with_call(call, span)))
            }
            Err(error) => {
                let outcome = Outcome::Grpc(error.grpc_code());
                if let Some(call) = call {
                    call.end(outcome, error.peer(), span.as_ref());
                }
                if let Some(span) = span {
                    span.end(outcome, error.peer());
                }
                Err(error)
            }
        })
    }
}

/// A route that takes every request to one cluster: the table of a `static:///` or `dns:///` target.
pub fn single_route(cluster: &str, policies: mesh_core::policy::RoutePolicies) -> Route {
    Route {
        name: cluster.to_owned(),
        matcher: RouteMatch::any(),
        action: RouteAction::Clusters(vec![mesh_core::WeightedCluster { cluster: cluster.to_owned(), weight: 1 }]),
        policies,
    }
}

/// One cluster: what it was built for and the built cluster, and a replacement warming up.
struct Slot<B> {
    /// `None`: a stand-in whose source could not be started, built again on the next [`Publisher::cluster`].
    built_for: Option<ClusterTarget>,
    current: Cluster<B>,
    /// Takes over once it can serve; its watcher wakes the publisher's owner as its state changes.
    next: Option<(ClusterTarget, Cluster<B>, AbortOnDrop)>,
}

/// Builds and publishes a router's tables.
pub struct Publisher<B, M> {
    target: Arc<str>,
    new_cluster: NewCluster<M>,
    clusters: HashMap<String, Slot<B>>,
    tx: watch::Sender<Option<Arc<Table<B>>>>,
    /// Signalled when a replacement cluster's state changes, so its owner calls [`Publisher::cluster`] again.
    wake: Option<mpsc::UnboundedSender<()>>,
    seed: Arc<AtomicU64>,
    channel_id: u64,
    /// Rate-limit buckets by limit, kept across tables while a route has the limit.
    limiters: HashMap<RateLimit, RateLimitLayer>,
    stats: Arc<TargetStats>,
}

impl<B, M> fmt::Debug for Publisher<B, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher").field("target", &self.target).field("clusters", &self.clusters.len()).finish()
    }
}

impl<B: RequestBody, M: MakeConnect> Publisher<B, M> {
    /// A publisher for `target` and the router that follows its tables. `from` says where tables come from,
    /// `ready_timeout` bounds a call's wait for the first table, and `wake` is signalled whenever a
    /// replacement cluster's state changes.
    pub fn new(
        target: &str,
        from: &str,
        ready_timeout: Duration,
        new_cluster: NewCluster<M>,
        wake: Option<mpsc::UnboundedSender<()>>,
    ) -> (Self, Router<B>) {
        let (tx, table) = watch::channel(None);
        let target: Arc<str> = target.into();
        let stats = Arc::new(TargetStats::default());
        let metrics = new_cluster.metrics().cloned();
        let router = Router {
            target: target.clone(),
            from: from.into(),
            ready_timeout,
            table,
            current: None,
            stats: stats.clone(),
            metrics,
            tracer: None,
            access: None,
        };
        let publisher = Self {
            target,
            new_cluster,
            clusters: HashMap::new(),
            tx,
            wake,
            seed: Arc::default(),
            channel_id: hash::random_channel_id(),
            limiters: HashMap::new(),
            stats,
        };
        (publisher, router)
    }

    /// Whether cluster `name` is built.
    pub fn has_cluster(&self, name: &str) -> bool {
        self.clusters.contains_key(name)
    }

    /// Makes cluster `target.name` follow `target`: builds it when new; when its target changed, builds a
    /// replacement that takes over (at a later call) once it can serve; promotes a replacement that can.
    pub fn cluster(&mut self, target: &ClusterTarget) {
        let name = target.name.as_str();
        if let Some(slot) = self.clusters.get_mut(name)
            && let Some((_, next, _)) = &slot.next
            && next.can_serve()
            && let Some((built_for, next, _)) = slot.next.take()
        {
            tracing::debug!(cluster = name, "replacement cluster takes over");
            slot.built_for = Some(built_for);
            slot.current = next;
        }
        if let Some(slot) = self.clusters.get_mut(name) {
            if slot.built_for.as_ref() == Some(target) {
                slot.next = None;
                return;
            }
            if slot.next.as_ref().is_some_and(|(pending, _, _)| pending == target) {
                return;
            }
        }
        let (built, ok) = match self.new_cluster.new_cluster(target) {
            Ok(cluster) => (cluster, true),
            Err((stand_in, error)) => {
                tracing::error!(cluster = name, %error, "cluster's endpoints cannot be discovered; its calls fail until it is built again");
                (stand_in, false)
            }
        };
        match self.clusters.get_mut(name) {
            None => {
                let built_for = ok.then(|| target.clone());
                self.clusters.insert(name.to_owned(), Slot { built_for, current: built, next: None });
            }
            // A stand-in replaces nothing that works.
            Some(_) if !ok => {}
            Some(slot) => {
                let watcher = watch_updates(&built, self.wake.clone());
                slot.next = Some((target.clone(), built, watcher));
            }
        }
    }

    /// Builds a table of `routes` over the built clusters and publishes it; clusters no route names are
    /// dropped. A route naming a cluster that is not built fails its calls with [`Error::ClusterNotFound`].
    pub fn publish(&mut self, routes: &[Route]) {
        let mut named: Vec<&str> = Vec::new();
        let mut limits: Vec<&RateLimit> = Vec::new();
        let built = routes
            .iter()
            .map(|route| {
                let service = match &route.action {
                    RouteAction::NonForwarding => None,
                    RouteAction::Clusters(split) => {
                        named.extend(split.iter().map(|c| c.cluster.as_str()));
                        let built = |name: &str| self.clusters.get(name).map(|s| s.current.clone());
                        let clusters = split.iter().map(|c| (c.cluster.clone(), c.weight, built(&c.cluster))).collect();
                        named.extend(route.policies.mirrors.iter().map(|m| m.cluster.as_str()));
                        let mirrors = route.policies.mirrors.iter().map(|m| built(&m.cluster)).collect();
                        let rate_limit = route.policies.rate_limit.as_ref().map(|limit| {
                            limits.push(limit);
                            let (target, stats) = (&self.target, &self.stats);
                            let new = || RateLimitLayer::new(target, limit.clone(), stats.clone());
                            self.limiters.entry(limit.clone()).or_insert_with(new).clone()
                        });
                        Some(new_route(RouteTarget {
                            target: self.target.clone(),
                            policies: route.policies.clone(),
                            clusters,
                            mirrors,
                            seed: self.seed.clone(),
                            channel_id: self.channel_id,
                            rate_limit,
                            stats: self.stats.clone(),
                        }))
                    }
                };
                let name = (!route.name.is_empty()).then(|| Arc::from(route.name.as_str()));
                (route.matcher.clone(), name, service)
            })
            .collect();
        self.clusters.retain(|name, _| named.contains(&name.as_str()));
        self.limiters.retain(|limit, _| limits.contains(&limit));
        let mut clusters: Vec<(String, Cluster<B>)> =
            self.clusters.iter().map(|(name, slot)| (name.clone(), slot.current.clone())).collect();
        clusters.sort_by(|a, b| a.0.cmp(&b.0));
        self.tx.send_replace(Some(Arc::new(Table { routes: built, clusters, seed: self.seed.clone() })));
    }
}

/// Signals `wake` whenever `cluster` publishes a new endpoint snapshot.
fn watch_updates<B>(cluster: &Cluster<B>, wake: Option<mpsc::UnboundedSender<()>>) -> AbortOnDrop {
    let mut updates = cluster.inspect.updates();
    let task = tokio::spawn(async move {
        while updates.changed().await.is_ok() {
            if wake.as_ref().is_some_and(|wake| wake.send(()).is_err()) {
                return;
            }
        }
    });
    AbortOnDrop(task.abort_handle())
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
