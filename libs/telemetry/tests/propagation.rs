//! Trace context in and out: what the server layer takes from a call, what a client
//! call sends on, and what a queued piece of work keeps.

use std::convert::Infallible;

use http::{Request, Response};
use kiln_telemetry::{TraceContextLayer, TraceParent, current_trace_id, inject_current};
use opentelemetry::trace::TracerProvider as _;
use tonic::metadata::MetadataMap;
use tower::{Layer, ServiceExt, service_fn};
use tracing::Instrument;
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
