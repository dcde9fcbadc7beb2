//! The one error type of kiln-llm. Each variant says which gRPC code the agent should
//! answer with, so the mapping lives next to the meaning; the crate itself stays free of
//! gRPC.

use std::time::Duration;

/// What the agent should tell a user who has no provider running: both dialects, and
/// the environment the agent reads its provider settings from.
pub const UNREACHABLE_HINT: &str = "start Ollama (`ollama serve`) or llama.cpp's server \
     (`llama-server -m MODEL.gguf`), or point kiln at an OpenAI-compatible endpoint with \
     KILN_LLM_URL (and KILN_LLM_API_KEY if it needs a key)";

/// Everything that can go wrong talking to a model.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The provider configuration cannot work (a bad base URL, an API key variable that
    /// is named but not set). gRPC: FAILED_PRECONDITION.
    #[error("LLM provider configuration: {0}")]
    Config(String),

    /// Nothing answered at the provider's address, after every retry.
    /// gRPC: FAILED_PRECONDITION (the operator must start or configure a provider).
    #[error("no LLM provider reachable at {url} ({cause}): {hint}")]
    Unreachable {
        url: String,
        cause: String,
        hint: &'static str,
    },

    /// The provider kept answering 429, or asked for a wait longer than the configured
    /// `max_retry_after`. gRPC: UNAVAILABLE.
    #[error("the LLM provider is rate limiting{}", retry_after_text(*.retry_after))]
    RateLimited { retry_after: Option<Duration> },

    /// The call took longer than the overall timeout, or the provider went silent longer
    /// than the idle timeout. gRPC: DEADLINE_EXCEEDED.
    #[error("the LLM provider timed out: {during} for {after:?}")]
    Timeout {
        after: Duration,
        during: &'static str,
    },

    /// The provider answered with an HTTP error status (after retries for 5xx).
    /// gRPC: UNAVAILABLE for 5xx; FAILED_PRECONDITION for 4xx (a wrong key, an unknown
    /// model, a request the server's configuration refuses).
    #[error("the LLM provider answered HTTP {status}: {body_excerpt}")]
    Http { status: u16, body_excerpt: String },

    /// An established connection broke before the answer was complete, after every
    /// retry that was still allowed (none once output has been streamed).
    /// gRPC: UNAVAILABLE.
    #[error("the connection to the LLM provider at {url} broke: {detail}")]
    Connection { url: String, detail: String },

    /// The answer ended without a finish reason: the output is incomplete.
    /// gRPC: UNAVAILABLE (redoing the call may succeed).
    #[error("the LLM answer was truncated: {0}")]
    Truncated(String),

    /// The provider reported an error inside an otherwise successful stream (an
    /// `error` object). gRPC: UNAVAILABLE.
    #[error("the LLM provider reported an error: {message}")]
    Provider { message: String },

    /// The provider sent something that is not its documented wire format (a malformed
    /// SSE or JSON line, an over-long line, invalid UTF-8). gRPC: INTERNAL.
    #[error("the LLM provider broke its protocol: {0}")]
    Protocol(String),

    /// The request asks for something this provider cannot do (a GBNF grammar on Ollama).
    /// Check [`crate::Provider::supports`] first. gRPC: FAILED_PRECONDITION.
    #[error("not supported by this LLM provider: {0}")]
    Unsupported(String),

    /// The caller cancelled the call (see [`crate::until_cancelled`]); the HTTP request
    /// was aborted. gRPC: CANCELLED.
    #[error("the LLM call was cancelled")]
    Cancelled,
}

fn retry_after_text(retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!(" (retry after {}s)", d.as_secs_f64().ceil()),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_names_the_url_and_how_to_configure_a_provider() {
        let err = LlmError::Unreachable {
            url: "http://127.0.0.1:8080/v1/chat/completions".into(),
            cause: "connection refused".into(),
            hint: UNREACHABLE_HINT,
        };
        let text = err.to_string();
        assert!(
            text.contains("http://127.0.0.1:8080/v1/chat/completions"),
            "{text}"
        );
        assert!(text.contains("KILN_LLM_URL"), "{text}");
        assert!(text.contains("Ollama"), "{text}");
    }

    #[test]
    fn rate_limited_says_how_long_to_wait() {
        let err = LlmError::RateLimited {
            retry_after: Some(Duration::from_millis(1500)),
        };
        assert!(err.to_string().contains("retry after 2s"), "{err}");
    }
}
