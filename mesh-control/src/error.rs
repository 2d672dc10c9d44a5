use std::path::PathBuf;

/// Everything that can go wrong in the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mesh file is invalid; the error names file, line, field and reason.
    #[error(transparent)]
    MeshFile(#[from] crate::mesh::FileError),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The gRPC server could not start or failed.
    #[error("serving xDS: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The CA could not issue or load a certificate.
    #[error("CA: {0}")]
    Ca(crate::ca::CaError),
    /// The Kubernetes API failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] ::kube::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
