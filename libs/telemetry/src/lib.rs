//! kiln-telemetry: how every kiln binary logs and traces.
//!
//! - [`init`] sets up `tracing` once per process: readable logs on a terminal, JSON lines
//!   in production, and — when an OTLP endpoint is configured — OpenTelemetry trace
//!   export over gRPC ([`TelemetryConfig`] says where the endpoint comes from). The
//!   returned [`TelemetryGuard`] flushes the spans still queued when it is dropped.
//! - W3C trace context (`traceparent`, `tracestate`) and `baggage`: [`TraceContextLayer`]
//!   takes it from every incoming call, [`inject_current`] puts the current span's
//!   context on every outgoing kiln call, and [`TraceParent`] carries a request's context
//!   to work that runs later in another task (a queued build).
//! - Sampling is decided before a call's span opens (`sampling`): a call the sampler
//!   drops costs about what it costs without tracing, and still hands its trace id on.
//!
//! Spans are exported in batches from the SDK's own thread: a request only pushes its
//! finished span into a bounded queue and never waits for the collector. A collector
//! that is down costs dropped spans, which are counted ([`TelemetryGuard::dropped_spans`]),
//! not latency.

mod config;
mod export;
mod init;
mod layer;
mod propagation;
mod sampling;

pub use config::{DEFAULT_TRACE_FILTER, LogFormat, TelemetryConfig, TraceExport, env};
pub use init::{TelemetryError, TelemetryGuard, init, install_propagator};
pub use layer::{TraceContextLayer, TraceContextService};
pub use propagation::{TraceParent, current_trace_id, extract, inject_current};
