//! What the layers do, counted where they act: one set of counters per cluster, shared by every layer over it
//! ([`ClusterStats`]), and one per target for the layers above the split ([`TargetStats`]: rate limits,
//! faults, mirrors), and one per authorization layer ([`AuthzStats`]). Read as snapshots by the telemetry layer, the
//! admin endpoint and tests.

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
    /// Retries not sent because `max_retries` were in flight (Envoy's `upstream_rq_retry_overflow` too).
    pub(crate) retry_overflows: AtomicU64,
    /// Calls the circuit breaker turned away (Envoy's `upstream_rq_pending_overflow`).
    pub(crate) overflows: AtomicU64,
    /// Endpoints outlier detection ejected (Envoy's `outlier_detection.ejections_enforced_total`).
    pub(crate) ejections: AtomicU64,
    /// Calls the adaptive concurrency limit turned away (Envoy's `adaptive_concurrency...rq_blocked`).
    pub(crate) adaptive_shed: AtomicU64,
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
    /// Retries not sent because `max_retries` were in flight.
    pub retry_overflows: u64,
    /// Calls the circuit breaker turned away.
    pub overflows: u64,
    /// Endpoints outlier detection ejected.
    pub ejections: u64,
    /// Calls the adaptive concurrency limit turned away.
    pub adaptive_shed: u64,
}

impl ClusterStats {
    /// The counts now.
    pub fn counts(&self) -> ClusterCounts {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ClusterCounts {
            retries: read(&self.retries),
            retry_budget_exhausted: read(&self.retry_budget_exhausted),
            hedges: read(&self.hedges),
            retry_overflows: read(&self.retry_overflows),
            overflows: read(&self.overflows),
            ejections: read(&self.ejections),
            adaptive_shed: read(&self.adaptive_shed),
        }
    }
}

/// Counts one more on `counter`.
pub(crate) fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A target's counters: what its route layers above the split did.
#[derive(Debug, Default)]
pub struct TargetStats {
    /// Calls the local rate limit turned away (Envoy's `local_rate_limit.rate_limited`).
    pub(crate) rate_limited: AtomicU64,
    /// Calls fault injection delayed (Envoy's `fault.delays_injected`).
    pub(crate) fault_delays: AtomicU64,
    /// Calls fault injection aborted (Envoy's `fault.aborts_injected`).
    pub(crate) fault_aborts: AtomicU64,
    /// Faults not injected because `max_active_faults` were active (Envoy's `fault.faults_overflow`).
    pub(crate) fault_overflows: AtomicU64,
    /// Copies of calls sent to shadow clusters.
    pub(crate) mirrored: AtomicU64,
    /// Calls drawn for mirroring but not copied (body not whole, or the shadow cluster unknown).
    pub(crate) mirrors_skipped: AtomicU64,
}

/// A snapshot of a target's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetCounts {
    /// Calls the local rate limit turned away.
    pub rate_limited: u64,
    /// Calls delayed by fault injection.
    pub fault_delays: u64,
    /// Calls aborted by fault injection.
    pub fault_aborts: u64,
    /// Faults not injected because too many were active.
    pub fault_overflows: u64,
    /// Copies of calls sent to shadow clusters.
    pub mirrored: u64,
    /// Calls drawn for mirroring but not copied.
    pub mirrors_skipped: u64,
}

impl TargetStats {
    /// The counts now.
    pub fn counts(&self) -> TargetCounts {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        TargetCounts {
            rate_limited: read(&self.rate_limited),
            fault_delays: read(&self.fault_delays),
            fault_aborts: read(&self.fault_aborts),
            fault_overflows: read(&self.fault_overflows),
            mirrored: read(&self.mirrored),
            mirrors_skipped: read(&self.mirrors_skipped),
        }
    }
}

/// An authorization layer's counters (Envoy's `rbac.allowed` and `rbac.denied`).
#[derive(Debug, Default)]
pub struct AuthzStats {
    /// Requests the policy let through.
    pub(crate) allowed: AtomicU64,
    /// Requests the policy refused (invalid paths included).
    pub(crate) denied: AtomicU64,
}

/// A snapshot of an authorization layer's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthzCounts {
    /// Requests let through.
    pub allowed: u64,
    /// Requests refused.
    pub denied: u64,
}

impl AuthzStats {
    /// The counts now.
    pub fn counts(&self) -> AuthzCounts {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        AuthzCounts { allowed: read(&self.allowed), denied: read(&self.denied) }
    }
}
