//! Rust: cargo's `--message-format=json` compiler messages, rustc's human output, and panics
//! of `cargo test` / `cargo run`.

use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

use super::{Raw, Severity};

/// Child notes and helps kept per compiler message: the first ones carry the suggestion.
const MAX_CHILDREN: usize = 3;

static HUMAN_HEADLINE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(error|warning)(?:\[(E\d{4})\])?: (.+)$").expect("static regex")
});
static HUMAN_ARROW: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\s*--> (.+?):(\d+):(\d+)\s*$").expect("static regex"));
// Rust 1.73+: `thread 'main' panicked at src/main.rs:2:5:` and the message on the next lines.
static PANIC_NEW: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^thread '([^']*)' panicked at (.+?):(\d+):(\d+):$").expect("static regex")
});
// Older: `thread 'main' panicked at 'boom', src/main.rs:2:5`.
static PANIC_OLD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^thread '([^']*)' panicked at '(.*)', (.+?):(\d+):(\d+)$").expect("static regex")
});

pub(crate) fn parse(lines: &[&str]) -> Vec<Raw> {
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with('{') {
            out.extend(json_message(line));
        } else if let Some(raw) = human(lines, i) {
            out.push(raw);
        } else if let Some(raw) = panic(lines, i) {
            out.push(raw);
        }
    }
    out
}

/// One `compiler-message` record: its primary span, message, code, label and first children.
fn json_message(line: &str) -> Option<Raw> {
    let record: Value = serde_json::from_str(line).ok()?;
    if record.get("reason")?.as_str()? != "compiler-message" {
        return None;
    }
    let message = record.get("message")?;
    let severity = match message.get("level")?.as_str()? {
        level if level.starts_with("error") => Severity::Error,
        "warning" => Severity::Warning,
        _ => Severity::Note,
    };
    let span = message
        .get("spans")?
        .as_array()?
        .iter()
        .find(|s| s.get("is_primary").and_then(Value::as_bool) == Some(true))?;
    let mut text = message.get("message")?.as_str()?.to_string();
    if let Some(label) = span.get("label").and_then(Value::as_str) {
        text.push('\n');
        text.push_str(label);
    }
    let children = message.get("children").and_then(Value::as_array);
    for child in children.into_iter().flatten().take(MAX_CHILDREN) {
        let level = child.get("level").and_then(Value::as_str).unwrap_or("note");
        if let Some(child_message) = child.get("message").and_then(Value::as_str) {
            text.push_str(&format!("\n{level}: {child_message}"));
        }
    }
    let mut raw = Raw::new(
        span.get("file_name")?.as_str()?,
        u32::try_from(span.get("line_start")?.as_u64()?).ok()?,
        span.get("column_start")
            .and_then(Value::as_u64)
            .and_then(|c| u32::try_from(c).ok()),
        text,
    );
    raw.severity = severity;
    raw.code = message
        .get("code")
        .and_then(|c| c.get("code"))
        .and_then(Value::as_str)
        .map(str::to_string);
    Some(raw)
}

/// rustc's human form: a headline immediately followed by its ` --> file:line:col` arrow
/// (summaries such as "could not compile" have no arrow and are skipped).
fn human(lines: &[&str], i: usize) -> Option<Raw> {
    let head = HUMAN_HEADLINE.captures(lines[i])?;
    let arrow = HUMAN_ARROW.captures(lines.get(i + 1)?)?;
    let mut raw = Raw::new(
        &arrow[1],
        arrow[2].parse().ok()?,
        arrow[3].parse().ok(),
        head[3].to_string(),
    );
    if &head[1] == "warning" {
        raw.severity = Severity::Warning;
    }
    raw.code = head.get(2).map(|c| c.as_str().to_string());
    Some(raw)
}

fn panic(lines: &[&str], i: usize) -> Option<Raw> {
    let (thread, file, line, col, mut message) = if let Some(c) = PANIC_NEW.captures(lines[i]) {
        let body: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| !l.is_empty() && !l.starts_with("note: run with"))
            .take(6)
            .copied()
            .collect();
        (
            c[1].to_string(),
            c[2].to_string(),
            c[3].to_string(),
            c[4].to_string(),
            body.join("\n"),
        )
    } else {
        let c = PANIC_OLD.captures(lines[i])?;
        (
            c[1].to_string(),
            c[3].to_string(),
            c[4].to_string(),
            c[5].to_string(),
            c[2].to_string(),
        )
    };
    if thread != "main" {
        message = format!("test {thread} panicked: {message}");
    } else {
        message = format!("panicked: {message}");
    }
    Some(Raw::new(
        &file,
        line.parse().ok()?,
        col.parse().ok(),
        message,
    ))
}
