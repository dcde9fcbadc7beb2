//! The store (SQLite `agent.db` or schema `agent` on Postgres, the same SQL for both):
//! tasks (a record per task, rewritten at each phase change) and their event logs,
//! through `kiln-eventlog` so that WatchTask has WatchBuild's guarantees. Queries use
//! portable SQL built at run time, as kiln-build's do. On Postgres every append also
//! sends `NOTIFY kiln_agent_events, '<task id>'` in its transaction, so a watcher on one
//! replica follows a task another replica runs as soon as its events are stored.

use kiln_eventlog::{EventKind, EventStore};
use kiln_proto::agent as pb;
use kiln_store::Sql;
use pb::task_event::Event;
use prost::Message as _;
use sqlx::Row;

use crate::error::{AgentError, Result};
use crate::task::{TaskRecord, now_micros, timestamp};

static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The schema of this service's tables on Postgres.
pub const SCHEMA: &str = "agent";

const MIGRATIONS: kiln_store::Migrations = kiln_store::Migrations {
    sqlite: &SQLITE,
    postgres: &POSTGRES,
};

/// The channel of append announcements on Postgres; the payload is the task id.
const EVENTS_CHANNEL: &str = "kiln_agent_events";

/// The connections to the store.
#[derive(Debug, Clone)]
pub struct Store {
    db: kiln_store::Database,
    /// Wakes this process's watchers of tasks other replicas run (Postgres only).
    appended: Option<std::sync::Arc<kiln_store::Appended>>,
}

/// `write`, `read` and `backend` of the database.
impl std::ops::Deref for Store {
    type Target = kiln_store::Database;

    fn deref(&self) -> &kiln_store::Database {
        &self.db
    }
}

/// A task as loaded: its record, the log's last sequence, and (for the runner only) the
/// delegated token.
#[derive(Debug, Clone)]
pub struct StoredTask {
    pub record: TaskRecord,
    pub last_sequence: u64,
    pub relayed_build_sequence: u64,
    pub delegated_token: String,
    pub request_hash: Option<String>,
}

/// What an append changes on the task row besides `last_sequence`.
#[derive(Debug, Clone, Default)]
pub struct TaskUpdate {
    /// The whole record, replacing the stored one (at phase changes).
    pub record: Option<Box<TaskRecord>>,
    /// The last relayed event of the current build.
    pub relayed_build_sequence: Option<u64>,
}

/// What [`Store::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    Yes,
    /// The owner already has a task with this request id.
    DuplicateRequest,
    /// The owner has the most unfinished tasks allowed.
    OverLimit,
}

/// Filters of ListTasks.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub owner: Option<String>,
    pub workspace_id: Option<String>,
    pub phases: Vec<i32>,
    pub labels: Vec<(String, String)>,
    /// Newest-first cursor: strictly older than this (created_at, id).
    pub before: Option<(i64, String)>,
    pub limit: i64,
}

/// The columns of [`StoredTask`], as a literal so queries stay static strings.
macro_rules! columns {
    () => {
        "record, last_sequence, relayed_build_sequence, delegated_token, request_hash"
    };
}

fn encode_record(record: &TaskRecord) -> String {
    // A record of plain data always serializes.
    serde_json::to_string(record).unwrap_or_default()
}

fn decode_record(text: &str) -> Result<TaskRecord> {
    serde_json::from_str(text).map_err(|e| AgentError::Corrupt(format!("task record: {e}")))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Opens the store at `url` (SQLite file or Postgres schema `agent`) and runs the
    /// embedded migrations.
    pub async fn open(url: &kiln_store::DatabaseUrl) -> Result<Self> {
        let db = kiln_store::Database::open(url, SCHEMA, MIGRATIONS).await?;
        let appended = match url {
            kiln_store::DatabaseUrl::Postgres(_) => {
                Some(kiln_store::Appended::start(url.expose(), EVENTS_CHANNEL))
            }
            kiln_store::DatabaseUrl::Sqlite(_) => None,
        };
        Ok(Self { db, appended })
    }

    pub async fn ping(&self) -> Result<()> {
        self.db.ping().await?;
        Ok(())
    }

    /// Inserts a new task unless its owner already has `max_unfinished` unfinished ones
    /// or a task with this request id. The count is taken in the same transaction as the
    /// insert, on the one writer connection, so concurrent starts cannot all pass it.
    pub async fn insert(
        &self,
        record: &TaskRecord,
        delegated_token: &str,
        request_id: Option<&str>,
        request_hash: Option<&str>,
        max_unfinished: u64,
    ) -> Result<Inserted> {
        let mut tx = self.db.begin().await?;
        let unfinished: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM tasks WHERE owner = $1 AND phase NOT IN ($2, $3, $4)",
        )
        .bind(&record.owner)
        .bind(pb::Phase::Done as i32)
        .bind(pb::Phase::Failed as i32)
        .bind(pb::Phase::Cancelled as i32)
        .fetch_one(&mut *tx)
        .await?;
        if u64::try_from(unfinished).unwrap_or(0) >= max_unfinished {
            return Ok(Inserted::OverLimit);
        }
        let inserted = sqlx::query(
            "INSERT INTO tasks (id, owner, workspace_id, phase, created_at, updated_at, \
             record, delegated_token, request_id, request_hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
        )
        .bind(&record.id)
        .bind(&record.owner)
        .bind(&record.workspace_id)
        .bind(record.phase)
        .bind(record.created_at)
        .bind(record.updated_at)
        .bind(encode_record(record))
        .bind(delegated_token)
        .bind(request_id)
        .bind(request_hash)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            for (k, v) in &record.labels {
                sqlx::query("INSERT INTO task_labels (task_id, key, value) VALUES ($1, $2, $3)")
                    .bind(&record.id)
                    .bind(k)
                    .bind(v)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(if inserted {
            Inserted::Yes
        } else {
            Inserted::DuplicateRequest
        })
    }

    fn row(row: &sqlx::any::AnyRow) -> Result<StoredTask> {
        Ok(StoredTask {
            record: decode_record(row.try_get("record")?)?,
            last_sequence: u64::try_from(row.try_get::<i64, _>("last_sequence")?).unwrap_or(0),
            relayed_build_sequence: u64::try_from(row.try_get::<i64, _>("relayed_build_sequence")?)
                .unwrap_or(0),
            delegated_token: row.try_get("delegated_token")?,
            request_hash: row.try_get("request_hash")?,
        })
    }

    pub async fn get(&self, id: &str) -> Result<Option<StoredTask>> {
        let row = sqlx::query(concat!("SELECT ", columns!(), " FROM tasks WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(Self::row).transpose()
    }

    /// Tasks whose id starts with `prefix` (lower-case id characters only, see
    /// `kiln_rpc::id_prefix`), of `owner` when given, newest first, at most `limit`.
    pub async fn by_id_prefix(
        &self,
        prefix: &str,
        owner: Option<&str>,
        limit: i64,
    ) -> Result<Vec<StoredTask>> {
        let mut q: Sql = Sql::new(concat!("SELECT ", columns!(), " FROM tasks t WHERE "));
        // A range on the primary key: `~` sorts after every character an id has.
        q.push("t.id >= ")
            .bind(prefix.to_owned())
            .push(" AND t.id < ")
            .bind(format!("{prefix}~"));
        if let Some(owner) = owner {
            q.push(" AND t.owner = ").bind(owner.to_owned());
        }
        q.push(" ORDER BY t.created_at DESC, t.id DESC LIMIT ")
            .bind(limit);
        let rows = q.build().fetch_all(&self.read).await?;
        rows.iter().map(Self::row).collect()
    }

    pub async fn by_request(&self, owner: &str, request_id: &str) -> Result<Option<StoredTask>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM tasks WHERE owner = $1 AND request_id = $2"
        ))
        .bind(owner)
        .bind(request_id)
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(Self::row).transpose()
    }

    /// Tasks not in a final phase, oldest first: what a restart continues.
    pub async fn unfinished(&self) -> Result<Vec<StoredTask>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM tasks WHERE phase NOT IN ($1, $2, $3) ORDER BY created_at, id"
        ))
        .bind(pb::Phase::Done as i32)
        .bind(pb::Phase::Failed as i32)
        .bind(pb::Phase::Cancelled as i32)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(Self::row).collect()
    }

    /// Unfinished tasks of `owner`.
    pub async fn count_unfinished(&self, owner: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM tasks WHERE owner = $1 AND phase NOT IN ($2, $3, $4)",
        )
        .bind(owner)
        .bind(pb::Phase::Done as i32)
        .bind(pb::Phase::Failed as i32)
        .bind(pb::Phase::Cancelled as i32)
        .fetch_one(&self.read)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<StoredTask>> {
        let mut q: Sql = Sql::new(concat!("SELECT ", columns!(), " FROM tasks t WHERE 1 = 1"));
        if let Some(owner) = &filter.owner {
            q.push(" AND t.owner = ").bind(owner.clone());
        }
        if let Some(ws) = &filter.workspace_id {
            q.push(" AND t.workspace_id = ").bind(ws.clone());
        }
        if !filter.phases.is_empty() {
            q.push(" AND t.phase IN (");
            q.bind_list(filter.phases.iter().copied());
            q.push(")");
        }
        for (k, v) in &filter.labels {
            q.push(" AND EXISTS (SELECT 1 FROM task_labels l WHERE l.task_id = t.id AND l.key = ")
                .bind(k.clone())
                .push(" AND l.value = ")
                .bind(v.clone())
                .push(")");
        }
        if let Some((created, id)) = &filter.before {
            q.push(" AND (t.created_at < ")
                .bind(*created)
                .push(" OR (t.created_at = ")
                .bind(*created)
                .push(" AND t.id < ")
                .bind(id.clone())
                .push("))");
        }
        q.push(" ORDER BY t.created_at DESC, t.id DESC LIMIT ")
            .bind(filter.limit);
        let rows = q.build().fetch_all(&self.read).await?;
        rows.iter().map(Self::row).collect()
    }

    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }
}

impl EventKind for Store {
    type Event = pb::TaskEvent;

    fn sequence(event: &pb::TaskEvent) -> u64 {
        event.sequence
    }

    fn set_sequence(event: &mut pb::TaskEvent, sequence: u64) {
        event.sequence = sequence;
    }

    fn window_bytes(event: &pb::TaskEvent) -> usize {
        64 + event.encoded_len()
    }

    fn is_final(event: &pb::TaskEvent) -> bool {
        matches!(event.event, Some(Event::Result(_)))
    }

    fn heartbeat(last_sequence: u64) -> pb::TaskEvent {
        pb::TaskEvent {
            sequence: last_sequence,
            time: Some(timestamp(now_micros())),
            event: Some(Event::Heartbeat(pb::Heartbeat {})),
        }
    }
}

impl EventStore for Store {
    type Update = TaskUpdate;
    type Error = AgentError;

    async fn append(
        &self,
        task_id: &str,
        events: &[pb::TaskEvent],
        update: TaskUpdate,
    ) -> Result<()> {
        let Some(last) = events.last() else {
            return Ok(());
        };
        let mut tx = self.db.begin().await?;
        // One multi-row INSERT per batch (every statement is a round trip to sqlx's
        // SQLite worker thread).
        for chunk in events.chunks(200) {
            let mut q: Sql = Sql::new("INSERT INTO task_events (task_id, sequence, event) ");
            q.push_values(chunk, |mut b, e| {
                b.bind(task_id.to_owned())
                    .bind(to_i64(e.sequence))
                    .bind(e.encode_to_vec());
            });
            q.build().execute(&mut *tx).await?;
        }
        let mut q: Sql = Sql::new("UPDATE tasks SET last_sequence = ");
        q.bind(to_i64(last.sequence));
        if let Some(record) = &update.record {
            q.push(", record = ")
                .bind(encode_record(record))
                .push(", phase = ")
                .bind(record.phase)
                .push(", updated_at = ")
                .bind(record.updated_at);
        }
        if let Some(seq) = update.relayed_build_sequence {
            q.push(", relayed_build_sequence = ").bind(to_i64(seq));
        }
        q.push(" WHERE id = ").bind(task_id.to_owned());
        q.build().execute(&mut *tx).await?;
        if self.appended.is_some() {
            // Delivered at commit, to every replica's watchers of this task.
            kiln_store::appended::notify(&mut tx, EVENTS_CHANNEL, task_id).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn events_after(
        &self,
        task_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<pb::TaskEvent>> {
        let rows = sqlx::query(
            "SELECT event FROM task_events WHERE task_id = $1 AND sequence > $2 \
             ORDER BY sequence LIMIT $3",
        )
        .bind(task_id)
        .bind(to_i64(after))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| {
                let bytes: Vec<u8> = r.try_get("event")?;
                pb::TaskEvent::decode(bytes.as_slice())
                    .map_err(|e| AgentError::Corrupt(format!("task event: {e}")))
            })
            .collect()
    }

    async fn is_closed(&self, task_id: &str) -> Result<bool> {
        Ok(match self.get(task_id).await? {
            None => true,
            Some(t) => t.record.is_final(),
        })
    }

    /// On Postgres, woken by another replica's append; on SQLite (one process, whose
    /// running tasks are live logs) a plain wait.
    async fn wait_for_append(&self, task_id: &str, timeout: std::time::Duration) {
        match &self.appended {
            Some(appended) => appended.wait(task_id, timeout).await,
            None => tokio::time::sleep(timeout).await,
        }
    }
}

#[cfg(test)]
mod migration_tests {
    /// The SQLite migrations of earlier releases, byte for byte (moved to
    /// `migrations/sqlite/`): sqlx checks an applied migration's checksum at every
    /// start, so a changed file would make every existing database refuse to open.
    #[test]
    fn the_released_sqlite_migrations_are_unchanged() {
        let released: &[(i64, &str)] = &[(
            1,
            "4e35357a8a3b7c0913da60bfda998be99e9372aee829aab0575d6987e58bbaab8e08e9feb283bbe23736d733aed74fd3",
        )];
        assert_eq!(
            kiln_store::changed_migrations(&super::SQLITE, released),
            Vec::<i64>::new(),
            "released migrations changed"
        );
    }
}
