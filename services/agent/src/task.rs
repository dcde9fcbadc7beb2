//! A task as kiln-agent keeps it: the spec it was started with and the workflow's
//! progress, one serde record written whole at every phase change (so a restart resumes
//! exactly where the last transition left it), and its one conversion to the wire.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_proto::agent as pb;
use kiln_proto::build as build_pb;
use prost::Message as _;
use serde::{Deserialize, Serialize};

/// A build step: argv already split, so it is converted once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
}

impl StepSpec {
    pub fn new(argv: &[&str]) -> Self {
        Self {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            working_dir: String::new(),
        }
    }

    pub fn to_proto(&self) -> build_pb::Step {
        build_pb::Step {
            argv: self.argv.clone(),
            working_dir: self.working_dir.clone(),
            ..Default::default()
        }
    }

    /// The command line for people and prompts.
    pub fn display(&self) -> String {
        shell_words::join(&self.argv)
    }
}

/// Token counts, as the proto's Usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub model_calls: u32,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    pub fn to_proto(self) -> pb::Usage {
        pb::Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            model_calls: self.model_calls,
        }
    }
}

/// The model's answer waiting for VALIDATE (kept so that a restart re-validates it
/// instead of asking the model again; parsing is deterministic).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingReply {
    pub raw: String,
}

/// The build in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentBuild {
    pub build_id: String,
    /// Started builds of this iteration (a build INTERRUPTED by a restart is started
    /// again under a new request id).
    pub attempt: u32,
}

/// Everything about a task except its event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub owner: String,
    /// The owner's user name, for logs ("agent on behalf of alice").
    pub owner_name: String,
    pub actor: String,
    pub prompt: String,
    pub toolchain: String,
    pub model: String,
    pub max_iterations: u32,
    pub timeout_micros: i64,
    pub max_tokens: u64,
    pub labels: BTreeMap<String, String>,
    /// `kiln.build.v1.Limits`, encoded; empty: the policy's defaults.
    #[serde(default)]
    pub build_limits: Vec<u8>,
    pub steps: Vec<StepSpec>,
    /// The steps came with the request: the model may not change them.
    pub steps_fixed: bool,
    pub workspace_id: String,
    /// The task created the workspace (rather than working in the user's).
    pub workspace_created: bool,

    pub phase: i32,
    pub iteration: u32,
    pub usage: Usage,
    pub build_ids: Vec<String>,
    /// The next model call's index.
    pub call_index: u32,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    /// When the time budget runs out (Unix µs).
    pub deadline: i64,
    pub failure_message: String,
    pub result_reason: String,
    pub result_message: String,

    /// The plan's summary (empty when there was no usable plan).
    pub plan: String,
    /// The workspace's text files as the agent knows them: what was there at ANALYZE
    /// and what it wrote since. The model sees these.
    pub files: BTreeMap<String, String>,
    pub pending: Option<PendingReply>,
    /// What the next FIX prompt is told: the located build errors or the blocking
    /// findings.
    pub feedback: String,
    /// The fingerprint of the last failed build's errors (the stuck detector).
    pub last_error_signature: Option<String>,
    /// The fingerprint of the last files the model returned (the stuck detector).
    pub last_reply_signature: Option<String>,
    pub build: Option<CurrentBuild>,
}

impl TaskRecord {
    pub fn phase(&self) -> pb::Phase {
        pb::Phase::try_from(self.phase).unwrap_or(pb::Phase::Unspecified)
    }

    pub fn is_final(&self) -> bool {
        is_final(self.phase())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_micros(u64::try_from(self.timeout_micros).unwrap_or(0))
    }

    pub fn limits(&self) -> Option<build_pb::Limits> {
        if self.build_limits.is_empty() {
            None
        } else {
            build_pb::Limits::decode(self.build_limits.as_slice()).ok()
        }
    }

    /// The wire form; `last_sequence` comes from the store's column.
    pub fn to_proto(&self, last_sequence: u64) -> pb::Task {
        pb::Task {
            id: self.id.clone(),
            owner: self.owner.clone(),
            prompt: self.prompt.clone(),
            toolchain: self.toolchain.clone(),
            model: self.model.clone(),
            max_iterations: self.max_iterations,
            workspace_id: self.workspace_id.clone(),
            phase: self.phase,
            iteration: self.iteration,
            labels: self.labels.clone().into_iter().collect(),
            created_at: Some(timestamp(self.created_at)),
            updated_at: Some(timestamp(self.updated_at)),
            finished_at: self.finished_at.map(timestamp),
            failure_message: self.failure_message.clone(),
            build_ids: self.build_ids.clone(),
            usage: Some(self.usage.to_proto()),
            last_sequence,
            timeout: Some(proto_duration(self.timeout())),
            max_tokens: self.max_tokens,
            steps: self.steps.iter().map(StepSpec::to_proto).collect(),
            actor: self.actor.clone(),
        }
    }

    pub fn result(&self) -> pb::TaskResult {
        pb::TaskResult {
            phase: self.phase,
            message: self.result_message.clone(),
            reason: self.result_reason.clone(),
            workspace_id: self.workspace_id.clone(),
            build_id: self.build_ids.last().cloned().unwrap_or_default(),
            iterations: self.iteration,
            usage: Some(self.usage.to_proto()),
        }
    }
}

pub fn is_final(phase: pb::Phase) -> bool {
    matches!(
        phase,
        pb::Phase::Done | pb::Phase::Failed | pb::Phase::Cancelled
    )
}

/// Unix microseconds.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

pub fn timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}
