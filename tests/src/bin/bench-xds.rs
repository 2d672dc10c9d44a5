//! Benchmark: applying EDS updates from a control plane to a balancer.
//!
//! `cargo run --release -p mesh-tests --bin bench-xds -- [--endpoints N] [--rounds R]`
//!
//! An in-process ADS server (real gRPC on 127.0.0.1) pushes a
//! ClusterLoadAssignment of N endpoints; our xds-client decodes it and the
//! update is handed to a mesh-tower balancer. Timed from the server's push to
//! the balancer's snapshot holding the new set (so encoding, the wire and
//! decoding are included), and from the moment the response arrived at the
//! client (before decoding: the "message received"): the full
//! N-endpoint update, and an update that changes one endpoint of the N. Also
//! reported: resident memory growth per endpoint of a client process of its
//! own (xDS cache, then a balancer with its endpoints in connect backoff). Each
//! measurement starts after the previous update's connection attempts have
//! settled.
//!
//! Endpoints are 127.x.y.z:9 (discard port; nothing listens): loopback only.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use clap::Parser;
use mesh_core::LbPolicy;
use mesh_tests::ads::{AdsServer, build, type_url};
use mesh_tower::balance::{Balancer, BalancerConfig, RequestBody};
use mesh_tower::discover::{self, Change};
use xds_client::resource::EndpointsResource;
use xds_client::{Bootstrap, Watch, XdsClient, XdsClientConfig};

#[derive(Parser)]
struct Args {
    /// Endpoints in the big update.
    #[arg(long, default_value_t = 10_000)]
    endpoints: usize,
    /// Measured rounds of each update kind.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Internal: run as the memory probe, a client process of the ADS server at this address.
    #[arg(long, hide = true)]
    memory_probe: Option<String>,
}

fn addr(i: usize) -> SocketAddr {
    // 127.1.0.0 upwards: distinct loopback addresses, port 9.
    let n = 0x7f01_0000u32 + i as u32;
    SocketAddr::from((Ipv4Addr::from(n), 9))
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Lets the previous update's connection attempts (refused at once, then
/// in long backoff) finish, so each measurement sees a quiet balancer.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

/// Time from the arrival of the response carrying the watched resource's current value (before decoding) to `at`.
fn since_received(watch: &mut Watch<EndpointsResource>, at: SystemTime) -> Duration {
    let received = watch.state().updated.expect("the resource has a value");
    at.duration_since(received).unwrap_or_default()
}

/// Round robin with a long reconnect backoff: unreachable endpoints stay quiet during the measurement.
fn quiet() -> BalancerConfig {
    let mut config = BalancerConfig { lb: LbPolicy::RoundRobin, ..BalancerConfig::default() };
    config.connection.reconnect_backoff_base = Duration::from_secs(60);
    config
}

/// A balancer fed from an EDS watch as mesh-tonic's xDS router feeds one: the balancer reads the watch itself
/// and each value resets the set.
fn fed_balancer(name: &str, watch: &Watch<EndpointsResource>) -> Balancer<http_body_util::Empty<bytes::Bytes>> {
    Balancer::new(name, mesh_tonic::eds_source(watch.clone()), quiet())
}

/// Waits for an observer without blocking a runtime thread.
async fn joined(observer: std::thread::JoinHandle<SystemTime>) -> SystemTime {
    tokio::task::spawn_blocking(move || observer.join().expect("observer")).await.expect("observer thread")
}

/// Watches `balancer` from a thread of its own until its set passes `done`, and returns when the balancer
/// started using that set (its own timestamp, so the observer's wake-up is not counted). The balancer's
/// runtime is busy starting thousands of connection attempts right after publishing a large set; an observer on
/// that runtime would be late to look.
fn observe<B: RequestBody>(
    balancer: &Balancer<B>,
    done: impl Fn(&Balancer<B>) -> bool + Send + 'static,
) -> std::thread::JoinHandle<SystemTime> {
    let (balancer, mut updates) = (balancer.clone(), balancer.updates());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("observer runtime");
        runtime.block_on(async {
            loop {
                if done(&balancer) {
                    return balancer.endpoints_updated_at().expect("a set is in use");
                }
                updates.changed().await.expect("the balancer runs");
            }
        })
    })
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v[((p * v.len() as f64) as usize).min(v.len() - 1)]
}

/// Runs the memory probe in a child process: it warms up on a small cluster, subscribes to `probe` on `ads`,
/// reports when subscribed, and
/// after the server pushes an `n`-endpoint assignment reports its resident-memory growth per endpoint: the xDS
/// client's (decoded value and raw resource) and a balancer's fed from it (endpoints in connect backoff).
async fn memory(ads: &AdsServer, n: usize) -> anyhow::Result<(f64, f64)> {
    use tokio::io::AsyncBufReadExt;
    // A small cluster the probe warms up with (5n..5n+200: addresses no other cluster uses).
    let warm: Vec<SocketAddr> = (0..200).map(|i| addr(5 * n + i)).collect();
    ads.set(type_url::ENDPOINT, "warm", build::endpoints("warm", &warm));
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--memory-probe", &ads.addr().to_string(), "--endpoints", &n.to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    anyhow::ensure!(lines.next_line().await?.as_deref() == Some("subscribed"), "the memory probe did not subscribe");
    let set: Vec<SocketAddr> = (0..n).map(addr).collect();
    ads.set(type_url::ENDPOINT, "probe", build::endpoints("probe", &set));
    let line = lines.next_line().await?.ok_or_else(|| anyhow::anyhow!("the memory probe ended without a result"))?;
    let (cached, balanced) = line.split_once(' ').ok_or_else(|| anyhow::anyhow!("bad probe output {line:?}"))?;
    anyhow::ensure!(child.wait().await?.success(), "the memory probe failed");
    Ok((cached.parse::<f64>()? / n as f64, balanced.parse::<f64>()? / n as f64))
}

/// The memory probe's side (see [`memory`]).
async fn probe(ads: String, n: usize) -> anyhow::Result<()> {
    let client = XdsClient::new(Bootstrap::for_server(ads, "probe"), XdsClientConfig::default());
    // Warm up first with a 200-endpoint cluster and its balancer: the runtime's threads, the xDS stream and the
    // connection machinery then exist, and what follows measures what the 10,000 endpoints add, not one-time
    // costs.
    let mut warm_watch: Watch<EndpointsResource> = client.watch("warm");
    while warm_watch.value().is_none() {
        warm_watch.changed().await;
    }
    let _warm = fed_balancer("warm", &warm_watch);
    let mut watch: Watch<EndpointsResource> = client.watch("probe");
    settle().await;
    let start = rss_bytes();
    println!("subscribed");
    while watch.value().is_none() {
        watch.changed().await;
    }
    settle().await;
    let cached = rss_bytes();
    let balancer = fed_balancer("probe", &watch);
    while balancer.endpoint_count() != n {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    settle().await;
    let balanced = rss_bytes();
    println!("{} {}", cached.saturating_sub(start), balanced.saturating_sub(cached));
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let n = args.endpoints;
    if let Some(ads) = args.memory_probe {
        return probe(ads, n).await;
    }
    let ads = AdsServer::start().await?;
    let client = XdsClient::new(Bootstrap::for_server(ads.addr().to_string(), "bench"), XdsClientConfig::default());
    let mut watch: Watch<EndpointsResource> = client.watch("bench");

    // Memory of one N-endpoint update, measured in a client process of its own (so the ADS server's copies of
    // the resource and its encoding buffers are not counted).
    let (per_cached, per_balanced) = memory(&ads, n).await?;
    let first: Vec<SocketAddr> = (0..n).map(addr).collect();
    ads.set(type_url::ENDPOINT, "bench", build::endpoints("bench", &first));
    while watch.value().is_none() {
        watch.changed().await;
    }
    let balancer = fed_balancer("bench", &watch);
    while balancer.endpoint_count() != n {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    settle().await;
    let rss_balanced = rss_bytes();
    let per = |from: u64, to: u64| to.saturating_sub(from) as f64 / n as f64;
    let rss_before = rss_balanced;
    let (mut full, mut full_received) = (Vec::new(), Vec::new());
    let (mut one, mut one_received) = (Vec::new(), Vec::new());
    for round in 0..=args.rounds {
        // Full update: a different N-endpoint set each round.
        let set: Vec<SocketAddr> = (0..n).map(|i| addr(i + ((round + 1) % 2) * n)).collect();
        let marker = set[n - 1];
        let resource = build::endpoints("bench", &set);
        settle().await;
        let seen = observe(&balancer, move |b| b.contains(marker) && b.endpoint_count() == n);
        let t = SystemTime::now();
        ads.set(type_url::ENDPOINT, "bench", resource);
        let seen = joined(seen).await;
        if round > 0 {
            full.push(seen.duration_since(t).unwrap_or_default());
            full_received.push(since_received(&mut watch, seen));
        }
        // One endpoint changes.
        let mut changed = set.clone();
        changed[0] = addr(2 * n + round);
        let resource = build::endpoints("bench", &changed);
        settle().await;
        let new = changed[0];
        let seen = observe(&balancer, move |b| b.contains(new));
        let t = SystemTime::now();
        ads.set(type_url::ENDPOINT, "bench", resource);
        let seen = joined(seen).await;
        if round > 0 {
            one.push(seen.duration_since(t).unwrap_or_default());
            one_received.push(since_received(&mut watch, seen));
        }
    }
    let rss_after = rss_bytes();
    drop(balancer);

    // The balancer alone: one endpoint inserted into an N-endpoint set
    // through a discovery stream (what an incremental source such as a
    // Kubernetes EndpointSlice watch produces), without xDS decoding.
    let (tx, source) = discover::channel();
    let alone: Balancer<http_body_util::Empty<bytes::Bytes>> = Balancer::new("alone", source, quiet());
    let mut alone_updates = alone.updates();
    tx.send(Change::reset((0..n).map(|i| mesh_core::Endpoint::new(addr(i)))));
    while alone.endpoint_count() != n {
        alone_updates.changed().await?;
    }
    let mut insert = Vec::new();
    for round in 0..args.rounds {
        settle().await;
        let new = addr(3 * n + round);
        let seen = observe(&alone, move |a| a.contains(new));
        let t = SystemTime::now();
        tx.send(Change::insert(mesh_core::Endpoint::new(new)));
        insert.push(joined(seen).await.duration_since(t).unwrap_or_default());
    }
    // Its 10,000 endpoints would start reconnecting (60 s backoff) during the next measurement.
    drop((alone, tx));

    // A delta xDS update of a one-endpoint cluster: the per-update cost of the whole path (a delta stream, its
    // own client and balancer), with nothing else to decode.
    let mut bootstrap = Bootstrap::for_server(ads.addr().to_string(), "bench-delta");
    bootstrap.servers[0].server_features.push("delta_ads".to_owned());
    let delta_client = XdsClient::new(bootstrap, XdsClientConfig::default());
    let mut small_watch: Watch<EndpointsResource> = delta_client.watch("small");
    let small = fed_balancer("small", &small_watch);
    let (mut small_pushed, mut small_received) = (Vec::new(), Vec::new());
    // Cheap rounds (one endpoint's connect), so ten times as many: the tail is measured, not one sample.
    for round in 0..=10 * args.rounds {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let new = addr(4 * n + round);
        let seen = observe(&small, move |b| b.contains(new));
        let t = SystemTime::now();
        ads.set(type_url::ENDPOINT, "small", build::endpoints("small", &[new]));
        let seen = joined(seen).await;
        if round > 0 {
            small_pushed.push(seen.duration_since(t).unwrap_or_default());
            small_received.push(since_received(&mut small_watch, seen));
        }
    }

    println!("| update | endpoints | samples | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    for (name, endpoints, v) in [
        ("full EDS update (xDS push → balancer)", n, &mut full),
        ("full EDS update (response received → balancer)", n, &mut full_received),
        ("one endpoint changed (xDS push → balancer)", n, &mut one),
        ("one endpoint changed (response received → balancer)", n, &mut one_received),
        ("one endpoint inserted (discovery stream → balancer)", n, &mut insert),
        ("one-endpoint cluster, delta xDS (xDS push → balancer)", 1, &mut small_pushed),
        ("one-endpoint cluster, delta xDS (response received → balancer)", 1, &mut small_received),
    ] {
        let max = *v.iter().max().unwrap_or(&Duration::ZERO);
        let samples = v.len();
        println!("| {name} | {endpoints} | {samples} | {:.2?} | {:.2?} | {:.2?} | {:.2?} |", pct(v, 0.5), pct(v, 0.9), pct(v, 0.99), max);
    }
    println!();
    println!("| resident memory of a client process, one {n}-endpoint update | bytes per endpoint |");
    println!("|---|---|");
    println!("| xDS client (decoded value and raw resource) | {per_cached:.0} |");
    println!("| balancer (endpoint state; endpoints in connect backoff) | {per_balanced:.0} |");
    println!("| both | {:.0} |", per_cached + per_balanced);
    println!();
    println!(
        "resident memory growth of the benchmark process (ADS server and client) over the {} full replacements that followed: {:.1} MiB = {:.0} bytes per endpoint",
        2 * (args.rounds + 1),
        rss_after.saturating_sub(rss_before) as f64 / 1048576.0,
        per(rss_before, rss_after)
    );
    // The targets, judged on this run (p50 of the update times, from the response's arrival).
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    let full_p50 = pct(&mut full_received, 0.5);
    let small_p50 = pct(&mut small_received, 0.5);
    let bytes = per_cached + per_balanced;
    println!();
    println!("targets: {n}-endpoint update p50 {full_p50:.2?} ≤ 20 ms {}", verdict(full_p50 <= Duration::from_millis(20)));
    println!("targets: one-endpoint delta update p50 {small_p50:.2?} ≤ 100 µs {}", verdict(small_p50 <= Duration::from_micros(100)));
    println!("targets: {bytes:.0} B per endpoint ≤ 300 B {}", verdict(bytes <= 300.0));
    Ok(())
}
