use crate::resource::DecodeError;

/// Errors of the xDS client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bootstrap is invalid: names where it came from, the JSON line when
    /// known, the field and why.
    #[error("bootstrap {source_name}{}: {field}: {reason}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Bootstrap {
        /// File path, or the environment variable that held the JSON.
        source_name: String,
        /// 1-based line of a JSON syntax or type error.
        line: Option<usize>,
        /// Field path, e.g. `xds_servers[0].server_uri`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// No bootstrap was given.
    #[error("no xDS bootstrap: set GRPC_XDS_BOOTSTRAP (a file path) or GRPC_XDS_BOOTSTRAP_CONFIG (the JSON)")]
    NoBootstrap,
    /// A resource failed validation.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The control plane could not be reached or the stream failed.
    #[error("xDS server {server}: {reason}")]
    Transport {
        /// Server URI.
        server: String,
        /// What happened.
        reason: String,
    },
    /// A watched resource does not exist on the control plane.
    #[error("{type_name} resource {name:?} does not exist")]
    DoesNotExist {
        /// LDS, RDS, CDS or EDS.
        type_name: &'static str,
        /// Resource name.
        name: String,
    },
}

/// Result alias for xds-client.
pub type Result<T, E = Error> = std::result::Result<T, E>;
