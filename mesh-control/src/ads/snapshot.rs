//! Snapshots and the per-node snapshot cache.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{DefaultHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::watch;

use super::status::{CacheStatus, Protocol, SnapshotStatus, StatusHandle, StreamStatus, TypeSummary};

/// One resource as stored: the `Any` (encoded once, by whoever built it) and the hash of its bytes, which is its
/// version.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) any: Any,
    pub(crate) hash: u64,
    /// `hash` as a version string (delta `Resource.version`).
    pub(crate) version: String,
}

impl Entry {
    fn new(any: Any) -> Self {
        let mut hasher = DefaultHasher::new();
        hasher.write(any.type_url.as_bytes());
        hasher.write_u8(0xff);
        hasher.write(&any.value);
        let hash = hasher.finish();
        Self { any, hash, version: version_string(hash) }
    }
}

/// Versions are hashes shown as 16 hex digits.
pub(crate) fn version_string(hash: u64) -> String {
    format!("{hash:016x}")
}

/// Resources of one type, by name.
pub(crate) type Resources = BTreeMap<String, Arc<Entry>>;

/// A set of resources for one view of the mesh: type URL → name → `Any`.
///
/// Each resource's version is a hash of its encoded bytes, computed once on [`Snapshot::insert`]; cloning a
/// snapshot shares the resources.
#[derive(Clone, Default)]
pub struct Snapshot {
    types: BTreeMap<String, Resources>,
}

impl fmt::Debug for Snapshot {
    /// Type URLs and resource names (not the bytes).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.types.iter().map(|(type_url, resources)| (type_url, resources.keys().collect::<Vec<_>>()))).finish()
    }
}

impl Snapshot {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) resource `name` of `type_url`.
    pub fn insert(&mut self, type_url: &str, name: impl Into<String>, resource: Any) {
        let entry = Arc::new(Entry::new(resource));
        match self.types.get_mut(type_url) {
            Some(resources) => {
                resources.insert(name.into(), entry);
            }
            None => {
                self.types.insert(type_url.to_owned(), BTreeMap::from([(name.into(), entry)]));
            }
        }
    }

    /// Resource `name` of `type_url`, if present.
    pub fn get(&self, type_url: &str, name: &str) -> Option<&Any> {
        self.types.get(type_url)?.get(name).map(|entry| &entry.any)
    }

    /// Names of the resources of `type_url`, in order.
    pub fn names(&self, type_url: &str) -> impl Iterator<Item = &str> {
        self.types.get(type_url).into_iter().flat_map(|resources| resources.keys().map(String::as_str))
    }

    /// Number of resources of all types.
    pub fn len(&self) -> usize {
        self.types.values().map(BTreeMap::len).sum()
    }

    /// Whether it holds no resource at all.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    pub(crate) fn resources(&self, type_url: &str) -> Option<&Resources> {
        self.types.get(type_url)
    }
}

/// A snapshot as served: the resources plus each type's version (a hash over its names and resource versions).
#[derive(Debug)]
pub(crate) struct Published {
    snapshot: Snapshot,
    versions: HashMap<String, u64>,
}

impl Published {
    fn new(snapshot: Snapshot) -> Self {
        let versions = snapshot.types.iter().map(|(type_url, resources)| (type_url.clone(), type_version(resources))).collect();
        Self { snapshot, versions }
    }

    /// The resources of `type_url`, if the snapshot has that type.
    pub(crate) fn resources(&self, type_url: &str) -> Option<&Resources> {
        self.snapshot.resources(type_url)
    }

    /// The version of `type_url` (types the snapshot lacks share the version of an empty type).
    pub(crate) fn version(&self, type_url: &str) -> u64 {
        self.versions.get(type_url).copied().unwrap_or_else(|| type_version(&Resources::new()))
    }

    fn status(&self) -> SnapshotStatus {
        let types = self
            .snapshot
            .types
            .iter()
            .map(|(type_url, resources)| {
                (type_url.clone(), TypeSummary { version: version_string(self.version(type_url)), resources: resources.len() })
            })
            .collect();
        SnapshotStatus { types }
    }
}

fn type_version(resources: &Resources) -> u64 {
    let mut hasher = DefaultHasher::new();
    for (name, entry) in resources {
        hasher.write(name.as_bytes());
        hasher.write_u8(0xff);
        hasher.write_u64(entry.hash);
    }
    hasher.finish()
}

/// One snapshot per node key plus a default; ADS streams watch the snapshot of their node's key.
///
/// Cheap to clone: clones share the same cache. Replacing the snapshot of a key wakes only the streams of that key
/// (and replacing the default wakes only streams whose key has no snapshot of its own); each stream then sends only
/// what changed for it.
#[derive(Clone)]
pub struct SnapshotCache {
    inner: Arc<Inner>,
}

struct Inner {
    node_key: Box<dyn Fn(&Node) -> String + Send + Sync>,
    state: Mutex<State>,
    next_stream: AtomicU64,
    counters: Arc<super::status::AdsCounters>,
}

struct State {
    default: Arc<Published>,
    keys: HashMap<String, Key>,
    streams: BTreeMap<u64, StatusHandle>,
}

/// A key with its own snapshot, or with streams watching it.
struct Key {
    /// Its own snapshot; `None` while it sees the default.
    own: Option<Arc<Published>>,
    /// The snapshot its streams see.
    tx: watch::Sender<Arc<Published>>,
}

impl SnapshotCache {
    /// An empty cache (every node sees the empty default snapshot until [`SnapshotCache::set_default`]);
    /// `node_key` maps a client's `Node` (id, cluster, metadata) to the key of the snapshot it sees.
    pub fn new(node_key: impl Fn(&Node) -> String + Send + Sync + 'static) -> Self {
        let state = State { default: Arc::new(Published::new(Snapshot::new())), keys: HashMap::new(), streams: BTreeMap::new() };
        Self {
            inner: Arc::new(Inner {
                node_key: Box::new(node_key),
                state: Mutex::new(state),
                next_stream: AtomicU64::new(1),
                counters: Arc::default(),
            }),
        }
    }

    /// A cache keyed by the node's `cluster` (a node without one has key `""`).
    pub fn by_cluster() -> Self {
        Self::new(|node| node.cluster.clone())
    }

    /// Replaces the snapshot for `key`. Streams of that key wake and send what changed for them.
    pub fn set(&self, key: &str, snapshot: Snapshot) {
        let published = Arc::new(Published::new(snapshot));
        let mut state = self.lock();
        let default = state.default.clone();
        let entry = state.keys.entry(key.to_owned()).or_insert_with(|| Key { own: None, tx: watch::Sender::new(default) });
        entry.own = Some(published.clone());
        entry.tx.send_replace(published);
    }

    /// Replaces the snapshot served to nodes whose key has no snapshot of its own.
    pub fn set_default(&self, snapshot: Snapshot) {
        let published = Arc::new(Published::new(snapshot));
        let mut state = self.lock();
        state.default = published.clone();
        for key in state.keys.values().filter(|key| key.own.is_none()) {
            key.tx.send_replace(published.clone());
        }
    }

    /// What every connected stream has (subscriptions, versions sent and acknowledged, rejections) and the
    /// versions of every snapshot.
    pub fn status(&self) -> CacheStatus {
        let (default, snapshots, streams) = {
            let state = self.lock();
            let snapshots: Vec<(String, Arc<Published>)> =
                state.keys.iter().filter_map(|(key, entry)| Some((key.clone(), entry.own.clone()?))).collect();
            (state.default.clone(), snapshots, state.streams.values().cloned().collect::<Vec<_>>())
        };
        CacheStatus {
            default: default.status(),
            snapshots: snapshots.into_iter().map(|(key, published)| (key, published.status())).collect(),
            streams: streams.iter().map(StatusHandle::get).collect(),
        }
    }

    /// Registers a stream of `node`: its status entry and a watch of its key's snapshot. Dropping the registration
    /// unregisters it.
    pub(crate) fn register(&self, node: &Node, protocol: Protocol) -> Registration {
        let key = (self.inner.node_key)(node);
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        let status = StatusHandle::new(
            StreamStatus {
                id,
                node_id: node.id.clone(),
                node_cluster: node.cluster.clone(),
                key: key.clone(),
                protocol,
                connected_at: SystemTime::now(),
                types: BTreeMap::new(),
            },
            self.inner.counters.clone(),
        );
        let mut state = self.lock();
        let default = state.default.clone();
        let watch = state.keys.entry(key.clone()).or_insert_with(|| Key { own: None, tx: watch::Sender::new(default) }).tx.subscribe();
        state.streams.insert(id, status.clone());
        drop(state);
        Registration { cache: self.clone(), id, key, status, watch }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What its streams have done: pushes, ACKs, NACKs and ACK latency.
    pub fn counters(&self) -> &super::status::AdsCounters {
        &self.inner.counters
    }
}

impl fmt::Debug for SnapshotCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("SnapshotCache").field("keys", &state.keys.len()).field("streams", &state.streams.len()).finish_non_exhaustive()
    }
}

/// A connected stream's place in the cache.
pub(crate) struct Registration {
    cache: SnapshotCache,
    id: u64,
    pub(crate) key: String,
    pub(crate) status: StatusHandle,
    watch: watch::Receiver<Arc<Published>>,
}

impl Registration {
    /// The snapshot the stream sees now.
    pub(crate) fn current(&mut self) -> Arc<Published> {
        self.watch.borrow_and_update().clone()
    }

    /// Waits until the stream's snapshot is replaced, and returns the new one (`None` once the cache is gone).
    pub(crate) async fn changed(&mut self) -> Option<Arc<Published>> {
        self.watch.changed().await.ok()?;
        Some(self.watch.borrow_and_update().clone())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut state = self.cache.lock();
        state.streams.remove(&self.id);
        // A key without a snapshot of its own is forgotten with its last stream (ours is the one receiver left).
        if state.keys.get(&self.key).is_some_and(|key| key.own.is_none() && key.tx.receiver_count() == 1) {
            state.keys.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{SotwStream, cluster, connect, names, node, serve, snapshot, wait_status};
    use super::super::type_url::{CLUSTER, ENDPOINT};
    use super::*;

    #[test]
    fn snapshot_holds_resources_by_type_and_name() {
        let mut snapshot = Snapshot::new();
        assert!(snapshot.is_empty());
        snapshot.insert(CLUSTER, "b", cluster("b", "1"));
        snapshot.insert(CLUSTER, "a", cluster("a", "1"));
        snapshot.insert(CLUSTER, "a", cluster("a", "2"));
        assert_eq!((snapshot.len(), snapshot.is_empty()), (2, false));
        assert_eq!(snapshot.get(CLUSTER, "a"), Some(&cluster("a", "2")));
        assert_eq!((snapshot.get(CLUSTER, "c"), snapshot.get(ENDPOINT, "a")), (None, None));
        assert_eq!(snapshot.names(CLUSTER).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(snapshot.names(ENDPOINT).count(), 0);
    }

    #[test]
    fn versions_follow_the_bytes() {
        let published = |tag: &str| Published::new(snapshot(&[("a", tag), ("b", "1")], &[]));
        let (one, same, other) = (published("1"), published("1"), published("2"));
        assert_eq!(one.version(CLUSTER), same.version(CLUSTER));
        assert_ne!(one.version(CLUSTER), other.version(CLUSTER));
        let entry = |p: &Published, name: &str| p.resources(CLUSTER).unwrap()[name].version.clone();
        assert_eq!(entry(&one, "a"), entry(&same, "a"));
        assert_ne!(entry(&one, "a"), entry(&other, "a"));
        assert_eq!(entry(&one, "b"), entry(&other, "b"));
        assert_eq!(one.version(ENDPOINT), other.version(ENDPOINT));
    }

    #[test]
    fn a_change_wakes_only_the_streams_that_see_it() {
        let cache = SnapshotCache::by_cluster();
        let mut on_a = cache.register(&node("1", "a"), Protocol::Sotw);
        let mut on_b = cache.register(&node("2", "b"), Protocol::Delta);
        let mut on_default = cache.register(&node("3", ""), Protocol::Sotw);
        let mut changed = || {
            [&mut on_a, &mut on_b, &mut on_default].map(|registration| {
                let changed = registration.watch.has_changed().unwrap();
                registration.current();
                changed
            })
        };
        cache.set("a", snapshot(&[("a", "1")], &[]));
        assert_eq!(changed(), [true, false, false]);
        cache.set_default(snapshot(&[("d", "1")], &[]));
        assert_eq!(changed(), [false, true, true]);
        cache.set("b", snapshot(&[("b", "1")], &[]));
        cache.set_default(snapshot(&[("d", "2")], &[]));
        assert_eq!(changed(), [false, true, true]);
        assert_eq!(cache.status().streams.len(), 3);

        // Keys without a snapshot of their own go with their last stream.
        drop(on_default);
        assert!(!cache.lock().keys.contains_key(""));
        drop(on_b);
        assert!(cache.lock().keys.contains_key("b"));
        assert_eq!(cache.status().streams.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(), ["a"]);
    }

    #[tokio::test]
    async fn nodes_see_the_snapshot_of_their_key_or_the_default() {
        let cache = SnapshotCache::by_cluster();
        cache.set("a", snapshot(&[("in-a", "1")], &[]));
        cache.set("b", snapshot(&[("in-b", "1")], &[]));
        cache.set_default(snapshot(&[("in-default", "1")], &[]));
        let mut client = connect(serve(&cache).await).await;
        let mut streams = Vec::new();
        for (id, key) in [("1", "a"), ("2", "b"), ("3", "other"), ("4", "")] {
            let mut stream = SotwStream::open(&mut client).await;
            stream.request(Some(&node(id, key)), CLUSTER, &[], None);
            let cds = stream.recv().await;
            stream.request(None, CLUSTER, &[], Some(&cds));
            streams.push((stream, names(&cds)));
        }
        let seen: Vec<&[String]> = streams.iter().map(|(_, names)| names.as_slice()).collect();
        assert_eq!(seen, [["in-a"], ["in-b"], ["in-default"], ["in-default"]]);
        let status = wait_status(&cache, "four streams", |status| status.streams.len() == 4).await;
        assert_eq!(status.streams.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(), ["a", "b", "other", ""]);
        assert_eq!(status.snapshots.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(status.default.types[CLUSTER].resources, 1);

        // The default changes for the nodes without a snapshot of their own.
        cache.set_default(snapshot(&[("in-default", "2")], &[]));
        for (stream, _) in &mut streams[2..] {
            assert_eq!(stream.recv().await.resources, vec![cluster("in-default", "2")]);
        }
        // A key that gets its own snapshot leaves the default.
        cache.set("other", snapshot(&[("in-other", "1")], &[]));
        assert_eq!(names(&streams[2].0.recv().await), ["in-other"]);
        // The next thing the others see is their own change.
        cache.set("b", snapshot(&[("in-b", "2")], &[]));
        assert_eq!(streams[1].0.recv().await.resources, vec![cluster("in-b", "2")]);
        cache.set("a", snapshot(&[("in-a", "2")], &[]));
        assert_eq!(streams[0].0.recv().await.resources, vec![cluster("in-a", "2")]);
        cache.set_default(snapshot(&[("in-default", "3")], &[]));
        assert_eq!(streams[3].0.recv().await.resources, vec![cluster("in-default", "3")]);
        cache.set("other", snapshot(&[("in-other", "2")], &[]));
        assert_eq!(streams[2].0.recv().await.resources, vec![cluster("in-other", "2")]);
    }
}
