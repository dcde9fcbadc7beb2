//! Build control: the one owner of which builds are queued and running, who may start
//! next, which workspaces a build holds, and how a cancel reaches a running build.
//!
//! Handlers, the scheduler, the runners, recovery and the cleanup ask a [`BuildControl`]
//! and nothing else: before it, "where is this build" was answered by the queue, a map
//! of stop switches in `Shared` and a map of workspace locks, each with its own lock, and
//! keeping them in step was every caller's job.
//!
//! Implementations:
//! - [`LocalControl`]: everything in this process's memory (the fair queue of
//!   [`crate::queue`], the runners' stop switches, the workspace locks). Right for one
//!   process owning its database (SQLite, `kiln up`): the data directory's lock
//!   guarantees no other process runs its builds, so at start every RUNNING build is
//!   abandoned and every QUEUED one is this process's to run.
//! - [`PgControl`]: shared by every replica on one Postgres database (claims with
//!   `FOR UPDATE SKIP LOCKED`, leases, persisted cancel requests), used whenever the build
//!   store is on Postgres. Both pass the contract tests of `control/contract_tests.rs`.

mod local;
mod postgres;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub(crate) use local::LocalControl;
pub(crate) use postgres::PgControl;
use tokio::sync::{Notify, watch};

use crate::config::QueueConfig;
use crate::error::Result;
use crate::queue::Entry;
use crate::runner::Stop;
use crate::store::{BuildRow, Store};

/// A build handed to a runner: the build, the switch through which a cancel or a
/// shutdown reaches it, and its workspace, held until [`BuildControl::finish`].
pub(crate) struct Claim {
    pub entry: Entry,
    pub stop: watch::Receiver<Stop>,
    workspace: WorkspaceHold,
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("build_id", &self.entry.build_id)
            .field("workspace", &self.workspace)
            .finish()
    }
}

/// A workspace held for a build or for an API change (upload, file edit, delete): the
/// two never overlap. Released when dropped.
pub(crate) struct WorkspaceHold {
    workspace_id: String,
    _held: Box<dyn std::any::Any + Send + Sync>,
}

impl WorkspaceHold {
    fn new(workspace_id: &str, held: impl Send + Sync + 'static) -> Self {
        Self {
            workspace_id: workspace_id.to_owned(),
            _held: Box::new(held),
        }
    }
}

impl fmt::Debug for WorkspaceHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkspaceHold({})", self.workspace_id)
    }
}

/// A queue slot promised to a StartBuild call between its limit check and its insert.
/// Dropped unused (the insert failed), the slot is given back.
pub(crate) struct Reservation {
    /// Names the promise where it is stored (Postgres); unique.
    id: String,
    owner: String,
    give_back: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Reservation {
    fn new(id: String, owner: &str, give_back: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self {
            id,
            owner: owner.to_owned(),
            give_back: Some(Box::new(give_back)),
        }
    }

    /// The slot became a queued build: nothing to give back. Returns the id.
    fn used(mut self) -> String {
        self.give_back = None;
        std::mem::take(&mut self.id)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(give_back) = self.give_back.take() {
            give_back();
        }
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reservation({})", self.owner)
    }
}

/// The answer when a user's queued builds (and promised slots) reach the limit.
fn queue_full(queued: usize, limit: usize) -> crate::error::BuildError {
    crate::error::BuildError::QueueFull {
        message: format!(
            "you have {queued} builds queued, the most allowed is {limit}; wait for some to start"
        ),
        retry_after: Duration::from_secs(10),
    }
}

/// What [`BuildControl::cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cancelled {
    /// The build was still queued and was taken out: the caller ends it.
    Dequeued,
    /// Its runner was told to stop the step (SIGTERM, SIGKILL after the grace).
    Signalled,
    /// Neither queued nor running (it is ending, or ended).
    NotRunning,
}

/// The stop switches of the builds this process runs, by build id: how a cancel or a
/// shutdown reaches a runner, whichever implementation decided it.
#[derive(Debug, Default)]
struct Runs {
    switches: Mutex<HashMap<String, watch::Sender<Stop>>>,
    changed: Notify,
}

impl Runs {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<Stop>>> {
        self.switches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new switch for a build handed to a runner.
    fn start(
        switches: &mut HashMap<String, watch::Sender<Stop>>,
        build_id: &str,
    ) -> watch::Receiver<Stop> {
        let (tx, rx) = watch::channel(Stop::No);
        switches.insert(build_id.to_owned(), tx);
        rx
    }

    fn remove(&self, build_id: &str) {
        self.lock().remove(build_id);
        self.changed.notify_waiters();
    }

    /// Asks a running build to stop; false when it does not run here. A build asked to
    /// stop already keeps its first request (a cancel's grace is not shortened), except
    /// that an interrupt (shutdown, a lost lease) overrides a cancel.
    fn signal(&self, build_id: &str, stop: Stop) -> bool {
        let switches = self.lock();
        let Some(tx) = switches.get(build_id) else {
            return false;
        };
        tx.send_if_modified(|current| {
            let replace =
                *current == Stop::No || (stop == Stop::Interrupt && *current != Stop::Interrupt);
            if replace {
                *current = stop;
            }
            replace
        });
        true
    }

    fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn contains(&self, build_id: &str) -> bool {
        self.lock().contains_key(build_id)
    }

    fn interrupt_all(&self) {
        for id in self.ids() {
            self.signal(&id, Stop::Interrupt);
        }
    }

    async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.len() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.len() == 0;
            }
        }
    }
}

/// The one owner of build control state. See the module documentation.
#[tonic::async_trait]
pub(crate) trait BuildControl: fmt::Debug + Send + Sync {
    /// The limits the queue enforces.
    fn config(&self) -> QueueConfig;

    /// This process's id among the replicas that share the queue; `None` when it runs
    /// the queue alone (in memory).
    fn replica_id(&self) -> Option<&str>;

    /// Notified whenever a build may have become claimable (queued, finished, a
    /// workspace released, closed). The scheduler waits on it between claims.
    fn wake(&self) -> &Notify;

    /// A queue slot for a new build of `owner`; at the per-user queued limit,
    /// [`crate::error::BuildError::QueueFull`] saying how many it has queued.
    async fn reserve(&self, owner: &str) -> Result<Reservation>;

    /// Makes a stored QUEUED build claimable, using `reservation` if it has one (at
    /// recovery it has none). Returns its position (1: next to start).
    async fn enqueue(&self, entry: Entry, reservation: Option<Reservation>) -> Result<u32>;

    /// Where a queued build stands (an estimate: see [`crate::queue`]).
    async fn position(&self, owner: &str, build_id: &str) -> Option<u32>;

    /// The position a build of `owner` would get if queued now.
    async fn peek_position(&self, owner: &str) -> u32;

    /// The next build to run under the fairness rules and limits, with its workspace
    /// held; `None` when nothing may start now (then wait on [`Self::wake`]). A build
    /// whose workspace an API change holds is skipped and keeps its place.
    async fn claim(&self) -> Result<Option<Claim>>;

    /// Cancels a build wherever it is: out of the queue (the caller then ends it), or a
    /// stop request to its runner, which ends it after `grace`.
    async fn cancel(&self, owner: &str, build_id: &str, grace: Duration) -> Result<Cancelled>;

    /// The runner is done with a claimed build (its final state is stored): frees its
    /// slots and its workspace.
    async fn finish(&self, claim: Claim) -> Result<()>;

    /// Whether a build of the workspace is running now.
    async fn workspace_busy(&self, workspace_id: &str) -> Result<bool>;

    /// Holds the workspace for an API change, waiting for the one in flight; no build
    /// of it starts while it is held. A build running already may make this wait too
    /// (in memory) or not (Postgres), so a caller that must not change a workspace under
    /// a build checks [`Self::workspace_busy`] once it holds it.
    async fn hold_workspace(&self, workspace_id: &str) -> Result<WorkspaceHold>;

    /// The workspace was deleted: drop what is kept about it.
    fn forget_workspace(&self, workspace_id: &str);

    /// The unfinished builds whose runner is gone (the caller ends them INTERRUPTED with
    /// their logs), each returned once. At start, builds queued in `store` are then
    /// claimable once [`Self::enqueue`]d (a no-op for those the queue holds already).
    async fn abandoned(&self, store: &Store) -> Result<Vec<BuildRow>>;

    /// How often to look for [`Self::abandoned`] builds while serving: where other
    /// processes run builds of the same queue and may die.
    fn reclaim_interval(&self) -> Option<Duration>;

    /// Stops handing out builds (shutdown); StartBuild answers UNAVAILABLE.
    fn close(&self);

    fn is_closed(&self) -> bool;

    /// Asks every build this process runs to stop and end INTERRUPTED (shutdown).
    fn interrupt_all(&self);

    /// Waits until this process runs no build, or `deadline`; false on the deadline.
    async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool;
}

#[cfg(test)]
mod contract_tests;
