//! Envoy priority levels and locality-weighted selection.

use super::Random;

/// One priority level's health: counts of healthy and total hosts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PriorityHealth {
    /// Hosts currently eligible for traffic.
    pub healthy: u32,
    /// All hosts in the level.
    pub total: u32,
}

/// Envoy overprovisioning factor default: 140 (percent, i.e. 1.4).
pub const DEFAULT_OVERPROVISIONING_FACTOR: u32 = 140;

/// `min(100, factor * healthy / total)` in whole percent (integer division, as in Envoy).
fn health_percent(healthy: u32, total: u32, overprovisioning_factor: u32) -> u64 {
    match total {
        0 => 0,
        _ => (u64::from(overprovisioning_factor) * u64::from(healthy) / u64::from(total)).min(100),
    }
}

/// Envoy's priority load: `health_i = min(100, factor * healthy_i / total_i)`
/// percent; priority 0 gets `min(100, health_0)`, priority 1
/// `min(remaining, health_1)`, and so on. If the health sum is below 100 the
/// shares are normalized by it (`health_i * 100 / sum`) so they still add up to
/// 100, and any rounding remainder goes to the first priority with non-zero
/// health. If no level has any health, all load goes to priority 0 (Envoy's
/// panic mode, which spreads load by host count, is not modelled here).
///
/// Returns per-priority percentages summing to exactly 100 (empty for no levels).
pub fn priority_load(levels: &[PriorityHealth], overprovisioning_factor: u32) -> Vec<u32> {
    let health: Vec<u64> = levels.iter().map(|level| health_percent(level.healthy, level.total, overprovisioning_factor)).collect();
    let mut load = vec![0; levels.len()];
    let Some(first_healthy) = health.iter().position(|&h| h > 0) else {
        if let Some(p0) = load.first_mut() {
            *p0 = 100;
        }
        return load;
    };
    let normalized_total = health.iter().sum::<u64>().min(100);
    let mut remaining = 100;
    for (share, &h) in load.iter_mut().zip(&health) {
        let assigned = (h * 100 / normalized_total).min(remaining);
        remaining -= assigned;
        *share = assigned as u32;
    }
    load[first_healthy] += remaining as u32;
    load
}

/// Chooses a priority given loads (percent) and a random value: walks the
/// cumulative sums until they exceed `r % 100`. If the loads do not sum to
/// 100, `r % sum` is used instead; `None` if they sum to 0.
pub fn pick_priority<R: Random>(load: &[u32], rng: &mut R) -> Option<usize> {
    let total: u64 = load.iter().map(|&l| u64::from(l)).sum();
    if total == 0 {
        return None;
    }
    let r = rng.next_u64() % total;
    let mut cumulative = 0;
    load.iter().position(|&l| {
        cumulative += u64::from(l);
        r < cumulative
    })
}

/// One locality's configured weight and host health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalityHealth {
    /// Configured locality weight.
    pub weight: u32,
    /// Hosts currently eligible for traffic.
    pub healthy: u32,
    /// All hosts in the locality.
    pub total: u32,
}

/// Envoy locality-weighted LB: effective weight of a locality =
/// `locality_weight * min(1, factor/100 * healthy/total)`.
///
/// Returns one weight per input, in order; localities with effective weight 0
/// (no weight, no healthy hosts or no hosts) must be excluded from selection.
pub fn locality_effective_weights(localities: &[LocalityHealth], overprovisioning_factor: u32) -> Vec<f64> {
    localities
        .iter()
        .map(|l| match l.total {
            0 => 0.0,
            total => {
                let health = f64::from(overprovisioning_factor) / 100.0 * f64::from(l.healthy) / f64::from(total);
                f64::from(l.weight) * health.min(1.0)
            }
        })
        .collect()
}

/// Chooses an index with probability proportional to its weight (the locality pick of Envoy's locality-weighted
/// LB, over [`locality_effective_weights`]); `None` when no weight is above zero.
pub fn pick_weighted<R: Random>(weights: impl Iterator<Item = f64> + Clone, rng: &mut R) -> Option<usize> {
    let total: f64 = weights.clone().filter(|w| *w > 0.0).sum();
    if total <= 0.0 {
        return None;
    }
    // 53 random bits: a uniform f64 in [0, 1).
    let mut r = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
    let mut last = None;
    for (i, w) in weights.enumerate().filter(|(_, w)| *w > 0.0) {
        if r < w {
            return Some(i);
        }
        r -= w;
        last = Some(i);
    }
    // Rounding left `r` just past the end: the last positive weight.
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::SplitMix64;

    fn levels(healthy_percent: &[u32]) -> Vec<PriorityHealth> {
        healthy_percent.iter().map(|&healthy| PriorityHealth { healthy, total: 100 }).collect()
    }

    fn load(healthy_percent: &[u32]) -> Vec<u32> {
        priority_load(&levels(healthy_percent), DEFAULT_OVERPROVISIONING_FACTOR)
    }

    #[test]
    fn envoy_priority_level_examples() {
        // The table from Envoy's "Priority levels" documentation.
        assert_eq!(load(&[100, 100]), [100, 0]);
        assert_eq!(load(&[72, 72]), [100, 0]);
        assert_eq!(load(&[71, 71]), [99, 1]);
        assert_eq!(load(&[50, 50]), [70, 30]);
        assert_eq!(load(&[25, 100]), [35, 65]);
        assert_eq!(load(&[25, 25]), [50, 50]);
        assert_eq!(load(&[0, 100]), [0, 100]);
        assert_eq!(load(&[0, 0]), [100, 0]);
    }

    #[test]
    fn three_levels_and_normalization() {
        assert_eq!(load(&[20, 20, 100]), [28, 28, 44]);
        assert_eq!(load(&[0, 0, 10]), [0, 0, 100]);
        // 3 healthy of 7 is 60% health, 1 of 7 is 20%: normalized 75/25.
        let odd = [PriorityHealth { healthy: 3, total: 7 }, PriorityHealth { healthy: 1, total: 7 }];
        assert_eq!(priority_load(&odd, 140), [75, 25]);
        // Rounding remainders go to the first healthy level: 50 * 100 / 70 = 71, 20 * 100 / 70 = 28.
        let uneven = [PriorityHealth { healthy: 1, total: 2 }, PriorityHealth { healthy: 1, total: 5 }];
        assert_eq!(priority_load(&uneven, 100), [72, 28]);
    }

    #[test]
    fn overprovisioning_factor_and_edge_cases() {
        assert_eq!(priority_load(&levels(&[50, 100]), 100), [50, 50]);
        assert_eq!(priority_load(&levels(&[50, 100]), 200), [100, 0]);
        assert_eq!(priority_load(&[], 140), Vec::<u32>::new());
        assert_eq!(priority_load(&[PriorityHealth::default()], 140), [100]);
        let empty_p0 = [PriorityHealth { healthy: 0, total: 0 }, PriorityHealth { healthy: 3, total: 3 }];
        assert_eq!(priority_load(&empty_p0, 140), [0, 100]);
        let huge = [PriorityHealth { healthy: u32::MAX, total: u32::MAX }];
        assert_eq!(priority_load(&huge, u32::MAX), [100]);
    }

    #[test]
    fn picking_follows_the_load() {
        let mut rng = SplitMix64::new(11);
        assert_eq!(pick_priority(&[], &mut rng), None);
        assert_eq!(pick_priority(&[0, 0], &mut rng), None);
        assert!((0..100).all(|_| pick_priority(&[0, 100, 0], &mut rng) == Some(1)));
        let mut counts = [0u32; 3];
        for _ in 0..10_000 {
            counts[pick_priority(&[70, 30, 0], &mut rng).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!((6_700..7_300).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn weighted_picks_follow_the_weights_and_skip_zeros() {
        let mut rng = SplitMix64::new(7);
        let weights = [1.0, 0.0, 2.0, 1.0];
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[pick_weighted(weights.iter().copied(), &mut rng).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        for (i, want) in [(0, 0.25), (2, 0.5), (3, 0.25)] {
            let share = f64::from(counts[i]) / 40_000.0;
            assert!((share - want).abs() < 0.01, "index {i}: {share}");
        }
        assert_eq!(pick_weighted([0.0, 0.0].into_iter(), &mut rng), None);
        assert_eq!(pick_weighted(std::iter::empty(), &mut rng), None);
    }

    #[test]
    fn locality_weights_scale_with_health() {
        let locality = |weight, healthy, total| LocalityHealth { weight, healthy, total };
        let weights = locality_effective_weights(
            &[locality(1, 10, 10), locality(2, 5, 10), locality(3, 8, 10), locality(4, 0, 10), locality(5, 0, 0), locality(0, 10, 10)],
            DEFAULT_OVERPROVISIONING_FACTOR,
        );
        let expected = [1.0, 1.4, 3.0, 0.0, 0.0, 0.0];
        assert!(weights.iter().zip(expected).all(|(w, e)| (w - e).abs() < 1e-9), "{weights:?}");
        // Without overprovisioning, health scales the weight linearly.
        let weights = locality_effective_weights(&[locality(2, 5, 10), locality(3, 8, 10)], 100);
        assert!((weights[0] - 1.0).abs() < 1e-9 && (weights[1] - 2.4).abs() < 1e-9, "{weights:?}");
    }
}
