//! In-process fakes for unit tests on tokio's paused clock: a connector whose connections are in-memory pipes
//! to in-process HTTP/2 servers. No sockets, no real sleeps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::DuplexStream;

use std::pin::Pin;
use std::task::{Context, Poll};

use crate::connect::{Connect, ConnectFuture, Connection, EndpointTarget, PeerIdentity};

/// How the fake network treats one address.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Peer {
    /// Connections are refused.
    Down,
    /// An HTTP/2 server answers every request after `delay` (virtual time).
    Up { delay: Duration },
    /// An HTTP/2 server answers every request 503 at once.
    Failing,
    /// Connecting takes `connect` (virtual time); the server then answers at once.
    SlowConnect { connect: Duration },
}

/// A connector over in-memory pipes: each connection to an `Up` address gets its own in-process hyper server.
#[derive(Clone, Default)]
pub(crate) struct FakeNet {
    pub(crate) peers: Arc<Mutex<HashMap<SocketAddr, Peer>>>,
    pub(crate) attempts: Arc<Mutex<HashMap<SocketAddr, u32>>>,
    /// Every target the balancer asked for, in order.
    pub(crate) targets: Arc<Mutex<Vec<EndpointTarget>>>,
    pub(crate) served: Arc<AtomicU32>,
    /// The identity each address's connections prove (none when absent).
    pub(crate) identities: Arc<Mutex<HashMap<SocketAddr, PeerIdentity>>>,
    /// The `grpc-timeout` of every request a server received, in order (`None`: it had none).
    pub(crate) timeouts: Arc<Mutex<Vec<Option<Duration>>>>,
    /// The address and authority of every request a server received, in order.
    pub(crate) authorities: Arc<Mutex<Vec<(SocketAddr, String)>>>,
    /// The server side of each address's open connections.
    servers: Arc<Mutex<HashMap<SocketAddr, Vec<tokio::task::AbortHandle>>>>,
}

/// A fake connection: an in-memory pipe, and the identity its peer proved.
pub(crate) struct FakeIo {
    io: TokioIo<DuplexStream>,
    peer: Option<PeerIdentity>,
}

impl Connection for FakeIo {
    fn peer_identity(&self) -> Option<PeerIdentity> {
        self.peer.clone()
    }
}

impl hyper::rt::Read for FakeIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: hyper::rt::ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for FakeIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl FakeNet {
    pub(crate) fn set(&self, addr: SocketAddr, peer: Peer) {
        self.peers.lock().unwrap().insert(addr, peer);
    }

    /// Cuts every open connection to `addr` (its servers vanish, as a crashed process's would).
    pub(crate) fn cut(&self, addr: SocketAddr) {
        for server in self.servers.lock().unwrap().remove(&addr).unwrap_or_default() {
            server.abort();
        }
    }

    pub(crate) fn attempts(&self, addr: SocketAddr) -> u32 {
        self.attempts.lock().unwrap().get(&addr).copied().unwrap_or(0)
    }
}

impl Connect for FakeNet {
    type Io = FakeIo;

    fn connect(&self, target: &EndpointTarget) -> ConnectFuture<Self::Io> {
        let addr = target.addr();
        self.targets.lock().unwrap().push(target.clone());
        *self.attempts.lock().unwrap().entry(addr).or_default() += 1;
        let peer = self.peers.lock().unwrap().get(&addr).copied().unwrap_or(Peer::Down);
        let served = self.served.clone();
        let identity = self.identities.lock().unwrap().get(&addr).cloned();
        let servers = self.servers.clone();
        let timeouts = self.timeouts.clone();
        let authorities = self.authorities.clone();
        Box::pin(async move {
            let (delay, status) = match peer {
                Peer::Down => return Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "fake: refused")),
                Peer::Up { delay } => (delay, http::StatusCode::OK),
                Peer::Failing => (Duration::ZERO, http::StatusCode::SERVICE_UNAVAILABLE),
                Peer::SlowConnect { connect } => {
                    tokio::time::sleep(connect).await;
                    (Duration::ZERO, http::StatusCode::OK)
                }
            };
            let (client, server) = tokio::io::duplex(64 * 1024);
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let timeout = request.headers().get(crate::deadline::GRPC_TIMEOUT).and_then(|v| crate::deadline::parse(v.as_bytes()));
                timeouts.lock().unwrap().push(timeout);
                let authority = request.uri().authority().map_or_else(String::new, |a| a.to_string());
                authorities.lock().unwrap().push((addr, authority));
                let served = served.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    served.fetch_add(1, Ordering::SeqCst);
                    let mut response = http::Response::new(Full::new(Bytes::from(addr.to_string())));
                    *response.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let server = tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(server), service),
            );
            servers.lock().unwrap().entry(addr).or_default().push(server.abort_handle());
            Ok(FakeIo { io: TokioIo::new(client), peer: identity })
        })
    }
}

pub(crate) fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}
