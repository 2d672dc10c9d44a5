//! The mesh CA: a root it generates or loads, or an intermediate under a user's root, that issues short-lived
//! SPIFFE workload certificates (X.509-SVIDs).
//!
//! - Keys are ECDSA P-256. A workload certificate carries exactly one URI SAN (its SPIFFE ID), may carry DNS
//!   names for peers that check host names, is valid for both server and client authentication, and is never
//!   a CA. It is valid from a minute before it was issued (clock skew between hosts) for its lifetime: 24 h
//!   by default, renewed at half life.
//! - A CA certificate names its trust domain as the URI SAN `spiffe://<trust-domain>`; the CA only issues
//!   identities in that domain.
//! - On disk, a CA is `ca-cert.pem` (the CA certificate, then the chain above it up to the root), `ca-key.pem`
//!   (its key, mode 0600) and `bundle.pem` (the roots workloads trust; during a root rotation, old and new).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use mesh_core::identity::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// How long a workload certificate lives unless asked otherwise.
pub const DEFAULT_WORKLOAD_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long a generated root lives.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long an intermediate made under a user's root lives.
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far back a certificate's validity starts, for clocks that disagree.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why the CA could not load, make or issue a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA file holds no usable certificate or key.
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The identity is not one this CA may issue.
    #[error("cannot issue {id:?}: {reason}")]
    Identity {
        /// The identity asked for.
        id: String,
        /// Why not.
        reason: String,
    },
    /// A validity time does not fit a certificate.
    #[error("validity: {0}")]
    Time(String),
    /// A certificate signing request could not be read or does not ask for what it may.
    #[error("certificate signing request: {0}")]
    Csr(String),
    /// Generating or signing failed.
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A workload's certificate chain, its key (unless it sent a CSR), the trust bundle, and when it expires.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf, then the chain above it up to (not including) the root, as PEM.
    pub chain: String,
    /// The leaf's private key (PEM); `None` when the workload kept its key and sent a CSR.
    pub key: Option<String>,
    /// The roots to trust (PEM).
    pub bundle: String,
    /// When the leaf stops being valid.
    pub not_after: SystemTime,
    /// When the workload should renew: half its lifetime from issue.
    pub renew_at: SystemTime,
}

impl Issued {
    /// Writes `dir/cert.pem`, `dir/key.pem` (mode 0600) and `dir/ca.pem`, each replaced whole (written aside,
    /// then renamed), so a reader never sees half a file.
    pub fn write_to(&self, dir: &Path) -> Result<(), CaError> {
        write_workload_files(dir, &self.chain, self.key.as_deref(), &self.bundle)
    }
}

/// Writes a workload's `dir/key.pem` (0600, when given), `dir/cert.pem` and `dir/ca.pem`, each written aside and
/// renamed, the key first, so a watcher never reads half a file.
pub fn write_workload_files(dir: &Path, chain: &str, key: Option<&str>, bundle: &str) -> Result<(), CaError> {
    std::fs::create_dir_all(dir).map_err(|source| CaError::Io { path: dir.to_owned(), source })?;
    if let Some(key) = key {
        write_file(&dir.join("key.pem"), key, true)?;
    }
    write_file(&dir.join("cert.pem"), chain, false)?;
    write_file(&dir.join("ca.pem"), bundle, false)
}

/// The mesh CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate, then the chain above it (PEM, without the root when the CA is not the root).
    chain_above: String,
    /// The roots workloads trust (PEM).
    bundle: String,
    /// The trust domain the CA issues in (from its URI SAN), if it names one.
    trust_domain: Option<String>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let params = ca_params(trust_domain, "mesh root CA", ROOT_LIFETIME)?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        Ok(Self { issuer: Issuer::new(params, key), chain_above: String::new(), bundle: pem, trust_domain: Some(trust_domain.into()) })
    }

    /// A new intermediate for `trust_domain` under a user's CA (`parent_cert`, the parent's certificate then its
    /// chain up to the root, and `parent_key`, PEM).
    pub fn intermediate(trust_domain: &str, parent_cert: &str, parent_key: &str) -> Result<Self, CaError> {
        let parent = Self::from_pem(parent_cert, parent_key, None, Path::new("<parent CA>"))?;
        let params = ca_params(trust_domain, "mesh intermediate CA", INTERMEDIATE_LIFETIME)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &parent.issuer)?;
        let chain_above = format!("{}{}", cert.pem(), parent.chain_above);
        Ok(Self { issuer: Issuer::new(params, key), chain_above, bundle: parent.bundle, trust_domain: Some(trust_domain.into()) })
    }

    /// Loads a CA from PEM: its certificate (then the chain above it, the root last), its key, and the bundle
    /// (default: the last certificate of the chain). `origin` names where it came from in errors.
    pub fn from_pem(cert: &str, key: &str, bundle: Option<&str>, origin: &Path) -> Result<Self, CaError> {
        let bad = |reason: String| CaError::BadFile { path: origin.to_owned(), reason };
        let certs = pem_blocks(cert).map_err(|e| bad(format!("certificate: {e}")))?;
        let (Some((_, own)), Some((root, _))) = (certs.first(), certs.last()) else { return Err(bad("no certificate in it".into())) };
        let key = KeyPair::from_pem(key).map_err(|e| bad(format!("key: {e}")))?;
        let trust_domain = trust_domain_of(own).map_err(|reason| bad(format!("certificate: {reason}")))?;
        let issuer = Issuer::from_ca_cert_der(own, key).map_err(|e| bad(format!("certificate: {e}")))?;
        let bundle = bundle.map_or_else(|| root.clone(), str::to_owned);
        // The chain a workload presents stops below the root: a root is its own bundle.
        let is_root = |der: &CertificateDer<'_>| x509_parser::parse_x509_certificate(der).is_ok_and(|(_, c)| c.subject() == c.issuer());
        let chain_above = certs.iter().filter(|(_, der)| !is_root(der)).map(|(pem, _)| pem.as_str()).collect();
        Ok(Self { issuer, chain_above, bundle, trust_domain })
    }

    /// Opens the CA kept in `dir` (see the module docs), or generates a root for `trust_domain` and keeps it
    /// there when the directory holds none.
    pub fn open_or_generate(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let (cert_path, key_path, bundle_path) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"), dir.join("bundle.pem"));
        if !cert_path.exists() {
            let ca = Self::generate(trust_domain)?;
            ca.save(dir)?;
            return Ok(ca);
        }
        let read = |path: &Path| std::fs::read_to_string(path).map_err(|source| CaError::Io { path: path.to_owned(), source });
        let bundle = if bundle_path.exists() { Some(read(&bundle_path)?) } else { None };
        Self::from_pem(&read(&cert_path)?, &read(&key_path)?, bundle.as_deref(), &cert_path)
    }

    /// Keeps the CA in `dir` (see the module docs).
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io { path: dir.to_owned(), source })?;
        write_file(&dir.join("ca-key.pem"), &self.issuer.key().serialize_pem(), true)?;
        let own = if self.chain_above.is_empty() { self.bundle.clone() } else { self.chain_above.clone() };
        write_file(&dir.join("ca-cert.pem"), &own, false)?;
        write_file(&dir.join("bundle.pem"), &self.bundle, false)
    }

    /// The trust domain the CA issues in, when its certificate names one.
    pub fn trust_domain(&self) -> Option<&str> {
        self.trust_domain.as_deref()
    }

    /// The roots workloads trust (PEM).
    pub fn bundle(&self) -> &str {
        &self.bundle
    }

    /// Adds roots to the bundle (a root rotation's overlap: workloads trust the old and the new root).
    pub fn trust_also(&mut self, roots: &str) {
        if !self.bundle.ends_with('\n') {
            self.bundle.push('\n');
        }
        self.bundle.push_str(roots);
    }

    /// A new key and certificate for `identity`, valid for `lifetime` from `now`, with extra `dns` names.
    pub fn issue(&self, identity: &str, dns: &[String], lifetime: Duration, now: SystemTime) -> Result<Issued, CaError> {
        let key = KeyPair::generate()?;
        let mut issued = self.sign(&key, identity, dns, lifetime, now)?;
        issued.key = Some(key.serialize_pem());
        Ok(issued)
    }

    /// A certificate for the key in `csr` (PEM), for `identity` (the caller's proven one; whatever the CSR asks
    /// for besides that key is ignored).
    pub fn sign_csr(&self, csr: &str, identity: &str, lifetime: Duration, now: SystemTime) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr).map_err(|e| CaError::Csr(e.to_string()))?;
        self.sign(&csr.public_key, identity, &[], lifetime, now)
    }

    fn sign(
        &self,
        key: &impl rcgen::PublicKeyData,
        identity: &str,
        dns: &[String],
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        let refuse = |reason: String| CaError::Identity { id: identity.to_owned(), reason };
        let id = SpiffeId::parse(identity).map_err(|e| refuse(e.to_string()))?;
        if let Some(domain) = &self.trust_domain
            && id.trust_domain() != domain
        {
            return Err(refuse(format!("this CA issues identities in the trust domain {domain:?} only")));
        }
        if id.path().is_empty() {
            return Err(refuse("a workload identity needs a path (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)".into()));
        }
        if lifetime < Duration::from_secs(1) {
            return Err(refuse("the lifetime must be at least 1 s".into()));
        }
        let mut params = CertificateParams::new(dns.to_vec())?;
        params.subject_alt_names.insert(0, SanType::URI(identity.try_into()?));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, now, lifetime)?;
        let cert = params.signed_by(key, &self.issuer)?;
        let not_after = now + lifetime;
        Ok(Issued {
            chain: format!("{}{}", cert.pem(), self.chain_above),
            key: None,
            bundle: self.bundle.clone(),
            not_after,
            renew_at: now + lifetime / 2,
        })
    }
}

/// Keeps `dir` holding a valid certificate for `identity` from `ca`: issues one now (an error stops here), then
/// a new one at each half life, in a task. A failed renewal is logged and tried again a minute later.
pub fn keep_issued(ca: std::sync::Arc<Ca>, identity: String, dir: PathBuf) -> Result<tokio::task::JoinHandle<()>, CaError> {
    let issue = move || -> Result<Issued, CaError> {
        let issued = ca.issue(&identity, &[], DEFAULT_WORKLOAD_LIFETIME, SystemTime::now())?;
        issued.write_to(&dir)?;
        Ok(issued)
    };
    let first = issue()?;
    Ok(tokio::spawn(async move {
        let mut renew_at = first.renew_at;
        loop {
            let wait = renew_at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
            renew_at = match issue() {
                Ok(issued) => issued.renew_at,
                Err(error) => {
                    tracing::warn!(%error, "renewing a workload certificate failed; trying again in a minute");
                    SystemTime::now() + Duration::from_secs(60)
                }
            };
        }
    }))
}

/// Parameters of a CA certificate for `trust_domain`.
fn ca_params(trust_domain: &str, name: &str, lifetime: Duration) -> Result<CertificateParams, CaError> {
    let id = format!("spiffe://{trust_domain}");
    SpiffeId::parse(&id).map_err(|e| CaError::Identity { id: id.clone(), reason: e.to_string() })?;
    let mut params = CertificateParams::new(Vec::new())?;
    params.subject_alt_names.push(SanType::URI(id.as_str().try_into()?));
    // Each CA's own name: during a root rotation two roots of one trust domain are trusted side by side, and a
    // verifier picks the issuer of a chain by name (webpki does not try a second root of the same name).
    let tag = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), trust_domain) as u32;
    params.distinguished_name.push(DnType::CommonName, format!("{name} {tag:08x}"));
    params.distinguished_name.push(DnType::OrganizationName, trust_domain);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, SystemTime::now(), lifetime)?;
    Ok(params)
}

/// Valid from [`BACKDATE`] before `now` for `lifetime` after it, with a random serial.
fn validity(params: &mut CertificateParams, now: SystemTime, lifetime: Duration) -> Result<(), CaError> {
    let at = |t: SystemTime| {
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
            .map_err(|e| CaError::Time(format!("out of range: {e}")))
    };
    params.not_before = at(now.checked_sub(BACKDATE).unwrap_or(now))?;
    params.not_after = at(now + lifetime)?;
    // 128 random bits: two hashers, each keyed from the OS's randomness.
    let random = || std::hash::BuildHasher::build_hasher(&std::collections::hash_map::RandomState::new());
    let mut serial = [0u8; 16];
    serial[..8].copy_from_slice(&std::hash::Hasher::finish(&random()).to_be_bytes());
    serial[8..].copy_from_slice(&std::hash::Hasher::finish(&random()).to_be_bytes());
    serial[0] &= 0x7f; // positive
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(())
}

/// The trust domain a CA certificate names in its URI SAN, if any.
fn trust_domain_of(cert: &CertificateDer<'_>) -> Result<Option<String>, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    if !parsed.is_ca() {
        return Err("not a CA certificate (its basic constraints say it is not a CA)".into());
    }
    let Ok(Some(san)) = parsed.subject_alternative_name() else { return Ok(None) };
    Ok(san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => {
            SpiffeId::parse(uri).ok().filter(|id| id.path().is_empty()).map(|id| id.trust_domain().to_owned())
        }
        _ => None,
    }))
}

/// The PEM blocks of the certificates in `text`, each as written, with its DER.
fn pem_blocks(text: &str) -> Result<Vec<(String, CertificateDer<'static>)>, String> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(begin) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(end) = rest[begin..].find(END) else { return Err("a certificate without its END line".into()) };
        let block = &rest[begin..begin + end + END.len()];
        let der = CertificateDer::from_pem_slice(block.as_bytes()).map_err(|e| e.to_string())?;
        blocks.push((format!("{block}\n"), der));
        rest = &rest[begin + end + END.len()..];
    }
    Ok(blocks)
}

/// Writes `contents` to `path` whole: aside first, then renamed over it; `secret` files are mode 0600.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CaError> {
    let io = |source| CaError::Io { path: path.to_owned(), source };
    let aside = path.with_extension("pem.new");
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&aside).map_err(io)?;
        file.write_all(contents.as_bytes()).map_err(io)?;
    }
    std::fs::rename(&aside, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "spiffe://mesh.test/ns/default/sa/greeter";

    fn leaf(issued: &Issued) -> Vec<(String, CertificateDer<'static>)> {
        pem_blocks(&issued.chain).unwrap()
    }

    #[test]
    fn a_workload_certificate_has_one_uri_san_is_no_ca_and_lives_its_lifetime() {
        let ca = Ca::generate("mesh.test").unwrap();
        let now = SystemTime::now();
        let issued = ca.issue(ID, &["greeter.local".into()], Duration::from_secs(3600), now).unwrap();
        let chain = leaf(&issued);
        assert_eq!(chain.len(), 1, "issued by a root: the leaf alone");
        let (_, cert) = x509_parser::parse_x509_certificate(chain[0].1.as_ref()).unwrap();
        assert!(!cert.is_ca());
        let names = cert.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
        let uris: Vec<_> =
            names.iter().filter_map(|n| if let x509_parser::extensions::GeneralName::URI(u) = n { Some(*u) } else { None }).collect();
        assert_eq!(uris, [ID]);
        let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + 60, "valid from a minute back for the lifetime");
        assert_eq!(issued.renew_at, now + Duration::from_secs(1800), "renewed at half life");
        assert_eq!(issued.bundle, ca.bundle());
        assert!(issued.key.as_deref().is_some_and(|k| k.contains("PRIVATE KEY")));
        // Two certificates never share a serial.
        let other = ca.issue(ID, &[], Duration::from_secs(3600), now).unwrap();
        let serial = |i: &Issued| x509_parser::parse_x509_certificate(leaf(i)[0].1.as_ref()).unwrap().1.raw_serial().to_vec();
        assert_ne!(serial(&issued), serial(&other));
    }

    #[test]
    fn two_roots_of_one_trust_domain_have_their_own_names() {
        let subject = |ca: &Ca| {
            let blocks = pem_blocks(ca.bundle()).unwrap();
            x509_parser::parse_x509_certificate(blocks[0].1.as_ref()).unwrap().1.subject().to_string()
        };
        let (a, b) = (Ca::generate("mesh.test").unwrap(), Ca::generate("mesh.test").unwrap());
        assert_ne!(subject(&a), subject(&b), "a verifier picks a chain's root by name");
    }

    #[test]
    fn the_ca_refuses_identities_outside_its_trust_domain_or_the_spiffe_format() {
        let ca = Ca::generate("mesh.test").unwrap();
        let now = SystemTime::now();
        for (id, reason) in [
            ("spiffe://other.test/ns/a/sa/b", "trust domain \"mesh.test\" only"),
            ("spiffe://mesh.test", "needs a path"),
            ("greeter", "spiffe://"),
        ] {
            let error = ca.issue(id, &[], DEFAULT_WORKLOAD_LIFETIME, now).unwrap_err().to_string();
            assert!(error.contains(reason) && error.contains(id), "{id}: {error}");
        }
    }

    #[test]
    fn an_intermediate_under_a_users_root_issues_chains_that_end_below_the_root() {
        let root = Ca::generate("mesh.test").unwrap();
        let dir = std::env::temp_dir().join(format!("mesh-ca-test-{}", std::process::id()));
        root.save(&dir).unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        let intermediate = Ca::intermediate("mesh.test", &read("ca-cert.pem"), &read("ca-key.pem")).unwrap();
        assert_eq!(intermediate.bundle(), root.bundle(), "workloads trust the user's root");
        let issued = intermediate.issue(ID, &[], DEFAULT_WORKLOAD_LIFETIME, SystemTime::now()).unwrap();
        let chain = leaf(&issued);
        assert_eq!(chain.len(), 2, "the leaf, then the intermediate");
        let (_, middle) = x509_parser::parse_x509_certificate(chain[1].1.as_ref()).unwrap();
        assert!(middle.is_ca());
        let (_, own) = x509_parser::parse_x509_certificate(chain[0].1.as_ref()).unwrap();
        assert_eq!(own.issuer(), middle.subject());

        // Kept and opened again: the same CA.
        let kept = dir.join("intermediate");
        intermediate.save(&kept).unwrap();
        let opened = Ca::open_or_generate(&kept, "mesh.test").unwrap();
        assert_eq!(opened.bundle(), root.bundle());
        assert_eq!(leaf(&opened.issue(ID, &[], DEFAULT_WORKLOAD_LIFETIME, SystemTime::now()).unwrap()).len(), 2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(kept.join("ca-key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
        }

        // A leaf is not a CA.
        issued.write_to(&dir.join("workload")).unwrap();
        let error = Ca::from_pem(&read("workload/cert.pem"), &read("workload/key.pem"), None, Path::new("workload/cert.pem")).unwrap_err();
        assert!(error.to_string().contains("not a CA certificate"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_csr_gets_a_certificate_for_the_callers_identity_and_keeps_its_key() {
        let ca = Ca::generate("mesh.test").unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.subject_alt_names.push(SanType::URI("spiffe://mesh.test/ns/default/sa/admin".try_into().unwrap()));
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let issued = ca.sign_csr(&csr, ID, Duration::from_secs(60), SystemTime::now()).unwrap();
        assert!(issued.key.is_none());
        let chain = leaf(&issued);
        let (_, cert) = x509_parser::parse_x509_certificate(chain[0].1.as_ref()).unwrap();
        assert_eq!(cert.public_key().raw, rcgen::PublicKeyData::subject_public_key_info(&key).as_slice(), "the CSR's key");
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(format!("{:?}", san.value.general_names), format!("{:?}", [x509_parser::extensions::GeneralName::URI(ID)]));
        assert!(ca.sign_csr("not a csr", ID, Duration::from_secs(60), SystemTime::now()).is_err());
    }
}
