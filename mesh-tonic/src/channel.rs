use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use mesh_core::policy::{RouteHash, RoutePolicies};
use mesh_core::{Endpoint, LbPolicy};
use mesh_tower::balance::{BalancerConfig, EndpointStatus};
use mesh_tower::cluster::{ClusterTarget, Discovery, NewCluster, Source, StandardDiscovery};
use mesh_tower::discover::dns::DnsConfig;
use mesh_tower::discover::{BoxDiscover, Discover};
use mesh_tower::route::{Publisher, Router, RouterFuture, single_route};
use mesh_tower::tls::{CredentialsSource, HandshakeCounts, MakeMtls};
use tonic::Status;
use tonic::body::Body;
use tower::buffer::Buffer;

use crate::body::ResponseBody;
use crate::xds::Follower;
use crate::{Error, Result, Target};

/// A load-balanced gRPC channel: use it wherever a tonic `Channel` goes.
///
/// Cloning is cheap; clones share connections. Calls reach the balancer
/// through a queue served by one task, as a tonic `Channel`'s do (see
/// DESIGN.md). Generated clients poll it ready before each call, which
/// reserves a place in the queue; a call made without that skips the queue
/// and runs in the caller's task.
#[derive(Debug)]
pub struct Channel {
    /// Also called directly by a call made without `poll_ready`, and kept for
    /// inspection ([`Channel::endpoints`], [`Channel::get_ref`]).
    inner: Inner,
    queue: Buffer<http::Request<Body>, Call>,
    /// `poll_ready` reserved a place in the queue for the next call.
    reserved: bool,
    authority: Authority,
    timeout: Option<Duration>,
    /// Calls are traced: each carries its caller's current context to the router ([`mesh_tower::trace::Parent`]).
    traced: bool,
}

impl Clone for Channel {
    fn clone(&self) -> Self {
        // A reservation belongs to the clone that made it.
        Channel {
            reserved: false,
            inner: self.inner.clone(),
            queue: self.queue.clone(),
            authority: self.authority.clone(),
            timeout: self.timeout,
            traced: self.traced,
        }
    }
}

/// Bound of the queue in front of the balancer: callers past it wait in `poll_ready` (tonic's default).
const QUEUE: usize = 1024;

/// The router every call goes through, and what keeps its tables coming (the xDS follower).
#[derive(Clone, Debug)]
struct Inner {
    router: Router<Body>,
    _follower: Option<Arc<Follower>>,
    /// The TLS handshakes of every connection the channel made.
    handshakes: Arc<HandshakeCounts>,
}

impl tower::Service<http::Request<Body>> for Inner {
    type Response = http::Response<ResponseBody>;
    type Error = Status;
    type Future = Call;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Waiting for an endpoint or a route table happens per call, bounded by timeouts.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Call {
        Call(tower::Service::call(&mut self.router, request))
    }
}

/// Builds a [`Channel`] from a target and settings.
#[derive(Clone, Debug)]
pub struct ChannelBuilder {
    target: String,
    config: BalancerConfig,
    timeout: Option<Duration>,
    dns: DnsConfig,
    /// The policies of the one route of a `static:///` or `dns:///` target.
    route: RoutePolicies,
    /// The circuit breakers of its one cluster.
    breakers: mesh_core::policy::CircuitBreakers,
    /// The adaptive concurrency limit of its one cluster.
    adaptive: Option<mesh_core::policy::AdaptiveConcurrency>,
    /// The workload's mTLS credentials, for clusters that ask for TLS.
    credentials: Option<CredentialsSource>,
    /// Where per-call metrics go ([`mesh_tower::telemetry`]); `None`: not recorded.
    meter: Option<opentelemetry::metrics::Meter>,
    /// What traces each call in a client span ([`mesh_tower::trace`]); `None`: not traced.
    tracer: Option<mesh_tower::trace::Tracer>,
    /// Access lines for a sampled share of calls ([`mesh_tower::telemetry::AccessLog`]); `None`: off.
    access: Option<mesh_tower::telemetry::AccessLog>,
}

impl Channel {
    /// Starts building a channel for `target` (see the crate docs for the forms).
    pub fn builder(target: impl Into<String>) -> ChannelBuilder {
        ChannelBuilder {
            target: target.into(),
            config: BalancerConfig::default(),
            timeout: None,
            dns: DnsConfig::default(),
            route: RoutePolicies::default(),
            breakers: Default::default(),
            adaptive: None,
            credentials: None,
            meter: mesh_tower::telemetry::default_meter(),
            tracer: mesh_tower::trace::default_tracer(),
            access: None,
        }
    }

    fn new(mut inner: Inner, authority: Authority, timeout: Option<Duration>, tracer: Option<mesh_tower::trace::Tracer>) -> Self {
        let traced = tracer.is_some();
        inner.router = inner.router.with_tracer(tracer);
        let queue = Buffer::new(inner.clone(), QUEUE);
        Channel { inner, queue, reserved: false, authority, timeout, traced }
    }

    /// A channel with default settings (round robin, 10 s wait for endpoints).
    pub fn from_target(target: impl Into<String>) -> Result<Self> {
        Self::builder(target).build()
    }

    /// The endpoints the channel knows and their state: those of every cluster its current route table
    /// calls (one for `static:///` and `dns:///` targets).
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.inner.router.endpoints()
    }

    /// The target the channel was built for.
    pub fn target(&self) -> &str {
        self.inner.router.target()
    }

    /// The clusters of the current route table and their endpoints.
    pub fn clusters(&self) -> Vec<(String, Vec<EndpointStatus>)> {
        self.inner.router.clusters()
    }

    /// What each cluster's policy layers have done: retries, hedges, budget refusals, breaker overflows,
    /// ejections.
    pub fn counts(&self) -> Vec<(String, mesh_tower::stats::ClusterCounts)> {
        self.inner.router.counts()
    }

    /// What the target's route layers above the split have done: rate-limited calls, injected faults.
    pub fn target_counts(&self) -> mesh_tower::stats::TargetCounts {
        self.inner.router.target_counts()
    }

    /// The TLS handshakes of the channel's connections: how many succeeded, and why those that failed did.
    pub fn handshake_counts(&self) -> &HandshakeCounts {
        &self.inner.handshakes
    }
}

impl ChannelBuilder {
    /// Load-balancing policy (default round robin).
    pub fn lb(mut self, lb: LbPolicy) -> Self {
        self.config.lb = lb;
        self
    }

    /// Deadline of each call, waiting for an endpoint included; also bounds
    /// the wait for a ready endpoint. Expired calls fail DEADLINE_EXCEEDED.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self.config.ready_timeout = self.config.ready_timeout.min(timeout);
        self
    }

    /// Longest wait for a ready endpoint before a call fails UNAVAILABLE (default 10 s).
    pub fn ready_timeout(mut self, wait: Duration) -> Self {
        self.config.ready_timeout = wait;
        self
    }

    /// TCP connect timeout per endpoint (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connection.connect_timeout = timeout;
        self
    }

    /// HTTP/2 PING keepalive interval (default off; TCP keepalive is on).
    pub fn http2_keepalive(mut self, interval: Option<Duration>) -> Self {
        self.config.connection.keepalive_interval = interval;
        self
    }

    /// DNS re-resolution timing, for `dns://` targets.
    pub fn dns_config(mut self, dns: DnsConfig) -> Self {
        self.dns = dns;
        self
    }

    /// Timeout of the target's one route, for `static:///` and `dns:///` targets (an `xds:///` target's
    /// routes carry their own): the call fails DEADLINE_EXCEEDED naming the route timeout. The route is
    /// where per-call policies sit, inside the channel's queue and its [`timeout`](Self::timeout).
    pub fn route_timeout(mut self, timeout: Duration) -> Self {
        self.route.timeout = Some(timeout);
        self
    }

    /// Hash policies of the target's one route, for `static:///` and `dns:///` targets: what a ring-hash
    /// balancer hashes each call by (gRPC A42; an `xds:///` target's routes carry their own).
    pub fn hash_policy(mut self, hash: Vec<RouteHash>) -> Self {
        self.route.hash = hash;
        self
    }

    /// Retries for `static:///` and `dns:///` targets (an `xds:///` target's routes carry their own), within
    /// the cluster's retry budget ([`Self::circuit_breakers`]).
    pub fn retry(mut self, retry: mesh_core::policy::RetryPolicy) -> Self {
        self.route.retry = Some(retry);
        self
    }

    /// Hedging for `static:///` and `dns:///` targets, instead of retries.
    pub fn hedge(mut self, hedge: mesh_core::policy::HedgePolicy) -> Self {
        self.route.hedge = Some(hedge);
        self
    }

    /// A local rate limit on the target's calls, for `static:///` and `dns:///` targets.
    pub fn rate_limit(mut self, limit: mesh_core::policy::RateLimit) -> Self {
        self.route.rate_limit = Some(limit);
        self
    }

    /// An adaptive concurrency limit for `static:///` and `dns:///` targets (Envoy's gradient controller):
    /// calls over the limit fail at once with the configured status.
    pub fn adaptive_concurrency(mut self, adaptive: mesh_core::policy::AdaptiveConcurrency) -> Self {
        self.adaptive = Some(adaptive);
        self
    }

    /// Circuit breakers and the retry budget for `static:///` and `dns:///` targets (Envoy's thresholds).
    pub fn circuit_breakers(mut self, breakers: mesh_core::policy::CircuitBreakers) -> Self {
        self.breakers = breakers;
        self
    }

    /// mTLS with `credentials`. A `static:///` or `dns:///` target's cluster speaks it with `policy` (the
    /// server's SPIFFE IDs it accepts; none listed accepts any in the trust bundle); an `xds:///` target's
    /// clusters with the TLS policy CDS gives them, else with `policy`.
    pub fn mtls(mut self, credentials: impl Into<CredentialsSource>, policy: mesh_core::policy::TlsPolicy) -> Self {
        self.credentials = Some(credentials.into());
        self.config.tls = Some(policy);
        self
    }

    /// Outlier detection for `static:///` and `dns:///` targets (an `xds:///` target's clusters carry their
    /// own, from CDS): endpoints that fail are ejected for a while ([`mesh_core::outlier`]).
    pub fn outlier_detection(mut self, outlier: mesh_core::policy::OutlierDetection) -> Self {
        self.config.outlier_detection = Some(outlier);
        self
    }

    /// Records the channel's per-call metrics (gRPC A66 names, [`mesh_tower::telemetry`]) with `meter`, or not
    /// at all with `None`. By default: [`mesh_tower::telemetry::default_meter`], the global provider's once the
    /// application installed one and said so (as [`crate::admin::Prometheus::install`] does), else none.
    pub fn meter(mut self, meter: Option<opentelemetry::metrics::Meter>) -> Self {
        self.meter = meter;
        self
    }

    /// Traces each call in a client span with `tracer` ([`mesh_tower::trace`]), or not at all with `None`. By
    /// default: [`mesh_tower::trace::default_tracer`], the global provider's once the application installed
    /// one and said so (as [`crate::telemetry::Tracing`] does), else none.
    pub fn tracer(mut self, tracer: Option<mesh_tower::trace::Tracer>) -> Self {
        self.tracer = tracer;
        self
    }

    /// Writes one access line per call for `share` of the calls (0 to 1): a `tracing` event on target
    /// `mesh::access` with the target, method, route, endpoint, status, duration and trace id. Off by default.
    pub fn access_log(mut self, share: f64) -> Self {
        self.access = Some(mesh_tower::telemetry::AccessLog::new(share));
        self
    }

    fn client_metrics(&self) -> Option<mesh_tower::telemetry::ClientMetrics> {
        self.meter.as_ref().map(|meter| mesh_tower::telemetry::ClientMetrics::new(meter, &self.target))
    }

    /// Builds the channel; starts discovery and connections. Needs a tokio runtime.
    pub fn build(self) -> Result<Channel> {
        let target = Target::parse(&self.target)?;
        let source = match &target {
            Target::Xds { name } => return self.build_xds(crate::xds::shared_client()?, name),
            Target::Static(addrs) => Source::Static(addrs.iter().map(|a| Endpoint::new(*a)).collect()),
            Target::Dns { server, query } => Source::Dns { server: *server, query: query.clone(), config: self.dns.clone() },
        };
        let authority = target.authority();
        self.build_routed(&authority, Arc::new(StandardDiscovery), source)
    }

    /// Builds a channel over a custom discovery source; `authority` is the
    /// `:authority` requests carry and names the channel in errors.
    pub fn build_with(self, authority: &str, source: impl Discover) -> Result<Channel> {
        let given: BoxDiscover = Box::pin(source);
        self.build_routed(authority, Arc::new(Given(std::sync::Mutex::new(Some(given)))), Source::Static(Vec::new()))
    }

    /// A channel whose table is one route to one cluster: a `static:///` or `dns:///` target, or a custom
    /// source. The cluster is named by the target.
    fn build_routed(self, authority: &str, discovery: Arc<dyn Discovery>, source: Source) -> Result<Channel> {
        self.config.lb.validate()?;
        if let Some(outlier) = &self.config.outlier_detection {
            outlier.validate()?;
        }
        if let Some(limit) = &self.route.rate_limit {
            limit.validate()?;
        }
        if let Some(budget) = &self.breakers.retry_budget {
            budget.validate()?;
        }
        let authority = authority
            .parse::<Authority>()
            .map_err(|e| Error::InvalidTarget { target: self.target.clone(), reason: format!("authority {authority:?}: {e}") })?;
        let cluster = ClusterTarget {
            name: self.target.clone(),
            balancer: self.config.clone(),
            source,
            breakers: self.breakers.clone(),
            adaptive: self.adaptive.clone(),
        };
        let connectors = MakeMtls::new(self.credentials.clone());
        let handshakes = connectors.counts().clone();
        let mut new_cluster = NewCluster::new(discovery, connectors);
        if let Some(metrics) = self.client_metrics() {
            new_cluster = new_cluster.with_metrics(metrics);
        }
        let (mut publisher, router) = Publisher::new(&self.target, "the target", self.config.ready_timeout, new_cluster, None);
        publisher.cluster(&cluster);
        publisher.publish(&[single_route(&cluster.name, self.route)]);
        let router = router.with_access_log(self.access);
        Ok(Channel::new(Inner { router, _follower: None, handshakes }, authority, self.timeout, self.tracer))
    }

    /// Builds an `xds:///name` channel on a given xDS client.
    pub fn build_xds(self, client: xds_client::XdsClient, name: &str) -> Result<Channel> {
        let authority = name
            .parse::<Authority>()
            .map_err(|e| Error::InvalidTarget { target: self.target.clone(), reason: format!("name {name:?}: {e}") })?;
        let providers = crate::xds::certificate_providers(client.bootstrap());
        let metrics = self.client_metrics();
        let connectors = MakeMtls::new(self.credentials).with_providers(providers);
        let handshakes = connectors.counts().clone();
        let (router, follower) = crate::xds::follow(client, name, self.config, connectors, metrics);
        let router = router.with_access_log(self.access);
        Ok(Channel::new(Inner { router, _follower: Some(Arc::new(follower)), handshakes }, authority, self.timeout, self.tracer))
    }
}

/// A discovery stream handed to [`ChannelBuilder::build_with`]: the channel's one cluster takes it.
struct Given(std::sync::Mutex<Option<BoxDiscover>>);

impl Discovery for Given {
    fn discover(&self, cluster: &str, _: &Source) -> mesh_tower::Result<BoxDiscover> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take().ok_or_else(|| mesh_tower::Error::InvalidTarget {
            target: cluster.to_owned(),
            reason: "its discovery source was handed over once and is taken".to_owned(),
        })
    }
}

impl tower::Service<http::Request<Body>> for Channel {
    type Response = http::Response<ResponseBody>;
    type Error = Status;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        if self.reserved {
            return Poll::Ready(Ok(()));
        }
        let polled = self.queue.poll_ready(cx).map_err(status_from_queue);
        self.reserved = matches!(polled, Poll::Ready(Ok(())));
        polled
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // Generated clients send path-only URIs; HTTP/2 needs scheme and authority.
        if request.uri().scheme().is_none() {
            let mut parts = request.uri().clone().into_parts();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(self.authority.clone());
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
        // The router may run on the queue's task: the caller's context goes with the request when it has a
        // span (without one, the router's own current context is as empty).
        if self.traced {
            use opentelemetry::trace::TraceContextExt as _;
            if let Some(parent) = opentelemetry::Context::map_current(|cx| cx.has_active_span().then(|| cx.clone())) {
                request.extensions_mut().insert(mesh_tower::trace::Parent(parent));
            }
        }
        let inner = if std::mem::take(&mut self.reserved) {
            Dispatch::Queued(self.queue.call(request))
        } else {
            Dispatch::Direct(self.inner.call(request))
        };
        ResponseFuture { inner, deadline: self.timeout.map(|limit| (limit, Box::pin(tokio::time::sleep(limit)))) }
    }
}

/// Future of a [`Channel`] call.
pub struct ResponseFuture {
    inner: Dispatch,
    deadline: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
}

/// How a call reached the service: through the queue, or directly.
enum Dispatch {
    Queued(tower::buffer::future::ResponseFuture<Call>),
    Direct(Call),
}

/// Future of the service behind the queue: the router's, with its error mapped to a status and its body to
/// tonic's errors.
pub struct Call(RouterFuture);

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Call")
    }
}

impl Future for Call {
    type Output = Result<http::Response<ResponseBody>, Status>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.map(|response| response.map(ResponseBody::new)).map_err(status_from))
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").field("timeout", &self.deadline.as_ref().map(|d| d.0)).finish()
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<ResponseBody>, Status>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let polled = match &mut self.inner {
            Dispatch::Queued(f) => Pin::new(f).poll(cx).map(|r| r.map_err(status_from_queue)),
            Dispatch::Direct(f) => Pin::new(f).poll(cx),
        };
        if polled.is_ready() {
            return polled;
        }
        if let Some((limit, sleep)) = &mut self.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(Status::deadline_exceeded(format!("call exceeded the channel timeout of {limit:?}"))));
        }
        Poll::Pending
    }
}

/// The status a call's error carries through the queue: the service's own, or
/// UNAVAILABLE if the queue's task is gone (the runtime shutting down).
fn status_from_queue(error: tower::BoxError) -> Status {
    match error.downcast::<Status>() {
        Ok(status) => *status,
        Err(other) => Status::unavailable(format!("channel closed: {other}")),
    }
}

/// Maps a client-stack error to the gRPC status a caller sees: its code from [`mesh_tower::Error::grpc_code`],
/// its message the error's, causes included.
pub fn status_from(error: mesh_tower::Error) -> Status {
    let code = tonic::Code::from_i32(error.grpc_code().as_i32());
    // A rate-limited call says when to come back, in whole seconds rounded up (HTTP's `retry-after`).
    let retry_after = match &error {
        mesh_tower::Error::RateLimited { retry_after, .. } => Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)),
        _ => None,
    };
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    let mut status = Status::new(code, message);
    if let Some(seconds) = retry_after {
        status.metadata_mut().insert("retry-after", seconds.into());
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limited_call_says_when_to_come_back() {
        let limit = mesh_core::policy::RateLimit { max_tokens: 5, tokens_per_fill: 5, fill_interval: Duration::from_secs(1) };
        let error = mesh_tower::Error::RateLimited {
            target: "xds:///greeter".into(),
            limit: Box::new(limit),
            retry_after: Duration::from_millis(1200),
        };
        let status = status_from(error);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.metadata().get("retry-after").and_then(|v| v.to_str().ok()), Some("2"), "seconds, rounded up");
        assert!(status.message().contains("rate limited (5 calls per 1s)"), "{}", status.message());
    }
}
