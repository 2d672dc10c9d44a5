//! Hedging (gRPC A6's hedging policy; Envoy's `hedge_on_per_try_timeout`): when a call's attempt has not
//! answered after the policy's delay, another attempt is sent, without cancelling the first; the first final
//! answer wins and the others are cancelled (dropped, so their streams are reset).
//!
//! - At most `max_attempts` in all; each after the first waits `delay` after the one before.
//! - An answer with a non-fatal status (the policy's `non_fatal`, gRPC's `nonFatalStatusCodes`) does not end
//!   the call while other attempts may still answer, and sends the next attempt at once. When every attempt
//!   has answered non-fatally, the last answer is the call's.
//! - Every hedge withdraws from the cluster's retry budget, as retries do; a budget that says no stops hedging.
//! - The body is replayed from the router's record ([`crate::replay`]); a body past the replay limit is not
//!   hedged.
//! - Each hedge is counted in the cluster's `hedges`, and in the call's answer ([`CallAttempts`]).
//!
//! It wraps each of the route's clusters below the split, as retries do, and replaces them there: a route
//! hedges or retries (A6).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use mesh_core::policy::{HedgePolicy, HttpRetryOn};
use tower::{Layer, Service, ServiceExt};

use crate::Error;
use crate::balance::ResponseBody;
use crate::replay::{HeadCopy, ReplayBody};
use crate::retry::{Budget, Verdict, verdict};
use crate::stats::{CallAttempts, ClusterStats};

/// A hedging policy over a cluster's budget.
#[derive(Clone)]
pub struct HedgeLayer {
    shared: Arc<Shared>,
}

struct Shared {
    policy: HedgePolicy,
    budget: Budget,
    stats: Arc<ClusterStats>,
}

impl fmt::Debug for HedgeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeLayer").field("policy", &self.shared.policy).finish()
    }
}

impl HedgeLayer {
    /// Hedges under `policy` within `budget`, counted in `stats` (a cluster's: [`crate::cluster::Cluster`]).
    pub fn within(policy: HedgePolicy, budget: Budget, stats: Arc<ClusterStats>) -> Self {
        Self { shared: Arc::new(Shared { policy, budget, stats }) }
    }
}

impl<S> Layer<S> for HedgeLayer {
    type Service = Hedge<S>;

    fn layer(&self, inner: S) -> Hedge<S> {
        Hedge { inner, shared: self.shared.clone() }
    }
}

/// The hedging service ([`HedgeLayer`]).
#[derive(Clone)]
pub struct Hedge<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for Hedge<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge").field("policy", &self.shared.policy).finish()
    }
}

type Attempt = BoxFuture<'static, Result<http::Response<ResponseBody>, Error>>;

impl<S, B> Service<http::Request<ReplayBody<B>>> for Hedge<S>
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
        let fresh = self.inner.clone();
        let first = std::mem::replace(&mut self.inner, fresh);
        let (shared, more) = (self.shared.clone(), self.inner.clone());
        Box::pin(async move {
            shared.budget.deposit();
            let (head, body) = request.into_parts();
            let recorder = body.recorder();
            let copy = HeadCopy::new(&head);
            let mut attempts: FuturesUnordered<Attempt> = FuturesUnordered::new();
            attempts.push(Box::pin({ first }.call(http::Request::from_parts(head, body))));
            let mut sent = 1;
            let owned = shared.clone();
            let policy = &owned.policy;
            // The next hedge, while one may still be sent.
            let mut next = Some(Box::pin(tokio::time::sleep(policy.delay)));
            // Sends one more attempt if the policy, the budget and the body allow; says whether it did.
            let hedge = move |attempts: &mut FuturesUnordered<Attempt>, sent: &mut u32| {
                if *sent >= shared.policy.max_attempts {
                    return false;
                }
                let Some(again) = recorder.try_clone().and_then(|body| copy.request(body)) else { return false };
                if !shared.budget.withdraw() {
                    crate::stats::count(&shared.stats.retry_budget_exhausted);
                    return false;
                }
                crate::stats::count(&shared.stats.hedges);
                *sent += 1;
                attempts.push(Box::pin(more.clone().oneshot(again)));
                true
            };
            let mut last = None;
            loop {
                tokio::select! {
                    Some(result) = attempts.next() => {
                        if verdict(&policy.non_fatal, &HttpRetryOn::default(), &result) == Verdict::Done {
                            // The winner: the attempts still out are dropped with `attempts`, which cancels them.
                            return hedged(result, sent);
                        }
                        last = Some(result);
                        let sent_now = hedge(&mut attempts, &mut sent);
                        if sent_now {
                            next = (sent < policy.max_attempts).then(|| Box::pin(tokio::time::sleep(policy.delay)));
                        } else if attempts.is_empty() {
                            break;
                        }
                    }
                    () = async { next.as_mut().expect("checked").await }, if next.is_some() => {
                        next = (hedge(&mut attempts, &mut sent) && sent < policy.max_attempts)
                            .then(|| Box::pin(tokio::time::sleep(policy.delay)));
                    }
                    else => break,
                }
            }
            hedged(
                last.unwrap_or_else(|| Err(Error::Layer { target: String::new(), source: "hedging ended with no attempt".into() })),
                sent,
            )
        })
    }
}

/// The call's answer, with the hedges sent beside its first attempt on record.
fn hedged(mut result: Result<http::Response<ResponseBody>, Error>, sent: u32) -> Result<http::Response<ResponseBody>, Error> {
    if sent > 1
        && let Ok(response) = &mut result
    {
        CallAttempts::add(response, |a| a.hedges += sent - 1);
    }
    result
}
