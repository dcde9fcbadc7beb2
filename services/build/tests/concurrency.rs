//! Many clients at once on the same thing: retried requests race each other, writers
//! race writers. Each answer must be one a client can act on, and the state afterwards
//! must be what one serial order of the same requests would give.

mod common;

use std::collections::BTreeSet;

use common::*;
use futures::future::join_all;
use kiln_proto::build as pb;
use tonic::Code;

const RACERS: usize = 16;

kiln_testkit::both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_retries_of_one_start_build_make_exactly_one_build() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let mut req = build_req(&ws.id, vec![step(&["echo", "once"])]);
    req.request_id = "retry-7f3c".into();
    let answers = join_all((0..RACERS).map(|_| {
        let mut c = c.clone();
        let req = req.clone();
        async move { c.start_build(req).await.map(|r| r.into_inner().id) }
    }))
    .await;
    let ids: BTreeSet<String> = answers
        .into_iter()
        .map(|a| a.expect("every retry gets the build"))
        .collect();
    assert_eq!(ids.len(), 1, "one build for one request id: {ids:?}");
    let listed = c
        .list_builds(pb::ListBuildsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.builds.len(), 1);
    let id = ids.into_iter().next().expect("one");
    let log = watch(&mut c, &id, 0).await;
    assert_eq!(log.state(), pb::BuildState::Succeeded);
    assert_eq!(log.stdout(0), b"once\n", "it ran once");
}
}

kiln_testkit::both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_retries_of_one_create_workspace_make_exactly_one() {
    let rig = rig().await;
    let c = rig.client("alice-user").await;
    let req = pb::CreateWorkspaceRequest {
        request_id: "ws-retry-1".into(),
        files: vec![file("main.c", "int main(void) { return 0; }\n")],
        ..Default::default()
    };
    let answers = join_all((0..RACERS).map(|_| {
        let mut c = c.clone();
        let req = req.clone();
        async move { c.create_workspace(req).await.map(|r| r.into_inner().id) }
    }))
    .await;
    let ids: BTreeSet<String> = answers
        .into_iter()
        .map(|a| a.expect("every retry gets the workspace"))
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let mut c = c;
    let listed = c
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.workspaces.len(), 1);
    // No directory of a losing racer is left behind.
    let dirs = std::fs::read_dir(rig.workspace_dir("x").parent().expect("root"))
        .expect("workspaces dir")
        .count();
    assert_eq!(dirs, 1, "one directory for one workspace");
}
}

kiln_testkit::both_backends! {
/// Writers of one workspace are serialized: each change applies whole, none is lost, and
/// the recorded size and file count match the files on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_of_one_workspace_lose_nothing() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![file("shared.txt", "start")]).await;
    let answers = join_all((0..RACERS).map(|i| {
        let mut c = c.clone();
        let id = ws.id.clone();
        async move {
            c.write_files(pb::WriteFilesRequest {
                workspace_id: id,
                files: vec![
                    file(&format!("own/{i:02}.txt"), format!("writer {i}")),
                    file("shared.txt", format!("last writer {i}")),
                ],
                delete_paths: vec![],
            })
            .await
        }
    }))
    .await;
    for a in answers {
        a.expect("every write applies");
    }
    let mut names = names_in(&mut c, &ws.id, "own").await;
    names.sort();
    let expected: Vec<String> = (0..RACERS).map(|i| format!("own/{i:02}.txt")).collect();
    assert_eq!(names, expected);
    let shared =
        std::fs::read_to_string(rig.workspace_dir(&ws.id).join("shared.txt")).expect("shared.txt");
    assert!(
        shared.starts_with("last writer "),
        "one whole write: {shared}"
    );
    let got = c
        .get_workspace(pb::GetWorkspaceRequest {
            workspace_id: ws.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    // Entries: the racers' files, the directory `own` and shared.txt.
    assert_eq!(got.file_count, RACERS as u64 + 2);
    let on_disk: u64 = (0..RACERS)
        .map(|i| format!("writer {i}").len() as u64)
        .sum::<u64>()
        + shared.len() as u64;
    assert_eq!(got.size_bytes, on_disk, "recorded usage matches the files");
}
}

kiln_testkit::both_backends! {
/// A delete racing writers and readers: each call either happened before the delete or
/// gets NOT_FOUND after it (never an internal error); nothing is left on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_racing_writers_and_readers_leaves_nothing_behind() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![file("a.txt", "a".repeat(200_000))]).await;
    let readers: Vec<_> = (0..RACERS)
        .map(|i| {
            let mut c = c.clone();
            let id = ws.id.clone();
            tokio::spawn(async move {
                match i % 3 {
                    0 => read_whole(&mut c, &id, "a.txt").await.map(drop),
                    1 => c
                        .list_files(pb::ListFilesRequest {
                            workspace_id: id,
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    _ => download_all(&mut c, &id).await,
                }
            })
        })
        .collect();
    let writers = (0..RACERS).map(|i| {
        let mut c = c.clone();
        let id = ws.id.clone();
        tokio::spawn(async move {
            c.write_files(pb::WriteFilesRequest {
                workspace_id: id,
                files: vec![file(&format!("w{i}.txt"), "x")],
                delete_paths: vec![],
            })
            .await
            .map(drop)
        })
    });
    let writers: Vec<_> = writers.collect();
    c.delete_workspace(pb::DeleteWorkspaceRequest {
        workspace_id: ws.id.clone(),
    })
    .await
    .expect("deleted");
    for task in writers.into_iter().chain(readers) {
        if let Err(s) = task.await.expect("task") {
            assert_eq!(s.code(), Code::NotFound, "{s:?}");
        }
    }
    assert!(!rig.workspace_dir(&ws.id).exists());
    let s = c
        .get_workspace(pb::GetWorkspaceRequest {
            workspace_id: ws.id,
        })
        .await
        .expect_err("gone");
    assert_eq!(s.code(), Code::NotFound);
}
}

async fn download_all(c: &mut Client, id: &str) -> Result<(), tonic::Status> {
    let mut s = c
        .download_archive(pb::DownloadArchiveRequest {
            workspace_id: id.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    while s.message().await?.is_some() {}
    Ok(())
}

kiln_testkit::both_backends! {
/// StartBuild racing DeleteWorkspace: either the delete wins (the start answers
/// NOT_FOUND) or the build wins (the delete is refused while it is queued or running,
/// FAILED_PRECONDITION, and the build runs). Never both: a build accepted and then
/// failed because its workspace vanished under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_build_racing_delete_workspace_has_one_winner() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    for _ in 0..8 {
        let ws = workspace(&mut c, vec![file("a.txt", "a")]).await;
        let mut starter = c.clone();
        let mut deleter = c.clone();
        let req = build_req(&ws.id, vec![step(&["cat", "a.txt"])]);
        let (started, deleted) = tokio::join!(
            starter.start_build(req),
            deleter.delete_workspace(pb::DeleteWorkspaceRequest {
                workspace_id: ws.id.clone(),
            })
        );
        match (started, deleted) {
            (Ok(build), Err(s)) => {
                assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                let log = watch(&mut c, &build.into_inner().id, 0).await;
                assert_eq!(log.state(), pb::BuildState::Succeeded);
            }
            (Err(s), Ok(_)) => assert_eq!(s.code(), Code::NotFound, "{s:?}"),
            (Ok(build), Ok(_)) => {
                let log = watch(&mut c, &build.into_inner().id, 0).await;
                panic!("both won: the build ended {:?}", log.finished());
            }
            (Err(a), Err(b)) => panic!("neither won: {a:?} / {b:?}"),
        }
    }
}
}

kiln_testkit::both_backends! {
/// CancelBuild right after StartBuild, many times over, while the scheduler hands builds
/// out: wherever each build is at that moment (queued, being handed to a runner,
/// starting), the cancel takes effect; none runs its long step to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_right_after_start_is_never_lost() {
    let rig = rig_with(|c| {
        c.queue.max_running = 4;
        c.queue.max_running_per_user = 4;
        c.queue.max_queued_per_user = 64;
    })
    .await;
    let c = rig.client("alice-user").await;
    let spaces: Vec<String> = {
        let mut c = c.clone();
        let mut ids = Vec::new();
        for _ in 0..RACERS {
            ids.push(workspace(&mut c, vec![]).await.id);
        }
        ids
    };
    let builds = join_all(spaces.iter().map(|ws| {
        let mut c = c.clone();
        let req = build_req(ws, vec![step(&["sleep", "30"])]);
        async move {
            let id = c.start_build(req).await.expect("start").into_inner().id;
            c.cancel_build(pb::CancelBuildRequest {
                build_id: id.clone(),
                grace_period: None,
            })
            .await
            .expect("cancel");
            id
        }
    }))
    .await;
    for id in builds {
        let mut c = c.clone();
        let log = tokio::time::timeout(std::time::Duration::from_secs(20), watch(&mut c, &id, 0))
            .await
            .expect("a cancelled build ends long before its 30 s step would");
        assert_eq!(
            log.state(),
            pb::BuildState::Cancelled,
            "{:?}",
            log.finished()
        );
    }
}
}
