//! Every kind of bad input answers with the right code, reason and field violation.

mod common;

use common::*;
use kiln_proto::build as pb;
use tonic::Code;

async fn create_err(c: &mut Client, files: Vec<pb::File>) -> tonic::Status {
    c.create_workspace(pb::CreateWorkspaceRequest {
        files,
        ..Default::default()
    })
    .await
    .expect_err("refused")
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn absolute_paths_are_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let s = create_err(&mut c, vec![file("ok.txt", "x"), file("/etc/passwd", "x")]).await;
    assert_invalid(&s, Code::InvalidArgument, "INVALID_PATH", "files[1].path");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn dot_dot_is_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let s = create_err(&mut c, vec![file("a/../../b", "x")]).await;
    assert_invalid(&s, Code::InvalidArgument, "INVALID_PATH", "files[0].path");
    let ws = workspace(&mut c, vec![]).await;
    let s = c
        .write_files(pb::WriteFilesRequest {
            workspace_id: ws.id,
            delete_paths: vec!["..".into()],
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_invalid(&s, Code::InvalidArgument, "INVALID_PATH", "delete_paths[0]");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn nul_bytes_are_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let s = create_err(&mut c, vec![file("a\0b", "x")]).await;
    assert_invalid(&s, Code::InvalidArgument, "INVALID_PATH", "files[0].path");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn over_long_names_are_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let s = create_err(&mut c, vec![file(&"n".repeat(256), "x")]).await;
    assert_invalid(&s, Code::InvalidArgument, "INVALID_PATH", "files[0].path");
    let s = create_err(
        &mut c,
        vec![file("d/".repeat(600).trim_end_matches('/'), "x")],
    )
    .await;
    assert_invalid(&s, Code::InvalidArgument, "INVALID_PATH", "files[0].path");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn duplicate_paths_in_one_request_are_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let s = create_err(&mut c, vec![file("a", "1"), file("a", "2")]).await;
    assert_invalid(&s, Code::InvalidArgument, "INVALID_PATH", "files[1].path");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn writing_through_a_symlink_is_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    // A build leaves a symlink pointing outside the workspace.
    let log = run(
        &mut c,
        build_req(
            &ws.id,
            vec![step(&[
                "python3",
                "-c",
                "import os; os.symlink('/tmp', 'out')",
            ])],
        ),
    )
    .await;
    assert_eq!(log.state(), pb::BuildState::Succeeded);
    let s = c
        .write_files(pb::WriteFilesRequest {
            workspace_id: ws.id.clone(),
            files: vec![file("out/escaped.txt", "x")],
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_invalid(&s, Code::InvalidArgument, "INVALID_PATH", "files[0].path");
    let s = c
        .read_file(pb::ReadFileRequest {
            workspace_id: ws.id,
            path: "out".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert_eq!(reason(&s), "NOT_A_REGULAR_FILE");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn an_empty_argv_is_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let s = c
        .start_build(build_req(&ws.id, vec![step(&["true"]), step(&[])]))
        .await
        .expect_err("refused");
    assert_invalid(
        &s,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
        "steps[1].argv",
    );
    let s = c
        .start_build(build_req(&ws.id, vec![]))
        .await
        .expect_err("refused");
    assert_invalid(&s, Code::InvalidArgument, "INVALID_ARGUMENT", "steps");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_program_off_the_allowlist_is_permission_denied_with_the_list() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    for argv in [&["sh", "-c", "id"][..], &["/bin/sh"][..], &["bash"][..]] {
        let s = c
            .start_build(build_req(&ws.id, vec![step(argv)]))
            .await
            .expect_err("refused");
        assert_invalid(
            &s,
            Code::PermissionDenied,
            "PROGRAM_NOT_ALLOWED",
            "steps[0].argv[0]",
        );
        let details = tonic_types::StatusExt::get_error_details(&s);
        let allowed = &details.error_info().expect("info").metadata["allowed_programs"];
        assert!(allowed.split(',').any(|p| p == "cargo"), "{allowed}");
        assert!(!allowed.split(',').any(|p| p == "sh"), "{allowed}");
    }
    let cmd = pb::Step {
        command: Some("bash -c id".into()),
        ..Default::default()
    };
    let s = c
        .start_build(build_req(&ws.id, vec![cmd]))
        .await
        .expect_err("refused");
    assert_invalid(
        &s,
        Code::PermissionDenied,
        "PROGRAM_NOT_ALLOWED",
        "steps[0].command[0]",
    );
}
}

kiln_testkit::both_backends! {
/// An exec wrapper must not smuggle a shell past the allowlist: `env` is off the default
/// list, and a wrapper an operator does allow (`nice`, `timeout`, `find -exec`) has the
/// program it would run checked too.
#[tokio::test]
async fn an_exec_wrapper_does_not_bypass_the_allowlist() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let s = c
        .start_build(build_req(&ws.id, vec![step(&["env", "sh", "-c", "id"])]))
        .await
        .expect_err("refused");
    assert_invalid(
        &s,
        Code::PermissionDenied,
        "PROGRAM_NOT_ALLOWED",
        "steps[0].argv[0]",
    );

    let rig = rig_with(|c| {
        for p in ["env", "nice", "timeout"] {
            c.policy.allowed_programs.insert(p.into());
        }
    })
    .await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    for (argv, field) in [
        (&["env", "sh", "-c", "id"][..], "steps[0].argv[1]"),
        (&["env", "-i", "A=1", "bash"][..], "steps[0].argv[3]"),
        (&["env", "-S", "sh -c id"][..], "steps[0].argv[1]"),
        (&["nice", "-n", "5", "env", "sh"][..], "steps[0].argv[4]"),
        (&["timeout", "5", "sh", "-c", "id"][..], "steps[0].argv[2]"),
        (
            &[
                "find",
                ".",
                "-maxdepth",
                "0",
                "-exec",
                "sh",
                "-c",
                "id",
                ";",
            ][..],
            "steps[0].argv[5]",
        ),
    ] {
        let s = c
            .start_build(build_req(&ws.id, vec![step(argv)]))
            .await
            .expect_err("refused");
        assert_invalid(&s, Code::PermissionDenied, "PROGRAM_NOT_ALLOWED", field);
    }
    // Wrapping an allowed program is fine.
    let log = run(
        &mut c,
        build_req(
            &ws.id,
            vec![step(&["timeout", "30", "env", "-i", "echo", "ok"])],
        ),
    )
    .await;
    assert_eq!(log.state(), pb::BuildState::Succeeded);
    assert_eq!(log.stdout(0), b"ok\n");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn an_unsplittable_command_is_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let cmd = pb::Step {
        command: Some("echo 'unterminated".into()),
        ..Default::default()
    };
    let s = c
        .start_build(build_req(&ws.id, vec![cmd]))
        .await
        .expect_err("refused");
    assert_invalid(
        &s,
        Code::InvalidArgument,
        "INVALID_COMMAND",
        "steps[0].command",
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_huge_argv_is_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let big = "x".repeat(70 * 1024);
    let s = c
        .start_build(build_req(&ws.id, vec![step(&["echo", &big])]))
        .await
        .expect_err("refused");
    assert_invalid(
        &s,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
        "steps[0].argv",
    );
    let many: Vec<&str> = std::iter::once("echo")
        .chain(std::iter::repeat_n("a", 2000))
        .collect();
    let s = c
        .start_build(build_req(&ws.id, vec![step(&many)]))
        .await
        .expect_err("refused");
    assert_invalid(
        &s,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
        "steps[0].argv",
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn forbidden_env_names_are_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    for name in [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "KILN_SECRET",
        "PATH",
        "HOME",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        let mut req = build_req(&ws.id, vec![step(&["true"])]);
        req.env.insert(name.into(), "x".into());
        let s = c.start_build(req).await.expect_err(name);
        assert_invalid(
            &s,
            Code::InvalidArgument,
            "ENV_NOT_ALLOWED",
            &format!("env.{name}"),
        );
    }
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn limits_above_the_maximum_are_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let mut req = build_req(&ws.id, vec![step(&["true"])]);
    req.limits = Some(pb::Limits {
        memory_bytes: Some(1 << 40),
        wall_timeout: Some(prost_types::Duration {
            seconds: 100_000,
            nanos: 0,
        }),
        ..Default::default()
    });
    let s = c.start_build(req).await.expect_err("refused");
    assert_invalid(
        &s,
        Code::InvalidArgument,
        "LIMIT_TOO_HIGH",
        "limits.memory_bytes",
    );
    assert_invalid(
        &s,
        Code::InvalidArgument,
        "LIMIT_TOO_HIGH",
        "limits.wall_timeout",
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn too_many_steps_are_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let steps = (0..65).map(|_| step(&["true"])).collect();
    let s = c
        .start_build(build_req(&ws.id, steps))
        .await
        .expect_err("refused");
    assert_invalid(&s, Code::InvalidArgument, "INVALID_ARGUMENT", "steps");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn unknown_ids_are_not_found() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let unknown = "00000000-0000-0000-0000-000000000000".to_owned();
    let s = c
        .start_build(build_req(&unknown, vec![step(&["true"])]))
        .await
        .expect_err("refused");
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .get_workspace(pb::GetWorkspaceRequest {
            workspace_id: unknown.clone(),
        })
        .await
        .expect_err("nf");
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .get_build(pb::GetBuildRequest {
            build_id: unknown.clone(),
        })
        .await
        .expect_err("nf");
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .watch_build(pb::WatchBuildRequest {
            build_id: unknown.clone(),
            after_sequence: 0,
        })
        .await
        .expect_err("nf");
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .cancel_build(pb::CancelBuildRequest {
            build_id: unknown,
            grace_period: None,
        })
        .await
        .expect_err("nf");
    assert_eq!(s.code(), Code::NotFound);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_reused_request_id_with_other_parameters_is_refused() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let mut req = build_req(&ws.id, vec![step(&["true"])]);
    req.request_id = "7d2c4f8e-0000-4000-8000-000000000001".into();
    let first = c
        .start_build(req.clone())
        .await
        .expect("started")
        .into_inner();
    let again = c
        .start_build(req.clone())
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        first.id, again.id,
        "same request_id + same parameters → same build"
    );
    req.steps = vec![step(&["false"])];
    let s = c.start_build(req).await.expect_err("refused");
    assert_invalid(&s, Code::InvalidArgument, "REQUEST_ID_REUSED", "request_id");

    let wreq = pb::CreateWorkspaceRequest {
        request_id: "7d2c4f8e-0000-4000-8000-000000000002".into(),
        files: vec![file("a", "1")],
        ..Default::default()
    };
    let w1 = c
        .create_workspace(wreq.clone())
        .await
        .expect("created")
        .into_inner();
    let w2 = c
        .create_workspace(wreq.clone())
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(w1.id, w2.id);
    let mut other = wreq;
    other.files = vec![file("a", "2")];
    let s = c.create_workspace(other).await.expect_err("refused");
    assert_invalid(&s, Code::InvalidArgument, "REQUEST_ID_REUSED", "request_id");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_workspace_over_its_quota_is_refused_and_unchanged() {
    let rig = rig_with(|c| {
        c.workspace.max_bytes = 1000;
        c.workspace.max_files = 3;
    })
    .await;
    let mut c = rig.client("alice-user").await;
    let s = create_err(&mut c, vec![file("big", vec![b'x'; 2000])]).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(reason(&s), "WORKSPACE_TOO_LARGE");
    let ws = workspace(&mut c, vec![file("a", "1"), file("b", "2")]).await;
    let s = c
        .write_files(pb::WriteFilesRequest {
            workspace_id: ws.id.clone(),
            files: vec![file("c", "3"), file("d", "4"), file("e", "5")],
            delete_paths: vec!["a".into()],
        })
        .await
        .expect_err("over the file count");
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert_eq!(reason(&s), "WORKSPACE_TOO_LARGE");
    // All or nothing: `a` is still there, `c` and `d` are not.
    let files = c
        .list_files(pb::ListFilesRequest {
            workspace_id: ws.id,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .files;
    let names: Vec<_> = files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}
}
