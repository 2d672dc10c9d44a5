//! Adaptive concurrency, Envoy's gradient controller: the arithmetic, with time and samples as inputs.
//!
//! - The no-load latency (minRTT) is the configured percentile of `requests` calls made while the limit is
//!   held at `min_concurrency` (or a fixed value). A measurement starts at once and then every interval; the
//!   limit from before it comes back when it ends.
//! - Every update interval, the interval's latency (the same percentile of its samples) gives a gradient,
//!   `(minRTT × (1 + buffer)) / sampleRTT`, kept within 0.5 and 2; the new limit is the old one times the
//!   gradient, plus its square root as headroom for bursts, kept within `min_limit` and `max_limit`.
//!
//! So the limit grows while latency stays near the no-load latency, and halves at most per interval once
//! calls queue.

use std::time::Duration;

use crate::policy::{AdaptiveConcurrency, MinRtt};

/// Samples kept per interval at most; later ones in the same interval are dropped (the percentile of the
/// first ones stands for the interval).
pub const MAX_SAMPLES: usize = 4096;

/// One cluster's gradient controller.
#[derive(Clone, Debug)]
pub struct Gradient {
    config: AdaptiveConcurrency,
    limit: u32,
    min_rtt: Option<Duration>,
    /// While measuring minRTT: the limit to restore after.
    measuring: Option<u32>,
    samples: Vec<Duration>,
}

impl Gradient {
    /// A controller that starts by measuring minRTT (or at `min_limit` with a fixed one).
    pub fn new(config: AdaptiveConcurrency) -> Self {
        let fixed = match config.min_rtt {
            MinRtt::Fixed(rtt) => Some(rtt),
            MinRtt::Sampled { .. } => None,
        };
        let limit = config.min_limit.clamp(1, config.max_limit.max(1));
        let mut gradient = Self { config, limit, min_rtt: fixed, measuring: None, samples: Vec::new() };
        if fixed.is_none() {
            gradient.start_measuring();
        }
        gradient
    }

    /// The limit on calls in flight now.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The no-load latency, once known.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// Whether minRTT is being measured.
    pub fn measuring(&self) -> bool {
        self.measuring.is_some()
    }

    /// Starts a minRTT measurement: the limit drops to `min_concurrency` until it ends. Does nothing with a
    /// fixed minRTT or while measuring.
    pub fn start_measuring(&mut self) {
        if self.measuring.is_some() || matches!(self.config.min_rtt, MinRtt::Fixed(_)) {
            return;
        }
        self.measuring = Some(self.limit);
        self.limit = self.config.min_concurrency.max(1);
        self.samples.clear();
    }

    /// Records one call's latency. Returns `true` when it ended a minRTT measurement.
    pub fn record(&mut self, latency: Duration) -> bool {
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(latency);
        }
        let (Some(restore), MinRtt::Sampled { requests, .. }) = (self.measuring, &self.config.min_rtt) else { return false };
        if self.samples.len() < (*requests).max(1) as usize {
            return false;
        }
        self.min_rtt = Some(percentile(&mut self.samples, self.config.percentile));
        self.samples.clear();
        self.measuring = None;
        self.limit = restore;
        true
    }

    /// Ends an update interval: recomputes the limit from its samples, and returns it. Nothing changes while
    /// measuring minRTT or after an interval with no samples.
    pub fn update(&mut self) -> u32 {
        let Some(min_rtt) = self.min_rtt.filter(|_| self.measuring.is_none() && !self.samples.is_empty()) else {
            return self.limit;
        };
        let sample_rtt = percentile(&mut self.samples, self.config.percentile);
        self.samples.clear();
        let tolerated = min_rtt.as_secs_f64() * (1.0 + self.config.buffer);
        let gradient = (tolerated / sample_rtt.as_secs_f64().max(1e-9)).clamp(0.5, 2.0);
        let limit = f64::from(self.limit) * gradient;
        let next = (limit + limit.sqrt()).floor();
        let (low, high) = (self.config.min_limit.max(1), self.config.max_limit.max(1));
        self.limit = (next.min(f64::from(high)) as u32).clamp(low.min(high), high);
        self.limit
    }
}

/// The `p` percentile (0 to 1) of `samples`, nearest rank; zero for none.
fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((samples.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize;
    samples[rank.min(samples.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn sampled(requests: u32) -> AdaptiveConcurrency {
        AdaptiveConcurrency {
            min_rtt: MinRtt::Sampled { interval: Duration::from_secs(60), requests, jitter: 0.0 },
            ..AdaptiveConcurrency::default()
        }
    }

    #[test]
    fn the_first_measurement_holds_the_limit_at_min_concurrency_then_gives_the_median_as_min_rtt() {
        let mut g = Gradient::new(sampled(5));
        assert!(g.measuring());
        assert_eq!(g.limit(), 3, "min_concurrency while measuring");
        for latency in [ms(9), ms(30), ms(10), ms(11), ms(12)] {
            assert_eq!(g.update(), 3, "no update while measuring");
            g.record(latency);
        }
        assert!(!g.measuring());
        assert_eq!(g.min_rtt(), Some(ms(11)), "the median of the five");
        assert_eq!(g.limit(), 3, "the limit from before the measurement (min_limit at the start)");
    }

    #[test]
    fn the_limit_grows_near_the_no_load_latency_and_halves_at_most_once_calls_queue() {
        let config = AdaptiveConcurrency { min_rtt: MinRtt::Fixed(ms(10)), min_limit: 4, max_limit: 100, ..AdaptiveConcurrency::default() };
        let mut g = Gradient::new(config);
        assert_eq!(g.limit(), 4);
        // At the no-load latency the gradient is 1.25 (the buffer): 4 × 1.25 = 5, plus √5 → 7.
        g.record(ms(10));
        assert_eq!(g.update(), 7);
        // Much faster than minRTT: the gradient stops at 2 (7 × 2 = 14, plus √14 → 17).
        g.record(ms(1));
        assert_eq!(g.update(), 17);
        for _ in 0..10 {
            g.record(ms(10));
            g.update();
        }
        assert_eq!(g.limit(), 100, "held at max_limit");
        // Ten times slower: the gradient stops at 0.5 (100 × 0.5 = 50, plus √50 → 57).
        g.record(ms(100));
        assert_eq!(g.update(), 57);
        for _ in 0..10 {
            g.record(ms(100));
            g.update();
        }
        assert_eq!(g.limit(), 4, "held at min_limit");
        assert_eq!(g.update(), 4, "an interval with no samples changes nothing");
    }

    #[test]
    fn a_later_measurement_restores_the_limit_it_interrupted() {
        let mut g = Gradient::new(sampled(2));
        g.record(ms(10));
        g.record(ms(10));
        for _ in 0..5 {
            g.record(ms(5));
            g.update();
        }
        let before = g.limit();
        assert!(before > 3);
        g.start_measuring();
        assert_eq!(g.limit(), 3);
        g.record(ms(20));
        assert!(g.record(ms(20)), "the second sample ends it");
        assert_eq!((g.limit(), g.min_rtt()), (before, Some(ms(20))));
    }
}
