//! [`LocalControl`]: build control in this process's memory, for one process owning its
//! database (SQLite, `kiln up`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, OwnedMutexGuard};

use super::{BuildControl, Cancelled, Claim, Reservation, Runs, WorkspaceHold, queue_full};
use crate::config::QueueConfig;
use crate::error::Result;
use crate::metrics::BuildMetrics;
use crate::queue::{Entry, Queue};
use crate::runner::Stop;
use crate::store::{BuildRow, Store};

type WorkspaceLocks = Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

#[derive(Debug)]
pub(crate) struct LocalControl {
    queue: Arc<Queue>,
    /// Locked from taking a build off the queue to registering its switch (in
    /// [`Self::claim`]), and by [`Self::cancel`] around both of its looks: so a build is
    /// never in neither place and a cancel is never lost.
    runs: Runs,
    /// One lock per workspace: API changes and builds never overlap.
    workspace_locks: WorkspaceLocks,
}

/// A workspace lock whose release wakes the scheduler, which skips builds whose
/// workspace is held.
struct WakeOnRelease {
    guard: Option<OwnedMutexGuard<()>>,
    queue: Arc<Queue>,
}

impl Drop for WakeOnRelease {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.queue.wake.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LocalControl {
    pub fn new(config: QueueConfig, metrics: BuildMetrics) -> Self {
        Self {
            queue: Arc::new(Queue::new(config, metrics)),
            runs: Runs::default(),
            workspace_locks: Mutex::new(HashMap::new()),
        }
    }

    fn workspace_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.workspace_locks)
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    fn hold(&self, id: &str, guard: OwnedMutexGuard<()>) -> WorkspaceHold {
        WorkspaceHold::new(
            id,
            WakeOnRelease {
                guard: Some(guard),
                queue: self.queue.clone(),
            },
        )
    }
}

#[tonic::async_trait]
impl BuildControl for LocalControl {
    fn config(&self) -> QueueConfig {
        self.queue.config()
    }

    fn replica_id(&self) -> Option<&str> {
        None
    }

    fn wake(&self) -> &Notify {
        &self.queue.wake
    }

    async fn reserve(&self, owner: &str) -> Result<Reservation> {
        self.queue
            .reserve(owner)
            .map_err(|queued| queue_full(queued, self.queue.config().max_queued_per_user))?;
        let queue = self.queue.clone();
        let who = owner.to_owned();
        Ok(Reservation::new(String::new(), owner, move || {
            queue.release(&who);
        }))
    }

    async fn enqueue(&self, entry: Entry, reservation: Option<Reservation>) -> Result<u32> {
        let reserved = reservation.map(Reservation::used).is_some();
        Ok(self.queue.push(entry, reserved))
    }

    async fn position(&self, owner: &str, build_id: &str) -> Option<u32> {
        self.queue.position(owner, build_id)
    }

    async fn peek_position(&self, owner: &str) -> u32 {
        self.queue.peek_position(owner)
    }

    async fn claim(&self) -> Result<Option<Claim>> {
        let mut switches = self.runs.lock();
        let Some((entry, guard)) = self.queue.next(|entry| {
            self.workspace_lock(&entry.workspace_id)
                .try_lock_owned()
                .ok()
        }) else {
            return Ok(None);
        };
        let stop = Runs::start(&mut switches, &entry.build_id);
        drop(switches);
        let workspace = self.hold(&entry.workspace_id, guard);
        Ok(Some(Claim {
            entry,
            stop,
            workspace,
        }))
    }

    async fn cancel(&self, owner: &str, build_id: &str, grace: Duration) -> Result<Cancelled> {
        let switches = self.runs.lock();
        if self.queue.remove(owner, build_id) {
            return Ok(Cancelled::Dequeued);
        }
        let running = switches.contains_key(build_id);
        drop(switches);
        Ok(
            if running && self.runs.signal(build_id, Stop::Cancel(grace)) {
                Cancelled::Signalled
            } else {
                Cancelled::NotRunning
            },
        )
    }

    async fn finish(&self, claim: Claim) -> Result<()> {
        let Claim {
            entry,
            stop,
            workspace,
        } = claim;
        self.runs.remove(&entry.build_id);
        drop(stop);
        drop(workspace);
        self.queue.finished(&entry);
        Ok(())
    }

    async fn workspace_busy(&self, workspace_id: &str) -> Result<bool> {
        Ok(self.queue.workspace_busy(workspace_id))
    }

    async fn hold_workspace(&self, workspace_id: &str) -> Result<WorkspaceHold> {
        let guard = self.workspace_lock(workspace_id).lock_owned().await;
        Ok(self.hold(workspace_id, guard))
    }

    fn forget_workspace(&self, workspace_id: &str) {
        lock(&self.workspace_locks).remove(workspace_id);
    }

    /// The RUNNING builds without a runner here: the data directory's lock says no other
    /// process runs them. At start that is all of them; later, only one whose runner
    /// could not store its end.
    async fn abandoned(&self, store: &Store) -> Result<Vec<BuildRow>> {
        let rows = store
            .builds_in_state(crate::model::BuildState::Running)
            .await?;
        Ok(rows
            .into_iter()
            .filter(|row| !self.runs.contains(&row.build.id))
            .collect())
    }

    /// Nothing to reclaim while running: no other process shares this queue.
    fn reclaim_interval(&self) -> Option<Duration> {
        None
    }

    fn close(&self) {
        self.queue.close();
    }

    fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    fn interrupt_all(&self) {
        self.runs.interrupt_all();
    }

    async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        self.runs.wait_idle(deadline).await
    }
}
