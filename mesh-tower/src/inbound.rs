//! The inbound (server-side) stack: what an xDS-enabled server (gRFC A36, A39, A41) and the sidecar's inbound
//! side do with each connection and each call, one implementation for both.
//!
//! - [`InboundPolicy::build`] turns a server [`InboundListener`] into what serving needs: for each filter chain
//!   its acceptor (mTLS from the bootstrap's certificate provider instances, or plaintext), its route table,
//!   its RBAC engine, its local rate limit bucket and its faults (the chain's, or a route's own, A39).
//! - [`serve`] accepts connections while the policy says [`Serving::Serving`]; while not serving, a connection
//!   is closed at once (A36). Each connection gets the chain [`InboundListener::select`] picks for its
//!   addresses and its first byte (TLS or not), then that chain's handshake, then HTTP/2.
//! - When the policy changes, a connection whose chain still has the same TLS takes the new chain's HTTP
//!   policy for its next call (new RBAC rules apply at once); one whose chain changed or is gone is drained:
//!   GOAWAY, the calls in flight finish, the client reconnects and gets the new chain.
//! - Each call, in order: the route (the virtual host by authority, then the first matching route, which must
//!   be non-forwarding, else UNAVAILABLE, A36), RBAC (PERMISSION_DENIED), the local rate limit
//!   (RESOURCE_EXHAUSTED), faults (delay, abort), then the service. The order is fixed, whatever order the
//!   listener lists its filters in: a denied call spends no token and meets no fault.
//! - The caller's [`PeerIdentity`], address ([`SocketAddr`]) and the [`LocalAddr`] are put in each request's
//!   extensions, for RBAC and for handlers.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use mesh_core::inbound::{FilterChain, InboundListener, InboundTls};
use mesh_core::{GrpcCode, RouteAction, RouteConfig, RouteSource};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::{Layer, Service, ServiceExt};

use crate::Error;
use crate::authz::{AuthzLayer, LocalAddr};
use crate::connect::{Connection as _, PeerIdentity};
use crate::fault::FaultLayer;
use crate::ratelimit::RateLimitLayer;
use crate::stats::{AuthzStats, TargetStats};
use crate::tls::{CredentialsSource, HandshakeCounts, MeshIo, MtlsAcceptor};

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// How long a new connection may take to send its first byte.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a server serves, and with what.
#[derive(Clone, Debug)]
pub enum Serving {
    /// Not serving (no usable inbound config yet): connections are closed as they arrive. Says why.
    NotServing(String),
    /// Serving with this policy.
    Serving(Arc<InboundPolicy>),
}

/// What the server counts across policy changes: handshakes, RBAC decisions and the rate limit and fault
/// layers' counters.
#[derive(Debug, Default)]
pub struct InboundStats {
    /// Handshakes, by failure reason.
    pub handshakes: Arc<HandshakeCounts>,
    /// RBAC decisions.
    pub authz: Arc<AuthzStats>,
    /// Rate-limited calls and injected faults.
    pub layers: Arc<TargetStats>,
}

/// A server listener made ready to serve: each chain's acceptor and call policy.
#[derive(Debug)]
pub struct InboundPolicy {
    listener: InboundListener,
    chains: Vec<Arc<ChainPolicy>>,
    default: Option<Arc<ChainPolicy>>,
}

impl InboundPolicy {
    /// Builds `listener`: RDS route tables come from `routes` (by name), certificates from `providers` (the
    /// bootstrap's instances by name). Fails, naming the chain, when a table has not arrived, a provider is
    /// missing or a chain's TLS cannot be served; the caller keeps its last good policy.
    pub fn build(
        listener: &InboundListener,
        routes: &dyn Fn(&str) -> Option<RouteConfig>,
        providers: &BTreeMap<String, CredentialsSource>,
        stats: &InboundStats,
    ) -> Result<Self, Error> {
        let fail = |chain: &FilterChain, reason: String| {
            let chain = if chain.name.is_empty() { String::new() } else { format!("filter chain {:?}: ", chain.name) };
            Error::Inbound { listener: listener.name.clone(), reason: format!("{chain}{reason}") }
        };
        let build = |chain: &FilterChain| -> Result<Arc<ChainPolicy>, Error> {
            ChainPolicy::build(&listener.name, chain, routes, providers, stats).map(Arc::new).map_err(|reason| fail(chain, reason))
        };
        Ok(Self {
            chains: listener.filter_chains.iter().map(build).collect::<Result<_, _>>()?,
            default: listener.default_filter_chain.as_ref().map(build).transpose()?,
            listener: listener.clone(),
        })
    }

    /// One chain for every connection, served without routes or HTTP filters: what a server with a fixed
    /// acceptor (or none: plaintext) runs.
    pub fn single(name: &str, acceptor: Option<MtlsAcceptor>) -> Self {
        let chain = ChainPolicy {
            name: name.to_owned(),
            listener: name.into(),
            tls: None,
            acceptor,
            routes: None,
            authz: None,
            rate_limit: None,
            faults: Vec::new(),
            seed: Default::default(),
        };
        let listener = InboundListener {
            name: name.to_owned(),
            address: SocketAddr::from(([0, 0, 0, 0], 0)),
            filter_chains: Vec::new(),
            default_filter_chain: None,
        };
        Self { listener, chains: Vec::new(), default: Some(Arc::new(chain)) }
    }

    /// The listener it was built from.
    pub fn listener(&self) -> &InboundListener {
        &self.listener
    }

    /// The chain for a connection (see [`InboundListener::select`]).
    fn select(&self, local: SocketAddr, peer: SocketAddr, tls: bool) -> Option<&Arc<ChainPolicy>> {
        // Without chains every connection gets the default chain (also what `single` builds).
        if self.listener.filter_chains.is_empty() {
            return self.default.as_ref();
        }
        let chosen = self.listener.select(local, peer, tls)?;
        match self.listener.filter_chains.iter().position(|c| std::ptr::eq(c, chosen)) {
            Some(i) => self.chains.get(i),
            None => self.default.as_ref(),
        }
    }
}

/// One chain's acceptor and call policy.
struct ChainPolicy {
    name: String,
    listener: Arc<str>,
    tls: Option<InboundTls>,
    acceptor: Option<MtlsAcceptor>,
    /// `None`: every call is served (a local chain without a route table).
    routes: Option<RouteConfig>,
    authz: Option<AuthzLayer>,
    rate_limit: Option<RateLimitLayer>,
    /// The fault layer of each route (`faults[virtual host][route]`): the route's own, else the chain's.
    faults: Vec<Vec<Option<FaultLayer>>>,
    /// Seeds the draws of routes that take a share of calls (`runtime_fraction`).
    seed: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for ChainPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainPolicy").field("name", &self.name).field("tls", &self.tls).finish_non_exhaustive()
    }
}

impl ChainPolicy {
    fn build(
        listener: &str,
        chain: &FilterChain,
        routes: &dyn Fn(&str) -> Option<RouteConfig>,
        providers: &BTreeMap<String, CredentialsSource>,
        stats: &InboundStats,
    ) -> Result<Self, String> {
        let acceptor = chain.tls.as_ref().map(|tls| acceptor(tls, providers, stats)).transpose()?;
        let table = match &chain.http.route {
            RouteSource::Inline(table) => table.clone(),
            RouteSource::Rds(name) => routes(name).ok_or_else(|| format!("route configuration {name:?} has not arrived"))?,
        };
        if chain.http.adaptive_concurrency.is_some() {
            // Decoded for clients, where the cluster stack runs it; a server has no place for it yet.
            tracing::warn!(listener, chain = %chain.name, "the adaptive concurrency filter is not enforced on a server's chain; ignored");
        }
        let engine = mesh_core::authz::Engine::new(chain.http.rbac.clone()).map_err(|e| format!("RBAC: {e}"))?;
        let authz = (!chain.http.rbac.is_empty()).then(|| AuthzLayer::fixed(engine).with_stats(stats.authz.clone()));
        let rate_limit = chain.http.rate_limit.clone().map(|limit| RateLimitLayer::new(listener, limit, stats.layers.clone()));
        let fault = |own: Option<&mesh_core::policy::FaultInjection>| {
            own.or(chain.http.fault.as_ref()).map(|f| FaultLayer::new(listener, f.clone(), stats.layers.clone()))
        };
        let faults = table.virtual_hosts.iter().map(|vh| vh.routes.iter().map(|r| fault(r.policies.fault.as_ref())).collect()).collect();
        Ok(Self {
            name: chain.name.clone(),
            listener: listener.into(),
            tls: chain.tls.clone(),
            acceptor,
            routes: Some(table),
            authz,
            rate_limit,
            faults,
            seed: Default::default(),
        })
    }

    /// Serves one call on this chain: route, RBAC, rate limit, faults, then `inner`.
    fn call<S, B, RB>(&self, inner: S, request: http::Request<B>) -> BoxFuture<'static, http::Response<RB>>
    where
        S: Service<http::Request<B>, Response = http::Response<RB>, Error = Infallible> + Clone + Send + 'static,
        S::Future: Send + 'static,
        B: Send + 'static,
        RB: Default + Send + 'static,
    {
        let grpc = crate::classify::is_grpc(request.headers());
        let fault = match self.route(&request) {
            Ok(fault) => fault,
            Err(reason) => {
                let error = Error::Inbound { listener: self.listener.to_string(), reason };
                return Box::pin(std::future::ready(error_response(&error, grpc)));
            }
        };
        if let Some(refusal) = self.authz.as_ref().and_then(|authz| authz.refusal(&request)) {
            return Box::pin(std::future::ready(refusal));
        }
        if let Some(Err(error)) = self.rate_limit.as_ref().map(RateLimitLayer::take) {
            return Box::pin(std::future::ready(error_response(&error, grpc)));
        }
        let inner = tower::util::MapErr::new(inner, |never: Infallible| -> Error { match never {} });
        Box::pin(async move {
            let result = match fault {
                Some(fault) => fault.layer(inner).oneshot(request).await,
                None => inner.oneshot(request).await,
            };
            result.unwrap_or_else(|error| error_response(&error, grpc))
        })
    }

    /// The route of a call: its fault layer, or why there is none a server may serve.
    fn route<B>(&self, request: &http::Request<B>) -> Result<Option<FaultLayer>, String> {
        let Some(table) = &self.routes else { return Ok(None) };
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| request.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        let path = request.uri().path();
        let Some(vh) = table.virtual_host_for(authority) else {
            return Err(format!("no virtual host for {authority:?}"));
        };
        let v = table.virtual_hosts.iter().position(|other| std::ptr::eq(other, vh)).unwrap_or_default();
        let header = |name: &str| request.headers().get(name).and_then(|h| h.to_str().ok());
        // A route with a `runtime_fraction` takes its share of the calls it matches; the rest go on (A28).
        let draw = || {
            use mesh_core::lb::Random as _;
            let seed = self.seed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            mesh_core::lb::SplitMix64::new(seed).below(1_000_000) as u32
        };
        let Some(r) = vh.routes.iter().position(|route| route.matcher.matches(path, header) && route.matcher.takes(draw)) else {
            return Err(format!("no route matches {path}"));
        };
        if vh.routes[r].action != RouteAction::NonForwarding {
            return Err(format!("the route for {path} is not non-forwarding (A36: a server serves only those)"));
        }
        Ok(self.faults.get(v).and_then(|routes| routes.get(r)).cloned().flatten())
    }
}

/// The acceptor of a chain's TLS: mTLS with the certificate provider instance the chain names.
fn acceptor(tls: &InboundTls, providers: &BTreeMap<String, CredentialsSource>, stats: &InboundStats) -> Result<MtlsAcceptor, String> {
    let instance = |name: &str| {
        providers.get(name).cloned().ok_or_else(|| {
            format!("TLS names the certificate provider instance {name:?}, which the bootstrap's certificate_providers do not define")
        })
    };
    if !tls.require_client_certificate {
        return Err("TLS without require_client_certificate is not supported: this server serves mTLS only".into());
    }
    match &tls.ca_certificate_provider {
        Some(ca) if *ca != tls.certificate_provider => {
            return Err(format!(
                "the certificate ({:?}) and CA ({ca:?}) provider instances differ: this server takes both from one instance",
                tls.certificate_provider
            ));
        }
        _ => {}
    }
    let source = instance(&tls.certificate_provider)?;
    MtlsAcceptor::new(source).map(|a| a.with_counts(stats.handshakes.clone())).map_err(|e| e.to_string())
}

/// The answer to a call the stack failed: a trailers-only gRPC status for a gRPC call, else an HTTP status.
fn error_response<RB: Default>(error: &Error, grpc: bool) -> http::Response<RB> {
    let code = error.grpc_code();
    let mut response = http::Response::new(RB::default());
    if grpc {
        let headers = response.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", http::HeaderValue::from(code.as_i32()));
        if let Ok(message) = http::HeaderValue::from_str(&percent_encode(&error.to_string())) {
            headers.insert("grpc-message", message);
        }
    } else {
        *response.status_mut() = match code {
            GrpcCode::ResourceExhausted => http::StatusCode::TOO_MANY_REQUESTS,
            GrpcCode::PermissionDenied => http::StatusCode::FORBIDDEN,
            _ => http::StatusCode::SERVICE_UNAVAILABLE,
        };
    }
    if let Error::RateLimited { retry_after, .. } = error {
        let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
    }
    response
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`, percent-encoded.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// How [`serve`] treats connections.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServeOptions {
    /// Close each connection gracefully (GOAWAY, calls in flight finish) once it is this old (gRPC's
    /// `MAX_CONNECTION_AGE`), so clients reconnect, pick up rotated certificates and rebalance.
    pub max_connection_age: Option<Duration>,
}

/// Serves `service` on `listener` as `policy` says, until the listener fails. `service` is the application's
/// (a tonic router, a hyper service); the stack runs in front of it.
pub async fn serve<S, RB>(listener: TcpListener, policy: watch::Receiver<Serving>, service: S, options: ServeOptions)
where
    S: Service<http::Request<hyper::body::Incoming>, Response = http::Response<RB>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    RB: http_body::Body<Data = bytes::Bytes> + Default + Send + 'static,
    RB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
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
        tokio::spawn(connection(stream, policy.clone(), service.clone(), options));
    }
}

/// Serves one connection: its chain, its handshake, HTTP/2, and draining when its chain changes.
async fn connection<S, RB>(stream: TcpStream, mut policy: watch::Receiver<Serving>, service: S, options: ServeOptions)
where
    S: Service<http::Request<hyper::body::Incoming>, Response = http::Response<RB>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    RB: http_body::Body<Data = bytes::Bytes> + Default + Send + 'static,
    RB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) else { return };
    let current = match &*policy.borrow_and_update() {
        Serving::NotServing(reason) => {
            tracing::debug!(%peer, reason, "connection closed: not serving");
            return;
        }
        Serving::Serving(current) => current.clone(),
    };
    let mut first = [0u8; 1];
    let tls = match tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1..)) => first[0] == TLS_HANDSHAKE_RECORD,
        _ => return,
    };
    let Some(chain) = current.select(local, peer, tls).cloned() else {
        tracing::debug!(%peer, listener = %current.listener.name, "connection closed: no filter chain matches it");
        return;
    };
    let io = match &chain.acceptor {
        // A strict acceptor refuses plaintext (logged and counted); a permissive one serves it.
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(io) => io,
            Err(_) => return,
        },
        None if tls => {
            tracing::warn!(%peer, listener = %current.listener.name, "TLS connection closed: its filter chain is plaintext");
            return;
        }
        None => MeshIo::Plain(hyper_util::rt::TokioIo::new(stream)),
    };
    let chain = Arc::new(Mutex::new(chain));
    let served = ConnectionService { chain: chain.clone(), inner: service, peer, local, identity: io.peer_identity() };
    let http2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    let connection = http2.serve_connection(Lingering::new(io), served);
    tokio::pin!(connection);
    let age = async {
        match options.max_connection_age {
            Some(age) => tokio::time::sleep(age).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(age);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended");
                }
                return;
            }
            () = age.as_mut() => break,
            changed = policy.changed() => {
                if changed.is_err() {
                    break;
                }
                let next = match &*policy.borrow_and_update() {
                    Serving::Serving(next) => next.select(local, peer, tls).cloned(),
                    Serving::NotServing(_) => None,
                };
                let mut held = chain.lock().unwrap_or_else(|e| e.into_inner());
                match next {
                    Some(next) if next.tls == held.tls => *held = next,
                    _ => {
                        tracing::debug!(%peer, "draining a connection: its filter chain changed");
                        break;
                    }
                }
            }
        }
    }
    connection.as_mut().graceful_shutdown();
    if let Err(error) = connection.await {
        tracing::debug!(%error, "connection ended");
    }
}

/// The service of one connection: its chain's policy (swapped when the chain's HTTP policy changes) in front
/// of the application's service.
struct ConnectionService<S> {
    chain: Arc<Mutex<Arc<ChainPolicy>>>,
    inner: S,
    peer: SocketAddr,
    local: SocketAddr,
    identity: Option<PeerIdentity>,
}

impl<S, RB> hyper::service::Service<http::Request<hyper::body::Incoming>> for ConnectionService<S>
where
    S: Service<http::Request<hyper::body::Incoming>, Response = http::Response<RB>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = Infallible;
    type Future = InfallibleFuture<RB>;

    fn call(&self, mut request: http::Request<hyper::body::Incoming>) -> Self::Future {
        let extensions = request.extensions_mut();
        if let Some(identity) = &self.identity {
            extensions.insert(identity.clone());
        }
        extensions.insert(self.peer);
        extensions.insert(LocalAddr(self.local));
        let chain = self.chain.lock().unwrap_or_else(|e| e.into_inner()).clone();
        InfallibleFuture(chain.call(self.inner.clone(), request))
    }
}

/// A response future that cannot fail.
pub struct InfallibleFuture<RB>(BoxFuture<'static, http::Response<RB>>);

impl<RB> Future for InfallibleFuture<RB> {
    type Output = Result<http::Response<RB>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx).map(Ok)
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
    io: MeshIo,
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Lingering {
    fn new(io: MeshIo) -> Self {
        Self { io, linger: None }
    }
}

impl hyper::rt::Read for Lingering {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: hyper::rt::ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        hyper::rt::Read::poll_read(Pin::new(&mut self.io), cx, buf)
    }
}

impl hyper::rt::Write for Lingering {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        hyper::rt::Write::poll_write(Pin::new(&mut self.io), cx, buf)
    }

    fn is_write_vectored(&self) -> bool {
        hyper::rt::Write::is_write_vectored(&self.io)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        hyper::rt::Write::poll_write_vectored(Pin::new(&mut self.io), cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        hyper::rt::Write::poll_flush(Pin::new(&mut self.io), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            std::task::ready!(hyper::rt::Write::poll_shutdown(Pin::new(&mut this.io), cx))?;
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        loop {
            if this.linger.as_mut().is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready()) {
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
            let mut buf = hyper::rt::ReadBuf::uninit(&mut scratch);
            match hyper::rt::Read::poll_read(Pin::new(&mut this.io), cx, buf.unfilled()) {
                // The client closed (or the connection broke): nothing more can arrive.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::inbound::{FilterChainMatch, InboundHttp};
    use mesh_core::{Route, RouteMatch, VirtualHost};

    use super::*;

    fn chain(routes: Vec<Route>) -> ChainPolicy {
        let table =
            RouteConfig { name: "t".into(), virtual_hosts: vec![VirtualHost { name: "vh".into(), domains: vec!["*".into()], routes }] };
        let chain = FilterChain {
            name: "c".into(),
            matcher: FilterChainMatch::default(),
            tls: None,
            http: InboundHttp::new(RouteSource::Inline(table)),
        };
        ChainPolicy::build("l", &chain, &|_| None, &BTreeMap::new(), &InboundStats::default()).unwrap()
    }

    fn route(fraction: Option<u32>, action: RouteAction) -> Route {
        Route { name: String::new(), matcher: RouteMatch { fraction, ..RouteMatch::any() }, action, policies: Default::default() }
    }

    /// A route that takes no share of its calls passes them on to the next; a forwarding route is refused.
    #[test]
    fn routes_take_their_runtime_fraction_and_must_be_non_forwarding() {
        let forwarding = || RouteAction::Clusters(vec![mesh_core::WeightedCluster { cluster: "c".into(), weight: 1 }]);
        let request = || http::Request::builder().uri("/pkg.S/M").body(()).unwrap();
        let skipped = chain(vec![route(Some(0), forwarding()), route(None, RouteAction::NonForwarding)]);
        assert!(skipped.route(&request()).is_ok(), "a 0% route takes nothing");
        let taken = chain(vec![route(Some(1_000_000), forwarding()), route(None, RouteAction::NonForwarding)]);
        assert!(taken.route(&request()).unwrap_err().contains("not non-forwarding"));
    }
}
