//! The provider-neutral request and answer types. Each dialect module translates these
//! to and from its wire format; nothing here knows about HTTP.

use serde::Serialize;

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// A constraint on the shape of the model's output, where the provider can enforce it.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// A JSON schema the answer must follow. OpenAI-compatible servers get
    /// `response_format: {type: json_schema, json_schema: {name, schema, strict: true}}`
    /// (llama.cpp's server reads the same); Ollama gets the schema as `format`. With
    /// OpenAI itself, strict mode accepts only its schema subset (every property
    /// required, `additionalProperties: false`).
    JsonSchema(serde_json::Value),
    /// A GBNF grammar, sent as llama.cpp's `grammar` field. Ollama has no equivalent.
    Grammar(String),
}

/// One chat completion call.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    /// `None` leaves the provider's default.
    pub temperature: Option<f32>,
    /// The most tokens to generate; `None` leaves the provider's default.
    pub max_tokens: Option<u32>,
    pub output: Option<OutputFormat>,
}

impl ChatRequest {
    pub fn new(model: impl Into<String>, messages: Vec<Message>) -> Self {
        Self {
            model: model.into(),
            messages,
            temperature: None,
            max_tokens: None,
            output: None,
        }
    }
}

/// Why the model stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// A natural end or a stop sequence.
    Stop,
    /// `max_tokens` (or the context) ran out: the output is cut short.
    Length,
    /// The provider filtered the output.
    ContentFilter,
    /// Anything else the provider said, verbatim.
    Other(String),
}

impl FinishReason {
    pub(crate) fn from_wire(reason: &str) -> Self {
        match reason {
            "stop" | "eos" => Self::Stop,
            "length" => Self::Length,
            "content_filter" => Self::ContentFilter,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// Tokens as the provider counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One item of a chat stream: text as it is generated, then exactly one `Finished`.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    /// The next piece of the answer (never empty).
    Delta(String),
    /// The last item. `usage` is `None` when the provider reported no counts.
    Finished {
        finish_reason: FinishReason,
        usage: Option<Usage>,
    },
}

/// A model the provider offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The name to put in [`ChatRequest::model`].
    pub id: String,
    /// The model's size on disk, where the provider says (Ollama does).
    pub size_bytes: Option<u64>,
}
