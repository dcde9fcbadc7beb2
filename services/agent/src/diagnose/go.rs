//! Go: `go build`/`go vet` errors (`./main.go:3:5: undefined: x`), `go test` failures
//! (`--- FAIL: TestX` then the test's own `file_test.go:12: message` lines) and panics (the first
//! goroutine frame inside the workspace).

use std::sync::LazyLock;

use regex::Regex;

use super::{Raw, Scope};

static LOCATED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\s*([^\s:][^:]*\.go):(\d+)(?::(\d+))?: (.+)$").expect("static regex")
});
static FAIL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\s*--- FAIL: (\S+)").expect("static regex"));
static PANIC: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^panic: (.+)$").expect("static regex"));
static TRACE_FRAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\t(\S+\.go):(\d+)(?: \+0x[0-9a-f]+)?$").expect("static regex"));

/// How far below `panic:` the goroutine trace is searched.
const TRACE_LINES: usize = 60;

pub(crate) fn parse(lines: &[&str], scope: Scope<'_>) -> Vec<Raw> {
    let mut out = Vec::new();
    let mut test: Option<String> = None;
    for (i, line) in lines.iter().enumerate() {
        if let Some(c) = FAIL.captures(line) {
            test = Some(c[1].to_string());
        } else if line.starts_with("--- ") || line.starts_with("=== RUN") || *line == "FAIL" {
            test = None;
        } else if let Some(c) = LOCATED.captures(line)
            && let Ok(n) = c[2].parse()
        {
            let mut message = c[4].to_string();
            if let Some(name) = &test {
                message.push_str(&format!("\nin test {name}"));
            }
            out.push(Raw::new(
                &c[1],
                n,
                c.get(3).and_then(|m| m.as_str().parse().ok()),
                message,
            ));
        } else if let Some(c) = PANIC.captures(line) {
            let frames: Vec<(String, u32)> = lines[i + 1..]
                .iter()
                .take(TRACE_LINES)
                .filter_map(|l| TRACE_FRAME.captures(l))
                .filter_map(|f| Some((f[1].to_string(), f[2].parse().ok()?)))
                .collect();
            if let Some((file, n)) = frames
                .iter()
                .find(|(f, _)| scope.inside(f))
                .or(frames.first())
            {
                out.push(Raw::new(file, *n, None, format!("panic: {}", &c[1])));
            }
        }
    }
    out
}
