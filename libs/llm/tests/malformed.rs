//! Output that breaks the dialect's rules becomes a typed error, after the deltas that
//! came before it.

mod common;

use common::{FakeProvider, Part, Reply, fast_config, ollama_line, openai_chunk};
use futures::StreamExt as _;
use kiln_llm::{ChatEvent, ChatRequest, LlmError, Message, ProviderKind, from_config};
use serde_json::json;

fn request() -> ChatRequest {
    ChatRequest::new("m", vec![Message::user("hi")])
}

/// The events of a stream that must fail: the deltas before the error, and the error.
async fn fail(kind: ProviderKind, path: &str, reply: Reply) -> (Vec<String>, LlmError) {
    let fake = FakeProvider::start().await;
    fake.push(path, reply);
    let provider = from_config(&fast_config(kind, &fake.url())).unwrap();
    let mut stream = provider.chat(request());
    let mut deltas = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(ChatEvent::Delta(text)) => deltas.push(text),
            Ok(finished) => panic!("the stream finished: {finished:?}"),
            Err(error) => {
                assert!(
                    stream.next().await.is_none(),
                    "the stream goes on after an error"
                );
                assert_eq!(fake.requests().len(), 1, "a broken answer is not retried");
                return (deltas, error);
            }
        }
    }
    panic!("the stream ended without an error");
}

#[tokio::test]
async fn a_malformed_sse_data_line_is_a_protocol_error() {
    let reply = Reply::sse_lines(&[
        &format!("data: {}", openai_chunk(json!({"content": "ok"}), None)),
        "",
        "data: {\"choices\": [{\"delta\": {\"content\": \"br",
        "",
    ]);
    let (deltas, error) = fail(ProviderKind::Openai, "/v1/chat/completions", reply).await;
    assert_eq!(deltas, ["ok"]);
    assert!(matches!(error, LlmError::Protocol(_)), "{error:?}");
}

#[tokio::test]
async fn json_of_the_wrong_shape_is_a_protocol_error() {
    let reply = Reply::sse_lines(&["data: {\"choices\": \"none\"}", ""]);
    let (_, error) = fail(ProviderKind::Openai, "/v1/chat/completions", reply).await;
    assert!(matches!(error, LlmError::Protocol(_)), "{error:?}");
}

#[tokio::test]
async fn a_malformed_ndjson_line_is_a_protocol_error() {
    let reply = Reply::status(200)
        .ndjson(&ollama_line("ok"))
        .bytes("{\"message\": oops}\n");
    let (deltas, error) = fail(ProviderKind::Ollama, "/api/chat", reply).await;
    assert_eq!(deltas, ["ok"]);
    assert!(matches!(error, LlmError::Protocol(_)), "{error:?}");
}

#[tokio::test]
async fn an_sse_stream_that_ends_without_a_finish_reason_is_truncated() {
    // The whole stream minus the finish chunk and [DONE].
    let reply = Reply::openai_stream(&["def f():", " pass"], "stop", None).without_last(2);
    let (deltas, error) = fail(ProviderKind::Openai, "/v1/chat/completions", reply).await;
    assert_eq!(deltas, ["def f():", " pass"]);
    assert!(matches!(error, LlmError::Truncated(_)), "{error:?}");
}

#[tokio::test]
async fn done_without_a_finish_reason_is_truncated() {
    let reply = Reply::openai_stream(&["x"], "stop", None)
        .without_last(2)
        .bytes("data: [DONE]\n\n");
    let (_, error) = fail(ProviderKind::Openai, "/v1/chat/completions", reply).await;
    assert!(matches!(error, LlmError::Truncated(_)), "{error:?}");
}

#[tokio::test]
async fn an_ndjson_stream_that_ends_before_done_is_truncated() {
    let reply = Reply::ollama_stream(&["a", "b"], "stop", (1, 2)).without_last(1);
    let (deltas, error) = fail(ProviderKind::Ollama, "/api/chat", reply).await;
    assert_eq!(deltas, ["a", "b"]);
    assert!(matches!(error, LlmError::Truncated(_)), "{error:?}");
}

#[tokio::test]
async fn a_connection_cut_mid_answer_is_a_connection_error() {
    let reply = Reply::openai_stream(&["a", "b"], "stop", None)
        .without_last(2)
        .then(Part::Cut);
    let (deltas, error) = fail(ProviderKind::Openai, "/v1/chat/completions", reply).await;
    assert_eq!(deltas, ["a", "b"]);
    assert!(matches!(error, LlmError::Connection { .. }), "{error:?}");
}

#[tokio::test]
async fn an_error_object_in_the_stream_is_a_provider_error() {
    let reply = Reply::status(200)
        .sse(&openai_chunk(json!({"content": "so far"}), None))
        .sse(&json!({"error": {"message": "the request exceeds the available context size", "type": "exceed_context_size_error"}}));
    let (deltas, error) = fail(ProviderKind::Openai, "/v1/chat/completions", reply).await;
    assert_eq!(deltas, ["so far"]);
    match error {
        LlmError::Provider { message } => assert!(message.contains("context size"), "{message}"),
        other => panic!("expected a provider error, got {other:?}"),
    }
}

#[tokio::test]
async fn llama_cpp_error_events_are_provider_errors() {
    // Older llama.cpp servers write `error: {json}` instead of a `data:` line.
    let reply = Reply::sse_lines(&["error: {\"code\":500,\"message\":\"slot unavailable\"}", ""]);
    let (_, error) = fail(ProviderKind::Openai, "/v1/chat/completions", reply).await;
    match error {
        LlmError::Provider { message } => assert_eq!(message, "slot unavailable"),
        other => panic!("expected a provider error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_line_without_end_is_cut_off_at_the_bound() {
    // 2 MiB without a newline: refused at 1 MiB, not buffered forever.
    let reply = Reply::status(200)
        .bytes(vec![b'x'; 2 << 20])
        .then(Part::Hang);
    let (_, error) = fail(ProviderKind::Openai, "/v1/chat/completions", reply).await;
    assert!(
        matches!(error, LlmError::Protocol(ref m) if m.contains("longer than")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_body_that_is_not_sse_is_a_protocol_error() {
    let reply = Reply::status(200)
        .header("content-type", "text/html")
        .bytes("<html>proxy error</html>\n");
    let (_, error) = fail(ProviderKind::Openai, "/v1/chat/completions", reply).await;
    assert!(matches!(error, LlmError::Protocol(_)), "{error:?}");
}
