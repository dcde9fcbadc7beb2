//! Certificates for development and tests: a CA, a server certificate for the local
//! host names, and one workload certificate per service with its SPIFFE id.
//!
//! `kiln up` calls [`ensure_dev_pki`] on start: it creates the files under
//! `<data-dir>/pki/` once (keys 0600) and reuses them afterwards. Tests use
//! [`CertificateAuthority`] directly to make throwaway CAs.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::Error;
use crate::identity::WorkloadId;
use crate::tls::TlsFiles;

/// A certificate and its key, PEM-encoded.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// A CA that signs certificates in memory.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

fn pki_err(e: rcgen::Error) -> Error {
    Error::Pki(e.to_string())
}

impl CertificateAuthority {
    /// A fresh self-signed CA called `name`.
    pub fn new(name: &str) -> Result<Self, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "kiln");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(pki_err)?;
        let cert = params.self_signed(&key).map_err(pki_err)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its PEM certificate and key (e.g. the development CA on disk).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(pki_err)?;
        let key_pem = key.serialize_pem();
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(pki_err)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for a server reachable under `hosts` (DNS names or IP addresses),
    /// usable as a client certificate too.
    pub fn issue_server(&self, hosts: &[&str]) -> Result<Issued, Error> {
        let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let mut params = CertificateParams::new(names).map_err(pki_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, hosts.first().copied().unwrap_or("kiln"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(params)
    }

    /// A workload certificate carrying `spiffe://<trust_domain>/service/<service>`.
    pub fn issue_workload(&self, id: &WorkloadId) -> Result<Issued, Error> {
        self.issue_workload_for(id, std::time::Duration::from_secs(365 * 24 * 3600))
    }

    /// [`Self::issue_workload`] valid for `lifetime` from now, as SPIFFE issuers hand
    /// out (an hour is usual; tests of rotation use seconds).
    pub fn issue_workload_for(
        &self,
        id: &WorkloadId,
        lifetime: std::time::Duration,
    ) -> Result<Issued, Error> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).map_err(pki_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("kiln-{}", id.service));
        params
            .subject_alt_names
            .push(SanType::URI(id.uri().try_into().map_err(pki_err)?));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let lifetime = time::Duration::try_from(lifetime).map_err(|e| Error::Pki(e.to_string()))?;
        self.sign_until(params, time::OffsetDateTime::now_utc() + lifetime)
    }

    /// A plain client certificate without any workload identity.
    pub fn issue_client(&self, common_name: &str) -> Result<Issued, Error> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<Issued, Error> {
        self.sign_until(
            params,
            time::OffsetDateTime::now_utc() + time::Duration::days(365),
        )
    }

    fn sign_until(
        &self,
        mut params: CertificateParams,
        not_after: time::OffsetDateTime,
    ) -> Result<Issued, Error> {
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = not_after;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(pki_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(pki_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The files of the development PKI under `<data-dir>/pki/`.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
}

impl DevPki {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }
    pub fn workload_cert(&self, service: &str) -> PathBuf {
        self.dir.join(format!("{service}.pem"))
    }
    pub fn workload_key(&self, service: &str) -> PathBuf {
        self.dir.join(format!("{service}-key.pem"))
    }

    /// The server's TLS files, trusting the development CA for client certificates.
    pub fn server_tls(&self) -> TlsFiles {
        TlsFiles {
            cert: self.server_cert(),
            key: self.server_key(),
            client_ca: self.ca_cert(),
        }
    }
}

/// Creates the development PKI under `dir` unless it is already there, and returns
/// where it lives. The server certificate is for `localhost`, `127.0.0.1` and `::1`.
pub fn ensure_dev_pki(dir: &Path, trust_domain: &str, services: &[&str]) -> Result<DevPki, Error> {
    let pki = DevPki {
        dir: dir.to_path_buf(),
    };
    let mut wanted = vec![
        pki.ca_cert(),
        pki.ca_key(),
        pki.server_cert(),
        pki.server_key(),
    ];
    for s in services {
        wanted.push(pki.workload_cert(s));
        wanted.push(pki.workload_key(s));
    }
    // 0700: it holds the CA key. An existing directory (made 0755 by older versions)
    // is tightened too.
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(dir, e))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(dir, e))?;
    }
    if wanted.iter().all(|p| p.exists()) {
        return Ok(pki);
    }
    tracing::info!(dir = %dir.display(), "creating the development PKI (CA, server and workload certificates)");
    let ca = CertificateAuthority::new("kiln development CA")?;
    write_file(&pki.ca_cert(), ca.cert_pem(), false)?;
    write_file(&pki.ca_key(), &ca.key_pem, true)?;
    let server = ca.issue_server(&["localhost", "127.0.0.1", "::1"])?;
    write_file(&pki.server_cert(), &server.cert_pem, false)?;
    write_file(&pki.server_key(), &server.key_pem, true)?;
    for service in services {
        let id = WorkloadId {
            trust_domain: trust_domain.to_owned(),
            service: (*service).to_owned(),
        };
        let issued = ca.issue_workload(&id)?;
        write_file(&pki.workload_cert(service), &issued.cert_pem, false)?;
        write_file(&pki.workload_key(service), &issued.key_pem, true)?;
    }
    Ok(pki)
}

/// Writes `contents` to `path`; secrets are created 0600 from the start (never
/// world-readable, not even for a moment).
pub fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = fs::OpenOptions::new();
    options
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(|e| Error::io(path, e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn dev_pki_is_created_once_with_private_keys() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki");
        let pki = ensure_dev_pki(&dir, "kiln.local", &["auth", "build"]).expect("created");
        let mode = |p: PathBuf| fs::metadata(p).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode(dir.clone()), 0o700, "the directory holds the CA key");
        assert_eq!(mode(pki.ca_key()), 0o600);
        assert_eq!(mode(pki.server_key()), 0o600);
        assert_eq!(mode(pki.workload_key("build")), 0o600);
        let first = fs::read_to_string(pki.ca_cert()).expect("ca");
        // A directory left 0755 by an older version is tightened when reused.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_dev_pki(&dir, "kiln.local", &["auth", "build"]).expect("reused");
        assert_eq!(mode(dir.clone()), 0o700);
        assert_eq!(
            first,
            fs::read_to_string(pki.ca_cert()).expect("ca"),
            "CA must be reused"
        );

        let cert = crate::tls::read_certs(&pki.workload_cert("build")).expect("cert");
        let id = crate::tls::workload_identity(&cert[0]).expect("has SPIFFE id");
        assert_eq!(id.uri(), "spiffe://kiln.local/service/build");
        let server = crate::tls::read_certs(&pki.server_cert()).expect("cert");
        assert_eq!(crate::tls::workload_identity(&server[0]), None);
    }
}
