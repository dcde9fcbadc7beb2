//! W3C trace context and baggage on the wire, and carried to later work.

use std::future::Future;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trace context work running now belongs to: the current span's, or, inside a call
/// the sampler dropped ([`crate::sampling`]), whose spans the OpenTelemetry layer never
/// sees, that call's.
fn current_context() -> Context {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        return cx;
    }
    crate::sampling::unrecorded().unwrap_or(cx)
}

/// Puts the current span's trace context (`traceparent`, `tracestate`) and baggage on an
/// outgoing call's metadata (flagged not sampled inside a call the sampler dropped).
/// Nothing is added when the current span has no trace (trace export off, or a span the
/// trace filter leaves out).
pub fn inject_current(metadata: &mut MetadataMap) {
    let cx = current_context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&cx, &mut MetadataInjector(metadata));
    });
}

/// The trace context and baggage an incoming call carries (an empty context when it
/// carries none, or a malformed one: the W3C rule is to start a new trace then).
pub fn extract(headers: &http::HeaderMap) -> Context {
    // Most calls carry neither (the clients kiln's own services do not trace, probes,
    // grpcurl): they skip the global propagator's lock and its propagators' look-ups.
    // `tracestate` means nothing without `traceparent`. The propagators are the two
    // `install_propagator` sets.
    const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
    const BAGGAGE: http::HeaderName = http::HeaderName::from_static("baggage");
    if !headers.contains_key(TRACEPARENT) && !headers.contains_key(BAGGAGE) {
        return Context::current();
    }
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    })
}

/// The trace id of the current span, as 32 hex digits; `None` without a trace.
pub fn current_trace_id() -> Option<String> {
    let cx = current_context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// A request's trace context, kept to parent work that runs later in another task: a
/// queued build's wait and run are spans of the StartBuild call's trace although the
/// call has long returned. Holds only ids, so the request's own span ends on time.
#[derive(Debug, Clone, Default)]
pub struct TraceParent(Option<Context>);

impl TraceParent {
    /// The current span's context.
    pub fn current() -> Self {
        let cx = current_context();
        let valid = cx.span().span_context().is_valid();
        Self(valid.then_some(cx))
    }

    /// Runs `work` (spawned from the call this context was taken in, so outside its task)
    /// as part of the same trace when that trace is not recorded: then, as in the call
    /// itself, nothing `work` does reaches the OpenTelemetry layer, and its calls hand on
    /// the trace id flagged not sampled. A recorded trace needs nothing of this (its
    /// spans carry it: [`Self::adopt`]); `work` then runs as it is.
    pub fn carry<F: Future>(
        &self,
        work: F,
    ) -> tokio::task::futures::TaskLocalFuture<Option<Context>, F> {
        let unrecorded = self
            .0
            .clone()
            .filter(|cx| !cx.span().span_context().is_sampled());
        crate::sampling::UNRECORDED.scope(unrecorded, work)
    }

    /// No parent: spans adopted by it start their own trace (a build recovered at start).
    pub fn none() -> Self {
        Self(None)
    }

    /// Makes `span` (not yet entered) a child of this context.
    pub fn adopt(&self, span: &tracing::Span) {
        if let Some(cx) = &self.0 {
            // Fails only for a span that is disabled or already started, which then
            // simply stays where it is.
            let _ = span.set_parent(cx.clone());
        }
    }

    /// As a W3C `traceparent` value (empty without a trace), to carry the context through
    /// a database to the replica that runs the work.
    pub fn to_traceparent(&self) -> String {
        let Some(cx) = &self.0 else {
            return String::new();
        };
        let mut fields = std::collections::HashMap::new();
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(cx, &mut fields);
        });
        fields.remove("traceparent").unwrap_or_default()
    }

    /// The context a [`Self::to_traceparent`] value carries; none when it is empty or
    /// malformed.
    pub fn from_traceparent(value: &str) -> Self {
        let fields =
            std::collections::HashMap::from([("traceparent".to_owned(), value.to_owned())]);
        let cx = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&fields)
        });
        let valid = cx.span().span_context().is_valid();
        Self(valid.then_some(cx))
    }

    /// The trace id, as 32 hex digits.
    pub fn trace_id(&self) -> Option<String> {
        self.0
            .as_ref()
            .map(|cx| cx.span().span_context().trace_id().to_string())
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagators produce lowercase ASCII names and printable values; anything
        // else is left out rather than failing the call.
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
