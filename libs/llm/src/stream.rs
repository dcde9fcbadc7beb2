//! The chat stream both dialects share: send (with retries), split the body into lines,
//! let the dialect's decoder turn lines into events, and retry a connection that broke
//! before anything was streamed. Dropping the stream drops the response, which closes
//! the connection: that is how a cancelled task stops the model's work.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use futures::StreamExt as _;
use futures::future::{Either, select};

use crate::error::LlmError;
use crate::provider::ChatStream;
use crate::transport::{Deadline, Lines, ReadError, RequestSpec, Transport};
use crate::types::ChatEvent;

/// What a dialect made of one line.
#[derive(Debug, Default)]
pub(crate) struct Decoded {
    pub events: Vec<ChatEvent>,
    /// The dialect's end marker arrived (`[DONE]`, `done: true`): stop reading.
    pub done: bool,
}

/// A dialect's line decoder. A fresh one is made for every attempt.
pub(crate) trait Decoder: Default + Send + 'static {
    fn line(&mut self, line: &str) -> Result<Decoded, LlmError>;
    /// The body ended without the end marker: the last events (ending with
    /// [`ChatEvent::Finished`]), or why the answer is incomplete.
    fn end(&mut self) -> Result<Vec<ChatEvent>, LlmError>;
}

struct Call<D> {
    transport: Arc<Transport>,
    spec: RequestSpec,
    /// Started at the first poll, so a stream made early does not lose its time.
    deadline: Option<Deadline>,
    attempts: u32,
    lines: Option<Lines>,
    decoder: D,
    pending: VecDeque<ChatEvent>,
    /// Something reached the caller: from here on a retry would duplicate output.
    streamed: bool,
    finished: bool,
}

pub(crate) fn chat_stream<D: Decoder>(transport: Arc<Transport>, spec: RequestSpec) -> ChatStream {
    let call = Call {
        transport,
        spec,
        deadline: None,
        attempts: 0,
        lines: None,
        decoder: D::default(),
        pending: VecDeque::new(),
        streamed: false,
        finished: false,
    };
    futures::stream::unfold(call, |mut call| async move {
        let item = call.next().await?;
        Some((item, call))
    })
    .boxed()
}

impl<D: Decoder> Call<D> {
    async fn next(&mut self) -> Option<Result<ChatEvent, LlmError>> {
        let deadline = *self
            .deadline
            .get_or_insert_with(|| Deadline::start(&self.transport.timeouts));
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.streamed = true;
                return Some(Ok(event));
            }
            if self.finished {
                return None;
            }
            let lines = match &mut self.lines {
                Some(lines) => lines,
                None => match self
                    .transport
                    .send(&self.spec, &deadline, &mut self.attempts)
                    .await
                {
                    Ok(response) => {
                        self.decoder = D::default();
                        self.lines.insert(Lines::new(response))
                    }
                    Err(error) => return Some(self.fail(error)),
                },
            };
            let decoded = match lines.next_line(&deadline).await {
                Ok(Some(line)) => self.decoder.line(&line),
                Ok(None) => self
                    .decoder
                    .end()
                    .map(|events| Decoded { events, done: true }),
                Err(ReadError::Fatal(error)) => Err(error),
                Err(ReadError::Broken(detail)) => {
                    let url = self.transport.url(self.spec.path);
                    if !self.streamed
                        && let Some(wait) =
                            self.transport
                                .wait_before_retry(self.attempts, None, &deadline)
                    {
                        tracing::warn!(%url, %detail, "LLM stream broke before any output; retrying");
                        self.lines = None;
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    Err(LlmError::Connection { url, detail })
                }
            };
            match decoded {
                Ok(decoded) => {
                    self.pending.extend(decoded.events);
                    if decoded.done {
                        self.finished = true;
                        // Nothing more is read; dropping the body frees the connection.
                        self.lines = None;
                    }
                }
                Err(error) => return Some(self.fail(error)),
            }
        }
    }

    fn fail(&mut self, error: LlmError) -> Result<ChatEvent, LlmError> {
        self.finished = true;
        self.lines = None;
        self.pending.clear();
        Err(error)
    }
}

/// Ends `stream` with [`LlmError::Cancelled`] as soon as `cancelled` completes, dropping
/// the HTTP request at that moment (the provider sees the connection close and stops
/// generating). Use it to make a task's cancellation reach the model call.
pub fn until_cancelled<F>(stream: ChatStream, cancelled: F) -> ChatStream
where
    F: Future<Output = ()> + Send + 'static,
{
    let state = Some((stream, Box::pin(cancelled)));
    futures::stream::unfold(state, |state| async move {
        let (mut stream, cancelled) = state?;
        match select(stream.next(), cancelled).await {
            Either::Left((Some(item), cancelled)) => Some((item, Some((stream, cancelled)))),
            Either::Left((None, _)) => None,
            // `stream` is dropped here, before the caller sees the error.
            Either::Right(((), _)) => Some((Err(LlmError::Cancelled), None)),
        }
    })
    .boxed()
}
