//! The load balancer: one service over a changing set of endpoints.
//!
//! [`Balancer`] consumes a [`Discover`] stream and
//! keeps one HTTP/2 connection per endpoint (multiplexed; connect timeout,
//! TCP keepalive, `TCP_USER_TIMEOUT` and optional HTTP/2 PINGs from
//! [`ConnectionPolicy`], so a dead peer is detected idle or busy). Each request is sent to one
//! *ready* endpoint chosen by the cluster's [`LbPolicy`]:
//!
//! - endpoints still connecting, or whose last connect failed, get no traffic, nor do endpoints outlier
//!   detection ejected ([`BalancerConfig::outlier_detection`]);
//! - when several priority levels exist, traffic is spread over them by
//!   Envoy's priority load with the overprovisioning factor (1.4 by default),
//!   so a level that loses health fails over gradually;
//! - a request whose connection turns out closed before it was written is
//!   re-picked at once on another endpoint instead of failing, and one the
//!   server refused unprocessed (REFUSED_STREAM, or above a GOAWAY's last
//!   stream) is sent again at once, its body replayed ([`crate::replay`]);
//! - adding or removing endpoints never fails a request: a removed endpoint
//!   takes no new requests and its connection closes once in-flight ones end;
//! - with no ready endpoint a call waits up to [`BalancerConfig::ready_timeout`]
//!   and then fails with [`Error::NoReadyEndpoint`]; when every known endpoint
//!   has failed to connect it fails at once with
//!   [`Error::AllEndpointsFailed`] (gRPC's fail-fast semantics).
//!
//! The endpoint that served a response is in its extensions as [`ServedBy`].
//!
//! This module has no `layer.rs`: the balancer is the leaf of the stack, the
//! service other layers wrap, not a wrapper itself. Its files, by concern:
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | the [`Balancer`] handle a caller holds, its settings, the shared state and snapshot types |
//! | `snapshot.rs` | discovery changes applied; the snapshot callers pick from, rebuilt and published |
//! | `pool.rs` | the connection pool: connect through the connector, backoff, reconnect |
//! | `handle.rs` | one endpoint: its connection's sender, in-flight and outcome counters, latency estimate |
//! | `call.rs` | the call path: drop, pick, send, re-pick, transparent resend, wait |
//! | `pick.rs` | pick dispatch: priority and locality, then the LB policy |
//! | `body.rs` | the response body: in flight until the last frame, where the call is classified |
//! | `outlier.rs` | outlier detection: consecutive-failure trips, the detector that ejects and returns endpoints |
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use http_body_util::Empty;
//! use mesh_core::Endpoint;
//! use mesh_tower::balance::{Balancer, BalancerConfig, ServedBy};
//! use tower::ServiceExt;
//!
//! let endpoints = vec![Endpoint::new("127.0.0.1:50051".parse()?), Endpoint::new("127.0.0.1:50052".parse()?)];
//! let balancer = Balancer::new("static", mesh_tower::discover::fixed(endpoints), BalancerConfig::default());
//! let request = http::Request::post("http://greeter/pkg.Svc/Method").body(Empty::<bytes::Bytes>::new())?;
//! let response = balancer.oneshot(request).await?;
//! println!("served by {}", response.extensions().get::<ServedBy>().unwrap().0);
//! # Ok(()) }
//! ```

mod body;
mod call;
mod future;
mod handle;
mod outlier;
mod pick;
mod pool;
mod snapshot;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use mesh_core::lb::{DEFAULT_OVERPROVISIONING_FACTOR, RingHash, WeightedRoundRobin};
use mesh_core::policy::{ConnectionPolicy, OutlierDetection, TlsPolicy};
use mesh_core::{DropOverload, Endpoint, LbPolicy, Locality};
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;

pub use body::ResponseBody;
pub use future::ResponseFuture;
pub use handle::ConnState;

use crate::connect::{Connect, TcpConnector};
use crate::discover::Discover;
use crate::replay::ReplayBody;
use crate::{BoxError, Error};
use handle::Handle;
use pool::Connections;

/// Settings of a [`Balancer`]: plain data.
#[derive(Clone, Debug, PartialEq)]
pub struct BalancerConfig {
    /// How requests are spread.
    pub lb: LbPolicy,
    /// Connection setup and keepalive.
    pub connection: ConnectionPolicy,
    /// Longest time a call waits for a ready endpoint.
    pub ready_timeout: Duration,
    /// Envoy's overprovisioning factor in percent (140 = 1.4).
    pub overprovisioning_factor: u32,
    /// The cluster's upstream TLS, handed to the connector with each endpoint; `None` means plaintext.
    pub tls: Option<TlsPolicy>,
    /// Ejection of failing endpoints; `None` turns it off.
    pub outlier_detection: Option<OutlierDetection>,
    /// Envoy's `max_pending_requests`: most calls waiting for a ready endpoint at once; a call that would
    /// wait beyond it fails at once ([`crate::Error::PendingOverflow`]). `None`: no cap.
    pub max_pending_requests: Option<u32>,
    /// Envoy's `max_requests` (gRPC A32): most calls in flight at once, each counted until its response body
    /// ends; a call over it fails at once ([`crate::Error::Overflow`]). `None`: no cap.
    pub max_requests: Option<u32>,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            lb: LbPolicy::default(),
            connection: ConnectionPolicy::default(),
            ready_timeout: Duration::from_secs(10),
            overprovisioning_factor: DEFAULT_OVERPROVISIONING_FACTOR,
            tls: None,
            outlier_detection: None,
            max_pending_requests: None,
            max_requests: None,
        }
    }
}

/// Request extension carrying the hash a ring-hash balancer picks by, computed by whoever knows the request's
/// hash policy (an xDS route's `hash_policy`, as gRPC's config selector does). Without it the balancer uses the
/// hash policy of its own [`LbPolicy::RingHash`]; other policies ignore it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestHash(pub u64);

/// Request extension: the endpoints earlier attempts of this call went to (set by the retry layer). The
/// balancer picks another endpoint when it can (Envoy's previous-hosts retry predicate: up to three more draws).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PreviousAttempts(pub Vec<SocketAddr>);

/// Response extension naming the endpoint that served the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServedBy(pub SocketAddr);

/// How long a call waited in the balancer before an endpoint could take it, and for what (gRPC A121's delay
/// types): a response extension, set only on calls that waited. Recorded as
/// `grpc.client.attempt.delay.duration` and `grpc.client.call.delay.duration` when metrics are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delay {
    /// What the call waited for.
    pub kind: DelayKind,
    /// How long.
    pub waited: std::time::Duration,
}

/// What a call waited for ([`Delay`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelayKind {
    /// Endpoints were known but none was ready: their connections were being made (`connecting`).
    Connecting,
    /// No endpoint was known yet: discovery had not delivered any (`discovery`).
    Discovery,
    /// The target had no route table yet: the control plane had not delivered its config (`config`). Recorded
    /// by the router, not carried on the response.
    Config,
}

impl DelayKind {
    /// The `grpc.delay_type` attribute value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Discovery => "discovery",
            Self::Config => "config",
        }
    }
}

/// What the balancer knows of one endpoint, for debugging and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointStatus {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Connection state.
    pub state: ConnState,
    /// Requests in flight on it.
    pub in_flight: u64,
    /// Calls that ended on it as successes, and as failures (a transport failure, HTTP 5xx, or a gRPC
    /// status that maps to 5xx), as [`crate::classify`] counts them; each wraps at 2^32.
    pub successes: u32,
    /// See `successes`.
    pub failures: u32,
    /// Whether outlier detection has ejected it.
    pub ejected: bool,
}

/// A load-balancing HTTP/2 client over a discovered endpoint set.
///
/// Cheap to clone: clones share connections and state. Background tasks stop
/// when the last clone is dropped. Must be created inside a tokio runtime.
pub struct Balancer<B, C: Connect = TcpConnector> {
    inner: Arc<Inner<B, C>>,
}

impl<B, C: Connect> Clone for Balancer<B, C> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<B, C: Connect> fmt::Debug for Balancer<B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer").field("target", &self.inner.state.target).field("lb", &self.inner.state.config.lb.name()).finish()
    }
}

struct Inner<B, C: Connect> {
    /// Connections carry bodies that can be sent again (a refused request is resent transparently).
    state: Arc<State<ReplayBody<B>, C>>,
}

/// The balancer stops (its task, its endpoints' reconnects) when its state goes: when the last handle to it is
/// dropped and the last call through it has ended, so a call never outlives the balancer serving it.
impl<B, C> Drop for State<B, C> {
    fn drop(&mut self) {
        if let Some(discovery) = self.discovery.get() {
            discovery.abort();
        }
        for (_, handle) in std::mem::take(&mut *self.endpoints.lock().unwrap_or_else(|e| e.into_inner())).iter() {
            handle.stop();
        }
    }
}

/// Request bodies the balancer can send.
pub trait RequestBody: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}
impl<T: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static> RequestBody for T {}

impl<B: RequestBody> Balancer<B, TcpConnector> {
    /// A balancer over plain TCP. `target` names it in errors and logs.
    pub fn new(target: impl Into<String>, discover: impl Discover, config: BalancerConfig) -> Self {
        let connector = TcpConnector::from_policy(&config.connection);
        Self::with_connector(target, discover, config, connector)
    }
}

impl<B: RequestBody, C: Connect> Balancer<B, C> {
    /// A balancer using `connector` for its connections (TLS goes here).
    pub fn with_connector(target: impl Into<String>, discover: impl Discover, config: BalancerConfig, connector: C) -> Self {
        let ring = matches!(config.lb, LbPolicy::RingHash { .. });
        let target = target.into();
        let (mut detector, trip) = match &config.outlier_detection {
            Some(outlier) => {
                let (detector, trip) = outlier::Detector::new(outlier.clone());
                (Some(detector), Some(trip))
            }
            None => (None, None),
        };
        let stats: Arc<crate::stats::ClusterStats> = Arc::default();
        let breaker = config.max_requests.map(|max| crate::breaker::Gate::max_requests(&target, max, stats.clone()));
        let pending = config.max_pending_requests.map(|max| crate::breaker::Gate::max_pending(&target, max, stats.clone()));
        let state = Arc::new(State {
            trip,
            breaker,
            stats,
            span: tracing::info_span!("balancer", target = %target, lb = config.lb.name()),
            tls: config.tls.clone().map(Arc::new),
            target,
            config,
            connector,
            epoch: tokio::time::Instant::now(),
            endpoints: Mutex::new(Arc::default()),
            snapshot: RwLock::new(Arc::new(Snapshot::empty(ring))),
            changed: watch::channel(0).0,
            republish: Arc::new(Notify::new()),
            next: AtomicUsize::new(0),
            seed: AtomicU64::new(0x5eed),
            wrr: Mutex::new((u64::MAX, WeightedRoundRobin::new())),
            last_error: Mutex::new(None),
            assignment: Mutex::default(),
            discovery: std::sync::OnceLock::new(),
            metrics: std::sync::OnceLock::new(),
            pending,
        });
        let weak = Arc::downgrade(&state);
        let republish = state.republish.clone();
        let mut discover = Box::pin(discover);
        let mut connections = Connections::new(&state);
        // One task applies discovery changes, keeps every endpoint connected, and publishes
        // connection-state changes, coalesced: the publication waits until no other event is ready, so a
        // burst of N state changes costs one snapshot rebuild, not N.
        let span = state.span.clone();
        let discovery = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut discovering = true;
                loop {
                    tokio::select! {
                        biased;
                        change = discover.next(), if discovering => match (change, weak.upgrade()) {
                            (Some(change), Some(state)) => {
                                let applied = state.apply(change);
                                connections.forget(&applied.gone);
                                for handle in applied.added {
                                    connections.start(&state, handle);
                                }
                                if let Some(detector) = &mut detector {
                                    detector.follow(&state);
                                }
                            }
                            (None, _) => discovering = false,
                            (_, None) => return,
                        },
                        event = connections.next() => if event.is_none() {
                            return;
                        },
                        () = republish.notified() => match weak.upgrade() {
                            Some(state) => state.refresh(),
                            None => return,
                        },
                        event = detect(&mut detector) => match (weak.upgrade(), &mut detector) {
                            (Some(state), Some(detector)) => detector.handle(event, &state),
                            _ => return,
                        },
                    }
                }
            },
            span,
        ))
        .abort_handle();
        let _ = state.discovery.set(discovery);
        Self { inner: Arc::new(Inner { state }) }
    }

    /// What it counts (outlier ejections), and what the layers over it add (the cluster's counts).
    pub fn stats(&self) -> Arc<crate::stats::ClusterStats> {
        self.inner.state.stats.clone()
    }

    /// The target this balancer serves.
    pub fn target(&self) -> &str {
        &self.inner.state.target
    }

    /// A receiver that changes whenever the endpoint set or a connection
    /// state changes (for readiness probes and tests).
    pub fn updates(&self) -> watch::Receiver<u64> {
        self.inner.state.changed.subscribe()
    }

    /// How many endpoints the balancer currently picks from (ready or not).
    pub fn endpoint_count(&self) -> usize {
        self.inner.state.snapshot().endpoints.len()
    }

    /// When the balancer applied its latest discovery update and started using the resulting endpoint set
    /// (wall clock; `None` before the first update; an update that changes nothing still counts): where a
    /// discovery update ends, for debugging and for measuring how fast updates apply.
    pub fn endpoints_updated_at(&self) -> Option<SystemTime> {
        self.inner.state.snapshot().set_at
    }

    /// Whether the balancer's current set contains `addr`.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.inner.state.snapshot().endpoints.binary_search_by_key(&addr, |(e, _)| e.addr).is_ok()
    }

    /// Sends one request (the service's `call`, without needing `&mut`: the balancer is always ready). The call
    /// keeps the balancer running until it ends, even if every handle to it is dropped meanwhile (a route table
    /// swapped while calls wait for an endpoint of the old one).
    pub fn send(&self, request: http::Request<B>) -> ResponseFuture {
        self.send_replay(request.map(|body| ReplayBody::new(body, crate::replay::DEFAULT_REPLAY_LIMIT)))
    }

    /// [`send`](Self::send) for a body already recorded for replay (the router records every call's once, for
    /// retries and transparent resends alike).
    pub fn send_replay(&self, request: http::Request<ReplayBody<B>>) -> ResponseFuture {
        // The call holds the state, which keeps the balancer running until the call ends.
        let state = self.inner.state.clone();
        let Some(metrics) = state.metrics.get() else {
            return ResponseFuture::new(Box::pin(state.call_replay(request)));
        };
        let attempt = metrics.start(request.uri());
        ResponseFuture::new(Box::pin(async move {
            match state.call_replay(request).await {
                Ok(response) => {
                    if let Some(delay) = response.extensions().get::<Delay>() {
                        attempt.delayed(delay);
                    }
                    Ok(response.map(|body| body.with_attempt(attempt)))
                }
                Err(error) => {
                    attempt.failed(&error);
                    Err(error)
                }
            }
        }))
    }

    /// This balancer, recording each attempt it sends in `metrics` ([`crate::telemetry`]). Set once; later
    /// calls change nothing.
    pub fn with_metrics(self, metrics: crate::telemetry::AttemptMetrics) -> Self {
        let _ = self.inner.state.metrics.set(metrics);
        self
    }

    /// The known endpoints and their connection state, sorted by address.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        let snapshot = self.inner.state.snapshot();
        snapshot
            .endpoints
            .iter()
            .map(|(endpoint, handle)| EndpointStatus {
                endpoint: (**endpoint).clone(),
                state: handle.state(),
                in_flight: handle.in_flight(),
                successes: handle.outcomes().0,
                failures: handle.outcomes().1,
                ejected: handle.is_ejected(),
            })
            .collect()
    }
}

impl<B: RequestBody, C: Connect> tower::Service<http::Request<B>> for Balancer<B, C> {
    type Response = http::Response<ResponseBody>;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // Waiting for an endpoint happens per call, bounded by ready_timeout.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> ResponseFuture {
        self.send(request)
    }
}

/// One endpoint: its latest discovery data (shared with the discovery source) and its connection.
type Entry<B> = (Arc<Endpoint>, Arc<Handle<B>>);

/// The endpoint set in address order (binary searches rely on it). Replaced whole on every change and shared
/// by the snapshots built from it, so a connection-state refresh copies nothing.
type List<B> = Arc<Vec<Entry<B>>>;

/// State shared by clones, the discovery task and endpoint tasks.
struct State<B, C> {
    target: String,
    config: BalancerConfig,
    connector: C,
    /// Origin of the monotonic clock given to latency estimators.
    epoch: tokio::time::Instant,
    /// The authoritative endpoint set. Its lock also orders publications.
    endpoints: Mutex<List<B>>,
    /// What callers pick from; replaced whole on every change.
    snapshot: RwLock<Arc<Snapshot<B>>>,
    /// Generation of the latest snapshot; callers waiting for readiness watch it.
    changed: watch::Sender<u64>,
    /// Asks the background task to rebuild the snapshot (coalesced).
    republish: Arc<Notify>,
    /// Round-robin position.
    next: AtomicUsize,
    /// Seed source for per-pick random generators.
    seed: AtomicU64,
    /// Weighted round-robin scheduler and the generation it was built for.
    wrr: Mutex<(u64, WeightedRoundRobin<SocketAddr>)>,
    /// Most recent connection error, for error messages.
    last_error: Mutex<Option<Arc<Error>>>,
    /// The balancer's span: its discovery, connection and reconnect events are in it.
    span: tracing::Span,
    /// `config.tls`, shared by every endpoint's connection target.
    tls: Option<Arc<TlsPolicy>>,
    /// What the latest whole-set change said beyond its endpoints. Written under the `endpoints` lock.
    assignment: Mutex<Arc<Assignment>>,
    /// The discovery task, aborted when the state is dropped.
    discovery: std::sync::OnceLock<AbortHandle>,
    /// Outlier detection's trip, shared by every endpoint's handle; `None` when off.
    trip: Option<Arc<outlier::Trip>>,
    /// The cluster's counts.
    stats: Arc<crate::stats::ClusterStats>,
    /// The cluster's `max_requests` ([`BalancerConfig::max_requests`]).
    breaker: Option<Arc<crate::breaker::Gate<crate::breaker::MaxRequests>>>,
    /// Per-attempt metrics, when the channel records them ([`Balancer::with_metrics`]).
    metrics: std::sync::OnceLock<crate::telemetry::AttemptMetrics>,
    /// The cluster's `max_pending_requests` ([`BalancerConfig::max_pending_requests`]).
    pending: Option<Arc<crate::breaker::Gate<crate::breaker::MaxPending>>>,
}

/// The detector's next event; never, without one.
async fn detect<B: RequestBody>(detector: &mut Option<outlier::Detector<B>>) -> outlier::Event {
    match detector {
        Some(detector) => detector.next().await,
        None => std::future::pending().await,
    }
}

/// What an endpoint assignment (an EDS ClusterLoadAssignment) says beyond its endpoints.
#[derive(Debug, Default)]
struct Assignment {
    /// Weight of each locality; locality weighting applies when two or more localities have one.
    locality_weights: BTreeMap<Locality, u32>,
    /// Calls to drop, per category, checked in order once per call (gRPC's `xds_cluster_impl`).
    drops: Vec<DropOverload>,
}

/// One locality's ready endpoints within a priority level: they end at `end` in the level's list (which is
/// sorted by locality when locality weighting applies), and the locality is picked by `weight`, its effective
/// weight (Envoy's locality-weighted LB: configured weight scaled down by the share of its endpoints ready).
#[derive(Clone, Copy, Debug)]
struct LocalityGroup {
    end: u32,
    weight: f64,
}

/// An immutable view of the endpoint set.
struct Snapshot<B> {
    generation: u64,
    /// All endpoints, sorted by address.
    endpoints: List<B>,
    /// Whether each endpoint may take traffic (connected and routable).
    ready: Vec<bool>,
    /// Indices of ready endpoints, per priority level (ascending priority).
    levels: Vec<Vec<usize>>,
    /// Share of traffic per level, in percent.
    priority_load: Vec<u32>,
    /// Per level, its localities when locality weighting applies (else empty).
    localities: Vec<Vec<LocalityGroup>>,
    /// Drops and locality weights of the set.
    assignment: Arc<Assignment>,
    /// Hash ring over all endpoints (indices), for ring-hash policies.
    ring: Option<Arc<RingHash<usize>>>,
    /// Endpoints exist and all failed their last connect.
    all_failed: bool,
    /// Whether this balancer hashes (ring rebuilt on set changes).
    hashing: bool,
    /// When the endpoint set (not only a connection state) last changed.
    set_at: Option<SystemTime>,
}

impl<B> Snapshot<B> {
    fn empty(hashing: bool) -> Self {
        Self {
            generation: 0,
            endpoints: Arc::default(),
            ready: Vec::new(),
            levels: Vec::new(),
            priority_load: Vec::new(),
            localities: Vec::new(),
            assignment: Arc::default(),
            ring: None,
            all_failed: false,
            hashing,
            set_at: None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
