//! `kiln workspace create|push|ls|cat|download|rm`.
//!
//! A workspace is named by its id or by its name: the server resolves names (unique per
//! owner) wherever it takes an id, so every command here passes what the user typed.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use kiln_proto::build as pb;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::KilnChannel;
use serde_json::json;

use super::paging::{self, PageArgs};
use super::{collect_pages, rpc_error};
use crate::archive::{self, Packed};
use crate::context::Context;
use crate::output::{OutputFormat, print_json, workspace_json};

/// Upload chunk size (well under the server's message limit).
const UPLOAD_CHUNK: usize = 1 << 20;

#[derive(Debug, clap::Subcommand)]
pub enum WorkspaceCommand {
    /// Create a workspace, optionally from a local directory (honours .gitignore,
    /// .ignore and .kilnignore).
    Create {
        /// Upload this directory's files.
        #[arg(long)]
        from: Option<PathBuf>,
        /// A name for the workspace, unique among yours; usable wherever an id is.
        #[arg(long)]
        name: Option<String>,
        /// Labels, `key=value`.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// List what the ignore files left out.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Make an existing workspace hold exactly DIR's files: changed files are written,
    /// files gone from DIR are deleted, in one atomic change.
    Push {
        /// The workspace (id or name).
        workspace: String,
        /// The directory to sync from.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// List what the ignore files left out.
        #[arg(short, long)]
        verbose: bool,
    },
    /// List workspaces, or the files of one workspace.
    #[command(name = "list", visible_alias = "ls")]
    Ls {
        /// A workspace (id or name): list its files instead.
        workspace: Option<String>,
        /// Directory inside the workspace.
        #[arg(default_value = "", hide_default_value = true)]
        directory: String,
        /// Only workspaces with this label, `key=value` (repeatable: all must match).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Paging of the workspace list (a workspace's files are always listed whole).
        #[command(flatten)]
        paging: PageArgs,
    },
    /// Print a file of a workspace.
    Cat {
        /// The workspace (id or name).
        workspace: String,
        /// The file's path inside the workspace.
        path: String,
    },
    /// Download a workspace (or one directory of it) as a tar file, or extract it into a
    /// directory: `kiln workspace download W dist --out ./dist`.
    Download {
        /// The workspace (id or name).
        workspace: String,
        /// A directory inside the workspace: only its contents are downloaded, extracted
        /// directly into the output directory. Default: the whole workspace.
        #[arg(default_value = "", hide_default_value = true)]
        path: String,
        /// `NAME.tar` to save the archive, or a directory to extract into. Default: ./<W>/
        #[arg(long)]
        out: Option<PathBuf>,
        /// Extract into a directory that is not empty (files of the same name are
        /// overwritten), or overwrite an existing `.tar`.
        #[arg(long)]
        force: bool,
    },
    /// Delete a workspace (refused while a build runs on it).
    #[command(name = "delete", visible_alias = "rm")]
    Rm {
        /// The workspace (id or name).
        workspace: String,
    },
}

pub fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not key=value"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// The server's workspace limits, for checking a tree before sending it. A server too
/// old to say (zeros) leaves the check to the server.
async fn server_limits(
    ctx: &Context,
    client: &mut BuildServiceClient<KilnChannel>,
) -> anyhow::Result<archive::Limits> {
    let policy = client
        .get_policy(pb::GetPolicyRequest {})
        .await
        .map_err(|s| rpc_error(ctx, s))?
        .into_inner();
    let known = |n: u64| (n > 0).then_some(n);
    Ok(archive::Limits {
        max_file_bytes: known(policy.max_file_bytes),
        max_total_bytes: known(policy.max_workspace_bytes),
        max_entries: known(policy.max_workspace_files),
    })
}

/// Packs `dir` against the server's limits and says, on stderr, what is left out or
/// worth a second look — before anything is sent.
async fn pack(
    ctx: &Context,
    client: &mut BuildServiceClient<KilnChannel>,
    dir: &Path,
    verbose: bool,
) -> anyhow::Result<Packed> {
    let limits = server_limits(ctx, client).await?;
    let packed = archive::pack_dir(dir, limits)?;
    for (link, target) in &packed.skipped_links {
        eprintln!(
            "warning: skipping the symlink {} -> {}: it leads outside {}",
            link.display(),
            target.display(),
            dir.display()
        );
    }
    for env in &packed.env_files {
        eprintln!(
            "warning: uploading {} (such files often hold secrets); add it to .kilnignore to leave it out",
            env.display()
        );
    }
    if verbose {
        for path in &packed.ignored {
            eprintln!(
                "left out (.gitignore, .ignore or .kilnignore): {}",
                path.display()
            );
        }
    } else if !packed.ignored.is_empty() && ctx.output == OutputFormat::Text {
        eprintln!(
            "{} path(s) left out by .gitignore, .ignore or .kilnignore (-v lists them)",
            packed.ignored.len()
        );
    }
    Ok(packed)
}

/// Sends `packed` into workspace `workspace` (id or name), replacing all of its files.
async fn upload(
    ctx: &Context,
    client: &mut BuildServiceClient<KilnChannel>,
    workspace: &str,
    packed: &Packed,
) -> anyhow::Result<pb::UploadArchiveResponse> {
    // One UploadArchive with `replace` at the root is one atomic change on the server:
    // the old tree is moved aside and the new one put in place under the workspace's
    // lock, all or nothing. WriteFiles with deletes would do the same only for trees
    // that fit in one request (its file count and message size limits); a tree that
    // needs several requests would be visible half-synced in between.
    let header = pb::UploadArchiveRequest {
        part: Some(pb::upload_archive_request::Part::Header(
            pb::upload_archive_request::Header {
                workspace_id: workspace.to_owned(),
                format: pb::ArchiveFormat::Tar as i32,
                replace: true,
                directory: String::new(),
            },
        )),
    };
    let chunks: Vec<pb::UploadArchiveRequest> = std::iter::once(header)
        .chain(
            packed
                .tar
                .chunks(UPLOAD_CHUNK)
                .map(|c| pb::UploadArchiveRequest {
                    part: Some(pb::upload_archive_request::Part::Chunk(
                        bytes::Bytes::copy_from_slice(c),
                    )),
                }),
        )
        .collect();
    Ok(client
        .upload_archive(futures::stream::iter(chunks))
        .await
        .map_err(|s| rpc_error(ctx, s))?
        .into_inner())
}

/// Creates a workspace with the files of `dir` (or empty); returns it.
pub async fn create_from(
    ctx: &Context,
    client: &mut BuildServiceClient<KilnChannel>,
    dir: Option<&Path>,
    labels: Vec<(String, String)>,
) -> anyhow::Result<pb::Workspace> {
    create(ctx, client, dir, None, labels, false).await
}

/// Creates a workspace (named, labelled, from `dir`). The tree is packed and checked
/// first, so a local problem creates nothing; a failed upload deletes the workspace it
/// made, so a failed `create --from` leaves no empty workspace behind.
pub async fn create(
    ctx: &Context,
    client: &mut BuildServiceClient<KilnChannel>,
    dir: Option<&Path>,
    name: Option<String>,
    labels: Vec<(String, String)>,
    verbose: bool,
) -> anyhow::Result<pb::Workspace> {
    let packed = match dir {
        Some(dir) => Some(pack(ctx, client, dir, verbose).await?),
        None => None,
    };
    let workspace = client
        .create_workspace(pb::CreateWorkspaceRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            files: Vec::new(),
            labels: labels.into_iter().collect(),
            name: name.unwrap_or_default(),
        })
        .await
        .map_err(|s| rpc_error(ctx, s))?
        .into_inner();
    let (Some(dir), Some(packed)) = (dir, packed) else {
        return Ok(workspace);
    };
    let uploaded = match upload(ctx, client, &workspace.id, &packed).await {
        Ok(u) => u,
        Err(err) => {
            let removed = client
                .delete_workspace(pb::DeleteWorkspaceRequest {
                    workspace_id: workspace.id.clone(),
                })
                .await;
            return Err(match removed {
                Ok(_) => err.context(format!(
                    "uploading {} failed; the new workspace was deleted again",
                    dir.display()
                )),
                Err(_) => err.context(format!(
                    "uploading {} failed, and deleting the new workspace {} failed too (kiln workspace rm {})",
                    dir.display(),
                    workspace.id,
                    workspace.id
                )),
            });
        }
    };
    if ctx.output == OutputFormat::Text {
        eprintln!(
            "uploaded {} file(s) ({}) from {}",
            packed.files,
            crate::human::size(packed.bytes),
            dir.display()
        );
    }
    Ok(uploaded.workspace.unwrap_or(workspace))
}

/// The paths of the regular files and symlinks of a workspace.
async fn paths_of(
    ctx: &Context,
    client: &BuildServiceClient<KilnChannel>,
    workspace: &str,
) -> anyhow::Result<Vec<String>> {
    let files = collect_pages(usize::MAX, |page_token| {
        let mut client = client.clone();
        let request = pb::ListFilesRequest {
            workspace_id: workspace.to_owned(),
            directory: String::new(),
            page_size: 1000,
            page_token,
        };
        async move {
            let page = client.list_files(request).await?.into_inner();
            Ok((page.files, page.next_page_token))
        }
    })
    .await
    .map_err(|s| rpc_error(ctx, s))?;
    Ok(files.into_iter().map(|f| f.path).collect())
}

/// Syncs `dir` into the existing `workspace` (id or name) in one atomic change.
pub async fn push(
    ctx: &Context,
    client: &mut BuildServiceClient<KilnChannel>,
    workspace: &str,
    dir: &Path,
    verbose: bool,
) -> anyhow::Result<pb::Workspace> {
    // Before packing: a workspace that does not exist is the first thing to say.
    let before = paths_of(ctx, client, workspace).await?;
    let packed = pack(ctx, client, dir, verbose).await?;
    let uploaded = upload(ctx, client, workspace, &packed).await?;
    let removed = before
        .iter()
        .filter(|p| !packed.paths.contains(p.as_str()))
        .count();
    let ws = uploaded
        .workspace
        .ok_or_else(|| anyhow!("the server sent no workspace back"))?;
    if ctx.output == OutputFormat::Text {
        eprintln!(
            "pushed {} file(s) ({}) from {} to {}; {removed} removed",
            packed.files,
            crate::human::size(packed.bytes),
            dir.display(),
            display_name(&ws)
        );
    }
    Ok(ws)
}

/// `name (id)`, or the id of an unnamed workspace.
fn display_name(w: &pb::Workspace) -> String {
    if w.name.is_empty() {
        w.id.clone()
    } else {
        format!("{} ({})", w.name, w.id)
    }
}

fn labels_text(labels: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    if pairs.is_empty() {
        "-".to_owned()
    } else {
        pairs.join(",")
    }
}

/// Refuses to write into `out` when that would mix with or overwrite what is there.
fn check_out(out: &Path, tar_file: bool, force: bool) -> anyhow::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(()); // nothing there yet
    };
    if tar_file {
        if meta.is_dir() {
            bail!("{} is a directory", out.display());
        }
        if !force {
            bail!("{} exists; pass --force to overwrite it", out.display());
        }
        return Ok(());
    }
    if !meta.is_dir() {
        bail!("{} exists and is not a directory", out.display());
    }
    let empty = std::fs::read_dir(out)
        .with_context(|| format!("reading {}", out.display()))?
        .next()
        .is_none();
    if !empty && !force {
        bail!(
            "{} is not empty; pass --force to extract into it anyway (files of the same name are overwritten)",
            out.display()
        );
    }
    Ok(())
}

/// The archive of directory `prefix` with `prefix/` taken off every path (and the
/// entry of `prefix` itself dropped), so its contents land directly in the output.
fn strip_prefix(tar_bytes: &[u8], prefix: &str) -> anyhow::Result<Vec<u8>> {
    let prefix = prefix.trim_matches('/');
    let mut archive = tar::Archive::new(tar_bytes);
    let mut out = tar::Builder::new(Vec::new());
    for entry in archive.entries().context("reading the archive")? {
        let entry = entry.context("reading the archive")?;
        let path = entry.path().context("reading the archive")?.into_owned();
        let Ok(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        if rest.as_os_str().is_empty() {
            continue;
        }
        let mut header = entry.header().clone();
        let link = entry.link_name().context("reading the archive")?;
        match link {
            Some(target) => {
                let target = target.into_owned();
                out.append_link(&mut header, rest, target)
            }
            None => out.append_data(&mut header, rest, entry),
        }
        .context("re-packing the archive")?;
    }
    out.into_inner().context("re-packing the archive")
}

pub async fn run(ctx: &Context, command: WorkspaceCommand) -> anyhow::Result<()> {
    let mut client = BuildServiceClient::new(ctx.authenticated().await?);
    match command {
        WorkspaceCommand::Create {
            from,
            name,
            labels,
            verbose,
        } => {
            let workspace =
                create(ctx, &mut client, from.as_deref(), name, labels, verbose).await?;
            match ctx.output {
                OutputFormat::Json => print_json(&workspace_json(&workspace)),
                OutputFormat::Text => println!("{}", workspace.id),
            }
        }
        WorkspaceCommand::Push {
            workspace,
            dir,
            verbose,
        } => {
            let ws = push(ctx, &mut client, &workspace, &dir, verbose).await?;
            if ctx.output == OutputFormat::Json {
                print_json(&workspace_json(&ws));
            }
        }
        WorkspaceCommand::Ls {
            workspace: None,
            labels,
            paging,
            ..
        } => {
            let labels: std::collections::HashMap<String, String> = labels.into_iter().collect();
            let listing = paging::fetch(&paging, |page_token, page_size| {
                let mut client = client.clone();
                let labels = labels.clone();
                async move {
                    let request = pb::ListWorkspacesRequest {
                        page_size,
                        page_token,
                        labels,
                        ..Default::default()
                    };
                    let page = client.list_workspaces(request).await?.into_inner();
                    Ok((page.workspaces, page.next_page_token))
                }
            })
            .await
            .map_err(|s| rpc_error(ctx, s))?;
            match ctx.output {
                OutputFormat::Json => {
                    print_json(&listing.document("workspaces", workspace_json));
                }
                OutputFormat::Text => {
                    println!(
                        "{:<38} {:<20} {:>7} {:>10} {:<14} LABELS",
                        "ID", "NAME", "FILES", "SIZE", "UPDATED"
                    );
                    for w in &listing.items {
                        println!(
                            "{:<38} {:<20} {:>7} {:>10} {:<14} {}",
                            w.id,
                            if w.name.is_empty() { "-" } else { &w.name },
                            w.file_count,
                            crate::human::size(w.size_bytes),
                            crate::human::ago(w.updated_at.as_ref()),
                            labels_text(&w.labels)
                        );
                    }
                    listing.print_hint();
                }
            }
        }
        WorkspaceCommand::Ls {
            workspace: Some(id),
            directory,
            labels,
            ..
        } => {
            if !labels.is_empty() {
                bail!("--label filters the list of workspaces, not the files of one");
            }
            let files = collect_pages(usize::MAX, |page_token| {
                let mut client = client.clone();
                let request = pb::ListFilesRequest {
                    workspace_id: id.clone(),
                    directory: directory.clone(),
                    page_size: 1000,
                    page_token,
                };
                async move {
                    let page = client.list_files(request).await?.into_inner();
                    Ok((page.files, page.next_page_token))
                }
            })
            .await
            .map_err(|s| rpc_error(ctx, s))?;
            match ctx.output {
                OutputFormat::Json => print_json(&json!(files
                    .iter()
                    .map(|f| json!({"path": f.path, "size_bytes": f.size_bytes, "executable": f.executable, "symlink_target": f.symlink_target}))
                    .collect::<Vec<_>>())),
                OutputFormat::Text => {
                    for f in &files {
                        if f.file_type == pb::FileType::Symlink as i32 {
                            println!("l {:>10} {} -> {}", "", f.path, f.symlink_target);
                            continue;
                        }
                        let mode = if f.executable { "x" } else { "-" };
                        println!("{mode} {:>10} {}", f.size_bytes, f.path);
                    }
                }
            }
        }
        WorkspaceCommand::Cat { workspace, path } => {
            let mut stream = client
                .read_file(pb::ReadFileRequest {
                    workspace_id: workspace,
                    path,
                    offset: 0,
                    limit: None,
                })
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner();
            let mut stdout = std::io::stdout().lock();
            while let Some(chunk) = stream.message().await.map_err(|s| rpc_error(ctx, s))? {
                stdout.write_all(&chunk.data)?;
            }
            stdout.flush()?;
        }
        WorkspaceCommand::Download {
            workspace,
            path,
            out,
            force,
        } => {
            let out = out.unwrap_or_else(|| PathBuf::from(&workspace));
            let tar_file = out.extension().is_some_and(|e| e == "tar");
            // Before downloading anything: refusing afterwards would waste the transfer.
            check_out(&out, tar_file, force)?;
            let mut stream = client
                .download_archive(pb::DownloadArchiveRequest {
                    workspace_id: workspace.clone(),
                    format: pb::ArchiveFormat::Tar as i32,
                    directory: path.clone(),
                })
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner();
            let mut tar = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(|s| rpc_error(ctx, s))? {
                tar.extend_from_slice(&chunk.chunk);
            }
            if !path.is_empty() {
                tar = strip_prefix(&tar, &path)?;
            }
            let mut files = 0u64;
            let mut bytes = 0u64;
            for entry in tar::Archive::new(tar.as_slice())
                .entries()
                .context("reading the archive")?
            {
                let entry = entry.context("reading the archive")?;
                if entry.header().entry_type().is_file() {
                    files += 1;
                    bytes += entry.size();
                }
            }
            if tar_file {
                std::fs::write(&out, &tar).with_context(|| format!("writing {}", out.display()))?;
            } else {
                std::fs::create_dir_all(&out)
                    .with_context(|| format!("creating {}", out.display()))?;
                tar::Archive::new(tar.as_slice())
                    .unpack(&out)
                    .with_context(|| format!("extracting into {}", out.display()))?;
            }
            match ctx.output {
                OutputFormat::Json => print_json(&json!({
                    "workspace": workspace,
                    "path": path,
                    "out": out,
                    "files": files,
                    "bytes": bytes,
                })),
                OutputFormat::Text => {
                    let what = if path.is_empty() {
                        format!("workspace {workspace}")
                    } else {
                        format!("{path} of workspace {workspace}")
                    };
                    println!(
                        "{what} saved to {} ({files} file(s), {})",
                        out.display(),
                        crate::human::size(bytes)
                    );
                }
            }
        }
        WorkspaceCommand::Rm { workspace } => {
            client
                .delete_workspace(pb::DeleteWorkspaceRequest {
                    workspace_id: workspace.clone(),
                })
                .await
                .map_err(|s| rpc_error(ctx, s))?;
            match ctx.output {
                OutputFormat::Json => print_json(&json!({ "deleted": workspace })),
                OutputFormat::Text => println!("workspace {workspace} deleted"),
            }
        }
    }
    Ok(())
}
