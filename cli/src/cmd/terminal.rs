//! A build's output on the terminal, and kiln's own progress next to it.
//!
//! The status line (`[step 1/2 · 00:03 · RUNNING]`) lives on its own line below the
//! program's output, like cargo's and docker's: it is drawn only when the cursor is at
//! the start of a line, and erasing it (`\r` + erase-line) only ever erases that line.
//! While a program has printed part of a line (`test_add (test_calc.T.test_add) ... `
//! before its `ok`) there is no status line, so nothing the program wrote is wiped.

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// `--progress`: how kiln shows a build's progress on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A status line on a terminal, plain lines on a dumb one (`TERM=dumb`), nothing
    /// in a pipe.
    #[default]
    Auto,
    /// One line per change of state or step, no terminal codes.
    Plain,
    /// Only the program's output and the result line.
    Never,
}

/// What [`ProgressMode`] comes to on this terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Line,
    Plain,
    Off,
}

/// Which stream a chunk of program output belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The state of the terminal this build is shown on.
pub struct Terminal {
    style: Style,
    /// ANSI colours and weights (never with `NO_COLOR` or `TERM=dumb`).
    color: bool,
    /// Whether each stream is the terminal the status line is drawn on: output to a
    /// pipe does not move that terminal's cursor.
    stdout_on_screen: bool,
    stderr_on_screen: bool,
    /// The screen's cursor is at the start of a line (nothing half-printed).
    at_line_start: bool,
    status_visible: bool,
    started: Instant,
    step: Option<(u32, Option<usize>)>,
    state: String,
}

impl Terminal {
    /// Resolves `mode` against the real stdout/stderr and the environment.
    pub fn detect(mode: ProgressMode) -> Self {
        let term = std::env::var("TERM").unwrap_or_default();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self::new(
            mode,
            std::io::stdout().is_terminal(),
            std::io::stderr().is_terminal(),
            term == "dumb",
            no_color,
        )
    }

    fn new(
        mode: ProgressMode,
        stdout_tty: bool,
        stderr_tty: bool,
        dumb: bool,
        no_color: bool,
    ) -> Self {
        let style = match mode {
            ProgressMode::Never => Style::Off,
            ProgressMode::Plain => Style::Plain,
            ProgressMode::Auto if stderr_tty && !dumb => Style::Line,
            ProgressMode::Auto if stderr_tty => Style::Plain,
            ProgressMode::Auto => Style::Off,
        };
        Self {
            style,
            color: stderr_tty && !dumb && !no_color,
            stdout_on_screen: stdout_tty && stderr_tty,
            stderr_on_screen: stderr_tty,
            at_line_start: true,
            status_visible: false,
            started: Instant::now(),
            step: None,
            state: "QUEUED".into(),
        }
    }

    /// The program's output, written as it came.
    pub fn output(&mut self, stream: Stream, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.erase_status()?;
        let on_screen = match stream {
            Stream::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(data)?;
                out.flush()?;
                self.stdout_on_screen
            }
            Stream::Stderr => {
                let mut err = std::io::stderr().lock();
                err.write_all(data)?;
                err.flush()?;
                self.stderr_on_screen
            }
        };
        if on_screen {
            self.at_line_start = data.ends_with(b"\n");
        }
        self.draw()
    }

    /// One line of kiln's own on stderr ("connection lost…", "▶ make test"). When the
    /// program left a line unfinished, kiln's line starts below it rather than on it.
    pub fn say(&mut self, line: &str) -> std::io::Result<()> {
        self.erase_status()?;
        let mut err = std::io::stderr().lock();
        if !self.at_line_start {
            err.write_all(b"\n")?;
            self.at_line_start = true;
        }
        writeln!(err, "{line}")?;
        err.flush()?;
        drop(err);
        self.draw()
    }

    /// The last line: the result, with no status line after it.
    pub fn finish(&mut self, line: &str) -> std::io::Result<()> {
        self.style = match self.style {
            Style::Line => Style::Off,
            other => other,
        };
        self.say(line)
    }

    /// A step began: its command line as a header (not in a pipe) and in the status.
    pub fn step_started(
        &mut self,
        index: u32,
        total: Option<usize>,
        argv: &[String],
    ) -> std::io::Result<()> {
        self.step = Some((index, total));
        match self.style {
            Style::Off => Ok(()),
            _ => {
                let header = format!("▶ {}", argv.join(" "));
                let header = if self.color {
                    format!("\x1b[1m{header}\x1b[0m")
                } else {
                    header
                };
                self.say(&header)
            }
        }
    }

    /// The build's state changed (QUEUED #2, RUNNING…).
    pub fn state(&mut self, state: String) -> std::io::Result<()> {
        let changed = self.state != state;
        self.state = state;
        if changed && self.style == Style::Plain {
            let line = format!("kiln: {}", self.state);
            return self.say(&line);
        }
        self.draw()
    }

    /// Redraws the status line (the clock moved); a no-op mid-line.
    pub fn draw(&mut self) -> std::io::Result<()> {
        if self.style != Style::Line || !self.at_line_start {
            return Ok(());
        }
        let elapsed = self.started.elapsed().as_secs();
        let step = match self.step {
            Some((i, Some(total))) => format!("step {}/{total}", i + 1),
            Some((i, None)) => format!("step {}", i + 1),
            None => "waiting".to_owned(),
        };
        let text = format!(
            "[{step} · {:02}:{:02} · {}]",
            elapsed / 60,
            elapsed % 60,
            self.state
        );
        let mut err = std::io::stderr().lock();
        // At the start of a line the only thing `\r` + erase-line can wipe is our own
        // previous status line.
        if self.color {
            write!(err, "\r\x1b[2K\x1b[2m{text}\x1b[0m")?;
        } else {
            write!(err, "\r\x1b[2K{text}")?;
        }
        err.flush()?;
        self.status_visible = true;
        Ok(())
    }

    /// Removes the status line, leaving the cursor where it was drawn from.
    pub fn erase_status(&mut self) -> std::io::Result<()> {
        if self.status_visible {
            let mut err = std::io::stderr().lock();
            err.write_all(b"\r\x1b[2K")?;
            err.flush()?;
            self.status_visible = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_a_line_on_a_terminal_plain_on_a_dumb_one_and_nothing_in_a_pipe() {
        let style = |stderr_tty, dumb| {
            Terminal::new(ProgressMode::Auto, true, stderr_tty, dumb, false).style
        };
        assert_eq!(style(true, false), Style::Line);
        assert_eq!(style(true, true), Style::Plain);
        assert_eq!(style(false, false), Style::Off);
        let never = Terminal::new(ProgressMode::Never, true, true, false, false);
        assert_eq!(never.style, Style::Off);
    }

    #[test]
    fn no_color_and_dumb_terminals_get_no_colours() {
        assert!(!Terminal::new(ProgressMode::Auto, true, true, false, true).color);
        assert!(!Terminal::new(ProgressMode::Auto, true, true, true, false).color);
        assert!(Terminal::new(ProgressMode::Auto, true, true, false, false).color);
    }
}
