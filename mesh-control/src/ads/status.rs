//! What the cache and its streams hold, for a status endpoint.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

/// The whole cache: its snapshots and every connected stream ([`SnapshotCache::status`]).
///
/// [`SnapshotCache::status`]: super::SnapshotCache::status
#[derive(Clone, Debug, Serialize)]
pub struct CacheStatus {
    /// The default snapshot.
    pub default: SnapshotStatus,
    /// Snapshots of the keys that have their own, by key.
    pub snapshots: BTreeMap<String, SnapshotStatus>,
    /// Connected streams, in the order they connected.
    pub streams: Vec<StreamStatus>,
}

/// The versions of one snapshot.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SnapshotStatus {
    /// Per type URL.
    pub types: BTreeMap<String, TypeSummary>,
}

/// One type of a snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct TypeSummary {
    /// The type's version (what SotW responses carry as `version_info`).
    pub version: String,
    /// How many resources it has.
    pub resources: usize,
}

/// The ADS variant a stream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// State of the world (`StreamAggregatedResources`).
    Sotw,
    /// Incremental (`DeltaAggregatedResources`).
    Delta,
}

/// One connected stream.
#[derive(Clone, Debug, Serialize)]
pub struct StreamStatus {
    /// Stream id, unique within the process.
    pub id: u64,
    /// The client's `node.id`.
    pub node_id: String,
    /// The client's `node.cluster`.
    pub node_cluster: String,
    /// The snapshot key its node maps to.
    pub key: String,
    /// SotW or delta.
    pub protocol: Protocol,
    /// When it connected (JSON: milliseconds since the Unix epoch).
    #[serde(rename = "connected_at_ms", serialize_with = "unix_ms")]
    pub connected_at: SystemTime,
    /// Per type URL the client subscribed to.
    pub types: BTreeMap<String, TypeStatus>,
}

/// One resource type on a stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeStatus {
    /// Whether it is a wildcard subscription (all resources of the type).
    pub wildcard: bool,
    /// Names subscribed to explicitly, in order.
    pub names: Vec<String>,
    /// Version of the last response sent (SotW `version_info`, delta `system_version_info`).
    pub sent_version: Option<String>,
    /// Nonce of the last response sent.
    pub sent_nonce: Option<String>,
    /// Version of the last response the client acknowledged.
    pub acked_version: Option<String>,
    /// Nonce of the last response the client acknowledged.
    pub acked_nonce: Option<String>,
    /// The last rejection, if any (kept after later ACKs; compare the nonces).
    pub last_nack: Option<Nack>,
}

/// A rejected response.
#[derive(Clone, Debug, Serialize)]
pub struct Nack {
    /// Version of the rejected response.
    pub version: String,
    /// Nonce of the rejected response.
    pub nonce: String,
    /// The client's `error_detail.message`.
    pub error: String,
    /// When it arrived (JSON: milliseconds since the Unix epoch).
    #[serde(rename = "at_ms", serialize_with = "unix_ms")]
    pub at: SystemTime,
}

fn unix_ms<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    let ms = time.duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
    serializer.serialize_u64(ms)
}

/// What every stream of a cache has done, counted where a stream's status changes (`StatusHandle::update`), so
/// SotW and delta count alike: `/metrics` reads it.
#[derive(Debug, Default)]
pub struct AdsCounters {
    /// Responses sent (a new nonce).
    pub pushes: AtomicU64,
    /// Responses acknowledged.
    pub acks: AtomicU64,
    /// Responses rejected.
    pub nacks: AtomicU64,
    /// Sum over acknowledged responses of the time from sending to the ACK, in microseconds.
    pub ack_latency_us: AtomicU64,
}

/// A stream's status, shared between the stream and the cache, and the cache's counters.
#[derive(Clone, Debug)]
pub(crate) struct StatusHandle(Arc<Mutex<StreamStatus>>, Arc<AdsCounters>, Arc<Mutex<BTreeMap<String, std::time::Instant>>>);

impl StatusHandle {
    pub(crate) fn new(status: StreamStatus, counters: Arc<AdsCounters>) -> Self {
        Self(Arc::new(Mutex::new(status)), counters, Arc::default())
    }

    pub(crate) fn get(&self) -> StreamStatus {
        self.lock().clone()
    }

    /// Updates the status of `type_url` (created if new), counting a new sent, acknowledged or rejected nonce.
    pub(crate) fn update(&self, type_url: &str, f: impl FnOnce(&mut TypeStatus)) {
        let mut status = self.lock();
        let type_status = match status.types.get_mut(type_url) {
            Some(type_status) => type_status,
            None => status.types.entry(type_url.to_owned()).or_default(),
        };
        let before =
            (type_status.sent_nonce.clone(), type_status.acked_nonce.clone(), type_status.last_nack.as_ref().map(|n| n.nonce.clone()));
        f(type_status);
        let counters = &self.1;
        let mut sent_at = self.2.lock().unwrap_or_else(PoisonError::into_inner);
        if type_status.sent_nonce.is_some() && type_status.sent_nonce != before.0 {
            counters.pushes.fetch_add(1, Ordering::Relaxed);
            sent_at.insert(type_url.to_owned(), std::time::Instant::now());
        }
        if type_status.acked_nonce.is_some() && type_status.acked_nonce != before.1 {
            counters.acks.fetch_add(1, Ordering::Relaxed);
            if let Some(at) = sent_at.get(type_url) {
                counters.ack_latency_us.fetch_add(at.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        }
        if type_status.last_nack.is_some() && type_status.last_nack.as_ref().map(|n| n.nonce.clone()) != before.2 {
            counters.nacks.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> MutexGuard<'_, StreamStatus> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
