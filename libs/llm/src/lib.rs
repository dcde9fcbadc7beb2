//! kiln's LLM provider layer: the [`Provider`] trait the agent depends on, and two
//! implementations over HTTP, [`OpenAiCompatible`] (llama.cpp's server, vLLM, LM Studio,
//! OpenAI) and [`Ollama`].
//!
//! Every call is streamed ([`ChatStream`]), bounded by a connect timeout, an overall
//! timeout and an idle timeout between chunks, and retried with jittered exponential
//! backoff on connection errors, 429 and 5xx, honouring `Retry-After`, but only before
//! any output reached the caller. Dropping a stream aborts its HTTP request. All
//! failures are one [`LlmError`], whose variants document the gRPC code to answer.
//! See the README for the policy in full.

mod config;
mod error;
mod ollama;
mod openai;
mod provider;
mod retry;
mod stream;
mod transport;
mod types;

pub use config::{ProviderConfig, ProviderKind, RetryConfig, TimeoutConfig};
pub use error::{LlmError, UNREACHABLE_HINT};
pub use ollama::Ollama;
pub use openai::OpenAiCompatible;
pub use provider::{ChatStream, Provider, from_config};
pub use stream::until_cancelled;
pub use types::{
    ChatEvent, ChatRequest, FinishReason, Message, ModelInfo, OutputFormat, Role, Usage,
};
