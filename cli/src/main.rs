//! `kiln`: the command-line client of a kiln suite, and `kiln up`, which runs the whole
//! suite in one process.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing::Instrument;

mod archive;
mod cmd;
mod config;
mod context;
mod health;
mod help;
mod human;
mod output;
mod telemetry;
mod transport;
mod up;

use context::{ClientArgs, Context};

/// kiln: remote, sandboxed builds and LLM code generation over gRPC.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
struct Cli {
    /// Log format: `auto` (readable on a terminal, JSON otherwise), `text` or `json`.
    #[arg(long, global = true, env = "KILN_LOG_FORMAT", default_value = "auto")]
    log_format: telemetry::LogFormat,

    /// Print this command's trace id (stderr), to find its spans in the services' traces.
    #[arg(long, global = true)]
    trace: bool,

    #[command(flatten)]
    client: ClientArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run auth, build and agent in one process on one port, with a development PKI.
    Up(up::UpArgs),
    /// Ask a kiln endpoint whether each service is SERVING (gRPC health).
    Health,
    /// Settings: the client's (view, set, unset) and `kiln up`'s file (check, example).
    #[command(subcommand)]
    Config(cmd::client_config::ConfigCommand),
    /// Log in and keep the tokens for later commands (refreshed on their own).
    Login(cmd::auth::LoginArgs),
    /// End this session and forget its tokens.
    Logout(cmd::auth::LogoutArgs),
    /// Change your own password; your other sessions end.
    Passwd(cmd::passwd::PasswdArgs),
    /// Who the saved login (or KILN_TOKEN) is.
    Whoami,
    /// API keys: create, list, revoke.
    #[command(subcommand)]
    Keys(cmd::keys::KeysCommand),
    /// Users (admins): create, list, update, delete.
    #[command(subcommand)]
    Users(cmd::users::UsersCommand),
    /// Workspaces: create (from a directory), push, list, cat, download, delete.
    #[command(subcommand, alias = "ws")]
    Workspace(cmd::workspace::WorkspaceCommand),
    /// Builds: run (and stream), watch, logs, list, get, cancel; the build policy.
    #[command(subcommand)]
    Build(cmd::build::BuildCommand),
    /// The LLM agent: run (and stream), watch, list, get, cancel tasks; the models.
    #[command(subcommand)]
    Agent(cmd::agent::AgentCommand),
    /// This client's version and, when it answers, the server's.
    Version(cmd::version::VersionArgs),
    /// A shell completion script: `source <(kiln completion bash)`.
    Completion(cmd::completion::CompletionArgs),
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Up(args) => return up::run(args).await,
        Command::Config(command) => return cmd::client_config::run(&cli.client, command),
        Command::Completion(args) => {
            return cmd::completion::print(&args, &mut command()).map(|()| 0);
        }
        _ => {}
    }
    let ctx = Context::resolve(&cli.client)?;
    match cli.command {
        Command::Up(_) | Command::Config(_) | Command::Completion(_) => {
            unreachable!("handled above")
        }
        Command::Version(args) => cmd::version::run(&ctx, args).await,
        Command::Health => health::run(&ctx).await,
        Command::Login(args) => cmd::auth::login(&ctx, args).await.map(|()| 0),
        Command::Logout(args) => cmd::auth::logout(&ctx, args).await.map(|()| 0),
        Command::Passwd(args) => cmd::passwd::run(&ctx, args).await.map(|()| 0),
        Command::Whoami => cmd::auth::whoami(&ctx).await.map(|()| 0),
        Command::Keys(command) => cmd::keys::run(&ctx, command).await.map(|()| 0),
        Command::Users(command) => cmd::users::run(&ctx, command).await.map(|()| 0),
        Command::Workspace(command) => cmd::workspace::run(&ctx, command).await.map(|()| 0),
        Command::Build(command) => cmd::build::run(&ctx, command).await,
        Command::Agent(command) => cmd::agent::run(&ctx, command).await,
    }
}

/// The command tree as users see it: the derive's, with [`help`]'s examples and headings.
fn command() -> clap::Command {
    help::teach(Cli::command())
}

fn main() -> ExitCode {
    let matches = command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    // Before any thread exists: every build step starts with a clone of this process.
    // Only where builds run; a client command spawns none.
    if matches!(cli.command, Command::Up(_)) {
        kiln_sandbox::keep_spawns_cheap();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("kiln: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let is_up = matches!(cli.command, Command::Up(_));
    let otlp_endpoint = match &cli.command {
        Command::Up(args) => match up::otlp_endpoint(args) {
            Ok(endpoint) => endpoint,
            Err(err) => {
                eprintln!("kiln: {err:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let setup = telemetry::Setup {
        service_name: if is_up {
            telemetry::SUITE_SERVICE_NAME
        } else {
            telemetry::CLI_SERVICE_NAME
        },
        log_format: cli.log_format,
        // Client commands log only warnings unless asked: their output is the result.
        default_level: if is_up { "info" } else { "warn" },
        otlp_endpoint,
        trace: cli.trace,
    };
    // Inside the runtime: the OTLP exporter's connection is made on it.
    let mut guard = match runtime.block_on(async { telemetry::init(setup) }) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("kiln: {err}");
            return ExitCode::FAILURE;
        }
    };
    if !is_up {
        quiet_on_closed_pipe();
    }
    let result = if is_up {
        runtime.block_on(dispatch(cli))
    } else {
        // One trace per client command, named like the command line ("kiln build run").
        let name = command_name(&matches);
        let span = tracing::info_span!("kiln", otel.name = %name, otel.kind = "client");
        if cli.trace {
            match span.in_scope(kiln_telemetry::current_trace_id) {
                Some(id) => eprintln!("kiln: trace {id}"),
                None => eprintln!("kiln: no trace id (tracing is disabled: OTEL_SDK_DISABLED)"),
            }
        }
        runtime.block_on(dispatch(cli).instrument(span))
    };
    // The spans still queued go out now, while the runtime (the exporter's connection)
    // is alive; with the collector down this waits at most the export timeout.
    guard.shutdown();
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(err) if is_broken_pipe(&err) => ExitCode::from(CLOSED_PIPE),
        Err(err) => {
            eprintln!("kiln: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// "kiln build run": the subcommands named on the command line.
fn command_name(matches: &clap::ArgMatches) -> String {
    let mut name = String::from("kiln");
    let mut current = matches;
    while let Some((sub, next)) = current.subcommand() {
        name.push(' ');
        name.push_str(sub);
        current = next;
    }
    name
}

/// The exit status when the reader of stdout went away (`kiln build list | head -1`):
/// 128 + SIGPIPE, what a program killed by SIGPIPE reports to its shell.
const CLOSED_PIPE: u8 = 141;

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A client command whose stdout (or stderr) is closed early ends quietly with
/// [`CLOSED_PIPE`], not a panic. Rust ignores SIGPIPE, so `println!` panics on EPIPE;
/// SIGPIPE stays ignored (restoring it would also kill the process on a write to a
/// reset TLS socket), and the panic is turned into the exit here instead.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to std") && message.contains("Broken pipe") {
            std::process::exit(i32::from(CLOSED_PIPE));
        }
        default(info);
    }));
}
