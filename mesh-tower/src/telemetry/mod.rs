//! Per-call metrics under gRPC's OpenTelemetry names (gRFC A66), through the `opentelemetry` API only: the
//! application picks the SDK and exporter (mesh-tonic's admin endpoint installs a Prometheus one).
//!
//! - Client, per attempt (the balancer's sends: retries and hedges are attempts of their own):
//!   `grpc.client.attempt.started` (`grpc.method`, `grpc.target`) and `grpc.client.attempt.duration`, plus
//!   `grpc.client.attempt.rcvd_total_compressed_message_size`, both with `grpc.status`, the cluster as
//!   `grpc.lb.backend_service` (A89) and the endpoint as `network.peer.address` / `network.peer.port`.
//! - Client, per call: `grpc.client.call.duration` (`grpc.method`, `grpc.target`, `grpc.status`), and the route
//!   as `mesh.route` when the route has a name.
//! - Client, per call that sent more than one attempt (A96, `grpc.method` and `grpc.target`):
//!   `grpc.client.call.retries`, `grpc.client.call.transparent_retries`, `grpc.client.call.hedges`, each only
//!   when not zero, and `grpc.client.call.retry_delay` ([`crate::stats::CallAttempts`]).
//! - Server ([`ServerMetricsLayer`]): `grpc.server.call.started` (`grpc.method`), `grpc.server.call.duration`
//!   and `grpc.server.call.sent_total_compressed_message_size` (`grpc.method`, `grpc.status`). Received sizes
//!   are not recorded: counting them would change the request's body type, and the layer must fit tonic's
//!   `Server::layer`, which keeps it.
//!
//! A call's outcome is the response classification's ([`crate::classify`]), read where the response body
//! ends; a body dropped before its trailers is `CANCELLED` (A66). Plain HTTP calls carry
//! `http.response.status_code` instead of `grpc.status`. Durations are seconds on A66's bucket boundaries.
//! Sizes count the DATA bytes of the body (the 5-byte gRPC message prefixes included).
//!
//! Cost: a call's measurements go to instruments bound to their attribute sets (the SDK's bound
//! instruments), cached per thread (module `series`), so an ordinary call allocates nothing for its metrics and
//! hashes no attribute set; only a new series (method, status, endpoint, route) builds its attributes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use tokio::time::Instant;

use crate::classify::{self, Outcome};

mod series;

/// The instrumentation scope of the mesh's instruments.
pub const SCOPE: &str = "mesh";

/// A66's latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 41] = [
    0.0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.013, 0.016, 0.02,
    0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
];

/// A66's size buckets, in bytes.
pub const SIZE_BUCKETS: [f64; 14] = [
    0.0,
    1024.0,
    2048.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
];

fn duration(meter: &Meter, name: &'static str, description: &'static str) -> Histogram<f64> {
    meter.f64_histogram(name).with_unit("s").with_description(description).with_boundaries(LATENCY_BUCKETS.to_vec()).build()
}

/// A per-call count (A96's), on small-number buckets.
fn count(meter: &Meter, name: &'static str, unit: &'static str, description: &'static str) -> Histogram<u64> {
    meter.u64_histogram(name).with_unit(unit).with_description(description).with_boundaries(vec![1.0, 2.0, 3.0, 4.0, 5.0, 10.0]).build()
}

fn size(meter: &Meter, name: &'static str, description: &'static str) -> Histogram<u64> {
    meter.u64_histogram(name).with_unit("By").with_description(description).with_boundaries(SIZE_BUCKETS.to_vec()).build()
}

/// The meter of the globally installed provider (a no-op one until the application installs one).
pub fn global_meter() -> Meter {
    opentelemetry::global::meter(SCOPE)
}

/// Whether channels and servers record into the global provider by default ([`record_into_global_provider`]).
static GLOBAL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the channels and server layers built from now on record into the global meter provider's
/// [`global_meter`] by default. Call it after installing a provider (mesh-tonic's `admin::Prometheus::install`
/// does). Until then they record nothing and pay nothing: even a no-op meter costs each call its attribute
/// allocations.
pub fn record_into_global_provider() {
    GLOBAL.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The meter channels and servers record into by default: the global one once
/// [`record_into_global_provider`] was called, else none.
pub fn default_meter() -> Option<Meter> {
    GLOBAL.load(std::sync::atomic::Ordering::Relaxed).then(global_meter)
}

/// A client's instruments, for one target (`grpc.target`). Cheap to clone.
#[derive(Clone, Debug)]
pub struct ClientMetrics(Arc<ClientInstruments>);

#[derive(Debug)]
struct ClientInstruments {
    /// Names these instruments in the per-thread series caches.
    id: u64,
    target: KeyValue,
    attempt_started: Counter<u64>,
    attempt_duration: Histogram<f64>,
    attempt_rcvd: Histogram<u64>,
    call_duration: Histogram<f64>,
    attempt_delay: Histogram<f64>,
    call_delay: Histogram<f64>,
    call_retries: Histogram<u64>,
    call_transparent_retries: Histogram<u64>,
    call_hedges: Histogram<u64>,
    call_retry_delay: Histogram<f64>,
}

impl ClientMetrics {
    /// The instruments of `meter`, for calls to `target`.
    pub fn new(meter: &Meter, target: &str) -> Self {
        Self(Arc::new(ClientInstruments {
            id: series::owner(),
            target: KeyValue::new("grpc.target", Arc::<str>::from(target)),
            attempt_started: meter
                .u64_counter("grpc.client.attempt.started")
                .with_unit("{attempt}")
                .with_description("Number of client call attempts started.")
                .build(),
            attempt_duration: duration(meter, "grpc.client.attempt.duration", "Time from the start of an attempt to its end."),
            attempt_rcvd: size(
                meter,
                "grpc.client.attempt.rcvd_total_compressed_message_size",
                "Bytes of response messages received by an attempt.",
            ),
            call_duration: duration(meter, "grpc.client.call.duration", "Time from the start of a call to its end, retries included."),
            attempt_delay: duration(
                meter,
                "grpc.client.attempt.delay.duration",
                "Time an attempt waited before it was sent, by grpc.delay_type (A121).",
            ),
            call_delay: duration(
                meter,
                "grpc.client.call.delay.duration",
                "Time a call waited before it was sent, by grpc.delay_type (A121).",
            ),
            call_retries: count(
                meter,
                "grpc.client.call.retries",
                "{retry}",
                "Retries a call made, the first attempt and transparent retries not counted (A96).",
            ),
            call_transparent_retries: count(
                meter,
                "grpc.client.call.transparent_retries",
                "{transparent_retry}",
                "Requests a call sent again because the server refused them unprocessed or they were never written (A96).",
            ),
            call_hedges: count(meter, "grpc.client.call.hedges", "{hedge}", "Hedged attempts a call sent beside its first (A96)."),
            call_retry_delay: duration(meter, "grpc.client.call.retry_delay", "Time a call spent backing off between its attempts (A96)."),
        }))
    }

    /// The instruments of the global meter provider.
    pub fn global(target: &str) -> Self {
        Self::new(&global_meter(), target)
    }

    /// The attempt metrics of cluster `cluster`.
    pub fn cluster(&self, cluster: &str) -> AttemptMetrics {
        AttemptMetrics(Arc::new(ClusterInstruments {
            client: self.clone(),
            backend: KeyValue::new("grpc.lb.backend_service", Arc::<str>::from(cluster)),
            id: series::owner(),
        }))
    }
}

/// Access logs: one structured line per call (a `tracing` event on target `mesh::access` at `info`, which a
/// binary's `--log-format json` writes as one JSON object) for a sampled share of calls. Off unless a channel
/// is given one.
#[derive(Clone, Debug)]
pub struct AccessLog {
    per_million: u32,
    seed: Arc<std::sync::atomic::AtomicU64>,
}

impl AccessLog {
    /// Logs `share` of the calls (0 to 1; out-of-range values are brought into it).
    pub fn new(share: f64) -> Self {
        let share = if share.is_nan() { 0.0 } else { share.clamp(0.0, 1.0) };
        Self { per_million: (share * 1_000_000.0).round() as u32, seed: Arc::default() }
    }

    fn sampled(&self) -> bool {
        use mesh_core::lb::Random as _;
        let draw = mesh_core::lb::SplitMix64::new(self.seed.fetch_add(1, std::sync::atomic::Ordering::Relaxed)).below(1_000_000);
        (draw as u32) < self.per_million
    }
}

/// The record of one call, when its metrics are on or its access line is sampled.
pub(crate) fn call_record(
    metrics: Option<&ClientMetrics>,
    access: Option<&AccessLog>,
    target: &Arc<str>,
    uri: &http::Uri,
    route: Option<&Arc<str>>,
    start: Instant,
) -> Option<CallRecord> {
    let access = access.filter(|a| a.sampled()).map(|_| Access { target: target.clone(), cluster: ChosenCluster::default() });
    if metrics.is_none() && access.is_none() {
        return None;
    }
    Some(CallRecord { metrics: metrics.cloned(), retries: 0, access, path: path_of(uri), route: route.cloned(), start })
}

/// What a call's access line needs beyond its metrics.
#[derive(Debug)]
struct Access {
    target: Arc<str>,
    cluster: ChosenCluster,
}

/// A request extension on a call whose access line is written: the split names in it the cluster it sent the
/// call to (the last one, for a call that was retried).
#[derive(Clone, Debug, Default)]
pub(crate) struct ChosenCluster(Arc<std::sync::Mutex<Option<Arc<str>>>>);

impl ChosenCluster {
    pub(crate) fn set(&self, cluster: &str) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(cluster.into());
    }

    fn get(&self) -> Option<Arc<str>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// A request's path (a copy that shares the request's storage: no allocation for tonic's static paths).
fn path_of(uri: &http::Uri) -> http::uri::PathAndQuery {
    uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

/// A66's `grpc.method`: the path without its leading slash.
fn method(path: &str) -> KeyValue {
    KeyValue::new("grpc.method", Arc::<str>::from(path.strip_prefix('/').unwrap_or(path)))
}

fn status(outcome: Outcome) -> KeyValue {
    match outcome {
        Outcome::Http(code) => KeyValue::new("http.response.status_code", i64::from(code)),
        other => KeyValue::new("grpc.status", other.grpc_code().name()),
    }
}

const CANCELLED: Outcome = Outcome::Grpc(mesh_core::GrpcCode::Cancelled);

/// A cluster's attempt instruments (`grpc.lb.backend_service` set). Cheap to clone.
#[derive(Clone, Debug)]
pub struct AttemptMetrics(Arc<ClusterInstruments>);

#[derive(Debug)]
struct ClusterInstruments {
    client: ClientMetrics,
    backend: KeyValue,
    /// Names the cluster's series in the per-thread caches.
    id: u64,
}

impl AttemptMetrics {
    /// Counts an attempt to `uri`'s path as started and starts timing it.
    pub(crate) fn start(&self, uri: &http::Uri) -> AttemptRecord {
        let path = path_of(uri);
        let c = &self.0.client.0;
        let key = series::Key { owner: self.0.id, path: path.path(), route: "", code: 0, peer: None };
        series::with(&series::COUNTERS, key, || c.attempt_started.bind(&[method(path.path()), c.target.clone()]), |started| started.add(1));
        AttemptRecord { metrics: self.clone(), path, start: Instant::now() }
    }
}

/// One attempt being timed.
#[derive(Debug)]
pub(crate) struct AttemptRecord {
    metrics: AttemptMetrics,
    path: http::uri::PathAndQuery,
    start: Instant,
}

/// A series' status, as one number: a gRPC code, or 1,000 plus an HTTP status.
fn code(outcome: Outcome) -> u32 {
    match outcome {
        Outcome::Http(code) => 1_000 + u32::from(code),
        other => other.grpc_code().as_i32() as u32,
    }
}

/// The `grpc.delay_type` attribute of `delay`.
fn delay_type(delay: &crate::balance::Delay) -> KeyValue {
    KeyValue::new("grpc.delay_type", delay.kind.name())
}

impl AttemptRecord {
    /// Records that the attempt waited `delay` before it was sent.
    pub(crate) fn delayed(&self, delay: &crate::balance::Delay) {
        let c = &self.metrics.0.client.0;
        c.attempt_delay.record(delay.waited.as_secs_f64(), &[method(self.path.path()), c.target.clone(), delay_type(delay)]);
    }

    /// Records the attempt's end, on `peer` (`None`: it never reached an endpoint).
    pub(crate) fn end(self, outcome: Outcome, peer: Option<std::net::SocketAddr>, rcvd: u64) {
        let cluster = &self.metrics.0;
        let c = &cluster.client.0;
        let elapsed = self.start.elapsed().as_secs_f64();
        let bind = || {
            let mut attributes = vec![method(self.path.path()), c.target.clone(), status(outcome), cluster.backend.clone()];
            // An attempt that reached no endpoint has no peer attributes.
            if let Some(peer) = peer {
                attributes.push(KeyValue::new("network.peer.address", peer.ip().to_string()));
                attributes.push(KeyValue::new("network.peer.port", i64::from(peer.port())));
            }
            (c.attempt_duration.bind(&attributes), c.attempt_rcvd.bind(&attributes))
        };
        let key = series::Key { owner: cluster.id, path: self.path.path(), route: "", code: code(outcome), peer };
        series::with(&series::SIZED, key, bind, |(duration, rcvd_size)| {
            duration.record(elapsed);
            rcvd_size.record(rcvd);
        });
    }

    /// Records an attempt that failed before a response.
    pub(crate) fn failed(self, error: &crate::Error) {
        self.end(Outcome::Grpc(error.grpc_code()), error.peer(), 0);
    }
}

/// One call being timed.
#[derive(Debug)]
pub(crate) struct CallRecord {
    metrics: Option<ClientMetrics>,
    /// Retries the call made (for its access line).
    retries: u32,
    /// The target and the cluster, when the call's access line is written.
    access: Option<Access>,
    path: http::uri::PathAndQuery,
    route: Option<Arc<str>>,
    start: Instant,
}

impl CallRecord {
    /// Where the split names the call's cluster, when its access line is written.
    pub(crate) fn chosen_cluster(&self) -> Option<ChosenCluster> {
        self.access.as_ref().map(|access| access.cluster.clone())
    }

    /// Records that the call waited `delay` before its answering attempt was sent.
    pub(crate) fn delayed(&self, delay: &crate::balance::Delay) {
        if let Some(metrics) = &self.metrics {
            let c = &metrics.0;
            c.call_delay.record(delay.waited.as_secs_f64(), &[method(self.path.path()), c.target.clone(), delay_type(delay)]);
        }
    }

    /// Records what the call sent beyond its first attempt (A96: a count that is zero is not recorded; the
    /// retry delay is recorded with the retries).
    pub(crate) fn attempts(&mut self, attempts: &crate::stats::CallAttempts) {
        self.retries = attempts.retries;
        if let Some(metrics) = &self.metrics {
            let c = &metrics.0;
            let attributes = [method(self.path.path()), c.target.clone()];
            let counts = [
                (&c.call_retries, attempts.retries),
                (&c.call_transparent_retries, attempts.transparent_retries),
                (&c.call_hedges, attempts.hedges),
            ];
            for (histogram, count) in counts.into_iter().filter(|(_, count)| *count > 0) {
                histogram.record(u64::from(count), &attributes);
            }
            if attempts.retries > 0 {
                c.call_retry_delay.record(attempts.backed_off.as_secs_f64(), &attributes);
            }
        }
    }

    /// Records the call's end with `outcome`, on `peer` (`None`: it reached no endpoint), in the call's span
    /// `span` (for the access line's trace id).
    pub(crate) fn end(self, outcome: Outcome, peer: Option<std::net::SocketAddr>, span: Option<&crate::trace::CallSpan>) {
        let elapsed = self.start.elapsed();
        if let Some(Access { target, cluster }) = &self.access {
            let (status, http) = match outcome {
                Outcome::Http(status) => ("", status),
                other => (other.grpc_code().name(), 0),
            };
            tracing::info!(
                target: "mesh::access",
                grpc_target = %target,
                method = %self.path.path().strip_prefix('/').unwrap_or_default(),
                route = %self.route.as_deref().unwrap_or_default(),
                cluster = %cluster.get().as_deref().unwrap_or_default(),
                endpoint = %peer.map(|p| p.to_string()).unwrap_or_default(),
                grpc_status = status,
                http_status = http,
                duration_us = elapsed.as_micros() as u64,
                retries = self.retries,
                trace_id = %span.and_then(crate::trace::CallSpan::trace_id).unwrap_or_default(),
                "call"
            );
        }
        let Some(metrics) = self.metrics else { return };
        let c = &metrics.0;
        let path = self.path.path();
        let bind = || {
            let mut attributes = vec![method(path), c.target.clone(), status(outcome)];
            if let Some(route) = &self.route {
                attributes.push(KeyValue::new("mesh.route", route.clone()));
            }
            c.call_duration.bind(&attributes)
        };
        let key = series::Key { owner: c.id, path, route: self.route.as_deref().unwrap_or_default(), code: code(outcome), peer: None };
        series::with(&series::DURATIONS, key, bind, |duration| duration.record(elapsed.as_secs_f64()));
    }
}

/// What a response body records when it ends: its attempt's and, for the body a call returns, the call's
/// metrics and client span ([`crate::trace`]).
#[derive(Debug, Default)]
pub(crate) struct Records {
    pub(crate) attempt: Option<AttemptRecord>,
    pub(crate) call: Option<CallRecord>,
    pub(crate) span: Option<crate::trace::CallSpan>,
    pub(crate) rcvd: u64,
}

impl Records {
    pub(crate) fn end(self, outcome: Option<Outcome>, peer: std::net::SocketAddr) {
        let outcome = outcome.unwrap_or(CANCELLED);
        if let Some(attempt) = self.attempt {
            attempt.end(outcome, Some(peer), self.rcvd);
        }
        if let Some(call) = self.call {
            call.end(outcome, Some(peer), self.span.as_ref());
        }
        if let Some(span) = self.span {
            span.end(outcome, Some(peer));
        }
    }
}

/// The server's instruments (A66): a layer over an HTTP service that times each call from its request to the
/// end of its response body. One made without a meter passes calls through untimed.
#[derive(Clone, Debug)]
pub struct ServerMetricsLayer(Option<Arc<ServerInstruments>>);

#[derive(Debug)]
struct ServerInstruments {
    /// Names these instruments in the per-thread series caches.
    id: u64,
    started: Counter<u64>,
    duration: Histogram<f64>,
    sent: Histogram<u64>,
}

impl ServerMetricsLayer {
    /// The instruments of `meter`.
    pub fn new(meter: &Meter) -> Self {
        Self(Some(Arc::new(ServerInstruments {
            id: series::owner(),
            started: meter
                .u64_counter("grpc.server.call.started")
                .with_unit("{call}")
                .with_description("Number of server calls started.")
                .build(),
            duration: duration(meter, "grpc.server.call.duration", "Time from a call's request headers to the end of its response."),
            sent: size(meter, "grpc.server.call.sent_total_compressed_message_size", "Bytes of response messages sent by a call."),
        })))
    }

    /// The instruments of the [`default_meter`]; none (calls pass through untimed) when there is none.
    pub fn default_meter() -> Self {
        Self(default_meter().map(|meter| Self::new(&meter).0).unwrap_or_default())
    }
}

impl<S> tower::Layer<S> for ServerMetricsLayer {
    type Service = ServerMetrics<S>;

    fn layer(&self, inner: S) -> ServerMetrics<S> {
        ServerMetrics { inner, instruments: self.0.clone() }
    }
}

/// A server service timed by [`ServerMetricsLayer`].
#[derive(Clone, Debug)]
pub struct ServerMetrics<S> {
    inner: S,
    instruments: Option<Arc<ServerInstruments>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for ServerMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = http::Response<ServerBody<R>>;
    type Error = S::Error;
    type Future = ServerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let record = self.instruments.as_ref().map(|instruments| {
            let path = path_of(request.uri());
            let key = series::Key { owner: instruments.id, path: path.path(), route: "", code: 0, peer: None };
            series::with(&series::COUNTERS, key, || instruments.started.bind(&[method(path.path())]), |started| started.add(1));
            ServerRecord { instruments: instruments.clone(), path, start: Instant::now() }
        });
        ServerFuture { inner: self.inner.call(request), record }
    }
}

#[derive(Debug)]
struct ServerRecord {
    instruments: Arc<ServerInstruments>,
    path: http::uri::PathAndQuery,
    start: Instant,
}

impl ServerRecord {
    fn end(self, outcome: Outcome, sent: u64) {
        let i = &self.instruments;
        let elapsed = self.start.elapsed().as_secs_f64();
        let bind = || {
            let attributes = [method(self.path.path()), status(outcome)];
            (i.duration.bind(&attributes), i.sent.bind(&attributes))
        };
        let key = series::Key { owner: i.id, path: self.path.path(), route: "", code: code(outcome), peer: None };
        series::with(&series::SIZED, key, bind, |(duration, sent_size)| {
            duration.record(elapsed);
            sent_size.record(sent);
        });
    }
}

pin_project_lite::pin_project! {
    /// Future of a [`ServerMetrics`] call.
    pub struct ServerFuture<F> {
        #[pin]
        inner: F,
        record: Option<ServerRecord>,
    }
}

impl<F, R, E> Future for ServerFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = Result<http::Response<ServerBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx));
        let record = this.record.take();
        Poll::Ready(match response {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let end = classify::BodyEnd::new(&parts);
                Ok(http::Response::from_parts(parts, ServerBody { inner: body, end, record, sent: 0 }))
            }
            Err(error) => {
                if let Some(record) = record {
                    record.end(Outcome::Grpc(mesh_core::GrpcCode::Internal), 0);
                }
                Err(error)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A server response body that records its call when it ends (or is dropped: `CANCELLED`).
    pub struct ServerBody<B> {
        #[pin]
        inner: B,
        end: classify::BodyEnd,
        record: Option<ServerRecord>,
        sent: u64,
    }

    impl<B> PinnedDrop for ServerBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let (Some(record), Some(outcome)) = (this.record.take(), this.end.dropped()) {
                record.end(outcome, *this.sent);
            }
        }
    }
}

impl<B: Body<Data = Bytes>> Body for ServerBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            *this.sent += data.len() as u64;
        }
        if this.record.is_some()
            && let Some(outcome) = this.end.polled(&polled)
            && let Some(record) = this.record.take()
        {
            record.end(outcome, *this.sent);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
