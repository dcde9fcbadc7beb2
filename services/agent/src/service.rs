//! The gRPC surface of AgentService: validation, ownership, idempotency; the work itself
//! is the runner's (`workflow`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use futures::stream::BoxStream;
use kiln_proto::agent as pb;
use kiln_proto::agent::agent_service_server::AgentService;
use kiln_proto::build as build_pb;
use kiln_rpc::id_prefix::{self, Lookup};
use kiln_rpc::identity::{can_read, can_write, owner_filter};
use kiln_rpc::{ApiError, FieldViolation, Principal, RemoteError};
use prost::Message as _;
use tonic::{Code, Request, Response, Status};

use crate::AgentApi;
use crate::clients::Credential;
use crate::error::{provider_error, reason};
use crate::store::{Inserted, ListFilter, StoredTask};
use crate::task::{StepSpec, TaskRecord, Usage, now_micros};
use crate::toolchain;
use crate::workflow::{self, Shared, TASK_LABEL};

type Stream<T> = BoxStream<'static, Result<T, Status>>;

const MAX_PROMPT_BYTES: usize = 64 * 1024;
const MAX_ITERATIONS: u32 = 10;
const DEFAULT_ITERATIONS: u32 = 3;
const MAX_STEPS: usize = 16;
const MAX_LABELS: usize = 32;
/// The delegated token outlives the time budget by this much, so that a task whose
/// budget just ran out can still cancel its build.
const DELEGATION_MARGIN: Duration = Duration::from_secs(120);

fn principal<T>(req: &Request<T>) -> Result<Principal, Status> {
    Ok(kiln_rpc::principal(req)?.clone())
}

/// The caller's own bearer token (the subject of the token exchange). Only read, never
/// stored.
fn bearer<T>(req: &Request<T>) -> Result<String, Status> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
        .ok_or_else(|| {
            ApiError::unauthenticated(
                kiln_rpc::error::reason::MISSING_CREDENTIALS,
                "a task acts for the caller and needs the caller's bearer token",
            )
            .into()
        })
}

fn not_found(id: &str) -> Status {
    ApiError::not_found("task", id).into()
}

fn require_id(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 128 {
        return Err(ApiError::invalid_field(field, "is required (at most 128 bytes)").into());
    }
    Ok(())
}

/// An error kiln-build or kiln-auth answered, passed on to our caller with its code and
/// reason (a NOT_FOUND workspace stays NOT_FOUND), the message saying who said it.
fn relayed(what: &str, status: &Status) -> Status {
    let remote = RemoteError::from_status(status);
    let reason: &'static str = match remote.code {
        Code::NotFound => kiln_rpc::error::reason::NOT_FOUND,
        Code::InvalidArgument => kiln_rpc::error::reason::INVALID_ARGUMENT,
        Code::PermissionDenied => kiln_rpc::error::reason::INSUFFICIENT_ROLE,
        Code::Unauthenticated => kiln_rpc::error::reason::INVALID_TOKEN,
        Code::FailedPrecondition => kiln_rpc::error::reason::FAILED_PRECONDITION,
        _ => kiln_rpc::error::reason::UNAVAILABLE,
    };
    let mut err = ApiError::new(remote.code, reason, format!("{what}: {}", remote.summary()))
        .with_metadata("upstream_reason", remote.reason.clone());
    for v in &remote.violations {
        err = err.with_violation(v.field.clone(), v.description.clone());
    }
    err.into()
}

fn check_labels(labels: &HashMap<String, String>, out: &mut Vec<FieldViolation>) {
    if labels.len() > MAX_LABELS {
        out.push(violation("labels", &format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'/' | b'-'));
        if !key_ok {
            out.push(violation(
                &format!("labels[{k:?}]"),
                "keys are 1 to 63 bytes of a-z, 0-9, '.', '_', '/', '-'",
            ));
        }
        if v.len() > 256 {
            out.push(violation(
                &format!("labels[{k:?}]"),
                "values are at most 256 bytes",
            ));
        }
    }
}

fn violation(field: &str, description: &str) -> FieldViolation {
    FieldViolation {
        field: field.to_owned(),
        description: description.to_owned(),
    }
}

fn duration(d: &prost_types::Duration) -> Option<Duration> {
    (d.seconds >= 0 && d.nanos >= 0)
        .then(|| Duration::new(u64::try_from(d.seconds).unwrap_or(0), d.nanos as u32))
}

/// The steps of a request, split and checked for shape (the policy comes later).
fn request_steps(steps: &[build_pb::Step], out: &mut Vec<FieldViolation>) -> Vec<StepSpec> {
    if steps.len() > MAX_STEPS {
        out.push(violation("steps", &format!("at most {MAX_STEPS} steps")));
    }
    let mut specs = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let argv = match (&step.command, step.argv.is_empty()) {
            (Some(_), false) => {
                out.push(violation(
                    &format!("steps[{i}]"),
                    "give argv or command, not both",
                ));
                continue;
            }
            (Some(command), true) => match shell_words::split(command) {
                Ok(argv) => argv,
                Err(e) => {
                    out.push(violation(&format!("steps[{i}].command"), &e.to_string()));
                    continue;
                }
            },
            (None, _) => step.argv.clone(),
        };
        if argv.is_empty() || argv[0].is_empty() {
            out.push(violation(
                &format!("steps[{i}].argv"),
                "the program is missing",
            ));
            continue;
        }
        specs.push(StepSpec {
            argv,
            working_dir: step.working_dir.clone(),
        });
    }
    specs
}

impl AgentApi {
    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The task `id` names (its id, or a unique prefix of it among the tasks `p` may
    /// see; see `kiln_rpc::id_prefix`), if `p` may see it; else NOT_FOUND.
    async fn load_visible(&self, p: &Principal, id: &str) -> Result<StoredTask, Status> {
        require_id("task_id", id)?;
        let store = &self.shared.store;
        if let Some(t) = store.get(id).await? {
            return if can_read(p, &t.record.owner) {
                Ok(t)
            } else {
                Err(not_found(id))
            };
        }
        let Lookup::Prefix(prefix) = id_prefix::lookup("task_id", id)? else {
            return Err(not_found(id));
        };
        let matches = store
            .by_id_prefix(
                &prefix,
                owner_filter(p, None).as_deref(),
                id_prefix::FETCH_LIMIT,
            )
            .await?
            .into_iter()
            .filter(|t| can_read(p, &t.record.owner))
            .map(|t| (t.record.id.clone(), t))
            .collect();
        Ok(id_prefix::pick("task", "task_id", id, matches)?)
    }

    async fn start(&self, request: Request<pb::StartTaskRequest>) -> Result<StoredTask, Status> {
        let p = principal(&request)?;
        let subject_token = bearer(&request)?;
        let req = request.into_inner();
        let shared = self.shared().clone();
        let config = &shared.config;

        // Validate everything, answer once.
        let mut v = Vec::new();
        if req.prompt.trim().is_empty() || req.prompt.len() > MAX_PROMPT_BYTES {
            v.push(violation("prompt", "is required, at most 64 KiB"));
        }
        if !req.toolchain.is_empty() && toolchain::find(&req.toolchain).is_none() {
            v.push(violation(
                "toolchain",
                &format!(
                    "unknown toolchain {:?}; known: {}",
                    req.toolchain,
                    toolchain::names().join(", ")
                ),
            ));
        }
        let max_iterations = req.max_iterations.unwrap_or(DEFAULT_ITERATIONS);
        if max_iterations > MAX_ITERATIONS {
            v.push(violation(
                "max_iterations",
                &format!("at most {MAX_ITERATIONS}"),
            ));
        }
        let timeout = match &req.timeout {
            None => config.default_timeout,
            Some(d) => match duration(d) {
                Some(d) if !d.is_zero() && d <= config.max_timeout => d,
                _ => {
                    v.push(violation(
                        "timeout",
                        &format!(
                            "must be positive and at most {}",
                            workflow::humantime(config.max_timeout)
                        ),
                    ));
                    config.default_timeout
                }
            },
        };
        if req.request_id.len() > 128 {
            v.push(violation("request_id", "at most 128 bytes"));
        }
        if req.workspace_id.len() > 128 {
            v.push(violation("workspace_id", "at most 128 bytes"));
        }
        if req.model.len() > 256 {
            v.push(violation("model", "at most 256 bytes"));
        }
        check_labels(&req.labels, &mut v);
        let steps = request_steps(&req.steps, &mut v);
        if let Some(err) = ApiError::invalid_fields(v) {
            return Err(err.into());
        }

        // A retry of a request already taken.
        let hash = {
            let mut canonical = req.clone();
            canonical.labels.clear();
            kiln_rpc::idempotency::request_hash(&[&canonical.encode_to_vec()], &[&req.labels])
        };
        if !req.request_id.is_empty()
            && let Some(existing) = shared.store.by_request(&p.subject, &req.request_id).await?
        {
            return same_request(existing, &hash, &req.request_id);
        }
        // A cheap early answer; the insert below is what enforces the limit.
        if shared.store.count_unfinished(&p.subject).await? >= config.max_tasks_per_user as u64 {
            return Err(too_many_tasks(config.max_tasks_per_user));
        }

        // The provider must answer, and offer the model.
        let url = shared.provider.base_url().to_owned();
        let models = match tokio::time::timeout(
            Duration::from_secs(10),
            shared.provider.list_models(),
        )
        .await
        {
            Ok(Ok(models)) => models,
            Ok(Err(e)) => return Err(provider_error(&e, &url).into()),
            Err(_) => {
                return Err(ApiError::failed_precondition(
                    reason::PROVIDER_UNAVAILABLE,
                    format!(
                        "the LLM provider at {url} did not list its models within 10 s: {}",
                        kiln_llm::UNREACHABLE_HINT
                    ),
                )
                .into());
            }
        };
        let model = if !req.model.is_empty() {
            req.model.clone()
        } else if let Some(m) = &config.default_model {
            m.clone()
        } else {
            models.first().map(|m| m.id.clone()).ok_or_else(|| {
                Status::from(ApiError::failed_precondition(
                    reason::PROVIDER_UNAVAILABLE,
                    format!("the LLM provider at {url} offers no model"),
                ))
            })?
        };
        if !models.iter().any(|m| m.id == model) {
            let names: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
            return Err(ApiError::new(
                Code::NotFound,
                reason::MODEL_NOT_FOUND,
                format!(
                    "model {model:?} is not offered by {url} (it offers: {})",
                    names.join(", ")
                ),
            )
            .with_violation("model", "not offered by the provider")
            .into());
        }

        let user = Credential::new(subject_token.clone());
        // Fixed steps must pass the build policy now, not after the model has worked.
        if !steps.is_empty() {
            let policy = shared
                .build
                .get_policy(&user)
                .await
                .map_err(|s| relayed("reading kiln-build's policy", &s))?;
            let refused: Vec<FieldViolation> = steps
                .iter()
                .enumerate()
                .filter(|(_, s)| !policy.allowed_programs.contains(&s.argv[0]))
                .map(|(i, s)| {
                    violation(
                        &format!("steps[{i}].argv"),
                        &format!(
                            "{:?} is not on the build policy's allowlist of programs",
                            s.argv[0]
                        ),
                    )
                })
                .collect();
            if let Some(err) = ApiError::invalid_fields(refused) {
                return Err(err.into());
            }
        }

        // The workspace: the caller's (checked with the caller's own token) or a new one,
        // created in the caller's name while the caller is here.
        let task_id = uuid::Uuid::new_v4().to_string();
        let (workspace_id, created) = if req.workspace_id.is_empty() {
            let mut labels = HashMap::new();
            labels.insert(TASK_LABEL.to_owned(), task_id.clone());
            let ws = shared
                .build
                .create_workspace(
                    &user,
                    build_pb::CreateWorkspaceRequest {
                        request_id: String::new(),
                        files: Vec::new(),
                        labels,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|s| relayed("creating the task's workspace", &s))?;
            (ws.id, true)
        } else {
            // The id the build service answers with: the request may name the workspace.
            let ws = shared
                .build
                .get_workspace(&user, &req.workspace_id)
                .await
                .map_err(|s| relayed("workspace_id", &s))?;
            (ws.id, false)
        };
        let undo = |shared: Arc<Shared>, user: Credential, ws: String| async move {
            if created && let Err(status) = shared.build.delete_workspace(&user, &ws).await {
                tracing::warn!(
                    workspace = %ws,
                    %status,
                    "could not delete the workspace of a task that did not start"
                );
            }
        };

        // The delegation the task acts with from now on.
        let delegation = match shared
            .delegator
            .exchange(
                &subject_token,
                &task_id,
                &workspace_id,
                timeout + DELEGATION_MARGIN,
            )
            .await
        {
            Ok(d) => d,
            Err(status) => {
                undo(shared.clone(), user, workspace_id).await;
                return Err(relayed("delegating the task to the agent", &status));
            }
        };
        // The task lasts no longer than its delegation.
        let granted = delegation
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .saturating_sub(DELEGATION_MARGIN);
        let timeout = timeout.min(granted.max(Duration::from_secs(1)));

        let now = now_micros();
        let timeout_micros = i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX);
        let record = TaskRecord {
            id: task_id.clone(),
            owner: p.subject.clone(),
            owner_name: p.username.clone(),
            actor: delegation.actor.clone(),
            prompt: req.prompt.clone(),
            toolchain: req.toolchain.clone(),
            model,
            max_iterations,
            timeout_micros,
            max_tokens: req.max_tokens.unwrap_or(config.default_max_tokens),
            labels: req.labels.clone().into_iter().collect(),
            build_limits: req
                .build_limits
                .as_ref()
                .map(|l| l.encode_to_vec())
                .unwrap_or_default(),
            steps_fixed: !steps.is_empty(),
            steps,
            workspace_id: workspace_id.clone(),
            workspace_created: created,
            phase: pb::Phase::Queued as i32,
            iteration: 0,
            usage: Usage::default(),
            build_ids: Vec::new(),
            call_index: 0,
            created_at: now,
            updated_at: now,
            finished_at: None,
            deadline: now.saturating_add(timeout_micros),
            failure_message: String::new(),
            result_reason: String::new(),
            result_message: String::new(),
            plan: String::new(),
            files: Default::default(),
            pending: None,
            feedback: String::new(),
            last_error_signature: None,
            last_reply_signature: None,
            build: None,
        };
        let request_id = (!req.request_id.is_empty()).then_some(req.request_id.as_str());
        let inserted = shared
            .store
            .insert(
                &record,
                delegation.token.token(),
                request_id,
                Some(&hash),
                config.max_tasks_per_user as u64,
            )
            .await?;
        match inserted {
            Inserted::Yes => {}
            Inserted::OverLimit => {
                undo(shared.clone(), user, workspace_id).await;
                return Err(too_many_tasks(config.max_tasks_per_user));
            }
            Inserted::DuplicateRequest => {
                // A concurrent retry won the race: answer with its task.
                undo(shared.clone(), user, workspace_id).await;
                let existing = shared
                    .store
                    .by_request(&p.subject, &req.request_id)
                    .await?
                    .ok_or_else(|| {
                        ApiError::internal("idempotency", &"the winning task vanished")
                    })?;
                return same_request(existing, &hash, &req.request_id);
            }
        }
        tracing::info!(
            task = %task_id,
            owner = %p.username,
            actor = %record.actor,
            workspace = %workspace_id,
            model = %record.model,
            "task started: agent on behalf of {}",
            p.username
        );
        let stored = StoredTask {
            record,
            last_sequence: 0,
            relayed_build_sequence: 0,
            delegated_token: delegation.token.token().to_owned(),
            request_hash: Some(hash),
        };
        // Claimed here at once when there is room; otherwise (or if a replica looking
        // for unowned tasks found it first) it stays QUEUED for whoever has room.
        match shared.control.claim_new(&task_id).await {
            Ok(Some(claim)) => workflow::spawn(&shared, stored.clone(), claim),
            Ok(None) => tracing::info!(task = %task_id, "task left for another replica to run"),
            Err(e) => {
                tracing::warn!(task = %task_id, error = %e, "could not claim the new task; a replica looking for unowned tasks takes it")
            }
        }
        Ok(stored)
    }

    fn watch(&self, id: String, after: u64) -> Stream<pb::TaskEvent> {
        kiln_eventlog::watch(
            self.shared.store.clone(),
            self.shared.logs.clone(),
            id,
            after,
            self.shared.config.heartbeat,
        )
        .map(|r| r.map_err(Status::from))
        .boxed()
    }
}

fn too_many_tasks(max: usize) -> Status {
    ApiError::new(
        Code::ResourceExhausted,
        reason::TOO_MANY_TASKS,
        format!(
            "you have {max} unfinished tasks, the most allowed; wait for one to end or cancel one"
        ),
    )
    .with_retry_after(Duration::from_secs(30))
    .into()
}

fn same_request(existing: StoredTask, hash: &str, request_id: &str) -> Result<StoredTask, Status> {
    if existing.request_hash.as_deref() == Some(hash) {
        Ok(existing)
    } else {
        Err(ApiError::new(
            Code::AlreadyExists,
            kiln_rpc::error::reason::ALREADY_EXISTS,
            format!(
                "request_id {request_id:?} was used for a different task ({})",
                existing.record.id
            ),
        )
        .into())
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type RunTaskStream = Stream<pb::TaskEvent>;
    type WatchTaskStream = Stream<pb::TaskEvent>;

    async fn start_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let stored = self.start(request).await?;
        Ok(Response::new(stored.record.to_proto(stored.last_sequence)))
    }

    async fn run_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<Self::RunTaskStream>, Status> {
        let stored = self.start(request).await?;
        let mut response = Response::new(self.watch(stored.record.id.clone(), 0));
        // The task id before any event, so a client whose stream breaks can WatchTask.
        if let Ok(value) = stored.record.id.parse() {
            response.metadata_mut().insert("kiln-task-id", value);
        }
        Ok(response)
    }

    async fn watch_task(
        &self,
        request: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let p = principal(&request)?;
        let req = request.into_inner();
        let task = self.load_visible(&p, &req.task_id).await?;
        Ok(Response::new(
            self.watch(task.record.id, req.after_sequence),
        ))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let p = principal(&request)?;
        let task = self.load_visible(&p, &request.get_ref().task_id).await?;
        Ok(Response::new(task.record.to_proto(task.last_sequence)))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let p = principal(&request)?;
        let req = request.into_inner();
        let limit = match req.page_size {
            s if s < 0 => {
                return Err(ApiError::invalid_field("page_size", "must not be negative").into());
            }
            0 => 100,
            s => i64::from(s).min(1000),
        };
        let before = if req.page_token.is_empty() {
            None
        } else {
            let parsed = req
                .page_token
                .split_once('.')
                .and_then(|(t, id)| Some((t.parse::<i64>().ok()?, id.to_owned())));
            Some(parsed.ok_or_else(|| {
                Status::from(ApiError::invalid_field(
                    "page_token",
                    "is not a token this server issued",
                ))
            })?)
        };
        let filter = ListFilter {
            owner: owner_filter(&p, req.owner),
            workspace_id: req.workspace_id,
            phases: req.phases,
            labels: req.labels.into_iter().collect(),
            before,
            limit: limit + 1,
        };
        let mut rows = self.shared.store.list(&filter).await?;
        let next_page_token = if rows.len() as i64 > limit {
            rows.truncate(usize::try_from(limit).unwrap_or(0));
            rows.last()
                .map(|t| format!("{}.{}", t.record.created_at, t.record.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTasksResponse {
            tasks: rows
                .iter()
                .map(|t| t.record.to_proto(t.last_sequence))
                .collect(),
            next_page_token,
        }))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        let p = principal(&request)?;
        let task = self.load_visible(&p, &request.into_inner().task_id).await?;
        // The whole id from here on: the request may have named the task by a prefix.
        let id = task.record.id.clone();
        if !can_write(&p, &task.record.owner) {
            return Err(not_found(&id));
        }
        if task.record.is_final() {
            return Ok(Response::new(pb::CancelTaskResponse {
                task: Some(task.record.to_proto(task.last_sequence)),
            }));
        }
        // Reaches the runner wherever it runs (or whoever claims the task next).
        let signalled = self.shared.control.cancel(&id).await?;
        tracing::info!(task = %id, by = %p.username, "cancel requested");
        // The runner ends the task (aborting the model call, cancelling the build); wait
        // for it briefly so the answer usually shows CANCELLED.
        let mut task = task;
        if signalled {
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < until {
                if let Some(t) = self.shared.store.get(&id).await? {
                    task = t;
                    if task.record.is_final() {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(Response::new(pb::CancelTaskResponse {
            task: Some(task.record.to_proto(task.last_sequence)),
        }))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let provider = &self.shared.provider;
        let url = provider.base_url().to_owned();
        let mut models = provider
            .list_models()
            .await
            .map_err(|e| Status::from(provider_error(&e, &url)))?;
        models.sort_by(|a, b| a.id.cmp(&b.id));
        let default_model = self
            .shared
            .config
            .default_model
            .clone()
            .or_else(|| models.first().map(|m| m.id.clone()))
            .unwrap_or_default();
        let kind = match self.shared.config.provider.kind {
            kiln_llm::ProviderKind::Openai => pb::ProviderKind::OpenaiCompatible,
            kiln_llm::ProviderKind::Ollama => pb::ProviderKind::Ollama,
        };
        Ok(Response::new(pb::ListModelsResponse {
            models: models
                .into_iter()
                .map(|m| pb::Model {
                    name: m.id,
                    size_bytes: m.size_bytes,
                    context_tokens: None,
                    modified_at: None,
                })
                .collect(),
            provider: kind as i32,
            provider_url: url,
            default_model,
        }))
    }
}
