//! `kiln up`: the whole suite in one process on one listener, for a laptop or a single
//! machine. On first start it creates a development PKI under `<data-dir>/pki/` and
//! reuses it afterwards.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::num::NonZeroU32;
use std::sync::Arc;

use anyhow::Context;
use kiln_agent::AgentApi;
use kiln_auth::AuthApi;
use kiln_build::BuildApi;

use crate::config::ConfigFile;
use kiln_rpc::authn::{AuthnConfig, SuiteAuthenticator};
use kiln_rpc::client::ClientConfig;
use kiln_rpc::pki::ensure_dev_pki;
use kiln_rpc::ratelimit::RateLimit;
use kiln_rpc::reloading_client::ClientTlsFiles;
use kiln_rpc::{KilnServer, ServerSettings, shutdown_signal};

use kiln_proto::agent::agent_service_server::SERVICE_NAME as AGENT_SERVICE;
use kiln_proto::auth::auth_service_server::SERVICE_NAME as AUTH_SERVICE;
use kiln_proto::build::build_service_server::SERVICE_NAME as BUILD_SERVICE;

/// Where the agent's provider API key may come from (named by `api_key_env` otherwise).
const LLM_API_KEY_ENV: &str = "KILN_LLM_API_KEY";

/// Where `kiln up` listens unless told otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

/// The services `kiln up` runs; each gets a workload certificate with its SPIFFE id.
const SERVICES: &[&str] = &["auth", "build", "agent"];

/// Flags of `kiln up`. Each overrides the config file, which overrides the defaults
/// (stated here and in examples/kiln.toml).
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// A TOML configuration file (see examples/kiln.toml).
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,

    /// Address to listen on (port 0 picks a free port and prints it). Default:
    /// 127.0.0.1:7443.
    #[arg(long, env = "KILN_LISTEN")]
    listen: Option<SocketAddr>,

    /// Where kiln keeps its state and development PKI. Default: the user's data
    /// directory, e.g. ~/.local/share/kiln.
    #[arg(long, env = "KILN_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Trust domain of the workload identities (spiffe://<domain>/service/<name>).
    /// Default: kiln.local.
    #[arg(long, env = "KILN_TRUST_DOMAIN")]
    trust_domain: Option<String>,

    /// Largest request message accepted, in bytes (at most 64 MiB). Default: 4 MiB.
    #[arg(long, env = "KILN_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,

    /// Seconds that in-flight calls may run on after SIGTERM/SIGINT. Default: 30.
    #[arg(long, env = "KILN_SHUTDOWN_GRACE_SECS")]
    shutdown_grace_secs: Option<u64>,

    /// Refuse TLS clients that present no certificate.
    #[arg(long, env = "KILN_REQUIRE_CLIENT_CERT")]
    require_client_cert: bool,

    /// A file holding the password of the bootstrap `admin` user on an empty store (its
    /// first line). The password can also come from the environment variable
    /// `KILN_ADMIN_PASSWORD`, but there is deliberately no flag that takes it: a command
    /// line is readable by every process on the host (`/proc/<pid>/cmdline`), builds
    /// included. With neither, a password is generated and written once to
    /// `<data-dir>/auth/admin-password` (0600).
    #[arg(long, env = "KILN_ADMIN_PASSWORD_FILE", value_name = "PATH")]
    admin_password_file: Option<PathBuf>,

    /// Lifetime of access tokens, in seconds. Default: 900.
    #[arg(long, env = "KILN_ACCESS_TOKEN_TTL_SECS")]
    access_token_ttl_secs: Option<u64>,

    /// How long a reused refresh token still counts as a concurrent refresh (not theft),
    /// in milliseconds. Default: 5000.
    #[arg(long, env = "KILN_REFRESH_REUSE_GRACE_MS")]
    refresh_reuse_grace_ms: Option<u64>,

    /// How long services trust an API key (or a refusal) before asking kiln-auth again,
    /// in milliseconds: a revoked key stops working within this time. Default: 30000.
    #[arg(long, env = "KILN_API_KEY_CACHE_MS")]
    api_key_cache_ms: Option<u64>,

    /// Requests per second per caller and method (0 turns rate limiting off). Default: 200.
    #[arg(long, env = "KILN_RATE_LIMIT_PER_SECOND")]
    rate_limit_per_second: Option<u32>,

    /// Requests a caller may make at once before the rate applies. Default: 400.
    #[arg(long, env = "KILN_RATE_LIMIT_BURST")]
    rate_limit_burst: Option<u32>,

    /// Serve Prometheus metrics on this address (plain HTTP, `GET /metrics`), apart from
    /// the gRPC listener. Default: off.
    #[arg(long, env = "KILN_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,

    /// The agent's LLM provider: the base URL of an OpenAI-compatible server (llama.cpp's
    /// server, vLLM, LM Studio, OpenAI; `/v1` at the end is accepted), or of Ollama with
    /// `[agent.provider] kind = "ollama"`. Default: http://127.0.0.1:8080, where
    /// `make llm` serves. An API key, if the provider needs one, comes from the
    /// environment variable KILN_LLM_API_KEY (never a flag).
    #[arg(long, env = "KILN_LLM_URL", value_name = "URL")]
    llm_url: Option<String>,

    /// The model a task uses when it names none. Default: the provider's first model.
    #[arg(long, env = "KILN_LLM_DEFAULT_MODEL")]
    llm_model: Option<String>,

    /// OTLP gRPC endpoint to export traces to, e.g. http://127.0.0.1:4317. Default:
    /// `[telemetry] otlp_endpoint`, else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
    /// OTEL_EXPORTER_OTLP_ENDPOINT, else none (no export).
    #[arg(long, env = "KILN_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
}

/// The OTLP endpoint kiln's own settings name: the flag, else the config file's.
/// `None` leaves the choice to the standard `OTEL_EXPORTER_OTLP_*` variables. Read
/// before telemetry starts, so the file is read here once more than by [`run`].
pub fn otlp_endpoint(args: &UpArgs) -> anyhow::Result<Option<String>> {
    // The standard variables come between the file and the flag (defaults < file <
    // environment < flags), so the file's value is only used when neither is set.
    let env_set = [
        kiln_telemetry::env::TRACES_ENDPOINT,
        kiln_telemetry::env::ENDPOINT,
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty()));
    let from_file = match (&args.otlp_endpoint, &args.config, env_set) {
        (None, Some(path), false) => ConfigFile::load(path)?.telemetry.otlp_endpoint,
        _ => None,
    };
    let endpoint = args.otlp_endpoint.clone().or(from_file);
    if let Some(e) = &endpoint
        && !(e.starts_with("http://") || e.starts_with("https://"))
    {
        anyhow::bail!(
            "the OTLP endpoint {e:?} must be an http:// or https:// URL (gRPC, e.g. http://127.0.0.1:4317)"
        );
    }
    Ok(endpoint)
}

/// `kiln config …`.
#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file and print the effective settings (JSON).
    Check {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Print a configuration file with every setting at its default, documented.
    Example,
}

/// The example file, kept honest by a test that compares it with the real defaults.
const EXAMPLE_CONFIG: &str = include_str!("../../examples/kiln.toml");

const DEFAULT_API_KEY_CACHE: Duration = Duration::from_secs(30);

pub fn config(command: ConfigCommand) -> anyhow::Result<i32> {
    match command {
        ConfigCommand::Example => print!("{EXAMPLE_CONFIG}"),
        ConfigCommand::Check { file } => {
            let config = ConfigFile::load(&file)?;
            let data_dir = config
                .server
                .data_dir
                .clone()
                .unwrap_or_else(default_data_dir);
            let auth = config.auth(data_dir.join("auth"));
            let build = config
                .build(data_dir.join("build"))
                .with_context(|| format!("in {}", file.display()))?;
            let agent = config
                .agent(data_dir.join("agent"))
                .with_context(|| format!("in {}", file.display()))?;
            let api_key_cache = config
                .auth
                .api_key_cache
                .map_or(DEFAULT_API_KEY_CACHE, |d| d.0);
            crate::output::print_json(&crate::config::describe(
                &auth,
                &build,
                &agent,
                api_key_cache,
            ));
            eprintln!("{}: OK", file.display());
        }
    }
    Ok(0)
}

/// `<data dir>/kiln`, or `./.kiln` where the platform has no data directory.
/// The environment variable that may carry the bootstrap admin's password.
const ADMIN_PASSWORD_ENV: &str = "KILN_ADMIN_PASSWORD";

/// The bootstrap admin's password: from `--admin-password-file` or `KILN_ADMIN_PASSWORD`
/// (not both: which one wins would be a guess), never from a flag's value.
fn admin_password(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let from_env = std::env::var(ADMIN_PASSWORD_ENV)
        .ok()
        .filter(|p| !p.is_empty());
    let Some(path) = file else {
        return Ok(from_env);
    };
    if from_env.is_some() {
        anyhow::bail!("set either --admin-password-file or {ADMIN_PASSWORD_ENV}, not both");
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the admin password from {}", path.display()))?;
    let password = text.lines().next().unwrap_or_default();
    if password.is_empty() {
        anyhow::bail!(
            "{} holds no admin password (its first line is empty)",
            path.display()
        );
    }
    Ok(Some(password.to_owned()))
}

pub fn default_data_dir() -> PathBuf {
    dirs::data_dir().map_or_else(|| PathBuf::from(".kiln"), |d| d.join("kiln"))
}

pub async fn run(args: UpArgs) -> anyhow::Result<i32> {
    // Before anything else, so that a signal during start-up still stops us cleanly.
    let shutdown = shutdown_signal()?;
    let file = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let server = &file.server;
    let data_dir = args
        .data_dir
        .or(server.data_dir.clone())
        .unwrap_or_else(default_data_dir);
    create_private_dir(&data_dir)?;
    // First of all: a second `kiln up` on this directory must not touch the live
    // suite's state (it would mark its running builds INTERRUPTED). Held until exit.
    let _dir_lock = kiln_store::DirLock::acquire(&data_dir)?;
    let trust_domain = args
        .trust_domain
        .or(server.trust_domain.clone())
        .unwrap_or_else(|| ServerSettings::DEFAULT_TRUST_DOMAIN.to_owned());
    let pki = ensure_dev_pki(&data_dir.join("pki"), &trust_domain, SERVICES)
        .context("creating the development PKI")?;

    let listen = args
        .listen
        .or(server.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("a valid address"));
    let mut settings = ServerSettings::new(listen, pki.server_tls());
    settings.trust_domain = trust_domain;
    if let Some(bytes) = args.max_message_bytes.or(server.max_message_bytes) {
        settings.max_message_bytes = bytes;
    }
    if let Some(grace) = args
        .shutdown_grace_secs
        .map(Duration::from_secs)
        .or(server.shutdown_grace.map(|d| d.0))
    {
        settings.shutdown_grace = grace;
    }
    settings.require_client_cert =
        args.require_client_cert || server.require_client_cert.unwrap_or(false);
    let default_rate = RateLimit::default();
    let per_second = args
        .rate_limit_per_second
        .or(server.rate_limit_per_second)
        .unwrap_or(default_rate.per_second.get());
    let burst = args
        .rate_limit_burst
        .or(server.rate_limit_burst)
        .unwrap_or(default_rate.burst.get());
    settings.rate_limit = NonZeroU32::new(per_second).map(|per_second| RateLimit {
        per_second,
        burst: NonZeroU32::new(burst).unwrap_or(per_second),
    });

    let mut auth_config = file.auth(data_dir.join("auth"));
    auth_config.admin_password = admin_password(args.admin_password_file.as_deref())?;
    if let Some(secs) = args.access_token_ttl_secs {
        auth_config.access_ttl = Duration::from_secs(secs);
    }
    if let Some(ms) = args.refresh_reuse_grace_ms {
        auth_config.refresh_reuse_grace = Duration::from_millis(ms);
    }
    let build_config = file.build(data_dir.join("build"))?;
    let api_key_cache = args
        .api_key_cache_ms
        .map(Duration::from_millis)
        .or(file.auth.api_key_cache.map(|d| d.0))
        .unwrap_or(DEFAULT_API_KEY_CACHE);
    let auth = AuthApi::open(auth_config)
        .await
        .context("opening the auth service")?;
    let build = BuildApi::open(build_config)
        .await
        .context("opening the build service")?;
    let mut agent_config = file.agent(data_dir.join("agent"))?;
    if let Some(url) = args.llm_url {
        agent_config.provider.base_url = Some(url);
    }
    if let Some(model) = args.llm_model.filter(|m| !m.is_empty()) {
        agent_config.default_model = Some(model);
    }
    if agent_config.provider.api_key_env.is_none()
        && std::env::var_os(LLM_API_KEY_ENV).is_some_and(|k| !k.is_empty())
    {
        agent_config.provider.api_key_env = Some(LLM_API_KEY_ENV.to_owned());
    }
    let llm_url = agent_config.provider.effective_base_url().to_owned();
    // The agent calls kiln-build and kiln-auth on this very listener, as a workload of
    // its own (spiffe://…/service/agent); the channels are set once it is bound.
    let build_channel = kiln_agent::ChannelSlot::default();
    let auth_channel = kiln_agent::ChannelSlot::default();
    let agent = AgentApi::open(
        agent_config,
        Arc::new(kiln_agent::GrpcBuildClient::new(build_channel.clone())),
        Arc::new(kiln_agent::GrpcDelegator::new(auth_channel.clone())),
    )
    .await
    .context("opening the agent service")?;

    let metrics_listen = args.metrics_listen.or(server.metrics_listen);
    let mut registry = kiln_metrics::registry();
    let mut server = KilnServer::new(settings);
    if metrics_listen.is_some() {
        server = server.with_metrics(&mut registry);
        auth.register_metrics(&mut registry);
        build.register_metrics(&mut registry);
    }
    for check in auth.readiness() {
        server = server.with_readiness(AUTH_SERVICE, check);
    }
    for check in build.readiness() {
        server = server.with_readiness(BUILD_SERVICE, check);
    }
    for check in agent.readiness() {
        server = server.with_readiness(AGENT_SERVICE, check);
    }
    let mut server = server
        .add_service(kiln_auth::service(auth))
        .add_service(kiln_build::service(build.clone()))
        .add_service(kiln_agent::service(agent.clone()))
        .bind()
        .await?;
    let addr = server.local_addr();
    // Every service verifies tokens the way a standalone one would: JWKS and API keys
    // from kiln-auth over mTLS (here: this very listener), with the auth workload cert.
    let loopback = SocketAddr::new(
        if addr.ip().is_unspecified() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            addr.ip()
        },
        addr.port(),
    );
    // The certificate files are followed as they change (see kiln_rpc::reloading_client).
    let workload_tls = |service: &str| {
        ClientTlsFiles::new(pki.ca_cert())
            .identity(pki.workload_cert(service), pki.workload_key(service))
    };
    let mut authn = AuthnConfig::new(
        ClientConfig::new(format!("https://{loopback}")).tls_files(workload_tls("auth")),
    );
    let agent_client =
        ClientConfig::new(format!("https://{loopback}")).tls_files(workload_tls("agent"));
    build_channel.set(agent_client.connect_lazy()?);
    auth_channel.set(agent_client.connect_lazy()?);
    authn.api_key_ttl = api_key_cache;
    authn.api_key_negative_ttl = authn.api_key_negative_ttl.min(authn.api_key_ttl);
    server.set_authenticator(Arc::new(SuiteAuthenticator::new(authn)));
    let metrics = match metrics_listen {
        Some(listen) => {
            let listener = kiln_metrics::MetricsListener::bind(listen, Arc::new(registry)).await?;
            let addr = listener.local_addr();
            Some((addr, AbortOnDrop(listener.spawn())))
        }
        None => None,
    };
    // The first stdout line is the contract with scripts and tests: they wait for it.
    println!("kiln is serving on https://{addr}");
    println!("  services:       {}", server.services().join(", "));
    println!("  CA certificate: {}", pki.ca_cert().display());
    println!("  data directory: {}", data_dir.display());
    println!("  sandbox:        tier {}", build.sandbox_tier());
    println!("  LLM provider:   {llm_url}");
    if let Some((addr, _)) = &metrics {
        println!("  metrics:        http://{addr}/metrics");
    }
    println!(
        "  try:            grpcurl -cacert {} {addr} list",
        pki.ca_cert().display()
    );
    server.serve_until(shutdown).await?;
    tracing::info!("listener closed");
    // Tasks stay as persisted and continue at the next start.
    agent.shutdown(Duration::from_secs(5)).await;
    tracing::info!("agent service stopped");
    // Builds still running after the grace period end INTERRUPTED (their logs kept);
    // queued builds stay queued and run at the next start.
    build.shutdown().await;
    tracing::info!("build service stopped");
    println!("kiln stopped");
    Ok(0)
}

/// Stops the metrics listener when `kiln up` returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Creates `dir` (and parents) readable by the owner only: it holds keys and state.
fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))
}
