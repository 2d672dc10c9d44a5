//! Circuit breaking: a cap on a cluster's concurrent requests (Envoy's `max_requests` threshold, gRPC A32).
//!
//! A call over the cap fails at once with [`Error::Overflow`] (UNAVAILABLE, naming the cluster and the limit)
//! and is never retried. A call counts from when it is sent until its response body ends or is dropped, so a
//! stream counts for as long as it lasts.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tower::{Layer, Service};

use crate::Error;
use crate::balance::ResponseBody;
use crate::stats::ClusterStats;

/// Caps a cluster's concurrent requests.
#[derive(Clone)]
pub struct BreakerLayer {
    shared: Arc<Shared>,
}

struct Shared {
    cluster: Arc<str>,
    max_requests: u32,
    in_flight: AtomicU32,
    stats: Arc<ClusterStats>,
}

impl fmt::Debug for BreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerLayer").field("cluster", &self.shared.cluster).field("max_requests", &self.shared.max_requests).finish()
    }
}

impl BreakerLayer {
    /// At most `max_requests` calls in flight to `cluster`, each one turned away counted in `stats`.
    pub fn new(cluster: &str, max_requests: u32, stats: Arc<ClusterStats>) -> Self {
        let shared = Shared { cluster: cluster.into(), max_requests, in_flight: AtomicU32::new(0), stats };
        Self { shared: Arc::new(shared) }
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> u32 {
        self.shared.in_flight.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;

    fn layer(&self, inner: S) -> Breaker<S> {
        Breaker { inner, shared: self.shared.clone() }
    }
}

/// The circuit-breaking service ([`BreakerLayer`]).
#[derive(Clone)]
pub struct Breaker<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for Breaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker").field("cluster", &self.shared.cluster).finish()
    }
}

/// One call's place under the cap, given back when dropped.
struct Permit(Arc<Shared>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, Req> Service<Req> for Breaker<S>
where
    S: Service<Req, Response = http::Response<ResponseBody>, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ResponseBody>;
    type Error = Error;
    type Future = BoxFuture<'static, Result<http::Response<ResponseBody>, Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let shared = &self.shared;
        if shared.in_flight.fetch_add(1, Ordering::Relaxed) >= shared.max_requests {
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            crate::stats::count(&shared.stats.overflows);
            let error = Error::Overflow { cluster: shared.cluster.to_string(), limit: shared.max_requests };
            return Box::pin(std::future::ready(Err(error)));
        }
        let permit = Permit(shared.clone());
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            // The place is held until the response body ends.
            Ok(response.map(|body| body.holding(Box::new(permit))))
        })
    }
}
