//! [`PgControl`]: task control shared by every kiln-agent replica on one Postgres
//! database, in its own schema `agent_control` (the table is in `migrations/`).
//!
//! - **Claims with leases.** A claim is a row naming the replica (a random id per
//!   process, so a restarted replica never mistakes another's claims, or its own
//!   previous life's, for its own) and a lease in database time. The holder renews the
//!   leases of its tasks every third of a lease; one that finds a lease gone, or could
//!   not renew for a whole lease, tells those runners [`Signal::Lost`]: they stop
//!   writing, and another replica continues the task.
//! - **Unowned tasks** (unfinished at start, left by a replica that stopped, whose
//!   lease ran out, or left unclaimed by a busy replica at StartTask) are claimed by
//!   whichever replica looks first, rows locked `FOR UPDATE SKIP LOCKED` so two never
//!   take the same one; each replica takes at most `max_running_tasks`.
//! - **Cancels** are persisted on the row (`cancel_requested`) and announced with
//!   `NOTIFY`; every replica also polls its claims for them once a second, so a cancel
//!   reaches the runner within a second even when a notification is lost. A cancelled
//!   task nobody holds is claimed regardless of room: it only has to end.
//! - **Wake-ups** (`NOTIFY kiln_agent_control, 'wake'`) when a task is released or left
//!   unclaimed, so an idle replica claims it at once rather than at its next look.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Executor, Row};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::{Claim, Runs, Signal, TaskControl};
use crate::error::{AgentError, Result};

static MIGRATOR: Migrator = sqlx::migrate!("src/control/migrations");

/// The channel of wake-ups and cancel announcements.
const CHANNEL: &str = "kiln_agent_control";
/// How often every replica looks for cancels of its tasks, whatever the notifications
/// say.
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct PgControl {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    /// This process's id in `claimed_by`.
    replica: String,
    lease: Duration,
    /// Tasks this replica runs at most (`max_running_tasks`).
    max_running: usize,
    runs: Runs,
    wake: Notify,
    /// Held while claiming, so that concurrent claims in this process cannot together
    /// exceed `max_running`.
    claiming: tokio::sync::Mutex<()>,
}

impl Drop for PgControl {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl PgControl {
    /// Connects to the database at `url`, creates the schema and runs its migration,
    /// and starts the tasks that listen, renew leases and look for cancels.
    pub async fn open(url: &str, lease: Duration, max_running: usize) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("SET search_path TO agent_control").await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        match pool
            .execute("CREATE SCHEMA IF NOT EXISTS agent_control")
            .await
        {
            // Two replicas creating it at once: one loses with a unique violation, and
            // the schema is there.
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {}
            Err(e) => return Err(e.into()),
        }
        MIGRATOR.run(&pool).await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        let inner = Arc::new(Inner {
            pool,
            replica: uuid::Uuid::new_v4().to_string(),
            lease,
            max_running: max_running.max(1),
            runs: Runs::default(),
            wake: Notify::new(),
            claiming: tokio::sync::Mutex::new(()),
        });
        let (tx, rx) = mpsc::channel(256);
        let tasks = vec![
            tokio::spawn(kiln_store::forward_notifications(
                listener,
                tx,
                "agent task control",
            )),
            tokio::spawn(keep(Arc::downgrade(&inner), rx)),
        ];
        tracing::info!(replica = %inner.replica, "agent task control on Postgres");
        Ok(Self { inner, tasks })
    }

    /// Stops renewing this replica's leases and listening, as if its process died,
    /// keeping its claims: what a killed replica leaves behind.
    #[cfg(test)]
    pub(super) fn stop_renewing(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }

    /// One renewal now, as the keeper does every third of a lease.
    #[cfg(test)]
    pub(super) async fn renew_now(&self) -> Result<()> {
        self.inner.renew().await
    }
}

/// Renews leases, applies cancels and wakes the claimer, until the control is dropped.
async fn keep(inner: Weak<Inner>, mut notifications: mpsc::Receiver<String>) {
    // Often enough to renew every third of a lease, however short the lease is.
    let Some(lease) = inner.upgrade().map(|i| i.lease) else {
        return;
    };
    let mut poll = tokio::time::interval(POLL.min(lease / 3));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_renewal = tokio::time::Instant::now();
    let mut renewed_at = tokio::time::Instant::now();
    loop {
        let announced = tokio::select! {
            n = notifications.recv() => match n {
                Some(payload) => Some(payload),
                None => return,
            },
            _ = poll.tick() => None,
        };
        let Some(this) = inner.upgrade() else {
            return;
        };
        // A release or a cancel elsewhere may have left a task for this replica.
        if announced.is_some() {
            this.wake.notify_one();
        }
        if announced.as_deref() != Some("wake")
            && let Err(e) = this.apply_cancels().await
        {
            tracing::warn!(error = %e, "agent task control: reading cancel requests failed");
        }
        if tokio::time::Instant::now() >= next_renewal {
            next_renewal = tokio::time::Instant::now() + this.lease / 3;
            match this.renew().await {
                Ok(()) => renewed_at = tokio::time::Instant::now(),
                Err(e) if renewed_at.elapsed() >= this.lease => {
                    tracing::error!(error = %e, "agent task control: leases not renewed for a whole lease; stopping this replica's tasks, which others will continue");
                    for id in this.runs.ids() {
                        this.runs.signal(&id, Signal::Lost);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "agent task control: renewing leases failed"),
            }
        }
    }
}

impl Inner {
    /// Renews the leases of this replica's tasks; a task whose claim is gone (another
    /// replica took it over) is told it is lost.
    async fn renew(&self) -> Result<()> {
        let ids = self.runs.ids();
        if ids.is_empty() {
            return Ok(());
        }
        let renewed: Vec<String> = sqlx::query_scalar(
            "UPDATE claims SET lease_until = clock_timestamp() + make_interval(secs => $3)
             WHERE claimed_by = $1 AND task_id = ANY($2) RETURNING task_id",
        )
        .bind(&self.replica)
        .bind(&ids)
        .bind(seconds(self.lease))
        .fetch_all(&self.pool)
        .await?;
        for id in ids.iter().filter(|id| !renewed.contains(id)) {
            // Released meanwhile (the runner ended) is not a loss.
            if self.runs.contains(id) {
                tracing::error!(task = %id, "agent task control: this replica lost the task's lease; stopping its runner");
                self.runs.signal(id, Signal::Lost);
            }
        }
        Ok(())
    }

    /// Hands the persisted cancel requests for this replica's tasks to their runners.
    async fn apply_cancels(&self) -> Result<()> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT task_id FROM claims WHERE claimed_by = $1 AND cancel_requested",
        )
        .bind(&self.replica)
        .fetch_all(&self.pool)
        .await?;
        for id in ids {
            self.runs.signal(&id, Signal::Cancel);
        }
        Ok(())
    }

    async fn notify(&self, payload: &str) {
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(&self.pool)
            .await;
        if let Err(e) = sent {
            // The others look again within their reclaim interval or poll.
            tracing::warn!(error = %e, "agent task control: announcing {payload:?} failed");
        }
    }

    fn room(&self) -> usize {
        self.max_running.saturating_sub(self.runs.len())
    }
}

#[tonic::async_trait]
impl TaskControl for PgControl {
    fn replica_id(&self) -> Option<&str> {
        Some(&self.inner.replica)
    }

    fn wake(&self) -> &Notify {
        &self.inner.wake
    }

    async fn claim_new(&self, task_id: &str) -> Result<Option<Claim>> {
        let inner = &self.inner;
        let claiming = inner.claiming.lock().await;
        if inner.room() == 0 {
            drop(claiming);
            inner.notify("wake").await;
            return Ok(None);
        }
        // A replica looking for unowned tasks may have found this one first.
        let row = sqlx::query(
            "INSERT INTO claims (task_id, claimed_by, lease_until)
             VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
             ON CONFLICT (task_id) DO NOTHING RETURNING cancel_requested",
        )
        .bind(task_id)
        .bind(&inner.replica)
        .bind(seconds(inner.lease))
        .fetch_optional(&inner.pool)
        .await?;
        Ok(row
            .map(|r| r.try_get::<bool, _>("cancel_requested"))
            .transpose()?
            .map(|cancelled| inner.runs.start(task_id, cancelled)))
    }

    async fn claim_unowned(&self, unfinished: &[String]) -> Result<Vec<Claim>> {
        let inner = &self.inner;
        if unfinished.is_empty() {
            return Ok(Vec::new());
        }
        let _claiming = inner.claiming.lock().await;
        let mut tx = inner.pool.begin().await?;
        // Tasks stored before any replica claimed them (StartTask on a busy replica,
        // or a store older than this table) get their row here.
        sqlx::query(
            "INSERT INTO claims (task_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(unfinished)
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query(
            "SELECT task_id, cancel_requested FROM claims
             WHERE task_id = ANY($1)
               AND (claimed_by IS NULL OR lease_until < clock_timestamp())
             FOR UPDATE SKIP LOCKED",
        )
        .bind(unfinished)
        .fetch_all(&mut *tx)
        .await?;
        let mut free: HashMap<String, bool> = HashMap::new();
        for row in rows {
            free.insert(row.try_get("task_id")?, row.try_get("cancel_requested")?);
        }
        // Oldest first, as the store listed them; cancelled ones need no room.
        let mut room = inner.room();
        let mut taken = Vec::new();
        for id in unfinished {
            match free.get(id) {
                Some(true) => taken.push((id.clone(), true)),
                Some(false) if room > 0 => {
                    room -= 1;
                    taken.push((id.clone(), false));
                }
                _ => {}
            }
        }
        if taken.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = taken.iter().map(|(id, _)| id.as_str()).collect();
        sqlx::query(
            "UPDATE claims SET claimed_by = $1,
                 lease_until = clock_timestamp() + make_interval(secs => $3)
             WHERE task_id = ANY($2)",
        )
        .bind(&inner.replica)
        .bind(&ids)
        .bind(seconds(inner.lease))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(taken
            .into_iter()
            .map(|(id, cancelled)| inner.runs.start(&id, cancelled))
            .collect())
    }

    async fn cancel(&self, task_id: &str) -> Result<bool> {
        let inner = &self.inner;
        let runner: Option<String> = sqlx::query_scalar(
            "INSERT INTO claims (task_id, cancel_requested) VALUES ($1, true)
             ON CONFLICT (task_id) DO UPDATE SET cancel_requested = true
             RETURNING claimed_by",
        )
        .bind(task_id)
        .fetch_one(&inner.pool)
        .await?;
        if runner.as_deref() == Some(inner.replica.as_str()) {
            inner.runs.signal(task_id, Signal::Cancel);
        } else {
            // Its runner's replica polls for it within a second; a task nobody runs is
            // claimed by the first replica the announcement wakes.
            inner.notify("cancel").await;
        }
        Ok(true)
    }

    async fn release(&self, task_id: &str, finished: bool) -> Result<()> {
        let inner = &self.inner;
        inner.runs.remove(task_id);
        let statement = if finished {
            "DELETE FROM claims WHERE task_id = $1 AND claimed_by = $2"
        } else {
            "UPDATE claims SET claimed_by = NULL, lease_until = NULL
             WHERE task_id = $1 AND claimed_by = $2"
        };
        let mut result = Ok(());
        for attempt in 0..3 {
            result = sqlx::query(statement)
                .bind(task_id)
                .bind(&inner.replica)
                .execute(&inner.pool)
                .await
                .map(drop);
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        // Failing, the claim's lease runs out and another replica takes the task over
        // (or, finished, nobody: only unfinished tasks are claimed).
        result.map_err(AgentError::from)?;
        // Room here, or a task to continue: whoever is idle may claim.
        inner.notify("wake").await;
        Ok(())
    }

    fn reclaim_interval(&self) -> Option<Duration> {
        Some(self.inner.lease / 2)
    }
}
