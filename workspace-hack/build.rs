//! Empty: a build script lets the crate carry the host dependencies listed in its manifest.

fn main() {}
