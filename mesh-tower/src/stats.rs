//! What the layers do, counted where they act: one set of counters per cluster, shared by every layer over it
//! ([`ClusterStats`]), and one per target for the layers above the split ([`TargetStats`]: rate limits,
//! faults, mirrors), and one per authorization layer ([`AuthzStats`]). Read as snapshots by the telemetry layer, the
//! admin endpoint and tests.

use std::sync::atomic::{AtomicU64, Ordering};

use mesh_core::outlier::Reason;

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
    /// Endpoints outlier detection ejected, by detection method ([`Reason::index`]; Envoy's
    /// `outlier_detection.ejections_enforced_*`).
    pub(crate) ejected: [AtomicU64; 4],
    /// Outliers detected, ejected or spared, by detection method (Envoy's `ejections_detected_*`).
    pub(crate) detected: [AtomicU64; 4],
    /// Outliers spared because `max_ejection_percent` were ejected (Envoy's `ejections_overflow`).
    pub(crate) ejection_overflows: AtomicU64,
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
    /// Endpoints outlier detection ejected, by any method.
    pub ejections: u64,
    /// Outlier detection's decisions by detection method.
    pub outliers: OutlierCounts,
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
            ejections: self.ejected.iter().map(read).sum(),
            outliers: OutlierCounts {
                ejected: self.ejected.each_ref().map(read),
                detected: self.detected.each_ref().map(read),
                overflows: read(&self.ejection_overflows),
            },
            adaptive_shed: read(&self.adaptive_shed),
        }
    }
}

/// Outlier detection's decisions in a cluster, by detection method (A91 and Envoy's outlier statistics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutlierCounts {
    ejected: [u64; 4],
    detected: [u64; 4],
    /// Outliers left serving because `max_ejection_percent` were ejected.
    pub overflows: u64,
}

impl OutlierCounts {
    /// Endpoints ejected for `reason`.
    pub fn ejected(&self, reason: Reason) -> u64 {
        self.ejected[reason.index()]
    }

    /// Outliers detected for `reason`, whether ejected or spared.
    pub fn detected(&self, reason: Reason) -> u64 {
        self.detected[reason.index()]
    }
}

/// Counts one more on `counter`.
pub(crate) fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A response extension on a call that sent more than its first attempt: what each layer sent beyond it (what
/// A96's `grpc.client.call.retries`, `grpc.client.call.transparent_retries`, `grpc.client.call.hedges` and
/// `grpc.client.call.retry_delay` record). Absent on an ordinary call: a layer adds it only when it sent more.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallAttempts {
    /// Retries the retry policy sent (the first attempt is not one).
    pub retries: u32,
    /// Requests the balancer sent again because the server refused them unprocessed, or the connection closed
    /// before they were written (gRPC A6's transparent retries).
    pub transparent_retries: u32,
    /// Hedged attempts sent beside the first.
    pub hedges: u32,
    /// Time the retry policy spent backing off between attempts.
    pub backed_off: std::time::Duration,
}

impl CallAttempts {
    /// Adds to `response`'s record (made when it has none) what `add` adds.
    pub(crate) fn add<B>(response: &mut http::Response<B>, add: impl FnOnce(&mut Self)) {
        add(response.extensions_mut().get_or_insert_default::<Self>());
    }

    /// The transparent retries on record in `response`, if any.
    pub(crate) fn transparent_in<B>(response: &http::Response<B>) -> u32 {
        response.extensions().get::<Self>().map_or(0, |a| a.transparent_retries)
    }
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
