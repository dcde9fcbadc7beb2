//! Retries: on connection errors, 429 and 5xx, before any output; honouring
//! `Retry-After`; bounded by `max_attempts`.

mod common;

use std::time::Duration;

use common::{FakeProvider, Part, Reply, fast_config};
use futures::StreamExt as _;
use kiln_llm::{ChatEvent, ChatRequest, LlmError, Message, ProviderKind, from_config};
use serde_json::json;

fn request() -> ChatRequest {
    ChatRequest::new("m", vec![Message::user("hi")])
}

async fn text_of(stream: kiln_llm::ChatStream) -> Result<String, LlmError> {
    let mut text = String::new();
    let mut stream = stream;
    while let Some(event) = stream.next().await {
        match event? {
            ChatEvent::Delta(delta) => text.push_str(&delta),
            ChatEvent::Finished { .. } => return Ok(text),
        }
    }
    panic!("the stream ended without Finished or an error");
}

#[tokio::test]
async fn a_500_then_success_is_retried_and_succeeds() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/v1/chat/completions",
        Reply::json(500, &json!({"error": "loading model"})),
    );
    fake.push(
        "/v1/chat/completions",
        Reply::openai_stream(&["fine"], "stop", None),
    );
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();

    assert_eq!(text_of(provider.chat(request())).await.unwrap(), "fine");

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].body, requests[1].body,
        "the retry sends the same request"
    );
}

#[tokio::test]
async fn a_5xx_on_ollama_and_on_model_lists_is_retried_too() {
    let fake = FakeProvider::start().await;
    fake.push("/api/tags", Reply::status(502));
    fake.push(
        "/api/tags",
        Reply::json(200, &json!({"models": [{"name": "qwen"}]})),
    );
    fake.push("/api/chat", Reply::status(503));
    fake.push("/api/chat", Reply::ollama_stream(&["ok"], "stop", (1, 1)));
    let provider = from_config(&fast_config(ProviderKind::Ollama, &fake.url())).unwrap();

    assert_eq!(provider.list_models().await.unwrap()[0].id, "qwen");
    assert_eq!(text_of(provider.chat(request())).await.unwrap(), "ok");
    assert_eq!(fake.requests().len(), 4);
}

#[tokio::test]
async fn a_429_waits_as_long_as_retry_after_says() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/v1/chat/completions",
        Reply::json(429, &json!({"error": "slow down"})).header("retry-after", "1"),
    );
    fake.push(
        "/v1/chat/completions",
        Reply::openai_stream(&["ok"], "stop", None),
    );
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();

    assert_eq!(text_of(provider.chat(request())).await.unwrap(), "ok");

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    // The backoff alone would be at most 50 ms in this config: only the header makes
    // the client wait a second.
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "retried after {gap:?}, Retry-After said 1s"
    );
}

#[tokio::test]
async fn a_retry_after_beyond_the_cap_gives_up_at_once() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/v1/chat/completions",
        Reply::status(429).header("retry-after", "3600"),
    );
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();

    let error = text_of(provider.chat(request())).await.unwrap_err();

    assert!(
        matches!(error, LlmError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(3600)),
        "{error:?}"
    );
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn persistent_503_gives_up_after_max_attempts() {
    let fake = FakeProvider::start().await;
    for _ in 0..5 {
        fake.push(
            "/v1/chat/completions",
            Reply::json(503, &json!({"error": "overloaded"})),
        );
    }
    let config = fast_config(ProviderKind::Openai, &fake.url());
    let max_attempts = config.retry.max_attempts as usize;
    let provider = from_config(&config).unwrap();

    let error = text_of(provider.chat(request())).await.unwrap_err();

    match error {
        LlmError::Http {
            status: 503,
            body_excerpt,
        } => assert!(body_excerpt.contains("overloaded")),
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    assert_eq!(fake.requests().len(), max_attempts);
}

#[tokio::test]
async fn persistent_429_ends_rate_limited() {
    let fake = FakeProvider::start().await;
    for _ in 0..3 {
        fake.push("/v1/chat/completions", Reply::status(429));
    }
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();

    let error = text_of(provider.chat(request())).await.unwrap_err();

    assert!(
        matches!(error, LlmError::RateLimited { retry_after: None }),
        "{error:?}"
    );
    assert_eq!(fake.requests().len(), 3);
}

#[tokio::test]
async fn a_connection_closed_before_the_response_is_retried() {
    let fake = FakeProvider::start().await;
    fake.push("/v1/chat/completions", Reply::drop_connection());
    fake.push(
        "/v1/chat/completions",
        Reply::openai_stream(&["back"], "stop", None),
    );
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();

    assert_eq!(text_of(provider.chat(request())).await.unwrap(), "back");
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn a_body_that_breaks_before_any_output_is_retried() {
    let fake = FakeProvider::start().await;
    // Headers and a role-only chunk (no text), then the connection dies.
    fake.push(
        "/v1/chat/completions",
        Reply::openai_stream(&[], "stop", None)
            .without_last(2)
            .then(Part::Cut),
    );
    fake.push(
        "/v1/chat/completions",
        Reply::openai_stream(&["whole"], "stop", None),
    );
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();

    assert_eq!(text_of(provider.chat(request())).await.unwrap(), "whole");
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn nothing_is_retried_once_output_has_been_streamed() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/v1/chat/completions",
        Reply::openai_stream(&["half an ans"], "stop", None)
            .without_last(2)
            .then(Part::Cut),
    );
    // A retry would find this, and the caller would see "half an answer" twice.
    fake.push(
        "/v1/chat/completions",
        Reply::openai_stream(&["half an answer"], "stop", None),
    );
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();
    let mut stream = provider.chat(request());

    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        ChatEvent::Delta("half an ans".into())
    );
    let error = stream.next().await.unwrap().unwrap_err();

    assert!(matches!(error, LlmError::Connection { .. }), "{error:?}");
    assert!(stream.next().await.is_none());
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_single_attempt_config_never_retries() {
    let fake = FakeProvider::start().await;
    fake.push("/v1/chat/completions", Reply::status(500));
    fake.push(
        "/v1/chat/completions",
        Reply::openai_stream(&["no"], "stop", None),
    );
    let mut config = fast_config(ProviderKind::Openai, &fake.url());
    config.retry.max_attempts = 1;
    let provider = from_config(&config).unwrap();

    let error = text_of(provider.chat(request())).await.unwrap_err();

    assert!(
        matches!(error, LlmError::Http { status: 500, .. }),
        "{error:?}"
    );
    assert_eq!(fake.requests().len(), 1);
}
