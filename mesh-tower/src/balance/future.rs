use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::ResponseBody;
use crate::Result;

type Inner = Pin<Box<dyn Future<Output = Result<http::Response<ResponseBody>>> + Send>>;

/// Future of a [`Balancer`](super::Balancer) call.
pub struct ResponseFuture {
    inner: Inner,
}

impl ResponseFuture {
    pub(super) fn new(inner: Inner) -> Self {
        Self { inner }
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<ResponseBody>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
