//! Ollama's native dialect: `POST /api/chat` streamed as newline-delimited JSON,
//! `GET /api/tags`.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{RetryConfig, TimeoutConfig};
use crate::error::LlmError;
use crate::openai::excerpt;
use crate::provider::{ChatStream, Provider};
use crate::stream::{Decoded, Decoder, chat_stream};
use crate::transport::{RequestSpec, Transport};
use crate::types::{ChatEvent, ChatRequest, FinishReason, ModelInfo, OutputFormat, Usage};

/// An Ollama server.
#[derive(Debug, Clone)]
pub struct Ollama {
    transport: Arc<Transport>,
}

impl Ollama {
    /// `base_url` is the server's root (`http://127.0.0.1:11434`). The API key, if any,
    /// is sent as a bearer token (for an Ollama behind an authenticating proxy).
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        timeouts: TimeoutConfig,
        retry: RetryConfig,
    ) -> Result<Self, LlmError> {
        Ok(Self {
            transport: Transport::new(base_url, api_key, timeouts, retry)?,
        })
    }
}

/// The wire body of a request, or why Ollama cannot serve it.
pub(crate) fn request_body(request: &ChatRequest) -> Result<Value, LlmError> {
    let mut options = serde_json::Map::new();
    if let Some(t) = request.temperature {
        options.insert("temperature".into(), json!(t));
    }
    if let Some(n) = request.max_tokens {
        options.insert("num_predict".into(), json!(n));
    }
    let mut body = json!({
        "model": request.model,
        "messages": request.messages,
        "stream": true,
        "options": options,
    });
    match &request.output {
        None => {}
        Some(OutputFormat::JsonSchema(schema)) => body["format"] = schema.clone(),
        Some(OutputFormat::Grammar(_)) => {
            return Err(LlmError::Unsupported(
                "Ollama takes a JSON schema (`format`), not a GBNF grammar".into(),
            ));
        }
    }
    Ok(body)
}

impl Provider for Ollama {
    fn base_url(&self) -> &str {
        self.transport.base_url()
    }

    fn supports(&self, format: &OutputFormat) -> bool {
        matches!(format, OutputFormat::JsonSchema(_))
    }

    fn list_models(&self) -> BoxFuture<'_, Result<Vec<ModelInfo>, LlmError>> {
        Box::pin(async move {
            let tags: Tags = self.transport.get_json("/api/tags").await?;
            Ok(tags
                .models
                .into_iter()
                .map(|m| ModelInfo {
                    id: m.name,
                    size_bytes: m.size,
                })
                .collect())
        })
    }

    fn chat(&self, request: ChatRequest) -> ChatStream {
        let body = match request_body(&request) {
            Ok(body) => body,
            Err(error) => return futures::stream::once(async { Err(error) }).boxed(),
        };
        let spec = RequestSpec {
            method: Method::POST,
            path: "/api/chat",
            body: Some(Bytes::from(body.to_string())),
        };
        chat_stream::<NdjsonDecoder>(self.transport.clone(), spec)
    }
}

#[derive(Deserialize)]
struct Tags {
    models: Vec<Tag>,
}

#[derive(Deserialize)]
struct Tag {
    name: String,
    size: Option<u64>,
}

#[derive(Deserialize)]
struct Line {
    message: Option<LineMessage>,
    #[serde(default)]
    done: bool,
    done_reason: Option<String>,
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct LineMessage {
    #[serde(default)]
    content: String,
}

/// One JSON object per line; the last has `done: true` and the token counts.
#[derive(Debug, Default)]
pub(crate) struct NdjsonDecoder;

impl Decoder for NdjsonDecoder {
    fn line(&mut self, line: &str) -> Result<Decoded, LlmError> {
        if line.trim().is_empty() {
            return Ok(Decoded::default());
        }
        let line: Line = serde_json::from_str(line).map_err(|e| {
            LlmError::Protocol(format!("malformed JSON line ({e}): {:?}", excerpt(line)))
        })?;
        if let Some(message) = line.error {
            return Err(LlmError::Provider { message });
        }
        let mut events = Vec::new();
        if let Some(text) = line.message.map(|m| m.content).filter(|t| !t.is_empty()) {
            events.push(ChatEvent::Delta(text));
        }
        if line.done {
            let usage =
                (line.prompt_eval_count.is_some() || line.eval_count.is_some()).then(|| Usage {
                    prompt_tokens: line.prompt_eval_count.unwrap_or(0),
                    completion_tokens: line.eval_count.unwrap_or(0),
                });
            events.push(ChatEvent::Finished {
                finish_reason: line
                    .done_reason
                    .as_deref()
                    .map_or(FinishReason::Stop, FinishReason::from_wire),
                usage,
            });
        }
        Ok(Decoded {
            events,
            done: line.done,
        })
    }

    fn end(&mut self) -> Result<Vec<ChatEvent>, LlmError> {
        Err(LlmError::Truncated(
            "the stream ended before `done: true`".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Message;

    #[test]
    fn options_carry_temperature_and_the_token_limit() {
        let mut request = ChatRequest::new("qwen", vec![Message::system("be brief")]);
        request.temperature = Some(0.0);
        request.max_tokens = Some(128);
        let body = request_body(&request).unwrap();
        assert_eq!(
            body["options"],
            json!({"temperature": 0.0, "num_predict": 128})
        );
        assert_eq!(body["messages"][0]["role"], "system");
        assert!(body.get("format").is_none());
    }

    #[test]
    fn a_grammar_is_refused_not_silently_dropped() {
        let mut request = ChatRequest::new("qwen", vec![]);
        request.output = Some(OutputFormat::Grammar("root ::= \"x\"".into()));
        assert!(matches!(
            request_body(&request),
            Err(LlmError::Unsupported(_))
        ));
    }
}
