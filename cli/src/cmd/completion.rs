//! `kiln completion bash|zsh|fish`: a shell completion script on stdout, made by
//! clap_complete from the same command definition the parser uses, so it never lags
//! behind a new command or flag.

use clap_complete::Shell;

#[derive(Debug, clap::Args)]
pub struct CompletionArgs {
    /// The shell to complete in.
    #[arg(value_enum)]
    shell: CompletionShell,
}

/// The shells kiln documents (clap_complete knows a few more).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

impl From<CompletionShell> for Shell {
    fn from(shell: CompletionShell) -> Self {
        match shell {
            CompletionShell::Bash => Shell::Bash,
            CompletionShell::Zsh => Shell::Zsh,
            CompletionShell::Fish => Shell::Fish,
        }
    }
}

/// Writes the script for `command` (the whole `kiln` command tree).
pub fn print(args: &CompletionArgs, command: &mut clap::Command) -> anyhow::Result<()> {
    let name = command.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(Shell::from(args.shell), command, name, &mut script);
    use std::io::Write;
    std::io::stdout().lock().write_all(&script)?;
    Ok(())
}
