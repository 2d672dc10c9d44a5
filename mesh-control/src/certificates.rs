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
#[derive(Clone, Debug)]
pub struct CertificateService {
    ca: Arc<Ca>,
}

impl CertificateService {
    /// Signs with `ca`.
    pub fn new(ca: Arc<Ca>) -> Self {
        Self { ca }
    }

    /// Serves on `listener` with TLS as [`server_identity`], client certificates required, until it fails.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> crate::Result<()> {
        let domain = self.ca.trust_domain().unwrap_or("mesh.local").to_owned();
        let own = self.ca.issue(&server_identity(&domain), &[], DEFAULT_WORKLOAD_LIFETIME, SystemTime::now()).map_err(crate::Error::Ca)?;
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&own.chain, own.key.as_deref().unwrap_or_default()))
            .client_ca_root(tonic::transport::Certificate::from_pem(self.ca.bundle()));
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder().tls_config(tls)?.add_service(self).serve_with_incoming(incoming).await?;
        Ok(())
    }

    fn create(&self, request: &tonic::Request<IstioCertificateRequest>) -> Result<IstioCertificateResponse, tonic::Status> {
        let certs = request.peer_certs().ok_or_else(|| tonic::Status::unauthenticated("no client certificate"))?;
        let leaf = certs.first().ok_or_else(|| tonic::Status::unauthenticated("no client certificate"))?;
        let identity = caller_identity(leaf.as_ref()).map_err(tonic::Status::unauthenticated)?;
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
        let issued = crate::ca::Issued {
            chain: self.chain.clone(),
            key: Some(self.key.clone()),
            bundle: self.bundle.clone(),
            not_after: SystemTime::now(),
            renew_at: SystemTime::now(),
        };
        issued.write_to(dir)
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
    let failed = |what: &str, e: &dyn std::fmt::Display| tonic::Status::internal(format!("{what}: {e}"));
    let key = rcgen::KeyPair::generate().map_err(|e| failed("new key", &e))?;
    let csr = rcgen::CertificateParams::new(Vec::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|csr| csr.pem())
        .map_err(|e| failed("certificate signing request", &e))?;
    let request = IstioCertificateRequest { csr, validity_duration: i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX) };
    let mut grpc = tonic::client::Grpc::new(transport);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.into().to_string()))?;
    let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE);
    let codec = tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
    let response = grpc.unary(tonic::Request::new(request), path, codec).await?.into_inner();
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
    type Future = std::future::Ready<Result<tonic::Response<IstioCertificateResponse>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        std::future::ready(self.0.create(&request).map(tonic::Response::new))
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
