//! The external tools some tests need, installed per worktree into `.tools/bin` by the
//! make targets (`make tools`, `make prometheus`), or found on `PATH`.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The workspace's `.tools/bin`.
pub fn tools_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin")
}

/// `name` from `.tools/bin`, else from `PATH`, if it runs (`--version`). When it does
/// not, prints the one line saying the test skips, with `how` to install it.
pub fn find(name: &str, how: &str) -> Option<PathBuf> {
    let local = tools_bin().join(name);
    let candidates = [local, PathBuf::from(name)];
    let found = candidates.into_iter().find(|tool| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if found.is_none() {
        println!("SKIPPED: `{name}` is not installed ({how})");
    }
    found
}

/// A binary of the workspace (`kiln-auth`, …), built next to the running test by `cargo
/// test --workspace` / `cargo build --bins`: the binaries belong to other packages, so
/// cargo does not hand their paths to this one's tests.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --bins` (cargo test --workspace and make test do)",
        path.display()
    );
    path
}
