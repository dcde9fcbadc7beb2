//! Several kiln-agent replicas on one Postgres database (issue 14): each task runs
//! exactly once whichever replica accepted it, a cancel sent to any replica stops it
//! wherever it runs, a replica that dies mid-task has its task continued by another
//! within a lease, and a watcher on one replica follows a task another runs. Postgres
//! only (skipped, saying so, without a server): on SQLite one process owns the tasks.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kiln_agent::{AgentApi, AgentConfig};
use kiln_proto::agent as pb;
use kiln_proto::agent::agent_service_server::AgentService;
use kiln_rpc::identity::Role;
use pb::Phase;
use pb::task_event::Event;

/// Replicas share the model server, kiln-build and the database; each has its own data
/// directory (as pods of a Deployment do).
struct Cluster {
    llm: FakeProvider,
    build: FakeBuild,
    delegator: Arc<FakeDelegator>,
    database: kiln_store::DatabaseUrl,
    dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    async fn start() -> Self {
        let llm = FakeProvider::start().await;
        llm.always(
            "/v1/models",
            Reply::json(200, &serde_json::json!({"data": [{"id": MODEL}]})),
        );
        let server = kiln_testkit::postgres().expect("a Postgres server");
        Self {
            llm,
            build: FakeBuild::new(),
            delegator: Arc::new(FakeDelegator::default()),
            database: server.fresh_database().await,
            dirs: Vec::new(),
        }
    }

    /// Every model call answers with working files: the plan call reads them as prose.
    fn answer_always_good(&self) {
        let files = text_files(&[("calc.py", GOOD_CALC), ("test_calc.py", TEST_CALC)]);
        self.llm.always(
            "/v1/chat/completions",
            Reply::openai_stream(&[&files], "stop", Some((100, 50))),
        );
    }

    fn config(&mut self, lease: Duration) -> AgentConfig {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = AgentConfig::new(dir.path().join("agent"));
        self.dirs.push(dir);
        config.database_url = Some(self.database.clone());
        config.provider = fake_llm::fast_config(kiln_llm::ProviderKind::Openai, &self.llm.url());
        config.heartbeat = Duration::from_millis(500);
        config.tasks.lease = lease;
        config
    }

    async fn replica(&mut self, lease: Duration) -> AgentApi {
        let config = self.config(lease);
        AgentApi::open(config, Arc::new(self.build.clone()), self.delegator.clone())
            .await
            .expect("replica")
    }
}

async fn start(api: &AgentApi, user: &str, prompt: &str) -> pb::Task {
    api.start_task(request(user, Role::User, python_task(prompt)))
        .await
        .expect("StartTask")
        .into_inner()
}

async fn get(api: &AgentApi, user: &str, id: &str) -> pb::Task {
    api.get_task(request(
        user,
        Role::User,
        pb::GetTaskRequest {
            task_id: id.to_owned(),
        },
    ))
    .await
    .expect("GetTask")
    .into_inner()
}

async fn watch_all(api: &AgentApi, user: &str, id: &str) -> Vec<pb::TaskEvent> {
    let stream = api
        .watch_task(request(
            user,
            Role::User,
            pb::WatchTaskRequest {
                task_id: id.to_owned(),
                after_sequence: 0,
            },
        ))
        .await
        .expect("WatchTask")
        .into_inner();
    collect(stream).await
}

fn without_heartbeats(events: &[pb::TaskEvent]) -> Vec<pb::TaskEvent> {
    events
        .iter()
        .filter(|e| !matches!(e.event, Some(Event::Heartbeat(_))))
        .cloned()
        .collect()
}

/// Waits until the task is in BUILD with its build started (and its Started relayed).
async fn until_building(api: &AgentApi, user: &str, id: &str) -> pb::Task {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let t = get(api, user, id).await;
        if t.phase == Phase::Build as i32 && !t.build_ids.is_empty() {
            return t;
        }
        assert!(Instant::now() < until, "the task never built: {t:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn model_calls(cluster: &Cluster) -> usize {
    cluster
        .llm
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .count()
}

#[tokio::test]
async fn tasks_started_on_three_replicas_each_run_exactly_once_and_are_watched_from_any() {
    kiln_testkit::on_postgres(async {
        let mut cluster = Cluster::start().await;
        cluster.answer_always_good();
        let mut replicas = Vec::new();
        for _ in 0..3 {
            replicas.push(cluster.replica(Duration::from_secs(10)).await);
        }
        let users = ["u0", "u1", "u2"];
        let mut tasks = Vec::new();
        for i in 0..9 {
            let user = users[i % 3];
            let task = start(&replicas[i % 3], user, &format!("calc {i}")).await;
            tasks.push((user, task.id));
        }
        // Every task followed from a replica other than the one that accepted it.
        for (i, (user, id)) in tasks.iter().enumerate() {
            let watched = watch_all(&replicas[(i + 1) % 3], user, id).await;
            assert_dense(&watched);
            assert_eq!(result(&watched).phase, Phase::Done as i32, "{id}");
            let replayed = watch_all(&replicas[(i + 2) % 3], user, id).await;
            assert_eq!(
                without_heartbeats(&watched),
                without_heartbeats(&replayed),
                "a live watch on one replica and a replay on another see the same events"
            );
            assert_eq!(
                phases(&watched),
                [
                    Phase::Analyze,
                    Phase::Plan,
                    Phase::Generate,
                    Phase::Validate,
                    Phase::Build,
                    Phase::Done
                ],
                "each phase once: no replica ran a step twice"
            );
        }
        assert_eq!(cluster.build.builds_started(), 9, "one build per task");
        assert_eq!(
            model_calls(&cluster),
            18,
            "a plan and a generate call per task"
        );
        for r in &replicas {
            r.shutdown(Duration::from_secs(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_cancel_sent_to_another_replica_stops_the_task_where_it_runs() {
    kiln_testkit::on_postgres(async {
        let mut cluster = Cluster::start().await;
        cluster.answer_always_good();
        cluster.build.hold_builds(true);
        let a = cluster.replica(Duration::from_secs(10)).await;
        let b = cluster.replica(Duration::from_secs(10)).await;
        let task = start(&a, "alice", "calc").await;
        until_building(&a, "alice", &task.id).await;
        let sent = Instant::now();
        let cancelled = b
            .cancel_task(request(
                "alice",
                Role::User,
                pb::CancelTaskRequest {
                    task_id: task.id.clone(),
                },
            ))
            .await
            .expect("CancelTask")
            .into_inner()
            .task
            .expect("a task");
        let took = sent.elapsed();
        assert_eq!(cancelled.phase, Phase::Cancelled as i32, "{cancelled:?}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
        eprintln!("a cancel sent to another replica ended the task in {took:?}");
        assert_eq!(
            cluster.build.cancelled(),
            cancelled.build_ids,
            "the runner cancelled its build"
        );
        let events = watch_all(&b, "alice", &task.id).await;
        assert_dense(&events);
        assert_eq!(result(&events).reason, "CANCELLED");
        a.shutdown(Duration::from_secs(5)).await;
        b.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test]
async fn a_replica_that_dies_mid_task_has_it_continued_by_another_within_a_lease() {
    kiln_testkit::on_postgres(async {
        let mut cluster = Cluster::start().await;
        cluster.answer_always_good();
        cluster.build.hold_builds(true);
        let lease = Duration::from_secs(1);
        // The dying replica lives in a runtime of its own: shutting that down stops
        // everything it runs at once (runners, lease renewal, listeners, connections),
        // as a killed process would, without any of it letting go of its claims.
        let doomed = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let config = cluster.config(lease);
        let (build, delegator) = (cluster.build.clone(), cluster.delegator.clone());
        let dying = doomed
            .spawn(async move {
                AgentApi::open(config, Arc::new(build), delegator)
                    .await
                    .expect("replica")
            })
            .await
            .expect("opened");
        let survivor = cluster.replica(lease).await;
        let on_dying = dying.clone();
        let task = doomed
            .spawn(async move { start(&on_dying, "alice", "calc").await })
            .await
            .expect("started");
        let building = until_building(&survivor, "alice", &task.id).await;
        let watcher = {
            let survivor = survivor.clone();
            let id = task.id.clone();
            tokio::spawn(async move { watch_all(&survivor, "alice", &id).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let died = Instant::now();
        doomed.shutdown_background();
        drop(dying);
        // The build goes on in kiln-build; the survivor follows it once it holds the task.
        cluster.build.hold_builds(false);
        let events = tokio::time::timeout(Duration::from_secs(30), watcher)
            .await
            .expect("the task ended")
            .expect("watcher");
        let took = died.elapsed();
        eprintln!("a dead replica's task was continued and finished {took:?} after its death");
        assert!(
            took < lease * 4,
            "continued within about a lease (renewal, reclaim look, claim): {took:?}"
        );
        assert_dense(&events);
        assert_eq!(result(&events).phase, Phase::Done as i32);
        let done = get(&survivor, "alice", &task.id).await;
        assert_eq!(
            done.build_ids, building.build_ids,
            "the same build, followed"
        );
        assert_eq!(
            cluster.build.builds_started(),
            1,
            "the build in flight was followed, not started again"
        );
        let relayed: Vec<u64> = events
            .iter()
            .filter_map(|e| match &e.event {
                Some(Event::BuildEvent(b)) => Some(b.event.as_ref().expect("event").sequence),
                _ => None,
            })
            .collect();
        let expected: Vec<u64> = (1..=relayed.len() as u64).collect();
        assert_eq!(relayed, expected, "each build event relayed exactly once");
        survivor.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test]
async fn a_restarted_replica_touches_no_task_a_live_replica_holds() {
    kiln_testkit::on_postgres(async {
        let mut cluster = Cluster::start().await;
        cluster.answer_always_good();
        cluster.build.hold_builds(true);
        let lease = Duration::from_secs(1);
        let a = cluster.replica(lease).await;
        let task = start(&a, "alice", "calc").await;
        until_building(&a, "alice", &task.id).await;
        let calls_before = model_calls(&cluster);
        // A replica starting (as a restarted pod does) and looking for unowned tasks for
        // several leases: the task is A's, renewed all along.
        let b = cluster.replica(lease).await;
        tokio::time::sleep(lease * 3).await;
        assert_eq!(model_calls(&cluster), calls_before, "nobody redid a step");
        let t = get(&b, "alice", &task.id).await;
        assert_eq!(t.phase, Phase::Build as i32);
        cluster.build.hold_builds(false);
        let events = watch_all(&b, "alice", &task.id).await;
        assert_dense(&events);
        assert_eq!(result(&events).phase, Phase::Done as i32);
        assert_eq!(cluster.build.builds_started(), 1);
        a.shutdown(Duration::from_secs(5)).await;
        b.shutdown(Duration::from_secs(5)).await;
    })
    .await;
}
