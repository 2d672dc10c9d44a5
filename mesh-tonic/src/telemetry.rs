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
use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
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
                Propagation::TraceContext => Box::new(TraceContextPropagator::new()),
                Propagation::B3Single => Box::new(opentelemetry_propagator_b3::Propagator::with_encoding(B3Encoding::SingleHeader)),
                Propagation::B3Multi => Box::new(opentelemetry_propagator_b3::Propagator::with_encoding(B3Encoding::MultipleHeader)),
            }
        })
        .collect();
    TextMapCompositePropagator::new(propagators)
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
