//! Workspaces on disk: `<data_dir>/workspaces/<id>`, changed atomically.
//!
//! Every access to a workspace's contents goes through [`crate::beneath`]: relative to
//! directory descriptors, never following a symbolic link (builds may leave symlinks
//! behind, and may swap entries while the API reads).
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

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_proto::build as pb;
use kiln_rpc::ApiError;
use rustix::io::Errno;

use crate::beneath::{self, Dir, Kind, Meta};
use crate::config::WorkspaceLimits;
use crate::error::{BuildError, Result, reason};
use crate::paths::{self, NoDir, Parents, RelPath};

/// The directories of all workspaces.
#[derive(Debug, Clone)]
pub struct Disk {
    pub root: PathBuf,
    pub staging: PathBuf,
    pub limits: WorkspaceLimits,
}

/// Size and entry count of a workspace. Every entry counts against the file limit —
/// directories and symlinks too: they cost inodes and walking time like files do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Apparent size of the regular files.
    pub bytes: u64,
    /// Files, directories, symlinks and anything else below the root.
    pub entries: u64,
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

    /// The workspace's root directory, opened: the anchor of every access to it.
    pub fn open(&self, id: &str) -> Result<Arc<Dir>> {
        match Dir::open(&self.dir(id)) {
            Ok(d) => Ok(Arc::new(d)),
            Err(e) if beneath::is(&e, Errno::NOENT) => {
                Err(ApiError::not_found("workspace", id).into())
            }
            Err(e) => Err(BuildError::io("opening a workspace", e)),
        }
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

    /// Removes the staging areas under `parent` other than this one's that nothing has
    /// touched for `age`: those of replicas that are gone.
    pub fn sweep_stale_staging(&self, parent: &Path, age: std::time::Duration) -> Result<()> {
        let entries =
            fs::read_dir(parent).map_err(|e| BuildError::io("listing staging areas", e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path == self.staging || !path.is_dir() {
                continue;
            }
            if untouched_for(&path, age) {
                let _ = fs::remove_dir_all(&path);
            }
        }
        Ok(())
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
        let root = self.open(id)?;
        let mut stage = self.stage()?;
        let mut staged = Vec::with_capacity(files.len());
        for file in files {
            staged.push(stage.write(&file.content, file.executable)?);
        }
        let mut txn = Txn::new(stage.dir.join("trash"))?;
        let result = (|| {
            for (i, path) in deletes.iter().enumerate() {
                let field = format!("delete_paths[{i}]");
                let r = paths::resolve(&root, path, &field, Parents::Existing)?;
                if r.parent.stat(&r.name).is_err() {
                    return Err(ApiError::not_found("path", path.as_str()).into());
                }
                txn.remove(&r.parent, r.name.as_ref())?;
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
    pub fn check_quota(&self, root: &Arc<Dir>) -> Result<Usage> {
        let usage = usage_of(root)?;
        if usage.bytes > self.limits.max_bytes || usage.entries > self.limits.max_files {
            let message = format!(
                "the workspace would hold {} entries (files, directories and symlinks) and {} bytes; \
                 the limits are {} entries and {} bytes",
                usage.entries, usage.bytes, self.limits.max_files, self.limits.max_bytes
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
        let root = self.open(id)?;
        let start = match paths::open_dir(&root, dir, "directory")? {
            Ok(d) => d,
            Err(NoDir::NotADirectory) => {
                return Err(paths::invalid_path("directory", "is not a directory"));
            }
            Err(NoDir::Missing) => {
                return Err(ApiError::not_found("directory", dir.as_str()).into());
            }
        };
        let mut entries = Vec::new();
        beneath::walk(&start, &mut |e| {
            if !matches!(e.meta.kind, Kind::File | Kind::Symlink) {
                return Ok(());
            }
            let Some(rel) = api_path(dir, e.path) else {
                return Ok(()); // not UTF-8: cannot be named in the API
            };
            if rel.as_str() > after {
                // Read now, from the directory that holds it: never through a path.
                let target = if e.meta.kind == Kind::Symlink {
                    e.parent.read_link(e.name).unwrap_or_default()
                } else {
                    OsString::new()
                };
                entries.push((rel, e.meta, target));
            }
            Ok(())
        })
        .map_err(|e| BuildError::io("listing a workspace", e))?;
        entries.sort_by(|a, b| a.0.as_str().as_bytes().cmp(b.0.as_str().as_bytes()));
        let more = entries.len() > limit;
        let files = entries
            .into_iter()
            .take(limit)
            .map(|(rel, meta, target)| file_info(rel, &meta, &target))
            .collect();
        Ok((files, more))
    }

    /// Refuses a DownloadArchive of anything but an existing directory (NOT_FOUND).
    pub fn check_directory(&self, id: &str, dir: &RelPath) -> Result<()> {
        let root = self.open(id)?;
        match paths::open_dir(&root, dir, "directory")? {
            Ok(_) => Ok(()),
            Err(_) => Err(ApiError::not_found("directory", dir.as_str()).into()),
        }
    }

    /// Opens a regular file for reading, without following a symlink anywhere.
    pub fn open_regular(&self, id: &str, path: &RelPath) -> Result<(File, u64)> {
        let root = self.open(id)?;
        let r = paths::resolve(&root, path, "path", Parents::Existing)?;
        let not_regular = || -> BuildError {
            ApiError::failed_precondition(
                reason::NOT_A_REGULAR_FILE,
                format!("{:?} is a directory or a symbolic link", path.as_str()),
            )
            .into()
        };
        let file = match r.parent.open_file(&r.name) {
            Ok(f) => f,
            Err(e) if beneath::is(&e, Errno::NOENT) => {
                return Err(ApiError::not_found("file", path.as_str()).into());
            }
            // ELOOP: a symlink (O_NOFOLLOW); ENXIO: a socket.
            Err(e) if beneath::is(&e, Errno::LOOP) || beneath::is(&e, Errno::NXIO) => {
                return Err(not_regular());
            }
            Err(e) => return Err(BuildError::io("opening a workspace file", e)),
        };
        // The kind and size of what was opened, not of what the name points to now.
        let meta = file
            .metadata()
            .map_err(|e| BuildError::io("opening a workspace file", e))?;
        if !meta.is_file() {
            return Err(not_regular());
        }
        Ok((file, meta.len()))
    }

    /// Makes `name` in the workspace a plain directory the server created: whatever a
    /// build left there (a symlink, a file) is removed first, never followed.
    pub fn ensure_plain_dir(&self, id: &str, name: &str) -> Result<()> {
        let root = self.open(id)?;
        match root.stat(name) {
            Ok(m) if m.kind == Kind::Dir => return Ok(()),
            Ok(_) => root
                .remove_tree(name)
                .map_err(|e| BuildError::io("replacing a workspace entry", e))?,
            Err(_) => {}
        }
        match root.mkdir(name, 0o755) {
            Ok(()) => Ok(()),
            Err(e) => Err(BuildError::io("creating a workspace directory", e)),
        }
    }
}

/// `prefix/path` as an API path, if `path` (from a walk) is UTF-8.
pub fn api_path(prefix: &RelPath, path: &[u8]) -> Option<RelPath> {
    std::str::from_utf8(path).ok().map(|p| prefix.join(p))
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
    Created {
        dir: Arc<Dir>,
        name: String,
    },
    CreatedDir {
        dir: Arc<Dir>,
        name: String,
    },
    Moved {
        dir: Arc<Dir>,
        name: OsString,
        parked: String,
    },
}

/// A change being applied to a workspace, undoable until committed. Every step is
/// recorded as (directory descriptor, name), so undoing never resolves a path either.
pub struct Txn {
    trash_path: PathBuf,
    trash: Dir,
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
        let dir = Dir::open(&trash).map_err(|e| BuildError::io("opening a trash directory", e))?;
        Ok(Self {
            trash_path: trash,
            trash: dir,
            undo: Vec::new(),
            parked: 0,
        })
    }

    /// Moves the entry `name` of `dir` (file, symlink or directory tree) out of the way.
    pub fn remove(&mut self, dir: &Arc<Dir>, name: &OsStr) -> Result<()> {
        self.parked += 1;
        let parked = self.parked.to_string();
        dir.rename(name, &self.trash, &parked)
            .map_err(|e| BuildError::io("removing a workspace entry", e))?;
        self.undo.push(Undo::Moved {
            dir: Arc::clone(dir),
            name: name.to_owned(),
            parked,
        });
        Ok(())
    }

    fn record_created(&mut self, created: Vec<(Arc<Dir>, String)>) {
        self.undo.extend(
            created
                .into_iter()
                .map(|(dir, name)| Undo::CreatedDir { dir, name }),
        );
    }

    /// Creates the parents of `path` as needed and returns where it goes, replacing
    /// whatever file or symlink was there (never a directory).
    pub fn prepare_target(
        &mut self,
        root: &Arc<Dir>,
        path: &RelPath,
        field: &str,
    ) -> Result<(Arc<Dir>, String)> {
        let r = paths::resolve(root, path, field, Parents::Create)?;
        self.record_created(r.created);
        match r.parent.stat(&r.name) {
            Ok(m) if m.kind == Kind::Dir => {
                return Err(paths::invalid_path(field, "is an existing directory"));
            }
            Ok(_) => self.remove(&r.parent, r.name.as_ref())?,
            Err(_) => {}
        }
        Ok((r.parent, r.name))
    }

    /// Renames a staged file into place at `path`.
    pub fn place(
        &mut self,
        root: &Arc<Dir>,
        path: &RelPath,
        field: &str,
        staged: &Path,
    ) -> Result<()> {
        let (dir, name) = self.prepare_target(root, path, field)?;
        dir.rename_in(staged, &name)
            .map_err(|e| BuildError::io("placing a file", e))?;
        self.undo.push(Undo::Created { dir, name });
        Ok(())
    }

    /// Creates the symlink `path` → `target` (checked by the caller), replacing a file
    /// or symlink there.
    pub fn place_symlink(
        &mut self,
        root: &Arc<Dir>,
        path: &RelPath,
        field: &str,
        target: &str,
    ) -> Result<()> {
        let (dir, name) = self.prepare_target(root, path, field)?;
        dir.symlink(target, &name)
            .map_err(|e| BuildError::io("creating a symbolic link", e))?;
        self.undo.push(Undo::Created { dir, name });
        Ok(())
    }

    /// Creates a directory (and its parents) if missing.
    pub fn mkdir(&mut self, root: &Arc<Dir>, path: &RelPath, field: &str) -> Result<()> {
        let r = paths::resolve(root, path, field, Parents::Create)?;
        self.record_created(r.created);
        match r.parent.stat(&r.name) {
            Ok(m) if m.kind == Kind::Dir => Ok(()),
            Ok(_) => Err(paths::invalid_path(field, "is an existing file")),
            Err(_) => {
                r.parent
                    .mkdir(&r.name, 0o755)
                    .map_err(|e| BuildError::io("creating a directory", e))?;
                self.undo.push(Undo::CreatedDir {
                    dir: r.parent,
                    name: r.name,
                });
                Ok(())
            }
        }
    }

    pub fn rollback(self) {
        for step in self.undo.into_iter().rev() {
            let result = match step {
                Undo::Created { dir, name } => dir.remove_file(&name),
                Undo::CreatedDir { dir, name } => dir.remove_tree(&name),
                Undo::Moved { dir, name, parked } => self.trash.rename(&parked, &dir, &name),
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "rolling back a workspace change failed");
            }
        }
    }

    pub fn commit(self) {
        // The trash is the server's own staging area, never a workspace: std's
        // remove_dir_all (which does not follow symlinks either) is fine here.
        let _ = fs::remove_dir_all(&self.trash_path);
    }
}

/// [`usage_of`] the workspace directory at `root` (a server-controlled path).
pub fn usage(root: &Path) -> Result<Usage> {
    let dir = Dir::open(root).map_err(|e| BuildError::io("measuring a workspace", e))?;
    usage_of(&Arc::new(dir))
}

/// Total apparent size of the regular files, and the number of entries of any kind,
/// not following symlinks.
pub fn usage_of(root: &Arc<Dir>) -> Result<Usage> {
    let mut usage = Usage::default();
    beneath::walk(root, &mut |e| {
        usage.entries += 1;
        if e.meta.kind == Kind::File {
            usage.bytes += e.meta.size;
        }
        Ok(())
    })
    .map_err(|e| BuildError::io("measuring a workspace", e))?;
    Ok(usage)
}

fn file_info(rel: RelPath, meta: &Meta, target: &OsStr) -> pb::FileInfo {
    let symlink = meta.kind == Kind::Symlink;
    pb::FileInfo {
        path: rel.as_str().to_owned(),
        file_type: if symlink {
            pb::FileType::Symlink
        } else {
            pb::FileType::Regular
        } as i32,
        size_bytes: if symlink { 0 } else { meta.size },
        executable: !symlink && meta.mode & 0o111 != 0,
        modified_at: Some(prost_types::Timestamp {
            seconds: meta.mtime,
            nanos: i32::try_from(meta.mtime_nsec).unwrap_or(0),
        }),
        symlink_target: String::from_utf8_lossy(target.as_bytes()).into_owned(),
    }
}

/// Whether `path` was last modified at least `age` ago (false when that is unknown).
pub fn untouched_for(path: &Path, age: std::time::Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|elapsed| elapsed >= age)
}
