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
    /// With `--mtls DIR`: serve as tonic's own rustls server (client certificates required), or as an
    /// xDS-enabled server's inbound stack from a local listener (mTLS, an RBAC allow rule for
    /// `--allow`, a rate limit that never triggers, server metrics into a Prometheus exporter).
    #[arg(long, requires = "mtls", value_parser = ["acceptor", "tonic", "inbound"], default_value = "acceptor")]
    stack: String,
    /// The SPIFFE ID the inbound stack's RBAC rule allows.
    #[arg(long, default_value = "spiffe://mesh.local/ns/default/sa/web")]
    allow: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let delay = Duration::from_millis(args.delay_ms);
    let server = match (args.reply_bytes, &args.mtls) {
        (Some(n), Some(dir)) if args.stack == "tonic" => {
            let read = |name: &str| std::fs::read(dir.join(name));
            let identity = tonic::transport::Identity::from_pem(read("cert.pem")?, read("key.pem")?);
            let tls = tonic::transport::ServerTlsConfig::new()
                .identity(identity)
                .client_ca_root(tonic::transport::Certificate::from_pem(read("ca.pem")?));
            mesh_tests::echo::EchoServer::start_tls_replying(tls, args.addr, vec![b'x'; n].into()).await?
        }
        (Some(n), Some(dir)) if args.stack == "inbound" => {
            let read = |name: &str| std::fs::read(dir.join(name));
            let credentials = mesh_tower::tls::Credentials::from_pem(&read("cert.pem")?, &read("key.pem")?, &read("ca.pem")?)?;
            // Telemetry on, as a mesh server runs it (what it costs is part of the measurement).
            let metrics = mesh_tonic::admin::Prometheus::install()?;
            let listener = tokio::net::TcpListener::bind(args.addr).await?;
            let addr = listener.local_addr()?;
            let builder = mesh_tonic::Server::builder()
                .certificate_provider("default", std::sync::Arc::new(credentials))
                .fallback(inbound_listener(addr, &args.allow));
            let (server, running) = mesh_tests::echo::EchoServer::start_xds_replying(listener, builder, vec![b'x'; n].into())?;
            println!("listening {}", server.addr);
            std::future::pending::<()>().await;
            drop((running, metrics));
            return Ok(());
        }
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

/// An inbound listener as mesh-control sends a strict service with one allow rule and a server rate limit: one
/// mTLS chain (provider `default`), RBAC allowing `allow`, a bucket of ten million calls a second, one
/// non-forwarding route.
fn inbound_listener(addr: std::net::SocketAddr, allow: &str) -> mesh_core::inbound::InboundListener {
    use mesh_core::authz::{Action, Permission, Policy, Principal, Rbac};
    use mesh_core::inbound::{FilterChain, FilterChainMatch, InboundHttp, InboundListener, InboundTls};
    use mesh_core::{Route, RouteAction, RouteConfig, RouteMatch, RouteSource, VirtualHost};
    let routes = RouteConfig {
        name: "inbound".into(),
        virtual_hosts: vec![VirtualHost {
            name: "inbound".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                name: "inbound".into(),
                matcher: RouteMatch::any(),
                action: RouteAction::NonForwarding,
                policies: Default::default(),
            }],
        }],
    };
    let mut http = InboundHttp::new(RouteSource::Inline(routes));
    let policy = Policy {
        permissions: vec![Permission::Any],
        principals: vec![Principal::Authenticated(Some(mesh_core::StringMatch::Exact(allow.into())))],
    };
    http.rbac = vec![Rbac { action: Action::Allow, policies: vec![("allow".into(), policy)] }];
    http.rate_limit =
        Some(mesh_core::policy::RateLimit { max_tokens: 10_000_000, tokens_per_fill: 10_000_000, fill_interval: Duration::from_secs(1) });
    let tls = InboundTls {
        certificate_provider: "default".into(),
        ca_certificate_provider: Some("default".into()),
        require_client_certificate: true,
    };
    let chain = FilterChain { name: "mtls".into(), matcher: FilterChainMatch::default(), tls: Some(tls), http };
    InboundListener { name: "bench".into(), address: addr, filter_chains: vec![chain], default_filter_chain: None }
}
