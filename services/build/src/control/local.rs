//! [`LocalControl`]: build control in this process's memory, for one process owning its
//! database (SQLite, `kiln up`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, OwnedMutexGuard, watch};

use super::{BuildControl, Cancelled, Claim, QueueFull, Reservation, WorkspaceHold};
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
    /// Stop switches of the builds handed to runners, by build id. Held from taking a
    /// build off the queue to registering its switch (in [`Self::claim`]), and by
    /// [`Self::cancel`] around both of its looks: so a build is never in neither place
    /// and a cancel is never lost.
    runs: Mutex<HashMap<String, watch::Sender<Stop>>>,
    runs_changed: Notify,
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
            runs: Mutex::new(HashMap::new()),
            runs_changed: Notify::new(),
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

    fn running(&self) -> usize {
        lock(&self.runs).len()
    }
}

#[tonic::async_trait]
impl BuildControl for LocalControl {
    fn config(&self) -> QueueConfig {
        self.queue.config()
    }

    fn wake(&self) -> &Notify {
        &self.queue.wake
    }

    async fn reserve(&self, owner: &str) -> std::result::Result<Reservation, QueueFull> {
        self.queue
            .reserve(owner)
            .map_err(|queued| QueueFull { queued })?;
        let queue = self.queue.clone();
        let who = owner.to_owned();
        Ok(Reservation::new(owner, move || queue.release(&who)))
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
        let mut runs = lock(&self.runs);
        let Some((entry, guard)) = self.queue.next(|entry| {
            self.workspace_lock(&entry.workspace_id)
                .try_lock_owned()
                .ok()
        }) else {
            return Ok(None);
        };
        let (tx, stop) = watch::channel(Stop::No);
        runs.insert(entry.build_id.clone(), tx);
        drop(runs);
        let workspace = self.hold(&entry.workspace_id, guard);
        Ok(Some(Claim {
            entry,
            stop,
            workspace,
        }))
    }

    async fn cancel(&self, owner: &str, build_id: &str, grace: Duration) -> Result<Cancelled> {
        let runs = lock(&self.runs);
        if self.queue.remove(owner, build_id) {
            return Ok(Cancelled::Dequeued);
        }
        Ok(match runs.get(build_id) {
            Some(tx) => {
                tx.send_replace(Stop::Cancel(grace));
                Cancelled::Signalled
            }
            None => Cancelled::NotRunning,
        })
    }

    async fn finish(&self, claim: Claim) -> Result<()> {
        let Claim {
            entry,
            stop,
            workspace,
        } = claim;
        lock(&self.runs).remove(&entry.build_id);
        self.runs_changed.notify_waiters();
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

    /// Every RUNNING build: the data directory's lock says no other process runs them.
    async fn abandoned(&self, store: &Store) -> Result<Vec<BuildRow>> {
        store
            .builds_in_state(kiln_proto::build::BuildState::Running)
            .await
    }

    fn close(&self) {
        self.queue.close();
    }

    fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    fn interrupt_all(&self) {
        for tx in lock(&self.runs).values() {
            tx.send_replace(Stop::Interrupt);
        }
    }

    async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let changed = self.runs_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.running() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.running() == 0;
            }
        }
    }
}
