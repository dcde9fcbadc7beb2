//! Reading stdout and stderr, with the output limit enforced by the reader itself.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::AsyncReadExt;
use tokio::sync::{Notify, mpsc};

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A piece of output, in order within its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// Which stream.
    pub stream: Stream,
    /// Byte offset of `data` within that stream.
    pub offset: u64,
    /// 1 byte to [`MAX_CHUNK`] bytes.
    pub data: Vec<u8>,
}

/// The largest chunk delivered (the build service's event size).
pub const MAX_CHUNK: usize = 32 * 1024;

/// Output of a running step, both streams interleaved in arrival order. Ends after the
/// last byte of both streams.
pub type OutputReceiver = mpsc::Receiver<OutputChunk>;

/// Shared between the two readers: bytes still allowed, and a flag for the monitor.
#[derive(Debug)]
pub(crate) struct Budget {
    remaining: AtomicU64,
    pub exceeded: Notify,
}

impl Budget {
    pub fn new(limit: Option<u64>) -> Arc<Self> {
        Arc::new(Budget {
            remaining: AtomicU64::new(limit.unwrap_or(u64::MAX)),
            exceeded: Notify::new(),
        })
    }

    /// Takes up to `n` bytes of the budget; returns how many may be delivered.
    fn take(&self, n: u64) -> u64 {
        let mut granted = 0;
        let _ = self
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                granted = left.min(n);
                Some(left - granted)
            });
        granted
    }
}

/// Reads one pipe to EOF. Returns the bytes delivered. Past the budget it keeps draining
/// (so the writer never blocks on a full pipe before it is killed) but drops the bytes,
/// and wakes the monitor, which ends the step with OUTPUT_LIMIT: the consumer sees
/// exactly `limit` bytes and an outcome saying why the rest is missing.
pub(crate) async fn read_stream(
    fd: OwnedFd,
    stream: Stream,
    tx: mpsc::Sender<OutputChunk>,
    budget: Arc<Budget>,
) -> u64 {
    let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return 0;
    };
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut offset = 0u64;
    let mut consumer_alive = true;
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return offset,
            Ok(n) => n as u64,
        };
        let granted = budget.take(n);
        if granted < n {
            budget.exceeded.notify_one();
        }
        if granted == 0 {
            continue;
        }
        let chunk = OutputChunk {
            stream,
            offset,
            data: buf[..granted as usize].to_vec(),
        };
        offset += granted;
        if consumer_alive && tx.send(chunk).await.is_err() {
            consumer_alive = false; // nobody listens; keep counting and draining
        }
    }
}
