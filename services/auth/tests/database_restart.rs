//! PostgreSQL restarted under load: while it is down, calls fail cleanly with
//! UNAVAILABLE (retry later), not INTERNAL; once it is back they succeed again, without
//! restarting kiln-auth (the pool drops the dead connections and opens new ones).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use tokio::sync::Mutex;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_unavailable_while_postgres_is_down_and_recover_after() {
    // A cluster of its own: stopping the shared one would fail other tests.
    let cluster = match tokio::task::spawn_blocking(kiln_testkit::Cluster::start)
        .await
        .expect("start task")
    {
        Ok(cluster) => Arc::new(cluster),
        Err(why) => {
            eprintln!("skipped on Postgres: {why}");
            return;
        }
    };
    let url = kiln_testkit::create_database(&cluster.admin_url()).await;
    let h = Arc::new(harness_with(|c| c.database_url = Some(url)).await);
    h.login("admin", ADMIN_PASSWORD).await.expect("up");

    // The load: logins one after the other, every answer noted.
    let answers: Arc<Mutex<Vec<Result<(), Code>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (h, answers, stop) = (h.clone(), answers.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                let answer = h
                    .login("admin", ADMIN_PASSWORD)
                    .await
                    .map(|_| ())
                    .map_err(|s| s.code());
                answers.lock().await.push(answer);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let seen = async |want: fn(&Result<(), Code>) -> bool, from: usize| {
        for _ in 0..600 {
            if answers.lock().await[from..].iter().any(want) {
                return answers.lock().await.len();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("never seen; answers: {:?}", answers.lock().await);
    };
    seen(|a| a.is_ok(), 0).await;

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop())
        .await
        .expect("stop");
    let at_stop = answers.lock().await.len();
    let down = seen(|a| *a == Err(Code::Unavailable), at_stop).await;

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.start_again())
        .await
        .expect("start task")
        .expect("postgres starts again");
    seen(|a| a.is_ok(), down).await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load");

    let answers = answers.lock().await;
    let unexpected: Vec<_> = answers
        .iter()
        .filter(|a| !matches!(a, Ok(()) | Err(Code::Unavailable)))
        .collect();
    assert!(
        unexpected.is_empty(),
        "only successes and UNAVAILABLE, got {unexpected:?}"
    );
}
