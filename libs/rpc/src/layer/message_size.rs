//! The last layer: request messages over the listener's limit fail with
//! RESOURCE_EXHAUSTED as their frame header streams past ([`LimitedBody`]), before the
//! message is buffered.

use std::task::{Context, Poll};

use http::Request;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::limit::LimitedBody;

/// Wraps every request body in a [`LimitedBody`].
#[derive(Debug, Clone, Copy)]
pub struct MessageSizeLayer {
    max_message_bytes: usize,
}

impl MessageSizeLayer {
    pub fn new(max_message_bytes: usize) -> Self {
        Self { max_message_bytes }
    }
}

impl<S> Layer<S> for MessageSizeLayer {
    type Service = MessageSizeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MessageSizeService {
            inner,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

/// The service [`MessageSizeLayer`] wraps around the handlers.
#[derive(Debug, Clone)]
pub struct MessageSizeService<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S> Service<Request<Body>> for MessageSizeService<S>
where
    S: Service<Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let limit = self.max_message_bytes;
        self.inner
            .call(request.map(|body| Body::new(LimitedBody::new(body, limit))))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    /// A gRPC frame announcing a message of `len` bytes (and carrying them).
    fn frame(len: usize) -> Bytes {
        let mut frame = vec![0u8];
        frame.extend_from_slice(&u32::try_from(len).expect("small").to_be_bytes());
        frame.resize(5 + len, b'x');
        frame.into()
    }

    async fn body_read_by_handler(message_len: usize) -> Result<usize, tonic::Status> {
        let handler = tower::service_fn(|request: Request<Body>| async move {
            let read = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len());
            Ok::<_, std::convert::Infallible>(read)
        });
        let request = Request::new(Body::new(http_body_util::Full::new(frame(message_len))));
        MessageSizeLayer::new(16)
            .layer(handler)
            .oneshot(request)
            .await
            .expect("infallible")
    }

    #[tokio::test]
    async fn messages_up_to_the_limit_pass_and_larger_ones_are_resource_exhausted() {
        assert_eq!(body_read_by_handler(16).await.expect("at the limit"), 21);
        let err = body_read_by_handler(17).await.expect_err("over the limit");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    }
}
