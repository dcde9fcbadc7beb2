//! The format in which the model returns files, and a defensive parser for it.
//!
//! # Structured form (preferred)
//!
//! Where the provider can constrain output (OpenAI-style `response_format` with a JSON schema,
//! llama.cpp's `json_schema`, Ollama's `format`), the agent sends [`json_schema`] and the model
//! answers with one JSON object:
//!
//! ```json
//! {"files": [{"path": "src/calc.py", "content": "def add(a, b):\n    return a + b\n"}],
//!  "commands": ["python3 -m unittest"],
//!  "notes": "added add()"}
//! ```
//!
//! `files` is required (each entry a workspace-relative `path` and the whole new `content`);
//! `commands` (command lines the model proposes, checked later against the build policy) and
//! `notes` are optional. Other keys are ignored.
//!
//! # Text form (providers that cannot constrain output)
//!
//! The exact grammar (EBNF; `NL` is `"\n"`, a `"\r\n"` is read as `NL`):
//!
//! ```text
//! reply          = { prose-line | file-block | commands-block | notes-block } ;
//! file-block     = "=== FILE: " path " ===" NL { content-line } "=== END FILE ===" NL ;
//! commands-block = "=== COMMANDS ===" NL { command-line } "=== END COMMANDS ===" NL ;
//! notes-block    = "=== NOTES ===" NL { content-line } "=== END NOTES ===" NL ;
//! content-line   = any line that is not a marker line ;
//! ```
//!
//! A file's content is its content lines, each followed by `"\n"` (so a file in this form
//! always ends with a newline, or is empty). Marker lines are recognized after trimming
//! surrounding whitespace, with three or more `=` on each side and the keyword in any case, so a
//! model that writes `==== file: a.py ====` is still understood. Prose outside blocks is
//! ignored. If a file block's content is itself wrapped in a markdown fence (first line starts
//! with three backticks, last line is exactly three backticks), the fence lines are dropped:
//! models add them out of habit. [`gbnf`] is a llama.cpp grammar for the strict subset
//! (files, then optional commands and notes, no prose, paths of `[A-Za-z0-9_.+@-]` segments,
//! no content line starting with `===`); everything it generates parses to the same files.
//!
//! # What the parser accepts, in order
//!
//! 1. The text form, when any line is a block marker (checked first because a file's content,
//!    such as a `package.json`, may itself be JSON with a `files` key).
//! 2. The JSON object, anywhere in the reply: bare, inside a markdown fence, or surrounded by
//!    prose. An object counts as the reply when its `files` is an array of objects.
//! 3. As a last resort, markdown fenced blocks preceded by a filename line (`**src/a.py**`,
//!    `### src/a.py`, `` `src/a.py`: ``, `File: src/a.py`) or naming the file in the fence's
//!    info string (```` ```python title="src/a.py" ````, ```` ```src/a.py ````).
//!
//! # Problems
//!
//! Every defect is a [`Problem`], reported precisely so the agent can tell the model what to
//! repeat: output cut off inside a block or the JSON object ([`Problem::Truncated`]), a file
//! block not closed before the next one ([`Problem::Unterminated`]), the same path twice
//! ([`Problem::DuplicatePath`]: refused, because which copy the model meant is unknowable),
//! a recognized format with no files ([`Problem::NoFiles`]), JSON of the wrong shape
//! ([`Problem::Schema`], [`Problem::InvalidJson`]), and a reply in none of the formats
//! ([`Problem::FormatIgnored`]). A reply with any problem must not be written
//! ([`Reply::is_usable`]); a truncated or unterminated file is never in `files`.

mod blocks;
mod json;
mod markdown;

use std::collections::HashSet;
use std::fmt;

/// One file the model wants written, with its whole new content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEdit {
    /// The path as the model wrote it (checked by the guard, not here).
    pub path: String,
    /// The file's complete content.
    pub content: String,
}

/// Which form the reply was read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The JSON object.
    Json,
    /// `=== FILE: … ===` blocks.
    Text,
    /// Markdown fences with filenames (last resort).
    Markdown,
    /// None of them.
    Unrecognized,
}

/// A defect of a reply. Any problem makes the reply unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The output ends inside `what` (a file block, the commands block, the JSON object).
    Truncated {
        /// What was left open, e.g. "the file block for src/a.py".
        what: String,
    },
    /// A file block was followed by another file's marker before its end marker.
    Unterminated {
        /// The block left open.
        path: String,
    },
    /// The same path appeared more than once (compared after dropping `./` and empty segments).
    DuplicatePath {
        /// The repeated path, as first written.
        path: String,
    },
    /// The format was followed but no file was given.
    NoFiles,
    /// The JSON reply had a field of the wrong type.
    Schema {
        /// Which field and what was wrong.
        detail: String,
    },
    /// Something that starts like the JSON reply is not valid JSON.
    InvalidJson {
        /// The JSON parser's message.
        detail: String,
    },
    /// The reply is in none of the accepted formats.
    FormatIgnored,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Truncated { what } => {
                write!(f, "the reply ends inside {what}: it was cut off")
            }
            Problem::Unterminated { path } => write!(
                f,
                "the block for {path} has no `=== END FILE ===` line before the next file"
            ),
            Problem::DuplicatePath { path } => {
                write!(f, "{path} is given more than once; give each file once")
            }
            Problem::NoFiles => write!(f, "the reply contains no files"),
            Problem::Schema { detail } => write!(f, "the JSON reply is malformed: {detail}"),
            Problem::InvalidJson { detail } => {
                write!(f, "the JSON reply is not valid JSON: {detail}")
            }
            Problem::FormatIgnored => write!(
                f,
                "the reply is not in the required format (a JSON object with \"files\", or \
                 `=== FILE: path ===` … `=== END FILE ===` blocks)"
            ),
        }
    }
}

/// A parsed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Files to write, in the order given; complete blocks only, first copy of a duplicate.
    pub files: Vec<FileEdit>,
    /// Command lines the model proposes, for the policy check before anything runs.
    pub commands: Vec<String>,
    /// Free text the model attached.
    pub notes: Option<String>,
    /// Every defect found; empty for a usable reply.
    pub problems: Vec<Problem>,
    /// The form the reply was read in.
    pub format: Format,
}

impl Reply {
    /// True when the reply may go on to VALIDATE: no problem at all.
    pub fn is_usable(&self) -> bool {
        self.problems.is_empty()
    }

    fn empty(format: Format) -> Self {
        Self {
            files: Vec::new(),
            commands: Vec::new(),
            notes: None,
            problems: Vec::new(),
            format,
        }
    }
}

/// Parses a model's reply in any accepted form (see the module documentation).
pub fn parse(raw: &str) -> Reply {
    let raw = raw.replace("\r\n", "\n");
    let mut reply = if blocks::has_marker(&raw) {
        blocks::parse(&raw)
    } else {
        match json::find(&raw) {
            json::Found::Reply(reply) => reply,
            json::Found::Problem(problem) => {
                let mut reply = Reply::empty(Format::Json);
                reply.problems.push(problem);
                return reply;
            }
            json::Found::Nothing => markdown::parse(&raw),
        }
    };
    if reply.format == Format::Unrecognized {
        reply.problems.push(Problem::FormatIgnored);
        return reply;
    }
    drop_duplicates(&mut reply);
    if reply.files.is_empty() && !reply.problems.iter().any(is_truncation) {
        reply.problems.push(Problem::NoFiles);
    }
    reply
}

fn is_truncation(problem: &Problem) -> bool {
    matches!(
        problem,
        Problem::Truncated { .. } | Problem::Unterminated { .. }
    )
}

/// Keeps the first copy of each path and reports every repeated one once.
fn drop_duplicates(reply: &mut Reply) {
    let mut seen = HashSet::new();
    let mut reported = HashSet::new();
    let mut problems = Vec::new();
    reply.files.retain(|file| {
        let key = comparable(&file.path);
        if seen.insert(key.clone()) {
            return true;
        }
        if reported.insert(key) {
            problems.push(Problem::DuplicatePath {
                path: file.path.clone(),
            });
        }
        false
    });
    reply.problems.extend(problems);
}

/// The path as compared for duplicates: `./a//b` and `a/b` are the same file.
fn comparable(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// The JSON schema of the structured form, for `response_format` / `json_schema` / `format`.
/// `commands` and `notes` are optional, so send it with `strict: false` to OpenAI (its strict
/// mode requires every property).
pub fn json_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "files": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "path": {"type": "string", "minLength": 1},
                        "content": {"type": "string"}
                    },
                    "required": ["path", "content"],
                    "additionalProperties": false
                }
            },
            "commands": {"type": "array", "items": {"type": "string"}},
            "notes": {"type": "string"}
        },
        "required": ["files"],
        "additionalProperties": false
    })
}

/// A llama.cpp GBNF grammar for the strict text form: one or more file blocks, then an optional
/// commands block and an optional notes block, nothing else. Paths are `/`-separated segments
/// of `[A-Za-z0-9_.+@-]` that do not start with two dots; content lines may not start with
/// `===` (so a constrained model cannot write a fake marker). One rule per line.
pub fn gbnf() -> &'static str {
    concat!(
        "root ::= file+ commands? notes?\n",
        "file ::= \"=== FILE: \" path \" ===\\n\" line* \"=== END FILE ===\\n\"\n",
        "commands ::= \"=== COMMANDS ===\\n\" command* \"=== END COMMANDS ===\\n\"\n",
        "notes ::= \"=== NOTES ===\\n\" line* \"=== END NOTES ===\\n\"\n",
        "path ::= segment (\"/\" segment)*\n",
        "segment ::= \".\"? [A-Za-z0-9_+@-] [A-Za-z0-9_.+@-]*\n",
        "line ::= ([^=\\n] [^\\n]* | \"=\" ([^=\\n] [^\\n]*)? | \"==\" ([^=\\n] [^\\n]*)?)? \"\\n\"\n",
        "command ::= [^=\\n] [^\\n]* \"\\n\"\n",
    )
}

/// What the prompt tells a model that cannot be constrained, so it writes the text form.
pub const TEXT_FORMAT_INSTRUCTIONS: &str = "\
Return every file you create or change in full, each in a block exactly like this:
=== FILE: path/relative/to/workspace.ext ===
the complete file content
=== END FILE ===
Optionally list commands to run, one per line, in a block:
=== COMMANDS ===
python3 -m unittest
=== END COMMANDS ===
Do not use markdown fences, neither around the blocks nor inside them: a block holds \
exactly the file's text. Give each file once.";

/// Renders files, commands and notes in the strict text form (what [`gbnf`] generates). A
/// content without a final newline gets one: the text form cannot express its absence.
pub fn format_text(files: &[FileEdit], commands: &[String], notes: Option<&str>) -> String {
    let mut out = String::new();
    for file in files {
        out.push_str(&format!("=== FILE: {} ===\n", file.path));
        out.push_str(&file.content);
        if !file.content.is_empty() && !file.content.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("=== END FILE ===\n");
    }
    if !commands.is_empty() {
        out.push_str("=== COMMANDS ===\n");
        for command in commands {
            out.push_str(command);
            out.push('\n');
        }
        out.push_str("=== END COMMANDS ===\n");
    }
    if let Some(notes) = notes {
        out.push_str("=== NOTES ===\n");
        out.push_str(notes);
        if !notes.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("=== END NOTES ===\n");
    }
    out
}
