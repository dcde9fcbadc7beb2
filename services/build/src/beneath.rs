//! File system access beneath a workspace that never follows a symbolic link.
//!
//! The server runs outside the sandbox (often as root) while a build — attacker code —
//! may change the workspace at the same time: reads (ReadFile, ListFiles,
//! DownloadArchive) run without the workspace lock. Checking a path with `lstat` and
//! then opening it by name is therefore a race: a build can swap a directory for a
//! symlink (`renameat2(RENAME_EXCHANGE)`) in between, and the server would follow it out
//! of the workspace. So nothing here takes a path: every operation is relative to a
//! [`Dir`], an open directory file descriptor, and names exactly one entry of it.
//! Directories are opened `O_NOFOLLOW | O_DIRECTORY` one component at a time, files
//! `O_NOFOLLOW`, metadata is `fstatat(AT_SYMLINK_NOFOLLOW)` or `fstat` of the opened
//! descriptor, symlinks are read with `readlinkat`. An entry swapped meanwhile is seen
//! as whatever it is at that instant, but never followed: the only directories ever
//! entered are the ones whose descriptors we hold.
//!
//! Names are single components: anything with `/`, `.` or `..` is refused outright.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags};
use rustix::io::Errno;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// An open directory: the anchor of every operation.
#[derive(Debug)]
pub struct Dir(OwnedFd);

/// What an entry is (never looking through a symlink).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// FIFOs, sockets, devices: never read, listed or archived.
    Other,
}

/// The metadata the service uses, from `fstatat(AT_SYMLINK_NOFOLLOW)` or `fstat`.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub kind: Kind,
    pub size: u64,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
}

impl From<rustix::fs::Stat> for Meta {
    fn from(st: rustix::fs::Stat) -> Self {
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        };
        Meta {
            kind,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: st.st_mtime,
            mtime_nsec: u32::try_from(st.st_mtime_nsec).unwrap_or(0),
        }
    }
}

/// The single component `name`, refusing anything that could leave the directory.
fn component(name: &OsStr) -> io::Result<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single path component"),
        ));
    }
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

/// Whether `e` is `errno`.
pub fn is(e: &io::Error, errno: Errno) -> bool {
    e.raw_os_error() == Some(errno.raw_os_error())
}

/// An entry that changed kind or vanished between two system calls: a concurrent build
/// did it, and the entry is skipped rather than failing the whole operation.
fn raced(e: &io::Error) -> bool {
    is(e, Errno::NOENT) || is(e, Errno::NOTDIR) || is(e, Errno::LOOP)
}

impl Dir {
    /// Opens the directory at `path` (a server-controlled path, e.g. a workspace's root);
    /// its last component must not be a symlink.
    pub fn open(path: &Path) -> io::Result<Dir> {
        Ok(Dir(rustix::fs::open(path, DIR_FLAGS, Mode::empty())?))
    }

    /// The subdirectory `name` (ENOTDIR/ELOOP when it is not a directory or a symlink).
    pub fn dir(&self, name: impl AsRef<OsStr>) -> io::Result<Dir> {
        let name = component(name.as_ref())?;
        Ok(Dir(rustix::fs::openat(
            &self.0,
            name.as_c_str(),
            DIR_FLAGS,
            Mode::empty(),
        )?))
    }

    /// Follows `components` one directory at a time, refusing any symlink.
    pub fn dir_path<'a>(
        self: &Arc<Self>,
        components: impl IntoIterator<Item = &'a str>,
    ) -> io::Result<Arc<Dir>> {
        let mut dir = Arc::clone(self);
        for c in components {
            dir = Arc::new(dir.dir(c)?);
        }
        Ok(dir)
    }

    /// This directory's own metadata.
    pub fn meta(&self) -> io::Result<Meta> {
        Ok(rustix::fs::fstat(&self.0)?.into())
    }

    /// The metadata of `name` itself (a symlink is reported as a symlink).
    pub fn stat(&self, name: impl AsRef<OsStr>) -> io::Result<Meta> {
        let name = component(name.as_ref())?;
        Ok(rustix::fs::statat(&self.0, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?.into())
    }

    /// Opens `name` for reading without following a symlink (ELOOP if it is one). A FIFO
    /// opens without blocking; callers check the kind with `fstat` on the result.
    pub fn open_file(&self, name: impl AsRef<OsStr>) -> io::Result<File> {
        let name = component(name.as_ref())?;
        let flags =
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.0, name.as_c_str(), flags, Mode::empty())?;
        // Reads of regular files ignore O_NONBLOCK; clear it anyway so that nothing
        // downstream sees a surprising EAGAIN.
        rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
        Ok(File::from(fd))
    }

    /// The target of the symlink `name` (EINVAL if it is not a symlink).
    pub fn read_link(&self, name: impl AsRef<OsStr>) -> io::Result<OsString> {
        let name = component(name.as_ref())?;
        let target = rustix::fs::readlinkat(&self.0, name.as_c_str(), Vec::new())?;
        Ok(OsString::from_vec(target.into_bytes()))
    }

    /// The names in this directory (without `.` and `..`), sorted by bytes.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.0)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsString::from_vec(name.to_vec()));
            }
        }
        names.sort();
        Ok(names)
    }

    /// Creates the directory `name` with `mode` (EEXIST if anything is there).
    pub fn mkdir(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<()> {
        let name = component(name.as_ref())?;
        Ok(rustix::fs::mkdirat(
            &self.0,
            name.as_c_str(),
            Mode::from_raw_mode(mode),
        )?)
    }

    /// Creates the symbolic link `name` pointing at `target` (stored as given, never
    /// resolved here).
    pub fn symlink(&self, target: &str, name: impl AsRef<OsStr>) -> io::Result<()> {
        let name = component(name.as_ref())?;
        Ok(rustix::fs::symlinkat(target, &self.0, name.as_c_str())?)
    }

    /// Renames the entry `name` (whatever it is; a symlink moves as a symlink) to
    /// `to/to_name`, replacing a file there.
    pub fn rename(
        &self,
        name: impl AsRef<OsStr>,
        to: &Dir,
        to_name: impl AsRef<OsStr>,
    ) -> io::Result<()> {
        let (from, dest) = (component(name.as_ref())?, component(to_name.as_ref())?);
        Ok(rustix::fs::renameat(
            &self.0,
            from.as_c_str(),
            &to.0,
            dest.as_c_str(),
        )?)
    }

    /// Moves the server-controlled file at `from` (e.g. in the staging area) to `name`.
    pub fn rename_in(&self, from: &Path, name: impl AsRef<OsStr>) -> io::Result<()> {
        let dest = component(name.as_ref())?;
        Ok(rustix::fs::renameat(CWD, from, &self.0, dest.as_c_str())?)
    }

    /// Removes the non-directory `name`.
    pub fn remove_file(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        let name = component(name.as_ref())?;
        Ok(rustix::fs::unlinkat(
            &self.0,
            name.as_c_str(),
            AtFlags::empty(),
        )?)
    }

    /// Removes `name` and, if it is a directory, everything below it (not following
    /// symlinks: a symlink is removed, never its target).
    pub fn remove_tree(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        let name = name.as_ref();
        match self.dir(name) {
            Ok(sub) => {
                for child in sub.names()? {
                    sub.remove_tree(&child)?;
                }
                let c = component(name)?;
                Ok(rustix::fs::unlinkat(
                    &self.0,
                    c.as_c_str(),
                    AtFlags::REMOVEDIR,
                )?)
            }
            Err(e) if is(&e, Errno::NOTDIR) || is(&e, Errno::LOOP) => self.remove_file(name),
            Err(e) => Err(e),
        }
    }
}

/// One entry met by [`walk`].
#[derive(Debug)]
pub struct Entry<'a> {
    /// The directory holding the entry, and its name there.
    pub parent: &'a Dir,
    pub name: &'a OsStr,
    /// `/`-separated path from the walk's start (raw bytes: names need not be UTF-8).
    pub path: &'a [u8],
    /// For a directory, from `fstat` of the descriptor the walk then descends through.
    pub meta: Meta,
}

struct Pending {
    parent: Arc<Dir>,
    name: OsString,
    path: Vec<u8>,
}

/// Visits every entry below `start` in depth-first pre-order, names sorted by bytes,
/// descending only into directories it opened itself with `O_NOFOLLOW`. Entries that
/// vanish or change kind while the walk runs are skipped. The walk keeps one descriptor
/// per level of depth, and no recursion, whatever the tree's shape.
pub fn walk(
    start: &Arc<Dir>,
    visit: &mut dyn FnMut(&Entry<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let mut stack = Vec::new();
    push_children(start, &[], &mut stack)?;
    while let Some(p) = stack.pop() {
        let meta = match p.parent.stat(&p.name) {
            Ok(m) => m,
            Err(e) if raced(&e) => continue,
            Err(e) => return Err(e),
        };
        if meta.kind != Kind::Dir {
            visit(&Entry {
                parent: &p.parent,
                name: &p.name,
                path: &p.path,
                meta,
            })?;
            continue;
        }
        let dir = match p.parent.dir(&p.name) {
            Ok(d) => Arc::new(d),
            Err(e) if raced(&e) => continue,
            Err(e) => return Err(e),
        };
        let meta = dir.meta()?;
        visit(&Entry {
            parent: &p.parent,
            name: &p.name,
            path: &p.path,
            meta,
        })?;
        match push_children(&dir, &p.path, &mut stack) {
            Err(e) if raced(&e) => {}
            other => other?,
        }
    }
    Ok(())
}

fn push_children(dir: &Arc<Dir>, path: &[u8], stack: &mut Vec<Pending>) -> io::Result<()> {
    for name in dir.names()?.into_iter().rev() {
        let mut child = Vec::with_capacity(path.len() + 1 + name.len());
        if !path.is_empty() {
            child.extend_from_slice(path);
            child.push(b'/');
        }
        child.extend_from_slice(name.as_bytes());
        stack.push(Pending {
            parent: Arc::clone(dir),
            name,
            path: child,
        });
    }
    Ok(())
}

#[cfg(test)]
#[path = "beneath_tests.rs"]
mod tests;
