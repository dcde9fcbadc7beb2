use std::os::unix::fs::symlink;

use super::*;
use crate::config::WorkspaceLimits;
use crate::error::BuildError;
use crate::paths::{self, NoDir, Parents};

struct Tree {
    _tmp: tempfile::TempDir,
    ws: std::path::PathBuf,
    outside: std::path::PathBuf,
}

/// A workspace `ws` with `d/inner.txt`, and next to it a directory `outside` holding
/// `secret.txt`, which nothing may reach from `ws`.
fn tree() -> Tree {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ws = tmp.path().join("ws");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(ws.join("d")).expect("ws");
    std::fs::write(ws.join("d/inner.txt"), "inner").expect("inner");
    std::fs::create_dir(&outside).expect("outside");
    std::fs::write(outside.join("secret.txt"), "SECRET").expect("secret");
    Tree {
        _tmp: tmp,
        ws,
        outside,
    }
}

fn root(t: &Tree) -> Arc<Dir> {
    Arc::new(Dir::open(&t.ws).expect("root"))
}

fn rel(s: &str) -> paths::RelPath {
    paths::check("p", s, &WorkspaceLimits::default(), true).expect("valid")
}

fn invalid_why(e: BuildError) -> String {
    match e {
        BuildError::Api(a) => a.message().to_owned(),
        other => panic!("want an API error: {other:?}"),
    }
}

#[test]
fn a_symlink_in_the_middle_is_refused() {
    let t = tree();
    symlink(&t.outside, t.ws.join("link")).expect("symlink");
    let root = root(&t);
    let e = paths::resolve(&root, &rel("link/secret.txt"), "p", Parents::Existing)
        .expect_err("refused");
    assert!(invalid_why(e).contains("symbolic link"));
    // Creating parents does not go through it either.
    let e = paths::resolve(&root, &rel("link/new/x"), "p", Parents::Create).expect_err("refused");
    assert!(invalid_why(e).contains("symbolic link"));
    assert!(!t.outside.join("new").exists());
    // Nor does opening a directory, nor io-level traversal.
    let e = paths::open_dir(&root, &rel("link/x"), "p").expect_err("refused");
    assert!(invalid_why(e).contains("symbolic link"));
    assert!(root.dir_path(["link"]).is_err());
}

#[test]
fn a_symlink_at_the_end_is_seen_as_a_symlink() {
    let t = tree();
    symlink(t.outside.join("secret.txt"), t.ws.join("f")).expect("symlink");
    symlink(&t.outside, t.ws.join("l")).expect("symlink");
    let root = root(&t);
    let e = root.open_file("f").expect_err("O_NOFOLLOW");
    assert!(is(&e, Errno::LOOP), "{e}");
    assert_eq!(root.stat("f").expect("lstat").kind, Kind::Symlink);
    assert_eq!(
        root.read_link("f").expect("readlink"),
        t.outside.join("secret.txt").into_os_string()
    );
    assert_eq!(
        paths::open_dir(&root, &rel("l"), "p")
            .expect("parents fine")
            .err(),
        Some(NoDir::NotADirectory)
    );
    // A walk lists both as symlinks and enters neither.
    let mut seen = Vec::new();
    walk(&root, &mut |e| {
        seen.push((String::from_utf8_lossy(e.path).into_owned(), e.meta.kind));
        Ok(())
    })
    .expect("walk");
    assert_eq!(
        seen,
        vec![
            ("d".to_owned(), Kind::Dir),
            ("d/inner.txt".to_owned(), Kind::File),
            ("f".to_owned(), Kind::Symlink),
            ("l".to_owned(), Kind::Symlink),
        ]
    );
}

#[test]
fn a_directory_swapped_for_a_symlink_between_calls_is_not_followed() {
    let t = tree();
    let root = root(&t);
    // Resolved while `d` is a directory...
    let r = paths::resolve(&root, &rel("d/inner.txt"), "p", Parents::Existing).expect("resolve");
    // ...then `d` becomes a symlink to the outside (what a build can do at any time).
    std::fs::rename(t.ws.join("d"), t.ws.join("d.old")).expect("move");
    symlink(&t.outside, t.ws.join("d")).expect("symlink");
    // The descriptor still names the original directory: no secret through it.
    let mut content = String::new();
    io::Read::read_to_string(
        &mut r.parent.open_file("inner.txt").expect("open"),
        &mut content,
    )
    .expect("read");
    assert_eq!(content, "inner");
    assert!(r.parent.open_file("secret.txt").is_err());
    // A fresh resolution refuses the symlink.
    let e =
        paths::resolve(&root, &rel("d/secret.txt"), "p", Parents::Existing).expect_err("refused");
    assert!(invalid_why(e).contains("symbolic link"));
    // And a walk of the root lists `d` as a symlink, nothing below it.
    let mut paths_seen = Vec::new();
    walk(&root, &mut |e| {
        paths_seen.push(String::from_utf8_lossy(e.path).into_owned());
        Ok(())
    })
    .expect("walk");
    assert!(
        !paths_seen.iter().any(|p| p.contains("secret")),
        "{paths_seen:?}"
    );
}

#[test]
fn names_that_leave_the_directory_are_refused() {
    let t = tree();
    let root = root(&t);
    for bad in ["", ".", "..", "d/inner.txt", "../outside"] {
        assert!(root.stat(bad).is_err(), "{bad:?}");
        assert!(root.dir(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn remove_tree_removes_a_symlink_not_its_target() {
    let t = tree();
    symlink(&t.outside, t.ws.join("d/link")).expect("symlink");
    let root = root(&t);
    root.remove_tree("d").expect("remove");
    assert!(!t.ws.join("d").exists());
    assert!(t.outside.join("secret.txt").exists());
}
