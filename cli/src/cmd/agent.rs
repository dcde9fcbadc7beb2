//! `kiln agent run "PROMPT"`: starts an agent task and follows it. Until the agent
//! service is built, the server answers UNIMPLEMENTED and this says so plainly.

use kiln_proto::agent as pb;
use kiln_proto::agent::agent_service_client::AgentServiceClient;

use super::rpc_error;
use crate::context::Context;

#[derive(Debug, clap::Subcommand)]
pub enum AgentCommand {
    /// Ask the agent to write code and build it until it is green.
    Run {
        prompt: String,
        /// python, rust, node, c, go…
        #[arg(long, default_value = "python")]
        toolchain: String,
        /// The model to use (default: the server's).
        #[arg(long)]
        model: Option<String>,
        /// Most fix iterations.
        #[arg(long)]
        max_iterations: Option<u32>,
        /// Fix the code in this workspace instead of starting empty.
        #[arg(long)]
        workspace: Option<String>,
    },
}

pub async fn run(ctx: &Context, command: AgentCommand) -> anyhow::Result<i32> {
    let AgentCommand::Run {
        prompt,
        toolchain,
        model,
        max_iterations,
        workspace,
    } = command;
    let mut client = AgentServiceClient::new(ctx.authenticated().await?);
    let request = pb::StartTaskRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        prompt,
        toolchain,
        model: model.unwrap_or_default(),
        max_iterations,
        workspace_id: workspace.unwrap_or_default(),
        ..Default::default()
    };
    let mut stream = match client.run_task(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            eprintln!(
                "kiln: the agent service at {} does not run tasks yet (this release has auth and build).",
                ctx.endpoint
            );
            return Ok(2);
        }
        Err(status) => return Err(rpc_error(ctx, status)),
    };
    while let Some(event) = stream.message().await.map_err(|s| rpc_error(ctx, s))? {
        println!("{event:?}");
    }
    Ok(0)
}
