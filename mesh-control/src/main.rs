//! `mesh-control`: the mesh control plane binary.
//!
//! With no flags it serves the embedded example mesh on 127.0.0.1 and prints how to point a client at it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use mesh_control::ControlPlane;

/// The mesh control plane: serves xDS (ADS, SotW and delta) from a mesh file and Kubernetes.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Mesh file (YAML); watched for changes. Without it, the embedded example mesh is served.
    #[arg(long)]
    mesh: Option<PathBuf>,
    /// Address of the xDS (ADS) server.
    #[arg(long, default_value = "127.0.0.1:18000")]
    listen: SocketAddr,
    /// Address of the admin HTTP server (`/status`, `/ready`, `/metrics`, `/logging`).
    #[arg(long, default_value = "127.0.0.1:18001")]
    admin: SocketAddr,
    /// Where to write a gRPC xDS bootstrap file pointing at this server (default: in the temp directory).
    #[arg(long)]
    bootstrap_out: Option<PathBuf>,
    /// Also take endpoints from Kubernetes (in-cluster config or kubeconfig).
    #[arg(long)]
    kubernetes: bool,
    /// Only watch this namespace (default: all).
    #[arg(long)]
    namespace: Option<String>,
    /// The mesh CA's directory (see `meshctl ca issue`); a new root is made there when it holds none. The
    /// bootstrap written gets a certificate provider with a certificate from it, renewed at half life, for
    /// strict services' clusters. Default: `$MESH_CA_DIR`, else `$HOME/.local/state/mesh/ca`.
    #[arg(long, env = "MESH_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Address of the certificate service (renewal over an Istio-shaped CSR API, mTLS); served when there is a CA.
    #[arg(long, default_value = "127.0.0.1:18002")]
    ca_listen: SocketAddr,
    /// The trust domain of the identities the CA issues.
    #[arg(long, default_value = "mesh.local")]
    trust_domain: String,
    /// Log lines on stderr: plain text (coloured only on a terminal) or one JSON object per line.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The filter can be changed at runtime through the admin port's /logging.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let log_filter = mesh_control::install_logs(filter, args.log_format == "json");
    let cp = match &args.mesh {
        Some(path) => {
            let cp = ControlPlane::from_file(path)?;
            cp.watch_file(path.clone());
            cp
        }
        None => ControlPlane::new(mesh_control::mesh::parse("<embedded example>", mesh_control::mesh::EXAMPLE)?, "<embedded example>"),
    };
    let kube = if args.kubernetes { Some(start_kubernetes(&cp, args.namespace.clone()).await?) } else { None };
    let xds = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding the xDS server to {}", args.listen))?;
    let admin = tokio::net::TcpListener::bind(args.admin).await.with_context(|| format!("binding the admin server to {}", args.admin))?;
    let xds_addr = xds.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let bootstrap =
        args.bootstrap_out.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("mesh-control-{}.json", xds_addr.port())));
    if let Some(ca) = write_bootstrap(&args, &bootstrap, xds_addr)? {
        cp.serve_certificates(ca.clone());
        let listener = tokio::net::TcpListener::bind(args.ca_listen)
            .await
            .with_context(|| format!("binding the certificate service to {}", args.ca_listen))?;
        tracing::info!(addr = %listener.local_addr()?, "certificate service (CSR API) listening");
        tokio::spawn(async move {
            let mut service = mesh_control::certificates::CertificateService::new(ca);
            // In Kubernetes a workload's first certificate comes for its projected service-account token
            // (audience `mesh-control`), checked with TokenReview.
            if let Some(client) = kube {
                service = service.with_token_review(mesh_control::certificates::TokenReviewer::new(client, "mesh-control"));
            }
            if let Err(error) = service.serve(listener).await {
                tracing::error!(%error, "the certificate service stopped");
            }
        });
    }
    // The same bootstrap inline, certificate provider included.
    let written = std::fs::read_to_string(&bootstrap).with_context(|| format!("reading back {}", bootstrap.display()))?;
    let inline: serde_json::Value = serde_json::from_str(&written)?;
    let banner = format!(
        "mesh-control listening xds={xds_addr} admin={admin_addr}
  status:    http://{admin_addr}/status
  bootstrap: {path}
Point a client at it:
  export GRPC_XDS_BOOTSTRAP={path}
  # or: export GRPC_XDS_BOOTSTRAP_CONFIG='{inline}'
  meshctl call --target xds:///greeter --method /helloworld.Greeter/SayHello --n 100 --json
",
        path = bootstrap.display()
    );
    // Whoever started us may stop reading stdout: the control plane keeps serving regardless.
    let mut stdout = std::io::stdout().lock();
    if stdout.write_all(banner.as_bytes()).and_then(|()| stdout.flush()).is_err() {
        tracing::debug!("stdout is closed; the banner was not printed");
    }
    drop(stdout);
    let admin_cp = cp.clone();
    tokio::spawn(async move { admin_cp.serve_admin(admin, Some(log_filter)).await });
    tokio::select! {
        served = cp.serve_ads(xds) => served?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// The bootstrap for the node `mesh-client`: with a certificate provider holding a certificate from the mesh CA
/// when there is one (returned, for the sidecars' SDS), plain otherwise.
fn write_bootstrap(args: &Args, path: &std::path::Path, xds: SocketAddr) -> anyhow::Result<Option<std::sync::Arc<mesh_control::ca::Ca>>> {
    const NODE: &str = "mesh-client";
    let ca_dir = args.ca_dir.clone().or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state/mesh/ca")));
    let Some(ca_dir) = ca_dir else {
        tracing::warn!(
            "no CA directory (--ca-dir, MESH_CA_DIR or HOME): the bootstrap has no certificate provider, strict services are unreachable"
        );
        mesh_control::control::write_bootstrap(path, xds, NODE)?;
        return Ok(None);
    };
    let ca = mesh_control::ca::Ca::open_or_generate(&ca_dir, &args.trust_domain)?;
    let domain = ca.trust_domain().unwrap_or(&args.trust_domain).to_owned();
    let certs = path.with_extension("certs");
    let ca = std::sync::Arc::new(ca);
    mesh_control::ca::keep_issued(ca.clone(), format!("spiffe://{domain}/ns/default/sa/{NODE}"), certs.clone())?;
    let json = mesh_control::control::bootstrap_json_with_certificates(xds, NODE, &certs);
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(ca))
}

async fn start_kubernetes(cp: &ControlPlane, namespace: Option<String>) -> anyhow::Result<kube::Client> {
    let client = kube::Client::try_default().await.context("connecting to Kubernetes")?;
    mesh_control::control::follow_kubernetes(cp, client.clone(), namespace);
    Ok(client)
}
