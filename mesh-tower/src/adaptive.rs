//! Adaptive concurrency (Envoy's adaptive concurrency filter, per cluster): a limit on the cluster's calls in
//! flight that follows its latency ([`mesh_core::adaptive::Gradient`]), and the calls over it turned away at
//! once with [`Error::ConcurrencyLimited`] (RESOURCE_EXHAUSTED by default), never retried.
//!
//! - Each answered call's latency (to its response head) is a sample; failed calls give none.
//! - The limit is recomputed on the first sample after each update interval, so an idle cluster does no work;
//!   minRTT is measured again every interval plus its drawn jitter (Envoy's window), on the same clock
//!   (tokio's, so tests run paused).
//! - A call holds its place until its response body ends, as with the circuit breaker.
//! - The check is two atomics per call; the controller's lock is taken once per answered call.

use mesh_core::adaptive::Gradient;
use mesh_core::lb::{Random, SplitMix64};
use mesh_core::policy::{AdaptiveConcurrency, MinRtt};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;
use tower::Layer;

use crate::Error;
use crate::breaker::{Cap, Capped, Gate};
use crate::stats::{ClusterStats, count};

/// Limits a cluster's calls in flight adaptively.
#[derive(Clone)]
pub struct AdaptiveLayer {
    gate: Arc<Gate<AdaptiveCap>>,
}

/// The adaptive cap of an [`AdaptiveLayer`]: the controller and its current limit.
pub struct AdaptiveCap {
    cluster: Arc<str>,
    config: AdaptiveConcurrency,
    limit: AtomicU32,
    state: Mutex<State>,
    stats: Arc<ClusterStats>,
}

struct State {
    gradient: Gradient,
    next_update: Instant,
    /// When the next minRTT measurement starts (`None`: fixed minRTT, or one is running).
    next_measure: Option<Instant>,
    rng: SplitMix64,
}

impl fmt::Debug for AdaptiveLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveLayer").field("cluster", &self.gate.cap.cluster).field("limit", &self.limit()).finish()
    }
}

impl AdaptiveLayer {
    /// An adaptive limit for `cluster`, each call turned away counted in `stats`.
    pub fn new(cluster: &str, config: AdaptiveConcurrency, stats: Arc<ClusterStats>) -> Self {
        let gradient = Gradient::new(config.clone());
        let now = Instant::now();
        let state = State { next_update: now + config.update_interval, next_measure: None, gradient, rng: SplitMix64::new(0xacc) };
        let shared =
            AdaptiveCap { cluster: cluster.into(), limit: AtomicU32::new(state.gradient.limit()), state: Mutex::new(state), config, stats };
        Self { gate: Gate::new(shared) }
    }

    /// The limit now.
    pub fn limit(&self) -> u32 {
        self.gate.cap.limit()
    }
}

impl AdaptiveCap {
    fn record(&self, latency: std::time::Duration) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *state;
        let now = Instant::now();
        if state.gradient.record(latency) {
            // A measurement ended: the next one starts an interval (plus jitter) from now.
            if let MinRtt::Sampled { interval, jitter, .. } = self.config.min_rtt {
                let drawn = interval.mul_f64(jitter.clamp(0.0, 1.0) * state.rng.below(1_000_000) as f64 / 1e6);
                state.next_measure = Some(now + interval + drawn);
            }
            state.next_update = now + self.config.update_interval;
        } else if !state.gradient.measuring() && now >= state.next_update {
            state.gradient.update();
            state.next_update = now + self.config.update_interval;
            if state.next_measure.is_some_and(|at| now >= at) {
                state.next_measure = None;
                state.gradient.start_measuring();
            }
        }
        self.limit.store(state.gradient.limit(), Ordering::Relaxed);
    }
}

impl Cap for AdaptiveCap {
    fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    fn refused(&self, limit: u32) -> Error {
        count(&self.stats.adaptive_shed);
        Error::ConcurrencyLimited { cluster: self.cluster.to_string(), limit, code: self.config.shed_code }
    }

    fn timed(&self) -> bool {
        true
    }

    fn answered(&self, latency: std::time::Duration) {
        self.record(latency);
    }
}

impl<S> Layer<S> for AdaptiveLayer {
    type Service = Capped<S, AdaptiveCap>;

    fn layer(&self, inner: S) -> Self::Service {
        Capped { inner, gate: self.gate.clone() }
    }
}
