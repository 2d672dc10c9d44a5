//! The request path: drop, pick, send, re-pick or resend, wait when nothing is ready.

use std::sync::Arc;

use mesh_core::LbPolicy;

use super::body::{Counting, InFlight, ResponseBody};
use super::{Delay, DelayKind, PreviousAttempts, RequestBody, ServedBy, State, lock};
use crate::classify::{self, Failure};
use crate::connect::Connect;
use crate::replay::{HeadCopy, ReplayBody};
use crate::{Error, Result};

/// How many times one call is resent transparently after a server refused it unprocessed. gRPC (A6) resends a
/// refused RPC once and one that never left the client without limit; one refusal per endpoint of a small
/// rolling restart, plus one, bounds both without letting a call bounce forever.
const MAX_RESENDS: u32 = 4;

impl<B: RequestBody, C: Connect> State<ReplayBody<B>, C> {
    /// Sends one request: pick, send, re-pick when the connection was closed before the request was written,
    /// resend when the server refused it unprocessed ([`refused`]), wait when nothing is ready. The body is
    /// recorded by the caller ([`super::Balancer::send_replay`]). Under the cluster's `max_requests`, the call
    /// takes its place at its first pick (gRPC A32: after the drop check, and a call waiting for a ready
    /// endpoint is not yet counted), keeps it through re-picks and resends, and its response body holds it.
    pub(super) async fn call_replay(self: Arc<Self>, request: http::Request<ReplayBody<B>>) -> Result<http::Response<ResponseBody>> {
        let hash = self.request_hash(&request);
        let decay = match self.config.lb {
            LbPolicy::P2cEwma { decay, .. } => Some(decay),
            _ => None,
        };
        // The body records what it sends, and a copy of the head is kept, so a refused request can go again
        // whole: hyper consumes the request it sends.
        let (head, body) = request.into_parts();
        // Endpoints an earlier attempt of this call (a retry) went to: picked only when nothing else is ready.
        let avoid = head.extensions.get::<PreviousAttempts>().map(|p| p.0.clone());
        let recorder = body.recorder();
        let copy = HeadCopy::new(&head);
        let mut request = http::Request::from_parts(head, body);
        let mut resends = 0;
        // Sends again of a request the connection gave back unwritten (not bounded: it never left).
        let mut unsent_again = 0;
        // Drops are decided once per call, at its first pick; re-picks and resends do not draw again.
        let mut drop_checked = false;
        // Set when the call first has to wait: (receiver, deadline, start, what it waits for).
        let mut waiting: Option<(tokio::sync::watch::Receiver<u64>, tokio::time::Instant, tokio::time::Instant, DelayKind)> = None;
        // How long the pick waited, once an endpoint was picked after waiting.
        let mut delay = None;
        // The call's place among the calls waiting for an endpoint, held while it waits (given back at its pick).
        let mut pending = None;
        // The call's place under `max_requests`, taken at its first pick.
        let mut place = None;
        loop {
            // Pick under the snapshot's read lock, taking only the chosen handle: one reference-count
            // increment and decrement fewer per call than cloning the snapshot (shared atomics that every
            // concurrent call bounces between cores).
            let picked = {
                let snapshot = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
                if !drop_checked {
                    drop_checked = true;
                    if let Some(category) = self.dropped(&snapshot) {
                        return Err(Error::Dropped { target: self.target.clone(), category: category.to_owned() });
                    }
                }
                let mut picked = self.pick(&snapshot, hash);
                // A few more draws for an endpoint ejected since this snapshot was made (at the failure that
                // tripped it, before the detector republished), or one an earlier attempt of the call used
                // (Envoy's previous-hosts predicate); then take what the last draw gave.
                for _ in 0..3 {
                    match picked {
                        Some(handle) if handle.is_ejected() || avoid.as_ref().is_some_and(|a| a.contains(&handle.addr())) => {
                            picked = self.pick(&snapshot, hash)
                        }
                        _ => break,
                    }
                }
                picked.cloned().ok_or((snapshot.all_failed, snapshot.endpoints.len()))
            };
            let (all_failed, known) = match picked {
                Ok(handle) => {
                    pending = None;
                    if place.is_none()
                        && let Some(gate) = &self.breaker
                    {
                        place = Some(gate.admit()?);
                    }
                    if delay.is_none() {
                        delay = waiting.as_ref().map(|(_, _, started, kind)| Delay { kind: *kind, waited: started.elapsed() });
                    }
                    let sent = if decay.is_some() { self.now() } else { Default::default() };
                    let (response, peer) = match handle.send(request) {
                        Ok(sent) => sent,
                        Err(unsent) => {
                            // Raced with a disconnect: the next snapshot will not offer it.
                            request = unsent;
                            self.mark_broken(&handle);
                            continue;
                        }
                    };
                    let counting = Counting::begin(&handle);
                    match response.await {
                        Ok(response) => {
                            if let Some(decay) = decay {
                                let now = self.now();
                                handle.observe(now.saturating_sub(sent), now, decay);
                            }
                            let (mut parts, body) = response.into_parts();
                            let addr = handle.addr();
                            parts.extensions.insert(ServedBy(addr));
                            if let Some(delay) = delay {
                                parts.extensions.insert(delay);
                            }
                            if let Some(peer) = peer {
                                parts.extensions.insert(peer);
                            }
                            if resends + unsent_again > 0 {
                                let transparent_retries = resends + unsent_again;
                                parts.extensions.insert(crate::stats::CallAttempts { transparent_retries, ..Default::default() });
                            }
                            let pending = classify::pending(&parts);
                            counting.disarm();
                            let mut body = ResponseBody::new(body, pending, addr, InFlight::started(handle));
                            if let Some(place) = place.take() {
                                body = body.holding(place);
                            }
                            return Ok(http::Response::from_parts(parts, body));
                        }
                        Err(mut error) => {
                            drop(counting);
                            if let Some(unsent) = error.take_message() {
                                tracing::debug!(target_name = %self.target, addr = %handle.addr(), "connection closed before send; re-picking");
                                unsent_again += 1;
                                request = unsent;
                                self.mark_broken(&handle);
                                continue;
                            }
                            let error = error.into_error();
                            let Some(refusal) = refused(&error) else {
                                return Err(upstream(&handle, error));
                            };
                            if refusal == Refusal::GoAway {
                                // The connection takes no new streams: pick elsewhere until it is replaced.
                                self.mark_broken(&handle);
                            }
                            let again = (resends < MAX_RESENDS).then(|| recorder.try_clone()).flatten().and_then(|body| copy.request(body));
                            let Some(again) = again else {
                                return Err(upstream(&handle, error));
                            };
                            resends += 1;
                            tracing::debug!(target_name = %self.target, addr = %handle.addr(), ?refusal, resends, "refused unprocessed; resending");
                            request = again;
                            continue;
                        }
                    }
                }
                Err(unpicked) => unpicked,
            };
            // Every endpoint failed its last connect (a connect error is on record then): fail fast.
            if all_failed && let Some(last_error) = lock(&self.last_error).clone() {
                return Err(Error::AllEndpointsFailed { target: self.target.clone(), count: known, last_error });
            }
            // Subscribe before re-reading the snapshot so no change is missed.
            if pending.is_none()
                && let Some(gate) = &self.pending
            {
                pending = Some(gate.admit()?);
            }
            let Some((rx, deadline, started, kind)) = waiting.as_mut() else {
                let started = tokio::time::Instant::now();
                let kind = if known == 0 { DelayKind::Discovery } else { DelayKind::Connecting };
                waiting = Some((self.changed.subscribe(), started + self.config.ready_timeout, started, kind));
                continue;
            };
            // Endpoints found while waiting: from then on the call waits for their connections.
            if known > 0 {
                *kind = DelayKind::Connecting;
            }
            if tokio::time::timeout_at(*deadline, rx.changed()).await.is_err() {
                return Err(Error::NoReadyEndpoint { target: self.target.clone(), waited: started.elapsed(), known });
            }
        }
    }
}

/// A call that failed on `handle`'s endpoint after it was sent: classified, and counted as the endpoint's
/// failure.
fn upstream<B>(handle: &super::handle::Handle<B>, error: hyper::Error) -> Error {
    let failure = Failure::of(&error);
    handle.record(true, true);
    Error::Upstream { addr: handle.addr(), failure, source: error.into() }
}

/// How a server turned a request away before processing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// The connection is going away: the stream was above the last one the server's GOAWAY let through, or
    /// was opened after the GOAWAY arrived (h2 then never sends it).
    GoAway,
    /// RST_STREAM with REFUSED_STREAM: the server did no work on it (RFC 9113 §8.7).
    RefusedStream,
}

/// Whether `error` says the server never processed the request, so that sending it again is safe (gRPC A6
/// transparent retry). h2 gives a stream the peer's GOAWAY error only when the stream was above the GOAWAY's last
/// stream id or opened after it; a stream the server had accepted and that broke later ends with an I/O or
/// reset error instead, and is never resent here.
fn refused(error: &hyper::Error) -> Option<Refusal> {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            if !h2.is_remote() {
                return None;
            }
            if h2.is_go_away() {
                return Some(Refusal::GoAway);
            }
            return (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)).then_some(Refusal::RefusedStream);
        }
        source = cause.source();
    }
    None
}
