//! What every [`BuildControl`] must do, written against the trait: each case is a
//! function of a way to make controls with given limits, and `contract!` runs them all
//! for each implementation: [`LocalControl`], and [`PgControl`] on a fresh Postgres
//! database (`kiln_testkit`: skipped, saying so, without a server).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::*;
use crate::metrics::BuildMetrics;

/// Makes the control under test; `None` when its backing service is not available.
type Make = fn(QueueConfig) -> BoxFuture<'static, Option<Arc<dyn BuildControl>>>;

fn local(config: QueueConfig) -> BoxFuture<'static, Option<Arc<dyn BuildControl>>> {
    Box::pin(async move {
        Some(Arc::new(LocalControl::new(config, BuildMetrics::default())) as Arc<dyn BuildControl>)
    })
}

fn postgres(config: QueueConfig) -> BoxFuture<'static, Option<Arc<dyn BuildControl>>> {
    Box::pin(async move {
        let url = pg::fresh_database().await?;
        let control = PgControl::open(&url, config, BuildMetrics::default())
            .await
            .expect("build control on Postgres");
        Some(Arc::new(control) as Arc<dyn BuildControl>)
    })
}

/// Retries `f` until it gives `Some`, for up to two seconds: what another replica (or a
/// task) does is seen a moment later.
async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, mut f: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn limits(max_running: usize, per_user: usize, queued_per_user: usize) -> QueueConfig {
    QueueConfig {
        max_running,
        max_running_per_user: per_user,
        max_queued_per_user: queued_per_user,
        lease: Duration::from_secs(10),
    }
}

async fn queue(control: &dyn BuildControl, build: &str, owner: &str, workspace: &str) -> u32 {
    let reservation = control.reserve(owner).await.expect("below the limit");
    control
        .enqueue(
            Entry::new(build.into(), owner.into(), workspace.into()),
            Some(reservation),
        )
        .await
        .expect("queued")
}

async fn claim_id(control: &dyn BuildControl) -> Option<(String, Claim)> {
    let claim = control.claim().await.expect("claim")?;
    Some((claim.entry.build_id.clone(), claim))
}

async fn users_take_turns_within_the_global_and_per_user_limits(make: Make) {
    let Some(control) = make(limits(2, 1, 10)).await else {
        return;
    };
    let c = control.as_ref();
    for b in ["a1", "a2", "a3"] {
        queue(c, b, "alice", b).await;
    }
    queue(c, "b1", "bob", "b1").await;
    assert_eq!(
        c.position("bob", "b1").await,
        Some(2),
        "bob's turn is second"
    );
    let (first, a1) = claim_id(c).await.expect("alice first");
    assert_eq!(first, "a1");
    let (second, b1) = claim_id(c).await.expect("then bob, not alice's second");
    assert_eq!(second, "b1");
    assert!(claim_id(c).await.is_none(), "two running: the global limit");
    c.finish(b1).await.expect("finish");
    assert!(
        claim_id(c).await.is_none(),
        "alice is at her per-user limit of one, bob has nothing queued"
    );
    c.finish(a1).await.expect("finish");
    let (third, _a2) = claim_id(c).await.expect("alice again");
    assert_eq!(third, "a2");
}

fn assert_queue_full(got: Result<Reservation>, says: &str, why: &str) {
    match got {
        Err(crate::error::BuildError::QueueFull { message, .. }) => {
            assert!(message.contains(says), "{why}: {message}");
        }
        other => panic!("{why}: expected QUEUE_FULL, got {other:?}"),
    }
}

async fn the_queued_limit_counts_reservations_and_a_dropped_one_is_given_back(make: Make) {
    let Some(control) = make(limits(4, 4, 2)).await else {
        return;
    };
    let c = control.as_ref();
    let first = c.reserve("alice").await.expect("first slot");
    let second = c.reserve("alice").await.expect("second slot");
    assert_queue_full(
        c.reserve("alice").await,
        "you have 2 builds queued",
        "two promised",
    );
    assert!(c.reserve("bob").await.is_ok(), "the limit is per user");
    drop(second);
    let again = eventually("a dropped reservation is given back", || async {
        c.reserve("alice").await.ok()
    })
    .await;
    c.enqueue(
        Entry::new("a1".into(), "alice".into(), "w".into()),
        Some(first),
    )
    .await
    .expect("queued");
    assert_queue_full(
        c.reserve("alice").await,
        "you have 2 builds queued",
        "one queued and one promised",
    );
    drop(again);
    eventually("and again", || async { c.reserve("alice").await.ok() }).await;
}

async fn a_queued_build_is_cancelled_out_of_the_queue_once(make: Make) {
    let Some(control) = make(limits(1, 1, 10)).await else {
        return;
    };
    let c = control.as_ref();
    queue(c, "a1", "alice", "w").await;
    let grace = Duration::from_secs(3);
    assert_eq!(
        c.cancel("alice", "a1", grace).await.expect("cancel"),
        Cancelled::Dequeued
    );
    assert_eq!(
        c.cancel("alice", "a1", grace).await.expect("cancel"),
        Cancelled::NotRunning,
        "a second cancel finds it gone"
    );
    assert!(c.claim().await.expect("claim").is_none(), "it never runs");
    assert_eq!(c.position("alice", "a1").await, None);
}

async fn a_cancel_reaches_the_running_build_with_its_grace(make: Make) {
    let Some(control) = make(limits(1, 1, 10)).await else {
        return;
    };
    let c = control.as_ref();
    queue(c, "a1", "alice", "w").await;
    let (_, mut claim) = claim_id(c).await.expect("running");
    let grace = Duration::from_millis(1500);
    assert_eq!(
        c.cancel("alice", "a1", grace).await.expect("cancel"),
        Cancelled::Signalled
    );
    tokio::time::timeout(Duration::from_secs(2), claim.stop.changed())
        .await
        .expect("the runner hears of it within a second")
        .expect("switch open");
    assert_eq!(*claim.stop.borrow(), Stop::Cancel(grace));
    c.finish(claim).await.expect("finish");
    assert_eq!(
        c.cancel("alice", "a1", grace).await.expect("cancel"),
        Cancelled::NotRunning
    );
}

async fn a_workspace_runs_one_build_at_a_time_and_is_busy_meanwhile(make: Make) {
    let Some(control) = make(limits(4, 4, 10)).await else {
        return;
    };
    let c = control.as_ref();
    queue(c, "a1", "alice", "shared").await;
    queue(c, "a2", "alice", "shared").await;
    queue(c, "a3", "alice", "other").await;
    let (first, a1) = claim_id(c).await.expect("first");
    assert_eq!(first, "a1");
    assert!(c.workspace_busy("shared").await.expect("busy?"));
    let (second, a3) = claim_id(c).await.expect("the other workspace's build");
    assert_eq!(
        second, "a3",
        "a2 waits for its workspace and keeps its place"
    );
    assert!(claim_id(c).await.is_none());
    c.finish(a1).await.expect("finish");
    assert!(!c.workspace_busy("shared").await.expect("busy?"));
    let (third, _a2) = claim_id(c).await.expect("now a2");
    assert_eq!(third, "a2");
    c.finish(a3).await.expect("finish");
}

async fn a_workspace_held_for_a_change_is_skipped_and_its_release_wakes_the_scheduler(make: Make) {
    let Some(control) = make(limits(4, 4, 10)).await else {
        return;
    };
    let c = control.as_ref();
    let held = c.hold_workspace("w").await.expect("hold");
    queue(c, "a1", "alice", "w").await;
    assert!(
        claim_id(c).await.is_none(),
        "no build starts over a change in flight"
    );
    assert!(
        !c.workspace_busy("w").await.expect("busy?"),
        "a held workspace is not busy with a build: it takes no running slot"
    );
    let woken = c.wake().notified();
    drop(held);
    tokio::time::timeout(Duration::from_secs(1), woken)
        .await
        .expect("the release wakes the scheduler");
    let (id, claim) = eventually("claimable now", || claim_id(c)).await;
    assert_eq!(id, "a1");
    // A change during the build either waits for it (in memory) or gets the hold and
    // finds the workspace busy (Postgres): never both at once without knowing.
    if let Ok(held) = tokio::time::timeout(Duration::from_millis(200), c.hold_workspace("w")).await
    {
        drop(held.expect("hold"));
        assert!(
            c.workspace_busy("w").await.expect("busy?"),
            "a change that holds the workspace while a build runs sees it busy"
        );
    }
    c.finish(claim).await.expect("finish");
    tokio::time::timeout(Duration::from_secs(2), c.hold_workspace("w"))
        .await
        .expect("free after the build")
        .expect("hold");
}

async fn a_closed_control_hands_out_nothing_and_shutdown_interrupts_and_waits(make: Make) {
    let Some(control) = make(limits(4, 4, 10)).await else {
        return;
    };
    let c = control.as_ref();
    queue(c, "a1", "alice", "w1").await;
    queue(c, "a2", "alice", "w2").await;
    let (_, mut claim) = claim_id(c).await.expect("running");
    c.close();
    assert!(c.is_closed());
    assert!(c.claim().await.expect("claim").is_none(), "a2 stays queued");
    c.interrupt_all();
    claim.stop.changed().await.expect("switch open");
    assert_eq!(*claim.stop.borrow(), Stop::Interrupt);
    let soon = tokio::time::Instant::now() + Duration::from_millis(100);
    assert!(!c.wait_idle(soon).await, "a build still runs");
    let control2 = control.clone();
    let finisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        control2.finish(claim).await.expect("finish");
    });
    let later = tokio::time::Instant::now() + Duration::from_secs(5);
    assert!(c.wait_idle(later).await, "idle once the runner finished");
    finisher.await.expect("finisher");
}

/// A database of its own per test, on the test process's Postgres server
/// (`kiln_testkit`); `None`, saying why, without one.
pub(super) mod pg {
    pub async fn fresh_database() -> Option<String> {
        match kiln_testkit::postgres() {
            Ok(server) => Some(server.fresh_database().await.expose()),
            Err(why) => {
                eprintln!("skipped on Postgres: {why}");
                None
            }
        }
    }
}

kiln_testkit::contract!(postgres:
    users_take_turns_within_the_global_and_per_user_limits,
    the_queued_limit_counts_reservations_and_a_dropped_one_is_given_back,
    a_queued_build_is_cancelled_out_of_the_queue_once,
    a_cancel_reaches_the_running_build_with_its_grace,
    a_workspace_runs_one_build_at_a_time_and_is_busy_meanwhile,
    a_workspace_held_for_a_change_is_skipped_and_its_release_wakes_the_scheduler,
    a_closed_control_hands_out_nothing_and_shutdown_interrupts_and_waits,
);

kiln_testkit::contract!(local:
    users_take_turns_within_the_global_and_per_user_limits,
    the_queued_limit_counts_reservations_and_a_dropped_one_is_given_back,
    a_queued_build_is_cancelled_out_of_the_queue_once,
    a_cancel_reaches_the_running_build_with_its_grace,
    a_workspace_runs_one_build_at_a_time_and_is_busy_meanwhile,
    a_workspace_held_for_a_change_is_skipped_and_its_release_wakes_the_scheduler,
    a_closed_control_hands_out_nothing_and_shutdown_interrupts_and_waits,
);
