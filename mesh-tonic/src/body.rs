//! The response body tonic reads: the stack's, with its transport errors mapped to a status once.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use mesh_tower::classify::Outcome;
use tonic::Status;

use crate::status_from;

/// Response body of a [`Channel`](crate::Channel) call. An error while reading it (the stream reset, the
/// connection lost) is the status [`status_from`] gives the stack's error, so tonic reports the same code
/// whether the call failed before its response or in the middle of it.
#[derive(Debug)]
pub struct ResponseBody(mesh_tower::balance::ResponseBody);

impl ResponseBody {
    pub(crate) fn new(inner: mesh_tower::balance::ResponseBody) -> Self {
        Self(inner)
    }

    /// What became of the call, once the body has ended ([`mesh_tower::classify`]).
    pub fn outcome(&self) -> Option<Outcome> {
        self.0.outcome()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.0).poll_frame(cx).map(|frame| frame.map(|frame| frame.map_err(status_from)))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}
