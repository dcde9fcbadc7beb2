//! The agent's settings. Defaults are stated on each field and in examples/kiln.toml.

use std::path::PathBuf;
use std::time::Duration;

use kiln_llm::ProviderConfig;

/// Everything `AgentApi::open` needs besides its two clients.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where `agent.db` lives.
    pub data_dir: PathBuf,
    /// The LLM provider. Default: an OpenAI-compatible server at http://127.0.0.1:8080
    /// (llama.cpp's server, as `make llm` runs it).
    pub provider: ProviderConfig,
    /// The model used when a task names none. Default: none, meaning the first model the
    /// provider lists (a llama.cpp server serves exactly one).
    pub default_model: Option<String>,
    /// Tasks that run at once; more wait in QUEUED. Default: 2 (a local model serves one
    /// call at a time anyway).
    pub max_running_tasks: usize,
    /// Unfinished tasks one user may have; more answer RESOURCE_EXHAUSTED
    /// (TOO_MANY_TASKS). Default: 8.
    pub max_tasks_per_user: usize,
    /// A task's time budget when the request sets none. Default: 30 minutes.
    pub default_timeout: Duration,
    /// The longest time budget a request may ask for. Default: 2 hours (the longest a
    /// delegated token lives).
    pub max_timeout: Duration,
    /// A task's token budget when the request sets none; 0 means unlimited.
    /// Default: 200 000.
    pub default_max_tokens: u64,
    /// The most tokens one model call may generate. Default: 4096.
    pub max_tokens_per_call: u32,
    /// Sampling temperature of model calls. Default: 0.2 (code wants little variety).
    pub temperature: f32,
    /// Silence after which watchers get a heartbeat. Default: 15 s.
    pub heartbeat: Duration,
    /// Bytes of recent events kept in memory per running task. Default: 1 MiB.
    pub live_window_bytes: usize,
    /// How the model returns files. Default (`None`): chosen from the provider, the
    /// grammar-constrained text form for OpenAI-compatible servers (llama.cpp's server
    /// enforces `grammar`), the JSON schema for Ollama. Set `Json` for OpenAI itself,
    /// which refuses a `grammar` field.
    pub reply_form: Option<crate::prompt::ReplyForm>,
}

impl AgentConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            provider: ProviderConfig::default(),
            default_model: None,
            max_running_tasks: 2,
            max_tasks_per_user: 8,
            default_timeout: Duration::from_secs(30 * 60),
            max_timeout: Duration::from_secs(2 * 60 * 60),
            default_max_tokens: 200_000,
            max_tokens_per_call: 4096,
            temperature: 0.2,
            heartbeat: Duration::from_secs(15),
            live_window_bytes: 1024 * 1024,
            reply_form: None,
        }
    }
}
