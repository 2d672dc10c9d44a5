//! Benchmark: plain tonic `Channel` vs the mesh channel (static discovery +
//! P2C-EWMA), unary calls with 1 KiB request and 1 KiB response to one echo
//! server process on loopback, at concurrency 1 and 64, both in one run.
//!
//! `cargo run --release -p mesh-tests --bin bench-channel -- [--seconds S] [--rounds R] [--processes P]`
//!
//! The rounds run in several client processes, one after another, each with its own echo server (8
//! processes of 2 rounds by default), and are pooled: whatever lasts a whole process (heap layout, where its
//! threads landed, the server's state) tilts only that process's share of the rounds, and the per-process
//! medians printed beside the pooled one show how large that tilt is.
//!
//! Every round runs every variant once, each on a fresh channel warmed before it is measured, in an order
//! shuffled per round, so machine noise, position in the round and connection luck hit all alike. The
//! baseline is two plain tonic channels (geometric mean per round); the second one's ratio to the first is an
//! A/A test showing the method's own noise. Ratios are per round, then the median over rounds.
//! Diagnostic variants (raw hyper connections, bare or used as the balancer uses its connection; the mesh
//! channel called without its queue) run only when
//! `--only` names them, e.g. `--only "p2c_ewma),raw,no queue"`; `--solo` drops the baseline (for profiling).
//! Prints a Markdown table: p50/p99 latency, throughput, client CPU per call,
//! and the mesh/plain ratios.
//!
//! Each client process runs on CPU 0 and its echo server on CPU 1 (`taskset`), as a client and its backend
//! run on different hosts: the client's cost is measured on its own core, not mixed with the server's work
//! and the scheduler moving both between the same two cores. `--shared-cores` lets them share every core (how
//! the numbers in BENCHMARKS.md before 2026-12-04 were taken). The client CPU % column says whether the
//! client's core was the bound (near 100) or the server was.
//!
//! `--mtls` serves from the mesh's permissive acceptor (the same port for plaintext and mTLS) and adds the mesh
//! channel over mTLS, compared per round with the same channel in plaintext (issue 16). `--handshakes C`
//! measures instead the acceptor's full mTLS handshakes per second per core of the server process, C clients
//! handshaking at once for `--seconds`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use mesh_core::LbPolicy;
use mesh_core::lb::{Random, SplitMix64};
use mesh_tests::echo::METHOD;
use mesh_tests::peers::spawn_listening;
use mesh_tonic::codec::BytesCodec;
use std::future::Future;
use std::pin::Pin;
use tonic::codegen::http::uri::PathAndQuery;

#[derive(Parser)]
struct Args {
    /// Seconds measured per variant per round.
    #[arg(long, default_value_t = 1.5)]
    seconds: f64,
    /// Seconds each variant runs unmeasured before each measurement (connection, allocator, latency estimate).
    #[arg(long, default_value_t = 0.3)]
    warm: f64,
    /// Rounds per client process (each runs every variant once).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Client processes, run one after another, each with its own echo server; results pool their rounds.
    /// A process tilts all its rounds alike (by up to ±10%), so many short processes beat a few long ones.
    #[arg(long, default_value_t = 8)]
    processes: u32,
    /// Internal: run as client process number N and print raw rounds.
    #[arg(long, hide = true)]
    child: Option<u32>,
    /// Run only variants whose name contains one of these (comma-separated), besides the tonic baseline.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Run only the variants `--only` selects, without the tonic baseline (for profiling one client).
    #[arg(long)]
    solo: bool,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
    /// Serve behind the mesh's permissive acceptor (plaintext and mTLS on one port, certificates from the mesh
    /// CA) and add the mesh channel over mTLS; its ratio to the same channel in plaintext is printed.
    #[arg(long)]
    mtls: bool,
    /// Instead of calls, measure the acceptor's full mTLS handshakes per second per core of the server
    /// process, with this many clients handshaking at once.
    #[arg(long)]
    handshakes: Option<usize>,
    /// Let client and server share every core instead of pinning each client process to CPU 0 and its echo
    /// server to CPU 1 (the default, with `taskset`, on a machine with two cores or more).
    #[arg(long)]
    shared_cores: bool,
    /// Internal: the CPU a client process pins its echo server to (the parent decides: a pinned child sees
    /// only its own core).
    #[arg(long, hide = true)]
    server_cpu: Option<u32>,
}

#[derive(Default)]
struct Sample {
    latencies_us: Vec<u64>,
    calls: u64,
    wall: Duration,
    cpu: Duration,
    errors: u64,
}

fn cpu_time() -> Duration {
    // utime + stime of this process, in clock ticks (100 Hz on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0) + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// One unary call through some channel; `true` when it succeeded.
type Caller = Arc<dyn Fn(Bytes) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

macro_rules! caller {
    ($channel:expr) => {
        caller!($channel, true, None)
    };
    // Each call carries the metadata `header()` makes (what propagation alone costs, without a tracer).
    ($channel:expr, header: $header:expr) => {
        caller!($channel, true, Some($header))
    };
    // `ready: false` skips `poll_ready`, as no generated client does: the mesh channel then calls its
    // balancer directly instead of through its queue.
    ($channel:expr, $ready:expr) => {
        caller!($channel, $ready, None)
    };
    ($channel:expr, $ready:expr, $header:expr) => {{
        let channel = $channel;
        let header: Option<fn() -> tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = $header;
        let caller: Caller = Arc::new(move |payload: Bytes| {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            let mut request = tonic::Request::new(payload);
            if let Some(header) = header {
                request.metadata_mut().insert("traceparent", header());
            }
            Box::pin(async move {
                (!$ready || grpc.ready().await.is_ok()) && grpc.unary(request, PathAndQuery::from_static(METHOD), BytesCodec).await.is_ok()
            })
        });
        caller
    }};
}

async fn run(call: Caller, concurrency: usize, seconds: f64) -> Sample {
    let payload = Bytes::from(vec![7u8; 1024]);
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_time();
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (call, payload, stop) = (call.clone(), payload.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut sample = Sample::default();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = call(payload.clone()).await;
                sample.latencies_us.push(t.elapsed().as_micros() as u64);
                sample.calls += 1;
                sample.errors += u64::from(!ok);
            }
            sample
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Sample::default();
    for w in workers {
        let s = w.await.unwrap();
        total.latencies_us.extend(s.latencies_us);
        total.calls += s.calls;
        total.errors += s.errors;
    }
    total.wall = start.elapsed();
    total.cpu = cpu_time().saturating_sub(cpu0);
    total
}

#[derive(Default)]
struct Stats {
    p50: u64,
    p99: u64,
    rps: f64,
    cpu_us: f64,
}

fn stats(mut s: Sample) -> Stats {
    assert_eq!(s.errors, 0, "benchmark calls failed");
    s.latencies_us.sort_unstable();
    let pct = |p: f64| s.latencies_us[((p * s.latencies_us.len() as f64) as usize).min(s.latencies_us.len() - 1)];
    Stats { p50: pct(0.50), p99: pct(0.99), rps: s.calls as f64 / s.wall.as_secs_f64(), cpu_us: s.cpu.as_secs_f64() * 1e6 / s.calls as f64 }
}

/// One hyper HTTP/2 connection and nothing else, as a service generated clients accept.
async fn raw_hyper(
    addr: std::net::SocketAddr,
    mesh_connector: bool,
) -> anyhow::Result<
    impl tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<hyper::body::Incoming>,
        Error = hyper::Error,
        Future = impl Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>> + Send,
    > + Clone
    + Send
    + 'static,
> {
    let (sender, authority) = hyper_connection(addr, mesh_connector).await?;
    Ok(tower::service_fn(move |request: http::Request<tonic::body::Body>| {
        let request = with_origin(request, &authority);
        let mut sender = sender.clone();
        async move { sender.send_request(request).await }
    }))
}

/// One HTTP/2 connection to `addr` with hyper's defaults, through the mesh's TCP connector or a plain socket.
async fn hyper_connection(
    addr: std::net::SocketAddr,
    mesh_connector: bool,
) -> anyhow::Result<(hyper::client::conn::http2::SendRequest<tonic::body::Body>, http::uri::Authority)> {
    use mesh_tower::connect::{Connect, EndpointTarget};
    let io = if mesh_connector {
        let target = EndpointTarget { endpoint: std::sync::Arc::new(mesh_core::Endpoint::new(addr)), tls: None };
        mesh_tower::connect::TcpConnector::from_policy(&Default::default()).connect(&target).await?
    } else {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        hyper_util::rt::TokioIo::new(stream)
    };
    let mut builder = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.timer(hyper_util::rt::TokioTimer::new());
    let (sender, connection) = builder.handshake(io).await?;
    tokio::spawn(connection);
    Ok((sender, addr.to_string().parse()?))
}

/// Gives a generated client's path-only request the scheme and authority HTTP/2 needs.
fn with_origin(mut request: http::Request<tonic::body::Body>, authority: &http::uri::Authority) -> http::Request<tonic::body::Body> {
    let mut parts = request.uri().clone().into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority.clone());
    *request.uri_mut() = http::Uri::from_parts(parts).expect("valid uri");
    request
}

/// A raw hyper connection used the way the balancer uses its connection: the sender behind a mutex, a
/// snapshot read-locked per call, one boxed call future, the serving address in the response's extensions
/// and a body wrapper. Tells the balancer's mechanics apart from its specifics.
async fn balancer_like(
    addr: std::net::SocketAddr,
) -> anyhow::Result<
    impl tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<Wrapped>,
        Error = hyper::Error,
        Future = Pin<Box<dyn Future<Output = Result<http::Response<Wrapped>, hyper::Error>> + Send>>,
    > + Clone
    + Send
    + 'static,
> {
    use std::sync::{Mutex, RwLock};
    let (sender, authority) = hyper_connection(addr, true).await?;
    let sender = Arc::new(Mutex::new(sender));
    let snapshot = Arc::new(RwLock::new(Arc::new(vec![addr])));
    Ok(tower::service_fn(move |request: http::Request<tonic::body::Body>| {
        let request = with_origin(request, &authority);
        let (sender, snapshot) = (sender.clone(), snapshot.clone());
        Box::pin(async move {
            let served = snapshot.read().unwrap()[0];
            let response = sender.lock().unwrap().try_send_request(request);
            let response = response.await.map_err(|e| e.into_error())?;
            let (mut parts, body) = response.into_parts();
            parts.extensions.insert(served);
            Ok(http::Response::from_parts(parts, Wrapped(body)))
        }) as Pin<Box<dyn Future<Output = _> + Send>>
    }))
}

/// A response body passed through, as the balancer's is.
struct Wrapped(hyper::body::Incoming);

impl http_body::Body for Wrapped {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }
}

/// The clients compared, baseline first. Diagnostic ones (ending in `[diag]`) run only when `--only` names them.
const VARIANTS: [&str; 23] = [
    "tonic Channel",
    // A second plain channel. The baseline is both plain channels (the geometric mean of their results in
    // each round), and this one's ratio to the first shows the method's own noise (an A/A test).
    "tonic Channel (second)",
    "mesh Channel (p2c_ewma)",
    "mesh Channel (round_robin)",
    "mesh Channel (p2c_ewma, HTTP/2 PING keepalive 10 s)",
    // Issue 15's cost target: every policy layer installed, none triggering.
    "mesh Channel (p2c_ewma, full policy stack: retries, budget, breaker, outlier detection, rate limit)",
    "mesh Channel (p2c_ewma, calls not polled ready: no queue) [diag]",
    "raw hyper connection, plain socket [diag]",
    "raw hyper connection, mesh connector [diag]",
    "raw hyper connection, balancer-like call path [diag]",
    // The full policy stack one layer at a time, to find which carries its cost.
    "mesh Channel (p2c_ewma, layer: retries and budget) [diag]",
    "mesh Channel (p2c_ewma, layer: breaker) [diag]",
    "mesh Channel (p2c_ewma, layer: outlier detection) [diag]",
    "mesh Channel (p2c_ewma, layer: rate limit) [diag]",
    // Issue 16's target: steady state over mTLS against the same channel in plaintext (with `--mtls`).
    "mesh Channel (p2c_ewma, mTLS)",
    // Issue 18's target: the channel's metrics recorded into an OpenTelemetry SDK provider with the Prometheus
    // exporter, against the same channel recording none.
    "mesh Channel (p2c_ewma, telemetry on: A66 metrics into the Prometheus exporter)",
    "mesh Channel (p2c_ewma, telemetry off)",
    // Issue 18's other half: the same metrics, and a client span per call sampled at 1% (parent-based ratio
    // sampler), exported over OTLP/gRPC to an in-process receiver.
    "mesh Channel (p2c_ewma, telemetry + tracing 1%)",
    // What tracing's cost is made of: the same pipeline sampling nothing, and sampling 1% but propagating
    // nothing (no `traceparent` on the wire).
    "mesh Channel (p2c_ewma, telemetry + tracing never sampled) [diag]",
    "mesh Channel (p2c_ewma, telemetry + tracing 1%, not propagated) [diag]",
    "mesh Channel (p2c_ewma, no telemetry, the same traceparent on every call) [diag]",
    "mesh Channel (p2c_ewma, no telemetry, a new traceparent on every call) [diag]",
    "tonic Channel, a new traceparent on every call [diag]",
];

/// The mTLS variant, and the plaintext one it is compared with.
const MTLS: usize = 14;

/// The full policy stack, metrics and tracing at 1%, and the channel with telemetry off.
const FULL_POLICY: usize = 5;
const TRACED: usize = 17;
const TELEMETRY_OFF: usize = 16;

/// Variants compared in pairs, each round with itself, against their issue's target: (variant, against,
/// what, the most its p50 may cost as a ratio and in µs, the least its throughput may keep).
const PAIRED: [(usize, usize, &str, f64, f64, f64); 3] = [
    // Issue 15: ≤ 3% throughput and ≤ 3% p50.
    (FULL_POLICY, SHIPPED, "full policy stack vs plain channel", 1.03, f64::INFINITY, 0.97),
    // Issue 16: steady-state throughput ≥ 0.95× plaintext (no p50 target).
    (MTLS, SHIPPED, "mTLS vs plaintext mesh channel", f64::INFINITY, f64::INFINITY, 0.95),
    // Issue 18: metrics + tracing at 1% on vs off: ≤ 3% throughput and ≤ 2 µs p50.
    (TRACED, TELEMETRY_OFF, "telemetry + tracing 1% vs telemetry off", f64::INFINITY, 2.0, 0.97),
];

/// The client's credentials for the mTLS variant (set by a `--mtls` client process).
static CLIENT_CREDENTIALS: std::sync::OnceLock<Arc<mesh_tower::tls::Credentials>> = std::sync::OnceLock::new();

/// The server's SPIFFE ID in `--mtls` runs.
const SERVER_ID: &str = "spiffe://bench.test/ns/default/sa/echo";

/// Variants that form the baseline.
const BASELINE: [usize; 2] = [0, 1];

/// The mesh channel as shipped (static discovery, P2C-EWMA): the one the issue's targets are for.
const SHIPPED: usize = 2;

/// Builds variant `i` of [`VARIANTS`], connected to `addr`.
async fn connect(i: usize, addr: std::net::SocketAddr) -> anyhow::Result<Caller> {
    let mesh = || mesh_tonic::Channel::builder(format!("static:///{addr}"));
    let tonic = async || anyhow::Ok(tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?);
    Ok(match i {
        0 | 1 => caller!(tonic().await?),
        2 => caller!(mesh().lb(LbPolicy::p2c_ewma()).build()?),
        3 => caller!(mesh().lb(LbPolicy::RoundRobin).build()?),
        4 => caller!(mesh().lb(LbPolicy::p2c_ewma()).http2_keepalive(Some(Duration::from_secs(10))).build()?),
        5 => caller!(full_policy_stack(mesh().lb(LbPolicy::p2c_ewma())).build()?),
        6 => caller!(mesh().lb(LbPolicy::p2c_ewma()).build()?, false),
        7 => caller!(raw_hyper(addr, false).await?),
        8 => caller!(raw_hyper(addr, true).await?),
        9 => caller!(balancer_like(addr).await?),
        10..=13 => caller!(one_layer(mesh().lb(LbPolicy::p2c_ewma()), i - 10).build()?),
        15 => caller!(mesh().lb(LbPolicy::p2c_ewma()).meter(Some(prometheus()?.meter())).build()?),
        16 => caller!(mesh().lb(LbPolicy::p2c_ewma()).meter(None).build()?),
        17..=19 => {
            let tracer = tracing(i - 17).await?.tracer();
            caller!(mesh().lb(LbPolicy::p2c_ewma()).meter(Some(prometheus()?.meter())).tracer(Some(tracer)).build()?)
        }
        20 => caller!(mesh().lb(LbPolicy::p2c_ewma()).meter(None).build()?, header: || {
            tonic::metadata::MetadataValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
        }),
        21 => caller!(mesh().lb(LbPolicy::p2c_ewma()).meter(None).build()?, header: new_traceparent),
        22 => caller!(tonic().await?, header: new_traceparent),
        MTLS => {
            let credentials = CLIENT_CREDENTIALS.get().ok_or_else(|| anyhow::anyhow!("the mTLS variant needs --mtls"))?.clone();
            let policy =
                mesh_core::policy::TlsPolicy { server_name: None, allowed_identities: vec![SERVER_ID.to_owned()], ..Default::default() };
            caller!(mesh().lb(LbPolicy::p2c_ewma()).mtls(credentials, policy).build()?)
        }
        _ => anyhow::bail!("no variant {i}"),
    })
}

/// A `traceparent` value new on every call (what a traced call's header costs on the wire, without a tracer).
fn new_traceparent() -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let value = format!("00-{:032x}-{:016x}-00", u128::from(n) * 0x9e37_79b9_7f4a_7c15, n);
    tonic::metadata::MetadataValue::try_from(value).expect("hex digits")
}

/// The process's OTLP trace pipelines, exporting to one receiver in the process (not installed globally, so
/// only the variant given a tracer traces): 0 samples 1% (the shipped default of W3C propagation), 1 samples
/// nothing, 2 samples 1% and propagates nothing.
async fn tracing(kind: usize) -> anyhow::Result<&'static mesh_tonic::telemetry::Tracing> {
    type Pipeline = tokio::sync::OnceCell<mesh_tonic::telemetry::Tracing>;
    static RECEIVER: tokio::sync::OnceCell<mesh_tests::otlp::OtlpReceiver> = tokio::sync::OnceCell::const_new();
    static TRACING: [Pipeline; 3] = [Pipeline::const_new(), Pipeline::const_new(), Pipeline::const_new()];
    let receiver = RECEIVER.get_or_try_init(mesh_tests::otlp::OtlpReceiver::start).await?;
    let pipeline = TRACING.get(kind).ok_or_else(|| anyhow::anyhow!("no trace pipeline {kind}"))?;
    pipeline
        .get_or_try_init(async || {
            let otlp = mesh_tonic::telemetry::Tracing::otlp(receiver.endpoint(), if kind == 1 { 0.0 } else { 0.01 });
            let otlp = if kind == 2 { otlp.propagation(&[]) } else { otlp };
            anyhow::Ok(otlp.service_name("bench-channel").build()?)
        })
        .await
}

/// One Prometheus-exporting meter provider for the process (not installed globally, so only the variant
/// given its meter records into it).
fn prometheus() -> anyhow::Result<&'static mesh_tonic::admin::Prometheus> {
    static PROMETHEUS: std::sync::OnceLock<mesh_tonic::admin::Prometheus> = std::sync::OnceLock::new();
    if let Some(p) = PROMETHEUS.get() {
        return Ok(p);
    }
    let p = mesh_tonic::admin::Prometheus::new()?;
    Ok(PROMETHEUS.get_or_init(|| p))
}

/// Every policy layer of issue 15 on the channel's one route and cluster, set so that none triggers: retries
/// (UNAVAILABLE, 3 attempts) within the default retry budget, a breaker at 1,000 calls in flight (below Envoy's
/// default, so the layer is installed), outlier detection with Envoy's defaults, and a rate limit far above the
/// benchmark's rate.
fn full_policy_stack(builder: mesh_tonic::ChannelBuilder) -> mesh_tonic::ChannelBuilder {
    use mesh_core::policy::{CircuitBreakers, OutlierDetection, RateLimit, RetryBudget, RetryPolicy};
    builder
        .retry(RetryPolicy { max_attempts: 3, ..RetryPolicy::default() })
        .circuit_breakers(CircuitBreakers { max_requests: 1000, retry_budget: Some(RetryBudget::default()), ..CircuitBreakers::default() })
        .outlier_detection(OutlierDetection::default())
        .rate_limit(RateLimit { max_tokens: u32::MAX, tokens_per_fill: 1_000_000, fill_interval: Duration::from_millis(1) })
}

/// One layer of [`full_policy_stack`], set the same way: 0 retries and budget, 1 breaker, 2 outlier detection,
/// 3 rate limit.
fn one_layer(builder: mesh_tonic::ChannelBuilder, layer: usize) -> mesh_tonic::ChannelBuilder {
    use mesh_core::policy::{CircuitBreakers, OutlierDetection, RateLimit, RetryBudget, RetryPolicy};
    match layer {
        0 => builder
            .retry(RetryPolicy { max_attempts: 3, ..RetryPolicy::default() })
            .circuit_breakers(CircuitBreakers { retry_budget: Some(RetryBudget::default()), ..CircuitBreakers::default() }),
        1 => builder.circuit_breakers(CircuitBreakers { max_requests: 1000, ..CircuitBreakers::default() }),
        2 => builder.outlier_detection(OutlierDetection::default()),
        _ => builder.rate_limit(RateLimit { max_tokens: u32::MAX, tokens_per_fill: 1_000_000, fill_interval: Duration::from_millis(1) }),
    }
}

/// The variants this run measures, as `(index in VARIANTS, name)`.
fn selected(args: &Args) -> Vec<(usize, &'static str)> {
    VARIANTS
        .iter()
        .copied()
        .enumerate()
        .filter(|(i, name)| match &args.only {
            _ if BASELINE.contains(i) => !args.solo,
            _ if *i == MTLS && !args.mtls => false,
            Some(only) => only.iter().any(|o| name.contains(o.as_str())),
            None => !name.ends_with("[diag]"),
        })
        .collect()
}

/// p50 µs, p99 µs, calls/s, client CPU µs per call.
type Metrics = [f64; 4];

/// One round of one process at one concurrency: every selected variant's metrics, in [`selected`] order.
struct Round {
    process: u32,
    concurrency: usize,
    round: u32,
    metrics: Vec<Metrics>,
}

/// A client process: starts its own echo server, runs the rounds and prints each variant's metrics per round
/// on stdout, one line each: `round <concurrency> <round> <variant> <p50> <p99> <calls/s> <cpu>`.
fn child(args: &Args, process: u32) -> anyhow::Result<()> {
    let server_bin: PathBuf = std::env::current_exe()?.with_file_name("mesh-test-server");
    let mut command = pinned(args.server_cpu, &server_bin);
    command.args(["--reply-bytes", "1024"]);
    let pki = mesh_tests::peers::TempDir::new("bench-pki")?;
    if args.mtls || args.handshakes.is_some() {
        let ca = mesh_control::ca::Ca::generate("bench.test")?;
        let now = std::time::SystemTime::now();
        ca.issue(SERVER_ID, &[], Duration::from_secs(3600), now)?.write_to(&pki.0.join("server"))?;
        let client = ca.issue("spiffe://bench.test/ns/default/sa/bench", &[], Duration::from_secs(3600), now)?;
        let key = client.key.as_deref().unwrap_or_default();
        let credentials = mesh_tower::tls::Credentials::from_pem(client.chain.as_bytes(), key.as_bytes(), client.bundle.as_bytes())?;
        let _ = CLIENT_CREDENTIALS.set(Arc::new(credentials));
        command.arg("--mtls").arg(pki.0.join("server"));
    }
    let server = spawn_listening(command)?;
    if let Some(clients) = args.handshakes {
        return handshakes(&server, clients, args.seconds);
    }
    let addr = server.addr;
    let variants = selected(args);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        // Each process shuffles with its own fixed sequence.
        let mut shuffle = SplitMix64::new(0x0bad_5eed + u64::from(process));
        for &c in &args.concurrency {
            for r in 0..args.rounds {
                // A new order every round, so no variant keeps a position in the round or a neighbour, and
                // whatever those do (a warmer server, a channel closing just before) is shared alike.
                let mut order: Vec<usize> = (0..variants.len()).collect();
                for k in (1..order.len()).rev() {
                    order.swap(k, (shuffle.next_u64() % (k as u64 + 1)) as usize);
                }
                for i in order {
                    // A fresh channel per round, so no variant keeps a lucky or unlucky connection (which server
                    // thread serves it, where its tasks landed) for the whole run; warmed before it is measured.
                    let call = connect(variants[i].0, addr).await?;
                    run(call.clone(), c, args.warm).await;
                    let s = stats(run(call, c, args.seconds).await);
                    println!("round {c} {r} {i} {} {} {} {}", s.p50, s.p99, s.rps, s.cpu_us);
                }
            }
        }
        anyhow::Ok(())
    })?;
    drop(server);
    Ok(())
}

/// Full mTLS handshakes against `server` from `clients` loops for `seconds`: prints
/// `handshakes <count> <seconds> <server CPU seconds>`.
fn handshakes(server: &mesh_tests::peers::Peer, clients: usize, seconds: f64) -> anyhow::Result<()> {
    let credentials = CLIENT_CREDENTIALS.get().ok_or_else(|| anyhow::anyhow!("no credentials"))?.clone();
    let connector = mesh_tower::tls::MtlsConnector::new(mesh_tower::connect::TcpConnector::new(), Some(credentials));
    let policy =
        Arc::new(mesh_core::policy::TlsPolicy { server_name: None, allowed_identities: vec![SERVER_ID.to_owned()], ..Default::default() });
    let target = mesh_tower::connect::EndpointTarget { endpoint: Arc::new(mesh_core::Endpoint::new(server.addr)), tls: Some(policy) };
    let server_cpu = || -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.pid())).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
        Duration::from_millis(ticks * 10)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let done = runtime.block_on(async {
        use mesh_tower::connect::Connect;
        let (cpu0, until) = (server_cpu(), Instant::now() + Duration::from_secs_f64(seconds));
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let (connector, target) = (connector.clone(), target.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < until {
                        connector.connect(&target).await.expect("an mTLS handshake");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut n = 0;
        for worker in workers {
            n += worker.await.unwrap_or(0);
        }
        // Let the server finish the last handshakes' accounting.
        tokio::time::sleep(Duration::from_millis(200)).await;
        (n, server_cpu().saturating_sub(cpu0))
    });
    println!("handshakes {} {seconds} {}", done.0, done.1.as_secs_f64());
    Ok(())
}

/// Whether client and server run on a core each ([`Args::shared_cores`]); decided by the parent process,
/// which sees every core.
fn pins(args: &Args) -> bool {
    !args.shared_cores && std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
}

/// A command running `program`, on CPU `cpu` alone when there is one (through `taskset`, which must be
/// installed).
fn pinned(cpu: Option<u32>, program: &std::path::Path) -> Command {
    let Some(cpu) = cpu else {
        return Command::new(program);
    };
    let mut command = Command::new("taskset");
    command.args(["-c", &cpu.to_string()]).arg(program);
    command
}

/// Runs the client processes one after another and collects their rounds.
fn collect_rounds(args: &Args, variants: usize) -> anyhow::Result<Vec<Round>> {
    let mut rounds: Vec<Round> = Vec::new();
    for process in 0..args.processes {
        let pin = pins(args);
        let output = pinned(pin.then_some(0), &std::env::current_exe()?)
            .args(std::env::args().skip(1))
            .args(if pin { vec!["--server-cpu", "1"] } else { vec![] })
            .args(["--child", &process.to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()?;
        anyhow::ensure!(output.status.success(), "client process {process} failed: {}", output.status);
        for line in String::from_utf8(output.stdout)?.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, c, r, i, p50, p99, rps, cpu] = &fields[..] else { anyhow::bail!("bad line from client process: {line:?}") };
            let (c, r, i): (usize, u32, usize) = (c.parse()?, r.parse()?, i.parse()?);
            let metrics: Metrics = [p50.parse()?, p99.parse()?, rps.parse()?, cpu.parse()?];
            let k = match rounds.iter().position(|x| (x.process, x.concurrency, x.round) == (process, c, r)) {
                Some(k) => k,
                None => {
                    rounds.push(Round { process, concurrency: c, round: r, metrics: vec![[f64::NAN; 4]; variants] });
                    rounds.len() - 1
                }
            };
            *rounds[k].metrics.get_mut(i).ok_or_else(|| anyhow::anyhow!("no variant {i}: {line:?}"))? = metrics;
        }
    }
    anyhow::ensure!(
        rounds.iter().all(|r| r.metrics.iter().all(|m| !m[0].is_nan())),
        "a client process left a variant unmeasured in some round"
    );
    Ok(rounds)
}

/// The median; of an even count, the mean of the middle two (a process's two rounds: their mean).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) { (v[n / 2 - 1] + v[n / 2]) / 2.0 } else { v[n / 2] }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The pairs name variants by place in the list: a reordered list must not compare the wrong ones.
    for (i, name) in [(FULL_POLICY, "full policy"), (MTLS, "mTLS"), (TRACED, "tracing 1%"), (TELEMETRY_OFF, "telemetry off")] {
        anyhow::ensure!(VARIANTS[i].contains(name), "variant {i} is {:?}, not the {name} variant", VARIANTS[i]);
    }
    if let Some(process) = args.child {
        return child(&args, process);
    }
    if let Some(clients) = args.handshakes {
        let output = Command::new(std::env::current_exe()?).args(std::env::args().skip(1)).args(["--child", "0"]).output()?;
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text.lines().find_map(|l| l.strip_prefix("handshakes ")).ok_or_else(|| anyhow::anyhow!("no result: {text}"))?;
        let fields: Vec<f64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
        let [n, secs, cpu] = fields[..] else { anyhow::bail!("bad result line {line:?}") };
        println!("| clients | handshakes/s | server CPU s | handshakes per server CPU second (per core) |");
        println!("|---|---|---|---|");
        println!("| {clients} | {:.0} | {cpu:.2} | {:.0} |", n / secs, n / cpu.max(1e-9));
        return Ok(());
    }
    let variants = selected(&args);
    let rounds = collect_rounds(&args, variants.len())?;
    let baseline: Vec<usize> = BASELINE.iter().filter_map(|b| variants.iter().position(|(i, _)| i == b)).collect();

    let cores = if pins(&args) { "each client process on CPU 0, its echo server on CPU 1" } else { "client and server sharing every core" };
    println!("Cores: {cores}.");
    println!();
    println!("Median over rounds of each variant's own results:");
    println!();
    println!("| concurrency | client | p50 µs | p99 µs | calls/s | client CPU µs/call | client CPU % |");
    println!("|---|---|---|---|---|---|---|");
    for &c in &args.concurrency {
        let at_c: Vec<&Round> = rounds.iter().filter(|r| r.concurrency == c).collect();
        for (i, (_, name)) in variants.iter().enumerate() {
            let m = |k: usize| median(at_c.iter().map(|r| r.metrics[i][k]).collect());
            println!("| {c} | {name} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} |", m(0), m(1), m(2), m(3), m(2) * m(3) / 1e4);
        }
    }
    let [first, second] = baseline[..] else { return Ok(()) };
    // Per round, each variant's ratio to the baseline in that same round: pairing cancels drift in machine
    // load between rounds. The baseline is both plain channels (geometric mean); the second plain channel is
    // compared with the first alone: the A/A test.
    let ratio = |r: &Round, i: usize| -> Metrics {
        let (a, b) = (r.metrics[first], r.metrics[second]);
        let base: Metrics = if i == second { a } else { std::array::from_fn(|k| (a[k] * b[k]).sqrt()) };
        std::array::from_fn(|k| r.metrics[i][k] / base[k])
    };
    println!();
    println!(
        "Median over all {} rounds ({} client processes) of each round's ratio to plain tonic (both plain channels; the second one: to the first), and each process's median p50 ratio:",
        args.rounds * args.processes,
        args.processes
    );
    println!();
    println!("| concurrency | client | p50 vs tonic | p99 vs tonic | throughput vs tonic | CPU/call vs tonic | p50 per process |");
    println!("|---|---|---|---|---|---|---|");
    let mut verdicts = Vec::new();
    for &c in &args.concurrency {
        let at_c: Vec<&Round> = rounds.iter().filter(|r| r.concurrency == c).collect();
        for (i, (v, name)) in variants.iter().enumerate().filter(|(i, _)| *i != first) {
            let m = |k: usize| median(at_c.iter().map(|r| ratio(r, i)[k]).collect());
            let per_process: Vec<String> = (0..args.processes)
                .map(|p| format!("{:.3}", median(at_c.iter().filter(|r| r.process == p).map(|r| ratio(r, i)[0]).collect())))
                .collect();
            println!("| {c} | {name} | {:.3} | {:.3} | {:.3} | {:.3} | {} |", m(0), m(1), m(2), m(3), per_process.join(" "));
            if *v == SHIPPED {
                verdicts.push((c, m(0), m(2)));
            }
        }
    }
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    // Pairs against their issues' targets, per round (the two variants ran back to back in it).
    for (variant, against, what, max_p50, max_p50_us, min_rps) in PAIRED {
        let (Some(a), Some(b)) = (variants.iter().position(|(v, _)| *v == variant), variants.iter().position(|(v, _)| *v == against))
        else {
            continue;
        };
        println!();
        println!("| concurrency | {what}: p50 | p50 difference µs | p99 | throughput | CPU/call |");
        println!("|---|---|---|---|---|---|");
        for &c in &args.concurrency {
            let at_c: Vec<&Round> = rounds.iter().filter(|r| r.concurrency == c).collect();
            let m = |k: usize| median(at_c.iter().map(|r| r.metrics[a][k] / r.metrics[b][k]).collect());
            let us = median(at_c.iter().map(|r| r.metrics[a][0] - r.metrics[b][0]).collect());
            println!("| {c} | {:.3} | {us:+.1} | {:.3} | {:.3} | {:.3} |", m(0), m(1), m(2), m(3));
            let mut p50 = String::new();
            if max_p50.is_finite() {
                p50 += &format!("p50 {:.3}× ≤ {max_p50}× {}, ", m(0), verdict(m(0) <= max_p50));
            }
            if max_p50_us.is_finite() {
                p50 += &format!("p50 {us:+.1} µs ≤ {max_p50_us} µs {}, ", verdict(us <= max_p50_us));
            }
            println!("targets: concurrency {c}: {what}: {p50}throughput {:.3}× ≥ {min_rps}× {}", m(2), verdict(m(2) >= min_rps));
        }
    }
    // The issue's targets for the mesh channel as shipped (static discovery, P2C-EWMA), judged on this run.
    println!();
    for (c, p50, rps) in verdicts {
        println!(
            "targets: concurrency {c}: p50 {p50:.3}× ≤ 1.05× {}, throughput {rps:.3}× ≥ 0.95× {}",
            verdict(p50 <= 1.05),
            verdict(rps >= 0.95)
        );
    }
    Ok(())
}
