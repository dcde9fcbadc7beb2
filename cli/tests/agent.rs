//! `kiln agent`: argument errors caught before anything is sent, and (against a live
//! suite with a scripted model) what a person or a script sees of a task.

mod common;
#[path = "../../libs/llm/tests/common/mod.rs"]
mod fake_llm;

use std::process::Output;

use common::{Cli, Offline, Suite};
use fake_llm::{FakeProvider, Reply};
use serde_json::json;

fn offline(args: &[&str]) -> Output {
    let config = tempfile::tempdir().expect("tempdir");
    Offline
        .command(args)
        .env("KILN_CONFIG_DIR", config.path())
        .env_remove("KILN_TOKEN")
        .output()
        .expect("kiln runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_needs_a_prompt_and_refuses_an_empty_one() {
    let missing = offline(&["agent", "run"]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("<PROMPT>"),
        "{}",
        stderr(&missing)
    );

    let empty = offline(&["agent", "run", "  "]);
    assert_eq!(empty.status.code(), Some(1));
    assert!(
        stderr(&empty).starts_with("kiln: the prompt is empty"),
        "{}",
        stderr(&empty)
    );
}

#[test]
fn malformed_budgets_and_labels_are_named() {
    for (args, names) in [
        (&["agent", "run", "p", "--timeout", "5x"][..], "--timeout"),
        (
            &["agent", "run", "p", "--max-iterations", "many"][..],
            "--max-iterations",
        ),
        (
            &["agent", "run", "p", "--max-tokens", "lots"][..],
            "--max-tokens",
        ),
        (
            &["agent", "run", "p", "--label", "novalue"][..],
            "is not key=value",
        ),
        (&["agent", "list", "--label", "x"][..], "is not key=value"),
        (&["agent", "list", "--limit", "lots"][..], "--limit"),
    ] {
        let output = offline(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(names),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn an_unknown_phase_lists_the_real_ones() {
    let output = offline(&["agent", "list", "--phase", "green"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("unknown phase \"green\""), "{err}");
    assert!(err.contains("DONE") && err.contains("CANCELLED"), "{err}");
}

#[test]
fn help_documents_the_exit_codes() {
    for command in ["run", "watch"] {
        let output = offline(&["agent", command, "--help"]);
        assert!(output.status.success());
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(
            help.contains("0 when the task ends DONE")
                && help.contains("1 when it ends FAILED")
                && help.contains("130 when it ends CANCELLED"),
            "{help}"
        );
    }
}

#[test]
fn no_server_is_one_line_with_a_hint() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let output = Offline
        .command(&["--endpoint", "https://127.0.0.1:1", "agent", "models"])
        .env("KILN_TOKEN", "kiln_not_a_real_key")
        .output()
        .expect("kiln runs");
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.starts_with("kiln: cannot reach kiln at https://127.0.0.1:1"),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");
}

// ---- against a live `kiln up` whose agent talks to the scripted model server ----

const MODEL: &str = "qwen-test";
const GOOD_CALC: &str = "def add(a, b):\n    return a + b\n";
const BAD_CALC: &str = "def add(a, b):\n    return a - b\n";
const TEST_CALC: &str = "import unittest\nfrom calc import add\n\n\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n\n\nif __name__ == '__main__':\n    unittest.main()\n";
const PROMPT: &str = "Write calc.py with add(a, b) and unittest tests";

/// The scripted model server, on a runtime of its own that lives as long as it.
struct Model {
    llm: FakeProvider,
    _runtime: tokio::runtime::Runtime,
}

impl Model {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let llm = runtime.block_on(FakeProvider::start());
        llm.always(
            "/v1/models",
            Reply::json(
                200,
                &json!({"data": [{"id": MODEL}, {"id": "other-model"}]}),
            ),
        );
        Self {
            llm,
            _runtime: runtime,
        }
    }

    /// Queues one streamed answer, in a few deltas as a real server streams.
    fn answer(&self, text: &str) {
        let chunks: Vec<String> = text
            .as_bytes()
            .chunks(40)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        self.llm.push(
            "/v1/chat/completions",
            Reply::openai_stream(&refs, "stop", Some((100, 50))),
        );
    }

    fn plan(&self) {
        self.answer(
            r#"{"summary": "a calc module with tests", "files": ["calc.py", "test_calc.py"]}"#,
        );
    }
}

fn files(files: &[(&str, &str)]) -> String {
    files
        .iter()
        .map(|(path, content)| format!("=== FILE: {path} ===\n{content}=== END FILE ===\n"))
        .collect()
}

fn suite_with(llm_url: &str) -> Suite {
    Suite::start_with(&["--llm-url", llm_url])
}

/// The value after `workspace ` in the result's summary line.
fn workspace_of(out: &str) -> String {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix("workspace "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no workspace in {out}"))
        .to_owned()
}

#[test]
fn a_task_streams_its_phases_ends_green_and_its_files_download() {
    let model = Model::start();
    model.plan();
    model.answer(&files(&[
        ("calc.py", GOOD_CALC),
        ("test_calc.py", TEST_CALC),
    ]));
    let suite = suite_with(&model.llm.url());
    let cli = Cli::new(&suite);
    cli.login_admin();

    let output = cli.run(
        &[
            "agent",
            "run",
            PROMPT,
            "--toolchain",
            "python",
            "--label",
            "e2e=1",
        ],
        "",
    );
    let (out, err) = (text(&output.stdout), stderr(&output));
    assert_eq!(output.status.code(), Some(0), "{out}\n{err}");
    let task_id = err
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("task "))
        .unwrap_or_else(|| panic!("the task id first: {err}"))
        .to_owned();
    for phase in [
        "▸ ANALYZE",
        "▸ PLAN",
        "▸ GENERATE",
        "▸ VALIDATE",
        "▸ BUILD",
        "▸ DONE",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(phase)),
            "{phase} in {out}"
        );
    }
    assert!(out.contains("  wrote calc.py  "), "{out}");
    assert!(out.contains("+2 −0  new"), "{out}");
    assert!(
        out.contains("▶ python3 -m unittest"),
        "the build's step: {out}"
    );
    assert!(
        err.contains("OK"),
        "unittest reports on the build's stderr: {err}"
    );
    assert!(
        out.contains("  · model call 1 (PLAN): 100 prompt + 50 completion tokens"),
        "{out}"
    );
    assert!(out.contains("task DONE"), "{out}");
    assert!(!out.contains('\x1b'), "no colour into a pipe");

    let workspace = workspace_of(&out);
    let copy = tempfile::tempdir().expect("tempdir");
    let dest = copy.path().join("out");
    cli.ok(&[
        "workspace",
        "download",
        &workspace,
        "--out",
        dest.to_str().expect("utf-8"),
    ]);
    assert_eq!(common::read(&dest.join("calc.py")), GOOD_CALC);

    let task: serde_json::Value =
        serde_json::from_str(&cli.ok(&["agent", "get", &task_id, "-o", "json"])).expect("json");
    assert_eq!(task["id"], task_id.as_str());
    assert_eq!(task["phase"], "DONE");
    assert_eq!(task["toolchain"], "python");
    assert_eq!(task["workspace_id"], workspace.as_str());
    assert_eq!(task["usage"]["model_calls"], 2);
    assert_eq!(task["labels"]["e2e"], "1");
    assert_eq!(task["build_ids"].as_array().map(Vec::len), Some(1));

    let listed: serde_json::Value = serde_json::from_str(&cli.ok(&[
        "agent", "list", "--phase", "done", "--label", "e2e=1", "-o", "json",
    ]))
    .expect("json");
    assert_eq!(
        listed["tasks"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    assert_eq!(listed["tasks"][0]["id"], task_id.as_str());
    let none: serde_json::Value =
        serde_json::from_str(&cli.ok(&["agent", "list", "--phase", "failed", "-o", "json"]))
            .expect("json");
    assert_eq!(none, json!({"tasks": [], "next_page_token": ""}));

    // The whole log again, as a script reads it.
    let replay = cli.run(
        &["agent", "watch", &task_id, "--from-start", "-o", "json"],
        "",
    );
    assert_eq!(replay.status.code(), Some(0), "{}", stderr(&replay));
    let events: Vec<serde_json::Value> = text(&replay.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    let last = events.last().expect("events");
    assert_eq!(last["type"], "result");
    assert_eq!(last["phase"], "DONE");
    assert_eq!(last["usage"]["prompt_tokens"], 200);
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "usage" && e["duration_ms"].is_number())
    );
}

#[test]
fn a_model_that_never_fixes_the_error_ends_1() {
    let model = Model::start();
    model.plan();
    let bad = files(&[("calc.py", BAD_CALC), ("test_calc.py", TEST_CALC)]);
    model.answer(&bad);
    model.answer(&bad);
    model.answer(&bad);
    let suite = suite_with(&model.llm.url());
    let cli = Cli::new(&suite);
    cli.login_admin();
    let output = cli.run(
        &[
            "agent",
            "run",
            PROMPT,
            "--toolchain",
            "python",
            "--max-iterations",
            "2",
        ],
        "",
    );
    let out = text(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{out}\n{}", stderr(&output));
    assert!(
        out.contains("task FAILED (STUCK)") || out.contains("task FAILED (MAX_ITERATIONS)"),
        "{out}"
    );
    assert!(out.contains("▸ FIX"), "{out}");
}

#[test]
fn models_lists_the_providers_models_with_the_default_marked() {
    let model = Model::start();
    let suite = suite_with(&model.llm.url());
    let cli = Cli::new(&suite);
    cli.login_admin();
    let models: serde_json::Value =
        serde_json::from_str(&cli.ok(&["agent", "models", "-o", "json"])).expect("json");
    let names: Vec<&str> = models["models"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| m["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["other-model", MODEL], "sorted by name");
    // Which one is the default is the server's choice; the CLI marks whichever it is.
    let default = models["default_model"].as_str().expect("a default");
    assert!(names.contains(&default), "{models}");

    let out = cli.ok(&["agent", "models"]);
    for name in names {
        let mark = if name == default { "* " } else { "  " };
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{mark}{name} "))),
            "{name}: {out}"
        );
    }
    assert!(
        out.contains(&format!(
            "provider: OPENAI_COMPATIBLE at {}",
            model.llm.url()
        )),
        "{out}"
    );
}

#[test]
fn without_a_provider_the_error_says_how_to_get_one() {
    // Nothing listens on port 1 of loopback: the provider is unreachable at once.
    let suite = suite_with("http://127.0.0.1:1");
    let cli = Cli::new(&suite);
    cli.login_admin();
    for args in [&["agent", "run", PROMPT][..], &["agent", "models"][..]] {
        let output = cli.run(args, "");
        let err = stderr(&output);
        assert_ne!(output.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.contains("(PROVIDER_UNAVAILABLE)"), "{args:?}: {err}");
        assert!(err.contains("127.0.0.1:1"), "the URL tried: {err}");
        assert!(
            err.contains(
                "hint: start a model with `make llm`, or set [agent.provider] in kiln.toml"
            ),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn ctrl_c_cancels_a_running_task_and_exits_130() {
    use std::io::{BufRead, BufReader};
    let model = Model::start();
    // The model never answers: the task sits in its first model call until cancelled.
    model.llm.push("/v1/chat/completions", Reply::silent());
    let suite = suite_with(&model.llm.url());
    let cli = Cli::new(&suite);
    cli.login_admin();
    let mut child = cli
        .command(&["agent", "run", PROMPT, "--toolchain", "python"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kiln starts");
    let mut stderr_lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let first = stderr_lines.next().expect("a first line").expect("utf-8");
    let task_id = first
        .strip_prefix("task ")
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();
    // SIGINT to the kiln process this test started, as Ctrl-C on its terminal would.
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let rest: Vec<String> = stderr_lines.map_while(Result::ok).collect();
    let output = child.wait_with_output().expect("kiln exits");
    assert_eq!(output.status.code(), Some(130), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.starts_with(&format!("cancelling task {task_id}"))),
        "{rest:?}"
    );
    let out = text(&output.stdout);
    assert!(out.contains("task CANCELLED (CANCELLED)"), "{out}");
    let task: serde_json::Value =
        serde_json::from_str(&cli.ok(&["agent", "get", &task_id, "-o", "json"])).expect("json");
    assert_eq!(task["phase"], "CANCELLED");
}
