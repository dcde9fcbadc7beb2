//! `kiln workspace` as a user iterating on a real tree would use it (issue 11, items 4,
//! 5 and 11): names, push, label filters, what an upload sends (symlinks, sparse files,
//! `.env`, ignored paths, limits) and getting part of a tree back out.

mod common;

use std::path::Path;
use std::process::Output;

use common::{Cli, Suite};
use serde_json::Value;

fn logged_in(suite: &Suite) -> Cli<'_> {
    let cli = Cli::new(suite);
    cli.login_admin();
    cli
}

/// Writes `files` (creating their directories) under `root`.
fn write_tree(root: &Path, files: &[(&str, &str)]) {
    for (name, content) in files {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, content).expect("write");
    }
}

fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The `path`s of `kiln workspace ls W -o json`, sorted.
fn paths(cli: &Cli<'_>, workspace: &str) -> Vec<String> {
    let listed = json(&cli.ok(&["workspace", "ls", workspace, "-o", "json"]));
    let mut paths: Vec<String> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|f| f["path"].as_str().expect("path").to_owned())
        .collect();
    paths.sort();
    paths
}

fn workspace_count(cli: &Cli<'_>) -> usize {
    json(&cli.ok(&["workspace", "ls", "-o", "json"]))["workspaces"]
        .as_array()
        .expect("array")
        .len()
}

#[test]
fn push_syncs_a_named_workspace_in_one_change_and_builds_from_it() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let src = tempfile::tempdir().expect("tempdir");
    write_tree(src.path(), &[("a.txt", "one\n"), ("b.txt", "gone soon\n")]);
    let id = cli
        .ok(&[
            "workspace",
            "create",
            "--name",
            "calc",
            "--from",
            utf8(src.path()),
        ])
        .trim()
        .to_owned();
    let taken = cli.run(&["workspace", "create", "--name", "calc"], "");
    assert!(!taken.status.success());
    assert!(
        stderr(&taken).contains("already have a workspace named \"calc\""),
        "{}",
        stderr(&taken)
    );

    // Change a file, delete one, add one in a new directory; push by name.
    write_tree(src.path(), &[("a.txt", "two\n"), ("c/d.txt", "new\n")]);
    std::fs::remove_file(src.path().join("b.txt")).expect("rm");
    let pushed = cli.run(&["workspace", "push", "calc", utf8(src.path())], "");
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    assert!(
        stderr(&pushed).contains("pushed 2 file(s) (8 B)") && stderr(&pushed).contains("1 removed"),
        "{}",
        stderr(&pushed)
    );
    assert_eq!(paths(&cli, "calc"), ["a.txt", "c/d.txt"]);
    assert_eq!(cli.ok(&["workspace", "cat", &id, "a.txt"]), "two\n");

    // The name is shown, and accepted by `build run --workspace` with --from (push first).
    let shown = json(&cli.ok(&["workspace", "ls", "-o", "json"]))["workspaces"].take();
    assert_eq!(shown[0]["name"], "calc");
    assert_eq!(shown[0]["id"], id.as_str());
    write_tree(src.path(), &[("a.txt", "three\n")]);
    let built = cli.run(
        &[
            "build",
            "run",
            "--from",
            utf8(src.path()),
            "--workspace",
            "calc",
            "--",
            "python3",
            "-c",
            "print(open('a.txt').read().strip())",
        ],
        "",
    );
    assert!(built.status.success(), "{}", stderr(&built));
    assert!(
        String::from_utf8_lossy(&built.stdout).contains("three"),
        "{}",
        String::from_utf8_lossy(&built.stdout)
    );
    assert_eq!(workspace_count(&cli), 1, "no new workspace was made");
    let builds = json(&cli.ok(&["build", "list", "--workspace", "calc", "-o", "json"]));
    let builds = builds["builds"].as_array().expect("array");
    assert_eq!(builds.len(), 1, "{builds:?}");
    assert_eq!(builds[0]["workspace_id"], id.as_str());

    // A push into a workspace that does not exist says so and sends nothing.
    let missing = cli.run(&["workspace", "push", "nope", utf8(src.path())], "");
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("not found"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn ls_filters_by_label_and_shows_names_and_labels() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    cli.ok(&["workspace", "create", "--name", "web", "--label", "team=a"]);
    cli.ok(&["workspace", "create", "--label", "team=b"]);
    let only_a = json(&cli.ok(&["workspace", "ls", "--label", "team=a", "-o", "json"]));
    let only_a = only_a["workspaces"].as_array().expect("array");
    assert_eq!(only_a.len(), 1, "{only_a:?}");
    assert_eq!(only_a[0]["name"], "web");
    assert_eq!(only_a[0]["labels"]["team"], "a");
    let text = cli.ok(&["workspace", "ls"]);
    let header = text.lines().next().expect("header");
    assert!(
        header.contains("NAME") && header.contains("LABELS"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains(" web ") && l.ends_with("team=a")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.ends_with("team=b")), "{text}");
}

#[test]
fn a_failed_create_from_leaves_no_workspace_behind() {
    use std::os::unix::ffi::OsStrExt;
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let src = tempfile::tempdir().expect("tempdir");
    write_tree(src.path(), &[("ok.txt", "fine\n")]);
    // The server refuses paths that are not UTF-8: the upload fails after the create.
    let bad = std::ffi::OsStr::from_bytes(b"bad-\xff.txt");
    std::fs::write(src.path().join(bad), "x").expect("write");
    let failed = cli.run(&["workspace", "create", "--from", utf8(src.path())], "");
    assert!(!failed.status.success());
    assert!(
        stderr(&failed).contains("the new workspace was deleted again"),
        "{}",
        stderr(&failed)
    );
    assert_eq!(workspace_count(&cli), 0);
}

#[test]
fn uploads_send_inside_symlinks_and_sparse_files_and_say_what_they_leave_out() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let src = tempfile::tempdir().expect("tempdir");
    let root = src.path();
    write_tree(
        root,
        &[
            (".gitignore", "target/\n"),
            ("lib/real.h", "int x;\n"),
            ("target/debug/app", "binary"),
            (".env", "TOKEN=secret\n"),
        ],
    );
    std::os::unix::fs::symlink("lib/real.h", root.join("inside.h")).expect("link");
    std::os::unix::fs::symlink("/etc/passwd", root.join("abs")).expect("link");
    // 8 MiB apparent, one block on disk: the tar crate would write a GNU sparse entry.
    let sparse = std::fs::File::create(root.join("sparse.bin")).expect("create");
    sparse.set_len(8 << 20).expect("set_len");
    drop(sparse);

    let created = cli.run(&["workspace", "create", "--from", utf8(root), "-v"], "");
    let err = stderr(&created);
    assert!(created.status.success(), "{err}");
    let id = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    assert!(
        err.contains("skipping the symlink abs -> /etc/passwd"),
        "{err}"
    );
    assert!(err.contains("warning: uploading .env"), "{err}");
    assert!(
        err.contains("left out (.gitignore, .ignore or .kilnignore): target"),
        "{err}"
    );
    // The files' size (8 MiB + 7 + 10 + 13 bytes), not the tar's.
    assert!(err.contains("uploaded 5 file(s) (8 MiB)"), "{err}");

    let listed = json(&cli.ok(&["workspace", "ls", &id, "-o", "json"]));
    let entry = |path: &str| -> Value {
        listed
            .as_array()
            .expect("array")
            .iter()
            .find(|f| f["path"] == path)
            .unwrap_or_else(|| panic!("{path} listed: {listed}"))
            .clone()
    };
    assert_eq!(entry("inside.h")["symlink_target"], "lib/real.h");
    assert_eq!(entry("sparse.bin")["size_bytes"], 8 << 20);
    assert_eq!(
        paths(&cli, &id),
        [".env", ".gitignore", "inside.h", "lib/real.h", "sparse.bin"]
    );
    // Without -v the ignored paths are counted, not listed.
    let quiet = cli.run(&["workspace", "create", "--from", utf8(root)], "");
    assert!(
        stderr(&quiet)
            .contains("1 path(s) left out by .gitignore, .ignore or .kilnignore (-v lists them)"),
        "{}",
        stderr(&quiet)
    );
}

#[test]
fn limits_are_checked_before_anything_is_sent() {
    let config = tempfile::tempdir().expect("tempdir");
    let file = config.path().join("kiln.toml");
    std::fs::write(&file, "[build.workspace]\nmax_file_bytes = 1024\n").expect("config");
    let suite = Suite::start_with(&["--config", utf8(&file)]);
    let cli = logged_in(&suite);
    let src = tempfile::tempdir().expect("tempdir");
    std::fs::write(src.path().join("big.bin"), vec![b'x'; 2048]).expect("write");
    let refused = cli.run(&["workspace", "create", "--from", utf8(src.path())], "");
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("big.bin is 2 KiB; the server accepts files of at most 1 KiB"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(workspace_count(&cli), 0, "nothing was created");
}

#[test]
fn download_of_part_of_a_tree_refuses_a_non_empty_directory_without_force() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let src = tempfile::tempdir().expect("tempdir");
    write_tree(
        src.path(),
        &[
            ("dist/app.txt", "artifact\n"),
            ("dist/sub/b.txt", "b\n"),
            ("src/main.c", "c"),
        ],
    );
    cli.ok(&[
        "workspace",
        "create",
        "--name",
        "art",
        "--from",
        utf8(src.path()),
    ]);
    let dest = tempfile::tempdir().expect("tempdir");
    let out = dest.path().join("out");
    let said = cli.ok(&["workspace", "download", "art", "dist", "--out", utf8(&out)]);
    assert!(said.contains("2 file(s)"), "{said}");
    assert_eq!(common::read(&out.join("app.txt")), "artifact\n");
    assert_eq!(common::read(&out.join("sub/b.txt")), "b\n");
    assert!(!out.join("src").exists() && !out.join("dist").exists());

    let again = cli.run(
        &["workspace", "download", "art", "dist", "--out", utf8(&out)],
        "",
    );
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("is not empty; pass --force"),
        "{}",
        stderr(&again)
    );
    std::fs::write(out.join("app.txt"), "stale").expect("write");
    cli.ok(&[
        "workspace",
        "download",
        "art",
        "dist",
        "--out",
        utf8(&out),
        "--force",
    ]);
    assert_eq!(common::read(&out.join("app.txt")), "artifact\n");

    let tar = dest.path().join("all.tar");
    cli.ok(&["workspace", "download", "art", "--out", utf8(&tar)]);
    let refused = cli.run(&["workspace", "download", "art", "--out", utf8(&tar)], "");
    assert!(
        stderr(&refused).contains("exists; pass --force"),
        "{}",
        stderr(&refused)
    );
    let missing = cli.run(
        &[
            "workspace",
            "download",
            "art",
            "nope",
            "--out",
            utf8(&dest.path().join("x")),
        ],
        "",
    );
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("not found"),
        "{}",
        stderr(&missing)
    );
}
