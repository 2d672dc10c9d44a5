//! No code. This crate exists for its manifest: see `workspace-hack/Cargo.toml`.
