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
    /// Reply with this many bytes instead of the server's address.
    #[arg(long)]
    reply_bytes: Option<usize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let delay = Duration::from_millis(args.delay_ms);
    let server = match args.reply_bytes {
        Some(n) => mesh_tests::echo::EchoServer::start_with(args.addr, delay, Some(vec![b'x'; n].into())).await?,
        None => mesh_tests::echo::EchoServer::start_on(args.addr, delay).await?,
    };
    println!("listening {}", server.addr);
    std::future::pending::<()>().await;
    Ok(())
}
