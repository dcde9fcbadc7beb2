//! `kiln build run|watch|list|get|cancel`.
//!
//! `run` starts the build with RunBuild, prints its id first, streams its stdout and
//! stderr to the terminal's stdout and stderr as they come and exits with the step's
//! exit code (128+N for a signal, 124 for a timeout, 130 when cancelled). Ctrl-C cancels
//! the build; a second Ctrl-C detaches (exit 75) and leaves it ending on its own. `watch`
//! resumes from the last event this terminal printed (kept per build under the CLI's
//! state directory), so nothing is printed twice. Following, the status line and lost
//! connections are in [`super::build_follow`] and [`super::terminal`].

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::anyhow;
use kiln_proto::build as pb;
use kiln_proto::build::build_event::Event;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::KilnChannel;
use serde_json::json;

use super::build_follow::{Follower, OnInterrupt, seconds};
use super::paging::{self, PageArgs};
use super::progress::Progress;
use super::reconnect::{Backoff, is_connection_lost};
use super::terminal::ProgressMode;
use super::workspace::{create_from, parse_label, push};
use super::{build_view, parse_duration, proto_duration, rpc_error};
use crate::context::Context;
use crate::output::{OutputFormat, build_json, build_state_name, print_json};

#[derive(Debug, clap::Subcommand)]
pub enum BuildCommand {
    /// Run a build and stream its output: `kiln build run --from . -- make test`.
    ///
    /// Exits with the failing step's exit code: 0 when the build SUCCEEDED, 128+N when
    /// signal N killed the step, 124 when it TIMED_OUT, 130 when it was CANCELLED, and
    /// 75 when you detach (a second Ctrl-C) while it has not ended.
    Run(RunArgs),
    /// Follow a build's output from where this terminal left off.
    ///
    /// Exits like `run` when the build ends; Ctrl-C stops watching (exit 75) and the
    /// build goes on.
    Watch {
        /// The build's id.
        build_id: String,
        /// Replay from the first event instead.
        #[arg(long)]
        from_start: bool,
        /// How progress is shown on stderr: `auto` (a status line on a terminal),
        /// `plain` (a line per change) or `never`.
        #[arg(long, value_enum, default_value_t, env = "KILN_PROGRESS")]
        progress: ProgressMode,
    },
    /// List builds, newest first: ID, STATE, AGE, DURATION, COMMAND (and OWNER for an
    /// admin, or when some build is not yours).
    #[command(visible_alias = "ls")]
    List {
        /// Only builds in this workspace (id or name).
        #[arg(long)]
        workspace: Option<String>,
        /// QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT or INTERRUPTED.
        #[arg(long)]
        state: Vec<String>,
        /// Only builds with this label `key=value`; repeat for several (all must match).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        paging: PageArgs,
    },
    /// Show one build.
    Get {
        /// The build's id.
        build_id: String,
    },
    /// Print a build's output (stdout to stdout, stderr to stderr), like `docker logs`.
    Logs(super::build_logs::LogsArgs),
    /// The rules builds run under here: sandbox, allowed programs, limits, queues.
    Policy,
    /// Cancel a build: SIGTERM to the step, SIGKILL after the grace period.
    Cancel {
        /// The build's id.
        build_id: String,
        /// Time between SIGTERM and SIGKILL, e.g. 2s (at most 60s). Default: the
        /// server's `build.sandbox.kill_grace`.
        #[arg(long, value_parser = parse_duration)]
        grace: Option<Duration>,
    },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Build in this existing workspace (id or name); with --from, push DIR into it first.
    #[arg(long)]
    workspace: Option<String>,
    /// Upload this directory first (honours .gitignore): as a new workspace, or into
    /// --workspace W like `kiln workspace push W DIR`.
    #[arg(long)]
    from: Option<PathBuf>,
    /// A step as a command line (split like a shell would, never run by one); repeat
    /// for several steps, run in order before the `-- ARGV` step.
    #[arg(long = "step")]
    steps: Vec<String>,
    /// Environment for the steps, `NAME=value` (names must be on the server's allowlist).
    #[arg(long = "env", value_parser = parse_label)]
    env: Vec<(String, String)>,
    /// Wall-clock limit of the build, e.g. 10m.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// A label `key=value` for finding the build later; repeat for several.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Start the build and return at once with its id.
    #[arg(long)]
    detach: bool,
    /// Time between SIGTERM and SIGKILL when Ctrl-C cancels the build, e.g. 2s (at most
    /// 60s). Default: the server's `build.sandbox.kill_grace`.
    #[arg(long, value_parser = parse_duration)]
    grace: Option<Duration>,
    /// How progress is shown on stderr: `auto` (a status line on a terminal), `plain`
    /// (a line per change) or `never`.
    #[arg(long, value_enum, default_value_t, env = "KILN_PROGRESS")]
    progress: ProgressMode,
    /// The step to run: program and arguments.
    #[arg(last = true)]
    argv: Vec<String>,
}

pub async fn run(ctx: &Context, command: BuildCommand) -> anyhow::Result<i32> {
    let mut client = BuildServiceClient::new(ctx.authenticated().await?);
    match command {
        BuildCommand::Run(args) => run_build(ctx, &mut client, args).await,
        BuildCommand::Logs(args) => super::build_logs::run(ctx, &mut client, args).await,
        BuildCommand::Policy => super::build_policy::run(ctx, &mut client).await,
        BuildCommand::Watch {
            build_id,
            from_start,
            progress,
        } => {
            // A prefix becomes the whole id first: the saved position and the messages
            // are about the build, not about how it was named.
            let build_id = if uuid::Uuid::parse_str(&build_id).is_ok() {
                build_id
            } else {
                client
                    .get_build(pb::GetBuildRequest { build_id })
                    .await
                    .map_err(|s| rpc_error(ctx, s))?
                    .into_inner()
                    .id
            };
            let after = if from_start {
                0
            } else {
                Progress::BUILDS.load(ctx, &build_id)
            };
            Follower::new(ctx, build_id, after, progress, OnInterrupt::Detach)?
                .follow(&mut client, None)
                .await
        }
        BuildCommand::List {
            workspace,
            state,
            labels,
            paging,
        } => {
            let states = state
                .iter()
                .map(|s| {
                    let name = format!("BUILD_STATE_{}", s.to_uppercase());
                    pb::BuildState::from_str_name(&name)
                        .map(|v| v as i32)
                        .ok_or_else(|| anyhow!("unknown build state {s:?}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let listing = paging::fetch(&paging, |page_token, page_size| {
                let mut client = client.clone();
                let request = pb::ListBuildsRequest {
                    workspace_id: workspace.clone(),
                    states: states.clone(),
                    owner: None,
                    labels: labels.iter().cloned().collect(),
                    page_size,
                    page_token,
                };
                async move {
                    let page = client.list_builds(request).await?.into_inner();
                    Ok((page.builds, page.next_page_token))
                }
            })
            .await
            .map_err(|s| rpc_error(ctx, s))?;
            match ctx.output {
                OutputFormat::Json => print_json(&listing.document("builds", build_json)),
                OutputFormat::Text => {
                    let viewer = build_view::Viewer::of(ctx).await;
                    let owners = if build_view::shows_owner(viewer.as_ref(), &listing.items) {
                        let ids = listing.items.iter().map(|b| b.owner.clone());
                        Some(build_view::owner_names(ctx, viewer.as_ref(), ids).await)
                    } else {
                        None
                    };
                    print!(
                        "{}",
                        build_view::table(&listing.items, owners.as_ref(), SystemTime::now())
                    );
                    listing.print_hint();
                }
            }
            Ok(0)
        }
        BuildCommand::Get { build_id } => {
            let build = client
                .get_build(pb::GetBuildRequest { build_id })
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner();
            match ctx.output {
                OutputFormat::Json => print_json(&build_json(&build)),
                OutputFormat::Text => {
                    let viewer = build_view::Viewer::of(ctx).await;
                    let names =
                        build_view::owner_names(ctx, viewer.as_ref(), [build.owner.clone()]).await;
                    print!(
                        "{}",
                        build_view::detail(
                            &build,
                            names.get(&build.owner).map(String::as_str),
                            SystemTime::now()
                        )
                    );
                }
            }
            Ok(0)
        }
        BuildCommand::Cancel { build_id, grace } => {
            let response = client
                .cancel_build(pb::CancelBuildRequest {
                    build_id,
                    grace_period: grace.and_then(|g| prost_types::Duration::try_from(g).ok()),
                })
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner();
            let build = response.build.unwrap_or_default();
            let kill_after = response.kill_after.and_then(|d| Duration::try_from(d).ok());
            match ctx.output {
                OutputFormat::Json => {
                    let mut value = build_json(&build);
                    value["kill_after_ms"] =
                        json!(kill_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
                    print_json(&value);
                }
                OutputFormat::Text => println!("{}", cancel_summary(&build, kill_after)),
            }
            Ok(0)
        }
    }
}

/// What `kiln build cancel` did, in the words of what happens to the build.
fn cancel_summary(build: &pb::Build, kill_after: Option<Duration>) -> String {
    let state = pb::BuildState::try_from(build.state).unwrap_or_default();
    match (kill_after, state) {
        (Some(grace), _) => format!(
            "cancel requested: SIGTERM sent, SIGKILL in {} (build {})",
            seconds(grace),
            build.id
        ),
        (None, pb::BuildState::Cancelled) => format!("build {} is cancelled", build.id),
        (None, pb::BuildState::Queued | pb::BuildState::Running) => {
            format!("cancel requested: build {} is already stopping", build.id)
        }
        (None, _) => format!(
            "build {} had already ended: {}",
            build.id,
            build_state_name(build.state)
        ),
    }
}

async fn run_build(
    ctx: &Context,
    client: &mut BuildServiceClient<KilnChannel>,
    args: RunArgs,
) -> anyhow::Result<i32> {
    let mut steps = command_steps(&args.steps);
    if !args.argv.is_empty() {
        steps.push(pb::Step {
            argv: args.argv.clone(),
            ..Default::default()
        });
    }
    if steps.is_empty() {
        return Err(anyhow!(
            "nothing to run: give the command after `--` (e.g. `kiln build run --from . -- make`)"
        ));
    }
    let workspace_id = match (args.workspace, args.from) {
        (Some(id), None) => id,
        (Some(id), Some(dir)) => push(ctx, client, &id, &dir, false).await?.id,
        (None, Some(dir)) => {
            let id = create_from(ctx, client, Some(&dir), Vec::new()).await?.id;
            if ctx.output == OutputFormat::Text {
                // Named up front: a later build can reuse it with --workspace.
                eprintln!("workspace {id}");
            }
            id
        }
        (None, None) => {
            return Err(anyhow!(
                "where is the source? pass --from DIR or --workspace ID"
            ));
        }
    };
    let request = pb::StartBuildRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        workspace_id,
        steps,
        env: args.env.into_iter().collect(),
        limits: args.timeout.map(|t| pb::Limits {
            wall_timeout: Some(proto_duration(t)),
            ..Default::default()
        }),
        labels: args.labels.into_iter().collect(),
    };
    if args.detach {
        let build = client
            .start_build(request)
            .await
            .map_err(|s| rpc_error(ctx, s))?
            .into_inner();
        match ctx.output {
            OutputFormat::Json => print_json(&build_json(&build)),
            OutputFormat::Text => println!("{}", build.id),
        }
        return Ok(0);
    }
    let total_steps = request.steps.len();
    let (build_id, stream) = open_run(ctx, client, request).await?;
    let mut follower = Follower::new(
        ctx,
        build_id.clone(),
        0,
        args.progress,
        OnInterrupt::CancelThenDetach,
    )?
    .with_total_steps(total_steps)
    .with_grace(args.grace);
    if ctx.output == OutputFormat::Text {
        // First, so that whatever happens to this terminal the build can be found again.
        follower.say(&format!("build {build_id}"))?;
    }
    follower.follow(client, Some(stream)).await
}

/// RunBuild, retried with the same request id (the server answers a retry with the same
/// build) while the connection is lost. Returns the build's id, from the `kiln-build-id`
/// header (or, from a server without it, the first event), and the stream.
async fn open_run(
    ctx: &Context,
    client: &mut BuildServiceClient<KilnChannel>,
    request: pb::StartBuildRequest,
) -> anyhow::Result<(String, tonic::Streaming<pb::BuildEvent>)> {
    let mut backoff = Backoff::default();
    let response = loop {
        match client.run_build(request.clone()).await {
            Ok(response) => break response,
            Err(status) if is_connection_lost(&status) => match backoff.failed() {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Err(rpc_error(ctx, status)),
            },
            Err(status) => return Err(rpc_error(ctx, status)),
        }
    };
    let header = response
        .metadata()
        .get("kiln-build-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut stream = response.into_inner();
    if let Some(id) = header {
        return Ok((id, stream));
    }
    // The first event is Queued, which names the build; it is replayed by the follower
    // (sequence 1 comes again from WatchBuild if this stream breaks).
    match stream.message().await.map_err(|s| rpc_error(ctx, s))? {
        Some(pb::BuildEvent {
            event: Some(Event::Queued(q)),
            ..
        }) if !q.build_id.is_empty() => Ok((q.build_id.clone(), {
            // Re-open from the start so that the Queued event is printed like any other.
            client
                .watch_build(pb::WatchBuildRequest {
                    build_id: q.build_id,
                    after_sequence: 0,
                })
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner()
        })),
        _ => Err(anyhow!(
            "the server did not say which build it started (no kiln-build-id header); see `kiln build list`"
        )),
    }
}

/// `--step "CMD"` values as steps. They go to the server as command lines: the server
/// splits them like a shell would (and never hands them to one), so the CLI and every
/// other client split the same way.
pub fn command_steps(commands: &[String]) -> Vec<pb::Step> {
    commands
        .iter()
        .map(|c| pb::Step {
            command: Some(c.clone()),
            ..Default::default()
        })
        .collect()
}
