//! Located errors: a failed build step's output turned into a short diagnosis for the FIX prompt.
//!
//! A raw build log can be a megabyte; the model needs the few places that are wrong, where they
//! are, and the lines around them. [`diagnose`] runs every parser over the step's output (the one
//! the step's `argv[0]` suggests first, because `make` or a script may run any of them), makes each
//! path workspace-relative, attaches numbered source lines from the workspace files, drops
//! duplicates, ranks what lies outside the workspace (standard library frames, system headers)
//! last, and keeps at most [`Limits::max_diagnostics`]. [`Diagnosis::render`] is the text the
//! model sees, never longer than [`Limits::max_bytes`]. When nothing parses, the diagnosis is the
//! trimmed tail of the output.
//!
//! Parsers (one module each): `cargo` (`--message-format=json` records, rustc's human output,
//! test panics), `gcc` (gcc and clang), `python` (tracebacks, unittest, pytest), `node`
//! (node stacks, tsc in both its formats), `go` (go build, go vet, go test, panics).

mod cargo;
mod gcc;
mod go;
mod node;
mod python;
mod text;

use std::collections::{BTreeMap, HashSet};

pub use text::{fnv1a64, normalize_numbers};

/// How bad a diagnostic is. Ordered: errors rank before warnings, warnings before notes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The build failed because of it.
    Error,
    /// The tool warned; kept because a warning often names the real cause.
    Warning,
    /// Supplementary information the tool attached.
    Note,
}

impl Severity {
    /// The word the rendering uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        }
    }
}

/// One numbered source line shown around a diagnostic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLine {
    /// 1-based line number in the file.
    pub number: u32,
    /// The line without its newline.
    pub text: String,
}

/// One located problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Workspace-relative path, or the path as printed when it lies outside the workspace.
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column, when the tool prints one.
    pub column: Option<u32>,
    /// Error, warning or note.
    pub severity: Severity,
    /// The tool's message (first line is the headline; later lines are details such as a
    /// test name, an assertion's operands or a compiler's label and help).
    pub message: String,
    /// The tool's error code (`E0308`, `TS2322`), when it has one.
    pub code: Option<String>,
    /// Source lines around `line`, from the workspace file contents passed in.
    pub context: Vec<SourceLine>,
    /// False for frames and files outside the workspace; those rank last.
    pub in_workspace: bool,
}

/// Bounds of a diagnosis. The defaults suit a small model's context window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// At most this many diagnostics are kept. Default 8.
    pub max_diagnostics: usize,
    /// The rendering is at most this many bytes. Default 4096.
    pub max_bytes: usize,
    /// Source lines shown before and after the located line. Default 2.
    pub context_lines: u32,
    /// Lines of output kept when nothing parses. Default 40.
    pub tail_lines: usize,
    /// A single message is cut to this many bytes. Default 600.
    pub max_message_bytes: usize,
    /// Output read per stream: a longer stream is read as its first and last halves of this
    /// (the first error and the final summary live there), so a build that prints gigabytes
    /// cannot make the diagnosis slow. Default 4 MiB.
    pub max_input_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_diagnostics: 8,
            max_bytes: 4096,
            context_lines: 2,
            tail_lines: 40,
            max_message_bytes: 600,
            max_input_bytes: 4 * 1024 * 1024,
        }
    }
}

/// What a failed step left behind, and the workspace it ran in.
#[derive(Debug, Clone, Copy)]
pub struct StepOutput<'a> {
    /// The step's argv; `argv[0]` picks the parser tried first.
    pub argv: &'a [String],
    /// Everything the step wrote to stdout.
    pub stdout: &'a [u8],
    /// Everything the step wrote to stderr.
    pub stderr: &'a [u8],
    /// The absolute path the workspace had where the step ran (inside the sandbox); printed
    /// paths under it become workspace-relative.
    pub workspace_root: &'a str,
    /// Workspace files by workspace-relative path, for context lines.
    pub files: &'a BTreeMap<String, String>,
}

/// The result of [`diagnose`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    /// Located problems, best first, at most `limits.max_diagnostics`.
    pub diagnostics: Vec<Diagnostic>,
    /// How many more were found than kept.
    pub omitted: usize,
    /// The trimmed tail of the output, when no diagnostic was found.
    pub tail: Option<String>,
    /// The bounds the rendering keeps.
    pub limits: Limits,
}

/// A diagnostic as a parser finds it, before paths are resolved and context attached.
#[derive(Debug, Clone)]
pub(crate) struct Raw {
    pub file: String,
    pub line: u32,
    pub column: Option<u32>,
    pub severity: Severity,
    pub message: String,
    pub code: Option<String>,
}

impl Raw {
    pub(crate) fn new(file: &str, line: u32, column: Option<u32>, message: String) -> Self {
        Self {
            file: file.to_string(),
            line,
            column,
            severity: Severity::Error,
            message,
            code: None,
        }
    }
}

/// Which family of tools a step's program belongs to, to try its parser first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rust,
    C,
    Python,
    Node,
    Go,
}

const ALL_FAMILIES: [Family; 5] = [
    Family::Rust,
    Family::C,
    Family::Python,
    Family::Node,
    Family::Go,
];

fn family_of(argv: &[String]) -> Option<Family> {
    let program = argv.first()?;
    let name = program.rsplit('/').next().unwrap_or(program);
    let family = match name {
        "cargo" | "rustc" => Family::Rust,
        "cc" | "gcc" | "g++" | "c++" | "clang" | "clang++" => Family::C,
        "node" | "npm" | "npx" | "tsc" | "yarn" | "pnpm" => Family::Node,
        "go" => Family::Go,
        n if n.starts_with("python") || n == "pytest" || n == "pip" || n == "pip3" => {
            Family::Python
        }
        _ => return None,
    };
    Some(family)
}

/// What lies inside the workspace, for parsers that pick one frame out of a stack.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scope<'a> {
    root: &'a str,
    files: &'a BTreeMap<String, String>,
}

impl Scope<'_> {
    pub(crate) fn inside(&self, path: &str) -> bool {
        text::relativize(path, self.root, self.files).is_some()
    }
}

fn parse_family(family: Family, lines: &[&str], scope: Scope<'_>) -> Vec<Raw> {
    match family {
        Family::Rust => cargo::parse(lines),
        Family::C => gcc::parse(lines),
        Family::Python => python::parse(lines, scope),
        Family::Node => node::parse(lines, scope),
        Family::Go => go::parse(lines, scope),
    }
}

/// Turns a failed step's output into a bounded, located diagnosis.
pub fn diagnose(output: &StepOutput<'_>, limits: Limits) -> Diagnosis {
    let combined = text::combine(
        &text::head_and_tail(output.stdout, limits.max_input_bytes),
        &text::head_and_tail(output.stderr, limits.max_input_bytes),
    );
    let lines: Vec<&str> = combined.lines().collect();
    let preferred = family_of(output.argv);
    let order = preferred
        .into_iter()
        .chain(ALL_FAMILIES.into_iter().filter(|f| Some(*f) != preferred));

    let scope = Scope {
        root: output.workspace_root,
        files: output.files,
    };
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for family in order {
        for raw in parse_family(family, &lines, scope) {
            let diagnostic = resolve(raw, output, &limits);
            let key = (
                diagnostic.file.clone(),
                diagnostic.line,
                diagnostic.column,
                diagnostic.message.lines().next().unwrap_or("").to_string(),
            );
            if seen.insert(key) {
                found.push(diagnostic);
            }
        }
    }
    // Stable: the tools' own order (first error first) survives within a rank.
    found.sort_by_key(|d| (!d.in_workspace, d.severity));
    let omitted = found.len().saturating_sub(limits.max_diagnostics);
    found.truncate(limits.max_diagnostics);
    let tail = found
        .is_empty()
        .then(|| text::tail(&combined, limits.tail_lines, limits.max_bytes / 2));
    Diagnosis {
        diagnostics: found,
        omitted,
        tail,
        limits,
    }
}

fn resolve(raw: Raw, output: &StepOutput<'_>, limits: &Limits) -> Diagnostic {
    let relative = text::relativize(&raw.file, output.workspace_root, output.files);
    let in_workspace = relative.is_some();
    let file = relative.unwrap_or(raw.file);
    let context = if in_workspace {
        output
            .files
            .get(&file)
            .map(|source| context_lines(source, raw.line, limits.context_lines))
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    Diagnostic {
        file,
        line: raw.line,
        column: raw.column,
        severity: raw.severity,
        message: text::cut(raw.message.trim_end(), limits.max_message_bytes),
        code: raw.code,
        context,
        in_workspace,
    }
}

fn context_lines(source: &str, line: u32, around: u32) -> Vec<SourceLine> {
    let first = line.saturating_sub(around).max(1);
    let last = line.saturating_add(around);
    source
        .lines()
        .enumerate()
        .map(|(i, text)| (i as u32 + 1, text))
        .skip_while(|(n, _)| *n < first)
        .take_while(|(n, _)| *n <= last)
        .map(|(number, text)| SourceLine {
            number,
            text: text.to_string(),
        })
        .collect()
}

impl Diagnostic {
    /// This diagnostic as the model sees it: headline, location, numbered source lines.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut lines = self.message.lines();
        let headline = lines.next().unwrap_or("");
        match &self.code {
            Some(code) => {
                out.push_str(&format!("{}[{code}]: {headline}\n", self.severity.as_str()))
            }
            None => out.push_str(&format!("{}: {headline}\n", self.severity.as_str())),
        }
        match self.column {
            Some(col) => out.push_str(&format!("  --> {}:{}:{col}\n", self.file, self.line)),
            None => out.push_str(&format!("  --> {}:{}\n", self.file, self.line)),
        }
        let width = self
            .context
            .last()
            .map_or(1, |l| l.number.to_string().len());
        for source in &self.context {
            let marker = if source.number == self.line { '>' } else { ' ' };
            out.push_str(&format!(
                "{marker} {:>width$} | {}\n",
                source.number, source.text
            ));
        }
        for detail in lines {
            out.push_str(&format!("  {detail}\n"));
        }
        out
    }
}

impl Diagnosis {
    /// The text for the FIX prompt, at most `limits.max_bytes` bytes. Diagnostics that do not fit
    /// whole are counted in a closing line instead of being cut in the middle (the first one is
    /// cut if it alone is too long, so the model always sees at least one location).
    pub fn render(&self) -> String {
        let max = self.limits.max_bytes;
        if let Some(tail) = &self.tail {
            let header = "No located error was found; the last lines of the output:\n";
            return text::cut(&format!("{header}{tail}"), max);
        }
        // Reserve room for the closing line so adding it can never break the bound.
        let reserve = 64;
        let mut out = String::new();
        let mut shown = 0;
        for diagnostic in &self.diagnostics {
            let block = diagnostic.render();
            if out.len() + block.len() + 1 + reserve > max {
                if shown == 0 {
                    out = text::cut(&block, max.saturating_sub(reserve));
                    out.push('\n');
                    shown = 1;
                }
                break;
            }
            out.push_str(&block);
            out.push('\n');
            shown += 1;
        }
        let hidden = self.diagnostics.len() - shown + self.omitted;
        if hidden > 0 {
            out.push_str(&format!("… and {hidden} more diagnostics not shown\n"));
        }
        text::cut(&out, max)
    }

    /// The fingerprint of this diagnosis for the stuck detector: [`signature`] of the
    /// diagnostics, or of the normalized tail when nothing was located.
    pub fn signature(&self) -> String {
        match &self.tail {
            Some(tail) => format!("{:016x}", fnv1a64(normalize_numbers(tail).as_bytes())),
            None => signature(&self.diagnostics),
        }
    }
}

/// A stable fingerprint of a set of diagnostics: two builds failing "with the same error"
/// give the same string, across processes and releases. It covers each diagnostic's file,
/// line, severity, code and headline with every run of digits replaced (so addresses, counts,
/// durations and temporary names that vary between runs do not make the same error look new),
/// in a canonical order. Context lines are left out: the model may edit lines around the
/// error without fixing it.
pub fn signature(diagnostics: &[Diagnostic]) -> String {
    let mut parts: Vec<String> = diagnostics
        .iter()
        .map(|d| {
            format!(
                "{}:{}:{}:{}:{}",
                d.file,
                d.line,
                d.severity.as_str(),
                d.code.as_deref().unwrap_or(""),
                normalize_numbers(d.message.lines().next().unwrap_or("").trim())
            )
        })
        .collect();
    parts.sort();
    parts.dedup();
    format!("{:016x}", fnv1a64(parts.join("\n").as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_lines_are_clipped_to_the_file() {
        let source = "a\nb\nc\n";
        let lines = context_lines(source, 1, 2);
        assert_eq!(
            lines.iter().map(|l| l.number).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(context_lines(source, 9, 2).is_empty());
    }

    #[test]
    fn family_follows_the_program_name() {
        let argv = |s: &str| vec![s.to_string()];
        assert_eq!(
            family_of(&argv("/usr/bin/python3.11")),
            Some(Family::Python)
        );
        assert_eq!(family_of(&argv("cargo")), Some(Family::Rust));
        assert_eq!(family_of(&argv("make")), None);
    }
}
