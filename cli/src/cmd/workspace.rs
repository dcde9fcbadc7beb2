//! `kiln workspace create|ls|cat|download|rm`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use kiln_proto::build as pb;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::KilnChannel;
use serde_json::json;

use super::{collect_pages, rpc_error};
use crate::context::Context;
use crate::output::{OutputFormat, print_json, time, workspace_json};

/// Upload chunk size (well under the server's message limit).
const UPLOAD_CHUNK: usize = 1 << 20;

#[derive(Debug, clap::Subcommand)]
pub enum WorkspaceCommand {
    /// Create a workspace, optionally from a local directory (honours .gitignore).
    Create {
        /// Upload this directory's files.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Labels, `key=value`.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List workspaces, or the files of one workspace.
    Ls {
        /// A workspace id: list its files instead.
        workspace: Option<String>,
        /// Directory inside the workspace.
        #[arg(default_value = "")]
        directory: String,
    },
    /// Print a file of a workspace.
    Cat { workspace: String, path: String },
    /// Download a workspace as a tar file, or extract it into a directory.
    Download {
        workspace: String,
        /// `NAME.tar` to save the archive, or a directory to extract into. Default: ./<id>/
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Delete a workspace (refused while a build runs on it).
    Rm { workspace: String },
}

pub fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not key=value"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// Creates a workspace with the files of `dir` (or empty); returns it.
pub async fn create_from(
    ctx: &Context,
    client: &mut BuildServiceClient<KilnChannel>,
    dir: Option<&std::path::Path>,
    labels: Vec<(String, String)>,
) -> anyhow::Result<pb::Workspace> {
    let workspace = client
        .create_workspace(pb::CreateWorkspaceRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            files: Vec::new(),
            labels: labels.into_iter().collect(),
        })
        .await
        .map_err(|s| rpc_error(ctx, s))?
        .into_inner();
    let Some(dir) = dir else { return Ok(workspace) };
    let (tar, files) = crate::archive::pack_dir(dir)?;
    let header = pb::UploadArchiveRequest {
        part: Some(pb::upload_archive_request::Part::Header(
            pb::upload_archive_request::Header {
                workspace_id: workspace.id.clone(),
                format: pb::ArchiveFormat::Tar as i32,
                replace: true,
                directory: String::new(),
            },
        )),
    };
    let chunks: Vec<pb::UploadArchiveRequest> = std::iter::once(header)
        .chain(tar.chunks(UPLOAD_CHUNK).map(|c| pb::UploadArchiveRequest {
            part: Some(pb::upload_archive_request::Part::Chunk(
                bytes::Bytes::copy_from_slice(c),
            )),
        }))
        .collect();
    let uploaded = client
        .upload_archive(futures::stream::iter(chunks))
        .await
        .map_err(|s| rpc_error(ctx, s))?
        .into_inner();
    if ctx.output == OutputFormat::Text {
        eprintln!(
            "uploaded {files} file(s) ({} bytes) from {}",
            tar.len(),
            dir.display()
        );
    }
    Ok(uploaded.workspace.unwrap_or(workspace))
}

pub async fn run(ctx: &Context, command: WorkspaceCommand) -> anyhow::Result<()> {
    let mut client = BuildServiceClient::new(ctx.authenticated().await?);
    match command {
        WorkspaceCommand::Create { from, labels } => {
            let workspace = create_from(ctx, &mut client, from.as_deref(), labels).await?;
            match ctx.output {
                OutputFormat::Json => print_json(&workspace_json(&workspace)),
                OutputFormat::Text => println!("{}", workspace.id),
            }
        }
        WorkspaceCommand::Ls {
            workspace: None, ..
        } => {
            let all = collect_pages(usize::MAX, |page_token| {
                let mut client = client.clone();
                async move {
                    let request = pb::ListWorkspacesRequest {
                        page_size: 100,
                        page_token,
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
                    print_json(&json!(all.iter().map(workspace_json).collect::<Vec<_>>()))
                }
                OutputFormat::Text => {
                    println!("{:<38} {:>7} {:>12} UPDATED", "ID", "FILES", "BYTES");
                    for w in &all {
                        let updated = time(w.updated_at.as_ref());
                        println!(
                            "{:<38} {:>7} {:>12} {}",
                            w.id,
                            w.file_count,
                            w.size_bytes,
                            updated.as_str().unwrap_or("-")
                        );
                    }
                }
            }
        }
        WorkspaceCommand::Ls {
            workspace: Some(id),
            directory,
        } => {
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
        WorkspaceCommand::Download { workspace, out } => {
            let mut stream = client
                .download_archive(pb::DownloadArchiveRequest {
                    workspace_id: workspace.clone(),
                    format: pb::ArchiveFormat::Tar as i32,
                    directory: String::new(),
                })
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner();
            let mut tar = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(|s| rpc_error(ctx, s))? {
                tar.extend_from_slice(&chunk.chunk);
            }
            let out = out.unwrap_or_else(|| PathBuf::from(&workspace));
            if out.extension().is_some_and(|e| e == "tar") {
                std::fs::write(&out, &tar).with_context(|| format!("writing {}", out.display()))?;
            } else {
                std::fs::create_dir_all(&out)
                    .with_context(|| format!("creating {}", out.display()))?;
                tar::Archive::new(tar.as_slice())
                    .unpack(&out)
                    .with_context(|| format!("extracting into {}", out.display()))?;
            }
            match ctx.output {
                OutputFormat::Json => print_json(
                    &json!({ "workspace_id": workspace, "out": out, "bytes": tar.len() }),
                ),
                OutputFormat::Text => println!(
                    "workspace {workspace} saved to {} ({} bytes)",
                    out.display(),
                    tar.len()
                ),
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
