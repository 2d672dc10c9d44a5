//! Outlier detection's decisions, as pure functions of counts, time and randomness (Envoy's algorithms and
//! defaults; gRPC A50's order of evaluation). The caller keeps one [`Host`] per endpoint, feeds it the calls
//! that ended, applies the [`Change`]s to its picker, and calls [`sweep`] once per interval.
//!
//! - **Consecutive failures** ([`consecutive`]): an endpoint whose server errors (or gateway errors) in a row
//!   reach the threshold is ejected at once.
//! - **Success rate**: at each interval, among endpoints with enough calls, those whose success rate is more
//!   than `stdev_factor` standard deviations below the mean are ejected.
//! - **Failure percentage**: at each interval, among endpoints with enough calls, those failing at least
//!   `threshold` percent are ejected.
//! - **Ejection time** is `base_ejection_time` × the endpoint's multiplier (ejections, less one for each
//!   interval it served since), capped at `max(base_ejection_time, max_ejection_time)`. An endpoint returns at
//!   the first interval after its time is up.
//! - **Max ejection percent**: no ejection takes the ejected share of the cluster over it (so with the default
//!   10%, a cluster of fewer than ten endpoints ejects none), except that with `always_eject_one` one endpoint
//!   may always be ejected (Envoy).
//! - Each ejection happens with its algorithm's `enforcing` chance, in percent.

use std::time::Duration;

use crate::lb::Random;
use crate::policy::OutlierDetection;

/// One endpoint as outlier detection tracks it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Host {
    /// When it was ejected; `None` while it serves.
    pub ejected_at: Option<Duration>,
    /// Its ejection multiplier.
    pub multiplier: u32,
    /// Calls that ended on it as successes in the interval now running.
    pub successes: u64,
    /// Calls that ended on it as failures in the interval now running.
    pub failures: u64,
}

impl Host {
    /// Whether it is ejected.
    pub fn is_ejected(&self) -> bool {
        self.ejected_at.is_some()
    }

    fn volume(&self) -> u64 {
        self.successes + self.failures
    }

    fn eject(&mut self, now: Duration) {
        self.ejected_at = Some(now);
        self.multiplier = self.multiplier.saturating_add(1);
    }
}

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Consecutive server errors.
    Consecutive5xx,
    /// Consecutive gateway errors.
    ConsecutiveGateway,
    /// Success rate far below the cluster's.
    SuccessRate,
    /// Failure percentage over the threshold.
    FailurePercentage,
}

impl Reason {
    /// Every reason, in the order of [`Reason::index`].
    pub const ALL: [Reason; 4] = [Self::Consecutive5xx, Self::ConsecutiveGateway, Self::SuccessRate, Self::FailurePercentage];

    /// The reason's place in [`Reason::ALL`] (for tables of counts by reason).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The reason's name in logs and metrics (Envoy's stat suffixes).
    pub fn name(self) -> &'static str {
        match self {
            Self::Consecutive5xx => "consecutive_5xx",
            Self::ConsecutiveGateway => "consecutive_gateway_failure",
            Self::SuccessRate => "success_rate",
            Self::FailurePercentage => "failure_percentage",
        }
    }
}

/// What a decision did to one endpoint (by index into the caller's hosts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Ejected: it takes no traffic until it returns.
    Ejected(usize, Reason),
    /// Detected as an outlier but left serving (Envoy counts it as detected, not enforced).
    Spared(usize, Reason, Spared),
    /// Its ejection time is up: it takes traffic again.
    Returned(usize),
}

/// Why an outlier was left serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spared {
    /// Ejecting it would pass `max_ejection_percent` (Envoy's `ejections_overflow`).
    Overflow,
    /// The algorithm's enforcing chance said no.
    NotEnforced,
}

impl OutlierDetection {
    /// How long an ejection with `multiplier` lasts.
    pub fn ejection_time(&self, multiplier: u32) -> Duration {
        let cap = self.max_ejection_time.max(self.base_ejection_time);
        self.base_ejection_time.saturating_mul(multiplier.max(1)).min(cap)
    }

    /// Whether one more endpoint of `hosts` may be ejected.
    fn may_eject(&self, hosts: &[Host]) -> bool {
        self.room_to_eject(hosts.iter().filter(|h| h.is_ejected()).count(), hosts.len())
    }

    /// Whether, with `ejected` of `endpoints` ejected, one more may be (`max_ejection_percent`, and
    /// `always_eject_one` for the first).
    pub fn room_to_eject(&self, ejected: usize, endpoints: usize) -> bool {
        (self.always_eject_one && ejected == 0 && endpoints > 0) || (ejected + 1) * 100 <= self.max_ejection_percent as usize * endpoints
    }
}

fn enforced(percent: u32, rng: &mut impl Random) -> bool {
    percent >= 100 || (rng.below(100) as u32) < percent
}

/// `hosts[index]`'s consecutive failures reached the threshold of `reason` (one of the consecutive reasons):
/// ejects it, if the algorithm is on, the endpoint serves, the max ejection percent allows, and the enforcing
/// chance says so.
pub fn consecutive(
    config: &OutlierDetection,
    hosts: &mut [Host],
    index: usize,
    reason: Reason,
    now: Duration,
    rng: &mut impl Random,
) -> Option<Change> {
    let algorithm = match reason {
        Reason::Consecutive5xx => config.consecutive_5xx,
        Reason::ConsecutiveGateway => config.consecutive_gateway,
        Reason::SuccessRate | Reason::FailurePercentage => None,
    }?;
    if hosts.get(index)?.is_ejected() {
        return None;
    }
    Some(eject(config, hosts, index, reason, algorithm.enforcing, now, rng))
}

/// The interval ends: ejects outliers by success rate, then by failure percentage, over the interval's counts;
/// then returns the endpoints whose ejection time is up, and lowers the multiplier of each that served. The
/// counts are reset for the next interval.
pub fn sweep(config: &OutlierDetection, hosts: &mut [Host], now: Duration, rng: &mut impl Random) -> Vec<Change> {
    let mut changes = Vec::new();
    if let Some(rate) = config.success_rate {
        let volume = u64::from(rate.request_volume);
        let rates: Vec<(usize, f64)> = hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.volume() >= volume.max(1))
            .map(|(i, h)| (i, h.successes as f64 * 100.0 / h.volume() as f64))
            .collect();
        if !rates.is_empty() && rates.len() >= rate.minimum_hosts as usize {
            let n = rates.len() as f64;
            let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
            let stdev = (rates.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
            let threshold = mean - stdev * f64::from(rate.stdev_factor) / 1000.0;
            for (index, value) in rates {
                if value < threshold && !hosts[index].is_ejected() {
                    changes.push(eject(config, hosts, index, Reason::SuccessRate, rate.enforcing, now, rng));
                }
            }
        }
    }
    if let Some(percentage) = config.failure_percentage {
        let volume = u64::from(percentage.request_volume);
        let candidates: Vec<usize> = (0..hosts.len()).filter(|&i| hosts[i].volume() >= volume.max(1)).collect();
        if !candidates.is_empty() && candidates.len() >= percentage.minimum_hosts as usize {
            for index in candidates {
                let host = &hosts[index];
                let failed = host.failures * 100 >= u64::from(percentage.threshold) * host.volume();
                if failed && !host.is_ejected() {
                    changes.push(eject(config, hosts, index, Reason::FailurePercentage, percentage.enforcing, now, rng));
                }
            }
        }
    }
    for (index, host) in hosts.iter_mut().enumerate() {
        match host.ejected_at {
            None => host.multiplier = host.multiplier.saturating_sub(1),
            Some(at) if now.saturating_sub(at) >= config.ejection_time(host.multiplier) => {
                host.ejected_at = None;
                changes.push(Change::Returned(index));
            }
            Some(_) => {}
        }
        host.successes = 0;
        host.failures = 0;
    }
    changes
}

/// `hosts[index]`, a serving endpoint, was detected as an outlier for `reason`: ejects it unless the max
/// ejection percent or the enforcing chance spares it (checked in that order, as Envoy does).
fn eject(
    config: &OutlierDetection,
    hosts: &mut [Host],
    index: usize,
    reason: Reason,
    enforcing: u32,
    now: Duration,
    rng: &mut impl Random,
) -> Change {
    if !config.may_eject(hosts) {
        return Change::Spared(index, reason, Spared::Overflow);
    }
    if !enforced(enforcing, rng) {
        return Change::Spared(index, reason, Spared::NotEnforced);
    }
    hosts[index].eject(now);
    Change::Ejected(index, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::SplitMix64;
    use crate::policy::{Consecutive, FailurePercentage, SuccessRate};

    const S: Duration = Duration::from_secs(1);

    fn config() -> OutlierDetection {
        OutlierDetection {
            interval: S,
            base_ejection_time: 10 * S,
            max_ejection_time: 300 * S,
            max_ejection_percent: 100,
            always_eject_one: false,
            consecutive_5xx: Some(Consecutive { threshold: 5, enforcing: 100 }),
            consecutive_gateway: None,
            success_rate: None,
            failure_percentage: None,
        }
    }

    fn hosts(counts: &[(u64, u64)]) -> Vec<Host> {
        counts.iter().map(|&(successes, failures)| Host { successes, failures, ..Host::default() }).collect()
    }

    fn ejected(hosts: &[Host]) -> Vec<usize> {
        (0..hosts.len()).filter(|&i| hosts[i].is_ejected()).collect()
    }

    #[test]
    fn a_consecutive_trip_ejects_for_base_times_multiplier_and_returns_at_the_next_sweep_after() {
        let config = config();
        let mut rng = SplitMix64::new(1);
        let mut h = hosts(&[(0, 0), (0, 0)]);
        assert_eq!(consecutive(&config, &mut h, 0, Reason::Consecutive5xx, S, &mut rng), Some(Change::Ejected(0, Reason::Consecutive5xx)));
        assert_eq!(consecutive(&config, &mut h, 0, Reason::Consecutive5xx, S, &mut rng), None, "already ejected");
        assert_eq!(consecutive(&config, &mut h, 1, Reason::ConsecutiveGateway, S, &mut rng), None, "gateway algorithm off");
        // Ejected at 1 s for 10 s: still out at 10 s, back at 11 s.
        assert!(sweep(&config, &mut h, 10 * S, &mut rng).is_empty());
        assert_eq!(sweep(&config, &mut h, 11 * S, &mut rng), vec![Change::Returned(0)]);
        assert_eq!(h[0].multiplier, 1);
        // Ejected again before the multiplier decays: 20 s this time.
        consecutive(&config, &mut h, 0, Reason::Consecutive5xx, 12 * S, &mut rng).unwrap();
        assert_eq!(h[0].multiplier, 2);
        assert!(sweep(&config, &mut h, 31 * S, &mut rng).is_empty());
        assert_eq!(sweep(&config, &mut h, 32 * S, &mut rng), vec![Change::Returned(0)]);
        // Each interval served lowers the multiplier by one.
        sweep(&config, &mut h, 33 * S, &mut rng);
        assert_eq!(h[0].multiplier, 1);
        sweep(&config, &mut h, 34 * S, &mut rng);
        sweep(&config, &mut h, 35 * S, &mut rng);
        assert_eq!(h[0].multiplier, 0);
    }

    #[test]
    fn ejection_time_is_capped() {
        let capped = OutlierDetection { max_ejection_time: 25 * S, ..config() };
        assert_eq!(capped.ejection_time(0), 10 * S);
        assert_eq!(capped.ejection_time(2), 20 * S);
        assert_eq!(capped.ejection_time(3), 25 * S);
        let long_base = OutlierDetection { base_ejection_time: 60 * S, max_ejection_time: 25 * S, ..config() };
        assert_eq!(long_base.ejection_time(5), 60 * S, "the cap is never below the base");
    }

    #[test]
    fn max_ejection_percent_holds_unless_one_may_always_go() {
        let config = OutlierDetection { max_ejection_percent: 10, ..config() };
        let mut rng = SplitMix64::new(1);
        let mut h = hosts(&[(0, 0); 3]);
        let overflow = Some(Change::Spared(0, Reason::Consecutive5xx, Spared::Overflow));
        assert_eq!(consecutive(&config, &mut h, 0, Reason::Consecutive5xx, S, &mut rng), overflow, "one of three is 33%, over 10%");
        let one = OutlierDetection { always_eject_one: true, ..config.clone() };
        let ejected_one = Some(Change::Ejected(0, Reason::Consecutive5xx));
        assert_eq!(consecutive(&one, &mut h, 0, Reason::Consecutive5xx, S, &mut rng), ejected_one, "always_eject_one lets one go");
        let second = consecutive(&one, &mut h, 1, Reason::Consecutive5xx, S, &mut rng);
        assert_eq!(second, Some(Change::Spared(1, Reason::Consecutive5xx, Spared::Overflow)), "a second would be 67%");
        let half = OutlierDetection { max_ejection_percent: 50, ..config };
        let mut h = hosts(&[(0, 0); 4]);
        for i in 0..4 {
            consecutive(&half, &mut h, i, Reason::Consecutive5xx, S, &mut rng);
        }
        assert_eq!(ejected(&h), [0, 1], "half of four");
    }

    #[test]
    fn success_rate_ejects_the_outlier_only_with_enough_hosts_and_volume() {
        let config = OutlierDetection { success_rate: Some(SuccessRate::default()), consecutive_5xx: None, ..config() };
        let mut rng = SplitMix64::new(1);
        // Nine endpoints at 100% and one at 50%: mean 95, stdev 15, threshold 95 − 1.9 × 15 = 66.5.
        let mut counts = vec![(200, 0); 9];
        counts.push((100, 100));
        let mut h = hosts(&counts);
        assert_eq!(sweep(&config, &mut h, S, &mut rng), vec![Change::Ejected(9, Reason::SuccessRate)]);
        assert_eq!(h[0].successes + h[9].failures, 0, "counts restart each interval");
        // Too little volume: the same rates over 99 calls each decide nothing.
        let mut counts = vec![(99, 0); 9];
        counts.push((50, 49));
        let mut h = hosts(&counts);
        assert!(sweep(&config, &mut h, S, &mut rng).is_empty());
        // Four endpoints with volume are under minimum_hosts (5).
        let mut h = hosts(&[(200, 0), (200, 0), (200, 0), (0, 200)]);
        assert!(sweep(&config, &mut h, S, &mut rng).is_empty());
    }

    #[test]
    fn failure_percentage_ejects_at_the_threshold() {
        let failure = FailurePercentage { minimum_hosts: 3, ..FailurePercentage::default() };
        let config = OutlierDetection { failure_percentage: Some(failure), consecutive_5xx: None, ..config() };
        let mut rng = SplitMix64::new(1);
        let mut h = hosts(&[(100, 0), (15, 85), (16, 84), (1, 10)]);
        assert_eq!(
            sweep(&config, &mut h, S, &mut rng),
            vec![Change::Ejected(1, Reason::FailurePercentage)],
            "85% ejects, 84% does not; 11 calls is too few"
        );
    }

    #[test]
    fn enforcing_is_a_chance() {
        let config = OutlierDetection { consecutive_5xx: Some(Consecutive { threshold: 5, enforcing: 30 }), ..config() };
        let mut rng = SplitMix64::new(7);
        let mut ejections = 0;
        for _ in 0..1000 {
            let mut h = hosts(&[(0, 0), (0, 0)]);
            match consecutive(&config, &mut h, 0, Reason::Consecutive5xx, S, &mut rng) {
                Some(Change::Ejected(0, _)) => ejections += 1,
                Some(Change::Spared(0, _, Spared::NotEnforced)) => {}
                other => panic!("a trip is ejected or spared by chance: {other:?}"),
            }
        }
        assert!((240..360).contains(&ejections), "about 30% of trips eject: {ejections}");
        let off = OutlierDetection { consecutive_5xx: Some(Consecutive { threshold: 5, enforcing: 0 }), ..config };
        let mut h = hosts(&[(0, 0), (0, 0)]);
        let spared = consecutive(&off, &mut h, 0, Reason::Consecutive5xx, S, &mut rng);
        assert_eq!(spared, Some(Change::Spared(0, Reason::Consecutive5xx, Spared::NotEnforced)));
        assert!(ejected(&h).is_empty());
    }

    #[test]
    fn validation_names_the_field() {
        let bad = OutlierDetection { consecutive_5xx: Some(Consecutive { threshold: 300, enforcing: 100 }), ..config() };
        assert!(bad.validate().unwrap_err().to_string().contains("consecutive_5xx"));
        let bad = OutlierDetection { max_ejection_percent: 101, ..config() };
        assert!(bad.validate().unwrap_err().to_string().contains("max_ejection_percent"));
        config().validate().unwrap();
        OutlierDetection::default().validate().unwrap();
    }
}
