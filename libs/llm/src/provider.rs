//! The seam the agent depends on, and how a configuration becomes a provider.

use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::config::{ProviderConfig, ProviderKind};
use crate::error::LlmError;
use crate::ollama::Ollama;
use crate::openai::OpenAiCompatible;
use crate::types::{ChatEvent, ChatRequest, ModelInfo, OutputFormat};

/// A chat answer as it is generated: [`ChatEvent::Delta`]s, then exactly one
/// [`ChatEvent::Finished`]; or an error, after which the stream ends. Dropping it aborts
/// the HTTP request.
pub type ChatStream = BoxStream<'static, Result<ChatEvent, LlmError>>;

/// An LLM server. Object-safe, so the agent holds an `Arc<dyn Provider>` and tests can
/// hand it a fake.
pub trait Provider: fmt::Debug + Send + Sync + 'static {
    /// The base URL calls go to (for messages and `ListModels`).
    fn base_url(&self) -> &str;

    /// Whether the provider can enforce `format`. Sending one it cannot gives
    /// [`LlmError::Unsupported`]; the agent then falls back to its text format.
    fn supports(&self, format: &OutputFormat) -> bool;

    /// The models the provider offers.
    fn list_models(&self) -> BoxFuture<'_, Result<Vec<ModelInfo>, LlmError>>;

    /// Starts a streamed chat completion. Nothing is sent until the stream is polled.
    fn chat(&self, request: ChatRequest) -> ChatStream;
}

/// The provider `config` describes. The API key is read from the environment variable
/// `api_key_env` names, now, so a missing key is reported at start-up rather than as a
/// 401 on the first task.
pub fn from_config(config: &ProviderConfig) -> Result<Arc<dyn Provider>, LlmError> {
    let api_key = match &config.api_key_env {
        None => None,
        Some(name) => match std::env::var(name) {
            Ok(key) if !key.trim().is_empty() => Some(key.trim().to_owned()),
            _ => {
                return Err(LlmError::Config(format!(
                    "api_key_env names {name}, which is not set (or empty)"
                )));
            }
        },
    };
    let base_url = config.effective_base_url();
    let timeouts = config.timeouts.clone();
    let retry = config.retry.clone();
    Ok(match config.kind {
        ProviderKind::Openai => {
            Arc::new(OpenAiCompatible::new(base_url, api_key, timeouts, retry)?)
        }
        ProviderKind::Ollama => Arc::new(Ollama::new(base_url, api_key, timeouts, retry)?),
    })
}
