//! `kiln-auth`: the auth service on its own listener, as `spiffe://<trust-domain>/service/
//! auth`. Load the config, init logging, open the service, serve.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use kiln_auth::{AuthApi, AuthFile};
use kiln_config::ConfigFile as _;
use kiln_launch::{ServiceArgs, Workload};
use kiln_proto::auth::auth_service_server::SERVICE_NAME;
use kiln_rpc::{KilnServer, shutdown_signal};

/// kiln-auth: users, tokens, API keys and the JWKS, over gRPC with mTLS.
#[derive(Debug, Parser)]
#[command(name = "kiln-auth", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// A file holding the bootstrap `admin` password (first line), used on an empty
    /// store; or `KILN_ADMIN_PASSWORD`. With neither, one is generated and written to
    /// `<data_dir>/auth/admin-password` (0600).
    #[arg(long, env = "KILN_ADMIN_PASSWORD_FILE", value_name = "PATH")]
    admin_password_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    kiln_launch::block_on("kiln-auth", run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let AuthFile { server, mut auth } = AuthFile::load(
        args.service.config.as_deref(),
        args.service.overrides("auth"),
    )?;
    let me = Workload::from_config("auth", &server)?;
    if args.service.probe {
        return match kiln_launch::probe(&server, &me).await? {
            true => Ok(()),
            false => anyhow::bail!("not serving"),
        };
    }
    kiln_launch::create_private_dir(&auth.data_dir)?;
    // One process per data directory (kiln-build and kiln-agent hold theirs in open()).
    let _lock = kiln_store::DirLock::acquire(&auth.data_dir)?;
    auth.admin_password = kiln_launch::admin_password(args.admin_password_file.as_deref())?;
    // In mesh mode kiln-auth verifies tokens through its sidecar, like its peers (a call
    // to itself on loopback would carry no forwarded identity for ListRevocations).
    let configured_self = if server.mesh {
        Some(kiln_launch::endpoint(&server, "auth")?)
    } else {
        server.endpoints.auth.clone()
    };
    let api = AuthApi::open(auth)
        .await
        .context("opening the auth service")?;

    let mut registry = kiln_metrics::registry();
    let mut listener = KilnServer::new(kiln_launch::server_settings(&server, me.tls_files()));
    if server.metrics_listen.is_some() {
        listener = listener.with_metrics(&mut registry);
        api.register_metrics(&mut registry);
    }
    for check in api.readiness() {
        listener = listener.with_readiness(SERVICE_NAME, check);
    }
    let mut bound = listener
        .add_service(kiln_auth::service(api.clone()))
        .bind()
        .await?;
    // kiln-auth verifies tokens like every service, through its own API: at its
    // configured address, else on loopback (the certificate must name `localhost`).
    let own = configured_self
        .unwrap_or_else(|| format!("https://localhost:{}", bound.local_addr().port()));
    let authenticator = me.authenticator(&server, &own);
    if server.metrics_listen.is_some() {
        authenticator.register_metrics(&mut registry);
    }
    bound.set_authenticator(authenticator);
    let metrics = kiln_launch::serve_metrics(server.metrics_listen, registry).await?;
    // The first stdout line is the contract with scripts and tests.
    println!(
        "kiln-auth is serving on {}://{} as {}",
        me.scheme(),
        bound.local_addr(),
        me.id
    );
    kiln_launch::announce_metrics(metrics.as_ref());
    bound.serve_until(shutdown).await?;
    api.close().await;
    Ok(())
}
