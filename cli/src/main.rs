//! `kiln`: the command-line client of a kiln suite, and `kiln up`, which runs the whole
//! suite in one process.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod health;
mod logging;
mod up;

/// kiln: remote, sandboxed builds and LLM code generation over gRPC.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
struct Cli {
    /// Log format: `auto` (readable on a terminal, JSON otherwise), `text` or `json`.
    #[arg(long, global = true, env = "KILN_LOG_FORMAT", default_value = "auto")]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run auth, build and agent in one process on one port, with a development PKI.
    Up(up::UpArgs),
    /// Ask a kiln endpoint whether each service is SERVING (gRPC health).
    Health(health::HealthArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
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
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Health(args) => health::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kiln: {err:#}");
            ExitCode::FAILURE
        }
    }
}
