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
//! - A Postgres implementation for several replicas on one database (claims with
//!   `FOR UPDATE SKIP LOCKED`, leases, persisted cancel requests) is the next step of
//!   issue 14; the contract tests at the end of this file are written against the trait
//!   so that it must pass the same ones.

mod local;

use std::fmt;
use std::time::Duration;

pub(crate) use local::LocalControl;
use tokio::sync::watch;

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
    owner: String,
    give_back: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Reservation {
    fn new(owner: &str, give_back: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self {
            owner: owner.to_owned(),
            give_back: Some(Box::new(give_back)),
        }
    }

    /// The slot became a queued build: nothing to give back.
    fn used(mut self) -> String {
        self.give_back = None;
        std::mem::take(&mut self.owner)
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

/// The per-user queue limit is reached: `queued` builds are queued already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueFull {
    pub queued: usize,
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

/// The one owner of build control state. See the module documentation.
#[tonic::async_trait]
pub(crate) trait BuildControl: fmt::Debug + Send + Sync {
    /// The limits the queue enforces.
    fn config(&self) -> QueueConfig;

    /// Notified whenever a build may have become claimable (queued, finished, a
    /// workspace released, closed). The scheduler waits on it between claims.
    fn wake(&self) -> &tokio::sync::Notify;

    /// A queue slot for a new build of `owner`, or how many it has queued already.
    async fn reserve(&self, owner: &str) -> std::result::Result<Reservation, QueueFull>;

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

    /// Holds the workspace for an API change, waiting for the one in flight. Does not
    /// check [`Self::workspace_busy`]: a caller that must not wait for a build checks
    /// before and after.
    async fn hold_workspace(&self, workspace_id: &str) -> Result<WorkspaceHold>;

    /// The workspace was deleted: drop what is kept about it.
    fn forget_workspace(&self, workspace_id: &str);

    /// At start: the RUNNING builds whose runner is gone (the caller ends them
    /// INTERRUPTED with their logs). Builds queued in `store` are then claimable once
    /// [`Self::enqueue`]d (a no-op where the queue is the database).
    async fn abandoned(&self, store: &Store) -> Result<Vec<BuildRow>>;

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
