//! `kiln-agent`: the agent service on its own listener, as `spiffe://<trust-domain>/
//! service/agent`, calling kiln-build and kiln-auth at `server.endpoints` as itself.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kiln_agent::{AgentApi, AgentFile, ChannelSlot, GrpcBuildClient, GrpcDelegator};
use kiln_config::ConfigFile as _;
use kiln_launch::{ServiceArgs, Workload};
use kiln_proto::agent::agent_service_server::SERVICE_NAME;
use kiln_rpc::{KilnServer, shutdown_signal};

/// kiln-agent: LLM tasks that write code and build it until it is green, over gRPC.
#[derive(Debug, Parser)]
#[command(name = "kiln-agent", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

/// Where the provider's API key may come from when `api_key_env` names none.
const LLM_API_KEY_ENV: &str = "KILN_LLM_API_KEY";

fn main() -> ExitCode {
    let args = Args::parse();
    kiln_launch::block_on("kiln-agent", run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let AgentFile { server, mut agent } = AgentFile::load(
        args.service.config.as_deref(),
        args.service.overrides("agent"),
    )?;
    let me = Workload::from_config("agent", &server)?;
    if args.service.probe {
        return match kiln_launch::probe(&server, &me).await? {
            true => Ok(()),
            false => anyhow::bail!("not serving"),
        };
    }
    let auth_endpoint = kiln_launch::endpoint(&server, "auth")?;
    let build_endpoint = kiln_launch::endpoint(&server, "build")?;
    if agent.provider.api_key_env.is_none()
        && std::env::var_os(LLM_API_KEY_ENV).is_some_and(|k| !k.is_empty())
    {
        agent.provider.api_key_env = Some(LLM_API_KEY_ENV.to_owned());
    }
    kiln_launch::create_private_dir(&agent.data_dir)?;
    let build = ChannelSlot::new(me.client(&build_endpoint).connect_lazy()?);
    let auth = ChannelSlot::new(me.client(&auth_endpoint).connect_lazy()?);
    let api = AgentApi::open(
        agent,
        Arc::new(GrpcBuildClient::new(build)),
        Arc::new(GrpcDelegator::new(auth)),
    )
    .await
    .context("opening the agent service")?;

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
        .add_service(kiln_agent::service(api.clone()))
        .bind()
        .await?;
    let metrics = kiln_launch::serve_metrics(server.metrics_listen, registry).await?;
    println!(
        "kiln-agent is serving on {}://{} as {}",
        me.scheme(),
        bound.local_addr(),
        me.id
    );
    kiln_launch::announce_metrics(metrics.as_ref());
    bound.serve_until(shutdown).await?;
    // Tasks stay as persisted and continue at the next start.
    api.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
