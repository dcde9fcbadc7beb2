//! [`LocalControl`]: task claims in this process's memory, for one process owning its
//! database (SQLite, `kiln up`).

use std::time::Duration;

use tokio::sync::Notify;

use super::{Claim, Runs, Signal, TaskControl};
use crate::error::Result;

#[derive(Debug, Default)]
pub struct LocalControl {
    runs: Runs,
    wake: Notify,
}

impl LocalControl {
    pub fn new() -> Self {
        Self::default()
    }
}

#[tonic::async_trait]
impl TaskControl for LocalControl {
    fn replica_id(&self) -> Option<&str> {
        None
    }

    fn wake(&self) -> &Notify {
        &self.wake
    }

    /// Always: a task waits for a running slot in its runner (QUEUED), and no other
    /// process could run it sooner.
    async fn claim_new(&self, task_id: &str) -> Result<Option<Claim>> {
        if self.runs.contains(task_id) {
            return Ok(None);
        }
        Ok(Some(self.runs.start(task_id, false)))
    }

    /// Every unfinished task not running here: the data directory's lock says no other
    /// process runs it. At start that is all of them.
    async fn claim_unowned(&self, unfinished: &[String]) -> Result<Vec<Claim>> {
        Ok(unfinished
            .iter()
            .filter(|id| !self.runs.contains(id))
            .map(|id| self.runs.start(id, false))
            .collect())
    }

    async fn cancel(&self, task_id: &str) -> Result<bool> {
        Ok(self.runs.signal(task_id, Signal::Cancel))
    }

    async fn release(&self, task_id: &str, _finished: bool) -> Result<()> {
        self.runs.remove(task_id);
        Ok(())
    }

    /// Nothing to reclaim while running: no other process runs these tasks.
    fn reclaim_interval(&self) -> Option<Duration> {
        None
    }
}
