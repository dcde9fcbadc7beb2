//! kiln-eventlog: append-only event logs that many clients follow live.
//!
//! A log is numbered, persisted, then published. [`LiveLog::append`] gives each event the
//! next sequence (dense, from the last stored one + 1), writes the batch to the
//! [`EventStore`] in one transaction together with the caller's state update, and only
//! then publishes it: into an append-only window of recent events (bounded in bytes) and
//! a `watch` of the last sequence. The writer never waits for a watcher.
//!
//! A watcher ([`watch`]) is a pull-based stream, no task of its own: it copies from the
//! window while it keeps up, reads the store when it fell behind the window or the log is
//! no longer live, and sends a heartbeat (carrying the last sequence) after a silence. It
//! yields every event after the sequence it started from exactly once, in order, and ends
//! after the final event. A watcher that never reads costs one idle stream and loses
//! nothing; it never slows the writer or other watchers.
//!
//! The library knows nothing of the events themselves: a service describes its event
//! type through [`EventKind`] and its storage through [`EventStore`]. Both are traits of
//! the store type rather than of the event, because events are usually another crate's
//! generated messages, which the orphan rule puts out of reach of an impl in the service.

mod live;
mod watch;

use std::future::Future;

pub use live::{LiveLog, Logs};
pub use watch::watch;

/// What the log needs to know about one kind of event.
pub trait EventKind: Send + Sync + 'static {
    /// The event as stored and as watchers receive it.
    type Event: Clone + Send + Sync + 'static;

    /// The event's sequence number.
    fn sequence(event: &Self::Event) -> u64;

    /// Numbers an event; the log calls it before persisting.
    fn set_sequence(event: &mut Self::Event, sequence: u64);

    /// What the event costs the live window, in bytes (roughly: its payload plus a fixed
    /// overhead). The window keeps recent events up to its budget.
    fn window_bytes(event: &Self::Event) -> usize;

    /// Whether this event ends the log (nothing follows it; watchers close after it).
    fn is_final(event: &Self::Event) -> bool;

    /// A heartbeat to send after a silence; `last_sequence` is the last event the
    /// watcher got. Heartbeats are never stored.
    fn heartbeat(last_sequence: u64) -> Self::Event;
}

/// Where a log's events are persisted. Cloned into every watcher.
pub trait EventStore: EventKind + Clone {
    /// The caller's change to its own state (say, a build row), stored in the same
    /// transaction as the events it goes with.
    type Update: Send;
    /// The store's error; watchers yield it and end.
    type Error: Send + 'static;

    /// Persists `events` (numbered, in order, never empty) of log `log_id` and `update`
    /// atomically: all or nothing.
    fn append(
        &self,
        log_id: &str,
        events: &[Self::Event],
        update: Self::Update,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Stored events of `log_id` with sequence > `after`, in order, at most `limit`.
    fn events_after(
        &self,
        log_id: &str,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Self::Event>, Self::Error>> + Send;

    /// Whether the log will get no more events (it ended, or it no longer exists).
    /// Asked only about logs that have no [`LiveLog`] registered.
    fn is_closed(&self, log_id: &str) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// Waits until `log_id` may have new stored events, at most `timeout`. A watcher of
    /// a log that is not live in this process (another process writes it) calls this
    /// between reads of the store. The default is to poll: wait `timeout`. A store that
    /// several processes share may wake watchers as soon as another process appends
    /// (Postgres LISTEN/NOTIFY); an append just before the wait is then caught by the
    /// timeout, so the timeout stays the bound.
    fn wait_for_append(
        &self,
        log_id: &str,
        timeout: std::time::Duration,
    ) -> impl Future<Output = ()> + Send {
        let _ = log_id;
        tokio::time::sleep(timeout)
    }
}
