//! Test PKI: a CA and certificates signed by it, written as PEM files (rcgen).
//!
//! Certificates name `localhost` and `127.0.0.1`, so a client connecting to
//! `127.0.0.1:<port>` verifies the server. The mTLS work reuses this for
//! SPIFFE identities (URI SANs).

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

use crate::peers::TempDir;

/// A CA and one server and one client certificate, on disk.
#[derive(Debug)]
pub struct TestPki {
    /// Holds the files; removed on drop.
    pub dir: TempDir,
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Server certificate and key (PEM), for `localhost` and `127.0.0.1`.
    pub server: (PathBuf, PathBuf),
    /// Client certificate and key (PEM).
    pub client: (PathBuf, PathBuf),
    /// A second CA's certificate: trusts nothing above, for "wrong CA" cases.
    pub other_ca: PathBuf,
}

impl TestPki {
    /// Generates fresh keys and certificates into a temporary directory.
    pub fn new() -> anyhow::Result<Self> {
        let dir = TempDir::new("pki")?;
        let write = |name: &str, pem: String| -> anyhow::Result<PathBuf> {
            let path = dir.0.join(name);
            std::fs::write(&path, pem)?;
            Ok(path)
        };
        let (ca_cert, ca_issuer) = new_ca("mesh test CA")?;
        let ca = write("ca.pem", ca_cert)?;
        let (other, _) = new_ca("another CA")?;
        let other_ca = write("other-ca.pem", other)?;
        let leaf = |name: &str| -> anyhow::Result<(String, String)> {
            let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
            params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &ca_issuer)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (cert, key) = leaf("server")?;
        let server = (write("server.pem", cert)?, write("server-key.pem", key)?);
        let (cert, key) = leaf("client")?;
        let client = (write("client.pem", cert)?, write("client-key.pem", key)?);
        Ok(Self { dir, ca, server, client, other_ca })
    }

    /// The server identity, for a tonic server's TLS settings.
    pub fn server_identity(&self) -> anyhow::Result<tonic::transport::Identity> {
        Ok(tonic::transport::Identity::from_pem(std::fs::read(&self.server.0)?, std::fs::read(&self.server.1)?))
    }

    /// The CA certificate, for verifying peers.
    pub fn ca_certificate(&self) -> anyhow::Result<tonic::transport::Certificate> {
        Ok(tonic::transport::Certificate::from_pem(std::fs::read(&self.ca)?))
    }
}

/// A CA that issues SPIFFE workload certificates (the identity in the URI SAN, no DNS name).
pub struct SpiffeCa {
    /// The CA certificate (PEM): the trust bundle.
    pub ca: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for SpiffeCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpiffeCa")
    }
}

impl SpiffeCa {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let (ca, issuer) = new_ca(name)?;
        Ok(Self { ca, issuer })
    }

    /// A workload certificate and key (PEM) for the SPIFFE ID `id`.
    pub fn issue(&self, id: &str) -> anyhow::Result<(String, String)> {
        self.issue_with(&[id], |_| {})
    }

    /// A certificate and key (PEM) with `uris` as its URI SANs, its parameters changed by `edit` first (for
    /// certificates that must be refused: expired, a CA, two IDs).
    pub fn issue_with(&self, uris: &[&str], edit: impl FnOnce(&mut CertificateParams)) -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::new(Vec::new())?;
        for uri in uris {
            params.subject_alt_names.push(SanType::URI((*uri).try_into()?));
        }
        edit(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The mesh's credentials for `id`, trusting this CA.
    pub fn credentials(&self, id: &str) -> anyhow::Result<mesh_tower::tls::Credentials> {
        let (cert, key) = self.issue(id)?;
        Ok(mesh_tower::tls::Credentials::from_pem(cert.as_bytes(), key.as_bytes(), self.ca.as_bytes())?)
    }
}

/// A CA and SPIFFE workload certificates made by another tool, Debian's `openssl`: `dir/ca.pem`, and for each
/// `(name, id)` `dir/<name>.pem` and `dir/<name>-key.pem` (P-256, the ID as the one URI SAN, DNS `localhost`).
pub fn openssl_pki(dir: &std::path::Path, workloads: &[(&str, &str)]) -> anyhow::Result<()> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output();
        let out = out.map_err(|e| anyhow::anyhow!("cannot run openssl (Debian package openssl): {e}"))?;
        anyhow::ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509", "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj", "/CN=openssl test CA"];
    ca.extend(ec);
    ca.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(&ca)?;
    for (i, (name, id)) in workloads.iter().enumerate() {
        let ext = format!(
            "subjectAltName=URI:{id},DNS:localhost\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth,clientAuth\n"
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        let (key, csr, cert) = (format!("{name}-key.pem"), format!("{name}.csr"), format!("{name}.pem"));
        let mut req = vec!["req", "-new", "-keyout", &key, "-out", &csr, "-subj"];
        let subject = format!("/CN={name}");
        req.push(&subject);
        req.extend(ec);
        openssl(&req)?;
        let (serial, ext) = ((1000 + i).to_string(), format!("{name}.ext"));
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-set_serial",
            &serial,
            "-days",
            "1",
            "-out",
            &cert,
            "-extfile",
            &ext,
        ])?;
    }
    Ok(())
}

/// A self-signed CA: its certificate (PEM) and the issuer that signs with it.
fn new_ca(name: &str) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    let mut params = CertificateParams::new(Vec::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}
