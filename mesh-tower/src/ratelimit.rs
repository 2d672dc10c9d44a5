//! Local rate limiting (Envoy's `local_ratelimit` filter, client side): a token bucket per limit, over
//! `governor`'s GCRA. A call over the limit fails at once with [`Error::RateLimited`] (RESOURCE_EXHAUSTED, as
//! Envoy's `rate_limited_as_resource_exhausted` answers gRPC calls), carrying when the next call would be
//! let through (`retry-after`); it never leaves, and is never retried.
//!
//! Envoy's bucket adds `tokens_per_fill` at once every `fill_interval`; GCRA adds one every
//! `fill_interval / tokens_per_fill`, with the same capacity (`max_tokens`) and the same long-run rate, so a
//! burst after a quiet spell is the same and a steady stream is smoother. The limiter reads tokio's clock, so
//! its tests run on a paused clock.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{Either, Ready};
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use mesh_core::policy::RateLimit;
use tower::{Layer, Service};

use crate::Error;
use crate::stats::TargetStats;

/// Tokio's clock, as governor reads it: the time since the limiter was made.
#[derive(Clone, Debug)]
struct TokioClock(tokio::time::Instant);

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

type Gcra = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// One token bucket, shared by every route with its limit. Cheap to clone; clones share the bucket.
#[derive(Clone)]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

struct Shared {
    target: Arc<str>,
    limit: RateLimit,
    limiter: Gcra,
    stats: Arc<TargetStats>,
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer").field("limit", &self.shared.limit).finish()
    }
}

impl RateLimitLayer {
    /// A bucket for `limit` on calls to `target` (which names it in errors), counted in `stats`. Out-of-range
    /// numbers are brought to the nearest valid ones: validation happens at the edge, and a limiter never panics.
    pub fn new(target: &str, limit: RateLimit, stats: Arc<TargetStats>) -> Self {
        let tokens = NonZeroU32::new(limit.tokens_per_fill).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limit.max_tokens).unwrap_or(NonZeroU32::MIN);
        let period = (limit.fill_interval / tokens.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN)).allow_burst(burst);
        let limiter = RateLimiter::direct_with_clock(quota, TokioClock(tokio::time::Instant::now()));
        Self { shared: Arc::new(Shared { target: target.into(), limit, limiter, stats }) }
    }

    /// The limit it enforces.
    pub fn limit(&self) -> &RateLimit {
        &self.shared.limit
    }

    /// Takes a token for one call as the layer's service would, or fails with [`Error::RateLimited`] (counted),
    /// for a stack that admits calls itself, such as the inbound one.
    pub fn take(&self) -> Result<(), Error> {
        self.shared.take()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;

    fn layer(&self, inner: S) -> RateLimited<S> {
        RateLimited { inner, shared: self.shared.clone() }
    }
}

/// The rate-limiting service ([`RateLimitLayer`]).
#[derive(Clone)]
pub struct RateLimited<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for RateLimited<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimited").field("limit", &self.shared.limit).finish()
    }
}

impl<S, Req> Service<Req> for RateLimited<S>
where
    S: Service<Req, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = Error;
    type Future = Either<S::Future, Ready<Result<S::Response, Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.shared.take() {
            Ok(()) => Either::Left(self.inner.call(request)),
            Err(error) => Either::Right(futures_util::future::ready(Err(error))),
        }
    }
}

impl Shared {
    /// Takes a token for one call, or says when to come back (counted).
    fn take(&self) -> Result<(), Error> {
        self.limiter.check().map_err(|not_until| {
            crate::stats::count(&self.stats.rate_limited);
            let retry_after = not_until.wait_time_from(self.limiter_now());
            Error::RateLimited { target: self.target.to_string(), limit: Box::new(self.limit.clone()), retry_after }
        })
    }

    fn limiter_now(&self) -> Duration {
        // The limiter's clock is private to it; its epoch is when it was made, as `TokioClock` counts.
        self.limiter.clock().now()
    }
}
