//! `kiln up`: the whole suite in one process on one listener, for a laptop or a single
//! machine. On first start it creates a development PKI under `<data-dir>/pki/` and
//! reuses it afterwards.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_agent::AgentApi;
use kiln_auth::AuthApi;
use kiln_build::BuildApi;

use crate::config::SuiteFile;
use kiln_config::{ConfigFile, Overrides, ServerConfig, TlsPaths};
use kiln_launch::Workload;
use kiln_rpc::pki::ensure_dev_pki;
use kiln_rpc::{KilnServer, shutdown_signal};

use kiln_proto::agent::agent_service_server::SERVICE_NAME as AGENT_SERVICE;
use kiln_proto::auth::auth_service_server::SERVICE_NAME as AUTH_SERVICE;
use kiln_proto::build::build_service_server::SERVICE_NAME as BUILD_SERVICE;

/// Where the agent's provider API key may come from (named by `api_key_env` otherwise).
const LLM_API_KEY_ENV: &str = "KILN_LLM_API_KEY";

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
    /// the gRPC listener. Default: `[server] metrics_listen`, else off.
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
    /// The database of all three services: `postgres://user@host/db` (each service in
    /// its own schema: `auth`, `build`, `agent`) or `sqlite:///path` (not useful for all
    /// three at once). Default: a SQLite file per service under the data directory.
    /// Prefer the environment variable to the flag when the URL holds a password
    /// (command lines are readable by every process on the host).
    #[arg(long, env = "KILN_DATABASE_URL", value_name = "URL")]
    database_url: Option<String>,
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
        (None, Some(path), false) => SuiteFile::check_file(path)?.telemetry.otlp_endpoint,
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
    /// Validate a configuration file and print the effective settings (JSON). Only the
    /// file counts, not the environment: the answer is about the file.
    Check {
        /// Whose file: a per-service binary's (`[server]` and its own section). Default:
        /// `kiln up`'s (every section).
        #[arg(long, value_enum)]
        service: Option<crate::config::FileKind>,
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Print a configuration file with every setting at its default, documented.
    Example,
}

/// The example file, kept honest by a test that compares it with the real defaults.
const EXAMPLE_CONFIG: &str = include_str!("../../examples/kiln.toml");

pub fn config(command: ConfigCommand) -> anyhow::Result<i32> {
    match command {
        ConfigCommand::Example => print!("{EXAMPLE_CONFIG}"),
        ConfigCommand::Check { service, file } => {
            let effective = crate::config::check(&file, service)
                .with_context(|| format!("in {}", file.display()))?;
            crate::output::print_json(&effective);
            eprintln!("{}: OK", file.display());
        }
    }
    Ok(0)
}

/// `<data dir>/kiln`, or `./.kiln` where the platform has no data directory.
pub fn default_data_dir() -> PathBuf {
    ServerConfig::default().effective_data_dir()
}

/// The flags of `kiln up` as the last layer of its configuration.
fn overrides(args: &UpArgs) -> Overrides {
    Overrides::new()
        .set("server.listen", args.listen)
        .set("server.data_dir", args.data_dir.clone())
        .set("server.trust_domain", args.trust_domain.clone())
        .set("server.max_message_bytes", args.max_message_bytes)
        .set(
            "server.shutdown_grace",
            args.shutdown_grace_secs.map(|s| format!("{s}s")),
        )
        .set(
            "server.require_client_cert",
            args.require_client_cert.then_some(true),
        )
        .set("server.rate_limit_per_second", args.rate_limit_per_second)
        .set("server.rate_limit_burst", args.rate_limit_burst)
        .set("server.metrics_listen", args.metrics_listen)
        .set(
            "server.api_key_cache",
            args.api_key_cache_ms.map(|ms| format!("{ms}ms")),
        )
        .set(
            "auth.access_token_ttl",
            args.access_token_ttl_secs.map(|s| format!("{s}s")),
        )
        .set(
            "auth.refresh_reuse_grace",
            args.refresh_reuse_grace_ms.map(|ms| format!("{ms}ms")),
        )
        .set("auth.database_url", args.database_url.clone())
        .set("build.database_url", args.database_url.clone())
        .set("agent.database_url", args.database_url.clone())
        .set("agent.provider.base_url", args.llm_url.clone())
        .set(
            "agent.default_model",
            args.llm_model.clone().filter(|m| !m.is_empty()),
        )
}

pub async fn run(args: UpArgs) -> anyhow::Result<i32> {
    // Before anything else, so that a signal during start-up still stops us cleanly.
    let shutdown = shutdown_signal()?;
    let SuiteFile {
        server: server_config,
        auth: mut auth_config,
        build: build_config,
        agent: mut agent_config,
        telemetry: _,
    } = SuiteFile::load(args.config.as_deref(), overrides(&args)).with_context(|| {
        match &args.config {
            Some(path) => format!("configuration (file {})", path.display()),
            None => "configuration".to_owned(),
        }
    })?;
    let data_dir = server_config.effective_data_dir();
    kiln_launch::create_private_dir(&data_dir)?;
    // First of all: a second `kiln up` on this directory must not touch the live
    // suite's state (it would mark its running builds INTERRUPTED). Held until exit.
    let _dir_lock = kiln_store::DirLock::acquire(&data_dir)?;
    let pki = ensure_dev_pki(&data_dir.join("pki"), &server_config.trust_domain, SERVICES)
        .context("creating the development PKI")?;
    let settings = kiln_launch::server_settings(&server_config, pki.server_tls());
    auth_config.admin_password = kiln_launch::admin_password(args.admin_password_file.as_deref())?;
    let auth = AuthApi::open(auth_config)
        .await
        .context("opening the auth service")?;
    let build = BuildApi::open(build_config)
        .await
        .context("opening the build service")?;
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

    let metrics_listen = server_config.metrics_listen;
    let mut registry = kiln_metrics::registry();
    let mut server = KilnServer::new(settings);
    if metrics_listen.is_some() {
        server = server.with_metrics(&mut registry);
        auth.register_metrics(&mut registry);
        build.register_metrics(&mut registry);
        agent.register_metrics(&mut registry);
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
    // from kiln-auth over mTLS (here: this very listener). One listener has one
    // verifier, which presents the auth workload's certificate; the agent calls build
    // and auth as itself (spiffe://…/service/agent).
    let loopback = format!("https://localhost:{}", addr.port());
    let workload = |name: &str| {
        let files = TlsPaths {
            cert: pki.workload_cert(name),
            key: pki.workload_key(name),
            ca: pki.ca_cert(),
        };
        Workload::from_files(name, &server_config.trust_domain, &files)
    };
    let agent_client = workload("agent")?.client(&loopback);
    build_channel.set(agent_client.connect_lazy()?);
    auth_channel.set(agent_client.connect_lazy()?);
    let authenticator = workload("auth")?.authenticator(&server_config, &loopback);
    if metrics_listen.is_some() {
        authenticator.register_metrics(&mut registry);
    }
    server.set_authenticator(authenticator);
    let metrics = kiln_launch::serve_metrics(metrics_listen, registry).await?;
    // The first stdout line is the contract with scripts and tests: they wait for it.
    println!("kiln is serving on https://{addr}");
    println!("  services:       {}", server.services().join(", "));
    println!("  CA certificate: {}", pki.ca_cert().display());
    println!("  data directory: {}", data_dir.display());
    println!("  sandbox:        tier {}", build.sandbox_tier());
    println!("  LLM provider:   {llm_url}");
    if let Some(metrics) = &metrics {
        println!("  metrics:        http://{}/metrics", metrics.addr);
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
