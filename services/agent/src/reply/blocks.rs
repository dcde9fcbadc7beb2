//! The text form: `=== FILE: path ===` … `=== END FILE ===` blocks, an optional commands block
//! and an optional notes block, with prose allowed between them.

use std::sync::LazyLock;

use regex::Regex;

use super::{FileEdit, Format, Problem, Reply};

static FILE_MARKER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^\s*={3,}\s*FILE:\s*(.*?)\s*={3,}\s*$").expect("static regex")
});
static END_FILE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^\s*={3,}\s*END\s+FILE\s*={3,}\s*$").expect("static regex"));
static COMMANDS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^\s*={3,}\s*COMMANDS\s*={3,}\s*$").expect("static regex"));
static END_COMMANDS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^\s*={3,}\s*END\s+COMMANDS\s*={3,}\s*$").expect("static regex")
});
static NOTES: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^\s*={3,}\s*NOTES\s*={3,}\s*$").expect("static regex"));
static END_NOTES: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^\s*={3,}\s*END\s+NOTES\s*={3,}\s*$").expect("static regex"));

/// True when any line opens a block of the text form.
pub(super) fn has_marker(raw: &str) -> bool {
    raw.lines()
        .any(|line| FILE_MARKER.is_match(line) || COMMANDS.is_match(line) || NOTES.is_match(line))
}

enum State {
    Outside,
    File { path: String, lines: Vec<String> },
    Commands,
    Notes(Vec<String>),
}

pub(super) fn parse(raw: &str) -> Reply {
    let mut reply = Reply::empty(Format::Text);
    let mut state = State::Outside;
    for line in raw.lines() {
        state = match state {
            State::File { path, lines } if END_FILE.is_match(line) => {
                reply.files.push(FileEdit {
                    path,
                    content: content(lines),
                });
                State::Outside
            }
            State::File { path, .. } if FILE_MARKER.is_match(line) => {
                // The model started the next file without closing this one: which lines
                // belong to it is a guess, so the file is left out and reported.
                reply.problems.push(Problem::Unterminated { path });
                open_file(line)
            }
            State::File { path, mut lines } => {
                lines.push(line.to_string());
                State::File { path, lines }
            }
            State::Commands if END_COMMANDS.is_match(line) => State::Outside,
            State::Commands => {
                let command = line.trim();
                if !command.is_empty() {
                    reply.commands.push(command.to_string());
                }
                State::Commands
            }
            State::Notes(lines) if END_NOTES.is_match(line) => {
                reply.notes = Some(lines.join("\n"));
                State::Outside
            }
            State::Notes(mut lines) => {
                lines.push(line.to_string());
                State::Notes(lines)
            }
            State::Outside if FILE_MARKER.is_match(line) => open_file(line),
            State::Outside if COMMANDS.is_match(line) => State::Commands,
            State::Outside if NOTES.is_match(line) => State::Notes(Vec::new()),
            // Prose between blocks (and stray end markers) is ignored.
            State::Outside => State::Outside,
        };
    }
    let open = match state {
        State::Outside => None,
        State::File { path, .. } => Some(format!("the file block for {path}")),
        State::Commands => Some("the commands block".to_string()),
        State::Notes(_) => Some("the notes block".to_string()),
    };
    if let Some(what) = open {
        reply.problems.push(Problem::Truncated { what });
    }
    reply
}

fn open_file(marker: &str) -> State {
    let path = FILE_MARKER
        .captures(marker)
        .map(|c| {
            c[1].trim_matches(|c| c == '`' || c == '"' || c == '\'')
                .to_string()
        })
        .unwrap_or_default();
    State::File {
        path,
        lines: Vec::new(),
    }
}

/// The block's lines, each ending in a newline, without a markdown fence wrapped around them.
fn content(mut lines: Vec<String>) -> String {
    // Blank lines around a fence do not make it part of the file (small models write
    // ```python … ``` and an empty line before the end marker).
    let blank = |l: &String| l.trim().is_empty();
    let first = lines.iter().position(|l| !blank(l)).unwrap_or(0);
    let last = lines.iter().rposition(|l| !blank(l)).map_or(0, |i| i + 1);
    let wrapped = last > first + 1
        && lines[first].trim_start().starts_with("```")
        && lines[last - 1].trim() == "```";
    if wrapped {
        lines.truncate(last);
        lines.drain(..first);
    }
    let fenced = lines.len() >= 2
        && lines[0].trim_start().starts_with("```")
        && lines.last().is_some_and(|l| l.trim() == "```");
    if fenced {
        lines.pop();
        lines.remove(0);
    }
    lines.iter().map(|l| format!("{l}\n")).collect()
}
