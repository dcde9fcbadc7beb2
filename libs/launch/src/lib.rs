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
//! Certificates are read once at start; reloading the client side on rotation is later
//! work (the listener already reloads its own files, see `kiln_rpc::tls`).

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

/// The `[server]` section as the settings of a listener serving `tls`.
pub fn server_settings(server: &ServerConfig, tls: TlsFiles) -> ServerSettings {
    let mut settings = ServerSettings::new(server.listen, tls);
    settings.trust_domain = server.trust_domain.clone();
    settings.max_message_bytes = server.max_message_bytes;
    settings.shutdown_grace = server.shutdown_grace;
    settings.require_client_cert = server.require_client_cert;
    settings.rate_limit =
        NonZeroU32::new(server.rate_limit_per_second).map(|per_second| RateLimit {
            per_second,
            burst: NonZeroU32::new(server.rate_limit_burst).unwrap_or(per_second),
        });
    settings
}

/// This process's workload identity and the trust bundle it checks peers against.
#[derive(Clone)]
pub struct Workload {
    pub id: WorkloadId,
    files: TlsFiles,
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
    pub fn from_config(name: &str, server: &ServerConfig) -> Result<Self, Error> {
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
            files: TlsFiles {
                cert: files.cert.clone(),
                key: files.key.clone(),
                client_ca: files.ca.clone(),
            },
        })
    }

    /// The listener's TLS files: the same certificate serves and identifies.
    pub fn tls_files(&self) -> TlsFiles {
        self.files.clone()
    }

    /// A client of `endpoint` that presents this identity over mTLS.
    /// The files are followed as they change (short-lived certificates rotate): new
    /// calls use the new identity, streams in flight keep theirs
    /// (see `kiln_rpc::reloading_client`).
    pub fn client(&self, endpoint: &str) -> ClientConfig {
        ClientConfig::new(endpoint).tls_files(
            kiln_rpc::reloading_client::ClientTlsFiles::new(self.files.client_ca.clone())
                .identity(self.files.cert.clone(), self.files.key.clone()),
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
pub fn endpoint(server: &ServerConfig, service: &str) -> Result<String, Error> {
    let value = match service {
        "auth" => server.endpoints.auth.clone(),
        "build" => server.endpoints.build.clone(),
        _ => None,
    };
    value.ok_or_else(|| {
        Error::Endpoint(format!(
            "where is kiln-{service}? set [server.endpoints] {service} = \"https://host:port\" (or KILN_SERVER__ENDPOINTS__{})",
            service.to_ascii_uppercase()
        ))
    })
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

    let endpoint = format!("https://localhost:{}", server.listen.port());
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
