//! Escape attempts through the filesystem.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use kiln_sandbox::{Error, Limits, Reason, Sandbox, Tier};

/// A directory outside the workspace that everyone may read and write, so only the
/// sandbox stands between the step and it.
fn outside() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("kiln-outside-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "TOP-SECRET-7f3a").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o666)).unwrap();
    dir
}

const TRY_READ: &str = r#"
import sys
try:
    print("READ:" + open(sys.argv[1]).read())
except OSError as e:
    print("DENIED", e.errno)
"#;

const TRY_WRITE: &str = r#"
import sys
try:
    with open(sys.argv[1], "w") as f:
        f.write("pwned")
    print("WROTE")
except OSError as e:
    print("DENIED", e.errno)
"#;

fn py_args(ws: &Workspace, code: &str, arg: &str) -> kiln_sandbox::CommandSpec {
    spec(ws, &["/usr/bin/python3", "-I", "-S", "-c", code, arg])
}

async fn read_secret_outside_workspace(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let out_dir = outside();
    let secret = out_dir.path().join("secret");
    let (o, out, err) = run(s, py_args(&ws, TRY_READ, secret.to_str().unwrap())).await;
    assert!(o.success(), "{o:?} {err}");
    assert!(out.starts_with("DENIED"), "read the secret: {out}");
    // /etc/shadow-like files of the host are out of reach too.
    let (_, out, _) = run(s, py_args(&ws, TRY_READ, "/etc/shadow")).await;
    assert!(out.starts_with("DENIED"), "{out}");
}

async fn write_outside_workspace(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let out_dir = outside();
    let target = out_dir.path().join("written");
    let (o, out, err) = run(s, py_args(&ws, TRY_WRITE, target.to_str().unwrap())).await;
    assert!(o.success(), "{o:?} {err}");
    assert!(out.starts_with("DENIED"), "{out}");
    assert!(!target.exists());
    // System directories are read-only, /tmp is private (A) or closed (B).
    for path in ["/usr/kiln-pwned", "/etc/kiln-pwned", "/tmp/kiln-pwned"] {
        let (_, out, _) = run(s, py_args(&ws, TRY_WRITE, path)).await;
        if s.tier() == Tier::A && path.starts_with("/tmp") {
            assert_eq!(out.trim(), "WROTE", "private /tmp is writable");
        } else {
            assert!(out.starts_with("DENIED"), "{path}: {out}");
        }
        assert!(!Path::new(path).exists(), "{path} appeared on the host");
    }
    // The workspace itself is writable.
    let (_, out, _) = run(s, py_args(&ws, TRY_WRITE, "inside.txt")).await;
    assert_eq!(out.trim(), "WROTE");
    assert_eq!(
        std::fs::read_to_string(ws.join("inside.txt")).unwrap(),
        "pwned"
    );
}

async fn symlink_read_outside(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let out_dir = outside();
    std::os::unix::fs::symlink(out_dir.path().join("secret"), ws.join("link")).unwrap();
    std::os::unix::fs::symlink(out_dir.path(), ws.join("dirlink")).unwrap();
    for arg in ["link", "dirlink/secret"] {
        let (o, out, err) = run(s, py_args(&ws, TRY_READ, arg)).await;
        assert!(o.success(), "{o:?} {err}");
        assert!(out.starts_with("DENIED"), "followed {arg}: {out}");
    }
}

async fn symlink_write_outside(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let out_dir = outside();
    let target = out_dir.path().join("via-link");
    std::os::unix::fs::symlink(&target, ws.join("wlink")).unwrap();
    std::os::unix::fs::symlink(out_dir.path(), ws.join("dirlink")).unwrap();
    for arg in ["wlink", "dirlink/via-dir-link"] {
        let (o, out, err) = run(s, py_args(&ws, TRY_WRITE, arg)).await;
        assert!(o.success(), "{o:?} {err}");
        assert!(out.starts_with("DENIED"), "followed {arg}: {out}");
    }
    assert!(!target.exists());
    assert!(!out_dir.path().join("via-dir-link").exists());
}

async fn dotdot_working_dir(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    std::fs::create_dir(ws.join("sub")).unwrap();
    for bad in ["..", "sub/../..", "sub/..", "/etc"] {
        let err = s
            .spawn(spec(&ws, &["true"]).current_dir(bad))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidWorkingDir { .. }),
            "{bad}: {err}"
        );
        assert!(err.to_string().contains("working directory"), "{err}");
    }
    // A symlinked working directory that leaves the workspace is refused as well.
    std::os::unix::fs::symlink("/etc", ws.join("etc-link")).unwrap();
    let err = s
        .spawn(spec(&ws, &["true"]).current_dir("etc-link"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("leaves the workspace"), "{err}");
}

async fn disk_fill_bounded(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let limit = 16u64 << 20;
    let limits = Limits {
        disk_bytes: Some(limit),
        wall_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    // One huge file: RLIMIT_FSIZE makes the write fail (Python ignores SIGXFSZ).
    let code = r#"
import os
try:
    with open("big", "wb") as f:
        while True:
            f.write(b"x" * (1 << 20))
except OSError as e:
    print("EFBIG" if e.errno == 27 else e)
"#;
    let (o, out, err) = run(s, py(&ws, code).limits(limits.clone())).await;
    assert_eq!(out.trim(), "EFBIG", "{o:?} {err}");
    assert!(std::fs::metadata(ws.join("big")).unwrap().len() <= limit);
    std::fs::remove_file(ws.join("big")).unwrap();
    // Many files: the disk monitor kills the step.
    let code = r#"
i = 0
while True:
    with open("f%d" % i, "wb") as f:
        f.write(b"y" * (1 << 20))
    i += 1
"#;
    let (o, _, err) = run(s, py(&ws, code).limits(limits)).await;
    assert_eq!(o.reason, Reason::DiskLimit, "{o:?} {err}");
    let used: u64 = std::fs::read_dir(ws.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    // Bounded: the check runs every 100 ms; a writer overshoots by at most what it
    // writes in that time.
    assert!(used < limit + (512 << 20), "workspace grew to {used} bytes");
}

both_tiers!(
    read_secret_outside_workspace,
    write_outside_workspace,
    symlink_read_outside,
    symlink_write_outside,
    dotdot_working_dir,
    disk_fill_bounded,
);
