//! Load-balancing algorithms as pure, deterministic pickers.
//!
//! Nothing here performs I/O or reads a clock: time is passed in as a
//! [`Duration`](std::time::Duration) since an arbitrary epoch and randomness
//! comes only from a caller-supplied [`Random`] source (use [`SplitMix64`] for a
//! seedable one), so every picker is reproducible in tests.
//!
//! | Picker | What it does | Semantics follow |
//! |---|---|---|
//! | [`RoundRobin`] | rotates over `0..n` | Envoy `ROUND_ROBIN` (unweighted) |
//! | [`WeightedRoundRobin`] | smooth weighted rotation; weights change without resetting | Envoy's earliest-deadline-first scheduler |
//! | [`LeastRequest`] | fewest in-flight requests among N random candidates, full scan when N covers every host | Envoy `LEAST_REQUEST` |
//! | [`p2c_by`] | power of two choices over an arbitrary cost | Mitzenmacher; tower `p2c` |
//! | [`PeakEwma`] | latency estimator that jumps to peaks and decays slowly; use its [`PeakEwma::cost`] with [`p2c_by`] | Finagle / Linkerd peak EWMA |
//! | [`RingHash`] | consistent hashing on a ring of xxHash64 points | Envoy `RING_HASH` (Ketama-like) |
//! | [`priority_load`], [`pick_priority`] | splits traffic across priority levels by health | Envoy priority levels and overprovisioning factor |
//! | [`locality_effective_weights`] | scales locality weights by health | Envoy locality-weighted load balancing |

mod least_request;
mod locality;
mod peak_ewma;
mod ring_hash;
mod round_robin;
mod weighted;

pub use least_request::{LeastRequest, p2c_by};
pub use locality::{
    DEFAULT_OVERPROVISIONING_FACTOR, LocalityHealth, PriorityHealth, locality_effective_weights, pick_priority, pick_weighted,
    priority_load,
};
pub use peak_ewma::PeakEwma;
pub use ring_hash::{MAX_RING_SIZE, RingHash, RingHashConfig, RingHashError, hash_key};
pub use round_robin::RoundRobin;
pub use weighted::WeightedRoundRobin;

/// Source of randomness for pickers.
pub trait Random {
    /// Returns the next uniformly distributed 64-bit value.
    fn next_u64(&mut self) -> u64;

    /// Returns a value uniform in `0..n`; `n` must be greater than zero.
    ///
    /// Uses Lemire's multiply-and-shift with rejection, so the result is
    /// unbiased for every `n`.
    fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0, "Random::below called with n == 0");
        let n = n as u64;
        let mut product = u128::from(self.next_u64()) * u128::from(n);
        if (product as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (product as u64) < threshold {
                product = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (product >> 64) as usize
    }
}

/// SplitMix64 generator: deterministic, seedable.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// Creates a generator whose output is fully determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }
}

impl Random for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_deterministic_per_seed() {
        let (mut a, mut b, mut c) = (SplitMix64::new(7), SplitMix64::new(7), SplitMix64::new(8));
        let xs: Vec<u64> = (0..16).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..16).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..16).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn below_stays_in_range_and_is_roughly_uniform() {
        let mut rng = SplitMix64::new(1);
        assert!((0..1000).all(|_| rng.below(1) == 0));
        let mut counts = [0u32; 7];
        for _ in 0..70_000 {
            counts[rng.below(7)] += 1;
        }
        assert!(counts.iter().all(|&c| (9_500..10_500).contains(&c)), "{counts:?}");
        assert!((0..1000).all(|_| rng.below(usize::MAX) < usize::MAX));
    }
}
