//! The agent in the real suite (`kiln up`): real kiln-auth token exchange over mTLS with
//! the agent's own workload certificate, real kiln-build and its sandbox, with the
//! scripted fake model server over HTTP. What a user of the gRPC API sees.

mod common;

#[path = "../../libs/llm/tests/common/mod.rs"]
mod fake_llm;

use std::time::Duration;

use common::{Suite, reason};
use fake_llm::{FakeProvider, Reply};
use kiln_proto::agent as pb;
use kiln_proto::agent::agent_service_client::AgentServiceClient;
use kiln_proto::auth::Role;
use kiln_proto::build::build_service_client::BuildServiceClient;
use pb::task_event::Event;
use serde_json::json;

const CALC: &str = "def add(a, b):\n    return a + b\n";
const TEST: &str = "import unittest\nfrom calc import add\n\n\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n";

async fn fake_model() -> FakeProvider {
    let llm = FakeProvider::start().await;
    llm.always(
        "/v1/models",
        Reply::json(200, &json!({"data": [{"id": "fake-coder"}]})),
    );
    llm
}

fn answer(llm: &FakeProvider, text: &str) {
    llm.push(
        "/v1/chat/completions",
        Reply::openai_stream(&[text], "stop", Some((120, 60))),
    );
}

fn files(files: &[(&str, &str)]) -> String {
    files
        .iter()
        .map(|(p, c)| format!("=== FILE: {p} ===\n{c}=== END FILE ===\n"))
        .collect()
}

async fn follow(
    client: &mut AgentServiceClient<kiln_rpc::client::KilnChannel>,
    stream: tonic::Streaming<pb::TaskEvent>,
) -> Vec<pb::TaskEvent> {
    let _ = client;
    let mut stream = stream;
    let mut events = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Some(e) = tokio::time::timeout_at(until, stream.message())
        .await
        .expect("the task ends in time")
        .expect("the stream holds")
    {
        events.push(e);
    }
    events
}

fn result(events: &[pb::TaskEvent]) -> pb::TaskResult {
    match events.last().and_then(|e| e.event.clone()) {
        Some(Event::Result(r)) => r,
        other => panic!("no result at the end: {other:?}"),
    }
}

#[tokio::test]
async fn a_task_builds_green_in_the_sandbox_on_behalf_of_the_user() {
    let llm = fake_model().await;
    answer(
        &llm,
        r#"{"summary": "calc", "files": ["calc.py", "test_calc.py"]}"#,
    );
    answer(
        &llm,
        &files(&[
            ("calc.py", "def add(a, b):\n    return a - b\n"),
            ("test_calc.py", TEST),
        ]),
    );
    answer(&llm, &files(&[("calc.py", CALC)]));
    let suite = Suite::start_with(&["--llm-url", &llm.url()]);
    let token = suite.user_token("alice", Role::User).await;
    let channel = suite.channel_as(&token).await;
    let mut agent = AgentServiceClient::new(channel.clone());
    let response = agent
        .run_task(pb::StartTaskRequest {
            prompt: "calc.py with add(a, b) and a unittest".into(),
            toolchain: "python".into(),
            ..Default::default()
        })
        .await
        .expect("RunTask");
    let task_id = response
        .metadata()
        .get("kiln-task-id")
        .expect("the task id comes as a header, before any event")
        .to_str()
        .unwrap()
        .to_owned();
    let events = follow(&mut agent, response.into_inner()).await;
    let r = result(&events);
    assert_eq!(r.phase, pb::Phase::Done as i32, "{r:?}\n{}", suite.log());
    assert_eq!(r.iterations, 1);

    // The failing build's real unittest output went to the model, located.
    let fix_prompt = llm
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .nth(2)
        .expect("a FIX call")
        .json()["messages"]
        .to_string();
    assert!(fix_prompt.contains("test_calc.py"), "{fix_prompt}");
    assert!(fix_prompt.contains("AssertionError"), "{fix_prompt}");

    // The builds belong to alice, carry the task's label, and the code is in her workspace.
    let mut build = BuildServiceClient::new(channel);
    let builds = build
        .list_builds(kiln_proto::build::ListBuildsRequest {
            labels: [("kiln.dev/task".to_owned(), task_id.clone())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .builds;
    assert_eq!(builds.len(), 2);
    let task = agent
        .get_task(pb::GetTaskRequest {
            task_id: task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(builds.iter().all(|b| b.owner == task.owner));
    assert_eq!(task.actor, "spiffe://kiln.local/service/agent");
    let calc = build
        .read_file(kiln_proto::build::ReadFileRequest {
            workspace_id: r.workspace_id.clone(),
            path: "calc.py".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(calc.data, CALC.as_bytes());
    // The log says who acted for whom, and never holds a token.
    let log = suite.log();
    assert!(log.contains("agent on behalf of alice"), "{log}");
    assert!(!log.contains(&token), "the user's token is never logged");
}

#[tokio::test]
async fn demoting_the_user_ends_the_delegation_of_a_running_task() {
    let llm = fake_model().await;
    answer(&llm, r#"{"summary": "calc", "files": ["calc.py"]}"#);
    // GENERATE answers only after the demotion.
    llm.push(
        "/v1/chat/completions",
        Reply::status(200)
            .header("content-type", "text/event-stream")
            .then(fake_llm::Part::Pause(Duration::from_secs(4)))
            .sse(&fake_llm::openai_chunk(
                json!({"content": files(&[("calc.py", CALC)])}),
                None,
            ))
            .sse(&fake_llm::openai_chunk(json!({}), Some("stop")))
            .bytes("data: [DONE]\n\n"),
    );
    let suite = Suite::start_with(&["--llm-url", &llm.url()]);
    let token = suite.user_token("bob", Role::User).await;
    let mut agent = AgentServiceClient::new(suite.channel_as(&token).await);
    let task = agent
        .start_task(pb::StartTaskRequest {
            prompt: "calc".into(),
            toolchain: "python".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let admin = suite.channel_as(&suite.admin_token().await).await;
    use kiln_proto::auth::auth_service_client::AuthServiceClient;
    AuthServiceClient::new(admin)
        .update_user(kiln_proto::auth::UpdateUserRequest {
            user_id: task.owner.clone(),
            role: Some(Role::Viewer as i32),
            ..Default::default()
        })
        .await
        .unwrap();
    let admin = suite.channel_as(&suite.admin_token().await).await;
    let stream = AgentServiceClient::new(admin.clone())
        .watch_task(pb::WatchTaskRequest {
            task_id: task.id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let events = follow(&mut AgentServiceClient::new(admin), stream).await;
    let r = result(&events);
    assert_eq!(
        (r.phase, r.reason.as_str()),
        (pb::Phase::Failed as i32, "BUILD_ERROR"),
        "{r:?}"
    );
    assert!(r.message.contains("delegation"), "{}", r.message);
}

#[tokio::test]
async fn without_a_model_server_a_task_is_refused_with_how_to_get_one() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let suite = Suite::start_with(&["--llm-url", &url]);
    let token = suite.user_token("carol", Role::User).await;
    let err = AgentServiceClient::new(suite.channel_as(&token).await)
        .start_task(pb::StartTaskRequest {
            prompt: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&err), "PROVIDER_UNAVAILABLE");
    assert!(err.message().contains(&url), "{}", err.message());
    // A viewer cannot start tasks at all (the layer refuses before the agent runs).
    let viewer = suite.user_token("vic", Role::Viewer).await;
    let err = AgentServiceClient::new(suite.channel_as(&viewer).await)
        .start_task(pb::StartTaskRequest {
            prompt: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}
