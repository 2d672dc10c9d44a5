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

use mesh_tower::connect::{Connection, PeerIdentity};
use mesh_tower::tls::MtlsAcceptor;
use tokio::net::TcpListener;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `service` on `listener` until the listener fails, each connection through `acceptor`.
pub async fn serve_mtls<S, B>(listener: TcpListener, acceptor: MtlsAcceptor, service: S, max_connection_age: Option<Duration>)
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
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
            let connection = http2.serve_connection(io, service);
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

/// The caller's identity of a tonic request served by [`serve_mtls`] (`None` for a plaintext caller).
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&PeerIdentity> {
    request.extensions().get::<PeerIdentity>()
}
