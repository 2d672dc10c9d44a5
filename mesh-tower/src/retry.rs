//! Retries: a call that failed with a retryable status is sent again, on another endpoint where one exists,
//! after a backoff, within a budget.
//!
//! Semantics are gRPC's (A6) and Envoy's:
//! - a call is retried when its response's head carries a gRPC status in the policy's `retry_on` (a
//!   trailers-only response: a response with data is committed and never retried), or when it failed in the
//!   stack with an error whose code is in `retry_on` (a lost connection, no ready endpoint). A call dropped by
//!   the load balancer (`drop_overloads`) or turned away by a circuit breaker is never retried;
//! - at most `max_attempts` attempts in all, the first included; each bounded by `per_try_timeout` when set,
//!   and an attempt that timeout ends is retried (Envoy's per-try timeout; gRPC has none);
//! - before attempt `n + 1`, a backoff drawn uniformly from `[0, min(max_backoff, base_backoff × 2^(n-1)))`
//!   (full jitter; 25 ms base and 250 ms cap by default, as Envoy);
//! - a server's `grpc-retry-pushback-ms` replaces the backoff; a negative or malformed one stops retries (A6);
//! - each attempt prefers an endpoint no earlier attempt used ([`PreviousAttempts`]);
//! - every retry withdraws from its cluster's [`Budget`] (a share of recent calls plus a floor per second,
//!   Linkerd's semantics, with the numbers of the cluster's Envoy `retry_budget`), so a failing backend cannot
//!   turn calls into a retry storm;
//! - the request body is replayed from what the stack recorded ([`crate::replay`]); a body past the replay
//!   limit is not retried, and never sent twice in part.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use mesh_core::lb::{Random, SplitMix64};
use mesh_core::policy::{CircuitBreakers, HttpRetryOn, RetryBudget, RetryPolicy};
use tower::{Layer, Service, ServiceExt};

use crate::Error;
use crate::balance::{PreviousAttempts, ResponseBody, ServedBy};
use crate::classify::{self, Outcome};
use crate::deadline::Deadline;
use crate::replay::{HeadCopy, ReplayBody};
use crate::stats::{CallAttempts, ClusterStats};

/// A cluster's retry budget, shared by every route's retries to it. Cheap to clone; clones share it.
///
/// A rate budget always; and when the cluster sets no `retry_budget`, Envoy's `max_retries` threshold too, a cap
/// on retries in flight at once (Envoy uses one or the other; a cluster without a budget gets both here).
#[derive(Clone)]
pub struct Budget(Arc<BudgetInner>);

struct BudgetInner {
    rate: RateBudget,
    /// Envoy's `max_retries`: most retries in flight at once; `None` when the rate budget replaces it.
    max_concurrent: Option<u32>,
    in_flight: AtomicU32,
}

impl Budget {
    /// A budget with `settings`' numbers (out-of-range ones are brought to the nearest bound: validation
    /// happens at the edge, and a budget never panics).
    pub fn new(settings: &RetryBudget) -> Self {
        Self::with_cap(settings, None)
    }

    /// A cluster's budget: its `retry_budget`, or, without one, the default rate budget and its `max_retries`.
    pub fn for_cluster(breakers: &CircuitBreakers) -> Self {
        match &breakers.retry_budget {
            Some(budget) => Self::new(budget),
            None => Self::with_cap(&RetryBudget::default(), Some(breakers.max_retries)),
        }
    }

    fn with_cap(settings: &RetryBudget, max_concurrent: Option<u32>) -> Self {
        Self(Arc::new(BudgetInner { rate: RateBudget::new(settings), max_concurrent, in_flight: AtomicU32::new(0) }))
    }

    /// Records a call.
    pub(crate) fn deposit(&self) {
        self.0.rate.deposit();
    }

    /// Takes one retry (or hedge) from the rate budget, if it allows one.
    pub(crate) fn withdraw(&self) -> bool {
        self.0.rate.withdraw()
    }

    /// A place for one retry in flight, if `max_retries` leaves one (always, without the cap).
    pub(crate) fn start_retry(&self) -> Option<InFlightRetry> {
        let inner = &self.0;
        if let Some(max) = inner.max_concurrent
            && inner.in_flight.fetch_add(1, Ordering::Relaxed) >= max
        {
            inner.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(InFlightRetry(inner.max_concurrent.map(|_| self.0.clone())))
    }
}

/// Linkerd's rate budget, lock-free on tokio's clock: retries in the last `window` stay under `ratio` of the
/// calls in it plus `min_per_second` × the window. Calls and retries are counted in ten slots of a tenth of
/// the window each, a slot reused when its time comes round again. Two retries decided at once may both pass
/// the last place; the budget is a bound on load, not an exact count.
///
/// A call is counted in the slot last read from the clock, which the first [`CLOCK_EVERY`] calls of a slot,
/// every [`CLOCK_EVERY`]th call after them, and every retry read. So fewer than [`CLOCK_EVERY`] calls in a row
/// (when traffic slows after a busy slot) can be counted in an older slot than their own, and a call counted
/// in an older slot leaves the window early: the budget can only come out smaller.
struct RateBudget {
    calls: Slots,
    retries: Slots,
    ratio: f64,
    floor: f64,
    epoch: tokio::time::Instant,
    slot: Duration,
    /// The slot calls are counted in: the newest slot number read from the clock.
    current: AtomicU64,
}

/// Calls of a slot that read the clock each, and then calls between two readings (see [`RateBudget`]).
const CLOCK_EVERY: u64 = 16;

/// Counts per slot of time: each packs the slot's number (high 32 bits) and its count (low 32 bits).
struct Slots([AtomicU64; SLOTS]);

const SLOTS: usize = 10;

impl RateBudget {
    fn new(settings: &RetryBudget) -> Self {
        let window = settings.window.clamp(RetryBudget::MIN_WINDOW, RetryBudget::MAX_WINDOW);
        Self {
            calls: Slots(Default::default()),
            retries: Slots(Default::default()),
            ratio: settings.ratio.clamp(0.0, 1.0),
            floor: f64::from(settings.min_per_second) * window.as_secs_f64(),
            epoch: tokio::time::Instant::now(),
            slot: window / SLOTS as u32,
            current: AtomicU64::new(1),
        }
    }

    /// The current slot's number (counted from 1, so an untouched slot, numbered 0, is never current).
    fn now(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() / self.slot.as_nanos().max(1)) as u64 + 1
    }

    /// The current slot's number, read from the clock, and kept as the one calls are counted in.
    fn tick(&self) -> u64 {
        let now = self.now();
        self.current.fetch_max(now, Ordering::Relaxed);
        now
    }

    fn deposit(&self) {
        let current = self.current.load(Ordering::Relaxed);
        if self.calls.count(current) < CLOCK_EVERY {
            self.calls.add(self.tick());
        } else if self.calls.add(current).is_multiple_of(CLOCK_EVERY) {
            self.tick();
        }
    }

    fn withdraw(&self) -> bool {
        let now = self.tick();
        let allowed = self.ratio * self.calls.sum(now) as f64 + self.floor;
        if (self.retries.sum(now) as f64) < allowed {
            self.retries.add(now);
            true
        } else {
            false
        }
    }
}

impl Slots {
    /// Counts one in slot `now`; returns the slot's count with it.
    fn add(&self, now: u64) -> u64 {
        let slot = &self.0[now as usize % SLOTS];
        let stamp = (now as u32 as u64) << 32;
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            if current & !0xffff_ffff == stamp {
                return (slot.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff) + 1;
            }
            // A slot last used a window (or more) ago starts over.
            match slot.compare_exchange_weak(current, stamp | 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return 1,
                Err(seen) => current = seen,
            }
        }
    }

    /// The count of slot `now` (0 when the slot holds an older one's).
    fn count(&self, now: u64) -> u64 {
        let packed = self.0[now as usize % SLOTS].load(Ordering::Relaxed);
        if packed >> 32 == now as u32 as u64 { packed & 0xffff_ffff } else { 0 }
    }

    /// Counts of the slots within the window ending at slot `now`.
    fn sum(&self, now: u64) -> u64 {
        let oldest = now.saturating_sub(SLOTS as u64 - 1) as u32;
        self.0
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .filter(|packed| {
                let stamp = (packed >> 32) as u32;
                stamp >= oldest && stamp <= now as u32 && stamp != 0
            })
            .map(|packed| packed & 0xffff_ffff)
            .sum()
    }
}

/// A retry's place under `max_retries`, given back when dropped.
pub(crate) struct InFlightRetry(Option<Arc<BudgetInner>>);

impl Drop for InFlightRetry {
    fn drop(&mut self) {
        if let Some(inner) = &self.0 {
            inner.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::new(&RetryBudget::default())
    }
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Budget")
    }
}

/// A retry policy over a budget, shared by every call through it.
#[derive(Clone)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

struct Shared {
    policy: RetryPolicy,
    budget: Budget,
    stats: Arc<ClusterStats>,
    seed: AtomicU64,
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer").field("policy", &self.shared.policy).finish()
    }
}

impl RetryLayer {
    /// Retries under `policy`, within a budget of its own with the default numbers.
    pub fn new(policy: RetryPolicy) -> Self {
        Self::within(policy, Budget::default(), Arc::default())
    }

    /// Retries under `policy` within `budget`, counted in `stats` (a cluster's: [`crate::cluster::Cluster`]).
    pub fn within(policy: RetryPolicy, budget: Budget, stats: Arc<ClusterStats>) -> Self {
        Self { shared: Arc::new(Shared { policy, budget, stats, seed: AtomicU64::new(0x7e7) }) }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry { inner, shared: self.shared.clone() }
    }
}

/// The retry service ([`RetryLayer`]).
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry").field("policy", &self.shared.policy).finish()
    }
}

/// Whether an attempt's result asks for another attempt, and after what wait.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Final: hand the result to the caller.
    Done,
    /// Retry after the policy's backoff.
    Backoff,
    /// Retry after the server's pushback.
    Pushback(Duration),
}

/// What an attempt's result says, under a policy retrying `retry_on` and the `http` conditions (the hedging
/// layer reads it too, with no HTTP conditions).
pub(crate) fn verdict(
    retry_on: &[mesh_core::GrpcCode],
    http: &HttpRetryOn,
    result: &Result<http::Response<ResponseBody>, Error>,
) -> Verdict {
    let retryable = |code| retry_on.contains(&code);
    match result {
        Ok(response) => {
            let (code, headers) = match classify::head(response) {
                Some(Outcome::Grpc(code)) => (code, response.headers()),
                Some(Outcome::Http(status)) if http.retries_status(status) => return Verdict::Backoff,
                // A non-gRPC error answer (a proxy's 503) has the code gRPC's HTTP table gives it.
                Some(Outcome::Http(status)) if status >= 300 => (mesh_core::GrpcCode::from_http_status(status), response.headers()),
                _ => return Verdict::Done,
            };
            if !retryable(code) {
                return Verdict::Done;
            }
            match headers.get("grpc-retry-pushback-ms") {
                None => Verdict::Backoff,
                Some(value) => match std::str::from_utf8(value.as_bytes()).ok().and_then(|v| v.trim().parse::<i64>().ok()) {
                    Some(ms) if ms >= 0 => Verdict::Pushback(Duration::from_millis(ms as u64)),
                    // A6: a negative or malformed pushback means "do not retry".
                    _ => Verdict::Done,
                },
            }
        }
        Err(
            Error::Dropped { .. }
            | Error::Overflow { .. }
            | Error::PendingOverflow { .. }
            | Error::ConcurrencyLimited { .. }
            | Error::Deadline { .. },
        ) => Verdict::Done,
        // An attempt the per-try timeout ended is what that timeout is for: it is retried (Envoy).
        Err(Error::AttemptTimeout { .. }) => Verdict::Backoff,
        // No answer at all: Envoy's `reset` and `connect-failure`, both under `5xx`.
        Err(Error::Upstream { .. }) if http.reset || http.five_xx => Verdict::Backoff,
        Err(Error::Connect { .. } | Error::Handshake { .. } | Error::AllEndpointsFailed { .. }) if http.connect_failure || http.five_xx => {
            Verdict::Backoff
        }
        Err(error) if retryable(error.grpc_code()) => Verdict::Backoff,
        Err(_) => Verdict::Done,
    }
}

impl Shared {
    /// Full-jitter exponential backoff before attempt `attempt + 1` (`attempt` ≥ 1).
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.policy.base_backoff.as_secs_f64();
        let cap = self.policy.max_backoff.as_secs_f64().max(base);
        let ceiling = (base * 2f64.powi(attempt.saturating_sub(1).min(30) as i32)).min(cap);
        let mut rng = SplitMix64::new(self.seed.fetch_add(1, Ordering::Relaxed));
        let unit = rng.next_u64() as f64 / u64::MAX as f64;
        Duration::from_secs_f64(ceiling * unit)
    }
}

impl<S, B> Service<http::Request<ReplayBody<B>>> for Retry<S>
where
    S: Service<http::Request<ReplayBody<B>>, Response = http::Response<ResponseBody>, Error = Error> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<ResponseBody>;
    type Error = Error;
    type Future = BoxFuture<'static, Result<http::Response<ResponseBody>, Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReplayBody<B>>) -> Self::Future {
        // The ready clone serves the first attempt; later ones take fresh clones and wait for readiness.
        let fresh = self.inner.clone();
        let mut first = std::mem::replace(&mut self.inner, fresh);
        let retries = self.inner.clone();
        self.start(request, move |request| first.call(request), retries)
    }
}

impl<B: crate::balance::RequestBody> Retry<crate::cluster::ClusterService<B>> {
    /// A call through a cluster's retries by reference: the first attempt is sent from here, and the call
    /// holds one clone of the cluster for any retry (what [`crate::cluster::ClusterService`] uses, with no
    /// boxed boundary of its own).
    pub(crate) fn send(&self, request: http::Request<ReplayBody<B>>) -> BoxFuture<'static, Result<http::Response<ResponseBody>, Error>> {
        self.start(request, |request| self.inner.send(request), self.inner.clone())
    }
}

impl<S> Retry<S> {
    /// A call: its first attempt made by `first`, its retries through `retries` (each waiting for readiness).
    fn start<B, F>(
        &self,
        request: http::Request<ReplayBody<B>>,
        first: impl FnOnce(http::Request<ReplayBody<B>>) -> F,
        retries: S,
    ) -> BoxFuture<'static, Result<http::Response<ResponseBody>, Error>>
    where
        S: Service<http::Request<ReplayBody<B>>, Response = http::Response<ResponseBody>, Error = Error> + Clone + Send + 'static,
        S::Future: Send,
        B: Send + 'static,
        F: std::future::Future<Output = Result<http::Response<ResponseBody>, Error>> + Send + 'static,
    {
        let shared = self.shared.clone();
        shared.budget.deposit();
        let deadline = request.extensions().get::<Deadline>().copied();
        let recorder = request.body().recorder();
        let (head, body) = request.into_parts();
        let copy = HeadCopy::new(&head);
        let per_try = shared.policy.per_try_timeout;
        let first = within(per_try, first(http::Request::from_parts(head, body)));
        Box::pin(async move {
            let mut result = first.await;
            let mut previous: Vec<SocketAddr> = Vec::new();
            // Retries sent, the time spent backing off between attempts, and the transparent retries of the
            // attempts that did not answer the call (A96).
            let (mut retried, mut backed_off, mut transparent) = (0u32, Duration::ZERO, 0u32);
            for attempt in 1.. {
                let wait = match verdict(&shared.policy.retry_on, &shared.policy.http_retry_on, &result) {
                    Verdict::Done => break,
                    Verdict::Backoff => shared.backoff(attempt),
                    Verdict::Pushback(wait) => wait,
                };
                if attempt >= shared.policy.max_attempts {
                    break;
                }
                let Some(again) = recorder.try_clone().and_then(|body| copy.request(body)) else {
                    // The body went past the replay limit: it cannot be sent again whole.
                    break;
                };
                // Under the caller's deadline, no attempt starts that the backoff would leave no time for.
                if deadline.is_some_and(|d| d.0.saturating_duration_since(tokio::time::Instant::now()) <= wait) {
                    break;
                }
                let Some(in_flight) = shared.budget.start_retry() else {
                    crate::stats::count(&shared.stats.retry_overflows);
                    tracing::debug!(attempt, "max_retries retries in flight; not retrying");
                    break;
                };
                if !shared.budget.withdraw() {
                    crate::stats::count(&shared.stats.retry_budget_exhausted);
                    tracing::debug!(attempt, "retry budget exhausted; not retrying");
                    break;
                }
                match &result {
                    Ok(response) => {
                        previous.extend(response.extensions().get::<ServedBy>().map(|s| s.0));
                        transparent += CallAttempts::transparent_in(response);
                    }
                    Err(Error::Upstream { addr, .. }) => previous.push(*addr),
                    Err(_) => {}
                }
                drop(result);
                crate::stats::count(&shared.stats.retries);
                tracing::debug!(attempt, ?wait, "retrying");
                tokio::time::sleep(wait).await;
                retried += 1;
                backed_off += wait;
                let mut again = again;
                again.extensions_mut().insert(PreviousAttempts(previous.clone()));
                if let Some(deadline) = deadline {
                    // The server gets the caller's remaining time.
                    let left = deadline.0.saturating_duration_since(tokio::time::Instant::now());
                    again.headers_mut().insert(crate::deadline::GRPC_TIMEOUT, crate::deadline::format(left));
                    again.extensions_mut().insert(deadline);
                }
                result = within(per_try, retries.clone().oneshot(again)).await;
                drop(in_flight);
            }
            if retried > 0
                && let Ok(response) = &mut result
            {
                CallAttempts::add(response, |a| {
                    a.retries += retried;
                    a.backed_off += backed_off;
                    a.transparent_retries += transparent;
                });
            }
            result
        })
    }
}

/// One attempt, ended by the per-try timeout when there is one (counted from now, when the attempt starts).
fn within<F>(limit: Option<Duration>, attempt: F) -> impl std::future::Future<Output = Result<http::Response<ResponseBody>, Error>>
where
    F: std::future::Future<Output = Result<http::Response<ResponseBody>, Error>>,
{
    use futures_util::FutureExt;
    match limit {
        None => futures_util::future::Either::Left(attempt),
        Some(limit) => futures_util::future::Either::Right(
            tokio::time::timeout(limit, attempt).map(move |result| result.unwrap_or(Err(Error::AttemptTimeout { limit }))),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64) -> RateBudget {
        RateBudget::new(&RetryBudget { ratio, min_per_second: 0, window: Duration::from_secs(10) })
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_clusters_calls_count_in_their_own_slots() {
        let budget = budget(1.0);
        budget.deposit();
        tokio::time::sleep(Duration::from_secs(3)).await;
        budget.deposit();
        // The first call has left the 10 s window; the second, counted in its own slot, has not.
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(budget.withdraw(), "one call in the window allows one retry");
        assert!(!budget.withdraw(), "and only one");
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_clusters_calls_count_in_the_window_without_a_clock_read_each() {
        let budget = budget(0.5);
        for _ in 0..1000 {
            budget.deposit();
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        for _ in 0..1000 {
            budget.deposit();
        }
        let retries = std::iter::repeat_with(|| budget.withdraw()).take(2000).filter(|&allowed| allowed).count();
        assert_eq!(retries, 1000, "half of the 2,000 calls in the window");
        // The first thousand leave the window, and with them the few of the second counted in their slot
        // before the clock was read again.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let calls = budget.calls.sum(budget.tick());
        assert!((1001 - CLOCK_EVERY..=1000).contains(&calls), "{calls} calls in the window");
    }
}
