//! Text helpers shared by the parsers: decoding output, paths, bounds, fingerprints.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;

/// stdout then stderr, decoded lossily (a build may print anything) and stripped of ANSI colour
/// codes (cargo, gcc and tsc colour their output when they think a terminal is attached).
pub(crate) fn combine(stdout: &[u8], stderr: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(stdout).into_owned();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&String::from_utf8_lossy(stderr));
    strip_ansi(&text)
}

/// `bytes` when at most `max` long, else its first and last `max / 2` bytes joined by a line
/// saying how much was skipped (cut at line boundaries where one is near, so no line is
/// half-parsed).
pub(crate) fn head_and_tail(bytes: &[u8], max: usize) -> Cow<'_, [u8]> {
    if bytes.len() <= max {
        return Cow::Borrowed(bytes);
    }
    let half = max / 2;
    let head_end = bytes[..half]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(half, |i| i + 1);
    let tail_from = bytes.len() - half;
    let tail_start = bytes[tail_from..]
        .iter()
        .position(|b| *b == b'\n')
        .map_or(tail_from, |i| tail_from + i + 1);
    let mut out = bytes[..head_end].to_vec();
    let skipped = tail_start - head_end;
    out.extend_from_slice(format!("[… {skipped} bytes of output skipped …]\n").as_bytes());
    out.extend_from_slice(&bytes[tail_start..]);
    Cow::Owned(out)
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // CSI: parameters and intermediates, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The last `lines` lines of `text`, without trailing blank lines, at most `max_bytes` bytes
/// (cut at the front, on a character boundary, so the end of the output, where the failure
/// usually is, survives).
pub(crate) fn tail(text: &str, lines: usize, max_bytes: usize) -> String {
    let trimmed = text.trim_end();
    let all: Vec<&str> = trimmed.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut joined = all[start..].join("\n");
    // One byte is the closing newline.
    let budget = max_bytes.saturating_sub(1);
    if joined.len() > budget {
        let keep = budget.saturating_sub('…'.len_utf8());
        let mut from = joined.len() - keep;
        while !joined.is_char_boundary(from) {
            from += 1;
        }
        joined = format!("…{}", &joined[from..]);
    }
    joined.push('\n');
    joined
}

/// `text` cut to at most `max` bytes on a character boundary, marked with an ellipsis.
pub(crate) fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let ellipsis = "…";
    let mut end = max.saturating_sub(ellipsis.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ellipsis}", &text[..end])
}

/// The workspace-relative form of a printed path, or None when it lies outside the workspace.
///
/// An absolute path under `root` loses the prefix. An absolute path elsewhere still counts when
/// one of its tails names a workspace file (the workspace may be mounted at a different path in
/// the sandbox than the caller believes). Relative paths are normalized; one that climbs out with
/// `..`, or a pseudo-path such as Python's `<string>` or node's `node:internal/…`, is outside.
pub(crate) fn relativize(
    path: &str,
    root: &str,
    files: &BTreeMap<String, String>,
) -> Option<String> {
    let path = path.strip_prefix("file://").unwrap_or(path);
    if path.is_empty() || path.contains('<') || path.starts_with("node:") {
        return None;
    }
    if path.starts_with('/') {
        let root = root.trim_end_matches('/');
        if !root.is_empty()
            && let Some(rest) = path.strip_prefix(root).and_then(|r| r.strip_prefix('/'))
        {
            return normalize(rest);
        }
        let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        return (1..components.len())
            .map(|skip| components[skip..].join("/"))
            .find(|tail| files.contains_key(tail));
    }
    normalize(path)
}

fn normalize(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// `text` with every hexadecimal literal (`0x7ffd…`) and every run of ASCII digits replaced by
/// `#`, so numbers that vary between runs (addresses, durations, counts, temporary names) do not
/// change a fingerprint.
pub fn normalize_numbers(text: &str) -> String {
    static NUMBER: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"0[xX][0-9a-fA-F]+|[0-9]+").expect("static regex"));
    NUMBER.replace_all(text, "#").into_owned()
}

/// 64-bit FNV-1a: a fixed, documented hash, so fingerprints stay equal across processes and
/// Rust releases (std's `DefaultHasher` promises neither).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relativize_strips_the_root_and_rejects_escapes() {
        let files = BTreeMap::from([("src/a.py".to_string(), String::new())]);
        let rel = |p: &str| relativize(p, "/work/ws/", &files);
        assert_eq!(rel("/work/ws/src/a.py").as_deref(), Some("src/a.py"));
        assert_eq!(rel("./src/./a.py").as_deref(), Some("src/a.py"));
        assert_eq!(rel("/elsewhere/mnt/src/a.py").as_deref(), Some("src/a.py"));
        assert_eq!(rel("/usr/lib/python3.11/unittest/case.py"), None);
        assert_eq!(rel("../outside.py"), None);
        assert_eq!(rel("<frozen importlib._bootstrap>"), None);
        assert_eq!(rel("node:internal/modules/cjs/loader"), None);
        assert_eq!(rel("/work/wsx/a.py"), None);
    }

    #[test]
    fn ansi_codes_are_removed() {
        assert_eq!(
            combine(b"\x1b[1m\x1b[31merror\x1b[0m: x", b""),
            "error: x\n"
        );
    }

    #[test]
    fn tail_and_cut_respect_the_bound_on_multibyte_text() {
        let text = "é".repeat(1000);
        assert!(tail(&text, 40, 101).len() <= 101);
        assert!(cut(&text, 101).len() <= 101);
        assert_eq!(cut("short", 10), "short");
    }

    #[test]
    fn numbers_are_normalized() {
        assert_eq!(normalize_numbers("at 0x7ffd12 in 0.02s"), "at # in #.#s");
    }
}
