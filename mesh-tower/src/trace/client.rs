//! The client span of a call: started by the router, ended by the response body.

use std::net::SocketAddr;
use std::sync::Arc;

use opentelemetry::trace::{SpanKind, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};

use super::{LiveSpan, Tracer};
use crate::classify::Outcome;

/// A request extension: the context a call's client span is a child of. Without it the span is a child of
/// the current context where the router is called, which is not the caller's when calls reach the router
/// through a queue served by another task (mesh-tonic's channel sets it for that reason).
#[derive(Clone, Debug)]
pub struct Parent(pub Context);

/// A request extension below the router, on a call whose span records: the call's context, for the layers
/// that add to its span (the split names the cluster it chose).
#[derive(Clone, Debug)]
pub(crate) struct InCall(Context);

impl InCall {
    /// Names the cluster a call was sent to on its span (A89's attribute, as the metrics name it).
    pub(crate) fn cluster(&self, cluster: &str) {
        self.0.span().set_attribute(KeyValue::new("grpc.lb.backend_service", cluster.to_owned()));
    }
}

/// A call's client span.
#[derive(Debug)]
pub(crate) struct CallSpan(LiveSpan);

impl CallSpan {
    /// Starts the span of `request`'s call and injects its context into the request's headers.
    pub(crate) fn start<B>(tracer: &Tracer, request: &mut http::Request<B>) -> Self {
        let parent = request.extensions_mut().remove::<Parent>().map_or_else(Context::current, |p| p.0);
        let span = LiveSpan::start(tracer, SpanKind::Client, &parent);
        if let Some(cx) = &span.cx {
            tracer.inject(cx, request.headers_mut());
            let recording = cx.span();
            if recording.is_recording() {
                super::describe(&recording, request);
                request.extensions_mut().insert(InCall(cx.clone()));
            }
        }
        Self(span)
    }

    /// Names the route the call took.
    pub(crate) fn route(&self, route: &Arc<str>) {
        if let Some(span) = self.0.recording() {
            span.set_attribute(KeyValue::new("mesh.route", route.clone()));
        }
    }

    /// Adds a `delay` event: how long the call waited before it was sent, and for what (A121).
    pub(crate) fn delayed(&self, delay: &crate::balance::Delay) {
        if let Some(span) = self.0.recording() {
            let attributes = vec![
                KeyValue::new("grpc.delay_type", delay.kind.name()),
                KeyValue::new("grpc.delay.duration_s", delay.waited.as_secs_f64()),
            ];
            span.add_event("delay", attributes);
        }
    }

    /// The span's trace id (32 hex digits), when it has a valid context.
    pub(crate) fn trace_id(&self) -> Option<String> {
        let cx = self.0.cx.as_ref()?;
        let span = cx.span();
        let context = span.span_context();
        context.is_valid().then(|| context.trace_id().to_string())
    }

    /// Ends the span with the call's outcome, on `peer` (`None`: it reached no endpoint).
    pub(crate) fn end(self, outcome: Outcome, peer: Option<SocketAddr>) {
        self.0.end(outcome, peer);
    }
}
