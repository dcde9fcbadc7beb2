//! Trace context in and out: what the server layer takes from a call, what a client
//! call sends on, what a queued piece of work keeps, and what a call the sampler drops
//! still hands on.

use std::convert::Infallible;

use http::{Request, Response};
use kiln_telemetry::{TraceContextLayer, TraceParent, current_trace_id, inject_current};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use tonic::metadata::MetadataMap;
use tower::{Layer, ServiceExt, service_fn};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// A subscriber that gives spans W3C ids (no export), for this thread.
fn with_tracing<T>(test: impl FnOnce() -> T) -> T {
    kiln_telemetry::install_propagator();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::with_default(subscriber, test)
}

/// What the handler behind [`TraceContextLayer`] sees: its trace id, and the metadata
/// a call it makes would carry.
fn serve(headers: &[(&str, &str)]) -> (Option<String>, MetadataMap) {
    let handler = service_fn(|_request: Request<()>| async {
        let mut outgoing = MetadataMap::new();
        inject_current(&mut outgoing);
        Ok::<_, Infallible>(Response::new((current_trace_id(), outgoing)))
    });
    let service = TraceContextLayer.layer(handler);
    let mut request = Request::builder().uri("/kiln.build.v1.BuildService/StartBuild");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let response = runtime
        .block_on(service.oneshot(request.body(()).expect("request")))
        .expect("infallible");
    response.into_body()
}

fn header(metadata: &MetadataMap, name: &str) -> String {
    metadata
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_call_with_a_traceparent_continues_the_callers_trace_and_passes_it_on() {
    let (trace_id, outgoing) = with_tracing(|| {
        serve(&[
            ("traceparent", &format!("00-{TRACE_ID}-{CALLER_SPAN}-01")),
            ("tracestate", "vendor=opaque"),
            ("baggage", "tenant=acme"),
        ])
    });
    assert_eq!(trace_id.as_deref(), Some(TRACE_ID));
    let traceparent = header(&outgoing, "traceparent");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[1], TRACE_ID, "the same trace goes on");
    assert_ne!(
        parts[2], CALLER_SPAN,
        "with the server's span as the parent"
    );
    assert_eq!(parts[3], "01", "still sampled");
    assert_eq!(header(&outgoing, "tracestate"), "vendor=opaque");
    assert_eq!(header(&outgoing, "baggage"), "tenant=acme");
}

#[test]
fn a_call_without_one_or_with_a_malformed_one_starts_a_new_trace() {
    for headers in [
        vec![],
        vec![("traceparent", "00-not-a-trace-01")],
        vec![(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        )],
    ] {
        let (trace_id, outgoing) = with_tracing(|| serve(&headers));
        let trace_id = trace_id.expect("a new trace");
        assert_eq!(trace_id.len(), 32);
        assert_ne!(trace_id, "0".repeat(32));
        assert!(header(&outgoing, "traceparent").contains(&trace_id));
    }
}

#[test]
fn baggage_without_a_traceparent_is_passed_on_in_a_new_trace() {
    let (trace_id, outgoing) =
        with_tracing(|| serve(&[("baggage", "tenant=acme"), ("tracestate", "vendor=opaque")]));
    let trace_id = trace_id.expect("a new trace");
    assert!(header(&outgoing, "traceparent").contains(&trace_id));
    assert_eq!(header(&outgoing, "baggage"), "tenant=acme");
    assert_eq!(
        header(&outgoing, "tracestate"),
        "",
        "a tracestate belongs to the traceparent it came with"
    );
}

#[test]
fn without_tracing_nothing_is_sent() {
    kiln_telemetry::install_propagator();
    let mut outgoing = MetadataMap::new();
    tracing::info_span!("untraced").in_scope(|| inject_current(&mut outgoing));
    assert!(outgoing.get("traceparent").is_none());
    assert_eq!(current_trace_id(), None);
}

#[test]
fn work_queued_now_and_run_later_elsewhere_stays_in_the_trace() {
    with_tracing(|| {
        let request = tracing::info_span!("request");
        let (queued, request_trace) =
            request.in_scope(|| (TraceParent::current(), current_trace_id()));
        drop(request); // the call returns long before the work runs
        assert_eq!(queued.trace_id(), request_trace);

        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let later = tracing::info_span!("later");
        queued.adopt(&later);
        // Spawned from no span at all, as the build scheduler is.
        let seen = runtime
            .block_on(async { tokio::spawn(async { current_trace_id() }.instrument(later)).await });
        assert_eq!(seen.expect("task"), request_trace);

        let orphan = tracing::info_span!("recovered");
        TraceParent::none().adopt(&orphan);
        let own = orphan.in_scope(current_trace_id);
        assert!(own.is_some() && own != request_trace, "a trace of its own");
    });
}

// Sampling decided before a call's span opens, through `init` as a service runs it: with
// `parentbased_traceidratio` at 0 no new trace is recorded, a caller's sampled trace still
// is, and an unrecorded call keeps its spans from the OpenTelemetry layer while its trace
// id still goes on, flagged not sampled — also from work it spawns. `init` installs the
// process's subscriber once and the sampler comes from the environment, so this runs in
// a child process of its own.

/// What a handler behind [`TraceContextLayer`] sees and sends on.
#[derive(Debug)]
struct Seen {
    /// Whether its span (and a span it opens) reached the OpenTelemetry layer, sampled.
    span_recorded: bool,
    inner_span_recorded: bool,
    /// Whether its span was made at all (logs are at WARN here, so only tracing wants it).
    span_made: bool,
    trace_id: Option<String>,
    outgoing: MetadataMap,
    kept: String,
    /// What a task it spawns with the call's `TraceParent::carry` sends on.
    spawned_outgoing: MetadataMap,
    spawned_span_recorded: bool,
}

async fn serve_sampled(headers: &[(&str, &str)]) -> Seen {
    let handler = service_fn(|_request: Request<()>| async {
        let span_recorded = recorded(&tracing::Span::current());
        let span_made = !tracing::Span::current().is_disabled();
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
            span_made,
            trace_id: current_trace_id(),
            outgoing,
            kept: parent.to_traceparent(),
            spawned_outgoing,
            spawned_span_recorded,
        }))
    });
    let mut request = Request::builder().uri("/kiln.build.v1.BuildService/StartBuild");
    for (name, value) in headers {
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
    let root = serve_sampled(&[]).await;
    assert!(!root.span_recorded, "{root:?}");
    assert!(!root.span_made, "a dropped call costs no span: {root:?}");
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
    let other = serve_sampled(&[]).await;
    assert_ne!(other.trace_id, root.trace_id);

    // The caller sampled it: recorded, whatever the ratio for new traces.
    let sampled = serve_sampled(&[
        ("traceparent", &format!("00-{TRACE_ID}-{CALLER_SPAN}-01")),
        ("baggage", "tenant=acme"),
    ])
    .await;
    assert!(sampled.span_recorded, "{sampled:?}");
    assert!(sampled.span_made);
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
    let unsampled = serve_sampled(&[
        ("traceparent", &format!("00-{TRACE_ID}-{CALLER_SPAN}-00")),
        ("baggage", "tenant=acme"),
    ])
    .await;
    assert!(!unsampled.span_recorded, "{unsampled:?}");
    assert!(!unsampled.span_made, "{unsampled:?}");
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
