//! The one place where kiln-build's model (`model.rs`) meets the contract
//! (`kiln.build.v1`): handlers convert at the edge with these functions, and nothing
//! else builds a `pb::Build` or reads a `pb::Limits`.
//!
//! Requests come in through `validate.rs`, which checks each field and produces model
//! types; everything a client reads goes out through here. Build events are the
//! exception on purpose: the event log stores and replays `pb::BuildEvent`s as they
//! were sent, so that a reconnecting watcher gets byte for byte what a live one got.
//!
//! Also here: reading the proto blobs that releases before the model stored
//! (`builds.spec`, `builds.step_results`), for the backfill at open (see `store.rs`).

use std::time::Duration;

use kiln_proto::build as pb;
use prost::Message;

use crate::config::BuildLimits;
use crate::error::{BuildError, Result};
use crate::model::{Build, BuildSpec, BuildState, Step, StepEnd, StepResult};
use crate::store::WorkspaceRow;

/// Unix microseconds (the store's unit) as a proto timestamp.
pub fn timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

pub fn workspace_to_proto(w: &WorkspaceRow) -> pb::Workspace {
    pb::Workspace {
        id: w.id.clone(),
        owner: w.owner.clone(),
        labels: w.labels.clone(),
        size_bytes: w.size_bytes,
        file_count: w.file_count,
        created_at: Some(timestamp(w.created_at)),
        updated_at: Some(timestamp(w.updated_at)),
        name: w.name.clone().unwrap_or_default(),
    }
}

pub fn duration_to_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// `None` for a negative or out-of-range duration.
pub fn duration_from_proto(d: &prost_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(d.seconds).ok()?,
        u32::try_from(d.nanos).ok()?,
    ))
}

pub fn state_to_proto(s: BuildState) -> pb::BuildState {
    match s {
        BuildState::Queued => pb::BuildState::Queued,
        BuildState::Running => pb::BuildState::Running,
        BuildState::Succeeded => pb::BuildState::Succeeded,
        BuildState::Failed => pb::BuildState::Failed,
        BuildState::Cancelled => pb::BuildState::Cancelled,
        BuildState::TimedOut => pb::BuildState::TimedOut,
        BuildState::Interrupted => pb::BuildState::Interrupted,
    }
}

pub fn step_end_to_proto(r: StepEnd) -> pb::StepFinishedReason {
    match r {
        StepEnd::Exited => pb::StepFinishedReason::Exited,
        StepEnd::TimedOut => pb::StepFinishedReason::TimedOut,
        StepEnd::Cancelled => pb::StepFinishedReason::Cancelled,
        StepEnd::OutputLimit => pb::StepFinishedReason::OutputLimit,
        StepEnd::MemoryLimit => pb::StepFinishedReason::MemoryLimit,
        StepEnd::SpawnFailed => pb::StepFinishedReason::SpawnFailed,
        StepEnd::DiskLimit => pb::StepFinishedReason::DiskLimit,
    }
}

fn step_end_from_proto(r: i32) -> Option<StepEnd> {
    Some(match pb::StepFinishedReason::try_from(r).ok()? {
        pb::StepFinishedReason::Exited => StepEnd::Exited,
        pb::StepFinishedReason::TimedOut => StepEnd::TimedOut,
        pb::StepFinishedReason::Cancelled => StepEnd::Cancelled,
        pb::StepFinishedReason::OutputLimit => StepEnd::OutputLimit,
        pb::StepFinishedReason::MemoryLimit => StepEnd::MemoryLimit,
        pb::StepFinishedReason::SpawnFailed => StepEnd::SpawnFailed,
        pb::StepFinishedReason::DiskLimit => StepEnd::DiskLimit,
        pb::StepFinishedReason::Unspecified => return None,
    })
}

/// The limits as the contract shows them (every field set).
pub fn limits_to_proto(l: &BuildLimits) -> pb::Limits {
    pb::Limits {
        wall_timeout: Some(duration_to_proto(l.wall_timeout)),
        cpu_time: Some(duration_to_proto(l.cpu_time)),
        memory_bytes: Some(l.memory_bytes),
        output_bytes: Some(l.output_bytes),
        disk_bytes: Some(l.disk_bytes),
        processes: Some(l.processes),
        open_files: Some(l.open_files),
    }
}

/// A step as the client sent it: a command string stays a command string.
pub fn step_to_proto(s: &Step) -> pb::Step {
    pb::Step {
        argv: if s.command.is_some() {
            Vec::new()
        } else {
            s.argv.clone()
        },
        command: s.command.clone(),
        working_dir: s.working_dir.clone(),
        timeout: s.timeout.map(duration_to_proto),
        allow_failure: s.allow_failure,
    }
}

pub fn step_result_to_proto(r: &StepResult) -> pb::StepFinished {
    pb::StepFinished {
        step_index: r.step_index,
        exit_code: r.exit_code,
        signal: r.signal,
        reason: step_end_to_proto(r.reason) as i32,
        duration: r.duration.map(duration_to_proto),
        cpu_time: r.cpu_time.map(duration_to_proto),
        peak_memory_bytes: r.peak_memory_bytes,
        message: r.message.clone(),
        succeeded: r.succeeded,
    }
}

/// The build as GetBuild, ListBuilds and StartBuild answer it; `queue_position` only
/// for a queued build (the caller asks the control).
pub fn build_to_proto(b: &Build, queue_position: Option<u32>) -> pb::Build {
    pb::Build {
        id: b.id.clone(),
        workspace_id: b.workspace_id.clone(),
        owner: b.owner.clone(),
        state: state_to_proto(b.state) as i32,
        steps: b.spec.steps.iter().map(step_to_proto).collect(),
        env: b.spec.env.clone().into_iter().collect(),
        limits: Some(limits_to_proto(&b.spec.limits)),
        labels: b.spec.labels.clone().into_iter().collect(),
        created_at: Some(timestamp(b.created_at)),
        started_at: b.started_at.map(timestamp),
        finished_at: b.finished_at.map(timestamp),
        failure_message: b.failure_message.clone(),
        last_sequence: b.last_sequence,
        queue_position: queue_position.filter(|_| b.state == BuildState::Queued),
        current_step_index: b.current_step,
        step_results: b.step_results.iter().map(step_result_to_proto).collect(),
    }
}

/// A `builds.spec` blob of the releases before the model: a `pb::Build` with the
/// steps, env, limits (always all set: they were resolved at StartBuild) and labels.
pub fn legacy_spec(blob: &[u8]) -> Result<BuildSpec> {
    let b = pb::Build::decode(blob).map_err(|e| BuildError::Corrupt(format!("build spec: {e}")))?;
    let steps = b
        .steps
        .into_iter()
        .map(|s| {
            // Validated when it was accepted, so the split succeeds as it did then.
            let argv = match &s.command {
                Some(cmd) => shell_words::split(cmd)
                    .map_err(|e| BuildError::Corrupt(format!("stored command: {e}")))?,
                None => s.argv,
            };
            Ok(Step {
                argv,
                command: s.command,
                working_dir: s.working_dir,
                timeout: s.timeout.as_ref().and_then(duration_from_proto),
                allow_failure: s.allow_failure,
            })
        })
        .collect::<Result<_>>()?;
    Ok(BuildSpec {
        steps,
        env: b.env.into_iter().collect(),
        limits: legacy_limits(&b.limits.unwrap_or_default()),
        labels: b.labels.into_iter().collect(),
    })
}

/// Limits of a legacy spec. Every release filled in all of them; a field missing
/// anyway takes the out-of-the-box default (the configured one is not known where the
/// store opens).
fn legacy_limits(l: &pb::Limits) -> BuildLimits {
    let d = BuildLimits::DEFAULT;
    let dur = |x: &Option<prost_types::Duration>, or: Duration| {
        x.as_ref().and_then(duration_from_proto).unwrap_or(or)
    };
    BuildLimits {
        wall_timeout: dur(&l.wall_timeout, d.wall_timeout),
        cpu_time: dur(&l.cpu_time, d.cpu_time),
        memory_bytes: l.memory_bytes.unwrap_or(d.memory_bytes),
        output_bytes: l.output_bytes.unwrap_or(d.output_bytes),
        disk_bytes: l.disk_bytes.unwrap_or(d.disk_bytes),
        processes: l.processes.unwrap_or(d.processes),
        open_files: l.open_files.unwrap_or(d.open_files),
    }
}

/// A `builds.step_results` blob of the releases before the model: StepFinished
/// messages, each length-delimited, in step order.
pub fn legacy_step_results(mut blob: &[u8]) -> Result<Vec<StepResult>> {
    let mut out = Vec::new();
    while !blob.is_empty() {
        let r = pb::StepFinished::decode_length_delimited(&mut blob)
            .map_err(|e| BuildError::Corrupt(format!("step results: {e}")))?;
        let reason = step_end_from_proto(r.reason)
            .ok_or_else(|| BuildError::Corrupt(format!("step result with reason {}", r.reason)))?;
        out.push(StepResult {
            step_index: r.step_index,
            exit_code: r.exit_code,
            signal: r.signal,
            reason,
            duration: r.duration.as_ref().and_then(duration_from_proto),
            cpu_time: r.cpu_time.as_ref().and_then(duration_from_proto),
            peak_memory_bytes: r.peak_memory_bytes,
            message: r.message,
            succeeded: r.succeeded,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_state_codes_are_the_wire_numbers() {
        for s in [
            BuildState::Queued,
            BuildState::Running,
            BuildState::Succeeded,
            BuildState::Failed,
            BuildState::Cancelled,
            BuildState::TimedOut,
            BuildState::Interrupted,
        ] {
            assert_eq!(s.code(), state_to_proto(s) as i32, "{s:?}");
        }
    }

    #[test]
    fn step_metric_names_are_the_wire_names() {
        for r in [
            StepEnd::Exited,
            StepEnd::TimedOut,
            StepEnd::Cancelled,
            StepEnd::OutputLimit,
            StepEnd::MemoryLimit,
            StepEnd::SpawnFailed,
            StepEnd::DiskLimit,
        ] {
            assert_eq!(r.metric_name(), step_end_to_proto(r).as_str_name());
            assert_eq!(step_end_from_proto(step_end_to_proto(r) as i32), Some(r));
        }
    }

    #[test]
    fn a_command_step_goes_out_as_the_command_it_came_in_as() {
        let step = Step {
            argv: vec!["make".into(), "a b".into()],
            command: Some("make 'a b'".into()),
            working_dir: "src".into(),
            timeout: Some(Duration::new(1, 5)),
            allow_failure: true,
        };
        let out = step_to_proto(&step);
        assert!(out.argv.is_empty());
        assert_eq!(out.command.as_deref(), Some("make 'a b'"));
        assert_eq!(
            out.timeout,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 5
            })
        );
    }

    #[test]
    fn a_legacy_blob_reads_into_the_model() {
        let blob = pb::Build {
            steps: vec![pb::Step {
                command: Some("cargo test -- --nocapture".into()),
                ..Default::default()
            }],
            limits: Some(limits_to_proto(&BuildLimits::MAX)),
            ..Default::default()
        }
        .encode_to_vec();
        let spec = legacy_spec(&blob).expect("spec");
        assert_eq!(spec.steps[0].argv, ["cargo", "test", "--", "--nocapture"]);
        assert_eq!(spec.limits, BuildLimits::MAX);
        assert!(legacy_spec(b"\xff\xff").is_err(), "garbage is corrupt");
        let mut results = Vec::new();
        pb::StepFinished {
            step_index: 0,
            reason: pb::StepFinishedReason::SpawnFailed as i32,
            message: "no such program".into(),
            ..Default::default()
        }
        .encode_length_delimited(&mut results)
        .expect("encode");
        let read = legacy_step_results(&results).expect("results");
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].reason, StepEnd::SpawnFailed);
        assert_eq!(read[0].duration, None);
    }
}
