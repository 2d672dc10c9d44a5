//! Test support for the mesh's end-to-end tests: a real tonic server that
//! answers any method of `mesh.test.Echo` with its own address, helpers that
//! start real peers (the server binary, dnsmasq, Python grpcio), and
//! distribution checks.
#![forbid(unsafe_code)]

pub mod ads;
pub mod certs;
pub mod echo;
pub mod h2script;
pub mod load;
pub mod otlp;
pub mod peers;
