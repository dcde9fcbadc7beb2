//! The layer chain every kiln listener runs in front of its handlers, one tower layer per
//! concern, pushed by [`crate::server`] in this order (outermost first):
//!
//! 1. [`request_id`]: the request's id (in extensions and on the response) and its
//!    tracing span;
//! 2. [`metrics`] (when the listener has a registry): requests by method and code,
//!    latency to the end of the response body, calls in flight — refusals included;
//! 3. [`access`]: the RPC's declared access level from the contract — undeclared and
//!    unknown methods are refused here; unauthenticated long-lived streams (health watch,
//!    reflection) take a slot per peer;
//! 4. [`rate_limit`] before authentication: PUBLIC calls take from the peer's bucket, a
//!    peer whose bucket is empty is refused before its credential is verified;
//! 5. [`authenticate`]: who is calling (bearer token, API key or workload certificate);
//!    the outcome is left in the extensions, the `authorization` header is left in place
//!    for handlers that act on the caller's behalf (the agent);
//! 6. [`rate_limit`] after authentication: a verified caller takes from its own bucket,
//!    a failed one from its peer's (a junk credential does not buy a fresh bucket);
//! 7. [`authorize`]: refuses failed authentication and a role below the RPC's level;
//! 8. [`message_size`]: request messages over the limit fail with RESOURCE_EXHAUSTED.
//!
//! They are tower layers, not tonic interceptors, because authentication needs I/O (API
//! key look-ups) and the connection's peer certificate. Each layer reads what the ones
//! before it left in the request extensions, and fails closed when it is missing (a
//! chain assembled in the wrong order refuses every call instead of letting it through).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, Either};
use http::{Request, Response};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::error::ApiError;

pub mod access;
pub mod authenticate;
pub mod authorize;
pub mod message_size;
pub mod metrics;
pub mod rate_limit;
pub mod request_id;

pub use access::{AccessLayer, Route};
pub use authenticate::{Authenticate, AuthenticationFailed};
pub use authorize::Authorize;
pub use message_size::MessageSizeLayer;
pub use metrics::{MetricsLayer, RpcMetrics};
pub use rate_limit::{RateLimitCheck, RateLimitStage};
pub use request_id::{REQUEST_ID_HEADER, RequestId, RequestIdLayer, VERSION_HEADER};

/// A concern that looks at a request before its handler and lets it through (perhaps
/// leaving something in its extensions) or refuses it. Wrapped in [`AdmissionLayer`].
///
/// Two steps because almost every decision needs no I/O (a check of what the request
/// carries, a credential already verified): [`Self::admit_now`] decides those in the
/// call itself, so the layer hands the request straight on, with no future of its own to
/// allocate and no copy of the rest of the chain to carry (bench/README.md, layer
/// chain). Only what needs I/O — an API key looked up at kiln-auth, a token whose keys
/// are not fetched yet — goes on to [`Self::admit_later`].
pub trait Admission: Send + Sync + 'static {
    /// The decision when it needs no I/O; `None` hands the request to
    /// [`Self::admit_later`].
    fn admit_now(&self, request: &mut Request<Body>) -> Option<Result<(), ApiError>>;

    /// The decision that needs I/O, for a request [`Self::admit_now`] left undecided.
    /// An admission that always decides now need not write it: this one refuses (fails
    /// closed) rather than let such a request through.
    fn admit_later<'a>(
        &'a self,
        _request: &'a mut Request<Body>,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(std::future::ready(Err(ApiError::internal(
            "admitting the request",
            &"an admission left it undecided but has no asynchronous check",
        ))))
    }
}

/// The tower layer of one [`Admission`].
#[derive(Debug)]
pub struct AdmissionLayer<A> {
    admission: Arc<A>,
}

impl<A> AdmissionLayer<A> {
    pub fn new(admission: A) -> Self {
        Self {
            admission: Arc::new(admission),
        }
    }
}

impl<A> Clone for AdmissionLayer<A> {
    fn clone(&self) -> Self {
        Self {
            admission: self.admission.clone(),
        }
    }
}

impl<S, A> Layer<S> for AdmissionLayer<A> {
    type Service = Admit<S, A>;

    fn layer(&self, inner: S) -> Self::Service {
        Admit {
            inner,
            admission: self.admission.clone(),
        }
    }
}

/// The service an [`AdmissionLayer`] wraps around the rest of the chain.
#[derive(Debug)]
pub struct Admit<S, A> {
    inner: S,
    admission: Arc<A>,
}

impl<S: Clone, A> Clone for Admit<S, A> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            admission: self.admission.clone(),
        }
    }
}

impl<S, A> Service<Request<Body>> for Admit<S, A>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    A: Admission,
{
    type Response = Response<Body>;
    type Error = Infallible;
    /// The rest of the chain's own future when the admission decided at once (most
    /// calls), a boxed one for a refusal or a decision that waits for I/O.
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        match self.admission.admit_now(&mut request) {
            // `inner` is the instance `poll_ready` made ready: it takes the call itself.
            Some(Ok(())) => Either::Left(self.inner.call(request)),
            Some(Err(err)) => Either::Right(Box::pin(std::future::ready(Ok(refusal(err))))),
            None => {
                let mut inner = take_ready(&mut self.inner);
                let admission = self.admission.clone();
                Either::Right(Box::pin(async move {
                    match admission.admit_later(&mut request).await {
                        Ok(()) => inner.call(request).await,
                        Err(err) => Ok(refusal(err)),
                    }
                }))
            }
        }
    }
}

/// The service made ready by `poll_ready`, leaving a clone in its place (tower's rule:
/// the instance that was polled ready is the one that takes the call).
pub(crate) fn take_ready<S: Clone>(service: &mut S) -> S {
    let clone = service.clone();
    std::mem::replace(service, clone)
}

/// The response of a refused call: logged once, at the layer that refused it.
pub(crate) fn refusal(err: ApiError) -> Response<Body> {
    tracing::info!(code = ?err.code(), reason = err.reason(), "refused: {}", err.message());
    Status::from(err).into_http()
}

#[cfg(test)]
pub(crate) mod testing {
    //! A handler that answers OK and reports what the layers left for it.

    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use http::{Request, Response};
    use tonic::body::Body;

    /// What the handler saw of the last request it got.
    #[derive(Debug, Default, Clone)]
    pub struct Seen(pub Arc<Mutex<Option<http::Extensions>>>);

    impl Seen {
        pub fn extensions(&self) -> http::Extensions {
            self.0
                .lock()
                .expect("lock")
                .clone()
                .expect("the handler was reached")
        }

        pub fn reached(&self) -> bool {
            self.0.lock().expect("lock").is_some()
        }
    }

    /// A handler answering gRPC OK, remembering the request's extensions (and the
    /// `authorization` header, as a `HeaderValue` extension).
    pub fn handler(
        seen: Seen,
    ) -> impl tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |request: Request<Body>| {
            let seen = seen.clone();
            async move {
                let mut extensions = request.extensions().clone();
                if let Some(auth) = request.headers().get(http::header::AUTHORIZATION) {
                    extensions.insert(auth.clone());
                }
                *seen.0.lock().expect("lock") = Some(extensions);
                Ok::<_, Infallible>(tonic::Status::ok("").into_http())
            }
        })
    }

    /// A request for `path`.
    pub fn request(path: &str) -> Request<Body> {
        Request::builder()
            .uri(format!("http://kiln.test{path}"))
            .body(Body::empty())
            .expect("request")
    }

    /// The status of a response: `None` for OK, else the refusal's code and reason.
    pub fn refusal(response: &Response<Body>) -> Option<(tonic::Code, String)> {
        let status = tonic::Status::from_header_map(response.headers()).expect("a grpc-status");
        if status.code() == tonic::Code::Ok {
            return None;
        }
        let remote = crate::RemoteError::from_status(&status);
        Some((status.code(), remote.reason))
    }
}
