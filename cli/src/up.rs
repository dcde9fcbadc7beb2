//! `kiln up`: the whole suite in one process on one listener, for a laptop or a single
//! machine. On first start it creates a development PKI under `<data-dir>/pki/` and
//! reuses it afterwards.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use kiln_rpc::pki::ensure_dev_pki;
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
}

/// `<data dir>/kiln`, or `./.kiln` where the platform has no data directory.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir().map_or_else(|| PathBuf::from(".kiln"), |d| d.join("kiln"))
}

pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
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

    let server = KilnServer::new(settings)
        .add_service(kiln_auth::service())
        .add_service(kiln_build::service())
        .add_service(kiln_agent::service())
        .bind()
        .await?;
    let addr = server.local_addr();
    // The first stdout line is the contract with scripts and tests: they wait for it.
    println!("kiln is serving on https://{addr}");
    println!("  services:       {}", server.services().join(", "));
    println!("  CA certificate: {}", pki.ca_cert().display());
    println!("  data directory: {}", data_dir.display());
    println!(
        "  try:            grpcurl -cacert {} {addr} list",
        pki.ca_cert().display()
    );
    server.serve_until(shutdown).await?;
    println!("kiln stopped");
    Ok(ExitCode::SUCCESS)
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
