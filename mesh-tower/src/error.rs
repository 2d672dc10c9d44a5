use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::GrpcCode;

use crate::BoxError;
use crate::classify::Failure;

/// Errors of the mesh client stack. Each names where it happened (target, cluster, endpoint) and maps to one
/// gRPC status code ([`Error::grpc_code`]), the only place that mapping is made.
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
    /// No routing table arrived before the wait ended (an `xds:///` target whose control plane has not
    /// answered).
    #[error("{target}: no configuration from {from} after {waited:?}")]
    NoConfig {
        /// The target being called.
        target: String,
        /// Where the configuration was to come from (the xDS server).
        from: String,
        /// How long the call waited.
        waited: Duration,
    },
    /// No route of the target's table matches the request.
    #[error("{target}: no route matches {path}")]
    NoRoute {
        /// The target being called.
        target: String,
        /// The request's path.
        path: String,
    },
    /// The matching route is non-forwarding (Envoy's `non_forwarding_action`; gRPC fails such calls).
    #[error("{target}: the route for {path} is non-forwarding")]
    NonForwarding {
        /// The target being called.
        target: String,
        /// The request's path.
        path: String,
    },
    /// The route chose a cluster the table does not hold (it was deleted by the control plane).
    #[error("{target}: cluster {cluster} is not available")]
    ClusterNotFound {
        /// The target being called.
        target: String,
        /// The cluster the route chose.
        cluster: String,
    },
    /// The route's timeout ended the call.
    #[error("{target}: route timeout {limit:?} exceeded")]
    RouteTimeout {
        /// The target being called.
        target: String,
        /// The route's timeout.
        limit: Duration,
    },
    /// The cluster's circuit breaker turned the call away: `limit` calls were already in flight. Never retried.
    #[error("cluster {cluster} is at its limit of {limit} requests in flight (circuit breaker)")]
    Overflow {
        /// The cluster.
        cluster: String,
        /// Its `max_requests`.
        limit: u32,
    },
    /// The call would have waited for a ready endpoint beyond the cluster's `max_pending_requests` (Envoy's
    /// pending overflow). Never retried.
    #[error("cluster {cluster} already has {limit} calls waiting for a ready endpoint (max_pending_requests)")]
    PendingOverflow {
        /// The cluster.
        cluster: String,
        /// Its `max_pending_requests`.
        limit: u32,
    },
    /// The cluster's adaptive concurrency limit turned the call away: `limit` calls were in flight. Never
    /// retried.
    #[error("cluster {cluster} is at its adaptive limit of {limit} requests in flight")]
    ConcurrencyLimited {
        /// The cluster.
        cluster: String,
        /// The limit when the call came.
        limit: u32,
        /// The status it fails with (RESOURCE_EXHAUSTED unless configured).
        code: GrpcCode,
    },
    /// The caller's deadline (its `grpc-timeout`) ran out.
    #[error("{target}: call exceeded its deadline (grpc-timeout {limit:?})")]
    Deadline {
        /// The target being called.
        target: String,
        /// The caller's timeout.
        limit: Duration,
    },
    /// One attempt of a retried call ran past the route's per-try timeout.
    #[error("attempt exceeded the per-try timeout of {limit:?}")]
    AttemptTimeout {
        /// The per-try timeout.
        limit: Duration,
    },
    /// No endpoint became ready before the wait ended.
    #[error("no ready endpoint for {target} after waiting {waited:?} ({known} endpoints known)")]
    NoReadyEndpoint {
        /// The cluster being called.
        target: String,
        /// How long the call waited.
        waited: Duration,
        /// Endpoints discovery had reported at the time.
        known: usize,
    },
    /// Every known endpoint failed its last connection attempt.
    #[error("all {count} endpoints of {target} failed to connect; last error: {last_error}")]
    AllEndpointsFailed {
        /// The cluster being called.
        target: String,
        /// How many endpoints there are.
        count: usize,
        /// The most recent connection error.
        #[source]
        last_error: Arc<Error>,
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
        /// The transport's error.
        #[source]
        source: BoxError,
    },
    /// A request was sent to an endpoint and failed there (stream reset, connection lost while waiting for
    /// the response or reading its body).
    #[error("request to {addr} failed ({failure}): {source}")]
    Upstream {
        /// The endpoint.
        addr: SocketAddr,
        /// How it failed.
        failure: Failure,
        /// The transport's error.
        #[source]
        source: BoxError,
    },
    /// The balancer dropped the call, as its endpoint assignment's `drop_overloads` ask (a control plane
    /// shedding load).
    #[error("call to {target} dropped by the load balancer (drop category {category:?})")]
    Dropped {
        /// The cluster being called.
        target: String,
        /// The drop category that matched.
        category: String,
    },
    /// Fault injection aborted the call (Envoy's fault filter, gRPC A33): it never left.
    #[error("{target}: fault injected: call aborted with {code:?}")]
    FaultAbort {
        /// The target being called.
        target: String,
        /// The status it fails with.
        code: GrpcCode,
    },
    /// The local rate limit turned the call away (RESOURCE_EXHAUSTED). Never retried.
    #[error("{target}: rate limited ({} calls per {:?}); retry after {retry_after:?}", limit.max_tokens, limit.fill_interval)]
    RateLimited {
        /// The target being called.
        target: String,
        /// The limit (boxed: errors stay small).
        limit: Box<mesh_core::policy::RateLimit>,
        /// When the next call would be let through.
        retry_after: Duration,
    },
    /// A server's inbound listener cannot be served as sent, or a call on it has no route a server may serve
    /// (A36: a server serves only non-forwarding routes).
    #[error("inbound listener {listener}: {reason}")]
    Inbound {
        /// The listener's resource name.
        listener: String,
        /// What is wrong.
        reason: String,
    },
    /// A layer of the stack failed the call with an error of its own (one speaking `BoxError`).
    #[error("{target}: {source}")]
    Layer {
        /// The target being called.
        target: String,
        /// The layer's error.
        #[source]
        source: BoxError,
    },
    /// A DNS lookup failed.
    #[error("DNS lookup of {name} failed: {source}")]
    Dns {
        /// The name looked up.
        name: String,
        /// The resolver's error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// The endpoint a call reached before this error broke it (`None`: it reached none).
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        match self {
            Self::Upstream { addr, .. } => Some(*addr),
            _ => None,
        }
    }

    /// The gRPC status code a caller sees for this error (gRPC's status mapping for transport failures, A6's
    /// UNAVAILABLE for calls that never reached a server).
    pub fn grpc_code(&self) -> GrpcCode {
        match self {
            Self::InvalidTarget { .. } => GrpcCode::InvalidArgument,
            Self::RouteTimeout { .. } | Self::AttemptTimeout { .. } | Self::Deadline { .. } => GrpcCode::DeadlineExceeded,
            Self::Upstream { failure, .. } => failure.grpc_code(),
            Self::FaultAbort { code, .. } | Self::ConcurrencyLimited { code, .. } => *code,
            Self::RateLimited { .. } => GrpcCode::ResourceExhausted,
            Self::NoConfig { .. }
            | Self::NoRoute { .. }
            | Self::NonForwarding { .. }
            | Self::ClusterNotFound { .. }
            | Self::NoReadyEndpoint { .. }
            | Self::AllEndpointsFailed { .. }
            | Self::Connect { .. }
            | Self::Handshake { .. }
            | Self::Dropped { .. }
            | Self::Layer { .. }
            | Self::Inbound { .. }
            | Self::Overflow { .. }
            | Self::PendingOverflow { .. }
            | Self::Dns { .. } => GrpcCode::Unavailable,
        }
    }

    /// Takes back an error that went through a layer speaking `BoxError` (tower's timeout, buffer and
    /// limit layers): the stack's own error as it was; anything else is a layer's, named `target`.
    pub(crate) fn from_layer(error: BoxError, target: &str, timeout: Option<Duration>) -> Self {
        match error.downcast::<Self>() {
            Ok(error) => *error,
            Err(other) if other.is::<tower::timeout::error::Elapsed>() => {
                Self::RouteTimeout { target: target.to_owned(), limit: timeout.unwrap_or_default() }
            }
            Err(source) => Self::Layer { target: target.to_owned(), source },
        }
    }
}

/// Result alias for mesh-tower.
pub type Result<T, E = Error> = std::result::Result<T, E>;
