//! The access level of the called method, from the contract's declarations: what every
//! later layer decides by. Methods without a declaration, and methods this listener does
//! not serve, are refused here. Health and reflection are infrastructure (no
//! credentials); their long-lived streams hold a slot per peer while open, so nobody
//! can pile up unauthenticated streams.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, Either};
use http::{Request, Response};
use tonic::body::Body;
use tower::{Layer, Service};

use super::refusal;
use crate::access::{Access, AccessPolicy, Verdict};
use crate::error::{ApiError, reason};
use crate::identity::PeerInfo;
use crate::slots::{PeerSlots, Slot};

/// Streams anyone may open without credentials and keep open: each holds a slot of the
/// layer's [`PeerSlots`] until it ends.
const LONG_LIVED_UNAUTHENTICATED: &[&str] = &[
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// What this layer leaves in the request extensions for the ones after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A kiln RPC with its declared access level.
    Rpc(Access),
    /// Health or reflection: no credentials, no rate limit.
    Infrastructure,
}

impl Route {
    /// The route of a request this layer admitted. `None` means the chain was put
    /// together without this layer in front; callers refuse the request then.
    pub fn of<B>(request: &Request<B>) -> Option<Self> {
        request.extensions().get::<Self>().copied()
    }

    /// The refusal of a request whose route is missing (a misassembled chain).
    pub(crate) fn missing() -> ApiError {
        ApiError::internal(
            "admitting a call",
            &"the access layer did not run before this one",
        )
    }
}

/// Looks up the method's access level; bounds unauthenticated long-lived streams.
#[derive(Debug, Clone)]
pub struct AccessLayer {
    policy: Arc<AccessPolicy>,
    open_streams: PeerSlots,
}

impl AccessLayer {
    pub fn new(policy: AccessPolicy, open_streams: PeerSlots) -> Self {
        Self {
            policy: Arc::new(policy),
            open_streams,
        }
    }

    /// The route of `request`, and the slot a long-lived infrastructure stream holds.
    fn admit<B>(&self, request: &Request<B>) -> Result<(Route, Option<Slot>), ApiError> {
        let path = request.uri().path();
        match self.policy.verdict(path) {
            Verdict::Rpc(access) => Ok((Route::Rpc(access), None)),
            Verdict::Infrastructure if LONG_LIVED_UNAUTHENTICATED.contains(&path) => {
                let ip = request
                    .extensions()
                    .get::<PeerInfo>()
                    .and_then(|p| p.remote_addr)
                    .map(|a| a.ip());
                match self.open_streams.try_acquire(ip) {
                    Some(slot) => Ok((Route::Infrastructure, Some(slot))),
                    None => Err(ApiError::new(
                        tonic::Code::ResourceExhausted,
                        reason::TOO_MANY_STREAMS,
                        format!("too many open {path} streams; close some first"),
                    )),
                }
            }
            Verdict::Infrastructure => Ok((Route::Infrastructure, None)),
            Verdict::Undeclared => Err(ApiError::permission_denied(
                reason::ACCESS_NOT_DECLARED,
                format!("{path} declares no access level, so it cannot be called"),
            )),
            Verdict::Unknown => Err(ApiError::new(
                tonic::Code::Unimplemented,
                reason::UNKNOWN_METHOD,
                format!("this server has no RPC {path}"),
            )),
        }
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = AccessService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AccessLayer`] wraps around the rest of the chain.
#[derive(Debug, Clone)]
pub struct AccessService<S> {
    inner: S,
    layer: AccessLayer,
}

impl<S> Service<Request<Body>> for AccessService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    /// The rest of the chain's own future, boxed only to hold a stream's slot or for a
    /// refusal.
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let (route, slot) = match self.layer.admit(&request) {
            Ok(admitted) => admitted,
            Err(err) => return Either::Right(Box::pin(std::future::ready(Ok(refusal(err))))),
        };
        request.extensions_mut().insert(route);
        // `inner` is the instance `poll_ready` made ready: it takes the call itself.
        let response = self.inner.call(request);
        match slot {
            None => Either::Left(response),
            // The slot lives as long as the response stream.
            Some(slot) => Either::Right(Box::pin(async move {
                Ok(response.await?.map(|body| {
                    Body::new(SlotBody {
                        inner: body,
                        _slot: slot,
                    })
                }))
            })),
        }
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

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::layer::testing::{Seen, handler, refusal, request};

    fn layer(per_peer: usize) -> AccessLayer {
        let policy = AccessPolicy::from_descriptor_set(
            kiln_proto::FILE_DESCRIPTOR_SET,
            &["kiln.auth.v1.AuthService"],
        )
        .expect("policy");
        AccessLayer::new(policy, PeerSlots::new(per_peer, usize::MAX))
    }

    async fn call(layer: &AccessLayer, path: &str) -> (Response<Body>, Seen) {
        let seen = Seen::default();
        let response = layer
            .layer(handler(seen.clone()))
            .oneshot(request(path))
            .await
            .expect("infallible");
        (response, seen)
    }

    #[tokio::test]
    async fn declared_rpcs_carry_their_level_and_infrastructure_is_marked() {
        let layer = layer(4);
        let (response, seen) = call(&layer, "/kiln.auth.v1.AuthService/Login").await;
        assert_eq!(refusal(&response), None);
        assert_eq!(
            seen.extensions().get::<Route>(),
            Some(&Route::Rpc(Access::Public))
        );
        let (_, seen) = call(&layer, "/grpc.health.v1.Health/Check").await;
        assert_eq!(
            seen.extensions().get::<Route>(),
            Some(&Route::Infrastructure)
        );
    }

    #[tokio::test]
    async fn methods_not_served_here_are_unimplemented() {
        let layer = layer(4);
        let (response, seen) = call(&layer, "/kiln.build.v1.BuildService/StartBuild").await;
        assert_eq!(
            refusal(&response),
            Some((tonic::Code::Unimplemented, reason::UNKNOWN_METHOD.into()))
        );
        assert!(!seen.reached());
    }

    /// A Watch stream that stays open until its body is dropped.
    async fn open_stream(layer: &AccessLayer) -> Response<Body> {
        let endless = tower::service_fn(|_: Request<Body>| async {
            let frames =
                futures::stream::pending::<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>();
            Ok::<_, Infallible>(Response::new(Body::new(http_body_util::StreamBody::new(
                frames,
            ))))
        });
        layer
            .layer(endless)
            .oneshot(request("/grpc.health.v1.Health/Watch"))
            .await
            .expect("infallible")
    }

    #[tokio::test]
    async fn long_lived_streams_hold_a_slot_until_their_body_is_dropped() {
        let layer = layer(1);
        let watch = "/grpc.health.v1.Health/Watch";
        let open = open_stream(&layer).await;
        let (second, seen) = call(&layer, watch).await;
        assert_eq!(
            refusal(&second),
            Some((
                tonic::Code::ResourceExhausted,
                reason::TOO_MANY_STREAMS.into()
            ))
        );
        assert!(!seen.reached());
        // Short infrastructure calls need no slot.
        let (check, _) = call(&layer, "/grpc.health.v1.Health/Check").await;
        assert_eq!(refusal(&check), None);
        drop(open);
        let (third, _) = call(&layer, watch).await;
        assert_eq!(refusal(&third), None, "the slot came back with the stream");
    }
}
