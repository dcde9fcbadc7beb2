//! Reading passwords: from a terminal without echo (asked twice when it is a new one,
//! so a typo is not saved), or as the first line of standard input for scripts.

use std::io::{BufRead, IsTerminal};

use anyhow::{Context as _, anyhow};

/// Where passwords come from in this invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The controlling terminal, without echo.
    Terminal,
    /// Lines of standard input.
    Stdin,
}

impl Source {
    /// The terminal when stdin is one and `--password-stdin` was not given.
    pub fn pick(password_stdin: bool) -> Self {
        if !password_stdin && std::io::stdin().is_terminal() {
            Self::Terminal
        } else {
            Self::Stdin
        }
    }

    /// One password (e.g. the current one): a prompt on a terminal, else the next line.
    pub fn read(self, prompt: &str) -> anyhow::Result<String> {
        match self {
            Self::Terminal => rpassword::prompt_password(prompt).context("reading the password"),
            Self::Stdin => next_line(),
        }
    }

    /// A new password: on a terminal asked twice, and the two must match.
    pub fn read_new(self, prompt: &str) -> anyhow::Result<String> {
        let password = self.read(prompt)?;
        if self == Self::Terminal {
            let again = self.read("again, to confirm: ")?;
            if again != password {
                return Err(anyhow!("the two passwords differ; nothing was changed"));
            }
        }
        Ok(password)
    }
}

fn next_line() -> anyhow::Result<String> {
    let mut line = String::new();
    let read = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    if read == 0 {
        return Err(anyhow!(
            "no password on stdin: pipe it in (one a line) or run on a terminal to be asked"
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}
