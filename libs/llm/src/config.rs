//! How a provider is configured. Durations are written like the rest of kiln's config
//! (`"500ms"`, `"90s"`, `"15m"`, `"2h"`, or a number of seconds); unknown keys are an
//! error, so a typo never silently does nothing.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which API dialect the provider speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// `/v1/chat/completions` with SSE and `/v1/models`: llama.cpp's server, vLLM,
    /// LM Studio, OpenAI. The default.
    #[default]
    Openai,
    /// Ollama's native `/api/chat` (NDJSON) and `/api/tags`.
    Ollama,
}

impl ProviderKind {
    /// Where the provider listens when `base_url` is not given: llama.cpp's server on its
    /// default port for `openai`, Ollama's default port for `ollama`.
    pub fn default_base_url(self) -> &'static str {
        match self {
            Self::Openai => "http://127.0.0.1:8080",
            Self::Ollama => "http://127.0.0.1:11434",
        }
    }
}

/// One provider: its dialect, address, key and robustness settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// The dialect. Default: `openai`.
    pub kind: ProviderKind,
    /// The server's address, without the API path (`/v1` at the end is accepted for
    /// OpenAI-compatible servers). Default: `http://127.0.0.1:8080` for `openai`,
    /// `http://127.0.0.1:11434` for `ollama`.
    pub base_url: Option<String>,
    /// The NAME of the environment variable that holds the API key, sent as
    /// `Authorization: Bearer`. The key itself never goes in a config file. Default:
    /// none (no Authorization header).
    pub api_key_env: Option<String>,
    pub timeouts: TimeoutConfig,
    pub retry: RetryConfig,
}

impl ProviderConfig {
    /// The address in effect: `base_url`, or the kind's default.
    pub fn effective_base_url(&self) -> &str {
        self.base_url
            .as_deref()
            .unwrap_or_else(|| self.kind.default_base_url())
    }
}

/// How long to wait for what.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutConfig {
    /// Establishing the TCP (and TLS) connection. Default: `5s`.
    #[serde(with = "kiln_config::duration")]
    pub connect: Duration,
    /// One whole call, retries and waits included. Default: `10m` (a long answer from a
    /// small local model on two cores takes minutes).
    #[serde(with = "kiln_config::duration")]
    pub request: Duration,
    /// Silence allowed between two chunks of a response, and before the response
    /// headers (some servers send those only when the first token is ready, so prompt
    /// processing counts). Default: `2m`.
    #[serde(with = "kiln_config::duration")]
    pub idle: Duration,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(600),
            idle: Duration::from_secs(120),
        }
    }
}

/// When and how often to try again. Retries happen only before any output has been
/// streamed to the caller, on connection errors, 429 and 5xx.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in total, the first included; 1 disables retries. Default: `4`.
    pub max_attempts: u32,
    /// The wait before the first retry; it doubles each time, with jitter (a random
    /// point in the upper half of the interval). Default: `500ms`.
    #[serde(with = "kiln_config::duration")]
    pub initial_backoff: Duration,
    /// The longest backoff between two attempts. Default: `8s`.
    #[serde(with = "kiln_config::duration")]
    pub max_backoff: Duration,
    /// The longest `Retry-After` kiln waits for; a provider asking for more gets a
    /// `RateLimited` error at once rather than a retry that is sure to fail.
    /// Default: `30s`.
    #[serde(with = "kiln_config::duration")]
    pub max_retry_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_config_is_llama_cpp_on_its_default_port() {
        let config: ProviderConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config.kind, ProviderKind::Openai);
        assert_eq!(config.effective_base_url(), "http://127.0.0.1:8080");
        assert_eq!(config.timeouts, TimeoutConfig::default());
        assert_eq!(config.retry.max_attempts, 4);
    }

    #[test]
    fn ollama_defaults_to_its_own_port() {
        let config: ProviderConfig = serde_json::from_str(r#"{"kind":"ollama"}"#).unwrap();
        assert_eq!(config.effective_base_url(), "http://127.0.0.1:11434");
    }

    #[test]
    fn durations_read_like_the_rest_of_kiln() {
        let config: ProviderConfig = serde_json::from_str(
            r#"{"timeouts":{"connect":"250ms","request":90,"idle":"2m"},
                "retry":{"max_attempts":2,"initial_backoff":"10ms","max_backoff":"1s","max_retry_after":"1h"}}"#,
        )
        .unwrap();
        assert_eq!(config.timeouts.connect, Duration::from_millis(250));
        assert_eq!(config.timeouts.request, Duration::from_secs(90));
        assert_eq!(config.timeouts.idle, Duration::from_secs(120));
        assert_eq!(config.retry.max_retry_after, Duration::from_secs(3600));
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_errors() {
        for bad in [
            r#"{"api_key":"sk-secret"}"#,
            r#"{"timeouts":{"conect":"1s"}}"#,
            r#"{"timeouts":{"idle":"5 parsecs"}}"#,
            r#"{"kind":"anthropic"}"#,
        ] {
            assert!(
                serde_json::from_str::<ProviderConfig>(bad).is_err(),
                "{bad} was accepted"
            );
        }
    }
}
