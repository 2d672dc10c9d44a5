//! `meshctl ca issue`: a workload's first certificate from the mesh CA.
//!
//! Contract: `meshctl ca issue --identity <spiffe-id> --out DIR [--ca-dir DIR] [--lifetime 24h] [--dns NAME]...`
//! writes `DIR/cert.pem` (the leaf, then its chain up to the root), `DIR/key.pem` (mode 0600) and `DIR/ca.pem`
//! (the trust bundle), and prints one line: the identity, its expiry and when to renew it. The CA is the one kept
//! in `--ca-dir` (default `$MESH_CA_DIR`, else `$HOME/.local/state/mesh/ca`); a directory without one gets a new
//! root for the identity's trust domain. Exit status: 0 when written, 2 for a bad flag, identity or CA file
//! (one error line on stderr).
//!
//! `meshctl ca renew --dir DIR --ca-addr ADDR [--lifetime 24h] [--watch]` renews the certificate in `DIR` over
//! mesh-control's CSR API (`--ca-listen`), presenting the current certificate over mTLS; the new key is made
//! here and never sent. With `--watch` it stays and renews at every half life (a node agent for workloads that
//! read their files with a `file_watcher`). Exit status: 0 renewed, 1 refused, 2 bad flags or files.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use mesh_control::ca::Ca;

/// `meshctl ca ...`.
#[derive(Debug, clap::Args)]
pub(crate) struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CaCommand {
    /// Issue a workload certificate and key, and write them with the trust bundle.
    Issue(IssueArgs),
    /// Renew the certificate in a directory over mesh-control's CSR API, authenticated by the current one.
    Renew(RenewArgs),
}

#[derive(Debug, clap::Args)]
struct RenewArgs {
    /// The directory holding cert.pem, key.pem and ca.pem (as `meshctl ca issue` wrote them); replaced in place.
    #[arg(long)]
    dir: PathBuf,
    /// mesh-control's certificate service (its --ca-listen address).
    #[arg(long)]
    ca_addr: std::net::SocketAddr,
    /// The lifetime to ask for (the CA grants at most 24 h).
    #[arg(long, default_value = "24h")]
    lifetime: String,
    /// Keep running and renew at each half life (a node agent); without it, renew once.
    #[arg(long)]
    watch: bool,
}

#[derive(Debug, clap::Args)]
struct IssueArgs {
    /// The workload's SPIFFE ID: spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT.
    #[arg(long)]
    identity: String,
    /// Where to write cert.pem, key.pem and ca.pem.
    #[arg(long)]
    out: PathBuf,
    /// The CA's directory (ca-cert.pem, ca-key.pem, bundle.pem); created with a new root when empty.
    #[arg(long, env = "MESH_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// How long the certificate is valid: 24h, 90m, 30s.
    #[arg(long, default_value = "24h")]
    lifetime: String,
    /// A DNS name to add beside the SPIFFE ID (for peers that check host names); repeatable.
    #[arg(long)]
    dns: Vec<String>,
}

pub(crate) async fn run(args: CaArgs) -> ExitCode {
    let result = match args.command {
        CaCommand::Issue(args) => issue(&args).map_err(|e| (2, e)),
        CaCommand::Renew(args) => renew(&args).await,
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err((code, e)) => {
            eprintln!("error: {e}");
            ExitCode::from(code)
        }
    }
}

/// Renews once, or at every half life with `--watch`; exit 2 for bad flags or files, 1 when the CA refused.
async fn renew(args: &RenewArgs) -> Result<String, (u8, String)> {
    let lifetime = mesh_control::mesh::parse_duration(&args.lifetime)
        .ok_or_else(|| (2, format!("--lifetime {:?}: not a duration like 24h, 90m or 30s", args.lifetime)))?;
    loop {
        let read = |name: &str| std::fs::read(args.dir.join(name)).map_err(|e| (2, format!("{}: {e}", args.dir.join(name).display())));
        let credentials = mesh_tower::tls::Credentials::from_pem(&read("cert.pem")?, &read("key.pem")?, &read("ca.pem")?)
            .map_err(|e| (2, format!("{}: {e}", args.dir.display())))?;
        let own = credentials.identity().map(|id| id.0.to_string()).ok_or((2, "cert.pem has no SPIFFE ID".to_owned()))?;
        let domain = mesh_core::identity::SpiffeId::parse(&own).map_err(|e| (2, e.to_string()))?.trust_domain().to_owned();
        let policy = mesh_core::policy::TlsPolicy {
            allowed_identities: vec![mesh_control::certificates::server_identity(&domain)],
            ..Default::default()
        };
        let channel = mesh_tonic::Channel::builder(format!("static:///{}", args.ca_addr))
            .timeout(Duration::from_secs(10))
            .mtls(credentials, policy)
            .build()
            .map_err(|e| (2, e.to_string()))?;
        let renewed =
            mesh_control::certificates::renew(channel, lifetime).await.map_err(|s| (1, format!("renewal refused: {}", s.message())))?;
        renewed.write_to(&args.dir).map_err(|e| (1, e.to_string()))?;
        let line = format!("renewed {own} in {} for {} s", args.dir.display(), lifetime.as_secs());
        if !args.watch {
            return Ok(line);
        }
        println!("{line}");
        tokio::time::sleep(lifetime / 2).await;
    }
}

fn issue(args: &IssueArgs) -> Result<String, String> {
    let lifetime = mesh_control::mesh::parse_duration(&args.lifetime)
        .ok_or_else(|| format!("--lifetime {:?}: not a duration like 24h, 90m or 30s", args.lifetime))?;
    let id = mesh_core::identity::SpiffeId::parse(&args.identity).map_err(|e| format!("--identity: {e}"))?;
    let dir = match &args.ca_dir {
        Some(dir) => dir.clone(),
        None => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".local/state/mesh/ca"))
            .ok_or("--ca-dir: not given, and neither MESH_CA_DIR nor HOME is set")?,
    };
    let ca = Ca::open_or_generate(&dir, id.trust_domain()).map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    let issued = ca.issue(id.as_str(), &args.dns, lifetime, now).map_err(|e| e.to_string())?;
    issued.write_to(&args.out).map_err(|e| e.to_string())?;
    let secs = |t: SystemTime| t.duration_since(now).map_or(0, |d| d.as_secs());
    Ok(format!(
        "issued {id} into {}: valid {} s, renew in {} s (CA {})",
        args.out.display(),
        secs(issued.not_after),
        secs(issued.renew_at),
        dir.display()
    ))
}
