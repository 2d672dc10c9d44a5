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

use super::{Credentials, CredentialsError};

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

/// gRPC's `file_watcher` certificate provider: the certificate chain, its key and the trust bundle as PEM
/// files, read again every `refresh_interval`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileWatcher {
    /// The certificate chain, the leaf first.
    pub certificate_file: PathBuf,
    /// The leaf's private key.
    pub private_key_file: PathBuf,
    /// The trust bundle.
    pub ca_certificate_file: PathBuf,
    /// How often the files are read again (gRPC's default: 10 minutes).
    pub refresh_interval: Duration,
}

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

    fn read(&self) -> Result<([Vec<u8>; 3], Credentials), CredentialsError> {
        let files = self.contents()?;
        let credentials = self.parse(&files)?;
        Ok((files, credentials))
    }

    fn contents(&self) -> Result<[Vec<u8>; 3], CredentialsError> {
        let read =
            |what, path: &Path| std::fs::read(path).map_err(|e| CredentialsError { what, reason: format!("{}: {e}", path.display()) });
        Ok([
            read("certificate chain", &self.certificate_file)?,
            read("key", &self.private_key_file)?,
            read("trust bundle", &self.ca_certificate_file)?,
        ])
    }

    fn parse(&self, [chain, key, ca]: &[Vec<u8>; 3]) -> Result<Credentials, CredentialsError> {
        Credentials::from_pem(chain, key, ca).map_err(|e| {
            let path = match e.what {
                "key" => &self.private_key_file,
                "trust bundle" => &self.ca_certificate_file,
                _ => &self.certificate_file,
            };
            CredentialsError { what: e.what, reason: format!("{}: {}", path.display(), e.reason) }
        })
    }
}
