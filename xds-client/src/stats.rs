//! What the client counts of its servers and resources, in the shape of gRPC's XdsClient metrics (gRFC A78):
//! per server, whether its stream works and how often it went from working to failing, and the resources it
//! sent that were valid and invalid, by type; and the resources the client holds, by authority, cache state and
//! type. Plain atomics, read as snapshots ([`XdsClient::server_counts`](crate::XdsClient::server_counts),
//! [`XdsClient::resource_counts`](crate::XdsClient::resource_counts)) by whatever exports them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::dump::ResourceDump;
use crate::resource::ResourceType;
use crate::watch::ResourceStatus;

/// One server's counters.
#[derive(Debug, Default)]
pub(crate) struct ServerStats {
    /// The client has tried this server (a fallback is not reported before it is needed).
    tried: AtomicBool,
    /// Set while the server is failing (A78's `connected` is its negation): clear at first, as a server is
    /// healthy until it fails.
    failing: AtomicBool,
    failures: AtomicU64,
    valid: [AtomicU64; 4],
    invalid: [AtomicU64; 4],
}

impl ServerStats {
    /// A stream to the server opened: it counts as connected unless it failed before and has not answered since.
    pub(crate) fn opened(&self) {
        self.tried.store(true, Ordering::Relaxed);
    }

    /// The server answered on its stream: it is connected again.
    pub(crate) fn answered(&self) {
        self.failing.store(false, Ordering::Relaxed);
    }

    /// The server could not be reached, or its stream ended before any answer (A57): a failure, counted when it
    /// was healthy.
    pub(crate) fn failed(&self) {
        self.tried.store(true, Ordering::Relaxed);
        if !self.failing.swap(true, Ordering::Relaxed) {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts the resources of one response of type `ty`.
    pub(crate) fn received(&self, ty: ResourceType, valid: usize, invalid: usize) {
        let i = index(ty);
        self.valid[i].fetch_add(valid as u64, Ordering::Relaxed);
        self.invalid[i].fetch_add(invalid as u64, Ordering::Relaxed);
    }

    pub(crate) fn counts(&self, server: &str) -> Option<ServerCounts> {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        self.tried.load(Ordering::Relaxed).then(|| ServerCounts {
            server: server.to_owned(),
            connected: !self.failing.load(Ordering::Relaxed),
            failures: read(&self.failures),
            valid: self.valid.each_ref().map(read),
            invalid: self.invalid.each_ref().map(read),
        })
    }
}

fn index(ty: ResourceType) -> usize {
    ResourceType::ALL.iter().position(|t| *t == ty).unwrap_or_default()
}

/// A snapshot of one server's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerCounts {
    /// The server's URI, as the bootstrap names it (A78's `grpc.xds.server`).
    pub server: String,
    /// Whether the client has a working stream to it (A78's `grpc.xds_client.connected`).
    pub connected: bool,
    /// Times it went from working to failing (`grpc.xds_client.server_failure`).
    pub failures: u64,
    valid: [u64; 4],
    invalid: [u64; 4],
}

impl ServerCounts {
    /// Resources of type `ty` it sent that were valid (`grpc.xds_client.resource_updates_valid`), unchanged
    /// ones included.
    pub fn valid(&self, ty: ResourceType) -> u64 {
        self.valid[index(ty)]
    }

    /// Resources of type `ty` it sent that were invalid (`grpc.xds_client.resource_updates_invalid`).
    pub fn invalid(&self, ty: ResourceType) -> u64 {
        self.invalid[index(ty)]
    }
}

/// How many resources the client holds of one authority, cache state and type (A78's
/// `grpc.xds_client.resources`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResourceCount {
    /// The name's `xdstp://` authority, or `#old` for a name of the old form.
    pub authority: String,
    /// `requested`, `does_not_exist`, `acked`, `nacked` or `nacked_but_cached`.
    pub cache_state: &'static str,
    /// The resource type.
    pub resource_type: ResourceType,
    /// How many.
    pub count: u64,
}

/// The resources of `dump`, counted by authority, cache state and type.
pub(crate) fn resource_counts(dump: &[ResourceDump]) -> Vec<ResourceCount> {
    let mut counts: BTreeMap<(String, &'static str, ResourceType), u64> = BTreeMap::new();
    for resource in dump {
        let authority = match resource.name.strip_prefix("xdstp://") {
            Some(rest) => rest.split('/').next().unwrap_or_default().to_owned(),
            None => "#old".to_owned(),
        };
        let state = match resource.status {
            ResourceStatus::Requested => "requested",
            ResourceStatus::Acked => "acked",
            ResourceStatus::Nacked if resource.raw.is_some() => "nacked_but_cached",
            ResourceStatus::Nacked => "nacked",
            ResourceStatus::DoesNotExist | ResourceStatus::Deleted => "does_not_exist",
        };
        *counts.entry((authority, state, resource.resource_type)).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|((authority, cache_state, resource_type), count)| ResourceCount { authority, cache_state, resource_type, count })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(name: &str, status: ResourceStatus, cached: bool) -> ResourceDump {
        ResourceDump {
            resource_type: ResourceType::Cluster,
            name: name.to_owned(),
            version: String::new(),
            status,
            error: None,
            last_updated: None,
            raw: cached.then(Default::default),
        }
    }

    #[test]
    fn resources_are_counted_by_authority_and_cache_state() {
        let dump = [
            resource("a", ResourceStatus::Acked, true),
            resource("b", ResourceStatus::Acked, true),
            resource("c", ResourceStatus::Nacked, true),
            resource("d", ResourceStatus::Nacked, false),
            resource("xdstp://mesh.example/envoy.config.cluster.v3.Cluster/e", ResourceStatus::Requested, false),
            resource("f", ResourceStatus::Deleted, true),
        ];
        let counts: Vec<(String, &str, u64)> = resource_counts(&dump).into_iter().map(|c| (c.authority, c.cache_state, c.count)).collect();
        let expected = [
            ("#old", "acked", 2),
            ("#old", "does_not_exist", 1),
            ("#old", "nacked", 1),
            ("#old", "nacked_but_cached", 1),
            ("mesh.example", "requested", 1),
        ];
        assert_eq!(counts, expected.map(|(a, s, n)| (a.to_owned(), s, n)));
    }

    #[test]
    fn a_server_fails_once_until_it_answers_again() {
        let stats = ServerStats::default();
        assert_eq!(stats.counts("s"), None, "not reported before it is tried");
        stats.opened();
        stats.received(ResourceType::Cluster, 2, 1);
        let counts = stats.counts("s").unwrap();
        assert!(counts.connected);
        assert_eq!(
            (counts.valid(ResourceType::Cluster), counts.invalid(ResourceType::Cluster), counts.valid(ResourceType::Listener)),
            (2, 1, 0)
        );
        stats.failed();
        stats.failed();
        stats.opened();
        let counts = stats.counts("s").unwrap();
        assert_eq!((counts.connected, counts.failures), (false, 1), "a new stream is not connected until it answers");
        stats.answered();
        stats.failed();
        assert_eq!(stats.counts("s").unwrap().failures, 2);
    }
}
