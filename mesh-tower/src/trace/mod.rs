//! Per-call traces through the `opentelemetry` API: the application picks the SDK, sampler and exporter
//! (mesh-tonic's `telemetry::Tracing` installs an OTLP one), as for metrics ([`crate::telemetry`]).
//!
//! - Client: the router starts a span per call ([`crate::route::Router`], kind `CLIENT`), a child of the
//!   call's [`Parent`] when the caller set one (mesh-tonic's channel sets the caller's current context, since
//!   a call may be routed on another task), else of the current context. It ends where the response body
//!   finds its last frame, with the one response classification ([`crate::classify`]) as its status; a body
//!   dropped before its end is `CANCELLED`. Retries and hedges are attempts within it.
//! - Server: [`ServerTraceLayer`] starts a span per call (kind `SERVER`), a child of the context its
//!   request's headers carry, and makes it the current context while the inner service is polled, so a call
//!   the handler makes through a mesh channel is a child of it.
//! - Propagation: the tracer's [`TextMapPropagator`] (W3C `traceparent`/`tracestate`, B3, or several),
//!   injected into the request's headers by the client and extracted by the server. By default the global
//!   propagator, which the application sets with its provider.
//!
//! Spans carry OpenTelemetry's RPC semantic conventions: `rpc.system` (`grpc`), `rpc.service`, `rpc.method`,
//! `rpc.grpc.status_code` (`http.response.status_code` for a plain HTTP call), `server.address` and
//! `server.port` (the request's authority), and `network.peer.address` / `network.peer.port` (the endpoint
//! the client reached, or the caller a server saw), plus the mesh's `mesh.route` and the cluster as
//! `grpc.lb.backend_service` (gRFC A89), as the metrics name them. A client span's status is an error for any
//! status but `OK`; a server span's for the codes that say the server failed (UNKNOWN, DEADLINE_EXCEEDED,
//! UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS), as the conventions say.
//!
//! Off until asked: channels and servers trace with [`default_tracer`], which is none until
//! [`trace_into_global_provider`] is called, so a process that exports nothing pays nothing. A span that
//! is not sampled costs its context and the propagation headers: its attributes are only made for a
//! span that records.

mod client;
mod server;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, SpanRef, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};

pub use client::Parent;
pub(crate) use client::{CallSpan, InCall};
pub use server::{PeerAddress, ServerTrace, ServerTraceBody, ServerTraceFuture, ServerTraceLayer};

use crate::classify::Outcome;

/// A tracer and the propagator its calls carry their context with. Cheap to clone.
#[derive(Clone)]
pub struct Tracer {
    tracer: Arc<opentelemetry::global::BoxedTracer>,
    /// `None`: the global propagator.
    propagator: Option<Arc<dyn TextMapPropagator + Send + Sync>>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").field("propagator", &self.propagator).finish()
    }
}

impl Tracer {
    /// Traces with `tracer` (an SDK provider's, say), propagating with the global propagator.
    pub fn new<T>(tracer: T) -> Self
    where
        T: opentelemetry::trace::Tracer + Send + Sync + 'static,
        T::Span: Send + Sync + 'static,
    {
        Self { tracer: Arc::new(opentelemetry::global::BoxedTracer::new(Box::new(tracer))), propagator: None }
    }

    /// The global tracer provider's `mesh` tracer and the global propagator.
    pub fn global() -> Self {
        Self { tracer: Arc::new(opentelemetry::global::tracer(crate::telemetry::SCOPE)), propagator: None }
    }

    /// This tracer, propagating with `propagator` instead of the global one.
    pub fn with_propagator(mut self, propagator: impl TextMapPropagator + Send + Sync + 'static) -> Self {
        self.propagator = Some(Arc::new(propagator));
        self
    }

    fn inject(&self, cx: &Context, headers: &mut http::HeaderMap) {
        let mut injector = Headers(headers);
        match &self.propagator {
            Some(propagator) => propagator.inject_context(cx, &mut injector),
            None => opentelemetry::global::get_text_map_propagator(|p| p.inject_context(cx, &mut injector)),
        }
    }

    /// The remote context `headers` carry (a context without a span when they carry none).
    fn extract(&self, headers: &http::HeaderMap) -> Context {
        let extractor = HeadersRef(headers);
        let root = Context::new();
        match &self.propagator {
            Some(propagator) => propagator.extract_with_context(&root, &extractor),
            None => opentelemetry::global::get_text_map_propagator(|p| p.extract_with_context(&root, &extractor)),
        }
    }
}

/// Whether channels and servers trace into the global provider by default ([`trace_into_global_provider`]).
static GLOBAL: AtomicBool = AtomicBool::new(false);

/// Makes the channels and server layers built from now on trace with [`Tracer::global`] by default. Call it
/// after installing a tracer provider and propagator (mesh-tonic's `telemetry::Tracing` does). Until then they
/// trace nothing and pay nothing.
pub fn trace_into_global_provider() {
    GLOBAL.store(true, Ordering::Relaxed);
}

/// The tracer channels and servers trace with by default: the global one once [`trace_into_global_provider`]
/// was called, else none.
pub fn default_tracer() -> Option<Tracer> {
    GLOBAL.load(Ordering::Relaxed).then(Tracer::global)
}

/// Sets a recording span's name and the attributes known from its request: `rpc.*` from the path
/// (`/package.Service/Method`), `server.address`/`server.port` from the authority.
fn describe<B>(span: &SpanRef<'_>, request: &http::Request<B>) {
    let path = request.uri().path();
    let name = path.strip_prefix('/').unwrap_or(path);
    span.update_name(name.to_owned());
    let (service, method) = name.rsplit_once('/').unwrap_or(("", name));
    let mut attributes = vec![
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", service.to_owned()),
        KeyValue::new("rpc.method", method.to_owned()),
    ];
    // A server's request carries the authority in its URI over HTTP/2, in `host` over HTTP/1.
    let authority = request.uri().authority().cloned().or_else(|| request.headers().get(http::header::HOST)?.to_str().ok()?.parse().ok());
    if let Some(authority) = authority {
        attributes.push(KeyValue::new("server.address", authority.host().to_owned()));
        if let Some(port) = authority.port_u16() {
            attributes.push(KeyValue::new("server.port", i64::from(port)));
        }
    }
    span.set_attributes(attributes);
}

/// Sets a recording span's peer attributes.
fn peer(span: &SpanRef<'_>, peer: SocketAddr) {
    span.set_attributes([
        KeyValue::new("network.peer.address", peer.ip().to_string()),
        KeyValue::new("network.peer.port", i64::from(peer.port())),
    ]);
}

/// A started span in its context, ended once: by [`LiveSpan::end`], or as `CANCELLED` when dropped first.
#[derive(Debug)]
pub(crate) struct LiveSpan {
    cx: Option<Context>,
    kind: SpanKind,
}

impl LiveSpan {
    /// Starts a span of `kind` as a child of `parent`, named for now by a constant: a recording one is
    /// renamed ([`describe`]), so a span that is not sampled allocates no name.
    fn start(tracer: &Tracer, kind: SpanKind, parent: &Context) -> Self {
        let span = tracer.tracer.span_builder("rpc").with_kind(kind.clone()).start_with_context(&*tracer.tracer, parent);
        // A span that does not record is only its context: the context alone carries it (the API would box the
        // boxed span again and lock it to do nothing).
        let cx = if span.is_recording() { parent.with_span(span) } else { parent.with_remote_span_context(span.span_context().clone()) };
        Self { cx: Some(cx), kind }
    }

    /// The span, when it records.
    fn recording(&self) -> Option<SpanRef<'_>> {
        self.cx.as_ref().map(TraceContextExt::span).filter(SpanRef::is_recording)
    }

    /// Ends the span with the call's outcome, on `peer` (`None`: unknown, or set already).
    pub(crate) fn end(mut self, outcome: Outcome, peer: Option<SocketAddr>) {
        self.finish(outcome, peer);
    }

    fn finish(&mut self, outcome: Outcome, peer: Option<SocketAddr>) {
        let Some(cx) = self.cx.take() else { return };
        let span = cx.span();
        if span.is_recording() {
            if let Some(addr) = peer {
                self::peer(&span, addr);
            }
            span.set_attribute(match outcome {
                Outcome::Http(code) => KeyValue::new("http.response.status_code", i64::from(code)),
                other => KeyValue::new("rpc.grpc.status_code", i64::from(other.grpc_code().as_i32())),
            });
            // The conventions: any status but OK fails a client's call; a server's fails on the codes that say
            // the server failed (those an HTTP 5xx stands for), not on the caller's mistakes.
            let failed = match (outcome, &self.kind) {
                (Outcome::Grpc(code), SpanKind::Client) => code != mesh_core::GrpcCode::Ok,
                (Outcome::Http(code), SpanKind::Client) => code >= 400,
                (outcome, _) => outcome.is_failure(),
            };
            if failed {
                let description = match outcome {
                    Outcome::Failed(failure) => failure.to_string(),
                    Outcome::Http(code) => format!("HTTP {code}"),
                    Outcome::Grpc(code) => code.name().to_owned(),
                };
                span.set_status(Status::error(description));
            }
            // Ending a span that does not record has no effect: it is skipped (it would read the clock).
            span.end();
        }
    }
}

impl Drop for LiveSpan {
    /// A call dropped before its end was cancelled.
    fn drop(&mut self) {
        self.finish(Outcome::Grpc(mesh_core::GrpcCode::Cancelled), None);
    }
}

/// Request headers as a propagator's carrier.
struct Headers<'a>(&'a mut http::HeaderMap);

/// The propagators' header names, made once (a name parsed per call would be allocated per call).
fn header_name(key: &str) -> Option<http::HeaderName> {
    const KNOWN: [&str; 7] = ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"];
    static NAMES: std::sync::LazyLock<[http::HeaderName; 7]> = std::sync::LazyLock::new(|| KNOWN.map(http::HeaderName::from_static));
    match KNOWN.iter().position(|known| *known == key) {
        Some(i) => Some(NAMES[i].clone()),
        None => http::HeaderName::from_bytes(key.as_bytes()).ok(),
    }
}

impl Injector for Headers<'_> {
    /// Sets `key`; an empty value (an empty `tracestate`) removes it instead, so a stale one does not travel.
    fn set(&mut self, key: &str, value: String) {
        let Some(name) = header_name(key) else { return };
        if value.is_empty() {
            self.0.remove(name);
        } else if let Ok(value) = http::HeaderValue::try_from(value) {
            self.0.insert(name, value);
        }
    }
}

struct HeadersRef<'a>(&'a http::HeaderMap);

impl Extractor for HeadersRef<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
