//! Build event logs: numbered, persisted, then shown.
//!
//! Each build that has not finished has a [`LiveLog`] in memory. Appending numbers the
//! events (dense, from 1), writes them to the store in one transaction, and only then
//! publishes them: into an append-only window of recent events and a `watch` of the last
//! sequence. The writer never waits for a watcher. Each watcher is a stream that pulls at
//! its client's pace: from the window while it keeps up, from the store when it has
//! fallen behind the window or the build is over. A watcher that never reads costs one
//! idle stream, nothing more, and loses nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use kiln_proto::build as pb;
use pb::build_event::Event;
use tokio::sync::watch;
use tonic::Status;

use crate::error::Result;
use crate::store::{BuildUpdate, Store, now_micros, timestamp};

/// Events fetched from the store per query when replaying.
const STORE_BATCH: i64 = 512;
/// Events copied from the window per turn.
const WINDOW_BATCH: usize = 256;

/// The in-memory log of one unfinished build.
#[derive(Debug)]
pub struct LiveLog {
    build_id: String,
    window: Mutex<Window>,
    last: watch::Sender<u64>,
    writer: tokio::sync::Mutex<Writer>,
    finished: AtomicBool,
    window_bytes: usize,
}

#[derive(Debug, Default)]
struct Window {
    /// Sequence of `events[0]`.
    first_seq: u64,
    events: VecDeque<Arc<pb::BuildEvent>>,
    bytes: usize,
}

#[derive(Debug)]
struct Writer {
    next_seq: u64,
    step_results: Vec<pb::StepFinished>,
}

fn event_bytes(e: &pb::BuildEvent) -> usize {
    64 + match &e.event {
        Some(Event::Output(o)) => o.data.len(),
        _ => 0,
    }
}

impl LiveLog {
    /// A log whose last stored event is `last_sequence`.
    pub fn new(
        build_id: &str,
        last_sequence: u64,
        step_results: Vec<pb::StepFinished>,
        window_bytes: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            build_id: build_id.to_owned(),
            window: Mutex::new(Window {
                first_seq: last_sequence + 1,
                ..Window::default()
            }),
            last: watch::channel(last_sequence).0,
            writer: tokio::sync::Mutex::new(Writer {
                next_seq: last_sequence + 1,
                step_results,
            }),
            finished: AtomicBool::new(false),
            window_bytes,
        })
    }

    /// Numbers, persists, then publishes `events`, applying `update` to the build row in
    /// the same transaction. A StepFinished is added to the build's step results.
    pub async fn append(
        &self,
        store: &Store,
        events: Vec<Event>,
        mut update: BuildUpdate,
    ) -> Result<u64> {
        let mut writer = self.writer.lock().await;
        let time = Some(timestamp(now_micros()));
        let mut numbered = Vec::with_capacity(events.len());
        for (i, event) in events.into_iter().enumerate() {
            if let Event::StepFinished(sf) = &event {
                writer.step_results.push(sf.clone());
                update.step_results = Some(writer.step_results.clone());
            }
            numbered.push(pb::BuildEvent {
                sequence: writer.next_seq + i as u64,
                time,
                event: Some(event),
            });
        }
        if let Err(e) = store.append(&self.build_id, &numbered, &update).await {
            // Nothing was published; undo the step results taken above.
            let keep = writer.step_results.len()
                - numbered
                    .iter()
                    .filter(|e| matches!(e.event, Some(Event::StepFinished(_))))
                    .count();
            writer.step_results.truncate(keep);
            return Err(e);
        }
        writer.next_seq += numbered.len() as u64;
        let last = writer.next_seq - 1;
        self.publish(numbered);
        Ok(last)
    }

    fn publish(&self, events: Vec<pb::BuildEvent>) {
        let Some(last) = events.last().map(|e| e.sequence) else {
            return;
        };
        let finished = events
            .iter()
            .any(|e| matches!(e.event, Some(Event::Finished(_))));
        {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            for e in events {
                w.bytes += event_bytes(&e);
                w.events.push_back(Arc::new(e));
            }
            while w.bytes > self.window_bytes && w.events.len() > 1 {
                if let Some(old) = w.events.pop_front() {
                    w.bytes -= event_bytes(&old);
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
    fn read_from(&self, next: u64, max: usize) -> Option<Vec<Arc<pb::BuildEvent>>> {
        let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if next < w.first_seq {
            return None;
        }
        let skip = usize::try_from(next - w.first_seq).unwrap_or(usize::MAX);
        Some(w.events.iter().skip(skip).take(max).cloned().collect())
    }

    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }
}

/// The live logs of unfinished builds, by build id.
#[derive(Debug, Default)]
pub struct Logs(Mutex<HashMap<String, Arc<LiveLog>>>);

impl Logs {
    pub fn get(&self, id: &str) -> Option<Arc<LiveLog>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub fn insert(&self, log: Arc<LiveLog>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(log.build_id.clone(), log);
    }

    pub fn remove(&self, id: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

/// One watch stream's position and sources.
struct Watcher {
    store: Store,
    logs: Arc<Logs>,
    build_id: String,
    next: u64,
    live: Option<(Arc<LiveLog>, watch::Receiver<u64>)>,
    buf: VecDeque<pb::BuildEvent>,
    done: bool,
    heartbeat: Duration,
}

/// The events of `build_id` after `after`, live until Finished, with heartbeats during
/// silence. The caller has checked that the build exists and may be seen.
pub fn watch(
    store: Store,
    logs: Arc<Logs>,
    build_id: String,
    after: u64,
    heartbeat: Duration,
) -> impl Stream<Item = Result<pb::BuildEvent, Status>> + Send + 'static {
    let watcher = Watcher {
        store,
        logs,
        build_id,
        next: after + 1,
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

fn heartbeat(sequence: u64) -> pb::BuildEvent {
    pb::BuildEvent {
        sequence,
        time: Some(timestamp(now_micros())),
        event: Some(Event::Heartbeat(pb::Heartbeat {})),
    }
}

impl Watcher {
    async fn next_item(&mut self) -> Option<Result<pb::BuildEvent, Status>> {
        loop {
            if let Some(e) = self.buf.pop_front() {
                if e.sequence != self.next {
                    continue; // never a gap or a duplicate, whatever the sources did
                }
                self.next += 1;
                if matches!(e.event, Some(Event::Finished(_))) {
                    self.done = true;
                }
                return Some(Ok(e));
            }
            if self.done {
                return None;
            }
            if self.live.is_none() {
                self.live = self.logs.get(&self.build_id).map(|l| {
                    let rx = l.last.subscribe();
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
                            Err(_) => return Some(Ok(heartbeat(self.next - 1))),
                        },
                        None => {
                            if let Err(e) = self.fill_from_store().await {
                                return Some(Err(e));
                            }
                        }
                    }
                }
                None => match self.follow_stored().await {
                    Ok(true) => {}
                    Ok(false) => return Some(Ok(heartbeat(self.next - 1))),
                    Err(e) => return Some(Err(e)),
                },
            }
        }
    }

    async fn fill_from_store(&mut self) -> Result<usize, Status> {
        let events = self
            .store
            .events_after(&self.build_id, self.next - 1, STORE_BATCH)
            .await
            .map_err(Status::from)?;
        let n = events.len();
        self.buf.extend(events);
        Ok(n)
    }

    /// A build without a live log: replay the store. Returns false when a heartbeat is
    /// due (the build is not final yet but nothing new arrived for a while).
    async fn follow_stored(&mut self) -> Result<bool, Status> {
        let started = tokio::time::Instant::now();
        loop {
            if self.fill_from_store().await? > 0 {
                return Ok(true);
            }
            let build = self
                .store
                .get_build(&self.build_id)
                .await
                .map_err(Status::from)?;
            let fin = build.is_none_or(|b| is_final(b.build.state));
            if fin {
                // Re-read once: the Finished event may have landed after the first query.
                if self.fill_from_store().await? == 0 {
                    self.done = true;
                }
                return Ok(true);
            }
            if self.logs.get(&self.build_id).is_some() {
                return Ok(true); // it went live (queued → registered): follow from memory
            }
            if started.elapsed() >= self.heartbeat {
                return Ok(false);
            }
            // Only between a build's insert and its registration, or across replicas.
            tokio::time::sleep(Duration::from_millis(100).min(self.heartbeat)).await;
        }
    }
}

/// Whether a state is final.
pub fn is_final(state: i32) -> bool {
    !matches!(
        pb::BuildState::try_from(state),
        Ok(pb::BuildState::Queued | pb::BuildState::Running | pb::BuildState::Unspecified)
    )
}
