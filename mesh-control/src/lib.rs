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

/// The log filter behind a binary's reloadable `tracing` subscriber, for `/logging` on an admin endpoint (this
/// crate's, or mesh-tonic's in `meshctl`): reads it, or replaces it and logs the change. The binary builds and
/// installs the subscriber; this only wraps its handle.
pub fn reloadable_log_filter<S>(
    handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
) -> mesh_core::logging::LogFilter
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
