//! `kiln health`: the gRPC health of each kiln service at an endpoint.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use kiln_rpc::client::ClientConfig;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// The services a full suite serves, in the order they are reported.
const SERVICES: &[&str] = &[
    "kiln.auth.v1.AuthService",
    "kiln.build.v1.BuildService",
    "kiln.agent.v1.AgentService",
];

#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// The kiln endpoint.
    #[arg(long, env = "KILN_ENDPOINT", default_value = "https://127.0.0.1:7443")]
    endpoint: String,

    /// CA certificate (PEM) that signed the server's certificate. Default: the
    /// development CA of `kiln up` under the data directory.
    #[arg(long, env = "KILN_CA")]
    ca: Option<PathBuf>,
}

pub async fn run(args: HealthArgs) -> anyhow::Result<ExitCode> {
    let ca_path = args
        .ca
        .unwrap_or_else(|| crate::up::default_data_dir().join("pki/ca.pem"));
    let ca = std::fs::read_to_string(&ca_path).with_context(|| {
        format!(
            "reading the CA certificate {} (pass --ca)",
            ca_path.display()
        )
    })?;
    let channel = ClientConfig::new(&args.endpoint)
        .ca_pem(ca)
        .connect()
        .await
        .with_context(|| {
            format!(
                "cannot reach kiln at {}; is it running (`kiln up`)?",
                args.endpoint
            )
        })?;
    let mut client = HealthClient::new(channel);
    let mut all_serving = true;
    for service in std::iter::once("").chain(SERVICES.iter().copied()) {
        let status = match client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
        {
            Ok(response) => response.into_inner().status().as_str_name().to_owned(),
            Err(status) if status.code() == tonic::Code::NotFound => "NOT_PRESENT".to_owned(),
            Err(status) => format!("ERROR: {}", status.message()),
        };
        all_serving &= status == ServingStatus::Serving.as_str_name();
        println!(
            "{:<30} {status}",
            if service.is_empty() {
                "(overall)"
            } else {
                service
            }
        );
    }
    Ok(if all_serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
