//! Real projects built from a workspace in the real sandbox; output checked byte for byte.

mod common;

use common::*;
use kiln_proto::build as pb;

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_c_project_compiles_and_runs() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(
        &mut c,
        vec![
            file("hello.c", "#include <stdio.h>\nint main(void) { printf(\"hello from C\\n\"); fprintf(stderr, \"warn\\n\"); return 0; }\n"),
            file("Makefile", "run: hello\n\t./hello\n"),
        ],
    )
    .await;
    let log = run(
        &mut c,
        build_req(
            &ws.id,
            vec![
                step(&["cc", "-Wall", "-o", "hello", "hello.c"]),
                step(&["make", "-s", "run"]),
            ],
        ),
    )
    .await;
    assert_eq!(
        log.state(),
        pb::BuildState::Succeeded,
        "{:?}",
        log.finished()
    );
    assert_eq!(log.stdout(0), b"");
    assert_eq!(log.stdout(1), b"hello from C\n");
    assert_eq!(log.stderr(1), b"warn\n");
    log.assert_dense_from(1);
    let results = log.step_results();
    assert_eq!(results.len(), 2);
    assert!(
        results
            .iter()
            .all(|r| r.succeeded && r.exit_code == Some(0))
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_python_project_runs() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(
        &mut c,
        vec![
            file("pkg/__init__.py", ""),
            file("pkg/calc.py", "def add(a, b):\n    return a + b\n"),
            file(
                "main.py",
                "from pkg.calc import add\nprint('sum', add(2, 3))\n",
            ),
        ],
    )
    .await;
    let log = run(
        &mut c,
        build_req(&ws.id, vec![step(&["python3", "main.py"])]),
    )
    .await;
    assert_eq!(
        log.state(),
        pb::BuildState::Succeeded,
        "{:?}",
        log.finished()
    );
    assert_eq!(log.stdout(0), b"sum 5\n");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_rust_project_compiles_and_runs() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(
        &mut c,
        vec![
            file(
                "Cargo.toml",
                "[package]\nname = \"hello\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
            ),
            file(
                "src/main.rs",
                "fn main() { println!(\"hello from Rust\"); }\n",
            ),
        ],
    )
    .await;
    let log = run(
        &mut c,
        build_req(
            &ws.id,
            vec![step(&["cargo", "run", "--quiet", "--offline"])],
        ),
    )
    .await;
    assert_eq!(
        log.state(),
        pb::BuildState::Succeeded,
        "{:?} stderr: {}",
        log.finished(),
        String::from_utf8_lossy(&log.stderr(0))
    );
    assert_eq!(log.stdout(0), b"hello from Rust\n");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn stdout_and_stderr_are_kept_apart_and_in_order() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let code = "import sys\nfor i in range(2000):\n    sys.stdout.write(f'out {i}\\n'); sys.stdout.flush()\n    sys.stderr.write(f'err {i}\\n'); sys.stderr.flush()\n";
    let log = run(
        &mut c,
        build_req(&ws.id, vec![step(&["python3", "-c", code])]),
    )
    .await;
    assert_eq!(log.state(), pb::BuildState::Succeeded);
    let out: String = (0..2000).map(|i| format!("out {i}\n")).collect();
    let err: String = (0..2000).map(|i| format!("err {i}\n")).collect();
    assert_eq!(String::from_utf8(log.stdout(0)).expect("utf8"), out);
    assert_eq!(String::from_utf8(log.stderr(0)).expect("utf8"), err);
    for e in &log.events {
        if let Some(pb::build_event::Event::Output(o)) = &e.event {
            assert!(!o.data.is_empty() && o.data.len() <= 32 * 1024);
        }
    }
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_failing_step_fails_the_build_unless_allowed() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let mut tolerated = step(&["false"]);
    tolerated.allow_failure = true;
    let log = run(
        &mut c,
        build_req(
            &ws.id,
            vec![tolerated, step(&["false"]), step(&["echo", "never"])],
        ),
    )
    .await;
    assert_eq!(log.state(), pb::BuildState::Failed);
    let results = log.step_results();
    assert_eq!(results.len(), 2, "the third step never ran");
    assert!(results[0].succeeded && results[0].exit_code == Some(1));
    assert!(!results[1].succeeded);
    assert!(
        log.finished().message.contains("exited with code 1"),
        "{:?}",
        log.finished()
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_command_string_is_split_without_a_shell() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let s = pb::Step {
        command: Some("echo 'a  b' \"$HOME\" ; x".into()),
        ..Default::default()
    };
    let log = run(&mut c, build_req(&ws.id, vec![s])).await;
    assert_eq!(log.state(), pb::BuildState::Succeeded);
    assert_eq!(log.stdout(0), b"a  b $HOME ; x\n");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn the_environment_is_cleared_and_fixed() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    // `cat` of the kernel's copy: `env` is an exec wrapper, off the default allowlist.
    let mut req = build_req(&ws.id, vec![step(&["cat", "/proc/self/environ"])]);
    req.env.insert("RUST_BACKTRACE".into(), "1".into());
    let log = run(&mut c, req).await;
    let env = String::from_utf8(log.stdout(0)).expect("utf8");
    let names: Vec<&str> = env
        .split('\0')
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    assert!(
        names.contains(&"PATH") && names.contains(&"HOME") && names.contains(&"RUST_BACKTRACE"),
        "{env}"
    );
    for name in &names {
        assert!(
            ["PATH", "HOME", "RUST_BACKTRACE", "RUSTUP_HOME"].contains(name),
            "unexpected {name} in {env}"
        );
    }
}
}

kiln_testkit::both_backends! {
/// Tier B (what an unprivileged Kubernetes pod gets): no private /tmp, and landlock lets
/// a step write only its workspace, so compilers and `tempfile` must get a TMPDIR inside
/// it; the scratch files do not stay behind.
#[tokio::test]
async fn in_tier_b_a_c_build_and_temporary_files_work() {
    use std::os::unix::fs::PermissionsExt;
    // As root the step runs as nobody, which must be able to reach the workspace.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let rig = rig_at(dir.path(), |c| {
        c.sandbox.force_tier = Some(kiln_sandbox::Tier::B)
    })
    .await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(
        &mut c,
        vec![
            file("hello.c", "#include <stdio.h>\nint main(void) { puts(\"hello from tier B\"); return 0; }\n"),
            file("Makefile", "run: hello\n\t./hello\n"),
            file("tmp.py", "import tempfile\nwith tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n    print('temp file ok')\n"),
        ],
    )
    .await;
    let log = run(
        &mut c,
        build_req(
            &ws.id,
            vec![
                step(&["cc", "-o", "hello", "hello.c"]),
                step(&["make", "-s", "run"]),
                step(&["python3", "tmp.py"]),
            ],
        ),
    )
    .await;
    assert_eq!(
        log.state(),
        pb::BuildState::Succeeded,
        "{:?} {:?}",
        log.finished(),
        log.step_results()
    );
    assert_eq!(log.stdout(1), b"hello from tier B\n");
    assert_eq!(log.stdout(2), b"temp file ok\n");
    assert!(
        !rig.workspace_dir(&ws.id).join(".kiln-tmp").exists(),
        "scratch files are removed"
    );
}
}
