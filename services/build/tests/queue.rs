//! The queue: fairness between users and the per-user queued limit.

mod common;

use common::*;
use kiln_proto::build as pb;
use tonic::Code;

/// A step that waits until the file `go` exists in the workspace.
fn gate() -> pb::Step {
    step(&[
        "python3",
        "-c",
        "import os, time\nwhile not os.path.exists('go'): time.sleep(0.01)\n",
    ])
}

fn started_at(b: &pb::Build) -> (i64, i32) {
    let t = b.started_at.expect("started");
    (t.seconds, t.nanos)
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn users_take_turns() {
    let rig = rig_with(|c| c.queue.max_running = 1).await;
    let mut alice = rig.client("alice-user").await;
    let mut bob = rig.client("bob-user").await;
    let wa = workspace(&mut alice, vec![]).await;
    let wb = workspace(&mut bob, vec![]).await;
    let mut a = vec![
        alice
            .start_build(build_req(&wa.id, vec![gate()]))
            .await
            .expect("a0")
            .into_inner(),
    ];
    for _ in 1..10 {
        a.push(
            alice
                .start_build(build_req(&wa.id, vec![step(&["true"])]))
                .await
                .expect("a")
                .into_inner(),
        );
    }
    let b = bob
        .start_build(build_req(&wb.id, vec![step(&["true"])]))
        .await
        .expect("b")
        .into_inner();
    assert_eq!(
        b.queue_position,
        Some(2),
        "bob's build is next after alice's second"
    );
    std::fs::write(rig.workspace_dir(&wa.id).join("go"), "").expect("open the gate");
    let mut vera = rig.client("vera-viewer").await;
    for build in a.iter().chain(std::iter::once(&b)) {
        let log = watch(&mut vera, &build.id, 0).await;
        assert_eq!(log.state(), pb::BuildState::Succeeded);
    }
    let get = |c: &mut Client, id: String| {
        let mut c = c.clone();
        async move {
            c.get_build(pb::GetBuildRequest { build_id: id })
                .await
                .expect("get")
                .into_inner()
        }
    };
    let b = get(&mut bob, b.id).await;
    let a2 = get(&mut alice, a[1].id.clone()).await;
    let a3 = get(&mut alice, a[2].id.clone()).await;
    assert!(
        started_at(&a2) < started_at(&b),
        "alice's second started before bob's"
    );
    assert!(
        started_at(&b) < started_at(&a3),
        "bob's build started before alice's third"
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn too_many_queued_builds_are_resource_exhausted_with_retry_info() {
    let rig = rig_with(|c| {
        c.queue.max_running = 1;
        c.queue.max_queued_per_user = 2;
    })
    .await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let first = c
        .start_build(build_req(&ws.id, vec![gate()]))
        .await
        .expect("runs")
        .into_inner();
    // Wait until it left the queue.
    let mut running = false;
    while !running {
        let b = c
            .get_build(pb::GetBuildRequest {
                build_id: first.id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        running = b.state == pb::BuildState::Running as i32;
        tokio::task::yield_now().await;
    }
    c.start_build(build_req(&ws.id, vec![step(&["true"])]))
        .await
        .expect("queued 1");
    c.start_build(build_req(&ws.id, vec![step(&["true"])]))
        .await
        .expect("queued 2");
    let s = c
        .start_build(build_req(&ws.id, vec![step(&["true"])]))
        .await
        .expect_err("full");
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert_eq!(reason(&s), "QUEUE_FULL");
    assert!(
        tonic_types::StatusExt::get_error_details(&s)
            .retry_info()
            .is_some()
    );
    // Other users are not affected.
    let mut bob = rig.client("bob-user").await;
    let wb = workspace(&mut bob, vec![]).await;
    bob.start_build(build_req(&wb.id, vec![step(&["true"])]))
        .await
        .expect("bob queues");
    std::fs::write(rig.workspace_dir(&ws.id).join("go"), "").expect("open the gate");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_workspace_with_a_running_build_refuses_changes_and_deletion() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![file("a", "1")]).await;
    let build = c
        .start_build(build_req(&ws.id, vec![gate()]))
        .await
        .expect("start")
        .into_inner();
    let mut running = false;
    while !running {
        let b = c
            .get_build(pb::GetBuildRequest {
                build_id: build.id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        running = b.state == pb::BuildState::Running as i32;
        tokio::task::yield_now().await;
    }
    let s = c
        .write_files(pb::WriteFilesRequest {
            workspace_id: ws.id.clone(),
            files: vec![file("b", "2")],
            ..Default::default()
        })
        .await
        .expect_err("busy");
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert_eq!(reason(&s), "WORKSPACE_BUSY");
    let s = c
        .delete_workspace(pb::DeleteWorkspaceRequest {
            workspace_id: ws.id.clone(),
        })
        .await
        .expect_err("busy");
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert_eq!(reason(&s), "WORKSPACE_BUSY");
    std::fs::write(rig.workspace_dir(&ws.id).join("go"), "").expect("open the gate");
    assert_eq!(
        watch(&mut c, &build.id, 0).await.state(),
        pb::BuildState::Succeeded
    );
    c.delete_workspace(pb::DeleteWorkspaceRequest {
        workspace_id: ws.id.clone(),
    })
    .await
    .expect("deleted after the build");
    let s = c
        .get_workspace(pb::GetWorkspaceRequest {
            workspace_id: ws.id,
        })
        .await
        .expect_err("gone");
    assert_eq!(s.code(), Code::NotFound);
    // The build and its log outlive the workspace.
    assert_eq!(
        watch(&mut c, &build.id, 0).await.state(),
        pb::BuildState::Succeeded
    );
}
}
