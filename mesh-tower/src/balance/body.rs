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
    pub(super) fn new<B: Send + 'static>(handle: Arc<Handle<B>>) -> Self {
        handle.begin();
        Self(handle)
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
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) || self.inner.is_end_stream() {
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
