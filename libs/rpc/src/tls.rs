//! rustls server configuration from PEM files, reloaded when the files change.
//!
//! Client certificates are requested on every handshake and verified against the trust
//! bundle when presented; `require_client_cert` makes them mandatory. Certificates and
//! keys are re-read when their files change (SPIFFE-style certificates live an hour), so
//! new connections get the new ones without a restart; a broken new file is logged and
//! the previous configuration stays in force.
//!
//! "Changed" means changed content, not a newer modification time: a rotation that
//! writes within the file system's timestamp granularity, or a Kubernetes Secret volume
//! that swaps a symlink to files with older times, must still be noticed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;
use crate::identity::WorkloadId;

/// Where a listener's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain of the server, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the server (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM trust bundle: the CAs whose client certificates are accepted.
    pub client_ca: PathBuf,
}

/// The process-wide crypto provider: ring only (no aws-lc, no C toolchain surprises).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::tls(path, e))?;
    if certs.is_empty() {
        return Err(Error::tls(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| Error::tls(path, e))
}

/// Builds a root store from a PEM trust bundle.
pub fn read_roots(path: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| Error::tls(path, e))?;
    }
    Ok(roots)
}

/// A server configuration built from `files`, advertising HTTP/2 only (gRPC).
pub fn server_config(
    files: &TlsFiles,
    require_client_cert: bool,
) -> Result<rustls::ServerConfig, Error> {
    let provider = crypto_provider();
    let roots = Arc::new(read_roots(&files.client_ca)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    let verifier = if require_client_cert {
        verifier
    } else {
        verifier.allow_unauthenticated()
    };
    let verifier = verifier
        .build()
        .map_err(|e| Error::tls(&files.client_ca, e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::tls(&files.cert, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(&files.cert)?, read_key(&files.key)?)
        .map_err(|e| Error::tls(&files.key, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// When the first (leaf) certificate of a PEM file expires, in seconds since the epoch.
pub fn certificate_not_after(path: &Path) -> Result<i64, Error> {
    let certs = read_certs(path)?;
    let first = certs
        .first()
        .ok_or_else(|| Error::tls(path, "holds no certificate"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(first.as_ref())
        .map_err(|e| Error::tls(path, format!("cannot parse the certificate: {e}")))?;
    Ok(parsed.validity().not_after.timestamp())
}

/// The kiln workload identity in a (verified) certificate, if it carries one.
pub fn workload_identity(cert: &CertificateDer<'_>) -> Option<WorkloadId> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => WorkloadId::parse(uri),
        _ => None,
    })
}

/// The serial number of a certificate, lowercase hex.
pub fn certificate_serial(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.raw_serial_as_string().replace(':', ""))
}

/// A server configuration that follows its files.
#[derive(Debug)]
pub struct ReloadingServerConfig {
    files: TlsFiles,
    require_client_cert: bool,
    current: RwLock<(Arc<rustls::ServerConfig>, Fingerprint)>,
}

impl ReloadingServerConfig {
    pub fn load(files: TlsFiles, require_client_cert: bool) -> Result<Arc<Self>, Error> {
        let stamp = Fingerprint::of(&files.paths());
        let config = server_config(&files, require_client_cert)?;
        Ok(Arc::new(Self {
            files,
            require_client_cert,
            current: RwLock::new((Arc::new(config), stamp)),
        }))
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Re-reads the files if any changed since the last load. Returns whether it swapped.
    pub fn reload_if_changed(&self) -> bool {
        let stamp = Fingerprint::of(&self.files.paths());
        if stamp == self.current.read().unwrap_or_else(|e| e.into_inner()).1 {
            return false;
        }
        match server_config(&self.files, self.require_client_cert) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) =
                    (Arc::new(config), stamp);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
                true
            }
            Err(err) => {
                tracing::warn!(%err, "TLS files changed but cannot be loaded; keeping the previous ones");
                false
            }
        }
    }

    /// Checks the files every `interval` for as long as the returned task runs.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let Some(this) = this.upgrade() else { return };
                this.reload_if_changed();
            }
        })
    }
}

impl TlsFiles {
    fn paths(&self) -> [&Path; 3] {
        [&self.cert, &self.key, &self.client_ca]
    }
}

/// A digest of the contents of some files (a missing file counts as a content of its
/// own), to tell whether any of them changed. Taken before the files are loaded: a file
/// replaced between the two is seen as changed at the next check, never missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fingerprint(Vec<u8>);

impl Fingerprint {
    pub(crate) fn of(paths: &[&Path]) -> Self {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for path in paths {
            match std::fs::read(path) {
                Ok(bytes) => {
                    digest.update(&(bytes.len() as u64).to_le_bytes());
                    digest.update(&bytes);
                }
                Err(_) => digest.update(&u64::MAX.to_le_bytes()),
            }
        }
        Self(digest.finish().as_ref().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CertificateAuthority, write_file};

    fn write_pair(dir: &Path, ca: &CertificateAuthority) -> TlsFiles {
        let issued = ca.issue_server(&["localhost"]).expect("cert");
        let files = TlsFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
            client_ca: dir.join("ca.pem"),
        };
        write_file(&files.cert, &issued.cert_pem, false).expect("write");
        write_file(&files.key, &issued.key_pem, true).expect("write");
        write_file(&files.client_ca, ca.cert_pem(), false).expect("write");
        files
    }

    #[test]
    fn changed_files_are_picked_up_and_broken_files_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = write_pair(dir.path(), &CertificateAuthority::new("first").expect("ca"));
        let reloading = ReloadingServerConfig::load(files.clone(), false).expect("loads");
        let before = reloading.current();
        assert!(!reloading.reload_if_changed(), "nothing changed yet");

        // New certificate from another CA: swapped in.
        // (a pause, so the new files get a later modification time)
        std::thread::sleep(Duration::from_millis(20));
        write_pair(
            dir.path(),
            &CertificateAuthority::new("second").expect("ca"),
        );
        assert!(reloading.reload_if_changed());
        let after = reloading.current();
        assert!(
            !Arc::ptr_eq(&before, &after),
            "a new configuration is in force"
        );

        // A half-written key: logged and ignored, the working configuration stays.
        std::thread::sleep(Duration::from_millis(20));
        write_file(&files.key, "-----BEGIN PRIVATE KEY-----\ngarbage\n", true).expect("write");
        assert!(!reloading.reload_if_changed());
        assert!(
            Arc::ptr_eq(&after, &reloading.current()),
            "the working configuration stays"
        );
    }

    #[test]
    fn a_new_trust_bundle_alone_is_picked_up_even_with_the_old_modification_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = CertificateAuthority::new("first").expect("ca");
        let files = write_pair(dir.path(), &first);
        let reloading = ReloadingServerConfig::load(files.clone(), false).expect("loads");
        let mtime = std::fs::metadata(&files.client_ca)
            .and_then(|m| m.modified())
            .expect("mtime");
        // A CA rollover: the bundle now holds the old and the new CA; the server's own
        // certificate and key are untouched, and the bundle keeps its old time stamp.
        let second = CertificateAuthority::new("second").expect("ca");
        let bundle = format!("{}{}", first.cert_pem(), second.cert_pem());
        write_file(&files.client_ca, &bundle, false).expect("write");
        std::fs::File::options()
            .write(true)
            .open(&files.client_ca)
            .and_then(|f| f.set_modified(mtime))
            .expect("set mtime");
        assert!(
            reloading.reload_if_changed(),
            "the bundle's content changed"
        );
        assert!(!reloading.reload_if_changed(), "and only once");
    }

    #[test]
    fn missing_or_empty_files_give_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TlsFiles {
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope-key.pem"),
            client_ca: dir.path().join("ca.pem"),
        };
        std::fs::write(&files.client_ca, "").expect("write");
        let err = server_config(&files, false).expect_err("no files");
        let text = err.to_string();
        assert!(
            text.contains("ca.pem") || text.contains("nope.pem"),
            "{text}"
        );
    }
}
