//! Sampling decided before a call's span opens, through `init` as a service runs it:
//! with `parentbased_traceidratio` at 0 no new trace is recorded, a caller's sampled
//! trace still is, and an unrecorded call keeps its spans from the OpenTelemetry layer
//! while its trace id still goes on, flagged not sampled — also from work it spawns.
//!
//! One test: `init` installs the process's subscriber once, and the sampler comes from
//! the environment.

use std::convert::Infallible;

use http::{Request, Response};
use kiln_telemetry::{TraceContextLayer, TraceParent, current_trace_id, inject_current};
use opentelemetry::trace::TraceContextExt;
use tonic::metadata::MetadataMap;
use tower::{Layer, ServiceExt, service_fn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// What a handler behind [`TraceContextLayer`] sees and sends on.
#[derive(Debug)]
struct Seen {
    /// Whether its span (and a span it opens) reached the OpenTelemetry layer, sampled.
    span_recorded: bool,
    inner_span_recorded: bool,
    trace_id: Option<String>,
    outgoing: MetadataMap,
    kept: String,
    /// What a task it spawns with the call's `TraceParent::carry` sends on.
    spawned_outgoing: MetadataMap,
    spawned_span_recorded: bool,
}

async fn serve(runtime_headers: &[(&str, &str)]) -> Seen {
    let handler = service_fn(|_request: Request<()>| async {
        let span_recorded = recorded(&tracing::Span::current());
        let inner = tracing::info_span!("handler.work");
        let inner_span_recorded = recorded(&inner);
        tracing::info!("an event inside the call");
        let mut outgoing = MetadataMap::new();
        inject_current(&mut outgoing);
        let parent = TraceParent::current();
        // As the agent spawns a task's runner: a span adopted into the trace, the work
        // carried.
        let adopting = parent.clone();
        let (spawned_outgoing, spawned_span_recorded) = tokio::spawn(parent.carry(async move {
            let span = tracing::info_span!("spawned.work");
            adopting.adopt(&span);
            let _entered = span.enter();
            let mut outgoing = MetadataMap::new();
            inject_current(&mut outgoing);
            (outgoing, recorded(&span))
        }))
        .await
        .expect("join");
        Ok::<_, Infallible>(Response::new(Seen {
            span_recorded,
            inner_span_recorded,
            trace_id: current_trace_id(),
            outgoing,
            kept: parent.to_traceparent(),
            spawned_outgoing,
            spawned_span_recorded,
        }))
    });
    let mut request = Request::builder().uri("/kiln.build.v1.BuildService/StartBuild");
    for (name, value) in runtime_headers {
        request = request.header(*name, *value);
    }
    let response = TraceContextLayer
        .layer(handler)
        .oneshot(request.body(()).expect("request"))
        .await
        .expect("infallible");
    response.into_body()
}

/// Whether `span` reached the OpenTelemetry layer and is sampled (a span the layer never
/// saw has no context of its own).
fn recorded(span: &tracing::Span) -> bool {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid() && sc.is_sampled()
}

fn header(metadata: &MetadataMap, name: &str) -> String {
    metadata
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Runs [`in_a_process_of_its_own`] in a child process with the sampler set in its
/// environment (as an operator sets it for a service).
#[test]
fn calls_are_sampled_before_their_spans_open_and_an_unrecorded_trace_still_goes_on() {
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"));
    child
        .args([
            "--exact",
            "in_a_process_of_its_own",
            "--ignored",
            "--nocapture",
        ])
        .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        .env("OTEL_TRACES_SAMPLER_ARG", "0");
    for name in [
        "OTEL_SDK_DISABLED",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "KILN_TRACE_FILTER",
    ] {
        child.env_remove(name);
    }
    let output = child.output().expect("the test binary runs");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{printed}");
    assert!(
        printed.contains("1 passed"),
        "the child ran the test: {printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by calls_are_sampled_before_their_spans_open_and_an_unrecorded_trace_still_goes_on"]
async fn in_a_process_of_its_own() {
    let mut config = kiln_telemetry::TelemetryConfig::new("sampling-test", "0");
    config.trace_without_export = true;
    config.default_log_level = "warn".into();
    let _guard = kiln_telemetry::init(&config).expect("telemetry");

    // A new trace at a ratio of 0: nothing reaches the layer, the id goes on unsampled.
    let root = serve(&[]).await;
    assert!(!root.span_recorded, "{root:?}");
    assert!(!root.inner_span_recorded, "{root:?}");
    let traceparent = header(&root.outgoing, "traceparent");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "a traceparent goes on: {root:?}");
    assert_eq!(parts[3], "00", "flagged not sampled: {traceparent}");
    assert_eq!(root.trace_id.as_deref(), Some(parts[1]));
    assert_eq!(root.kept, traceparent, "queued work keeps the same context");
    assert_eq!(header(&root.spawned_outgoing, "traceparent"), traceparent);
    assert!(!root.spawned_span_recorded);

    // A second root is a trace of its own.
    let other = serve(&[]).await;
    assert_ne!(other.trace_id, root.trace_id);

    // The caller sampled it: recorded, whatever the ratio for new traces.
    let sampled = serve(&[
        ("traceparent", &format!("00-{TRACE_ID}-{CALLER_SPAN}-01")),
        ("baggage", "tenant=acme"),
    ])
    .await;
    assert!(sampled.span_recorded, "{sampled:?}");
    assert!(sampled.inner_span_recorded);
    let traceparent = header(&sampled.outgoing, "traceparent");
    assert!(
        traceparent.starts_with(&format!("00-{TRACE_ID}-")) && traceparent.ends_with("-01"),
        "{traceparent}"
    );
    assert!(
        !traceparent.contains(CALLER_SPAN),
        "the server's span is the parent now"
    );
    assert_eq!(header(&sampled.outgoing, "baggage"), "tenant=acme");
    assert!(
        sampled.spawned_span_recorded,
        "adopted work of a recorded trace is recorded"
    );

    // The caller did not sample it: nothing recorded, its context goes on as it came.
    let unsampled = serve(&[
        ("traceparent", &format!("00-{TRACE_ID}-{CALLER_SPAN}-00")),
        ("baggage", "tenant=acme"),
    ])
    .await;
    assert!(!unsampled.span_recorded, "{unsampled:?}");
    assert!(!unsampled.inner_span_recorded);
    let expected = format!("00-{TRACE_ID}-{CALLER_SPAN}-00");
    assert_eq!(header(&unsampled.outgoing, "traceparent"), expected);
    assert_eq!(header(&unsampled.outgoing, "baggage"), "tenant=acme");
    assert_eq!(header(&unsampled.spawned_outgoing, "traceparent"), expected);
    assert_eq!(unsampled.trace_id.as_deref(), Some(TRACE_ID));

    // Outside any call (a CLI command's root span): the configured ratio, 0.
    let span = tracing::info_span!("kiln", otel.kind = "client");
    let cx = span.context();
    assert!(
        !cx.span().span_context().is_sampled(),
        "a root that is not a server span is sampled by the ratio"
    );
}
