//! `kiln health`: the gRPC health of the server and of each kiln service.

use std::collections::BTreeMap;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::context::Context;
use crate::output::{OutputFormat, print_json};

/// The services a full suite serves, in the order they are reported.
const SERVICES: &[&str] = &[
    "kiln.auth.v1.AuthService",
    "kiln.build.v1.BuildService",
    "kiln.agent.v1.AgentService",
];

/// Prints each status; exit code 0 only when everything is SERVING.
pub async fn run(ctx: &Context) -> anyhow::Result<i32> {
    let mut client = HealthClient::new(ctx.anonymous().await?);
    let mut statuses = Vec::new();
    for service in std::iter::once("").chain(SERVICES.iter().copied()) {
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        let status = match client.check(request).await {
            Ok(response) => response.into_inner().status().as_str_name().to_owned(),
            Err(status) if status.code() == tonic::Code::NotFound => "NOT_PRESENT".to_owned(),
            // A connection that fails for a nameable reason (plain HTTP/2 to the TLS
            // port…) fails every check alike: say it once.
            Err(status) if service.is_empty() && ctx.diagnose(&status).is_some() => {
                return Err(crate::cmd::rpc_error(ctx, status));
            }
            Err(status) => format!("ERROR: {}", status.message()),
        };
        statuses.push((
            if service.is_empty() {
                "(overall)"
            } else {
                service
            },
            status,
        ));
    }
    let all_serving = statuses
        .iter()
        .all(|(_, s)| s == ServingStatus::Serving.as_str_name());
    match ctx.output {
        OutputFormat::Json => print_json(&serde_json::json!(
            statuses.iter().cloned().collect::<BTreeMap<_, _>>()
        )),
        OutputFormat::Text => {
            for (service, status) in &statuses {
                println!("{service:<30} {status}");
            }
        }
    }
    Ok(if all_serving { 0 } else { 1 })
}
