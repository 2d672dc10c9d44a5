//! # mesh-core
//!
//! The pure heart of the mesh: the data model (services, endpoints, clusters,
//! routes and the policy structs every layer reads) and the load-balancing
//! algorithms as deterministic pickers.
//!
//! **What it does:** describes *what* the mesh should do. Every type is plain
//! data, validated once where it enters the process (`validate` methods), and
//! every algorithm takes its inputs (time, randomness, loads) as arguments so it
//! can be unit-tested without a runtime.
//!
//! **What it does not do:** no I/O, no clock, no async runtime, no threads.
//! Connections, timers and discovery live in `mesh-tower`; xDS decoding lives in
//! `xds-client`, which produces these types.
//!
//! **Feature flags:** none.
#![forbid(unsafe_code)]

pub mod adaptive;
pub mod authz;
mod error;
pub mod grpc;
pub mod identity;
pub mod inbound;
pub mod lb;
pub mod logging;
pub mod model;
pub mod outlier;
pub mod policy;
pub mod text;

pub use error::{Error, Result};
pub use grpc::GrpcCode;
pub use model::{
    Cluster, ClusterDiscovery, DropOverload, Endpoint, EndpointSet, HeaderMatch, HealthStatus, Labels, Locality, PathMatch, Regex, Route,
    RouteAction, RouteConfig, RouteMatch, RouteSource, ServiceName, StringMatch, VirtualHost, WeightedCluster,
};
pub use policy::LbPolicy;
