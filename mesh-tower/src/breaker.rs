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

use futures_util::future::Either;
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

/// Envoy's `max_pending_requests`: the cap on calls waiting in a balancer for a ready endpoint.
pub(crate) struct MaxPending {
    cluster: Arc<str>,
    max_pending: u32,
    stats: Arc<ClusterStats>,
}

impl Cap for MaxPending {
    fn limit(&self) -> u32 {
        self.max_pending
    }

    fn refused(&self, limit: u32) -> Error {
        crate::stats::count(&self.stats.overflows);
        Error::PendingOverflow { cluster: self.cluster.to_string(), limit }
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
        Self { gate: Gate::max_requests(cluster, max_requests, stats) }
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> u32 {
        self.gate.in_flight()
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Capped<S, MaxRequests>;

    fn layer(&self, inner: S) -> Self::Service {
        Capped { inner, gate: self.gate.clone() }
    }
}

/// A cap and the calls counted under it (in flight for the breaker and the adaptive limit, waiting for a
/// ready endpoint for `max_pending_requests`).
pub struct Gate<C> {
    pub(crate) cap: C,
    in_flight: AtomicU32,
}

impl<C> Gate<C> {
    pub(crate) fn new(cap: C) -> Arc<Self> {
        Arc::new(Self { cap, in_flight: AtomicU32::new(0) })
    }
}

impl Gate<MaxRequests> {
    /// The breaker's gate: at most `max_requests` calls in flight to `cluster` (the balancer holds one when
    /// its cluster sets `max_requests`: [`crate::balance::BalancerConfig::max_requests`]).
    pub(crate) fn max_requests(cluster: &str, max_requests: u32, stats: Arc<ClusterStats>) -> Arc<Self> {
        Self::new(MaxRequests { cluster: cluster.into(), max_requests, stats })
    }
}

impl Gate<MaxPending> {
    /// The gate of the calls waiting in `cluster`'s balancer
    /// ([`crate::balance::BalancerConfig::max_pending_requests`]).
    pub(crate) fn max_pending(cluster: &str, max_pending: u32, stats: Arc<ClusterStats>) -> Arc<Self> {
        Self::new(MaxPending { cluster: cluster.into(), max_pending, stats })
    }
}

impl<C: Cap> Gate<C> {
    /// A place for one call, or the error of a call over the cap (counted).
    pub(crate) fn admit(self: &Arc<Self>) -> Result<Place, Error> {
        let limit = self.cap.limit();
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= limit {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(self.cap.refused(limit));
        }
        Ok(Place { count: self.clone(), also: None })
    }

    /// Calls in flight under it now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
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

/// The count of calls in flight a [`Place`] is taken from (a gate's, whatever its cap).
trait Count: Send + Sync {
    fn counter(&self) -> &AtomicU32;
}

impl<C: Send + Sync> Count for Gate<C> {
    fn counter(&self) -> &AtomicU32 {
        &self.in_flight
    }
}

/// One call's place under a cap, given back when dropped: the response body holds it until it ends. The gate's
/// own reference, not a box: taking a place allocates nothing.
pub(crate) struct Place {
    count: Arc<dyn Count>,
    /// Another cap's place held with it (a call under both the adaptive limit and the breaker).
    also: Option<Box<Place>>,
}

impl Place {
    /// This place and `other`, held and given back together.
    pub(crate) fn and(mut self, other: Place) -> Place {
        self.also = Some(Box::new(other));
        self
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.count.counter().fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A call under the cap ([`Capped`]): the inner call's future, then its response holding the place.
    pub struct CappedFuture<F, C> {
        #[pin]
        call: F,
        place: Option<Place>,
        // When the cap learns from latency (the adaptive limit): the start and the gate to tell.
        timing: Option<(tokio::time::Instant, Arc<Gate<C>>)>,
    }
}

impl<F, C> std::future::Future for CappedFuture<F, C>
where
    F: std::future::Future<Output = Result<http::Response<ResponseBody>, Error>>,
    C: Cap,
{
    type Output = Result<http::Response<ResponseBody>, Error>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.call.poll(cx))?;
        if let Some((started, gate)) = this.timing.take() {
            gate.cap.answered(started.elapsed());
        }
        // The place is held until the response body ends.
        Poll::Ready(Ok(match this.place.take() {
            Some(place) => response.map(|body| body.holding(place)),
            None => response,
        }))
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
    type Future = Either<std::future::Ready<Result<http::Response<ResponseBody>, Error>>, CappedFuture<S::Future, C>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let gate = &self.gate;
        let place = match gate.admit() {
            Ok(place) => place,
            Err(error) => return Either::Left(std::future::ready(Err(error))),
        };
        let timing = gate.cap.timed().then(|| (tokio::time::Instant::now(), gate.clone()));
        Either::Right(CappedFuture { call: self.inner.call(request), place: Some(place), timing })
    }
}
