//! Client TLS that follows its files, for services whose workload certificates rotate
//! (SPIFFE issuers hand out certificates that live about an hour; a CA rollover changes
//! the trust bundle).
//!
//! The channel is a tonic balanced channel over one endpoint at a time. When the CA
//! bundle, the certificate or the key change (by content), the new files are checked
//! (PEM parses, the key belongs to the certificate) and an endpoint with the new material
//! replaces the old one: new calls open a new connection and present the new
//! certificate, while calls and streams already running keep their connection until they
//! end (removing an endpoint drops only the balancer's handle on it; the HTTP/2
//! connection lives on while it has open streams). A broken or half-written set of files
//! is logged and ignored: the previous material stays in force and the files are checked
//! again at the next interval.
//!
//! Why not a rustls `ResolvesClientCert` over the same connection: a TLS connection keeps
//! the certificate it was opened with, so a long-lived HTTP/2 channel would present the
//! old one until its connection broke, possibly after the certificate expired. Replacing
//! the endpoint moves new calls to a new connection at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc::Sender;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};

use crate::Error;
use crate::client::ClientConfig;
use crate::tls::{Fingerprint, crypto_provider};

/// Room for endpoint changes not yet taken in (the channel takes them in on its next
/// call; each rotation makes two).
const CHANGE_BACKLOG: usize = 16;

/// Where a client's TLS material lives, and how often to look for changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// PEM trust bundle: the CAs whose server certificates are accepted (during a CA
    /// rollover, the old and the new CA).
    pub ca: PathBuf,
    /// PEM certificate chain (leaf first) and private key to present, if any.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// How often the files are checked for changes. Default: 10 s.
    pub reload_interval: Duration,
}

impl ClientTlsFiles {
    pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

    /// Trusting the CAs in `ca`, presenting no certificate.
    pub fn new(ca: impl Into<PathBuf>) -> Self {
        Self {
            ca: ca.into(),
            identity: None,
            reload_interval: Self::DEFAULT_RELOAD_INTERVAL,
        }
    }

    /// Presenting the certificate in `cert` with the key in `key`.
    pub fn identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    pub fn reload_interval(mut self, every: Duration) -> Self {
        self.reload_interval = every;
        self
    }

    fn paths(&self) -> Vec<&Path> {
        let mut paths = vec![self.ca.as_path()];
        if let Some((cert, key)) = &self.identity {
            paths.push(cert);
            paths.push(key);
        }
        paths
    }

    /// Reads and checks the files.
    fn load(&self) -> Result<Material, Error> {
        let read = |path: &Path| std::fs::read_to_string(path).map_err(|e| Error::io(path, e));
        let ca_pem = read(&self.ca)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs(&self.ca, &ca_pem)? {
            roots.add(cert).map_err(|e| Error::tls(&self.ca, e))?;
        }
        let identity = match &self.identity {
            None => None,
            Some((cert_path, key_path)) => {
                let cert_pem = read(cert_path)?;
                let key_pem = read(key_path)?;
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                    .map_err(|e| Error::tls(key_path, e))?;
                // A rotation writes the certificate and the key one after the other:
                // between the two they do not match, and nothing is swapped in.
                CertifiedKey::from_der(certs(cert_path, &cert_pem)?, key, &crypto_provider())
                    .map_err(|e| {
                        Error::tls(
                            cert_path,
                            format!("does not go with the key in {}: {e}", key_path.display()),
                        )
                    })?;
                Some((cert_pem, key_pem))
            }
        };
        Ok(Material { ca_pem, identity })
    }
}

/// TLS material as read from the files, checked.
struct Material {
    ca_pem: String,
    identity: Option<(String, String)>,
}

impl Material {
    fn endpoint(&self, config: &ClientConfig) -> Result<Endpoint, Error> {
        config.endpoint_with(Some(&self.ca_pem), self.identity.as_ref())
    }
}

fn certs(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::tls(path, e))?;
    if certs.is_empty() {
        return Err(Error::tls(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// Connects now (one connection to check that the endpoint answers and accepts the
/// handshake), then gives a channel that follows `files`.
pub(crate) async fn connect(
    config: &ClientConfig,
    files: &ClientTlsFiles,
) -> Result<Channel, Error> {
    let seen = Fingerprint::of(&files.paths());
    let material = files.load()?;
    drop(
        material
            .endpoint(config)?
            .connect()
            .await
            .map_err(Error::Transport)?,
    );
    start(config, files, seen, &material)
}

/// A channel that follows `files` and connects on first use.
pub(crate) fn connect_lazy(
    config: &ClientConfig,
    files: &ClientTlsFiles,
) -> Result<Channel, Error> {
    let seen = Fingerprint::of(&files.paths());
    let material = files.load()?;
    start(config, files, seen, &material)
}

fn start(
    config: &ClientConfig,
    files: &ClientTlsFiles,
    seen: Fingerprint,
    material: &Material,
) -> Result<Channel, Error> {
    let endpoint = material.endpoint(config)?;
    let (channel, changes) = Channel::balance_channel::<u64>(CHANGE_BACKLOG);
    changes
        .try_send(Change::Insert(0, endpoint))
        .map_err(|e| Error::Client(format!("setting up the channel: {e}")))?;
    tokio::spawn(follow(config.clone(), files.clone(), seen, changes));
    Ok(channel)
}

/// Replaces the channel's endpoint whenever the files change, until the channel is
/// dropped.
async fn follow(
    config: ClientConfig,
    files: ClientTlsFiles,
    mut seen: Fingerprint,
    changes: Sender<Change<u64, Endpoint>>,
) {
    let mut generation = 0;
    let mut ticker = tokio::time::interval(files.reload_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = changes.closed() => return,
            _ = ticker.tick() => {}
        }
        let now = Fingerprint::of(&files.paths());
        if now == seen {
            continue;
        }
        match files.load().and_then(|m| m.endpoint(&config)) {
            Ok(endpoint) => {
                generation += 1;
                let swapped = changes
                    .send(Change::Insert(generation, endpoint))
                    .await
                    .is_ok()
                    && changes.send(Change::Remove(generation - 1)).await.is_ok();
                if !swapped {
                    return; // the channel is gone
                }
                seen = now;
                tracing::info!(
                    endpoint = %config.endpoint,
                    ca = %files.ca.display(),
                    "client TLS files reloaded; new connections use them"
                );
            }
            Err(err) => tracing::warn!(
                %err,
                endpoint = %config.endpoint,
                "client TLS files changed but cannot be loaded; keeping the previous ones"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::WorkloadId;
    use crate::pki::{CertificateAuthority, write_file};

    fn agent() -> WorkloadId {
        WorkloadId {
            trust_domain: "kiln.local".into(),
            service: "agent".into(),
        }
    }

    #[test]
    fn a_certificate_without_its_key_is_refused_with_both_files_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::new("ca").expect("ca");
        let one = ca.issue_workload(&agent()).expect("cert");
        let two = ca.issue_workload(&agent()).expect("cert");
        let files = ClientTlsFiles::new(dir.path().join("ca.pem")).identity(
            dir.path().join("agent.pem"),
            dir.path().join("agent-key.pem"),
        );
        write_file(&files.ca, ca.cert_pem(), false).expect("write");
        write_file(&dir.path().join("agent.pem"), &one.cert_pem, false).expect("write");
        write_file(&dir.path().join("agent-key.pem"), &one.key_pem, true).expect("write");
        assert!(files.load().is_ok());

        // Half-way through a rotation: the new key next to the old certificate.
        write_file(&dir.path().join("agent-key.pem"), &two.key_pem, true).expect("write");
        let text = files.load().err().expect("mismatch").to_string();
        assert!(
            text.contains("agent.pem") && text.contains("agent-key.pem"),
            "{text}"
        );

        write_file(&files.ca, "", false).expect("write");
        let text = files.load().err().expect("empty bundle").to_string();
        assert!(
            text.contains("ca.pem") && text.contains("no certificate"),
            "{text}"
        );
    }
}
