use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::handle::Handle;
use crate::Error;
use crate::classify::{self, Failure, Outcome, Pending};
use crate::telemetry::{AttemptRecord, CallRecord, Records};
use crate::trace::CallSpan;

/// Counts a request as in flight on its endpoint until dropped, and records the call's outcome there.
pub(super) struct InFlight(Arc<dyn Counted>);

trait Counted: Send + Sync {
    fn end(&self);
    fn record(&self, outcome: Outcome);
}

impl<B: Send + 'static> Counted for Handle<B> {
    fn end(&self) {
        Handle::end(self);
    }

    fn record(&self, outcome: Outcome) {
        Handle::record(self, outcome.is_failure(), outcome.is_gateway_failure());
    }
}

impl InFlight {
    /// Takes over a request already counted with [`Handle::begin`] (by a [`Counting`] guard, disarmed).
    pub(super) fn started<B: Send + 'static>(handle: Arc<Handle<B>>) -> Self {
        Self(handle)
    }
}

/// Counts a request in flight on a handle while the response is awaited: ends the count if the call is
/// dropped or fails, and is disarmed when the response body takes the count over ([`InFlight::started`]).
/// Borrows the handle, so the call hands its one reference on to the body instead of cloning it.
pub(super) struct Counting<'a, B>(&'a Handle<B>, bool);

impl<'a, B> Counting<'a, B> {
    pub(super) fn begin(handle: &'a Handle<B>) -> Self {
        handle.begin();
        Self(handle, true)
    }

    pub(super) fn disarm(mut self) {
        self.1 = false;
    }
}

impl<B> Drop for Counting<'_, B> {
    fn drop(&mut self) {
        if self.1 {
            self.0.end();
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Response body of a balanced request. The request counts as in flight on its endpoint until the body ends
/// or is dropped. Where the body finds its last frame the call is classified once ([`crate::classify`]):
/// the outcome is counted on the endpoint (a success or a failure) and kept ([`ResponseBody::outcome`]).
pub struct ResponseBody {
    inner: Incoming,
    in_flight: Option<InFlight>,
    /// The endpoint, named in a transport error of the body.
    addr: SocketAddr,
    /// What the head decided, or that the trailers will; the final outcome once the body has ended.
    pending: Pending,
    outcome: Option<Outcome>,
    /// Released when the body ends: a layer's hold on the call (a circuit breaker's place).
    hold: Option<crate::breaker::Place>,
    /// What the telemetry layers record when the body ends ([`crate::telemetry`], [`crate::trace`]); `None`:
    /// metrics and traces off.
    records: Option<Box<Records>>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").field("in_flight", &self.in_flight.is_some()).field("outcome", &self.outcome).finish()
    }
}

impl ResponseBody {
    pub(super) fn new(inner: Incoming, pending: Pending, addr: SocketAddr, in_flight: InFlight) -> Self {
        Self { inner, in_flight: Some(in_flight), addr, pending, outcome: None, hold: None, records: None }
    }

    /// What became of the call, once the body has ended (`None` before, and for a body dropped unread).
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }

    /// This body, releasing `hold` (and any place it holds already) when it ends or is dropped.
    pub(crate) fn holding(mut self, hold: crate::breaker::Place) -> Self {
        // A body under two caps (the adaptive limit over the breaker) holds both places.
        self.hold = Some(match self.hold.take() {
            None => hold,
            Some(held) => hold.and(held),
        });
        self
    }

    /// This body, recording `attempt` when it ends.
    pub(crate) fn with_attempt(mut self, attempt: AttemptRecord) -> Self {
        self.records.get_or_insert_default().attempt = Some(attempt);
        self
    }

    /// This body, recording the call's metrics (`call`) and ending its client span (`span`) when it ends.
    pub(crate) fn with_call(mut self, call: Option<CallRecord>, span: Option<CallSpan>) -> Self {
        if call.is_some() || span.is_some() {
            let records = self.records.get_or_insert_default();
            (records.call, records.span) = (call, span);
        }
        self
    }

    fn finish(&mut self, outcome: Outcome) {
        self.hold = None;
        if let Some(records) = self.records.take() {
            records.end(Some(outcome), self.addr);
        }
        if let Some(in_flight) = self.in_flight.take() {
            in_flight.0.record(outcome);
        }
        self.outcome = Some(outcome);
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped before its end: an outcome its head already decided (a trailers-only status, an HTTP error
        // answer, which a retry drops unread) still counts; one still waiting for its trailers was cancelled.
        if let (Some(in_flight), Pending::Decided(outcome)) = (self.in_flight.take(), self.pending) {
            in_flight.0.record(outcome);
        }
        // A66: a call dropped before its end was cancelled, unless its head had decided it.
        if let Some(records) = self.records.take() {
            let decided = match self.pending {
                Pending::Decided(outcome) => Some(outcome),
                Pending::Trailers => None,
            };
            records.end(decided, self.addr);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // The request ends with the body's last frame: trailers are always last in HTTP/2, and a body without
        // them ends when it yields `None` or is dropped. Not `is_end_stream()`: on HTTP/2 it takes the
        // connection-wide stream lock, which every call on the connection contends for.
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(records), Some(data)) = (self.records.as_mut(), frame.data_ref()) {
                    records.rcvd += data.len() as u64;
                }
                if let Some(trailers) = frame.trailers_ref() {
                    let outcome = match self.pending {
                        Pending::Decided(outcome) => outcome,
                        Pending::Trailers => classify::trailers(Some(trailers)),
                    };
                    self.finish(outcome);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                if self.in_flight.is_some() {
                    let outcome = match self.pending {
                        Pending::Decided(outcome) => outcome,
                        Pending::Trailers => classify::trailers(None),
                    };
                    self.finish(outcome);
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(source))) => {
                let failure = Failure::of(&source);
                self.finish(Outcome::Failed(failure));
                Poll::Ready(Some(Err(Error::Upstream { addr: self.addr, failure, source: source.into() })))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
