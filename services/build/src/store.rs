//! The store (SQLite `build.db` or schema `build` on Postgres, the same SQL for both):
//! workspaces, builds and their event logs.
//!
//! Opened the kiln way (`kiln_store`: 0600 file, WAL, one writer and a few readers so
//! that watchers replaying logs never wait for the runner, embedded migrations). Queries
//! are built at run time with portable SQL so a Postgres store can reuse them.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_proto::build as pb;
use kiln_rpc::ApiError;
use kiln_store::Sql;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::error::{BuildError, Result};
use crate::model::{Build, BuildState, StepResult};
use crate::outputs::OutputFiles;

mod build_events;
mod legacy;
#[cfg(test)]
mod upgrade_tests;
use build_events::insert_events;

static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The schema of this service's tables on Postgres.
pub const SCHEMA: &str = "build";

/// The channel on which every append announces its build (the payload is the build
/// id), so that watchers on other replicas read the store at once
/// (`kiln_store::Appended`).
const EVENTS_CHANNEL: &str = "kiln_build_events";

const MIGRATIONS: kiln_store::Migrations = kiln_store::Migrations {
    sqlite: &SQLITE,
    postgres: &POSTGRES,
};

/// Unix microseconds, the store's time unit.
pub fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

pub fn now_micros() -> i64 {
    micros(SystemTime::now())
}

pub fn duration_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The connections to the store.
#[derive(Debug, Clone)]
pub struct Store {
    db: kiln_store::Database,
    /// Output bytes, one append-only file per build (see `OutputFiles`).
    outputs: OutputFiles,
    /// On Postgres: appends announced by any replica, for watchers here.
    appended: Option<std::sync::Arc<kiln_store::Appended>>,
}

/// A workspace row.
#[derive(Debug, Clone)]
pub struct WorkspaceRow {
    pub id: String,
    pub owner: String,
    pub size_bytes: u64,
    pub file_count: u64,
    pub created_at: i64,
    pub updated_at: i64,
    pub request_hash: Option<String>,
    pub labels: HashMap<String, String>,
    /// Unique per owner (see migration 0003).
    pub name: Option<String>,
}

/// A build row (with the request hash for idempotency).
#[derive(Debug, Clone)]
pub struct BuildRow {
    pub build: Build,
    pub request_hash: Option<String>,
}

/// What a log append changes on the build row, besides `last_sequence`.
#[derive(Debug, Clone, Default)]
pub struct BuildUpdate {
    pub state: Option<BuildState>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub failure_message: Option<String>,
    /// `Some(None)` clears it.
    pub current_step: Option<Option<u32>>,
    /// The whole list, replacing the stored one.
    pub step_results: Option<Vec<StepResult>>,
}

/// Filters of ListWorkspaces / ListBuilds.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub owner: Option<String>,
    pub workspace_id: Option<String>,
    /// By the wire enum's numbers, which are the stored codes ([`BuildState::code`]):
    /// passed through as asked, so a number no state has matches nothing, as before.
    pub states: Vec<i32>,
    pub labels: Vec<(String, String)>,
    /// Newest-first cursor: strictly older than this (created_at, id).
    pub before: Option<(i64, String)>,
    pub limit: i64,
}

/// The stored form of step results (`builds.step_results_json`).
pub(crate) fn results_json(results: &[StepResult]) -> String {
    // Plain data: serializing cannot fail.
    serde_json::to_string(results).unwrap_or_else(|_| "[]".into())
}

/// `write`, `read` and `backend` of the database.
impl std::ops::Deref for Store {
    type Target = kiln_store::Database;

    fn deref(&self) -> &kiln_store::Database {
        &self.db
    }
}

impl Store {
    /// Opens (creating) the database and runs the embedded migrations; output bytes go
    /// to files under `outputs_dir`.
    pub async fn open(url: &kiln_store::DatabaseUrl, outputs_dir: &Path) -> Result<Self> {
        let db = kiln_store::Database::open(url, SCHEMA, MIGRATIONS).await?;
        legacy::backfill(&db).await?;
        // Where other replicas may write the logs this one's watchers follow.
        let appended = match url {
            kiln_store::DatabaseUrl::Postgres(_) => {
                Some(kiln_store::Appended::start(url.expose(), EVENTS_CHANNEL))
            }
            kiln_store::DatabaseUrl::Sqlite(_) => None,
        };
        Ok(Self {
            db,
            outputs: OutputFiles::new(outputs_dir)?,
            appended,
        })
    }

    /// Whether the database is usable (health).
    pub async fn ping(&self) -> std::result::Result<(), sqlx::Error> {
        self.db.ping().await
    }

    // ---- workspaces ----

    pub async fn insert_workspace(
        &self,
        row: &WorkspaceRow,
        request_id: Option<&str>,
    ) -> Result<()> {
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "INSERT INTO workspaces (id, owner, size_bytes, file_count, created_at, updated_at, \
             last_used_at, request_id, request_hash, name) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&row.id)
        .bind(&row.owner)
        .bind(i64::try_from(row.size_bytes).unwrap_or(i64::MAX))
        .bind(i64::try_from(row.file_count).unwrap_or(i64::MAX))
        .bind(row.created_at)
        .bind(row.updated_at)
        .bind(row.created_at)
        .bind(request_id)
        .bind(&row.request_hash)
        .bind(&row.name)
        .execute(&mut *tx)
        .await?;
        for (k, v) in &row.labels {
            sqlx::query(
                "INSERT INTO workspace_labels (workspace_id, key, value) VALUES ($1, $2, $3)",
            )
            .bind(&row.id)
            .bind(k)
            .bind(v)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn workspace_from_row(&self, row: &AnyRow) -> Result<WorkspaceRow> {
        let id: String = row.try_get("id")?;
        let labels = sqlx::query("SELECT key, value FROM workspace_labels WHERE workspace_id = $1")
            .bind(&id)
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("key")?, r.try_get("value")?)))
            .collect::<Result<HashMap<String, String>, sqlx::Error>>()?;
        Ok(WorkspaceRow {
            id,
            owner: row.try_get("owner")?,
            size_bytes: u64::try_from(row.try_get::<i64, _>("size_bytes")?).unwrap_or(0),
            file_count: u64::try_from(row.try_get::<i64, _>("file_count")?).unwrap_or(0),
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            request_hash: row.try_get("request_hash")?,
            labels,
            name: row.try_get("name")?,
        })
    }

    pub async fn get_workspace(&self, id: &str) -> Result<Option<WorkspaceRow>> {
        let row = sqlx::query("SELECT * FROM workspaces WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.write)
            .await?;
        match row {
            Some(r) => Ok(Some(self.workspace_from_row(&r).await?)),
            None => Ok(None),
        }
    }

    /// The workspace `owner` named `name`, if any.
    pub async fn workspace_by_name(&self, owner: &str, name: &str) -> Result<Option<WorkspaceRow>> {
        let row = sqlx::query("SELECT * FROM workspaces WHERE owner = $1 AND name = $2")
            .bind(owner)
            .bind(name)
            .fetch_optional(&self.write)
            .await?;
        match row {
            Some(r) => Ok(Some(self.workspace_from_row(&r).await?)),
            None => Ok(None),
        }
    }

    /// Workspaces whose id starts with `prefix` (lower-case id characters only, see
    /// `kiln_rpc::id_prefix`), of `owner` when given, newest first, at most `limit`.
    pub async fn workspaces_by_id_prefix(
        &self,
        prefix: &str,
        owner: Option<&str>,
        limit: i64,
    ) -> Result<Vec<WorkspaceRow>> {
        let rows = by_id_prefix("workspaces", prefix, owner, limit)
            .build()
            .fetch_all(&self.read)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(self.workspace_from_row(r).await?);
        }
        Ok(out)
    }

    pub async fn workspace_by_request(
        &self,
        owner: &str,
        request_id: &str,
    ) -> Result<Option<WorkspaceRow>> {
        let row = sqlx::query("SELECT * FROM workspaces WHERE owner = $1 AND request_id = $2")
            .bind(owner)
            .bind(request_id)
            .fetch_optional(&self.write)
            .await?;
        match row {
            Some(r) => Ok(Some(self.workspace_from_row(&r).await?)),
            None => Ok(None),
        }
    }

    pub async fn list_workspaces(&self, f: &ListFilter) -> Result<Vec<WorkspaceRow>> {
        let mut q: Sql = Sql::new("SELECT * FROM workspaces WHERE 1 = 1");
        if let Some(owner) = &f.owner {
            q.push(" AND owner = ").bind(owner.clone());
        }
        push_labels(
            &mut q,
            "workspace_labels",
            "workspace_id",
            "workspaces",
            &f.labels,
        );
        push_cursor(&mut q, &f.before);
        q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .bind(f.limit);
        let rows = q.build().fetch_all(&self.read).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(self.workspace_from_row(r).await?);
        }
        Ok(out)
    }

    /// Records a change of files through the API (`changed`: also bumps updated_at), or
    /// a new measurement after a build.
    pub async fn set_workspace_usage(
        &self,
        id: &str,
        bytes: u64,
        files: u64,
        changed: bool,
    ) -> Result<()> {
        let now = now_micros();
        let sql = if changed {
            "UPDATE workspaces SET size_bytes = $1, file_count = $2, last_used_at = $3, updated_at = $4 WHERE id = $5"
        } else {
            "UPDATE workspaces SET size_bytes = $1, file_count = $2, last_used_at = $3, updated_at = updated_at + $4 WHERE id = $5"
        };
        sqlx::query(sql)
            .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
            .bind(i64::try_from(files).unwrap_or(i64::MAX))
            .bind(now)
            .bind(if changed { now } else { 0 })
            .bind(id)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Deletes a workspace's record unless a build of it is queued or running, in one
    /// statement (so a StartBuild cannot slip in between a check and the delete), inside
    /// a write transaction: on Postgres, where a statement does not see another's
    /// uncommitted insert of a build, the transaction's lock orders it with StartBuild's.
    /// Returns whether it was deleted.
    pub async fn delete_workspace(&self, id: &str) -> Result<bool> {
        let mut tx = self.db.begin().await?;
        let done = sqlx::query(
            "DELETE FROM workspaces WHERE id = $1 AND NOT EXISTS \
             (SELECT 1 FROM builds WHERE workspace_id = $2 AND state IN ($3, $4))",
        )
        .bind(id)
        .bind(id)
        .bind(BuildState::Queued.code())
        .bind(BuildState::Running.code())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Workspaces not used since `before`, oldest first.
    pub async fn idle_workspaces(&self, before: i64, limit: i64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT id FROM workspaces WHERE last_used_at < $1 ORDER BY last_used_at LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(|r| Ok(r.try_get("id")?)).collect()
    }

    // ---- builds ----

    /// Inserts a new build and its first event (Queued, sequence 1) in one transaction.
    pub async fn insert_build(
        &self,
        build: &Build,
        request_id: Option<&str>,
        request_hash: Option<&str>,
        first_event: &pb::BuildEvent,
    ) -> Result<()> {
        let spec = serde_json::to_string(&build.spec)
            .map_err(|e| BuildError::Corrupt(format!("build spec: {e}")))?;
        let mut tx = self.db.begin().await?;
        // In the same transaction as the insert: a DeleteWorkspace that committed first
        // leaves nothing to update, and the build is refused instead of queued for a
        // workspace that is gone (the single writer serializes the two).
        let touched = sqlx::query("UPDATE workspaces SET last_used_at = $1 WHERE id = $2")
            .bind(build.created_at)
            .bind(&build.workspace_id)
            .execute(&mut *tx)
            .await?;
        if touched.rows_affected() == 0 {
            return Err(ApiError::not_found("workspace", &build.workspace_id).into());
        }
        // `spec` and `step_results`, the proto blobs of earlier releases, stay empty
        // (see migration 0004).
        sqlx::query(
            "INSERT INTO builds (id, workspace_id, owner, state, spec, created_at, last_sequence, \
             step_results, request_id, request_hash, spec_json, step_results_json) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&build.id)
        .bind(&build.workspace_id)
        .bind(&build.owner)
        .bind(build.state.code())
        .bind(Vec::<u8>::new())
        .bind(build.created_at)
        .bind(i64::try_from(first_event.sequence).unwrap_or(0))
        .bind(Vec::<u8>::new())
        .bind(request_id)
        .bind(request_hash)
        .bind(spec)
        .bind(results_json(&build.step_results))
        .execute(&mut *tx)
        .await?;
        for (k, v) in &build.spec.labels {
            sqlx::query("INSERT INTO build_labels (build_id, key, value) VALUES ($1, $2, $3)")
                .bind(&build.id)
                .bind(k)
                .bind(v)
                .execute(&mut *tx)
                .await?;
        }
        insert_events(&mut tx, &build.id, &[(first_event.clone(), None)]).await?;
        tx.commit().await?;
        Ok(())
    }

    fn build_from_row(row: &AnyRow) -> Result<BuildRow> {
        let id: String = row.try_get("id")?;
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            BuildError::Corrupt(format!("build {id}: {what}: {e}"))
        };
        // Every row has its JSON once the store is open (the backfill fills rows of
        // earlier releases); the blob is read only for a row an older replica inserted
        // since, during a rolling upgrade on Postgres.
        let spec = match row.try_get::<Option<String>, _>("spec_json")? {
            Some(json) => serde_json::from_str(&json).map_err(|e| corrupt("spec", &e))?,
            None => crate::wire::legacy_spec(&row.try_get::<Vec<u8>, _>("spec")?)?,
        };
        let step_results = match row.try_get::<Option<String>, _>("step_results_json")? {
            Some(json) => serde_json::from_str(&json).map_err(|e| corrupt("step results", &e))?,
            None => crate::wire::legacy_step_results(&row.try_get::<Vec<u8>, _>("step_results")?)?,
        };
        let code: i32 = row.try_get("state")?;
        let state = BuildState::from_code(code).ok_or_else(|| corrupt("state", &code))?;
        let build = Build {
            workspace_id: row.try_get("workspace_id")?,
            owner: row.try_get("owner")?,
            state,
            spec,
            created_at: row.try_get("created_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
            failure_message: row.try_get("failure_message")?,
            last_sequence: u64::try_from(row.try_get::<i64, _>("last_sequence")?).unwrap_or(0),
            current_step: row
                .try_get::<Option<i64>, _>("current_step")?
                .and_then(|i| u32::try_from(i).ok()),
            step_results,
            id,
        };
        Ok(BuildRow {
            build,
            request_hash: row.try_get("request_hash")?,
        })
    }

    pub async fn get_build(&self, id: &str) -> Result<Option<BuildRow>> {
        let row = sqlx::query("SELECT * FROM builds WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(Self::build_from_row).transpose()
    }

    /// Builds whose id starts with `prefix` (see [`Self::workspaces_by_id_prefix`]).
    pub async fn builds_by_id_prefix(
        &self,
        prefix: &str,
        owner: Option<&str>,
        limit: i64,
    ) -> Result<Vec<BuildRow>> {
        let rows = by_id_prefix("builds", prefix, owner, limit)
            .build()
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(Self::build_from_row).collect()
    }

    pub async fn build_by_request(
        &self,
        owner: &str,
        request_id: &str,
    ) -> Result<Option<BuildRow>> {
        let row = sqlx::query("SELECT * FROM builds WHERE owner = $1 AND request_id = $2")
            .bind(owner)
            .bind(request_id)
            .fetch_optional(&self.write)
            .await?;
        row.as_ref().map(Self::build_from_row).transpose()
    }

    pub async fn list_builds(&self, f: &ListFilter) -> Result<Vec<BuildRow>> {
        let mut q: Sql = Sql::new("SELECT * FROM builds WHERE 1 = 1");
        if let Some(owner) = &f.owner {
            q.push(" AND owner = ").bind(owner.clone());
        }
        if let Some(ws) = &f.workspace_id {
            q.push(" AND workspace_id = ").bind(ws.clone());
        }
        if !f.states.is_empty() {
            q.push(" AND state IN (");
            q.bind_list(f.states.iter().copied());
            q.push(")");
        }
        push_labels(&mut q, "build_labels", "build_id", "builds", &f.labels);
        push_cursor(&mut q, &f.before);
        q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .bind(f.limit);
        let rows = q.build().fetch_all(&self.read).await?;
        rows.iter().map(Self::build_from_row).collect()
    }

    /// Ids of builds in `state`, oldest first (recovery).
    pub async fn builds_in_state(&self, state: BuildState) -> Result<Vec<BuildRow>> {
        let rows = sqlx::query("SELECT * FROM builds WHERE state = $1 ORDER BY created_at, id")
            .bind(state.code())
            .fetch_all(&self.write)
            .await?;
        rows.iter().map(Self::build_from_row).collect()
    }

    /// Deletes builds (with their logs and labels) that finished before `before`.
    pub async fn delete_finished_builds(&self, before: i64, limit: i64) -> Result<u64> {
        let ids: Vec<String> = sqlx::query(
            "SELECT id FROM builds WHERE finished_at IS NOT NULL AND finished_at < $1 LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.write)
        .await?
        .iter()
        .map(|r| r.try_get("id"))
        .collect::<Result<_, _>>()?;
        for id in &ids {
            let mut tx = self.db.begin().await?;
            for sql in [
                "DELETE FROM build_events WHERE build_id = $1",
                "DELETE FROM build_labels WHERE build_id = $1",
                "DELETE FROM builds WHERE id = $1",
            ] {
                sqlx::query(sql).bind(id).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            self.outputs.remove(id).await;
        }
        Ok(ids.len() as u64)
    }
}

fn push_labels(
    q: &mut Sql,
    table: &'static str,
    column: &'static str,
    parent: &'static str,
    labels: &[(String, String)],
) {
    for (k, v) in labels {
        q.push(format!(
            " AND EXISTS (SELECT 1 FROM {table} l WHERE l.{column} = {parent}.id AND l.key = "
        ));
        q.bind(k.clone())
            .push(" AND l.value = ")
            .bind(v.clone())
            .push(")");
    }
}

fn push_cursor(q: &mut Sql, before: &Option<(i64, String)>) {
    if let Some((t, id)) = before {
        q.push(" AND (created_at < ")
            .bind(*t)
            .push(" OR (created_at = ")
            .bind(*t)
            .push(" AND id < ")
            .bind(id.clone())
            .push("))");
    }
}

/// `SELECT * FROM table` where the id starts with `prefix`, of `owner` when given, newest
/// first, at most `limit`: the one query behind every id-prefix look-up.
fn by_id_prefix(table: &'static str, prefix: &str, owner: Option<&str>, limit: i64) -> Sql {
    let mut q = Sql::new(format!("SELECT * FROM {table} WHERE "));
    push_id_prefix(&mut q, prefix);
    if let Some(owner) = owner {
        q.push(" AND owner = ").bind(owner.to_owned());
    }
    q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .bind(limit);
    q
}

/// `id >= prefix AND id < prefix + 1`: a prefix match that uses the primary key's index
/// (LIKE would not, and would treat `_` and `%` as wildcards).
fn push_id_prefix(q: &mut Sql, prefix: &str) {
    q.push("id >= ").bind(prefix.to_owned());
    // `~` sorts after every character an id has, so `prefix~` is above every id that
    // starts with `prefix` and below every other id above `prefix`.
    q.push(" AND id < ").bind(format!("{prefix}~"));
}

pub fn page_token(created_at: i64, id: &str) -> String {
    format!("{created_at}.{id}")
}

pub fn parse_page_token(token: &str) -> Option<(i64, String)> {
    let (t, id) = token.split_once('.')?;
    Some((t.parse().ok()?, id.to_owned()))
}

#[cfg(test)]
mod migration_tests {
    /// The SQLite migrations of earlier releases, byte for byte (moved to
    /// `migrations/sqlite/`): sqlx checks an applied migration's checksum at every
    /// start, so a changed file would make every existing database refuse to open.
    #[test]
    fn the_released_sqlite_migrations_are_unchanged() {
        let released: &[(i64, &str)] = &[
            (
                1,
                "30cf69929a778352693889452f26baa3ee086d919d1de9e578d5bf5cee3562321793158d678fe58955a16311951e1e60",
            ),
            (
                2,
                "728a920b15d5f512d38f297816584be10aef565bd4cd4eb1b6e0d1affee8ae69cefb117e6cce0422575d8a65042ba306",
            ),
            (
                3,
                "108a724d0b5f8ec5f0850511b5dc023bd6cb0cd04afb3b2d4343c6451b563eafbfc9344a010a54ef538b03247ae8b1c6",
            ),
        ];
        assert_eq!(
            kiln_store::changed_migrations(&super::SQLITE, released),
            Vec::<i64>::new(),
            "released migrations changed"
        );
    }
}
