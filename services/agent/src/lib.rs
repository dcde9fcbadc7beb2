//! kiln-agent: LLM tasks: prompt, plan, generate, validate, build and fix until green.
//!
//! The RPCs of `kiln.agent.v1.AgentService` are served here. This release carries the contract and
//! the shared server layer only; every RPC answers UNIMPLEMENTED (reason
//! NOT_IMPLEMENTED) with a message naming it, until the agent service lands (LLM tasks).
//!
//! The pure parts of the agent are here already: [`diagnose`] turns a failed build's output into
//! a located diagnosis for the FIX prompt, [`reply`] defines and parses the format in which the
//! model returns files, and [`guard`] checks such a reply (VALIDATE) before anything is written.

pub mod diagnose;
pub mod guard;
pub mod reply;

use futures::stream::BoxStream;
use kiln_proto::agent as pb;
use kiln_proto::agent::agent_service_server::{AgentService, AgentServiceServer};
use kiln_rpc::ApiError;
use kiln_rpc::limit::MAX_MESSAGE_BYTES_CEILING;
use tonic::Status;

/// The agent service's handlers.
#[derive(Debug, Default)]
pub struct AgentApi {}

/// The tonic service, ready for `KilnServer::add_service`. Its own decode limit is set to
/// the ceiling because the kiln layer enforces the configured limit (answering
/// RESOURCE_EXHAUSTED, as gRPC clients expect) before a message reaches tonic.
pub fn service() -> AgentServiceServer<AgentApi> {
    AgentServiceServer::new(AgentApi::default())
        .max_decoding_message_size(MAX_MESSAGE_BYTES_CEILING)
}

fn not_implemented(rpc: &str) -> Status {
    ApiError::not_implemented(
        &format!("kiln.agent.v1.AgentService/{rpc}"),
        "kiln-agent is not built yet in this release",
    )
    .into()
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type RunTaskStream = BoxStream<'static, Result<pb::TaskEvent, Status>>;
    type WatchTaskStream = BoxStream<'static, Result<pb::TaskEvent, Status>>;
    async fn start_task(
        &self,
        _request: tonic::Request<pb::StartTaskRequest>,
    ) -> Result<tonic::Response<pb::Task>, Status> {
        Err(not_implemented("StartTask"))
    }
    async fn run_task(
        &self,
        _request: tonic::Request<pb::StartTaskRequest>,
    ) -> Result<tonic::Response<Self::RunTaskStream>, Status> {
        Err(not_implemented("RunTask"))
    }
    async fn watch_task(
        &self,
        _request: tonic::Request<pb::WatchTaskRequest>,
    ) -> Result<tonic::Response<Self::WatchTaskStream>, Status> {
        Err(not_implemented("WatchTask"))
    }
    async fn get_task(
        &self,
        _request: tonic::Request<pb::GetTaskRequest>,
    ) -> Result<tonic::Response<pb::Task>, Status> {
        Err(not_implemented("GetTask"))
    }
    async fn list_tasks(
        &self,
        _request: tonic::Request<pb::ListTasksRequest>,
    ) -> Result<tonic::Response<pb::ListTasksResponse>, Status> {
        Err(not_implemented("ListTasks"))
    }
    async fn cancel_task(
        &self,
        _request: tonic::Request<pb::CancelTaskRequest>,
    ) -> Result<tonic::Response<pb::CancelTaskResponse>, Status> {
        Err(not_implemented("CancelTask"))
    }
    async fn list_models(
        &self,
        _request: tonic::Request<pb::ListModelsRequest>,
    ) -> Result<tonic::Response<pb::ListModelsResponse>, Status> {
        Err(not_implemented("ListModels"))
    }
}
