//! The task state machine against the scripted model server and the fake kiln-build:
//! every path to DONE, FAILED and CANCELLED, and what a restart continues.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::agent as pb;
use kiln_proto::agent::agent_service_server::AgentService;
use kiln_rpc::identity::Role;
use pb::Phase;
use pb::task_event::Event;

fn model_prompts(rig: &Rig) -> Vec<String> {
    rig.llm
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .map(|r| r.json()["messages"].to_string())
        .collect()
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_task_goes_from_prompt_to_a_green_build() {
    let rig = Rig::start().await;
    rig.plan();
    rig.answer(&text_files(&[
        ("calc.py", GOOD_CALC),
        ("test_calc.py", TEST_CALC),
    ]));
    let events = run(
        &rig.api,
        python_task("Write calc.py with add(a, b) and unittest tests"),
    )
    .await;

    assert_dense(&events);
    let r = result(&events);
    assert_eq!(r.phase, Phase::Done as i32, "{r:?}");
    assert_eq!(r.reason, "");
    assert_eq!(r.iterations, 0);
    assert_eq!(
        phases(&events),
        [
            Phase::Analyze,
            Phase::Plan,
            Phase::Generate,
            Phase::Validate,
            Phase::Build,
            Phase::Done
        ]
    );
    // The model's output was streamed, the files reported with their diff counts.
    assert!(
        events.iter().any(
            |e| matches!(&e.event, Some(Event::ModelOutput(o)) if o.delta.contains("def add"))
        )
    );
    let written = events
        .iter()
        .find_map(|e| match &e.event {
            Some(Event::FilesWritten(f)) => Some(f.files.clone()),
            _ => None,
        })
        .expect("files written");
    assert_eq!(
        written.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        ["calc.py", "test_calc.py"]
    );
    assert!(written[0].created && written[0].lines_added == 2);
    // The build's own events were relayed, its output among them.
    assert!(events.iter().any(|e| matches!(&e.event,
        Some(Event::BuildEvent(b)) if matches!(&b.event.as_ref().unwrap().event,
            Some(kiln_proto::build::build_event::Event::Output(o)) if String::from_utf8_lossy(&o.data).contains("OK")))));
    // Usage: two calls of 150 tokens.
    let usage = r.usage.unwrap();
    assert_eq!(
        (
            usage.model_calls,
            usage.prompt_tokens,
            usage.completion_tokens
        ),
        (2, 200, 100)
    );
    // The code is in the workspace; kiln-build only ever saw the delegated token once
    // the task ran (the user's token only at StartTask, for the workspace).
    assert_eq!(rig.build.files(&r.workspace_id)["calc.py"], GOOD_CALC);
    for call in rig.build.calls() {
        match call.rpc {
            "CreateWorkspace" => assert_eq!(call.token, "user:alice"),
            _ => assert!(call.token.starts_with("delegated:alice:"), "{call:?}"),
        }
    }
    let task = rig
        .api
        .get_task(request(
            "alice",
            Role::User,
            pb::GetTaskRequest {
                task_id: r.workspace_id.clone(),
            },
        ))
        .await;
    assert_eq!(
        task.unwrap_err().code(),
        tonic::Code::NotFound,
        "a workspace id is not a task id"
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_failing_build_is_diagnosed_and_fixed() {
    let rig = Rig::start().await;
    rig.plan();
    rig.answer(&text_files(&[
        ("calc.py", BAD_CALC),
        ("test_calc.py", TEST_CALC),
    ]));
    rig.answer(&text_files(&[("calc.py", GOOD_CALC)]));
    let events = run(&rig.api, python_task("calc.py with add and tests")).await;
    let r = result(&events);
    assert_eq!(r.phase, Phase::Done as i32, "{r:?}");
    assert_eq!(r.iterations, 1);
    assert_eq!(
        phases(&events),
        [
            Phase::Analyze,
            Phase::Plan,
            Phase::Generate,
            Phase::Validate,
            Phase::Build,
            Phase::Fix,
            Phase::Validate,
            Phase::Build,
            Phase::Done
        ]
    );
    // The FIX prompt carried the located failure from the real unittest output, and the
    // whole current files.
    let prompts = model_prompts(&rig);
    let fix = &prompts[2];
    assert!(fix.contains("test_calc.py"), "{fix}");
    assert!(
        fix.contains("AssertionError") || fix.contains("FAIL"),
        "{fix}"
    );
    assert!(
        fix.contains("return a - b"),
        "the model sees its current code: {fix}"
    );
    assert_eq!(r.usage.unwrap().model_calls, 3);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn the_same_error_twice_ends_the_task_as_stuck() {
    let rig = Rig::start().await;
    rig.plan();
    rig.answer(&text_files(&[
        ("calc.py", BAD_CALC),
        ("test_calc.py", TEST_CALC),
    ]));
    // Different text, same wrong behaviour.
    rig.answer(&text_files(&[(
        "calc.py",
        "def add(a, b):\n    return (a - b)\n",
    )]));
    let events = run(&rig.api, python_task("calc.py with add and tests")).await;
    let r = result(&events);
    assert_eq!(
        (r.phase, r.reason.as_str()),
        (Phase::Failed as i32, "STUCK"),
        "{r:?}"
    );
    assert!(r.message.contains("the same error twice"), "{}", r.message);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn the_same_files_twice_end_the_task_as_stuck() {
    let rig = Rig::start().await;
    rig.plan();
    let bad = text_files(&[("calc.py", BAD_CALC), ("test_calc.py", TEST_CALC)]);
    rig.answer(&bad);
    rig.answer(&bad);
    let events = run(&rig.api, python_task("calc.py with add and tests")).await;
    let r = result(&events);
    assert_eq!(
        (r.phase, r.reason.as_str()),
        (Phase::Failed as i32, "STUCK"),
        "{r:?}"
    );
    assert!(r.message.contains("same files"), "{}", r.message);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn fix_iterations_are_bounded() {
    let rig = Rig::start().await;
    rig.plan();
    rig.answer(&text_files(&[
        ("calc.py", BAD_CALC),
        ("test_calc.py", TEST_CALC),
    ]));
    rig.answer(&text_files(&[(
        "calc.py",
        "def add(a, b):\n    raise ValueError('no')\n",
    )]));
    let mut req = python_task("calc.py with add and tests");
    req.max_iterations = Some(1);
    let events = run(&rig.api, req).await;
    let r = result(&events);
    assert_eq!(
        (r.phase, r.reason.as_str()),
        (Phase::Failed as i32, "MAX_ITERATIONS"),
        "{r:?}"
    );
    assert_eq!(r.iterations, 1);
    assert_eq!(rig.build.builds_started(), 2);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_blocking_finding_sends_the_model_back_without_writing_anything() {
    let rig = Rig::start().await;
    rig.plan();
    rig.answer(&text_files(&[
        ("../escape.py", "x = 1\n"),
        ("calc.py", GOOD_CALC),
    ]));
    rig.answer(&text_files(&[
        ("calc.py", GOOD_CALC),
        ("test_calc.py", TEST_CALC),
    ]));
    let events = run(&rig.api, python_task("calc.py with add and tests")).await;
    let r = result(&events);
    assert_eq!(r.phase, Phase::Done as i32, "{r:?}");
    let findings = events
        .iter()
        .find_map(|e| match &e.event {
            Some(Event::Findings(f)) => Some(f.findings.clone()),
            _ => None,
        })
        .expect("findings");
    assert_eq!(findings[0].rule, "PATH_ESCAPE");
    assert_eq!(findings[0].severity, pb::Severity::Error as i32);
    // Nothing escaped, and the refused reply wrote nothing.
    assert!(
        !rig.build
            .files(&r.workspace_id)
            .keys()
            .any(|k| k.contains("escape"))
    );
    assert_eq!(
        rig.build
            .calls()
            .iter()
            .filter(|c| c.rpc == "WriteFiles")
            .count(),
        1
    );
    assert!(
        model_prompts(&rig)[2].contains("escape.py"),
        "the FIX prompt names the refused path"
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn commands_the_model_proposes_must_pass_the_build_policy() {
    let rig = Rig::start().await;
    rig.plan();
    let with_shell = format!(
        "{}=== COMMANDS ===\nsh -c 'python3 -m unittest'\n=== END COMMANDS ===\n",
        text_files(&[("calc.py", GOOD_CALC), ("test_calc.py", TEST_CALC)])
    );
    rig.answer(&with_shell);
    let good = format!(
        "{}=== COMMANDS ===\npython3 -m unittest -v test_calc\n=== END COMMANDS ===\n",
        text_files(&[("calc.py", GOOD_CALC), ("test_calc.py", TEST_CALC)])
    );
    rig.answer(&good);
    let events = run(&rig.api, python_task("calc.py with add and tests")).await;
    let r = result(&events);
    assert_eq!(r.phase, Phase::Done as i32, "{r:?}");
    let rules: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Findings(f)) => Some(
                f.findings
                    .iter()
                    .map(|f| f.rule.clone())
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(
        rules.contains(&"COMMAND_NOT_ALLOWED".to_owned()),
        "{rules:?}"
    );
    let task = rig
        .api
        .get_task(request(
            "alice",
            Role::User,
            pb::GetTaskRequest {
                task_id: task_id(&rig).await,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        task.steps[0].argv,
        ["python3", "-m", "unittest", "-v", "test_calc"]
    );
}
}

async fn task_id(rig: &Rig) -> String {
    rig.api
        .list_tasks(request(
            "alice",
            Role::User,
            pb::ListTasksRequest::default(),
        ))
        .await
        .unwrap()
        .into_inner()
        .tasks[0]
        .id
        .clone()
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn cancel_aborts_the_model_call() {
    let rig = Rig::start().await;
    rig.llm.push("/v1/chat/completions", Reply::silent());
    let task = rig.start_task(python_task("anything")).await;
    // Wait until the PLAN call is in flight.
    wait_until("the model was never called", || {
        rig.llm
            .requests()
            .iter()
            .any(|r| r.path == "/v1/chat/completions")
    })
    .await;
    let cancelled = rig.cancel(&task.id).await;
    assert_eq!(cancelled.phase, Phase::Cancelled as i32);
    // The HTTP request was really dropped: the server saw its client go.
    rig.llm.wait_for_closed_connections(1).await;
    let events = rig.watch_all(&task.id).await;
    assert_eq!(result(&events).reason, "CANCELLED");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn cancel_during_a_build_cancels_the_build() {
    let rig = Rig::start().await;
    rig.build.hold_builds(true);
    rig.plan();
    rig.answer(&text_files(&[
        ("calc.py", GOOD_CALC),
        ("test_calc.py", TEST_CALC),
    ]));
    let task = rig.start_task(python_task("calc")).await;
    wait_until("no build started", || rig.build.builds_started() > 0).await;
    let t = rig.cancel(&task.id).await;
    assert_eq!(t.phase, Phase::Cancelled as i32);
    assert_eq!(rig.build.cancelled(), t.build_ids);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn the_time_budget_ends_a_task() {
    let rig = Rig::start().await;
    rig.llm.push("/v1/chat/completions", Reply::silent());
    let mut req = python_task("anything");
    req.timeout = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let events = run(&rig.api, req).await;
    let r = result(&events);
    assert_eq!(
        (r.phase, r.reason.as_str()),
        (Phase::Failed as i32, "TIMED_OUT"),
        "{r:?}"
    );
    rig.llm.wait_for_closed_connections(1).await;
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn the_token_budget_ends_a_task() {
    let rig = Rig::start().await;
    rig.answer_with_usage(r#"{"summary": "x", "files": ["calc.py"]}"#, (80, 40));
    let mut req = python_task("anything");
    req.max_tokens = Some(100);
    let events = run(&rig.api, req).await;
    let r = result(&events);
    assert_eq!(
        (r.phase, r.reason.as_str()),
        (Phase::Failed as i32, "BUDGET_EXHAUSTED"),
        "{r:?}"
    );
    assert_eq!(
        r.usage.unwrap().model_calls,
        1,
        "no call once the budget is spent"
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_provider_failure_ends_the_task_with_its_reason() {
    let rig = Rig::start().await;
    for _ in 0..3 {
        rig.llm.push(
            "/v1/chat/completions",
            Reply::json(500, &serde_json::json!({"error": "boom"})),
        );
    }
    let events = run(&rig.api, python_task("anything")).await;
    let r = result(&events);
    assert_eq!(
        (r.phase, r.reason.as_str()),
        (Phase::Failed as i32, "PROVIDER_ERROR"),
        "{r:?}"
    );
    assert!(r.message.contains("500"), "{}", r.message);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_restart_during_a_model_call_redoes_only_that_call() {
    let mut rig = Rig::start().await;
    rig.plan();
    rig.llm.push("/v1/chat/completions", Reply::silent());
    let task = rig.start_task(python_task("calc")).await;
    wait_until("GENERATE never started", || {
        rig.llm
            .requests()
            .iter()
            .filter(|r| r.path == "/v1/chat/completions")
            .count()
            >= 2
    })
    .await;
    let before = last_sequence(&rig, &task.id).await;
    rig.restart().await;
    rig.answer(&text_files(&[
        ("calc.py", GOOD_CALC),
        ("test_calc.py", TEST_CALC),
    ]));
    let events = rig.watch_all(&task.id).await;
    assert_dense(&events);
    assert!(events.len() as u64 > before);
    assert_eq!(result(&events).phase, Phase::Done as i32);
    // PLAN once, GENERATE twice (the cut call and its redo), nothing else.
    assert_eq!(
        rig.llm
            .requests()
            .iter()
            .filter(|r| r.path == "/v1/chat/completions")
            .count(),
        3
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_restart_during_a_build_follows_the_same_build() {
    let mut rig = Rig::start().await;
    rig.build.hold_builds(true);
    rig.plan();
    rig.answer(&text_files(&[
        ("calc.py", GOOD_CALC),
        ("test_calc.py", TEST_CALC),
    ]));
    let task = rig.start_task(python_task("calc")).await;
    // Until the build's Started event is relayed.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = get(&rig, &task.id).await;
        if t.phase == Phase::Build as i32 && !t.build_ids.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "no build");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    rig.restart().await;
    rig.build.hold_builds(false);
    let events = rig.watch_all(&task.id).await;
    assert_dense(&events);
    assert_eq!(result(&events).phase, Phase::Done as i32);
    assert_eq!(
        rig.build.builds_started(),
        1,
        "the build in flight was followed, not started again"
    );
    // Each build event relayed exactly once.
    let relayed: Vec<u64> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::BuildEvent(b)) => Some(b.event.as_ref().unwrap().sequence),
            _ => None,
        })
        .collect();
    let expected: Vec<u64> = (1..=relayed.len() as u64).collect();
    assert_eq!(relayed, expected);
}
}

async fn get(rig: &Rig, id: &str) -> pb::Task {
    rig.api
        .get_task(request(
            "alice",
            Role::User,
            pb::GetTaskRequest {
                task_id: id.to_owned(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn last_sequence(rig: &Rig, id: &str) -> u64 {
    get(rig, id).await.last_sequence
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn watch_resumes_after_any_sequence_without_gap_or_duplicate() {
    let rig = Rig::start().await;
    rig.plan();
    rig.answer(&text_files(&[
        ("calc.py", GOOD_CALC),
        ("test_calc.py", TEST_CALC),
    ]));
    // Heartbeats are live only (not stored, they repeat the last sequence): a slow build
    // step (a loaded machine) puts one in the live run that no replay has.
    let all: Vec<_> = run(&rig.api, python_task("calc"))
        .await
        .into_iter()
        .filter(|e| !matches!(e.event, Some(Event::Heartbeat(_))))
        .collect();
    let id = task_id(&rig).await;
    for after in [1, all.len() as u64 / 2, all.len() as u64 - 1] {
        let rest = collect(
            rig.api
                .watch_task(request(
                    "bob",
                    Role::Viewer,
                    pb::WatchTaskRequest {
                        task_id: id.clone(),
                        after_sequence: after,
                    },
                ))
                .await
                .unwrap()
                .into_inner(),
        )
        .await;
        assert_eq!(rest, all[after as usize..].to_vec(), "after {after}");
    }
}
}
