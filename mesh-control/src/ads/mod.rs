//! The ADS server and its snapshot cache.
