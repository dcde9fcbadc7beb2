//! Node and TypeScript: an uncaught error's `Error: message` line with its stack
//! (`at fn (/path/file.js:line:col)`; the first frame inside the workspace is the location), the
//! `file.js:line` header node prints above a syntax error, and tsc's two formats
//! (`file.ts(3,5): error TS2322: …` and the pretty `file.ts:3:5 - error TS2322: …`).

use std::sync::LazyLock;

use regex::Regex;

use super::{Raw, Scope, Severity};

static HEADER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(\S+\.[cm]?[jt]sx?):(\d+)$").expect("static regex"));
static ERROR_LINE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:Uncaught )?(?:[A-Z][\w$]*)?(?:Error|Exception)(?: \[[A-Z_]+\])?(?::.*)?$")
        .expect("static regex")
});
static STACK_FRAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\s+at (?:.*? \()?(.+?):(\d+):(\d+)\)?$").expect("static regex"));
static TSC_PAREN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(.+?)\((\d+),(\d+)\): (error|warning) (TS\d+): (.+)$").expect("static regex")
});
static TSC_PRETTY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(.+?):(\d+):(\d+) - (error|warning) (TS\d+): (.+)$").expect("static regex")
});

/// Lines of a multi-line error message (an assertion's diff) kept.
const MAX_MESSAGE_LINES: usize = 8;
/// How far below an error line its stack may start.
const STACK_SEARCH_LINES: usize = 24;

pub(crate) fn parse(lines: &[&str], scope: Scope<'_>) -> Vec<Raw> {
    let mut out = Vec::new();
    let mut header: Option<(String, u32)> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some(raw) = tsc(line) {
            out.push(raw);
        } else if let Some(c) = HEADER.captures(line)
            && let Ok(n) = c[2].parse()
        {
            header = Some((c[1].to_string(), n));
        } else if ERROR_LINE.is_match(line) {
            let (raw, next) = uncaught(lines, i, header.take(), scope);
            out.extend(raw);
            i = next;
            continue;
        }
        i += 1;
    }
    out
}

/// The error at `lines[start]`: its message lines, then its stack. Returns where scanning goes
/// on.
fn uncaught(
    lines: &[&str],
    start: usize,
    header: Option<(String, u32)>,
    scope: Scope<'_>,
) -> (Option<Raw>, usize) {
    // The message runs to the stack (an assertion's message has blank lines inside it); an
    // error printed without a stack ends at its first blank line.
    let window = &lines[start + 1..lines.len().min(start + 1 + STACK_SEARCH_LINES)];
    let stack_at = window.iter().position(|l| STACK_FRAME.is_match(l));
    let body: Vec<&str> = match stack_at {
        Some(n) => window[..n].to_vec(),
        None => window
            .iter()
            .take_while(|l| !l.trim().is_empty())
            .copied()
            .collect(),
    };
    let mut message = vec![lines[start]];
    message.extend(
        body.iter()
            .filter(|l| !l.trim().is_empty())
            .take(MAX_MESSAGE_LINES - 1),
    );
    let mut i = start + 1 + stack_at.unwrap_or(body.len());
    let mut frames = Vec::new();
    while i < lines.len()
        && let Some(c) = STACK_FRAME.captures(lines[i])
    {
        if let (Ok(n), Ok(col)) = (c[2].parse::<u32>(), c[3].parse::<u32>()) {
            frames.push((c[1].to_string(), n, Some(col)));
        }
        i += 1;
    }
    let header = header.map(|(f, n)| (f, n, None));
    let location = frames
        .iter()
        .find(|(f, _, _)| scope.inside(f))
        .or(header.as_ref().filter(|(f, _, _)| scope.inside(f)))
        .or(frames.first())
        .or(header.as_ref())
        .cloned();
    let raw =
        location.map(|(file, line, column)| Raw::new(&file, line, column, message.join("\n")));
    (raw, i.max(start + 1))
}

fn tsc(line: &str) -> Option<Raw> {
    let c = TSC_PAREN
        .captures(line)
        .or_else(|| TSC_PRETTY.captures(line))?;
    let mut raw = Raw::new(
        &c[1],
        c[2].parse().ok()?,
        c[3].parse().ok(),
        c[6].to_string(),
    );
    if &c[4] == "warning" {
        raw.severity = Severity::Warning;
    }
    raw.code = Some(c[5].to_string());
    Some(raw)
}
