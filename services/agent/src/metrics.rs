//! kiln-agent's metrics (`kiln_agent_…`): tasks by phase, how tasks ended, model calls
//! (count and latency by phase and outcome), the tokens they used, and the fix
//! iterations a finished task needed.
//!
//! Label values are the contract's names: phases without their `PHASE_` prefix
//! (`ANALYZE`, `FIX`, …) and the `TaskResult` reasons (`MAX_ITERATIONS`, `STUCK`, …,
//! `NONE` for a task that ended DONE) — fixed sets, never a task or user id.

use std::time::Duration;

use kiln_metrics::{Counter, EncodeLabelSet, Family, Gauge, Histogram, Registry, Unit};
use kiln_proto::agent::Phase;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FinishedLabels {
    phase: &'static str,
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CallLabels {
    phase: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenLabels {
    kind: &'static str,
}

/// How a model call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallOutcome {
    /// The stream ended with an answer.
    Ok,
    /// The provider failed (HTTP error, unreachable, a broken stream).
    Error,
    /// The task stopped during the call (cancelled, out of time, service shutting down).
    Abandoned,
}

impl CallOutcome {
    fn label(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Error => "error",
            CallOutcome::Abandoned => "abandoned",
        }
    }
}

/// The phases a task can be in while it is unfinished (the `kiln_agent_tasks` gauge).
const OPEN_PHASES: [Phase; 7] = [
    Phase::Queued,
    Phase::Analyze,
    Phase::Plan,
    Phase::Generate,
    Phase::Validate,
    Phase::Build,
    Phase::Fix,
];

/// The label of `phase`: its contract name without `PHASE_`.
fn phase_label(phase: Phase) -> &'static str {
    phase.as_str_name().trim_start_matches("PHASE_")
}

fn is_open(phase: Phase) -> bool {
    OPEN_PHASES.contains(&phase)
}

/// The metric families; they count from the start, registered or not.
#[derive(Debug, Clone)]
pub(crate) struct AgentMetrics {
    tasks: Family<PhaseLabels, Gauge>,
    finished: Family<FinishedLabels, Counter>,
    model_calls: Family<CallLabels, Counter>,
    model_call_duration: Family<CallLabels, Histogram>,
    tokens: Family<TokenLabels, Counter>,
    fix_iterations: Histogram,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let metrics = Self {
            tasks: Family::default(),
            finished: Family::default(),
            model_calls: Family::default(),
            // Model calls last from a second to minutes: the long-duration buckets.
            model_call_duration: Family::new_with_constructor(kiln_metrics::duration_histogram),
            tokens: Family::default(),
            // 0 to the largest sensible `max_iterations`; the default is 3.
            fix_iterations: Histogram::new([0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0]),
        };
        // Every phase and both token kinds exist from the start at 0, so that a
        // dashboard shows a flat line instead of "no data" and `rate()` sees the first
        // increase.
        for phase in OPEN_PHASES {
            drop(metrics.tasks.get_or_create(&PhaseLabels {
                phase: phase_label(phase),
            }));
        }
        for kind in ["prompt", "completion"] {
            drop(metrics.tokens.get_or_create(&TokenLabels { kind }));
        }
        metrics
    }
}

impl AgentMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("agent");
        r.register(
            "tasks",
            "Unfinished tasks by the phase they are in (QUEUED, ANALYZE, PLAN, GENERATE, VALIDATE, BUILD, FIX)",
            self.tasks.clone(),
        );
        r.register(
            "tasks_finished",
            "Tasks that ended, by final phase (DONE, FAILED, CANCELLED) and TaskResult reason (NONE when DONE)",
            self.finished.clone(),
        );
        r.register(
            "model_calls",
            "Model calls by phase (PLAN, GENERATE, FIX) and outcome (ok, error, abandoned)",
            self.model_calls.clone(),
        );
        r.register_with_unit(
            "model_call_duration",
            "Wall time of model calls, from the request to the end of the streamed answer, by phase and outcome",
            Unit::Seconds,
            self.model_call_duration.clone(),
        );
        r.register(
            "model_tokens",
            "Tokens the provider reported, by kind (prompt, completion)",
            self.tokens.clone(),
        );
        r.register(
            "task_fix_iterations",
            "Fix iterations of each finished task",
            self.fix_iterations.clone(),
        );
    }

    /// A runner took up a task in `phase` (new, or found unfinished at start).
    pub fn task_opened(&self, phase: Phase) {
        self.enter(phase);
    }

    /// A runner let go of a task it did not finish (the service is stopping).
    pub fn task_left(&self, phase: Phase) {
        self.leave(phase);
    }

    /// A task moved from `from` to `to`.
    pub fn phase_changed(&self, from: Phase, to: Phase) {
        self.leave(from);
        self.enter(to);
    }

    /// A task ended in `phase` with `reason` after `iterations` fixes.
    pub fn task_finished(&self, phase: Phase, reason: &str, iterations: u32) {
        let reason = if reason.is_empty() { "NONE" } else { reason };
        self.finished
            .get_or_create(&FinishedLabels {
                phase: phase_label(phase),
                reason: reason.to_owned(),
            })
            .inc();
        self.fix_iterations.observe(f64::from(iterations));
    }

    /// A model call of `phase` ended as `outcome` after `took`.
    pub fn model_call(&self, phase: Phase, outcome: CallOutcome, took: Duration) {
        let labels = CallLabels {
            phase: phase_label(phase),
            outcome: outcome.label(),
        };
        self.model_calls.get_or_create(&labels).inc();
        self.model_call_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn tokens(&self, prompt: u64, completion: u64) {
        self.tokens
            .get_or_create(&TokenLabels { kind: "prompt" })
            .inc_by(prompt);
        self.tokens
            .get_or_create(&TokenLabels { kind: "completion" })
            .inc_by(completion);
    }

    fn enter(&self, phase: Phase) {
        if is_open(phase) {
            self.tasks
                .get_or_create(&PhaseLabels {
                    phase: phase_label(phase),
                })
                .inc();
        }
    }

    fn leave(&self, phase: Phase) {
        if is_open(phase) {
            self.tasks
                .get_or_create(&PhaseLabels {
                    phase: phase_label(phase),
                })
                .dec();
        }
    }
}

/// Counts a model call when dropped: a call whose future is dropped mid-stream (the
/// task's stops race the step) is `abandoned` unless [`finish`](Self::finish) said how it
/// ended.
pub(crate) struct CallTimer<'a> {
    metrics: &'a AgentMetrics,
    phase: Phase,
    started: std::time::Instant,
    outcome: CallOutcome,
}

impl<'a> CallTimer<'a> {
    pub fn start(metrics: &'a AgentMetrics, phase: Phase) -> Self {
        Self {
            metrics,
            phase,
            started: std::time::Instant::now(),
            outcome: CallOutcome::Abandoned,
        }
    }

    pub fn finish(&mut self, outcome: CallOutcome) {
        self.outcome = outcome;
    }
}

impl Drop for CallTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .model_call(self.phase, self.outcome, self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(metrics: &AgentMetrics) -> String {
        let mut registry = kiln_metrics::registry();
        metrics.register(&mut registry);
        kiln_metrics::render(&registry)
    }

    #[test]
    fn the_phase_gauge_follows_a_task_and_final_phases_are_not_counted() {
        let metrics = AgentMetrics::default();
        metrics.task_opened(Phase::Queued);
        metrics.phase_changed(Phase::Queued, Phase::Analyze);
        let text = rendered(&metrics);
        assert!(
            text.contains("kiln_agent_tasks{phase=\"QUEUED\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("kiln_agent_tasks{phase=\"ANALYZE\"} 1\n"),
            "{text}"
        );
        metrics.phase_changed(Phase::Analyze, Phase::Done);
        metrics.task_finished(Phase::Done, "", 0);
        let text = rendered(&metrics);
        assert!(
            text.contains("kiln_agent_tasks{phase=\"ANALYZE\"} 0\n"),
            "{text}"
        );
        assert!(!text.contains("phase=\"DONE\"} "), "{text}");
        assert!(
            text.contains("kiln_agent_tasks_finished_total{phase=\"DONE\",reason=\"NONE\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn a_dropped_call_is_abandoned_and_a_finished_one_keeps_its_outcome() {
        let metrics = AgentMetrics::default();
        drop(CallTimer::start(&metrics, Phase::Plan));
        let mut call = CallTimer::start(&metrics, Phase::Fix);
        call.finish(CallOutcome::Error);
        drop(call);
        let text = rendered(&metrics);
        assert!(
            text.contains("kiln_agent_model_calls_total{phase=\"PLAN\",outcome=\"abandoned\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kiln_agent_model_calls_total{phase=\"FIX\",outcome=\"error\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "kiln_agent_model_call_duration_seconds_count{phase=\"FIX\",outcome=\"error\"} 1\n"
            ),
            "{text}"
        );
    }
}
