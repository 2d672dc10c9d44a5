//! Identity header hygiene for received requests: a caller cannot claim an identity by sending a header.
//!
//! Headers that carry a caller's identity inside the mesh are stripped from every received request:
//! `x-forwarded-client-cert` (XFCC, what Envoy and Istio forward to an application) and the mesh's own
//! `x-mesh-peer-identity`. With [`IdentityHeaders::forward`] the layer then sets XFCC itself from the identity the
//! handshake proved ([`PeerIdentity`] in the request's extensions), in Envoy's format (`By=<own ID>;URI=<caller's
//! ID>`): Envoy's `forward_client_cert_details: SANITIZE_SET`. Without it the header is only removed (Envoy's
//! `SANITIZE`, its default). The mesh sidecar forwards; an in-process server reads the extension instead.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::HeaderValue;
use tower::{Layer, Service};

use crate::connect::PeerIdentity;

/// Headers a received request may not carry in from the network.
pub const IDENTITY_HEADERS: [&str; 2] = ["x-forwarded-client-cert", "x-mesh-peer-identity"];

/// Strips [`IDENTITY_HEADERS`] from received requests, and optionally sets XFCC from the proven identity.
#[derive(Clone, Debug, Default)]
pub struct IdentityHeaders {
    /// This server's own SPIFFE ID, when the proven identity is forwarded as XFCC.
    forward_as: Option<Arc<str>>,
}

impl IdentityHeaders {
    /// Strips the headers only.
    pub fn strip() -> Self {
        Self::default()
    }

    /// Strips them, then sets `x-forwarded-client-cert: By=<own>;URI=<caller>` for a caller that proved an
    /// identity (none for a plaintext caller).
    pub fn forward(own: &str) -> Self {
        Self { forward_as: Some(own.into()) }
    }
}

impl<S> Layer<S> for IdentityHeaders {
    type Service = Sanitized<S>;

    fn layer(&self, inner: S) -> Sanitized<S> {
        Sanitized { inner, forward_as: self.forward_as.clone() }
    }
}

/// The service [`IdentityHeaders`] makes.
#[derive(Clone, Debug)]
pub struct Sanitized<S> {
    inner: S,
    forward_as: Option<Arc<str>>,
}

impl<S, B> Service<http::Request<B>> for Sanitized<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> S::Future {
        let headers = request.headers_mut();
        for name in IDENTITY_HEADERS {
            if headers.remove(name).is_some() {
                tracing::debug!(header = name, "identity header from the network removed");
            }
        }
        if let (Some(own), Some(peer)) = (&self.forward_as, request.extensions().get::<PeerIdentity>()) {
            // SPIFFE IDs are plain ASCII (checked when the certificate was read); quote-free by the ID grammar.
            if let Ok(value) = HeaderValue::from_str(&format!("By={own};URI={}", peer.0)) {
                request.headers_mut().insert(IDENTITY_HEADERS[0], value);
            }
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    async fn seen(layer: IdentityHeaders, peer: Option<&str>, headers: &[(&str, &str)]) -> http::HeaderMap {
        let service = layer.layer(tower::service_fn(|request: http::Request<()>| async move {
            Ok::<_, std::convert::Infallible>(request.headers().clone())
        }));
        let mut request = http::Request::new(());
        for (name, value) in headers {
            request.headers_mut().append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        if let Some(peer) = peer {
            request.extensions_mut().insert(PeerIdentity(peer.into()));
        }
        service.oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn a_forged_identity_header_never_reaches_the_service() {
        let forged =
            [("x-forwarded-client-cert", "URI=spiffe://mesh/ns/prod/sa/admin"), ("x-mesh-peer-identity", "admin"), ("x-other", "kept")];
        let headers = seen(IdentityHeaders::strip(), Some("spiffe://mesh/ns/a/sa/frontend"), &forged).await;
        assert!(headers.get("x-forwarded-client-cert").is_none() && headers.get("x-mesh-peer-identity").is_none(), "{headers:?}");
        assert_eq!(headers["x-other"], "kept");
    }

    #[tokio::test]
    async fn forwarding_sets_xfcc_from_the_proven_identity_only() {
        let own = "spiffe://mesh/ns/a/sa/greeter";
        let forged = [("x-forwarded-client-cert", "URI=spiffe://mesh/ns/prod/sa/admin")];
        let headers = seen(IdentityHeaders::forward(own), Some("spiffe://mesh/ns/a/sa/frontend"), &forged).await;
        assert_eq!(headers.get_all("x-forwarded-client-cert").iter().count(), 1);
        assert_eq!(headers["x-forwarded-client-cert"], "By=spiffe://mesh/ns/a/sa/greeter;URI=spiffe://mesh/ns/a/sa/frontend");
        let plaintext = seen(IdentityHeaders::forward(own), None, &forged).await;
        assert!(plaintext.get("x-forwarded-client-cert").is_none(), "a plaintext caller proves nothing: {plaintext:?}");
    }
}
