//! `kiln agent run|watch|list|get|cancel|models`.
//!
//! `run` starts a task (RunTask, with a fresh request id) and follows it: phase changes,
//! the model's text (dimmed on a terminal unless NO_COLOR is set), files written,
//! findings, the task's builds (their stdout and stderr to ours, as `kiln build run`
//! does), each model call's token usage, and the result. The task id comes first, on
//! stderr (`task <id>`), so a cut stream can be followed again.
//!
//! Exit codes of `run` and `watch`: **0** the task ended DONE, **1** FAILED (or any error
//! of the CLI), **130** CANCELLED — or the user detached with Ctrl-C.
//!
//! Ctrl-C once cancels the task (CancelTask) and keeps following it until its result; a
//! second Ctrl-C detaches and leaves the task to end on its own. `watch` resumes from the
//! last event this terminal printed (kept under the CLI's state directory) unless
//! `--from-start`, and Ctrl-C only stops watching. A lost connection is said once
//! ("connection lost; task X continues") and resumed with WatchTask from the last
//! sequence seen, with backoff, for up to [`follow::RESUME_FOR`].
//!
//! With `-o json`, `run` and `watch` print one JSON object a line (NDJSON) per event,
//! its kind in `type` (`phase_changed`, `model_output`, `files_written`, `findings`,
//! `build_event`, `usage`, `result`) with `sequence`, `time` and `task_id`; heartbeats
//! are not printed. `get`, `list`, `cancel` and `models` print one JSON document.

mod follow;
mod render;

use std::time::Duration;

use anyhow::anyhow;
use kiln_proto::agent as pb;
use kiln_proto::agent::agent_service_client::AgentServiceClient;
use kiln_rpc::client::KilnChannel;

use self::follow::{Follower, OnInterrupt};
use super::build::command_steps;
use super::paging::{self, PageArgs};
use super::progress::Progress;
use super::workspace::parse_label;
use super::{parse_duration, proto_duration, rpc_error};
use crate::context::Context;
use crate::output::{OutputFormat, models_json, phase_name, print_json, task_json, usage_json};

/// A response header a server may send on RunTask with the new task's id; without it,
/// the id is asked for with StartTask and the same request id (idempotent: it returns
/// the task RunTask created).
const TASK_ID_HEADER: &str = "kiln-task-id";

const EXIT_CODES: &str = "Exit codes: 0 when the task ends DONE, 1 when it ends FAILED (or on \
any error), 130 when it ends CANCELLED or you detach with Ctrl-C.";

#[derive(Debug, clap::Subcommand)]
pub enum AgentCommand {
    /// Ask the agent to write code and build it until the build is green.
    #[command(after_help = EXIT_CODES)]
    Run(RunArgs),
    /// Follow a task from where this terminal left off.
    #[command(after_help = EXIT_CODES)]
    Watch {
        /// The task's id.
        task_id: String,
        /// Replay from the first event instead.
        #[arg(long)]
        from_start: bool,
    },
    /// List tasks, newest first.
    #[command(visible_alias = "ls")]
    List {
        /// QUEUED, ANALYZE, PLAN, GENERATE, VALIDATE, BUILD, FIX, DONE, FAILED or
        /// CANCELLED; repeat for several.
        #[arg(long, value_parser = parse_phase)]
        phase: Vec<pb::Phase>,
        /// Only tasks working in this workspace.
        #[arg(long)]
        workspace: Option<String>,
        /// Only tasks with this label `key=value`; repeat for several (all must match).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        paging: PageArgs,
    },
    /// Show one task.
    Get {
        /// The task's id.
        task_id: String,
    },
    /// Cancel a task: the model call in flight is abandoned, a running build cancelled.
    Cancel {
        /// The task's id.
        task_id: String,
    },
    /// The models the server's LLM provider offers (the default marked with *).
    Models,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// What to build or fix, in plain words.
    prompt: String,
    /// python, rust, node, c, go… (default: the server chooses from the prompt).
    #[arg(long)]
    toolchain: Option<String>,
    /// The model to use (default: the server's; see `kiln agent models`).
    #[arg(long)]
    model: Option<String>,
    /// Fix the code in this workspace instead of starting empty.
    #[arg(long)]
    workspace: Option<String>,
    /// Most build → fix iterations before giving up (server default 3, at most 10).
    #[arg(long)]
    max_iterations: Option<u32>,
    /// Time budget of the whole task, e.g. 20m (server default 30m, at most 2h).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Token budget (prompt + completion) of the whole task.
    #[arg(long)]
    max_tokens: Option<u64>,
    /// A build step as a command line (split like `kiln build run --step`); repeat for
    /// several. Given steps are fixed: the model cannot change them.
    #[arg(long = "step")]
    steps: Vec<String>,
    /// A label `key=value` for finding the task later; repeat for several.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Start the task and return at once with its id.
    #[arg(long)]
    detach: bool,
}

fn parse_phase(text: &str) -> Result<pb::Phase, String> {
    let upper = text.trim().to_uppercase();
    let name = if upper.starts_with("PHASE_") {
        upper
    } else {
        format!("PHASE_{upper}")
    };
    pb::Phase::from_str_name(&name)
        .filter(|p| *p != pb::Phase::Unspecified)
        .ok_or_else(|| {
            format!(
                "unknown phase {text:?}: use QUEUED, ANALYZE, PLAN, GENERATE, VALIDATE, BUILD, FIX, DONE, FAILED or CANCELLED"
            )
        })
}

pub async fn run(ctx: &Context, command: AgentCommand) -> anyhow::Result<i32> {
    if let AgentCommand::Run(args) = &command
        && args.prompt.trim().is_empty()
    {
        return Err(anyhow!(
            "the prompt is empty: say what to build, e.g. `kiln agent run \"a CLI that adds two numbers\"`"
        ));
    }
    let mut client = AgentServiceClient::new(ctx.authenticated().await?);
    match command {
        AgentCommand::Run(args) => run_task(ctx, &mut client, args).await,
        AgentCommand::Watch {
            task_id,
            from_start,
        } => {
            // A prefix becomes the whole id first: the saved position and the messages
            // are about the task, not about how it was named.
            let task_id = if uuid::Uuid::parse_str(&task_id).is_ok() {
                task_id
            } else {
                client
                    .get_task(pb::GetTaskRequest { task_id })
                    .await
                    .map_err(|s| rpc_error(ctx, s))?
                    .into_inner()
                    .id
            };
            let after = if from_start {
                0
            } else {
                Progress::TASKS.load(ctx, &task_id)
            };
            let mut follower = Follower::new(ctx, &task_id, after, OnInterrupt::Detach)?;
            follower.follow(&mut client, None).await
        }
        AgentCommand::List {
            phase,
            workspace,
            labels,
            paging,
        } => list(ctx, &mut client, phase, workspace, labels, &paging).await,
        AgentCommand::Get { task_id } => {
            let task = client
                .get_task(pb::GetTaskRequest { task_id })
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner();
            match ctx.output {
                OutputFormat::Json => print_json(&task_json(&task)),
                OutputFormat::Text => print_task(&task),
            }
            Ok(0)
        }
        AgentCommand::Cancel { task_id } => {
            let task = client
                .cancel_task(pb::CancelTaskRequest { task_id })
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner()
                .task
                .unwrap_or_default();
            match ctx.output {
                OutputFormat::Json => print_json(&task_json(&task)),
                OutputFormat::Text => println!("task {} is {}", task.id, phase_name(task.phase)),
            }
            Ok(0)
        }
        AgentCommand::Models => {
            let models = client
                .list_models(pb::ListModelsRequest {})
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner();
            match ctx.output {
                OutputFormat::Json => print_json(&models_json(&models)),
                OutputFormat::Text => print_models(&models),
            }
            Ok(0)
        }
    }
}

fn start_request(args: &RunArgs) -> pb::StartTaskRequest {
    pb::StartTaskRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        prompt: args.prompt.clone(),
        toolchain: args.toolchain.clone().unwrap_or_default(),
        model: args.model.clone().unwrap_or_default(),
        max_iterations: args.max_iterations,
        workspace_id: args.workspace.clone().unwrap_or_default(),
        labels: args.labels.iter().cloned().collect(),
        timeout: args.timeout.map(proto_duration),
        max_tokens: args.max_tokens,
        build_limits: None,
        steps: command_steps(&args.steps),
    }
}

async fn run_task(
    ctx: &Context,
    client: &mut AgentServiceClient<KilnChannel>,
    args: RunArgs,
) -> anyhow::Result<i32> {
    let request = start_request(&args);
    if args.detach {
        let task = client
            .start_task(request)
            .await
            .map_err(|s| rpc_error(ctx, s))?
            .into_inner();
        match ctx.output {
            OutputFormat::Json => print_json(&task_json(&task)),
            OutputFormat::Text => println!("{}", task.id),
        }
        return Ok(0);
    }
    let response = client
        .run_task(request.clone())
        .await
        .map_err(|s| rpc_error(ctx, s))?;
    let header = response
        .metadata()
        .get(TASK_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let task_id = match header {
        Some(id) => id,
        None => {
            client
                .start_task(request)
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner()
                .id
        }
    };
    // Listening for Ctrl-C before the id is out: whoever reacts to the id (a person, a
    // script) may interrupt at once.
    let mut follower = Follower::new(ctx, &task_id, 0, OnInterrupt::CancelThenDetach)?;
    eprintln!("task {task_id}");
    follower.follow(client, Some(response.into_inner())).await
}

async fn list(
    ctx: &Context,
    client: &mut AgentServiceClient<KilnChannel>,
    phases: Vec<pb::Phase>,
    workspace: Option<String>,
    labels: Vec<(String, String)>,
    paging: &PageArgs,
) -> anyhow::Result<i32> {
    let phases: Vec<i32> = phases.into_iter().map(|p| p as i32).collect();
    let listing = paging::fetch(paging, |page_token, page_size| {
        let mut client = client.clone();
        let request = pb::ListTasksRequest {
            phases: phases.clone(),
            owner: None,
            workspace_id: workspace.clone(),
            labels: labels.iter().cloned().collect(),
            page_size,
            page_token,
        };
        async move {
            let page = client.list_tasks(request).await?.into_inner();
            Ok((page.tasks, page.next_page_token))
        }
    })
    .await
    .map_err(|s| rpc_error(ctx, s))?;
    match ctx.output {
        OutputFormat::Json => print_json(&listing.document("tasks", task_json)),
        OutputFormat::Text => {
            println!(
                "{:<38} {:<9} {:>4} {:<10} {:<24} {:<11}  PROMPT",
                "ID", "PHASE", "ITER", "TOOLCHAIN", "MODEL", "AGE"
            );
            for t in &listing.items {
                println!(
                    "{:<38} {:<9} {:>4} {:<10} {:<24} {:<11}  {}",
                    t.id,
                    phase_name(t.phase),
                    t.iteration,
                    or_dash(&t.toolchain),
                    or_dash(&t.model),
                    crate::human::ago(t.created_at.as_ref()),
                    prompt_head(&t.prompt, 40)
                );
            }
            listing.print_hint();
        }
    }
    Ok(0)
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

/// The prompt's first `chars` characters on one line, `…` when cut.
fn prompt_head(prompt: &str, chars: usize) -> String {
    let flat: String = prompt.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= chars {
        flat
    } else {
        let head: String = flat.chars().take(chars - 1).collect();
        format!("{head}…")
    }
}

fn print_task(t: &pb::Task) {
    let usage = usage_json(t.usage.as_ref());
    println!(
        "task {} — {} (iteration {} of at most {})",
        t.id,
        phase_name(t.phase),
        t.iteration,
        t.max_iterations
    );
    println!("  prompt: {}", prompt_head(&t.prompt, 200));
    println!(
        "  toolchain: {}  model: {}",
        or_dash(&t.toolchain),
        or_dash(&t.model)
    );
    println!("  workspace: {}", or_dash(&t.workspace_id));
    println!("  owner: {}", or_dash(&t.owner));
    println!(
        "  created: {}",
        crate::human::local_time_and_age(t.created_at.as_ref())
    );
    if t.finished_at.is_some() {
        println!(
            "  finished: {} after {}",
            crate::human::local_time_and_age(t.finished_at.as_ref()),
            crate::human::between(t.created_at.as_ref(), t.finished_at.as_ref())
        );
    }
    if !t.labels.is_empty() {
        let mut labels: Vec<String> = t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        println!("  labels: {}", labels.join(", "));
    }
    if !t.steps.is_empty() {
        let steps: Vec<String> = t
            .steps
            .iter()
            .map(|s| {
                if s.argv.is_empty() {
                    s.command.clone().unwrap_or_default()
                } else {
                    s.argv.join(" ")
                }
            })
            .collect();
        println!("  steps: {}", steps.join("; "));
    }
    if !t.build_ids.is_empty() {
        println!("  builds: {}", t.build_ids.join(", "));
    }
    let budget = if t.max_tokens == 0 {
        String::new()
    } else {
        format!(" (budget {})", t.max_tokens)
    };
    println!(
        "  tokens: {} prompt + {} completion in {} model calls{budget}",
        usage["prompt_tokens"], usage["completion_tokens"], usage["model_calls"]
    );
    if !t.failure_message.is_empty() {
        println!("  failure: {}", t.failure_message);
    }
}

fn print_models(m: &pb::ListModelsResponse) {
    println!("  {:<40} {:>10} {:>8}", "NAME", "SIZE", "CONTEXT");
    for model in &m.models {
        let mark = if model.name == m.default_model {
            "*"
        } else {
            " "
        };
        println!(
            "{mark} {:<40} {:>10} {:>8}",
            model.name,
            model
                .size_bytes
                .map_or_else(|| "-".to_owned(), crate::human::size),
            model
                .context_tokens
                .map_or_else(|| "-".to_owned(), |c| c.to_string())
        );
    }
    let kind = pb::ProviderKind::try_from(m.provider)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("PROVIDER_KIND_");
    println!("provider: {kind} at {}", m.provider_url);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_in_any_case_with_or_without_prefix() {
        assert_eq!(parse_phase("done"), Ok(pb::Phase::Done));
        assert_eq!(parse_phase("PHASE_FIX"), Ok(pb::Phase::Fix));
        assert!(parse_phase("unspecified").is_err());
        assert!(parse_phase("green").unwrap_err().contains("DONE"));
    }

    #[test]
    fn prompts_are_cut_to_one_short_line() {
        assert_eq!(prompt_head("a  small\ncli", 40), "a small cli");
        let long = "x".repeat(50);
        let head = prompt_head(&long, 40);
        assert_eq!(head.chars().count(), 40);
        assert!(head.ends_with('…'));
    }

    #[test]
    fn steps_and_budgets_go_into_the_request() {
        let args = RunArgs {
            prompt: "p".into(),
            toolchain: None,
            model: None,
            workspace: None,
            max_iterations: Some(2),
            timeout: Some(Duration::from_secs(1200)),
            max_tokens: Some(5000),
            steps: vec!["python3 -m pytest -q".into(), "make".into()],
            labels: vec![("bench".into(), "1".into())],
            detach: false,
        };
        let request = start_request(&args);
        assert_eq!(request.toolchain, "", "the server chooses");
        assert_eq!(request.steps.len(), 2);
        assert_eq!(
            request.steps[0].command.as_deref(),
            Some("python3 -m pytest -q")
        );
        assert_eq!(request.timeout.map(|t| t.seconds), Some(1200));
        assert_eq!(request.max_tokens, Some(5000));
        assert_eq!(request.labels["bench"], "1");
        assert!(!request.request_id.is_empty());
        assert_ne!(
            request.request_id,
            start_request(&args).request_id,
            "fresh each time"
        );
    }
}
