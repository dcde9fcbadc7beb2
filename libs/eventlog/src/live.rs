//! The in-memory side of a log that is still being written: the writer, the window of
//! recent events, and the registry of live logs.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::EventStore;

/// The in-memory log of one unfinished log: its writer and its live window.
///
/// `W` is state the writer keeps between appends and folds events into (a build keeps
/// its step results, which every update carries whole). It lives under the writer lock,
/// so updates computed from it follow sequence order.
pub struct LiveLog<S: EventStore, W = ()> {
    id: String,
    window: Mutex<Window<S::Event>>,
    last: watch::Sender<u64>,
    writer: tokio::sync::Mutex<Writer<W>>,
    finished: AtomicBool,
    window_bytes: usize,
}

struct Window<E> {
    /// Sequence of `events[0]` (or of the next event, when empty).
    first_seq: u64,
    events: VecDeque<Arc<E>>,
    bytes: usize,
}

struct Writer<W> {
    next_seq: u64,
    state: W,
}

impl<S: EventStore, W> fmt::Debug for LiveLog<S, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveLog")
            .field("id", &self.id)
            .field("last_sequence", &*self.last.borrow())
            .field("finished", &self.is_finished())
            .field("window_bytes", &self.window_bytes)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data under these locks stays consistent at every step: a panic elsewhere
    // while one was held leaves nothing half-done.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: EventStore, W> LiveLog<S, W> {
    /// A live log whose last stored event is `last_sequence` (0: none yet), with the
    /// writer's `state` as of that event, keeping up to `window_bytes` of recent events
    /// in memory (at least the newest one, whatever its size).
    pub fn new(
        id: impl Into<String>,
        last_sequence: u64,
        state: W,
        window_bytes: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            id: id.into(),
            window: Mutex::new(Window {
                first_seq: last_sequence + 1,
                events: VecDeque::new(),
                bytes: 0,
            }),
            last: watch::channel(last_sequence).0,
            writer: tokio::sync::Mutex::new(Writer {
                next_seq: last_sequence + 1,
                state,
            }),
            finished: AtomicBool::new(false),
            window_bytes,
        })
    }

    /// The log's id (the store's key).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The last published sequence.
    pub fn last_sequence(&self) -> u64 {
        *self.last.borrow()
    }

    /// Whether the final event has been published.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Numbers `events`, persists them with `update` in one transaction, then publishes
    /// them. Returns the last sequence of the log. When the store fails nothing is
    /// published and the sequences are not used: the next append gets them.
    pub async fn append(
        &self,
        store: &S,
        events: Vec<S::Event>,
        update: S::Update,
    ) -> Result<u64, S::Error> {
        self.append_inner(store, events, |_, _| (update, None))
            .await
    }

    /// Like [`append`](Self::append), with the update computed under the writer lock
    /// from the writer's state and the numbered events; `update` may change the state.
    /// The change is kept only if the store took the batch.
    pub async fn append_with<F>(
        &self,
        store: &S,
        events: Vec<S::Event>,
        update: F,
    ) -> Result<u64, S::Error>
    where
        W: Clone,
        F: FnOnce(&mut W, &[S::Event]) -> S::Update,
    {
        self.append_inner(store, events, |state, numbered| {
            let mut next = state.clone();
            let u = update(&mut next, numbered);
            (u, Some(next))
        })
        .await
    }

    async fn append_inner<F>(
        &self,
        store: &S,
        mut events: Vec<S::Event>,
        update: F,
    ) -> Result<u64, S::Error>
    where
        F: FnOnce(&W, &[S::Event]) -> (S::Update, Option<W>),
    {
        // One writer at a time: numbering, storing and publishing happen in one order.
        let mut writer = self.writer.lock().await;
        if events.is_empty() {
            return Ok(writer.next_seq - 1);
        }
        for (i, e) in events.iter_mut().enumerate() {
            S::set_sequence(e, writer.next_seq + i as u64);
        }
        let (update, state) = update(&writer.state, &events);
        store.append(&self.id, &events, update).await?;
        writer.next_seq += events.len() as u64;
        if let Some(state) = state {
            writer.state = state;
        }
        let last = writer.next_seq - 1;
        // Published under the writer lock, so the window's order is the sequence order.
        self.publish(events);
        Ok(last)
    }

    fn publish(&self, events: Vec<S::Event>) {
        let Some(last) = events.last().map(S::sequence) else {
            return;
        };
        let finished = events.iter().any(S::is_final);
        {
            let mut w = lock(&self.window);
            for e in events {
                w.bytes += S::window_bytes(&e);
                w.events.push_back(Arc::new(e));
            }
            while w.bytes > self.window_bytes && w.events.len() > 1 {
                if let Some(old) = w.events.pop_front() {
                    w.bytes -= S::window_bytes(&old);
                    w.first_seq += 1;
                }
            }
        }
        if finished {
            self.finished.store(true, Ordering::Release);
        }
        self.last.send_replace(last);
    }

    /// Events from sequence `next` on (at most `max`), or `None` when `next` has left the
    /// window (read the store instead).
    pub(crate) fn read_from(&self, next: u64, max: usize) -> Option<Vec<Arc<S::Event>>> {
        let w = lock(&self.window);
        if next < w.first_seq {
            return None;
        }
        let skip = usize::try_from(next - w.first_seq).unwrap_or(usize::MAX);
        Some(w.events.iter().skip(skip).take(max).cloned().collect())
    }

    /// A receiver of the last published sequence.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.last.subscribe()
    }
}

/// The live logs of a service, by id. A log is registered while it may still grow;
/// watchers of a log that is not registered follow the store.
pub struct Logs<S: EventStore, W = ()>(Mutex<HashMap<String, Arc<LiveLog<S, W>>>>);

impl<S: EventStore, W> Default for Logs<S, W> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<S: EventStore, W> fmt::Debug for Logs<S, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Logs")
            .field("live", &lock(&self.0).len())
            .finish()
    }
}

impl<S: EventStore, W> Logs<S, W> {
    pub fn get(&self, id: &str) -> Option<Arc<LiveLog<S, W>>> {
        lock(&self.0).get(id).cloned()
    }

    /// Registers `log` under its id, replacing any other.
    pub fn insert(&self, log: Arc<LiveLog<S, W>>) {
        lock(&self.0).insert(log.id.clone(), log);
    }

    pub fn remove(&self, id: &str) {
        lock(&self.0).remove(id);
    }
}
