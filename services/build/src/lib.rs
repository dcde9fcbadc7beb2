//! kiln-build: workspaces, the build queue, sandboxed builds and their live event logs.
//!
//! The RPCs of `kiln.build.v1.BuildService` are served here. This release carries the contract and
//! the shared server layer only; every RPC answers UNIMPLEMENTED (reason
//! NOT_IMPLEMENTED) with a message naming it, until the build service lands (workspaces, queue, sandboxed runs).

use futures::stream::BoxStream;
use kiln_proto::build as pb;
use kiln_proto::build::build_service_server::{BuildService, BuildServiceServer};
use kiln_rpc::ApiError;
use kiln_rpc::limit::MAX_MESSAGE_BYTES_CEILING;
use tonic::Status;

/// The build service's handlers.
#[derive(Debug, Default)]
pub struct BuildApi {}

/// The tonic service, ready for `KilnServer::add_service`. Its own decode limit is set to
/// the ceiling because the kiln layer enforces the configured limit (answering
/// RESOURCE_EXHAUSTED, as gRPC clients expect) before a message reaches tonic.
pub fn service() -> BuildServiceServer<BuildApi> {
    BuildServiceServer::new(BuildApi::default())
        .max_decoding_message_size(MAX_MESSAGE_BYTES_CEILING)
}

fn not_implemented(rpc: &str) -> Status {
    ApiError::not_implemented(
        &format!("kiln.build.v1.BuildService/{rpc}"),
        "kiln-build is not built yet in this release",
    )
    .into()
}

#[tonic::async_trait]
impl BuildService for BuildApi {
    type ReadFileStream = BoxStream<'static, Result<pb::ReadFileResponse, Status>>;
    type DownloadArchiveStream = BoxStream<'static, Result<pb::DownloadArchiveResponse, Status>>;
    type RunBuildStream = BoxStream<'static, Result<pb::BuildEvent, Status>>;
    type WatchBuildStream = BoxStream<'static, Result<pb::BuildEvent, Status>>;
    async fn create_workspace(
        &self,
        _request: tonic::Request<pb::CreateWorkspaceRequest>,
    ) -> Result<tonic::Response<pb::Workspace>, Status> {
        Err(not_implemented("CreateWorkspace"))
    }
    async fn get_workspace(
        &self,
        _request: tonic::Request<pb::GetWorkspaceRequest>,
    ) -> Result<tonic::Response<pb::Workspace>, Status> {
        Err(not_implemented("GetWorkspace"))
    }
    async fn list_workspaces(
        &self,
        _request: tonic::Request<pb::ListWorkspacesRequest>,
    ) -> Result<tonic::Response<pb::ListWorkspacesResponse>, Status> {
        Err(not_implemented("ListWorkspaces"))
    }
    async fn write_files(
        &self,
        _request: tonic::Request<pb::WriteFilesRequest>,
    ) -> Result<tonic::Response<pb::WriteFilesResponse>, Status> {
        Err(not_implemented("WriteFiles"))
    }
    async fn list_files(
        &self,
        _request: tonic::Request<pb::ListFilesRequest>,
    ) -> Result<tonic::Response<pb::ListFilesResponse>, Status> {
        Err(not_implemented("ListFiles"))
    }
    async fn read_file(
        &self,
        _request: tonic::Request<pb::ReadFileRequest>,
    ) -> Result<tonic::Response<Self::ReadFileStream>, Status> {
        Err(not_implemented("ReadFile"))
    }
    async fn upload_archive(
        &self,
        _request: tonic::Request<tonic::Streaming<pb::UploadArchiveRequest>>,
    ) -> Result<tonic::Response<pb::UploadArchiveResponse>, Status> {
        Err(not_implemented("UploadArchive"))
    }
    async fn download_archive(
        &self,
        _request: tonic::Request<pb::DownloadArchiveRequest>,
    ) -> Result<tonic::Response<Self::DownloadArchiveStream>, Status> {
        Err(not_implemented("DownloadArchive"))
    }
    async fn delete_workspace(
        &self,
        _request: tonic::Request<pb::DeleteWorkspaceRequest>,
    ) -> Result<tonic::Response<pb::DeleteWorkspaceResponse>, Status> {
        Err(not_implemented("DeleteWorkspace"))
    }
    async fn start_build(
        &self,
        _request: tonic::Request<pb::StartBuildRequest>,
    ) -> Result<tonic::Response<pb::Build>, Status> {
        Err(not_implemented("StartBuild"))
    }
    async fn run_build(
        &self,
        _request: tonic::Request<pb::StartBuildRequest>,
    ) -> Result<tonic::Response<Self::RunBuildStream>, Status> {
        Err(not_implemented("RunBuild"))
    }
    async fn watch_build(
        &self,
        _request: tonic::Request<pb::WatchBuildRequest>,
    ) -> Result<tonic::Response<Self::WatchBuildStream>, Status> {
        Err(not_implemented("WatchBuild"))
    }
    async fn get_build(
        &self,
        _request: tonic::Request<pb::GetBuildRequest>,
    ) -> Result<tonic::Response<pb::Build>, Status> {
        Err(not_implemented("GetBuild"))
    }
    async fn list_builds(
        &self,
        _request: tonic::Request<pb::ListBuildsRequest>,
    ) -> Result<tonic::Response<pb::ListBuildsResponse>, Status> {
        Err(not_implemented("ListBuilds"))
    }
    async fn cancel_build(
        &self,
        _request: tonic::Request<pb::CancelBuildRequest>,
    ) -> Result<tonic::Response<pb::CancelBuildResponse>, Status> {
        Err(not_implemented("CancelBuild"))
    }
    async fn get_policy(
        &self,
        _request: tonic::Request<pb::GetPolicyRequest>,
    ) -> Result<tonic::Response<pb::GetPolicyResponse>, Status> {
        Err(not_implemented("GetPolicy"))
    }
}
