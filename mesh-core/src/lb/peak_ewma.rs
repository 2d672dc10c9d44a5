//! Finagle / Linkerd peak-EWMA latency estimator.

use std::time::Duration;

/// Peak-sensitive exponentially weighted moving average of round-trip time.
///
/// An observation above the estimate replaces it immediately (the peak);
/// otherwise the estimate decays towards the observation with weight
/// `exp(-elapsed / decay)`, where `elapsed` is the time since the previous
/// observation. Combined with [`p2c_by`](super::p2c_by) over [`PeakEwma::cost`]
/// this is Finagle's / Linkerd's latency-aware balancer.
#[derive(Clone, Debug)]
pub struct PeakEwma {
    decay_ns: f64,
    rtt_estimate_ns: f64,
    stamp: Duration,
}

impl PeakEwma {
    /// `default_rtt` is the initial estimate (Linkerd default 30ms), `decay`
    /// the time constant (Linkerd default 10s); `now` starts the clock.
    pub fn new(default_rtt: Duration, decay: Duration, now: Duration) -> Self {
        Self {
            // A zero time constant would make `0 / 0` possible; 1ns is as good as none.
            decay_ns: decay.as_nanos().max(1) as f64,
            rtt_estimate_ns: default_rtt.as_nanos() as f64,
            stamp: now,
        }
    }

    /// Records an observed RTT at time `now`. If `rtt` exceeds the estimate the
    /// estimate jumps to it (peak); otherwise it decays towards `rtt` with
    /// weight `exp(-elapsed / decay)`. Times earlier than the previous
    /// observation count as no elapsed time.
    pub fn observe(&mut self, rtt: Duration, now: Duration) {
        let rtt_ns = rtt.as_nanos() as f64;
        if rtt_ns > self.rtt_estimate_ns {
            self.rtt_estimate_ns = rtt_ns;
        } else {
            let elapsed_ns = now.saturating_sub(self.stamp).as_nanos() as f64;
            let keep = (-elapsed_ns / self.decay_ns).exp();
            self.rtt_estimate_ns = self.rtt_estimate_ns * keep + rtt_ns * (1.0 - keep);
        }
        self.stamp = self.stamp.max(now);
    }

    /// Load cost at `now` for `pending` in-flight requests:
    /// `estimate_ns * exp(-idle / decay) * (pending + 1)`.
    ///
    /// As in Finagle and tower's `PeakEwma`, the estimate also decays towards
    /// zero while no RTT is observed, so an endpoint that was slow once (or
    /// is still at its default) is tried again after a while instead of
    /// starving.
    pub fn cost(&self, pending: u64, now: Duration) -> f64 {
        let idle_ns = now.saturating_sub(self.stamp).as_nanos() as f64;
        self.rtt_estimate_ns * (-idle_ns / self.decay_ns).exp() * (pending as f64 + 1.0)
    }

    /// Rebuilds an estimator from its state ([`PeakEwma::estimate_ns`] and [`PeakEwma::stamp`]), for callers
    /// that keep that state in atomics instead of behind a lock.
    pub fn from_parts(estimate_ns: f64, stamp: Duration, decay: Duration) -> Self {
        Self { decay_ns: decay.as_nanos().max(1) as f64, rtt_estimate_ns: estimate_ns, stamp }
    }

    /// The RTT estimate in nanoseconds, unrounded.
    pub fn estimate_ns(&self) -> f64 {
        self.rtt_estimate_ns
    }

    /// Time of the latest observation (or of creation).
    pub fn stamp(&self) -> Duration {
        self.stamp
    }

    /// Current RTT estimate.
    pub fn estimate(&self) -> Duration {
        Duration::from_nanos(self.rtt_estimate_ns.round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::{SplitMix64, p2c_by};

    const MS: Duration = Duration::from_millis(1);
    const DECAY: Duration = Duration::from_secs(10);

    #[test]
    fn starts_at_default_and_costs_scale_with_pending() {
        let ewma = PeakEwma::new(30 * MS, DECAY, Duration::ZERO);
        assert_eq!(ewma.estimate(), 30 * MS);
        assert_eq!(ewma.cost(0, Duration::ZERO), 30e6);
        assert_eq!(ewma.cost(3, Duration::ZERO), 120e6);
    }

    #[test]
    fn idle_endpoints_become_cheap_again() {
        let mut slow_once = PeakEwma::new(MS, DECAY, Duration::ZERO);
        slow_once.observe(50 * MS, Duration::from_secs(1));
        let busy = {
            let mut e = PeakEwma::new(MS, DECAY, Duration::ZERO);
            e.observe(2 * MS, Duration::from_secs(60));
            e
        };
        let now = Duration::from_secs(60);
        // 59 s idle: 50 ms * e^-5.9 is about 0.14 ms, below the busy one's 2 ms.
        assert!(slow_once.cost(0, now) < busy.cost(0, now), "{} vs {}", slow_once.cost(0, now), busy.cost(0, now));
        assert!(slow_once.cost(0, Duration::from_secs(2)) > busy.cost(0, now));
    }

    #[test]
    fn prefers_the_fast_endpoint() {
        let mut endpoints = [PeakEwma::new(30 * MS, DECAY, Duration::ZERO), PeakEwma::new(30 * MS, DECAY, Duration::ZERO)];
        for step in 1..=100u32 {
            let now = step * 100 * MS;
            endpoints[0].observe(MS, now);
            endpoints[1].observe(10 * MS, now);
        }
        let mut rng = SplitMix64::new(9);
        let fast = (0..10_000).filter(|_| p2c_by(2, &mut rng, |i| endpoints[i].cost(0, 10 * Duration::from_secs(1))) == Some(0)).count();
        assert!(fast > 8_000, "{fast}");
        // Enough queued requests on the fast endpoint outweigh its lower latency.
        assert!(endpoints[0].cost(20, Duration::from_secs(10)) > endpoints[1].cost(0, Duration::from_secs(10)));
    }

    #[test]
    fn peaks_jump_then_decay_over_time() {
        let mut ewma = PeakEwma::new(MS, DECAY, Duration::ZERO);
        ewma.observe(50 * MS, Duration::from_secs(1));
        assert_eq!(ewma.estimate(), 50 * MS);
        // Observations at the same instant carry no weight.
        ewma.observe(MS, Duration::from_secs(1));
        assert_eq!(ewma.estimate(), 50 * MS);
        // One time constant later the spike has decayed to ~1/e of its excess.
        ewma.observe(MS, Duration::from_secs(11));
        let excess = ewma.estimate().as_secs_f64() * 1e3 - 1.0;
        assert!((excess - 49.0 / std::f64::consts::E).abs() < 1e-5, "{excess}");
        for s in 12..=100 {
            ewma.observe(MS, Duration::from_secs(s));
        }
        assert!(ewma.estimate() < MS + MS / 10, "{:?}", ewma.estimate());
    }

    #[test]
    fn out_of_order_and_zero_decay() {
        let mut ewma = PeakEwma::new(10 * MS, DECAY, Duration::from_secs(5));
        ewma.observe(MS, Duration::from_secs(1));
        assert_eq!(ewma.estimate(), 10 * MS);
        let mut instant = PeakEwma::new(10 * MS, Duration::ZERO, Duration::ZERO);
        instant.observe(2 * MS, Duration::ZERO);
        assert_eq!(instant.estimate(), 10 * MS);
        instant.observe(2 * MS, Duration::from_nanos(100));
        assert_eq!(instant.estimate(), 2 * MS);
    }
}
