//! Packing a local directory as a tar archive for `--from DIR`, honouring `.gitignore`
//! (and `.ignore`, and the global git excludes) the way git would; `.git/` itself is
//! never sent. Symlinks are sent as symlinks (the server refuses any that lead outside
//! the workspace).

use std::path::Path;

use anyhow::{Context as _, anyhow};

/// Tar bytes of `dir` and the number of files in it.
pub fn pack_dir(dir: &Path) -> anyhow::Result<(Vec<u8>, usize)> {
    if !dir.is_dir() {
        return Err(anyhow!("{} is not a directory", dir.display()));
    }
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Deterministic);
    let mut files = 0;
    let walker = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .git_ignore(true)
        .git_exclude(true)
        .require_git(false)
        .filter_entry(|entry| entry.file_name() != ".git")
        .sort_by_file_name(Ord::cmp)
        .build();
    for entry in walker {
        let entry = entry.context("walking the source directory")?;
        let path = entry.path();
        let relative = path
            .strip_prefix(dir)
            .context("walking the source directory")?;
        if relative.as_os_str().is_empty() {
            continue;
        }
        let file_type = entry
            .file_type()
            .ok_or_else(|| anyhow!("{}: unknown file type", path.display()))?;
        if file_type.is_dir() {
            builder.append_dir(relative, path)
        } else if file_type.is_file() || file_type.is_symlink() {
            files += 1;
            builder.append_path_with_name(path, relative)
        } else {
            continue; // sockets, fifos, devices: not source code
        }
        .with_context(|| format!("adding {} to the archive", path.display()))?;
    }
    let bytes = builder.into_inner().context("finishing the archive")?;
    Ok((bytes, files))
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
        std::fs::create_dir_all(root.join("src")).expect("mkdir");
        std::fs::create_dir_all(root.join("target/debug")).expect("mkdir");
        std::fs::create_dir_all(root.join(".git")).expect("mkdir");
        std::fs::write(root.join("src/main.c"), "int main(){return 0;}").expect("write");
        std::fs::write(root.join("target/debug/app"), "binary").expect("write");
        std::fs::write(root.join("build.log"), "noise").expect("write");
        std::fs::write(root.join(".git/HEAD"), "ref").expect("write");
        let (bytes, files) = pack_dir(root).expect("packs");
        assert_eq!(names(&bytes), vec![".gitignore", "src", "src/main.c"]);
        assert_eq!(files, 2);
    }
}
