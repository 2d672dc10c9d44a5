//! Serving a tonic service behind the mesh's acceptor: the first piece of the xDS-enabled server.
//!
//! [`serve_mtls`] accepts connections on a listener through a [`MtlsAcceptor`] (strict or permissive), serves
//! each over HTTP/2 with the service, and puts the caller's proven SPIFFE ID on every request as a
//! [`PeerIdentity`] extension, which a tonic handler reads with `request.extensions().get::<PeerIdentity>()`.
//! A failed handshake is logged and counted by the acceptor and closes only that connection.
//!
//! With `max_connection_age` each connection is closed gracefully (HTTP/2 GOAWAY, calls in flight finish) once
//! it is that old (gRPC's `MAX_CONNECTION_AGE`), so clients reconnect, pick up rotated certificates and
//! rebalance.

use std::convert::Infallible;
use std::time::Duration;

use std::future::Future as _;

use mesh_tower::connect::{Connection, PeerIdentity};
use mesh_tower::tls::MtlsAcceptor;
use tokio::net::TcpListener;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `service` on `listener` until the listener fails, each connection through `acceptor`. Each call is
/// recorded in the default server metrics and traced in the default server span ([`crate::telemetry::server_layer`]).
pub async fn serve_mtls<S, B>(listener: TcpListener, acceptor: MtlsAcceptor, service: S, max_connection_age: Option<Duration>)
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let service = tower::Layer::layer(&crate::telemetry::server_layer(), service);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Without TCP_NODELAY small responses wait for delayed ACKs (~40 ms).
        let _ = stream.set_nodelay(true);
        let (acceptor, service) = (acceptor.clone(), service.clone());
        tokio::spawn(async move {
            // The acceptor logs and counts a failed handshake.
            let Ok(io) = acceptor.accept(stream).await else { return };
            let peer = io.peer_identity();
            let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let mut request = request.map(tonic::body::Body::new);
                if let Some(peer) = &peer {
                    request.extensions_mut().insert(peer.clone());
                }
                tower::Service::call(&mut service.clone(), request)
            });
            let http2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            let connection = http2.serve_connection(Lingering::new(io), service);
            tokio::pin!(connection);
            if let Some(age) = max_connection_age {
                tokio::select! {
                    _ = connection.as_mut() => return,
                    () = tokio::time::sleep(age) => connection.as_mut().graceful_shutdown(),
                }
            }
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended");
            }
        });
    }
}

/// How long a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);

/// A connection that, once hyper shuts it down (its final GOAWAY sent, then TLS close_notify and TCP FIN), keeps
/// reading and dropping what the client still sends until the client closes too, for at most [`LINGER`].
/// Closing a socket with unread data makes the kernel send a reset, which can destroy the GOAWAY still in flight:
/// the client would then see a broken connection instead of "not processed, send it elsewhere", and fail a call
/// it could have resent safely.
struct Lingering {
    io: mesh_tower::tls::MeshIo,
    linger: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Lingering {
    fn new(io: mesh_tower::tls::MeshIo) -> Self {
        Self { io, linger: None }
    }
}

impl hyper::rt::Read for Lingering {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        hyper::rt::Read::poll_read(std::pin::Pin::new(&mut self.io), cx, buf)
    }
}

impl hyper::rt::Write for Lingering {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        hyper::rt::Write::poll_write(std::pin::Pin::new(&mut self.io), cx, buf)
    }

    fn is_write_vectored(&self) -> bool {
        hyper::rt::Write::is_write_vectored(&self.io)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        hyper::rt::Write::poll_write_vectored(std::pin::Pin::new(&mut self.io), cx, bufs)
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        hyper::rt::Write::poll_flush(std::pin::Pin::new(&mut self.io), cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.linger.is_none() {
            std::task::ready!(hyper::rt::Write::poll_shutdown(std::pin::Pin::new(&mut this.io), cx))?;
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        loop {
            if this.linger.as_mut().is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready()) {
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
            let mut buf = hyper::rt::ReadBuf::uninit(&mut scratch);
            match hyper::rt::Read::poll_read(std::pin::Pin::new(&mut this.io), cx, buf.unfilled()) {
                // The client closed (or the connection broke): nothing more can arrive.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The caller's identity of a tonic request served by [`serve_mtls`] (`None` for a plaintext caller).
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&PeerIdentity> {
    request.extensions().get::<PeerIdentity>()
}
