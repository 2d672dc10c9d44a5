//! Transports: how a connection to an endpoint is opened.
//!
//! [`Connect`] is the seam for TLS: an mTLS connector wraps [`TcpConnector`]
//! and returns a TLS stream; the balancer only needs something hyper can read
//! and write.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Boxed future returned by [`Connect::connect`].
pub type ConnectFuture<Io> = Pin<Box<dyn Future<Output = io::Result<Io>> + Send + 'static>>;

/// Opens byte streams to endpoints.
pub trait Connect: Clone + Send + Sync + 'static {
    /// The connected stream.
    type Io: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static;

    /// Connects to `addr`. The caller applies the connect timeout.
    fn connect(&self, addr: SocketAddr) -> ConnectFuture<Self::Io>;
}

/// Plain TCP with `TCP_NODELAY`.
#[derive(Clone, Debug, Default)]
pub struct TcpConnector {
    _private: (),
}

impl TcpConnector {
    /// A TCP connector.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Connect for TcpConnector {
    type Io = TokioIo<TcpStream>;

    fn connect(&self, addr: SocketAddr) -> ConnectFuture<Self::Io> {
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(stream))
        })
    }
}
