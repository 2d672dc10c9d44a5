//! Circuit breaking: a cap on a cluster's concurrent requests (Envoy's `max_requests` threshold, gRPC A32).
//!
//! A call over the cap fails at once with [`Error::Overflow`] (UNAVAILABLE, naming the cluster and the limit)
//! and is never retried. A call counts from when it is sent until its response body ends or is dropped, so a
//! stream counts for as long as it lasts.
//!
//! The counting is [`Capped`], shared with the adaptive concurrency limit ([`crate::adaptive`]): a [`Cap`]
//! says what the limit is now, what a call over it fails with, and what an answered call's latency teaches it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tower::{Layer, Service};

use crate::Error;
use crate::balance::ResponseBody;
use crate::stats::ClusterStats;

/// What a [`Capped`] service's limit is.
pub trait Cap: Send + Sync + 'static {
    /// The limit on calls in flight now.
    fn limit(&self) -> u32;
    /// The error of a call turned away at `limit` (counted here).
    fn refused(&self, limit: u32) -> Error;
    /// Whether [`Cap::answered`] wants latencies (the clock is read per call only then).
    fn timed(&self) -> bool {
        false
    }
    /// An answered call took `latency` to its response head.
    fn answered(&self, _latency: Duration) {}
}

/// Caps a cluster's concurrent requests at `max_requests`.
#[derive(Clone)]
pub struct BreakerLayer {
    gate: Arc<Gate<MaxRequests>>,
}

/// The fixed cap of a [`BreakerLayer`].
pub struct MaxRequests {
    cluster: Arc<str>,
    max_requests: u32,
    stats: Arc<ClusterStats>,
}

impl Cap for MaxRequests {
    fn limit(&self) -> u32 {
        self.max_requests
    }

    fn refused(&self, limit: u32) -> Error {
        crate::stats::count(&self.stats.overflows);
        Error::Overflow { cluster: self.cluster.to_string(), limit }
    }
}

impl fmt::Debug for BreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cap = &self.gate.cap;
        f.debug_struct("BreakerLayer").field("cluster", &cap.cluster).field("max_requests", &cap.max_requests).finish()
    }
}

impl BreakerLayer {
    /// At most `max_requests` calls in flight to `cluster`, each one turned away counted in `stats`.
    pub fn new(cluster: &str, max_requests: u32, stats: Arc<ClusterStats>) -> Self {
        Self { gate: Gate::new(MaxRequests { cluster: cluster.into(), max_requests, stats }) }
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> u32 {
        self.gate.in_flight.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Capped<S, MaxRequests>;

    fn layer(&self, inner: S) -> Self::Service {
        Capped { inner, gate: self.gate.clone() }
    }
}

/// A cap and the calls in flight under it.
pub struct Gate<C> {
    pub(crate) cap: C,
    in_flight: AtomicU32,
}

impl<C> Gate<C> {
    pub(crate) fn new(cap: C) -> Arc<Self> {
        Arc::new(Self { cap, in_flight: AtomicU32::new(0) })
    }
}

/// A service whose calls in flight are capped by `C` (the breaker's [`MaxRequests`], or the adaptive limit).
pub struct Capped<S, C> {
    pub(crate) inner: S,
    pub(crate) gate: Arc<Gate<C>>,
}

impl<S: Clone, C> Clone for Capped<S, C> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), gate: self.gate.clone() }
    }
}

impl<S, C> fmt::Debug for Capped<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capped").field("in_flight", &self.gate.in_flight.load(Ordering::Relaxed)).finish()
    }
}

/// One call's place under the cap, given back when dropped.
struct Place<C>(Arc<Gate<C>>);

impl<C> Drop for Place<C> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, C, Req> Service<Req> for Capped<S, C>
where
    S: Service<Req, Response = http::Response<ResponseBody>, Error = Error>,
    S::Future: Send + 'static,
    C: Cap,
{
    type Response = http::Response<ResponseBody>;
    type Error = Error;
    type Future = BoxFuture<'static, Result<http::Response<ResponseBody>, Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let gate = &self.gate;
        let limit = gate.cap.limit();
        if gate.in_flight.fetch_add(1, Ordering::Relaxed) >= limit {
            gate.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Box::pin(std::future::ready(Err(gate.cap.refused(limit))));
        }
        let place = Place(gate.clone());
        let started = gate.cap.timed().then(tokio::time::Instant::now);
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            if let Some(started) = started {
                place.0.cap.answered(started.elapsed());
            }
            // The place is held until the response body ends.
            Ok(response.map(|body| body.holding(Box::new(place))))
        })
    }
}
