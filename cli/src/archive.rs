//! Packing a local directory as a tar archive for `--from DIR` and `workspace push`,
//! honouring `.gitignore`, `.ignore`, `.kilnignore` and the global git excludes the way
//! git would; `.git/` itself is never sent.
//!
//! What a real tree holds:
//! - Symlinks whose relative target stays inside the tree are sent as symlinks (the
//!   server stores them as links and never follows them); any other symlink (absolute,
//!   or climbing out) is skipped and reported, since it would mean nothing on the server.
//! - Sparse files are packed as plain regular files: the server accepts only regular
//!   files, directories and symlinks, not GNU sparse entries (the tar crate's default).
//! - Sockets, fifos and devices are skipped: not source code.
//!
//! The limits the server announces are checked here, before anything is sent, so a
//! too-large tree fails with the name of the file at fault and nothing is created.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};

use crate::human::size;

/// The server's workspace limits (from its policy); `None` fields are not checked.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub max_file_bytes: Option<u64>,
    pub max_total_bytes: Option<u64>,
    pub max_entries: Option<u64>,
}

/// A packed directory.
#[derive(Debug, Default)]
pub struct Packed {
    pub tar: Vec<u8>,
    /// Regular files and symlinks sent.
    pub files: usize,
    /// Entries of every kind sent (files, directories, symlinks): what the server counts.
    pub entries: u64,
    /// Total size of the regular files (what the workspace will hold, not the tar's size).
    pub bytes: u64,
    /// The paths sent (files and symlinks), relative to the directory.
    pub paths: BTreeSet<String>,
    /// Top-most paths the ignore files left out (a directory stands for all below it).
    pub ignored: Vec<PathBuf>,
    /// Symlinks left out, with their targets, because they lead outside the tree.
    pub skipped_links: Vec<(PathBuf, PathBuf)>,
    /// `.env` files that are being sent (they often hold secrets).
    pub env_files: Vec<PathBuf>,
}

/// Whether a symlink at `link` (relative to the tree's root) pointing at `target`
/// stays inside the tree, resolved lexically from the link's directory.
pub fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.as_os_str().is_empty() || target.is_absolute() {
        return false;
    }
    let mut depth = link.components().count() as i64 - 1;
    for part in target.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::Normal(_) => depth += 1,
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

fn is_env_file(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| n == ".env" || n.starts_with(".env."))
}

fn walker(dir: &Path, ignore_rules: bool) -> ignore::Walk {
    let mut builder = ignore::WalkBuilder::new(dir);
    builder
        .hidden(false)
        .parents(ignore_rules)
        .ignore(ignore_rules)
        .git_ignore(ignore_rules)
        .git_global(ignore_rules)
        .git_exclude(ignore_rules)
        .require_git(false)
        .filter_entry(|entry| entry.file_name() != ".git")
        .sort_by_file_name(Ord::cmp);
    if ignore_rules {
        builder.add_custom_ignore_filename(".kilnignore");
    }
    builder.build()
}

/// Packs `dir`, refusing (before anything is sent) a tree over `limits`.
pub fn pack_dir(dir: &Path, limits: Limits) -> anyhow::Result<Packed> {
    if !dir.is_dir() {
        return Err(anyhow!("{} is not a directory", dir.display()));
    }
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.sparse(false);
    builder.mode(tar::HeaderMode::Deterministic);
    let mut packed = Packed::default();
    let mut included: BTreeSet<PathBuf> = BTreeSet::new();
    for entry in walker(dir, true) {
        let entry = entry.context("walking the source directory")?;
        let path = entry.path();
        let relative = path
            .strip_prefix(dir)
            .context("walking the source directory")?
            .to_path_buf();
        if relative.as_os_str().is_empty() {
            continue;
        }
        let file_type = entry
            .file_type()
            .ok_or_else(|| anyhow!("{}: unknown file type", path.display()))?;
        if file_type.is_symlink() {
            let target = std::fs::read_link(path)
                .with_context(|| format!("reading the link {}", path.display()))?;
            if !link_stays_inside(&relative, &target) {
                packed.skipped_links.push((relative, target));
                continue;
            }
        } else if !file_type.is_dir() && !file_type.is_file() {
            continue; // sockets, fifos, devices: not source code
        }
        included.insert(relative.clone());
        packed.entries += 1;
        if let Some(max) = limits.max_entries
            && packed.entries > max
        {
            bail!(
                "{} holds more than {max} entries (files, directories and symlinks), the server's limit for a workspace; \
                 leave some out with .kilnignore",
                dir.display()
            );
        }
        if file_type.is_dir() {
            builder.append_dir(&relative, path)
        } else {
            if file_type.is_file() {
                let len = entry
                    .metadata()
                    .with_context(|| format!("reading {}", path.display()))?
                    .len();
                if let Some(max) = limits.max_file_bytes
                    && len > max
                {
                    bail!(
                        "{} is {}; the server accepts files of at most {} (leave it out with .kilnignore)",
                        relative.display(),
                        size(len),
                        size(max)
                    );
                }
                packed.bytes += len;
                if let Some(max) = limits.max_total_bytes
                    && packed.bytes > max
                {
                    bail!(
                        "{} holds more than {}, the server's limit for a workspace; leave some out with .kilnignore",
                        dir.display(),
                        size(max)
                    );
                }
                if is_env_file(entry.file_name()) {
                    packed.env_files.push(relative.clone());
                }
            }
            packed.files += 1;
            packed
                .paths
                .insert(relative.to_string_lossy().into_owned());
            builder.append_path_with_name(path, &relative)
        }
        .with_context(|| format!("adding {} to the archive", path.display()))?;
    }
    packed.ignored = left_out(dir, &included)?;
    packed.tar = builder.into_inner().context("finishing the archive")?;
    Ok(packed)
}

/// The top-most entries of `dir` that the ignore rules left out: walks again without
/// them and keeps what was not included, but not what lies below something left out.
fn left_out(dir: &Path, included: &BTreeSet<PathBuf>) -> anyhow::Result<Vec<PathBuf>> {
    let mut ignored: Vec<PathBuf> = Vec::new();
    for entry in walker(dir, false) {
        let entry = entry.context("walking the source directory")?;
        let Ok(relative) = entry.path().strip_prefix(dir) else {
            continue;
        };
        if relative.as_os_str().is_empty() || included.contains(relative) {
            continue;
        }
        if ignored.last().is_some_and(|top| relative.starts_with(top)) {
            continue; // below an ignored directory (the walk is sorted, depth first)
        }
        let special = entry
            .file_type()
            .is_some_and(|t| !(t.is_dir() || t.is_file() || t.is_symlink()));
        if entry.path_is_symlink() || special {
            continue; // reported (or skipped) by the packing walk, not by an ignore file
        }
        ignored.push(relative.to_path_buf());
    }
    Ok(ignored)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tar_bytes: &[u8]) -> Vec<String> {
        let mut archive = tar::Archive::new(tar_bytes);
        let mut names: Vec<String> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn gitignored_files_and_the_git_directory_are_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::write(root.join(".gitignore"), "target/\n*.log\n").expect("write");
        std::fs::write(root.join(".kilnignore"), "secret.txt\n").expect("write");
        std::fs::create_dir_all(root.join("src")).expect("mkdir");
        std::fs::create_dir_all(root.join("target/debug")).expect("mkdir");
        std::fs::create_dir_all(root.join(".git")).expect("mkdir");
        std::fs::write(root.join("src/main.c"), "int main(){return 0;}").expect("write");
        std::fs::write(root.join("target/debug/app"), "binary").expect("write");
        std::fs::write(root.join("build.log"), "noise").expect("write");
        std::fs::write(root.join("secret.txt"), "s").expect("write");
        std::fs::write(root.join(".git/HEAD"), "ref").expect("write");
        let packed = pack_dir(root, Limits::default()).expect("packs");
        assert_eq!(
            names(&packed.tar),
            vec![".gitignore", ".kilnignore", "src", "src/main.c"]
        );
        assert_eq!(packed.files, 3);
        assert_eq!(
            packed.ignored,
            vec![
                PathBuf::from("build.log"),
                PathBuf::from("secret.txt"),
                PathBuf::from("target")
            ]
        );
    }

    #[test]
    fn kilnignore_can_send_what_gitignore_leaves_out() {
        // Vendored dependencies: ignored by git, needed by a build without network.
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::write(root.join(".gitignore"), "node_modules/\n").expect("write");
        std::fs::write(root.join(".kilnignore"), "!node_modules/\n").expect("write");
        std::fs::create_dir_all(root.join("node_modules/left-pad")).expect("mkdir");
        std::fs::write(root.join("node_modules/left-pad/index.js"), "x").expect("write");
        let packed = pack_dir(root, Limits::default()).expect("packs");
        assert!(
            packed.paths.contains("node_modules/left-pad/index.js"),
            "{:?}",
            packed.paths
        );
        assert!(packed.ignored.is_empty(), "{:?}", packed.ignored);
    }

    #[test]
    fn links_inside_stay_links_and_links_outside_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("lib")).expect("mkdir");
        std::fs::write(root.join("lib/real.h"), "x").expect("write");
        std::os::unix::fs::symlink("lib/real.h", root.join("inside.h")).expect("link");
        std::os::unix::fs::symlink("../real.h", root.join("lib/up.h")).expect("link");
        std::os::unix::fs::symlink("/etc/passwd", root.join("abs")).expect("link");
        std::os::unix::fs::symlink("../../out", root.join("lib/out")).expect("link");
        let packed = pack_dir(root, Limits::default()).expect("packs");
        assert_eq!(
            names(&packed.tar),
            vec!["inside.h", "lib", "lib/real.h", "lib/up.h"]
        );
        let skipped: Vec<_> = packed
            .skipped_links
            .iter()
            .map(|(p, _)| p.clone())
            .collect();
        assert_eq!(
            skipped,
            vec![PathBuf::from("abs"), PathBuf::from("lib/out")]
        );
        assert!(packed.ignored.is_empty(), "{:?}", packed.ignored);
    }

    #[test]
    fn limits_are_checked_before_sending() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("big.bin"), vec![0u8; 2048]).expect("write");
        let limits = Limits {
            max_file_bytes: Some(1024),
            ..Limits::default()
        };
        let err = pack_dir(dir.path(), limits).expect_err("too large");
        assert!(err.to_string().contains("big.bin is 2 KiB"), "{err}");
        let limits = Limits {
            max_entries: Some(0),
            ..Limits::default()
        };
        let err = pack_dir(dir.path(), limits).expect_err("too many");
        assert!(err.to_string().contains("more than 0 entries"), "{err}");
    }
}
