//! Per-thread caches of bound series: for each instrument set, the SDK's bound instruments of every
//! attribute set a call on this thread has recorded. A hit costs one hash of the key's parts and a table
//! lookup, with nothing shared between threads but the bound instrument itself; only a miss builds the
//! attribute set and binds it.
//!
//! A thread keeps at most [`CAPACITY`] series and starts over past it, which lets the SDK evict the series
//! of endpoints that went away.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::LocalKey;

use opentelemetry::metrics::{BoundCounter, BoundHistogram};

/// How many series one thread keeps bound in one cache.
const CAPACITY: usize = 4096;

/// A fresh owner id for an instrument set.
pub(super) fn owner() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// What tells one series from another: the instruments it belongs to and the call's parts its attributes
/// come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Key<'a> {
    /// The instrument set ([`owner`]).
    pub(super) owner: u64,
    pub(super) path: &'a str,
    pub(super) route: &'a str,
    /// The status ([`super::code`]); 0 where the series has none.
    pub(super) code: u32,
    pub(super) peer: Option<SocketAddr>,
}

impl Key<'_> {
    fn hash(&self) -> u64 {
        let mut h = Fx(self.owner);
        h.bytes(self.path.as_bytes());
        h.bytes(self.route.as_bytes());
        h.word(u64::from(self.code));
        if let Some(peer) = self.peer {
            match peer.ip() {
                IpAddr::V4(ip) => h.word(u64::from(ip.to_bits())),
                IpAddr::V6(ip) => {
                    let bits = ip.to_bits();
                    h.word(bits as u64);
                    h.word((bits >> 64) as u64);
                }
            }
            h.word(u64::from(peer.port()));
        }
        h.0
    }
}

#[derive(Debug)]
struct Owned {
    owner: u64,
    path: Box<str>,
    route: Box<str>,
    code: u32,
    peer: Option<SocketAddr>,
}

impl Owned {
    fn new(key: Key<'_>) -> Self {
        Self { owner: key.owner, path: key.path.into(), route: key.route.into(), code: key.code, peer: key.peer }
    }

    fn is(&self, key: &Key<'_>) -> bool {
        self.owner == key.owner
            && self.code == key.code
            && self.peer == key.peer
            && mesh_core::text::eq(&self.path, key.path)
            && mesh_core::text::eq(&self.route, key.route)
    }
}

/// A multiply-rotate hash (rustc's FxHash): fast on the few words a key has; the table holds no input an
/// attacker chooses freely beyond paths, and a collision costs only a longer bucket.
struct Fx(u64);

impl Fx {
    fn word(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn bytes(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.word(u64::from_le_bytes(chunk.try_into().unwrap_or_default()));
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.word(u64::from_le_bytes(tail) ^ (bytes.len() as u64) << 56);
    }
}

/// The table's hasher: the keys are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// One thread's bound series of one kind.
#[derive(Debug)]
pub(super) struct Cache<V> {
    buckets: HashMap<u64, Vec<(Owned, V)>, BuildHasherDefault<Prehashed>>,
    len: usize,
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Self { buckets: HashMap::default(), len: 0 }
    }
}

impl<V> Cache<V> {
    fn with<R>(&mut self, key: Key<'_>, bind: impl FnOnce() -> V, record: impl FnOnce(&V) -> R) -> R {
        let hash = key.hash();
        if let Some(bucket) = self.buckets.get(&hash)
            && let Some((_, value)) = bucket.iter().find(|(owned, _)| owned.is(&key))
        {
            return record(value);
        }
        if self.len >= CAPACITY {
            self.buckets.clear();
            self.len = 0;
        }
        let bucket = self.buckets.entry(hash).or_default();
        bucket.push((Owned::new(key), bind()));
        self.len += 1;
        let (_, value) = bucket.last().expect("just pushed");
        record(value)
    }
}

/// Counters (attempts and server calls started).
pub(super) type Counters = RefCell<Cache<BoundCounter<u64>>>;
/// A duration and a size histogram recorded together (an attempt's end, a server call's end).
pub(super) type Sized = RefCell<Cache<(BoundHistogram<f64>, BoundHistogram<u64>)>>;
/// Duration histograms (a call's end).
pub(super) type Durations = RefCell<Cache<BoundHistogram<f64>>>;

thread_local! {
    pub(super) static COUNTERS: Counters = RefCell::default();
    pub(super) static SIZED: Sized = RefCell::default();
    pub(super) static DURATIONS: Durations = RefCell::default();
}

/// Records into `key`'s series of `cache`, binding it first (`bind`) when this thread has not yet. A thread
/// tearing down its caches, or a recording re-entered from `bind`, records through a series bound for the
/// one measurement.
pub(super) fn with<V: 'static>(
    cache: &'static LocalKey<RefCell<Cache<V>>>,
    key: Key<'_>,
    bind: impl FnOnce() -> V,
    record: impl FnOnce(&V),
) {
    let mut measurement = Some((bind, record));
    let _ = cache.try_with(|cache| {
        if let Ok(mut cache) = cache.try_borrow_mut()
            && let Some((bind, record)) = measurement.take()
        {
            cache.with(key, bind, record);
        }
    });
    if let Some((bind, record)) = measurement {
        record(&bind());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(path: &str, code: u32, peer: Option<SocketAddr>) -> Key<'_> {
        Key { owner: 7, path, route: "", code, peer }
    }

    #[test]
    fn a_series_is_bound_once_per_thread_and_told_apart_by_every_part() {
        let mut cache = Cache::<u32>::default();
        let mut binds = 0;
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let keys = [
            key("/a/B", 0, None),
            key("/a/B", 0, Some(peer)),
            key("/a/B", 14, Some(peer)),
            key("/a/C", 0, None),
            Key { route: "r", ..key("/a/B", 0, None) },
            Key { owner: 8, ..key("/a/B", 0, None) },
        ];
        for round in 0..3 {
            for (i, k) in keys.iter().enumerate() {
                let seen = cache.with(
                    *k,
                    || {
                        binds += 1;
                        i as u32
                    },
                    |v| *v,
                );
                assert_eq!(seen, i as u32, "round {round}: key {k:?} found another series");
            }
        }
        assert_eq!(binds, keys.len(), "each series is bound once");
    }

    #[test]
    fn a_full_cache_starts_over() {
        let mut cache = Cache::<usize>::default();
        let paths: Vec<String> = (0..=CAPACITY).map(|i| format!("/p/{i}")).collect();
        for (i, p) in paths.iter().enumerate() {
            cache.with(key(p, 0, None), || i, |_| ());
        }
        assert_eq!(cache.len, 1, "the series past the capacity started a new cache");
        let mut rebound = false;
        cache.with(key(&paths[0], 0, None), || 0, |_| ());
        cache.with(
            key(&paths[1], 0, None),
            || {
                rebound = true;
                1
            },
            |_| (),
        );
        assert!(rebound, "an evicted series is bound again");
    }
}
