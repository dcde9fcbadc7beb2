//! kiln-launch: what a kiln service process does before it serves, the same for the
//! three per-service binaries (`kiln-auth`, `kiln-build`, `kiln-agent`) and `kiln up`:
//!
//! - [`server_settings`]: the `[server]` section as the listener's settings;
//! - [`Workload`]: this process's workload identity (`spiffe://<trust-domain>/service/
//!   <name>`) read from certificate files, checked against the name it runs as, and the
//!   mTLS clients and token verifier that present it;
//! - [`ServiceArgs`]: the flags every service binary has;
//! - [`admin_password`], [`create_private_dir`]; [`block_on`] starts logs and traces.
//!
//! Certificates are followed as they change on both sides (the listener's in
//! `kiln_rpc::tls`, the clients' in `kiln_rpc::reloading_client`).
//!
//! **Mesh mode** (`[server] mesh = true`, `KILN_SERVER__MESH`, `--mesh`): the sidecar
//! holds the certificates and does the mTLS. The listener serves plaintext on loopback
//! (anything else is refused at start) and believes the identity the sidecar forwards;
//! the process has no certificate of its own ([`Workload`] without files) and calls the
//! other services in plaintext at their `[server.endpoints]`, which must then be the
//! sidecar's outbound listeners on loopback (`http://127.0.0.1:PORT`). Outside mesh mode
//! an endpoint must be `https://`: tokens never travel in plaintext between pods.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_config::{Overrides, ServerConfig, TlsPaths};
use kiln_rpc::ServerSettings;
use kiln_rpc::authn::{AuthnConfig, SuiteAuthenticator};
use kiln_rpc::client::ClientConfig;
use kiln_rpc::identity::WorkloadId;
use kiln_rpc::ratelimit::RateLimit;
use kiln_rpc::tls::TlsFiles;

/// Why a service process could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] kiln_config::Error),
    #[error(transparent)]
    Rpc(#[from] kiln_rpc::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// No certificate configured, or one that is not this service's.
    #[error("{0}")]
    Identity(String),
    /// A peer this service calls has no configured address.
    #[error("{0}")]
    Endpoint(String),
    /// `--probe` got an error instead of a status.
    #[error("health check: {0}")]
    Probe(String),
    #[error("{0}")]
    AdminPassword(String),
    #[error(transparent)]
    Metrics(#[from] kiln_metrics::Error),
    /// Mesh mode where it cannot be sound.
    #[error("{0}")]
    Mesh(String),
}

/// The Prometheus listener of `[server] metrics_listen`, running until dropped.
#[derive(Debug)]
pub struct MetricsServer {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `registry` on `listen` (plain HTTP, `GET /metrics`), or nothing when unset.
/// Call after every component has registered its metrics.
pub async fn serve_metrics(
    listen: Option<std::net::SocketAddr>,
    registry: prometheus_client::registry::Registry,
) -> Result<Option<MetricsServer>, Error> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    let listener = kiln_metrics::MetricsListener::bind(listen, Arc::new(registry)).await?;
    let addr = listener.local_addr();
    Ok(Some(MetricsServer {
        addr,
        task: listener.spawn(),
    }))
}

/// Prints where metrics are served (`  metrics: http://<addr>/metrics`), as the line
/// after a binary's "serving" line: with `metrics_listen = "…:0"` it is the only way to
/// learn the port (tests, and scripts that pick free ports).
pub fn announce_metrics(metrics: Option<&MetricsServer>) {
    if let Some(metrics) = metrics {
        println!("  metrics: http://{}/metrics", metrics.addr);
    }
}

/// The `[server]` section as the settings of a listener serving `tls`.
pub fn server_settings(server: &ServerConfig, tls: TlsFiles) -> ServerSettings {
    let mut settings = ServerSettings::new(server.listen, tls);
    settings.trust_domain = server.trust_domain.clone();
    settings.max_message_bytes = server.max_message_bytes;
    settings.shutdown_grace = server.shutdown_grace;
    settings.require_client_cert = server.require_client_cert;
    settings.mesh = server.mesh;
    settings.rate_limit =
        NonZeroU32::new(server.rate_limit_per_second).map(|per_second| RateLimit {
            per_second,
            burst: NonZeroU32::new(server.rate_limit_burst).unwrap_or(per_second),
        });
    settings
}

/// This process's workload identity and the trust bundle it checks peers against; in
/// mesh mode only the name (the sidecar holds the certificate).
#[derive(Clone)]
pub struct Workload {
    pub id: WorkloadId,
    /// `None` in mesh mode.
    files: Option<TlsFiles>,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("id", &self.id.uri())
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Workload {
    /// The identity of service `name` in `[server.tls]`. A certificate that is not
    /// `spiffe://<server.trust_domain>/service/<name>` is refused here, at start, rather
    /// than by every peer at every call.
    ///
    /// In mesh mode no certificate is read, and a `listen` address that is not loopback
    /// is refused here, before anything is opened: a plaintext listener that believes
    /// forwarded identities must be reachable by the sidecar alone.
    pub fn from_config(name: &str, server: &ServerConfig) -> Result<Self, Error> {
        if server.mesh {
            if !server.listen.ip().is_loopback() {
                return Err(Error::Mesh(format!(
                    "mesh mode serves plaintext and believes the identity its sidecar forwards, so it listens on loopback only; listen = \"{}\" is not (use 127.0.0.1:{} and let the sidecar take the pod's port)",
                    server.listen,
                    server.listen.port()
                )));
            }
            if server.tls.is_some() {
                tracing::info!("mesh mode: [server.tls] is not used, the sidecar does the mTLS");
            }
            return Ok(Self {
                id: WorkloadId {
                    trust_domain: server.trust_domain.clone(),
                    service: name.to_owned(),
                },
                files: None,
            });
        }
        let tls = server.tls.as_ref().ok_or_else(|| {
            Error::Identity(format!(
                "kiln-{name} needs its certificate: set [server.tls] cert, key and ca (or KILN_SERVER__TLS__CERT, …)"
            ))
        })?;
        Self::from_files(name, &server.trust_domain, tls)
    }

    /// The identity of service `name` in `files`.
    pub fn from_files(name: &str, trust_domain: &str, files: &TlsPaths) -> Result<Self, Error> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let expected = WorkloadId {
            trust_domain: trust_domain.to_owned(),
            service: name.to_owned(),
        };
        let leaf = kiln_rpc::tls::read_certs(&files.cert)?;
        let found = leaf
            .first()
            .and_then(|c| kiln_rpc::tls::workload_identity(c));
        if found.as_ref() != Some(&expected) {
            return Err(Error::Identity(format!(
                "{}: the certificate is {}, but this is {} (kiln-{name} in trust domain {trust_domain})",
                files.cert.display(),
                found.map_or("no workload identity".to_owned(), |id| id.uri()),
                expected.uri(),
            )));
        }
        // Read once here so that a missing key or bundle stops the start, not the first
        // call; the client follows the files afterwards.
        read(&files.key)?;
        read(&files.ca)?;
        Ok(Self {
            id: expected,
            files: Some(TlsFiles {
                cert: files.cert.clone(),
                key: files.key.clone(),
                client_ca: files.ca.clone(),
            }),
        })
    }

    /// The listener's TLS files: the same certificate serves and identifies. In mesh
    /// mode empty paths, which the listener never reads.
    pub fn tls_files(&self) -> TlsFiles {
        self.files.clone().unwrap_or_else(|| TlsFiles {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            client_ca: PathBuf::new(),
        })
    }

    /// The listener's scheme, for the "serving" line: `http` in mesh mode.
    pub fn scheme(&self) -> &'static str {
        if self.in_mesh() { "http" } else { "https" }
    }

    /// Whether this process is in mesh mode (the sidecar holds its identity).
    pub fn in_mesh(&self) -> bool {
        self.files.is_none()
    }

    /// A client of `endpoint` that presents this identity over mTLS.
    /// The files are followed as they change (short-lived certificates rotate): new
    /// calls use the new identity, streams in flight keep theirs
    /// (see `kiln_rpc::reloading_client`).
    /// In mesh mode a plaintext client: `endpoint` is the sidecar's outbound listener,
    /// and the sidecar presents the identity.
    pub fn client(&self, endpoint: &str) -> ClientConfig {
        let Some(files) = &self.files else {
            return ClientConfig::new(endpoint);
        };
        ClientConfig::new(endpoint).tls_files(
            kiln_rpc::reloading_client::ClientTlsFiles::new(files.client_ca.clone())
                .identity(files.cert.clone(), files.key.clone()),
        )
    }

    /// Token and API-key verification through kiln-auth at `auth_endpoint`, as this
    /// workload, with `[server]`'s API-key cache.
    pub fn authenticator(
        &self,
        server: &ServerConfig,
        auth_endpoint: &str,
    ) -> Arc<SuiteAuthenticator> {
        let mut authn = AuthnConfig::new(self.client(auth_endpoint));
        authn.api_key_ttl = server.api_key_cache;
        authn.api_key_negative_ttl = authn.api_key_negative_ttl.min(authn.api_key_ttl);
        Arc::new(SuiteAuthenticator::new(authn))
    }
}

/// `[server.endpoints]`'s address of `service`, or an error saying how to set it.
/// Outside mesh mode it must be `https://…`; in mesh mode `http://` on loopback (the
/// sidecar's outbound listener).
pub fn endpoint(server: &ServerConfig, service: &str) -> Result<String, Error> {
    let value = match service {
        "auth" => server.endpoints.auth.clone(),
        "build" => server.endpoints.build.clone(),
        _ => None,
    };
    let example = if server.mesh {
        "http://127.0.0.1:PORT"
    } else {
        "https://host:port"
    };
    let value = value.ok_or_else(|| {
        Error::Endpoint(format!(
            "where is kiln-{service}? set [server.endpoints] {service} = \"{example}\" (or KILN_SERVER__ENDPOINTS__{})",
            service.to_ascii_uppercase()
        ))
    })?;
    check_endpoint(server.mesh, service, &value)?;
    Ok(value)
}

/// An endpoint's scheme and host for the mode: mTLS outside the mesh; plaintext to the
/// local sidecar, and nowhere else, inside it.
fn check_endpoint(mesh: bool, service: &str, value: &str) -> Result<(), Error> {
    let refuse = |why: &str| {
        Err(Error::Endpoint(format!(
            "[server.endpoints] {service} = \"{value}\": {why}"
        )))
    };
    if !mesh {
        if value.starts_with("https://") {
            return Ok(());
        }
        return refuse(
            "kiln calls the other services over mTLS: use https://host:port (http:// is for mesh mode, to the local sidecar)",
        );
    }
    let host = value
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .and_then(|authority| authority.rsplit_once(':'))
        .map(|(host, _port)| host);
    match host {
        Some("127.0.0.1" | "localhost" | "[::1]") => Ok(()),
        _ => refuse(
            "in mesh mode kiln calls its sidecar's outbound listener in plaintext on loopback, e.g. http://127.0.0.1:15101; the sidecar does the mTLS",
        ),
    }
}

/// The flags every service binary has; everything else is in the file or `KILN_*`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// A TOML configuration file: `[server]` and this service's section (see
    /// examples/kiln.toml and `kiln config check --service NAME FILE`).
    #[arg(long, env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides `server.listen`).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Where the state lives (overrides `server.data_dir`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Mesh mode: plaintext on a loopback `--listen` behind a sidecar doing the mTLS
    /// (sets `server.mesh`; see `[server] mesh` in examples/kiln.toml).
    #[arg(long)]
    pub mesh: bool,
    /// Instead of serving: ask the running service on this host (`server.listen`'s port
    /// on localhost, over mTLS as this workload) for its grpc.health.v1 status and exit 0
    /// when SERVING. For Kubernetes exec probes: the kubelet's own gRPC probe speaks no
    /// TLS.
    #[arg(long)]
    pub probe: bool,
    /// The service's database: `sqlite:///path` or `postgres://user@host/db`
    /// (overrides `<service>.database_url`; default the SQLite file in the data
    /// directory). A URL with a password belongs in `KILN_<SERVICE>__DATABASE_URL`, not
    /// on a command line every process can read.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
}

impl ServiceArgs {
    /// The flags as the last configuration layer, for the service whose section is
    /// `section` (`auth`, `build`, `agent`).
    pub fn overrides(&self, section: &str) -> Overrides {
        Overrides::new()
            .set("server.listen", self.listen)
            .set("server.data_dir", self.data_dir.clone())
            .set("server.mesh", self.mesh.then_some(true))
            .set(
                &format!("{section}.database_url"),
                self.database_url.clone(),
            )
    }
}

/// The environment variable that may carry the bootstrap admin's password.
pub const ADMIN_PASSWORD_ENV: &str = "KILN_ADMIN_PASSWORD";

/// The bootstrap admin's password: from `file` or `KILN_ADMIN_PASSWORD` (not both: which
/// one wins would be a guess), never from a flag's value (command lines are readable by
/// every process on the host) nor from the configuration file.
pub fn admin_password(file: Option<&Path>) -> Result<Option<String>, Error> {
    let from_env = std::env::var(ADMIN_PASSWORD_ENV)
        .ok()
        .filter(|p| !p.is_empty());
    let Some(path) = file else {
        return Ok(from_env);
    };
    if from_env.is_some() {
        return Err(Error::AdminPassword(format!(
            "set either --admin-password-file or {ADMIN_PASSWORD_ENV}, not both"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let password = text.lines().next().unwrap_or_default();
    if password.is_empty() {
        return Err(Error::AdminPassword(format!(
            "{} holds no admin password (its first line is empty)",
            path.display()
        )));
    }
    Ok(Some(password.to_owned()))
}

/// Creates `dir` (and parents) readable by the owner only: it holds keys and state.
pub fn create_private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Runs a service binary's `main` future on a multi-threaded runtime and turns its
/// outcome into the exit status (`<name>: <error and its causes>` on stderr).
pub fn block_on<E, F>(name: &str, main: F) -> std::process::ExitCode
where
    E: std::fmt::Display,
    F: Future<Output = Result<(), E>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("{name}: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Logs (JSON off a terminal, `KILN_LOG_FORMAT=text|json` forces one) and traces,
    // exported only when `OTEL_EXPORTER_OTLP_{TRACES_,}ENDPOINT` is set, as the
    // OpenTelemetry specification reads the environment. Inside the runtime: the
    // exporter's connection lives on it.
    let mut config = kiln_telemetry::TelemetryConfig::new(name, env!("CARGO_PKG_VERSION"));
    config.log_format = match std::env::var("KILN_LOG_FORMAT").as_deref() {
        Ok("json") => kiln_telemetry::LogFormat::Json,
        Ok("text") => kiln_telemetry::LogFormat::Text,
        _ => kiln_telemetry::LogFormat::Auto,
    };
    let mut telemetry = match runtime.block_on(async { kiln_telemetry::init(&config) }) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("{name}: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(main);
    // Queued spans go out while the runtime is alive (at most the flush timeout).
    telemetry.shutdown();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{name}: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--probe`: the local listener's overall grpc.health.v1 status, as this workload.
pub async fn probe(server: &ServerConfig, me: &Workload) -> Result<bool, Error> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let endpoint = if me.in_mesh() {
        format!("http://127.0.0.1:{}", server.listen.port())
    } else {
        format!("https://localhost:{}", server.listen.port())
    };
    let mut client = me.client(&endpoint);
    client.connect_timeout = Some(std::time::Duration::from_secs(2));
    let channel = client.connect().await?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map_err(|status| Error::Probe(status.message().to_owned()))?
        .into_inner()
        .status();
    println!("{}", status.as_str_name());
    Ok(status == ServingStatus::Serving)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh_server(listen: &str) -> ServerConfig {
        ServerConfig {
            listen: listen.parse().expect("addr"),
            mesh: true,
            ..ServerConfig::default()
        }
    }

    #[test]
    fn endpoints_are_mtls_outside_the_mesh_and_the_local_sidecar_inside() {
        for ok in ["https://kiln-auth:7443", "https://10.0.0.1:7443"] {
            assert!(check_endpoint(false, "auth", ok).is_ok(), "{ok}");
        }
        for refused in [
            "http://kiln-auth:7443",
            "http://127.0.0.1:15101",
            "kiln-auth:7443",
        ] {
            let err = check_endpoint(false, "auth", refused).expect_err(refused);
            assert!(err.to_string().contains("https://"), "{err}");
        }
        for ok in [
            "http://127.0.0.1:15101",
            "http://localhost:15101",
            "http://[::1]:15101",
        ] {
            assert!(check_endpoint(true, "auth", ok).is_ok(), "{ok}");
        }
        for refused in [
            "https://127.0.0.1:15101",
            "http://kiln-auth:7443",
            "http://10.0.0.1:15101",
            "http://127.0.0.1.evil.example:80",
            "http://127.0.0.1",
        ] {
            let err = check_endpoint(true, "auth", refused).expect_err(refused);
            assert!(err.to_string().contains("sidecar"), "{refused}: {err}");
        }
    }

    #[test]
    fn mesh_mode_needs_loopback_and_no_certificate() {
        for exposed in ["0.0.0.0:7443", "[::]:7443", "10.1.2.3:7443"] {
            let err = Workload::from_config("build", &mesh_server(exposed))
                .expect_err(exposed)
                .to_string();
            assert!(err.contains("loopback") && err.contains(exposed), "{err}");
        }
        let me = Workload::from_config("build", &mesh_server("127.0.0.1:7444")).expect("mesh");
        assert!(me.in_mesh());
        assert_eq!(me.scheme(), "http");
        assert_eq!(me.id.uri(), "spiffe://kiln.local/service/build");
        // The sidecar presents the identity: the client has no TLS files of its own.
        assert!(me.client("http://127.0.0.1:15101").tls_files.is_none());
    }

    #[test]
    fn outside_the_mesh_a_certificate_is_required() {
        let err = Workload::from_config("build", &ServerConfig::default())
            .expect_err("no [server.tls]")
            .to_string();
        assert!(err.contains("[server.tls]"), "{err}");
    }
}
