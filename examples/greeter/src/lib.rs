//! The greeter example: `helloworld.Greeter` (the classic gRPC example) with
//! messages and client/server glue written out by hand, so the example builds
//! without `protoc`. A real service would generate the same with tonic-build.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::client::GrpcService;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic_prost::ProstCodec;

/// `helloworld.HelloRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    /// Who to greet.
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `helloworld.HelloReply`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    /// The greeting.
    #[prost(string, tag = "1")]
    pub message: String,
}

/// Client of `helloworld.Greeter` over any gRPC service: a tonic `Channel`
/// or a `mesh_tonic::Channel`.
#[derive(Clone, Debug)]
pub struct GreeterClient<T> {
    inner: tonic::client::Grpc<T>,
}

impl<T> GreeterClient<T>
where
    T: GrpcService<Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    /// Wraps a channel.
    pub fn new(channel: T) -> Self {
        Self { inner: tonic::client::Grpc::new(channel) }
    }

    /// `SayHello`.
    pub async fn say_hello(
        &mut self,
        request: impl tonic::IntoRequest<HelloRequest>,
    ) -> Result<tonic::Response<HelloReply>, tonic::Status> {
        self.inner.ready().await.map_err(|e| tonic::Status::unavailable(e.into().to_string()))?;
        let path = PathAndQuery::from_static("/helloworld.Greeter/SayHello");
        self.inner.unary(request.into_request(), path, ProstCodec::default()).await
    }
}

/// A greeter that answers `Hello <name> from <server>`.
#[derive(Clone, Debug)]
pub struct GreeterServer {
    server: String,
}

impl GreeterServer {
    /// A server that names itself `server` in replies.
    pub fn new(server: impl Into<String>) -> Self {
        Self { server: server.into() }
    }
}

impl NamedService for GreeterServer {
    const NAME: &'static str = "helloworld.Greeter";
}

impl UnaryService<HelloRequest> for GreeterServer {
    type Response = HelloReply;
    type Future = Pin<Box<dyn Future<Output = Result<tonic::Response<HelloReply>, tonic::Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<HelloRequest>) -> Self::Future {
        let message = format!("Hello {} from {}", request.into_inner().name, self.server);
        Box::pin(async move { Ok(tonic::Response::new(HelloReply { message })) })
    }
}

impl tower::Service<http::Request<Body>> for GreeterServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if request.uri().path() != "/helloworld.Greeter/SayHello" {
                return Ok(tonic::Status::unimplemented("unknown method").into_http());
            }
            Ok(Grpc::new(ProstCodec::default()).unary(this, request).await)
        })
    }
}
