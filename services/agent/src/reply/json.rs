//! Finding the JSON reply in a model's output: bare, fenced or surrounded by prose.

use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value};

use super::{FileEdit, Format, Problem, Reply};

/// Opening braces tried before giving up: a reply with more prose objects than this in front of
/// its JSON is not following the format.
const MAX_CANDIDATES: usize = 64;

// An object whose first key is one of the reply's: if it does not parse, it was meant as the reply.
static REPLY_START: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"^\{\s*"(?:files|commands|notes)"\s*:"#).expect("static regex"));

pub(super) enum Found {
    Reply(Reply),
    Problem(Problem),
    Nothing,
}

pub(super) fn find(raw: &str) -> Found {
    let mut invalid = None;
    for (position, _) in raw.match_indices('{').take(MAX_CANDIDATES) {
        let candidate = &raw[position..];
        let meant_as_reply = REPLY_START.is_match(candidate);
        let mut values = serde_json::Deserializer::from_str(candidate).into_iter::<Value>();
        match values.next() {
            Some(Ok(Value::Object(object))) if is_reply(&object) => {
                return Found::Reply(from_object(object));
            }
            Some(Err(e)) if meant_as_reply && e.is_eof() => {
                return Found::Problem(Problem::Truncated {
                    what: "the JSON object".into(),
                });
            }
            Some(Err(e)) if meant_as_reply && invalid.is_none() => {
                invalid = Some(Problem::InvalidJson {
                    detail: e.to_string(),
                });
            }
            _ => {}
        }
    }
    invalid.map_or(Found::Nothing, Found::Problem)
}

/// The reply object: `files` is an array of objects (a `package.json` with `"files": ["dist"]`
/// is not a reply).
fn is_reply(object: &Map<String, Value>) -> bool {
    object
        .get("files")
        .and_then(Value::as_array)
        .is_some_and(|files| files.iter().all(Value::is_object))
}

fn from_object(object: Map<String, Value>) -> Reply {
    let mut reply = Reply::empty(Format::Json);
    let files = object.get("files").and_then(Value::as_array);
    for (i, entry) in files.into_iter().flatten().enumerate() {
        let path = entry.get("path").and_then(Value::as_str);
        let content = entry.get("content").and_then(Value::as_str);
        match (path, content) {
            (Some(path), Some(content)) => reply.files.push(FileEdit {
                path: path.to_string(),
                content: content.to_string(),
            }),
            (None, _) => reply.problems.push(Problem::Schema {
                detail: format!("files[{i}].path must be a string"),
            }),
            (_, None) => reply.problems.push(Problem::Schema {
                detail: format!("files[{i}].content must be a string"),
            }),
        }
    }
    match object.get("commands") {
        None | Some(Value::Null) => {}
        Some(Value::Array(commands)) => {
            for (i, command) in commands.iter().enumerate() {
                match command.as_str() {
                    Some(command) => reply.commands.push(command.to_string()),
                    None => reply.problems.push(Problem::Schema {
                        detail: format!("commands[{i}] must be a string"),
                    }),
                }
            }
        }
        Some(_) => reply.problems.push(Problem::Schema {
            detail: "commands must be an array of strings".into(),
        }),
    }
    match object.get("notes") {
        None | Some(Value::Null) => {}
        Some(Value::String(notes)) => reply.notes = Some(notes.clone()),
        Some(_) => reply.problems.push(Problem::Schema {
            detail: "notes must be a string".into(),
        }),
    }
    reply
}
