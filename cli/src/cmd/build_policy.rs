//! `kiln build policy`: the rules builds run under on this server (GetPolicy), for
//! people: the sandbox, what a step may run, the limits a build gets and may ask for,
//! and the queue and workspace limits. `-o json` prints the same facts for programs,
//! sizes in bytes and durations in milliseconds.

use std::time::Duration;

use kiln_proto::build as pb;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::KilnChannel;
use serde_json::{Value, json};

use super::rpc_error;
use crate::context::Context;
use crate::output::{OutputFormat, print_json};

pub async fn run(
    ctx: &Context,
    client: &mut BuildServiceClient<KilnChannel>,
) -> anyhow::Result<i32> {
    let policy = client
        .get_policy(pb::GetPolicyRequest {})
        .await
        .map_err(|s| rpc_error(ctx, s))?
        .into_inner();
    match ctx.output {
        OutputFormat::Json => print_json(&policy_json(&policy)),
        _ => print!("{}", describe(&policy)),
    }
    Ok(0)
}

fn tier_name(tier: i32) -> &'static str {
    match pb::SandboxTier::try_from(tier).unwrap_or_default() {
        pb::SandboxTier::A => "A",
        pb::SandboxTier::B => "B",
        pb::SandboxTier::None => "none",
        pb::SandboxTier::Unspecified => "unknown",
    }
}

/// One row of the limits table: name, and how to show a value of it.
struct LimitRow {
    name: &'static str,
    /// The `-o json` key.
    key: &'static str,
    value: fn(&pb::Limits) -> Option<LimitValue>,
}

enum LimitValue {
    Time(Duration),
    Bytes(u64),
    Count(u64),
}

impl LimitValue {
    fn text(&self) -> String {
        match self {
            Self::Time(d) => duration(*d),
            Self::Bytes(b) => bytes(*b),
            Self::Count(n) => n.to_string(),
        }
    }

    fn json(&self) -> Value {
        match self {
            Self::Time(d) => json!(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            Self::Bytes(n) | Self::Count(n) => json!(n),
        }
    }
}

fn proto_time(d: Option<&prost_types::Duration>) -> Option<LimitValue> {
    d.and_then(|d| Duration::try_from(*d).ok())
        .map(LimitValue::Time)
}

const LIMITS: &[LimitRow] = &[
    LimitRow {
        name: "wall time of a build",
        key: "wall_timeout_ms",
        value: |l| proto_time(l.wall_timeout.as_ref()),
    },
    LimitRow {
        name: "CPU time of a step",
        key: "cpu_time_ms",
        value: |l| proto_time(l.cpu_time.as_ref()),
    },
    LimitRow {
        name: "memory of a step",
        key: "memory_bytes",
        value: |l| l.memory_bytes.map(LimitValue::Bytes),
    },
    LimitRow {
        name: "output of a build",
        key: "output_bytes",
        value: |l| l.output_bytes.map(LimitValue::Bytes),
    },
    LimitRow {
        name: "workspace growth",
        key: "disk_bytes",
        value: |l| l.disk_bytes.map(LimitValue::Bytes),
    },
    LimitRow {
        name: "processes of a step",
        key: "processes",
        value: |l| l.processes.map(|n| LimitValue::Count(n.into())),
    },
    LimitRow {
        name: "open files per process",
        key: "open_files",
        value: |l| l.open_files.map(|n| LimitValue::Count(n.into())),
    },
];

fn limits_json(limits: Option<&pb::Limits>) -> Value {
    let limits = limits.copied().unwrap_or_default();
    LIMITS
        .iter()
        .map(|row| {
            (
                row.key.to_owned(),
                (row.value)(&limits).map_or(Value::Null, |v| v.json()),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn policy_json(p: &pb::GetPolicyResponse) -> Value {
    json!({
        "sandbox": {
            "tier": tier_name(p.sandbox_tier),
            "description": p.sandbox_description,
            "features": p.sandbox_features,
        },
        "allowed_programs": p.allowed_programs,
        "allowed_env": p.allowed_env,
        "default_limits": limits_json(p.default_limits.as_ref()),
        "max_limits": limits_json(p.max_limits.as_ref()),
        "max_running_builds": p.max_running_builds,
        "max_running_builds_per_user": p.max_running_builds_per_user,
        "max_queued_builds_per_user": p.max_queued_builds_per_user,
        "max_steps": p.max_steps,
        "max_workspace_bytes": p.max_workspace_bytes,
        "max_workspace_files": p.max_workspace_files,
        "max_file_bytes": p.max_file_bytes,
    })
}

/// The policy as `kiln build policy` prints it.
fn describe(p: &pb::GetPolicyResponse) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let list = |items: &[String]| {
        if items.is_empty() {
            "(none)".to_owned()
        } else {
            items.join(" ")
        }
    };
    let _ = writeln!(out, "sandbox:   tier {}", tier_name(p.sandbox_tier));
    if !p.sandbox_description.is_empty() {
        let _ = writeln!(out, "           {}", p.sandbox_description);
    }
    // The description usually lists the features already; show them when it does not.
    if !p.sandbox_features.is_empty()
        && !p
            .sandbox_features
            .iter()
            .all(|f| p.sandbox_description.contains(f.as_str()))
    {
        let _ = writeln!(
            out,
            "           features: {}",
            p.sandbox_features.join(", ")
        );
    }
    let _ = writeln!(out, "programs:  {}", list(&p.allowed_programs));
    let _ = writeln!(out, "env:       {}", list(&p.allowed_env));
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<24} {:>10} {:>10}", "LIMIT", "DEFAULT", "MAX");
    let (defaults, max) = (
        p.default_limits.unwrap_or_default(),
        p.max_limits.unwrap_or_default(),
    );
    for row in LIMITS {
        let show = |limits: &pb::Limits| (row.value)(limits).map_or("-".to_owned(), |v| v.text());
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:>10}",
            row.name,
            show(&defaults),
            show(&max)
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "builds:    {} running at once, {} per user; {} queued per user; at most {} steps",
        p.max_running_builds,
        p.max_running_builds_per_user,
        p.max_queued_builds_per_user,
        p.max_steps
    );
    let _ = writeln!(
        out,
        "workspace: at most {} in {} entries, {} per file",
        bytes(p.max_workspace_bytes),
        p.max_workspace_files,
        bytes(p.max_file_bytes)
    );
    out
}

/// `16 MiB`, `1.5 GiB`, `512 B`: binary units, one decimal when it is not whole.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `15 min`, `1 h 30 min`, `45 s`, `500 ms`.
fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{} ms", d.as_millis());
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut parts = Vec::new();
    if h > 0 {
        parts.push(format!("{h} h"));
    }
    if m > 0 {
        parts.push(format!("{m} min"));
    }
    if s > 0 {
        parts.push(format!("{s} s"));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_like_a_person_writes_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(16 << 20), "16 MiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
        assert_eq!(duration(Duration::from_secs(900)), "15 min");
        assert_eq!(duration(Duration::from_secs(5400)), "1 h 30 min");
        assert_eq!(duration(Duration::from_millis(500)), "500 ms");
    }
}
