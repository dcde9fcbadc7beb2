//! Workspaces on disk: `<data_dir>/workspaces/<id>`, changed atomically.
//!
//! A change (WriteFiles, UploadArchive) is staged first: new files are written under
//! `<data_dir>/staging/<uuid>` on the same file system. Applying moves each replaced or
//! deleted entry into the staging area's trash and renames the new files into place,
//! recording every step; a failure (or a quota overrun found afterwards) undoes the
//! record in reverse, so a request is applied entirely or not at all. Renames never
//! copy data and never follow symbolic links. A crash in the middle of applying can leave
//! a partial change; the staging area is wiped at start.
//!
//! Every function here blocks; handlers call them through `spawn_blocking`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_proto::build as pb;
use kiln_rpc::ApiError;

use crate::config::WorkspaceLimits;
use crate::error::{BuildError, Result, reason};
use crate::paths::{self, Parents, RelPath};

/// The directories of all workspaces.
#[derive(Debug, Clone)]
pub struct Disk {
    pub root: PathBuf,
    pub staging: PathBuf,
    pub limits: WorkspaceLimits,
}

/// Size and file count of a workspace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub files: u64,
}

/// A file to write, as requested.
#[derive(Debug, Clone)]
pub struct NewFile {
    pub path: RelPath,
    pub field: String,
    pub content: bytes::Bytes,
    pub executable: bool,
}

impl Disk {
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Creates the directories and empties the staging area (leftovers of a crash).
    pub fn init(&self) -> Result<()> {
        for dir in [&self.root, &self.staging] {
            fs::create_dir_all(dir).map_err(|e| BuildError::io("creating data directories", e))?;
        }
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o711))
            .map_err(|e| BuildError::io("securing the workspaces directory", e))?;
        let _ = fs::remove_dir_all(&self.staging);
        fs::create_dir_all(&self.staging).map_err(|e| BuildError::io("creating staging", e))
    }

    pub fn create(&self, id: &str) -> Result<()> {
        let dir = self.dir(id);
        fs::create_dir(&dir).map_err(|e| BuildError::io("creating a workspace", e))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| BuildError::io("creating a workspace", e))
    }

    /// Removes a workspace: renamed away first, so it disappears at once.
    pub fn remove(&self, id: &str) -> Result<()> {
        let dir = self.dir(id);
        if !dir.exists() {
            return Ok(());
        }
        let doomed = self
            .staging
            .join(format!("deleted-{}", uuid::Uuid::new_v4()));
        fs::rename(&dir, &doomed).map_err(|e| BuildError::io("deleting a workspace", e))?;
        fs::remove_dir_all(&doomed).map_err(|e| BuildError::io("deleting a workspace", e))
    }

    /// The ids of the workspace directories on disk (names that are not ids are left
    /// alone: this directory is never a place to delete guesses from).
    pub fn workspace_ids(&self) -> Result<Vec<String>> {
        let entries =
            fs::read_dir(&self.root).map_err(|e| BuildError::io("listing workspaces", e))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| BuildError::io("listing workspaces", e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if uuid::Uuid::parse_str(&name).is_ok() && entry.path().is_dir() {
                ids.push(name);
            }
        }
        Ok(ids)
    }

    /// A fresh staging directory for one change.
    pub fn stage(&self) -> Result<Stage> {
        let dir = self.staging.join(uuid::Uuid::new_v4().to_string());
        fs::create_dir(&dir).map_err(|e| BuildError::io("creating a staging directory", e))?;
        Ok(Stage { dir, next: 0 })
    }

    /// Writes, replaces and deletes in one atomic change, then checks the quota.
    pub fn write_files(&self, id: &str, deletes: &[RelPath], files: &[NewFile]) -> Result<Usage> {
        let root = self.dir(id);
        let mut stage = self.stage()?;
        let mut staged = Vec::with_capacity(files.len());
        for file in files {
            staged.push(stage.write(&file.content, file.executable)?);
        }
        let mut txn = Txn::new(stage.dir.join("trash"))?;
        let result = (|| {
            for (i, path) in deletes.iter().enumerate() {
                let field = format!("delete_paths[{i}]");
                let (full, _) = paths::resolve(&root, path, &field, Parents::Existing)?;
                if fs::symlink_metadata(&full).is_err() {
                    return Err(ApiError::not_found("path", path.as_str()).into());
                }
                txn.remove(&full)?;
            }
            for (file, staged) in files.iter().zip(&staged) {
                txn.place(&root, &file.path, &file.field, staged)?;
            }
            self.check_quota(&root)
        })();
        finish(txn, stage, result)
    }

    /// Measures a workspace and refuses it over the limits with RESOURCE_EXHAUSTED (the
    /// caller rolls back).
    pub fn check_quota(&self, root: &Path) -> Result<Usage> {
        let usage = usage(root)?;
        if usage.bytes > self.limits.max_bytes || usage.files > self.limits.max_files {
            let message = format!(
                "the workspace would hold {} files and {} bytes; the limits are {} files and {} bytes",
                usage.files, usage.bytes, self.limits.max_files, self.limits.max_bytes
            );
            return Err(ApiError::new(
                tonic::Code::ResourceExhausted,
                reason::WORKSPACE_TOO_LARGE,
                message,
            )
            .into());
        }
        Ok(usage)
    }

    /// Regular files and symlinks under `dir`, sorted by path, after `after`, at most
    /// `limit` (+ whether there are more).
    pub fn list(
        &self,
        id: &str,
        dir: &RelPath,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<pb::FileInfo>, bool)> {
        let root = self.dir(id);
        let start = if dir.is_root() {
            root.clone()
        } else {
            let (full, _) = paths::resolve(&root, dir, "directory", Parents::Existing)?;
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => full,
                Ok(_) => return Err(paths::invalid_path("directory", "is not a directory")),
                Err(_) => return Err(ApiError::not_found("directory", dir.as_str()).into()),
            }
        };
        let mut entries = Vec::new();
        walk(&start, dir, &mut |rel, meta, full| {
            if rel.as_str() > after {
                entries.push((rel, meta, full));
            }
        })?;
        entries.sort_by(|a, b| a.0.as_str().as_bytes().cmp(b.0.as_str().as_bytes()));
        let more = entries.len() > limit;
        let files = entries
            .into_iter()
            .take(limit)
            .map(|(rel, meta, full)| file_info(rel, &meta, &full))
            .collect();
        Ok((files, more))
    }

    /// Opens a regular file for reading, without following a symlink anywhere.
    pub fn open_regular(&self, id: &str, path: &RelPath) -> Result<(File, u64)> {
        let root = self.dir(id);
        let (full, _) = paths::resolve(&root, path, "path", Parents::Existing)?;
        let meta = match fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(_) => return Err(ApiError::not_found("file", path.as_str()).into()),
        };
        if !meta.is_file() {
            return Err(ApiError::failed_precondition(
                reason::NOT_A_REGULAR_FILE,
                format!("{:?} is a directory or a symbolic link", path.as_str()),
            )
            .into());
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&full)
            .map_err(|e| BuildError::io("opening a workspace file", e))?;
        Ok((file, meta.len()))
    }
}

/// Commits or rolls back `txn` depending on `result`, and removes the staging area.
pub fn finish<T>(txn: Txn, stage: Stage, result: Result<T>) -> Result<T> {
    match result {
        Ok(v) => {
            txn.commit();
            stage.remove();
            Ok(v)
        }
        Err(e) => {
            txn.rollback();
            stage.remove();
            Err(e)
        }
    }
}

/// A staging directory for the files of one change.
#[derive(Debug)]
pub struct Stage {
    pub dir: PathBuf,
    next: u64,
}

impl Stage {
    /// A path for the next staged file.
    pub fn next_path(&mut self) -> PathBuf {
        self.next += 1;
        self.dir.join(format!("f{}", self.next))
    }

    pub fn write(&mut self, content: &[u8], executable: bool) -> Result<PathBuf> {
        let path = self.next_path();
        let mut file = create_file(&path, executable)?;
        file.write_all(content)
            .map_err(|e| BuildError::io("staging a file", e))?;
        Ok(path)
    }

    pub fn remove(self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Creates a new file with the mode the contract promises (0644 or 0755).
pub fn create_file(path: &Path, executable: bool) -> Result<File> {
    let mode = if executable { 0o755 } else { 0o644 };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| BuildError::io("staging a file", e))?;
    // The process umask may have cleared bits.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| BuildError::io("staging a file", e))?;
    Ok(file)
}

enum Undo {
    Created(PathBuf),
    CreatedDir(PathBuf),
    Moved { original: PathBuf, parked: PathBuf },
}

/// A change being applied to a workspace, undoable until committed.
pub struct Txn {
    trash: PathBuf,
    undo: Vec<Undo>,
    parked: u64,
}

impl std::fmt::Debug for Txn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("steps", &self.undo.len())
            .finish()
    }
}

impl Txn {
    pub fn new(trash: PathBuf) -> Result<Self> {
        fs::create_dir_all(&trash).map_err(|e| BuildError::io("creating a trash directory", e))?;
        Ok(Self {
            trash,
            undo: Vec::new(),
            parked: 0,
        })
    }

    /// Moves an existing entry (file, symlink or directory tree) out of the way.
    pub fn remove(&mut self, full: &Path) -> Result<()> {
        self.parked += 1;
        let parked = self.trash.join(self.parked.to_string());
        fs::rename(full, &parked).map_err(|e| BuildError::io("removing a workspace entry", e))?;
        self.undo.push(Undo::Moved {
            original: full.to_path_buf(),
            parked,
        });
        Ok(())
    }

    /// Creates the parents of `path` as needed and returns its full path, replacing
    /// whatever file or symlink was there (never a directory).
    pub fn prepare_target(&mut self, root: &Path, path: &RelPath, field: &str) -> Result<PathBuf> {
        let (full, created) = paths::resolve(root, path, field, Parents::Create)?;
        self.undo.extend(created.into_iter().map(Undo::CreatedDir));
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => {
                return Err(paths::invalid_path(field, "is an existing directory"));
            }
            Ok(_) => self.remove(&full)?,
            Err(_) => {}
        }
        Ok(full)
    }

    /// Renames a staged file into place at `path`.
    pub fn place(&mut self, root: &Path, path: &RelPath, field: &str, staged: &Path) -> Result<()> {
        let full = self.prepare_target(root, path, field)?;
        fs::rename(staged, &full).map_err(|e| BuildError::io("placing a file", e))?;
        self.undo.push(Undo::Created(full));
        Ok(())
    }

    /// Creates a directory (and its parents) if missing.
    pub fn mkdir(&mut self, root: &Path, path: &RelPath, field: &str) -> Result<()> {
        let (full, created) = paths::resolve(root, path, field, Parents::Create)?;
        self.undo.extend(created.into_iter().map(Undo::CreatedDir));
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(paths::invalid_path(field, "is an existing file")),
            Err(_) => {
                fs::create_dir(&full).map_err(|e| BuildError::io("creating a directory", e))?;
                self.undo.push(Undo::CreatedDir(full));
                Ok(())
            }
        }
    }

    pub fn rollback(self) {
        for step in self.undo.into_iter().rev() {
            let result = match step {
                Undo::Created(p) => fs::remove_file(&p),
                Undo::CreatedDir(p) => fs::remove_dir_all(&p),
                Undo::Moved { original, parked } => fs::rename(&parked, &original),
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "rolling back a workspace change failed");
            }
        }
    }

    pub fn commit(self) {
        let _ = fs::remove_dir_all(&self.trash);
    }
}

/// Total apparent size and number of regular files, not following symlinks.
pub fn usage(root: &Path) -> Result<Usage> {
    let mut usage = Usage::default();
    walk(root, &RelPath::default(), &mut |_, meta, _| {
        if meta.is_file() {
            usage.bytes += meta.len();
            usage.files += 1;
        }
    })?;
    Ok(usage)
}

/// Visits regular files and symlinks below `dir` (not following symlinks).
fn walk(
    dir: &Path,
    rel: &RelPath,
    visit: &mut dyn FnMut(RelPath, fs::Metadata, PathBuf),
) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(BuildError::io("listing a workspace", e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| BuildError::io("listing a workspace", e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue; // not UTF-8: cannot be named in the API
        };
        let meta = entry
            .metadata()
            .map_err(|e| BuildError::io("listing a workspace", e))?;
        let child = rel.join(&name);
        if meta.is_dir() {
            walk(&entry.path(), &child, visit)?;
        } else if meta.is_file() || meta.file_type().is_symlink() {
            visit(child, meta, entry.path());
        }
    }
    Ok(())
}

fn file_info(rel: RelPath, meta: &fs::Metadata, full: &Path) -> pb::FileInfo {
    let symlink = meta.file_type().is_symlink();
    pb::FileInfo {
        path: rel.as_str().to_owned(),
        file_type: if symlink {
            pb::FileType::Symlink
        } else {
            pb::FileType::Regular
        } as i32,
        size_bytes: if symlink { 0 } else { meta.len() },
        executable: !symlink && meta.mode() & 0o111 != 0,
        modified_at: Some(prost_types::Timestamp {
            seconds: meta.mtime(),
            nanos: i32::try_from(meta.mtime_nsec()).unwrap_or(0),
        }),
        symlink_target: if symlink {
            fs::read_link(full)
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            String::new()
        },
    }
}
