//! The service SIGKILLed mid-build and restarted: the running build ends INTERRUPTED with
//! its log kept, and the queued build then runs.
//!
//! The service runs in a child process (this test binary re-executed on the ignored
//! test `child_server`), so the kill is a real SIGKILL: no destructor, no graceful
//! shutdown, the SQLite file as the kernel left it.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use kiln_proto::build as pb;
use pb::build_event::Event;

const CHILD_ENV: &str = "KILN_BUILD_TEST_CHILD_DIR";

/// Not a test: the server of the child process (runs only when the parent sets the env).
#[tokio::test]
#[ignore = "helper process of a_sigkilled_service_recovers"]
async fn child_server() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = Path::new(&dir).to_path_buf();
    let (endpoint, _ca, _api, _stop) = serve(&dir, |c| c.queue.max_running = 1).await;
    std::fs::write(dir.join("endpoint.tmp"), &endpoint).expect("write endpoint");
    std::fs::rename(dir.join("endpoint.tmp"), dir.join("endpoint")).expect("publish endpoint");
    std::future::pending::<()>().await;
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_sigkilled_service_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The child opens the database noted in `dir` (the Postgres half's).
    kiln_testkit::database_url_in(dir.path()).await;
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "child_server", "--ignored", "--nocapture"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("child server");
    let endpoint_file = dir.path().join("endpoint");
    eventually("the child server is up", || endpoint_file.exists()).await;
    let endpoint = std::fs::read_to_string(&endpoint_file).expect("endpoint");
    let ca = std::fs::read_to_string(dir.path().join("pki").join("ca.pem")).expect("ca");
    let mut c = client(&endpoint, &ca, "alice-user").await;

    let ws = workspace(&mut c, vec![]).await;
    let ws2 = workspace(&mut c, vec![]).await;
    let long = step(&[
        "python3",
        "-c",
        "import time\nprint('before the crash', flush=True)\ntime.sleep(600)\n",
    ]);
    let running = c
        .start_build(build_req(&ws.id, vec![long]))
        .await
        .expect("start")
        .into_inner();
    let queued = c
        .start_build(build_req(
            &ws2.id,
            vec![step(&["echo", "after the restart"])],
        ))
        .await
        .expect("start")
        .into_inner();
    // Follow the running build until its output is in the log.
    let mut stream = c
        .watch_build(pb::WatchBuildRequest {
            build_id: running.id.clone(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    loop {
        let e = stream.message().await.expect("ok").expect("more");
        let is_output = matches!(e.event, Some(Event::Output(_)));
        seen.push(e);
        if is_output {
            break;
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    drop(stream);

    let rig = rig_at(dir.path(), |c| c.queue.max_running = 1).await;
    let mut c = rig.client("alice-user").await;
    let log = watch(&mut c, &running.id, 0).await;
    assert_eq!(
        log.state(),
        pb::BuildState::Interrupted,
        "{:?}",
        log.finished()
    );
    assert_eq!(
        log.stdout(0),
        b"before the crash\n",
        "the log up to the crash is kept"
    );
    log.assert_dense_from(1);
    assert_eq!(&log.events[..seen.len()], &seen[..]);
    let b = c
        .get_build(pb::GetBuildRequest {
            build_id: running.id,
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(b.state, pb::BuildState::Interrupted as i32);
    assert!(!b.failure_message.is_empty());

    let log = tokio::time::timeout(Duration::from_secs(60), watch(&mut c, &queued.id, 0))
        .await
        .expect("in time");
    assert_eq!(log.state(), pb::BuildState::Succeeded);
    assert_eq!(log.stdout(0), b"after the restart\n");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn shutdown_interrupts_running_builds_and_keeps_queued_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rig = rig_at(dir.path(), |c| c.queue.max_running = 1).await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let ws2 = workspace(&mut c, vec![]).await;
    let running = c
        .start_build(build_req(&ws.id, vec![step(&["sleep", "600"])]))
        .await
        .expect("start")
        .into_inner();
    let queued = c
        .start_build(build_req(&ws2.id, vec![step(&["true"])]))
        .await
        .expect("start")
        .into_inner();
    loop {
        let b = c
            .get_build(pb::GetBuildRequest {
                build_id: running.id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        if b.current_step_index.is_some() {
            break;
        }
        tokio::task::yield_now().await;
    }
    rig.api.shutdown().await;
    let log = watch(&mut c, &running.id, 0).await;
    assert_eq!(log.state(), pb::BuildState::Interrupted);
    let q = c
        .get_build(pb::GetBuildRequest {
            build_id: queued.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(q.state, pb::BuildState::Queued as i32);
    drop(rig);
    let rig = rig_at(dir.path(), |_| {}).await;
    let mut c = rig.client("alice-user").await;
    assert_eq!(
        watch(&mut c, &queued.id, 0).await.state(),
        pb::BuildState::Succeeded
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_workspace_directory_without_a_record_is_swept_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rig = rig_at(dir.path(), |_| {}).await;
    let mut c = rig.client("alice-user").await;
    let kept = workspace(&mut c, vec![]).await;
    let kept_dir = rig.workspace_dir(&kept.id);
    let orphan = rig.workspace_dir(&uuid::Uuid::new_v4().to_string());
    let not_ours = kept_dir
        .parent()
        .expect("workspaces dir")
        .join("lost+found");
    rig.api.shutdown().await;
    drop(rig);
    // What a crash between "delete the record" and "remove the files" leaves behind.
    std::fs::create_dir_all(orphan.join("src")).expect("orphan");
    std::fs::write(orphan.join("src/main.rs"), "fn main() {}").expect("orphan file");
    std::fs::create_dir_all(&not_ours).expect("a directory kiln did not name");
    // On Postgres the directory may be shared with replicas, one of which may be
    // between creating a workspace's directory and its record: only a directory
    // untouched for an hour counts as left behind. A fresh one is kept…
    let shared = kiln_testkit::backend() == kiln_testkit::Backend::Postgres;
    let fresh = age_orphan_and_add_a_fresh_one(shared, &orphan);

    let rig = rig_at(dir.path(), |_| {}).await;
    if let Some(fresh) = &fresh {
        assert!(fresh.exists(), "a fresh directory without a record is kept with replicas");
    }
    assert!(
        !orphan.exists(),
        "the orphaned directory is removed at start"
    );
    assert!(kept_dir.exists(), "a workspace with a record is untouched");
    assert!(
        not_ours.exists(),
        "a name that is not a workspace id is left alone"
    );
    let mut c = rig.client("alice-user").await;
    c.get_workspace(pb::GetWorkspaceRequest {
        workspace_id: kept.id,
    })
    .await
    .expect("the kept workspace still answers");
}
}

/// With replicas (Postgres): ages `orphan` by two hours, so that it counts as left
/// behind, and makes a second, fresh orphan next to it, which must be kept. Returns
/// the fresh one.
fn age_orphan_and_add_a_fresh_one(shared: bool, orphan: &Path) -> Option<std::path::PathBuf> {
    if !shared {
        return None;
    }
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::open(orphan)
        .and_then(|d| d.set_modified(two_hours_ago))
        .expect("age the orphan");
    let fresh = orphan.with_file_name(uuid::Uuid::new_v4().to_string());
    std::fs::create_dir_all(&fresh).expect("a fresh orphan");
    Some(fresh)
}
