//! Credentials that change: a [`CredentialsSource`] hands out the current [`Credentials`], and a
//! [`FileWatcher`] (gRPC's `file_watcher` certificate provider) replaces them when the files change.
//!
//! A reload never drops a connection or fails a call: connections already made keep the session they
//! authenticated, new handshakes use the new credentials. Files that do not parse, or a key that does not
//! match its certificate (a rotation caught half-written), are logged and skipped: the last good credentials
//! keep serving until the next look finds a consistent set.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Credentials, CredentialsError, Trust};

/// The current credentials of a workload, fixed or reloaded.
#[derive(Clone, Debug)]
pub struct CredentialsSource(watch::Receiver<Arc<Credentials>>);

impl CredentialsSource {
    /// Credentials that never change.
    pub fn fixed(credentials: Arc<Credentials>) -> Self {
        Self(watch::channel(credentials).1)
    }

    /// The credentials new handshakes use.
    pub fn current(&self) -> Arc<Credentials> {
        self.0.borrow().clone()
    }

    /// Waits for the next change; `false` once no one will change them again.
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }
}

impl From<Arc<Credentials>> for CredentialsSource {
    fn from(credentials: Arc<Credentials>) -> Self {
        Self::fixed(credentials)
    }
}

impl From<Credentials> for CredentialsSource {
    fn from(credentials: Credentials) -> Self {
        Self::fixed(Arc::new(credentials))
    }
}

/// gRPC's `file_watcher` certificate provider: the certificate chain and its key (the identity), and the
/// trust bundle as PEM or a SPIFFE trust bundle map (A87), each optional as in gRPC, read again every
/// `refresh_interval`. A bundle map replaces the PEM bundle when both are given (A87's forward compatibility).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileWatcher {
    /// The certificate chain, the leaf first (with `private_key_file`).
    pub certificate_file: Option<PathBuf>,
    /// The leaf's private key.
    pub private_key_file: Option<PathBuf>,
    /// The trust bundle (PEM).
    pub ca_certificate_file: Option<PathBuf>,
    /// The SPIFFE trust bundle map (JSON), roots per trust domain.
    pub spiffe_trust_bundle_map_file: Option<PathBuf>,
    /// How often the files are read again (gRPC's default: 10 minutes).
    pub refresh_interval: Duration,
}

/// What a [`FileWatcher`] read: each file's bytes, `None` for a file it was not given.
type Contents = [Option<Vec<u8>>; 4];

impl FileWatcher {
    /// gRPC's default refresh interval.
    pub const DEFAULT_REFRESH: Duration = Duration::from_secs(600);

    /// Reads the files now (an error names the file and what is wrong with it), then keeps reading them in a
    /// task that ends when the last source is dropped.
    pub fn start(self) -> Result<CredentialsSource, CredentialsError> {
        let (files, credentials) = self.read()?;
        let (tx, rx) = watch::channel(Arc::new(credentials));
        tokio::spawn(async move {
            let mut last = files;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(self.refresh_interval) => {}
                    () = tx.closed() => return,
                }
                let files = match self.contents() {
                    Ok(files) if files == last => continue,
                    Ok(files) => files,
                    Err(error) => {
                        tracing::warn!(%error, "certificate files unreadable; the last good credentials keep serving");
                        continue;
                    }
                };
                match self.parse(&files) {
                    Ok(credentials) => {
                        tracing::info!(identity = ?credentials.identity(), "certificate files changed; new handshakes use them");
                        last = files;
                        tx.send_replace(Arc::new(credentials));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "certificate files changed but are not usable; the last good credentials keep serving")
                    }
                }
            }
        });
        Ok(CredentialsSource(rx))
    }

    fn read(&self) -> Result<(Contents, Credentials), CredentialsError> {
        let files = self.contents()?;
        let credentials = self.parse(&files)?;
        Ok((files, credentials))
    }

    /// The files in the order of [`Contents`]: chain, key, PEM bundle (unread when a bundle map replaces it),
    /// bundle map.
    fn files(&self) -> [(&'static str, Option<&Path>); 4] {
        let pem = self.ca_certificate_file.as_deref().filter(|_| self.spiffe_trust_bundle_map_file.is_none());
        [
            ("certificate chain", self.certificate_file.as_deref()),
            ("key", self.private_key_file.as_deref()),
            ("trust bundle", pem),
            ("SPIFFE trust bundle map", self.spiffe_trust_bundle_map_file.as_deref()),
        ]
    }

    fn contents(&self) -> Result<Contents, CredentialsError> {
        let read = |(what, path): (&'static str, Option<&Path>)| {
            path.map(|path| std::fs::read(path).map_err(|e| CredentialsError { what, reason: format!("{}: {e}", path.display()) }))
                .transpose()
        };
        let [chain, key, ca, map] = self.files().map(read);
        Ok([chain?, key?, ca?, map?])
    }

    fn parse(&self, [chain, key, ca, map]: &Contents) -> Result<Credentials, CredentialsError> {
        let identity = match (chain, key) {
            (Some(chain), Some(key)) => Some((chain.as_slice(), key.as_slice())),
            (None, None) => None,
            _ => return Err(CredentialsError { what: "identity", reason: "certificate_file and private_key_file go together".into() }),
        };
        let trust = match (map, ca) {
            (Some(map), _) => Trust::BundleMap(map),
            (None, Some(ca)) => Trust::Pem(ca),
            (None, None) => Trust::None,
        };
        Credentials::assemble(identity, trust).map_err(|e| {
            let path = self.files().into_iter().find(|(what, _)| *what == e.what).and_then(|(_, path)| path);
            match path {
                Some(path) => CredentialsError { what: e.what, reason: format!("{}: {}", path.display(), e.reason) },
                None => e,
            }
        })
    }
}
