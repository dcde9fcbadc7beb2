//! Tar streams in and out of workspaces.
//!
//! Upload: the chunks of the gRPC stream feed a blocking tar reader (through a small
//! channel, so a slow disk slows the client, not the server's memory). Entries are
//! checked one by one: only regular files, directories and symlinks whose relative
//! target stays inside the workspace ([`link_stays_inside`]; stored as links, never
//! followed by the server), every path by the workspace path rules, the total size and entry count (directories count like files) against the
//! workspace limits before a byte is written (tar bombs stop at their first header over
//! the limit). Files go to a
//! staging area and the change is applied atomically like WriteFiles.
//!
//! Download: a blocking tar writer walks the tree fd-relative ([`crate::beneath`]): each
//! header is built from the descriptor it opened itself (`O_NOFOLLOW`), symlinks are
//! archived as symlinks from `readlinkat`, and nothing is ever opened by path (the tar
//! crate's `append_path*` would). It sends 32 KiB chunks through a channel.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use kiln_proto::build as pb;
use kiln_rpc::ApiError;
use tokio::sync::mpsc;
use tonic::{Code, Status};

use crate::beneath::{self, Dir, Kind, Meta};
use crate::error::{BuildError, Result, invalid, reason, violation};
use crate::paths::{self, RelPath};
use crate::workspace::{self, Disk, Stage, Txn, Usage};

/// Chunks of an upload, as a `Read`.
pub struct ChunkReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChunkReader {
    pub fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        Self {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

fn bad_archive(why: String) -> BuildError {
    invalid(reason::INVALID_ARCHIVE, vec![violation("chunk", why)]).into()
}

fn too_large(why: String) -> BuildError {
    ApiError::new(Code::ResourceExhausted, reason::WORKSPACE_TOO_LARGE, why).into()
}

enum Item {
    File(PathBuf),
    Dir,
    Symlink(String),
}

/// Whether a symlink at `link` (a workspace path) with `target` resolves, lexically,
/// to a place inside the workspace: relative, and never climbing above the root. The
/// server never follows links itself; this keeps an uploaded tree meaningful inside a
/// build's sandbox and harmless when downloaded and unpacked elsewhere.
pub fn link_stays_inside(link: &RelPath, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return false;
    }
    // The link's own directory is where its target is resolved from.
    let mut depth = link.components().count().saturating_sub(1) as i64;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

/// Reads the archive into a staging area, then takes the workspace with `lock` and
/// applies it to workspace `id`. Returns the lock still held.
pub fn upload<G>(
    disk: &Disk,
    id: &str,
    header: &pb::upload_archive_request::Header,
    directory: &RelPath,
    input: ChunkReader,
    lock: impl FnOnce() -> Result<G>,
) -> Result<(Usage, u64, G)> {
    let mut stage = disk.stage()?;
    let result = extract(disk, header, directory, input, &mut stage).and_then(|items| {
        let guard = lock()?;
        let root = disk.open(id)?;
        let mut txn = Txn::new(stage.dir.join("trash"))?;
        let applied = apply(disk, &root, header.replace, directory, &items, &mut txn);
        let files = items
            .values()
            .filter(|i| matches!(i, Item::File(_)))
            .count() as u64;
        match applied {
            Ok(usage) => {
                txn.commit();
                Ok((usage, files, guard))
            }
            Err(e) => {
                txn.rollback();
                Err(e)
            }
        }
    });
    stage.remove();
    result
}

fn extract(
    disk: &Disk,
    header: &pb::upload_archive_request::Header,
    directory: &RelPath,
    input: ChunkReader,
    stage: &mut Stage,
) -> Result<BTreeMap<RelPath, Item>> {
    let limits = disk.limits;
    let reader: Box<dyn Read> = match pb::ArchiveFormat::try_from(header.format) {
        Ok(pb::ArchiveFormat::TarGzip) => Box::new(flate2::read::GzDecoder::new(input)),
        _ => Box::new(input),
    };
    let mut archive = tar::Archive::new(crate::tar_guard::TarHeaderGuard::new(reader));
    let mut items = BTreeMap::new();
    let (mut total, mut count) = (0u64, 0u64);
    let entries = archive
        .entries()
        .map_err(|e| bad_archive(format!("not a tar stream: {e}")))?;
    for (n, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| bad_archive(format!("entry {n}: {e}")))?;
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8(raw)
            .map_err(|_| bad_archive(format!("entry {n}: the path is not UTF-8")))?;
        let trimmed = name.trim_start_matches("./").trim_end_matches('/');
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
        {
            continue;
        }
        if trimmed.is_empty() || trimmed == "." {
            continue; // the archive's root directory
        }
        let rel = paths::check("chunk", trimmed, &limits, false)
            .map_err(|v| bad_archive(format!("entry {n} ({name:?}): path {}", v.description)))?;
        let rel = if directory.is_root() {
            rel
        } else {
            paths::check(
                "chunk",
                &format!("{}/{}", directory.as_str(), rel.as_str()),
                &limits,
                false,
            )
            .map_err(|v| bad_archive(format!("entry {n} ({name:?}): path {}", v.description)))?
        };
        // Every entry counts against the limit: a directory costs an inode like a file.
        count += 1;
        if count > limits.max_files {
            return Err(too_large(format!(
                "the archive unpacks to more than the workspace limit of {} entries (files and directories)",
                limits.max_files
            )));
        }
        if kind.is_dir() {
            items.insert(rel, Item::Dir);
            continue;
        }
        if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .map(|t| String::from_utf8(t.into_owned()))
                .transpose()
                .map_err(|_| {
                    bad_archive(format!(
                        "entry {n} ({name:?}): the link target is not UTF-8"
                    ))
                })?
                .unwrap_or_default();
            if target.len() > limits.max_path_bytes || !link_stays_inside(&rel, &target) {
                return Err(bad_archive(format!(
                    "entry {n} ({name:?}): a symbolic link must have a relative target inside the workspace, not {target:?}"
                )));
            }
            items.insert(rel, Item::Symlink(target));
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(bad_archive(format!(
                "entry {n} ({name:?}): only regular files, directories and symbolic links are accepted, not {kind:?} (no hard links)"
            )));
        }
        let size = entry.size();
        total = total.saturating_add(size);
        if size > limits.max_file_bytes {
            return Err(too_large(format!(
                "entry {n} ({name:?}) is larger than {} bytes",
                limits.max_file_bytes
            )));
        }
        if total > limits.max_bytes {
            return Err(too_large(format!(
                "the archive unpacks to more than the workspace limit of {} bytes",
                limits.max_bytes
            )));
        }
        let executable = entry.header().mode().is_ok_and(|m| m & 0o111 != 0);
        let staged = stage.next_path();
        let mut out = workspace::create_file(&staged, executable)?;
        let copied = io::copy(&mut (&mut entry).take(size), &mut out)
            .map_err(|e| bad_archive(format!("entry {n} ({name:?}): {e}")))?;
        if copied != size {
            return Err(bad_archive(format!("entry {n} ({name:?}) is truncated")));
        }
        items.insert(rel, Item::File(staged));
    }
    Ok(items)
}

fn apply(
    disk: &Disk,
    root: &Arc<Dir>,
    replace: bool,
    directory: &RelPath,
    items: &BTreeMap<RelPath, Item>,
    txn: &mut Txn,
) -> Result<Usage> {
    if replace {
        if directory.is_root() {
            let names = root
                .names()
                .map_err(|e| BuildError::io("listing a workspace", e))?;
            for name in names {
                txn.remove(root, &name)?;
            }
        } else {
            let r = paths::resolve(
                root,
                directory,
                "header.directory",
                paths::Parents::Existing,
            )?;
            if r.parent.stat(&r.name).is_ok() {
                txn.remove(&r.parent, r.name.as_ref())?;
            }
        }
    }
    for (rel, item) in items {
        match item {
            Item::Dir => txn.mkdir(root, rel, "chunk")?,
            Item::File(staged) => txn.place(root, rel, "chunk", staged)?,
            Item::Symlink(target) => txn.place_symlink(root, rel, "chunk", target)?,
        }
    }
    disk.check_quota(root)
}

/// Writes chunks of at most 32 KiB into a channel.
struct ChunkWriter {
    tx: mpsc::Sender<Result<pb::DownloadArchiveResponse, Status>>,
    buf: Vec<u8>,
}

const DOWNLOAD_CHUNK: usize = 32 * 1024;

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(pb::DownloadArchiveResponse { chunk }))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(DOWNLOAD_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == DOWNLOAD_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

/// Streams `dir` of workspace `id` as a tar (optionally gzip) into `tx`.
pub fn download(
    disk: &Disk,
    id: &str,
    dir: &RelPath,
    gzip: bool,
    tx: mpsc::Sender<Result<pb::DownloadArchiveResponse, Status>>,
) -> io::Result<()> {
    let root = Arc::new(Dir::open(&disk.dir(id))?);
    let start = root.dir_path(dir.components())?;
    let writer = ChunkWriter {
        tx,
        buf: Vec::with_capacity(DOWNLOAD_CHUNK),
    };
    let sink: Box<dyn Write> = if gzip {
        Box::new(flate2::write::GzEncoder::new(
            writer,
            flate2::Compression::fast(),
        ))
    } else {
        Box::new(writer)
    };
    let mut builder = tar::Builder::new(sink);
    if !dir.is_root() {
        let mut header = header(&start.meta()?, tar::EntryType::Directory);
        builder.append_data(&mut header, dir.as_str(), io::empty())?;
    }
    beneath::walk(&start, &mut |e| {
        let Some(name) = workspace::api_path(dir, e.path) else {
            return Ok(()); // not UTF-8: cannot be named in the API
        };
        append_entry(&mut builder, e, name.as_str())
    })?;
    let mut sink = builder.into_inner()?;
    sink.flush()
}

/// One entry, from what this walk itself opened; an entry that changed kind in the
/// meantime (a build is running) is left out rather than looked through.
fn append_entry(
    builder: &mut tar::Builder<Box<dyn Write>>,
    e: &beneath::Entry<'_>,
    name: &str,
) -> io::Result<()> {
    match e.meta.kind {
        Kind::Dir => {
            let mut header = header(&e.meta, tar::EntryType::Directory);
            builder.append_data(&mut header, name, io::empty())
        }
        Kind::File => {
            let file = match e.parent.open_file(e.name) {
                Ok(f) => f,
                Err(err) if raced(&err) => return Ok(()),
                Err(err) => return Err(err),
            };
            let meta: Meta = rustix::fs::fstat(&file)?.into();
            if meta.kind != Kind::File {
                return Ok(());
            }
            let mut header = header(&meta, tar::EntryType::Regular);
            header.set_size(meta.size);
            // Exactly `size` bytes whatever the file does meanwhile (it may shrink or
            // grow): the header promised that many.
            let body = (&file).take(meta.size).chain(io::repeat(0)).take(meta.size);
            builder.append_data(&mut header, name, body)
        }
        Kind::Symlink => {
            let target = match e.parent.read_link(e.name) {
                Ok(t) => t,
                // EINVAL: no longer a symlink.
                Err(err) if raced(&err) || beneath::is(&err, rustix::io::Errno::INVAL) => {
                    return Ok(());
                }
                Err(err) => return Err(err),
            };
            let mut header = header(&e.meta, tar::EntryType::Symlink);
            builder.append_link(
                &mut header,
                name,
                Path::new(std::ffi::OsStr::from_bytes(target.as_bytes())),
            )
        }
        Kind::Other => Ok(()),
    }
}

fn raced(e: &io::Error) -> bool {
    use rustix::io::Errno;
    beneath::is(e, Errno::NOENT) || beneath::is(e, Errno::LOOP) || beneath::is(e, Errno::NXIO)
}

/// A GNU header with the entry's mode, owner and modification time (size 0).
fn header(meta: &Meta, kind: tar::EntryType) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(meta.mode);
    header.set_uid(u64::from(meta.uid));
    header.set_gid(u64::from(meta.gid));
    header.set_mtime(u64::try_from(meta.mtime).unwrap_or(0));
    header.set_size(0);
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(p: &str) -> RelPath {
        let limits = crate::config::WorkspaceLimits::default();
        paths::check("path", p, &limits, false).expect("a valid path")
    }

    #[test]
    fn only_relative_links_that_stay_inside_are_inside() {
        assert!(link_stays_inside(&rel("a"), "b"));
        assert!(link_stays_inside(&rel("d/a"), "../b"));
        assert!(link_stays_inside(&rel("d/e/a"), "../../x/./y"));
        assert!(!link_stays_inside(&rel("a"), "../b"));
        assert!(!link_stays_inside(&rel("d/a"), "../../b"));
        assert!(!link_stays_inside(&rel("d/a"), "x/../../../b"));
        assert!(!link_stays_inside(&rel("a"), "/etc/passwd"));
        assert!(!link_stays_inside(&rel("a"), ""));
    }
}
