//! What a cluster's layers do, counted where they act: one set of counters per cluster, shared by every
//! layer over it, read as a [`ClusterCounts`] snapshot by the telemetry layer, the admin endpoint and tests.

use std::sync::atomic::{AtomicU64, Ordering};

/// A cluster's counters (relaxed atomics: each is a tally, read on its own).
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Attempts after a call's first (Envoy's `upstream_rq_retry`).
    pub(crate) retries: AtomicU64,
    /// Retries and hedges the budget refused (Envoy's `upstream_rq_retry_overflow`).
    pub(crate) retry_budget_exhausted: AtomicU64,
    /// Hedged attempts sent (A96's hedge count).
    pub(crate) hedges: AtomicU64,
    /// Calls the circuit breaker turned away (Envoy's `upstream_rq_pending_overflow`).
    pub(crate) overflows: AtomicU64,
    /// Endpoints outlier detection ejected (Envoy's `outlier_detection.ejections_enforced_total`).
    pub(crate) ejections: AtomicU64,
}

/// A snapshot of a cluster's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterCounts {
    /// Attempts after a call's first.
    pub retries: u64,
    /// Retries and hedges the budget refused.
    pub retry_budget_exhausted: u64,
    /// Hedged attempts sent.
    pub hedges: u64,
    /// Calls the circuit breaker turned away.
    pub overflows: u64,
    /// Endpoints outlier detection ejected.
    pub ejections: u64,
}

impl ClusterStats {
    /// The counts now.
    pub fn counts(&self) -> ClusterCounts {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ClusterCounts {
            retries: read(&self.retries),
            retry_budget_exhausted: read(&self.retry_budget_exhausted),
            hedges: read(&self.hedges),
            overflows: read(&self.overflows),
            ejections: read(&self.ejections),
        }
    }

    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
