//! Certificate renewal over a CSR API shaped like Istio's `IstioCertificateService.CreateCertificate`: a workload
//! sends a certificate signing request over mTLS, authenticated by its current valid certificate, and gets a new
//! chain for the identity that certificate proves.
//!
//! - The service listens on its own port with TLS and requires a client certificate chaining to the mesh's
//!   bundle (tonic's rustls server). Its own certificate is `spiffe://<domain>/ns/mesh-system/sa/mesh-control`.
//! - The identity issued is the caller's proven SPIFFE ID (exactly one URI SAN), never what the CSR asks for:
//!   only the CSR's public key is used. A caller without a valid certificate never reaches the handler.
//! - `validity_duration` (seconds) is honoured up to the CA's default lifetime (24 h); 0 asks for the default.
//! - The answer's `cert_chain` is the leaf, the chain above it, then the roots, each a PEM string (Istio's order).
//! - A workload's first certificate in Kubernetes: with [`CertificateService::with_token_review`], a caller
//!   without a client certificate may present its projected service-account token (`authorization: Bearer
//!   <token>`). The token is checked with the API server's TokenReview (for the service's audience), and an
//!   authenticated `system:serviceaccount:<ns>:<sa>` gets `spiffe://<domain>/ns/<ns>/sa/<sa>`, as Istio's CA
//!   does. The server's certificate then also names the DNS name `mesh-control`, for clients that check host
//!   names on a first, certificate-less connection.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use mesh_core::identity::SpiffeId;
use rustls_pki_types::pem::PemObject;
use tonic::server::{Grpc, NamedService, UnaryService};

use crate::ca::{Ca, DEFAULT_WORKLOAD_LIFETIME};

/// The full method path.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// The control plane's own identity on this port, in the CA's trust domain.
pub fn server_identity(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/ns/mesh-system/sa/mesh-control")
}

/// Istio's `IstioCertificateRequest` (the fields the mesh reads).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds (0: the CA's default).
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
}

/// Istio's `IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// The leaf, its chain, then the roots, each PEM.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// The service: a tower service for tonic's server.
#[derive(Clone)]
pub struct CertificateService {
    ca: Arc<Ca>,
    tokens: Option<TokenReviewer>,
}

impl std::fmt::Debug for CertificateService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateService").field("ca", &self.ca).field("token_review", &self.tokens.is_some()).finish()
    }
}

/// The DNS name in the service's certificate, for certificate-less first connections.
pub const SERVER_NAME: &str = "mesh-control";

/// Checks service-account tokens with the Kubernetes API server's TokenReview.
#[derive(Clone)]
pub struct TokenReviewer {
    client: ::kube::Client,
    audience: String,
}

impl TokenReviewer {
    /// Reviews tokens with `client`, requiring them to be meant for `audience`.
    pub fn new(client: ::kube::Client, audience: impl Into<String>) -> Self {
        Self { client, audience: audience.into() }
    }

    /// The `(namespace, service account)` an authenticated token belongs to.
    async fn review(&self, token: &str) -> Result<(String, String), String> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let api: ::kube::Api<TokenReview> = ::kube::Api::all(self.client.clone());
        let reviewed = api.create(&Default::default(), &review).await.map_err(|e| format!("TokenReview failed: {e}"))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(format!("the token is not authenticated: {}", status.error.unwrap_or_default()));
        }
        if !status.audiences.unwrap_or_default().contains(&self.audience) {
            return Err(format!("the token is not meant for {:?}", self.audience));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        match user.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':')) {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() => Ok((ns.to_owned(), sa.to_owned())),
            _ => Err(format!("{user:?} is not a service account")),
        }
    }
}

impl CertificateService {
    /// Signs with `ca`.
    pub fn new(ca: Arc<Ca>) -> Self {
        Self { ca, tokens: None }
    }

    /// Also gives a first certificate to callers that present a service-account token `reviewer` accepts.
    pub fn with_token_review(mut self, reviewer: TokenReviewer) -> Self {
        self.tokens = Some(reviewer);
        self
    }

    /// Serves on `listener` with TLS as [`server_identity`], client certificates required, until it fails.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> crate::Result<()> {
        let domain = self.ca.trust_domain().unwrap_or("mesh.local").to_owned();
        let own = self
            .ca
            .issue(&server_identity(&domain), &[SERVER_NAME.to_owned()], DEFAULT_WORKLOAD_LIFETIME, SystemTime::now())
            .map_err(crate::Error::Ca)?;
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&own.chain, own.key.as_deref().unwrap_or_default()))
            .client_ca_root(tonic::transport::Certificate::from_pem(self.ca.bundle()))
            // A certificate is then checked if sent; the handler refuses a caller with neither it nor a token.
            .client_auth_optional(self.tokens.is_some());
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder().tls_config(tls)?.add_service(self).serve_with_incoming(incoming).await?;
        Ok(())
    }

    async fn create(&self, request: tonic::Request<IstioCertificateRequest>) -> Result<IstioCertificateResponse, tonic::Status> {
        let identity = self.caller(&request).await.map_err(tonic::Status::unauthenticated)?;
        let asked = request.get_ref();
        let lifetime = match u64::try_from(asked.validity_duration) {
            Ok(0) => DEFAULT_WORKLOAD_LIFETIME,
            Ok(secs) => Duration::from_secs(secs).min(DEFAULT_WORKLOAD_LIFETIME),
            Err(_) => return Err(tonic::Status::invalid_argument("validity_duration must not be negative")),
        };
        let issued = self
            .ca
            .sign_csr(&asked.csr, identity.as_str(), lifetime, SystemTime::now())
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        tracing::info!(%identity, lifetime_s = lifetime.as_secs(), "certificate renewed");
        let mut cert_chain = pem_blocks(&issued.chain);
        cert_chain.extend(pem_blocks(&issued.bundle));
        Ok(IstioCertificateResponse { cert_chain })
    }
}

impl CertificateService {
    /// Who the caller is: its client certificate's SPIFFE ID, else the service account of its token.
    async fn caller(&self, request: &tonic::Request<IstioCertificateRequest>) -> Result<SpiffeId, String> {
        if let Some(leaf) = request.peer_certs().and_then(|certs| certs.first().cloned()) {
            return caller_identity(leaf.as_ref());
        }
        let Some(reviewer) = &self.tokens else { return Err("no client certificate".into()) };
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("neither a client certificate nor a bearer token")?;
        let (namespace, account) = reviewer.review(token).await?;
        let domain = self.ca.trust_domain().unwrap_or("mesh.local");
        SpiffeId::parse(&format!("spiffe://{domain}/ns/{namespace}/sa/{account}")).map_err(|e| e.to_string())
    }
}

/// A renewed key and certificate, as files: what [`renew`] got.
#[derive(Clone, Debug)]
pub struct Renewed {
    /// The new leaf, then the chain above it (PEM).
    pub chain: String,
    /// The new private key (PEM); it never left this process.
    pub key: String,
    /// The roots the CA sent (PEM).
    pub bundle: String,
}

impl Renewed {
    /// Writes `dir/key.pem` (0600), `dir/cert.pem` and `dir/ca.pem`, each replaced whole.
    pub fn write_to(&self, dir: &std::path::Path) -> Result<(), crate::ca::CaError> {
        crate::ca::write_workload_files(dir, &self.chain, Some(&self.key), &self.bundle)
    }
}

/// Asks the service behind `transport` (an mTLS channel presenting the current certificate) for a new
/// certificate valid for `lifetime`, with a key made here: the CSR carries only its public key.
pub async fn renew<T>(transport: T, lifetime: Duration) -> Result<Renewed, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    request_certificate(transport, lifetime, None).await
}

/// A first certificate for the service account of `token` (a projected service-account token), over
/// `transport` (TLS checking the service's certificate; no client certificate).
pub async fn request_certificate<T>(transport: T, lifetime: Duration, token: Option<&str>) -> Result<Renewed, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let failed = |what: &str, e: &dyn std::fmt::Display| tonic::Status::internal(format!("{what}: {e}"));
    let key = rcgen::KeyPair::generate().map_err(|e| failed("new key", &e))?;
    let csr = rcgen::CertificateParams::new(Vec::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|csr| csr.pem())
        .map_err(|e| failed("certificate signing request", &e))?;
    let mut request =
        tonic::Request::new(IstioCertificateRequest { csr, validity_duration: i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX) });
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().map_err(|_| tonic::Status::invalid_argument("the token is not valid header text"))?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut grpc = tonic::client::Grpc::new(transport);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.into().to_string()))?;
    let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE);
    let codec = tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
    let response = grpc.unary(request, path, codec).await?.into_inner();
    // Self-signed certificates are the roots; the rest is the chain, leaf first.
    let (mut chain, mut bundle) = (String::new(), String::new());
    for pem in &response.cert_chain {
        let root = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .ok()
            .and_then(|der| x509_parser::parse_x509_certificate(der.as_ref()).ok().map(|(_, c)| c.subject() == c.issuer()))
            .ok_or_else(|| failed("the answer", &"a certificate that does not parse"))?;
        if root { &mut bundle } else { &mut chain }.push_str(pem);
    }
    if chain.is_empty() || bundle.is_empty() {
        return Err(failed("the answer", &"no leaf or no root in cert_chain"));
    }
    Ok(Renewed { chain, key: key.serialize_pem(), bundle })
}

/// The one SPIFFE ID of a client certificate.
fn caller_identity(der: &[u8]) -> Result<SpiffeId, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("client certificate: {e}"))?;
    let san = cert.subject_alternative_name().ok().flatten().ok_or("the client certificate has no SPIFFE ID")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| if let x509_parser::extensions::GeneralName::URI(u) = n { Some(*u) } else { None })
        .collect();
    match uris[..] {
        [uri] => SpiffeId::parse(uri).map_err(|e| e.to_string()),
        _ => Err(format!("the client certificate has {} URI SANs; a SPIFFE certificate has exactly one", uris.len())),
    }
}

/// Each `-----BEGIN ...-----` block of `pem`, as its own string.
fn pem_blocks(pem: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    pem.split_inclusive(END).filter(|b| b.contains("-----BEGIN")).map(|b| format!("{}\n", b.trim_start())).collect()
}

impl NamedService for CertificateService {
    const NAME: &'static str = "istio.v1.auth.IstioCertificateService";
}

struct Create(CertificateService);

impl UnaryService<IstioCertificateRequest> for Create {
    type Response = IstioCertificateResponse;
    type Future = Pin<Box<dyn Future<Output = Result<tonic::Response<IstioCertificateResponse>, tonic::Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.create(request).await.map(tonic::Response::new) })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for CertificateService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move {
            if request.uri().path() != CREATE_CERTIFICATE {
                return Ok(tonic::Status::unimplemented(format!("{} is not a method of this service", request.uri().path())).into_http());
            }
            Ok(Grpc::new(tonic_prost::ProstCodec::default()).unary(Create(service), request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A mock API server answering TokenReviews: `good` is the service account `shop/cart` for `mesh-control`.
    fn kube_with_token_review() -> ::kube::Client {
        let (service, mut handle) =
            tower_test::mock::pair::<http::Request<::kube::client::Body>, http::Response<http_body_util::Full<bytes::Bytes>>>();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                assert_eq!(request.uri().path(), "/apis/authentication.k8s.io/v1/tokenreviews");
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(review["spec"]["audiences"], serde_json::json!(["mesh-control"]));
                let status = match review["spec"]["token"].as_str() {
                    Some("good") => serde_json::json!({
                        "authenticated": true,
                        "user": { "username": "system:serviceaccount:shop:cart" },
                        "audiences": ["mesh-control"],
                    }),
                    _ => serde_json::json!({ "authenticated": false, "error": "invalid bearer token" }),
                };
                let answer = serde_json::json!({ "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": review["spec"], "status": status });
                let response =
                    http::Response::builder().status(201).body(http_body_util::Full::new(bytes::Bytes::from(answer.to_string()))).unwrap();
                send.send_response(response);
            }
        });
        ::kube::Client::new(service, "default")
    }

    #[tokio::test]
    async fn a_service_account_token_reviewed_by_kubernetes_gets_a_first_certificate_for_its_account() {
        let ca = Arc::new(Ca::generate("mesh.test").unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = CertificateService::new(ca.clone()).with_token_review(TokenReviewer::new(kube_with_token_review(), "mesh-control"));
        tokio::spawn(service.serve(listener));
        // A first connection: TLS checking the service's certificate by its DNS name, no client certificate.
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca.bundle()))
            .domain_name(SERVER_NAME);
        let channel =
            tonic::transport::Channel::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap().connect().await.unwrap();

        let issued = request_certificate(channel.clone(), Duration::from_secs(3600), Some("good")).await.unwrap();
        let leaf = rustls_pki_types::CertificateDer::from_pem_slice(issued.chain.as_bytes()).unwrap();
        assert_eq!(caller_identity(leaf.as_ref()).unwrap().as_str(), "spiffe://mesh.test/ns/shop/sa/cart");
        assert_eq!(issued.bundle, ca.bundle());

        let refused = request_certificate(channel.clone(), Duration::from_secs(3600), Some("forged")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(refused.message().contains("not authenticated: invalid bearer token"), "{refused:?}");
        let anonymous = request_certificate(channel, Duration::from_secs(3600), None).await.unwrap_err();
        assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
        assert!(anonymous.message().contains("neither a client certificate nor a bearer token"), "{anonymous:?}");
    }
}
