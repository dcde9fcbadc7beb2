//! Printing results for people (`text`) or programs (`json`, `yaml`), and errors as one
//! clear line with the reason and, where there is one, a hint. The numbers people read
//! (local times, `1.2 s`, `16 MiB`) are in [`crate::human`].

use kiln_proto::agent as agent_pb;
use kiln_proto::agent::task_event::Event as TaskEventKind;
use kiln_proto::auth as auth_pb;
use kiln_proto::build as build_pb;
use kiln_proto::build::build_event::Event as BuildEventKind;
use kiln_rpc::RemoteError;
use serde_json::{Value, json};

/// What a command prints: text for people, or one structured document for programs.
///
/// `Json` is every structured format: the document is built once as a JSON value and
/// written in the syntax `-o` chose ([`Syntax`]: JSON, or YAML for `-o yaml`). So a
/// command that speaks `-o json` speaks `-o yaml` too, with no code of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

/// The values of `-o`/`--output`, `KILN_OUTPUT` and the config file's `output`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum OutputChoice {
    /// For people: tables, local times, `1.2 s`, `16 MiB`.
    #[default]
    Text,
    /// One JSON document (event streams: one JSON object a line). Times are RFC 3339 in
    /// UTC, durations in milliseconds, sizes in bytes.
    Json,
    /// The same document as YAML (event streams: one YAML document per event).
    Yaml,
}

impl OutputChoice {
    /// The format commands match on; sets the process's [`Syntax`] as a side effect
    /// (once, at start-up, before anything is printed).
    pub fn apply(self) -> OutputFormat {
        let _ = SYNTAX.set(match self {
            Self::Yaml => Syntax::Yaml,
            Self::Text | Self::Json => Syntax::Json,
        });
        match self {
            Self::Text => OutputFormat::Text,
            Self::Json | Self::Yaml => OutputFormat::Json,
        }
    }
}

/// How structured output is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Syntax {
    #[default]
    Json,
    Yaml,
}

/// Set once from `-o`; a process-wide setting because it is one (every document the
/// process prints uses it) and so that no command has to pass it to the printer.
static SYNTAX: std::sync::OnceLock<Syntax> = std::sync::OnceLock::new();

fn syntax() -> Syntax {
    SYNTAX.get().copied().unwrap_or_default()
}

/// Prints one structured document on stdout: pretty JSON, or YAML under `-o yaml`.
pub fn print_json(value: &Value) {
    print!("{}", document(value, syntax()));
}

/// One event of a stream (`build run|watch`, `agent run|watch`): a JSON object on one
/// line (NDJSON), or under `-o yaml` a YAML document starting with `---`, so that a
/// YAML reader takes the stream as a sequence of documents.
pub fn write_event(out: &mut impl std::io::Write, value: &Value) -> std::io::Result<()> {
    match syntax() {
        Syntax::Json => writeln!(out, "{value}"),
        Syntax::Yaml => write!(out, "---\n{}", yaml(value)),
    }
}

fn document(value: &Value, syntax: Syntax) -> String {
    match syntax {
        Syntax::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
        Syntax::Yaml => yaml(value),
    }
}

fn yaml(value: &Value) -> String {
    // A JSON value always has a YAML form; the fallback is never taken.
    yaml_serde::to_string(value).unwrap_or_else(|_| format!("{value}\n"))
}

/// A timestamp for programs: RFC 3339 in UTC, with the fraction of a second when there
/// is one (`2026-12-02T01:50:23.25Z`), so that durations computed from two of them are
/// exact.
pub fn time(t: Option<&prost_types::Timestamp>) -> Value {
    match t {
        Some(t) => {
            let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
            Value::String(
                time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
                    .ok()
                    .and_then(|d| {
                        d.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_else(|| t.seconds.to_string()),
            )
        }
        None => Value::Null,
    }
}

pub fn role_name(role: i32) -> &'static str {
    match auth_pb::Role::try_from(role).unwrap_or_default() {
        auth_pb::Role::Viewer => "viewer",
        auth_pb::Role::User => "user",
        auth_pb::Role::Admin => "admin",
        auth_pb::Role::Unspecified => "unspecified",
    }
}

pub fn principal_json(p: &auth_pb::Principal) -> Value {
    json!({
        "user_id": p.user_id,
        "username": p.username,
        "role": role_name(p.role),
        "auth_method": auth_pb::AuthMethod::try_from(p.auth_method).unwrap_or_default().as_str_name(),
        "expires_at": time(p.expires_at.as_ref()),
        "session_id": p.session_id,
        "api_key_id": p.api_key_id,
    })
}

pub fn user_json(u: &auth_pb::User) -> Value {
    json!({
        "id": u.id,
        "username": u.username,
        "role": role_name(u.role),
        "disabled": u.disabled,
        "created_at": time(u.created_at.as_ref()),
        "last_login_at": time(u.last_login_at.as_ref()),
    })
}

pub fn api_key_json(k: &auth_pb::ApiKey) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "user_id": k.user_id,
        "role": role_name(k.role),
        "created_at": time(k.created_at.as_ref()),
        "expires_at": time(k.expires_at.as_ref()),
        "last_used_at": time(k.last_used_at.as_ref()),
        "revoked_at": time(k.revoked_at.as_ref()),
    })
}

pub fn workspace_json(w: &build_pb::Workspace) -> Value {
    json!({
        "id": w.id,
        "name": w.name,
        "owner": w.owner,
        "labels": w.labels,
        "size_bytes": w.size_bytes,
        "file_count": w.file_count,
        "created_at": time(w.created_at.as_ref()),
        "updated_at": time(w.updated_at.as_ref()),
    })
}

pub fn build_state_name(state: i32) -> String {
    build_pb::BuildState::try_from(state)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("BUILD_STATE_")
        .to_owned()
}

pub fn step_result_json(s: &build_pb::StepFinished) -> Value {
    json!({
        "step_index": s.step_index,
        "exit_code": s.exit_code,
        "signal": s.signal,
        "reason": build_pb::StepFinishedReason::try_from(s.reason).unwrap_or_default().as_str_name().trim_start_matches("STEP_FINISHED_REASON_"),
        "duration_ms": millis(s.duration.as_ref()),
        "cpu_time_ms": millis(s.cpu_time.as_ref()),
        "peak_memory_bytes": s.peak_memory_bytes,
        "message": s.message,
        "succeeded": s.succeeded,
    })
}

pub fn build_json(b: &build_pb::Build) -> Value {
    json!({
        "id": b.id,
        "workspace_id": b.workspace_id,
        "owner": b.owner,
        "state": build_state_name(b.state),
        "steps": steps_json(&b.steps),
        "labels": b.labels,
        "created_at": time(b.created_at.as_ref()),
        "started_at": time(b.started_at.as_ref()),
        "finished_at": time(b.finished_at.as_ref()),
        "failure_message": b.failure_message,
        "last_sequence": b.last_sequence,
        "queue_position": b.queue_position,
        "step_results": b.step_results.iter().map(step_result_json).collect::<Vec<_>>(),
    })
}

fn millis(d: Option<&prost_types::Duration>) -> Value {
    d.map_or(Value::Null, |d| {
        json!(d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6)
    })
}

/// One build event as a JSON object, its kind in `type` (`kiln build run -o json` prints
/// one a line; the agent relays them inside its own events).
pub fn build_event_json(event: &build_pb::BuildEvent) -> Value {
    let mut body = match &event.event {
        Some(BuildEventKind::Output(o)) => {
            json!({"type": "output", "step_index": o.step_index, "stream": if o.stream == build_pb::OutputStream::Stderr as i32 { "stderr" } else { "stdout" }, "offset": o.offset, "data": String::from_utf8_lossy(&o.data)})
        }
        Some(BuildEventKind::Queued(q)) => json!({"type": "queued", "position": q.position}),
        Some(BuildEventKind::Started(_)) => json!({"type": "started"}),
        Some(BuildEventKind::StepStarted(s)) => {
            json!({"type": "step_started", "step_index": s.step_index, "argv": s.argv})
        }
        Some(BuildEventKind::StepFinished(f)) => {
            let mut v = step_result_json(f);
            v["type"] = json!("step_finished");
            v
        }
        Some(BuildEventKind::Heartbeat(_)) => json!({"type": "heartbeat"}),
        Some(BuildEventKind::Finished(f)) => {
            json!({"type": "finished", "state": build_state_name(f.state), "message": f.message})
        }
        None => json!({"type": "unknown"}),
    };
    body["sequence"] = json!(event.sequence);
    body
}

/// `DONE`, `FIX`…: a phase without its `PHASE_` prefix.
pub fn phase_name(phase: i32) -> &'static str {
    agent_pb::Phase::try_from(phase)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("PHASE_")
}

pub fn usage_json(u: Option<&agent_pb::Usage>) -> Value {
    let u = u.copied().unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "model_calls": u.model_calls,
    })
}

fn steps_json(steps: &[build_pb::Step]) -> Vec<Value> {
    steps
        .iter()
        .map(|s| {
            if s.argv.is_empty() {
                json!(s.command)
            } else {
                json!(s.argv)
            }
        })
        .collect()
}

pub fn task_json(t: &agent_pb::Task) -> Value {
    json!({
        "id": t.id,
        "owner": t.owner,
        "actor": t.actor,
        "prompt": t.prompt,
        "toolchain": t.toolchain,
        "model": t.model,
        "phase": phase_name(t.phase),
        "iteration": t.iteration,
        "max_iterations": t.max_iterations,
        "workspace_id": t.workspace_id,
        "labels": t.labels,
        "steps": steps_json(&t.steps),
        "build_ids": t.build_ids,
        "usage": usage_json(t.usage.as_ref()),
        "max_tokens": t.max_tokens,
        "timeout_ms": millis(t.timeout.as_ref()),
        "failure_message": t.failure_message,
        "last_sequence": t.last_sequence,
        "created_at": time(t.created_at.as_ref()),
        "updated_at": time(t.updated_at.as_ref()),
        "finished_at": time(t.finished_at.as_ref()),
    })
}

pub fn models_json(m: &agent_pb::ListModelsResponse) -> Value {
    json!({
        "provider": agent_pb::ProviderKind::try_from(m.provider).unwrap_or_default().as_str_name().trim_start_matches("PROVIDER_KIND_"),
        "provider_url": m.provider_url,
        "default_model": m.default_model,
        "models": m.models.iter().map(|model| json!({
            "name": model.name,
            "size_bytes": model.size_bytes,
            "context_tokens": model.context_tokens,
            "modified_at": time(model.modified_at.as_ref()),
            "default": model.name == m.default_model,
        })).collect::<Vec<_>>(),
    })
}

pub fn severity_name(severity: i32) -> &'static str {
    agent_pb::Severity::try_from(severity)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("SEVERITY_")
}

/// One task event as a JSON object with its kind in `type` and its `sequence`: what
/// `kiln agent run|watch -o json` prints, one a line.
pub fn task_event_json(event: &agent_pb::TaskEvent) -> Value {
    let mut body = match &event.event {
        Some(TaskEventKind::PhaseChanged(p)) => json!({
            "type": "phase_changed",
            "previous_phase": phase_name(p.previous_phase),
            "phase": phase_name(p.phase),
            "iteration": p.iteration,
            "message": p.message,
        }),
        Some(TaskEventKind::ModelOutput(m)) => json!({
            "type": "model_output",
            "phase": phase_name(m.phase),
            "call_index": m.call_index,
            "delta": m.delta,
        }),
        Some(TaskEventKind::FilesWritten(f)) => json!({
            "type": "files_written",
            "files": f.files.iter().map(|w| json!({
                "path": w.path,
                "size_bytes": w.size_bytes,
                "deleted": w.deleted,
                "created": w.created,
                "lines_added": w.lines_added,
                "lines_removed": w.lines_removed,
            })).collect::<Vec<_>>(),
        }),
        Some(TaskEventKind::Findings(f)) => json!({
            "type": "findings",
            "iteration": f.iteration,
            "findings": f.findings.iter().map(|x| json!({
                "severity": severity_name(x.severity),
                "rule": x.rule,
                "path": x.path,
                "line": x.line,
                "message": x.message,
            })).collect::<Vec<_>>(),
        }),
        Some(TaskEventKind::BuildEvent(b)) => json!({
            "type": "build_event",
            "build_id": b.build_id,
            "iteration": b.iteration,
            "event": b.event.as_ref().map(build_event_json),
        }),
        Some(TaskEventKind::Heartbeat(_)) => json!({"type": "heartbeat"}),
        Some(TaskEventKind::Usage(u)) => json!({
            "type": "usage",
            "phase": phase_name(u.phase),
            "call_index": u.call_index,
            "call": usage_json(u.call.as_ref()),
            "total": usage_json(u.total.as_ref()),
            "duration_ms": millis(u.duration.as_ref()),
        }),
        Some(TaskEventKind::Result(r)) => json!({
            "type": "result",
            "phase": phase_name(r.phase),
            "message": r.message,
            "reason": r.reason,
            "workspace_id": r.workspace_id,
            "build_id": r.build_id,
            "iterations": r.iterations,
            "usage": usage_json(r.usage.as_ref()),
        }),
        None => json!({"type": "unknown"}),
    };
    body["sequence"] = json!(event.sequence);
    body["time"] = time(event.time.as_ref());
    body
}

/// One line for a failed RPC: message, reason, field violations, and a hint.
pub fn describe_status(status: &tonic::Status, endpoint: &str) -> String {
    describe_error(&RemoteError::from_status(status), endpoint)
}

/// [`describe_status`] for an already decoded error.
pub fn describe_error(err: &RemoteError, endpoint: &str) -> String {
    let mut line = err.summary();
    if !err.reason.is_empty() {
        line.push_str(&format!(" ({})", err.reason));
    }
    for v in &err.violations {
        // A single violation is usually the message already; do not say it twice.
        if !err.message.contains(&v.description) {
            line.push_str(&format!("\n  {}: {}", v.field, v.description));
        }
    }
    if let Some(retry) = err.retry_after {
        line.push_str(&format!("\nhint: retry in {:.1} s", retry.as_secs_f64()));
    }
    let hint = match err.code {
        tonic::Code::Unauthenticated => {
            Some("run `kiln login` (or set KILN_TOKEN to an API key)".to_owned())
        }
        tonic::Code::Unavailable => Some(format!("is kiln running at {endpoint}? (`kiln up`)")),
        tonic::Code::PermissionDenied if err.has_reason("INSUFFICIENT_ROLE") => {
            Some("ask an admin for a role that allows this".to_owned())
        }
        tonic::Code::FailedPrecondition if err.has_reason("PROVIDER_UNAVAILABLE") => {
            Some("start a model with `make llm`, or set [agent.provider] in kiln.toml".to_owned())
        }
        _ => None,
    };
    if let Some(hint) = hint {
        line.push_str(&format!("\nhint: {hint}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_rpc::ApiError;

    #[test]
    fn provider_unavailable_gets_the_server_message_and_a_hint() {
        let status: tonic::Status = ApiError::failed_precondition(
            "PROVIDER_UNAVAILABLE",
            "no LLM provider answers at http://127.0.0.1:11434",
        )
        .into();
        assert_eq!(
            describe_status(&status, "https://127.0.0.1:7443"),
            "no LLM provider answers at http://127.0.0.1:11434 (PROVIDER_UNAVAILABLE)\n\
             hint: start a model with `make llm`, or set [agent.provider] in kiln.toml"
        );
    }

    #[test]
    fn violations_the_message_does_not_say_get_their_own_lines() {
        let status: tonic::Status = ApiError::invalid_fields(vec![
            kiln_rpc::FieldViolation {
                field: "prompt".into(),
                description: "empty".into(),
            },
            kiln_rpc::FieldViolation {
                field: "toolchain".into(),
                description: "unknown toolchain \"cobol\"".into(),
            },
        ])
        .expect("two")
        .into();
        assert_eq!(
            describe_status(&status, "e"),
            "2 invalid fields: prompt, toolchain (INVALID_ARGUMENT)\n  prompt: empty\n  toolchain: unknown toolchain \"cobol\""
        );
    }

    #[test]
    fn task_events_carry_their_kind_sequence_and_numbers() {
        let event = agent_pb::TaskEvent {
            sequence: 7,
            time: None,
            event: Some(TaskEventKind::Usage(agent_pb::ModelUsage {
                phase: agent_pb::Phase::Fix as i32,
                call_index: 2,
                call: Some(agent_pb::Usage {
                    prompt_tokens: 10,
                    completion_tokens: 5,
                    model_calls: 1,
                }),
                total: None,
                duration: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 500_000_000,
                }),
            })),
        };
        let v = task_event_json(&event);
        assert_eq!(v["type"], "usage");
        assert_eq!(v["sequence"], 7);
        assert_eq!(v["phase"], "FIX");
        assert_eq!(v["call"]["prompt_tokens"], 10);
        assert_eq!(v["total"]["completion_tokens"], 0);
        assert_eq!(v["duration_ms"], 1500.0);
    }
}
