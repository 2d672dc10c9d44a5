//! A generic tonic server: every unary call to `/mesh.test.Echo/<any>` is
//! answered with the server's reply bytes (its address by default) after an
//! optional delay.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use mesh_tonic::codec::BytesCodec;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, UnaryService};

/// Full method path tests call.
pub const METHOD: &str = "/mesh.test.Echo/Hello";

/// The echo service.
#[derive(Clone, Debug)]
pub struct Echo {
    reply: Bytes,
    delay: Duration,
    calls: Arc<AtomicU64>,
    /// Per 100 calls, how many fail with UNAVAILABLE (spread evenly).
    fail_percent: u64,
    /// Per 100 calls, how many are answered after the tail delay instead (spread evenly).
    tail: (u64, Duration),
    /// The `grpc-timeout` of every call received, in order (`None`: it had none), read before tonic takes
    /// the header off.
    timeouts: Arc<Mutex<Vec<Option<Duration>>>>,
    /// Answers with the caller's proven identity (its `PeerIdentity` extension, `plaintext` without one).
    reply_caller: bool,
}

impl Echo {
    /// Replies `reply` after `delay`.
    pub fn new(reply: impl Into<Bytes>, delay: Duration) -> Self {
        Self {
            reply: reply.into(),
            delay,
            calls: Arc::default(),
            fail_percent: 0,
            tail: (0, Duration::ZERO),
            timeouts: Arc::default(),
            reply_caller: false,
        }
    }
}

impl NamedService for Echo {
    const NAME: &'static str = "mesh.test.Echo";
}

impl tower::Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let timeout = request.headers().get(mesh_tower::deadline::GRPC_TIMEOUT).and_then(|v| mesh_tower::deadline::parse(v.as_bytes()));
        self.timeouts.lock().unwrap_or_else(|e| e.into_inner()).push(timeout);
        let handler = Handler(self.clone());
        Box::pin(async move { Ok(Grpc::new(BytesCodec).unary(handler, request).await) })
    }
}

struct Handler(Echo);

impl UnaryService<Bytes> for Handler {
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<tonic::Response<Bytes>, tonic::Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let mut echo = self.0.clone();
        if echo.reply_caller {
            let caller = request.extensions().get::<mesh_tower::connect::PeerIdentity>();
            echo.reply = caller.map_or_else(|| Bytes::from_static(b"plaintext"), |p| Bytes::copy_from_slice(p.0.as_bytes()));
        }
        Box::pin(async move {
            let n = echo.calls.fetch_add(1, Ordering::Relaxed);
            // Calls n with (n × 37) mod 100 below the percentage fail: that share of every 100, spread out.
            if (n * 37) % 100 < echo.fail_percent {
                return Err(tonic::Status::unavailable("echo: failing on purpose"));
            }
            let delay = if (n * 37 + 11) % 100 < echo.tail.0 { echo.tail.1 } else { echo.delay };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(tonic::Response::new(echo.reply))
        })
    }
}

/// A running in-process echo server.
#[derive(Debug)]
pub struct EchoServer {
    /// Where it listens.
    pub addr: SocketAddr,
    calls: Arc<AtomicU64>,
    timeouts: Arc<Mutex<Vec<Option<Duration>>>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// Starts a server on `127.0.0.1:0` replying with its address.
    pub async fn start(delay: Duration) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?, delay).await
    }

    /// Starts a server on `addr` replying with its address.
    pub async fn start_on(addr: SocketAddr, delay: Duration) -> anyhow::Result<Self> {
        Self::start_with(addr, delay, None).await
    }

    /// Starts a server on `addr` replying `reply` (its address when `None`).
    pub async fn start_with(addr: SocketAddr, delay: Duration, reply: Option<Bytes>) -> anyhow::Result<Self> {
        Self::start_full(addr, delay, reply, 0).await
    }

    /// Starts a server on `127.0.0.1:0` that fails `percent` of its calls with UNAVAILABLE.
    pub async fn start_failing(percent: u64) -> anyhow::Result<Self> {
        Self::start_full("127.0.0.1:0".parse()?, Duration::ZERO, None, percent).await
    }

    /// Starts a server on `127.0.0.1:0` that answers `percent` of its calls after `tail`, the rest at once.
    pub async fn start_with_tail(percent: u64, tail: Duration) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        Self::serve(listener, Echo { tail: (percent, tail), ..Echo::new(addr.to_string(), Duration::ZERO) })
    }

    async fn start_full(addr: SocketAddr, delay: Duration, reply: Option<Bytes>, fail_percent: u64) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Self::serve(listener, Echo { fail_percent, ..Echo::new(reply.unwrap_or_else(|| addr.to_string().into()), delay) })
    }

    /// Starts a server on `127.0.0.1:0` speaking TLS with `tls` (tonic's own rustls server: a real peer for
    /// the mesh's mTLS connector).
    pub async fn start_tls(tls: tonic::transport::ServerTlsConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        Self::serve_with(listener, Echo::new(addr.to_string(), Duration::ZERO), Some(tls))
    }

    /// [`Self::start_tls`] on `addr`, answering every call with `reply` (the baseline of the server benchmark).
    pub async fn start_tls_replying(tls: tonic::transport::ServerTlsConfig, addr: SocketAddr, reply: Bytes) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Self::serve_with(listener, Echo::new(reply, Duration::ZERO), Some(tls))
    }

    /// Starts a server on `127.0.0.1:0` behind the mesh's acceptor (strict or permissive): tonic's service
    /// served by hyper over the accepted connections, each call answered with the caller's SPIFFE ID
    /// (`plaintext` for a plaintext caller).
    pub async fn start_mesh(acceptor: mesh_tower::tls::MtlsAcceptor) -> anyhow::Result<Self> {
        Self::start_mesh_aged(acceptor, None).await
    }

    /// [`Self::start_mesh`], closing each connection gracefully (HTTP/2 GOAWAY) once it is `max_age` old, so
    /// clients keep making new handshakes.
    pub async fn start_mesh_aged(acceptor: mesh_tower::tls::MtlsAcceptor, max_age: Option<Duration>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::serve_mesh(listener, acceptor, Echo { reply_caller: true, ..Echo::new("", Duration::ZERO) }, max_age)
    }

    /// [`Self::start_mesh`] on `addr`, answering every call with `reply` (for benchmarks).
    pub async fn start_mesh_replying(acceptor: mesh_tower::tls::MtlsAcceptor, addr: SocketAddr, reply: Bytes) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Self::serve_mesh(listener, acceptor, Echo::new(reply, Duration::ZERO), None)
    }

    /// Starts an xDS-enabled server ([`mesh_tonic::Server`]) on `listener`, as `builder` says, each call
    /// answered with the caller's SPIFFE ID (`plaintext` for a plaintext caller). The server runs while the
    /// returned [`mesh_tonic::RunningServer`] is kept.
    pub fn start_xds(listener: TcpListener, builder: mesh_tonic::ServerBuilder) -> anyhow::Result<(Self, mesh_tonic::RunningServer)> {
        Self::serve_xds(listener, builder, Echo { reply_caller: true, ..Echo::new("", Duration::ZERO) })
    }

    /// [`Self::start_xds`], answering every call with `reply` (for benchmarks).
    pub fn start_xds_replying(
        listener: TcpListener,
        builder: mesh_tonic::ServerBuilder,
        reply: Bytes,
    ) -> anyhow::Result<(Self, mesh_tonic::RunningServer)> {
        Self::serve_xds(listener, builder, Echo::new(reply, Duration::ZERO))
    }

    fn serve_xds(
        listener: TcpListener,
        builder: mesh_tonic::ServerBuilder,
        echo: Echo,
    ) -> anyhow::Result<(Self, mesh_tonic::RunningServer)> {
        let addr = listener.local_addr()?;
        let (calls, timeouts) = (echo.calls.clone(), echo.timeouts.clone());
        let running = builder.serve(listener, echo)?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = rx.await;
        });
        Ok((Self { addr, calls, timeouts, shutdown: Some(tx), task }, running))
    }

    fn serve_mesh(
        listener: TcpListener,
        acceptor: mesh_tower::tls::MtlsAcceptor,
        echo: Echo,
        max_age: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let (calls, timeouts) = (echo.calls.clone(), echo.timeouts.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tokio::select! {
                () = mesh_tonic::server::serve_mtls(listener, acceptor, echo, max_age) => {}
                _ = rx => {}
            }
        });
        Ok(Self { addr, calls, timeouts, shutdown: Some(tx), task })
    }

    fn serve(listener: TcpListener, echo: Echo) -> anyhow::Result<Self> {
        Self::serve_with(listener, echo, None)
    }

    fn serve_with(listener: TcpListener, echo: Echo, tls: Option<tonic::transport::ServerTlsConfig>) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let (calls, timeouts) = (echo.calls.clone(), echo.timeouts.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|stream| {
                // Without TCP_NODELAY small responses wait for delayed ACKs (~40 ms).
                stream.and_then(|s| s.set_nodelay(true).map(|()| s))
            });
            let mut builder = tonic::transport::Server::builder();
            if let Some(tls) = tls {
                builder = match builder.tls_config(tls) {
                    Ok(builder) => builder,
                    Err(error) => return tracing::error!(%error, "echo server TLS settings"),
                };
            }
            // Server metrics (gRPC A66) and spans go to the default meter and tracer, when the test installed them.
            let mut builder = builder.layer(mesh_tonic::telemetry::server_layer());
            let served = builder.add_service(echo).serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            });
            if let Err(error) = served.await {
                tracing::error!(%error, "echo server failed");
            }
        });
        Ok(Self { addr, calls, timeouts, shutdown: Some(tx), task })
    }

    /// Calls this server has answered.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The `grpc-timeout` each call arrived with, in order (`None`: none).
    pub fn timeouts(&self) -> Vec<Option<Duration>> {
        self.timeouts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Graceful shutdown: stops accepting, lets in-flight calls finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
