//! VALIDATE: what a model's reply must satisfy before any file is written or command run.
//!
//! [`check`] turns a parsed [`Reply`] into a [`Verdict`]: a list of [`Finding`]s, each with a
//! severity, the path and line it concerns and a message for people and for the FIX prompt, plus
//! the commands the model proposed, which the caller must still check against the build policy
//! (GetPolicy) before running any of them; this module does not decide which programs may run.
//!
//! **Blocking** (the reply is refused and the model asked again):
//! - every [`Problem`] of the reply itself (truncated, duplicate path, no files, wrong format);
//! - a path that is empty, absolute, contains `..`, `.` or empty segments, a backslash, a drive
//!   letter, NUL or another control character, a `.git` segment (git metadata and hooks would
//!   run on the user's machine after a download), or exceeds the length, segment or depth bound;
//! - more files than [`Limits::max_files`], a file over [`Limits::max_file_bytes`], all files
//!   together over [`Limits::max_total_bytes`];
//! - binary content: a NUL byte, invalid UTF-8, or a control character other than tab, newline,
//!   carriage return, form feed and escape;
//! - embedded secrets of a recognizable format: PEM private keys, AWS access key ids
//!   (`AKIA…`/`ASIA…`), GitHub tokens (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_`),
//!   kiln API keys (`kiln_<32 hex>_…`), Slack tokens (`xox…-`), Google API keys (`AIza…`) and
//!   OpenAI-style keys (`sk-…`): a model has no business writing a real credential into code,
//!   and one that does is leaking it from its context;
//! - more commands than [`Limits::max_commands`] or a command over [`Limits::max_command_bytes`].
//!
//! **Warning** (reported in the task's events; the reply proceeds):
//! - a generic `api_key = "…"` / `secret: "…"` / `password = "…"` assignment of a long literal:
//!   test fixtures do this legitimately, so it is not refused;
//! - known-dangerous patterns in files or commands: `rm -r` of `/` or `~`, `curl … | sh`,
//!   reading `/etc/shadow` (or `gshadow`, `sudoers`), the `:(){ :|:& };:` fork bomb, `/dev/tcp`
//!   reverse shells, and running a shell from code (`os.system`, `os.popen`, `subprocess` with
//!   `shell=True`, node's `child_process.exec`). These are warnings because the sandbox, not
//!   this text scan, is what contains a build; a pattern list is easy to evade and must never be
//!   mistaken for the boundary.
//!
//! Messages never repeat a secret's value: findings are streamed and persisted.

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

use crate::reply::{Problem, Reply};

/// How a finding affects the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The reply is refused.
    Blocking,
    /// Reported; the reply proceeds.
    Warning,
}

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The reply itself is defective (see [`Problem`]).
    Reply,
    /// A path breaks the workspace rules.
    Path,
    /// Too many files, a file too large, or all files together too large.
    Size,
    /// Content that is not text.
    Binary,
    /// An embedded credential.
    Secret,
    /// A known-dangerous pattern.
    Dangerous,
    /// Too many commands, or one too long.
    Command,
}

/// One thing VALIDATE found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Blocking or warning.
    pub severity: Severity,
    /// What it is about.
    pub kind: Kind,
    /// The file concerned, [`COMMANDS_PATH`] for a proposed command, empty for the whole reply.
    pub path: String,
    /// 1-based line within the file (or index within the commands), when it concerns one.
    pub line: Option<u32>,
    /// For people and the FIX prompt; never contains a secret's value.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Blocking => "blocking",
            Severity::Warning => "warning",
        };
        match (self.path.is_empty(), self.line) {
            (true, _) => write!(f, "{severity}: {}", self.message),
            (false, None) => write!(f, "{severity}: {}: {}", self.path, self.message),
            (false, Some(line)) => write!(f, "{severity}: {}:{line}: {}", self.path, self.message),
        }
    }
}

/// The path findings about proposed commands carry.
pub const COMMANDS_PATH: &str = "<commands>";

/// Bounds of a reply. Defaults suit small generated projects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Files per reply. Default 64.
    pub max_files: usize,
    /// Bytes per file. Default 256 KiB.
    pub max_file_bytes: usize,
    /// Bytes of all files together. Default 1 MiB.
    pub max_total_bytes: usize,
    /// Bytes of a path. Default 512.
    pub max_path_bytes: usize,
    /// Bytes of one path segment (the common file-system limit). Default 255.
    pub max_segment_bytes: usize,
    /// Segments of a path. Default 16.
    pub max_depth: usize,
    /// Proposed commands per reply. Default 16.
    pub max_commands: usize,
    /// Bytes of one proposed command. Default 1024.
    pub max_command_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_files: 64,
            max_file_bytes: 256 * 1024,
            max_total_bytes: 1024 * 1024,
            max_path_bytes: 512,
            max_segment_bytes: 255,
            max_depth: 16,
            max_commands: 16,
            max_command_bytes: 1024,
        }
    }
}

/// The outcome of VALIDATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Everything found, blocking first.
    pub findings: Vec<Finding>,
    /// The commands the model proposed, still to be checked against the build policy.
    pub commands: Vec<String>,
}

impl Verdict {
    /// True when any finding is blocking.
    pub fn is_blocked(&self) -> bool {
        self.findings
            .iter()
            .any(|f| f.severity == Severity::Blocking)
    }
}

/// Checks a reply against the limits and the workspace rules.
pub fn check(reply: &Reply, limits: &Limits) -> Verdict {
    let mut findings: Vec<Finding> = reply.problems.iter().map(problem_finding).collect();
    if reply.files.len() > limits.max_files {
        findings.push(blocking(
            Kind::Size,
            "",
            None,
            format!(
                "{} files, more than the {} allowed",
                reply.files.len(),
                limits.max_files
            ),
        ));
    }
    let total: usize = reply.files.iter().map(|f| f.content.len()).sum();
    if total > limits.max_total_bytes {
        findings.push(blocking(
            Kind::Size,
            "",
            None,
            format!(
                "{total} bytes of files, more than the {} allowed",
                limits.max_total_bytes
            ),
        ));
    }
    for file in &reply.files {
        findings.extend(check_path(&file.path, limits));
        findings.extend(check_content(&file.path, file.content.as_bytes(), limits));
    }
    findings.extend(check_commands(&reply.commands, limits));
    findings.sort_by_key(|f| f.severity);
    Verdict {
        findings,
        commands: reply.commands.clone(),
    }
}

fn problem_finding(problem: &Problem) -> Finding {
    let path = match problem {
        Problem::DuplicatePath { path } | Problem::Unterminated { path } => path.clone(),
        _ => String::new(),
    };
    blocking(Kind::Reply, &path, None, problem.to_string())
}

fn blocking(kind: Kind, path: &str, line: Option<u32>, message: String) -> Finding {
    Finding {
        severity: Severity::Blocking,
        kind,
        path: path.to_string(),
        line,
        message,
    }
}

/// The workspace rules for one path (see the module documentation). At most one finding: the
/// first rule broken.
pub fn check_path(path: &str, limits: &Limits) -> Option<Finding> {
    let bad = |message: &str| Some(blocking(Kind::Path, path, None, message.to_string()));
    if path.is_empty() {
        return bad("the path is empty");
    }
    if path.chars().any(char::is_control) {
        return bad("the path contains a NUL or another control character");
    }
    if path.starts_with('/') {
        return bad("the path is absolute; paths are relative to the workspace");
    }
    if path.contains('\\') {
        return bad("the path contains a backslash; separate directories with /");
    }
    if path.as_bytes().get(1) == Some(&b':') {
        return bad("the path starts with a drive letter; paths are relative to the workspace");
    }
    if path.len() > limits.max_path_bytes {
        return bad("the path is too long");
    }
    let segments: Vec<&str> = path.split('/').collect();
    if segments.len() > limits.max_depth {
        return bad("the path is nested too deeply");
    }
    for segment in &segments {
        match *segment {
            ".." => return bad("the path contains `..`; it must stay inside the workspace"),
            "" | "." => return bad("the path has empty or `.` segments; write it as a/b/c"),
            s if s.len() > limits.max_segment_bytes => {
                return bad("a segment of the path is too long");
            }
            s if s.eq_ignore_ascii_case(".git") => {
                return bad("the path writes into .git, which is not part of the project");
            }
            _ => {}
        }
    }
    None
}

/// Size, binary content, secrets and dangerous patterns in one file's bytes.
pub fn check_content(path: &str, bytes: &[u8], limits: &Limits) -> Vec<Finding> {
    let mut findings = Vec::new();
    if bytes.len() > limits.max_file_bytes {
        findings.push(blocking(
            Kind::Size,
            path,
            None,
            format!(
                "{} bytes, more than the {} allowed per file",
                bytes.len(),
                limits.max_file_bytes
            ),
        ));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let line = line_of(bytes, e.valid_up_to());
            findings.push(blocking(
                Kind::Binary,
                path,
                Some(line),
                "binary content: invalid UTF-8".into(),
            ));
            return findings;
        }
    };
    if let Some(offset) =
        text.find(|c: char| c.is_control() && !matches!(c, '\t' | '\n' | '\r' | '\x0c' | '\x1b'))
    {
        let what = if bytes[offset] == 0 {
            "a NUL byte"
        } else {
            "a control character"
        };
        findings.push(blocking(
            Kind::Binary,
            path,
            Some(line_of(bytes, offset)),
            format!("binary content: {what}"),
        ));
        return findings;
    }
    for (index, line) in text.lines().enumerate() {
        let number = u32::try_from(index + 1).unwrap_or(u32::MAX);
        findings.extend(scan_line(path, number, line));
    }
    findings
}

fn check_commands(commands: &[String], limits: &Limits) -> Vec<Finding> {
    let mut findings = Vec::new();
    if commands.len() > limits.max_commands {
        findings.push(blocking(
            Kind::Command,
            COMMANDS_PATH,
            None,
            format!(
                "{} commands, more than the {} allowed",
                commands.len(),
                limits.max_commands
            ),
        ));
    }
    for (index, command) in commands.iter().enumerate() {
        let number = u32::try_from(index + 1).unwrap_or(u32::MAX);
        if command.len() > limits.max_command_bytes {
            findings.push(blocking(
                Kind::Command,
                COMMANDS_PATH,
                Some(number),
                "the command is too long".into(),
            ));
        }
        findings.extend(scan_line(COMMANDS_PATH, number, command));
    }
    findings
}

fn line_of(bytes: &[u8], offset: usize) -> u32 {
    let newlines = bytes[..offset].iter().filter(|b| **b == b'\n').count();
    u32::try_from(newlines + 1).unwrap_or(u32::MAX)
}

/// One pattern the scan looks for.
struct Pattern {
    regex: Regex,
    severity: Severity,
    kind: Kind,
    message: &'static str,
}

fn pattern(regex: &str, severity: Severity, kind: Kind, message: &'static str) -> Pattern {
    Pattern {
        regex: Regex::new(regex).expect("static regex"),
        severity,
        kind,
        message,
    }
}

static PATTERNS: LazyLock<Vec<Pattern>> = LazyLock::new(|| {
    use Kind::{Dangerous, Secret};
    use Severity::{Blocking, Warning};
    vec![
        pattern(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----",
            Blocking,
            Secret,
            "a PEM private key",
        ),
        pattern(
            r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
            Blocking,
            Secret,
            "an AWS access key id",
        ),
        pattern(
            r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})\b",
            Blocking,
            Secret,
            "a GitHub token",
        ),
        pattern(
            r"\bkiln_[0-9a-f]{32}_[A-Za-z0-9_-]{8,}",
            Blocking,
            Secret,
            "a kiln API key",
        ),
        pattern(
            r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
            Blocking,
            Secret,
            "a Slack token",
        ),
        pattern(
            r"\bAIza[0-9A-Za-z_-]{35}\b",
            Blocking,
            Secret,
            "a Google API key",
        ),
        pattern(
            r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{32,}",
            Blocking,
            Secret,
            "an OpenAI-style secret key",
        ),
        pattern(
            r#"(?i)\b(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd)["']?\s*[:=]\s*["'][^"'\s]{16,}["']"#,
            Warning,
            Secret,
            "a credential-like literal assigned in code",
        ),
        pattern(
            r#"\brm\s+(?:-[A-Za-z-]+\s+)*-[A-Za-z]*[rR][A-Za-z]*\s+(?:-[A-Za-z-]+\s+)*["']?(?:/\*?|~/?|\$HOME/?)["']?(?:\s|$|;|&|\|)"#,
            Warning,
            Dangerous,
            "recursive removal of / or the home directory",
        ),
        pattern(
            r"\bshutil\.rmtree\(\s*[\x22']?(?:/|~)[\x22']?\s*\)",
            Warning,
            Dangerous,
            "recursive removal of / or the home directory",
        ),
        pattern(
            r"\b(?:curl|wget)\b[^|\n]*\|\s*(?:sudo\s+)?(?:ba|z|da|k)?sh\b",
            Warning,
            Dangerous,
            "a download piped into a shell",
        ),
        pattern(
            r"\b(?:ba)?sh\s+<\(\s*(?:curl|wget)\b",
            Warning,
            Dangerous,
            "a download piped into a shell",
        ),
        pattern(
            r"/etc/(?:g?shadow|sudoers)\b",
            Warning,
            Dangerous,
            "reads the system's password or sudo files",
        ),
        pattern(
            r":\(\)\s*\{\s*:\s*\|\s*:\s*&\s*\}\s*;\s*:",
            Warning,
            Dangerous,
            "a fork bomb",
        ),
        pattern(
            r"/dev/(?:tcp|udp)/",
            Warning,
            Dangerous,
            "a /dev/tcp network redirection (reverse shell)",
        ),
        pattern(
            r"\bos\.(?:system|popen)\s*\(",
            Warning,
            Dangerous,
            "runs a shell command (os.system/os.popen)",
        ),
        pattern(
            r"\bsubprocess\.\w+\(.*\bshell\s*=\s*True\b",
            Warning,
            Dangerous,
            "runs a shell command (subprocess with shell=True)",
        ),
        pattern(
            r"\bchild_process\b.*\bexec(?:Sync)?\s*\(|\bexecSync\s*\(",
            Warning,
            Dangerous,
            "runs a shell command (child_process.exec)",
        ),
    ]
});

fn scan_line(path: &str, number: u32, line: &str) -> Vec<Finding> {
    PATTERNS
        .iter()
        .filter(|p| p.regex.is_match(line))
        .map(|p| Finding {
            severity: p.severity,
            kind: p.kind,
            path: path.to_string(),
            line: Some(number),
            message: p.message.to_string(),
        })
        .collect()
}
