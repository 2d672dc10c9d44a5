//! The Kubernetes source: Services and EndpointSlices as mesh endpoints.
//!
//! The mesh file names a Kubernetes Service for a mesh service or subset
//! (`kubernetes: { service: greeter-v1, namespace: default, port: grpc }`, the port by name or number). This module
//! answers which endpoints that is:
//!
//! - [`KubeSource`] watches Services and `discovery.k8s.io/v1` EndpointSlices (in one namespace or all) and publishes
//!   a fresh [`KubeState`] through a `tokio::sync::watch` channel on every change, debounced, relisting after
//!   disconnects so deletions are never missed.
//! - [`KubeState`] is pure data: [`KubeState::endpoints`] resolves a [`ServiceKey`] and [`PortRef`] to
//!   [`KubeEndpoint`]s the way Kubernetes does (the Service port, then the slice port of the same name, which
//!   carries the target port; every slice of the Service merged, addresses de-duplicated).
//!
//! Endpoint conditions are passed on, not filtered: the control plane serves a ready endpoint as `HEALTHY`, a
//! terminating one that is still serving as `DRAINING` and any other not-ready one as `UNHEALTHY`; the zone
//! becomes the endpoint's locality.
//!
//! ```no_run
//! # async fn doc() -> mesh_control::Result<()> {
//! use mesh_control::kube::{KubeSource, PortRef, ServiceKey};
//!
//! let client = ::kube::Client::try_default().await?;
//! let mut states = KubeSource::new(client, None).start();
//! let state = states.wait_for(|state| state.is_synced()).await.expect("watch task alive").clone();
//! let greeter = ServiceKey::new("default", "greeter-v1");
//! for endpoint in state.endpoints(&greeter, &PortRef::Name("grpc".into())) {
//!     println!("{} ready={} zone={:?}", endpoint.addr, endpoint.ready, endpoint.zone);
//! }
//! # Ok(())
//! # }
//! ```

mod state;
#[cfg(test)]
mod tests;
mod watch;

pub use state::{KubeEndpoint, KubeState, PortRef, SERVICE_NAME_LABEL, ServiceKey};
pub use watch::KubeSource;
