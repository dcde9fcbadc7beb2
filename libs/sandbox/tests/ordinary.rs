//! Ordinary behaviour: exit codes, signals, output, stdin, working directory, environment,
//! cancellation, spawn failures.

mod common;

use std::time::Duration;

use common::*;
use kiln_sandbox::{ExitStatus, Limits, Reason, Sandbox, Stream, Tier};

async fn exit_code(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let (o, out, err) = run(s, sh(&ws, "echo hello; echo oops >&2; exit 7")).await;
    assert_eq!(o.reason, Reason::Exited, "{o:?} {err}");
    assert_eq!(o.status, ExitStatus::Code(7), "{o:?} {err}");
    assert_eq!(out, "hello\n");
    assert_eq!(err, "oops\n");
    let (o, _, _) = run(s, spec(&ws, &["true"])).await;
    assert!(o.success(), "{o:?}");
}

async fn killed_by_signal(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let (o, _, err) = run(s, sh(&ws, "kill -SEGV $$")).await;
    assert_eq!(o.reason, Reason::Exited, "{o:?} {err}");
    assert_eq!(o.status, ExitStatus::Signal(11), "{o:?}");
}

async fn large_output_both_streams(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let code = r#"
import os
o, e = b"o" * 65536, b"e" * 65536
for _ in range(128):
    os.write(1, o)
    os.write(2, e)
"#;
    let limits = Limits {
        output_bytes: Some(64 << 20),
        ..Limits::default()
    };
    let mut child = s.spawn(py(&ws, code).limits(limits)).await.unwrap();
    let mut rx = child.take_output().unwrap();
    let reader = tokio::spawn(async move {
        let mut next = [0u64; 2];
        while let Some(chunk) = rx.recv().await {
            let i = (chunk.stream == Stream::Stderr) as usize;
            assert_eq!(chunk.offset, next[i], "offsets are contiguous");
            let want = if i == 0 { b'o' } else { b'e' };
            assert!(chunk.data.iter().all(|b| *b == want));
            assert!(!chunk.data.is_empty() && chunk.data.len() <= kiln_sandbox::MAX_CHUNK);
            next[i] += chunk.data.len() as u64;
        }
        next
    });
    let o = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap();
    let totals = reader.await.unwrap();
    assert!(o.success(), "{o:?}");
    assert_eq!(totals, [8 << 20, 8 << 20]);
    assert_eq!((o.stdout_bytes, o.stderr_bytes), (8 << 20, 8 << 20));
}

async fn stdin_is_closed(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let (o, out, _) = run(s, sh(&ws, "if read line; then echo got; else echo eof; fi")).await;
    assert!(o.success(), "{o:?}");
    assert_eq!(out, "eof\n");
}

async fn working_dir_and_env_exactly(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    std::fs::create_dir_all(ws.join("sub/dir")).unwrap();
    s.prepare_workspace(ws.path()).unwrap();
    let spec = spec(&ws, &["/usr/bin/env"])
        .current_dir("sub/dir")
        .env("FOO", "bar baz")
        .env("EMPTY", "");
    let (o, out, _) = run(s, spec).await;
    assert!(o.success(), "{o:?}");
    assert_eq!(out, format!("PATH={PATH}\nFOO=bar baz\nEMPTY=\n"));
    let (o, out, _) = run(
        s,
        common::spec(&ws, &["/bin/pwd", "-P"]).current_dir("sub/dir"),
    )
    .await;
    assert!(o.success(), "{o:?}");
    let expected = s.workspace_in_sandbox(ws.path()).join("sub/dir");
    assert_eq!(out.trim(), expected.to_str().unwrap());
}

async fn program_not_found(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let (o, _, _) = run(s, spec(&ws, &["kiln-no-such-program"])).await;
    assert_eq!(o.reason, Reason::SpawnFailed, "{o:?}");
    assert_eq!(o.status, ExitStatus::NotStarted);
    assert!(o.message.as_deref().unwrap().contains("not found"), "{o:?}");
}

/// Waits for "ready" on stdout, then cancels; returns the outcome and all stdout.
async fn cancel_after_ready(
    s: &Sandbox,
    ws: &Workspace,
    code: &str,
) -> (kiln_sandbox::Outcome, String) {
    let mut child = s.spawn(py(ws, code)).await.unwrap();
    let mut rx = child.take_output().unwrap();
    let control = child.control();
    let wait = tokio::spawn(child.wait());
    let mut out = String::new();
    while let Some(chunk) = rx.recv().await {
        out.push_str(&String::from_utf8_lossy(&chunk.data));
        if out.contains("ready") {
            control.cancel();
        }
    }
    let o = tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap()
        .unwrap();
    (o, out)
}

async fn cancel_terminates_then_kills(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let polite = r#"
import signal, sys, os
def term(*_):
    os.write(1, b"got-term\n")
    os._exit(3)
signal.signal(signal.SIGTERM, term)
os.write(1, b"ready\n")
while True:
    signal.pause()
"#;
    let (o, out) = cancel_after_ready(s, &ws, polite).await;
    assert_eq!(o.reason, Reason::Cancelled, "{o:?}");
    assert_eq!(o.status, ExitStatus::Code(3), "{o:?}");
    assert!(out.contains("got-term"), "{out}");
    let stubborn = r#"
import signal, os
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.write(1, b"ready\n")
while True:
    signal.pause()
"#;
    let (o, _) = cancel_after_ready(s, &ws, stubborn).await;
    assert_eq!(o.reason, Reason::Cancelled, "{o:?}");
    assert_eq!(o.status, ExitStatus::Signal(9), "{o:?}");
}

both_tiers!(
    exit_code,
    killed_by_signal,
    large_output_both_streams,
    stdin_is_closed,
    working_dir_and_env_exactly,
    program_not_found,
    cancel_terminates_then_kills,
);

#[test]
fn no_isolation_is_refused_unless_allowed() {
    let probe = kiln_sandbox::probe();
    let mut crippled = probe.clone();
    crippled.tier = Tier::None;
    crippled.landlock_abi = 0;
    crippled.namespaces = Err("test".into());
    let err =
        Sandbox::with_probe(kiln_sandbox::SandboxConfig::default(), crippled.clone()).unwrap_err();
    assert!(err.to_string().contains("refusing"), "{err}");
    let allowed = kiln_sandbox::SandboxConfig {
        allow_unsandboxed: true,
        ..Default::default()
    };
    assert_eq!(
        Sandbox::with_probe(allowed, crippled).unwrap().tier(),
        Tier::None
    );
}

#[test]
fn probe_reports_tier_a_in_ci() {
    let probe = kiln_sandbox::probe();
    println!("{probe}");
    if std::env::var_os("CI").is_some() || std::env::var_os("KILN_SANDBOX_REQUIRE_TIER_A").is_some()
    {
        assert_eq!(probe.tier, Tier::A, "{probe}");
    }
}

/// As root, tier B steps run as `nobody` and open the workspace by its host path: a data
/// directory under a 0700 parent must be refused up front, naming that parent.
#[test]
fn a_workspace_root_the_step_user_cannot_reach_is_named() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: steps run as the service's own uid when it is not root");
        return;
    }
    let top = tempfile::tempdir().expect("tempdir");
    let locked = top.path().join("home-0700");
    let open = top.path().join("srv");
    for dir in [&locked, &open] {
        std::fs::create_dir_all(dir.join("kiln/workspaces")).expect("mkdir");
    }
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let behind_locked = locked.join("kiln/workspaces");
    if let Some(b) = sandbox(Tier::B) {
        let err = b.check_reachable(&behind_locked).expect_err("unreachable");
        let msg = err.to_string();
        assert!(msg.contains("home-0700") && msg.contains("0700"), "{msg}");
        b.check_reachable(&open.join("kiln/workspaces"))
            .expect("a traversable path is fine");
    }
    if let Some(a) = sandbox(Tier::A) {
        a.check_reachable(&behind_locked)
            .expect("tier A bind-mounts the workspace: the host path does not matter");
    }
}

/// What the service writes into a workspace between builds (as root) becomes the step
/// user's, also inside directories earlier steps created and already own.
#[test]
fn prepare_gives_new_files_in_owned_directories_to_the_step_user() {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: nothing to hand over when the service is not root");
        return;
    }
    let Some(s) = sandbox(Tier::B) else { return };
    let ws = Workspace::new(&s);
    let owner = std::fs::metadata(ws.path()).unwrap().uid();
    assert_ne!(owner, 0, "the workspace is the step user's");
    std::fs::create_dir_all(ws.join("out")).unwrap();
    s.prepare_workspace(ws.path()).unwrap();
    std::fs::write(ws.join("out/new-from-the-api.txt"), "x").unwrap();
    std::fs::create_dir(ws.join("out/new-dir")).unwrap();
    s.prepare_workspace(ws.path()).unwrap();
    for p in ["out", "out/new-from-the-api.txt", "out/new-dir"] {
        assert_eq!(
            std::fs::symlink_metadata(ws.join(p)).unwrap().uid(),
            owner,
            "{p}"
        );
    }
}
