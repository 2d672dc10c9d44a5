//! `mesh-control`: the mesh's control plane.
//!
//! What it does: reads a mesh file (YAML, see `examples/mesh.yaml`) and, optionally, Kubernetes Services and
//! EndpointSlices; translates them into standard xDS v3 resources in two shapes (proxyless `api_listener`
//! listeners for our library and gRPC clients, and sidecar listeners for Envoy); serves them over ADS, both
//! State-of-the-World and incremental (delta), with per-node snapshots; reloads the file when it changes and keeps
//! serving the last good config when a change is invalid. With Kubernetes, every Service port is also served with
//! default policies as `<service>.<namespace>.svc.cluster.local:<port>`.
//!
//! It is also the mesh's certificate authority ([`ca`]): it issues SPIFFE workload certificates. It does not proxy
//! traffic.
//!
//! Modules:
//! - [`mesh`]: the mesh file model, its parser and validation (errors name file, line, field and reason).
//! - [`translate`]: mesh model → xDS resources (both shapes).
//! - [`ads`]: the ADS server and its snapshot cache.
//! - [`ca`]: the mesh CA; [`certificates`]: renewal over an Istio-shaped CSR API.
//! - [`kube`]: the Kubernetes source.
//! - [`control`]: ties them together: file watching, snapshots per (shape, view), the `/status` endpoint.
//!

pub mod ads;
pub mod ca;
pub mod certificates;
pub mod control;
mod error;
pub mod kube;
pub mod mesh;
pub mod translate;

pub use control::ControlPlane;
pub use error::{Error, Result};

/// Installs a binary's `tracing` subscriber on stderr: one JSON object per line, or plain text (coloured only on
/// a terminal), starting from `filter`. Returns its log filter for `/logging` on an admin endpoint (this crate's,
/// or mesh-tonic's in `meshctl`): it reads the filter, or replaces it and logs the change. For binaries; a
/// library emits `tracing` only.
pub fn install_logs(filter: tracing_subscriber::EnvFilter, json: bool) -> mesh_core::logging::LogFilter {
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    if json {
        let logs = logs.json().with_filter_reloading();
        let handle = logs.reload_handle();
        logs.init();
        log_filter(handle)
    } else {
        let logs = logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_filter_reloading();
        let handle = logs.reload_handle();
        logs.init();
        log_filter(handle)
    }
}

/// Reads or replaces the filter behind `handle`.
fn log_filter<S>(handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>) -> mesh_core::logging::LogFilter
where
    S: tracing::Subscriber + Send + Sync + 'static,
{
    std::sync::Arc::new(move |new: Option<&str>| {
        if let Some(new) = new {
            let filter = tracing_subscriber::EnvFilter::try_new(new).map_err(|e| format!("invalid log filter {new:?}: {e}"))?;
            handle.reload(filter).map_err(|e| e.to_string())?;
            tracing::info!(filter = new, "log filter changed");
        }
        handle.with_current(ToString::to_string).map_err(|e| e.to_string())
    })
}
