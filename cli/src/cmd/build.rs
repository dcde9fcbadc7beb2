//! `kiln build run|watch|list|get|cancel`.
//!
//! `run` streams the build's stdout and stderr to the terminal's stdout and stderr as
//! they come and exits with the step's exit code (128+N for a signal, 124 for a timeout,
//! 130 when cancelled). Ctrl-C cancels the build; a second Ctrl-C detaches and leaves it
//! running. `watch` resumes from the last event this terminal printed (kept under the
//! CLI's state directory), so nothing is printed twice. A dropped connection is resumed
//! from the last sequence seen.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use kiln_proto::build as pb;
use kiln_proto::build::build_event::Event;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::KilnChannel;
use serde_json::json;

use super::progress::Progress;
use super::workspace::{create_from, parse_label, push};
use super::{collect_pages, parse_duration, proto_duration, rpc_error};
use crate::context::Context;
use crate::output::{
    OutputFormat, build_event_json, build_json, build_state_name, print_json, step_result_json,
};

#[derive(Debug, clap::Subcommand)]
pub enum BuildCommand {
    /// Run a build and stream its output: `kiln build run --from . -- make test`.
    Run(RunArgs),
    /// Follow a build's output from where this terminal left off.
    Watch {
        build_id: String,
        /// Replay from the first event instead.
        #[arg(long)]
        from_start: bool,
    },
    /// List builds.
    List {
        #[arg(long)]
        workspace: Option<String>,
        /// QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT or INTERRUPTED.
        #[arg(long)]
        state: Vec<String>,
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// At most this many builds.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one build.
    Get { build_id: String },
    /// Cancel a build: SIGTERM to the step, SIGKILL after the grace period.
    Cancel { build_id: String },
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
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Start the build and return at once with its id.
    #[arg(long)]
    detach: bool,
    /// The step to run: program and arguments.
    #[arg(last = true)]
    argv: Vec<String>,
}

pub async fn run(ctx: &Context, command: BuildCommand) -> anyhow::Result<i32> {
    let mut client = BuildServiceClient::new(ctx.authenticated().await?);
    match command {
        BuildCommand::Run(args) => run_build(ctx, &mut client, args).await,
        BuildCommand::Watch {
            build_id,
            from_start,
        } => {
            let after = if from_start {
                0
            } else {
                Progress::BUILDS.load(ctx, &build_id)
            };
            follow(
                ctx,
                &mut client,
                &build_id,
                after,
                None,
                OnInterrupt::Detach,
            )
            .await
        }
        BuildCommand::List {
            workspace,
            state,
            labels,
            limit,
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
            let builds = collect_pages(limit, |page_token| {
                let mut client = client.clone();
                let request = pb::ListBuildsRequest {
                    workspace_id: workspace.clone(),
                    states: states.clone(),
                    owner: None,
                    labels: labels.iter().cloned().collect(),
                    page_size: i32::try_from(limit.min(100)).unwrap_or(100),
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
                OutputFormat::Json => {
                    print_json(&json!(builds.iter().map(build_json).collect::<Vec<_>>()))
                }
                OutputFormat::Text => {
                    println!("{:<38} {:<12} {:<38} STEPS", "ID", "STATE", "WORKSPACE");
                    for b in &builds {
                        println!(
                            "{:<38} {:<12} {:<38} {}",
                            b.id,
                            build_state_name(b.state),
                            b.workspace_id,
                            b.steps.len()
                        );
                    }
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
                OutputFormat::Text => print_build(&build),
            }
            Ok(0)
        }
        BuildCommand::Cancel { build_id } => {
            let build = client
                .cancel_build(pb::CancelBuildRequest {
                    build_id,
                    grace_period: None,
                })
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner()
                .build
                .unwrap_or_default();
            match ctx.output {
                OutputFormat::Json => print_json(&build_json(&build)),
                OutputFormat::Text => {
                    println!("build {} is {}", build.id, build_state_name(build.state))
                }
            }
            Ok(0)
        }
    }
}

fn print_build(b: &pb::Build) {
    println!("build {} — {}", b.id, build_state_name(b.state));
    println!("  workspace: {}", b.workspace_id);
    for (i, step) in b.steps.iter().enumerate() {
        let text = if step.argv.is_empty() {
            step.command.clone().unwrap_or_default()
        } else {
            step.argv.join(" ")
        };
        let result = b
            .step_results
            .iter()
            .find(|r| r.step_index as usize == i)
            .map(step_result_json);
        let summary = result.map_or_else(String::new, |r| {
            format!(
                "  → {} exit {}",
                r["reason"].as_str().unwrap_or(""),
                r["exit_code"]
            )
        });
        println!("  step {}: {text}{summary}", i + 1);
    }
    if !b.failure_message.is_empty() {
        println!("  failure: {}", b.failure_message);
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
        (None, Some(dir)) => create_from(ctx, client, Some(&dir), Vec::new()).await?.id,
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
    let build = client
        .start_build(request)
        .await
        .map_err(|s| rpc_error(ctx, s))?
        .into_inner();
    if args.detach {
        match ctx.output {
            OutputFormat::Json => print_json(&build_json(&build)),
            OutputFormat::Text => println!("{}", build.id),
        }
        return Ok(0);
    }
    let total_steps = build.steps.len();
    follow(
        ctx,
        client,
        &build.id,
        0,
        Some(total_steps),
        OnInterrupt::CancelThenDetach,
    )
    .await
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

/// The status line at the bottom of a terminal: step, elapsed time, state.
struct StatusLine {
    enabled: bool,
    started: Instant,
    step: Option<(u32, Option<usize>)>,
    state: String,
}

impl StatusLine {
    fn clear(&self) {
        if self.enabled {
            eprint!("\r\x1b[2K");
        }
    }

    fn draw(&self) {
        if !self.enabled {
            return;
        }
        let elapsed = self.started.elapsed().as_secs();
        let step = match self.step {
            Some((i, Some(total))) => format!("step {}/{total}", i + 1),
            Some((i, None)) => format!("step {}", i + 1),
            None => "waiting".to_owned(),
        };
        eprint!(
            "\r\x1b[2K\x1b[2m[{step} · {:02}:{:02} · {}]\x1b[0m",
            elapsed / 60,
            elapsed % 60,
            self.state
        );
        let _ = std::io::stderr().flush();
    }
}

/// The exit code for a finished build.
fn exit_code(state: pb::BuildState, failed_step: Option<&pb::StepFinished>) -> i32 {
    match state {
        pb::BuildState::Succeeded => 0,
        pb::BuildState::Cancelled => 130,
        pb::BuildState::TimedOut => 124,
        _ => match failed_step {
            Some(step) if step.signal.is_some() => 128 + step.signal.unwrap_or(0),
            Some(step) => step.exit_code.filter(|c| *c != 0).unwrap_or(1),
            None => 1,
        },
    }
}

/// What Ctrl-C means while following a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnInterrupt {
    /// `run`: the first cancels the build, the second detaches.
    CancelThenDetach,
    /// `watch`: stop watching; the build goes on.
    Detach,
}

/// Streams a build's events to the terminal until it finishes (returns its exit code)
/// or the user detaches.
async fn follow(
    ctx: &Context,
    client: &mut BuildServiceClient<KilnChannel>,
    build_id: &str,
    mut after: u64,
    total_steps: Option<usize>,
    on_interrupt: OnInterrupt,
) -> anyhow::Result<i32> {
    let text = ctx.output == OutputFormat::Text;
    let mut status = StatusLine {
        enabled: text && std::io::stderr().is_terminal(),
        started: Instant::now(),
        step: None,
        state: "QUEUED".into(),
    };
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut cancel_requested = false;
    let mut failed_step: Option<pb::StepFinished> = None;
    let mut reconnects = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    'reconnect: loop {
        let mut stream = match client
            .watch_build(pb::WatchBuildRequest {
                build_id: build_id.to_owned(),
                after_sequence: after,
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(s) => return Err(rpc_error(ctx, s)),
        };
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = ticker.tick() => { status.draw(); continue; }
                _ = &mut ctrl_c => {
                    ctrl_c.set(tokio::signal::ctrl_c());
                    status.clear();
                    if cancel_requested || on_interrupt == OnInterrupt::Detach {
                        Progress::BUILDS.save(ctx, build_id, after);
                        eprintln!("detached; the build goes on. Resume with: kiln build watch {build_id}");
                        return Ok(130);
                    }
                    cancel_requested = true;
                    eprintln!("cancelling build {build_id} (Ctrl-C again to detach)…");
                    client
                        .cancel_build(pb::CancelBuildRequest { build_id: build_id.to_owned(), grace_period: None })
                        .await
                        .map_err(|s| rpc_error(ctx, s))?;
                    continue;
                }
            };
            let event = match message {
                Ok(Some(event)) => event,
                Ok(None) => {
                    // The server closes the stream after Finished; anything else is a cut.
                    Progress::BUILDS.save(ctx, build_id, after);
                    return Err(anyhow!(
                        "the build's event stream ended early; resume with `kiln build watch {build_id}`"
                    ));
                }
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
                    ) && reconnects < 5 =>
                {
                    reconnects += 1;
                    tokio::time::sleep(Duration::from_millis(200 * reconnects)).await;
                    continue 'reconnect;
                }
                Err(s) => {
                    Progress::BUILDS.save(ctx, build_id, after);
                    return Err(rpc_error(ctx, s));
                }
            };
            if event.sequence > after {
                after = event.sequence;
            }
            if !text {
                print_json_event(&event);
            }
            match event.event {
                Some(Event::Output(out)) if text => {
                    status.clear();
                    if out.stream == pb::OutputStream::Stderr as i32 {
                        let mut err = std::io::stderr().lock();
                        err.write_all(&out.data)?;
                        err.flush()?;
                    } else {
                        let mut stdout = std::io::stdout().lock();
                        stdout.write_all(&out.data)?;
                        stdout.flush()?;
                    }
                    status.draw();
                }
                Some(Event::Queued(q)) => {
                    status.state = format!("QUEUED #{}", q.position);
                    status.draw();
                }
                Some(Event::Started(_)) => {
                    status.state = "RUNNING".into();
                    status.draw();
                }
                Some(Event::StepStarted(s)) => {
                    status.step = Some((s.step_index, total_steps));
                    if text && status.enabled {
                        status.clear();
                        eprintln!("\x1b[1m▶ {}\x1b[0m", s.argv.join(" "));
                    }
                    status.draw();
                }
                Some(Event::StepFinished(f)) => {
                    if !f.succeeded && failed_step.is_none() {
                        failed_step = Some(f.clone());
                    }
                    if text && !f.message.is_empty() {
                        status.clear();
                        eprintln!("kiln: step {}: {}", f.step_index + 1, f.message);
                    }
                }
                Some(Event::Finished(done)) => {
                    status.clear();
                    Progress::BUILDS.clear(ctx, build_id);
                    let state = pb::BuildState::try_from(done.state).unwrap_or_default();
                    if text {
                        let elapsed = status.started.elapsed().as_secs_f64();
                        let message = if done.message.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", done.message)
                        };
                        eprintln!(
                            "build {build_id} {}{message} ({elapsed:.1} s)",
                            build_state_name(done.state)
                        );
                    }
                    return Ok(exit_code(state, failed_step.as_ref()));
                }
                _ => {}
            }
        }
    }
}

fn print_json_event(event: &pb::BuildEvent) {
    println!("{}", build_event_json(event));
}
