//! The first layer: every request gets an id (the client's `x-request-id` when it sent a
//! sane one, else a fresh UUID), in the request extensions, echoed on the response, and
//! recorded on the call's server span (`grpc.server`, opened by
//! `kiln_telemetry::TraceContextLayer` around the whole chain), which everything after it
//! logs in.

use std::convert::Infallible;
use std::fmt;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use tonic::body::Body;
use tower::{Layer, Service};

/// The `x-request-id` header, echoed on every response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The `kiln-version` header: the suite's version on every response, refusals
/// included, so `kiln version` learns it from a health check without logging in. Public
/// on purpose, as Kubernetes' `/version` is: the version helps people match clients to
/// servers, and hiding it would not stop anyone who can reach the port from probing.
pub const VERSION_HEADER: &str = "kiln-version";

/// The id of one request: the client's `x-request-id` when it sent a sane one, else a
/// fresh UUID. In the request extensions and on the response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// Longest client-chosen id kept; a longer one is replaced by a generated one.
    pub const MAX_LEN: usize = 128;

    fn from_request<B>(request: &Request<B>) -> Self {
        request
            .headers()
            .get(REQUEST_ID_HEADER)
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= Self::MAX_LEN
                    && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
            })
            .map(|v| Self(v.clone()))
            .unwrap_or_else(Self::generate)
    }

    fn generate() -> Self {
        // Formatted on the stack: this runs for almost every call.
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
        Self(HeaderValue::from_str(id).expect("a UUID is a valid header value"))
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Gives each request its [`RequestId`], and records it on the call's span.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

/// The service [`RequestIdLayer`] wraps around the rest of the chain.
#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for RequestIdService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let request_id = RequestId::from_request(&request);
        // One span per call, the server span: every recorded span costs the OpenTelemetry
        // layer's bookkeeping (bench/README.md, layer_chain case 4). `principal` is
        // recorded on it by authentication once the caller is known. (In a call the
        // sampler dropped there may be no span: then this records nothing.)
        tracing::Span::current().record("request_id", tracing::field::display(&request_id));
        request.extensions_mut().insert(request_id.clone());
        let started = Instant::now();
        // Called now, not in the future below: `inner` is the instance `poll_ready` made
        // ready, so no copy of the rest of the chain has to travel with the future.
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            // A value new on every response gains nothing from HTTP/2 header
            // compression's table, and adding it there on both ends of the connection
            // (evicting what does repeat) costs on every call: sent "never indexed".
            let mut value = request_id.0;
            value.set_sensitive(true);
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
            response.headers_mut().insert(
                VERSION_HEADER,
                HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
            );
            tracing::debug!(
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                grpc_status = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok()),
                "response headers sent"
            );
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::layer::testing::{Seen, handler, request};

    async fn id_of(request: Request<Body>) -> (String, RequestId) {
        let seen = Seen::default();
        let response = RequestIdLayer
            .layer(handler(seen.clone()))
            .oneshot(request)
            .await
            .expect("infallible");
        let echoed = response.headers()[REQUEST_ID_HEADER]
            .to_str()
            .expect("ascii")
            .to_owned();
        let given = seen
            .extensions()
            .get::<RequestId>()
            .cloned()
            .expect("in extensions");
        (echoed, given)
    }

    #[tokio::test]
    async fn a_sane_client_id_is_kept_and_echoed() {
        let mut req = request("/kiln.build.v1.BuildService/GetBuild");
        req.headers_mut()
            .insert(REQUEST_ID_HEADER, HeaderValue::from_static("ci-run-42"));
        let (echoed, given) = id_of(req).await;
        assert_eq!(echoed, "ci-run-42");
        assert_eq!(given.as_str(), "ci-run-42");
    }

    #[tokio::test]
    async fn a_missing_or_unreasonable_id_is_replaced_by_a_uuid() {
        let long = "a".repeat(RequestId::MAX_LEN + 1);
        for sent in [None, Some(""), Some("has space"), Some(long.as_str())] {
            let mut req = request("/x.Y/Z");
            if let Some(sent) = sent {
                req.headers_mut().insert(
                    REQUEST_ID_HEADER,
                    HeaderValue::from_str(sent).expect("header"),
                );
            }
            let (echoed, given) = id_of(req).await;
            assert!(
                uuid::Uuid::parse_str(&echoed).is_ok(),
                "{sent:?} → {echoed}"
            );
            assert_eq!(
                given.as_str(),
                echoed,
                "the handler sees the id the client gets"
            );
        }
    }

    /// A log line from the handler, as the JSON log layer writes it.
    fn logged_in_handler(request: Request<Body>) -> serde_json::Value {
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lock").extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        use tracing_subscriber::layer::SubscriberExt;
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(move || writer.clone()),
        );
        let _default = tracing::subscriber::set_default(subscriber);
        let handler = tower::service_fn(|_request: Request<Body>| async {
            tracing::info!("handled");
            Ok::<_, Infallible>(Response::new(Body::empty()))
        });
        let service = kiln_telemetry::TraceContextLayer.layer(RequestIdLayer.layer(handler));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime
            .block_on(service.oneshot(request))
            .expect("infallible");
        let text = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("utf-8");
        let line = text
            .lines()
            .find(|l| l.contains("handled"))
            .unwrap_or_else(|| panic!("no log line from the handler in {text:?}"));
        serde_json::from_str(line).expect("json")
    }

    #[test]
    fn a_call_has_one_span_the_server_span_and_it_carries_the_request_id() {
        let mut req = request("/kiln.build.v1.BuildService/GetBuild");
        req.headers_mut()
            .insert(REQUEST_ID_HEADER, HeaderValue::from_static("ci-run-42"));
        let line = logged_in_handler(req);
        assert_eq!(line["span"]["name"], "grpc.server", "{line}");
        assert_eq!(line["span"]["request_id"], "ci-run-42", "{line}");
        assert_eq!(
            line["span"]["otel.name"], "kiln.build.v1.BuildService/GetBuild",
            "{line}"
        );
        assert_eq!(line["spans"].as_array().map(Vec::len), Some(1), "{line}");
    }
}
