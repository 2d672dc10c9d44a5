//! `meshctl`: the mesh's operator CLI.
//!
//! `meshctl call` sends gRPC traffic through the full mesh client stack and
//! reports what happened; `meshctl xds-dump` prints what the xDS client holds
//! for a target. Its flags and JSON output are a contract other tools
//! rely on: see `call.rs`. `meshctl demo` runs the mesh's main job in one
//! command: a control plane, three greeter backends and a mesh client, with a
//! canary split shifted by editing the mesh file. `meshctl ca issue` writes a workload's certificate from the
//! mesh CA (see `ca.rs`). `meshctl status` and `meshctl config-dump` read a running process's admin endpoint.
#![forbid(unsafe_code)]

mod admin;
mod ca;
mod call;
mod demo;
mod xds;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Operator CLI for the mesh.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr: plain text (coloured only on a terminal) or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The mesh CA: issue a workload's certificate.
    Ca(ca::CaArgs),
    /// Send gRPC calls through the mesh client stack and summarise them.
    Call(Box<call::CallArgs>),
    /// Run a control plane, three greeter backends and a mesh client; shift a canary split by editing the mesh.
    Demo(demo::DemoArgs),
    /// Print what the xDS client holds for an xds:/// target (CSDS-style JSON).
    XdsDump(xds::DumpArgs),
    /// Print a running process's clusters and endpoints, read from its admin endpoint.
    Status(admin::AdminArgs),
    /// Print a running process's xDS resources with status and NACK reasons, read from its admin endpoint.
    ConfigDump(admin::AdminArgs),
}

/// The process's log filter, for `/logging` on the admin endpoint.
pub(crate) static LOG_FILTER: std::sync::OnceLock<mesh_tonic::admin::LogFilter> = std::sync::OnceLock::new();

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The filter can be changed at runtime through an admin endpoint's /logging.
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| "warn".into());
    let reloadable = mesh_control::install_logs(filter, matches!(cli.log_format, LogFormat::Json));
    let _ = LOG_FILTER.set(reloadable);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Ca(args) => runtime.block_on(ca::run(args)),
        Command::Call(args) => runtime.block_on(call::run(*args)),
        Command::XdsDump(args) => runtime.block_on(xds::run(args)),
        Command::Demo(args) => runtime.block_on(demo::run(args)),
        Command::Status(args) => runtime.block_on(admin::status(args)),
        Command::ConfigDump(args) => runtime.block_on(admin::config_dump(args)),
    }
}
