//! kiln-build's own build types: what the store saves, what the runner and control
//! work with. Proto types appear only in `wire.rs` and the handlers that call it.
//!
//! A [`BuildSpec`] is a StartBuildRequest after validation: argv already split (a
//! `command` string is split once, at StartBuild), the environment checked and sorted,
//! the limits resolved against the configured defaults and maxima. Nothing downstream
//! splits a command or fills in a limit again.
//!
//! The spec and the step results are persisted as JSON (`builds.spec_json`,
//! `builds.step_results_json`); the field names below are therefore a stored format:
//! rename one only with a migration. Times are Unix microseconds, the store's unit.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::BuildLimits;

/// Where a build is in its life: QUEUED → RUNNING → one of the final states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    /// It was running when its runner went away (crash, shutdown, a lost lease).
    Interrupted,
}

impl BuildState {
    /// The number in the `builds.state` column. The released schema stored the wire
    /// enum's numbers there, so these are the same numbers (`wire` tests that they stay
    /// so); the column is indexed and filtered on, which is why it is not JSON.
    pub fn code(self) -> i32 {
        match self {
            Self::Queued => 1,
            Self::Running => 2,
            Self::Succeeded => 3,
            Self::Failed => 4,
            Self::Cancelled => 5,
            Self::TimedOut => 6,
            Self::Interrupted => 7,
        }
    }

    /// The state stored as `code`; `None` for a number no release wrote.
    pub fn from_code(code: i32) -> Option<Self> {
        Some(match code {
            1 => Self::Queued,
            2 => Self::Running,
            3 => Self::Succeeded,
            4 => Self::Failed,
            5 => Self::Cancelled,
            6 => Self::TimedOut,
            7 => Self::Interrupted,
            _ => return None,
        })
    }

    /// Whether the build has ended (nothing changes it any more).
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }
}

/// One step of a build: one command, run in a fresh sandbox over the workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The program and its arguments, split and checked against the allowlist.
    pub argv: Vec<String>,
    /// The command string the client sent, when it sent one instead of argv: shown
    /// back as sent (GetBuild), never run (`argv` is its split form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Relative to the workspace; empty for its root.
    #[serde(default)]
    pub working_dir: String,
    /// The step's own timeout, at most the build's wall timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// A failing exit does not fail the build.
    #[serde(default)]
    pub allow_failure: bool,
}

/// What a build runs, as accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    pub steps: Vec<Step>,
    /// The request's variables (allowlisted at StartBuild), sorted by name.
    pub env: BTreeMap<String, String>,
    /// Complete: every field resolved at StartBuild.
    #[serde(with = "stored_limits")]
    pub limits: BuildLimits,
    pub labels: BTreeMap<String, String>,
}

/// Why a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepEnd {
    Exited,
    TimedOut,
    Cancelled,
    OutputLimit,
    MemoryLimit,
    SpawnFailed,
    DiskLimit,
}

impl From<kiln_sandbox::Reason> for StepEnd {
    fn from(r: kiln_sandbox::Reason) -> Self {
        use kiln_sandbox::Reason;
        match r {
            Reason::Exited => Self::Exited,
            Reason::DiskLimit => Self::DiskLimit,
            Reason::TimedOut => Self::TimedOut,
            Reason::Cancelled => Self::Cancelled,
            Reason::OutputLimit => Self::OutputLimit,
            Reason::MemoryLimit => Self::MemoryLimit,
            Reason::SpawnFailed => Self::SpawnFailed,
        }
    }
}

impl StepEnd {
    /// The `reason` label of the step metrics: the names dashboards already use (the
    /// wire enum's; `wire` tests that they stay equal).
    pub fn metric_name(self) -> &'static str {
        match self {
            Self::Exited => "STEP_FINISHED_REASON_EXITED",
            Self::TimedOut => "STEP_FINISHED_REASON_TIMED_OUT",
            Self::Cancelled => "STEP_FINISHED_REASON_CANCELLED",
            Self::OutputLimit => "STEP_FINISHED_REASON_OUTPUT_LIMIT",
            Self::MemoryLimit => "STEP_FINISHED_REASON_MEMORY_LIMIT",
            Self::SpawnFailed => "STEP_FINISHED_REASON_SPAWN_FAILED",
            Self::DiskLimit => "STEP_FINISHED_REASON_DISK_LIMIT",
        }
    }
}

/// How one step turned out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResult {
    pub step_index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub reason: StepEnd,
    /// Unset when the step never started (spawn failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time: Option<Duration>,
    #[serde(default)]
    pub peak_memory_bytes: u64,
    #[serde(default)]
    pub message: String,
    pub succeeded: bool,
}

impl StepResult {
    /// Why a failed step failed, for the build's failure message.
    pub fn describe(&self) -> String {
        if !self.message.is_empty() {
            return self.message.clone();
        }
        match (self.exit_code, self.signal) {
            (Some(c), _) => format!("exited with code {c}"),
            (_, Some(s)) => format!("was killed by signal {s}"),
            _ => "failed".into(),
        }
    }
}

/// A build: its spec and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub id: String,
    pub workspace_id: String,
    pub owner: String,
    pub state: BuildState,
    pub spec: BuildSpec,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub failure_message: String,
    /// The sequence of the log's last event.
    pub last_sequence: u64,
    /// The index of the step running now.
    pub current_step: Option<u32>,
    /// One per finished step, in step order.
    pub step_results: Vec<StepResult>,
}

impl Build {
    /// A build just accepted: queued, its log holding the Queued event (sequence 1).
    pub fn queued(
        id: String,
        workspace_id: String,
        owner: String,
        spec: BuildSpec,
        created_at: i64,
    ) -> Self {
        Self {
            id,
            workspace_id,
            owner,
            state: BuildState::Queued,
            spec,
            created_at,
            started_at: None,
            finished_at: None,
            failure_message: String::new(),
            last_sequence: 1,
            current_step: None,
            step_results: Vec::new(),
        }
    }
}

/// The stored shape of [`BuildLimits`]: their config form spells durations as text
/// ("15m"), which is for people; the store keeps serde's exact `{secs, nanos}`.
mod stored_limits {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::config::BuildLimits;

    #[derive(Serialize, Deserialize)]
    struct Stored {
        wall_timeout: Duration,
        cpu_time: Duration,
        memory_bytes: u64,
        output_bytes: u64,
        disk_bytes: u64,
        processes: u32,
        open_files: u32,
    }

    pub fn serialize<S: Serializer>(l: &BuildLimits, s: S) -> Result<S::Ok, S::Error> {
        Stored {
            wall_timeout: l.wall_timeout,
            cpu_time: l.cpu_time,
            memory_bytes: l.memory_bytes,
            output_bytes: l.output_bytes,
            disk_bytes: l.disk_bytes,
            processes: l.processes,
            open_files: l.open_files,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BuildLimits, D::Error> {
        let s = Stored::deserialize(d)?;
        Ok(BuildLimits {
            wall_timeout: s.wall_timeout,
            cpu_time: s.cpu_time,
            memory_bytes: s.memory_bytes,
            output_bytes: s.output_bytes,
            disk_bytes: s.disk_bytes,
            processes: s.processes,
            open_files: s.open_files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BuildSpec {
        BuildSpec {
            steps: vec![
                Step {
                    argv: vec!["make".into(), "all".into()],
                    command: Some("make all".into()),
                    working_dir: "src".into(),
                    timeout: Some(Duration::new(3, 250)),
                    allow_failure: true,
                },
                Step {
                    argv: vec!["cargo".into(), "test".into()],
                    command: None,
                    working_dir: String::new(),
                    timeout: None,
                    allow_failure: false,
                },
            ],
            env: BTreeMap::from([("RUST_LOG".into(), "debug".into())]),
            limits: BuildLimits {
                wall_timeout: Duration::new(60, 5),
                ..BuildLimits::DEFAULT
            },
            labels: BTreeMap::from([("ci".into(), "yes".into())]),
        }
    }

    #[test]
    fn a_spec_reads_back_from_its_json_exactly() {
        let json = serde_json::to_string(&spec()).expect("json");
        let back: BuildSpec = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, spec());
    }

    /// The stored format is a contract with every database already written: this is
    /// what a release wrote, and it must keep reading.
    #[test]
    fn the_stored_json_format_keeps_reading() {
        let stored = r#"{"steps":[{"argv":["make"],"command":"make","working_dir":"","allow_failure":false}],
            "env":{},"labels":{},
            "limits":{"wall_timeout":{"secs":900,"nanos":0},"cpu_time":{"secs":600,"nanos":0},
                      "memory_bytes":1,"output_bytes":2,"disk_bytes":3,"processes":4,"open_files":5}}"#;
        let spec: BuildSpec = serde_json::from_str(stored).expect("parse");
        assert_eq!(spec.steps[0].argv, ["make"]);
        assert_eq!(spec.limits.wall_timeout, Duration::from_secs(900));
        assert_eq!(spec.limits.open_files, 5);
        let result: StepResult = serde_json::from_str(
            r#"{"step_index":0,"reason":"output_limit","exit_code":1,"succeeded":false}"#,
        )
        .expect("parse");
        assert_eq!(result.reason, StepEnd::OutputLimit);
        assert_eq!(result.duration, None);
    }

    #[test]
    fn every_state_reads_back_from_its_code() {
        for s in [
            BuildState::Queued,
            BuildState::Running,
            BuildState::Succeeded,
            BuildState::Failed,
            BuildState::Cancelled,
            BuildState::TimedOut,
            BuildState::Interrupted,
        ] {
            assert_eq!(BuildState::from_code(s.code()), Some(s));
        }
        assert_eq!(BuildState::from_code(0), None);
    }
}
