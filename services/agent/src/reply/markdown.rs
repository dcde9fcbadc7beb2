//! The last resort: markdown fenced blocks whose file is named on the line above the fence or in
//! the fence's info string. Fences without a filename are examples in prose and are skipped.

use std::sync::LazyLock;

use regex::Regex;

use super::{FileEdit, Format, Problem, Reply};

// A path-like token: segments of word characters, dots and dashes, with an extension or a
// directory (or a well-known extensionless name).
static PATH_TOKEN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(?:[\w.+@-]+/)*[\w+@-][\w.+@-]*$").expect("static regex"));
static TITLE_ATTRIBUTE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?:title|file|filename|path)=["']?([^"'\s]+)"#).expect("static regex")
});

const EXTENSIONLESS: [&str; 4] = ["Makefile", "Dockerfile", "LICENSE", "Gemfile"];

pub(super) fn parse(raw: &str) -> Reply {
    let lines: Vec<&str> = raw.lines().collect();
    let mut reply = Reply::empty(Format::Unrecognized);
    let mut i = 0;
    while i < lines.len() {
        let Some(info) = lines[i].trim_start().strip_prefix("```") else {
            i += 1;
            continue;
        };
        let close = lines[i + 1..]
            .iter()
            .position(|l| l.trim() == "```")
            .map(|n| i + 1 + n);
        let path = path_in_info(info).or_else(|| path_above(&lines[..i]));
        match (path, close) {
            (Some(path), Some(close)) => {
                reply.format = Format::Markdown;
                let content: String = lines[i + 1..close]
                    .iter()
                    .map(|l| format!("{l}\n"))
                    .collect();
                reply.files.push(FileEdit { path, content });
                i = close + 1;
            }
            (Some(path), None) => {
                reply.format = Format::Markdown;
                reply.problems.push(Problem::Truncated {
                    what: format!("the fenced block for {path}"),
                });
                break;
            }
            (None, Some(close)) => i = close + 1,
            (None, None) => break,
        }
    }
    reply
}

fn path_in_info(info: &str) -> Option<String> {
    if let Some(c) = TITLE_ATTRIBUTE.captures(info) {
        return Some(c[1].to_string());
    }
    // ```src/a.py or ```python src/a.py: a token that is a path, not a language name.
    info.split_whitespace()
        .find(|t| looks_like_path(t))
        .map(str::to_string)
}

/// The filename on the nearest non-empty line above the fence (one blank line may separate).
fn path_above(before: &[&str]) -> Option<String> {
    let line = before.iter().rev().take(2).find(|l| !l.trim().is_empty())?;
    let cleaned = line
        .trim()
        .trim_start_matches('#')
        .trim()
        .trim_start_matches("File:")
        .trim_start_matches("Filename:")
        .trim_start_matches("file:");
    cleaned
        .split_whitespace()
        .map(|t| t.trim_matches(|c| matches!(c, '*' | '`' | '"' | '\'' | ':' | '(' | ')' | ',')))
        .rfind(|t| looks_like_path(t))
        .map(str::to_string)
}

fn looks_like_path(token: &str) -> bool {
    if !PATH_TOKEN.is_match(token) {
        return false;
    }
    let name = token.rsplit('/').next().unwrap_or(token);
    let has_extension = name
        .rfind('.')
        .is_some_and(|dot| dot > 0 && dot < name.len() - 1)
        || name.starts_with('.') && name.len() > 1;
    has_extension || EXTENSIONLESS.contains(&name)
}
