//! # xds-client
//!
//! The mesh's xDS v3 client: it will speak the Aggregated Discovery Service
//! (State-of-the-World and delta) to any standard control plane, validate
//! resources into `mesh-core` types and feed discovery and routing to the
//! client stack.
//!
//! **Status:** an empty shell; the client arrives with its own issue.
//!
//! **What it does not do:** no connections of its own beyond the ADS stream;
//! load balancing and connections stay in `mesh-tower`.
//!
//! **Feature flags:** none.
//!
//! ## Supported xDS features and gRFCs
//!
//! | feature | status | covered by |
//! |---|---|---|
//! | (none yet) | | |
#![forbid(unsafe_code)]
