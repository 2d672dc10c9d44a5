//! Transports: how a connection to an endpoint is opened.
//!
//! [`Connect`] is the seam for TLS: an mTLS connector wraps [`TcpConnector`]
//! and returns a TLS stream; the balancer only needs something hyper can read
//! and write.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::Endpoint;
use mesh_core::policy::{ConnectionPolicy, TlsPolicy};
use socket2::{SockRef, TcpKeepalive};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Boxed future returned by [`Connect::connect`].
pub type ConnectFuture<Io> = Pin<Box<dyn Future<Output = io::Result<Io>> + Send + 'static>>;

/// What a connection is for: one endpoint of a cluster (its address, locality and metadata) and the cluster's
/// upstream TLS policy (the server name to send and the identities to accept). A TLS connector reads the policy;
/// one that cannot honour it must fail the connection, never fall back to plaintext.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointTarget {
    /// The endpoint, as discovery reported it.
    pub endpoint: Arc<Endpoint>,
    /// The cluster's TLS policy; `None` means plaintext.
    pub tls: Option<Arc<TlsPolicy>>,
}

impl EndpointTarget {
    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }
}

/// Who the peer of a connection proved to be (its mTLS identity, such as a SPIFFE ID), as the connector
/// learned it. The balancer puts it on every response the connection serves, as an extension.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity(pub Arc<str>);

/// A connected stream, and what its connector learned of the peer.
pub trait Connection {
    /// The peer's proven identity; `None` for a connection that proves none (plaintext).
    fn peer_identity(&self) -> Option<PeerIdentity> {
        None
    }
}

impl Connection for TokioIo<TcpStream> {}

/// Opens byte streams to endpoints.
pub trait Connect: Clone + Send + Sync + 'static {
    /// The connected stream; it hands back the peer's identity ([`Connection`]).
    type Io: hyper::rt::Read + hyper::rt::Write + Connection + Send + Unpin + 'static;

    /// Connects to `target`. The caller applies the connect timeout.
    fn connect(&self, target: &EndpointTarget) -> ConnectFuture<Self::Io>;
}

/// Plain TCP with `TCP_NODELAY`, TCP keepalive and `TCP_USER_TIMEOUT`. A target whose cluster asks for TLS is
/// refused: plaintext is never a fallback for TLS.
#[derive(Clone, Debug, Default)]
pub struct TcpConnector {
    keepalive: Option<Duration>,
    user_timeout: Option<Duration>,
}

impl TcpConnector {
    /// A TCP connector with no keepalive.
    pub fn new() -> Self {
        Self::default()
    }

    /// A TCP connector with the keepalive settings of `policy`.
    pub fn from_policy(policy: &ConnectionPolicy) -> Self {
        Self { keepalive: policy.tcp_keepalive, user_timeout: policy.tcp_user_timeout }
    }

    fn configure(&self, stream: &TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let socket = SockRef::from(stream);
        if let Some(idle) = self.keepalive {
            let probes = TcpKeepalive::new().with_time(idle).with_interval(idle / 2);
            #[cfg(any(target_os = "linux", target_os = "macos"))]
            let probes = probes.with_retries(3);
            socket.set_tcp_keepalive(&probes)?;
        }
        #[cfg(target_os = "linux")]
        if let Some(timeout) = self.user_timeout {
            socket.set_tcp_user_timeout(Some(timeout))?;
        }
        Ok(())
    }
}

impl Connect for TcpConnector {
    type Io = TokioIo<TcpStream>;

    fn connect(&self, target: &EndpointTarget) -> ConnectFuture<Self::Io> {
        let (this, addr, tls) = (self.clone(), target.addr(), target.tls.is_some());
        Box::pin(async move {
            if tls {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the cluster requires TLS and this connector is plaintext TCP (no TLS connector is configured)",
                ));
            }
            let stream = TcpStream::connect(addr).await?;
            this.configure(&stream)?;
            Ok(TokioIo::new(stream))
        })
    }
}
