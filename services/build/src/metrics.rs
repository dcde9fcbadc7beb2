//! kiln-build's metrics (`kiln_build_…`): the queue (depth, wait, running builds), the
//! steps (duration by how they ended, output bytes) and the sandbox (spawn latency and
//! outcomes). Build watchers are the RPC layer's in-flight `WatchBuild` calls.

use std::time::Duration;

use kiln_metrics::{Counter, EncodeLabelSet, Family, Gauge, Histogram, Registry, Unit};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The metric families; they count from the start, registered or not.
#[derive(Debug, Clone)]
pub(crate) struct BuildMetrics {
    queue_depth: Gauge,
    queue_wait: Histogram,
    running: Gauge,
    step_duration: Family<ReasonLabels, Histogram>,
    output_bytes: Counter,
    spawn_duration: Histogram,
    spawns: Family<OutcomeLabels, Counter>,
}

impl Default for BuildMetrics {
    fn default() -> Self {
        Self {
            queue_depth: Gauge::default(),
            queue_wait: kiln_metrics::duration_histogram(),
            running: Gauge::default(),
            step_duration: Family::new_with_constructor(kiln_metrics::duration_histogram),
            output_bytes: Counter::default(),
            spawn_duration: kiln_metrics::latency_histogram(),
            spawns: Family::default(),
        }
    }
}

impl BuildMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("build");
        r.register(
            "queue_depth",
            "Builds queued and not yet started",
            self.queue_depth.clone(),
        );
        r.register_with_unit(
            "queue_wait",
            "Time from queueing to start of the builds that started",
            Unit::Seconds,
            self.queue_wait.clone(),
        );
        r.register("running", "Builds running now", self.running.clone());
        r.register_with_unit(
            "step_duration",
            "Wall time of build steps, by how they ended (the StepFinishedReason)",
            Unit::Seconds,
            self.step_duration.clone(),
        );
        r.register_with_unit(
            "output",
            "Step output (stdout and stderr) delivered to the build logs",
            Unit::Bytes,
            self.output_bytes.clone(),
        );
        r.register_with_unit(
            "sandbox_spawn_duration",
            "Time to start a step's sandbox, failed spawns included",
            Unit::Seconds,
            self.spawn_duration.clone(),
        );
        r.register(
            "sandbox_spawns",
            "Sandbox spawns by outcome (ok, invalid_command, invalid_working_dir, error)",
            self.spawns.clone(),
        );
    }

    pub fn queued(&self) {
        self.queue_depth.inc();
    }

    pub fn dequeued(&self) {
        self.queue_depth.dec();
    }

    pub fn started(&self, waited: Duration) {
        self.queue_depth.dec();
        self.running.inc();
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// The queue's depth as counted where the queue is shared (Postgres): builds queued
    /// through other replicas never pass this one's `queued`.
    pub fn set_queue_depth(&self, depth: i64) {
        self.queue_depth.set(depth);
    }

    pub fn finished(&self) {
        self.running.dec();
    }

    pub fn spawned(&self, took: Duration, outcome: &'static str) {
        self.spawn_duration.observe(took.as_secs_f64());
        self.spawns.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn step_finished(&self, reason: &'static str, took: Duration, output_bytes: u64) {
        self.step_duration
            .get_or_create(&ReasonLabels { reason })
            .observe(took.as_secs_f64());
        self.output_bytes.inc_by(output_bytes);
    }
}

/// The outcome label of a sandbox spawn.
pub(crate) fn spawn_outcome(result: &Result<impl Sized, kiln_sandbox::Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(kiln_sandbox::Error::InvalidCommand(_)) => "invalid_command",
        Err(kiln_sandbox::Error::InvalidWorkingDir { .. }) => "invalid_working_dir",
        Err(_) => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_gauges_follow_builds_through_the_queue() {
        let metrics = BuildMetrics::default();
        let mut registry = kiln_metrics::registry();
        metrics.register(&mut registry);
        metrics.queued();
        metrics.queued();
        metrics.queued();
        metrics.dequeued(); // cancelled while queued
        metrics.started(Duration::from_secs(2));
        let text = kiln_metrics::render(&registry);
        assert!(text.contains("kiln_build_queue_depth 1\n"), "{text}");
        assert!(text.contains("kiln_build_running 1\n"), "{text}");
        assert!(
            text.contains("kiln_build_queue_wait_seconds_sum 2.0"),
            "{text}"
        );
        metrics.finished();
        assert!(kiln_metrics::render(&registry).contains("kiln_build_running 0\n"));
    }
}
