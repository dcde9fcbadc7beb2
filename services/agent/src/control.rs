//! Task control: the one owner of "which process runs this task", how a cancel reaches
//! the runner wherever it is, and which unfinished tasks nobody runs.
//!
//! The workflow is a persisted state machine ([`crate::workflow`]): any process that
//! holds a task's claim can run it from its last stored step. What must be decided in
//! one place is who holds the claim:
//! - [`LocalControl`]: in this process's memory, for one process owning its database
//!   (SQLite, `kiln up`): the data directory's lock guarantees no other process runs its
//!   tasks, so at start every unfinished task is this process's to continue.
//! - [`PgControl`]: shared by every agent replica on one Postgres database: claims with
//!   leases renewed by their holder, claims of unowned tasks with
//!   `FOR UPDATE SKIP LOCKED`, persisted cancel requests announced with `NOTIFY`. Used
//!   whenever the agent store is on Postgres.
//!
//! Both pass the contract tests of `control/contract_tests.rs`.

mod local;
mod postgres;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub use local::LocalControl;
pub use postgres::PgControl;
use tokio::sync::{Notify, watch};

use crate::error::Result;

/// What reaches a task's runner from outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Nothing: go on.
    Run,
    /// CancelTask: end the task CANCELLED.
    Cancel,
    /// This process no longer holds the task (its lease ran out and another replica may
    /// have taken it over): stop at once, writing nothing more.
    Lost,
}

/// A task this process may run until it [`TaskControl::release`]s it, and the switch
/// through which a cancel (or the loss of the claim) reaches its runner.
#[derive(Debug)]
pub struct Claim {
    pub task_id: String,
    pub signal: watch::Receiver<Signal>,
}

/// The switches of the tasks this process runs, by task id.
#[derive(Debug, Default)]
struct Runs(Mutex<HashMap<String, watch::Sender<Signal>>>);

impl Runs {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<Signal>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new switch for a claimed task (already cancelled when `cancelled`).
    fn start(&self, task_id: &str, cancelled: bool) -> Claim {
        let first = if cancelled {
            Signal::Cancel
        } else {
            Signal::Run
        };
        let (tx, rx) = watch::channel(first);
        self.lock().insert(task_id.to_owned(), tx);
        Claim {
            task_id: task_id.to_owned(),
            signal: rx,
        }
    }

    /// Tells a runner; false when the task does not run here. A task that lost its
    /// claim stays lost; a cancel is not repeated.
    fn signal(&self, task_id: &str, signal: Signal) -> bool {
        let runs = self.lock();
        let Some(tx) = runs.get(task_id) else {
            return false;
        };
        tx.send_if_modified(|current| {
            let replace = *current != signal && *current != Signal::Lost;
            if replace {
                *current = signal;
            }
            replace
        });
        true
    }

    fn remove(&self, task_id: &str) {
        self.lock().remove(task_id);
    }

    fn contains(&self, task_id: &str) -> bool {
        self.lock().contains_key(task_id)
    }

    fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The one owner of task claims. See the module documentation.
#[tonic::async_trait]
pub trait TaskControl: fmt::Debug + Send + Sync {
    /// This process's id among the replicas that share the tasks; `None` when it runs
    /// them alone (in memory).
    fn replica_id(&self) -> Option<&str>;

    /// Notified when unowned tasks may have appeared (a task released, one left
    /// unclaimed by a busy replica, a cancel of an unowned task): then
    /// [`Self::claim_unowned`] is worth asking.
    fn wake(&self) -> &Notify;

    /// Claims a task this process just stored (StartTask). `None` when it runs its
    /// most tasks already (the task stays QUEUED for whichever replica has room first)
    /// or another replica claimed it meanwhile.
    async fn claim_new(&self, task_id: &str) -> Result<Option<Claim>>;

    /// Of `unfinished` (the store's unfinished tasks, oldest first), claims those that
    /// no live process holds, oldest first, as many as this process has room for, plus
    /// every cancelled one (it only has to end). Each is claimed by one process only.
    async fn claim_unowned(&self, unfinished: &[String]) -> Result<Vec<Claim>>;

    /// Asks the task to stop wherever it runs, or whoever claims it next. False when
    /// the request cannot reach a runner (in memory: the task does not run here).
    async fn cancel(&self, task_id: &str) -> Result<bool>;

    /// The runner let go of a claimed task: `finished` (its end is stored) forgets it;
    /// otherwise (shutdown) any replica may claim it at once.
    async fn release(&self, task_id: &str, finished: bool) -> Result<()>;

    /// How often to look for unowned tasks while serving (besides [`Self::wake`]):
    /// where other processes run tasks of the same store and may die.
    fn reclaim_interval(&self) -> Option<Duration>;
}

#[cfg(test)]
mod contract_tests;
