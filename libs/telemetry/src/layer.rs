//! [`TraceContextLayer`]: the server side of trace propagation.

use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Opens the server span of every call as a child of the caller's `traceparent` (a new
/// trace when there is none), named by the gRPC method as OpenTelemetry's RPC
/// conventions say. The rest of the chain and the handler run inside it, so their spans
/// — and the calls they make to other kiln services — are part of the caller's trace. It
/// is the call's only span in kiln's chain: the request id and the caller are recorded
/// on it rather than on spans of their own.
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

impl<S, B> Service<Request<B>> for TraceContextService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        // "/kiln.build.v1.BuildService/StartBuild" → service and method.
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        let span = tracing::info_span!(
            "grpc.server",
            // `&str`s, not `%` (Display): recorded as strings without the formatter.
            otel.name = path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            // Recorded by kiln-rpc's chain: its request id layer and authentication.
            request_id = tracing::field::Empty,
            principal = tracing::field::Empty,
        );
        let parent = crate::propagation::extract(request.headers());
        if opentelemetry::trace::TraceContextExt::has_active_span(&parent) {
            let _ = span.set_parent(parent);
        }
        let future = span.in_scope(|| self.inner.call(request));
        future.instrument(span)
    }
}
