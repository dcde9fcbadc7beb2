//! kiln-build replicas as processes on one Postgres database and one data directory
//! (pods on a shared volume): `kill -9` of the replica running a build loses nothing.
//! Its running build ends INTERRUPTED within about a lease, with its log up to the
//! crash; its queued builds run on the other replica; no event is lost or duplicated;
//! and a restarted replica touches nothing that another one holds. Skipped, saying
//! why, without Postgres.

use std::time::{Duration, Instant};

use kiln_e2e::services::{Pki, TRUST_DOMAIN, start};
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_proto::build::build_event::Event;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_proto::{auth as auth_pb, build as build_pb};
use kiln_rpc::client::KilnChannel;

const ADMIN_PASSWORD: &str = "correct horse battery staple";
const LEASE: Duration = Duration::from_secs(2);

type Builds = BuildServiceClient<KilnChannel>;

fn python(code: &str) -> build_pb::Step {
    build_pb::Step {
        argv: vec!["python3".into(), "-c".into(), code.into()],
        ..Default::default()
    }
}

async fn start_build(c: &mut Builds, workspace: &str, step: build_pb::Step) -> String {
    c.start_build(build_pb::StartBuildRequest {
        workspace_id: workspace.into(),
        steps: vec![step],
        ..Default::default()
    })
    .await
    .expect("start")
    .into_inner()
    .id
}

async fn new_workspace(c: &mut Builds) -> String {
    c.create_workspace(build_pb::CreateWorkspaceRequest::default())
        .await
        .expect("workspace")
        .into_inner()
        .id
}

/// Every event of a build from the start (heartbeats left out), to its end.
async fn whole_log(c: &mut Builds, id: &str) -> Vec<build_pb::BuildEvent> {
    let mut stream = c
        .watch_build(build_pb::WatchBuildRequest {
            build_id: id.into(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    let collect = async {
        while let Some(e) = stream.message().await.expect("stream") {
            if !matches!(e.event, Some(Event::Heartbeat(_))) {
                events.push(e);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), collect)
        .await
        .expect("the build ends");
    events
}

fn stdout(events: &[build_pb::BuildEvent]) -> String {
    let mut out = Vec::new();
    for e in events {
        if let Some(Event::Output(o)) = &e.event {
            out.extend_from_slice(&o.data);
        }
    }
    String::from_utf8(out).expect("utf-8")
}

fn end_state(events: &[build_pb::BuildEvent]) -> build_pb::BuildState {
    match events.last().and_then(|e| e.event.clone()) {
        Some(Event::Finished(f)) => build_pb::BuildState::try_from(f.state).expect("state"),
        other => panic!("no Finished at the end: {other:?}"),
    }
}

fn assert_once_and_dense(id: &str, events: &[build_pb::BuildEvent]) {
    let seqs: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    let dense: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, dense, "{id}: no event lost or duplicated");
    let starts = events
        .iter()
        .filter(|e| matches!(e.event, Some(Event::Started(_))))
        .count();
    assert!(starts <= 1, "{id} started {starts} times");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_a_replica_mid_build_loses_nothing() {
    let server = match kiln_testkit::postgres() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("skipped: no Postgres: {why}");
            return;
        }
    };
    let url = server.fresh_database().await.expose();
    let pki = Pki::new();
    let auth_certs = pki.workload("auth", TRUST_DOMAIN, "auth");
    let build_certs = pki.workload("build", TRUST_DOMAIN, "build");
    let auth = start(
        "auth",
        &pki,
        &auth_certs,
        &[("KILN_ADMIN_PASSWORD", ADMIN_PASSWORD.into())],
    );
    let env = [
        ("KILN_SERVER__ENDPOINTS__AUTH", auth.endpoint.clone()),
        ("KILN_BUILD__DATABASE_URL", url),
        ("KILN_BUILD__QUEUE__LEASE", format!("{}s", LEASE.as_secs())),
        ("KILN_BUILD__QUEUE__MAX_RUNNING", "1".into()),
    ];
    // Both replicas get the same data directory (data-build under the PKI's dir).
    let mut doomed = start("build", &pki, &build_certs, &env);

    let channel = pki
        .client(&auth.endpoint, None)
        .connect()
        .await
        .expect("auth");
    let token = AuthServiceClient::new(channel)
        .login(auth_pb::LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await
        .expect("login")
        .into_inner()
        .access_token;
    let connect = |endpoint: String| {
        let config = pki.client(&endpoint, None).token(token.clone());
        async move { Builds::new(config.connect().await.expect("build")) }
    };
    let mut on_doomed = connect(doomed.endpoint.clone()).await;

    // A long build running on the replica that will die, two more queued behind it.
    let ws = new_workspace(&mut on_doomed).await;
    let long = start_build(
        &mut on_doomed,
        &ws,
        python("import time\nfor i in range(600):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.1)"),
    )
    .await;
    let mut stream = on_doomed
        .watch_build(build_pb::WatchBuildRequest {
            build_id: long.clone(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = String::new();
    while !seen.contains("tick 3") {
        let e = stream.message().await.expect("stream").expect("running");
        if let Some(Event::Output(o)) = e.event {
            seen.push_str(&String::from_utf8_lossy(&o.data));
        }
    }
    let mut queued = Vec::new();
    for n in 0..2 {
        let ws = new_workspace(&mut on_doomed).await;
        queued
            .push(start_build(&mut on_doomed, &ws, python(&format!("print('queued {n}')"))).await);
    }

    let survivor = start("build", &pki, &build_certs, &env);
    let mut on_survivor = connect(survivor.endpoint.clone()).await;
    doomed.child.kill().expect("kill -9");
    doomed.child.wait().expect("reaped");
    let killed = Instant::now();

    let events = whole_log(&mut on_survivor, &long).await;
    let noticed = killed.elapsed();
    assert_once_and_dense(&long, &events);
    assert_eq!(end_state(&events), build_pb::BuildState::Interrupted);
    assert!(
        stdout(&events).contains("tick 3"),
        "its log up to the crash is kept: {}",
        stdout(&events)
    );
    eprintln!("the killed replica's build ended INTERRUPTED {noticed:?} after the kill");
    assert!(
        noticed < LEASE * 4,
        "within about a lease ({LEASE:?}): {noticed:?}"
    );
    for (n, id) in queued.iter().enumerate() {
        let events = whole_log(&mut on_survivor, id).await;
        assert_once_and_dense(id, &events);
        assert_eq!(end_state(&events), build_pb::BuildState::Succeeded, "{id}");
        assert_eq!(stdout(&events), format!("queued {n}\n"));
    }

    // The survivor runs a build; the dead replica comes back and must leave it alone.
    let ws = new_workspace(&mut on_survivor).await;
    let held = start_build(
        &mut on_survivor,
        &ws,
        python("import time\nprint('start', flush=True)\ntime.sleep(3)\nprint('end')"),
    )
    .await;
    let mut stream = on_survivor
        .watch_build(build_pb::WatchBuildRequest {
            build_id: held.clone(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    loop {
        let e = stream.message().await.expect("stream").expect("running");
        if matches!(e.event, Some(Event::Output(_))) {
            break;
        }
    }
    let restarted = start("build", &pki, &build_certs, &env);
    let mut on_restarted = connect(restarted.endpoint.clone()).await;
    let events = whole_log(&mut on_restarted, &held).await;
    assert_once_and_dense(&held, &events);
    assert_eq!(
        end_state(&events),
        build_pb::BuildState::Succeeded,
        "a restarted replica touches nothing another holds"
    );
    assert_eq!(stdout(&events), "start\nend\n");
    drop((restarted, survivor, auth));
}
