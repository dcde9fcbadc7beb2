//! Sampling decided before a call's span is opened, so that a call whose trace is not
//! recorded costs what a call without tracing costs.
//!
//! `tracing-opentelemetry` builds an OpenTelemetry span for every `tracing` span it sees
//! and asks the sampler only when the span ends: at 1% sampling a call still paid for
//! the span it then threw away (bench/README.md, `layer_chain` case 4). So
//! [`crate::TraceContextLayer`] asks the configured sampler first — the SDK's own,
//! built from `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` as the spec says, with the
//! caller's context and the trace id the call belongs to — and runs a call it drops
//! under [`UNRECORDED`]: the OpenTelemetry layer's filter leaves every span and event of
//! that task out, while [`crate::inject_current`] and [`crate::TraceParent::current`]
//! still hand on the trace id (flagged not sampled) so that services downstream record
//! nothing of it either and start no trace of their own.
//!
//! Work spawned from such a call leaves the task and with it the mark: it is carried by
//! [`crate::TraceParent::carry`].

use std::sync::OnceLock;

use opentelemetry::trace::{
    Link, SpanContext, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, SamplingDecision, SamplingResult, ShouldSample,
};

tokio::task_local! {
    /// Set for the task of a call (or of work carried from it) whose trace is not
    /// recorded: the context to hand on. `None` inside a recorded call's scope.
    pub(crate) static UNRECORDED: Option<Context>;
}

/// The sampler [`crate::init`] configured the tracer provider with; unset (no decision
/// up front, every call's span goes to the layer as before) when nothing traces.
static SAMPLER: OnceLock<Box<dyn ShouldSample>> = OnceLock::new();

/// Makes `sampler` the one calls are decided by up front. The provider must then be
/// built with [`UpFront`] around the same sampler.
pub(crate) fn install(sampler: Box<dyn ShouldSample>) {
    let _ = SAMPLER.set(sampler);
}

/// What to do with an incoming call.
pub(crate) enum Decision {
    /// Open its span for the OpenTelemetry layer, as without this module.
    Record,
    /// Record nothing; hand on this context (the caller's, or a new trace's root).
    Skip(Context),
}

/// The sampler's decision for a server span named `name` under `parent` (the caller's
/// extracted context, empty without one).
pub(crate) fn decide(parent: &Context, name: &str) -> Decision {
    match SAMPLER.get() {
        Some(sampler) => decide_with(sampler.as_ref(), parent, name),
        None => Decision::Record,
    }
}

fn decide_with(sampler: &dyn ShouldSample, parent: &Context, name: &str) -> Decision {
    let caller = parent.span().span_context().clone();
    let trace_id = if caller.is_valid() {
        caller.trace_id()
    } else {
        RandomIdGenerator::default().new_trace_id()
    };
    let result = sampler.should_sample(Some(parent), trace_id, name, &SpanKind::Server, &[], &[]);
    match result.decision {
        SamplingDecision::RecordAndSample | SamplingDecision::RecordOnly => Decision::Record,
        SamplingDecision::Drop if caller.is_valid() => Decision::Skip(parent.clone()),
        // A new trace, not sampled: its id still goes on, so the services this call
        // reaches make the same decision instead of starting traces of their own.
        SamplingDecision::Drop => {
            Decision::Skip(parent.with_remote_span_context(SpanContext::new(
                trace_id,
                RandomIdGenerator::default().new_span_id(),
                TraceFlags::default(),
                false,
                TraceState::default(),
            )))
        }
    }
}

/// The context of the unrecorded call (or carried work) this task runs, if it is one.
pub(crate) fn unrecorded() -> Option<Context> {
    UNRECORDED.try_with(Clone::clone).ok().flatten()
}

/// Whether the OpenTelemetry layer may see what this task does now: not inside an
/// unrecorded call. The layer's filter.
pub(crate) fn recording_here() -> bool {
    !UNRECORDED.try_with(Option::is_some).unwrap_or(false)
}

/// The provider's sampler: `inner` (the one [`decide`] asks), except for the root server
/// spans [`decide`] has already admitted. The SDK would otherwise decide again on a
/// trace id of its own, and a ratio sampler would keep r² of the roots, not r.
#[derive(Debug, Clone)]
pub(crate) struct UpFront {
    pub inner: Box<dyn ShouldSample>,
}

impl ShouldSample for UpFront {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let root = !parent_context.is_some_and(|cx| cx.has_active_span());
        // Only TraceContextLayer opens server spans, and only after `decide` said Record.
        if root && *span_kind == SpanKind::Server {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.inner
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::SpanId;
    use opentelemetry_sdk::trace::Sampler;

    use super::*;

    const TRACE: TraceId = TraceId::from_bytes([7; 16]);

    fn caller(sampled: bool) -> Context {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            TRACE,
            SpanId::from_bytes([3; 8]),
            flags,
            true,
            TraceState::default(),
        ))
    }

    fn never_for_roots() -> Sampler {
        Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.0)))
    }

    #[test]
    fn a_dropped_root_gets_a_new_trace_id_flagged_not_sampled() {
        let Decision::Skip(cx) = decide_with(&never_for_roots(), &Context::new(), "a/B") else {
            panic!("a ratio of 0 records no root");
        };
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid(), "the id still goes on");
        assert!(!sc.is_sampled());
        assert_ne!(sc.trace_id(), TRACE);
    }

    #[test]
    fn a_callers_decision_is_followed_by_a_parent_based_sampler() {
        let sampler = never_for_roots();
        assert!(matches!(
            decide_with(&sampler, &caller(true), "a/B"),
            Decision::Record
        ));
        let Decision::Skip(cx) = decide_with(&sampler, &caller(false), "a/B") else {
            panic!("the caller did not sample it");
        };
        let sc = cx.span().span_context().clone();
        assert_eq!(sc.trace_id(), TRACE, "the caller's trace goes on");
        assert_eq!(sc.span_id(), SpanId::from_bytes([3; 8]));
        assert!(!sc.is_sampled());
    }

    #[test]
    fn the_default_sampler_records_every_root() {
        let sampler = Sampler::ParentBased(Box::new(Sampler::AlwaysOn));
        assert!(matches!(
            decide_with(&sampler, &Context::new(), "a/B"),
            Decision::Record
        ));
    }

    #[test]
    fn the_provider_does_not_decide_an_admitted_root_server_span_again_but_everything_else() {
        let sampler = UpFront {
            inner: Box::new(never_for_roots()),
        };
        let decision = |parent: Option<&Context>, kind: SpanKind| {
            sampler
                .should_sample(parent, TRACE, "x", &kind, &[], &[])
                .decision
        };
        assert_eq!(
            decision(Some(&Context::new()), SpanKind::Server),
            SamplingDecision::RecordAndSample
        );
        assert_eq!(
            decision(None, SpanKind::Server),
            SamplingDecision::RecordAndSample
        );
        // A CLI's root span, a build recovered at start: the configured ratio.
        assert_eq!(
            decision(Some(&Context::new()), SpanKind::Client),
            SamplingDecision::Drop
        );
        assert_eq!(
            decision(Some(&Context::new()), SpanKind::Internal),
            SamplingDecision::Drop
        );
        assert_eq!(
            decision(Some(&caller(false)), SpanKind::Server),
            SamplingDecision::Drop
        );
        assert_eq!(
            decision(Some(&caller(true)), SpanKind::Internal),
            SamplingDecision::RecordAndSample
        );
    }
}
