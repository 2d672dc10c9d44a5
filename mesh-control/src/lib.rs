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
