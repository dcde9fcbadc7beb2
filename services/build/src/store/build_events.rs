//! The event log's store: `build_events` rows, output bytes in the build's file.

use kiln_eventlog::EventStore;
use kiln_proto::build as pb;
use kiln_store::Sql;
use prost::Message;
use sqlx::Row;

use super::{BuildUpdate, Store, results_json};
use crate::error::{BuildError, Result};
use crate::outputs::StoredEvent;

/// Build logs in `build_events` (output bytes in the build's file, see `OutputFiles`),
/// each append together with the build row's changes.
impl EventStore for Store {
    type Update = BuildUpdate;
    type Error = BuildError;

    /// Persists events (already numbered) and the row changes in one transaction.
    async fn append(
        &self,
        build_id: &str,
        events: &[pb::BuildEvent],
        update: BuildUpdate,
    ) -> Result<()> {
        let Some(last) = events.last() else {
            return Ok(());
        };
        // Output bytes first, to the build's file (no transaction needed: until the rows
        // below commit, nothing refers to them, and a failed batch only leaves unused
        // bytes at the end of the file). SQLite then stores a small row per event.
        let events = self.outputs.spill(build_id, events).await?;
        let mut tx = self.write.begin().await?;
        // One multi-row INSERT per batch: every statement is a round trip to sqlx's
        // SQLite worker thread (a cross-thread wake-up each).
        for chunk in events.chunks(EVENTS_PER_INSERT) {
            insert_events(&mut tx, build_id, chunk).await?;
        }
        let mut q: Sql = Sql::new("UPDATE builds SET last_sequence = ");
        q.bind(i64::try_from(last.sequence).unwrap_or(i64::MAX));
        if let Some(state) = update.state {
            q.push(", state = ").bind(state.code());
        }
        if let Some(t) = update.started_at {
            q.push(", started_at = ").bind(t);
        }
        if let Some(t) = update.finished_at {
            q.push(", finished_at = ").bind(t);
        }
        if let Some(m) = &update.failure_message {
            q.push(", failure_message = ").bind(m.clone());
        }
        if let Some(step) = update.current_step {
            q.push(", current_step = ").bind(step.map(i64::from));
        }
        if let Some(results) = &update.step_results {
            q.push(", step_results_json = ").bind(results_json(results));
        }
        q.push(" WHERE id = ").bind(build_id.to_owned());
        q.build().execute(&mut *tx).await?;
        if self.backend == kiln_store::Backend::Postgres {
            // Delivered at commit, to every replica's watchers of this build.
            kiln_store::appended::notify(&mut tx, super::EVENTS_CHANNEL, build_id).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Events with sequence > `after`, at most `limit`, in order.
    async fn events_after(
        &self,
        build_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<pb::BuildEvent>> {
        let rows = sqlx::query(
            "SELECT event, data_offset, data_len FROM build_events \
             WHERE build_id = $1 AND sequence > $2 ORDER BY sequence LIMIT $3",
        )
        .bind(build_id)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.read)
        .await?;
        let mut events = Vec::with_capacity(rows.len());
        for r in &rows {
            let bytes: Vec<u8> = r.try_get("event")?;
            let event = pb::BuildEvent::decode(bytes.as_slice())
                .map_err(|e| BuildError::Corrupt(format!("build event: {e}")))?;
            let range = match (
                r.try_get::<Option<i64>, _>("data_offset")?,
                r.try_get::<Option<i64>, _>("data_len")?,
            ) {
                (Some(offset), Some(len)) => Some((offset, len)),
                _ => None,
            };
            events.push((event, range));
        }
        self.outputs.fill(build_id, events).await
    }

    /// A build that is gone (retention) or final gets no more events.
    async fn is_closed(&self, build_id: &str) -> Result<bool> {
        let build = self.get_build(build_id).await?;
        Ok(build.is_none_or(|b| b.build.state.is_final()))
    }

    /// On Postgres, woken by another replica's append; on SQLite (one process, whose
    /// running builds are live logs) a plain wait.
    async fn wait_for_append(&self, build_id: &str, timeout: std::time::Duration) {
        match &self.appended {
            Some(appended) => appended.wait(build_id, timeout).await,
            None => tokio::time::sleep(timeout).await,
        }
    }
}

/// Rows per INSERT statement (6 bound values each; SQLite allows 32 766).
const EVENTS_PER_INSERT: usize = 256;

pub(super) async fn insert_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    build_id: &str,
    events: &[StoredEvent],
) -> Result<()> {
    let mut q: Sql = Sql::new(
        "INSERT INTO build_events (build_id, sequence, time, event, data_offset, data_len) ",
    );
    q.push_values(events, |mut row, (event, range)| {
        let time = event
            .time
            .map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos / 1000));
        row.bind(build_id.to_owned())
            .bind(i64::try_from(event.sequence).unwrap_or(i64::MAX))
            .bind(time)
            .bind(event.encode_to_vec())
            .bind(range.map(|r| r.0))
            .bind(range.map(|r| r.1));
    });
    q.build().execute(&mut **tx).await?;
    Ok(())
}
