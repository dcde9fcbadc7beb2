//! Workspace walks that never follow a symbolic link: disk use (like `du`) and the
//! ownership hand-over of [`Sandbox::prepare_workspace`](crate::Sandbox::prepare_workspace).
//!
//! Both run on the host, as root, over a tree a step can change at the same instant (the
//! disk monitor runs while the step does). Walking by path would follow a directory the
//! step swapped for a symlink (`renameat2(RENAME_EXCHANGE)`) between the check and the
//! use. So the walk is fd-relative: each directory is opened `O_NOFOLLOW | O_DIRECTORY`
//! relative to its parent's descriptor, entries are inspected with
//! `fstatat(AT_SYMLINK_NOFOLLOW)` and changed with `*at(AT_SYMLINK_NOFOLLOW)` calls. An
//! entry that changes meanwhile is seen as what it is at that instant, never followed.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use nix::unistd::{Gid, Uid, fchown, fchownat};

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// What [`usage`] measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Bytes allocated (st_blocks, so sparse files count what they use), the root
    /// included.
    pub bytes: u64,
    /// Entries of every kind below the root: files, directories, symlinks, others.
    pub entries: u64,
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// Opens the root (its last component must not be a symlink).
fn open_root(root: &Path) -> io::Result<OwnedFd> {
    Ok(open(root, DIR_FLAGS, Mode::empty())?)
}

/// The names in `dir`, without `.` and `..`.
fn names(dir: BorrowedFd<'_>) -> nix::Result<Vec<CString>> {
    let mut d = nix::dir::Dir::openat(dir, ".", DIR_FLAGS, Mode::empty())?;
    let mut out = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

/// Gone or changed kind between two calls: a running step did it; skip the entry.
fn raced(e: Errno) -> bool {
    matches!(e, Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP)
}

/// Visits every entry below the directory `root` (depth first, one descriptor per level
/// of depth, no recursion), giving the directory that holds it, its name and its
/// `lstat`. `descend` decides whether a directory is entered.
fn walk(
    root: OwnedFd,
    visit: &mut dyn FnMut(BorrowedFd<'_>, &CString, &FileStat) -> io::Result<()>,
    descend: &dyn Fn(&FileStat) -> bool,
) -> io::Result<()> {
    let root = Arc::new(root);
    let mut stack: Vec<(Arc<OwnedFd>, CString)> = Vec::new();
    match names(root.as_fd()) {
        Ok(n) => stack.extend(n.into_iter().map(|n| (Arc::clone(&root), n))),
        Err(e) => return Err(e.into()),
    }
    while let Some((parent, name)) = stack.pop() {
        let st = match fstatat(
            parent.as_fd(),
            name.as_c_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            Err(e) if raced(e) => continue,
            Err(e) => return Err(e.into()),
        };
        visit(parent.as_fd(), &name, &st)?;
        if !is_dir(&st) || !descend(&st) {
            continue;
        }
        let dir = match openat(parent.as_fd(), name.as_c_str(), DIR_FLAGS, Mode::empty()) {
            Ok(d) => Arc::new(d),
            Err(e) if raced(e) => continue,
            Err(e) => return Err(e.into()),
        };
        match names(dir.as_fd()) {
            Ok(n) => stack.extend(n.into_iter().map(|n| (Arc::clone(&dir), n))),
            Err(e) if raced(e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Disk use and entry count under `root`, not following symlinks and not crossing into
/// other filesystems. A tree it cannot read measures as empty.
pub(crate) fn usage(root: &Path) -> Usage {
    let Ok(fd) = open_root(root) else {
        return Usage::default();
    };
    let Ok(meta) = fstat(&fd) else {
        return Usage::default();
    };
    let dev = meta.st_dev;
    let mut usage = Usage {
        bytes: u64::try_from(meta.st_blocks).unwrap_or(0) * 512,
        entries: 0,
    };
    let _ = walk(
        fd,
        &mut |_, _, st| {
            if st.st_dev == dev {
                usage.entries += 1;
                usage.bytes += u64::try_from(st.st_blocks).unwrap_or(0) * 512;
            }
            Ok(())
        },
        &|st| st.st_dev == dev,
    );
    usage
}

/// Gives `root` and everything below it to `uid:gid`, changing symlinks themselves and
/// never what they point to (`fchownat(AT_SYMLINK_NOFOLLOW)` on an entry of a directory
/// descriptor opened `O_NOFOLLOW`).
pub(crate) fn chown_tree(root: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let fd = open_root(root)?;
    let meta = fstat(&fd)?;
    let (owner, group) = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
    if meta.st_uid != uid || meta.st_gid != gid {
        fchown(&fd, owner, group)?;
    }
    walk(
        fd,
        &mut |parent, name, st| {
            // Runs before every build: what earlier steps wrote is already theirs, and
            // skipping it halves the system calls over a large tree.
            if st.st_uid == uid && st.st_gid == gid {
                return Ok(());
            }
            match fchownat(
                parent,
                name.as_c_str(),
                owner,
                group,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(()) | Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(io::Error::other(format!("chown {name:?}: {e}"))),
            }
        },
        &|_| true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn usage_counts_every_entry_and_follows_no_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(ws.join("a/b")).unwrap();
        std::fs::write(ws.join("a/b/f"), "x").unwrap();
        std::fs::create_dir(&outside).unwrap();
        for i in 0..10 {
            std::fs::write(outside.join(i.to_string()), "y").unwrap();
        }
        symlink(&outside, ws.join("link")).unwrap();
        // a, a/b, a/b/f, link: the ten files behind the link are not counted.
        assert_eq!(usage(&ws).entries, 4);
    }
}
