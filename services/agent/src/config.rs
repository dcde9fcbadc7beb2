//! The agent's settings. Defaults are stated on each field and in examples/kiln.toml.

use std::path::PathBuf;
use std::time::Duration;

use kiln_config::duration;
use kiln_llm::ProviderConfig;
use serde::{Deserialize, Serialize};

use crate::prompt::ReplyForm;

/// Everything `AgentApi::open` needs besides its two clients: the `[agent]` section of
/// the configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Where `agent.db` lives. Not a key of its own: `<server.data_dir>/agent`.
    #[serde(skip)]
    pub data_dir: PathBuf,
    /// Where the store is: `sqlite:///path` or `postgres://user@host/db` (tables in
    /// schema `agent`, so one database can hold all three services). Default: SQLite in
    /// `<data_dir>/agent.db`. Env `KILN_AGENT__DATABASE_URL`, flag `--database-url`. Shown
    /// with its password redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<kiln_store::DatabaseUrl>,
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
    #[serde(with = "duration")]
    pub default_timeout: Duration,
    /// The longest time budget a request may ask for. Default: 2 hours (the longest a
    /// delegated token lives).
    #[serde(with = "duration")]
    pub max_timeout: Duration,
    /// A task's token budget when the request sets none; 0 means unlimited.
    /// Default: 200 000.
    pub default_max_tokens: u64,
    /// The most tokens one model call may generate. Default: 4096.
    pub max_tokens_per_call: u32,
    /// Sampling temperature of model calls. Default: 0.2 (code wants little variety).
    pub temperature: f32,
    /// Silence after which watchers get a heartbeat. Default: 15 s.
    #[serde(with = "duration")]
    pub heartbeat: Duration,
    /// Bytes of recent events kept in memory per running task. Default: 1 MiB.
    pub live_window_bytes: usize,
    /// How the model returns files. Default (`None`): chosen from the provider, the
    /// grammar-constrained text form for OpenAI-compatible servers (llama.cpp's server
    /// enforces `grammar`), the JSON schema for Ollama. Set `Json` for OpenAI itself,
    /// which refuses a `grammar` field. In the file: `reply_format = "auto" | "grammar" |
    /// "json" | "text"`.
    #[serde(rename = "reply_format", with = "reply_format")]
    pub reply_form: Option<ReplyForm>,
    /// Who runs which task when several replicas share a Postgres store.
    pub tasks: TasksConfig,
}

/// `[agent.tasks]`: task ownership across replicas (Postgres only).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    /// How long a replica's claim on a task it runs lasts without renewal: a dead
    /// replica's tasks are continued by another within about this long. Renewed every
    /// third of it. Default 10 s, at least 1 s. Unused on SQLite.
    #[serde(with = "duration")]
    pub lease: Duration,
}

impl Default for TasksConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(10),
        }
    }
}

impl AgentConfig {
    /// Where the store is: `database_url`, or the SQLite file in `data_dir`.
    pub fn database(&self) -> kiln_store::DatabaseUrl {
        self.database_url
            .clone()
            .unwrap_or_else(|| kiln_store::DatabaseUrl::sqlite(self.data_dir.join("agent.db")))
    }

    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            database_url: None,
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
            tasks: TasksConfig::default(),
        }
    }
}

/// The defaults with no data directory yet (the loader sets it from `[server]`).
impl Default for AgentConfig {
    fn default() -> Self {
        Self::new(PathBuf::new())
    }
}

impl AgentConfig {
    /// What a file can get wrong that types cannot express. Run by the loader.
    pub fn check(&mut self) -> Result<(), kiln_config::Error> {
        if self.default_model.as_deref().is_some_and(str::is_empty) {
            self.default_model = None;
        }
        if self.default_timeout > self.max_timeout {
            return Err(kiln_config::Error::rule(
                "agent.default_timeout",
                "is longer than agent.max_timeout",
            ));
        }
        if self.tasks.lease < Duration::from_secs(1) {
            return Err(kiln_config::Error::rule(
                "agent.tasks.lease",
                "must be at least 1s (it is renewed every third of it)",
            ));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(kiln_config::Error::rule(
                "agent.temperature",
                "must be between 0 and 2",
            ));
        }
        Ok(())
    }
}

/// `reply_form` as the file spells it; `auto` is `None` (chosen from the provider).
mod reply_format {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::prompt::ReplyForm;

    pub fn serialize<S: Serializer>(form: &Option<ReplyForm>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match form {
            None => "auto",
            Some(ReplyForm::GrammarText) => "grammar",
            Some(ReplyForm::Json) => "json",
            Some(ReplyForm::PlainText) => "text",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ReplyForm>, D::Error> {
        match String::deserialize(d)?.as_str() {
            "auto" => Ok(None),
            "grammar" => Ok(Some(ReplyForm::GrammarText)),
            "json" => Ok(Some(ReplyForm::Json)),
            "text" => Ok(Some(ReplyForm::PlainText)),
            other => Err(serde::de::Error::custom(format!(
                "{other:?}: use auto, grammar, json or text"
            ))),
        }
    }
}

/// The configuration file of the `kiln-agent` binary: `[server]` (listener, certificates, the
/// other services' endpoints) and `[agent]`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentFile {
    pub server: kiln_config::ServerConfig,
    pub agent: AgentConfig,
}

impl kiln_config::ConfigFile for AgentFile {
    const SECTIONS: &'static [&'static str] = &["server", "agent"];

    fn finish(&mut self) -> Result<(), kiln_config::Error> {
        self.agent.data_dir = self.server.effective_data_dir().join("agent");
        self.agent.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<AgentFile, kiln_config::Error> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, text).expect("write");
        let mut file: AgentFile = kiln_config::load_file(&AgentFile::default(), &path)?;
        kiln_config::ConfigFile::finish(&mut file)?;
        Ok(file)
    }

    #[test]
    fn the_task_lease_is_read_from_agent_tasks_and_must_be_at_least_a_second() {
        let file = load("").expect("defaults");
        assert_eq!(file.agent.tasks.lease, Duration::from_secs(10));
        let file = load("[agent.tasks]\nlease = \"3s\"\n").expect("3s");
        assert_eq!(file.agent.tasks.lease, Duration::from_secs(3));
        let err = load("[agent.tasks]\nlease = \"500ms\"\n").expect_err("too short");
        assert!(err.to_string().contains("agent.tasks.lease"), "{err}");
        assert!(
            load("[agent.tasks]\nleases = \"3s\"\n").is_err(),
            "unknown key"
        );
    }
}
