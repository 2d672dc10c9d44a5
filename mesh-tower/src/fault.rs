//! Fault injection (Envoy's HTTP fault filter, gRPC A33): a share of calls is delayed, then a share aborted,
//! before they leave, so a service's resilience can be tested against the failures it will meet.
//!
//! - The delay is the policy's fixed one, or, for a header-controlled fault, the request's
//!   `x-envoy-fault-delay-request` (milliseconds); the abort status is the policy's, or the request's
//!   `x-envoy-fault-abort-grpc-request` (a gRPC code) or `x-envoy-fault-abort-request` (an HTTP status, read
//!   through gRPC's HTTP-to-status table). A header-controlled fault whose header is absent does nothing.
//! - Each is drawn on its own share (parts per million); `x-envoy-fault-delay-request-percentage` and
//!   `x-envoy-fault-abort-request-percentage` lower a share, never raise it (Envoy).
//! - Only requests matching every header matcher of the policy are faulted.
//! - At most `max_active_faults` calls are under a fault at once; past it, calls go unfaulted (Envoy).
//! - The delay comes first; an aborted call fails with [`Error::FaultAbort`] and never reaches a server.
//!
//! The layer sits above the route timeout and retries: a fault happens once per call, as Envoy's filter
//! runs before its router. The caller's own deadline still bounds the delay.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use mesh_core::GrpcCode;
use mesh_core::lb::{Random, SplitMix64};
use mesh_core::policy::{FaultInjection, PER_MILLION_PER_PERCENT};
use tower::{Layer, Service, ServiceExt};

use crate::Error;
use crate::stats::TargetStats;

/// Delay header of a header-controlled delay (milliseconds).
pub const DELAY_HEADER: &str = "x-envoy-fault-delay-request";
/// Lowers the delay's share (percent).
pub const DELAY_PERCENTAGE_HEADER: &str = "x-envoy-fault-delay-request-percentage";
/// gRPC status of a header-controlled abort.
pub const ABORT_GRPC_HEADER: &str = "x-envoy-fault-abort-grpc-request";
/// HTTP status of a header-controlled abort.
pub const ABORT_HTTP_HEADER: &str = "x-envoy-fault-abort-request";
/// Lowers the abort's share (percent).
pub const ABORT_PERCENTAGE_HEADER: &str = "x-envoy-fault-abort-request-percentage";

/// Injects a route's faults.
#[derive(Clone)]
pub struct FaultLayer {
    shared: Arc<Shared>,
}

struct Shared {
    target: Arc<str>,
    fault: FaultInjection,
    active: AtomicU32,
    seed: AtomicU64,
    stats: Arc<TargetStats>,
}

impl fmt::Debug for FaultLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultLayer").field("fault", &self.shared.fault).finish()
    }
}

impl FaultLayer {
    /// Injects `fault` into calls to `target` (which names it in errors), counted in `stats`.
    pub fn new(target: &str, fault: FaultInjection, stats: Arc<TargetStats>) -> Self {
        let shared = Shared { target: target.into(), fault, active: AtomicU32::new(0), seed: AtomicU64::new(0xfa17), stats };
        Self { shared: Arc::new(shared) }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;

    fn layer(&self, inner: S) -> Fault<S> {
        Fault { inner, shared: self.shared.clone() }
    }
}

/// The fault-injecting service ([`FaultLayer`]).
#[derive(Clone)]
pub struct Fault<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for Fault<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fault").field("fault", &self.shared.fault).finish()
    }
}

/// What one call gets.
#[derive(Debug, Default, PartialEq)]
struct Decision {
    delay: Option<Duration>,
    abort: Option<GrpcCode>,
}

impl Shared {
    fn decide<B>(&self, request: &http::Request<B>) -> Decision {
        let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
        let fault = &self.fault;
        if !fault.headers.iter().all(|h| h.matches(header(&h.name))) {
            return Decision::default();
        }
        let mut rng = SplitMix64::new(self.seed.fetch_add(1, Ordering::Relaxed));
        // A share, lowered (never raised) by its percentage header, drawn.
        let mut drawn = |per_million: u32, lower: &str| {
            let lowered = header(lower).and_then(|v| v.trim().parse::<u32>().ok()).map(|p| p.min(100) * PER_MILLION_PER_PERCENT);
            let share = lowered.map_or(per_million, |l| l.min(per_million));
            (rng.below(1_000_000) as u32) < share
        };
        let delay = fault.delay.and_then(|d| {
            let delay = d.fixed.or_else(|| header(DELAY_HEADER).and_then(|v| v.trim().parse().ok()).map(Duration::from_millis))?;
            drawn(d.per_million, DELAY_PERCENTAGE_HEADER).then_some(delay)
        });
        let abort = fault.abort.and_then(|a| {
            let code = a.code.or_else(|| {
                let grpc = header(ABORT_GRPC_HEADER).and_then(|v| v.trim().parse().ok()).and_then(GrpcCode::from_i32);
                let http = || header(ABORT_HTTP_HEADER).and_then(|v| v.trim().parse::<u16>().ok()).map(GrpcCode::from_http_status);
                grpc.or_else(http)
            })?;
            (code != GrpcCode::Ok && drawn(a.per_million, ABORT_PERCENTAGE_HEADER)).then_some(code)
        });
        Decision { delay, abort }
    }
}

/// A call's place among the active faults, given back when dropped.
struct Active(Arc<Shared>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, B> Service<http::Request<B>> for Fault<S>
where
    S: Service<http::Request<B>, Error = Error> + Clone + Send + 'static,
    S::Response: Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = Error;
    type Future = BoxFuture<'static, Result<S::Response, Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let shared = &self.shared;
        let decision = shared.decide(&request);
        if decision == Decision::default() {
            return Box::pin(self.inner.call(request));
        }
        if let Some(max) = shared.fault.max_active_faults
            && shared.active.fetch_add(1, Ordering::Relaxed) >= max
        {
            shared.active.fetch_sub(1, Ordering::Relaxed);
            crate::stats::count(&shared.stats.fault_overflows);
            return Box::pin(self.inner.call(request));
        }
        let active = shared.fault.max_active_faults.map(|_| Active(shared.clone()));
        let (shared, inner) = (shared.clone(), self.inner.clone());
        Box::pin(async move {
            if let Some(delay) = decision.delay {
                crate::stats::count(&shared.stats.fault_delays);
                tokio::time::sleep(delay).await;
            }
            if let Some(code) = decision.abort {
                crate::stats::count(&shared.stats.fault_aborts);
                return Err(Error::FaultAbort { target: shared.target.to_string(), code });
            }
            let response = inner.oneshot(request).await;
            // A fault is active until its call has its response (Envoy counts the whole stream).
            drop(active);
            response
        })
    }
}
