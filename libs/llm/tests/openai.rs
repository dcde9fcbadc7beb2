//! The OpenAI-compatible dialect against the fake provider: what is sent, and how the
//! streamed answer comes back.

mod common;

use common::{FakeProvider, Reply, fast_config};
use futures::StreamExt as _;
use kiln_llm::{
    ChatEvent, ChatRequest, FinishReason, LlmError, Message, OpenAiCompatible, OutputFormat,
    ProviderKind, Usage, from_config,
};
use serde_json::json;

fn request() -> ChatRequest {
    let mut request = ChatRequest::new(
        "qwen2.5-coder",
        vec![
            Message::system("You write Python."),
            Message::user("add(a, b)"),
        ],
    );
    request.temperature = Some(0.2);
    request.max_tokens = Some(256);
    request
}

/// All deltas joined, and the final event; panics on an error.
async fn collect(stream: kiln_llm::ChatStream) -> (String, ChatEvent) {
    let events: Vec<ChatEvent> = stream.map(|e| e.unwrap()).collect().await;
    let (last, deltas) = events.split_last().expect("at least the final event");
    let text = deltas
        .iter()
        .map(|e| match e {
            ChatEvent::Delta(t) => t.as_str(),
            other => panic!("a second final event before the end: {other:?}"),
        })
        .collect();
    (text, last.clone())
}

#[tokio::test]
async fn streamed_deltas_reassemble_with_finish_reason_and_usage() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/v1/chat/completions",
        Reply::openai_stream(
            &["def add", "(a, b):\n", "    return a + b\n"],
            "stop",
            Some((31, 12)),
        ),
    );
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();

    let (text, last) = collect(provider.chat(request())).await;

    assert_eq!(text, "def add(a, b):\n    return a + b\n");
    assert_eq!(
        last,
        ChatEvent::Finished {
            finish_reason: FinishReason::Stop,
            usage: Some(Usage {
                prompt_tokens: 31,
                completion_tokens: 12
            }),
        }
    );
    let sent = &fake.requests()[0];
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("POST", "/v1/chat/completions")
    );
    assert_eq!(sent.header("content-type"), Some("application/json"));
    assert_eq!(
        sent.header("authorization"),
        None,
        "no key configured, none sent"
    );
    let body = sent.json();
    assert_eq!(body["model"], "qwen2.5-coder");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
    assert_eq!(body["max_tokens"], 256);
    assert!((body["temperature"].as_f64().unwrap() - 0.2).abs() < 1e-6);
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "You write Python."},
               {"role": "user", "content": "add(a, b)"}])
    );
    assert!(body.get("response_format").is_none());
}

#[tokio::test]
async fn a_length_finish_and_missing_usage_are_reported_as_such() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/v1/chat/completions",
        Reply::openai_stream(&["par", "tial"], "length", None),
    );
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();

    let (text, last) = collect(provider.chat(request())).await;

    assert_eq!(text, "partial");
    assert_eq!(
        last,
        ChatEvent::Finished {
            finish_reason: FinishReason::Length,
            usage: None
        }
    );
}

#[tokio::test]
async fn a_json_schema_is_sent_as_response_format() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/v1/chat/completions",
        Reply::openai_stream(&["{}"], "stop", None),
    );
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();
    let schema = json!({"type": "object", "properties": {"files": {"type": "array"}},
                        "required": ["files"], "additionalProperties": false});
    let mut request = request();
    request.output = Some(OutputFormat::JsonSchema(schema.clone()));
    assert!(provider.supports(request.output.as_ref().unwrap()));

    collect(provider.chat(request)).await;

    let body = fake.requests()[0].json();
    assert_eq!(
        body["response_format"],
        json!({"type": "json_schema",
               "json_schema": {"name": "kiln_output", "schema": schema, "strict": true}})
    );
    assert!(body.get("grammar").is_none());
}

#[tokio::test]
async fn a_grammar_is_sent_as_llama_cpp_grammar() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/v1/chat/completions",
        Reply::openai_stream(&["yes"], "stop", None),
    );
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();
    let mut request = request();
    request.output = Some(OutputFormat::Grammar("root ::= \"yes\" | \"no\"".into()));

    collect(provider.chat(request)).await;

    let body = fake.requests()[0].json();
    assert_eq!(body["grammar"], "root ::= \"yes\" | \"no\"");
    assert!(body.get("response_format").is_none());
}

#[tokio::test]
async fn models_come_from_v1_models() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/v1/models",
        Reply::json(
            200,
            &json!({"object": "list", "data": [
                {"id": "qwen2.5-coder-1.5b", "object": "model", "owned_by": "llamacpp"},
                {"id": "qwen2.5-coder-0.5b", "object": "model"},
            ]}),
        ),
    );
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();

    let models = provider.list_models().await.unwrap();

    let ids: Vec<_> = models.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"]);
    assert_eq!(fake.requests()[0].method, "GET");
}

#[tokio::test]
async fn a_base_url_ending_in_v1_gets_no_second_v1() {
    let fake = FakeProvider::start().await;
    fake.push("/v1/models", Reply::json(200, &json!({"data": []})));
    let provider = from_config(&fast_config(
        ProviderKind::Openai,
        &format!("{}/v1/", fake.url()),
    ))
    .unwrap();

    assert!(provider.list_models().await.unwrap().is_empty());
    assert_eq!(fake.requests()[0].path, "/v1/models");
}

#[tokio::test]
async fn the_api_key_goes_in_a_bearer_header() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/v1/chat/completions",
        Reply::openai_stream(&["ok"], "stop", None),
    );
    let config = fast_config(ProviderKind::Openai, &fake.url());
    let provider = OpenAiCompatible::new(
        &fake.url(),
        Some("sk-test-123".into()),
        config.timeouts,
        config.retry,
    )
    .unwrap();

    collect(kiln_llm::Provider::chat(&provider, request())).await;

    assert_eq!(
        fake.requests()[0].header("authorization"),
        Some("Bearer sk-test-123")
    );
    assert!(
        !format!("{provider:?}").contains("sk-test-123"),
        "the key leaks through Debug"
    );
}

#[tokio::test]
async fn from_config_reads_the_key_from_the_named_variable() {
    let fake = FakeProvider::start().await;
    fake.push("/v1/models", Reply::json(200, &json!({"data": []})));
    // PATH is set in every environment tests run in; setting a variable would need
    // unsafe code and would race with the other tests of this binary.
    let mut config = fast_config(ProviderKind::Openai, &fake.url());
    config.api_key_env = Some("PATH".into());
    let provider = from_config(&config).unwrap();

    provider.list_models().await.unwrap();

    let expected = format!("Bearer {}", std::env::var("PATH").unwrap().trim());
    assert_eq!(
        fake.requests()[0].header("authorization"),
        Some(expected.as_str())
    );
}

#[tokio::test]
async fn a_key_variable_that_is_not_set_is_a_config_error() {
    let mut config = fast_config(ProviderKind::Openai, "http://127.0.0.1:9");
    config.api_key_env = Some("KILN_LLM_TEST_VARIABLE_THAT_IS_NEVER_SET".into());
    let err = from_config(&config).unwrap_err();
    assert!(matches!(err, LlmError::Config(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("KILN_LLM_TEST_VARIABLE_THAT_IS_NEVER_SET"),
        "{err}"
    );
}

#[tokio::test]
async fn a_base_url_that_is_not_http_is_a_config_error() {
    for bad in [
        "127.0.0.1:8080",
        "ftp://127.0.0.1",
        "http://127.0.0.1:8080/?x=1",
        "not a url",
    ] {
        let err = from_config(&fast_config(ProviderKind::Openai, bad)).unwrap_err();
        assert!(matches!(err, LlmError::Config(_)), "{bad}: {err:?}");
    }
}

#[tokio::test]
async fn a_key_no_header_can_carry_is_a_config_error() {
    let config = fast_config(ProviderKind::Openai, "http://127.0.0.1:9");
    let err = OpenAiCompatible::new(
        "http://127.0.0.1:9",
        Some("sk-\nInjected: yes".into()),
        config.timeouts,
        config.retry,
    )
    .unwrap_err();
    assert!(matches!(err, LlmError::Config(_)), "{err:?}");
    assert!(
        !err.to_string().contains("sk-"),
        "the key leaks into the message: {err}"
    );
}

#[tokio::test]
async fn a_client_error_is_not_retried() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/v1/chat/completions",
        Reply::json(
            401,
            &json!({"error": {"message": "Incorrect API key provided"}}),
        ),
    );
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();

    let first = provider.chat(request()).next().await.unwrap();

    match first {
        Err(LlmError::Http {
            status: 401,
            body_excerpt,
        }) => {
            assert!(body_excerpt.contains("Incorrect API key"), "{body_excerpt}")
        }
        other => panic!("expected HTTP 401, got {other:?}"),
    }
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let fake = FakeProvider::start().await;
    fake.push(
        "/v1/chat/completions",
        Reply::status(307).header("location", "/elsewhere/v1/chat/completions"),
    );
    fake.push(
        "/elsewhere/v1/chat/completions",
        Reply::openai_stream(&["no"], "stop", None),
    );
    let config = fast_config(ProviderKind::Openai, &fake.url());
    let provider = OpenAiCompatible::new(
        &fake.url(),
        Some("sk-test".into()),
        config.timeouts,
        config.retry,
    )
    .unwrap();

    let first = kiln_llm::Provider::chat(&provider, request())
        .next()
        .await
        .unwrap();

    assert!(
        matches!(first, Err(LlmError::Http { status: 307, .. })),
        "{first:?}"
    );
    let paths: Vec<_> = fake.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        ["/v1/chat/completions"],
        "the key went to a redirect target"
    );
}
