//! An in-memory store and a small event type for the log's tests.
#![allow(dead_code)] // each test binary uses a part

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{Stream, StreamExt};
use kiln_eventlog::{EventKind, EventStore, LiveLog, Logs};

/// A test event: its sequence and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ev {
    pub seq: u64,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Data(Vec<u8>),
    Final,
    Heartbeat,
}

pub fn data(n: usize) -> Ev {
    Ev {
        seq: 0,
        kind: Kind::Data(vec![b'x'; n]),
    }
}

pub fn fin() -> Ev {
    Ev {
        seq: 0,
        kind: Kind::Final,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub &'static str);

#[derive(Debug, Default)]
struct Inner {
    events: HashMap<String, Vec<Ev>>,
    /// Every update, in the order the store took them.
    updates: Vec<(String, Vec<u64>)>,
    fail_appends: usize,
    fail_reads: bool,
    sloppy_reads: bool,
    reads: usize,
}

/// Events in memory, one Vec per log. An append yields to the scheduler before it
/// commits, so a log that published before its store had the events would be caught.
#[derive(Debug, Clone, Default)]
pub struct MemStore(Arc<Mutex<Inner>>);

impl MemStore {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap()
    }

    /// The highest stored sequence of `id` (0: none).
    pub fn stored_last(&self, id: &str) -> u64 {
        self.inner()
            .events
            .get(id)
            .and_then(|v| v.last())
            .map_or(0, |e| e.seq)
    }

    pub fn stored(&self, id: &str) -> Vec<Ev> {
        self.inner().events.get(id).cloned().unwrap_or_default()
    }

    pub fn updates(&self) -> Vec<(String, Vec<u64>)> {
        self.inner().updates.clone()
    }

    /// The next `n` appends fail without storing anything.
    pub fn fail_appends(&self, n: usize) {
        self.inner().fail_appends = n;
    }

    pub fn fail_reads(&self, on: bool) {
        self.inner().fail_reads = on;
    }

    /// Reads ignore `after` and return the log from its start (a store that overlaps
    /// what the watcher already has).
    pub fn sloppy_reads(&self, on: bool) {
        self.inner().sloppy_reads = on;
    }

    /// How many times events were read from the store.
    pub fn reads(&self) -> usize {
        self.inner().reads
    }

    /// Stores events directly, as another process (or an earlier one) would have.
    pub fn put(&self, id: &str, events: Vec<Ev>) {
        self.inner()
            .events
            .entry(id.to_owned())
            .or_default()
            .extend(events);
    }
}

impl EventKind for MemStore {
    type Event = Ev;

    fn sequence(event: &Ev) -> u64 {
        event.seq
    }

    fn set_sequence(event: &mut Ev, sequence: u64) {
        event.seq = sequence;
    }

    fn window_bytes(event: &Ev) -> usize {
        16 + match &event.kind {
            Kind::Data(d) => d.len(),
            _ => 0,
        }
    }

    fn is_final(event: &Ev) -> bool {
        event.kind == Kind::Final
    }

    fn heartbeat(last_sequence: u64) -> Ev {
        Ev {
            seq: last_sequence,
            kind: Kind::Heartbeat,
        }
    }
}

impl EventStore for MemStore {
    /// The test's update: whatever sequences the caller wants recorded with the batch.
    type Update = Vec<u64>;
    type Error = StoreError;

    async fn append(
        &self,
        log_id: &str,
        events: &[Ev],
        update: Vec<u64>,
    ) -> Result<(), StoreError> {
        tokio::task::yield_now().await;
        let mut inner = self.inner();
        if inner.fail_appends > 0 {
            inner.fail_appends -= 1;
            return Err(StoreError("append failed"));
        }
        let log = inner.events.entry(log_id.to_owned()).or_default();
        let first = log.last().map_or(events[0].seq, |e| e.seq + 1);
        for (expect, e) in (first..).zip(events) {
            assert_eq!(e.seq, expect, "the store got a gap or a duplicate");
        }
        log.extend_from_slice(events);
        inner.updates.push((log_id.to_owned(), update));
        Ok(())
    }

    async fn events_after(
        &self,
        log_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Ev>, StoreError> {
        tokio::task::yield_now().await;
        let mut inner = self.inner();
        if inner.fail_reads {
            return Err(StoreError("read failed"));
        }
        inner.reads += 1;
        let after = if inner.sloppy_reads { 0 } else { after };
        Ok(inner
            .events
            .get(log_id)
            .map(|v| {
                v.iter()
                    .filter(|e| e.seq > after)
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn is_closed(&self, log_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .inner()
            .events
            .get(log_id)
            .is_none_or(|v| v.last().is_some_and(|e| e.kind == Kind::Final)))
    }
}

pub type Log = LiveLog<MemStore>;
pub type Registry = Logs<MemStore>;

/// A registry with one live log `id` that has no events yet.
pub fn live(id: &str, window_bytes: usize) -> (Arc<Registry>, Arc<Log>) {
    let logs = Arc::new(Registry::default());
    let log = Log::new(id, 0, (), window_bytes);
    logs.insert(log.clone());
    (logs, log)
}

/// Reads a watch stream to its end: the sequences it yielded (no heartbeats expected).
pub async fn sequences(stream: impl Stream<Item = Result<Ev, StoreError>>) -> Vec<u64> {
    stream
        .map(|e| {
            let e = e.unwrap();
            assert_ne!(e.kind, Kind::Heartbeat, "no heartbeat expected here");
            e.seq
        })
        .collect()
        .await
}

/// Appends `n` data events of `size` bytes in batches of 1 to 7, then the final event;
/// returns the final event's sequence.
pub async fn write(store: &MemStore, log: &Log, n: usize, size: usize) -> u64 {
    let mut left = n;
    let mut batch = 1;
    while left > 0 {
        let k = batch.min(left);
        log.append(store, (0..k).map(|_| data(size)).collect(), vec![])
            .await
            .unwrap();
        left -= k;
        batch = batch % 7 + 1;
    }
    log.append(store, vec![fin()], vec![]).await.unwrap()
}

/// `from..=to` as a Vec, for comparing with what a watcher got.
pub fn range(from: u64, to: u64) -> Vec<u64> {
    (from..=to).collect()
}
