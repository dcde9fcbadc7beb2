//! The diagnosis parsers on output produced here, by the real toolchains (cc, python3, node,
//! cargo), so a change in a tool's format shows up as a failing test rather than a model
//! staring at a raw log. A test whose tool is not installed says so and passes: the
//! hand-written samples in `diagnose_samples.rs` still cover its format.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use kiln_agent::diagnose::{Diagnosis, Limits, Severity, StepOutput, diagnose, signature};

/// A workspace in a temporary directory: the files, and the map the agent would pass.
struct Workspace {
    dir: tempfile::TempDir,
    files: BTreeMap<String, String>,
}

impl Workspace {
    fn new(files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut map = BTreeMap::new();
        for (path, content) in files {
            let full = dir.path().join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(&full, content).unwrap();
            map.insert(path.to_string(), content.to_string());
        }
        Self { dir, files: map }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `argv` in the workspace and diagnoses its output; None when the tool is missing.
    fn run(&self, argv: &[&str], env: &[(&str, &Path)]) -> Option<Diagnosis> {
        let mut command = Command::new(argv[0]);
        command.args(&argv[1..]).current_dir(self.root());
        for (key, value) in env {
            command.env(key, value);
        }
        let output = match command.output() {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("{} is not installed; skipping this toolchain test", argv[0]);
                return None;
            }
            Err(e) => panic!("running {argv:?}: {e}"),
        };
        assert!(!output.status.success(), "{argv:?} was expected to fail");
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let root = self.root().to_str().unwrap();
        Some(diagnose(
            &StepOutput {
                argv: &argv,
                stdout: &output.stdout,
                stderr: &output.stderr,
                workspace_root: root,
                files: &self.files,
            },
            Limits::default(),
        ))
    }
}

fn context_numbers(diagnosis: &Diagnosis, index: usize) -> Vec<u32> {
    diagnosis.diagnostics[index]
        .context
        .iter()
        .map(|l| l.number)
        .collect()
}

fn assert_bounded(diagnosis: &Diagnosis) {
    let rendered = diagnosis.render();
    assert!(rendered.len() <= Limits::default().max_bytes, "{rendered}");
    assert!(
        !rendered.contains("/tmp/"),
        "absolute paths leak: {rendered}"
    );
}

const BROKEN_C: &str =
    "#include <stdio.h>\n\nint main(void) {\n    int x = \"text\";\n    return y;\n}\n";

#[test]
fn gcc_errors_are_located_with_their_source_lines() {
    let ws = Workspace::new(&[("src/main.c", BROKEN_C)]);
    let Some(d) = ws.run(&["cc", "-c", "src/main.c", "-o", "/dev/null"], &[]) else {
        return;
    };
    let first = &d.diagnostics[0];
    assert_eq!(
        (first.file.as_str(), first.line, first.column),
        ("src/main.c", 5, Some(12))
    );
    assert_eq!(first.severity, Severity::Error);
    assert!(first.message.contains("undeclared"), "{}", first.message);
    // gcc's note about the error is folded into it, not a diagnostic of its own.
    assert!(
        first
            .message
            .contains("\nnote: src/main.c:5: each undeclared identifier"),
        "{}",
        first.message
    );
    assert_eq!(d.diagnostics.len(), 2, "{d:?}");
    assert!(first.in_workspace);
    assert_eq!(context_numbers(&d, 0), vec![3, 4, 5, 6]);
    assert_eq!(first.context[2].text, "    return y;");
    // The warning is kept, after the error.
    let warning = &d.diagnostics[1];
    assert_eq!((warning.line, warning.severity), (4, Severity::Warning));
    let rendered = d.render();
    assert!(rendered.contains("--> src/main.c:5:12"), "{rendered}");
    assert!(rendered.contains(">  5 |     return y;") || rendered.contains("> 5 |     return y;"));
    assert_bounded(&d);
}

const FAILING_SCRIPT: &str = "def add(a, b):\n    return a + b\n\n\ndef main():\n    raise ValueError(\"bad input: \" + str(add(1, 2)))\n\n\nmain()\n";

#[test]
fn a_failed_c_assert_under_make_is_located_at_the_assertion() {
    // The shape of the benchmark's C tasks: `make -s test` builds and runs asserts.
    let test = "#include <assert.h>\n\nint add(int a, int b) { return a - b; }\n\nint main(void) {\n    assert(add(2, 3) == 5);\n    return 0;\n}\n";
    let makefile = "test: t\n\t./t\n\nt: test_calc.c\n\tcc -o t test_calc.c\n";
    let ws = Workspace::new(&[("test_calc.c", test), ("Makefile", makefile)]);
    let Some(d) = ws.run(&["make", "-s", "test"], &[]) else {
        return;
    };
    let first = d
        .diagnostics
        .first()
        .unwrap_or_else(|| panic!("not located: {}", d.render()));
    assert_eq!(
        (first.file.as_str(), first.line),
        ("test_calc.c", 6),
        "{}",
        d.render()
    );
    assert!(
        first.message.contains("add(2, 3) == 5"),
        "{}",
        first.message
    );
    assert!(
        d.render().contains("assert(add(2, 3) == 5);"),
        "the source line is shown: {}",
        d.render()
    );
}

#[test]
fn python_traceback_points_at_the_raising_line() {
    let ws = Workspace::new(&[("app.py", FAILING_SCRIPT)]);
    let Some(d) = ws.run(&["python3", "app.py"], &[]) else {
        return;
    };
    assert_eq!(d.diagnostics.len(), 1, "{d:?}");
    let diag = &d.diagnostics[0];
    assert_eq!((diag.file.as_str(), diag.line), ("app.py", 6));
    assert_eq!(diag.message, "ValueError: bad input: 3");
    assert_eq!(context_numbers(&d, 0), vec![4, 5, 6, 7, 8]);
    assert_bounded(&d);
}

#[test]
fn python_frames_outside_the_workspace_are_not_the_location() {
    // The exception is raised inside the standard library (json); the location must be the
    // workspace line that called it, not json/decoder.py.
    let script = "import json\n\n\ndef load():\n    return json.loads(\"{not json\")\n\n\nload()\n";
    let ws = Workspace::new(&[("load.py", script)]);
    let Some(d) = ws.run(&["python3", "load.py"], &[]) else {
        return;
    };
    let diag = &d.diagnostics[0];
    assert_eq!((diag.file.as_str(), diag.line), ("load.py", 5));
    assert!(
        diag.message.starts_with("json.decoder.JSONDecodeError: "),
        "{}",
        diag.message
    );
}

const MODULE: &str = "def add(a, b):\n    return a + b + 1\n";
const UNITTEST: &str = "import unittest\n\nfrom calc import add\n\n\nclass AddTest(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(1, 2), 3)\n\n\nif __name__ == \"__main__\":\n    unittest.main()\n";

#[test]
fn unittest_failure_names_the_test_and_the_assertion() {
    let ws = Workspace::new(&[("calc.py", MODULE), ("test_calc.py", UNITTEST)]);
    let Some(d) = ws.run(&["python3", "-m", "unittest", "-v"], &[]) else {
        return;
    };
    assert_eq!(d.diagnostics.len(), 1, "{d:?}");
    let diag = &d.diagnostics[0];
    assert_eq!((diag.file.as_str(), diag.line), ("test_calc.py", 8));
    let mut lines = diag.message.lines();
    assert_eq!(lines.next(), Some("AssertionError: 4 != 3"));
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("in test test_add (test_calc.AddTest")
    );
    assert_eq!(
        diag.context
            .iter()
            .find(|l| l.number == 8)
            .unwrap()
            .text
            .trim(),
        "self.assertEqual(add(1, 2), 3)"
    );
    assert_bounded(&d);
}

#[test]
fn python_syntax_error_without_a_traceback_header() {
    let ws = Workspace::new(&[("bad.py", "x = 1\ndef f(:\n    pass\n")]);
    let Some(d) = ws.run(&["python3", "bad.py"], &[]) else {
        return;
    };
    let diag = &d.diagnostics[0];
    assert_eq!((diag.file.as_str(), diag.line), ("bad.py", 2));
    assert!(
        diag.message.starts_with("SyntaxError: "),
        "{}",
        diag.message
    );
}

const THROWING_JS: &str = "function parse(s) {\n  if (!s) {\n    throw new TypeError(\"empty input\");\n  }\n}\n\nparse(\"\");\n";

#[test]
fn node_uncaught_error_uses_the_first_workspace_frame() {
    let ws = Workspace::new(&[("lib/main.js", THROWING_JS)]);
    let Some(d) = ws.run(&["node", "lib/main.js"], &[]) else {
        return;
    };
    assert_eq!(d.diagnostics.len(), 1, "{d:?}");
    let diag = &d.diagnostics[0];
    assert_eq!(
        (diag.file.as_str(), diag.line, diag.column),
        ("lib/main.js", 3, Some(11))
    );
    assert_eq!(diag.message, "TypeError: empty input");
    assert_eq!(context_numbers(&d, 0), vec![1, 2, 3, 4, 5]);
    assert_bounded(&d);
}

#[test]
fn node_assertion_keeps_its_multi_line_message() {
    let script = "const assert = require(\"assert\");\nassert.strictEqual(1 + 1, 3);\n";
    let ws = Workspace::new(&[("t.js", script)]);
    let Some(d) = ws.run(&["node", "t.js"], &[]) else {
        return;
    };
    let diag = &d.diagnostics[0];
    assert_eq!(
        (diag.file.as_str(), diag.line, diag.column),
        ("t.js", 2, Some(8))
    );
    assert!(
        diag.message
            .starts_with("AssertionError [ERR_ASSERTION]: Expected values")
    );
    assert!(diag.message.contains("2 !== 3"), "{}", diag.message);
}

const CARGO_TOML: &str =
    "[package]\nname = \"broken\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n";
const BROKEN_RS: &str = "fn main() {\n    let n = 1;\n    let x: i32 = \"a\";\n    let ok: bool = n;\n    println!(\"{x}{ok}\");\n}\n";

#[test]
fn cargo_json_messages_are_located_with_code_label_and_context() {
    let ws = Workspace::new(&[("Cargo.toml", CARGO_TOML), ("src/main.rs", BROKEN_RS)]);
    let target = ws.root().join("target");
    let Some(d) = ws.run(
        &[
            "cargo",
            "build",
            "--offline",
            "--quiet",
            "--message-format=json",
        ],
        &[("CARGO_TARGET_DIR", &target)],
    ) else {
        return;
    };
    let error = &d.diagnostics[0];
    assert_eq!(
        (error.file.as_str(), error.line, error.column),
        ("src/main.rs", 3, Some(18))
    );
    assert_eq!(error.severity, Severity::Error);
    assert_eq!(error.code.as_deref(), Some("E0308"));
    let mut lines = error.message.lines();
    assert_eq!(lines.next(), Some("mismatched types"));
    assert!(
        error.message.contains("expected `i32`, found `&str`"),
        "{}",
        error.message
    );
    assert_eq!(context_numbers(&d, 0), vec![1, 2, 3, 4, 5]);
    // The second error keeps its own location; the "aborting" summary (no span) is not one.
    assert_eq!(d.diagnostics.len(), 2, "{d:?}");
    assert_eq!(
        (d.diagnostics[1].line, d.diagnostics[1].column),
        (4, Some(20))
    );
    let rendered = d.render();
    assert!(
        rendered.starts_with("error[E0308]: mismatched types\n  --> src/main.rs:3:18\n"),
        "{rendered}"
    );
    assert_bounded(&d);

    // The same failure twice has the same signature, a different one does not.
    let again = ws
        .run(
            &[
                "cargo",
                "build",
                "--offline",
                "--quiet",
                "--message-format=json",
            ],
            &[("CARGO_TARGET_DIR", &target)],
        )
        .unwrap();
    assert_eq!(signature(&d.diagnostics), signature(&again.diagnostics));
    assert_ne!(signature(&d.diagnostics), signature(&d.diagnostics[1..]));
}
