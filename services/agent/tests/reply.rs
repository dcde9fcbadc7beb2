//! The reply parser: every accepted form, and every way a model gets the format wrong.

use kiln_agent::reply::{FileEdit, Format, Problem, Reply, format_text, gbnf, json_schema, parse};

fn file(path: &str, content: &str) -> FileEdit {
    FileEdit {
        path: path.into(),
        content: content.into(),
    }
}

fn paths(reply: &Reply) -> Vec<&str> {
    reply.files.iter().map(|f| f.path.as_str()).collect()
}

const JSON: &str = r#"{"files":[{"path":"calc.py","content":"def add(a, b):\n    return a + b\n"},{"path":"test_calc.py","content":"import unittest\n"}],"commands":["python3 -m unittest"],"notes":"done"}"#;

#[test]
fn bare_json() {
    let reply = parse(JSON);
    assert_eq!(reply.format, Format::Json);
    assert!(reply.is_usable(), "{:?}", reply.problems);
    assert_eq!(
        reply.files[0],
        file("calc.py", "def add(a, b):\n    return a + b\n")
    );
    assert_eq!(paths(&reply), vec!["calc.py", "test_calc.py"]);
    assert_eq!(reply.commands, vec!["python3 -m unittest"]);
    assert_eq!(reply.notes.as_deref(), Some("done"));
}

#[test]
fn json_in_a_fence_with_prose_around_it() {
    let raw = format!(
        "Sure! I used {{braces}} in prose first.\n```json\n{JSON}\n```\nLet me know if {{anything}} else."
    );
    let reply = parse(&raw);
    assert_eq!(reply.format, Format::Json);
    assert!(reply.is_usable(), "{:?}", reply.problems);
    assert_eq!(paths(&reply), vec!["calc.py", "test_calc.py"]);
}

#[test]
fn truncated_json_is_reported_and_yields_no_files() {
    let cut = &JSON[..JSON.len() / 2];
    let reply = parse(&format!("```json\n{cut}"));
    assert_eq!(
        reply.problems,
        vec![Problem::Truncated {
            what: "the JSON object".into()
        }]
    );
    assert!(reply.files.is_empty());
    assert!(!reply.is_usable());
}

#[test]
fn invalid_json_meant_as_the_reply() {
    let reply = parse(r#"{"files": [{"path": "a.py", "content": "x\q"}]}"#);
    assert!(
        matches!(reply.problems.as_slice(), [Problem::InvalidJson { .. }]),
        "{:?}",
        reply.problems
    );
}

#[test]
fn json_fields_of_the_wrong_type() {
    let reply = parse(
        r#"{"files":[{"path":"a.py","content":"ok\n"},{"path":"b.py","content":7},{"content":"x"}],"commands":"make","notes":3}"#,
    );
    assert_eq!(paths(&reply), vec!["a.py"]);
    let details: Vec<String> = reply
        .problems
        .iter()
        .map(|p| match p {
            Problem::Schema { detail } => detail.clone(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        details,
        vec![
            "files[1].content must be a string",
            "files[2].path must be a string",
            "commands must be an array of strings",
            "notes must be a string",
        ]
    );
}

#[test]
fn json_with_an_empty_file_list() {
    let reply = parse(r#"{"files": [], "notes": "nothing to do"}"#);
    assert_eq!(reply.problems, vec![Problem::NoFiles]);
}

#[test]
fn duplicate_paths_are_refused_keeping_the_first_copy() {
    let reply = parse(
        r#"{"files":[{"path":"a.py","content":"1\n"},{"path":"./a.py","content":"2\n"},{"path":"a.py","content":"3\n"},{"path":"b.py","content":""}]}"#,
    );
    assert_eq!(paths(&reply), vec!["a.py", "b.py"]);
    assert_eq!(reply.files[0].content, "1\n");
    assert_eq!(
        reply.problems,
        vec![Problem::DuplicatePath {
            path: "./a.py".into()
        }]
    );
    assert!(!reply.is_usable());

    let text = "=== FILE: a.py ===\n1\n=== END FILE ===\n=== FILE: a.py ===\n2\n=== END FILE ===\n";
    assert_eq!(
        parse(text).problems,
        vec![Problem::DuplicatePath {
            path: "a.py".into()
        }]
    );
}

#[test]
fn text_form_with_prose_commands_notes_and_lenient_markers() {
    let raw = "\
Here are the files.

=== FILE: src/calc.py ===
def add(a, b):

    return a + b
=== END FILE ===
Some prose the model could not resist.
  ==== file: `tests/test_calc.py` ====
```python
import unittest
```
===END FILE===
=== COMMANDS ===
python3 -m unittest

=== END COMMANDS ===
=== NOTES ===
wrote two files
=== END NOTES ===
Thanks!
";
    let reply = parse(raw);
    assert_eq!(reply.format, Format::Text);
    assert!(reply.is_usable(), "{:?}", reply.problems);
    assert_eq!(
        reply.files,
        vec![
            file("src/calc.py", "def add(a, b):\n\n    return a + b\n"),
            // The fence the model wrapped around the content is dropped.
            file("tests/test_calc.py", "import unittest\n"),
        ]
    );
    assert_eq!(reply.commands, vec!["python3 -m unittest"]);
    assert_eq!(reply.notes.as_deref(), Some("wrote two files"));
}

#[test]
fn text_form_wins_over_json_inside_a_file() {
    let raw = "=== FILE: package.json ===\n{\"files\": [{\"path\": \"x\", \"content\": \"y\"}]}\n=== END FILE ===\n";
    let reply = parse(raw);
    assert_eq!(reply.format, Format::Text);
    assert_eq!(paths(&reply), vec!["package.json"]);
}

#[test]
fn crlf_line_endings_are_read() {
    let reply = parse("=== FILE: a.py ===\r\nx = 1\r\n=== END FILE ===\r\n");
    assert_eq!(reply.files, vec![file("a.py", "x = 1\n")]);
}

#[test]
fn truncated_text_block_is_reported_and_left_out() {
    let reply = parse("=== FILE: a.py ===\nx = 1\n=== END FILE ===\n=== FILE: b.py ===\ndef f(");
    assert_eq!(paths(&reply), vec!["a.py"]);
    assert_eq!(
        reply.problems,
        vec![Problem::Truncated {
            what: "the file block for b.py".into()
        }]
    );
    let commands = parse("=== FILE: a.py ===\n=== END FILE ===\n=== COMMANDS ===\nmake");
    assert_eq!(
        commands.problems,
        vec![Problem::Truncated {
            what: "the commands block".into()
        }]
    );
}

#[test]
fn unterminated_block_before_the_next_file() {
    let reply = parse("=== FILE: a.py ===\nx = 1\n=== FILE: b.py ===\ny = 2\n=== END FILE ===\n");
    assert_eq!(paths(&reply), vec!["b.py"]);
    assert_eq!(
        reply.problems,
        vec![Problem::Unterminated {
            path: "a.py".into()
        }]
    );
}

#[test]
fn text_form_without_files() {
    let reply = parse("=== COMMANDS ===\nmake test\n=== END COMMANDS ===\n");
    assert_eq!(reply.format, Format::Text);
    assert_eq!(reply.problems, vec![Problem::NoFiles]);
    assert_eq!(reply.commands, vec!["make test"]);
}

#[test]
fn markdown_fences_with_filenames_as_a_last_resort() {
    let raw = "\
I'll create the module.

**src/calc.py**
```python
def add(a, b):
    return a + b
```

An example of usage (not a file):
```python
add(1, 2)
```

### tests/test_calc.py

```python
import unittest
```

```js title=\"web/app.js\"
console.log(1);
```

`Makefile`:
```
test:
\tpython3 -m unittest
```

package.json
```json
{\"files\": [\"dist\"]}
```
";
    let reply = parse(raw);
    assert_eq!(reply.format, Format::Markdown);
    assert!(reply.is_usable(), "{:?}", reply.problems);
    assert_eq!(
        paths(&reply),
        vec![
            "src/calc.py",
            "tests/test_calc.py",
            "web/app.js",
            "Makefile",
            "package.json"
        ]
    );
    assert_eq!(reply.files[0].content, "def add(a, b):\n    return a + b\n");
    assert_eq!(reply.files[3].content, "test:\n\tpython3 -m unittest\n");
}

#[test]
fn unclosed_markdown_fence_is_truncated() {
    let reply = parse("src/a.py\n```python\nprint(1)\n");
    assert_eq!(
        reply.problems,
        vec![Problem::Truncated {
            what: "the fenced block for src/a.py".into()
        }]
    );
    assert!(reply.files.is_empty());
}

#[test]
fn a_model_that_ignores_the_format() {
    for raw in [
        "",
        "Sure! To add two numbers in Python, define a function that returns a + b.",
        "```python\nprint('no filename anywhere')\n```\n",
        "{\"answer\": 42}",
    ] {
        let reply = parse(raw);
        assert_eq!(reply.format, Format::Unrecognized, "{raw}");
        assert_eq!(reply.problems, vec![Problem::FormatIgnored], "{raw}");
        assert!(reply.files.is_empty());
    }
}

#[test]
fn problems_read_as_instructions_for_the_model() {
    assert!(
        Problem::FormatIgnored
            .to_string()
            .contains("=== FILE: path ===")
    );
    assert!(
        Problem::DuplicatePath {
            path: "a.py".into()
        }
        .to_string()
        .contains("a.py is given more than once")
    );
}

#[test]
fn format_text_round_trips() {
    let files = vec![
        file("src/a.py", "x = 1\n\n== not a marker\n"),
        file(".gitignore", "target/\n"),
        file("empty.txt", ""),
    ];
    let commands = vec!["python3 -m unittest".to_string()];
    let text = format_text(&files, &commands, Some("n"));
    let reply = parse(&text);
    assert!(reply.is_usable(), "{:?}", reply.problems);
    assert_eq!(reply.files, files);
    assert_eq!(reply.commands, commands);
    assert_eq!(reply.notes.as_deref(), Some("n"));
}

#[test]
fn json_schema_requires_files_with_path_and_content() {
    let schema = json_schema();
    assert_eq!(schema["required"], serde_json::json!(["files"]));
    let item = &schema["properties"]["files"]["items"];
    assert_eq!(item["required"], serde_json::json!(["path", "content"]));
    assert_eq!(schema["additionalProperties"], serde_json::json!(false));
}

/// The GBNF grammar, rewritten as a regular expression (its rules do not recurse, so each
/// reference can be inlined), is checked against what the parser reads: every text the grammar
/// admits that we generate parses to the same files, and the grammar forbids what would confuse
/// the parser.
mod grammar {
    use super::*;
    use std::collections::HashMap;

    fn to_regex(grammar: &str) -> regex::Regex {
        let rules: HashMap<&str, &str> = grammar
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let (name, body) = l.split_once(" ::= ").expect("one rule per line");
                (name.trim(), body.trim())
            })
            .collect();
        let pattern = expand("root", &rules, 0);
        regex::Regex::new(&format!("^(?:{pattern})$")).expect("grammar as regex")
    }

    fn expand(rule: &str, rules: &HashMap<&str, &str>, depth: usize) -> String {
        assert!(depth < 16, "recursive grammar");
        let body = rules
            .get(rule)
            .unwrap_or_else(|| panic!("undefined rule {rule}"));
        let chars: Vec<char> = body.chars().collect();
        let mut out = String::new();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '"' => {
                    let mut literal = String::new();
                    i += 1;
                    while chars[i] != '"' {
                        if chars[i] == '\\' {
                            i += 1;
                            literal.push(match chars[i] {
                                'n' => '\n',
                                c => c,
                            });
                        } else {
                            literal.push(chars[i]);
                        }
                        i += 1;
                    }
                    out.push_str(&format!("(?:{})", regex::escape(&literal)));
                    i += 1;
                }
                '[' => {
                    let end = i + chars[i..].iter().position(|c| *c == ']').unwrap();
                    out.extend(&chars[i..=end]);
                    i = end + 1;
                }
                c if c.is_ascii_alphabetic() => {
                    let end = i + chars[i..]
                        .iter()
                        .position(|c| !c.is_ascii_alphanumeric() && *c != '-')
                        .unwrap_or(chars.len() - i);
                    let name: String = chars[i..end].iter().collect();
                    out.push_str(&format!("(?:{})", expand(&name, rules, depth + 1)));
                    i = end;
                }
                ' ' => i += 1,
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        out
    }

    #[test]
    fn generated_text_matches_the_grammar_and_parses_back() {
        let re = to_regex(gbnf());
        let files = vec![
            file("src/a.py", "x = 1\n\n= one\n== two\n"),
            file(".gitignore", "target/\n"),
            file("empty.txt", ""),
        ];
        let text = format_text(&files, &["make test".to_string()], Some("done"));
        assert!(re.is_match(&text), "{text}");
        assert_eq!(parse(&text).files, files);
    }

    #[test]
    fn the_grammar_forbids_fake_markers_escapes_and_prose() {
        let re = to_regex(gbnf());
        let accepts = |s: &str| re.is_match(s);
        assert!(accepts("=== FILE: a.py ===\n=== END FILE ===\n"));
        assert!(!accepts(
            "=== FILE: a.py ===\n=== FILE: b.py ===\n=== END FILE ===\n"
        ));
        assert!(!accepts("=== FILE: ../a.py ===\nx\n=== END FILE ===\n"));
        assert!(!accepts("=== FILE: /etc/a ===\nx\n=== END FILE ===\n"));
        assert!(!accepts("=== FILE: a b.py ===\nx\n=== END FILE ===\n"));
        assert!(!accepts(
            "Here you go:\n=== FILE: a.py ===\n=== END FILE ===\n"
        ));
        assert!(!accepts("=== FILE: a.py ===\nx\n"));
    }
}

#[test]
fn a_fence_with_blank_lines_around_it_is_not_part_of_the_file() {
    // What Qwen2.5-Coder 1.5B wrote under the text grammar in a real run.
    let raw = "=== FILE: calc.py ===\n```python\ndef add(a, b):\n    return a + b\n```\n\n=== END FILE ===\n";
    let reply = parse(raw);
    assert!(reply.is_usable(), "{:?}", reply.problems);
    assert_eq!(reply.files[0].content, "def add(a, b):\n    return a + b\n");
}
