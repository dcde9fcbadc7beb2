//! `kiln-build`: the build service on its own listener, as `spiffe://<trust-domain>/
//! service/build`, verifying callers through kiln-auth at `server.endpoints.auth`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use kiln_build::{BuildApi, BuildFile};
use kiln_config::ConfigFile as _;
use kiln_launch::{ServiceArgs, Workload};
use kiln_proto::build::build_service_server::SERVICE_NAME;
use kiln_rpc::{KilnServer, shutdown_signal};

/// kiln-build: workspaces and sandboxed builds with live logs, over gRPC with mTLS.
#[derive(Debug, Parser)]
#[command(name = "kiln-build", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Before any thread exists: every build step starts with a clone of this process.
    kiln_sandbox::keep_spawns_cheap();
    kiln_launch::block_on("kiln-build", run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let BuildFile { server, build } = BuildFile::load(
        args.service.config.as_deref(),
        args.service.overrides("build"),
    )?;
    let me = Workload::from_config("build", &server)?;
    if args.service.probe {
        return match kiln_launch::probe(&server, &me).await? {
            true => Ok(()),
            false => anyhow::bail!("not serving"),
        };
    }
    let auth_endpoint = kiln_launch::endpoint(&server, "auth")?;
    kiln_launch::create_private_dir(&build.data_dir)?;
    let api = BuildApi::open(build)
        .await
        .context("opening the build service")?;

    let mut registry = kiln_metrics::registry();
    let authenticator = me.authenticator(&server, &auth_endpoint);
    let mut listener = KilnServer::new(kiln_launch::server_settings(&server, me.tls_files()))
        .with_authenticator(authenticator.clone());
    if server.metrics_listen.is_some() {
        listener = listener.with_metrics(&mut registry);
        api.register_metrics(&mut registry);
        authenticator.register_metrics(&mut registry);
    }
    for check in api.readiness() {
        listener = listener.with_readiness(SERVICE_NAME, check);
    }
    let bound = listener
        .add_service(kiln_build::service(api.clone()))
        .bind()
        .await?;
    let metrics = kiln_launch::serve_metrics(server.metrics_listen, registry).await?;
    println!(
        "kiln-build is serving on {}://{} as {} (sandbox tier {})",
        me.scheme(),
        bound.local_addr(),
        me.id,
        api.sandbox_tier()
    );
    kiln_launch::announce_metrics(metrics.as_ref());
    bound.serve_until(shutdown).await?;
    // Builds still running after the grace period end INTERRUPTED (logs kept); queued
    // builds run at the next start.
    api.shutdown().await;
    Ok(())
}
