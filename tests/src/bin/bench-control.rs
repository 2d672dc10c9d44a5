//! Benchmark: the control plane at scale (issue 4).
//!
//! `cargo run --release -p mesh-tests --bin bench-control -- [--clients N] [--services S] [--changes C] [--delta-percent P]`
//!
//! Starts the real `mesh-control` binary (built in this profile) as its own
//! process on a generated mesh file: S services `svc-0..`, each with 3–6
//! static endpoints on 127.0.0.1 (nothing listens), subsets v1/v2 by label,
//! a 90/10 weighted split, a timeout, retries, circuit breakers and outlier
//! detection. Then N simulated proxyless ADS clients connect, each on its
//! own HTTP/2 connection (N TCP connections), node id `client-i`, service
//! `svc-(i mod S)`. Each subscribes the way a gRPC proxyless client does,
//! one type after the other's first response: LDS for its service, RDS for
//! the route configuration of the same name, CDS and EDS for `svc-k`,
//! `svc-k|v1` and `svc-k|v2`; it ACKs every response. P% of the clients
//! (spread evenly) use delta ADS, the others State of the World.
//!
//! Once every client has its initial configuration (and `/status` shows all
//! of them ACKed), the mesh file is rewritten atomically (temp file +
//! rename) with every service's split flipped (50/50, then 90/10, ...), C
//! times, each a random 1.5–1.7 s after the previous one reached every
//! client (so the changes fall at different phases of mesh-control's file
//! poll). For each change and client: the time from the rename to the
//! client reading the RouteConfiguration with the new weights (decoded and
//! checked). That includes mesh-control's 200 ms poll of the file, so the
//! time to mesh-control's `mesh file accepted` log line (written after the
//! new snapshots are published) and the spread after the first client are
//! shown too. Memory is mesh-control's resident set (`/proc/<pid>/status`
//! VmRSS, VmHWM): before any client, idle with every client connected, the
//! peak while they connected, and the peak during the changes (VmHWM reset
//! through `/proc/<pid>/clear_refs` before the first change).
//!
//! Both processes share the machine's cores; every client is a task on this
//! process's multi-threaded tokio runtime.

use std::fmt::Write as _;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::Any;
use mesh_tests::peers::{MeshControl, TempDir};
use prost::Message;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
struct Args {
    /// Simulated ADS clients, one connection each.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Services in the mesh file.
    #[arg(long, default_value_t = 50)]
    services: usize,
    /// Mesh file changes measured.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// Share of clients on delta ADS (the rest use SotW), in percent.
    #[arg(long, default_value_t = 20)]
    delta_percent: usize,
    /// Connections being set up at once while the clients connect.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
}

const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// In the order a proxyless client subscribes.
const TYPES: [&str; 4] = [LISTENER, ROUTE, CLUSTER, ENDPOINT];
const ROUTE_INDEX: usize = 1;

/// How long a change may take before the clients that missed it are reported.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Quiet time after a change reached everyone, to count extra responses and let ACKs land.
const AFTER_CHANGE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Sotw,
    Delta,
}

impl Protocol {
    fn of(client: usize, delta_percent: usize) -> Self {
        if (client * delta_percent) % 100 < delta_percent { Self::Delta } else { Self::Sotw }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Sotw => "SotW",
            Self::Delta => "delta",
        }
    }
}

/// What a client saw.
struct Event {
    client: usize,
    at: Instant,
    kind: Kind,
}

enum Kind {
    /// A response of `TYPES[type_index]`; for routes, the v1 weight it carries.
    Response { type_index: usize, v1_weight: Option<u32> },
    /// The client's connection or stream failed.
    Failed(String),
}

fn service_of(client: usize, services: usize) -> String {
    format!("svc-{}", client % services)
}

/// The names a client of `service` subscribes to for `TYPES[type_index]`.
fn names(type_index: usize, service: &str) -> Vec<String> {
    if TYPES[type_index] == LISTENER || TYPES[type_index] == ROUTE {
        vec![service.to_owned()]
    } else {
        vec![service.to_owned(), format!("{service}|v1"), format!("{service}|v2")]
    }
}

fn node(client: usize) -> Node {
    Node { id: format!("client-{client}"), user_agent_name: "bench-control".to_owned(), ..Default::default() }
}

/// The weight of the `|v1` cluster in the (single) route configuration's first route.
fn v1_weight<'a>(mut resources: impl Iterator<Item = &'a Any>) -> anyhow::Result<u32> {
    let any = resources.next().context("route response without resources")?;
    let config = RouteConfiguration::decode(any.value.as_slice())?;
    let action = config.virtual_hosts.first().and_then(|v| v.routes.first()).and_then(|r| r.action.as_ref());
    let Some(route::Action::Route(action)) = action else { bail!("route configuration {} has no route action", config.name) };
    let Some(ClusterSpecifier::WeightedClusters(weighted)) = &action.cluster_specifier else {
        bail!("route configuration {} has no weighted clusters", config.name)
    };
    weighted
        .clusters
        .iter()
        .find(|c| c.name.ends_with("|v1"))
        .and_then(|c| c.weight.as_ref())
        .map(|w| w.value)
        .with_context(|| format!("route configuration {} has no v1 weight", config.name))
}

fn type_index(type_url: &str) -> anyhow::Result<usize> {
    TYPES.iter().position(|t| *t == type_url).with_context(|| format!("unexpected type {type_url}"))
}

/// A State of the World client: subscribes type after type, ACKs everything, reports every response.
async fn sotw_client(client: usize, channel: Channel, service: String, events: mpsc::UnboundedSender<Event>) -> anyhow::Result<()> {
    let request = |type_index: usize| DiscoveryRequest {
        type_url: TYPES[type_index].to_owned(),
        resource_names: names(type_index, &service),
        ..Default::default()
    };
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(DiscoveryRequest { node: Some(node(client)), ..request(0) })?;
    let mut responses =
        AggregatedDiscoveryServiceClient::new(channel).stream_aggregated_resources(UnboundedReceiverStream::new(rx)).await?.into_inner();
    let mut subscribed = 1;
    while let Some(response) = responses.message().await? {
        let at = Instant::now();
        let type_index = type_index(&response.type_url)?;
        tx.send(DiscoveryRequest { version_info: response.version_info, response_nonce: response.nonce, ..request(type_index) })?;
        if type_index + 1 == subscribed && subscribed < TYPES.len() {
            tx.send(request(subscribed))?;
            subscribed += 1;
        }
        let v1_weight = if type_index == ROUTE_INDEX { Some(v1_weight(response.resources.iter())?) } else { None };
        events.send(Event { client, at, kind: Kind::Response { type_index, v1_weight } })?;
    }
    bail!("the control plane ended the stream")
}

/// A delta client: the same subscriptions over `DeltaAggregatedResources`.
async fn delta_client(client: usize, channel: Channel, service: String, events: mpsc::UnboundedSender<Event>) -> anyhow::Result<()> {
    let subscribe = |type_index: usize| DeltaDiscoveryRequest {
        type_url: TYPES[type_index].to_owned(),
        resource_names_subscribe: names(type_index, &service),
        ..Default::default()
    };
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(DeltaDiscoveryRequest { node: Some(node(client)), ..subscribe(0) })?;
    let mut responses =
        AggregatedDiscoveryServiceClient::new(channel).delta_aggregated_resources(UnboundedReceiverStream::new(rx)).await?.into_inner();
    let mut subscribed = 1;
    while let Some(response) = responses.message().await? {
        let at = Instant::now();
        let type_index = type_index(&response.type_url)?;
        tx.send(DeltaDiscoveryRequest { type_url: response.type_url.clone(), response_nonce: response.nonce, ..Default::default() })?;
        if type_index + 1 == subscribed && subscribed < TYPES.len() {
            tx.send(subscribe(subscribed))?;
            subscribed += 1;
        }
        let v1_weight =
            if type_index == ROUTE_INDEX { Some(v1_weight(response.resources.iter().filter_map(|r| r.resource.as_ref()))?) } else { None };
        events.send(Event { client, at, kind: Kind::Response { type_index, v1_weight } })?;
    }
    bail!("the control plane ended the stream")
}

/// The mesh file: `services` services whose routes split `v1`/`v2`.
fn mesh_yaml(services: usize, v1: u32, v2: u32) -> String {
    let mut out = String::from("# Generated by bench-control.\nservices:\n");
    for s in 0..services {
        let endpoints = 3 + s % 4;
        let _ = writeln!(out, "  svc-{s}:\n    lb: round_robin\n    endpoints:");
        for e in 0..endpoints {
            // The last endpoint is v2 (the canary), the others v1.
            let version = if e + 1 == endpoints { "v2" } else { "v1" };
            let _ = writeln!(out, "      - {{ address: 127.0.0.1:{}, labels: {{ version: {version} }} }}", 20_000 + s * 10 + e);
        }
        let _ = writeln!(
            out,
            "    subsets:
      v1: {{ labels: {{ version: v1 }} }}
      v2: {{ labels: {{ version: v2 }} }}
    routes:
      - split: {{ v1: {v1}, v2: {v2} }}
    timeout: 5s
    retries: {{ attempts: 3, on: [unavailable], per_try_timeout: 1s, backoff: {{ base: 25ms, max: 250ms }}, budget_percent: 20 }}
    circuit_breakers: {{ max_connections: 1024, max_pending_requests: 1024, max_requests: 1024, max_retries: 3 }}
    outlier_detection: {{ consecutive_errors: 5, interval: 10s, base_ejection_time: 30s, max_ejection_percent: 10 }}"
        );
    }
    out
}

/// Replaces `path` atomically: a temp file in the same directory, then rename.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let value = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).with_context(|| format!("no {field} for {pid}"))?;
    Ok(value.trim().trim_end_matches("kB").trim().parse::<u64>()? * 1024)
}

/// Resets the process's VmHWM to its current RSS (Linux ≥ 4.0).
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// User + system CPU time of a process (clock ticks taken as 10 ms).
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0) + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// The soft limit on open files; both processes need one descriptor per client.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.trim_start_matches("Max open files").split_whitespace().next()?;
    if soft == "unlimited" { Some(u64::MAX) } else { soft.parse().ok() }
}

/// When mesh-control logged `mesh file accepted` for `version` (its log lines start with an RFC 3339 UTC time).
fn accepted_at(log: &Path, version: u64) -> Option<SystemTime> {
    let text = std::fs::read_to_string(log).ok()?;
    let wanted = format!("version={version}");
    text.lines().map(strip_ansi).find_map(|line| {
        if !line.contains("mesh file accepted") || !line.split_whitespace().any(|w| w == wanted) {
            return None;
        }
        parse_utc(line.split_whitespace().next()?)
    })
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `2026-11-25T10:00:00.123456Z` → time.
fn parse_utc(text: &str) -> Option<SystemTime> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut date = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (date.next()??, date.next()??, date.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.split(':').map(|p| p.parse::<u64>().ok());
    let (h, min, s) = (hms.next()??, hms.next()??, hms.next()??);
    let nanos = format!("{fraction:0<9}").get(..9)?.parse::<u32>().ok()?;
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + min * 60 + s;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// One change as measured.
struct Change {
    split: (u32, u32),
    accepted: Option<Duration>,
    /// Per client: rename → the client read the new route configuration.
    arrivals: Vec<Option<Duration>>,
    /// Responses per type during the change (and the quiet second after it).
    responses: [usize; 4],
    control_cpu: Duration,
    bench_cpu: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.clients > 0 && args.services > 0, "--clients and --services must be positive");
    let needed = args.clients as u64 + 256;
    match open_files_limit() {
        Some(limit) if limit < needed => bail!(
            "the open-files limit is {limit}, and each process needs one descriptor per client ({} clients): \
             raise it first, e.g. `ulimit -n 4096`",
            args.clients
        ),
        _ => {}
    }
    let dir = TempDir::new("bench-control")?;
    let mesh_path = dir.0.join("mesh.yaml");
    std::fs::write(&mesh_path, mesh_yaml(args.services, 90, 10))?;
    // Builds mesh-control in this profile if needed, then starts it.
    let control = MeshControl::start(&mesh_path, &dir.0)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(&args, &control, &mesh_path))
}

async fn run(args: &Args, control: &MeshControl, mesh_path: &Path) -> anyhow::Result<()> {
    let pid = control.pid();
    let n = args.clients;
    let log: PathBuf = control.log.clone();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = proc_status_bytes(pid, "VmRSS")?;

    // Connect every client, each on its own connection.
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let endpoint = Endpoint::from_shared(format!("http://{}", control.xds))?.tcp_nodelay(true);
    let limit = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let protocols: Vec<Protocol> = (0..n).map(|i| Protocol::of(i, args.delta_percent)).collect();
    let control_cpu0 = cpu_time(&pid.to_string());
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (client, &protocol) in protocols.iter().enumerate() {
        let (endpoint, limit, events) = (endpoint.clone(), limit.clone(), events_tx.clone());
        let service = service_of(client, args.services);
        tasks.push(tokio::spawn(async move {
            let channel = {
                let _permit = limit.acquire().await;
                endpoint.connect().await
            };
            let result = match channel {
                Ok(channel) => match protocol {
                    Protocol::Sotw => sotw_client(client, channel, service, events.clone()).await,
                    Protocol::Delta => delta_client(client, channel, service, events.clone()).await,
                },
                Err(e) => Err(e.into()),
            };
            if let Err(e) = result {
                let _ = events.send(Event { client, at: Instant::now(), kind: Kind::Failed(format!("{e:#}")) });
            }
        }));
    }
    drop(events_tx);

    // Every client has a response of every type.
    let mut seen = vec![0u8; n];
    let mut ready = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while ready < n {
        let event = match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => bail!("every client is gone"),
            Err(_) => bail!("only {ready} of {n} clients got their configuration within 120 s; log: {}", log.display()),
        };
        match event.kind {
            Kind::Response { type_index, v1_weight } => {
                if v1_weight.is_some_and(|w| w != 90) {
                    bail!("client {} got v1 weight {v1_weight:?} before any change", event.client);
                }
                let before = seen[event.client];
                seen[event.client] |= 1 << type_index;
                if before != 0b1111 && seen[event.client] == 0b1111 {
                    ready += 1;
                }
            }
            Kind::Failed(e) => bail!("client {} failed while connecting: {e}", event.client),
        }
    }
    let connected_in = started.elapsed();
    let connect_cpu = cpu_time(&pid.to_string()).saturating_sub(control_cpu0);

    // mesh-control agrees: every stream has ACKed all four types.
    let mut acked_streams = 0;
    let mut status_bytes = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = tokio::task::block_in_place(|| control.status())?;
        status_bytes = status.to_string().len();
        let streams = status["ads"]["streams"].as_array().cloned().unwrap_or_default();
        acked_streams = streams
            .iter()
            .filter(|s| TYPES.iter().all(|t| s["types"][*t]["acked_version"].as_str().is_some_and(|v| !v.is_empty())))
            .count();
        if acked_streams == n && streams.len() == n {
            break;
        }
    }
    if acked_streams != n {
        bail!("/status shows {acked_streams} of {n} streams with all four types ACKed");
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = proc_status_bytes(pid, "VmRSS")?;
    let hwm_connect = proc_status_bytes(pid, "VmHWM")?;
    let peak_reset = reset_peak(pid);
    let bench_rss_idle = proc_status_bytes(std::process::id(), "VmRSS")?;

    // The changes.
    let mut changes = Vec::new();
    for change in 0..args.changes {
        let split = if change % 2 == 0 { (50, 50) } else { (90, 10) };
        let text = mesh_yaml(args.services, split.0, split.1);
        let (control_cpu0, bench_cpu0) = (cpu_time(&pid.to_string()), cpu_time("self"));
        write_atomically(mesh_path, &text)?;
        let t0 = Instant::now();
        let t0_wall = SystemTime::now();
        let mut arrivals: Vec<Option<Duration>> = vec![None; n];
        let mut responses = [0usize; 4];
        let mut got = 0;
        let mut quiet_until: Option<tokio::time::Instant> = None;
        let timeout = tokio::time::Instant::from_std(t0 + CHANGE_TIMEOUT);
        loop {
            let deadline = quiet_until.unwrap_or(timeout);
            let event = match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => bail!("every client is gone"),
                Err(_) => break,
            };
            match event.kind {
                Kind::Response { type_index, v1_weight } => {
                    responses[type_index] += 1;
                    if v1_weight == Some(split.0) && arrivals[event.client].is_none() {
                        arrivals[event.client] = Some(event.at.saturating_duration_since(t0));
                        got += 1;
                        if got == n {
                            quiet_until = Some(tokio::time::Instant::now() + AFTER_CHANGE);
                        }
                    }
                }
                Kind::Failed(e) => eprintln!("client {} failed during change {}: {e}", event.client, change + 1),
            }
        }
        let accepted = accepted_at(&log, change as u64 + 2).and_then(|at| at.duration_since(t0_wall).ok());
        changes.push(Change {
            split,
            accepted,
            arrivals,
            responses,
            control_cpu: cpu_time(&pid.to_string()).saturating_sub(control_cpu0),
            bench_cpu: cpu_time("self").saturating_sub(bench_cpu0),
        });
        if got < n {
            eprintln!("change {}: only {got} of {n} clients got it within {CHANGE_TIMEOUT:?}", change + 1);
        }
        // 500–700 ms more, at random (not from the clock, which is in step with the poll), so the changes land at
        // different phases of mesh-control's 200 ms poll.
        let jitter = RandomState::new().hash_one(change) % 200_000_000;
        tokio::time::sleep(Duration::from_millis(500) + Duration::from_nanos(jitter)).await;
    }
    let rss_after = proc_status_bytes(pid, "VmRSS")?;
    let hwm_changes = proc_status_bytes(pid, "VmHWM")?;
    for task in &tasks {
        task.abort();
    }

    // Report.
    let delta_clients = protocols.iter().filter(|p| **p == Protocol::Delta).count();
    println!(
        "mesh-control (pid {pid}): {n} clients ({} SotW, {delta_clients} delta) on {n} connections, {} services; \
         all configured in {:.2} s (mesh-control CPU {:.2} s); /status with {n} streams is {} KiB",
        n - delta_clients,
        args.services,
        connected_in.as_secs_f64(),
        connect_cpu.as_secs_f64(),
        status_bytes / 1024,
    );
    println!();
    println!("Per change (rename of the mesh file → client has the new RouteConfiguration):");
    println!();
    println!(
        "| change | split v1/v2 | file accepted (log) | first client | p50 | p99 | last client | clients updated | responses LDS/RDS/CDS/EDS | mesh-control CPU | bench CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, c) in changes.iter().enumerate() {
        let mut v: Vec<Duration> = c.arrivals.iter().flatten().copied().collect();
        v.sort_unstable();
        println!(
            "| {} | {}/{} | {} | {} | {} | {} | {} | {}/{n} | {}/{}/{}/{} | {} | {} |",
            i + 1,
            c.split.0,
            c.split.1,
            c.accepted.map_or_else(|| "?".to_owned(), ms),
            ms(v.first().copied().unwrap_or_default()),
            ms(pct(&v, 0.50)),
            ms(pct(&v, 0.99)),
            ms(v.last().copied().unwrap_or_default()),
            v.len(),
            c.responses[0],
            c.responses[1],
            c.responses[2],
            c.responses[3],
            ms(c.control_cpu),
            ms(c.bench_cpu),
        );
    }
    println!();
    println!("All changes together:");
    println!();
    println!("| clients | changes | updates received | p50 | p99 | max | p50 after first client | p99 after first client |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut p99_all = Duration::ZERO;
    for filter in [Some(Protocol::Sotw), Some(Protocol::Delta), None] {
        let label = filter.map_or("all", Protocol::name);
        let mut v = Vec::new();
        let mut spread = Vec::new();
        let mut expected = 0;
        for c in &changes {
            let first = c.arrivals.iter().flatten().min().copied().unwrap_or_default();
            for (client, arrival) in c.arrivals.iter().enumerate() {
                if filter.is_some_and(|p| protocols[client] != p) {
                    continue;
                }
                expected += 1;
                if let Some(a) = arrival {
                    v.push(*a);
                    spread.push(a.saturating_sub(first));
                }
            }
        }
        if expected == 0 {
            continue;
        }
        v.sort_unstable();
        spread.sort_unstable();
        if filter.is_none() {
            p99_all = pct(&v, 0.99);
        }
        let count = protocols.iter().filter(|p| filter.is_none_or(|f| **p == f)).count();
        println!(
            "| {count} {label} | {} | {}/{expected} | {} | {} | {} | {} | {} |",
            changes.len(),
            v.len(),
            ms(pct(&v, 0.50)),
            ms(pct(&v, 0.99)),
            ms(v.last().copied().unwrap_or_default()),
            ms(pct(&spread, 0.50)),
            ms(pct(&spread, 0.99)),
        );
    }
    println!();
    println!("mesh-control memory:");
    println!();
    println!("| measurement | resident |");
    println!("|---|---|");
    println!("| before any client (VmRSS) | {} |", mib(rss_before));
    println!("| idle, {n} clients connected (VmRSS) | {} |", mib(rss_idle));
    println!("| peak while the clients connected (VmHWM) | {} |", mib(hwm_connect));
    if peak_reset {
        println!("| peak during the changes (VmHWM, reset before them) | {} |", mib(hwm_changes));
    } else {
        println!("| peak over the whole run (VmHWM; /proc/{pid}/clear_refs not writable) | {} |", mib(hwm_changes));
    }
    println!("| after the changes (VmRSS) | {} |", mib(rss_after));
    println!(
        "| per connected client ((idle − before) / {n}) | {:.1} KiB |",
        (rss_idle.saturating_sub(rss_before)) as f64 / 1024.0 / n as f64
    );
    println!();
    let peak = hwm_connect.max(hwm_changes);
    let memory_ok = peak <= 200 * 1024 * 1024;
    let latency_ok = p99_all <= Duration::from_secs(1) && changes.iter().all(|c| c.arrivals.iter().all(Option::is_some));
    println!(
        "Target p99 ≤ 1 s: {} (p99 {}); ≤ 200 MiB: {} (peak {}). Bench process: {} resident with {n} clients.",
        if latency_ok { "met" } else { "NOT met" },
        ms(p99_all),
        if memory_ok { "met" } else { "NOT met" },
        mib(peak),
        mib(bench_rss_idle),
    );
    Ok(())
}
