use std::net::SocketAddr;

/// Errors from validating model and policy values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A service name is empty or contains characters not allowed in a name.
    #[error("invalid service name {name:?}: {reason}")]
    InvalidServiceName {
        /// The offending name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A policy field holds a value outside its allowed range.
    #[error("invalid policy {policy}.{field}: {reason}")]
    InvalidPolicy {
        /// The policy struct, e.g. `ring_hash`.
        policy: &'static str,
        /// The field, e.g. `minimum_ring_size`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An endpoint's address is not usable (port 0, unspecified IP).
    #[error("invalid endpoint {addr}: {reason}")]
    InvalidEndpoint {
        /// The endpoint address.
        addr: SocketAddr,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A workload identity is not a valid SPIFFE ID.
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    InvalidIdentity {
        /// The offending ID.
        id: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A request path cannot be normalized for authorization (bad percent-encoding, not starting with `/`), so
    /// no decision can be made on it: authorization denies it.
    #[error("invalid request path {path:?} at byte {at}: {reason}")]
    InvalidPath {
        /// The path as received (query and fragment included).
        path: String,
        /// Byte offset of the offending character.
        at: usize,
        /// What is wrong there.
        reason: &'static str,
    },
    /// A load-balancer name is not one the mesh knows.
    #[error("unknown load-balancing policy {0:?} (expected round_robin, weighted_round_robin, least_request, p2c_ewma or ring_hash)")]
    UnknownLbPolicy(String),
}

/// Result alias for mesh-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;
