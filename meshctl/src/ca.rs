//! `meshctl ca issue`: a workload's first certificate from the mesh CA.
//!
//! Contract: `meshctl ca issue --identity <spiffe-id> --out DIR [--ca-dir DIR] [--lifetime 24h] [--dns NAME]...`
//! writes `DIR/cert.pem` (the leaf, then its chain up to the root), `DIR/key.pem` (mode 0600) and `DIR/ca.pem`
//! (the trust bundle), and prints one line: the identity, its expiry and when to renew it. The CA is the one kept
//! in `--ca-dir` (default `$MESH_CA_DIR`, else `$HOME/.local/state/mesh/ca`); a directory without one gets a new
//! root for the identity's trust domain. Exit status: 0 when written, 2 for a bad flag, identity or CA file
//! (one error line on stderr).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

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

pub(crate) fn run(args: CaArgs) -> ExitCode {
    let CaCommand::Issue(args) = args.command;
    match issue(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
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
