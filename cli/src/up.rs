//! `kiln up`: the whole suite in one process on one listener, for a laptop or a single
//! machine. On first start it creates a development PKI under `<data-dir>/pki/` and
//! reuses it afterwards.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::num::NonZeroU32;
use std::sync::Arc;

use anyhow::Context;
use kiln_auth::{AuthApi, AuthConfig};
use kiln_build::{BuildApi, BuildConfig};
use kiln_rpc::authn::{AuthnConfig, SuiteAuthenticator};
use kiln_rpc::client::ClientConfig;
use kiln_rpc::pki::ensure_dev_pki;
use kiln_rpc::ratelimit::RateLimit;
use kiln_rpc::{KilnServer, ServerSettings, shutdown_signal};

/// The services `kiln up` runs; each gets a workload certificate with its SPIFFE id.
const SERVICES: &[&str] = &["auth", "build", "agent"];

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Address to listen on (port 0 picks a free port and prints it).
    #[arg(long, env = "KILN_LISTEN", default_value = "127.0.0.1:7443")]
    listen: SocketAddr,

    /// Where kiln keeps its state and development PKI. Default: the user's data
    /// directory, e.g. ~/.local/share/kiln.
    #[arg(long, env = "KILN_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Trust domain of the workload identities (spiffe://<domain>/service/<name>).
    #[arg(long, env = "KILN_TRUST_DOMAIN", default_value = ServerSettings::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,

    /// Largest request message accepted, in bytes (at most 64 MiB).
    #[arg(long, env = "KILN_MAX_MESSAGE_BYTES", default_value_t = ServerSettings::DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,

    /// Seconds that in-flight calls may run on after SIGTERM/SIGINT.
    #[arg(long, env = "KILN_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    shutdown_grace_secs: u64,

    /// Refuse TLS clients that present no certificate.
    #[arg(long, env = "KILN_REQUIRE_CLIENT_CERT")]
    require_client_cert: bool,

    /// Password of the bootstrap `admin` user on an empty store. When unset, one is
    /// generated and written once to `<data-dir>/auth/admin-password` (0600).
    #[arg(long, env = "KILN_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,

    /// Lifetime of access tokens, in seconds.
    #[arg(long, env = "KILN_ACCESS_TOKEN_TTL_SECS", default_value_t = 900)]
    access_token_ttl_secs: u64,

    /// How long a reused refresh token still counts as a concurrent refresh (not theft),
    /// in milliseconds.
    #[arg(long, env = "KILN_REFRESH_REUSE_GRACE_MS", default_value_t = 5000)]
    refresh_reuse_grace_ms: u64,

    /// How long services trust an API key (or a refusal) before asking kiln-auth again,
    /// in milliseconds: a revoked key stops working within this time.
    #[arg(long, env = "KILN_API_KEY_CACHE_MS", default_value_t = 30_000)]
    api_key_cache_ms: u64,

    /// Requests per second per caller and method (0 turns rate limiting off).
    #[arg(long, env = "KILN_RATE_LIMIT_PER_SECOND", default_value_t = 200)]
    rate_limit_per_second: u32,

    /// Requests a caller may make at once before the rate applies.
    #[arg(long, env = "KILN_RATE_LIMIT_BURST", default_value_t = 400)]
    rate_limit_burst: u32,
}

/// `<data dir>/kiln`, or `./.kiln` where the platform has no data directory.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir().map_or_else(|| PathBuf::from(".kiln"), |d| d.join("kiln"))
}

pub async fn run(args: UpArgs) -> anyhow::Result<i32> {
    // Before anything else, so that a signal during start-up still stops us cleanly.
    let shutdown = shutdown_signal()?;
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    create_private_dir(&data_dir)?;
    let pki = ensure_dev_pki(&data_dir.join("pki"), &args.trust_domain, SERVICES)
        .context("creating the development PKI")?;

    let mut settings = ServerSettings::new(args.listen, pki.server_tls());
    settings.trust_domain = args.trust_domain;
    settings.max_message_bytes = args.max_message_bytes;
    settings.shutdown_grace = Duration::from_secs(args.shutdown_grace_secs);
    settings.require_client_cert = args.require_client_cert;
    settings.rate_limit = NonZeroU32::new(args.rate_limit_per_second).map(|per_second| RateLimit {
        per_second,
        burst: NonZeroU32::new(args.rate_limit_burst).unwrap_or(per_second),
    });

    let mut auth_config = AuthConfig::new(data_dir.join("auth"));
    auth_config.admin_password = args.admin_password;
    auth_config.access_ttl = Duration::from_secs(args.access_token_ttl_secs);
    auth_config.refresh_reuse_grace = Duration::from_millis(args.refresh_reuse_grace_ms);
    let auth = AuthApi::open(auth_config)
        .await
        .context("opening the auth service")?;
    let build = BuildApi::open(BuildConfig::new(data_dir.join("build")))
        .await
        .context("opening the build service")?;

    let mut server = KilnServer::new(settings)
        .add_service(kiln_auth::service(auth))
        .add_service(kiln_build::service(build.clone()))
        .add_service(kiln_agent::service())
        .bind()
        .await?;
    let addr = server.local_addr();
    // Every service verifies tokens the way a standalone one would: JWKS and API keys
    // from kiln-auth over mTLS (here: this very listener), with the auth workload cert.
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let loopback = SocketAddr::new(
        if addr.ip().is_unspecified() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            addr.ip()
        },
        addr.port(),
    );
    let mut authn = AuthnConfig::new(
        ClientConfig::new(format!("https://{loopback}"))
            .ca_pem(read(pki.ca_cert())?)
            .identity(
                read(pki.workload_cert("auth"))?,
                read(pki.workload_key("auth"))?,
            ),
    );
    authn.api_key_ttl = Duration::from_millis(args.api_key_cache_ms);
    authn.api_key_negative_ttl = authn.api_key_negative_ttl.min(authn.api_key_ttl);
    server.set_authenticator(Arc::new(SuiteAuthenticator::new(authn)));
    // The first stdout line is the contract with scripts and tests: they wait for it.
    println!("kiln is serving on https://{addr}");
    println!("  services:       {}", server.services().join(", "));
    println!("  CA certificate: {}", pki.ca_cert().display());
    println!("  data directory: {}", data_dir.display());
    println!("  sandbox:        tier {}", build.sandbox_tier());
    println!(
        "  try:            grpcurl -cacert {} {addr} list",
        pki.ca_cert().display()
    );
    server.serve_until(shutdown).await?;
    tracing::info!("listener closed");
    // Builds still running after the grace period end INTERRUPTED (their logs kept);
    // queued builds stay queued and run at the next start.
    build.shutdown().await;
    tracing::info!("build service stopped");
    println!("kiln stopped");
    Ok(0)
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
