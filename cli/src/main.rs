//! `kiln`: the command-line client of a kiln suite, and `kiln up`, which runs the whole
//! suite in one process.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod archive;
mod cmd;
mod config;
mod context;
mod health;
mod logging;
mod output;
mod transport;
mod up;

use context::{ClientArgs, Context};

/// kiln: remote, sandboxed builds and LLM code generation over gRPC.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
struct Cli {
    /// Log format: `auto` (readable on a terminal, JSON otherwise), `text` or `json`.
    #[arg(long, global = true, env = "KILN_LOG_FORMAT", default_value = "auto")]
    log_format: logging::LogFormat,

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
    /// The `kiln up` configuration file: check one, or print the documented defaults.
    #[command(subcommand)]
    Config(up::ConfigCommand),
    /// Log in and keep the tokens for later commands (refreshed on their own).
    Login(cmd::auth::LoginArgs),
    /// End this session and forget its tokens.
    Logout(cmd::auth::LogoutArgs),
    /// Who the saved login (or KILN_TOKEN) is.
    Whoami,
    /// API keys: create, list, revoke.
    #[command(subcommand)]
    Keys(cmd::keys::KeysCommand),
    /// Users (admins): create, list, update, delete.
    #[command(subcommand)]
    Users(cmd::users::UsersCommand),
    /// Workspaces: create (from a directory), push, ls, cat, download, rm.
    #[command(subcommand, alias = "ws")]
    Workspace(cmd::workspace::WorkspaceCommand),
    /// Builds: run (and stream), watch, list, get, cancel.
    #[command(subcommand)]
    Build(cmd::build::BuildCommand),
    /// The LLM agent: run (and stream), watch, list, get, cancel tasks; the models.
    #[command(subcommand)]
    Agent(cmd::agent::AgentCommand),
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Up(args) => return up::run(args).await,
        Command::Config(command) => return up::config(command),
        _ => {}
    }
    let ctx = Context::resolve(&cli.client)?;
    match cli.command {
        Command::Up(_) | Command::Config(_) => unreachable!("handled above"),
        Command::Health => health::run(&ctx).await,
        Command::Login(args) => cmd::auth::login(&ctx, args).await.map(|()| 0),
        Command::Logout(args) => cmd::auth::logout(&ctx, args).await.map(|()| 0),
        Command::Whoami => cmd::auth::whoami(&ctx).await.map(|()| 0),
        Command::Keys(command) => cmd::keys::run(&ctx, command).await.map(|()| 0),
        Command::Users(command) => cmd::users::run(&ctx, command).await.map(|()| 0),
        Command::Workspace(command) => cmd::workspace::run(&ctx, command).await.map(|()| 0),
        Command::Build(command) => cmd::build::run(&ctx, command).await,
        Command::Agent(command) => cmd::agent::run(&ctx, command).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Client commands log only warnings unless asked: their output is the result.
    let default_level = if matches!(cli.command, Command::Up(_)) {
        "info"
    } else {
        "warn"
    };
    logging::init(cli.log_format, default_level);
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
    if !matches!(cli.command, Command::Up(_)) {
        quiet_on_closed_pipe();
    }
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(err) if is_broken_pipe(&err) => ExitCode::from(CLOSED_PIPE),
        Err(err) => {
            eprintln!("kiln: {err:#}");
            ExitCode::FAILURE
        }
    }
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
