//! Every entry counts against the workspace's file limit (issue 9, item 9): directories
//! and symlinks cost inodes and walking time like files, so an upload of many
//! directories, a write with many new parents, or a build making many directories is
//! refused like one with too many files.
mod common;

use common::*;
use kiln_proto::build as pb;
use tonic::Code;

const LIMIT: u64 = 40;

/// A tar of `dirs` empty directories and `files` files each in a directory of its own.
fn tar_of(dirs: usize, files: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, format!("dir{i}/"), std::io::empty())
            .expect("dir");
    }
    for i in 0..files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(1);
        b.append_data(&mut h, format!("p{i}/f"), &b"x"[..])
            .expect("file");
    }
    b.into_inner().expect("tar")
}

async fn upload(c: &mut Client, ws: &str, tar: Vec<u8>) -> Result<(), tonic::Status> {
    use pb::upload_archive_request::{Header, Part};
    let msgs = vec![
        pb::UploadArchiveRequest {
            part: Some(Part::Header(Header {
                workspace_id: ws.into(),
                format: pb::ArchiveFormat::Tar as i32,
                ..Default::default()
            })),
        },
        pb::UploadArchiveRequest {
            part: Some(Part::Chunk(tar.into())),
        },
    ];
    c.upload_archive(futures::stream::iter(msgs))
        .await
        .map(|_| ())
}

async fn get(c: &mut Client, ws: &str) -> pb::Workspace {
    c.get_workspace(pb::GetWorkspaceRequest {
        workspace_id: ws.into(),
    })
    .await
    .expect("get")
    .into_inner()
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn uploads_of_many_directories_are_refused_and_change_nothing() {
    let rig = rig_with(|c| c.workspace.max_files = LIMIT).await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![file("keep", "k")]).await;
    // Directories alone, over the limit: refused while reading the archive.
    let s = upload(&mut c, &ws.id, tar_of(LIMIT as usize + 10, 0))
        .await
        .expect_err("too many directories");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert_eq!(reason(&s), "WORKSPACE_TOO_LARGE");
    assert!(s.message().contains("entries"), "{s:?}");
    // Files whose parents the archive does not list: the quota walk after applying
    // counts the created parents, and the change is rolled back.
    let s = upload(&mut c, &ws.id, tar_of(0, LIMIT as usize / 2 + 5))
        .await
        .expect_err("too many entries with their parents");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("entries"), "{s:?}");
    assert_eq!(names_in(&mut c, &ws.id, "").await, ["keep"]);
    let dirs: Vec<_> = std::fs::read_dir(rig.workspace_dir(&ws.id))
        .expect("ws")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(dirs, ["keep"], "no directory was left behind");
    assert_eq!(get(&mut c, &ws.id).await.file_count, 1);
    // Under the limit, directories are counted in file_count.
    upload(&mut c, &ws.id, tar_of(5, 0)).await.expect("small");
    assert_eq!(get(&mut c, &ws.id).await.file_count, 6);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn new_parent_directories_count_in_write_files() {
    let rig = rig_with(|c| c.workspace.max_files = 3).await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![file("a/b/c", "1")]).await;
    assert_eq!(ws.file_count, 3);
    let s = c
        .write_files(pb::WriteFilesRequest {
            workspace_id: ws.id.clone(),
            files: vec![file("a/b/d/e", "2")],
            ..Default::default()
        })
        .await
        .expect_err("a/b/d and a/b/d/e make five entries");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(!rig.workspace_dir(&ws.id).join("a/b/d").exists());
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_build_making_many_directories_is_stopped_at_the_limit() {
    let rig = rig_with(|c| c.workspace.max_files = LIMIT).await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    // Far more directories than allowed, then wait (bounded) to be stopped.
    let code = format!(
        "import os, time\nfor i in range({}): os.mkdir('d%d' % i)\nprint('made')\ntime.sleep(20)\n",
        LIMIT * 5
    );
    let log = run(
        &mut c,
        build_req(&ws.id, vec![step(&["python3", "-c", &code])]),
    )
    .await;
    assert_eq!(log.state(), pb::BuildState::Failed, "{:?}", log.finished());
    let results = log.step_results();
    assert_eq!(
        results[0].reason,
        pb::StepFinishedReason::DiskLimit as i32,
        "{results:?}"
    );
    assert!(results[0].message.contains("entries"), "{results:?}");
}
}
