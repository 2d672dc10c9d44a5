//! Traces out of the process, and the server layers tonic servers take.
//!
//! [`Tracing::otlp`] builds an OpenTelemetry SDK tracer provider that exports spans over OTLP/gRPC (the
//! OpenTelemetry Rust project's `opentelemetry-otlp`, on the workspace's tonic), samples with a parent-based
//! ratio sampler (a call whose caller sent a sampling decision follows it; a root call is sampled at the
//! ratio), and propagates with the chosen [`Propagation`]s. [`Otlp::install`] makes it the global provider and
//! propagator and turns tracing on for the channels and servers built from then on
//! ([`mesh_tower::trace::trace_into_global_provider`]); [`Otlp::build`] leaves the globals alone, for a
//! [`Tracing::tracer`] handed to a channel or layer explicitly.
//!
//! [`server_layer`] is what a tonic server of the mesh puts in front of its services: the server metrics
//! ([`mesh_tower::telemetry::ServerMetricsLayer`]) and the server span ([`mesh_tower::trace::ServerTraceLayer`])
//! of each call, each on its default (off until the application installs a provider).
//!
//! ```no_run
//! # async fn run() -> mesh_tonic::Result<()> {
//! use mesh_tonic::telemetry::{Propagation, Tracing};
//!
//! // 1% of the calls that start here; every call a sampled caller started.
//! let tracing = Tracing::otlp("http://127.0.0.1:4317", 0.01)
//!     .propagation(&[Propagation::TraceContext, Propagation::B3Multi])
//!     .service_name("checkout")
//!     .install()?;
//! // ... build channels and servers, serve ...
//! tracing.shutdown()?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;

use mesh_tower::telemetry::ServerMetricsLayer;
use mesh_tower::trace::ServerTraceLayer;
use opentelemetry::propagation::text_map_propagator::FieldIter;
use opentelemetry::propagation::{Extractor, Injector, TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt as _, TraceFlags, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_propagator_b3::B3Encoding;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

use crate::{Error, Result};

/// How a call's trace context travels in its headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Propagation {
    /// W3C Trace Context: `traceparent` and `tracestate`.
    TraceContext,
    /// B3 in one `b3` header (Zipkin).
    B3Single,
    /// B3 in `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`… (Zipkin; what Istio's sidecars forward).
    B3Multi,
}

/// One propagator for all of `propagation`: each is injected; each is extracted, a later one's context over an
/// earlier one's.
fn propagator(propagation: &[Propagation]) -> TextMapCompositePropagator {
    let propagators = propagation
        .iter()
        .map(|p| -> Box<dyn TextMapPropagator + Send + Sync> {
            match p {
                Propagation::TraceContext => Box::new(TraceContext::default()),
                Propagation::B3Single => Box::new(opentelemetry_propagator_b3::Propagator::with_encoding(B3Encoding::SingleHeader)),
                Propagation::B3Multi => Box::new(opentelemetry_propagator_b3::Propagator::with_encoding(B3Encoding::MultipleHeader)),
            }
        })
        .collect();
    TextMapCompositePropagator::new(propagators)
}

/// W3C Trace Context: the SDK's propagator, with `traceparent` written without `format!` (which formatting a
/// 128-bit trace id in hex made the larger part of what an unsampled call paid for tracing).
#[derive(Debug, Default)]
struct TraceContext(TraceContextPropagator);

impl TextMapPropagator for TraceContext {
    fn inject_context(&self, cx: &opentelemetry::Context, injector: &mut dyn Injector) {
        let span = cx.span();
        let context = span.span_context();
        if context.is_valid() {
            injector.set("traceparent", traceparent(context));
            injector.set("tracestate", context.trace_state().header());
        }
    }

    fn extract_with_context(&self, cx: &opentelemetry::Context, extractor: &dyn Extractor) -> opentelemetry::Context {
        self.0.extract_with_context(cx, extractor)
    }

    fn fields(&self) -> FieldIter<'_> {
        self.0.fields()
    }
}

/// A span context's `traceparent` value: version `00`, trace id, span id, and the sampled flag alone.
fn traceparent(context: &SpanContext) -> String {
    fn hex(value: &mut String, bytes: &[u8]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for b in bytes {
            value.push(char::from(DIGITS[usize::from(b >> 4)]));
            value.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
    }
    let flags = context.trace_flags() & TraceFlags::SAMPLED;
    let mut value = String::with_capacity(55);
    value.push_str("00-");
    hex(&mut value, &context.trace_id().to_bytes());
    value.push('-');
    hex(&mut value, &context.span_id().to_bytes());
    value.push('-');
    hex(&mut value, &[flags.to_u8()]);
    value
}

/// Settings of an OTLP trace pipeline ([`Tracing::otlp`]).
#[derive(Clone, Debug)]
pub struct Otlp {
    endpoint: String,
    ratio: f64,
    propagation: Vec<Propagation>,
    service_name: Option<String>,
}

impl Otlp {
    /// How calls carry their context (default: W3C Trace Context alone). An empty list propagates nothing.
    pub fn propagation(mut self, propagation: &[Propagation]) -> Self {
        self.propagation = propagation.to_vec();
        self
    }

    /// The `service.name` of the spans' resource (default: the SDK's, from `OTEL_SERVICE_NAME` or
    /// `unknown_service`).
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// Builds the provider without touching the globals. Needs a tokio runtime (the exporter's connection
    /// lives on it); spans are exported in batches from a thread of the SDK's.
    pub fn build(self) -> Result<Tracing> {
        if !(0.0..=1.0).contains(&self.ratio) {
            return Err(Error::Tracing(format!("sampling ratio {} is not between 0 and 1", self.ratio)));
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(self.endpoint.clone())
            .build()
            .map_err(|e| Error::Tracing(format!("OTLP exporter to {}: {e}", self.endpoint)))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if let Some(name) = self.service_name {
            resource = resource.with_service_name(name);
        }
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(self.ratio))))
            .with_resource(resource.build())
            .with_batch_exporter(exporter)
            .build();
        Ok(Tracing { provider, propagation: self.propagation })
    }

    /// Builds the provider ([`Otlp::build`]) and installs it as the global tracer provider, its propagator as
    /// the global propagator, and tracing as the default of the channels and servers built from now on.
    pub fn install(self) -> Result<Tracing> {
        let tracing = self.build()?;
        opentelemetry::global::set_tracer_provider(tracing.provider.clone());
        opentelemetry::global::set_text_map_propagator(propagator(&tracing.propagation));
        mesh_tower::trace::trace_into_global_provider();
        Ok(tracing)
    }
}

/// An OpenTelemetry SDK tracer provider exporting over OTLP.
#[derive(Clone, Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    propagation: Vec<Propagation>,
}

impl Tracing {
    /// A pipeline exporting to the OTLP/gRPC collector at `endpoint` (`http://host:4317`), sampling
    /// `sampler_ratio` (0 to 1) of the traces that start in this process.
    pub fn otlp(endpoint: impl Into<String>, sampler_ratio: f64) -> Otlp {
        Otlp { endpoint: endpoint.into(), ratio: sampler_ratio, propagation: vec![Propagation::TraceContext], service_name: None }
    }

    /// The provider's `mesh` tracer with the pipeline's propagators, for
    /// [`ChannelBuilder::tracer`](crate::ChannelBuilder::tracer) and
    /// [`ServerTraceLayer::new`].
    pub fn tracer(&self) -> mesh_tower::trace::Tracer {
        mesh_tower::trace::Tracer::new(self.provider.tracer(mesh_tower::telemetry::SCOPE)).with_propagator(propagator(&self.propagation))
    }

    /// Exports every span ended so far. Blocks until the exporter has answered: call it off the runtime's
    /// threads (`spawn_blocking`).
    pub fn force_flush(&self) -> Result<()> {
        self.provider.force_flush().map_err(|e| Error::Tracing(format!("flushing spans: {e}")))
    }

    /// Exports what is left and stops exporting. Blocks like [`Tracing::force_flush`].
    pub fn shutdown(&self) -> Result<()> {
        self.provider.shutdown().map_err(|e| Error::Tracing(format!("shutting the trace exporter down: {e}")))
    }
}

/// The caller's address of a request a tonic server accepted (its `TcpConnectInfo`, behind TLS or not).
pub fn tonic_peer(extensions: &http::Extensions) -> Option<SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let tcp = extensions.get::<TcpConnectInfo>().or_else(|| extensions.get::<TlsConnectInfo<TcpConnectInfo>>().map(|tls| tls.get_ref()));
    // The mesh's own servers (`crate::Server`, `serve_mtls`) put the caller's address on requests as is.
    tcp.and_then(TcpConnectInfo::remote_addr).or_else(|| extensions.get::<SocketAddr>().copied())
}

/// The server layers of the mesh, on their defaults: the metrics and the server span of each call (outermost),
/// the span naming the caller by [`tonic_peer`]. For tonic's `Server::layer` or a `tower::ServiceBuilder`.
pub fn server_layer() -> tower::layer::util::Stack<ServerMetricsLayer, ServerTraceLayer> {
    tower::layer::util::Stack::new(ServerMetricsLayer::default_meter(), ServerTraceLayer::default_tracer().peer_address(tonic_peer))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use opentelemetry::trace::{SpanId, TraceId, TraceState};

    use super::*;

    fn injected(propagator: &dyn TextMapPropagator, context: SpanContext) -> HashMap<String, String> {
        let mut headers = HashMap::new();
        propagator.inject_context(&opentelemetry::Context::new().with_remote_span_context(context), &mut headers);
        headers
    }

    #[test]
    fn traceparent_is_written_as_the_sdks_propagator_writes_it_and_read_back() {
        let state = TraceState::from_key_value([("vendor", "value")]).unwrap();
        let contexts = [
            SpanContext::new(
                TraceId::from(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c),
                SpanId::from(0xb7ad_6b71_6920_3331),
                TraceFlags::SAMPLED,
                true,
                state,
            ),
            SpanContext::new(TraceId::from(1), SpanId::from(u64::MAX), TraceFlags::new(0xff), true, TraceState::default()),
            SpanContext::new(TraceId::from(u128::MAX), SpanId::from(1), TraceFlags::default(), false, TraceState::default()),
            SpanContext::empty_context(),
        ];
        for context in contexts {
            let ours = injected(&TraceContext::default(), context.clone());
            assert_eq!(ours, injected(&TraceContextPropagator::new(), context.clone()), "{context:?}");
            if context.is_valid() {
                let back = TraceContext::default().extract(&ours);
                let back = back.span().span_context().clone();
                assert_eq!(
                    (back.trace_id(), back.span_id(), back.is_sampled()),
                    (context.trace_id(), context.span_id(), context.is_sampled())
                );
            } else {
                assert!(ours.is_empty(), "an invalid context propagates nothing");
            }
        }
    }
}
