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

use crate::connect::{Connect, ConnectFuture, EndpointTarget};

/// How the fake network treats one address.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Peer {
    /// Connections are refused.
    Down,
    /// An HTTP/2 server answers every request after `delay` (virtual time).
    Up { delay: Duration },
}

/// A connector over in-memory pipes: each connection to an `Up` address gets its own in-process hyper server.
#[derive(Clone, Default)]
pub(crate) struct FakeNet {
    pub(crate) peers: Arc<Mutex<HashMap<SocketAddr, Peer>>>,
    pub(crate) attempts: Arc<Mutex<HashMap<SocketAddr, u32>>>,
    /// Every target the balancer asked for, in order.
    pub(crate) targets: Arc<Mutex<Vec<EndpointTarget>>>,
    pub(crate) served: Arc<AtomicU32>,
}

impl FakeNet {
    pub(crate) fn set(&self, addr: SocketAddr, peer: Peer) {
        self.peers.lock().unwrap().insert(addr, peer);
    }

    pub(crate) fn attempts(&self, addr: SocketAddr) -> u32 {
        self.attempts.lock().unwrap().get(&addr).copied().unwrap_or(0)
    }
}

impl Connect for FakeNet {
    type Io = TokioIo<DuplexStream>;

    fn connect(&self, target: &EndpointTarget) -> ConnectFuture<Self::Io> {
        let addr = target.addr();
        self.targets.lock().unwrap().push(target.clone());
        *self.attempts.lock().unwrap().entry(addr).or_default() += 1;
        let peer = self.peers.lock().unwrap().get(&addr).copied().unwrap_or(Peer::Down);
        let served = self.served.clone();
        Box::pin(async move {
            let Peer::Up { delay } = peer else {
                return Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "fake: refused"));
            };
            let (client, server) = tokio::io::duplex(64 * 1024);
            let service = service_fn(move |_request: http::Request<hyper::body::Incoming>| {
                let served = served.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    served.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(addr.to_string()))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(server), service),
            );
            Ok(TokioIo::new(client))
        })
    }
}

pub(crate) fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}
