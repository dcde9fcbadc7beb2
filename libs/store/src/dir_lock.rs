//! One process per data directory.
//!
//! A service recovers its state at start (builds that were running become INTERRUPTED,
//! the staging area is wiped): run by a second process on a directory a live one is
//! using, that destroys the live one's work. So every service takes an exclusive
//! `flock` on `<dir>/.lock` before it reads or changes anything there, and holds it for
//! as long as it runs. The kernel drops the lock when the process dies, however it dies,
//! so a crash never leaves a stale lock behind. The file holds the holder's pid, for the
//! message a second process prints.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// The name of the lock file inside a data directory.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive lock on a data directory, released when dropped (or when the process
/// ends).
#[derive(Debug)]
pub struct DirLock {
    _lock: Flock<File>,
    path: PathBuf,
}

/// Why a data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds it.
    #[error(
        "the data directory {dir} is in use by another kiln process{holder}; stop it first, or use another data directory"
    )]
    InUse { dir: PathBuf, holder: String },
    #[error("locking the data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl DirLock {
    /// Takes the lock on the existing directory `dir` without waiting: a directory in
    /// use is refused at once with [`LockError::InUse`]. (The caller creates `dir`,
    /// with the mode it needs.)
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // A symlink planted as the lock file is refused, not followed.
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(LockError::InUse {
                    dir: dir.to_path_buf(),
                    holder: if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {pid})")
                    },
                });
            }
            Err((_, errno)) => return Err(io(errno.into())),
        };
        let pid = std::process::id().to_string();
        lock.set_len(0).map_err(io)?;
        lock.seek(SeekFrom::Start(0)).map_err(io)?;
        lock.write_all(pid.as_bytes()).map_err(io)?;
        Ok(Self { _lock: lock, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        fs::create_dir(&data).expect("mkdir");
        let first = DirLock::acquire(&data).expect("first");
        // flock locks belong to open file descriptions: a second open in this process
        // conflicts exactly as another process would.
        let err = DirLock::acquire(&data).expect_err("second is refused");
        let message = err.to_string();
        assert!(matches!(err, LockError::InUse { .. }), "{message}");
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        assert!(message.contains(&data.display().to_string()), "{message}");
        drop(first);
        DirLock::acquire(&data).expect("free again once the first is gone");
    }

    #[test]
    fn a_symlink_in_place_of_the_lock_file_is_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("elsewhere");
        fs::write(&target, "keep me").expect("write");
        let data = dir.path().join("data");
        fs::create_dir(&data).expect("mkdir");
        std::os::unix::fs::symlink(&target, data.join(LOCK_FILE)).expect("symlink");
        assert!(DirLock::acquire(&data).is_err());
        assert_eq!(fs::read_to_string(&target).expect("read"), "keep me");
    }
}
