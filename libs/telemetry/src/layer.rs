//! [`TraceContextLayer`]: the server side of trace propagation.

use std::task::Poll;

use http::Request;
use opentelemetry::Context;
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::sampling::{Decision, UNRECORDED};

/// Opens the server span of every call as a child of the caller's `traceparent` (a new
/// trace when there is none), named by the gRPC method as OpenTelemetry's RPC
/// conventions say. The rest of the chain and the handler run inside it, so their spans
/// — and the calls they make to other kiln services — are part of the caller's trace. It
/// is the call's only span in kiln's chain: the request id and the caller are recorded
/// on it rather than on spans of their own.
///
/// Whether the call is recorded is decided here, before the span is opened
/// ([`crate::sampling`]): a call the sampler drops gets a span only the logs see.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextLayer;

impl<S> Layer<S> for TraceContextLayer {
    type Service = TraceContextService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContextService { inner }
    }
}

/// The service [`TraceContextLayer`] wraps.
#[derive(Debug, Clone)]
pub struct TraceContextService<S> {
    inner: S,
}

/// The target of a dropped call's server span. The OpenTelemetry layer's filter turns
/// it off by name (init), so the callsite's interest is settled once: with logs at WARN
/// the span is not made at all. (Left to the dynamic filter alone, the registry still
/// makes every such span though no layer takes it.)
pub(crate) const UNRECORDED_TARGET: &str = "kiln_telemetry::unrecorded";

/// The server span of a call to `name` ("kiln.build.v1.BuildService/StartBuild"), at the
/// given target (or this module's).
macro_rules! server_span {
    ($name:expr $(, target: $target:expr)?) => {{
        let name: &str = $name;
        let (service, method) = name.split_once('/').unwrap_or((name, ""));
        tracing::info_span!(
            $(target: $target,)?
            "grpc.server",
            // `&str`s, not `%` (Display): recorded as strings without the formatter.
            otel.name = name,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            // Recorded by kiln-rpc's chain: its request id layer and authentication.
            request_id = tracing::field::Empty,
            principal = tracing::field::Empty,
        )
    }};
}

impl<S, B> Service<Request<B>> for TraceContextService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TaskLocalFuture<Option<Context>, tracing::instrument::Instrumented<S::Future>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let parent = crate::propagation::extract(request.headers());
        match crate::sampling::decide(&parent, name_of(&request)) {
            Decision::Record => {
                let span = server_span!(name_of(&request));
                // The caller's trace, or just its baggage (which goes on in a new trace).
                if opentelemetry::trace::TraceContextExt::has_active_span(&parent)
                    || !opentelemetry::baggage::BaggageExt::baggage(&parent).is_empty()
                {
                    let _ = span.set_parent(parent);
                }
                let future = span.in_scope(|| self.inner.call(request));
                UNRECORDED.scope(None, future.instrument(span))
            }
            // The span is still opened, for the logs (request id, caller); the
            // OpenTelemetry layer's filter lets neither it nor anything else this call's
            // task does through.
            Decision::Skip(cx) => {
                let inner = &mut self.inner;
                let (span, future) = UNRECORDED.sync_scope(Some(cx.clone()), move || {
                    let span = server_span!(name_of(&request), target: UNRECORDED_TARGET);
                    let future = span.in_scope(|| inner.call(request));
                    (span, future)
                });
                UNRECORDED.scope(Some(cx), future.instrument(span))
            }
        }
    }
}

/// "/kiln.build.v1.BuildService/StartBuild" → "kiln.build.v1.BuildService/StartBuild".
fn name_of<B>(request: &Request<B>) -> &str {
    request.uri().path().trim_start_matches('/')
}
