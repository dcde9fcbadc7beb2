//! Workspaces: files in and out, archives, paging, retention.

mod common;

use std::io::Read;

use common::*;
use kiln_proto::build as pb;
use tonic::Code;

fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, path, *data).expect("append");
    }
    b.into_inner().expect("tar")
}

/// A tar with one raw header (for what an honest builder refuses to write).
fn raw_tar(name: &str, kind: tar::EntryType, link: Option<&str>, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(kind);
    if let Some(l) = link {
        h.set_link_name(l).expect("link");
    }
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

async fn upload(
    c: &mut Client,
    ws: &str,
    format: pb::ArchiveFormat,
    replace: bool,
    bytes: Vec<u8>,
) -> Result<pb::UploadArchiveResponse, tonic::Status> {
    use pb::upload_archive_request::{Header, Part};
    let mut msgs = vec![pb::UploadArchiveRequest {
        part: Some(Part::Header(Header {
            workspace_id: ws.into(),
            format: format as i32,
            replace,
            directory: String::new(),
        })),
    }];
    for chunk in bytes.chunks(100_000) {
        msgs.push(pb::UploadArchiveRequest {
            part: Some(Part::Chunk(chunk.to_vec().into())),
        });
    }
    c.upload_archive(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

async fn names(c: &mut Client, ws: &str) -> Vec<String> {
    names_in(c, ws, "").await
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn write_list_read_and_delete_files() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(
        &mut c,
        vec![file("a.txt", "alpha"), file("dir/b.txt", "beta")],
    )
    .await;
    // Entries count directories too: a.txt, dir, dir/b.txt.
    assert_eq!((ws.file_count, ws.size_bytes), (3, 9));
    let mut exe = file("run.py", "print(1)");
    exe.executable = true;
    let resp = c
        .write_files(pb::WriteFilesRequest {
            workspace_id: ws.id.clone(),
            files: vec![exe, file("a.txt", "ALPHA!")],
            delete_paths: vec!["dir".into()],
        })
        .await
        .expect("write")
        .into_inner();
    assert_eq!(resp.workspace.expect("ws").file_count, 2);
    let files = c
        .list_files(pb::ListFilesRequest {
            workspace_id: ws.id.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(files.files.len(), 1);
    assert_eq!(files.files[0].path, "a.txt");
    let page2 = c
        .list_files(pb::ListFilesRequest {
            workspace_id: ws.id.clone(),
            page_size: 1,
            page_token: files.next_page_token,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page2.files[0].path, "run.py");
    assert!(page2.files[0].executable);
    assert!(page2.next_page_token.is_empty());
    let mut stream = c
        .read_file(pb::ReadFileRequest {
            workspace_id: ws.id.clone(),
            path: "a.txt".into(),
            offset: 2,
            limit: Some(3),
        })
        .await
        .expect("read")
        .into_inner();
    let chunk = stream.message().await.expect("ok").expect("chunk");
    assert_eq!(
        (chunk.offset, &chunk.data[..], chunk.size_bytes),
        (2, &b"PHA"[..], 6)
    );
    assert!(stream.message().await.expect("ok").is_none());
    let s = c
        .read_file(pb::ReadFileRequest {
            workspace_id: ws.id.clone(),
            path: "a.txt".into(),
            offset: 7,
            limit: None,
        })
        .await
        .expect_err("past the end");
    assert_eq!(s.code(), Code::OutOfRange);
    let s = c
        .write_files(pb::WriteFilesRequest {
            workspace_id: ws.id.clone(),
            delete_paths: vec!["missing".into()],
            ..Default::default()
        })
        .await
        .expect_err("missing");
    assert_eq!(s.code(), Code::NotFound);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_large_file_reads_back_in_chunks() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let ws = workspace(&mut c, vec![file("big.bin", data.clone())]).await;
    let mut stream = c
        .read_file(pb::ReadFileRequest {
            workspace_id: ws.id,
            path: "big.bin".into(),
            ..Default::default()
        })
        .await
        .expect("read")
        .into_inner();
    let mut got = Vec::new();
    while let Some(chunk) = stream.message().await.expect("ok") {
        assert_eq!(chunk.offset, got.len() as u64);
        assert!(chunk.data.len() <= 32 * 1024);
        got.extend_from_slice(&chunk.data);
    }
    assert_eq!(got, data);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn archives_upload_and_download_round_trip() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![file("old.txt", "old")]).await;
    let tar = tar_of(&[
        ("src/main.c", b"int main(void){return 0;}\n"),
        ("README", b"hi\n"),
    ]);
    let resp = upload(&mut c, &ws.id, pb::ArchiveFormat::Tar, false, tar)
        .await
        .expect("upload");
    assert_eq!(resp.files_written, 2);
    assert_eq!(
        names(&mut c, &ws.id).await,
        ["README", "old.txt", "src/main.c"]
    );
    // gzip, replacing everything
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar_of(&[("only.txt", b"only\n")])).expect("gz");
    let gz = gz.finish().expect("gz");
    upload(&mut c, &ws.id, pb::ArchiveFormat::TarGzip, true, gz)
        .await
        .expect("upload gz");
    assert_eq!(names(&mut c, &ws.id).await, ["only.txt"]);
    // Download as tar.gz and read it back.
    let mut stream = c
        .download_archive(pb::DownloadArchiveRequest {
            workspace_id: ws.id.clone(),
            format: pb::ArchiveFormat::TarGzip as i32,
            directory: String::new(),
        })
        .await
        .expect("download")
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.expect("ok") {
        assert!(chunk.chunk.len() <= 32 * 1024);
        bytes.extend_from_slice(&chunk.chunk);
    }
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let mut seen = Vec::new();
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        let mut content = String::new();
        entry.read_to_string(&mut content).expect("read");
        seen.push((entry.path().expect("path").display().to_string(), content));
    }
    assert_eq!(seen, [("only.txt".to_owned(), "only\n".to_owned())]);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn an_archive_with_an_outside_symlink_or_a_hard_link_is_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![file("keep", "k")]).await;
    for (kind, link) in [
        (tar::EntryType::Symlink, "/etc/passwd"),
        (tar::EntryType::Symlink, "../outside"),
        (tar::EntryType::Symlink, "a/../../outside"),
        (tar::EntryType::Link, "../../outside"),
    ] {
        let s = upload(
            &mut c,
            &ws.id,
            pb::ArchiveFormat::Tar,
            true,
            raw_tar("evil", kind, Some(link), 0),
        )
        .await
        .expect_err("refused");
        assert_invalid(&s, Code::InvalidArgument, "INVALID_ARCHIVE", "chunk");
    }
    let s = upload(
        &mut c,
        &ws.id,
        pb::ArchiveFormat::Tar,
        false,
        raw_tar("../escape", tar::EntryType::Regular, None, 0),
    )
    .await
    .expect_err("refused");
    assert_invalid(&s, Code::InvalidArgument, "INVALID_ARCHIVE", "chunk");
    assert_eq!(names(&mut c, &ws.id).await, ["keep"], "nothing was applied");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn an_archive_with_a_symlink_inside_the_workspace_stores_the_link() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![file("keep", "k")]).await;
    upload(
        &mut c,
        &ws.id,
        pb::ArchiveFormat::Tar,
        false,
        raw_tar("link", tar::EntryType::Symlink, Some("keep"), 0),
    )
    .await
    .expect("an inside link is accepted");
    let files = c
        .list_files(pb::ListFilesRequest {
            workspace_id: ws.id.clone(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .files;
    let link = files
        .iter()
        .find(|f| f.path == "link")
        .expect("the link is listed");
    assert_eq!(link.file_type, pb::FileType::Symlink as i32);
    assert_eq!(link.symlink_target, "keep");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn tar_bombs_are_refused_by_size_and_count() {
    let rig = rig_with(|c| {
        c.workspace.max_bytes = 1 << 20;
        c.workspace.max_files = 50;
    })
    .await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    // A header announcing 1 TiB: refused before reading a byte of it.
    let s = upload(
        &mut c,
        &ws.id,
        pb::ArchiveFormat::Tar,
        false,
        raw_tar("huge", tar::EntryType::Regular, None, 1 << 40),
    )
    .await
    .expect_err("size");
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert_eq!(reason(&s), "WORKSPACE_TOO_LARGE");
    // A compressed bomb: 4 MiB of zeros gzip to a few KiB.
    let zeros = vec![0u8; 4 << 20];
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &tar_of(&[("zeros", &zeros)])).expect("gz");
    let s = upload(
        &mut c,
        &ws.id,
        pb::ArchiveFormat::TarGzip,
        false,
        gz.finish().expect("gz"),
    )
    .await
    .expect_err("size");
    assert_eq!(reason(&s), "WORKSPACE_TOO_LARGE");
    // Too many files.
    let names_: Vec<String> = (0..60).map(|i| format!("f{i}")).collect();
    let entries: Vec<(&str, &[u8])> = names_.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
    let s = upload(
        &mut c,
        &ws.id,
        pb::ArchiveFormat::Tar,
        false,
        tar_of(&entries),
    )
    .await
    .expect_err("count");
    assert_eq!(reason(&s), "WORKSPACE_TOO_LARGE");
    // A GNU long-name entry claiming 1 GiB, gzipped so that it costs the client nothing:
    // refused at its header, before the server buffers the "name".
    let mut long_name = raw_tar("././@LongLink", tar::EntryType::GNULongName, None, 1 << 30);
    long_name.extend(std::iter::repeat_n(b'n', 8 << 20));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &long_name).expect("gz");
    let s = upload(
        &mut c,
        &ws.id,
        pb::ArchiveFormat::TarGzip,
        false,
        gz.finish().expect("gz"),
    )
    .await
    .expect_err("long name");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("extension header"), "{}", s.message());
    assert!(names(&mut c, &ws.id).await.is_empty());
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn listing_workspaces_pages_and_filters_by_owner_and_label() {
    let rig = rig().await;
    let mut alice = rig.client("alice-user").await;
    let mut bob = rig.client("bob-user").await;
    for i in 0..3 {
        let mut req = pb::CreateWorkspaceRequest::default();
        req.labels
            .insert("team".into(), if i == 0 { "red" } else { "blue" }.into());
        alice.create_workspace(req).await.expect("create");
    }
    workspace(&mut bob, vec![]).await;
    let page = alice
        .list_workspaces(pb::ListWorkspacesRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page.workspaces.len(), 2);
    let rest = alice
        .list_workspaces(pb::ListWorkspacesRequest {
            page_size: 2,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(rest.workspaces.len(), 1, "bob's is not listed for alice");
    assert!(rest.next_page_token.is_empty());
    let mut filter = pb::ListWorkspacesRequest::default();
    filter.labels.insert("team".into(), "blue".into());
    assert_eq!(
        alice
            .list_workspaces(filter)
            .await
            .expect("list")
            .into_inner()
            .workspaces
            .len(),
        2
    );
    let mut vera = rig.client("vera-viewer").await;
    let all = vera
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(all.workspaces.len(), 4);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn retention_removes_old_builds_and_idle_workspaces() {
    let rig = rig_with(|c| {
        c.retention.finished_builds = std::time::Duration::ZERO;
        c.retention.idle_workspaces = std::time::Duration::from_secs(1);
        c.retention.cleanup_interval = std::time::Duration::from_millis(50);
    })
    .await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let log = run(
        &mut c,
        build_req(&ws.id, vec![step(&["echo", "kept until retention"])]),
    )
    .await;
    assert_eq!(log.state(), pb::BuildState::Succeeded);
    let outputs = rig.data_dir.join("outputs");
    let output_files = move || {
        std::fs::read_dir(&outputs)
            .map(|d| d.filter_map(Result::ok).count())
            .unwrap_or(0)
    };
    let dir = rig.workspace_dir(&ws.id);
    // What a user sees first is NOT_FOUND; the files go right after the record.
    let mut seen = Ok(());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen.is_ok() && tokio::time::Instant::now() < deadline {
        seen = c
            .get_workspace(pb::GetWorkspaceRequest {
                workspace_id: ws.id.clone(),
            })
            .await
            .map(drop);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(seen.expect_err("gone").code(), Code::NotFound);
    eventually("the workspace directory is removed", || !dir.exists()).await;
    let mut remaining = 1;
    while remaining > 0 {
        remaining = c
            .list_builds(pb::ListBuildsRequest::default())
            .await
            .expect("list")
            .into_inner()
            .builds
            .len();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    eventually("the build's output file is removed with it", || {
        output_files() == 0
    })
    .await;
}
}

kiln_testkit::both_backends! {
/// Tier B cannot hide the host's process list (hidepid needs the host's root), so
/// GetPolicy says so rather than let a client believe its argv is private.
#[tokio::test]
async fn get_policy_says_what_tier_b_leaves_visible() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let rig = rig_at(dir.path(), |c| {
        c.sandbox.force_tier = Some(kiln_sandbox::Tier::B)
    })
    .await;
    let mut vera = rig.client("vera-viewer").await;
    let p = vera
        .get_policy(pb::GetPolicyRequest {})
        .await
        .expect("policy")
        .into_inner();
    assert_eq!(p.sandbox_tier, pb::SandboxTier::B as i32);
    let d = &p.sandbox_description;
    assert!(
        d.contains("process list") && d.contains("command line"),
        "{d}"
    );
    assert!(d.contains("unix sockets only as socketpair"), "{d}");
    assert_eq!(d.matches("tier B").count(), 1, "{d}");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn get_policy_describes_the_rules_and_the_sandbox() {
    let rig = rig().await;
    let mut vera = rig.client("vera-viewer").await;
    let p = vera
        .get_policy(pb::GetPolicyRequest {})
        .await
        .expect("policy")
        .into_inner();
    assert!(p.allowed_programs.contains(&"cargo".to_owned()));
    assert!(!p.allowed_programs.iter().any(|a| a == "sh" || a == "bash"));
    let mut sorted = p.allowed_programs.clone();
    sorted.sort();
    assert_eq!(sorted, p.allowed_programs);
    assert!(!p.allowed_env.iter().any(|e| e.starts_with("LD_")));
    assert_ne!(p.sandbox_tier, pb::SandboxTier::Unspecified as i32);
    let tier = if p.sandbox_tier == pb::SandboxTier::A as i32 {
        "tier A"
    } else {
        "tier B"
    };
    assert!(
        p.sandbox_description.starts_with(tier) && p.sandbox_description.matches(tier).count() == 1,
        "says its tier once: {}",
        p.sandbox_description
    );
    assert_eq!(p.max_steps, 64);
    assert_eq!(p.max_running_builds_per_user, 2);
    assert_eq!(
        p.default_limits.expect("defaults").output_bytes,
        Some(16 << 20)
    );
    eprintln!("tier: {}", p.sandbox_description);
}
}

/// The first answer of a server-streaming call: its error, whether it comes as the call's
/// status or as the stream's first item.
async fn stream_error<T: std::fmt::Debug>(
    call: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
) -> tonic::Status {
    match call {
        Err(s) => s,
        Ok(r) => r
            .into_inner()
            .message()
            .await
            .expect_err("the stream fails before any data"),
    }
}

kiln_testkit::both_backends! {
/// Ownership over every file RPC: another user gets NOT_FOUND (a workspace's existence
/// is not revealed), a viewer reads but cannot change, an admin does all — and nothing
/// bob tried changed alice's files.
#[tokio::test]
async fn another_users_workspace_is_not_found_for_every_file_rpc() {
    let rig = rig().await;
    let mut alice = rig.client("alice-user").await;
    let mut bob = rig.client("bob-user").await;
    let ws = workspace(&mut alice, vec![file("secret.txt", "alice's secret")]).await;
    let read = |ws: &str| pb::ReadFileRequest {
        workspace_id: ws.into(),
        path: "secret.txt".into(),
        ..Default::default()
    };
    let download = |ws: &str| pb::DownloadArchiveRequest {
        workspace_id: ws.into(),
        ..Default::default()
    };

    let mut refusals = vec![
        (
            "WriteFiles",
            bob.write_files(pb::WriteFilesRequest {
                workspace_id: ws.id.clone(),
                files: vec![file("secret.txt", "bob was here")],
                delete_paths: vec![],
            })
            .await
            .map(drop),
        ),
        (
            "WriteFiles (delete)",
            bob.write_files(pb::WriteFilesRequest {
                workspace_id: ws.id.clone(),
                files: vec![],
                delete_paths: vec!["secret.txt".into()],
            })
            .await
            .map(drop),
        ),
        (
            "ListFiles",
            bob.list_files(pb::ListFilesRequest {
                workspace_id: ws.id.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "UploadArchive",
            upload(
                &mut bob,
                &ws.id,
                pb::ArchiveFormat::Tar,
                true,
                vec![0; 1024],
            )
            .await
            .map(drop),
        ),
        (
            "DeleteWorkspace",
            bob.delete_workspace(pb::DeleteWorkspaceRequest {
                workspace_id: ws.id.clone(),
            })
            .await
            .map(drop),
        ),
    ];
    refusals.push((
        "ReadFile",
        Err(stream_error(bob.read_file(read(&ws.id)).await).await),
    ));
    refusals.push((
        "DownloadArchive",
        Err(stream_error(bob.download_archive(download(&ws.id)).await).await),
    ));
    for (rpc, answer) in refusals {
        let s = answer.expect_err(rpc);
        assert_eq!(s.code(), Code::NotFound, "{rpc}: {s:?}");
        assert!(
            !s.message().contains("secret"),
            "{rpc} leaks: {}",
            s.message()
        );
    }

    // A viewer reads everything and changes nothing (the USER access level refuses).
    let mut vera = rig.client("vera-viewer").await;
    let content = read_whole(&mut vera, &ws.id, "secret.txt").await;
    assert_eq!(content.expect("viewer reads"), b"alice's secret");
    let s = vera
        .write_files(pb::WriteFilesRequest {
            workspace_id: ws.id.clone(),
            files: vec![file("secret.txt", "vera was here")],
            delete_paths: vec![],
        })
        .await
        .expect_err("viewer cannot write");
    assert_eq!(s.code(), Code::PermissionDenied);

    // Nothing bob or vera tried changed alice's workspace.
    assert_eq!(names(&mut alice, &ws.id).await, ["secret.txt"]);
    let content = read_whole(&mut alice, &ws.id, "secret.txt").await;
    assert_eq!(content.expect("read"), b"alice's secret");

    // An admin may change and delete anyone's workspace.
    let mut adam = rig.client("adam-admin").await;
    adam.write_files(pb::WriteFilesRequest {
        workspace_id: ws.id.clone(),
        files: vec![file("by-admin.txt", "ok")],
        delete_paths: vec![],
    })
    .await
    .expect("admin writes");
    adam.delete_workspace(pb::DeleteWorkspaceRequest {
        workspace_id: ws.id.clone(),
    })
    .await
    .expect("admin deletes");
}
}

kiln_testkit::both_backends! {
/// Archives that are not what they claim: garbage, a tar cut off inside a file, a gzip
/// stream that breaks off, a tar sent as gzip. Each is INVALID_ARGUMENT with a reason,
/// and the workspace is exactly as before (an upload applies whole or not at all).
#[tokio::test]
async fn broken_archives_are_invalid_and_change_nothing() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![file("keep.txt", "kept")]).await;
    let whole = tar_of(&[("a.txt", &[b'a'; 4000]), ("b.txt", b"b")]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &whole).expect("gz");
    let gz = gz.finish().expect("gz");
    let cases: Vec<(&str, pb::ArchiveFormat, Vec<u8>)> = vec![
        (
            "garbage",
            pb::ArchiveFormat::Tar,
            b"this is not a tar archive at all".repeat(40),
        ),
        (
            "tar cut inside a file",
            pb::ArchiveFormat::Tar,
            whole[..1500].to_vec(),
        ),
        (
            "gzip cut short",
            pb::ArchiveFormat::TarGzip,
            gz[..gz.len() / 2].to_vec(),
        ),
        (
            "tar sent as gzip",
            pb::ArchiveFormat::TarGzip,
            whole.clone(),
        ),
    ];
    for (what, format, bytes) in cases {
        for replace in [false, true] {
            let s = upload(&mut c, &ws.id, format, replace, bytes.clone())
                .await
                .expect_err(what);
            assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
            let info = tonic_types::StatusExt::get_details_error_info(&s).expect("error info");
            assert!(!info.reason.is_empty(), "{what}: a reason");
            assert_eq!(
                names(&mut c, &ws.id).await,
                ["keep.txt"],
                "{what} (replace: {replace}) changed the workspace"
            );
        }
    }
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_workspace_name_is_unique_per_owner_and_accepted_for_its_id() {
    let rig = rig().await;
    let mut alice = rig.client("alice-user").await;
    let mut bob = rig.client("bob-user").await;
    let named = |name: &str| pb::CreateWorkspaceRequest {
        name: name.into(),
        files: vec![file("a.txt", "alpha")],
        ..Default::default()
    };
    let ws = alice
        .create_workspace(named("calc"))
        .await
        .expect("created")
        .into_inner();
    assert_eq!(ws.name, "calc");
    let s = alice
        .create_workspace(named("calc"))
        .await
        .expect_err("the name is taken");
    assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");
    assert_eq!(reason(&s), "WORKSPACE_NAME_TAKEN");
    // Another owner may use the same name; it names their own workspace.
    let bobs = bob
        .create_workspace(named("calc"))
        .await
        .expect("bob's own")
        .into_inner();
    assert_ne!(bobs.id, ws.id);
    // The name works where the id does: GetWorkspace, ListFiles, DeleteWorkspace.
    let got = alice
        .get_workspace(pb::GetWorkspaceRequest {
            workspace_id: "calc".into(),
        })
        .await
        .expect("by name")
        .into_inner();
    assert_eq!(got.id, ws.id);
    assert_eq!(names(&mut alice, "calc").await, ["a.txt"]);
    for bad in ["Calc", "-x", "a b", "0b9a5c3e-8a1f-4c1e-9c1a-1f2e3d4c5b6a"] {
        let s = alice
            .create_workspace(named(bad))
            .await
            .expect_err("a bad name is refused");
        assert_invalid(&s, Code::InvalidArgument, "INVALID_ARGUMENT", "name");
    }
    alice
        .delete_workspace(pb::DeleteWorkspaceRequest {
            workspace_id: "calc".into(),
        })
        .await
        .expect("deleted by name");
    // Bob's is untouched, and the name is free again for alice.
    let still = bob
        .get_workspace(pb::GetWorkspaceRequest {
            workspace_id: "calc".into(),
        })
        .await
        .expect("bob's stays")
        .into_inner();
    assert_eq!(still.id, bobs.id);
    alice
        .create_workspace(named("calc"))
        .await
        .expect("the name is free again");
}
}
