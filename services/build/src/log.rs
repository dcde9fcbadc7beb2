//! Build event logs, on `kiln-eventlog`: numbered, persisted, then shown.
//!
//! Each build that has not finished has a [`LiveLog`] in [`Logs`]. The library numbers
//! the events (dense, from 1: Queued is always 1), writes them and the build row's
//! changes to the store in one transaction, and only then publishes them to watchers,
//! who read from its window while they keep up and from the store otherwise. This
//! module says what the library needs to know about build events, and keeps the build's
//! step results: every update carries the whole list, so it is writer state that a
//! StepFinished adds to (kept only if the store took the batch).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, TryStreamExt};
use kiln_eventlog::{EventKind, LiveLog as Live, Logs as Registry};
use kiln_proto::build as pb;
use pb::build_event::Event;
use tonic::Status;

use crate::error::Result;
use crate::store::{BuildUpdate, Store, now_micros, timestamp};

/// The in-memory log of one unfinished build; its writer state is the step results.
pub type LiveLog = Live<Store, Vec<pb::StepFinished>>;

/// The live logs of unfinished builds, by build id.
pub type Logs = Registry<Store, Vec<pb::StepFinished>>;

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
            time: Some(timestamp(now_micros())),
            event: Some(Event::Heartbeat(pb::Heartbeat {})),
        }
    }
}

/// Appending build events to a build's log.
pub trait AppendEvents {
    /// Numbers, persists, then publishes `events` (stamped with the current time),
    /// applying `update` to the build row in the same transaction. A StepFinished is
    /// added to the build's step results. Returns the log's last sequence.
    fn append_events(
        &self,
        store: &Store,
        events: Vec<Event>,
        update: BuildUpdate,
    ) -> impl Future<Output = Result<u64>> + Send;
}

impl AppendEvents for LiveLog {
    async fn append_events(
        &self,
        store: &Store,
        events: Vec<Event>,
        mut update: BuildUpdate,
    ) -> Result<u64> {
        let time = Some(timestamp(now_micros()));
        let steps_end = events.iter().any(|e| matches!(e, Event::StepFinished(_)));
        let events = events
            .into_iter()
            .map(|event| pb::BuildEvent {
                sequence: 0,
                time,
                event: Some(event),
            })
            .collect();
        if !steps_end {
            // Output batches, mostly: no step results to change or copy.
            return self.append(store, events, update).await;
        }
        self.append_with(store, events, move |results, numbered| {
            results.extend(numbered.iter().filter_map(|e| match &e.event {
                Some(Event::StepFinished(sf)) => Some(sf.clone()),
                _ => None,
            }));
            update.step_results = Some(results.clone());
            update
        })
        .await
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

/// Whether a state is final.
pub fn is_final(state: i32) -> bool {
    !matches!(
        pb::BuildState::try_from(state),
        Ok(pb::BuildState::Queued | pb::BuildState::Running | pb::BuildState::Unspecified)
    )
}
