//! Benchmark: the xDS-enabled server's inbound stack vs tonic's own rustls server (issue 17), unary calls with
//! a 1 KiB request and a 1 KiB response on loopback, at concurrency 1 and 64, in one run.
//!
//! `cargo run --release -p mesh-tests --bin bench-server -- [--seconds S] [--rounds R]`
//!
//! Each server runs in its own `mesh-test-server` process: `--stack tonic` is tonic's server with rustls and
//! client certificates required; `--stack inbound` is `mesh_tonic::Server` serving a local inbound listener as
//! mesh-control sends a strict service (mTLS from a certificate provider, an RBAC allow rule for the client's
//! SPIFFE ID, a rate limit that never triggers, A66 server metrics into a Prometheus exporter). The client is
//! the same for both (the mesh channel over mTLS). Every round runs both servers, fresh, in a shuffled order;
//! ratios are per round, then the median. Prints a Markdown table: p50/p99 latency, throughput, and the
//! server process's CPU per call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use mesh_core::lb::{Random, SplitMix64};
use mesh_core::policy::TlsPolicy;
use mesh_tests::echo::METHOD;
use mesh_tonic::codec::BytesCodec;
use tonic::codegen::http::uri::PathAndQuery;

#[derive(Parser)]
struct Args {
    /// Seconds measured per server per round.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Seconds each server runs unmeasured first.
    #[arg(long, default_value_t = 0.5)]
    warm: f64,
    /// Rounds (each runs both servers once).
    #[arg(long, default_value_t = 8)]
    rounds: u32,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
}

const SERVER_ID: &str = "spiffe://mesh.local/ns/default/sa/greeter";
const CLIENT_ID: &str = "spiffe://mesh.local/ns/default/sa/web";
const STACKS: [&str; 2] = ["tonic", "inbound"];

/// utime + stime of process `pid`.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    Duration::from_millis(ticks * 10)
}

/// p50 and p99 in µs, calls per second, server CPU µs per call.
type Metrics = [f64; 4];

async fn measure(channel: &mesh_tonic::Channel, server_pid: u32, concurrency: usize, seconds: f64) -> anyhow::Result<Metrics> {
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_of(server_pid);
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut grpc, stop) = (tonic::client::Grpc::new(channel.clone()), stop.clone());
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0u64);
                let payload = Bytes::from(vec![7u8; 1024]);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = match grpc.ready().await {
                        Ok(()) => {
                            grpc.unary(tonic::Request::new(payload.clone()), PathAndQuery::from_static(METHOD), BytesCodec).await.is_ok()
                        }
                        Err(_) => false,
                    };
                    latencies.push(t.elapsed().as_micros() as u64);
                    errors += u64::from(!ok);
                }
                (latencies, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for worker in workers {
        let (l, e) = worker.await?;
        latencies.extend(l);
        errors += e;
    }
    let (wall, cpu) = (start.elapsed(), cpu_of(server_pid).saturating_sub(cpu0));
    anyhow::ensure!(errors == 0, "{errors} benchmark calls failed");
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((p * latencies.len() as f64) as usize).min(latencies.len() - 1)] as f64;
    let calls = latencies.len() as f64;
    Ok([pct(0.5), pct(0.99), calls / wall.as_secs_f64(), cpu.as_micros() as f64 / calls])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = mesh_tests::peers::TempDir::new("bench-server")?;
    let ca = mesh_tests::certs::SpiffeCa::new("bench CA")?;
    let (cert, key) = ca.issue(SERVER_ID)?;
    for (name, text) in [("cert.pem", &cert), ("key.pem", &key), ("ca.pem", &ca.ca)] {
        std::fs::write(dir.0.join(name), text)?;
    }
    let client = Arc::new(ca.credentials(CLIENT_ID)?);
    let server_bin = mesh_tests::peers::workspace_bin("mesh-test-server")?;
    let mut rng = SplitMix64::new(0x5eed);
    // results[concurrency][stack] per round.
    let mut results: Vec<Vec<Vec<Metrics>>> = vec![vec![Vec::new(); STACKS.len()]; args.concurrency.len()];
    for round in 0..args.rounds {
        for (k, &c) in args.concurrency.iter().enumerate() {
            let mut order: Vec<usize> = (0..STACKS.len()).collect();
            if rng.below(2) == 1 {
                order.reverse();
            }
            for s in order {
                let mut command = std::process::Command::new(&server_bin);
                command.args(["--reply-bytes", "1024", "--stack", STACKS[s], "--allow", CLIENT_ID, "--mtls"]).arg(&dir.0);
                let server = mesh_tests::peers::spawn_listening(command)?;
                let policy = TlsPolicy { allowed_identities: vec![SERVER_ID.to_owned()], ..TlsPolicy::default() };
                let channel = mesh_tonic::Channel::builder(format!("static:///{}", server.addr)).mtls(client.clone(), policy).build()?;
                measure(&channel, server.pid(), c, args.warm).await?;
                let metrics = measure(&channel, server.pid(), c, args.seconds).await?;
                eprintln!("round {round} c={c} {}: {metrics:?}", STACKS[s]);
                results[k][s].push(metrics);
            }
        }
    }
    println!("| concurrency | server | p50 µs | p99 µs | calls/s | server CPU µs/call | throughput vs tonic | server CPU vs tonic |");
    println!("|---|---|---|---|---|---|---|---|");
    for (k, &c) in args.concurrency.iter().enumerate() {
        for (s, name) in STACKS.iter().enumerate() {
            let col = |i: usize| median(results[k][s].iter().map(|m| m[i]).collect());
            let ratio = |i: usize| median(results[k][s].iter().zip(&results[k][0]).map(|(m, b)| m[i] / b[i]).collect());
            println!(
                "| {c} | {name} | {:.0} | {:.0} | {:.0} | {:.1} | {:.3} | {:.3} |",
                col(0),
                col(1),
                col(2),
                col(3),
                ratio(2),
                ratio(3)
            );
        }
    }
    Ok(())
}
