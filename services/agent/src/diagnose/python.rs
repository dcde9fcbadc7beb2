//! Python: tracebacks (the last frame inside the workspace and the exception line), unittest's
//! `FAIL:`/`ERROR:` headers, and pytest's failure sections (`file.py:12: AssertionError` and the
//! `E   assert …` lines).

use std::sync::LazyLock;

use regex::Regex;

use super::{Raw, Scope};

static FRAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"^\s*File "(.+)", line (\d+)(?:, in (.+))?$"#).expect("static regex")
});
// `ValueError: bad`, `mypkg.errors.Boom`, `KeyboardInterrupt`.
static EXCEPTION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z_][\w.]*(?::.*)?$").expect("static regex"));
static UNITTEST_HEADER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(?:FAIL|ERROR): (.+)$").expect("static regex"));
static PYTEST_SECTION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^_{3,} (.+?) _{3,}$").expect("static regex"));
static PYTEST_LOCATION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^([^\s:][^:]*\.py):(\d+): ?(.*)$").expect("static regex"));
static PYTEST_E: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^E {1,}(.*)$").expect("static regex"));

/// Lines of a multi-line exception message (an assertEqual diff) kept.
const MAX_EXCEPTION_LINES: usize = 8;

pub(crate) fn parse(lines: &[&str], scope: Scope<'_>) -> Vec<Raw> {
    let mut out = tracebacks(lines, scope);
    out.extend(pytest(lines, scope));
    out
}

fn tracebacks(lines: &[&str], scope: Scope<'_>) -> Vec<Raw> {
    let mut out = Vec::new();
    let mut test: Option<String> = None;
    let mut i = 0;
    while i < lines.len() {
        if let Some(c) = UNITTEST_HEADER.captures(lines[i]) {
            test = Some(c[1].to_string());
            i += 1;
            continue;
        }
        if !FRAME.is_match(lines[i]) {
            i += 1;
            continue;
        }
        // A run of frames: each `File` line with its indented source and caret lines. The first
        // line always advances `i`, so the scan makes progress whatever the indentation.
        let mut frames: Vec<(String, u32)> = Vec::new();
        loop {
            if let Some(c) = FRAME.captures(lines[i])
                && let Ok(n) = c[2].parse()
            {
                frames.push((c[1].to_string(), n));
            }
            i += 1;
            if i >= lines.len() || !(lines[i].starts_with(' ') || lines[i].starts_with('\t')) {
                break;
            }
        }
        let Some((file, line)) = frames
            .iter()
            .rev()
            .find(|(f, _)| scope.inside(f))
            .or(frames.last())
            .cloned()
        else {
            continue;
        };
        let exception: Vec<&str> = lines[i..]
            .iter()
            .take_while(|l| !l.trim().is_empty() && !l.starts_with("----"))
            .take(MAX_EXCEPTION_LINES)
            .copied()
            .collect();
        if exception.first().is_none_or(|l| !EXCEPTION.is_match(l)) {
            continue;
        }
        let mut message = exception.join("\n");
        if let Some(name) = test.take() {
            message = match message.split_once('\n') {
                Some((head, rest)) => format!("{head}\nin test {name}\n{rest}"),
                None => format!("{message}\nin test {name}"),
            };
        }
        out.push(Raw::new(&file, line, None, message));
        i += exception.len();
    }
    out
}

/// pytest's failure sections: `____ test_name ____`, the source with `>` and `E` lines, and
/// `path.py:line: ExceptionName` for each frame. The last frame inside the workspace is the
/// location; the `E` lines are the message.
fn pytest(lines: &[&str], scope: Scope<'_>) -> Vec<Raw> {
    let mut out = Vec::new();
    let mut section: Option<Section> = None;
    for line in lines {
        let ends = line.starts_with("====") || PYTEST_SECTION.is_match(line);
        if ends && let Some(done) = section.take() {
            out.extend(done.finish(scope));
        }
        if let Some(c) = PYTEST_SECTION.captures(line) {
            section = Some(Section {
                name: c[1].to_string(),
                locations: Vec::new(),
                e_lines: Vec::new(),
            });
            continue;
        }
        let Some(current) = section.as_mut() else {
            continue;
        };
        if let Some(c) = PYTEST_E.captures(line) {
            current.e_lines.push(c[1].trim_end().to_string());
        } else if let Some(c) = PYTEST_LOCATION.captures(line)
            && let Ok(n) = c[2].parse()
        {
            current
                .locations
                .push((c[1].to_string(), n, c[3].trim().to_string()));
        }
    }
    if let Some(done) = section {
        out.extend(done.finish(scope));
    }
    out
}

#[derive(Debug)]
struct Section {
    name: String,
    locations: Vec<(String, u32, String)>,
    e_lines: Vec<String>,
}

impl Section {
    fn finish(self, scope: Scope<'_>) -> Option<Raw> {
        let (file, line, what) = self
            .locations
            .iter()
            .rev()
            .find(|(f, _, _)| scope.inside(f))
            .or(self.locations.last())?
            .clone();
        let exception = self.locations.last().map_or(what, |l| l.2.clone());
        let mut e_lines = self.e_lines.into_iter().take(MAX_EXCEPTION_LINES);
        let headline = match e_lines.next() {
            Some(first) if exception.is_empty() || first.starts_with(&exception) => first,
            Some(first) => format!("{exception}: {first}"),
            None => exception,
        };
        let mut message = format!("{headline}\nin test {}", self.name);
        for detail in e_lines {
            message.push('\n');
            message.push_str(&detail);
        }
        Some(Raw::new(&file, line, None, message))
    }
}
