//! The OpenAI-compatible dialect: `POST /v1/chat/completions` streamed as server-sent
//! events, `GET /v1/models`. Spoken by llama.cpp's server, vLLM, LM Studio and OpenAI.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{RetryConfig, TimeoutConfig};
use crate::error::LlmError;
use crate::provider::{ChatStream, Provider};
use crate::stream::{Decoded, Decoder, chat_stream};
use crate::transport::{RequestSpec, Transport};
use crate::types::{ChatEvent, ChatRequest, FinishReason, ModelInfo, OutputFormat, Usage};

/// The `name` OpenAI requires on a `json_schema` response format.
const SCHEMA_NAME: &str = "kiln_output";

/// A server that speaks OpenAI's chat completions API.
#[derive(Debug, Clone)]
pub struct OpenAiCompatible {
    transport: Arc<Transport>,
}

impl OpenAiCompatible {
    /// `base_url` is the server's root (`http://127.0.0.1:8080`); one ending in `/v1`
    /// (`https://api.openai.com/v1`) works too.
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

/// The wire body of a request.
pub(crate) fn request_body(request: &ChatRequest) -> Value {
    let mut body = json!({
        "model": request.model,
        "messages": request.messages,
        "stream": true,
        // Without this the stream carries no token counts.
        "stream_options": {"include_usage": true},
    });
    if let Some(t) = request.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(n) = request.max_tokens {
        body["max_tokens"] = json!(n);
    }
    match &request.output {
        None => {}
        Some(OutputFormat::JsonSchema(schema)) => {
            body["response_format"] = json!({
                "type": "json_schema",
                "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": true},
            });
        }
        Some(OutputFormat::Grammar(grammar)) => body["grammar"] = json!(grammar),
    }
    body
}

impl Provider for OpenAiCompatible {
    fn base_url(&self) -> &str {
        self.transport.base_url()
    }

    /// Both: llama.cpp's server takes `grammar`; other servers may ignore it, which the
    /// agent's defensive parser survives.
    fn supports(&self, _format: &OutputFormat) -> bool {
        true
    }

    fn list_models(&self) -> BoxFuture<'_, Result<Vec<ModelInfo>, LlmError>> {
        Box::pin(async move {
            let list: ModelList = self.transport.get_json("/v1/models").await?;
            Ok(list
                .data
                .into_iter()
                .map(|m| ModelInfo {
                    id: m.id,
                    size_bytes: None,
                })
                .collect())
        })
    }

    fn chat(&self, request: ChatRequest) -> ChatStream {
        let spec = RequestSpec {
            method: Method::POST,
            path: "/v1/chat/completions",
            body: Some(Bytes::from(request_body(&request).to_string())),
        };
        chat_stream::<SseDecoder>(self.transport.clone(), spec)
    }
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<WireUsage>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    index: u32,
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

/// Server-sent events (one `data:` line per event in practice, but multi-line events
/// and comments are handled as the spec says), into chat events.
#[derive(Debug, Default)]
pub(crate) struct SseDecoder {
    event: Option<String>,
    data: Vec<String>,
    finish_reason: Option<FinishReason>,
    usage: Option<Usage>,
}

impl Decoder for SseDecoder {
    fn line(&mut self, line: &str) -> Result<Decoded, LlmError> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return Ok(Decoded::default()); // a comment (keep-alive)
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => self.data.push(value.to_owned()),
            "event" => self.event = Some(value.to_owned()),
            "id" | "retry" => {}
            // llama.cpp's server has written stream errors as `error: {json}`.
            "error" => {
                self.event = Some("error".into());
                self.data.push(value.to_owned());
            }
            _ => {
                return Err(LlmError::Protocol(format!(
                    "expected server-sent events, got a line starting {:?}",
                    excerpt(line)
                )));
            }
        }
        Ok(Decoded::default())
    }

    fn end(&mut self) -> Result<Vec<ChatEvent>, LlmError> {
        let mut events = Vec::new();
        // A last event without its blank line still counts.
        if !self.data.is_empty() {
            let decoded = self.dispatch()?;
            events.extend(decoded.events);
            if decoded.done {
                return Ok(events);
            }
        }
        // Some servers end the body after the finish reason without `[DONE]`.
        let finished = self.finished().ok_or_else(|| {
            LlmError::Truncated("the stream ended without a finish reason".into())
        })?;
        events.push(finished);
        Ok(events)
    }
}

impl SseDecoder {
    fn dispatch(&mut self) -> Result<Decoded, LlmError> {
        let event = self.event.take();
        if self.data.is_empty() {
            return Ok(Decoded::default());
        }
        let data = std::mem::take(&mut self.data).join("\n");
        if event.as_deref() == Some("error") {
            return Err(provider_error(&data));
        }
        if data.trim() == "[DONE]" {
            let finished = self.finished().ok_or_else(|| {
                LlmError::Truncated("the server sent [DONE] without a finish reason".into())
            })?;
            return Ok(Decoded {
                events: vec![finished],
                done: true,
            });
        }
        let chunk: Chunk = serde_json::from_str(&data).map_err(|e| {
            LlmError::Protocol(format!(
                "malformed JSON in an event ({e}): {:?}",
                excerpt(&data)
            ))
        })?;
        if let Some(error) = chunk.error {
            return Err(LlmError::Provider {
                message: error_message(&error),
            });
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(Usage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
            });
        }
        let mut events = Vec::new();
        // kiln asks for one choice; a server that sends more gets the first one read.
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            if let Some(text) = choice
                .delta
                .and_then(|d| d.content)
                .filter(|t| !t.is_empty())
            {
                events.push(ChatEvent::Delta(text));
            }
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(FinishReason::from_wire(&reason));
            }
        }
        Ok(Decoded {
            events,
            done: false,
        })
    }

    fn finished(&self) -> Option<ChatEvent> {
        self.finish_reason
            .clone()
            .map(|finish_reason| ChatEvent::Finished {
                finish_reason,
                usage: self.usage,
            })
    }
}

fn provider_error(data: &str) -> LlmError {
    let message = serde_json::from_str::<Value>(data)
        .map(|v| error_message(v.get("error").unwrap_or(&v)))
        .unwrap_or_else(|_| excerpt(data).to_owned());
    LlmError::Provider { message }
}

/// The human part of an OpenAI-style error object (`{"message": …}`) or a bare string.
pub(crate) fn error_message(error: &Value) -> String {
    match error {
        Value::String(s) => s.clone(),
        other => other
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| excerpt(&other.to_string()).to_owned(), str::to_owned),
    }
}

pub(crate) fn excerpt(text: &str) -> &str {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Message;

    fn feed(decoder: &mut SseDecoder, text: &str) -> Result<Vec<ChatEvent>, LlmError> {
        let mut events = Vec::new();
        for line in text.split('\n') {
            events.extend(decoder.line(line)?.events);
        }
        Ok(events)
    }

    #[test]
    fn a_multi_line_event_is_one_json_document() {
        let mut decoder = SseDecoder::default();
        let events = feed(
            &mut decoder,
            ": keep-alive\ndata: {\"choices\":[{\"delta\":\ndata: {\"content\":\"hi\"}}]}\n\n",
        )
        .unwrap();
        assert_eq!(events, vec![ChatEvent::Delta("hi".into())]);
    }

    #[test]
    fn only_the_first_choice_is_read() {
        let mut decoder = SseDecoder::default();
        let events = feed(
            &mut decoder,
            "data: {\"choices\":[{\"index\":1,\"delta\":{\"content\":\"B\"}},{\"index\":0,\"delta\":{\"content\":\"A\"}}]}\n\n",
        )
        .unwrap();
        assert_eq!(events, vec![ChatEvent::Delta("A".into())]);
    }

    #[test]
    fn not_sse_at_all_is_a_protocol_error() {
        let mut decoder = SseDecoder::default();
        let err = feed(&mut decoder, "<html>502 Bad Gateway</html>\n").unwrap_err();
        assert!(matches!(err, LlmError::Protocol(_)), "{err:?}");
    }

    #[test]
    fn the_request_body_asks_for_usage_and_maps_each_constraint() {
        let mut request = ChatRequest::new("m", vec![Message::user("hi")]);
        request.temperature = Some(0.5);
        request.max_tokens = Some(64);
        let body = request_body(&request);
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(
            body["messages"][0],
            json!({"role": "user", "content": "hi"})
        );
        assert!(body.get("response_format").is_none() && body.get("grammar").is_none());

        request.output = Some(OutputFormat::Grammar("root ::= \"x\"".into()));
        assert_eq!(request_body(&request)["grammar"], "root ::= \"x\"");
    }
}
