use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::endpoint::Handle;

/// Counts a request as in flight on its endpoint until dropped.
pub(super) struct InFlight(Arc<dyn Counted>);

trait Counted: Send + Sync {
    fn end(&self);
}

impl<B: Send + 'static> Counted for Handle<B> {
    fn end(&self) {
        Handle::end(self);
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

/// Response body of a balanced request. The request counts as in flight on
/// its endpoint until the body ends or is dropped.
pub struct ResponseBody {
    inner: Incoming,
    in_flight: Option<InFlight>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").field("in_flight", &self.in_flight.is_some()).finish()
    }
}

impl ResponseBody {
    pub(super) fn new(inner: Incoming, in_flight: InFlight) -> Self {
        Self { inner, in_flight: Some(in_flight) }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // The request ends with the body's last frame: trailers are always last in HTTP/2, and a body without
        // them ends when it yields `None` or is dropped. Not `is_end_stream()`: on HTTP/2 it takes the
        // connection-wide stream lock, which every call on the connection contends for.
        let last = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Pending => false,
        };
        if last {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
