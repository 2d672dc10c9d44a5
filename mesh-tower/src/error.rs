use std::net::SocketAddr;
use std::time::Duration;

/// Errors of the mesh client stack.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A target URI could not be parsed or names an unsupported scheme.
    #[error("invalid target {target:?}: {reason}")]
    InvalidTarget {
        /// The target as given.
        target: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No endpoint became ready before the wait ended.
    #[error("no ready endpoint for {target} after waiting {waited:?} ({known} endpoints known)")]
    NoReadyEndpoint {
        /// The target being called.
        target: String,
        /// How long the call waited.
        waited: Duration,
        /// Endpoints discovery had reported at the time.
        known: usize,
    },
    /// Every known endpoint failed its last connection attempt.
    #[error("all {count} endpoints of {target} failed to connect; last error: {last_error}")]
    AllEndpointsFailed {
        /// The target being called.
        target: String,
        /// How many endpoints there are.
        count: usize,
        /// The most recent connection error.
        last_error: String,
    },
    /// Connecting to one endpoint failed.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP/2 handshake with an endpoint failed.
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    Handshake {
        /// The endpoint.
        addr: SocketAddr,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// A request was sent to an endpoint and failed there (stream reset,
    /// connection lost while waiting for the response).
    #[error("request to {addr} failed: {source}")]
    Upstream {
        /// The endpoint.
        addr: SocketAddr,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// The balancer dropped the call, as its endpoint assignment's `drop_overloads` ask (a control plane
    /// shedding load).
    #[error("call to {target} dropped by the load balancer (drop category {category:?})")]
    Dropped {
        /// The target being called.
        target: String,
        /// The drop category that matched.
        category: String,
    },
    /// A DNS lookup failed.
    #[error("DNS lookup of {name} failed: {reason}")]
    Dns {
        /// The name looked up.
        name: String,
        /// The resolver's error.
        reason: String,
    },
}

/// Result alias for mesh-tower.
pub type Result<T, E = Error> = std::result::Result<T, E>;
