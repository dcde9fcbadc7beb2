//! `kiln version`: this client's version and, when the endpoint answers, the server's.
//!
//! The server's version comes from the `kiln-version` header that every kiln response
//! carries (see `kiln_rpc::layer::VERSION_HEADER`), read off a health check, so it needs
//! no login. As `kubectl version` does, an unreachable server is an error (exit 1) after
//! the client's version is printed; `--client` asks for the client's version only.

use std::time::Duration;

use anyhow::anyhow;
use serde_json::json;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::context::Context;
use crate::output::{OutputFormat, print_json};

/// How long `kiln version` waits for the server before saying it is unreachable.
const SERVER_TIMEOUT: Duration = Duration::from_secs(10);

pub const CLIENT_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, clap::Args)]
pub struct VersionArgs {
    /// Only the client's version; do not contact the server.
    #[arg(long)]
    client: bool,
}

pub async fn run(ctx: &Context, args: VersionArgs) -> anyhow::Result<i32> {
    let server = if args.client {
        None
    } else {
        Some(server_version(ctx).await)
    };
    match ctx.output {
        OutputFormat::Json => {
            let server = match &server {
                None => serde_json::Value::Null,
                Some(Ok(version)) => json!({ "endpoint": ctx.endpoint, "version": version }),
                Some(Err(err)) => json!({ "endpoint": ctx.endpoint, "error": format!("{err:#}") }),
            };
            print_json(&json!({ "client": { "version": CLIENT_VERSION }, "server": server }));
        }
        OutputFormat::Text => {
            println!("client: kiln {CLIENT_VERSION}");
            if let Some(Ok(version)) = &server {
                println!("server: kiln {version} at {}", ctx.endpoint);
            }
        }
    }
    match server {
        Some(Err(err)) => Err(err),
        _ => Ok(0),
    }
}

async fn server_version(ctx: &Context) -> anyhow::Result<String> {
    let ask = async {
        let mut health = HealthClient::new(ctx.anonymous().await?);
        let response = health
            .check(HealthCheckRequest::default())
            .await
            .map_err(|status| super::rpc_error(ctx, status))?;
        response
            .metadata()
            .get(kiln_rpc::layer::VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| {
                anyhow!(
                    "the server at {} did not say its version (no {} header): it is older than kiln 0.1 or not kiln",
                    ctx.endpoint,
                    kiln_rpc::layer::VERSION_HEADER
                )
            })
    };
    tokio::time::timeout(SERVER_TIMEOUT, ask)
        .await
        .unwrap_or_else(|_| {
            Err(anyhow!(
                "the server at {} did not answer within {} s",
                ctx.endpoint,
                SERVER_TIMEOUT.as_secs()
            ))
        })
}
