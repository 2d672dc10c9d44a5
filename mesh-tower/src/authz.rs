//! Authorization of received requests (Envoy's RBAC HTTP filter, gRPC A41), server side: each request is
//! checked against a [`mesh_core::authz::Engine`] before the service sees it.
//!
//! - The engine sees the request's path normalized ([`mesh_core::authz::normalize_path`]; a path that cannot be
//!   normalized is denied), its method, its authority (the URI's, else its one `Host` header; two `Host`
//!   headers and no authority are denied, as A41 asks), its headers, the caller's
//!   [`PeerIdentity`] and a [`std::net::SocketAddr`] of the caller, when the
//!   server put them in the request's extensions, and the local address ([`LocalAddr`] extension, else the
//!   layer's own).
//! - A denied request is answered at once and never reaches the service: a gRPC call (content type
//!   `application/grpc...`) with a trailers-only PERMISSION_DENIED and the message `RBAC: access denied`, as
//!   Envoy and gRPC answer; any other request with a 403 and an empty body. The denial is logged at `info` with
//!   the policy that denied it, and counted ([`AuthzStats`]).
//! - The engine comes through a [`tokio::sync::watch`] channel: a server takes new policy without a restart,
//!   and a request is decided by the engine current when it arrives.
//!
//! ```
//! use std::sync::Arc;
//! use mesh_core::authz::Engine;
//! use mesh_tower::authz::AuthzLayer;
//!
//! let (publish, engine) = tokio::sync::watch::channel(Arc::new(Engine::default()));
//! let layer = AuthzLayer::new(engine);
//! // ... serve with `layer` on the stack; later, when policy changes:
//! publish.send_replace(Arc::new(Engine::default()));
//! # let _ = layer;
//! ```

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready};
use mesh_core::GrpcCode;
use mesh_core::authz::{Decision, Engine, Headers, RequestView};
use tokio::sync::watch;
use tower::{Layer, Service};

use crate::connect::PeerIdentity;
use crate::stats::{AuthzCounts, AuthzStats};

/// The `grpc-message` of a denied gRPC call (Envoy's and gRPC's wording).
pub const DENIED_MESSAGE: &str = "RBAC: access denied";

/// The local address a request came in on, put in its extensions by the server (the RBAC `destination_ip` and
/// `destination_port`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalAddr(pub SocketAddr);

/// Checks requests against an authorization engine. Cheap to clone; clones share the engine and the counts.
#[derive(Clone)]
pub struct AuthzLayer {
    shared: Arc<Shared>,
}

struct Shared {
    engine: watch::Receiver<Arc<Engine>>,
    local: Option<SocketAddr>,
    stats: Arc<AuthzStats>,
}

impl fmt::Debug for AuthzLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthzLayer")
            .field("filters", &self.shared.engine.borrow().filters().len())
            .field("local", &self.shared.local)
            .finish()
    }
}

impl AuthzLayer {
    /// Checks requests against the engine last sent on `engine`'s channel.
    pub fn new(engine: watch::Receiver<Arc<Engine>>) -> Self {
        Self::build(engine, None, Arc::default())
    }

    /// Checks requests against one engine, never changed.
    pub fn fixed(engine: Engine) -> Self {
        Self::new(watch::channel(Arc::new(engine)).1)
    }

    /// Takes `addr` as the local address of requests that carry no [`LocalAddr`] (the address the server
    /// listens on).
    pub fn with_local_addr(self, addr: SocketAddr) -> Self {
        Self::build(self.shared.engine.clone(), Some(addr), self.shared.stats.clone())
    }

    /// Decides on `request` as the layer's service would, counting the decision: `None` lets it through, else
    /// the answer the caller gets (for a stack that checks requests itself, such as the inbound one).
    pub fn refusal<B, ResBody: Default>(&self, request: &http::Request<B>) -> Option<http::Response<ResBody>> {
        self.shared.decide(request)
    }

    /// Counts decisions in `stats` (shared with whoever reads them) instead of the layer's own.
    pub fn with_stats(self, stats: Arc<AuthzStats>) -> Self {
        Self::build(self.shared.engine.clone(), self.shared.local, stats)
    }

    fn build(engine: watch::Receiver<Arc<Engine>>, local: Option<SocketAddr>, stats: Arc<AuthzStats>) -> Self {
        Self { shared: Arc::new(Shared { engine, local, stats }) }
    }

    /// The decisions counted so far.
    pub fn counts(&self) -> AuthzCounts {
        self.shared.stats.counts()
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Authz<S> {
        Authz { inner, shared: self.shared.clone() }
    }
}

/// The authorizing service ([`AuthzLayer`]).
#[derive(Clone)]
pub struct Authz<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for Authz<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authz").field("local", &self.shared.local).finish_non_exhaustive()
    }
}

/// A request's headers for the engine; values that are not UTF-8 are read lossily, so a rule still sees them.
struct HttpHeaders<'a>(&'a http::HeaderMap);

impl Headers for HttpHeaders<'_> {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut values = self.0.get_all(name).iter();
        let mut joined = String::from_utf8_lossy(values.next()?.as_bytes());
        for value in values {
            let joined = joined.to_mut();
            joined.push(',');
            joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
        Some(joined)
    }
}

impl Shared {
    /// Whether the engine lets `request` through; a refusal is logged with its reason.
    fn allows<B>(&self, request: &http::Request<B>) -> bool {
        let uri = request.uri();
        let raw_path = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
        let headers = HttpHeaders(request.headers());
        let view = match RequestView::new(raw_path, request.method().as_str(), &headers) {
            Ok(view) => view,
            Err(e) => {
                tracing::info!(reason = %e, "request denied: no authorization decision can be made on its path");
                return false;
            }
        };
        // A41: the authority is `:authority`, else `Host`; there must not be two.
        let host = request.headers().get_all(http::header::HOST);
        let authority = match uri.authority() {
            Some(authority) => Some(Cow::Borrowed(authority.as_str())),
            None if host.iter().nth(1).is_some() => {
                tracing::info!(path = view.path(), "request denied: more than one Host header and no :authority");
                return false;
            }
            None => host.iter().next().map(|h| String::from_utf8_lossy(h.as_bytes())),
        };
        let extensions = request.extensions();
        let local = extensions.get::<LocalAddr>().map(|l| l.0).or(self.local);
        let view = view
            .with_authority(authority.as_deref())
            .with_peer_identity(extensions.get::<PeerIdentity>().map(|p| &*p.0))
            .with_source_ip(extensions.get::<SocketAddr>().map(SocketAddr::ip))
            .with_destination(local.map(|l| l.ip()), local.map(|l| l.port()));
        let engine = Arc::clone(&self.engine.borrow());
        match engine.evaluate(&view) {
            Decision::Allow => true,
            Decision::Deny { policy } => {
                let policy = policy.as_deref().unwrap_or("no allow policy matched");
                tracing::info!(policy, path = view.path(), peer = view.peer_identity(), "request denied by RBAC");
                false
            }
        }
    }
}

impl Shared {
    /// Decides on `request` and counts the decision: `None` lets it through, else the answer it gets.
    fn decide<B, ResBody: Default>(&self, request: &http::Request<B>) -> Option<http::Response<ResBody>> {
        if self.allows(request) {
            crate::stats::count(&self.stats.allowed);
            None
        } else {
            crate::stats::count(&self.stats.denied);
            Some(refusal(crate::classify::is_grpc(request.headers())))
        }
    }
}

/// The answer to a refused request: a trailers-only PERMISSION_DENIED for a gRPC call, else a 403.
fn refusal<B: Default>(grpc: bool) -> http::Response<B> {
    let mut response = http::Response::new(B::default());
    if grpc {
        let headers = response.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", http::HeaderValue::from(GrpcCode::PermissionDenied.as_i32()));
        headers.insert("grpc-message", http::HeaderValue::from_static(DENIED_MESSAGE));
    } else {
        *response.status_mut() = http::StatusCode::FORBIDDEN;
    }
    response
}

impl<S, B, ResBody> Service<http::Request<B>> for Authz<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<http::Response<ResBody>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.shared.decide(&request) {
            None => Either::Left(self.inner.call(request)),
            Some(refusal) => Either::Right(futures_util::future::ready(Ok(refusal))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use mesh_core::StringMatch;
    use mesh_core::authz::{Action, Permission, Policy, Principal, Rbac};
    use tower::ServiceExt;

    use super::*;

    fn engine(action: Action, permission: Permission, principal: Principal) -> Engine {
        let policy = Policy { permissions: vec![permission], principals: vec![principal] };
        Engine::new(vec![Rbac { action, policies: vec![("the-policy".into(), policy)] }]).unwrap()
    }

    fn deny_admin() -> Engine {
        engine(Action::Deny, Permission::UrlPath(StringMatch::Prefix("/admin".into())), Principal::Any)
    }

    /// A service answering 200 "ok", counting its calls.
    fn counting() -> (Arc<AtomicUsize>, impl Service<http::Request<()>, Response = http::Response<String>, Error = Infallible> + Clone) {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let service = tower::service_fn(move |_: http::Request<()>| {
            seen.fetch_add(1, Ordering::Relaxed);
            futures_util::future::ready(Ok::<_, Infallible>(http::Response::new("ok".to_owned())))
        });
        (calls, service)
    }

    fn grpc(path: &str) -> http::Request<()> {
        http::Request::builder().method("POST").uri(path).header("content-type", "application/grpc+proto").body(()).unwrap()
    }

    #[tokio::test]
    async fn allowed_requests_reach_the_service_and_denied_ones_get_permission_denied() {
        let layer = AuthzLayer::fixed(deny_admin());
        let (calls, service) = counting();
        let response = layer.layer(service.clone()).oneshot(grpc("/svc.Greeter/SayHello")).await.unwrap();
        assert_eq!((response.status(), response.body().as_str()), (http::StatusCode::OK, "ok"));
        assert_eq!(calls.load(Ordering::Relaxed), 1);

        let response = layer.layer(service.clone()).oneshot(grpc("//admin/Reset")).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK, "a gRPC refusal is trailers-only");
        assert_eq!(response.headers()["grpc-status"], "7");
        assert_eq!(response.headers()["grpc-message"], DENIED_MESSAGE);
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert!(response.body().is_empty());
        assert_eq!(calls.load(Ordering::Relaxed), 1, "a denied call never reaches the service");

        let plain = http::Request::builder().uri("/%61dmin").body(()).unwrap();
        let response = layer.layer(service).oneshot(plain).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::FORBIDDEN);
        assert!(response.headers().get("grpc-status").is_none());
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(layer.counts(), AuthzCounts { allowed: 1, denied: 2 });
    }

    #[tokio::test]
    async fn invalid_paths_and_ambiguous_authorities_are_denied() {
        let layer = AuthzLayer::fixed(Engine::default());
        let (calls, service) = counting();
        let response = layer.layer(service.clone()).oneshot(grpc("/a%zz")).await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "7");
        let two_hosts = http::Request::builder().uri("/").header("host", "a.example").header("host", "b.example").body(()).unwrap();
        assert_eq!(layer.layer(service.clone()).oneshot(two_hosts).await.unwrap().status(), http::StatusCode::FORBIDDEN);
        let one_host = http::Request::builder().uri("/").header("host", "a.example").body(()).unwrap();
        assert_eq!(layer.layer(service).oneshot(one_host).await.unwrap().status(), http::StatusCode::OK);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(layer.counts(), AuthzCounts { allowed: 1, denied: 2 });
    }

    #[tokio::test]
    async fn the_peer_and_the_addresses_come_from_the_extensions() {
        let prod = Principal::And(vec![
            Principal::Authenticated(Some(StringMatch::Prefix("spiffe://td/ns/prod/".into()))),
            Principal::SourceIp("10.0.0.0/8".parse().unwrap()),
        ]);
        let layer = AuthzLayer::fixed(engine(Action::Allow, Permission::DestinationPort(8443), prod))
            .with_local_addr("10.0.0.1:8443".parse().unwrap());
        let (calls, service) = counting();
        let request = |peer: &str, from: &str, local: Option<&str>| {
            let mut request = grpc("/svc.Greeter/SayHello");
            request.extensions_mut().insert(PeerIdentity(peer.into()));
            request.extensions_mut().insert(from.parse::<SocketAddr>().unwrap());
            if let Some(local) = local {
                request.extensions_mut().insert(LocalAddr(local.parse().unwrap()));
            }
            request
        };
        let status = |response: http::Response<String>| response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
        let call = |r| layer.layer(service.clone()).oneshot(r);
        assert_eq!(status(call(request("spiffe://td/ns/prod/sa/web", "10.1.2.3:4000", None)).await.unwrap()), None);
        assert_eq!(status(call(request("spiffe://td/ns/dev/sa/web", "10.1.2.3:4000", None)).await.unwrap()).as_deref(), Some("7"));
        assert_eq!(status(call(request("spiffe://td/ns/prod/sa/web", "192.168.0.1:4000", None)).await.unwrap()).as_deref(), Some("7"));
        let other_port = request("spiffe://td/ns/prod/sa/web", "10.1.2.3:4000", Some("10.0.0.1:9000"));
        assert_eq!(status(call(other_port).await.unwrap()).as_deref(), Some("7"), "the request's LocalAddr wins over the layer's");
        let mut no_peer = grpc("/svc.Greeter/SayHello");
        no_peer.extensions_mut().insert("10.1.2.3:4000".parse::<SocketAddr>().unwrap());
        assert_eq!(status(call(no_peer).await.unwrap()).as_deref(), Some("7"), "no identity, not authenticated");
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_new_engine_takes_effect_on_the_next_request() {
        let (publish, receiver) = watch::channel(Arc::new(Engine::default()));
        let layer = AuthzLayer::new(receiver);
        let (calls, service) = counting();
        let mut service = layer.layer(service);
        assert_eq!(service.ready().await.unwrap().call(grpc("/admin/Reset")).await.unwrap().headers().get("grpc-status"), None);
        publish.send_replace(Arc::new(deny_admin()));
        assert_eq!(service.ready().await.unwrap().call(grpc("/admin/Reset")).await.unwrap().headers()["grpc-status"], "7");
        let host_rule = engine(
            Action::Deny,
            Permission::Header(mesh_core::HeaderMatch {
                name: "host".into(),
                matcher: StringMatch::Exact("example.com".into()),
                invert: false,
            }),
            Principal::Any,
        );
        publish.send_replace(Arc::new(host_rule));
        let shouting = http::Request::builder().uri("http://EXAMPLE.com/").body(()).unwrap();
        assert_eq!(service.ready().await.unwrap().call(shouting).await.unwrap().status(), http::StatusCode::FORBIDDEN);
        assert_eq!(service.ready().await.unwrap().call(grpc("/admin/Reset")).await.unwrap().headers().get("grpc-status"), None);
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert_eq!(layer.counts(), AuthzCounts { allowed: 2, denied: 2 });
    }
}
