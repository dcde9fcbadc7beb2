//! What happens outside requests: recovery at start and the retention cleanup.

use std::sync::Arc;
use std::time::Duration;

use crate::Shared;
use crate::error::Result;
use crate::log::{AppendEvents, LiveLog};
use crate::model::BuildState;
use crate::queue::Entry;
use crate::store::{duration_micros, now_micros};

/// The message of builds found RUNNING at start.
pub const INTERRUPTED_MESSAGE: &str =
    "the service stopped while this build was running (crash or kill); its log up to then is kept";

/// Ends the builds whose runner is gone (INTERRUPTED, with a Finished event after their
/// last stored one: see [`crate::control::BuildControl::abandoned`]) and makes the queued
/// ones claimable again, oldest first.
pub async fn recover(shared: &Arc<Shared>) -> Result<()> {
    end_abandoned(shared).await?;
    sweep_orphaned_workspaces(shared).await?;
    for row in shared.store.builds_in_state(BuildState::Queued).await? {
        let b = row.build;
        // As at StartBuild: a live log only where the build will run for sure.
        if shared.control.replica_id().is_none() {
            shared.logs.insert(LiveLog::new(
                &b.id,
                b.last_sequence,
                Vec::new(),
                shared.config.live_window_bytes,
            ));
        }
        // Queued by a call of an earlier process: its trace is not known, so its wait
        // and run are a trace of their own.
        shared
            .control
            .enqueue(Entry::new(b.id, b.owner, b.workspace_id), None)
            .await?;
    }
    Ok(())
}

/// Looks for abandoned builds every `every` while serving: where several replicas share
/// the queue, one that died leaves its builds to the others.
pub async fn reclaim_loop(shared: Arc<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = end_abandoned(&shared).await {
            tracing::error!(error = %e, "reclaiming abandoned builds failed");
        }
    }
}

/// Ends every abandoned build INTERRUPTED, with a Finished event after its last stored
/// one.
async fn end_abandoned(shared: &Arc<Shared>) -> Result<()> {
    for row in shared.control.abandoned(&shared.store).await? {
        let b = row.build;
        let log = LiveLog::new(
            &b.id,
            b.last_sequence,
            b.step_results,
            shared.config.live_window_bytes,
        );
        log.append_finished(&shared.store, BuildState::Interrupted, INTERRUPTED_MESSAGE)
            .await?;
        tracing::warn!(build = %b.id, "build was running when its runner stopped (crash, kill or lost lease): INTERRUPTED");
    }
    Ok(())
}

/// How long a directory without a record must be untouched before it counts as left
/// behind, where other replicas may be creating workspaces right now.
pub const STALE_AFTER: Duration = Duration::from_secs(3600);

/// Removes workspace directories that have no row: a crash between deleting a row and
/// its directory, or between creating a directory and its row, leaves one behind. With
/// replicas, another one may be between those two steps: only directories untouched
/// for [`STALE_AFTER`] go.
async fn sweep_orphaned_workspaces(shared: &Arc<Shared>) -> Result<()> {
    let disk = shared.disk.clone();
    let on_disk = tokio::task::spawn_blocking(move || disk.workspace_ids())
        .await
        .map_err(|e| crate::error::BuildError::Config(format!("sweep task: {e}")))??;
    for id in on_disk {
        if shared.store.get_workspace(&id).await?.is_some() {
            continue;
        }
        if shared.control.replica_id().is_some()
            && !crate::workspace::untouched_for(&shared.disk.dir(&id), STALE_AFTER)
        {
            continue;
        }
        let disk = shared.disk.clone();
        let dir_id = id.clone();
        tokio::task::spawn_blocking(move || disk.remove(&dir_id))
            .await
            .map_err(|e| crate::error::BuildError::Config(format!("sweep task: {e}")))??;
        tracing::warn!(workspace = %id, "removed a workspace directory without a record");
    }
    Ok(())
}

/// Runs the cleanup at start and then every `cleanup_interval`.
pub async fn cleanup_loop(shared: Arc<Shared>) {
    loop {
        if let Err(e) = cleanup(&shared).await {
            tracing::error!(error = %e, "retention cleanup failed");
        }
        tokio::time::sleep(shared.config.retention.cleanup_interval).await;
    }
}

/// Deletes finished builds past retention and idle workspaces (never one with a build
/// queued or running).
pub async fn cleanup(shared: &Arc<Shared>) -> Result<()> {
    let retention = shared.config.retention;
    let now = now_micros();
    let old_builds = now.saturating_sub(duration_micros(retention.finished_builds));
    loop {
        let n = shared.store.delete_finished_builds(old_builds, 500).await?;
        if n < 500 {
            break;
        }
    }
    let idle_before = now.saturating_sub(duration_micros(retention.idle_workspaces));
    for id in shared.store.idle_workspaces(idle_before, 1000).await? {
        if shared.control.workspace_busy(&id).await? {
            continue;
        }
        let Ok(_held) =
            tokio::time::timeout(Duration::from_secs(1), shared.control.hold_workspace(&id)).await
        else {
            continue;
        };
        // The row goes first, so the API answers NOT_FOUND before the files vanish; a
        // directory left by a crash in between is swept at the next start. A build
        // started since the check above keeps the workspace.
        if !shared.store.delete_workspace(&id).await? {
            continue;
        }
        let disk = shared.disk.clone();
        let dir_id = id.clone();
        tokio::task::spawn_blocking(move || disk.remove(&dir_id))
            .await
            .map_err(|e| crate::error::BuildError::Config(format!("cleanup task: {e}")))??;
        shared.control.forget_workspace(&id);
        tracing::info!(workspace = %id, "idle workspace deleted by retention");
    }
    Ok(())
}
