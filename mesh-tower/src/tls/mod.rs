//! mTLS with SPIFFE identities: a client connector ([`MtlsConnector`]) and a server acceptor ([`MtlsAcceptor`]),
//! over rustls with the workspace's one crypto provider (ring).
//!
//! - Identities are SPIFFE IDs in the certificate's URI SAN (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`).
//! - The client verifies the server's chain against its trust bundle, then its SPIFFE ID against the identities
//!   the cluster accepts ([`TlsPolicy::allowed_identities`]; none listed accepts any ID in the bundle). DNS
//!   names are not checked: the identity is the SPIFFE ID, as in gRPC's xDS security (A29) and Istio.
//! - The server requires a client certificate chaining to its bundle and reads the caller's SPIFFE ID.
//! - TLS 1.3 only and ALPN `h2`, both ways.
//! - A cluster with a TLS policy is only ever reached over TLS: a failed handshake fails the connection with
//!   the reason, never falls back to plaintext. A cluster without one is reached in plaintext.
//! - A peer's certificate must carry exactly one URI SAN, a valid SPIFFE ID (the X.509-SVID rules), and chain
//!   to the bundle of that ID's trust domain: the workload's own domain, one added with
//!   [`Credentials::with_bundle`], or each domain of a SPIFFE trust bundle map ([`Trust::BundleMap`], A87).
//! - Every failed handshake is counted by why it failed ([`HandshakeFailure`], [`HandshakeCounts`]).
//! - Credentials can change while serving ([`CredentialsSource`], [`FileWatcher`]): each new handshake takes the
//!   current ones; connections made keep theirs.
//! - The acceptor is strict (plaintext is refused, and said to be plaintext) or permissive (a connection whose
//!   first byte does not open a TLS record is served in plaintext: the migration mode).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use mesh_core::identity::SpiffeId;
use mesh_core::policy::TlsPolicy;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;

use crate::connect::{Connect, ConnectFuture, Connection, EndpointTarget, PeerIdentity, TcpConnector};

mod files;

pub use files::{CredentialsSource, FileWatcher};

/// The ALPN protocol both sides speak.
const H2: &[u8] = b"h2";

/// Why credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct CredentialsError {
    /// Which part (certificate chain, key, trust bundle).
    pub what: &'static str,
    /// Why.
    pub reason: String,
}

/// A workload's certificate chain and key, and the trust bundle its peers must chain to.
pub struct Credentials {
    /// The workload's certificate chain, leaf first; empty for a trust-only instance.
    chain: Vec<CertificateDer<'static>>,
    /// The leaf's key; `None` for a trust-only instance.
    key: Option<PrivateKeyDer<'static>>,
    /// The roots of each trust domain peers may belong to.
    bundles: BTreeMap<String, Arc<RootCertStore>>,
    /// The bundle of a workload whose own leaf names no trust domain: it vouches for peers of any domain.
    any_domain: Option<Arc<RootCertStore>>,
    /// The workload's own SPIFFE ID, from its leaf.
    identity: Option<PeerIdentity>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("identity", &self.identity).field("chain", &self.chain.len()).finish()
    }
}

impl Credentials {
    /// From PEM: `chain` (the leaf first), its `key`, and the trust bundle `ca` (one or more roots).
    pub fn from_pem(chain: &[u8], key: &[u8], ca: &[u8]) -> Result<Self, CredentialsError> {
        Self::assemble(Some((chain, key)), Trust::Pem(ca))
    }

    /// Trust alone, with no identity of its own (a certificate provider instance with only a CA file or a
    /// bundle map): the roots a cluster's or listener's other instance verifies peers with.
    pub fn trust_only(trust: Trust<'_>) -> Result<Self, CredentialsError> {
        Self::assemble(None, trust)
    }

    /// Credentials from an identity (PEM chain, leaf first, and its key) and a trust source, either optional
    /// (both absent is an error). A PEM bundle verifies peers of the leaf's own trust domain, or of any domain
    /// when the leaf names none (or there is no leaf); a bundle map verifies each domain's peers with that
    /// domain's roots and refuses the rest (A87).
    pub fn assemble(identity: Option<(&[u8], &[u8])>, trust: Trust<'_>) -> Result<Self, CredentialsError> {
        let error = |what| move |e: rustls::pki_types::pem::Error| CredentialsError { what, reason: e.to_string() };
        let (chain, key, own) = match identity {
            None => (Vec::new(), None, None),
            Some((chain, key)) => {
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(chain).collect::<Result<_, _>>().map_err(error("certificate chain"))?;
                let Some(leaf) = chain.first() else {
                    return Err(CredentialsError { what: "certificate chain", reason: "no certificate in it".into() });
                };
                let own = peer_id(leaf).ok();
                let key = PrivateKeyDer::from_pem_slice(key).map_err(error("key"))?;
                rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
                    .map_err(|e| CredentialsError { what: "key", reason: format!("does not fit the certificate chain's leaf: {e}") })?;
                (chain, Some(key), own)
            }
        };
        let (mut bundles, mut any_domain) = (BTreeMap::new(), None);
        match trust {
            Trust::None if key.is_none() => {
                return Err(CredentialsError { what: "credentials", reason: "neither an identity nor a trust bundle".into() });
            }
            Trust::None => {}
            Trust::Pem(ca) => {
                let roots = roots("trust bundle", ca)?;
                match &own {
                    Some(id) => drop(bundles.insert(id.trust_domain().to_owned(), roots)),
                    None => any_domain = Some(roots),
                }
            }
            Trust::BundleMap(json) => bundles = bundle_map(json)?,
        }
        let identity = own.map(|id| PeerIdentity(id.as_str().into()));
        Ok(Self { chain, key, bundles, any_domain, identity })
    }

    /// Also trusts peers of `trust_domain` that chain to `ca` (PEM): a federated trust domain's bundle.
    pub fn with_bundle(mut self, trust_domain: &str, ca: &[u8]) -> Result<Self, CredentialsError> {
        SpiffeId::parse(&format!("spiffe://{trust_domain}"))
            .map_err(|e| CredentialsError { what: "trust domain", reason: e.to_string() })?;
        self.bundles.insert(trust_domain.to_owned(), roots("federated trust bundle", ca)?);
        Ok(self)
    }

    /// The workload's own SPIFFE ID (its leaf's first), if it has one.
    pub fn identity(&self) -> Option<&PeerIdentity> {
        self.identity.as_ref()
    }

    /// These credentials' certificate and key with `other`'s trust bundles (a cluster whose identity and roots
    /// come from two certificate provider instances).
    fn with_bundles_of(&self, other: &Credentials) -> Credentials {
        Credentials {
            chain: self.chain.clone(),
            key: self.key.as_ref().map(PrivateKeyDer::clone_key),
            bundles: other.bundles.clone(),
            any_domain: other.any_domain.clone(),
            identity: self.identity.clone(),
        }
    }
}

/// Where credentials' trust comes from.
#[derive(Clone, Copy, Debug)]
pub enum Trust<'a> {
    /// No roots of their own (an identity-only instance: a cluster takes its roots from another).
    None,
    /// A PEM trust bundle (one or more roots).
    Pem(&'a [u8]),
    /// A SPIFFE trust bundle map (JSON, gRPC A87): roots per trust domain.
    BundleMap(&'a [u8]),
}

/// The X.509 roots of each trust domain of a SPIFFE trust bundle map (gRPC A87, the SPIFFE bundle format):
/// `{"trust_domains": {"<domain>": {"keys": [{"kty": "...", "use": "x509-svid", "x5c": ["<base64 DER>"]}]}}}`.
/// Only `keys` (and `spiffe_sequence`) of a bundle and `kty`, `use` and `x5c` of a key are read; `jwt-svid`
/// keys are skipped, and a domain with no X.509 root is left out (its peers are refused). Any malformed entry
/// fails the whole map, naming the domain and key: a half-read map could refuse or admit the wrong peers.
fn bundle_map(json: &[u8]) -> Result<BTreeMap<String, Arc<RootCertStore>>, CredentialsError> {
    use base64::Engine as _;
    let error = |reason: String| CredentialsError { what: "SPIFFE trust bundle map", reason };
    let map: serde_json::Value = serde_json::from_slice(json).map_err(|e| error(format!("not JSON: {e}")))?;
    let domains =
        map.get("trust_domains").and_then(serde_json::Value::as_object).ok_or_else(|| error("no \"trust_domains\" object".into()))?;
    let mut bundles = BTreeMap::new();
    for (domain, bundle) in domains {
        SpiffeId::parse(&format!("spiffe://{domain}")).map_err(|e| error(format!("trust domain {domain:?}: {e}")))?;
        let keys = bundle.get("keys").and_then(serde_json::Value::as_array).ok_or_else(|| error(format!("{domain}: no \"keys\" array")))?;
        let mut roots = RootCertStore::empty();
        for (i, key) in keys.iter().enumerate() {
            let at = |reason: &str| error(format!("{domain}: keys[{i}]: {reason}"));
            if key.get("kty").and_then(serde_json::Value::as_str).is_none() {
                return Err(at("no \"kty\""));
            }
            match key.get("use").and_then(serde_json::Value::as_str) {
                Some("x509-svid") => {}
                Some("jwt-svid") => continue,
                Some(other) => return Err(at(&format!("\"use\" is {other:?}, not x509-svid or jwt-svid"))),
                None => return Err(at("no \"use\"")),
            }
            let x5c = key.get("x5c").and_then(serde_json::Value::as_array).map(Vec::as_slice);
            let [cert] = x5c.unwrap_or_default() else { return Err(at("\"x5c\" must hold exactly one certificate")) };
            let der = cert
                .as_str()
                .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
                .ok_or_else(|| at("\"x5c\"[0] is not base64"))?;
            roots.add(CertificateDer::from(der)).map_err(|e| at(&e.to_string()))?;
        }
        if roots.is_empty() {
            tracing::debug!(%domain, "SPIFFE bundle has no X.509 root; its peers are refused");
            continue;
        }
        bundles.insert(domain.clone(), Arc::new(roots));
    }
    Ok(bundles)
}

/// The roots in a PEM bundle (at least one).
fn roots(what: &'static str, pem: &[u8]) -> Result<Arc<RootCertStore>, CredentialsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| CredentialsError { what, reason: e.to_string() })?;
        roots.add(cert).map_err(|e| CredentialsError { what, reason: e.to_string() })?;
    }
    if roots.is_empty() {
        return Err(CredentialsError { what, reason: "no certificate in it".into() });
    }
    Ok(Arc::new(roots))
}

/// The key of credentials that carry an identity; a trust-only instance cannot be a workload's identity.
fn identity_key(credentials: &Credentials) -> Result<PrivateKeyDer<'static>, CredentialsError> {
    credentials.key.as_ref().map(PrivateKeyDer::clone_key).ok_or_else(|| CredentialsError {
        what: "identity",
        reason: "the certificate provider instance has no certificate and key of its own (only roots): name an instance with certificate_file and private_key_file for the identity".into(),
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a peer's certificate does not prove a SPIFFE identity we accept.
#[derive(Debug, thiserror::Error)]
enum IdentityError {
    #[error("it has no SPIFFE ID (no URI SAN)")]
    Missing,
    #[error("it has {0} URI SANs; a SPIFFE certificate has exactly one")]
    Several(usize),
    #[error("its URI SAN is not a SPIFFE ID: {0}")]
    Invalid(mesh_core::Error),
    #[error("its SPIFFE ID {0} is in a trust domain we hold no bundle for")]
    UnknownTrustDomain(String),
    #[error("the server's identity {found} is not one the cluster accepts ({allowed:?})")]
    Mismatch { found: String, allowed: Vec<String> },
}

impl IdentityError {
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(self))))
    }
}

/// The one SPIFFE ID in a certificate's URI SAN.
fn peer_id(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else { return Err(IdentityError::Missing) };
    let Ok(Some(san)) = parsed.subject_alternative_name() else { return Err(IdentityError::Missing) };
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris[..] {
        [] => Err(IdentityError::Missing),
        [uri] => SpiffeId::parse(uri).map_err(IdentityError::Invalid),
        _ => Err(IdentityError::Several(uris.len())),
    }
}

/// A certificate's URI, DNS and IP address SANs, as text.
fn subject_alt_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else { return Vec::new() };
    let Ok(Some(san)) = parsed.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(s) | GeneralName::DNSName(s) => Some((*s).to_owned()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The SPIFFE ID in a certificate, if it has exactly one.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<SpiffeId> {
    peer_id(cert).ok()
}

/// The webpki verifiers of each trust domain's bundle, and of the bundle for any domain.
#[derive(Debug)]
struct ByDomain<V: ?Sized> {
    domains: BTreeMap<String, Arc<V>>,
    any: Option<Arc<V>>,
}

impl<V: ?Sized> ByDomain<V> {
    fn build<E: fmt::Display>(
        credentials: &Credentials,
        mut make: impl FnMut(Arc<RootCertStore>) -> Result<Arc<V>, E>,
    ) -> io::Result<Self> {
        let mut domains = BTreeMap::new();
        for (domain, roots) in &credentials.bundles {
            domains.insert(domain.clone(), make(roots.clone()).map_err(|e| io::Error::other(e.to_string()))?);
        }
        let any = credentials.any_domain.clone().map(make).transpose().map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { domains, any })
    }

    /// The peer's ID and the verifier of its trust domain's bundle.
    fn for_peer(&self, leaf: &CertificateDer<'_>) -> Result<(SpiffeId, &Arc<V>), rustls::Error> {
        let id = peer_id(leaf).map_err(IdentityError::into_rustls)?;
        match self.domains.get(id.trust_domain()).or(self.any.as_ref()) {
            Some(verifier) => Ok((id, verifier)),
            None => Err(IdentityError::UnknownTrustDomain(id.to_string()).into_rustls()),
        }
    }
}

/// The handshake signature checks both verifiers make, with the provider's algorithms (`self.provider`).
macro_rules! signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider.signature_verification_algorithms.supported_schemes()
        }
    };
}

/// Checks the peer's one SPIFFE ID, then its chain against that ID's trust domain, then that the cluster
/// accepts the ID (instead of a DNS name).
#[derive(Debug)]
struct SpiffeVerifier {
    chains: ByDomain<rustls::client::WebPkiServerVerifier>,
    allowed: Vec<String>,
    /// The cluster's other SAN matchers (A29).
    matchers: Vec<mesh_core::StringMatch>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (id, chain) = self.chains.for_peer(end_entity)?;
        // webpki checks the chain before the name: a name mismatch means the chain is good.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Ok(_) | Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)) => {}
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {}
            Err(other) => return Err(other),
        }
        let any = self.allowed.is_empty() && self.matchers.is_empty();
        if any || self.allowed.iter().any(|a| a == id.as_str()) {
            return Ok(ServerCertVerified::assertion());
        }
        // A29: any of the leaf's SANs matching any matcher.
        if !self.matchers.is_empty() {
            let sans = subject_alt_names(end_entity);
            if self.matchers.iter().any(|m| sans.iter().any(|san| m.matches(Some(san)))) {
                return Ok(ServerCertVerified::assertion());
            }
        }
        Err(IdentityError::Mismatch { found: id.to_string(), allowed: self.allowed.clone() }.into_rustls())
    }

    signatures!();
}

/// The server's side: the caller's one SPIFFE ID, then its chain against that ID's trust domain. Which callers
/// may do what is authorization's business, not the handshake's.
#[derive(Debug)]
struct SpiffeClientVerifier {
    chains: ByDomain<dyn ClientCertVerifier>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let (_, chain) = self.chains.for_peer(end_entity)?;
        chain.verify_client_cert(end_entity, intermediates, now)
    }

    signatures!();
}

/// Why a handshake failed, as counted: one classification of rustls's and our verifiers' errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The peer's certificate has expired.
    Expired,
    /// The peer's certificate is not valid yet.
    NotYetValid,
    /// The peer's SPIFFE ID is not one the cluster accepts.
    WrongIdentity,
    /// The peer's certificate has no SPIFFE ID, several URI SANs, or an invalid one.
    BadIdentity,
    /// The peer's SPIFFE ID is in a trust domain we hold no bundle for.
    UnknownTrustDomain,
    /// The peer's chain does not lead to the bundle.
    UnknownCa,
    /// The peer presented a CA certificate as its own.
    CaAsLeaf,
    /// A caller presented no certificate to a server that requires one.
    NoClientCertificate,
    /// Plaintext arrived where TLS is required.
    Plaintext,
    /// The peer does not speak TLS 1.3.
    ProtocolVersion,
    /// The peer refused us (its alert: our certificate, usually).
    PeerRefused,
    /// The server did not agree to HTTP/2.
    NoH2,
    /// Anything else (I/O, a malformed message, a bad signature).
    Other,
}

impl HandshakeFailure {
    /// Every reason, in counting order.
    pub const ALL: [Self; 13] = [
        Self::Expired,
        Self::NotYetValid,
        Self::WrongIdentity,
        Self::BadIdentity,
        Self::UnknownTrustDomain,
        Self::UnknownCa,
        Self::CaAsLeaf,
        Self::NoClientCertificate,
        Self::Plaintext,
        Self::ProtocolVersion,
        Self::PeerRefused,
        Self::NoH2,
        Self::Other,
    ];

    /// The reason's name, as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongIdentity => "wrong_identity",
            Self::BadIdentity => "bad_identity",
            Self::UnknownTrustDomain => "unknown_trust_domain",
            Self::UnknownCa => "unknown_ca",
            Self::CaAsLeaf => "ca_as_leaf",
            Self::NoClientCertificate => "no_client_certificate",
            Self::Plaintext => "plaintext",
            Self::ProtocolVersion => "protocol_version",
            Self::PeerRefused => "peer_refused",
            Self::NoH2 => "no_h2",
            Self::Other => "other",
        }
    }

    fn of(error: &rustls::Error) -> Self {
        use rustls::Error as E;
        match error {
            E::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => Self::Expired,
            E::InvalidCertificate(CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }) => Self::NotYetValid,
            E::InvalidCertificate(CertificateError::UnknownIssuer) => Self::UnknownCa,
            E::InvalidCertificate(CertificateError::Other(other)) => {
                if let Some(ours) = other.0.downcast_ref::<IdentityError>() {
                    match ours {
                        IdentityError::Mismatch { .. } => Self::WrongIdentity,
                        IdentityError::UnknownTrustDomain(_) => Self::UnknownTrustDomain,
                        IdentityError::Missing | IdentityError::Several(_) | IdentityError::Invalid(_) => Self::BadIdentity,
                    }
                } else if matches!(other.0.downcast_ref::<webpki::Error>(), Some(webpki::Error::CaUsedAsEndEntity)) {
                    Self::CaAsLeaf
                } else {
                    Self::Other
                }
            }
            E::NoCertificatesPresented => Self::NoClientCertificate,
            E::PeerIncompatible(
                rustls::PeerIncompatible::SupportedVersionsExtensionRequired
                | rustls::PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig
                | rustls::PeerIncompatible::Tls12NotOffered
                | rustls::PeerIncompatible::Tls12NotOfferedOrEnabled
                | rustls::PeerIncompatible::ServerDoesNotSupportTls12Or13,
            )
            | E::AlertReceived(AlertDescription::ProtocolVersion) => Self::ProtocolVersion,
            E::AlertReceived(_) => Self::PeerRefused,
            _ => Self::Other,
        }
    }

    /// The reason of a failed handshake's I/O error (rustls's error inside it, else [`Self::Other`]).
    fn of_io(error: &io::Error) -> Self {
        error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).map_or(Self::Other, Self::of)
    }
}

/// Handshakes that succeeded, and those that failed by why: shared by a channel's connectors, or a server's
/// acceptor.
#[derive(Debug, Default)]
pub struct HandshakeCounts {
    succeeded: AtomicU64,
    failed: [AtomicU64; HandshakeFailure::ALL.len()],
}

impl HandshakeCounts {
    /// Handshakes that succeeded.
    pub fn succeeded(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
    }

    /// Handshakes that failed for `reason`.
    pub fn failed(&self, reason: HandshakeFailure) -> u64 {
        self.failed[reason as usize].load(Ordering::Relaxed)
    }

    /// Each reason that failed a handshake, with how many.
    pub fn failures(&self) -> Vec<(HandshakeFailure, u64)> {
        HandshakeFailure::ALL.into_iter().map(|r| (r, self.failed(r))).filter(|(_, n)| *n > 0).collect()
    }

    fn fail(&self, reason: HandshakeFailure) {
        self.failed[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Connects over mTLS to clusters with a TLS policy, in plaintext to those without.
#[derive(Clone)]
pub struct MtlsConnector {
    tcp: TcpConnector,
    /// `None`: no credentials, so a cluster that asks for TLS is refused.
    credentials: Option<CredentialsSource>,
    /// Trust bundles from another source than the identity's.
    roots: Option<CredentialsSource>,
    /// Why there are no credentials, when it is not simply that none were given.
    missing: Option<Arc<str>>,
    counts: Arc<HandshakeCounts>,
}

impl fmt::Debug for MtlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MtlsConnector").field("credentials", &self.credentials).finish()
    }
}

impl MtlsConnector {
    /// Connects with `credentials` (each handshake with their current value) over `tcp`; without
    /// credentials, only to clusters in plaintext.
    pub fn new(tcp: TcpConnector, credentials: Option<impl Into<CredentialsSource>>) -> Self {
        Self { tcp, credentials: credentials.map(Into::into), roots: None, missing: None, counts: Arc::default() }
    }

    /// Counts handshakes in `counts` (shared with other connectors).
    pub fn with_counts(mut self, counts: Arc<HandshakeCounts>) -> Self {
        self.counts = counts;
        self
    }

    /// The handshakes this connector made and why those that failed did.
    pub fn counts(&self) -> &Arc<HandshakeCounts> {
        &self.counts
    }

    fn client_config(&self, policy: &TlsPolicy) -> io::Result<rustls::ClientConfig> {
        let Some(source) = &self.credentials else {
            let reason = self
                .missing
                .as_deref()
                .unwrap_or("the cluster requires TLS and the channel has no TLS credentials (certificate, key and trust bundle)");
            return Err(io::Error::new(io::ErrorKind::Unsupported, reason.to_owned()));
        };
        let mut credentials = source.current();
        if let Some(roots) = &self.roots {
            credentials = Arc::new(credentials.with_bundles_of(&roots.current()));
        }
        let provider = provider();
        let chains = ByDomain::build(&credentials, |roots| {
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build()
        })?;
        let verifier = SpiffeVerifier {
            chains,
            allowed: policy.allowed_identities.clone(),
            matchers: policy.san_matchers.clone(),
            provider: provider.clone(),
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(credentials.chain.clone(), identity_key(&credentials).map_err(io::Error::other)?)
            .map_err(io::Error::other)?;
        config.alpn_protocols = vec![H2.to_vec()];
        Ok(config)
    }
}

/// A connection made by [`MtlsConnector`] or accepted by [`MtlsAcceptor`].
pub enum MeshIo {
    /// Plaintext (a cluster without a TLS policy).
    Plain(TokioIo<TcpStream>),
    /// mTLS, with the identity the peer proved.
    Tls(Box<TokioIo<tokio_rustls::TlsStream<TcpStream>>>, Option<PeerIdentity>),
}

impl fmt::Debug for MeshIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Plain(_) => f.write_str("MeshIo::Plain"),
            Self::Tls(_, peer) => f.debug_tuple("MeshIo::Tls").field(peer).finish(),
        }
    }
}

impl Connection for MeshIo {
    fn peer_identity(&self) -> Option<PeerIdentity> {
        match self {
            Self::Plain(_) => None,
            Self::Tls(_, peer) => peer.clone(),
        }
    }
}

impl hyper::rt::Read for MeshIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: hyper::rt::ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Self::Tls(io, _) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for MeshIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Self::Tls(io, _) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    // Forwarded, or hyper would flatten its buffers into one write each time (13% of p50 at 64 calls in flight).
    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(io) => io.is_write_vectored(),
            Self::Tls(io, _) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Self::Tls(io, _) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_flush(cx),
            Self::Tls(io, _) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Self::Tls(io, _) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }
}

/// A failed handshake's error: why (counted in `counts`), and the reason in words, our verifier's own as it
/// wrote it, rustls's otherwise.
fn failed(counts: &HandshakeCounts, whom: fmt::Arguments<'_>, error: &io::Error) -> io::Error {
    let why = HandshakeFailure::of_io(error);
    counts.fail(why);
    let detail = match error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) => match other.0.downcast_ref::<webpki::Error>() {
            Some(webpki::Error::CaUsedAsEndEntity) => "invalid peer certificate: a CA certificate presented as a workload's".to_owned(),
            _ => format!("invalid peer certificate: {}", other.0),
        },
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "invalid peer certificate: its chain does not lead to the trust bundle (unknown issuer)".to_owned()
        }
        _ => error.to_string(),
    };
    io::Error::new(error.kind(), format!("TLS handshake {whom} failed ({}): {detail}", why.name()))
}

/// The peer's SPIFFE ID from a finished handshake.
fn peer_of(certs: Option<&[CertificateDer<'static>]>) -> Option<PeerIdentity> {
    let leaf = certs?.first()?;
    spiffe_id(leaf).map(|id| PeerIdentity(id.as_str().into()))
}

impl Connect for MtlsConnector {
    type Io = MeshIo;

    fn connect(&self, target: &EndpointTarget) -> ConnectFuture<MeshIo> {
        let addr = target.addr();
        let Some(policy) = target.tls.clone() else {
            let plain = self.tcp.connect(target);
            return Box::pin(async move { plain.await.map(MeshIo::Plain) });
        };
        let config = self.client_config(&policy);
        let mut plain = target.clone();
        plain.tls = None;
        let tcp = self.tcp.connect(&plain);
        let counts = self.counts.clone();
        Box::pin(async move {
            let config = config?;
            // The SNI the cluster names, else the address (identity is the SPIFFE ID either way).
            let name = match &policy.server_name {
                Some(name) => ServerName::try_from(name.clone()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
                None => ServerName::IpAddress(addr.ip().into()),
            };
            let stream = tcp.await?.into_inner();
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, stream)
                .await
                .map_err(|e| failed(&counts, format_args!("with {addr}"), &e))?;
            if tls.get_ref().1.alpn_protocol() != Some(H2) {
                counts.fail(HandshakeFailure::NoH2);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("TLS handshake with {addr} failed (no_h2): the server did not agree to h2"),
                ));
            }
            counts.succeeded.fetch_add(1, Ordering::Relaxed);
            let peer = peer_of(tls.get_ref().1.peer_certificates());
            Ok(MeshIo::Tls(Box::new(TokioIo::new(tokio_rustls::TlsStream::Client(tls))), peer))
        })
    }
}

/// Makes each cluster's [`MtlsConnector`], with the cluster's keepalive settings and the channel's credentials,
/// all counting handshakes in one place.
#[derive(Clone, Debug, Default)]
pub struct MakeMtls {
    credentials: Option<CredentialsSource>,
    /// Certificate provider instances by name (the bootstrap's `certificate_providers`), for clusters that
    /// name theirs.
    providers: Arc<BTreeMap<String, CredentialsSource>>,
    counts: Arc<HandshakeCounts>,
}

impl MakeMtls {
    /// Connectors with `credentials` (without: plaintext clusters only).
    pub fn new(credentials: Option<CredentialsSource>) -> Self {
        Self { credentials, providers: Arc::default(), counts: Arc::default() }
    }

    /// Certificate provider instances by name: a cluster whose TLS policy names an instance
    /// ([`TlsPolicy::certificate_provider`], [`TlsPolicy::ca_certificate_provider`]) takes its credentials from it.
    pub fn with_providers(mut self, providers: BTreeMap<String, CredentialsSource>) -> Self {
        self.providers = Arc::new(providers);
        self
    }

    /// The handshakes of every connector made.
    pub fn counts(&self) -> &Arc<HandshakeCounts> {
        &self.counts
    }
}

impl crate::cluster::MakeConnect for MakeMtls {
    type Connect = MtlsConnector;

    fn make_connect(&self, cluster: &crate::cluster::ClusterTarget) -> MtlsConnector {
        let tls = cluster.balancer.tls.as_ref();
        let mut connector = MtlsConnector::new(TcpConnector::from_policy(&cluster.balancer.connection), self.credentials.clone())
            .with_counts(self.counts.clone());
        let mut missing = None;
        let mut instance = |name: &str| {
            let found = self.providers.get(name).cloned();
            if found.is_none() {
                let reason = format!(
                    "the cluster's TLS names the certificate provider instance {name:?}, which the bootstrap's certificate_providers do not define"
                );
                tracing::warn!(cluster = %cluster.name, "{reason}");
                missing = Some(reason.into());
            }
            found
        };
        let identity = tls.and_then(|t| t.certificate_provider.as_deref());
        if let Some(name) = identity {
            connector.credentials = instance(name);
        }
        match tls.and_then(|t| t.ca_certificate_provider.as_deref()) {
            Some(name) if Some(name) != identity => connector.roots = instance(name),
            _ => {}
        }
        connector.missing = missing;
        connector
    }
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Accepts mTLS connections: the caller must present a certificate chaining to the bundle of its trust domain.
/// Strict unless made [`permissive`](Self::permissive).
#[derive(Clone)]
pub struct MtlsAcceptor {
    /// The credentials the current TLS acceptor was built from, and it.
    current: Arc<std::sync::RwLock<(Arc<Credentials>, tokio_rustls::TlsAcceptor)>>,
    source: CredentialsSource,
    permissive: bool,
    counts: Arc<HandshakeCounts>,
}

impl fmt::Debug for MtlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MtlsAcceptor").field("permissive", &self.permissive).finish_non_exhaustive()
    }
}

impl MtlsAcceptor {
    /// Serves with `credentials` (each handshake with their current value), requiring clients that chain to
    /// their bundle; plaintext is refused.
    pub fn new(credentials: impl Into<CredentialsSource>) -> Result<Self, CredentialsError> {
        let source = credentials.into();
        let credentials = source.current();
        let acceptor = Self::tls(&credentials)?;
        let current = Arc::new(std::sync::RwLock::new((credentials, acceptor)));
        Ok(Self { current, source, permissive: false, counts: Arc::default() })
    }

    fn tls(credentials: &Credentials) -> Result<tokio_rustls::TlsAcceptor, CredentialsError> {
        let error = |e: &dyn fmt::Display| CredentialsError { what: "server TLS settings", reason: e.to_string() };
        let provider = provider();
        let chains = ByDomain::build(credentials, |roots| {
            WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build().map(|v| v as Arc<dyn ClientCertVerifier>)
        })
        .map_err(|e| error(&e))?;
        let clients = Arc::new(SpiffeClientVerifier { chains, provider: provider.clone() });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| error(&e))?
            .with_client_cert_verifier(clients)
            .with_single_cert(credentials.chain.clone(), identity_key(credentials).map_err(|e| error(&e))?)
            .map_err(|e| error(&e))?;
        config.alpn_protocols = vec![H2.to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    /// The TLS acceptor for the source's current credentials, rebuilt when they changed.
    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let credentials = self.source.current();
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        if Arc::ptr_eq(&current.0, &credentials) {
            return current.1.clone();
        }
        drop(current);
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        match Self::tls(&credentials) {
            Ok(acceptor) => *current = (credentials, acceptor),
            Err(error) => {
                tracing::warn!(%error, "new credentials unusable for serving; the last good ones keep serving");
                // Not tried again for these credentials.
                current.0 = credentials;
            }
        }
        current.1.clone()
    }

    /// Also serves plaintext: a connection whose first byte does not open a TLS record (the migration mode).
    pub fn permissive(mut self) -> Self {
        self.permissive = true;
        self
    }

    /// Counts handshakes in `counts`.
    pub fn with_counts(mut self, counts: Arc<HandshakeCounts>) -> Self {
        self.counts = counts;
        self
    }

    /// The handshakes accepted and why those that failed did.
    pub fn counts(&self) -> &Arc<HandshakeCounts> {
        &self.counts
    }

    /// The handshake on an accepted stream: the connection and the caller's SPIFFE ID (plaintext, with no
    /// identity, when permissive and the caller speaks plaintext).
    pub async fn accept(&self, stream: TcpStream) -> io::Result<MeshIo> {
        let peer_addr = stream.peer_addr().ok();
        let whom = |peer_addr: Option<std::net::SocketAddr>| peer_addr.map_or_else(|| "an unknown peer".to_owned(), |a| a.to_string());
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} closed before a TLS handshake", whom(peer_addr))));
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            if self.permissive {
                return Ok(MeshIo::Plain(TokioIo::new(stream)));
            }
            self.counts.fail(HandshakeFailure::Plaintext);
            let message = format!("TLS handshake from {} failed (plaintext): plaintext to a port that requires mTLS", whom(peer_addr));
            tracing::warn!(peer = ?peer_addr, "{message}");
            return Err(io::Error::new(io::ErrorKind::InvalidData, message));
        }
        let tls = self.acceptor().accept(stream).await.map_err(|e| {
            let error = failed(&self.counts, format_args!("from {}", whom(peer_addr)), &e);
            tracing::warn!(peer = ?peer_addr, "{error}");
            error
        })?;
        self.counts.succeeded.fetch_add(1, Ordering::Relaxed);
        let peer = peer_of(tls.get_ref().1.peer_certificates());
        Ok(MeshIo::Tls(Box::new(TokioIo::new(tokio_rustls::TlsStream::Server(tls))), peer))
    }
}
