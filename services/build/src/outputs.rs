//! Output bytes of builds, kept out of SQLite.
//!
//! An Output event's bytes go to `<dir>/<build_id>.out`, an append-only file written
//! only by the build's one event-log writer; the event's row in the store keeps its
//! metadata and the `(offset, len)` of its bytes. Streaming output thus writes each byte
//! once, instead of into SQLite's WAL and again at every checkpoint: 256 MiB to one
//! watcher over TLS went from ~200 to ~520 MiB/s (services/build/README.md).

use std::path::{Path, PathBuf};

use kiln_proto::build as pb;
use pb::build_event::Event;

use crate::error::{BuildError, Result};

/// An event as stored: Output data moved to the build's file, at `(offset, len)`.
pub(crate) type StoredEvent = (pb::BuildEvent, Option<(i64, i64)>);

/// The output bytes of builds: `<dir>/<build_id>.out`, appended to by the build's one
/// writer (the event log's writer lock), read back by position. Keeping bulk bytes out of
/// SQLite halves what streaming output writes (no WAL copy, no checkpoint copy).
#[derive(Debug, Clone)]
pub(crate) struct OutputFiles {
    dir: PathBuf,
}

impl OutputFiles {
    pub(crate) fn new(dir: &Path) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| BuildError::io(format!("creating {}", dir.display()), e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, build_id: &str) -> PathBuf {
        self.dir.join(format!("{build_id}.out"))
    }

    /// Appends the data of the Output events to the build's file and returns the events
    /// without it, with where it went.
    pub(crate) async fn spill(
        &self,
        build_id: &str,
        events: &[pb::BuildEvent],
    ) -> Result<Vec<StoredEvent>> {
        let data: Vec<bytes::Bytes> = events
            .iter()
            .filter_map(|e| match &e.event {
                Some(Event::Output(o)) if !o.data.is_empty() => Some(o.data.clone()),
                _ => None,
            })
            .collect();
        if data.is_empty() {
            return Ok(events.iter().map(|e| (e.clone(), None)).collect());
        }
        let path = self.path(build_id);
        let start = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&path)?;
            let start = file.metadata()?.len();
            let mut all = Vec::with_capacity(data.iter().map(|d| d.len()).sum());
            for d in &data {
                all.extend_from_slice(d);
            }
            file.write_all(&all)?;
            Ok(start)
        })
        .await
        .map_err(|e| BuildError::Corrupt(format!("output writer: {e}")))?
        .map_err(|e| BuildError::io(format!("writing the output of build {build_id}"), e))?;
        let mut offset = i64::try_from(start).unwrap_or(i64::MAX);
        Ok(events
            .iter()
            .map(|e| match &e.event {
                Some(Event::Output(o)) if !o.data.is_empty() => {
                    let len = o.data.len() as i64;
                    let mut stripped = e.clone();
                    if let Some(Event::Output(out)) = &mut stripped.event {
                        out.data = bytes::Bytes::new();
                    }
                    let range = (offset, len);
                    offset += len;
                    (stripped, Some(range))
                }
                _ => (e.clone(), None),
            })
            .collect())
    }

    /// Puts the bytes back into Output events read from the store.
    pub(crate) async fn fill(
        &self,
        build_id: &str,
        events: Vec<StoredEvent>,
    ) -> Result<Vec<pb::BuildEvent>> {
        if events.iter().all(|(_, range)| range.is_none()) {
            return Ok(events.into_iter().map(|(e, _)| e).collect());
        }
        let path = self.path(build_id);
        let build_id = build_id.to_owned();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::open(&path).map_err(|e| {
                BuildError::io(format!("reading the output of build {build_id}"), e)
            })?;
            events
                .into_iter()
                .map(|(mut event, range)| {
                    if let (Some((offset, len)), Some(Event::Output(out))) =
                        (range, &mut event.event)
                    {
                        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
                        file.read_exact_at(&mut buf, u64::try_from(offset).unwrap_or(0))
                            .map_err(|e| {
                                BuildError::io(format!("reading the output of build {build_id}"), e)
                            })?;
                        out.data = buf.into();
                    }
                    Ok(event)
                })
                .collect()
        })
        .await
        .map_err(|e| BuildError::Corrupt(format!("output reader: {e}")))?
    }

    pub(crate) async fn remove(&self, build_id: &str) {
        match tokio::fs::remove_file(self.path(build_id)).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(build_id, %e, "cannot remove a build's output file"),
        }
    }
}
