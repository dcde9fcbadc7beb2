//! What the model is told in each phase. Prompts are short and concrete: a small local
//! model follows a tight brief better than a long one, and every token costs time.

use std::collections::BTreeMap;

use kiln_llm::{Message, OutputFormat, Provider};

use crate::reply;
use crate::task::{StepSpec, TaskRecord};
use crate::toolchain::Toolchain;

/// At most this much of the existing files goes into a prompt.
const MAX_FILES_IN_PROMPT: usize = 48 * 1024;

/// How the model is asked to give its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyForm {
    /// The strict text blocks, enforced by a GBNF grammar (llama.cpp's server): code is
    /// written verbatim, with no JSON escaping for a small model to get wrong.
    GrammarText,
    /// The JSON object, enforced by a JSON schema (OpenAI, Ollama, vLLM).
    Json,
    /// The text blocks, asked for in words only (a provider that constrains nothing).
    PlainText,
}

impl ReplyForm {
    pub fn choose(provider: &dyn Provider) -> Self {
        if provider.supports(&OutputFormat::Grammar(String::new())) {
            Self::GrammarText
        } else if provider.supports(&OutputFormat::JsonSchema(serde_json::Value::Null)) {
            Self::Json
        } else {
            Self::PlainText
        }
    }

    pub fn output(self) -> Option<OutputFormat> {
        match self {
            Self::GrammarText => Some(OutputFormat::Grammar(reply::gbnf().to_owned())),
            Self::Json => Some(OutputFormat::JsonSchema(reply::json_schema())),
            Self::PlainText => None,
        }
    }

    fn instructions(self) -> &'static str {
        match self {
            Self::Json => {
                "Answer with one JSON object: {\"files\": [{\"path\": \"relative/path\", \
                 \"content\": \"the whole file\"}], \"commands\": [], \"notes\": \"\"}. Give \
                 every file you create or change in full, each once."
            }
            Self::GrammarText | Self::PlainText => reply::TEXT_FORMAT_INSTRUCTIONS,
        }
    }
}

fn steps_text(steps: &[StepSpec]) -> String {
    steps
        .iter()
        .map(|s| format!("  {}", s.display()))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn system(task: &TaskRecord, toolchain: &Toolchain, form: ReplyForm) -> Message {
    let commands = if task.steps_fixed {
        "The build commands are fixed; do not propose commands."
    } else {
        "You may propose build commands (programs only, no shell syntax); otherwise the \
         ones above are used."
    };
    Message::system(format!(
        "You are a careful programmer. You write small, complete, working projects. The \
         files you return are written to a workspace and built in a sandbox with no \
         network by running, in order:\n{}\n{commands}\nToolchain: {}. {}\n{}",
        steps_text(&task.steps),
        toolchain.name,
        toolchain.conventions,
        form.instructions()
    ))
}

fn files_text(files: &BTreeMap<String, String>) -> String {
    if files.is_empty() {
        return "The workspace is empty.\n".to_owned();
    }
    let mut out = String::from("The workspace's files:\n");
    for (path, content) in files {
        if out.len() + content.len() > MAX_FILES_IN_PROMPT {
            out.push_str(&format!("(file {path} not shown: the prompt is full)\n"));
            continue;
        }
        out.push_str(&format!("=== FILE: {path} ===\n{content}"));
        if !content.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("=== END FILE ===\n");
    }
    out
}

/// PLAN: a short plan as a small JSON object.
pub fn plan(task: &TaskRecord) -> Vec<Message> {
    vec![
        Message::system(
            "You plan small programming tasks. Answer with one JSON object: {\"summary\": \
             \"one or two sentences\", \"files\": [\"paths to write\"]}.",
        ),
        Message::user(format!(
            "Task: {}\n{}Plan the files to write.",
            task.prompt,
            files_text(&task.files)
        )),
    ]
}

pub fn plan_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "summary": {"type": "string"},
            "files": {"type": "array", "items": {"type": "string"}, "maxItems": 16}
        },
        "required": ["summary", "files"],
        "additionalProperties": false
    })
}

/// GENERATE: write the files.
pub fn generate(task: &TaskRecord, toolchain: &Toolchain, form: ReplyForm) -> Vec<Message> {
    let plan = if task.plan.is_empty() {
        String::new()
    } else {
        format!("Plan: {}\n", task.plan)
    };
    vec![
        system(task, toolchain, form),
        Message::user(format!(
            "Task: {}\n{plan}{}Write the files.",
            task.prompt,
            files_text(&task.files)
        )),
    ]
}

/// FIX: the current files and what went wrong.
pub fn fix(task: &TaskRecord, toolchain: &Toolchain, form: ReplyForm) -> Vec<Message> {
    vec![
        system(task, toolchain, form),
        Message::user(format!(
            "Task: {}\n{}The build failed:\n{}\nFix the problem. Return every file you \
             change, in full.",
            task.prompt,
            files_text(&task.files),
            task.feedback
        )),
    ]
}
