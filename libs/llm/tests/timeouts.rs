//! Timeouts, an absent provider, and cancellation that really closes the connection.

mod common;

use std::time::Duration;

use common::{FakeProvider, Part, Reply, fast_config, openai_chunk};
use futures::StreamExt as _;
use kiln_llm::{
    ChatEvent, ChatRequest, LlmError, Message, ProviderKind, from_config, until_cancelled,
};
use serde_json::json;

fn request() -> ChatRequest {
    ChatRequest::new("m", vec![Message::user("hi")])
}

/// One delta, then the server goes quiet until the client closes the connection.
fn one_delta_then_silence() -> Reply {
    Reply::status(200)
        .header("content-type", "text/event-stream")
        .sse(&openai_chunk(json!({"content": "first"}), None))
        .then(Part::Hang)
}

#[tokio::test]
async fn silence_between_chunks_is_an_idle_timeout() {
    let fake = FakeProvider::start().await;
    fake.push("/v1/chat/completions", one_delta_then_silence());
    let mut config = fast_config(ProviderKind::Openai, &fake.url());
    config.timeouts.idle = Duration::from_millis(300);
    let provider = from_config(&config).unwrap();
    let mut stream = provider.chat(request());

    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        ChatEvent::Delta("first".into())
    );
    let error = stream.next().await.unwrap().unwrap_err();

    assert!(
        matches!(error, LlmError::Timeout { after, during: "waiting for the next chunk" } if after == Duration::from_millis(300)),
        "{error:?}"
    );
    // The timed-out request is aborted, not left generating.
    fake.wait_for_closed_connections(1).await;
    assert_eq!(fake.requests().len(), 1, "a timeout is not retried");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_waiting_for_the_response() {
    let fake = FakeProvider::start().await;
    fake.push("/api/chat", Reply::silent());
    let mut config = fast_config(ProviderKind::Ollama, &fake.url());
    config.timeouts.idle = Duration::from_millis(300);
    let provider = from_config(&config).unwrap();

    let error = provider.chat(request()).next().await.unwrap().unwrap_err();

    assert!(
        matches!(
            error,
            LlmError::Timeout {
                during: "waiting for the response",
                ..
            }
        ),
        "{error:?}"
    );
    fake.wait_for_closed_connections(1).await;
}

#[tokio::test]
async fn a_trickling_answer_is_stopped_by_the_overall_timeout() {
    let fake = FakeProvider::start().await;
    let mut reply = Reply::status(200).header("content-type", "text/event-stream");
    for _ in 0..100 {
        reply = reply
            .sse(&openai_chunk(json!({"content": "."}), None))
            .then(Part::Pause(Duration::from_millis(50)));
    }
    fake.push("/v1/chat/completions", reply);
    let mut config = fast_config(ProviderKind::Openai, &fake.url());
    config.timeouts.request = Duration::from_millis(400);
    config.timeouts.idle = Duration::from_secs(5);
    let provider = from_config(&config).unwrap();

    let events: Vec<_> = provider.chat(request()).collect().await;

    let (last, deltas) = events.split_last().unwrap();
    assert!(!deltas.is_empty() && deltas.iter().all(|e| matches!(e, Ok(ChatEvent::Delta(_)))));
    assert!(
        matches!(last, Err(LlmError::Timeout { during: "the whole call", after }) if *after == Duration::from_millis(400)),
        "{last:?}"
    );
}

/// An address with nothing listening: bound, then released.
async fn free_address() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn nothing_listening_is_unreachable_with_the_url_and_a_hint() {
    let url = free_address().await;
    for kind in [ProviderKind::Openai, ProviderKind::Ollama] {
        let provider = from_config(&fast_config(kind, &url)).unwrap();

        let error = provider.chat(request()).next().await.unwrap().unwrap_err();

        let LlmError::Unreachable { url: tried, .. } = &error else {
            panic!("expected Unreachable, got {error:?}");
        };
        assert!(tried.starts_with(&url), "{tried}");
        let message = error.to_string();
        assert!(message.contains(tried.as_str()), "{message}");
        assert!(
            message.contains("KILN_LLM_URL") && message.contains("Ollama"),
            "{message}"
        );

        let error = provider.list_models().await.unwrap_err();
        assert!(matches!(error, LlmError::Unreachable { .. }), "{error:?}");
    }
}

#[tokio::test]
async fn dropping_the_stream_closes_the_connection() {
    let fake = FakeProvider::start().await;
    fake.push("/v1/chat/completions", one_delta_then_silence());
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();
    let mut stream = provider.chat(request());
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        ChatEvent::Delta("first".into())
    );

    drop(stream);

    // The idle timeout here is 5 s and the guard in the helper 10 s: only the drop can
    // close the connection in time.
    fake.wait_for_closed_connections(1).await;
}

#[tokio::test]
async fn cancelling_ends_the_stream_with_cancelled_and_closes_the_connection() {
    let fake = FakeProvider::start().await;
    fake.push("/v1/chat/completions", one_delta_then_silence());
    let provider = from_config(&fast_config(ProviderKind::Openai, &fake.url())).unwrap();
    let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
    let mut stream = until_cancelled(provider.chat(request()), async {
        let _ = cancelled.await;
    });
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        ChatEvent::Delta("first".into())
    );

    cancel.send(()).unwrap();

    assert!(matches!(
        stream.next().await,
        Some(Err(LlmError::Cancelled))
    ));
    fake.wait_for_closed_connections(1).await;
    assert!(stream.next().await.is_none());
}
