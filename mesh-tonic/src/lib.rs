//! # mesh-tonic
//!
//! Glue between the mesh client stack and tonic.
//!
//! **What it does:** [`Channel`] is a drop-in replacement for
//! `tonic::transport::Channel`: generated clients accept it
//! (`GreeterClient::new(channel)`), and behind it discovery and load
//! balancing from `mesh-tower` pick an endpoint per call. Targets:
//!
//! | target | discovery |
//! |---|---|
//! | `static:///10.0.0.1:50051,10.0.0.2:50051` | a fixed list of `ip:port` |
//! | `dns:///greeter.internal:50051` | A/AAAA records, re-resolved at TTL |
//! | `dns:///_grpc._tcp.greeter.internal` | SRV records (name starts with `_`, no port) |
//! | `dns://10.0.0.53:53/greeter.internal:50051` | the same, asking that DNS server |
//!
//! | `xds:///greeter` | LDS → RDS → CDS → EDS from the control plane in the xDS bootstrap (`GRPC_XDS_BOOTSTRAP`) |
//!
//! [`codec::BytesCodec`] sends raw
//! message bytes, to call any method without its proto.
//!
//! **What it does not do:** no server-side glue yet, no TLS yet.
//!
//! **Feature flags:** none.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_tonic::Channel;
//! use std::time::Duration;
//!
//! let channel = Channel::builder("dns:///greeter.internal:50051")
//!     .lb("p2c_ewma".parse()?)
//!     .timeout(Duration::from_secs(2))
//!     .build()?;
//! // let mut client = GreeterClient::new(channel);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod admin;
mod body;
mod channel;
pub mod codec;
mod error;
pub mod server;
mod target;
pub mod telemetry;
mod xds;

pub use body::ResponseBody;
pub use channel::{Call, Channel, ChannelBuilder, ResponseFuture, status_from};
pub use error::{Error, Result};
pub use mesh_tower::balance::{Delay, DelayKind, ServedBy};
pub use server::{RunningServer, Server, ServerBuilder};
pub use target::Target;
pub use xds::{eds_source, shared_client};
