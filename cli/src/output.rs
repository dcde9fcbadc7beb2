//! Printing results for people (`text`) or programs (`json`), and errors as one clear
//! line with the reason and, where there is one, a hint.

use kiln_proto::auth as auth_pb;
use kiln_proto::build as build_pb;
use serde_json::{Value, json};
use tonic_types::StatusExt;

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
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

/// Prints one JSON document on stdout.
pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

pub fn time(t: Option<&prost_types::Timestamp>) -> Value {
    match t {
        Some(t) => {
            let secs = t.seconds;
            Value::String(
                time::OffsetDateTime::from_unix_timestamp(secs)
                    .ok()
                    .and_then(|d| {
                        d.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_else(|| secs.to_string()),
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
        "duration_ms": s.duration.map(|d| d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6),
        "cpu_time_ms": s.cpu_time.map(|d| d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6),
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
        "steps": b.steps.iter().map(|s| if s.argv.is_empty() { json!(s.command) } else { json!(s.argv) }).collect::<Vec<_>>(),
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

/// One line for a failed RPC: message, reason, field violations, and a hint.
pub fn describe_status(status: &tonic::Status, endpoint: &str) -> String {
    let details = status.get_error_details();
    let reason = details
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default();
    let mut line = status.message().to_owned();
    if line.is_empty() {
        line = format!("{:?}", status.code());
    }
    if !reason.is_empty() {
        line.push_str(&format!(" ({reason})"));
    }
    if let Some(bad) = details.bad_request() {
        for v in &bad.field_violations {
            // A single violation is usually the message already; do not say it twice.
            if !status.message().contains(&v.description) {
                line.push_str(&format!("\n  {}: {}", v.field, v.description));
            }
        }
    }
    if let Some(retry) = details.retry_info().and_then(|r| r.retry_delay) {
        line.push_str(&format!("\nhint: retry in {:.1} s", retry.as_secs_f64()));
    }
    let hint = match status.code() {
        tonic::Code::Unauthenticated => {
            Some("run `kiln login` (or set KILN_TOKEN to an API key)".to_owned())
        }
        tonic::Code::Unavailable => Some(format!("is kiln running at {endpoint}? (`kiln up`)")),
        tonic::Code::PermissionDenied if reason == "INSUFFICIENT_ROLE" => {
            Some("ask an admin for a role that allows this".to_owned())
        }
        _ => None,
    };
    if let Some(hint) = hint {
        line.push_str(&format!("\nhint: {hint}"));
    }
    line
}
