//! `meshctl xds-dump`: what the mesh's xDS client holds for a target.
//!
//! Follows `xds:///name` with the bootstrap from `GRPC_XDS_BOOTSTRAP` (or
//! `GRPC_XDS_BOOTSTRAP_CONFIG`) until every resource has an answer or the
//! wait ends, then prints one JSON object: the connected server and every
//! resource with type, name, version, status (CSDS names), error and last
//! update time.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::json;
use xds_client::ResourceStatus;

/// Arguments of `meshctl xds-dump`.
#[derive(Debug, clap::Args)]
pub(crate) struct DumpArgs {
    /// Target, `xds:///name`.
    #[arg(long)]
    target: String,
    /// Longest wait for the resources, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    wait_ms: u64,
}

pub(crate) async fn run(args: DumpArgs) -> ExitCode {
    let Some(name) = args.target.strip_prefix("xds:///") else {
        eprintln!("error: --target must be xds:///name, got {:?}", args.target);
        return ExitCode::from(2);
    };
    let client = match mesh_tonic::shared_client() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let channel = match mesh_tonic::Channel::builder(&args.target).build_xds(client.clone(), name) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let deadline = Instant::now() + Duration::from_millis(args.wait_ms);
    // Settled: something subscribed, nothing still waiting for an answer.
    let settled = |dump: &[xds_client::ResourceDump]| !dump.is_empty() && dump.iter().all(|r| r.status != ResourceStatus::Requested);
    let mut dump = client.dump();
    while Instant::now() < deadline && !settled(&dump) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        dump = client.dump();
    }
    // Judged on the dump that is printed, taken before the channel is dropped (dropping it unsubscribes).
    let complete = settled(&dump);
    let resources = xds_client::to_json(&dump);
    println!("{}", json!({"target": args.target, "server": client.connected_server(), "resources": resources}));
    drop(channel);
    if complete { ExitCode::SUCCESS } else { ExitCode::from(1) }
}
