//! Request message size limit.
//!
//! tonic's own decoder answers OUT_OF_RANGE for an oversized message; gRPC's convention
//! (and what grpc-go, grpc-java and grpcio clients expect) is RESOURCE_EXHAUSTED. This
//! body wrapper reads each gRPC frame header (1 byte flags + 4 bytes big-endian length)
//! as the bytes stream past and fails the body with RESOURCE_EXHAUSTED as soon as a
//! header announces a message over the limit — before the message is buffered. tonic
//! passes a `Status` body error through to the client unchanged.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Status;

use crate::error::{ApiError, reason};

/// The largest limit a configuration may set; also the limit given to tonic's decoder,
/// so that this wrapper always speaks first.
pub const MAX_MESSAGE_BYTES_CEILING: usize = 64 * 1024 * 1024;

/// Length of the gRPC message prefix: compression flag + u32 length.
const PREFIX_LEN: usize = 5;

pin_project! {
    /// A request body that refuses gRPC messages larger than `limit` bytes.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        limit: usize,
        // Bytes of the current message body still to skip.
        remaining_body: usize,
        // A partially received prefix.
        prefix: [u8; PREFIX_LEN],
        prefix_len: usize,
        failed: bool,
    }
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, limit: usize) -> Self {
        Self {
            inner,
            limit,
            remaining_body: 0,
            prefix: [0; PREFIX_LEN],
            prefix_len: 0,
            failed: false,
        }
    }
}

/// Walks the frames in `chunk`, returning the size of the first message over `limit`.
fn scan(
    mut chunk: &[u8],
    limit: usize,
    remaining_body: &mut usize,
    prefix: &mut [u8; PREFIX_LEN],
    prefix_len: &mut usize,
) -> Option<usize> {
    while chunk.has_remaining() {
        if *remaining_body > 0 {
            let skip = (*remaining_body).min(chunk.len());
            chunk.advance(skip);
            *remaining_body -= skip;
            continue;
        }
        let take = (PREFIX_LEN - *prefix_len).min(chunk.len());
        prefix[*prefix_len..*prefix_len + take].copy_from_slice(&chunk[..take]);
        *prefix_len += take;
        chunk.advance(take);
        if *prefix_len == PREFIX_LEN {
            let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
            *prefix_len = 0;
            if len > limit {
                return Some(len);
            }
            *remaining_body = len;
        }
    }
    None
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        let frame = match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => return Poll::Ready(Some(Err(err.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref()
            && let Some(len) = scan(
                data,
                *this.limit,
                this.remaining_body,
                this.prefix,
                this.prefix_len,
            )
        {
            *this.failed = true;
            let err = ApiError::new(
                tonic::Code::ResourceExhausted,
                reason::MESSAGE_TOO_LARGE,
                format!(
                    "request message of {len} bytes is over this server's limit of {} bytes",
                    this.limit
                ),
            )
            .with_metadata("limit_bytes", this.limit.to_string());
            return Poll::Ready(Some(Err(Box::new(Status::from(err)))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    }

    fn scan_chunks(chunks: &[&[u8]], limit: usize) -> Option<usize> {
        let (mut remaining, mut prefix, mut prefix_len) = (0, [0; PREFIX_LEN], 0);
        chunks
            .iter()
            .find_map(|c| scan(c, limit, &mut remaining, &mut prefix, &mut prefix_len))
    }

    #[test]
    fn messages_within_the_limit_pass_even_when_split() {
        let mut stream = frame(10);
        stream.extend(frame(100));
        stream.extend(frame(0));
        for split in 0..stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(scan_chunks(&[a, b], 100), None, "split at {split}");
        }
    }

    #[test]
    fn an_oversized_message_is_caught_at_its_header_even_when_split() {
        let mut stream = frame(10);
        stream.extend_from_slice(&[0, 0, 0, 1, 0]); // header of a 256-byte message
        for split in 0..stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(scan_chunks(&[a, b], 100), Some(256), "split at {split}");
        }
    }
}
