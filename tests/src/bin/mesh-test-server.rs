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
    /// Serve behind the mesh's permissive acceptor (mTLS and plaintext on one port) with `DIR/cert.pem`,
    /// `DIR/key.pem` and `DIR/ca.pem`; needs `--reply-bytes`.
    #[arg(long, requires = "reply_bytes")]
    mtls: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let delay = Duration::from_millis(args.delay_ms);
    let server = match (args.reply_bytes, &args.mtls) {
        (Some(n), Some(dir)) => {
            let read = |name: &str| std::fs::read(dir.join(name));
            let credentials = mesh_tower::tls::Credentials::from_pem(&read("cert.pem")?, &read("key.pem")?, &read("ca.pem")?)?;
            let acceptor = mesh_tower::tls::MtlsAcceptor::new(credentials)?.permissive();
            mesh_tests::echo::EchoServer::start_mesh_replying(acceptor, args.addr, vec![b'x'; n].into()).await?
        }
        (Some(n), None) => mesh_tests::echo::EchoServer::start_with(args.addr, delay, Some(vec![b'x'; n].into())).await?,
        (None, _) => mesh_tests::echo::EchoServer::start_on(args.addr, delay).await?,
    };
    println!("listening {}", server.addr);
    std::future::pending::<()>().await;
    Ok(())
}
