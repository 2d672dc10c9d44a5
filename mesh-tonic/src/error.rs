/// Errors building a [`Channel`](crate::Channel).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The target URI is malformed or uses an unknown scheme.
    #[error("invalid target {target:?}: {reason}")]
    InvalidTarget {
        /// The target as given.
        target: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting is out of range.
    #[error("invalid channel setting: {0}")]
    InvalidSetting(#[from] mesh_core::Error),
    /// The client stack failed to start (e.g. the DNS resolver could not be built).
    #[error(transparent)]
    Stack(#[from] mesh_tower::Error),
    /// A server could not start as configured.
    #[error("server: {0}")]
    Server(String),
    /// The admin endpoint or its metrics exporter could not be set up.
    #[error("admin endpoint: {0}")]
    Admin(String),
    /// The trace exporter could not be set up, or failed to flush.
    #[error("traces: {0}")]
    Tracing(String),
}

/// Result alias for mesh-tonic.
pub type Result<T, E = Error> = std::result::Result<T, E>;
