//! The agent's calls to the other services, behind traits so the workflow can be tested
//! with fakes: kiln-build ([`BuildClient`]) with a per-call credential (the task's
//! delegated token), and kiln-auth's ExchangeToken ([`Delegator`]).
//!
//! Errors stay `tonic::Status` here; the workflow decodes them with
//! [`kiln_rpc::error::RemoteError`] where it reports them.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use kiln_proto::auth as auth_pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_proto::build as pb;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::KilnChannel;
use tonic::Status;

/// A bearer credential for one call. Its Debug never shows the token.
#[derive(Clone)]
pub struct Credential(String);

impl Credential {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    pub fn token(&self) -> &str {
        &self.0
    }

    fn apply<T>(&self, mut request: tonic::Request<T>) -> Result<tonic::Request<T>, Status> {
        let value = format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| Status::unauthenticated("the credential is not printable ASCII"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(…)")
    }
}

pub type BuildEvents = BoxStream<'static, Result<pb::BuildEvent, Status>>;

/// The kiln-build calls the workflow makes.
pub trait BuildClient: fmt::Debug + Send + Sync + 'static {
    fn get_policy(&self, cred: &Credential)
    -> BoxFuture<'_, Result<pb::GetPolicyResponse, Status>>;
    fn create_workspace(
        &self,
        cred: &Credential,
        request: pb::CreateWorkspaceRequest,
    ) -> BoxFuture<'_, Result<pb::Workspace, Status>>;
    fn get_workspace(
        &self,
        cred: &Credential,
        id: &str,
    ) -> BoxFuture<'_, Result<pb::Workspace, Status>>;
    fn delete_workspace(&self, cred: &Credential, id: &str) -> BoxFuture<'_, Result<(), Status>>;
    fn list_files(
        &self,
        cred: &Credential,
        id: &str,
    ) -> BoxFuture<'_, Result<Vec<pb::FileInfo>, Status>>;
    /// A file's content, at most `max_bytes` (longer files are cut there).
    fn read_file(
        &self,
        cred: &Credential,
        workspace_id: &str,
        path: &str,
        max_bytes: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, Status>>;
    fn write_files(
        &self,
        cred: &Credential,
        request: pb::WriteFilesRequest,
    ) -> BoxFuture<'_, Result<pb::Workspace, Status>>;
    fn start_build(
        &self,
        cred: &Credential,
        request: pb::StartBuildRequest,
    ) -> BoxFuture<'_, Result<pb::Build, Status>>;
    fn watch_build(
        &self,
        cred: &Credential,
        build_id: &str,
        after_sequence: u64,
    ) -> BoxFuture<'_, Result<BuildEvents, Status>>;
    fn cancel_build(&self, cred: &Credential, build_id: &str) -> BoxFuture<'_, Result<(), Status>>;
}

/// A delegated token, as ExchangeToken returned it.
#[derive(Clone)]
pub struct Delegation {
    pub token: Credential,
    pub expires_at: SystemTime,
    /// The actor it names (the agent's workload identity).
    pub actor: String,
}

impl fmt::Debug for Delegation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delegation")
            .field("expires_at", &self.expires_at)
            .field("actor", &self.actor)
            .finish_non_exhaustive()
    }
}

/// kiln-auth's token exchange.
pub trait Delegator: fmt::Debug + Send + Sync + 'static {
    /// A token for kiln-build standing for the subject's user, for `task_id`, limited to
    /// `workspace_id`, living `lifetime` (or less: the server caps it).
    fn exchange(
        &self,
        subject_token: &str,
        task_id: &str,
        workspace_id: &str,
        lifetime: Duration,
    ) -> BoxFuture<'_, Result<Delegation, Status>>;
}

/// A channel set once, possibly after the client was made: `kiln up` builds the agent
/// before its listener (which the agent calls) is bound. Calls before then answer
/// UNAVAILABLE, which the workflow retries.
#[derive(Debug, Clone, Default)]
pub struct ChannelSlot(Arc<OnceLock<KilnChannel>>);

impl ChannelSlot {
    pub fn new(channel: KilnChannel) -> Self {
        let slot = Self::default();
        slot.set(channel);
        slot
    }

    /// Sets the channel; a second call changes nothing.
    pub fn set(&self, channel: KilnChannel) {
        let _ = self.0.set(channel);
    }

    fn get(&self) -> Result<KilnChannel, Status> {
        self.0
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("the agent's connection is not set up yet"))
    }
}

/// The real kiln-build client: one channel (mTLS with the agent's workload identity), a
/// credential per call.
#[derive(Debug, Clone)]
pub struct GrpcBuildClient {
    channel: ChannelSlot,
}

impl GrpcBuildClient {
    pub fn new(channel: ChannelSlot) -> Self {
        Self { channel }
    }

    fn client(&self) -> Result<BuildServiceClient<KilnChannel>, Status> {
        Ok(BuildServiceClient::new(self.channel.get()?)
            .max_decoding_message_size(kiln_rpc::limit::MAX_MESSAGE_BYTES_CEILING))
    }
}

impl BuildClient for GrpcBuildClient {
    fn get_policy(
        &self,
        cred: &Credential,
    ) -> BoxFuture<'_, Result<pb::GetPolicyResponse, Status>> {
        let request = cred.apply(tonic::Request::new(pb::GetPolicyRequest {}));
        Box::pin(async move { Ok(self.client()?.get_policy(request?).await?.into_inner()) })
    }

    fn create_workspace(
        &self,
        cred: &Credential,
        body: pb::CreateWorkspaceRequest,
    ) -> BoxFuture<'_, Result<pb::Workspace, Status>> {
        let request = cred.apply(tonic::Request::new(body));
        Box::pin(async move {
            Ok(self
                .client()?
                .create_workspace(request?)
                .await?
                .into_inner())
        })
    }

    fn get_workspace(
        &self,
        cred: &Credential,
        id: &str,
    ) -> BoxFuture<'_, Result<pb::Workspace, Status>> {
        let request = cred.apply(tonic::Request::new(pb::GetWorkspaceRequest {
            workspace_id: id.to_owned(),
        }));
        Box::pin(async move { Ok(self.client()?.get_workspace(request?).await?.into_inner()) })
    }

    fn delete_workspace(&self, cred: &Credential, id: &str) -> BoxFuture<'_, Result<(), Status>> {
        let request = cred.apply(tonic::Request::new(pb::DeleteWorkspaceRequest {
            workspace_id: id.to_owned(),
        }));
        Box::pin(async move {
            self.client()?.delete_workspace(request?).await?;
            Ok(())
        })
    }

    fn list_files(
        &self,
        cred: &Credential,
        id: &str,
    ) -> BoxFuture<'_, Result<Vec<pb::FileInfo>, Status>> {
        let cred = cred.clone();
        let id = id.to_owned();
        Box::pin(async move {
            let mut files = Vec::new();
            let mut page_token = String::new();
            loop {
                let request = cred.apply(tonic::Request::new(pb::ListFilesRequest {
                    workspace_id: id.clone(),
                    page_token: page_token.clone(),
                    page_size: 1000,
                    ..Default::default()
                }))?;
                let page = self.client()?.list_files(request).await?.into_inner();
                files.extend(page.files);
                if page.next_page_token.is_empty() || files.len() >= 10_000 {
                    return Ok(files);
                }
                page_token = page.next_page_token;
            }
        })
    }

    fn read_file(
        &self,
        cred: &Credential,
        workspace_id: &str,
        path: &str,
        max_bytes: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, Status>> {
        let request = cred.apply(tonic::Request::new(pb::ReadFileRequest {
            workspace_id: workspace_id.to_owned(),
            path: path.to_owned(),
            offset: 0,
            limit: Some(max_bytes),
        }));
        Box::pin(async move {
            let mut stream = self.client()?.read_file(request?).await?.into_inner();
            let mut out = Vec::new();
            while let Some(chunk) = stream.message().await? {
                out.extend_from_slice(&chunk.data);
                if out.len() as u64 >= max_bytes {
                    out.truncate(usize::try_from(max_bytes).unwrap_or(usize::MAX));
                    break;
                }
            }
            Ok(out)
        })
    }

    fn write_files(
        &self,
        cred: &Credential,
        body: pb::WriteFilesRequest,
    ) -> BoxFuture<'_, Result<pb::Workspace, Status>> {
        let request = cred.apply(tonic::Request::new(body));
        Box::pin(async move {
            let response = self.client()?.write_files(request?).await?.into_inner();
            Ok(response.workspace.unwrap_or_default())
        })
    }

    fn start_build(
        &self,
        cred: &Credential,
        body: pb::StartBuildRequest,
    ) -> BoxFuture<'_, Result<pb::Build, Status>> {
        let request = cred.apply(tonic::Request::new(body));
        Box::pin(async move { Ok(self.client()?.start_build(request?).await?.into_inner()) })
    }

    fn watch_build(
        &self,
        cred: &Credential,
        build_id: &str,
        after_sequence: u64,
    ) -> BoxFuture<'_, Result<BuildEvents, Status>> {
        let request = cred.apply(tonic::Request::new(pb::WatchBuildRequest {
            build_id: build_id.to_owned(),
            after_sequence,
        }));
        Box::pin(async move {
            let stream = self.client()?.watch_build(request?).await?.into_inner();
            Ok(stream.boxed())
        })
    }

    fn cancel_build(&self, cred: &Credential, build_id: &str) -> BoxFuture<'_, Result<(), Status>> {
        let request = cred.apply(tonic::Request::new(pb::CancelBuildRequest {
            build_id: build_id.to_owned(),
            grace_period: None,
        }));
        Box::pin(async move {
            self.client()?.cancel_build(request?).await?;
            Ok(())
        })
    }
}

/// The real token exchange: kiln-auth over mTLS with the agent's workload certificate
/// (ExchangeToken is a SERVICE RPC open to the agent's identity only).
#[derive(Debug, Clone)]
pub struct GrpcDelegator {
    channel: ChannelSlot,
}

impl GrpcDelegator {
    pub fn new(channel: ChannelSlot) -> Self {
        Self { channel }
    }
}

/// The audience of the tokens the agent asks for.
pub const BUILD_AUDIENCE: &str = "kiln-build";

impl Delegator for GrpcDelegator {
    fn exchange(
        &self,
        subject_token: &str,
        task_id: &str,
        workspace_id: &str,
        lifetime: Duration,
    ) -> BoxFuture<'_, Result<Delegation, Status>> {
        let request = auth_pb::ExchangeTokenRequest {
            subject_token: subject_token.to_owned(),
            audience: BUILD_AUDIENCE.to_owned(),
            task_id: task_id.to_owned(),
            workspace_id: Some(workspace_id.to_owned()),
            lifetime: Some(crate::task::proto_duration(lifetime)),
        };
        Box::pin(async move {
            let response = AuthServiceClient::new(self.channel.get()?)
                .exchange_token(request)
                .await?
                .into_inner();
            let expires_at = response
                .expires_at
                .map(|t| {
                    SystemTime::UNIX_EPOCH
                        + Duration::from_secs(u64::try_from(t.seconds).unwrap_or(0))
                })
                .unwrap_or_else(|| SystemTime::now() + lifetime);
            let actor = response.principal.map(|p| p.actor).unwrap_or_default();
            Ok(Delegation {
                token: Credential::new(response.access_token),
                expires_at,
                actor,
            })
        })
    }
}
