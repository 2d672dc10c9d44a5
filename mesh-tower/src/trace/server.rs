//! The server span of a call: a layer over an HTTP service, from the request to the end of its response body.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use opentelemetry::trace::SpanKind;

use super::{LiveSpan, Tracer};
use crate::classify::{self, Outcome};

/// Reads the caller's address from a request's extensions (the server puts it there: tonic's `TcpConnectInfo`,
/// say).
pub type PeerAddress = fn(&http::Extensions) -> Option<SocketAddr>;

/// A layer that traces each call to an HTTP service in a server span ([`crate::trace`]): a child of the context
/// the request's headers carry, current while the inner service runs and while its response body is polled.
/// One made without a tracer passes calls through untraced.
#[derive(Clone, Debug, Default)]
pub struct ServerTraceLayer {
    tracer: Option<Tracer>,
    peer: Option<PeerAddress>,
}

impl ServerTraceLayer {
    /// Traces with `tracer`.
    pub fn new(tracer: Tracer) -> Self {
        Self { tracer: Some(tracer), peer: None }
    }

    /// Traces with the [`super::default_tracer`]; not at all when there is none.
    pub fn default_tracer() -> Self {
        Self { tracer: super::default_tracer(), peer: None }
    }

    /// This layer, naming the caller (`network.peer.address`, `network.peer.port`) by what `peer` reads from
    /// each request's extensions.
    pub fn peer_address(mut self, peer: PeerAddress) -> Self {
        self.peer = Some(peer);
        self
    }
}

impl<S> tower::Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> ServerTrace<S> {
        ServerTrace { inner, layer: self.clone() }
    }
}

/// A server service traced by [`ServerTraceLayer`].
#[derive(Clone, Debug)]
pub struct ServerTrace<S> {
    inner: S,
    layer: ServerTraceLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for ServerTrace<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = http::Response<ServerTraceBody<R>>;
    type Error = S::Error;
    type Future = ServerTraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(tracer) = &self.layer.tracer else {
            return ServerTraceFuture { inner: self.inner.call(request), span: None };
        };
        let span = LiveSpan::start(tracer, SpanKind::Server, &tracer.extract(request.headers()));
        if let Some(recording) = span.recording() {
            super::describe(&recording, &request);
            if let Some(addr) = self.layer.peer.and_then(|peer| peer(request.extensions())) {
                super::peer(&recording, addr);
            }
        }
        let inner = {
            let _current = span.cx.clone().map(opentelemetry::Context::attach);
            self.inner.call(request)
        };
        ServerTraceFuture { inner, span: Some(span) }
    }
}

pin_project_lite::pin_project! {
    /// Future of a [`ServerTrace`] call.
    pub struct ServerTraceFuture<F> {
        #[pin]
        inner: F,
        span: Option<LiveSpan>,
    }
}

impl<F, R, E> Future for ServerTraceFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = Result<http::Response<ServerTraceBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = {
            let _current = current(this.span);
            std::task::ready!(this.inner.poll(cx))
        };
        let span = this.span.take();
        Poll::Ready(match response {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let end = classify::BodyEnd::new(&parts);
                Ok(http::Response::from_parts(parts, ServerTraceBody { inner: body, end, span }))
            }
            Err(error) => {
                if let Some(span) = span {
                    span.end(Outcome::Grpc(mesh_core::GrpcCode::Internal), None);
                }
                Err(error)
            }
        })
    }
}

/// Makes a span's context current until the guard is dropped (the span ending when it does, or not at all).
fn current(span: &Option<LiveSpan>) -> Option<opentelemetry::ContextGuard> {
    span.as_ref().and_then(|span| span.cx.clone()).map(opentelemetry::Context::attach)
}

pin_project_lite::pin_project! {
    /// A server response body that ends its call's span when it ends (or is dropped: `CANCELLED`).
    pub struct ServerTraceBody<B> {
        #[pin]
        inner: B,
        end: classify::BodyEnd,
        span: Option<LiveSpan>,
    }

    impl<B> PinnedDrop for ServerTraceBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let (Some(span), Some(outcome)) = (this.span.take(), this.end.dropped()) {
                span.end(outcome, None);
            }
        }
    }
}

impl<B: Body<Data = Bytes>> Body for ServerTraceBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        // A streaming handler's calls are made as its body is polled.
        let polled = {
            let _current = current(this.span);
            this.inner.poll_frame(cx)
        };
        if this.span.is_some()
            && let Some(outcome) = this.end.polled(&polled)
            && let Some(span) = this.span.take()
        {
            span.end(outcome, None);
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
