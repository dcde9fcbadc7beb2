//! gcc and clang: `file:line:col: error: message` (the column is optional), with the notes that
//! follow an error folded into it, because a note ("previous definition is here") only makes
//! sense next to its error.

use std::sync::LazyLock;

use regex::Regex;

use super::{Raw, Severity};

static LOCATED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([^\s:][^:]*):(\d+):(?:(\d+):)? (fatal error|error|warning|note): (.+)$")
        .expect("static regex")
});

/// A failed `assert()` as glibc reports it: `prog: file.c:10: main: Assertion `x == 5' failed.`
/// (musl: `Assertion failed: x == 5 (file.c: main: 10)`). The program is the C toolchain's
/// test runner, so the assertion is where the model must look.
static GLIBC_ASSERT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[^\s:]+: ([^\s:][^:]*):(\d+): (.+?): Assertion (.+) failed\.$")
        .expect("static regex")
});
static MUSL_ASSERT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^Assertion failed: (.+) \(([^\s:][^:]*): (.+?): (\d+)\)$").expect("static regex")
});

/// Notes folded into one error at most; further ones add nothing a model can use.
const MAX_NOTES: usize = 2;

pub(crate) fn parse(lines: &[&str]) -> Vec<Raw> {
    let mut out: Vec<Raw> = Vec::new();
    let mut notes_folded = 0;
    for line in lines {
        if let Some(raw) = assertion(line) {
            out.push(raw);
            continue;
        }
        let Some(c) = LOCATED.captures(line) else {
            continue;
        };
        let (Ok(number), column) = (c[2].parse(), c.get(3).and_then(|m| m.as_str().parse().ok()))
        else {
            continue;
        };
        let kind = &c[4];
        if kind == "note"
            && let Some(previous) = out.last_mut()
        {
            if notes_folded < MAX_NOTES {
                previous
                    .message
                    .push_str(&format!("\nnote: {}:{}: {}", &c[1], &c[2], &c[5]));
                notes_folded += 1;
            }
            continue;
        }
        let mut raw = Raw::new(&c[1], number, column, c[5].to_string());
        raw.severity = match kind {
            "warning" => Severity::Warning,
            "note" => Severity::Note,
            _ => Severity::Error,
        };
        notes_folded = 0;
        out.push(raw);
    }
    out
}

fn assertion(line: &str) -> Option<Raw> {
    if let Some(c) = GLIBC_ASSERT.captures(line) {
        let number = c[2].parse().ok()?;
        return Some(Raw::new(
            &c[1],
            number,
            None,
            format!("assertion failed in {}: {}", &c[3], &c[4]),
        ));
    }
    let c = MUSL_ASSERT.captures(line)?;
    let number = c[4].parse().ok()?;
    Some(Raw::new(
        &c[2],
        number,
        None,
        format!("assertion failed in {}: {}", &c[3], &c[1]),
    ))
}
