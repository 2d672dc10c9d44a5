//! Envoy `RING_HASH` consistent hashing (Ketama-like).

use std::fmt::{Display, Write};

use xxhash_rust::xxh64::xxh64;

/// Largest ring Envoy accepts: 8M entries.
pub const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

/// Envoy `RingHashLbConfig` bounds: `minimum_ring_size` default 1024,
/// `maximum_ring_size` default 8M (8_388_608); max allowed 8M.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingHashConfig {
    /// Lower bound on the number of ring entries (more entries, finer balance).
    pub minimum_ring_size: u64,
    /// Upper bound on the number of ring entries.
    pub maximum_ring_size: u64,
}

impl Default for RingHashConfig {
    fn default() -> Self {
        Self { minimum_ring_size: 1024, maximum_ring_size: MAX_RING_SIZE }
    }
}

impl RingHashConfig {
    /// Checks `1 <= minimum_ring_size <= maximum_ring_size <= 8M`.
    pub fn validate(&self) -> Result<(), RingHashError> {
        let (min, max) = (self.minimum_ring_size, self.maximum_ring_size);
        if max > MAX_RING_SIZE {
            Err(RingHashError::TooLarge { max, limit: MAX_RING_SIZE })
        } else if min == 0 || min > max {
            Err(RingHashError::InvalidBounds { min, max })
        } else {
            Ok(())
        }
    }
}

/// Invalid [`RingHashConfig`].
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingHashError {
    /// The minimum is zero or larger than the maximum.
    #[error("invalid ring hash bounds: need 1 <= minimum_ring_size ({min}) <= maximum_ring_size ({max})")]
    InvalidBounds {
        /// Configured `minimum_ring_size`.
        min: u64,
        /// Configured `maximum_ring_size`.
        max: u64,
    },
    /// The maximum exceeds what Envoy allows.
    #[error("ring hash maximum_ring_size {max} exceeds the limit of {limit}")]
    TooLarge {
        /// Configured `maximum_ring_size`.
        max: u64,
        /// Largest allowed value ([`MAX_RING_SIZE`]).
        limit: u64,
    },
}

/// A consistent-hash ring following Envoy's `RING_HASH` load balancer.
///
/// Each host is placed on the ring at `xxh64("{key}_{i}", 0)` for
/// `i = 0, 1, ...`, with a number of entries proportional to its weight; a
/// request hash is served by the first entry at or after it, wrapping around.
#[derive(Clone, Debug)]
pub struct RingHash<K> {
    /// `(hash, index into keys)`, sorted by hash.
    ring: Vec<(u64, usize)>,
    keys: Vec<K>,
}

impl<K: Clone + Display> RingHash<K> {
    /// Builds the ring from `(key, weight)` pairs; zero-weight keys are
    /// skipped and empty input gives an empty ring.
    ///
    /// As in Envoy, weights are normalized to `weight / total` and scaled by
    /// `scale = min(ceil(min_normalized_weight * minimum_ring_size) /
    /// min_normalized_weight, maximum_ring_size)`, so the lightest host gets a
    /// whole number of entries and the ring holds about `scale` entries. Hosts
    /// are walked in input order keeping running sums, so each host gets
    /// `normalized_weight * scale` entries rounded up or down (never more than
    /// one entry from exact) and the ring has `ceil(scale)` entries in total.
    pub fn build(items: &[(K, u32)], config: &RingHashConfig) -> Result<Self, RingHashError> {
        config.validate()?;
        let hosts: Vec<_> = items.iter().filter(|(_, weight)| *weight > 0).collect();
        let total: f64 = hosts.iter().map(|(_, weight)| f64::from(*weight)).sum();
        let Some(min_weight) = hosts.iter().map(|(_, weight)| *weight).min() else {
            return Ok(Self { ring: Vec::new(), keys: Vec::new() });
        };
        let min_normalized = f64::from(min_weight) / total;
        let scale = ((min_normalized * config.minimum_ring_size as f64).ceil() / min_normalized).min(config.maximum_ring_size as f64);

        let mut ring = Vec::with_capacity(scale.ceil() as usize);
        let mut keys = Vec::with_capacity(hosts.len());
        let (mut placed, mut target) = (0.0, 0.0);
        let mut label = String::new();
        for (key, weight) in hosts {
            target += scale * (f64::from(*weight) / total);
            label.clear();
            // Writing into a `String` only fails if `K`'s `Display` does.
            let _ = write!(label, "{key}_");
            let prefix = label.len();
            let mut i = 0u64;
            while placed < target {
                label.truncate(prefix);
                let _ = write!(label, "{i}");
                ring.push((xxh64(label.as_bytes(), 0), keys.len()));
                i += 1;
                placed += 1.0;
            }
            keys.push(key.clone());
        }
        ring.sort_by_key(|&(hash, _)| hash);
        Ok(Self { ring, keys })
    }

    /// The first ring entry with hash `>= hash`, wrapping around. `None` if empty.
    pub fn pick(&self, hash: u64) -> Option<&K> {
        let at = self.ring.partition_point(|&(entry, _)| entry < hash);
        let &(_, key) = self.ring.get(at).or_else(|| self.ring.first())?;
        Some(&self.keys[key])
    }

    /// Number of entries on the ring.
    pub fn ring_size(&self) -> usize {
        self.ring.len()
    }
}

/// xxh64 with seed 0 of the bytes (Envoy's hash for header values).
pub fn hash_key(bytes: &[u8]) -> u64 {
    xxh64(bytes, 0)
}

impl<K> RingHash<K> {
    /// Walks the ring from `hash` (first entry `>= hash`, wrapping around)
    /// and returns the first key accepted by `usable`, visiting each ring
    /// entry at most once. This is gRPC's ring-hash pick: skip endpoints that
    /// are not ready and take the next one on the ring.
    pub fn pick_where(&self, hash: u64, mut usable: impl FnMut(&K) -> bool) -> Option<&K> {
        let at = self.ring.partition_point(|&(entry, _)| entry < hash);
        let (after, before) = self.ring.split_at(at);
        before.iter().chain(after).map(|&(_, key)| &self.keys[key]).find(|key| usable(key))
    }

    /// The same ring with every key mapped through `f` (positions unchanged).
    pub fn map_keys<T>(self, f: impl FnMut(K) -> T) -> RingHash<T> {
        RingHash { ring: self.ring, keys: self.keys.into_iter().map(f).collect() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::{Random, SplitMix64};

    fn ring(items: &[(&'static str, u32)]) -> RingHash<&'static str> {
        RingHash::build(items, &RingHashConfig::default()).unwrap()
    }

    fn random_hashes(n: usize) -> Vec<u64> {
        let mut rng = SplitMix64::new(42);
        (0..n).map(|_| rng.next_u64()).collect()
    }

    fn share(ring: &RingHash<&str>, hashes: &[u64], key: &str) -> f64 {
        hashes.iter().filter(|&&h| ring.pick(h) == Some(&key)).count() as f64 / hashes.len() as f64
    }

    #[test]
    fn config_validation() {
        assert_eq!(RingHashConfig::default().validate(), Ok(()));
        let config = |min, max| RingHashConfig { minimum_ring_size: min, maximum_ring_size: max };
        assert_eq!(config(1, 1).validate(), Ok(()));
        assert_eq!(config(0, 10).validate(), Err(RingHashError::InvalidBounds { min: 0, max: 10 }));
        assert_eq!(config(11, 10).validate(), Err(RingHashError::InvalidBounds { min: 11, max: 10 }));
        let too_large = config(1024, MAX_RING_SIZE + 1).validate().unwrap_err();
        assert_eq!(too_large, RingHashError::TooLarge { max: MAX_RING_SIZE + 1, limit: MAX_RING_SIZE });
        assert_eq!(too_large.to_string(), "ring hash maximum_ring_size 8388609 exceeds the limit of 8388608");
        assert!(RingHash::build(&[("a", 1)], &config(11, 10)).is_err());
    }

    #[test]
    fn ring_sizes_follow_envoy_scaling() {
        assert_eq!(ring(&[("a", 1)]).ring_size(), 1024);
        assert_eq!(ring(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]).ring_size(), 1024);
        // ceil(1024 / 3) = 342 entries for each of three equal hosts.
        assert_eq!(ring(&[("a", 1), ("b", 1), ("c", 1)]).ring_size(), 1026);
        // The lightest host gets ceil(1024 / 4) = 256 entries, the other three times that.
        assert_eq!(ring(&[("a", 1), ("b", 3)]).ring_size(), 1024);
        let capped = RingHashConfig { minimum_ring_size: 10, maximum_ring_size: 100 };
        assert_eq!(RingHash::build(&[("a", 1), ("b", 999)], &capped).unwrap().ring_size(), 100);
    }

    #[test]
    fn empty_and_zero_weight() {
        let empty = ring(&[]);
        assert_eq!((empty.ring_size(), empty.pick(7)), (0, None));
        assert_eq!(ring(&[("a", 0)]).pick(7), None);
        let r = ring(&[("a", 0), ("b", 2)]);
        assert!(random_hashes(100).iter().all(|&h| r.pick(h) == Some(&"b")));
    }

    #[test]
    fn pick_is_first_entry_at_or_after_hash_and_wraps() {
        let r = ring(&[("a", 1), ("b", 1)]);
        let (first, last) = (r.ring[0], r.ring[r.ring_size() - 1]);
        assert_eq!(r.pick(first.0), Some(&r.keys[first.1]));
        assert_eq!(r.pick(0), Some(&r.keys[first.1]));
        assert_eq!(r.pick(last.0), Some(&r.keys[last.1]));
        if let Some(past_last) = last.0.checked_add(1) {
            assert_eq!(r.pick(past_last), Some(&r.keys[first.1]));
            assert_eq!(r.pick(u64::MAX), Some(&r.keys[first.1]));
        }
    }

    #[test]
    fn same_hash_same_key() {
        let r = ring(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)]);
        let rebuilt = ring(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)]);
        for h in random_hashes(1000) {
            assert_eq!(r.pick(h), r.pick(h));
            assert_eq!(r.pick(h), rebuilt.pick(h));
        }
        assert_eq!(r.pick(hash_key(b"user-1")), rebuilt.pick(hash_key(b"user-1")));
    }

    #[test]
    fn weights_set_the_share() {
        let r = ring(&[("light", 1), ("heavy", 3)]);
        let hashes = random_hashes(10_000);
        let light = share(&r, &hashes, "light");
        assert!((0.20..0.30).contains(&light), "{light}");
        assert!((share(&r, &hashes, "heavy") - (1.0 - light)).abs() < 1e-9);
    }

    #[test]
    fn removing_a_host_moves_its_keys_and_few_others() {
        let hosts = [("a", 1), ("b", 1), ("c", 1), ("d", 1)];
        let (before, after) = (ring(&hosts), ring(&hosts[..3]));
        let hashes = random_hashes(10_000);
        let (on_d, others): (Vec<u64>, Vec<u64>) = hashes.iter().partition(|&&h| before.pick(h) == Some(&"d"));
        assert!((2_000..3_000).contains(&on_d.len()), "{}", on_d.len());
        assert!(on_d.iter().all(|&h| after.pick(h) != Some(&"d")));
        // Envoy rebuilds the ring at the minimum size, so each remaining host
        // grows from 256 to 342 entries and the new entries capture some other
        // keys too: about 10% of all keys move on top of the removed quarter.
        let kept = others.iter().filter(|&&h| before.pick(h) == after.pick(h)).count();
        assert!(kept as f64 / others.len() as f64 > 0.8, "{kept}/{}", others.len());
        let moved = (hashes.len() - kept) as f64 / hashes.len() as f64;
        assert!((0.25..0.45).contains(&moved), "{moved}");
    }

    #[test]
    fn ring_without_rescaling_is_perfectly_stable() {
        // With `minimum_ring_size = 1` each host gets weight/min_weight entries,
        // so while the lightest host stays, removals never move other keys.
        let config = RingHashConfig { minimum_ring_size: 1, maximum_ring_size: MAX_RING_SIZE };
        let hosts = [("anchor", 1), ("a", 300), ("b", 300), ("c", 300)];
        let before = RingHash::build(&hosts, &config).unwrap();
        let after = RingHash::build(&hosts[..3], &config).unwrap();
        assert_eq!((before.ring_size(), after.ring_size()), (901, 601));
        for h in random_hashes(10_000) {
            if before.pick(h) != Some(&"c") {
                assert_eq!(before.pick(h), after.pick(h));
            }
        }
    }
}
