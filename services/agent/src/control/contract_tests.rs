//! What every [`TaskControl`] must do, written against the trait and run for each
//! implementation: [`LocalControl`], and [`PgControl`] on a fresh Postgres database
//! (`kiln_testkit`: skipped, saying so, without a server). Then what only a shared
//! control must do: several replicas on one database.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::*;

/// Makes the control under test; `None` when its backing service is not available.
type Make = fn() -> BoxFuture<'static, Option<Arc<dyn TaskControl>>>;

fn local() -> BoxFuture<'static, Option<Arc<dyn TaskControl>>> {
    Box::pin(async { Some(Arc::new(LocalControl::new()) as Arc<dyn TaskControl>) })
}

fn postgres() -> BoxFuture<'static, Option<Arc<dyn TaskControl>>> {
    Box::pin(async {
        let url = fresh_database().await?;
        let control = PgControl::open(&url, Duration::from_secs(10), 8)
            .await
            .expect("task control on Postgres");
        Some(Arc::new(control) as Arc<dyn TaskControl>)
    })
}

async fn fresh_database() -> Option<String> {
    match kiln_testkit::postgres() {
        Ok(server) => Some(server.fresh_database().await.expose()),
        Err(why) => {
            eprintln!("skipped on Postgres: {why}");
            None
        }
    }
}

fn ids(claims: &[Claim]) -> Vec<&str> {
    claims.iter().map(|c| c.task_id.as_str()).collect()
}

fn strings(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

async fn a_new_task_is_claimed_once(make: Make) {
    let Some(control) = make().await else {
        return;
    };
    let claim = control
        .claim_new("t1")
        .await
        .expect("claim")
        .expect("claimed");
    assert_eq!(claim.task_id, "t1");
    assert_eq!(*claim.signal.borrow(), Signal::Run);
    assert!(
        control.claim_new("t1").await.expect("claim").is_none(),
        "claimed twice"
    );
    assert!(
        control
            .claim_unowned(&strings(&["t1"]))
            .await
            .expect("claim")
            .is_empty(),
        "a held task is not unowned"
    );
}

async fn unowned_tasks_are_claimed_once_and_a_released_one_again(make: Make) {
    let Some(control) = make().await else {
        return;
    };
    let unfinished = strings(&["a", "b", "c"]);
    let first = control.claim_unowned(&unfinished).await.expect("claim");
    assert_eq!(ids(&first), ["a", "b", "c"], "oldest first");
    assert!(
        control
            .claim_unowned(&unfinished)
            .await
            .expect("claim")
            .is_empty()
    );
    control.release("b", false).await.expect("release");
    control.release("c", true).await.expect("release");
    let again = control
        .claim_unowned(&strings(&["a", "b"]))
        .await
        .expect("claim");
    assert_eq!(ids(&again), ["b"], "a task let go unfinished is continued");
}

async fn a_cancel_reaches_the_running_task(make: Make) {
    let Some(control) = make().await else {
        return;
    };
    let mut claim = control
        .claim_new("t1")
        .await
        .expect("claim")
        .expect("claimed");
    assert!(control.cancel("t1").await.expect("cancel"));
    tokio::time::timeout(
        Duration::from_secs(2),
        claim.signal.wait_for(|s| *s == Signal::Cancel),
    )
    .await
    .expect("within a second or so")
    .expect("switch open");
    control.release("t1", true).await.expect("release");
}

kiln_testkit::contract!(local:
    a_new_task_is_claimed_once,
    unowned_tasks_are_claimed_once_and_a_released_one_again,
    a_cancel_reaches_the_running_task,
);

kiln_testkit::contract!(postgres:
    a_new_task_is_claimed_once,
    unowned_tasks_are_claimed_once_and_a_released_one_again,
    a_cancel_reaches_the_running_task,
);

/// What only a shared control must do.
mod replicas {
    use super::*;

    async fn replica(url: &str, lease: Duration, max_running: usize) -> PgControl {
        PgControl::open(url, lease, max_running)
            .await
            .expect("replica")
    }

    #[tokio::test]
    async fn a_cancel_sent_to_another_replica_reaches_the_runner_within_a_second() {
        let Some(url) = fresh_database().await else {
            return;
        };
        let a = replica(&url, Duration::from_secs(10), 4).await;
        let b = replica(&url, Duration::from_secs(10), 4).await;
        let mut claim = a.claim_new("t1").await.expect("claim").expect("claimed");
        assert!(b.claim_new("t1").await.expect("claim").is_none());
        let started = std::time::Instant::now();
        assert!(b.cancel("t1").await.expect("cancel"));
        tokio::time::timeout(
            Duration::from_millis(1500),
            claim.signal.wait_for(|s| *s == Signal::Cancel),
        )
        .await
        .expect("the runner on the other replica hears of it")
        .expect("switch open");
        eprintln!(
            "cross-replica cancel reached the runner in {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn each_replica_claims_within_its_room_and_a_cancelled_task_regardless() {
        let Some(url) = fresh_database().await else {
            return;
        };
        let a = replica(&url, Duration::from_secs(10), 1).await;
        let b = replica(&url, Duration::from_secs(10), 1).await;
        let all = strings(&["t1", "t2", "t3"]);
        assert_eq!(ids(&a.claim_unowned(&all).await.expect("claim")), ["t1"]);
        assert!(
            a.claim_new("t4").await.expect("claim").is_none(),
            "a full replica leaves a new task to others"
        );
        assert_eq!(ids(&b.claim_unowned(&all).await.expect("claim")), ["t2"]);
        assert!(b.claim_unowned(&all).await.expect("claim").is_empty());
        b.cancel("t3").await.expect("cancel");
        let cancelled = a.claim_unowned(&all).await.expect("claim");
        assert_eq!(ids(&cancelled), ["t3"], "a cancelled task only has to end");
        assert_eq!(*cancelled[0].signal.borrow(), Signal::Cancel);
    }

    #[tokio::test]
    async fn a_dead_replicas_task_is_taken_over_after_its_lease_and_a_live_ones_never() {
        let Some(url) = fresh_database().await else {
            return;
        };
        let lease = Duration::from_millis(1200);
        let dying = replica(&url, lease, 4).await;
        let living = replica(&url, lease, 4).await;
        let heir = replica(&url, lease, 4).await;
        let _dead = dying
            .claim_new("dead")
            .await
            .expect("claim")
            .expect("claimed");
        let _live = living
            .claim_new("live")
            .await
            .expect("claim")
            .expect("claimed");
        let all = strings(&["dead", "live"]);
        assert!(heir.claim_unowned(&all).await.expect("claim").is_empty());
        // Killed: nothing renews its leases, nothing releases its claims.
        dying.stop_renewing();
        let started = std::time::Instant::now();
        let taken = loop {
            let found = heir.claim_unowned(&all).await.expect("claim");
            if !found.is_empty() {
                break found;
            }
            assert!(
                started.elapsed() < lease * 3,
                "taken over within a lease or so"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(ids(&taken), ["dead"], "only the dead replica's task");
        eprintln!(
            "a dead replica's task was taken over after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(lease).await;
        assert!(
            heir.claim_unowned(&all).await.expect("claim").is_empty(),
            "taken once; the living replica renewed its lease"
        );
    }

    #[tokio::test]
    async fn a_replica_whose_lease_was_taken_tells_its_runner_it_lost_the_task() {
        let Some(url) = fresh_database().await else {
            return;
        };
        let lease = Duration::from_millis(1200);
        let a = replica(&url, lease, 4).await;
        let b = replica(&url, lease, 4).await;
        let mut claim = a.claim_new("t").await.expect("claim").expect("claimed");
        // Its lease lapses while it cannot renew (cut off from the database)...
        a.stop_renewing();
        let all = strings(&["t"]);
        let started = std::time::Instant::now();
        while b.claim_unowned(&all).await.expect("claim").is_empty() {
            assert!(started.elapsed() < lease * 3, "taken over");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // ...and when it renews again, it finds the claim gone.
        a.renew_now().await.expect("renew");
        assert_eq!(*claim.signal.borrow_and_update(), Signal::Lost);
    }
}
