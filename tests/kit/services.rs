//! Starting kiln's per-service binaries as a pod would run them: certificates as
//! cert-manager leaves them (tls.crt, tls.key, ca.crt from a test CA), configuration
//! only through `KILN_*` variables, readiness from the "serving" line.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use kiln_rpc::client::ClientConfig;
use kiln_rpc::identity::WorkloadId;
use kiln_rpc::pki::{CertificateAuthority, write_file};

use crate::tools::workspace_binary as binary;

/// The trust domain of the test workloads.
pub const TRUST_DOMAIN: &str = "kiln.test";

/// Certificates as cert-manager would leave them in a pod: tls.crt, tls.key, ca.crt.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: CertificateAuthority,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pki({})", self.dir.path().display())
    }
}

impl Pki {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::new("kiln e2e test CA").expect("CA");
        write_file(&dir.path().join("ca.crt"), ca.cert_pem(), false).expect("write CA");
        Self { dir, ca }
    }

    /// Issues `spiffe://<domain>/service/<name>` into `<dir>/<label>/`.
    pub fn workload(&self, label: &str, domain: &str, name: &str) -> PathBuf {
        let dir = self.dir.path().join(label);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let issued = self
            .ca
            .issue_workload(&WorkloadId {
                trust_domain: domain.into(),
                service: name.into(),
            })
            .expect("issue");
        write_file(&dir.join("tls.crt"), &issued.cert_pem, false).expect("write");
        write_file(&dir.join("tls.key"), &issued.key_pem, true).expect("write");
        dir
    }

    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem().to_owned()
    }

    pub fn client(&self, endpoint: &str, identity: Option<&Path>) -> ClientConfig {
        let mut config = ClientConfig::new(endpoint).ca_pem(self.ca_pem());
        if let Some(dir) = identity {
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("read");
            config = config.identity(read("tls.crt"), read("tls.key"));
        }
        config
    }
}

/// One running binary; killed (and reaped) when dropped.
#[derive(Debug)]
pub struct Service {
    pub child: Child,
    pub endpoint: String,
    /// The metrics listener, when `KILN_SERVER__METRICS_LISTEN` was set.
    pub metrics: Option<SocketAddr>,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kiln-<name>` with the certificate in `certs`, configured only through
/// `KILN_*` variables (as a pod is), and waits for its "serving" line.
pub fn start(name: &str, pki: &Pki, certs: &Path, env: &[(&str, String)]) -> Service {
    let data = pki.dir.path().join(format!("data-{name}"));
    let mut command = Command::new(binary(&format!("kiln-{name}")));
    command
        .env_remove("KILN_CONFIG")
        .env("KILN_SERVER__LISTEN", "127.0.0.1:0")
        .env("KILN_SERVER__DATA_DIR", &data)
        .env("KILN_SERVER__TRUST_DOMAIN", TRUST_DOMAIN)
        .env("KILN_SERVER__TLS__CERT", certs.join("tls.crt"))
        .env("KILN_SERVER__TLS__KEY", certs.join("tls.key"))
        .env("KILN_SERVER__TLS__CA", pki.dir.path().join("ca.crt"))
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn");
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    stdout.read_line(&mut line).expect("read the serving line");
    let prefix = format!("kiln-{name} is serving on https://");
    let Some(rest) = line.strip_prefix(&prefix) else {
        let _ = child.kill();
        panic!("kiln-{name} did not start: {line:?}");
    };
    let port = rest
        .split_whitespace()
        .next()
        .and_then(|addr| addr.rsplit(':').next())
        .expect("address");
    assert!(
        line.contains(&format!("spiffe://{TRUST_DOMAIN}/service/{name}")),
        "{line}"
    );
    // With metrics on, the next line says where (the port was 0).
    let metrics = env
        .iter()
        .any(|(k, _)| *k == "KILN_SERVER__METRICS_LISTEN")
        .then(|| {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read the metrics line");
            line.trim()
                .strip_prefix("metrics: http://")
                .and_then(|rest| rest.strip_suffix("/metrics"))
                .and_then(|addr| addr.parse().ok())
                .unwrap_or_else(|| panic!("kiln-{name}: not a metrics line: {line:?}"))
        });
    Service {
        child,
        // The test certificates name `localhost`, as a pod's would name its Service.
        endpoint: format!("https://localhost:{port}"),
        metrics,
    }
}
