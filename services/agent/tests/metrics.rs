//! The agent's Prometheus metrics, scraped over HTTP from a real metrics listener while
//! scripted tasks run against the fake model server: tasks by phase, finished tasks by
//! reason, model calls by phase and outcome (with their latency), tokens, fix iterations.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use kiln_proto::agent as pb;
use pb::Phase;

/// A scrape as Prometheus sends it; returns the body.
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .expect("a body")
}

/// The value of one series (`name{labels}` exactly as exposed), or a failure that shows
/// the exposition.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .split(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} has no number in:\n{text}"))
}

/// The agent of `rig` behind a metrics listener; the listener lives as long as its task.
async fn serve_metrics(rig: &Rig) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let mut registry = kiln_metrics::registry();
    rig.api.register_metrics(&mut registry);
    let listener =
        kiln_metrics::MetricsListener::bind("127.0.0.1:0".parse().unwrap(), Arc::new(registry))
            .await
            .expect("bind the metrics listener");
    let addr = listener.local_addr();
    (addr, listener.spawn())
}

const OPEN: [&str; 7] = [
    "QUEUED", "ANALYZE", "PLAN", "GENERATE", "VALIDATE", "BUILD", "FIX",
];

#[tokio::test]
async fn tasks_model_calls_tokens_and_fixes_are_exported() {
    let rig = Rig::start().await;
    let (addr, _listener) = serve_metrics(&rig).await;

    // Before any task: every phase and both token kinds at 0.
    let text = scrape(addr).await;
    for phase in OPEN {
        assert_eq!(
            value(&text, &format!("kiln_agent_tasks{{phase=\"{phase}\"}}")),
            0.0
        );
    }
    assert_eq!(
        value(&text, "kiln_agent_model_tokens_total{kind=\"prompt\"}"),
        0.0
    );

    // A task that fails its build once and is fixed: PLAN, GENERATE, FIX calls.
    rig.answer_with_usage(
        r#"{"summary": "a calc module with tests", "files": ["calc.py", "test_calc.py"]}"#,
        (120, 30),
    );
    rig.answer_with_usage(
        &text_files(&[("calc.py", BAD_CALC), ("test_calc.py", TEST_CALC)]),
        (200, 80),
    );
    rig.answer_with_usage(&text_files(&[("calc.py", GOOD_CALC)]), (300, 20));
    let events = run(&rig.api, python_task("calc.py with add and tests")).await;
    assert_eq!(result(&events).phase, Phase::Done as i32);

    let text = scrape(addr).await;
    for phase in ["PLAN", "GENERATE", "FIX"] {
        let labels = format!("{{phase=\"{phase}\",outcome=\"ok\"}}");
        assert_eq!(
            value(&text, &format!("kiln_agent_model_calls_total{labels}")),
            1.0
        );
        assert_eq!(
            value(
                &text,
                &format!("kiln_agent_model_call_duration_seconds_count{labels}")
            ),
            1.0
        );
    }
    assert_eq!(
        value(&text, "kiln_agent_model_tokens_total{kind=\"prompt\"}"),
        620.0
    );
    assert_eq!(
        value(&text, "kiln_agent_model_tokens_total{kind=\"completion\"}"),
        130.0
    );
    assert_eq!(
        value(
            &text,
            "kiln_agent_tasks_finished_total{phase=\"DONE\",reason=\"NONE\"}"
        ),
        1.0
    );
    assert_eq!(value(&text, "kiln_agent_task_fix_iterations_count"), 1.0);
    assert_eq!(value(&text, "kiln_agent_task_fix_iterations_sum"), 1.0);
    assert_eq!(
        value(&text, "kiln_agent_task_fix_iterations_bucket{le=\"0.0\"}"),
        0.0
    );
    assert_eq!(
        value(&text, "kiln_agent_task_fix_iterations_bucket{le=\"1.0\"}"),
        1.0
    );
    for phase in OPEN {
        assert_eq!(
            value(&text, &format!("kiln_agent_tasks{{phase=\"{phase}\"}}")),
            0.0,
            "a finished task is in no phase"
        );
    }

    // A provider that fails: an error call, a FAILED task with its reason.
    for _ in 0..3 {
        rig.llm.push(
            "/v1/chat/completions",
            Reply::json(500, &serde_json::json!({"error": "boom"})),
        );
    }
    let events = run(&rig.api, python_task("anything")).await;
    assert_eq!(result(&events).reason, "PROVIDER_ERROR");
    let text = scrape(addr).await;
    assert_eq!(
        value(
            &text,
            "kiln_agent_model_calls_total{phase=\"PLAN\",outcome=\"error\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "kiln_agent_tasks_finished_total{phase=\"FAILED\",reason=\"PROVIDER_ERROR\"}"
        ),
        1.0
    );
    assert_eq!(value(&text, "kiln_agent_task_fix_iterations_count"), 2.0);

    // A task waiting on the model is in PLAN; cancelling it abandons the call.
    let chat_calls = || {
        rig.llm
            .requests()
            .iter()
            .filter(|r| r.path == "/v1/chat/completions")
            .count()
    };
    let before = chat_calls();
    rig.llm.push("/v1/chat/completions", Reply::silent());
    let task = rig.start_task(python_task("anything")).await;
    wait_until("the model was never called", || chat_calls() == before + 1).await;
    let text = scrape(addr).await;
    assert_eq!(value(&text, "kiln_agent_tasks{phase=\"PLAN\"}"), 1.0);
    rig.cancel(&task.id).await;
    rig.llm.wait_for_closed_connections(1).await;
    let text = scrape(addr).await;
    assert_eq!(value(&text, "kiln_agent_tasks{phase=\"PLAN\"}"), 0.0);
    assert_eq!(
        value(
            &text,
            "kiln_agent_model_calls_total{phase=\"PLAN\",outcome=\"abandoned\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "kiln_agent_tasks_finished_total{phase=\"CANCELLED\",reason=\"CANCELLED\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn a_task_left_by_a_shutdown_is_counted_again_by_the_next_start() {
    let mut rig = Rig::start().await;
    rig.llm.push("/v1/chat/completions", Reply::silent());
    let task = rig.start_task(python_task("anything")).await;
    wait_until("the model was never called", || {
        rig.llm
            .requests()
            .iter()
            .any(|r| r.path == "/v1/chat/completions")
    })
    .await;
    let (addr, listener) = serve_metrics(&rig).await;
    assert_eq!(
        value(&scrape(addr).await, "kiln_agent_tasks{phase=\"PLAN\"}"),
        1.0
    );
    // The old process's gauge lets go of the task …
    let old_api = rig.api.clone();
    rig.llm.push("/v1/chat/completions", Reply::silent());
    rig.restart().await;
    let mut old_registry = kiln_metrics::registry();
    old_api.register_metrics(&mut old_registry);
    let old = kiln_metrics::render(&old_registry);
    assert_eq!(
        value(&old, "kiln_agent_tasks{phase=\"PLAN\"}"),
        0.0,
        "{old}"
    );
    assert!(
        !old.contains("kiln_agent_tasks_finished_total{"),
        "not finished: {old}"
    );
    listener.abort();
    // … and the new one takes it up where it was.
    let (addr, _listener) = serve_metrics(&rig).await;
    wait_until("the resumed task never called the model", || {
        rig.llm
            .requests()
            .iter()
            .filter(|r| r.path == "/v1/chat/completions")
            .count()
            == 2
    })
    .await;
    assert_eq!(
        value(&scrape(addr).await, "kiln_agent_tasks{phase=\"PLAN\"}"),
        1.0
    );
    rig.cancel(&task.id).await;
}
