//! Envoy `LEAST_REQUEST` and generic power-of-two-choices.

use super::Random;

/// Picks the index with the fewest in-flight requests among `choice_count`
/// random candidates (default 2). If all loads are equal, the pick is still
/// random.
///
/// Follows Envoy's unweighted `LEAST_REQUEST`: candidates are sampled with
/// replacement and the first of equally loaded candidates wins; when
/// `choice_count >= n` every index is scanned instead, with ties among the
/// least loaded broken uniformly at random.
#[derive(Clone, Debug)]
pub struct LeastRequest {
    choice_count: u32,
}

impl Default for LeastRequest {
    fn default() -> Self {
        Self { choice_count: 2 }
    }
}

impl LeastRequest {
    /// Creates a picker sampling `choice_count` candidates, clamped to at least 2.
    pub fn new(choice_count: u32) -> Self {
        Self { choice_count: choice_count.max(2) }
    }

    /// Number of candidates sampled per pick.
    pub fn choice_count(&self) -> u32 {
        self.choice_count
    }

    /// Picks an index into `loads` (in-flight requests per host), or `None` if
    /// `loads` is empty.
    pub fn pick<R: Random>(&self, loads: &[u64], rng: &mut R) -> Option<usize> {
        let n = loads.len();
        if n == 0 {
            return None;
        }
        if self.choice_count as usize >= n {
            return Some(full_scan(loads, rng));
        }
        let mut best = rng.below(n);
        for _ in 1..self.choice_count {
            let candidate = rng.below(n);
            if loads[candidate] < loads[best] {
                best = candidate;
            }
        }
        Some(best)
    }
}

/// Least-loaded index of a non-empty slice; ties are resolved by reservoir
/// sampling so each tied index is equally likely.
fn full_scan<R: Random>(loads: &[u64], rng: &mut R) -> usize {
    let (mut best, mut ties) = (0, 1);
    for (i, &load) in loads.iter().enumerate().skip(1) {
        if load < loads[best] {
            (best, ties) = (i, 1);
        } else if load == loads[best] {
            ties += 1;
            if rng.below(ties) == 0 {
                best = i;
            }
        }
    }
    best
}

/// Generic power-of-two-choices: picks two distinct random indices in `0..n`
/// and returns the one with the lower `cost` (the first on a tie). Returns 0
/// when `n == 1` and `None` when `n == 0`.
pub fn p2c_by<R: Random>(n: usize, rng: &mut R, cost: impl Fn(usize) -> f64) -> Option<usize> {
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = rng.below(n);
            let b = (a + 1 + rng.below(n - 1)) % n;
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::SplitMix64;

    fn histogram(picks: impl Iterator<Item = usize>, n: usize) -> Vec<u32> {
        let mut counts = vec![0; n];
        picks.for_each(|i| counts[i] += 1);
        counts
    }

    #[test]
    fn empty_and_single() {
        let mut rng = SplitMix64::new(1);
        assert_eq!(LeastRequest::default().pick(&[], &mut rng), None);
        assert_eq!(LeastRequest::default().pick(&[9], &mut rng), Some(0));
        assert_eq!(p2c_by(0, &mut rng, |_| 0.0), None);
        assert_eq!(p2c_by(1, &mut rng, |_| 0.0), Some(0));
    }

    #[test]
    fn choice_count_is_clamped() {
        assert_eq!(LeastRequest::new(0).choice_count(), 2);
        assert_eq!(LeastRequest::new(5).choice_count(), 5);
        assert_eq!(LeastRequest::default().choice_count(), 2);
    }

    #[test]
    fn full_scan_always_finds_the_minimum_and_shares_ties() {
        let mut rng = SplitMix64::new(2);
        let lr = LeastRequest::new(4);
        assert!((0..1000).all(|_| lr.pick(&[5, 3, 9, 4], &mut rng) == Some(1)));
        let counts = histogram((0..9000).map(|_| lr.pick(&[2, 7, 2, 2], &mut rng).unwrap()), 4);
        assert_eq!(counts[1], 0);
        assert!([0, 2, 3].iter().all(|&i| (2_700..3_300).contains(&counts[i])), "{counts:?}");
    }

    #[test]
    fn equal_loads_are_spread_randomly() {
        let mut rng = SplitMix64::new(3);
        let lr = LeastRequest::default();
        let counts = histogram((0..10_000).map(|_| lr.pick(&[1; 10], &mut rng).unwrap()), 10);
        assert!(counts.iter().all(|&c| (800..1_200).contains(&c)), "{counts:?}");
    }

    #[test]
    fn sampling_prefers_lightly_loaded_hosts() {
        let mut rng = SplitMix64::new(4);
        let loads = [10, 10, 10, 10, 10, 10, 10, 10, 10, 0];
        let counts = histogram((0..10_000).map(|_| LeastRequest::default().pick(&loads, &mut rng).unwrap()), 10);
        // P(idle host among two samples with replacement) = 1 - 0.9^2 = 19%.
        assert!((1_700..2_100).contains(&counts[9]), "{counts:?}");
        let counts = histogram((0..10_000).map(|_| LeastRequest::new(5).pick(&loads, &mut rng).unwrap()), 10);
        // 1 - 0.9^5 = 41%.
        assert!((3_900..4_300).contains(&counts[9]), "{counts:?}");
    }

    #[test]
    fn p2c_picks_distinct_candidates() {
        let mut rng = SplitMix64::new(5);
        // With two hosts both are always compared, so the cheaper always wins.
        assert!((0..1000).all(|_| p2c_by(2, &mut rng, |i| [2.0, 1.0][i]) == Some(1)));
        // The most expensive of n can never win; the cheapest wins 2/n of the time.
        let costs = [3.0, 1.0, 2.0, 4.0];
        let counts = histogram((0..12_000).map(|_| p2c_by(4, &mut rng, |i| costs[i]).unwrap()), 4);
        assert_eq!(counts[3], 0);
        assert!((5_700..6_300).contains(&counts[1]), "{counts:?}");
    }
}
