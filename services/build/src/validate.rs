//! Checking requests against the contract and the policy, collecting every violation so
//! that a client hears about all of them at once.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use kiln_proto::build as pb;
use kiln_rpc::{ApiError, FieldViolation};
use tonic::Code;

use crate::config::{BuildLimits, Policy, WorkspaceLimits};
use crate::error::{invalid_with_code, reason, violation};
use crate::model::{BuildSpec, Step};
use crate::paths;
use crate::wire::duration_from_proto;

/// Largest argv (sum of argument lengths) or command string.
pub const MAX_ARGV_BYTES: usize = 64 * 1024;
/// Most arguments of one step.
pub const MAX_ARGS: usize = 1024;
/// Most environment variables of a build.
pub const MAX_ENV: usize = 64;
/// Largest environment value.
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// Most labels of a workspace or build.
pub const MAX_LABELS: usize = 32;

/// Violations with the reason each one stands for.
#[derive(Debug, Default)]
pub struct Violations(Vec<(&'static str, FieldViolation)>);

impl Violations {
    pub fn push(&mut self, reason: &'static str, field: impl Into<String>, why: impl Into<String>) {
        self.0.push((reason, violation(field, why)));
    }

    pub fn extend(&mut self, reason: &'static str, list: Vec<FieldViolation>) {
        self.0.extend(list.into_iter().map(|v| (reason, v)));
    }

    /// The answer: INVALID_ARGUMENT with the violations (reason: the one they share, else
    /// INVALID_ARGUMENT). Programs off the allowlist alone answer PERMISSION_DENIED with
    /// the allowed programs in the ErrorInfo metadata.
    pub fn into_result(self, policy: Option<&Policy>) -> Result<(), ApiError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let (programs, others): (Vec<_>, Vec<_>) = self
            .0
            .into_iter()
            .partition(|(r, _)| *r == reason::PROGRAM_NOT_ALLOWED);
        if others.is_empty() {
            let allowed = policy
                .map(|p| {
                    p.allowed_programs
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let err = invalid_with_code(
                Code::PermissionDenied,
                reason::PROGRAM_NOT_ALLOWED,
                programs.into_iter().map(|(_, v)| v).collect(),
            );
            return Err(err.with_metadata("allowed_programs", allowed));
        }
        let first = others[0].0;
        let shared = if others.iter().all(|(r, _)| *r == first) {
            first
        } else {
            kiln_rpc::error::reason::INVALID_ARGUMENT
        };
        Err(invalid_with_code(
            Code::InvalidArgument,
            shared,
            others.into_iter().map(|(_, v)| v).collect(),
        ))
    }
}

/// Checks labels: at most 32; keys 1–63 bytes of `[a-z0-9._/-]`; values ≤ 256 bytes.
pub fn check_labels(field: &str, labels: &HashMap<String, String>, out: &mut Violations) {
    let generic = kiln_rpc::error::reason::INVALID_ARGUMENT;
    if labels.len() > MAX_LABELS {
        out.push(generic, field, format!("at most {MAX_LABELS} labels"));
    }
    for (k, v) in labels {
        let key_ok = (1..=63).contains(&k.len())
            && k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b));
        if !key_ok {
            out.push(
                generic,
                format!("{field}.{k}"),
                "label keys are 1 to 63 bytes of a-z, 0-9, `.`, `_`, `-` and `/`",
            );
        }
        if v.len() > 256 {
            out.push(
                generic,
                format!("{field}.{k}"),
                "label values are at most 256 bytes",
            );
        }
    }
}

/// Checks a workspace name (CreateWorkspaceRequest.name); empty means none. A name may
/// not look like a UUID: wherever a workspace id is accepted a name is too, and an id
/// must always mean the workspace with that id.
pub fn check_workspace_name(field: &str, name: &str, out: &mut Violations) {
    if name.is_empty() {
        return;
    }
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if !ok {
        out.push(
            kiln_rpc::error::reason::INVALID_ARGUMENT,
            field,
            "names are 1 to 63 bytes of a-z, 0-9, `.`, `_` and `-`, starting with a letter or digit",
        );
    } else if uuid::Uuid::parse_str(name).is_ok() {
        out.push(
            kiln_rpc::error::reason::INVALID_ARGUMENT,
            field,
            "a name may not look like a workspace id (a UUID)",
        );
    }
}

/// Validates a StartBuildRequest against the contract and `policy`; what passes is the
/// build's spec, commands split and limits resolved, once for the build's whole life.
pub fn start_build(
    req: &pb::StartBuildRequest,
    policy: &Policy,
    ws_limits: &WorkspaceLimits,
) -> Result<BuildSpec, ApiError> {
    let mut v = Violations::default();
    let generic = kiln_rpc::error::reason::INVALID_ARGUMENT;
    if req.workspace_id.is_empty() {
        v.push(generic, "workspace_id", "is required");
    }
    if req.steps.is_empty() {
        v.push(generic, "steps", "at least one step is required");
    } else if req.steps.len() > policy.max_steps as usize {
        v.push(
            generic,
            "steps",
            format!("at most {} steps", policy.max_steps),
        );
    }
    let steps = req
        .steps
        .iter()
        .enumerate()
        .map(|(i, step)| check_step(i, step, policy, ws_limits, &mut v))
        .collect();
    let env = check_env(&req.env, policy, &mut v);
    let limits = check_limits(req.limits.as_ref(), policy, &mut v);
    check_labels("labels", &req.labels, &mut v);
    v.into_result(Some(policy))?;
    Ok(BuildSpec {
        steps,
        env,
        limits,
        labels: req.labels.clone().into_iter().collect(),
    })
}

/// Checks one step; returns it with its argv split (meaningful only if no violation
/// was added).
fn check_step(
    i: usize,
    step: &pb::Step,
    policy: &Policy,
    ws_limits: &WorkspaceLimits,
    v: &mut Violations,
) -> Step {
    let generic = kiln_rpc::error::reason::INVALID_ARGUMENT;
    let argv = match (&step.command, step.argv.is_empty()) {
        (Some(_), false) => {
            v.push(
                generic,
                format!("steps[{i}]"),
                "set either argv or command, not both",
            );
            Vec::new()
        }
        (Some(cmd), true) => {
            if cmd.len() > MAX_ARGV_BYTES {
                v.push(
                    generic,
                    format!("steps[{i}].command"),
                    format!("is longer than {MAX_ARGV_BYTES} bytes"),
                );
                Vec::new()
            } else {
                match shell_words::split(cmd) {
                    Ok(words) if words.is_empty() => {
                        v.push(
                            reason::INVALID_COMMAND,
                            format!("steps[{i}].command"),
                            "is empty",
                        );
                        words
                    }
                    Ok(words) => words,
                    Err(e) => {
                        v.push(
                            reason::INVALID_COMMAND,
                            format!("steps[{i}].command"),
                            format!("does not split into words: {e}"),
                        );
                        Vec::new()
                    }
                }
            }
        }
        (None, true) => {
            v.push(
                generic,
                format!("steps[{i}].argv"),
                "must not be empty (set argv or command)",
            );
            Vec::new()
        }
        (None, false) => step.argv.clone(),
    };
    let field = if step.command.is_some() {
        format!("steps[{i}].command")
    } else {
        format!("steps[{i}].argv")
    };
    let total: usize = argv.iter().map(|a| a.len() + 1).sum();
    if argv.len() > MAX_ARGS {
        v.push(
            generic,
            field.clone(),
            format!("at most {MAX_ARGS} arguments"),
        );
    } else if total > MAX_ARGV_BYTES {
        v.push(
            generic,
            field.clone(),
            format!("is larger than {MAX_ARGV_BYTES} bytes in total"),
        );
    }
    for (j, arg) in argv.iter().enumerate() {
        if arg.contains('\0') {
            v.push(
                generic,
                format!("{field}[{j}]"),
                "must not contain a NUL byte",
            );
        }
    }
    if let Some(program) = argv.first() {
        if program.is_empty() {
            v.push(generic, format!("{field}[0]"), "the program name is empty");
        } else if !policy.allowed_programs.contains(program) {
            v.push(
                reason::PROGRAM_NOT_ALLOWED,
                format!("{field}[0]"),
                format!("{program:?} is not on the allowlist of programs (see GetPolicy)"),
            );
        }
        // `env sh -c …`: a program the allowed one would run must be allowed too.
        for w in crate::wrappers::wrapped(&argv) {
            match w {
                crate::wrappers::Wrapped::Program { index, name } => {
                    if !policy.allowed_programs.contains(name) {
                        v.push(
                            reason::PROGRAM_NOT_ALLOWED,
                            format!("{field}[{index}]"),
                            format!(
                                "{program:?} would run {name:?}, which is not on the \
                                 allowlist of programs (see GetPolicy)"
                            ),
                        );
                    }
                }
                crate::wrappers::Wrapped::Unchecked { index, why } => v.push(
                    reason::PROGRAM_NOT_ALLOWED,
                    format!("{field}[{index}]"),
                    format!("{why}, whose programs cannot be checked against the allowlist"),
                ),
            }
        }
    }
    if let Err(e) = paths::check(
        &format!("steps[{i}].working_dir"),
        &step.working_dir,
        ws_limits,
        true,
    ) {
        v.extend(reason::INVALID_PATH, vec![e]);
    }
    let timeout = step.timeout.as_ref().and_then(|d| {
        let parsed = duration_from_proto(d).filter(|d| !d.is_zero());
        if parsed.is_none() {
            v.push(generic, format!("steps[{i}].timeout"), "must be positive");
        }
        if let Some(t) = parsed
            && t > policy.max_limits.wall_timeout
        {
            v.push(
                reason::LIMIT_TOO_HIGH,
                format!("steps[{i}].timeout"),
                format!("the maximum is {:?}", policy.max_limits.wall_timeout),
            );
        }
        parsed
    });
    Step {
        argv,
        command: step.command.clone(),
        working_dir: step.working_dir.clone(),
        timeout,
        allow_failure: step.allow_failure,
    }
}

fn check_env(
    env: &HashMap<String, String>,
    policy: &Policy,
    v: &mut Violations,
) -> BTreeMap<String, String> {
    let generic = kiln_rpc::error::reason::INVALID_ARGUMENT;
    if env.len() > MAX_ENV {
        v.push(generic, "env", format!("at most {MAX_ENV} variables"));
    }
    let mut out = BTreeMap::new();
    for (k, val) in env {
        let field = format!("env.{k}");
        let name_ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            v.push(generic, field, "is not a valid variable name");
        } else if Policy::env_forbidden(k) {
            v.push(
                reason::ENV_NOT_ALLOWED,
                field,
                "may never be set (loader, kiln and fixed variables)",
            );
        } else if !policy.allowed_env.contains(k) {
            v.push(
                reason::ENV_NOT_ALLOWED,
                field,
                "is not on the allowlist of variables (see GetPolicy)",
            );
        } else if val.len() > MAX_ENV_VALUE_BYTES || val.contains('\0') {
            v.push(
                generic,
                field,
                format!("values are at most {MAX_ENV_VALUE_BYTES} bytes without NUL"),
            );
        } else {
            out.insert(k.clone(), val.clone());
        }
    }
    out
}

fn check_limits(req: Option<&pb::Limits>, policy: &Policy, v: &mut Violations) -> BuildLimits {
    let d = policy.default_limits;
    let max = policy.max_limits;
    let Some(req) = req else { return d };
    let mut out = d;
    let mut check_u64 = |name: &str, value: Option<u64>, max: u64, slot: &mut u64| {
        if let Some(x) = value {
            if x == 0 {
                v.push(
                    kiln_rpc::error::reason::INVALID_ARGUMENT,
                    format!("limits.{name}"),
                    "must be positive",
                );
            } else if x > max {
                v.push(
                    reason::LIMIT_TOO_HIGH,
                    format!("limits.{name}"),
                    format!("{x} is above the maximum {max}"),
                );
            } else {
                *slot = x;
            }
        }
    };
    check_u64(
        "memory_bytes",
        req.memory_bytes,
        max.memory_bytes,
        &mut out.memory_bytes,
    );
    check_u64(
        "output_bytes",
        req.output_bytes,
        max.output_bytes,
        &mut out.output_bytes,
    );
    check_u64(
        "disk_bytes",
        req.disk_bytes,
        max.disk_bytes,
        &mut out.disk_bytes,
    );
    let mut processes = u64::from(out.processes);
    check_u64(
        "processes",
        req.processes.map(u64::from),
        u64::from(max.processes),
        &mut processes,
    );
    let mut open_files = u64::from(out.open_files);
    check_u64(
        "open_files",
        req.open_files.map(u64::from),
        u64::from(max.open_files),
        &mut open_files,
    );
    out.processes = u32::try_from(processes).unwrap_or(max.processes);
    out.open_files = u32::try_from(open_files).unwrap_or(max.open_files);
    let mut check_dur =
        |name: &str, value: Option<&prost_types::Duration>, max: Duration, slot: &mut Duration| {
            if let Some(x) = value {
                match duration_from_proto(x).filter(|d| !d.is_zero()) {
                    None => v.push(
                        kiln_rpc::error::reason::INVALID_ARGUMENT,
                        format!("limits.{name}"),
                        "must be positive",
                    ),
                    Some(x) if x > max => {
                        v.push(
                            reason::LIMIT_TOO_HIGH,
                            format!("limits.{name}"),
                            format!("{x:?} is above the maximum {max:?}"),
                        );
                    }
                    Some(x) => *slot = x,
                }
            }
        };
    check_dur(
        "wall_timeout",
        req.wall_timeout.as_ref(),
        max.wall_timeout,
        &mut out.wall_timeout,
    );
    check_dur(
        "cpu_time",
        req.cpu_time.as_ref(),
        max.cpu_time,
        &mut out.cpu_time,
    );
    out
}

pub use kiln_rpc::idempotency::request_hash;
