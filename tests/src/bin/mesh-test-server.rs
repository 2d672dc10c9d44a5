//! Echo server process for tests that kill a server: prints `listening ADDR`
//! and serves until killed.

use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: std::net::SocketAddr,
    /// Delay before each reply, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = mesh_tests::echo::EchoServer::start_on(args.addr, Duration::from_millis(args.delay_ms)).await?;
    println!("listening {}", server.addr);
    std::future::pending::<()>().await;
    Ok(())
}
