//! Workspace handlers: create, list, write, read, archives, delete.

use std::io::{Read, Seek, SeekFrom};

use futures::StreamExt;
use kiln_proto::build as pb;
use kiln_rpc::{ApiError, Principal};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::BuildApi;
use crate::archive::{self, ChunkReader};
use crate::error::{BuildError, Result, busy, invalid, reason, violation};
use crate::paths;
use crate::service::{cursor, owner_filter, page_size};
use crate::store::{ListFilter, WorkspaceRow, now_micros, page_token};
use crate::validate::{self, Violations};
use crate::workspace::NewFile;

/// Largest ReadFile chunk.
const READ_CHUNK: usize = 32 * 1024;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BuildError::Config(format!("blocking task: {e}")))?
}

impl BuildApi {
    /// Checks the files of a request: paths (unique), sizes, count.
    fn check_files(&self, files: &[pb::File], v: &mut Violations) -> Vec<NewFile> {
        let limits = self.shared().config.workspace;
        if files.len() > limits.max_files_per_request {
            v.push(
                reason::WORKSPACE_TOO_LARGE,
                "files",
                format!("at most {} files per request", limits.max_files_per_request),
            );
        }
        let mut path_violations = Vec::new();
        let paths = paths::check_all(
            |i| format!("files[{i}].path"),
            files.iter().map(|f| f.path.as_str()),
            &limits,
            &mut path_violations,
        );
        v.extend(reason::INVALID_PATH, path_violations);
        for (i, f) in files.iter().enumerate() {
            if f.content.len() as u64 > limits.max_file_bytes {
                v.push(
                    reason::WORKSPACE_TOO_LARGE,
                    format!("files[{i}].content"),
                    format!("is larger than {} bytes", limits.max_file_bytes),
                );
            }
        }
        if paths.len() != files.len() {
            return Vec::new(); // violations recorded; nothing will be written
        }
        files
            .iter()
            .zip(paths)
            .enumerate()
            .map(|(i, (f, path))| NewFile {
                path,
                field: format!("files[{i}].path"),
                content: f.content.clone(),
                executable: f.executable,
            })
            .collect()
    }

    pub(crate) async fn create_workspace_impl(
        &self,
        p: &Principal,
        req: pb::CreateWorkspaceRequest,
    ) -> Result<pb::Workspace> {
        if p.scope.as_ref().is_some_and(|s| s.workspace_id.is_some()) {
            // A token limited to one workspace must not open others for itself.
            return Err(ApiError::permission_denied(
                kiln_rpc::error::reason::DELEGATION_SCOPE_EXCEEDED,
                "this delegated token is limited to one workspace and cannot create others",
            )
            .into());
        }
        let mut v = Violations::default();
        let files = self.check_files(&req.files, &mut v);
        validate::check_labels("labels", &req.labels, &mut v);
        validate::check_workspace_name("name", &req.name, &mut v);
        v.into_result(None)?;
        let encoded: Vec<Vec<u8>> = req.files.iter().map(Message::encode_to_vec).collect();
        let mut parts: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
        // Only a named request hashes its name: the hash of an unnamed one stays as before.
        let named = format!("name={}", req.name);
        if !req.name.is_empty() {
            parts.push(named.as_bytes());
        }
        let hash = validate::request_hash(&parts, &[&req.labels]);
        let request_id = (!req.request_id.is_empty()).then_some(req.request_id.as_str());
        let store = &self.shared().store;
        if let Some(rid) = request_id
            && let Some(existing) = store.workspace_by_request(&p.subject, rid).await?
        {
            return same_workspace(existing, &hash);
        }
        let name = (!req.name.is_empty()).then(|| req.name.clone());
        if let Some(name) = &name
            && store.workspace_by_name(&p.subject, name).await?.is_some()
        {
            return Err(name_taken(name).into());
        }
        let id = uuid::Uuid::new_v4().to_string();
        let disk = self.shared().disk.clone();
        let ws_id = id.clone();
        let usage = blocking(move || {
            disk.create(&ws_id)?;
            let result = disk.write_files(&ws_id, &[], &files).map_err(|e| match e {
                // The contract answers INVALID_ARGUMENT for too large initial files.
                BuildError::Api(a) if a.reason() == reason::WORKSPACE_TOO_LARGE => ApiError::new(
                    tonic::Code::InvalidArgument,
                    reason::WORKSPACE_TOO_LARGE,
                    a.message().to_owned(),
                )
                .into(),
                other => other,
            });
            if result.is_err() {
                let _ = disk.remove(&ws_id);
            }
            result
        })
        .await?;
        let now = now_micros();
        let row = WorkspaceRow {
            id: id.clone(),
            owner: p.subject.clone(),
            size_bytes: usage.bytes,
            file_count: usage.entries,
            created_at: now,
            updated_at: now,
            request_hash: Some(hash.clone()),
            labels: req.labels,
            name: name.clone(),
        };
        if let Err(e) = store.insert_workspace(&row, request_id).await {
            let disk = self.shared().disk.clone();
            let _ = blocking(move || disk.remove(&id)).await;
            if let (BuildError::Store(sqlx::Error::Database(db)), Some(rid)) = (&e, request_id)
                && db.is_unique_violation()
                && let Some(existing) = store.workspace_by_request(&p.subject, rid).await?
            {
                return same_workspace(existing, &hash);
            }
            // Two creates racing for one name: the unique index decides.
            if let (BuildError::Store(sqlx::Error::Database(db)), Some(name)) = (&e, &name)
                && db.is_unique_violation()
                && store.workspace_by_name(&p.subject, name).await?.is_some()
            {
                return Err(name_taken(name).into());
            }
            return Err(e);
        }
        Ok(crate::wire::workspace_to_proto(&row))
    }

    pub(crate) async fn list_workspaces_impl(
        &self,
        p: &Principal,
        req: pb::ListWorkspacesRequest,
    ) -> Result<pb::ListWorkspacesResponse> {
        let limit = page_size("page_size", req.page_size, 100, 1000)?;
        let filter = ListFilter {
            owner: owner_filter(p, req.owner),
            labels: req.labels.into_iter().collect(),
            before: cursor(&req.page_token)?,
            limit: limit + 1,
            ..ListFilter::default()
        };
        let mut rows = self.shared().store.list_workspaces(&filter).await?;
        let more = rows.len() as i64 > limit;
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => page_token(last.created_at, &last.id),
            _ => String::new(),
        };
        Ok(pb::ListWorkspacesResponse {
            workspaces: rows.iter().map(crate::wire::workspace_to_proto).collect(),
            next_page_token,
        })
    }

    /// Takes the workspace's lock for an API change, refusing while a build runs on it.
    async fn lock_for_change(&self, id: &str) -> Result<crate::control::WorkspaceHold> {
        let shared = self.shared();
        if shared.control.workspace_busy(id).await? {
            return Err(
                busy("a build of this workspace is running; wait for it or cancel it").into(),
            );
        }
        let guard = shared.control.hold_workspace(id).await?;
        if shared.control.workspace_busy(id).await? {
            return Err(
                busy("a build of this workspace is running; wait for it or cancel it").into(),
            );
        }
        // A DeleteWorkspace that held the lock while this call waited has removed it.
        if shared.store.get_workspace(id).await?.is_none() {
            return Err(ApiError::not_found("workspace", id).into());
        }
        Ok(guard)
    }

    pub(crate) async fn write_files_impl(
        &self,
        p: &Principal,
        req: pb::WriteFilesRequest,
    ) -> Result<pb::WriteFilesResponse> {
        let ws = self.workspace_for(p, &req.workspace_id, true).await?;
        let limits = self.shared().config.workspace;
        let mut v = Violations::default();
        let files = self.check_files(&req.files, &mut v);
        if req.delete_paths.len() > limits.max_files_per_request {
            v.push(
                reason::WORKSPACE_TOO_LARGE,
                "delete_paths",
                format!("at most {} paths per request", limits.max_files_per_request),
            );
        }
        let mut path_violations = Vec::new();
        let deletes = paths::check_all(
            |i| format!("delete_paths[{i}]"),
            req.delete_paths.iter().map(String::as_str),
            &limits,
            &mut path_violations,
        );
        v.extend(reason::INVALID_PATH, path_violations);
        v.into_result(None)?;
        let _guard = self.lock_for_change(&ws.id).await?;
        let disk = self.shared().disk.clone();
        let id = ws.id.clone();
        let usage = blocking(move || disk.write_files(&id, &deletes, &files)).await?;
        Ok(pb::WriteFilesResponse {
            workspace: Some(self.record_usage(&ws.id, usage).await?),
        })
    }

    /// Stores a workspace's new size after a change and returns the workspace as it is now.
    async fn record_usage(
        &self,
        id: &str,
        usage: crate::workspace::Usage,
    ) -> Result<pb::Workspace> {
        let store = &self.shared().store;
        store
            .set_workspace_usage(id, usage.bytes, usage.entries, true)
            .await?;
        let ws = store
            .get_workspace(id)
            .await?
            .ok_or_else(|| ApiError::not_found("workspace", id))?;
        Ok(crate::wire::workspace_to_proto(&ws))
    }

    pub(crate) async fn list_files_impl(
        &self,
        p: &Principal,
        req: pb::ListFilesRequest,
    ) -> Result<pb::ListFilesResponse> {
        let ws = self.workspace_for(p, &req.workspace_id, false).await?;
        let limits = self.shared().config.workspace;
        let dir = paths::check("directory", &req.directory, &limits, true)
            .map_err(|v| BuildError::from(invalid(reason::INVALID_PATH, vec![v])))?;
        let limit =
            usize::try_from(page_size("page_size", req.page_size, 1000, 10_000)?).unwrap_or(1000);
        let disk = self.shared().disk.clone();
        let after = req.page_token;
        let root = disk.dir(&ws.id);
        let id = ws.id.clone();
        let listed = blocking(move || disk.list(&id, &dir, &after, limit)).await;
        let (files, more) = unless_deleted(&root, &ws.id, listed)?;
        let next_page_token = match (more, files.last()) {
            (true, Some(last)) => last.path.clone(),
            _ => String::new(),
        };
        Ok(pb::ListFilesResponse {
            files,
            next_page_token,
        })
    }

    pub(crate) async fn read_file_impl(
        &self,
        p: &Principal,
        req: pb::ReadFileRequest,
    ) -> Result<futures::stream::BoxStream<'static, Result<pb::ReadFileResponse, Status>>> {
        let ws = self.workspace_for(p, &req.workspace_id, false).await?;
        let limits = self.shared().config.workspace;
        let path = paths::check("path", &req.path, &limits, false)
            .map_err(|v| BuildError::from(invalid(reason::INVALID_PATH, vec![v])))?;
        let disk = self.shared().disk.clone();
        let root = disk.dir(&ws.id);
        let id = ws.id.clone();
        // Once open, the file reads to the end even if the workspace is deleted meanwhile.
        let opened = blocking(move || disk.open_regular(&id, &path)).await;
        let (mut file, size) = unless_deleted(&root, &ws.id, opened)?;
        if req.offset > size {
            return Err(ApiError::new(
                tonic::Code::OutOfRange,
                reason::OUT_OF_RANGE,
                format!(
                    "offset {} is past the end of the file ({size} bytes)",
                    req.offset
                ),
            )
            .into());
        }
        let end = req
            .limit
            .map_or(size, |l| size.min(req.offset.saturating_add(l)));
        let (tx, rx) = mpsc::channel(4);
        let offset = req.offset;
        // The file was opened before the stream starts; a blocking reader feeds a small
        // channel at the client's pace.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = file.seek(SeekFrom::Start(offset)) {
                let _ = tx.blocking_send(Err(Status::from(BuildError::io("reading a file", e))));
                return;
            }
            let mut pos = offset;
            while pos < end {
                let want =
                    usize::try_from((end - pos).min(READ_CHUNK as u64)).unwrap_or(READ_CHUNK);
                let mut buf = vec![0u8; want];
                let n = match file.read(&mut buf) {
                    Ok(0) => break, // the file shrank meanwhile
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .blocking_send(Err(Status::from(BuildError::io("reading a file", e))));
                        return;
                    }
                };
                buf.truncate(n);
                let chunk = pb::ReadFileResponse {
                    offset: pos,
                    data: buf.into(),
                    size_bytes: size,
                };
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return;
                }
                pos += n as u64;
            }
        });
        Ok(ReceiverStream::new(rx).boxed())
    }

    pub(crate) async fn upload_impl(
        &self,
        p: &Principal,
        mut stream: tonic::Streaming<pb::UploadArchiveRequest>,
    ) -> Result<pb::UploadArchiveResponse> {
        let header = match stream.message().await.map_err(status_to_error)? {
            Some(pb::UploadArchiveRequest {
                part: Some(pb::upload_archive_request::Part::Header(h)),
            }) => h,
            _ => {
                return Err(ApiError::invalid_field(
                    "header",
                    "the first message must carry the header",
                )
                .into());
            }
        };
        let ws = self.workspace_for(p, &header.workspace_id, true).await?;
        let limits = self.shared().config.workspace;
        let directory = paths::check("header.directory", &header.directory, &limits, true)
            .map_err(|v| BuildError::from(invalid(reason::INVALID_PATH, vec![v])))?;
        // Fail fast while a build runs; the lock itself is taken only to apply (below).
        if self.shared().control.workspace_busy(&ws.id).await? {
            return Err(
                busy("a build of this workspace is running; wait for it or cancel it").into(),
            );
        }
        let (tx, rx) = mpsc::channel(8);
        let disk = self.shared().disk.clone();
        let id = ws.id.clone();
        let dir = directory.clone();
        // The archive is unpacked into a staging area at the client's pace without the
        // workspace's lock: a client that streams slowly (or stalls) holds up no build
        // and no other change. The lock is taken once the archive is complete, for the
        // quick apply, and only once the client's stream has ended cleanly (an archive
        // followed by a broken stream is not applied either).
        let api = self.clone();
        let runtime = tokio::runtime::Handle::current();
        let (fed, fed_ok) = tokio::sync::oneshot::channel::<()>();
        let unpack = tokio::task::spawn_blocking(move || {
            archive::upload(&disk, &id, &header, &dir, ChunkReader::new(rx), || {
                runtime.block_on(async {
                    fed_ok.await.map_err(|_| {
                        BuildError::from(ApiError::invalid_field(
                            "chunk",
                            "the upload stream ended with an error",
                        ))
                    })?;
                    api.lock_for_change(&id).await
                })
            })
        });
        let feed = feed_upload(&mut stream, &tx, &limits).await;
        drop(tx); // the end of the archive for the unpacker
        if let Err(e) = feed {
            drop(fed); // the unpacker applies nothing
            let _ = unpack.await;
            return Err(e);
        }
        let _ = fed.send(());
        let (usage, files_written, _guard) = unpack
            .await
            .map_err(|e| BuildError::Config(format!("unpack task: {e}")))??;
        Ok(pb::UploadArchiveResponse {
            workspace: Some(self.record_usage(&ws.id, usage).await?),
            files_written,
        })
    }

    pub(crate) async fn download_impl(
        &self,
        p: &Principal,
        req: pb::DownloadArchiveRequest,
    ) -> Result<futures::stream::BoxStream<'static, Result<pb::DownloadArchiveResponse, Status>>>
    {
        let ws = self.workspace_for(p, &req.workspace_id, false).await?;
        let limits = self.shared().config.workspace;
        let dir = paths::check("directory", &req.directory, &limits, true)
            .map_err(|v| BuildError::from(invalid(reason::INVALID_PATH, vec![v])))?;
        let disk = self.shared().disk.clone();
        let root = disk.dir(&ws.id);
        let (check_disk, check_id, check_dir) = (disk.clone(), ws.id.clone(), dir.clone());
        let checked = blocking(move || check_disk.check_directory(&check_id, &check_dir)).await;
        unless_deleted(&root, &ws.id, checked)?;
        let gzip = req.format == pb::ArchiveFormat::TarGzip as i32;
        let (tx, rx) = mpsc::channel(8);
        let id = ws.id;
        tokio::task::spawn_blocking(move || {
            let errors = tx.clone();
            let result = archive::download(&disk, &id, &dir, gzip, tx);
            if matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe) {
                return; // the client went away
            }
            // A walk that raced a DeleteWorkspace may have ended early without an error:
            // the archive is then incomplete, and the stream ends NOT_FOUND, not OK.
            let result = result.map_err(|e| BuildError::io("archiving a workspace", e));
            if let Err(e) = unless_deleted(&root, &id, result) {
                let _ = errors.blocking_send(Err(Status::from(e)));
            }
        });
        Ok(ReceiverStream::new(rx).boxed())
    }

    pub(crate) async fn delete_workspace_impl(
        &self,
        p: &Principal,
        id: &str,
    ) -> Result<pb::DeleteWorkspaceResponse> {
        let ws = self.workspace_for(p, id, true).await?;
        let shared = self.shared();
        let _guard = self.lock_for_change(&ws.id).await?;
        // Row first, as in retention: NOT_FOUND never points at a half-removed tree. The
        // delete itself refuses while a build is queued or running.
        if !shared.store.delete_workspace(&ws.id).await? {
            return Err(busy(
                "a build of this workspace is queued or running; wait for it or cancel it",
            )
            .into());
        }
        let disk = shared.disk.clone();
        let dir_id = ws.id.clone();
        blocking(move || disk.remove(&dir_id)).await?;
        // Callers still waiting on the lock find the record gone and answer NOT_FOUND.
        shared.control.forget_workspace(&ws.id);
        Ok(pb::DeleteWorkspaceResponse {})
    }
}

/// Passes an upload's chunks to the unpacker until the client's stream ends. A client
/// that sends nothing for `upload_idle_timeout`, or is not done after `upload_timeout`,
/// gets DEADLINE_EXCEEDED (UPLOAD_TIMED_OUT): a stalled upload holds a blocking thread
/// and a staging area, and must not hold them for ever.
async fn feed_upload(
    stream: &mut tonic::Streaming<pb::UploadArchiveRequest>,
    tx: &mpsc::Sender<bytes::Bytes>,
    limits: &crate::config::WorkspaceLimits,
) -> Result<()> {
    let timed_out = |why: String| -> BuildError {
        ApiError::new(
            tonic::Code::DeadlineExceeded,
            reason::UPLOAD_TIMED_OUT,
            format!("{why}; the upload was abandoned and nothing was changed"),
        )
        .into()
    };
    let idle = limits.upload_idle_timeout;
    let feed = async {
        loop {
            let next = tokio::time::timeout(idle, stream.message())
                .await
                .map_err(|_| timed_out(format!("no data for {} s", idle.as_secs_f32())))?;
            match next {
                Ok(Some(pb::UploadArchiveRequest {
                    part: Some(pb::upload_archive_request::Part::Chunk(chunk)),
                })) => {
                    if tx.send(chunk).await.is_err() {
                        return Ok(()); // the unpacker stopped early; its answer says why
                    }
                }
                Ok(Some(_)) => {
                    return Err(ApiError::invalid_field(
                        "header",
                        "only the first message may carry the header",
                    )
                    .into());
                }
                Ok(None) => return Ok(()),
                Err(status) => return Err(status_to_error(status)),
            }
        }
    };
    tokio::time::timeout(limits.upload_timeout, feed)
        .await
        .unwrap_or_else(|_| {
            Err(timed_out(format!(
                "the upload took longer than {} s",
                limits.upload_timeout.as_secs()
            )))
        })
}

/// The answer of a read that may have raced a DeleteWorkspace: NOT_FOUND once the
/// workspace's directory is gone (deletion renames it away first), whatever the file
/// system said (an error, or a listing that ended early); the read's own answer otherwise.
fn unless_deleted<T>(root: &std::path::Path, id: &str, result: Result<T>) -> Result<T> {
    if root.exists() {
        result
    } else {
        Err(ApiError::not_found("workspace", id).into())
    }
}

fn name_taken(name: &str) -> ApiError {
    ApiError::new(
        tonic::Code::AlreadyExists,
        reason::WORKSPACE_NAME_TAKEN,
        format!("you already have a workspace named {name:?}; pick another name or delete it"),
    )
}

fn same_workspace(existing: WorkspaceRow, hash: &str) -> Result<pb::Workspace> {
    if existing.request_hash.as_deref() == Some(hash) {
        return Ok(crate::wire::workspace_to_proto(&existing));
    }
    Err(invalid(
        reason::REQUEST_ID_REUSED,
        vec![violation(
            "request_id",
            "was already used for a different request; use a new request_id",
        )],
    )
    .into())
}

/// A client stream error, passed back as it came.
fn status_to_error(status: Status) -> BuildError {
    ApiError::new(
        status.code(),
        kiln_rpc::error::reason::INVALID_ARGUMENT,
        status.message().to_owned(),
    )
    .into()
}
