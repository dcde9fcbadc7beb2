//! The first layer: every request gets an id (the client's `x-request-id` when it sent a
//! sane one, else a fresh UUID), in the request extensions and echoed on the response,
//! and the `rpc` tracing span everything after it logs in.

use std::convert::Infallible;
use std::fmt;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;

use super::take_ready;

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
        let id = uuid::Uuid::new_v4().to_string();
        Self(HeaderValue::from_str(&id).expect("a UUID is a valid header value"))
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

/// Gives each request its [`RequestId`] and `rpc` span.
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
        let mut inner = take_ready(&mut self.inner);
        let request_id = RequestId::from_request(&request);
        // `principal` is recorded by authentication once the caller is known.
        let span = tracing::info_span!(
            "rpc",
            rpc = %request.uri().path(),
            request_id = %request_id,
            principal = tracing::field::Empty,
        );
        request.extensions_mut().insert(request_id.clone());
        Box::pin(
            async move {
                let started = Instant::now();
                let mut response = inner.call(request).await?;
                response
                    .headers_mut()
                    .insert(REQUEST_ID_HEADER, request_id.0);
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
            }
            .instrument(span),
        )
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
}
