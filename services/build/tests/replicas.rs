//! Three kiln-build replicas on one Postgres database and one data directory (as pods
//! on a shared volume): each build runs exactly once, users take turns across replicas,
//! a watcher on any replica follows a build running on any other, and a cancel sent to
//! any replica stops the build wherever it runs. Skipped, saying why, without Postgres.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use kiln_proto::build as pb;
use pb::build_event::Event;

const REPLICAS: usize = 3;

struct Replicas {
    servers: Vec<(
        String,
        String,
        kiln_build::BuildApi,
        tokio::sync::oneshot::Sender<()>,
    )>,
    _dir: tempfile::TempDir,
}

impl Replicas {
    async fn client(&self, replica: usize, token: &str) -> Client {
        let (endpoint, ca, _, _) = &self.servers[replica % self.servers.len()];
        client(endpoint, ca, token).await
    }
}

async fn replicas(f: impl Fn(&mut kiln_build::BuildConfig) + Clone) -> Option<Replicas> {
    let server = match kiln_testkit::postgres() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("skipped: no Postgres: {why}");
            return None;
        }
    };
    let url = server.fresh_database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = Vec::new();
    for _ in 0..REPLICAS {
        let (url, f) = (url.clone(), f.clone());
        servers.push(
            serve(dir.path(), move |c| {
                c.database_url = Some(url);
                f(c);
            })
            .await,
        );
    }
    Some(Replicas { servers, _dir: dir })
}

fn python(code: &str) -> pb::Step {
    step(&["python3", "-c", code])
}

fn started_at(b: &pb::Build) -> (i64, i32) {
    let t = b.started_at.expect("started");
    (t.seconds, t.nanos)
}

#[tokio::test]
async fn sixty_builds_from_four_users_run_once_each_fairly_and_are_watched_from_any_replica() {
    let Some(rs) = replicas(|c| {
        c.queue.max_running = 2;
        c.queue.max_running_per_user = 1;
        c.queue.max_queued_per_user = 20;
    })
    .await
    else {
        return;
    };
    let users = ["ann", "bob", "cid", "dee"];
    let mut workspaces = HashMap::new();
    for user in users {
        let mut c = rs.client(0, &format!("{user}-user")).await;
        let ws = workspace(&mut c, vec![file("id.txt", user)]).await;
        workspaces.insert(user, ws.id);
    }
    // Started round robin over the replicas, each user's builds in a burst.
    let mut ids: Vec<(String, &str)> = Vec::new();
    for (i, user) in users.iter().cycle().take(60).enumerate() {
        let mut c = rs.client(i, &format!("{user}-user")).await;
        let req = build_req(
            &workspaces[user],
            vec![python(&format!(
                "import time; print('build {i} of {user}', flush=True); time.sleep(0.05)"
            ))],
        );
        let b = c.start_build(req).await.expect("start").into_inner();
        ids.push((b.id, user));
    }
    let started = std::time::Instant::now();
    // Each build watched from the start through a replica other than the one that took
    // StartBuild; whichever replica runs it, most of these watches cross replicas.
    let mut watches = Vec::new();
    for (i, (id, user)) in ids.iter().enumerate() {
        let mut c = rs.client(i + 1, &format!("{user}-user")).await;
        let id = id.clone();
        watches.push(tokio::spawn(async move {
            (id.clone(), watch(&mut c, &id, 0).await)
        }));
    }
    let mut outputs = HashSet::new();
    for w in watches {
        let (id, log) = w.await.expect("watch task");
        log.assert_dense_from(1);
        assert_eq!(
            log.state(),
            pb::BuildState::Succeeded,
            "{id}: {:?}",
            log.finished()
        );
        let runs = log
            .events
            .iter()
            .filter(|e| matches!(e.event, Some(Event::Started(_))))
            .count();
        assert_eq!(runs, 1, "{id} ran exactly once");
        outputs.insert(String::from_utf8(log.stdout(0)).expect("utf-8"));
    }
    assert_eq!(outputs.len(), 60, "every build's own output, once");
    eprintln!(
        "60 builds on {REPLICAS} replicas in {:?}",
        started.elapsed()
    );
    // Turns: with one build per user at a time, the first four starts are four users.
    let mut c = rs.client(2, "vera-viewer").await;
    let mut builds = Vec::new();
    for (id, _) in &ids {
        let b = c
            .get_build(pb::GetBuildRequest {
                build_id: id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        builds.push(b);
    }
    builds.sort_by_key(started_at);
    let first: HashSet<&str> = builds[..4].iter().map(|b| b.owner.as_str()).collect();
    assert_eq!(first.len(), 4, "users take turns across replicas");
    // And nobody ever had two running at once: each user's runs do not overlap.
    for user in users {
        let mut mine: Vec<&pb::Build> = builds.iter().filter(|b| b.owner == user).collect();
        mine.sort_by_key(|b| started_at(b));
        for pair in mine.windows(2) {
            let end = pair[0].finished_at.expect("finished");
            let next = pair[1].started_at.expect("started");
            assert!(
                (end.seconds, end.nanos) <= (next.seconds, next.nanos),
                "{user}'s builds overlap: the per-user limit is global"
            );
        }
    }
}

#[tokio::test]
async fn a_cancel_sent_to_any_replica_stops_the_build_wherever_it_runs() {
    let Some(rs) = replicas(|_| {}).await else {
        return;
    };
    let mut c0 = rs.client(0, "alice-user").await;
    for via in 0..REPLICAS {
        let ws = workspace(&mut c0, vec![file("x", "x")]).await;
        let req = build_req(
            &ws.id,
            vec![python(
                "import time; print('up', flush=True); time.sleep(60)",
            )],
        );
        let b = c0.start_build(req).await.expect("start").into_inner();
        // Running somewhere: wait for its first output, watching through another replica.
        let mut watcher = rs.client(via + 1, "alice-user").await;
        let mut stream = watcher
            .watch_build(pb::WatchBuildRequest {
                build_id: b.id.clone(),
                after_sequence: 0,
            })
            .await
            .expect("watch")
            .into_inner();
        loop {
            let e = stream.message().await.expect("stream").expect("not ended");
            if matches!(e.event, Some(Event::Output(_))) {
                break;
            }
        }
        let mut canceller = rs.client(via, "alice-user").await;
        let asked = std::time::Instant::now();
        canceller
            .cancel_build(pb::CancelBuildRequest {
                build_id: b.id.clone(),
                grace_period: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 200_000_000,
                }),
            })
            .await
            .expect("cancel");
        let rest = tokio::time::timeout(Duration::from_secs(10), collect(stream))
            .await
            .expect("the build ends");
        assert_eq!(rest.state(), pb::BuildState::Cancelled);
        eprintln!(
            "cancel through replica {via}: ended after {:?}",
            asked.elapsed()
        );
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "within a second plus the grace"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_under_load_fails_calls_cleanly_and_kiln_recovers_by_itself() {
    let cluster = match kiln_testkit::Cluster::start() {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipped: no Postgres: {why}");
            return;
        }
    };
    let url: kiln_testkit::DatabaseUrl = cluster.admin_url().parse().expect("url");
    let dir = tempfile::tempdir().expect("tempdir");
    let (endpoint, ca, _api, _stop) = serve(dir.path(), move |c| c.database_url = Some(url)).await;
    let mut c = client(&endpoint, &ca, "alice-user").await;
    let ws = workspace(&mut c, vec![file("x", "x")]).await;
    let log = run(&mut c, build_req(&ws.id, vec![step(&["echo", "before"])])).await;
    assert_eq!(log.state(), pb::BuildState::Succeeded);

    // Load: reads and starts, back to back, through the outage.
    let mut load = c.clone();
    let load_ws = ws.id.clone();
    let stop_load = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop_load.clone();
    let loader = tokio::spawn(async move {
        let mut codes = HashMap::new();
        while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
            let listed = load
                .list_builds(pb::ListBuildsRequest::default())
                .await
                .map(drop);
            let started = load
                .start_build(build_req(&load_ws, vec![step(&["true"])]))
                .await
                .map(drop);
            for r in [listed, started] {
                *codes.entry(r.err().map(|s| s.code())).or_insert(0u32) += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        codes
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.stop();
    let refused = c
        .start_build(build_req(&ws.id, vec![step(&["echo", "during"])]))
        .await
        .expect_err("no database");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_again().expect("Postgres back");
    let back = std::time::Instant::now();
    // Without restarting kiln: calls succeed again, and a new build runs.
    let log = loop {
        match c
            .run_build(build_req(&ws.id, vec![step(&["echo", "after"])]))
            .await
        {
            Ok(stream) => break collect(stream.into_inner()).await,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                assert!(back.elapsed() < Duration::from_secs(30), "recovers: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(log.state(), pb::BuildState::Succeeded);
    assert_eq!(log.stdout(0), b"after\n");
    eprintln!(
        "kiln-build served again {:?} after Postgres came back",
        back.elapsed()
    );
    stop_load.store(true, std::sync::atomic::Ordering::Relaxed);
    let codes = loader.await.expect("loader");
    eprintln!("calls under load, by outcome: {codes:?}");
    for code in codes.keys().flatten() {
        assert!(
            matches!(
                code,
                tonic::Code::Unavailable | tonic::Code::ResourceExhausted
            ),
            "a lost database is UNAVAILABLE (or the queue was full), never {code:?}: {codes:?}"
        );
    }
}
