//! Ollama's native dialect against the fake provider.

mod common;

use common::{FakeProvider, Reply, fast_config, ollama_line};
use futures::StreamExt as _;
use kiln_llm::{
    ChatEvent, ChatRequest, FinishReason, LlmError, Message, OutputFormat, ProviderKind, Usage,
    from_config,
};
use serde_json::json;

fn request() -> ChatRequest {
    let mut request = ChatRequest::new("qwen2.5-coder:1.5b", vec![Message::user("hello")]);
    request.temperature = Some(0.0);
    request.max_tokens = Some(100);
    request
}

#[tokio::test]
async fn streamed_lines_reassemble_with_counts_as_usage() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/api/chat",
        Reply::ollama_stream(&["Hel", "lo", " there"], "stop", (26, 3)),
    );
    let provider = from_config(&fast_config(ProviderKind::Ollama, &fake.url())).unwrap();

    let events: Vec<ChatEvent> = provider.chat(request()).map(|e| e.unwrap()).collect().await;

    assert_eq!(
        events,
        vec![
            ChatEvent::Delta("Hel".into()),
            ChatEvent::Delta("lo".into()),
            ChatEvent::Delta(" there".into()),
            ChatEvent::Finished {
                finish_reason: FinishReason::Stop,
                usage: Some(Usage {
                    prompt_tokens: 26,
                    completion_tokens: 3
                }),
            },
        ]
    );
    let sent = &fake.requests()[0];
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("POST", "/api/chat")
    );
    let body = sent.json();
    assert_eq!(body["model"], "qwen2.5-coder:1.5b");
    assert_eq!(body["stream"], true);
    assert_eq!(
        body["options"],
        json!({"temperature": 0.0, "num_predict": 100})
    );
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": "hello"}])
    );
    assert!(body.get("format").is_none());
}

#[tokio::test]
async fn a_json_schema_is_sent_as_format() {
    let fake = FakeProvider::start().await;
    fake.push("/api/chat", Reply::ollama_stream(&["{}"], "stop", (1, 1)));
    let provider = from_config(&fast_config(ProviderKind::Ollama, &fake.url())).unwrap();
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}});
    let mut request = request();
    request.output = Some(OutputFormat::JsonSchema(schema.clone()));

    let _: Vec<_> = provider.chat(request).collect().await;

    let body = fake.requests()[0].json();
    assert_eq!(body["format"], schema);
    assert!(body.get("response_format").is_none() && body.get("grammar").is_none());
}

#[tokio::test]
async fn a_grammar_is_unsupported_and_nothing_is_sent() {
    let fake = FakeProvider::start().await;
    let provider = from_config(&fast_config(ProviderKind::Ollama, &fake.url())).unwrap();
    let mut request = request();
    let grammar = OutputFormat::Grammar("root ::= \"a\"".into());
    assert!(!provider.supports(&grammar));
    request.output = Some(grammar);

    let events: Vec<_> = provider.chat(request).collect().await;

    assert_eq!(events.len(), 1);
    assert!(
        matches!(events[0], Err(LlmError::Unsupported(_))),
        "{events:?}"
    );
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn models_come_from_api_tags_with_their_sizes() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/api/tags",
        Reply::json(
            200,
            &json!({"models": [
                {"name": "qwen2.5-coder:1.5b", "model": "qwen2.5-coder:1.5b", "size": 986061892u64},
                {"name": "llama3:latest", "model": "llama3:latest"},
            ]}),
        ),
    );
    let provider = from_config(&fast_config(ProviderKind::Ollama, &fake.url())).unwrap();

    let models = provider.list_models().await.unwrap();

    assert_eq!(models.len(), 2);
    assert_eq!(models[0].id, "qwen2.5-coder:1.5b");
    assert_eq!(models[0].size_bytes, Some(986061892));
    assert_eq!(models[1].size_bytes, None);
    assert_eq!(fake.requests()[0].path, "/api/tags");
}

#[tokio::test]
async fn an_error_line_mid_stream_is_a_provider_error() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/api/chat",
        Reply::status(200)
            .ndjson(&ollama_line("par"))
            .ndjson(&json!({"error": "model runner has unexpectedly stopped"})),
    );
    let provider = from_config(&fast_config(ProviderKind::Ollama, &fake.url())).unwrap();

    let events: Vec<_> = provider.chat(request()).collect().await;

    assert!(
        matches!(&events[0], Ok(ChatEvent::Delta(t)) if t == "par"),
        "{events:?}"
    );
    match &events[1] {
        Err(LlmError::Provider { message }) => assert!(message.contains("unexpectedly stopped")),
        other => panic!("expected a provider error, got {other:?}"),
    }
    assert_eq!(events.len(), 2, "the stream ends after an error");
}

#[tokio::test]
async fn an_unknown_model_is_an_http_error_with_the_reason() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/api/chat",
        Reply::json(
            404,
            &json!({"error": "model \"nope\" not found, try pulling it first"}),
        ),
    );
    let provider = from_config(&fast_config(ProviderKind::Ollama, &fake.url())).unwrap();

    let first = provider.chat(request()).next().await.unwrap();

    match first {
        Err(LlmError::Http {
            status: 404,
            body_excerpt,
        }) => {
            assert!(body_excerpt.contains("not found"), "{body_excerpt}")
        }
        other => panic!("expected HTTP 404, got {other:?}"),
    }
}
