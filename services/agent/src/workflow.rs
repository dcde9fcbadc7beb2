//! The task state machine and the runner that drives it.
//!
//! ```text
//! QUEUED → ANALYZE → PLAN → GENERATE → VALIDATE → BUILD → DONE
//!                                        ↑   │       │
//!                                        │   ↓       ↓
//!                                        └─ FIX ←────┘        (any) → FAILED | CANCELLED
//! ```
//!
//! Each step reads the task's record, does its work (a model call, the guardrail, a
//! build) and ends in a transition: the new record and the events that go with it,
//! persisted in one transaction before anything is published. A restart therefore finds
//! every unfinished task at the start of its last step and runs that step again: a model
//! call is redone, VALIDATE re-checks the stored reply, a build in flight is followed
//! again by id (its events relayed from where the log stopped), a build that a restart
//! of kiln-build interrupted is started again.
//!
//! Every step runs under the task's four stops: CancelTask, the time budget, the service
//! shutting down, and the loss of the task's claim ([`crate::control`]). The first two
//! end the task (the model call's HTTP request is dropped, a running build is
//! cancelled); a shutdown or a lost claim leaves it as persisted, for whichever process
//! claims it next to continue. Appends are spawned, so a stop never cuts one in half,
//! and the runner waits for the one in flight before it lets the claim go.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

use futures::StreamExt as _;
use kiln_llm::{ChatEvent, ChatRequest, Message, OutputFormat, Provider};
use kiln_proto::agent as pb;
use kiln_proto::build as build_pb;
use pb::task_event::Event;
use tokio::sync::{Semaphore, watch};

use crate::clients::{BuildClient, Credential, Delegator};
use crate::config::AgentConfig;
use crate::control::{Claim, Signal, TaskControl};
use crate::diagnose;
use crate::guard;
use crate::metrics::{AgentMetrics, CallOutcome, CallTimer};
use crate::prompt::{self, ReplyForm};
use crate::reply;
use crate::store::{Store, StoredTask, TaskUpdate};
use crate::task::{CurrentBuild, PendingReply, StepSpec, TaskRecord, now_micros, timestamp};
use crate::toolchain;

/// The in-memory log of one unfinished task.
pub type LiveLog = kiln_eventlog::LiveLog<Store>;
/// The live logs of unfinished tasks, by task id.
pub type Logs = kiln_eventlog::Logs<Store>;

/// Stable reasons of a TaskResult.
pub mod result_reason {
    pub const MAX_ITERATIONS: &str = "MAX_ITERATIONS";
    pub const STUCK: &str = "STUCK";
    pub const BUDGET_EXHAUSTED: &str = "BUDGET_EXHAUSTED";
    pub const TIMED_OUT: &str = "TIMED_OUT";
    pub const BLOCKING_FINDING: &str = "BLOCKING_FINDING";
    pub const PROVIDER_ERROR: &str = "PROVIDER_ERROR";
    pub const BUILD_ERROR: &str = "BUILD_ERROR";
    pub const CANCELLED: &str = "CANCELLED";
    pub const INTERNAL: &str = "INTERNAL";
}

/// The label every build of a task carries: `kiln build list --label kiln.dev/task=ID`.
pub const TASK_LABEL: &str = "kiln.dev/task";

/// What the runners share.
pub struct Shared {
    pub config: AgentConfig,
    pub store: Store,
    pub logs: Arc<Logs>,
    pub provider: Arc<dyn Provider>,
    pub reply_form: ReplyForm,
    pub build: Arc<dyn BuildClient>,
    pub delegator: Arc<dyn Delegator>,
    /// Tasks running at once (the rest wait in QUEUED).
    pub slots: Arc<Semaphore>,
    /// Who runs which task; how CancelTask reaches a runner.
    pub control: Arc<dyn TaskControl>,
    /// The service is stopping: runners leave their tasks as persisted.
    pub stopping: watch::Sender<bool>,
    pub runners: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub(crate) metrics: AgentMetrics,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("provider", &self.provider.base_url())
            .field("reply_form", &self.reply_form)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the runner of a task this process claimed (new, or found unowned), from its
/// stored state read after the claim.
pub fn spawn(shared: &Arc<Shared>, stored: StoredTask, claim: Claim) {
    let id = stored.record.id.clone();
    let log = LiveLog::new(
        &id,
        stored.last_sequence,
        (),
        shared.config.live_window_bytes,
    );
    shared.logs.insert(log.clone());
    shared.metrics.task_opened(stored.record.phase());
    let runner = Runner {
        shared: shared.clone(),
        log,
        token: Credential::new(stored.delegated_token),
        relayed: stored.relayed_build_sequence,
        rec: stored.record,
        carry: None,
        signal: claim.signal,
        appending: Arc::new(tokio::sync::Mutex::new(())),
    };
    // A span of the StartTask call's trace (when there is one: a task resumed at start
    // has none), so its phases and its calls to kiln-build join that trace.
    // When the trace is not recorded, `carry` keeps the task (which leaves the call's
    // task) out of it too, its calls flagged not sampled.
    let span = tracing::info_span!("agent.task", task_id = %id);
    let trace = kiln_telemetry::TraceParent::current();
    trace.adopt(&span);
    let handle = tokio::spawn(trace.carry(runner.run()).instrument(span));
    let mut runners = lock(&shared.runners);
    runners.retain(|h| !h.is_finished());
    runners.push(handle);
}

/// Why a step did not reach its transition.
#[derive(Debug)]
enum Stop {
    Cancelled,
    TimedOut,
    Shutdown,
    /// Another process may hold the task now: write nothing more.
    Lost,
    /// The task cannot go on: FAILED with this reason and message.
    Fail(&'static str, String),
}

type StepResult = Result<(), Stop>;

struct Runner {
    shared: Arc<Shared>,
    log: Arc<LiveLog>,
    rec: TaskRecord,
    token: Credential,
    /// The last event of the current build already relayed into the task's log.
    relayed: u64,
    /// A record change that the next relayed events carry into the store.
    carry: Option<TaskUpdate>,
    /// Cancels and the loss of the claim, from [`TaskControl`].
    signal: watch::Receiver<Signal>,
    /// Held by the append in flight (which runs on even if the step is stopped).
    appending: Arc<tokio::sync::Mutex<()>>,
}

async fn until_true(rx: &mut watch::Receiver<bool>) {
    // A dropped sender never says true: wait forever then.
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Waits until the control cancels the task or takes it away.
async fn signalled(rx: &mut watch::Receiver<Signal>) -> Stop {
    match rx.wait_for(|s| *s != Signal::Run).await.map(|s| *s) {
        Ok(Signal::Cancel) => Stop::Cancelled,
        Ok(_) => Stop::Lost,
        // The control dropped the switch: this process no longer holds the task.
        Err(_) => Stop::Lost,
    }
}

fn phase_name(p: pb::Phase) -> &'static str {
    p.as_str_name().trim_start_matches("PHASE_")
}

impl Runner {
    async fn run(mut self) {
        let id = self.rec.id.clone();
        let result = self.drive().await;
        let finished = match result {
            Ok(()) => true,
            Err(Stop::Shutdown | Stop::Lost) => false,
            Err(stop) => {
                if matches!(stop, Stop::Cancelled | Stop::TimedOut) {
                    self.stop_build().await;
                }
                let (phase, reason, message) = match stop {
                    Stop::Cancelled => (
                        pb::Phase::Cancelled,
                        result_reason::CANCELLED,
                        "cancelled by the user".to_owned(),
                    ),
                    Stop::TimedOut => (
                        pb::Phase::Failed,
                        result_reason::TIMED_OUT,
                        format!(
                            "the task's time budget of {} ran out",
                            humantime(self.rec.timeout())
                        ),
                    ),
                    Stop::Fail(reason, message) => (pb::Phase::Failed, reason, message),
                    Stop::Shutdown | Stop::Lost => unreachable!("handled above"),
                };
                match self.finish(phase, reason, message).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!(task = %id, error = ?e, "could not record the end of a task");
                        false
                    }
                }
            }
        };
        // A stopped step's append may still be running: the next holder must find it
        // committed, or it would number its own events the same.
        drop(self.appending.lock().await);
        // Watchers holding the live log finish from it; new ones read the store.
        self.shared.logs.remove(&id);
        if !finished {
            self.shared.metrics.task_left(self.rec.phase());
            tracing::info!(task = %id, "task left as persisted; whoever claims it next continues it");
        }
        if let Err(e) = self.shared.control.release(&id, finished).await {
            tracing::warn!(task = %id, error = %e, "could not let go of the task's claim; it lapses with its lease");
        }
    }

    /// Runs steps until the task is final; a stop ends it early.
    async fn drive(&mut self) -> StepResult {
        let mut signal = self.signal.clone();
        let mut stopping = self.shared.stopping.subscribe();
        let slots = self.shared.slots.clone();
        let deadline = self.deadline();
        // A slot first (QUEUED until then), under the same stops as any step.
        let _permit = tokio::select! {
            p = slots.acquire_owned() => p.map_err(|_| Stop::Shutdown)?,
            stop = signalled(&mut signal) => return Err(stop),
            () = tokio::time::sleep_until(deadline) => return Err(Stop::TimedOut),
            () = until_true(&mut stopping) => return Err(Stop::Shutdown),
        };
        while !self.rec.is_final() {
            tokio::select! {
                r = self.step() => r?,
                stop = signalled(&mut signal) => return Err(stop),
                () = tokio::time::sleep_until(deadline) => return Err(Stop::TimedOut),
                () = until_true(&mut stopping) => return Err(Stop::Shutdown),
            }
        }
        Ok(())
    }

    fn deadline(&self) -> tokio::time::Instant {
        let left = u64::try_from(self.rec.deadline - now_micros()).unwrap_or(0);
        tokio::time::Instant::now() + Duration::from_micros(left)
    }

    async fn step(&mut self) -> StepResult {
        let phase = self.rec.phase();
        let span = tracing::info_span!("agent.phase", phase = phase.as_str_name());
        self.run_phase(phase).instrument(span).await
    }

    async fn run_phase(&mut self, phase: pb::Phase) -> StepResult {
        match phase {
            pb::Phase::Queued | pb::Phase::Unspecified => {
                self.transition(pb::Phase::Analyze, String::new(), Vec::new(), |_| {})
                    .await
            }
            pb::Phase::Analyze => self.analyze().await,
            pb::Phase::Plan => self.plan().await,
            pb::Phase::Generate => self.generate(false).await,
            pb::Phase::Fix => self.generate(true).await,
            pb::Phase::Validate => self.validate().await,
            pb::Phase::Build => self.build().await,
            pb::Phase::Done | pb::Phase::Failed | pb::Phase::Cancelled => Ok(()),
        }
    }

    /// Appends events (and the row update) to the task's log. Spawned, so that a stop
    /// arriving meanwhile cannot leave an append half done.
    async fn append(&self, events: Vec<Event>, update: TaskUpdate) -> StepResult {
        let log = self.log.clone();
        let store = self.shared.store.clone();
        let time = Some(timestamp(now_micros()));
        let events = events
            .into_iter()
            .map(|e| pb::TaskEvent {
                sequence: 0,
                time,
                event: Some(e),
            })
            .collect();
        let appending = self.appending.clone().lock_owned().await;
        let appended = tokio::spawn(async move {
            let _appending = appending;
            log.append(&store, events, update).await
        })
        .await;
        match appended {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(task = %self.rec.id, error = ?e, "task store append failed");
                Err(Stop::Shutdown)
            }
            Err(e) => {
                tracing::error!(task = %self.rec.id, error = ?e, "task store append panicked");
                Err(Stop::Shutdown)
            }
        }
    }

    /// Moves to `phase`: `change` edits the record, `events` go before the PhaseChanged.
    async fn transition(
        &mut self,
        phase: pb::Phase,
        message: String,
        events: Vec<Event>,
        change: impl FnOnce(&mut TaskRecord),
    ) -> StepResult {
        self.transition_then(phase, message, events, Vec::new(), change)
            .await
    }

    /// [`transition`](Self::transition) with `after` following the PhaseChanged, all in
    /// one transaction.
    async fn transition_then(
        &mut self,
        phase: pb::Phase,
        message: String,
        mut events: Vec<Event>,
        after: Vec<Event>,
        change: impl FnOnce(&mut TaskRecord),
    ) -> StepResult {
        let previous = self.rec.phase();
        let mut next = self.rec.clone();
        change(&mut next);
        next.phase = phase as i32;
        next.updated_at = now_micros();
        tracing::info!(
            task = %next.id,
            owner = %next.owner_name,
            from = phase_name(previous),
            to = phase_name(phase),
            iteration = next.iteration,
            "{message}"
        );
        events.push(Event::PhaseChanged(pb::PhaseChanged {
            previous_phase: previous as i32,
            phase: phase as i32,
            iteration: next.iteration,
            message,
        }));
        events.extend(after);
        let update = TaskUpdate {
            record: Some(Box::new(next.clone())),
            relayed_build_sequence: Some(self.relayed),
        };
        // The gauge follows `self.rec`: a runner that stops after this point leaves the
        // task in `phase` (see `run`).
        self.shared.metrics.phase_changed(previous, phase);
        self.rec = next;
        self.append(events, update).await
    }

    /// Ends the task: the final PhaseChanged and the TaskResult (always the last event).
    async fn finish(&mut self, phase: pb::Phase, reason: &str, message: String) -> StepResult {
        let reason = if phase == pb::Phase::Done { "" } else { reason }.to_owned();
        let mut result = self.rec.result();
        result.phase = phase as i32;
        result.reason = reason.clone();
        result.message = message.clone();
        let after = vec![Event::Result(result)];
        let failure = (phase != pb::Phase::Done).then(|| message.clone());
        let counted_reason = reason.clone();
        self.transition_then(phase, message.clone(), Vec::new(), after, move |r| {
            r.finished_at = Some(now_micros());
            r.result_reason = reason;
            r.result_message = message;
            r.pending = None;
            if let Some(failure) = failure {
                r.failure_message = failure;
            }
        })
        .await?;
        // Counted once it is persisted: a restart before that finishes the task again.
        self.shared
            .metrics
            .task_finished(phase, &counted_reason, self.rec.iteration);
        Ok(())
    }

    async fn fail(&mut self, reason: &'static str, message: String) -> StepResult {
        Err(Stop::Fail(reason, message))
    }

    /// Cancels the build in flight, if any (cancel or time budget ran out).
    async fn stop_build(&self) {
        if self.rec.phase() != pb::Phase::Build {
            return;
        }
        if let Some(build) = &self.rec.build {
            let call = self.shared.build.cancel_build(&self.token, &build.build_id);
            match tokio::time::timeout(Duration::from_secs(5), call).await {
                Ok(Ok(())) => {}
                Ok(Err(status)) => {
                    tracing::warn!(task = %self.rec.id, build = %build.build_id, %status, "could not cancel the task's build")
                }
                Err(_) => {
                    tracing::warn!(task = %self.rec.id, "cancelling the task's build timed out")
                }
            }
        }
    }

    // ---- ANALYZE -------------------------------------------------------------------

    async fn analyze(&mut self) -> StepResult {
        let mut files = self.rec.files.clone();
        let mut skipped = 0;
        if !self.rec.workspace_created && files.is_empty() {
            let listing = self
                .with_retries("listing the workspace's files", |b, c, r| {
                    b.list_files(c, &r.workspace_id)
                })
                .await?;
            let limits = guard::Limits::default();
            let mut total = 0usize;
            for info in listing {
                let path = info.path;
                let ignored = path.split('/').any(|s| s.starts_with('.') && s.len() > 1);
                if info.file_type != build_pb::FileType::Regular as i32
                    || ignored
                    || info.size_bytes > limits.max_file_bytes as u64
                    || files.len() >= limits.max_files
                    || total + info.size_bytes as usize > limits.max_total_bytes
                {
                    skipped += 1;
                    continue;
                }
                let bytes = self
                    .with_retries("reading a workspace file", |b, c, r| {
                        b.read_file(c, &r.workspace_id, &path, limits.max_file_bytes as u64)
                    })
                    .await?;
                match String::from_utf8(bytes) {
                    Ok(text) if !text.contains('\0') => {
                        total += text.len();
                        files.insert(path, text);
                    }
                    _ => skipped += 1,
                }
            }
        }
        let paths: Vec<String> = files.keys().cloned().collect();
        let toolchain = if self.rec.toolchain.is_empty() {
            toolchain::guess(&self.rec.prompt, &paths).name.to_owned()
        } else {
            self.rec.toolchain.clone()
        };
        let steps = if self.rec.steps_fixed || !self.rec.steps.is_empty() {
            self.rec.steps.clone()
        } else {
            toolchain::find(&toolchain)
                .map(|t| t.default_steps())
                .unwrap_or_default()
        };
        let mut message = format!(
            "toolchain {toolchain}; {} file{} in the workspace",
            files.len(),
            if files.len() == 1 { "" } else { "s" }
        );
        if skipped > 0 {
            message.push_str(&format!(
                " ({skipped} not shown to the model: binary, hidden or too large)"
            ));
        }
        message.push_str(&format!(
            "; steps: {}",
            steps
                .iter()
                .map(StepSpec::display)
                .collect::<Vec<_>>()
                .join(" && ")
        ));
        self.transition(pb::Phase::Plan, message, Vec::new(), move |r| {
            r.files = files;
            r.toolchain = toolchain;
            r.steps = steps;
        })
        .await
    }

    // ---- PLAN ----------------------------------------------------------------------

    async fn plan(&mut self) -> StepResult {
        let messages = prompt::plan(&self.rec);
        let output = self
            .shared
            .provider
            .supports(&OutputFormat::JsonSchema(serde_json::Value::Null))
            .then(|| OutputFormat::JsonSchema(prompt::plan_schema()));
        let text = self
            .call_model(pb::Phase::Plan, messages, output, Some(384))
            .await?;
        let plan = parse_plan(&text);
        let message = if plan.is_empty() {
            "no usable plan in the answer; writing the files without one".to_owned()
        } else {
            plan.clone()
        };
        self.transition(pb::Phase::Generate, message, Vec::new(), move |r| {
            r.plan = plan
        })
        .await
    }

    // ---- GENERATE / FIX --------------------------------------------------------------

    fn toolchain(&self) -> &'static toolchain::Toolchain {
        toolchain::find(&self.rec.toolchain).unwrap_or(&toolchain::TOOLCHAINS[0])
    }

    async fn generate(&mut self, fixing: bool) -> StepResult {
        let form = self.shared.reply_form;
        let (phase, messages) = if fixing {
            (
                pb::Phase::Fix,
                prompt::fix(&self.rec, self.toolchain(), form),
            )
        } else {
            (
                pb::Phase::Generate,
                prompt::generate(&self.rec, self.toolchain(), form),
            )
        };
        let raw = self
            .call_model(phase, messages, form.output(), None)
            .await?;
        let parsed = reply::parse(&raw);
        let signature = reply_signature(&parsed);
        if fixing
            && parsed.is_usable()
            && self.rec.last_reply_signature.as_ref() == Some(&signature)
        {
            return self
                .fail(
                    result_reason::STUCK,
                    "stuck: the model returned the same files as in its last answer".to_owned(),
                )
                .await;
        }
        let message = format!(
            "{} file{} in the answer ({:?} form)",
            parsed.files.len(),
            if parsed.files.len() == 1 { "" } else { "s" },
            parsed.format
        );
        self.transition(pb::Phase::Validate, message, Vec::new(), move |r| {
            r.pending = Some(PendingReply { raw });
            r.last_reply_signature = Some(signature);
        })
        .await
    }

    /// One model call, its output streamed into the log, its usage counted.
    async fn call_model(
        &mut self,
        phase: pb::Phase,
        messages: Vec<Message>,
        output: Option<OutputFormat>,
        max_tokens: Option<u32>,
    ) -> Result<String, Stop> {
        let config = &self.shared.config;
        let mut limit = max_tokens.unwrap_or(config.max_tokens_per_call);
        if self.rec.max_tokens > 0 {
            let left = self.rec.max_tokens.saturating_sub(self.rec.usage.total());
            if left == 0 {
                return Err(Stop::Fail(
                    result_reason::BUDGET_EXHAUSTED,
                    format!(
                        "the token budget of {} is used up ({} tokens)",
                        self.rec.max_tokens,
                        self.rec.usage.total()
                    ),
                ));
            }
            limit = limit.min(u32::try_from(left).unwrap_or(u32::MAX));
        }
        let call_index = self.rec.call_index;
        let mut request = ChatRequest::new(self.rec.model.clone(), messages);
        request.temperature = Some(config.temperature);
        request.max_tokens = Some(limit);
        request.output = output;
        let started = Instant::now();
        let shared = self.shared.clone();
        let mut timer = CallTimer::start(&shared.metrics, phase);
        let mut stream = self.shared.provider.chat(request);
        let mut text = String::new();
        let mut pending = String::new();
        let mut last_flush = Instant::now();
        let mut usage = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(ChatEvent::Delta(delta)) => {
                    text.push_str(&delta);
                    pending.push_str(&delta);
                    // Batched: an event per token would make the log mostly overhead.
                    if pending.len() >= 512 || last_flush.elapsed() >= Duration::from_millis(100) {
                        self.flush_output(phase, call_index, &mut pending).await?;
                        last_flush = Instant::now();
                    }
                }
                Ok(ChatEvent::Finished { usage: u, .. }) => usage = u,
                Err(e) => {
                    timer.finish(CallOutcome::Error);
                    self.flush_output(phase, call_index, &mut pending).await?;
                    return Err(Stop::Fail(
                        result_reason::PROVIDER_ERROR,
                        format!("the model call failed: {e}"),
                    ));
                }
            }
        }
        timer.finish(CallOutcome::Ok);
        drop(timer);
        self.flush_output(phase, call_index, &mut pending).await?;
        let call = usage.unwrap_or_default();
        self.shared
            .metrics
            .tokens(call.prompt_tokens, call.completion_tokens);
        let mut next = self.rec.clone();
        next.call_index += 1;
        next.usage.prompt_tokens += call.prompt_tokens;
        next.usage.completion_tokens += call.completion_tokens;
        next.usage.model_calls += 1;
        next.updated_at = now_micros();
        let event = Event::Usage(pb::ModelUsage {
            phase: phase as i32,
            call_index,
            call: Some(pb::Usage {
                prompt_tokens: call.prompt_tokens,
                completion_tokens: call.completion_tokens,
                model_calls: 1,
            }),
            total: Some(next.usage.to_proto()),
            duration: Some(crate::task::proto_duration(started.elapsed())),
        });
        let update = TaskUpdate {
            record: Some(Box::new(next.clone())),
            relayed_build_sequence: None,
        };
        self.rec = next;
        self.append(vec![event], update).await?;
        Ok(text)
    }

    async fn flush_output(
        &self,
        phase: pb::Phase,
        call_index: u32,
        pending: &mut String,
    ) -> StepResult {
        if pending.is_empty() {
            return Ok(());
        }
        let mut events = Vec::new();
        let text = std::mem::take(pending);
        // Deltas are at most 32 KiB (the contract), cut at character boundaries.
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let mut end = rest.len().min(32 * 1024);
            while !rest.is_char_boundary(end) {
                end -= 1;
            }
            events.push(Event::ModelOutput(pb::ModelOutput {
                phase: phase as i32,
                call_index,
                delta: rest[..end].to_owned(),
            }));
            rest = &rest[end..];
        }
        self.append(events, TaskUpdate::default()).await
    }

    // ---- VALIDATE --------------------------------------------------------------------

    async fn validate(&mut self) -> StepResult {
        let raw = self
            .rec
            .pending
            .as_ref()
            .map(|p| p.raw.clone())
            .unwrap_or_default();
        let parsed = reply::parse(&raw);
        let verdict = guard::check(&parsed, &guard::Limits::default());
        let mut findings: Vec<pb::Finding> = verdict.findings.iter().map(finding_proto).collect();
        let mut steps = None;
        if !verdict.commands.is_empty() {
            if self.rec.steps_fixed {
                findings.push(pb::Finding {
                    severity: pb::Severity::Info as i32,
                    rule: "COMMANDS_IGNORED".to_owned(),
                    path: guard::COMMANDS_PATH.to_owned(),
                    line: None,
                    message: "the task's steps are fixed; the proposed commands are not used"
                        .to_owned(),
                });
            } else {
                let policy = self
                    .with_retries("reading the build policy", |b, c, _| b.get_policy(c))
                    .await?;
                let (checked, refused) =
                    check_commands(&verdict.commands, &policy.allowed_programs);
                if refused.is_empty() {
                    steps = Some(checked);
                }
                findings.extend(refused);
            }
        }
        findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
        let blocked = findings
            .iter()
            .any(|f| f.severity == pb::Severity::Error as i32);
        let mut events = Vec::new();
        if !findings.is_empty() {
            events.push(Event::Findings(pb::Findings {
                findings: findings.clone(),
                iteration: self.rec.iteration,
            }));
        }
        if blocked {
            let feedback = findings_feedback(&findings);
            let signature = format!("findings:{feedback}");
            if self.rec.last_error_signature.as_deref() == Some(signature.as_str()) {
                self.append(events, TaskUpdate::default()).await?;
                return self
                    .fail(
                        result_reason::STUCK,
                        format!(
                            "stuck: the same blocking findings twice: {}",
                            first_line(&feedback)
                        ),
                    )
                    .await;
            }
            if self.rec.iteration >= self.rec.max_iterations {
                self.append(events, TaskUpdate::default()).await?;
                return self
                    .fail(
                        result_reason::BLOCKING_FINDING,
                        format!("the model's files were refused: {}", first_line(&feedback)),
                    )
                    .await;
            }
            let message = format!("the answer was refused: {}", first_line(&feedback));
            return self
                .transition(pb::Phase::Fix, message, events, move |r| {
                    r.iteration += 1;
                    r.feedback = feedback;
                    r.last_error_signature = Some(signature);
                    r.pending = None;
                })
                .await;
        }
        // Write the files (one atomic change in kiln-build).
        let mut written = Vec::new();
        let mut files = Vec::new();
        for edit in &parsed.files {
            let before = self.rec.files.get(&edit.path);
            let (added, removed) =
                line_diff(before.map(String::as_str).unwrap_or(""), &edit.content);
            written.push(pb::WrittenFile {
                path: edit.path.clone(),
                size_bytes: edit.content.len() as u64,
                deleted: false,
                lines_added: added,
                lines_removed: removed,
                created: before.is_none(),
            });
            files.push(build_pb::File {
                path: edit.path.clone(),
                content: edit.content.clone().into_bytes().into(),
                executable: false,
            });
        }
        written.sort_by(|a, b| a.path.cmp(&b.path));
        let delete_paths = if parsed.files.iter().any(|f| f.path.ends_with(".py")) {
            self.stale_bytecode().await?
        } else {
            Vec::new()
        };
        let request = build_pb::WriteFilesRequest {
            workspace_id: self.rec.workspace_id.clone(),
            files,
            delete_paths,
        };
        self.with_retries("writing the files", |b, c, _| {
            b.write_files(c, request.clone())
        })
        .await?;
        events.push(Event::FilesWritten(pb::FilesWritten { files: written }));
        let message = format!(
            "{} file{} written",
            parsed.files.len(),
            if parsed.files.len() == 1 { "" } else { "s" }
        );
        self.relayed = 0;
        self.transition(pb::Phase::Build, message, events, move |r| {
            for edit in parsed.files {
                r.files.insert(edit.path, edit.content);
            }
            if let Some(steps) = steps {
                r.steps = steps;
            }
            r.pending = None;
            r.build = None;
        })
        .await
    }

    /// The workspace's `__pycache__` directories. Python trusts a `.pyc` whose source has
    /// the same size and modification second, and a fix is often both (`a - b` → `a + b`
    /// within a second of the last build): the old bytecode would run. They are deleted
    /// in the same change that writes the new sources.
    async fn stale_bytecode(&self) -> Result<Vec<String>, Stop> {
        let listing = self
            .with_retries("listing the workspace's files", |b, c, r| {
                b.list_files(c, &r.workspace_id)
            })
            .await?;
        let mut dirs: Vec<String> = listing
            .iter()
            .filter_map(|f| {
                let at = f.path.find("__pycache__/")?;
                Some(f.path[..at + "__pycache__".len()].to_owned())
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        Ok(dirs)
    }

    // ---- BUILD -----------------------------------------------------------------------

    async fn build(&mut self) -> StepResult {
        let build_id = match &self.rec.build {
            Some(b) => b.build_id.clone(),
            None => self.start_build(0).await?,
        };
        let outcome = self.follow_build(&build_id).await?;
        match outcome.state {
            build_pb::BuildState::Succeeded => {
                let message = format!(
                    "the build is green after {} fix iteration{}",
                    self.rec.iteration,
                    if self.rec.iteration == 1 { "" } else { "s" }
                );
                self.finish(pb::Phase::Done, "", message).await
            }
            build_pb::BuildState::Interrupted => {
                // kiln-build restarted under the build: run it again, a few times.
                let attempt = self.rec.build.as_ref().map_or(0, |b| b.attempt) + 1;
                if attempt >= 3 {
                    return self
                        .fail(
                            result_reason::BUILD_ERROR,
                            format!("build {build_id} was interrupted {attempt} times"),
                        )
                        .await;
                }
                self.relayed = 0;
                self.start_build(attempt).await.map(|_| ())
            }
            build_pb::BuildState::Cancelled => {
                self.fail(
                    result_reason::BUILD_ERROR,
                    format!("build {build_id} was cancelled outside the task"),
                )
                .await
            }
            _ => self.build_failed(&build_id, outcome).await,
        }
    }

    async fn start_build(&mut self, attempt: u32) -> Result<String, Stop> {
        let mut labels = HashMap::new();
        labels.insert(TASK_LABEL.to_owned(), self.rec.id.clone());
        let request = build_pb::StartBuildRequest {
            // Idempotent: a restart before the build id was persisted gets the same build.
            request_id: format!("{}-{}-{attempt}", self.rec.id, self.rec.iteration),
            workspace_id: self.rec.workspace_id.clone(),
            steps: self.rec.steps.iter().map(StepSpec::to_proto).collect(),
            env: HashMap::new(),
            limits: self.rec.limits(),
            labels,
        };
        let build = self
            .with_retries("starting a build", |b, c, _| {
                b.start_build(c, request.clone())
            })
            .await?;
        let id = build.id.clone();
        let mut next = self.rec.clone();
        next.build = Some(CurrentBuild {
            build_id: id.clone(),
            attempt,
        });
        if !next.build_ids.contains(&id) {
            next.build_ids.push(id.clone());
        }
        next.updated_at = now_micros();
        self.relayed = 0;
        let update = TaskUpdate {
            record: Some(Box::new(next.clone())),
            relayed_build_sequence: Some(0),
        };
        self.rec = next;
        // The first relayed event carries the record with the build id (one transaction);
        // until then a restart gets the same build back from the request id.
        self.carry = Some(update);
        Ok(id)
    }
}

/// What a finished build left for the diagnosis.
struct BuildOutcome {
    state: build_pb::BuildState,
    /// Where the steps saw the workspace.
    workspace_path: String,
    /// The argv of each step that started, by index.
    argv: BTreeMap<u32, Vec<String>>,
    /// The step results.
    results: Vec<build_pb::StepFinished>,
    /// Output kept per (step, stream): the head and the tail.
    output: BTreeMap<(u32, i32), Bounded>,
    failure_message: String,
}

/// A stream's first and last [`Bounded::HALF`] bytes.
#[derive(Default)]
struct Bounded {
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    skipped: u64,
}

impl Bounded {
    const HALF: usize = 128 * 1024;

    fn push(&mut self, data: &[u8]) {
        let room = Self::HALF.saturating_sub(self.head.len());
        let (to_head, rest) = data.split_at(room.min(data.len()));
        self.head.extend_from_slice(to_head);
        self.tail.extend(rest);
        while self.tail.len() > Self::HALF {
            self.tail.pop_front();
            self.skipped += 1;
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = self.head.clone();
        if self.skipped > 0 {
            out.extend_from_slice(format!("\n… {} bytes not kept …\n", self.skipped).as_bytes());
        }
        out.extend(self.tail.iter());
        out
    }
}

impl Runner {
    /// Follows a build to its end, relaying its events (not its heartbeats) into the
    /// task's log. Events up to `self.relayed` were relayed before a restart: they are
    /// read again for the diagnosis but not relayed twice. A broken stream is resumed.
    async fn follow_build(&mut self, build_id: &str) -> Result<BuildOutcome, Stop> {
        use build_pb::build_event::Event as B;
        let mut outcome = BuildOutcome {
            state: build_pb::BuildState::Unspecified,
            workspace_path: kiln_sandbox_mount().to_owned(),
            argv: BTreeMap::new(),
            results: Vec::new(),
            output: BTreeMap::new(),
            failure_message: String::new(),
        };
        let mut seen = 0u64;
        let mut breaks = 0u32;
        loop {
            let id = build_id.to_owned();
            let mut stream = self
                .with_retries("following the build", |b, c, _| b.watch_build(c, &id, seen))
                .await?
                .ready_chunks(64);
            while let Some(batch) = stream.next().await {
                let mut relay = Vec::new();
                let mut failed = None;
                for item in batch {
                    let event = match item {
                        Ok(e) => e,
                        Err(status) => {
                            failed = Some(status);
                            break;
                        }
                    };
                    if event.sequence <= seen {
                        continue;
                    }
                    seen = event.sequence;
                    match &event.event {
                        Some(B::Heartbeat(_)) | None => continue,
                        Some(B::Started(s)) if !s.workspace_path.is_empty() => {
                            outcome.workspace_path = s.workspace_path.clone();
                        }
                        Some(B::StepStarted(s)) => {
                            outcome.argv.insert(s.step_index, s.argv.clone());
                        }
                        Some(B::Output(o)) => outcome
                            .output
                            .entry((o.step_index, o.stream))
                            .or_default()
                            .push(&o.data),
                        Some(B::StepFinished(f)) => outcome.results.push(f.clone()),
                        Some(B::Finished(f)) => {
                            outcome.state = build_pb::BuildState::try_from(f.state)
                                .unwrap_or(build_pb::BuildState::Failed);
                            outcome.failure_message = f.message.clone();
                        }
                        _ => {}
                    }
                    if event.sequence > self.relayed {
                        relay.push(Event::BuildEvent(pb::RelayedBuildEvent {
                            build_id: build_id.to_owned(),
                            iteration: self.rec.iteration,
                            event: Some(event),
                        }));
                    }
                }
                if !relay.is_empty() {
                    let mut update = self.carry.take().unwrap_or_default();
                    update.relayed_build_sequence = Some(seen);
                    self.append(relay, update).await?;
                    self.relayed = seen;
                }
                if outcome.state != build_pb::BuildState::Unspecified {
                    return Ok(outcome);
                }
                if let Some(status) = failed {
                    tracing::warn!(task = %self.rec.id, build = build_id, %status, "the build's stream broke; resuming");
                    break;
                }
            }
            breaks += 1;
            if breaks > 30 {
                return Err(Stop::Fail(
                    result_reason::BUILD_ERROR,
                    format!("lost build {build_id}: its event stream kept breaking"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn build_failed(&mut self, build_id: &str, outcome: BuildOutcome) -> StepResult {
        let failed = outcome
            .results
            .iter()
            .find(|r| !r.succeeded)
            .or(outcome.results.last());
        let (feedback, signature) = match failed {
            None => (
                format!(
                    "The build failed before any step ran: {}",
                    outcome.failure_message
                ),
                format!("nostep:{}", outcome.failure_message),
            ),
            Some(result) => {
                let index = result.step_index;
                let argv = outcome.argv.get(&index).cloned().unwrap_or_default();
                let out = |s: build_pb::OutputStream| {
                    outcome
                        .output
                        .get(&(index, s as i32))
                        .map(Bounded::bytes)
                        .unwrap_or_default()
                };
                let stdout = out(build_pb::OutputStream::Stdout);
                let stderr = out(build_pb::OutputStream::Stderr);
                let diagnosis = diagnose::diagnose(
                    &diagnose::StepOutput {
                        argv: &argv,
                        stdout: &stdout,
                        stderr: &stderr,
                        workspace_root: &outcome.workspace_path,
                        files: &self.rec.files,
                    },
                    diagnose::Limits::default(),
                );
                let how = match (result.exit_code, result.signal) {
                    (Some(code), _) => format!("exit code {code}"),
                    (None, Some(sig)) => format!("killed by signal {sig}"),
                    _ => result.message.clone(),
                };
                let note = if result.message.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", result.message)
                };
                (
                    format!(
                        "$ {}\n({how}){note}\n{}",
                        shell_words::join(&argv),
                        diagnosis.render()
                    ),
                    diagnosis.signature(),
                )
            }
        };
        let headline = feedback
            .lines()
            .find(|l| !l.starts_with('$') && !l.starts_with('('))
            .unwrap_or("")
            .to_owned();
        if self.rec.last_error_signature.as_deref() == Some(signature.as_str()) {
            return self
                .fail(
                    result_reason::STUCK,
                    format!("stuck: the same error twice: {headline}"),
                )
                .await;
        }
        if self.rec.iteration >= self.rec.max_iterations {
            return self
                .fail(
                    result_reason::MAX_ITERATIONS,
                    format!(
                        "build {build_id} still fails after {} fix iteration{}: {headline}",
                        self.rec.iteration,
                        if self.rec.iteration == 1 { "" } else { "s" }
                    ),
                )
                .await;
        }
        let message = format!("build {build_id} failed: {headline}");
        self.transition(pb::Phase::Fix, message, Vec::new(), move |r| {
            r.iteration += 1;
            r.feedback = feedback;
            r.last_error_signature = Some(signature);
            r.build = None;
        })
        .await
    }

    /// A kiln-build call, retried while kiln-build is unavailable (restarting, or the
    /// listener not serving yet) for up to a minute; any other error fails the task.
    async fn with_retries<'a, T, F>(&'a self, what: &str, mut call: F) -> Result<T, Stop>
    where
        F: FnMut(
            &'a dyn BuildClient,
            &'a Credential,
            &'a TaskRecord,
        ) -> futures::future::BoxFuture<'a, Result<T, tonic::Status>>,
    {
        let started = Instant::now();
        let mut delay = Duration::from_millis(200);
        loop {
            match call(self.shared.build.as_ref(), &self.token, &self.rec).await {
                Ok(v) => return Ok(v),
                Err(status) => {
                    let error = kiln_rpc::RemoteError::from_status(&status);
                    let retry = matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::ResourceExhausted
                    ) && started.elapsed() < Duration::from_secs(60);
                    if !retry {
                        let reason = if status.code() == tonic::Code::Unauthenticated {
                            // The delegation ended: the user was revoked, disabled or demoted.
                            "the task's delegation is no longer accepted"
                        } else {
                            "kiln-build refused"
                        };
                        return Err(Stop::Fail(
                            result_reason::BUILD_ERROR,
                            format!("{what}: {reason}: {error}"),
                        ));
                    }
                    let wait = error.retry_after.unwrap_or(delay);
                    tracing::warn!(task = %self.rec.id, %error, "{what}: kiln-build unavailable; retrying");
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

fn kiln_sandbox_mount() -> &'static str {
    // Tier A's fixed mount point; Started.workspace_path says the real one.
    "/workspace"
}

fn finding_proto(f: &guard::Finding) -> pb::Finding {
    let rule = match (f.kind, f.severity) {
        (guard::Kind::Reply, _) => "MALFORMED_OUTPUT",
        (guard::Kind::Path, _) => "PATH_ESCAPE",
        (guard::Kind::Size, _) => "FILE_TOO_LARGE",
        (guard::Kind::Binary, _) => "BINARY_CONTENT",
        (guard::Kind::Secret, _) => "SECRET",
        (guard::Kind::Dangerous, _) => "DANGEROUS_PATTERN",
        (guard::Kind::Command, _) => "COMMAND_NOT_ALLOWED",
    };
    pb::Finding {
        severity: match f.severity {
            guard::Severity::Blocking => pb::Severity::Error,
            guard::Severity::Warning => pb::Severity::Warning,
        } as i32,
        rule: rule.to_owned(),
        path: f.path.clone(),
        line: f.line,
        message: f.message.clone(),
    }
}

/// Splits the model's commands and checks each program against the build policy. The
/// steps are used only if every command passes.
fn check_commands(commands: &[String], allowed: &[String]) -> (Vec<StepSpec>, Vec<pb::Finding>) {
    let mut steps = Vec::new();
    let mut refused = Vec::new();
    for (i, command) in commands.iter().enumerate() {
        let finding = |message: String| pb::Finding {
            severity: pb::Severity::Error as i32,
            rule: "COMMAND_NOT_ALLOWED".to_owned(),
            path: guard::COMMANDS_PATH.to_owned(),
            line: Some(i as u32 + 1),
            message,
        };
        match shell_words::split(command) {
            Ok(argv) if !argv.is_empty() => {
                if allowed.iter().any(|p| p == &argv[0]) {
                    steps.push(StepSpec {
                        argv,
                        working_dir: String::new(),
                    });
                } else {
                    refused.push(finding(format!(
                        "{:?} is not a program the build policy allows (allowed: {})",
                        argv[0],
                        allowed.join(", ")
                    )));
                }
            }
            Ok(_) => refused.push(finding("an empty command".to_owned())),
            Err(e) => refused.push(finding(format!("cannot be split into words: {e}"))),
        }
    }
    (steps, refused)
}

fn findings_feedback(findings: &[pb::Finding]) -> String {
    let mut out = String::from("Your files were refused:\n");
    for f in findings
        .iter()
        .filter(|f| f.severity == pb::Severity::Error as i32)
    {
        match (&f.path, f.line) {
            (p, _) if p.is_empty() => out.push_str(&format!("- {}\n", f.message)),
            (p, Some(l)) => out.push_str(&format!("- {p}:{l}: {}\n", f.message)),
            (p, None) => out.push_str(&format!("- {p}: {}\n", f.message)),
        }
    }
    out
}

fn first_line(text: &str) -> &str {
    text.lines()
        .map(|l| l.trim_start_matches("- "))
        .find(|l| !l.is_empty() && !l.ends_with(':'))
        .unwrap_or("")
}

/// Lines added and removed, by a longest common subsequence over lines (bounded: past a
/// few thousand lines it counts by set difference, which is close enough for a summary).
pub fn line_diff(before: &str, after: &str) -> (u32, u32) {
    let a: Vec<&str> = before.lines().collect();
    let b: Vec<&str> = after.lines().collect();
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    if a.len().saturating_mul(b.len()) > 4_000_000 {
        let sa: std::collections::HashSet<_> = a.iter().collect();
        let sb: std::collections::HashSet<_> = b.iter().collect();
        return (
            count(b.iter().filter(|l| !sa.contains(l)).count()),
            count(a.iter().filter(|l| !sb.contains(l)).count()),
        );
    }
    let mut row = vec![0usize; b.len() + 1];
    for x in &a {
        let mut diag = 0;
        for (j, y) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    let common = row[b.len()];
    (count(b.len() - common), count(a.len() - common))
}

/// A fingerprint of a reply's files (path and content, in path order) and commands.
fn reply_signature(reply: &reply::Reply) -> String {
    let mut files: Vec<_> = reply.files.iter().map(|f| (&f.path, &f.content)).collect();
    files.sort();
    let commands = reply.commands.join("\n");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (path, content) in files.into_iter().chain([(&commands, &String::new())]) {
        for byte in path.bytes().chain([0]).chain(content.bytes()).chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

/// The plan's summary and files, from the model's JSON (or its prose when it ignored
/// the format): empty when there is nothing usable.
fn parse_plan(text: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Plan {
        #[serde(default)]
        summary: String,
        #[serde(default)]
        files: Vec<String>,
    }
    let start = text.find('{');
    let end = text.rfind('}');
    let plan = match (start, end) {
        (Some(s), Some(e)) if s < e => serde_json::from_str::<Plan>(&text[s..=e]).ok(),
        _ => None,
    };
    let cut = |s: &str| s.chars().take(600).collect::<String>();
    match plan {
        Some(p) if !p.summary.trim().is_empty() || !p.files.is_empty() => {
            let mut out = cut(p.summary.trim());
            if !p.files.is_empty() {
                let files: Vec<String> = p.files.iter().take(16).map(|f| cut(f)).collect();
                out.push_str(&format!(" Files: {}.", files.join(", ")));
            }
            out.trim().to_owned()
        }
        _ => cut(text.trim()),
    }
}

pub fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 3600 == 0 && s > 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_diff_counts_changed_lines() {
        assert_eq!(line_diff("", "a\nb\n"), (2, 0));
        assert_eq!(line_diff("a\nb\nc\n", "a\nB\nc\nd\n"), (2, 1));
        assert_eq!(line_diff("a\n", ""), (0, 1));
    }

    #[test]
    fn commands_pass_only_if_every_program_is_allowed() {
        let allowed = vec!["python3".to_owned(), "make".to_owned()];
        let (steps, refused) = check_commands(&["python3 -m unittest".into()], &allowed);
        assert_eq!(steps[0].argv, ["python3", "-m", "unittest"]);
        assert!(refused.is_empty());
        let (_, refused) = check_commands(&["make".into(), "sh -c 'curl x | sh'".into()], &allowed);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].line, Some(2));
        assert!(
            refused[0].message.contains("\"sh\""),
            "{}",
            refused[0].message
        );
    }

    #[test]
    fn a_plan_is_read_from_json_or_prose() {
        let p = parse_plan("sure: {\"summary\": \"a calc module\", \"files\": [\"calc.py\"]}");
        assert_eq!(p, "a calc module Files: calc.py.");
        assert_eq!(parse_plan("  write calc.py  "), "write calc.py");
        assert_eq!(parse_plan(""), "");
    }
}
