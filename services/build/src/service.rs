//! The gRPC surface: ownership checks, then the build handlers. Workspace handlers are
//! in `files.rs`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_proto::build as pb;
use kiln_proto::build::build_service_server::BuildService;
use kiln_rpc::audit::AuditRecord;
use kiln_rpc::id_prefix::{self, Lookup};
use kiln_rpc::{ApiError, Principal};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::control::Cancelled;
use crate::error::{BuildError, Result, invalid, reason, violation};
use crate::log::{self, AppendEvents, LiveLog};
use crate::model::{Build, BuildState};
use crate::queue::Entry;
use crate::store::{BuildRow, ListFilter, WorkspaceRow, now_micros, page_token, parse_page_token};
use crate::validate;
use crate::wire::{self, limits_to_proto};
use crate::{BuildApi, Shared};

type Stream<T> = BoxStream<'static, Result<T, Status>>;

pub use kiln_rpc::identity::{can_read, can_write, owner_filter};

/// The workspace filter of ListBuilds: a delegated token scoped to one workspace sees
/// that workspace's builds only (asking for another: a workspace no row has).
pub fn workspace_filter(p: &Principal, requested: Option<String>) -> Option<String> {
    match p.scope.as_ref().and_then(|s| s.workspace_id.clone()) {
        None => requested,
        Some(scoped) => match requested {
            Some(r) if r != scoped => Some(String::new()),
            _ => Some(scoped),
        },
    }
}

pub fn principal<T>(req: &Request<T>) -> Result<Principal, Status> {
    Ok(kiln_rpc::principal(req)?.clone())
}

pub fn require_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 128 {
        return Err(ApiError::invalid_field(field, "is required (at most 128 bytes)").into());
    }
    Ok(())
}

/// Page size: 0 → default, capped at max, negative refused.
pub fn page_size(field: &str, size: i32, default: i64, max: i64) -> Result<i64> {
    match size {
        s if s < 0 => Err(ApiError::invalid_field(field, "must not be negative").into()),
        0 => Ok(default),
        s => Ok(i64::from(s).min(max)),
    }
}

pub fn cursor(token: &str) -> Result<Option<(i64, String)>> {
    if token.is_empty() {
        return Ok(None);
    }
    parse_page_token(token).map(Some).ok_or_else(|| {
        ApiError::invalid_field("page_token", "is not a token this server issued").into()
    })
}

pub fn tier_to_proto(t: kiln_sandbox::Tier) -> pb::SandboxTier {
    match t {
        kiln_sandbox::Tier::A => pb::SandboxTier::A,
        kiln_sandbox::Tier::B => pb::SandboxTier::B,
        kiln_sandbox::Tier::None => pb::SandboxTier::None,
    }
}

/// What GetPolicy says about the sandbox: the host's probe, and when the configuration
/// chose a lower tier than the host offers, that choice first; then what the tier leaves
/// visible ([`kiln_sandbox::Tier::caveats`]).
pub fn sandbox_description(tier: kiln_sandbox::Tier, probe: &kiln_sandbox::Probe) -> String {
    let mut text = if tier == probe.tier {
        probe.to_string()
    } else {
        format!("tier {tier} (chosen by configuration); host: {probe}")
    };
    // What the tier does not isolate, so a client can tell before it sends secrets.
    if let Some(caveats) = tier.caveats() {
        text.push_str("; ");
        text.push_str(caveats);
    }
    text
}

impl BuildApi {
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The workspace, if it exists and `p` may see it (write: change it); else NOT_FOUND.
    pub(crate) async fn workspace_for(
        &self,
        p: &Principal,
        id: &str,
        write: bool,
    ) -> Result<WorkspaceRow> {
        require_id("workspace_id", id)?;
        let store = &self.shared.store;
        // Not an id of a workspace: the name of one of the caller's own (names are unique
        // per owner and never shaped like ids, so the two cannot be confused), else a
        // unique prefix of the id of one the caller may see.
        let visible = |w: &WorkspaceRow| {
            p.may_use_workspace(&w.id)
                && if write {
                    can_write(p, &w.owner)
                } else {
                    can_read(p, &w.owner)
                }
        };
        let found = match store.get_workspace(id).await? {
            Some(w) => Some(w),
            None if uuid::Uuid::parse_str(id).is_err() => {
                match store.workspace_by_name(&p.subject, id).await? {
                    Some(w) => Some(w),
                    None => {
                        let Lookup::Prefix(prefix) = id_prefix::lookup("workspace_id", id)? else {
                            return Err(ApiError::not_found("workspace", id).into());
                        };
                        let owner = owner_filter(p, None);
                        let matches = store
                            .workspaces_by_id_prefix(
                                &prefix,
                                owner.as_deref(),
                                id_prefix::FETCH_LIMIT,
                            )
                            .await?
                            .into_iter()
                            .filter(|w| visible(w))
                            .map(|w| (w.id.clone(), w))
                            .collect();
                        return Ok(id_prefix::pick("workspace", "workspace_id", id, matches)?);
                    }
                }
            }
            None => None,
        };
        match found {
            // A delegated token scoped to another workspace sees none of this one.
            Some(w) if visible(&w) => Ok(w),
            _ => Err(ApiError::not_found("workspace", id).into()),
        }
    }

    /// The build `id` names (its id, or a unique prefix of it among the builds `p` may
    /// see; see `kiln_rpc::id_prefix`), if `p` may see it (write: change it); else
    /// NOT_FOUND.
    async fn build_for(&self, p: &Principal, id: &str, write: bool) -> Result<BuildRow> {
        require_id("build_id", id)?;
        let visible = |b: &BuildRow| {
            p.may_use_workspace(&b.build.workspace_id)
                && if write {
                    can_write(p, &b.build.owner)
                } else {
                    can_read(p, &b.build.owner)
                }
        };
        let store = &self.shared.store;
        if let Some(b) = store.get_build(id).await? {
            return if visible(&b) {
                Ok(b)
            } else {
                Err(ApiError::not_found("build", id).into())
            };
        }
        let Lookup::Prefix(prefix) = id_prefix::lookup("build_id", id)? else {
            return Err(ApiError::not_found("build", id).into());
        };
        let matches = store
            .builds_by_id_prefix(
                &prefix,
                owner_filter(p, None).as_deref(),
                id_prefix::FETCH_LIMIT,
            )
            .await?
            .into_iter()
            .filter(|b| visible(b))
            .map(|b| (b.build.id.clone(), b))
            .collect();
        Ok(id_prefix::pick("build", "build_id", id, matches)?)
    }

    /// The build as the contract shows it, with its place in the queue while queued.
    async fn with_position(&self, b: &Build) -> pb::Build {
        let position = match b.state {
            BuildState::Queued => self.shared.control.position(&b.owner, &b.id).await,
            _ => None,
        };
        wire::build_to_proto(b, position)
    }

    async fn start(
        &self,
        p: &Principal,
        req: pb::StartBuildRequest,
        audit: AuditRecord,
    ) -> Result<pb::Build> {
        let shared = &self.shared;
        let spec = validate::start_build(&req, &shared.config.policy, &shared.config.workspace)?;
        // The idempotency hash is of the request as sent (its proto bytes), not of the
        // spec: a retry is the same request, and hashes stored by earlier releases keep
        // matching.
        let steps: Vec<Vec<u8>> = req.steps.iter().map(Message::encode_to_vec).collect();
        let mut parts: Vec<&[u8]> = vec![req.workspace_id.as_bytes()];
        parts.extend(steps.iter().map(Vec::as_slice));
        let limits_bytes = req.limits.map(|l| l.encode_to_vec()).unwrap_or_default();
        parts.push(&limits_bytes);
        let hash = validate::request_hash(&parts, &[&req.env, &req.labels]);
        let request_id = (!req.request_id.is_empty()).then_some(req.request_id.as_str());
        if let Some(rid) = request_id
            && let Some(existing) = shared.store.build_by_request(&p.subject, rid).await?
        {
            return same_request(existing.request_hash.as_deref(), &hash, existing.build);
        }
        let ws = self.workspace_for(p, &req.workspace_id, true).await?;
        if shared.control.is_closed() {
            return Err(
                ApiError::unavailable("the build service is shutting down; retry shortly").into(),
            );
        }
        let reservation = shared.control.reserve(&p.subject).await?;
        let position = shared.control.peek_position(&p.subject).await;
        let now = now_micros();
        let build = Build::queued(
            uuid::Uuid::new_v4().to_string(),
            ws.id.clone(),
            p.subject.clone(),
            spec,
            now,
        );
        let queued = pb::BuildEvent {
            sequence: 1,
            time: Some(wire::timestamp(now)),
            event: Some(pb::build_event::Event::Queued(pb::Queued {
                position,
                build_id: build.id.clone(),
            })),
        };
        if let Err(e) = shared
            .store
            .insert_build(&build, request_id, Some(&hash), &queued)
            .await
        {
            drop(reservation);
            if let (BuildError::Store(sqlx::Error::Database(db)), Some(rid)) = (&e, request_id)
                && db.is_unique_violation()
                && let Some(existing) = shared.store.build_by_request(&p.subject, rid).await?
            {
                return same_request(existing.request_hash.as_deref(), &hash, existing.build);
            }
            return Err(e);
        }
        // Who started it: for an agent task, "the agent on behalf of the owner".
        audit
            .target("build", &build.id)
            .detail("workspace_id", build.workspace_id.as_str())
            .detail("owner", build.owner.as_str())
            .detail(
                "task_id",
                p.scope.as_ref().map_or("", |s| s.task_id.as_str()),
            )
            .emit();
        // A live log lives only in the process that runs the build. Alone, that is this
        // one, and watchers of the queued build follow it from memory; with replicas it
        // is whichever claims the build (its runner makes the log), and watchers
        // elsewhere follow the store.
        if shared.control.replica_id().is_none() {
            shared.logs.insert(LiveLog::new(
                &build.id,
                1,
                Vec::new(),
                shared.config.live_window_bytes,
            ));
        }
        shared
            .control
            .enqueue(
                Entry::new(
                    build.id.clone(),
                    build.owner.clone(),
                    build.workspace_id.clone(),
                ),
                Some(reservation),
            )
            .await?;
        Ok(wire::build_to_proto(&build, Some(position)))
    }

    fn watch_stream(&self, build_id: String, after: u64) -> Stream<pb::BuildEvent> {
        log::watch(
            self.shared.store.clone(),
            self.shared.logs.clone(),
            build_id,
            after,
            self.shared.config.heartbeat_interval,
        )
        .boxed()
    }

    /// Cancels a build; returns it and, when a running step was signalled, the grace
    /// before its SIGKILL.
    async fn cancel(
        &self,
        p: &Principal,
        req: pb::CancelBuildRequest,
    ) -> Result<(Build, Option<Duration>)> {
        let grace = match req.grace_period {
            // The configured grace, the one a timeout or a shutdown also gives a step.
            None => self.shared.config.sandbox.kill_grace,
            Some(d)
                if d.seconds < 0
                    || d.nanos < 0
                    || d.seconds > 60
                    || (d.seconds == 60 && d.nanos > 0) =>
            {
                return Err(ApiError::invalid_field(
                    "grace_period",
                    "must be between 0 and 60 seconds",
                )
                .into());
            }
            Some(d) => Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs()),
        };
        let row = self.build_for(p, &req.build_id, true).await?;
        let b = row.build;
        if b.state.is_final() {
            return Ok((b, None));
        }
        let shared = &self.shared;
        let cancelled = shared.control.cancel(&b.owner, &b.id, grace).await?;
        if cancelled == Cancelled::Dequeued {
            let log = shared.logs.get(&b.id).unwrap_or_else(|| {
                LiveLog::new(
                    &b.id,
                    b.last_sequence,
                    Vec::new(),
                    shared.config.live_window_bytes,
                )
            });
            log.append_finished(
                &shared.store,
                BuildState::Cancelled,
                "cancelled while queued",
            )
            .await?;
            shared.logs.remove(&b.id);
        }
        let kill_after = (cancelled == Cancelled::Signalled).then_some(grace);
        Ok((self.build_for(p, &b.id, false).await?.build, kill_after))
    }

    fn policy(&self) -> pb::GetPolicyResponse {
        let c = &self.shared.config;
        let probe = self.shared.sandbox.probe();
        let q = self.shared.control.config();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        pb::GetPolicyResponse {
            allowed_programs: c.policy.allowed_programs.iter().cloned().collect(),
            allowed_env: c.policy.allowed_env.iter().cloned().collect(),
            default_limits: Some(limits_to_proto(&c.policy.default_limits)),
            max_limits: Some(limits_to_proto(&c.policy.max_limits)),
            sandbox_tier: tier_to_proto(self.shared.sandbox.tier()) as i32,
            sandbox_description: sandbox_description(self.shared.sandbox.tier(), probe),
            sandbox_features: probe.features(),
            max_running_builds: count(q.max_running),
            max_running_builds_per_user: count(q.max_running_per_user),
            max_queued_builds_per_user: count(q.max_queued_per_user),
            max_steps: c.policy.max_steps,
            max_workspace_bytes: c.workspace.max_bytes,
            max_workspace_files: c.workspace.max_files,
            max_file_bytes: c.workspace.max_file_bytes,
        }
    }

    async fn list_builds(
        &self,
        p: &Principal,
        req: pb::ListBuildsRequest,
    ) -> Result<pb::ListBuildsResponse> {
        let limit = page_size("page_size", req.page_size, 100, 1000)?;
        // A name of one of the caller's workspaces filters by that workspace's id, as
        // everywhere an id is taken; anything else filters as given.
        let workspace_id = match req.workspace_id {
            Some(w) if uuid::Uuid::parse_str(&w).is_err() => Some(
                self.shared
                    .store
                    .workspace_by_name(&p.subject, &w)
                    .await?
                    .map_or(w, |ws| ws.id),
            ),
            other => other,
        };
        let filter = ListFilter {
            owner: owner_filter(p, req.owner),
            workspace_id: workspace_filter(p, workspace_id),
            states: req.states,
            labels: req.labels.into_iter().collect(),
            before: cursor(&req.page_token)?,
            limit: limit + 1,
        };
        let mut rows = self.shared.store.list_builds(&filter).await?;
        let more = rows.len() as i64 > limit;
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => page_token(last.build.created_at, &last.build.id),
            _ => String::new(),
        };
        let mut builds = Vec::with_capacity(rows.len());
        for row in rows {
            builds.push(self.with_position(&row.build).await);
        }
        Ok(pb::ListBuildsResponse {
            builds,
            next_page_token,
        })
    }
}

/// A StartBuild retried with its request_id: the build it made (shown without a queue
/// position, as it always was), if the request is the same.
fn same_request(stored: Option<&str>, hash: &str, build: Build) -> Result<pb::Build> {
    if stored == Some(hash) {
        return Ok(wire::build_to_proto(&build, None));
    }
    Err(invalid(
        reason::REQUEST_ID_REUSED,
        vec![violation(
            "request_id",
            "was already used for a different request; use a new request_id for new parameters",
        )],
    )
    .into())
}

fn ok<T>(r: Result<T>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl BuildService for BuildApi {
    type ReadFileStream = Stream<pb::ReadFileResponse>;
    type DownloadArchiveStream = Stream<pb::DownloadArchiveResponse>;
    type RunBuildStream = Stream<pb::BuildEvent>;
    type WatchBuildStream = Stream<pb::BuildEvent>;

    async fn create_workspace(
        &self,
        request: Request<pb::CreateWorkspaceRequest>,
    ) -> Result<Response<pb::Workspace>, Status> {
        let p = principal(&request)?;
        ok(self.create_workspace_impl(&p, request.into_inner()).await)
    }

    async fn get_workspace(
        &self,
        request: Request<pb::GetWorkspaceRequest>,
    ) -> Result<Response<pb::Workspace>, Status> {
        let p = principal(&request)?;
        ok(self
            .workspace_for(&p, &request.get_ref().workspace_id, false)
            .await
            .map(|w| wire::workspace_to_proto(&w)))
    }

    async fn list_workspaces(
        &self,
        request: Request<pb::ListWorkspacesRequest>,
    ) -> Result<Response<pb::ListWorkspacesResponse>, Status> {
        let p = principal(&request)?;
        ok(self.list_workspaces_impl(&p, request.into_inner()).await)
    }

    async fn write_files(
        &self,
        request: Request<pb::WriteFilesRequest>,
    ) -> Result<Response<pb::WriteFilesResponse>, Status> {
        let p = principal(&request)?;
        ok(self.write_files_impl(&p, request.into_inner()).await)
    }

    async fn list_files(
        &self,
        request: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        let p = principal(&request)?;
        ok(self.list_files_impl(&p, request.into_inner()).await)
    }

    async fn read_file(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let p = principal(&request)?;
        ok(self.read_file_impl(&p, request.into_inner()).await)
    }

    async fn upload_archive(
        &self,
        request: Request<tonic::Streaming<pb::UploadArchiveRequest>>,
    ) -> Result<Response<pb::UploadArchiveResponse>, Status> {
        let p = principal(&request)?;
        ok(self.upload_impl(&p, request.into_inner()).await)
    }

    async fn download_archive(
        &self,
        request: Request<pb::DownloadArchiveRequest>,
    ) -> Result<Response<Self::DownloadArchiveStream>, Status> {
        let p = principal(&request)?;
        ok(self.download_impl(&p, request.into_inner()).await)
    }

    async fn delete_workspace(
        &self,
        request: Request<pb::DeleteWorkspaceRequest>,
    ) -> Result<Response<pb::DeleteWorkspaceResponse>, Status> {
        let p = principal(&request)?;
        ok(self
            .delete_workspace_impl(&p, &request.get_ref().workspace_id)
            .await)
    }

    async fn start_build(
        &self,
        request: Request<pb::StartBuildRequest>,
    ) -> Result<Response<pb::Build>, Status> {
        let p = principal(&request)?;
        let audit = AuditRecord::for_request("build", "build.start", &request);
        ok(self.start(&p, request.into_inner(), audit).await)
    }

    async fn run_build(
        &self,
        request: Request<pb::StartBuildRequest>,
    ) -> Result<Response<Self::RunBuildStream>, Status> {
        let p = principal(&request)?;
        let audit = AuditRecord::for_request("build", "build.start", &request);
        let build = self.start(&p, request.into_inner(), audit).await?;
        let mut response = Response::new(self.watch_stream(build.id.clone(), 0));
        // The id before any event, so a client whose stream breaks can WatchBuild.
        if let Ok(value) = build.id.parse() {
            response.metadata_mut().insert("kiln-build-id", value);
        }
        Ok(response)
    }

    async fn watch_build(
        &self,
        request: Request<pb::WatchBuildRequest>,
    ) -> Result<Response<Self::WatchBuildStream>, Status> {
        let p = principal(&request)?;
        let req = request.into_inner();
        let row = self.build_for(&p, &req.build_id, false).await?;
        Ok(Response::new(
            self.watch_stream(row.build.id, req.after_sequence),
        ))
    }

    async fn get_build(
        &self,
        request: Request<pb::GetBuildRequest>,
    ) -> Result<Response<pb::Build>, Status> {
        let p = principal(&request)?;
        let row = self
            .build_for(&p, &request.get_ref().build_id, false)
            .await?;
        Ok(Response::new(self.with_position(&row.build).await))
    }

    async fn list_builds(
        &self,
        request: Request<pb::ListBuildsRequest>,
    ) -> Result<Response<pb::ListBuildsResponse>, Status> {
        let p = principal(&request)?;
        ok(BuildApi::list_builds(self, &p, request.into_inner()).await)
    }

    async fn cancel_build(
        &self,
        request: Request<pb::CancelBuildRequest>,
    ) -> Result<Response<pb::CancelBuildResponse>, Status> {
        let p = principal(&request)?;
        let audit = AuditRecord::for_request("build", "build.cancel", &request);
        let (build, kill_after) = self.cancel(&p, request.into_inner()).await?;
        audit
            .target("build", &build.id)
            .detail("owner", build.owner.as_str())
            .detail("state", wire::state_to_proto(build.state).as_str_name())
            .emit();
        Ok(Response::new(pb::CancelBuildResponse {
            build: Some(self.with_position(&build).await),
            kill_after: kill_after.and_then(|d| prost_types::Duration::try_from(d).ok()),
        }))
    }

    async fn get_policy(
        &self,
        _request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        Ok(Response::new(self.policy()))
    }
}
