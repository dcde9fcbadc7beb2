//! Watchers: every event after a sequence, exactly once, in order, from the window while
//! they keep up and from the store otherwise, with heartbeats during silence.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;

use crate::{EventStore, LiveLog, Logs};

/// Events fetched from the store per query when replaying.
const STORE_BATCH: usize = 512;
/// Events copied from the window per turn.
const WINDOW_BATCH: usize = 256;
/// How often, at the latest, a watcher of a log that is neither live nor closed asks the
/// store again (sooner when the store says it was appended to: `wait_for_append`). That
/// happens only between a log's first store write and its registration, or when another
/// process writes the log.
const STORE_POLL: Duration = Duration::from_millis(100);

/// A live log being followed, with its receiver of the last published sequence.
type Following<S, W> = (Arc<LiveLog<S, W>>, watch::Receiver<u64>);

/// One watch stream's position and sources.
struct Watcher<S: EventStore, W> {
    store: S,
    logs: Arc<Logs<S, W>>,
    id: String,
    next: u64,
    live: Option<Following<S, W>>,
    buf: VecDeque<S::Event>,
    done: bool,
    heartbeat: Duration,
}

/// The events of log `id` after sequence `after`, live until the final event, with a
/// heartbeat after each `heartbeat` of silence. Ends after the final event, or when the
/// store says the log is closed and everything stored was sent; ends after yielding a
/// store error. The caller has checked that the log exists and may be seen.
pub fn watch<S, W>(
    store: S,
    logs: Arc<Logs<S, W>>,
    id: String,
    after: u64,
    heartbeat: Duration,
) -> impl Stream<Item = Result<S::Event, S::Error>> + Send + 'static
where
    S: EventStore,
    W: Send + 'static,
{
    let watcher = Watcher {
        store,
        logs,
        id,
        next: after.saturating_add(1),
        live: None,
        buf: VecDeque::new(),
        done: false,
        heartbeat,
    };
    futures::stream::unfold(watcher, |mut w| async move {
        let item = w.next_item().await?;
        Some((item, w))
    })
}

impl<S: EventStore, W: Send + 'static> Watcher<S, W> {
    async fn next_item(&mut self) -> Option<Result<S::Event, S::Error>> {
        loop {
            if let Some(e) = self.buf.pop_front() {
                if S::sequence(&e) != self.next {
                    continue; // never a gap or a duplicate, whatever the sources did
                }
                self.next += 1;
                if S::is_final(&e) {
                    self.done = true;
                }
                return Some(Ok(e));
            }
            if self.done {
                return None;
            }
            if self.live.is_none() {
                self.live = self.logs.get(&self.id).map(|l| {
                    let rx = l.subscribe();
                    (l, rx)
                });
            }
            match self.live.as_mut() {
                Some((log, rx)) => {
                    // Marked seen before reading, so a publish after the read wakes us.
                    rx.borrow_and_update();
                    match log.read_from(self.next, WINDOW_BATCH) {
                        Some(events) if !events.is_empty() => {
                            self.buf.extend(events.iter().map(|e| (**e).clone()));
                        }
                        Some(_) if log.is_finished() => return None,
                        Some(_) => match tokio::time::timeout(self.heartbeat, rx.changed()).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => self.live = None,
                            Err(_) => return Some(Ok(S::heartbeat(self.next - 1))),
                        },
                        None => {
                            if let Err(e) = self.fill_from_store().await {
                                self.done = true;
                                return Some(Err(e));
                            }
                        }
                    }
                }
                None => match self.follow_stored().await {
                    Ok(true) => {}
                    Ok(false) => return Some(Ok(S::heartbeat(self.next - 1))),
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                },
            }
        }
    }

    async fn fill_from_store(&mut self) -> Result<usize, S::Error> {
        let events = self
            .store
            .events_after(&self.id, self.next - 1, STORE_BATCH)
            .await?;
        let n = events.len();
        self.buf.extend(events);
        Ok(n)
    }

    /// A log without a live log: replay the store. Returns false when a heartbeat is due
    /// (the log is not closed yet but nothing new arrived for a while).
    async fn follow_stored(&mut self) -> Result<bool, S::Error> {
        let started = tokio::time::Instant::now();
        loop {
            if self.fill_from_store().await? > 0 {
                return Ok(true);
            }
            if self.store.is_closed(&self.id).await? {
                // Re-read once: the final event may have landed after the first query.
                if self.fill_from_store().await? == 0 {
                    self.done = true;
                }
                return Ok(true);
            }
            if self.logs.get(&self.id).is_some() {
                return Ok(true); // it went live (stored → registered): follow from memory
            }
            if started.elapsed() >= self.heartbeat {
                return Ok(false);
            }
            self.store
                .wait_for_append(&self.id, STORE_POLL.min(self.heartbeat))
                .await;
        }
    }
}
