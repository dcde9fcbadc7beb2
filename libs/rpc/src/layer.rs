//! The one layer chain every kiln listener runs in front of its handlers:
//!
//! request id → tracing span → access policy → (unauthenticated long-lived streams:
//! a slot per peer) → authenticate → rate limit → authorize → message size limit →
//! handler.
//!
//! It is a tower layer, not a tonic interceptor, because authentication needs I/O (API
//! key look-ups) and the connection's peer certificate. On success it leaves a typed
//! [`Principal`] and the [`RequestId`] in the request extensions.

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::access::{Access, AccessPolicy, Verdict};
use crate::error::{ApiError, reason};
use crate::identity::{Authenticator, BearerToken, PeerInfo, Principal};
use crate::limit::LimitedBody;
use crate::ratelimit::RateLimiter;
use crate::slots::{PeerSlots, Slot};
use crate::token::audience_admits;

/// Streams anyone may open without credentials and keep open: each holds a slot of
/// [`Gate::open_streams`] until it ends.
const LONG_LIVED_UNAUTHENTICATED: &[&str] = &[
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

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

/// What the layer needs to decide about a request.
pub struct Gate {
    pub policy: AccessPolicy,
    pub authenticator: Arc<dyn Authenticator>,
    /// SERVICE RPCs accept workload certificates of this trust domain only.
    pub trust_domain: String,
    pub max_message_bytes: usize,
    /// Per caller and method; `None` disables rate limiting.
    pub rate_limiter: Option<RateLimiter>,
    /// Slots for unauthenticated long-lived streams, per peer and in total.
    pub open_streams: PeerSlots,
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("trust_domain", &self.trust_domain)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// Decides whether the request may reach its handler; on success the principal (if
    /// any) is in the request extensions, and a long-lived unauthenticated stream gets
    /// the slot it must hold while it runs.
    async fn admit<B>(&self, request: &mut Request<B>) -> Result<Option<Slot>, ApiError> {
        let path = request.uri().path();
        let access = match self.policy.verdict(path) {
            Verdict::Rpc(access) => access,
            Verdict::Infrastructure if LONG_LIVED_UNAUTHENTICATED.contains(&path) => {
                let ip = request
                    .extensions()
                    .get::<PeerInfo>()
                    .and_then(|p| p.remote_addr)
                    .map(|a| a.ip());
                return match self.open_streams.try_acquire(ip) {
                    Some(slot) => Ok(Some(slot)),
                    None => Err(ApiError::new(
                        tonic::Code::ResourceExhausted,
                        reason::TOO_MANY_STREAMS,
                        format!("too many open {path} streams; close some first"),
                    )),
                };
            }
            Verdict::Infrastructure => return Ok(None),
            Verdict::Undeclared => {
                return Err(ApiError::permission_denied(
                    reason::ACCESS_NOT_DECLARED,
                    format!("{path} declares no access level, so it cannot be called"),
                ));
            }
            Verdict::Unknown => {
                return Err(ApiError::new(
                    tonic::Code::Unimplemented,
                    reason::UNKNOWN_METHOD,
                    format!("this server has no RPC {path}"),
                ));
            }
        };
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or_default();
        let authorization = request.headers().get(http::header::AUTHORIZATION);
        let limiter = self.rate_limiter.as_ref();
        // Buckets are keyed by the verified identity; everything unverified by the peer.
        let principal = match access {
            Access::Public => {
                if let Some(limiter) = limiter {
                    limiter.check_peer(&peer, path)?;
                }
                return Ok(None);
            }
            Access::Service => self.workload_principal(&peer),
            Access::Viewer | Access::User | Access::Admin => {
                if let Some(limiter) = limiter {
                    limiter.refuse_blocked_peer(&peer, path)?;
                }
                self.user_principal(authorization, &peer, path, access)
                    .await
            }
        };
        let principal = match (principal, limiter) {
            (Ok(principal), Some(limiter)) => {
                limiter.check_principal(&principal, path)?;
                principal
            }
            (Ok(principal), None) => principal,
            (Err(err), Some(limiter)) => {
                limiter.check_peer(&peer, path)?;
                return Err(err);
            }
            (Err(err), None) => return Err(err),
        };
        // "spiffe://…/service/agent on behalf of alice" for a delegation.
        tracing::Span::current().record("principal", principal.describe().as_str());
        request.extensions_mut().insert(principal);
        Ok(None)
    }

    /// The end user behind the bearer credential, if its role suffices for `access`.
    async fn user_principal(
        &self,
        authorization: Option<&HeaderValue>,
        peer: &PeerInfo,
        path: &str,
        access: Access,
    ) -> Result<Principal, ApiError> {
        let token = BearerToken::from_header(authorization)?.ok_or_else(|| {
            ApiError::unauthenticated(
                reason::MISSING_CREDENTIALS,
                "this RPC needs `authorization: Bearer <token>` (log in, or use an API key)",
            )
        })?;
        let principal = self.authenticator.authenticate(&token, peer).await?;
        // A delegated token is valid at the one service it was minted for: never at
        // kiln-auth (no API keys, sessions or further delegations from it), never at the
        // agent. Checked here, for every authenticator, before any handler runs.
        if let Some(scope) = &principal.scope
            && !audience_admits(&scope.audience, path)
        {
            return Err(ApiError::unauthenticated(
                reason::TOKEN_AUDIENCE_MISMATCH,
                format!(
                    "this delegated token is for {}, not for {path}",
                    scope.audience
                ),
            ));
        }
        if !principal.role.is_some_and(|role| role.satisfies(access)) {
            return Err(ApiError::permission_denied(
                reason::INSUFFICIENT_ROLE,
                format!(
                    "{path} needs role {} or higher; {} has role {}",
                    access.to_string().to_lowercase(),
                    principal.username,
                    principal.role.map_or("none", |r| r.as_str()),
                ),
            ));
        }
        Ok(principal)
    }

    fn workload_principal(&self, peer: &PeerInfo) -> Result<Principal, ApiError> {
        match &peer.workload {
            Some(id) if id.trust_domain == self.trust_domain => Ok(Principal::workload(id)),
            Some(id) => Err(ApiError::permission_denied(
                reason::WORKLOAD_IDENTITY_REQUIRED,
                format!("workload {id} is not of trust domain {}", self.trust_domain),
            )),
            None if peer.client_certificate => Err(ApiError::permission_denied(
                reason::WORKLOAD_IDENTITY_REQUIRED,
                "this RPC is for kiln services; the client certificate has no kiln workload identity",
            )),
            None => Err(ApiError::unauthenticated(
                reason::WORKLOAD_IDENTITY_REQUIRED,
                "this RPC is for kiln services and needs a workload client certificate",
            )),
        }
    }
}

/// The tower layer; add it with `tonic::transport::Server::builder().layer(..)`.
#[derive(Debug, Clone)]
pub struct KilnLayer {
    gate: Arc<Gate>,
}

impl KilnLayer {
    pub fn new(gate: Gate) -> Self {
        Self {
            gate: Arc::new(gate),
        }
    }

    /// Periodically drops rate-limit state of idle callers, so memory stays bounded.
    pub fn spawn_housekeeping(&self, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let gate = Arc::downgrade(&self.gate);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                ticker.tick().await;
                let Some(gate) = gate.upgrade() else { return };
                if let Some(limiter) = &gate.rate_limiter {
                    limiter.forget_idle();
                }
            }
        })
    }
}

impl<S> Layer<S> for KilnLayer {
    type Service = KilnService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KilnService {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// The service [`KilnLayer`] wraps around the router.
#[derive(Debug, Clone)]
pub struct KilnService<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S> Service<Request<Body>> for KilnService<S>
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
        // The router was made ready by poll_ready; keep that instance and leave a clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        let request_id = RequestId::from_request(&request);
        let span = tracing::info_span!(
            "rpc",
            rpc = %request.uri().path(),
            request_id = %request_id,
            principal = tracing::field::Empty,
        );
        Box::pin(
            async move {
                let started = Instant::now();
                request.extensions_mut().insert(request_id.clone());
                let mut response = match gate.admit(&mut request).await {
                    Ok(slot) => {
                        let request = request.map(|body| Body::new(LimitedBody::new(body, gate.max_message_bytes)));
                        let response = inner.call(request).await?;
                        match slot {
                            // The slot lives as long as the response stream.
                            Some(slot) => response.map(|body| Body::new(SlotBody { inner: body, _slot: slot })),
                            None => response,
                        }
                    }
                    Err(err) => {
                        tracing::info!(code = ?err.code(), reason = err.reason(), "refused: {}", err.message());
                        Status::from(err).into_http()
                    }
                };
                response.headers_mut().insert(REQUEST_ID_HEADER, request_id.0);
                response
                    .headers_mut()
                    .insert(VERSION_HEADER, HeaderValue::from_static(env!("CARGO_PKG_VERSION")));
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    grpc_status = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()),
                    "response headers sent"
                );
                Ok(response)
            }
            .instrument(span),
        )
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds a [`Slot`] until the stream ends or is dropped.
    struct SlotBody<B> {
        #[pin]
        inner: B,
        _slot: Slot,
    }
}

impl<B: http_body::Body> http_body::Body for SlotBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
