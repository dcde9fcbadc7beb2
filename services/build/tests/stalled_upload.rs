//! A client that streams an upload slowly, or stops sending, holds up nobody: builds of
//! that workspace and of others run meanwhile, and the upload is abandoned (nothing
//! applied) after its idle or total deadline.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::build as pb;
use pb::upload_archive_request::{Header, Part};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn header(ws: &str) -> pb::UploadArchiveRequest {
    pb::UploadArchiveRequest {
        part: Some(Part::Header(Header {
            workspace_id: ws.into(),
            format: pb::ArchiveFormat::Tar as i32,
            replace: false,
            directory: String::new(),
        })),
    }
}

fn chunk(bytes: &[u8]) -> pb::UploadArchiveRequest {
    pb::UploadArchiveRequest {
        part: Some(Part::Chunk(bytes.to_vec().into())),
    }
}

/// The first bytes of a tar holding `new.txt`: a header that promises more than is sent.
fn tar_prefix() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let data = vec![b'x'; 4096];
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    builder
        .append_data(&mut h, "new.txt", data.as_slice())
        .expect("append");
    let bytes = builder.into_inner().expect("tar");
    bytes[..600].to_vec()
}

/// Runs a build to its end, failing the test instead of hanging when it never ends.
async fn finishes(c: &mut Client, ws: &str, what: &str) -> pb::BuildState {
    let build = c
        .start_build(build_req(ws, vec![step(&["true"])]))
        .await
        .expect("start")
        .into_inner();
    let log = tokio::time::timeout(Duration::from_secs(60), watch(c, &build.id, 0))
        .await
        .unwrap_or_else(|_| panic!("{what} never finished while an upload stalled"));
    log.state()
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_stalled_upload_holds_up_no_build_and_is_abandoned_after_its_idle_timeout() {
    let rig = rig_with(|c| {
        c.queue.max_running = 1;
        c.workspace.upload_idle_timeout = Duration::from_secs(8);
    })
    .await;
    let mut alice = rig.client("alice-user").await;
    let mut bob = rig.client("bob-user").await;
    let wa = workspace(&mut alice, vec![file("keep.txt", "kept")]).await;
    let wb = workspace(&mut bob, vec![]).await;

    // 100 bytes of an archive, then silence, with the stream held open.
    let (tx, rx) = mpsc::channel(4);
    tx.send(header(&wa.id)).await.expect("send");
    tx.send(chunk(&tar_prefix()[..100])).await.expect("send");
    let mut uploader = rig.client("alice-user").await;
    let upload =
        tokio::spawn(async move { uploader.upload_archive(ReceiverStream::new(rx)).await });
    // The server is unpacking it once its staging area exists.
    let staging = rig.data_dir.join("build").join("staging");
    eventually("the upload is being unpacked", || {
        std::fs::read_dir(&staging).is_ok_and(|mut d| d.next().is_some())
    })
    .await;

    // With one running slot: a build of the stalled workspace, then another user's.
    assert_eq!(
        finishes(&mut alice, &wa.id, "a build of the uploading workspace").await,
        pb::BuildState::Succeeded
    );
    assert_eq!(
        finishes(&mut bob, &wb.id, "another user's build").await,
        pb::BuildState::Succeeded
    );
    if upload.is_finished() {
        panic!(
            "the builds waited for the stalled upload to end: {:?}",
            upload.await
        );
    }

    let status = tokio::time::timeout(Duration::from_secs(60), upload)
        .await
        .expect("the stalled upload is ended by the server")
        .expect("task")
        .expect_err("a stalled upload fails");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(&status), "UPLOAD_TIMED_OUT");
    drop(tx);
    assert_eq!(names_in(&mut alice, &wa.id, "").await, ["keep.txt"]);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn an_upload_that_trickles_is_ended_by_its_total_timeout() {
    let rig = rig_with(|c| {
        c.workspace.upload_idle_timeout = Duration::from_secs(30);
        c.workspace.upload_timeout = Duration::from_secs(2);
    })
    .await;
    let mut alice = rig.client("alice-user").await;
    let ws = workspace(&mut alice, vec![]).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(header(&ws.id)).await.expect("send");
    // One byte every 50 ms: never idle, never done (bounded: at most 60 s of it).
    let prefix = tar_prefix();
    let trickle = tokio::spawn(async move {
        for b in prefix.iter().cycle().take(1200) {
            if tx.send(chunk(&[*b])).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let status = alice
        .upload_archive(ReceiverStream::new(rx))
        .await
        .expect_err("a trickling upload fails");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(&status), "UPLOAD_TIMED_OUT");
    assert!(
        status.message().contains("nothing was changed"),
        "{status:?}"
    );
    trickle.abort();
    assert!(names_in(&mut alice, &ws.id, "").await.is_empty());
}
}
