//! The mesh file.

/// An invalid mesh file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}:{line}: {field}: {reason}")]
pub struct FileError {
    /// The file.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// The field (path like `services.greeter.routes[0].split`).
    pub field: String,
    /// Why.
    pub reason: String,
}
