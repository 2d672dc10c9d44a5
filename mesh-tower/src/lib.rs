//! # mesh-tower
//!
//! The mesh's client stack as tower services: discovery sources, connection
//! management and load balancing, with more layers (retries, timeouts, circuit
//! breaking, outlier detection, rate limits, fault injection, telemetry) to be
//! added one module each.
//!
//! **What it does:** routes each request by a table of routes
//! ([`route::Router`]; per-route services from [`route::new_route`]) to
//! per-cluster services ([`cluster::NewCluster`]) over a balancer
//! ([`balance::Balancer`]): a changing set of [`mesh_core::Endpoint`]s, one
//! multiplexed HTTP/2 connection per endpoint, requests spread over the ready
//! ones with any [`mesh_core::LbPolicy`]. Endpoints come and go without failing
//! or dropping a request; a request that finds its connection gone is re-picked,
//! and one a server refused unprocessed is resent (gRPC A6 transparent retry).
//! Each response is classified once ([`classify`]) and counted on its endpoint;
//! every error maps to one gRPC code ([`Error::grpc_code`]).
//!
//! **What it does not do:** it knows nothing of gRPC or protobuf (that is
//! `mesh-tonic`), nor of xDS (that is `xds-client`, which feeds a
//! [`discover::Discover`] stream).
//!
//! **Feature flags:** none yet.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_core::{Endpoint, LbPolicy};
//! use mesh_tower::balance::{Balancer, BalancerConfig};
//! use mesh_tower::discover;
//!
//! let endpoints = vec![Endpoint::new("127.0.0.1:50051".parse()?)];
//! let config = BalancerConfig { lb: LbPolicy::p2c_ewma(), ..BalancerConfig::default() };
//! let balancer: Balancer<http_body_util::Empty<bytes::Bytes>> =
//!     Balancer::new("static:///127.0.0.1:50051", discover::fixed(endpoints), config);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod adaptive;
pub mod authz;
pub mod balance;
pub mod breaker;
pub mod classify;
pub mod cluster;
pub mod connect;
pub mod deadline;
pub mod discover;
mod error;
pub mod fault;
pub mod hedge;
pub mod hygiene;
pub mod inbound;
mod layered;
pub mod mirror;
pub mod ratelimit;
pub mod replay;
pub mod retry;
pub mod route;
pub mod stats;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod trace;

pub use error::{Error, Result};

/// Boxed error type used for request bodies and transport errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
