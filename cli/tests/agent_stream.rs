//! `kiln agent` against a scripted AgentService on 127.0.0.1 (tests/fake_agent): what a
//! person or a script sees of a task's stream, and what the CLI does when the stream is
//! cut, when Ctrl-C comes, and when the server refuses. The real service end to end is in
//! tests/agent.rs.

mod fake_agent;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use fake_agent::{FakeAgent, Script, TASK_ID, event, phase, result};
use kiln_proto::agent as pb;
use kiln_proto::agent::task_event::Event;
use kiln_proto::build as build_pb;

fn kiln(fake: &FakeAgent, config: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args(args)
        .env("KILN_ENDPOINT", fake.endpoint())
        .env("KILN_TOKEN", "kiln_test_token")
        .env("KILN_CONFIG_DIR", config)
        .env_remove("KILN_OUTPUT")
        .env_remove("KILN_CONFIG")
        .stdin(Stdio::null());
    command
}

fn run(fake: &FakeAgent, config: &Path, args: &[&str]) -> Output {
    kiln(fake, config, args).output().expect("kiln runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn relayed(sequence: u64, e: build_pb::build_event::Event) -> pb::TaskEvent {
    event(
        sequence,
        Event::BuildEvent(pb::RelayedBuildEvent {
            build_id: "b-1".into(),
            iteration: 0,
            event: Some(build_pb::BuildEvent {
                sequence,
                time: None,
                event: Some(e),
            }),
        }),
    )
}

/// A task that plans, writes one file, builds green and ends `end`.
fn green_log(end: pb::Phase, reason: &str) -> Vec<pb::TaskEvent> {
    use build_pb::build_event::Event as B;
    vec![
        event(1, phase(pb::Phase::Unspecified, pb::Phase::Analyze, "")),
        event(
            2,
            phase(pb::Phase::Analyze, pb::Phase::Plan, "planning 1 file"),
        ),
        event(
            3,
            Event::ModelOutput(pb::ModelOutput {
                phase: pb::Phase::Plan as i32,
                call_index: 0,
                delta: "main.py: adds two numbers".into(),
            }),
        ),
        event(
            4,
            Event::Usage(pb::ModelUsage {
                phase: pb::Phase::Plan as i32,
                call_index: 0,
                call: Some(pb::Usage {
                    prompt_tokens: 100,
                    completion_tokens: 40,
                    model_calls: 1,
                }),
                total: Some(pb::Usage {
                    prompt_tokens: 100,
                    completion_tokens: 40,
                    model_calls: 1,
                }),
                duration: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
            }),
        ),
        event(
            5,
            Event::FilesWritten(pb::FilesWritten {
                files: vec![pb::WrittenFile {
                    path: "main.py".into(),
                    size_bytes: 120,
                    deleted: false,
                    lines_added: 6,
                    lines_removed: 0,
                    created: true,
                }],
            }),
        ),
        relayed(
            6,
            B::StepStarted(build_pb::StepStarted {
                step_index: 0,
                argv: vec!["python3".into(), "-m".into(), "pytest".into()],
            }),
        ),
        relayed(
            7,
            B::Output(build_pb::Output {
                step_index: 0,
                stream: build_pb::OutputStream::Stdout as i32,
                offset: 0,
                data: bytes::Bytes::from_static(b"1 passed\n"),
            }),
        ),
        relayed(
            8,
            B::Output(build_pb::Output {
                step_index: 0,
                stream: build_pb::OutputStream::Stderr as i32,
                offset: 0,
                data: bytes::Bytes::from_static(b"DeprecationWarning: old\n"),
            }),
        ),
        relayed(
            9,
            B::StepFinished(build_pb::StepFinished {
                step_index: 0,
                exit_code: Some(0),
                succeeded: true,
                ..Default::default()
            }),
        ),
        event(10, phase(pb::Phase::Build, end, "")),
        event(11, result(end, reason)),
    ]
}

#[test]
fn run_streams_the_task_for_people_and_exits_0_when_done() {
    let fake = FakeAgent::start(Script {
        events: green_log(pb::Phase::Done, ""),
        ..Default::default()
    });
    let config = tempfile::tempdir().expect("tempdir");
    let output = run(
        &fake,
        config.path(),
        &[
            "agent",
            "run",
            "add two numbers",
            "--step",
            "python3 -m pytest -q",
            "--timeout",
            "20m",
            "--label",
            "bench=1",
        ],
    );
    let (out, err) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{out}\n{err}");
    assert_eq!(
        err.lines().next(),
        Some(format!("task {TASK_ID}").as_str()),
        "{err}"
    );
    assert!(
        err.contains("DeprecationWarning: old"),
        "the build's stderr on ours: {err}"
    );
    assert!(!out.contains("DeprecationWarning"), "{out}");
    let expected = [
        "▸ ANALYZE",
        "▸ PLAN — planning 1 file",
        "main.py: adds two numbers",
        "  · model call 1 (PLAN): 100 prompt + 40 completion tokens in 2.0 s; task total 140 tokens",
        "  wrote main.py  120 B  +6 −0  new",
        "▶ python3 -m pytest",
        "1 passed",
        "  step 1 exit 0",
        "▸ DONE",
        "task DONE: ended PHASE_DONE",
        "  workspace w-1 · build b-1 · 1 iteration · 100 prompt + 40 completion tokens in 2 model calls",
    ];
    assert_eq!(out.lines().collect::<Vec<_>>(), expected, "{out}");
    assert!(!out.contains('\x1b'), "no escape codes into a pipe");

    let calls = fake.calls.lock().unwrap();
    let sent = &calls.run[0];
    assert_eq!(sent.prompt, "add two numbers");
    assert_eq!(
        sent.toolchain, "",
        "no default toolchain: the server chooses"
    );
    assert_eq!(sent.steps.len(), 1);
    assert_eq!(
        sent.steps[0].command.as_deref(),
        Some("python3 -m pytest -q")
    );
    assert_eq!(sent.timeout.map(|t| t.seconds), Some(1200));
    assert_eq!(sent.labels.get("bench").map(String::as_str), Some("1"));
    // The id came from StartTask with the same request id (idempotent: no second task).
    assert_eq!(calls.start.len(), 1);
    assert_eq!(calls.start[0].request_id, sent.request_id);
    assert!(!sent.request_id.is_empty());
}

#[test]
fn failed_and_cancelled_tasks_exit_1_and_130() {
    for (end, reason, code) in [
        (pb::Phase::Failed, "MAX_ITERATIONS", 1),
        (pb::Phase::Cancelled, "CANCELLED", 130),
    ] {
        let fake = FakeAgent::start(Script {
            events: green_log(end, reason),
            ..Default::default()
        });
        let config = tempfile::tempdir().expect("tempdir");
        let output = run(&fake, config.path(), &["agent", "run", "p"]);
        assert_eq!(output.status.code(), Some(code), "{}", text(&output.stderr));
        let out = text(&output.stdout);
        assert!(
            out.contains(&format!(
                "task {} ({reason})",
                end.as_str_name().trim_start_matches("PHASE_")
            )),
            "{out}"
        );
    }
}

#[test]
fn a_cut_stream_is_said_once_and_resumed_without_repeats() {
    let fake = FakeAgent::start(Script {
        events: green_log(pb::Phase::Done, ""),
        run_cut_after: Some(5),
        ..Default::default()
    });
    let config = tempfile::tempdir().expect("tempdir");
    let output = run(&fake, config.path(), &["agent", "run", "p"]);
    let (out, err) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{out}\n{err}");
    assert!(
        err.contains(&format!(
            "kiln: connection lost; task {TASK_ID} continues — kiln agent watch {TASK_ID}"
        )),
        "{err}"
    );
    assert_eq!(fake.calls.lock().unwrap().watch_after, vec![5]);
    assert_eq!(out.matches("wrote main.py").count(), 1, "{out}");
    assert_eq!(out.matches("▸ PLAN").count(), 1, "{out}");
    assert!(out.contains("task DONE"), "{out}");
}

#[test]
fn json_prints_one_event_a_line_with_its_kind() {
    let fake = FakeAgent::start(Script {
        events: green_log(pb::Phase::Done, ""),
        ..Default::default()
    });
    let config = tempfile::tempdir().expect("tempdir");
    let output = run(&fake, config.path(), &["agent", "run", "p", "-o", "json"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let lines: Vec<serde_json::Value> = text(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(lines.len(), 11);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["sequence"], i as u64 + 1);
        assert_eq!(line["task_id"], TASK_ID);
    }
    // Every event carries its time (RFC 3339, UTC).
    assert_eq!(lines[0]["time"], "2023-11-14T22:13:21Z");
    assert_eq!(lines[10]["time"], "2023-11-14T22:13:31Z");

    // -o yaml: the same events, one YAML document each.
    let output = run(&fake, config.path(), &["agent", "run", "p", "-o", "yaml"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let documents: Vec<serde_json::Value> =
        yaml_serde::Deserializer::from_str(&text(&output.stdout))
            .map(|doc| serde::Deserialize::deserialize(doc).expect("a YAML document"))
            .collect();
    assert_eq!(documents, lines);
    let kinds: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "phase_changed",
            "phase_changed",
            "model_output",
            "usage",
            "files_written",
            "build_event",
            "build_event",
            "build_event",
            "build_event",
            "phase_changed",
            "result"
        ]
    );
    assert_eq!(lines[3]["duration_ms"], 2000.0);
    assert_eq!(lines[3]["call"]["completion_tokens"], 40);
    assert_eq!(lines[6]["event"]["data"], "1 passed\n");
    assert_eq!(lines[10]["phase"], "DONE");
    assert_eq!(lines[10]["usage"]["model_calls"], 2);
}

/// Reads a child's pipe line by line on a thread.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(_) => panic!("no line with {needle:?}; saw {seen:?}"),
        }
    }
}

/// SIGINT to the kiln process this test started, as Ctrl-C on its terminal would.
fn interrupt(child: &Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

fn finish(mut child: Child, stderr: &mpsc::Receiver<String>) -> (Option<i32>, String) {
    let status = child.wait().expect("kiln exits");
    // The reader thread ends with the pipe; what is left is the rest of stderr.
    let rest: Vec<String> = stderr.iter().collect();
    (status.code(), rest.join("\n"))
}

#[test]
fn ctrl_c_cancels_the_task_and_follows_it_to_its_result() {
    let fake = FakeAgent::start(Script {
        events: green_log(pb::Phase::Done, ""),
        hold_after: Some(4),
        ..Default::default()
    });
    let config = tempfile::tempdir().expect("tempdir");
    let mut child = kiln(&fake, config.path(), &["agent", "run", "p"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln starts");
    let stdout = lines_of(child.stdout.take().expect("stdout"));
    let stderr = lines_of(child.stderr.take().expect("stderr"));
    wait_for_line(&stderr, &format!("task {TASK_ID}"));
    wait_for_line(&stdout, "model call 1");
    interrupt(&child);
    let out_rest = stdout;
    let (code, err) = finish(child, &stderr);
    assert_eq!(code, Some(130), "{err}");
    assert!(
        err.contains(&format!(
            "cancelling task {TASK_ID} (Ctrl-C again to detach)"
        )),
        "{err}"
    );
    assert_eq!(fake.calls.lock().unwrap().cancels, 1);
    let out: Vec<String> = out_rest.iter().collect();
    assert!(
        out.iter()
            .any(|l| l.starts_with("task CANCELLED (CANCELLED)")),
        "followed to the result: {out:?}"
    );
}

#[test]
fn a_second_ctrl_c_detaches_and_says_the_cancel_is_still_pending() {
    let fake = FakeAgent::start(Script {
        events: green_log(pb::Phase::Done, ""),
        hold_after: Some(4),
        cancel_ignored: true,
        ..Default::default()
    });
    let config = tempfile::tempdir().expect("tempdir");
    let mut child = kiln(&fake, config.path(), &["agent", "run", "p"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln starts");
    let _stdout = lines_of(child.stdout.take().expect("stdout"));
    let stderr = lines_of(child.stderr.take().expect("stderr"));
    wait_for_line(&stderr, &format!("task {TASK_ID}"));
    interrupt(&child);
    wait_for_line(&stderr, "cancelling task");
    interrupt(&child);
    let (code, err) = finish(child, &stderr);
    assert_eq!(code, Some(130), "{err}");
    assert!(
        err.contains(&format!(
            "detached; task {TASK_ID} was asked to cancel and ends on its own. Follow it with: kiln agent watch {TASK_ID}"
        )),
        "{err}"
    );
    assert_eq!(
        fake.calls.lock().unwrap().cancels,
        1,
        "cancelled once, not twice"
    );
}

#[test]
fn watch_detaches_on_ctrl_c_and_resumes_where_it_left_off() {
    let fake = FakeAgent::start(Script {
        events: green_log(pb::Phase::Done, ""),
        hold_after: Some(4),
        ..Default::default()
    });
    let config = tempfile::tempdir().expect("tempdir");
    let mut child = kiln(&fake, config.path(), &["agent", "watch", TASK_ID])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln starts");
    let stdout = lines_of(child.stdout.take().expect("stdout"));
    let stderr = lines_of(child.stderr.take().expect("stderr"));
    wait_for_line(&stdout, "model call 1");
    interrupt(&child);
    let (code, err) = finish(child, &stderr);
    assert_eq!(code, Some(130), "{err}");
    assert!(
        err.contains(&format!(
            "stopped watching; the task goes on. Resume with: kiln agent watch {TASK_ID}"
        )),
        "{err}"
    );
    assert_eq!(fake.calls.lock().unwrap().cancels, 0, "watch never cancels");

    // Cancelled elsewhere; the next watch starts after what this terminal printed.
    let cancel = run(&fake, config.path(), &["agent", "cancel", TASK_ID]);
    assert!(cancel.status.success(), "{}", text(&cancel.stderr));
    assert_eq!(
        text(&cancel.stdout),
        format!("task {TASK_ID} is CANCELLED\n")
    );
    let output = run(&fake, config.path(), &["agent", "watch", TASK_ID]);
    assert_eq!(output.status.code(), Some(130), "{}", text(&output.stderr));
    assert_eq!(fake.calls.lock().unwrap().watch_after, vec![0, 4]);
    let out = text(&output.stdout);
    assert!(!out.contains("▸ PLAN"), "nothing printed twice: {out}");
    assert!(out.contains("task CANCELLED"), "{out}");

    let replay = run(
        &fake,
        config.path(),
        &["agent", "watch", TASK_ID, "--from-start"],
    );
    assert_eq!(replay.status.code(), Some(130));
    assert_eq!(fake.calls.lock().unwrap().watch_after, vec![0, 4, 0]);
}

#[test]
fn no_provider_is_the_servers_message_and_a_hint() {
    let unavailable: tonic::Status = kiln_rpc::ApiError::failed_precondition(
        "PROVIDER_UNAVAILABLE",
        "no LLM provider answers at http://127.0.0.1:11434/v1",
    )
    .into();
    let fake = FakeAgent::start(Script {
        start_error: Some(unavailable.clone()),
        models_error: Some(unavailable),
        ..Default::default()
    });
    let config = tempfile::tempdir().expect("tempdir");
    for args in [&["agent", "run", "p"][..], &["agent", "models"][..]] {
        let output = run(&fake, config.path(), args);
        assert_eq!(output.status.code(), Some(1));
        assert_eq!(
            text(&output.stderr),
            "kiln: no LLM provider answers at http://127.0.0.1:11434/v1 (PROVIDER_UNAVAILABLE)\n\
             hint: start a model with `make llm`, or set [agent.provider] in kiln.toml\n",
            "{args:?}"
        );
    }
}

#[test]
fn get_list_models_and_detach_speak_json() {
    let fake = FakeAgent::start(Script::default());
    let config = tempfile::tempdir().expect("tempdir");
    let json = |args: &[&str]| -> serde_json::Value {
        let output = run(&fake, config.path(), args);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            text(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("json")
    };
    let task = json(&["agent", "get", TASK_ID, "-o", "json"]);
    assert_eq!(task["id"], TASK_ID);
    assert_eq!(task["phase"], "BUILD");
    assert_eq!(task["usage"]["prompt_tokens"], 100);
    assert_eq!(task["build_ids"][0], "b-1");
    assert_eq!(task["created_at"], "2023-11-14T22:13:20Z");

    let tasks = json(&[
        "agent", "list", "--phase", "fix", "--phase", "done", "--label", "bench=1", "-o", "json",
    ]);
    assert_eq!(tasks["tasks"].as_array().map(Vec::len), Some(2));
    assert_eq!(tasks["tasks"][0]["phase"], "FIX");
    {
        let calls = fake.calls.lock().unwrap();
        let sent = &calls.list[0];
        assert_eq!(
            sent.phases,
            vec![pb::Phase::Fix as i32, pb::Phase::Done as i32]
        );
        assert_eq!(sent.labels.get("bench").map(String::as_str), Some("1"));
    }

    let models = json(&["agent", "models", "-o", "json"]);
    assert_eq!(models["provider"], "OPENAI_COMPATIBLE");
    assert_eq!(models["default_model"], "fake-coder:1b");
    assert_eq!(models["models"][0]["default"], true);
    assert_eq!(models["models"][1]["size_bytes"], serde_json::Value::Null);

    let started = json(&["agent", "run", "p", "--detach", "-o", "json"]);
    assert_eq!(started["id"], TASK_ID);
    assert_eq!(started["phase"], "QUEUED");
    assert!(
        fake.calls.lock().unwrap().run.is_empty(),
        "detach only starts"
    );
}

#[test]
fn list_and_models_are_tables_for_people() {
    let fake = FakeAgent::start(Script::default());
    let config = tempfile::tempdir().expect("tempdir");
    let output = run(&fake, config.path(), &["agent", "list"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let out = text(&output.stdout);
    let mut lines = out.lines();
    let header = lines.next().expect("header");
    for column in ["ID", "PHASE", "ITER", "TOOLCHAIN", "MODEL", "AGE", "PROMPT"] {
        assert!(header.contains(column), "{header}");
    }
    let row = lines.next().expect("a row");
    assert!(row.starts_with(TASK_ID), "{row}");
    assert!(
        row.contains(" FIX ") && row.contains("python") && row.contains("fake-coder:1b"),
        "{row}"
    );
    assert!(
        row.ends_with("a command-line tool that adds two numbe…"),
        "40 characters of the prompt: {row}"
    );

    let output = run(&fake, config.path(), &["agent", "models"]);
    let out = text(&output.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("* fake-coder:1b") && l.contains("1.2 GiB")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("  fake-coder:7b")),
        "{out}"
    );
    assert!(
        out.contains("provider: OPENAI_COMPATIBLE at http://127.0.0.1:9/v1"),
        "{out}"
    );
}
