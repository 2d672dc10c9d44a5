//! One slow pod (issue 15; Buoyant's 2026 slow-pod benchmark, where Linkerd held p99 at 29 ms against a 30 ms
//! healthy baseline): five echo server processes, one answering 200 ms late and the others after `--fast-ms`,
//! called at concurrency 16 through our channel with each LB policy. Every policy also runs against five
//! healthy servers, and the table compares each p99 with P2C-EWMA's healthy one in the same run.
//!
//! `cargo build --release -p mesh-tests --bin bench-slowpod --bin mesh-test-server && target/release/bench-slowpod`

use std::time::Duration;

use clap::Parser;
use mesh_tests::load::drive;
use mesh_tests::peers::{Peer, echo_process};
use mesh_tonic::Channel;

#[derive(Parser)]
struct Args {
    /// Calls per run.
    #[arg(long, default_value_t = 20_000)]
    calls: u64,
    /// Calls in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Delay of the healthy servers, in milliseconds.
    #[arg(long, default_value_t = 2)]
    fast_ms: u64,
    /// Delay of the slow one, in milliseconds.
    #[arg(long, default_value_t = 200)]
    slow_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server_bin = std::env::current_exe()?.with_file_name("mesh-test-server");
    let server_bin = server_bin.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    let spawn = |delay_ms| echo_process(server_bin, delay_ms);
    let fast: Vec<Peer> = (0..5).map(|_| spawn(args.fast_ms)).collect::<anyhow::Result<_>>()?;
    let slow = spawn(args.slow_ms)?;
    let healthy: Vec<_> = fast.iter().map(|p| p.addr).collect();
    let one_slow: Vec<_> = fast.iter().take(4).map(|p| p.addr).chain([slow.addr]).collect();
    println!("| LB policy | backends | p50 ms | p99 ms | p99.9 ms | p99 vs P2C-EWMA healthy | calls to the slow pod |");
    println!("|---|---|---|---|---|---|---|");
    let mut reference = None;
    for lb in ["p2c_ewma", "least_request", "round_robin"] {
        for (name, addrs) in [("5 healthy", &healthy), ("1 of 5 slow", &one_slow)] {
            let target = format!("static:///{}", addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","));
            let channel = Channel::builder(target).lb(lb.parse()?).build()?;
            // Warm: connections up and latency estimates formed before the measured run.
            drive(&channel, 500, args.concurrency, |_| {}).await;
            let run = drive(&channel, args.calls, args.concurrency, |_| {}).await;
            anyhow::ensure!(run.failures.is_empty(), "{lb} {name}: {:?}", &run.failures[..run.failures.len().min(3)]);
            let ms = |q| run.percentile(q).as_secs_f64() * 1e3;
            let p99 = ms(0.99);
            let base = *reference.get_or_insert(p99);
            let to_slow = run.by_endpoint.get(&slow.addr).copied().unwrap_or(0);
            println!("| {lb} | {name} | {:.2} | {p99:.2} | {:.2} | {:.2}× | {to_slow} |", ms(0.50), ms(0.999), p99 / base);
        }
    }
    drop((fast, slow));
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
