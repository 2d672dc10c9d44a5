use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use opentelemetry::trace::{SpanId, Status, TraceContextExt as _, TracerProvider as _};
use opentelemetry::{Context, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tower::{Layer, Service, ServiceExt};

use super::{ServerTraceLayer, Tracer};

/// Keeps every span ended (exported one by one, as it ends).
#[derive(Clone, Debug, Default)]
struct Ended(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Ended {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

impl Ended {
    fn one(&self) -> SpanData {
        let spans = self.0.lock().unwrap();
        assert_eq!(spans.len(), 1, "{spans:?}");
        spans[0].clone()
    }
}

fn tracer() -> (Tracer, Ended, SdkTracerProvider) {
    let ended = Ended::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(ended.clone()).build();
    (Tracer::new(provider.tracer("test")).with_propagator(TraceContextPropagator::new()), ended, provider)
}

fn attribute(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.clone())
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

fn request() -> http::Request<()> {
    http::Request::builder()
        .uri("http://greeter:50051/helloworld.Greeter/SayHello")
        .header("traceparent", format!("00-{TRACE}-{CALLER}-01"))
        .body(())
        .unwrap()
}

type Body = StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A gRPC response whose status comes in its trailers.
fn answer(code: &'static str) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static(code));
    let frames = vec![Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))), Ok(Frame::trailers(trailers))];
    http::Response::builder().header("content-type", "application/grpc").body(StreamBody::new(futures_util::stream::iter(frames))).unwrap()
}

#[tokio::test]
async fn a_server_span_is_the_child_of_the_callers_context_and_current_while_the_handler_runs() {
    let (tracer, ended, _provider) = tracer();
    let current = Arc::new(Mutex::new(None));
    let seen = current.clone();
    let service = tower::service_fn(move |_: http::Request<()>| {
        *seen.lock().unwrap() = Some(Context::map_current(|cx| cx.span().span_context().clone()));
        async { Ok::<_, Infallible>(answer("5")) }
    });
    let mut service = ServerTraceLayer::new(tracer).layer(service);
    let response = service.ready().await.unwrap().call(request()).await.unwrap();
    assert!(ended.0.lock().unwrap().is_empty(), "the span ends with the body, not the head");
    response.into_body().collect().await.unwrap();

    let span = ended.one();
    assert_eq!(span.span_context.trace_id().to_string(), TRACE);
    assert_eq!(span.parent_span_id, SpanId::from_hex(CALLER).unwrap());
    assert!(span.parent_span_is_remote);
    assert_eq!(span.span_kind, opentelemetry::trace::SpanKind::Server);
    assert_eq!(span.name, "helloworld.Greeter/SayHello");
    let handler = current.lock().unwrap().clone().expect("the handler ran");
    assert_eq!(handler.span_id(), span.span_context.span_id(), "the server span is current in the handler");
    assert_eq!(attribute(&span, "rpc.system"), Some("grpc".into()));
    assert_eq!(attribute(&span, "rpc.service"), Some("helloworld.Greeter".into()));
    assert_eq!(attribute(&span, "rpc.method"), Some("SayHello".into()));
    assert_eq!(attribute(&span, "server.address"), Some("greeter".into()));
    assert_eq!(attribute(&span, "server.port"), Some(50051.into()));
    assert_eq!(attribute(&span, "rpc.grpc.status_code"), Some(5.into()));
    assert_eq!(span.status, Status::Unset, "NOT_FOUND is the caller's error, not the server's");
}

#[tokio::test]
async fn a_server_span_fails_on_a_server_error_and_a_dropped_body_is_cancelled() {
    let (tracer, ended, _provider) = tracer();
    let layer = ServerTraceLayer::new(tracer).peer_address(|_| Some("10.0.0.7:4000".parse().unwrap()));
    let mut service = layer.layer(tower::service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>(answer("14")) }));
    let response = service.ready().await.unwrap().call(request()).await.unwrap();
    response.into_body().collect().await.unwrap();
    let span = ended.one();
    assert_eq!(attribute(&span, "rpc.grpc.status_code"), Some(14.into()));
    assert_eq!(span.status, Status::error("UNAVAILABLE"));
    assert_eq!(attribute(&span, "network.peer.address"), Some("10.0.0.7".into()));
    assert_eq!(attribute(&span, "network.peer.port"), Some(4000.into()));

    ended.0.lock().unwrap().clear();
    drop(service.ready().await.unwrap().call(request()).await.unwrap());
    let span = ended.one();
    assert_eq!(attribute(&span, "rpc.grpc.status_code"), Some(1.into()), "a body dropped before its trailers is CANCELLED");
}

#[tokio::test]
async fn without_a_tracer_calls_pass_through_untraced() {
    assert!(super::default_tracer().is_none(), "off until asked");
    let mut service = ServerTraceLayer::default_tracer().layer(tower::service_fn(|_: http::Request<()>| async {
        assert!(!Context::current().has_active_span());
        Ok::<_, Infallible>(answer("0"))
    }));
    let response = service.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(response.into_body().collect().await.unwrap().trailers().and_then(|t| t.get("grpc-status")).unwrap(), "0");
}

#[test]
fn an_unsampled_call_exports_nothing_and_sends_its_decision_on() {
    let ended = Ended::default();
    let provider = SdkTracerProvider::builder()
        .with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(opentelemetry_sdk::trace::Sampler::AlwaysOff)))
        .with_simple_exporter(ended.clone())
        .build();
    let client = Tracer::new(provider.tracer("test")).with_propagator(TraceContextPropagator::new());
    // A stale `tracestate` the caller left on the request does not travel with the new context.
    let mut request = http::Request::builder().uri("http://a:1/echo.Echo/Unary").header("tracestate", "stale=1").body(()).unwrap();
    let span = super::CallSpan::start(&client, &mut request);
    let traceparent = request.headers().get("traceparent").expect("an unsampled call still propagates").to_str().unwrap().to_owned();
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!((fields.len(), fields[0], fields[3]), (4, "00", "00"), "{traceparent}: version 00, not sampled");
    assert_eq!(span.trace_id().as_deref(), Some(fields[1]), "the header carries the call's own context");
    assert!(request.headers().get("tracestate").is_none());
    assert!(request.extensions().get::<super::InCall>().is_none(), "nothing below the router adds to an unsampled span");
    span.end(crate::classify::Outcome::Grpc(mesh_core::GrpcCode::Ok), Some("127.0.0.1:1".parse().unwrap()));

    // The next hop follows the decision: its server span is not sampled (the SDK's default sampler: parent-based,
    // every root sampled).
    let (server_tracer, server_ended, _server_provider) = tracer();
    let forwarded = http::Request::builder().uri("http://a:1/echo.Echo/Unary").header("traceparent", traceparent).body(()).unwrap();
    let mut service =
        ServerTraceLayer::new(server_tracer).layer(tower::service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>(answer("0")) }));
    let response = futures_util::FutureExt::now_or_never(async { service.ready().await.unwrap().call(forwarded).await.unwrap() }).unwrap();
    drop(response);
    assert!(ended.0.lock().unwrap().is_empty(), "the client exported nothing");
    assert!(server_ended.0.lock().unwrap().is_empty(), "the server followed the caller's decision");
}
