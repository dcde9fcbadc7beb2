//! Build event logs, on `kiln-eventlog`: numbered, persisted, then shown.
//!
//! Each build that has not finished has a [`LiveLog`] in [`Logs`]. The library numbers
//! the events (dense, from 1: Queued is always 1), writes them and the build row's
//! changes to the store in one transaction, and only then publishes them to watchers,
//! who read from its window while they keep up and from the store otherwise. This
//! module says what the library needs to know about build events, and keeps the build's
//! step results: every update carries the whole list, so it is writer state that a
//! StepFinished adds to (kept only if the store took the batch).
//!
//! The events themselves are wire types (`pb::BuildEvent`), stored and replayed as they
//! were sent; the two that change the build row (a step's end, the build's end) are made
//! here from model types, through `wire`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, TryStreamExt};
use kiln_eventlog::{EventKind, LiveLog as Live, Logs as Registry};
use kiln_proto::build as pb;
use pb::build_event::Event;
use tonic::Status;

use crate::error::Result;
use crate::model::{BuildState, StepResult};
use crate::store::{BuildUpdate, Store, now_micros};
use crate::wire;

/// The in-memory log of one unfinished build; its writer state is the step results.
pub type LiveLog = Live<Store, Vec<StepResult>>;

/// The live logs of unfinished builds, by build id.
pub type Logs = Registry<Store, Vec<StepResult>>;

impl EventKind for Store {
    type Event = pb::BuildEvent;

    fn sequence(event: &pb::BuildEvent) -> u64 {
        event.sequence
    }

    fn set_sequence(event: &mut pb::BuildEvent, sequence: u64) {
        event.sequence = sequence;
    }

    fn window_bytes(event: &pb::BuildEvent) -> usize {
        64 + match &event.event {
            Some(Event::Output(o)) => o.data.len(),
            _ => 0,
        }
    }

    fn is_final(event: &pb::BuildEvent) -> bool {
        matches!(event.event, Some(Event::Finished(_)))
    }

    fn heartbeat(last_sequence: u64) -> pb::BuildEvent {
        pb::BuildEvent {
            sequence: last_sequence,
            time: Some(wire::timestamp(now_micros())),
            event: Some(Event::Heartbeat(pb::Heartbeat {})),
        }
    }
}

/// Appending build events to a build's log.
pub trait AppendEvents {
    /// Numbers, persists, then publishes `events` (stamped with the current time),
    /// applying `update` to the build row in the same transaction. Returns the log's
    /// last sequence. Not for StepFinished or Finished: see the two below.
    fn append_events(
        &self,
        store: &Store,
        events: Vec<Event>,
        update: BuildUpdate,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// A step's end: its StepFinished event, and `result` added to the build's step
    /// results; no step is current any more.
    fn append_step_finished(
        &self,
        store: &Store,
        result: StepResult,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// The build's end: its Finished event, and the row's final state, time and
    /// message.
    fn append_finished(
        &self,
        store: &Store,
        state: BuildState,
        message: &str,
    ) -> impl Future<Output = Result<u64>> + Send;
}

fn stamped(events: Vec<Event>) -> Vec<pb::BuildEvent> {
    let time = Some(wire::timestamp(now_micros()));
    events
        .into_iter()
        .map(|event| pb::BuildEvent {
            sequence: 0,
            time,
            event: Some(event),
        })
        .collect()
}

impl AppendEvents for LiveLog {
    async fn append_events(
        &self,
        store: &Store,
        events: Vec<Event>,
        update: BuildUpdate,
    ) -> Result<u64> {
        self.append(store, stamped(events), update).await
    }

    async fn append_step_finished(&self, store: &Store, result: StepResult) -> Result<u64> {
        let event = Event::StepFinished(wire::step_result_to_proto(&result));
        self.append_with(store, stamped(vec![event]), move |results, _| {
            results.push(result);
            BuildUpdate {
                current_step: Some(None),
                step_results: Some(results.clone()),
                ..BuildUpdate::default()
            }
        })
        .await
    }

    async fn append_finished(
        &self,
        store: &Store,
        state: BuildState,
        message: &str,
    ) -> Result<u64> {
        let event = Event::Finished(pb::Finished {
            state: wire::state_to_proto(state) as i32,
            message: message.to_owned(),
        });
        let update = BuildUpdate {
            state: Some(state),
            finished_at: Some(now_micros()),
            failure_message: Some(message.to_owned()),
            current_step: Some(None),
            ..BuildUpdate::default()
        };
        self.append(store, stamped(vec![event]), update).await
    }
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
    kiln_eventlog::watch(store, logs, build_id, after, heartbeat).map_err(Status::from)
}
