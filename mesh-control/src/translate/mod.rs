//! Mesh model → xDS resources.
