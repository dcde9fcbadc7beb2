//! Running one build: its steps in order, each in a fresh sandbox over the workspace,
//! with every event appended to the build's log.

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use bytes::Bytes;
use kiln_proto::build as pb;
use kiln_sandbox::{CommandSpec, ExitStatus, Limits, OutputChunk, Reason, Stream};
use pb::build_event::Event;
use std::collections::BTreeMap;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Shared;
use crate::config::BuildLimits;
use crate::control::Claim;
use crate::error::Result;
use crate::log::{AppendEvents, LiveLog};
use crate::model::{BuildSpec, BuildState, Step, StepEnd, StepResult};
use crate::queue::Entry;
use crate::store::{BuildUpdate, now_micros};

/// Largest Output event.
pub const MAX_OUTPUT_EVENT: usize = 32 * 1024;
/// Output taken from the sandbox per log append: bounds one transaction, and lets a fast
/// writer's output reach watchers in slices of a few hundred KiB.
const BATCH_BYTES: usize = 512 * 1024;

/// What a running build is asked to do from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Keep running.
    No,
    /// CancelBuild: SIGTERM to the step's tree, SIGKILL after the grace period.
    Cancel(Duration),
    /// The service is shutting down: kill the step, end the build INTERRUPTED.
    Interrupt,
}

/// How a step turned out, as far as the build is concerned.
struct StepOutcome {
    finished: StepResult,
    output: u64,
    stop_build: Option<(BuildState, String)>,
}

/// Runs a build the scheduler claimed, then frees its slot and workspace. Never fails:
/// errors end the build FAILED (or leave it RUNNING for recovery if even that cannot be
/// stored).
pub async fn run(shared: Arc<Shared>, claim: Claim) {
    let entry = &claim.entry;
    if let Err(e) = run_build(&shared, entry, claim.stop.clone()).await {
        tracing::error!(build = %entry.build_id, error = %e, "build failed on the server side");
        if let Some(log) = shared.logs.get(&entry.build_id) {
            let _ = log
                .append_finished(
                    &shared.store,
                    BuildState::Failed,
                    "internal error while running the build",
                )
                .await;
        }
    }
    shared.logs.remove(&entry.build_id);
    let build_id = entry.build_id.clone();
    if let Err(e) = shared.control.finish(claim).await {
        tracing::error!(build = %build_id, error = %e, "freeing a finished build's slot failed");
    }
}

async fn run_build(
    shared: &Arc<Shared>,
    entry: &Entry,
    mut stop: watch::Receiver<Stop>,
) -> Result<()> {
    let Some(row) = shared.store.get_build(&entry.build_id).await? else {
        return Ok(()); // deleted meanwhile (retention)
    };
    let build = row.build;
    let log = match shared.logs.get(&entry.build_id) {
        Some(l) => l,
        None => {
            let l = LiveLog::new(
                &build.id,
                build.last_sequence,
                build.step_results.clone(),
                shared.config.live_window_bytes,
            );
            shared.logs.insert(l.clone());
            l
        }
    };
    // The scheduler handed this build out holding its workspace's lock (see `run`):
    // API changes in flight have finished, later ones see the workspace busy.
    let tier = crate::service::tier_to_proto(shared.sandbox.tier());
    // Where the steps see the workspace, so that clients (the agent's diagnosis) can make
    // the paths tools print workspace-relative. Tier A mounts it at a fixed place; the
    // other tiers run in the host directory, which the build can read anyway (`pwd`).
    let workspace_path = match shared.sandbox.tier() {
        kiln_sandbox::Tier::A => kiln_sandbox::WORKSPACE_MOUNT.to_owned(),
        _ => shared
            .disk
            .dir(&entry.workspace_id)
            .to_string_lossy()
            .into_owned(),
    };
    log.append_events(
        &shared.store,
        vec![Event::Started(pb::Started {
            sandbox_tier: tier as i32,
            workspace_path,
        })],
        BuildUpdate {
            state: Some(BuildState::Running),
            started_at: Some(now_micros()),
            ..BuildUpdate::default()
        },
    )
    .await?;
    let ws_dir = shared.disk.dir(&entry.workspace_id);
    let (state, message) = if !ws_dir.is_dir() {
        (BuildState::Failed, "the workspace was deleted".to_owned())
    } else {
        let sandbox = shared.sandbox.clone();
        let dir = ws_dir.clone();
        let scratch = scratch_dir(shared, &ws_dir).is_some();
        let (disk, ws_id) = (shared.disk.clone(), entry.workspace_id.clone());
        tokio::task::spawn_blocking(move || {
            if scratch {
                // An earlier build may have left a symlink by that name: replaced, never
                // followed.
                disk.ensure_plain_dir(&ws_id, SCRATCH_DIR)?;
            }
            sandbox
                .prepare_workspace(&dir)
                .map_err(crate::error::BuildError::from)
        })
        .await
        .map_err(|e| crate::error::BuildError::Config(format!("prepare task: {e}")))??;
        run_steps(shared, &log, &build.spec, &ws_dir, &mut stop).await?
    };
    if let Some(scratch) = scratch_dir(shared, &ws_dir) {
        // Scratch files are not the build's result: they do not stay in the workspace.
        let _ = tokio::fs::remove_dir_all(scratch).await;
    }
    // Builds change files; keep the workspace's size current for GetWorkspace and quotas.
    if ws_dir.is_dir() {
        let dir = ws_dir.clone();
        if let Ok(Ok(usage)) =
            tokio::task::spawn_blocking(move || crate::workspace::usage(&dir)).await
        {
            shared
                .store
                .set_workspace_usage(&entry.workspace_id, usage.bytes, usage.entries, false)
                .await?;
        }
    }
    log.append_finished(&shared.store, state, &message).await?;
    Ok(())
}

async fn run_steps(
    shared: &Arc<Shared>,
    log: &LiveLog,
    spec: &BuildSpec,
    ws_dir: &std::path::Path,
    stop: &mut watch::Receiver<Stop>,
) -> Result<(BuildState, String)> {
    let limits = &spec.limits;
    let deadline = Instant::now() + limits.wall_timeout;
    let mut output_left = limits.output_bytes;
    let count = spec.steps.len();
    for (index, step) in spec.steps.iter().enumerate() {
        match *stop.borrow_and_update() {
            Stop::No => {}
            Stop::Cancel(_) => {
                return Ok((
                    BuildState::Cancelled,
                    "cancelled before step started".into(),
                ));
            }
            Stop::Interrupt => return Ok((BuildState::Interrupted, interrupted_message())),
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Ok((
                BuildState::TimedOut,
                format!(
                    "the build's wall timeout of {:?} was reached",
                    limits.wall_timeout
                ),
            ));
        }
        let argv = &step.argv;
        let own_timeout = step.timeout.filter(|t| *t < remaining);
        let timeout = own_timeout.unwrap_or(remaining);
        let command = command_spec(
            shared,
            step,
            &spec.env,
            ws_dir,
            limits,
            timeout,
            output_left,
        );
        let span = tracing::info_span!(
            "build.step",
            step = index + 1,
            program = argv.first().map_or("", String::as_str),
            succeeded = tracing::field::Empty,
        );
        let end = run_step(shared, log, index, step, command, limits, stop)
            .instrument(span.clone())
            .await?;
        span.record("succeeded", end.finished.succeeded);
        output_left = output_left.saturating_sub(end.output);
        let label = format!("step {} of {count} (`{}`)", index + 1, argv.join(" "));
        if let Some((state, why)) = end.stop_build {
            return Ok((state, format!("{label}: {why}")));
        }
        if !end.finished.succeeded {
            let state = if end.finished.reason == StepEnd::TimedOut {
                BuildState::TimedOut
            } else {
                BuildState::Failed
            };
            return Ok((state, format!("{label} {}", end.finished.describe())));
        }
    }
    Ok((BuildState::Succeeded, String::new()))
}

fn interrupted_message() -> String {
    "the service stopped while the build was running".into()
}

fn command_spec(
    shared: &Shared,
    step: &Step,
    build_env: &BTreeMap<String, String>,
    ws_dir: &std::path::Path,
    limits: &BuildLimits,
    timeout: Duration,
    output_left: u64,
) -> CommandSpec {
    let policy = &shared.config.policy;
    let home = shared.sandbox.workspace_in_sandbox(ws_dir);
    // The environment is built from nothing: fixed PATH and HOME, the policy's fixed
    // variables, then the request's (already checked against the allowlist).
    let mut spec = CommandSpec::new(step.argv.iter().cloned(), ws_dir)
        .current_dir(&step.working_dir)
        .env("PATH", policy.path.clone())
        .env("HOME", home.to_string_lossy().into_owned());
    if scratch_dir(shared, ws_dir).is_some() {
        // Tier B has no private /tmp and landlock lets steps write only the workspace:
        // compilers and tempfile users get a scratch directory inside it instead.
        spec = spec.env(
            "TMPDIR",
            home.join(SCRATCH_DIR).to_string_lossy().into_owned(),
        );
    }
    for (k, v) in &policy.fixed_env {
        spec = spec.env(k.clone(), v.clone());
    }
    // The stored env went through the allowlist at StartBuild; sorted, so the order
    // is stable.
    for (k, v) in build_env {
        spec = spec.env(k.clone(), v.clone());
    }
    spec.limits(Limits {
        wall_timeout: timeout,
        cpu_time: Some(limits.cpu_time),
        memory_bytes: Some(limits.memory_bytes),
        output_bytes: Some(output_left),
        disk_bytes: Some(limits.disk_bytes),
        // The workspace's entry limit holds during builds too, not only for the API.
        disk_entries: Some(shared.config.workspace.max_files),
        processes: Some(u64::from(limits.processes)),
        open_files: Some(u64::from(limits.open_files)),
        ..Limits::default()
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_step(
    shared: &Arc<Shared>,
    log: &LiveLog,
    index: usize,
    step: &Step,
    spec: CommandSpec,
    limits: &BuildLimits,
    stop: &mut watch::Receiver<Stop>,
) -> Result<StepOutcome> {
    let index32 = u32::try_from(index).unwrap_or(u32::MAX);
    let spawn_started = std::time::Instant::now();
    let spawned = shared.sandbox.spawn(spec).await;
    let metrics = &shared.metrics;
    metrics.spawned(
        spawn_started.elapsed(),
        crate::metrics::spawn_outcome(&spawned),
    );
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let finished = StepResult {
                step_index: index32,
                exit_code: None,
                signal: None,
                reason: StepEnd::SpawnFailed,
                duration: None,
                cpu_time: None,
                peak_memory_bytes: 0,
                message: spawn_error_message(&e),
                succeeded: false,
            };
            log.append_step_finished(&shared.store, finished.clone())
                .await?;
            let why = finished.describe();
            return Ok(StepOutcome {
                finished,
                output: 0,
                stop_build: Some((BuildState::Failed, why)),
            });
        }
    };
    log.append_events(
        &shared.store,
        vec![Event::StepStarted(pb::StepStarted {
            step_index: index32,
            argv: step.argv.clone(),
        })],
        BuildUpdate {
            current_step: Some(Some(index32)),
            ..BuildUpdate::default()
        },
    )
    .await?;
    let Some(mut rx) = child.take_output() else {
        return Err(crate::error::BuildError::Config(
            "step output already taken".into(),
        ));
    };
    let control = child.control();
    let wait = child.wait();
    tokio::pin!(wait);
    let mut output_open = true;
    let mut stop_live = true;
    let mut requested = Stop::No;
    let mut delivered = 0u64;
    let outcome = loop {
        tokio::select! {
            chunk = rx.recv(), if output_open => match chunk {
                Some(first) => {
                    let mut batch = vec![first];
                    let mut bytes = batch[0].data.len();
                    while bytes < BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(c) => { bytes += c.data.len(); batch.push(c); }
                            Err(_) => break,
                        }
                    }
                    delivered += bytes as u64;
                    let events = coalesce(index32, batch);
                    log.append_events(&shared.store, events, BuildUpdate::default()).await?;
                }
                None => output_open = false,
            },
            outcome = &mut wait, if !output_open => break outcome,
            changed = stop.changed(), if stop_live => match changed {
                Err(_) => stop_live = false,
                Ok(()) => {
                    let s = *stop.borrow_and_update();
                    match s {
                        Stop::No => {}
                        Stop::Cancel(grace) if requested == Stop::No => {
                            requested = s;
                            control.cancel_with_grace(grace);
                        }
                        Stop::Cancel(_) => {}
                        Stop::Interrupt => {
                            requested = s;
                            control.cancel();
                        }
                    }
                }
            },
        }
    };
    let mut reason = StepEnd::from(outcome.reason);
    let mut message = outcome.message.clone().unwrap_or_default();
    let mut stop_build = None;
    match (requested, outcome.reason) {
        (Stop::Cancel(_), _) => {
            reason = StepEnd::Cancelled;
            message = "cancelled on request".into();
            stop_build = Some((BuildState::Cancelled, "cancelled".to_owned()));
        }
        (Stop::Interrupt, _) => {
            reason = StepEnd::Cancelled;
            message = interrupted_message();
            stop_build = Some((BuildState::Interrupted, interrupted_message()));
        }
        (Stop::No, Reason::OutputLimit) => {
            message = format!(
                "output limit of {} bytes reached: the output after it was dropped and the step was killed",
                limits.output_bytes
            );
            stop_build = Some((BuildState::Failed, message.clone()));
        }
        // The monitor says which of the two limits it was (bytes or entries).
        (Stop::No, Reason::DiskLimit) if message.contains("entries") => {
            message = format!("{message}: the step was killed");
        }
        (Stop::No, Reason::DiskLimit) => {
            message = format!(
                "disk limit of {} bytes reached: the step was killed",
                limits.disk_bytes
            );
        }
        (Stop::No, Reason::TimedOut) if message.is_empty() => {
            message = "timed out".into();
        }
        _ => {}
    }
    let exited_ok = outcome.reason == Reason::Exited && outcome.status == ExitStatus::Code(0);
    let succeeded = stop_build.is_none() && (exited_ok || step.allow_failure);
    metrics.step_finished(reason.metric_name(), outcome.wall_time, delivered);
    let finished = StepResult {
        step_index: index32,
        exit_code: outcome.status.code(),
        signal: outcome.status.signal(),
        reason,
        duration: Some(outcome.wall_time),
        cpu_time: Some(outcome.cpu_time),
        peak_memory_bytes: outcome.peak_memory_bytes,
        message,
        succeeded,
    };
    log.append_step_finished(&shared.store, finished.clone())
        .await?;
    Ok(StepOutcome {
        finished,
        output: delivered,
        stop_build,
    })
}

/// A spawn error for the client, without server paths.
fn spawn_error_message(e: &kiln_sandbox::Error) -> String {
    match e {
        kiln_sandbox::Error::InvalidWorkingDir { path, why } => {
            format!("working directory {:?} {why}", path.display().to_string())
        }
        kiln_sandbox::Error::InvalidCommand(m) => format!("invalid command: {m}"),
        other => {
            tracing::error!(error = %other, "sandbox spawn failed");
            "the sandbox could not start the step (see the server log)".into()
        }
    }
}

/// Sandbox chunks → Output events of at most 32 KiB, merging neighbours of one stream
/// (the sandbox reads each pipe in up to 32 KiB pieces; under load many arrive small).
fn coalesce(step_index: u32, chunks: Vec<OutputChunk>) -> Vec<Event> {
    let mut out: Vec<pb::Output> = Vec::new();
    let mut pending: Vec<(Stream, u64, Vec<u8>)> = Vec::new();
    for c in chunks {
        match pending.last_mut() {
            Some((s, off, data))
                if *s == c.stream
                    && *off + data.len() as u64 == c.offset
                    && data.len() + c.data.len() <= MAX_OUTPUT_EVENT =>
            {
                data.extend_from_slice(&c.data);
            }
            _ => pending.push((c.stream, c.offset, c.data)),
        }
    }
    for (stream, offset, data) in pending {
        out.push(pb::Output {
            step_index,
            stream: match stream {
                Stream::Stdout => pb::OutputStream::Stdout,
                Stream::Stderr => pb::OutputStream::Stderr,
            } as i32,
            offset,
            data: Bytes::from(data),
        });
    }
    out.into_iter().map(Event::Output).collect()
}

/// The TMPDIR of steps in tiers without a private /tmp, inside the workspace.
const SCRATCH_DIR: &str = ".kiln-tmp";

/// Where a build's temporary files go when the sandbox gives it no /tmp of its own.
fn scratch_dir(shared: &Shared, ws_dir: &std::path::Path) -> Option<std::path::PathBuf> {
    (shared.sandbox.tier() != kiln_sandbox::Tier::A).then(|| ws_dir.join(SCRATCH_DIR))
}
