//! [`PgControl`]: build control shared by every kiln-build replica on one Postgres
//! database, in its own schema `build_control` (tables in `migrations/`).
//!
//! - **The queue is a table.** StartBuild's row stays until the runner finishes. A
//!   replica claims the next build in one short transaction: under a transaction-level
//!   advisory lock (claims are taken one at a time across replicas, so the per-user
//!   running limit and one build per workspace are checked and taken atomically), it
//!   reads candidates in turn order with `FOR UPDATE SKIP LOCKED` (rows a cancel is
//!   deleting are skipped, not waited for), skips a workspace an API change holds
//!   (`pg_try_advisory_xact_lock` on the workspace's key fails), and marks the row
//!   claimed by its replica id with a **lease**. The global running limit is per
//!   replica (`max_running` is what one machine runs); the per-user limits are global.
//! - **Leases.** Each replica renews the leases of the builds it runs every third of
//!   the lease. A build whose lease ran out (its replica died, or lost the database for
//!   longer than a lease) is reclaimed by whichever replica looks first
//!   ([`BuildControl::abandoned`], every half lease) and ended INTERRUPTED with its log;
//!   a replica that finds it lost a lease interrupts that build itself. Replica ids are
//!   random per process, so a restarted replica never mistakes another's claims (or its
//!   own previous life's) for its own.
//! - **Cancels** are persisted on the claimed row (`cancel_grace_ms`) and announced with
//!   `NOTIFY`; every replica also polls its claims for them once a second, so a cancel
//!   reaches the runner within a second even when a notification is lost.
//! - **Workspace holds** for API changes are session advisory locks on a connection kept
//!   for the hold (from a pool of their own); if the replica dies, the session ends and so
//!   does the lock. A change waiting for a workspace keeps no connection: it tries again
//!   when a release is announced, or every 100 ms.
//! - **Wake-ups** (`NOTIFY kiln_build_control`) after an enqueue, a finish or a released
//!   hold; a once-a-second wake-up is the backstop for notifications lost while the
//!   listener reconnects.
//! - **Reservations** (the per-user queued limit across replicas) are rows with an
//!   expiry, counted with the queued builds under a per-user advisory lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use kiln_telemetry::TraceParent;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Executor, Row};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::{BuildControl, Cancelled, Claim, Reservation, Runs, WorkspaceHold, queue_full};
use crate::config::QueueConfig;
use crate::error::{BuildError, Result};
use crate::metrics::BuildMetrics;
use crate::queue::{Entry, estimate_position};
use crate::runner::Stop;
use crate::store::{BuildRow, Store};

static MIGRATOR: Migrator = sqlx::migrate!("src/control/migrations");

// The schema of these tables, apart from the build store's, is `build_control` (named
// literally in the two statements that need it: statements are static strings).
/// The channel of wake-ups and cancel announcements.
const CHANNEL: &str = "kiln_build_control";
/// The advisory lock key under which claims are taken one at a time.
const CLAIM_LOCK: i64 = 0x6b69_6c6e_0001;
/// Candidates read per claim: a user's builds over one held workspace cannot starve
/// the others unless there are more than this many.
const CANDIDATES: i64 = 256;
/// How long a promised queue slot lives when its StartBuild call never comes back.
const RESERVATION_SECONDS: f64 = 120.0;
/// Workspace holds (API changes) in flight at once per replica; more wait for a
/// connection.
const HOLD_CONNECTIONS: u32 = 16;
/// How often a change waiting for a workspace held elsewhere tries again, whatever the
/// notifications say.
const HOLD_RETRY: Duration = Duration::from_millis(100);
/// How often every replica looks for cancels of its builds and wakes its scheduler,
/// whatever the notifications say.
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct PgControl {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    /// Connections for workspace holds (see [`PgHold`]).
    holds: PgPool,
    /// Notified (all waiters) when a hold may have been released, here or elsewhere.
    released: Notify,
    /// This process's id in `claimed_by`.
    replica: String,
    config: QueueConfig,
    lease: Duration,
    metrics: BuildMetrics,
    wake: Notify,
    closed: AtomicBool,
    runs: Runs,
}

impl Drop for PgControl {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn workspace_key(id: &str) -> String {
    format!("kiln-workspace:{id}")
}

impl PgControl {
    /// Connects to the database at `url`, creates the schema and runs its migrations,
    /// and starts the tasks that listen, renew leases and look for cancels.
    pub async fn open(url: &str, config: QueueConfig, metrics: BuildMetrics) -> Result<Self> {
        let lease = config.lease;
        let options: PgConnectOptions = url.parse()?;
        let pool = connect(&options, 8).await?;
        // Holds get connections of their own: a hold keeps its connection (the session
        // owns the lock), and many changes at once must not starve claims and renewals.
        let holds = connect(&options, HOLD_CONNECTIONS).await?;
        create_schema(&pool).await?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| BuildError::from(kiln_store::Error::Migrate(e)))?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        let inner = Arc::new(Inner {
            pool,
            holds,
            released: Notify::new(),
            replica: uuid::Uuid::new_v4().to_string(),
            config,
            lease,
            metrics,
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            runs: Runs::default(),
        });
        let (tx, rx) = mpsc::channel(256);
        let tasks = vec![
            tokio::spawn(kiln_store::forward_notifications(
                listener,
                tx,
                "build control",
            )),
            tokio::spawn(keep(Arc::downgrade(&inner), rx)),
        ];
        tracing::info!(replica = %inner.replica, "build control on Postgres");
        Ok(Self { inner, tasks })
    }
}

/// A pool on `options` whose connections work in the control's schema.
async fn connect(options: &PgConnectOptions, max: u32) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("SET search_path TO build_control").await?;
                Ok(())
            })
        })
        .connect_with(options.clone())
        .await?)
}

/// Creates the schema, tolerating a replica that creates it at the same moment.
async fn create_schema(pool: &PgPool) -> Result<()> {
    match pool
        .execute("CREATE SCHEMA IF NOT EXISTS build_control")
        .await
    {
        Ok(_) => Ok(()),
        // Two CREATE SCHEMA IF NOT EXISTS racing: one loses with a unique violation,
        // and the schema is there.
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Renews leases, applies cancels and wakes the scheduler, until the control is dropped.
async fn keep(inner: Weak<Inner>, mut notifications: mpsc::Receiver<String>) {
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renew_every = None;
    let mut next_renewal = tokio::time::Instant::now();
    let mut renewed_at = tokio::time::Instant::now();
    loop {
        let cancel_announced = tokio::select! {
            n = notifications.recv() => match n {
                Some(payload) => payload == "cancel",
                None => return,
            },
            _ = poll.tick() => true,
        };
        let Some(this) = inner.upgrade() else {
            return;
        };
        this.wake.notify_one();
        this.released.notify_waiters();
        if cancel_announced && let Err(e) = this.apply_cancels().await {
            tracing::warn!(error = %e, "build control: reading cancel requests failed");
        }
        let every = *renew_every.get_or_insert(this.lease / 3);
        if tokio::time::Instant::now() >= next_renewal {
            next_renewal = tokio::time::Instant::now() + every;
            match this.renew().await {
                Ok(()) => renewed_at = tokio::time::Instant::now(),
                Err(e) if renewed_at.elapsed() >= this.lease => {
                    tracing::error!(error = %e, "build control: leases not renewed for a whole lease; interrupting this replica's builds, which others will reclaim");
                    this.runs.interrupt_all();
                }
                Err(e) => tracing::warn!(error = %e, "build control: renewing leases failed"),
            }
        }
    }
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Inner {
    /// Renews the leases of this replica's builds; a build whose lease is gone (it was
    /// reclaimed as abandoned) is interrupted: another replica has ended it.
    async fn renew(&self) -> Result<()> {
        let ids = self.runs.ids();
        let renewed: Vec<String> = sqlx::query_scalar(
            "UPDATE queue SET lease_until = clock_timestamp() + make_interval(secs => $3)
             WHERE claimed_by = $1 AND build_id = ANY($2) RETURNING build_id",
        )
        .bind(&self.replica)
        .bind(&ids)
        .bind(seconds(self.lease))
        .fetch_all(&self.pool)
        .await?;
        for id in ids.iter().filter(|id| !renewed.contains(id)) {
            tracing::error!(build = %id, "build control: this replica lost the build's lease; interrupting it");
            self.runs.signal(id, Stop::Interrupt);
        }
        let depth: i64 = sqlx::query_scalar("SELECT count(*) FROM queue WHERE claimed_by IS NULL")
            .fetch_one(&self.pool)
            .await?;
        self.metrics.set_queue_depth(depth);
        Ok(())
    }

    /// Hands the persisted cancel requests for this replica's builds to their runners.
    async fn apply_cancels(&self) -> Result<()> {
        let rows = sqlx::query(
            "SELECT build_id, cancel_grace_ms FROM queue
             WHERE claimed_by = $1 AND cancel_grace_ms IS NOT NULL",
        )
        .bind(&self.replica)
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let id: String = row.try_get("build_id")?;
            let grace_ms: i64 = row.try_get("cancel_grace_ms")?;
            let grace = Duration::from_millis(u64::try_from(grace_ms).unwrap_or(0));
            self.runs.signal(&id, Stop::Cancel(grace));
        }
        Ok(())
    }

    async fn notify(&self, payload: &str) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The queued builds in queue order and the turn order of their owners.
    async fn queue_snapshot(&self) -> Result<(Vec<(String, String)>, Vec<String>)> {
        let queued =
            sqlx::query("SELECT owner, build_id FROM queue WHERE claimed_by IS NULL ORDER BY seq")
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .map(|r| Ok((r.try_get("owner")?, r.try_get("build_id")?)))
                .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?;
        let turns = sqlx::query_scalar(
            "SELECT t.owner FROM turns t
             WHERE EXISTS (SELECT 1 FROM queue q WHERE q.owner = t.owner)
             ORDER BY t.last_started",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok((queued, turns))
    }

    /// Where the `index`-th queued build of `owner` stands (see [`crate::queue`]).
    async fn estimate(&self, owner: &str, build_id: Option<&str>) -> Result<Option<u32>> {
        let (queued, turns) = self.queue_snapshot().await?;
        let mine: Vec<&str> = queued
            .iter()
            .filter(|(o, _)| o == owner)
            .map(|(_, b)| b.as_str())
            .collect();
        let index = match build_id {
            Some(id) => match mine.iter().position(|b| *b == id) {
                Some(i) => i,
                None => return Ok(None),
            },
            None => mine.len(),
        };
        let turns: Vec<&str> = turns.iter().map(String::as_str).collect();
        let owner_turn = turns
            .iter()
            .position(|u| *u == owner)
            .unwrap_or(turns.len());
        let count = |user: &str| queued.iter().filter(|(o, _)| o == user).count();
        Ok(Some(estimate_position(
            &turns, count, owner, index, owner_turn,
        )))
    }
}

/// A workspace held for an API change: a session advisory lock on a connection of its
/// own. Released by unlocking and announcing it; if even that cannot run, the
/// connection is closed, which ends the session and its lock.
struct PgHold {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Postgres>>,
    inner: Arc<Inner>,
}

impl Drop for PgHold {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // `close_on_drop` ends the session
        };
        let inner = self.inner.clone();
        runtime.spawn(async move {
            let _ = conn.execute("SELECT pg_advisory_unlock_all()").await;
            drop(conn);
            inner.wake.notify_one();
            inner.released.notify_waiters();
            let _ = inner.notify("wake").await;
        });
    }
}

#[tonic::async_trait]
impl BuildControl for PgControl {
    fn config(&self) -> QueueConfig {
        self.inner.config
    }

    fn replica_id(&self) -> Option<&str> {
        Some(&self.inner.replica)
    }

    fn wake(&self) -> &Notify {
        &self.inner.wake
    }

    async fn reserve(&self, owner: &str) -> Result<Reservation> {
        let inner = &self.inner;
        let mut tx = inner.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("kiln-owner:{owner}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM reservations WHERE expires_at < clock_timestamp()")
            .execute(&mut *tx)
            .await?;
        let queued: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM queue WHERE owner = $1 AND claimed_by IS NULL)
                  + (SELECT count(*) FROM reservations WHERE owner = $1)",
        )
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
        let queued = usize::try_from(queued).unwrap_or(usize::MAX);
        let limit = inner.config.max_queued_per_user;
        if queued >= limit {
            return Err(queue_full(queued, limit));
        }
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO reservations (id, owner, expires_at)
             VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))",
        )
        .bind(&id)
        .bind(owner)
        .bind(RESERVATION_SECONDS)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let pool = inner.pool.clone();
        let promise = id.clone();
        Ok(Reservation::new(id, owner, move || {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    // Failing, the promise expires by itself.
                    let _ = sqlx::query("DELETE FROM reservations WHERE id = $1")
                        .bind(promise)
                        .execute(&pool)
                        .await;
                });
            }
        }))
    }

    async fn enqueue(&self, entry: Entry, reservation: Option<Reservation>) -> Result<u32> {
        let inner = &self.inner;
        let mut tx = inner.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO queue (build_id, owner, workspace_id, traceparent)
             VALUES ($1, $2, $3, $4) ON CONFLICT (build_id) DO NOTHING",
        )
        .bind(&entry.build_id)
        .bind(&entry.owner)
        .bind(&entry.workspace_id)
        .bind(entry.trace.to_traceparent())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if inserted {
            // A user with nothing else queued or running goes to the back of the turns.
            sqlx::query(
                "INSERT INTO turns (owner, last_started) VALUES ($1, nextval('turn_seq'))
                 ON CONFLICT (owner) DO UPDATE SET last_started = EXCLUDED.last_started
                 WHERE NOT EXISTS (SELECT 1 FROM queue q WHERE q.owner = $1 AND q.build_id <> $2)",
            )
            .bind(&entry.owner)
            .bind(&entry.build_id)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(reservation) = reservation {
            sqlx::query("DELETE FROM reservations WHERE id = $1")
                .bind(reservation.used())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("SELECT pg_notify($1, 'wake')")
            .bind(CHANNEL)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        inner.wake.notify_one();
        Ok(inner
            .estimate(&entry.owner, Some(&entry.build_id))
            .await?
            .unwrap_or(1))
    }

    async fn position(&self, owner: &str, build_id: &str) -> Option<u32> {
        self.inner
            .estimate(owner, Some(build_id))
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "build control: queue position unknown");
                None
            })
    }

    async fn peek_position(&self, owner: &str) -> u32 {
        self.inner
            .estimate(owner, None)
            .await
            .ok()
            .flatten()
            .unwrap_or(1)
    }

    async fn claim(&self) -> Result<Option<Claim>> {
        let inner = &self.inner;
        if self.is_closed() || inner.runs.len() >= inner.config.max_running {
            return Ok(None);
        }
        let mut tx = inner.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CLAIM_LOCK)
            .execute(&mut *tx)
            .await?;
        let candidates = sqlx::query(
            "SELECT q.build_id, q.owner, q.workspace_id, q.traceparent,
                    EXTRACT(EPOCH FROM clock_timestamp() - q.queued_at)::float8 AS waited
             FROM queue q LEFT JOIN turns t ON t.owner = q.owner
             WHERE q.claimed_by IS NULL
               AND NOT EXISTS (SELECT 1 FROM queue r
                               WHERE r.workspace_id = q.workspace_id AND r.claimed_by IS NOT NULL)
               AND (SELECT count(*) FROM queue r
                    WHERE r.owner = q.owner AND r.claimed_by IS NOT NULL) < $1
             ORDER BY COALESCE(t.last_started, 0), q.seq
             LIMIT $2
             FOR UPDATE OF q SKIP LOCKED",
        )
        .bind(i64::try_from(inner.config.max_running_per_user).unwrap_or(i64::MAX))
        .bind(CANDIDATES)
        .fetch_all(&mut *tx)
        .await?;
        for row in candidates {
            let workspace_id: String = row.try_get("workspace_id")?;
            let free: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))")
                    .bind(workspace_key(&workspace_id))
                    .fetch_one(&mut *tx)
                    .await?;
            if !free {
                continue; // an API change holds it; the build keeps its place
            }
            let build_id: String = row.try_get("build_id")?;
            let owner: String = row.try_get("owner")?;
            let traceparent: String = row.try_get("traceparent")?;
            let waited: f64 = row.try_get("waited")?;
            sqlx::query(
                "UPDATE queue SET claimed_by = $2,
                        lease_until = clock_timestamp() + make_interval(secs => $3)
                 WHERE build_id = $1",
            )
            .bind(&build_id)
            .bind(&inner.replica)
            .bind(seconds(inner.lease))
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE turns SET last_started = nextval('turn_seq') WHERE owner = $1")
                .bind(&owner)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            let stop = Runs::start(&mut inner.runs.lock(), &build_id);
            inner
                .metrics
                .started(Duration::from_secs_f64(waited.max(0.0)));
            let mut entry = Entry::new(build_id, owner, workspace_id.clone());
            entry.trace = TraceParent::from_traceparent(&traceparent);
            return Ok(Some(Claim {
                entry,
                stop,
                // The claimed row is what makes the workspace busy for every replica.
                workspace: WorkspaceHold::new(&workspace_id, ()),
            }));
        }
        tx.commit().await?;
        Ok(None)
    }

    async fn cancel(&self, _owner: &str, build_id: &str, grace: Duration) -> Result<Cancelled> {
        let inner = &self.inner;
        let dequeued = sqlx::query(
            "DELETE FROM queue WHERE build_id = $1 AND claimed_by IS NULL RETURNING build_id",
        )
        .bind(build_id)
        .fetch_optional(&inner.pool)
        .await?;
        if dequeued.is_some() {
            return Ok(Cancelled::Dequeued);
        }
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let runner: Option<String> = sqlx::query_scalar(
            "UPDATE queue SET cancel_grace_ms = COALESCE(cancel_grace_ms, $2)
             WHERE build_id = $1 AND claimed_by IS NOT NULL RETURNING claimed_by",
        )
        .bind(build_id)
        .bind(grace_ms)
        .fetch_optional(&inner.pool)
        .await?;
        let Some(runner) = runner else {
            return Ok(Cancelled::NotRunning);
        };
        if runner == inner.replica {
            inner.runs.signal(build_id, Stop::Cancel(grace));
        } else if let Err(e) = inner.notify("cancel").await {
            // The runner's replica polls for it within a second.
            tracing::warn!(error = %e, "build control: announcing a cancel failed");
        }
        Ok(Cancelled::Signalled)
    }

    async fn finish(&self, claim: Claim) -> Result<()> {
        let inner = &self.inner;
        let Claim {
            entry,
            stop,
            workspace,
        } = claim;
        inner.runs.remove(&entry.build_id);
        drop(stop);
        inner.metrics.finished();
        let mut result = Ok(());
        for attempt in 0..3 {
            result = sqlx::query("DELETE FROM queue WHERE build_id = $1 AND claimed_by = $2")
                .bind(&entry.build_id)
                .bind(&inner.replica)
                .execute(&inner.pool)
                .await
                .map(drop);
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        drop(workspace);
        inner.wake.notify_one();
        // Failing, the row's lease expires and a reclaim deletes it (the build's end is
        // stored, so nothing is interrupted).
        result?;
        inner.notify("wake").await
    }

    async fn workspace_busy(&self, workspace_id: &str) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM queue WHERE workspace_id = $1 AND claimed_by IS NOT NULL)",
        )
        .bind(workspace_id)
        .fetch_one(&self.inner.pool)
        .await?)
    }

    /// Tries the workspace's lock and, while another session holds it, waits for a
    /// release (announced, or at the latest every [`HOLD_RETRY`]) without keeping a
    /// connection: waiting changes cannot exhaust the pool.
    async fn hold_workspace(&self, workspace_id: &str) -> Result<WorkspaceHold> {
        let inner = &self.inner;
        loop {
            let released = inner.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let mut conn = inner.holds.acquire().await?;
            let got: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                    .bind(workspace_key(workspace_id))
                    .fetch_one(&mut *conn)
                    .await?;
            if got {
                // From here the connection holds the lock: never back to the pool with
                // it. `PgHold` unlocks it; if that cannot run, closing ends the session.
                conn.close_on_drop();
                return Ok(WorkspaceHold::new(
                    workspace_id,
                    PgHold {
                        conn: Some(conn),
                        inner: inner.clone(),
                    },
                ));
            }
            drop(conn);
            let _ = tokio::time::timeout(HOLD_RETRY, released).await;
        }
    }

    fn forget_workspace(&self, _workspace_id: &str) {}

    /// The unfinished builds whose lease ran out, taken off the queue (by one replica
    /// only: rows another replica is reclaiming are skipped).
    async fn abandoned(&self, store: &Store) -> Result<Vec<BuildRow>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "DELETE FROM queue WHERE build_id IN (
                 SELECT build_id FROM queue
                 WHERE claimed_by IS NOT NULL AND lease_until < clock_timestamp()
                 FOR UPDATE SKIP LOCKED)
             RETURNING build_id",
        )
        .fetch_all(&self.inner.pool)
        .await?;
        let mut rows = Vec::new();
        for id in &ids {
            if let Some(row) = store.get_build(id).await?
                && !row.build.state.is_final()
            {
                rows.push(row);
            }
        }
        if !ids.is_empty() {
            self.inner.notify("wake").await?;
        }
        Ok(rows)
    }

    fn reclaim_interval(&self) -> Option<Duration> {
        Some(self.inner.lease / 2)
    }

    fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    fn interrupt_all(&self) {
        self.inner.runs.interrupt_all();
    }

    async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        self.inner.runs.wait_idle(deadline).await
    }
}

/// What only a shared control must do: several replicas on one database.
#[cfg(test)]
mod replica_tests {
    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;

    use kiln_proto::build as pb;

    use super::*;
    use crate::control::contract_tests::pg::fresh_database;

    const DEFAULT_LEASE: Duration = Duration::from_secs(10);

    fn limits(max_running: usize, per_user: usize) -> QueueConfig {
        QueueConfig {
            max_running,
            max_running_per_user: per_user,
            max_queued_per_user: 1000,
            lease: DEFAULT_LEASE,
        }
    }

    async fn replica(url: &str, mut config: QueueConfig, lease: Duration) -> PgControl {
        config.lease = lease;
        PgControl::open(url, config, BuildMetrics::default())
            .await
            .expect("replica")
    }

    async fn queue(c: &PgControl, build: &str, owner: &str, workspace: &str) {
        let r = c.reserve(owner).await.expect("reserve");
        c.enqueue(
            Entry::new(build.into(), owner.into(), workspace.into()),
            Some(r),
        )
        .await
        .expect("enqueue");
    }

    #[tokio::test]
    async fn a_cancel_sent_to_another_replica_reaches_the_runner_within_a_second() {
        let Some(url) = fresh_database().await else {
            return;
        };
        let a = replica(&url, limits(4, 4), DEFAULT_LEASE).await;
        let b = replica(&url, limits(4, 4), DEFAULT_LEASE).await;
        queue(&b, "b1", "alice", "w").await;
        let mut claim = a.claim().await.expect("claim").expect("a runs it");
        assert!(
            b.workspace_busy("w").await.expect("busy?"),
            "every replica sees the workspace busy"
        );
        let grace = Duration::from_millis(700);
        assert_eq!(
            b.cancel("alice", "b1", grace).await.expect("cancel"),
            Cancelled::Signalled
        );
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_millis(1500), claim.stop.changed())
            .await
            .expect("the runner on the other replica hears of it")
            .expect("switch open");
        assert_eq!(*claim.stop.borrow(), Stop::Cancel(grace));
        eprintln!(
            "cross-replica cancel reached the runner in {:?}",
            started.elapsed()
        );
        a.finish(claim).await.expect("finish");
        assert!(!b.workspace_busy("w").await.expect("busy?"));
    }

    #[tokio::test]
    async fn a_dead_replicas_build_is_reclaimed_once_after_its_lease_and_a_live_ones_never() {
        let Some(url) = fresh_database().await else {
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(
            &kiln_store::DatabaseUrl::sqlite(dir.path().join("build.db")),
            &dir.path().join("outputs"),
        )
        .await
        .expect("store");
        for (build, workspace) in [("dead-1", "w1"), ("live-1", "w2")] {
            store
                .insert_workspace(
                    &crate::store::WorkspaceRow {
                        id: workspace.into(),
                        owner: "alice".into(),
                        size_bytes: 0,
                        file_count: 0,
                        created_at: 0,
                        updated_at: 0,
                        request_hash: None,
                        labels: HashMap::new(),
                        name: None,
                    },
                    None,
                )
                .await
                .expect("workspace");
            let b = crate::model::Build::queued(
                build.into(),
                workspace.into(),
                "alice".into(),
                crate::model::BuildSpec {
                    steps: Vec::new(),
                    env: Default::default(),
                    limits: crate::config::BuildLimits::DEFAULT,
                    labels: Default::default(),
                },
                0,
            );
            let first = pb::BuildEvent {
                sequence: 1,
                ..Default::default()
            };
            store
                .insert_build(&b, None, None, &first)
                .await
                .expect("build");
        }
        let lease = Duration::from_millis(1200);
        let dying = replica(&url, limits(4, 4), lease).await;
        let living = replica(&url, limits(4, 4), lease).await;
        let watcher = replica(&url, limits(4, 4), lease).await;
        queue(&dying, "dead-1", "alice", "w1").await;
        let dead_claim = dying.claim().await.expect("claim").expect("claimed");
        queue(&living, "live-1", "alice", "w2").await;
        let live_claim = living.claim().await.expect("claim").expect("claimed");
        assert!(
            watcher
                .abandoned(&store)
                .await
                .expect("abandoned")
                .is_empty(),
            "nothing is abandoned while its leases run"
        );
        // Killed: its tasks stop, nothing renews its lease, nothing finishes its claim.
        std::mem::forget(dead_claim);
        drop(dying);
        let started = std::time::Instant::now();
        let reclaimed = loop {
            let found = watcher.abandoned(&store).await.expect("abandoned");
            if !found.is_empty() {
                break found;
            }
            assert!(
                started.elapsed() < lease * 3,
                "reclaimed within a lease or so"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let ids: Vec<&str> = reclaimed.iter().map(|r| r.build.id.as_str()).collect();
        assert_eq!(ids, ["dead-1"], "only the dead replica's build");
        eprintln!(
            "a dead replica's build was reclaimed after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(lease).await;
        assert!(
            watcher
                .abandoned(&store)
                .await
                .expect("abandoned")
                .is_empty(),
            "reclaimed once; the living replica renewed its lease"
        );
        assert!(
            !watcher.workspace_busy("w1").await.expect("busy?"),
            "the dead replica's workspace is free again"
        );
        assert!(watcher.workspace_busy("w2").await.expect("busy?"));
        living.finish(live_claim).await.expect("finish");
    }

    #[tokio::test]
    async fn three_replicas_run_every_build_exactly_once_within_the_per_user_limit() {
        let Some(url) = fresh_database().await else {
            return;
        };
        let replicas = [
            Arc::new(replica(&url, limits(3, 1), DEFAULT_LEASE).await),
            Arc::new(replica(&url, limits(3, 1), DEFAULT_LEASE).await),
            Arc::new(replica(&url, limits(3, 1), DEFAULT_LEASE).await),
        ];
        let users = ["u0", "u1", "u2", "u3"];
        let mut all = HashSet::new();
        for i in 0..40 {
            let id = format!("b{i}");
            let user = users[i % 4];
            queue(&replicas[i % 3], &id, user, &id).await;
            all.insert(id);
        }
        let ran = Arc::new(Mutex::new(Vec::new()));
        let running = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        let mut workers = Vec::new();
        for r in &replicas {
            let (r, ran, running) = (r.clone(), ran.clone(), running.clone());
            workers.push(tokio::spawn(async move {
                let mut idle_rounds = 0;
                while idle_rounds < 20 {
                    let Some(claim) = r.claim().await.expect("claim") else {
                        idle_rounds += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    idle_rounds = 0;
                    let owner = claim.entry.owner.clone();
                    {
                        let mut now = running.lock().unwrap();
                        let n = now.entry(owner.clone()).or_default();
                        *n += 1;
                        assert!(*n <= 1, "{owner} has two builds running at once");
                    }
                    ran.lock().unwrap().push(claim.entry.build_id.clone());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    *running.lock().unwrap().get_mut(&owner).unwrap() -= 1;
                    r.finish(claim).await.expect("finish");
                }
            }));
        }
        for w in workers {
            w.await.expect("worker");
        }
        let ran = ran.lock().unwrap().clone();
        let unique: HashSet<String> = ran.iter().cloned().collect();
        assert_eq!(ran.len(), 40, "each build ran once: {ran:?}");
        assert_eq!(unique, all);
        let first_users: HashSet<&str> = ran[..4]
            .iter()
            .map(|id| users[id[1..].parse::<usize>().expect("b<i>") % 4])
            .collect();
        assert_eq!(
            first_users.len(),
            4,
            "users take turns across replicas: {ran:?}"
        );
    }
}
