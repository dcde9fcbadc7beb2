//! The `kiln up` configuration file, and how it layers with the environment and flags.
//!
//! Precedence, lowest first: the built-in defaults (stated on each service's config
//! struct and in `examples/kiln.toml`), the TOML file given with `--config` (or
//! `KILN_CONFIG`), `KILN_*` environment variables, then flags. Every section and key is
//! optional; unknown keys are an error (a typo must not silently do nothing).
//! `kiln config check FILE` validates a file and prints the effective settings.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use kiln_agent::AgentConfig;
use kiln_agent::prompt::ReplyForm;
use kiln_auth::AuthConfig;
use kiln_build::{BuildConfig, BuildLimits};
use serde::Deserialize;
use serde_json::{Value, json};

/// A duration in the file: `"500ms"`, `"90s"`, `"15m"`, `"2h"`, `"7d"`, or a number of
/// seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "DurationText")]
pub struct Dur(pub Duration);

#[derive(Deserialize)]
#[serde(untagged)]
enum DurationText {
    Seconds(u64),
    Text(String),
}

impl TryFrom<DurationText> for Dur {
    type Error = String;
    fn try_from(value: DurationText) -> Result<Self, String> {
        match value {
            DurationText::Seconds(s) => Ok(Dur(Duration::from_secs(s))),
            DurationText::Text(t) => parse_duration(&t).map(Dur),
        }
    }
}

/// Parses `500ms`, `90s`, `15m`, `2h`, `7d` or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 90s, 15m, 2h or 7d"))?;
    Ok(match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use ms, s, m, h or d"
            ));
        }
    })
}

/// The shortest exact spelling of a duration, for printing effective settings.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    pub server: ServerSection,
    pub auth: AuthSection,
    pub build: BuildSection,
    pub agent: AgentSection,
    pub telemetry: TelemetrySection,
}

/// `[telemetry]`: where traces go. Metrics and logs have their own settings.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySection {
    /// OTLP gRPC endpoint of a collector, e.g. `http://127.0.0.1:4317`. Default: none
    /// (no trace export). `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`/`OTEL_EXPORTER_OTLP_ENDPOINT`
    /// and `--otlp-endpoint` override it.
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub trust_domain: Option<String>,
    pub max_message_bytes: Option<usize>,
    pub shutdown_grace: Option<Dur>,
    pub require_client_cert: Option<bool>,
    /// 0 turns rate limiting off.
    pub rate_limit_per_second: Option<u32>,
    pub rate_limit_burst: Option<u32>,
    /// The Prometheus metrics listener (plain HTTP, `/metrics`); none by default.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    pub access_token_ttl: Option<Dur>,
    pub refresh_reuse_grace: Option<Dur>,
    pub refresh_idle_ttl: Option<Dur>,
    pub refresh_absolute_ttl: Option<Dur>,
    pub key_rotation_interval: Option<Dur>,
    /// How long services trust an API key's answer (a revoked key works this long).
    pub api_key_cache: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuildSection {
    /// Replaces the default program allowlist.
    pub allowed_programs: Option<Vec<String>>,
    /// Added to the allowlist (default or replaced).
    pub extra_programs: Vec<String>,
    /// Replaces the default list of environment names a build may set.
    pub allowed_env: Option<Vec<String>>,
    pub max_steps: Option<u32>,
    pub heartbeat_interval: Option<Dur>,
    pub default_limits: LimitsSection,
    pub max_limits: LimitsSection,
    pub queue: QueueSection,
    pub workspace: WorkspaceSection,
    pub retention: RetentionSection,
    pub sandbox: SandboxSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    pub wall_timeout: Option<Dur>,
    pub cpu_time: Option<Dur>,
    pub memory_bytes: Option<u64>,
    pub output_bytes: Option<u64>,
    pub disk_bytes: Option<u64>,
    pub processes: Option<u32>,
    pub open_files: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSection {
    pub max_running: Option<usize>,
    pub max_running_per_user: Option<usize>,
    pub max_queued_per_user: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkspaceSection {
    pub max_bytes: Option<u64>,
    pub max_files: Option<u64>,
    pub max_file_bytes: Option<u64>,
    pub upload_idle_timeout: Option<Dur>,
    pub upload_timeout: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSection {
    pub finished_builds: Option<Dur>,
    pub idle_workspaces: Option<Dur>,
    pub cleanup_interval: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSection {
    /// `"A"` or `"B"`: require exactly this tier. Default: the best the host offers.
    pub tier: Option<String>,
    /// Run without isolation when the host offers neither tier (never by default).
    pub allow_unsandboxed: Option<bool>,
    /// SIGTERM → SIGKILL on a timeout, on a cancel that names no grace of its own
    /// (`kiln build cancel` without `--grace`), and at shutdown. Default: 2s.
    pub kill_grace: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSection {
    /// The LLM provider (kiln_llm::ProviderConfig: kind, base_url, api_key_env, timeouts,
    /// retry).
    pub provider: Option<kiln_llm::ProviderConfig>,
    /// Empty or unset: the provider's first model.
    pub default_model: Option<String>,
    pub max_running_tasks: Option<usize>,
    pub max_tasks_per_user: Option<usize>,
    pub default_timeout: Option<Dur>,
    pub max_timeout: Option<Dur>,
    /// 0 means unlimited.
    pub default_max_tokens: Option<u64>,
    pub max_tokens_per_call: Option<u32>,
    pub temperature: Option<f32>,
    /// `auto`, `grammar` (text blocks under a GBNF grammar), `json` or `text`.
    pub reply_format: Option<String>,
}

fn set<T>(target: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *target = v;
    }
}

fn set_dur(target: &mut Duration, value: Option<Dur>) {
    set(target, value.map(|d| d.0));
}

impl ConfigFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The auth service's settings: defaults, then this file.
    pub fn auth(&self, data_dir: PathBuf) -> AuthConfig {
        let mut config = AuthConfig::new(data_dir);
        let a = &self.auth;
        set_dur(&mut config.access_ttl, a.access_token_ttl);
        set_dur(&mut config.refresh_reuse_grace, a.refresh_reuse_grace);
        set_dur(&mut config.refresh_idle_ttl, a.refresh_idle_ttl);
        set_dur(&mut config.refresh_absolute_ttl, a.refresh_absolute_ttl);
        set_dur(&mut config.key_rotation_interval, a.key_rotation_interval);
        config
    }

    /// The agent's settings: defaults, then this file.
    pub fn agent(&self, data_dir: PathBuf) -> anyhow::Result<AgentConfig> {
        let mut config = AgentConfig::new(data_dir);
        let a = &self.agent;
        if let Some(provider) = &a.provider {
            config.provider = provider.clone();
        }
        config.default_model = a.default_model.clone().filter(|m| !m.is_empty());
        set(&mut config.max_running_tasks, a.max_running_tasks);
        set(&mut config.max_tasks_per_user, a.max_tasks_per_user);
        set_dur(&mut config.default_timeout, a.default_timeout);
        set_dur(&mut config.max_timeout, a.max_timeout);
        set(&mut config.default_max_tokens, a.default_max_tokens);
        set(&mut config.max_tokens_per_call, a.max_tokens_per_call);
        set(&mut config.temperature, a.temperature);
        config.reply_form = match a.reply_format.as_deref() {
            None | Some("auto") => None,
            Some("grammar") => Some(ReplyForm::GrammarText),
            Some("json") => Some(ReplyForm::Json),
            Some("text") => Some(ReplyForm::PlainText),
            Some(other) => {
                bail!("[agent] reply_format = {other:?}: use auto, grammar, json or text")
            }
        };
        if config.default_timeout > config.max_timeout {
            bail!("[agent] default_timeout is longer than max_timeout");
        }
        if !(0.0..=2.0).contains(&config.temperature) {
            bail!("[agent] temperature must be between 0 and 2");
        }
        Ok(config)
    }

    /// The build service's settings: defaults, then this file.
    pub fn build(&self, data_dir: PathBuf) -> anyhow::Result<BuildConfig> {
        let mut config = BuildConfig::new(data_dir);
        let b = &self.build;
        let policy = &mut config.policy;
        if let Some(programs) = &b.allowed_programs {
            policy.allowed_programs = programs.iter().cloned().collect();
        }
        policy
            .allowed_programs
            .extend(b.extra_programs.iter().cloned());
        if let Some(env) = &b.allowed_env {
            policy.allowed_env = env.iter().cloned().collect::<BTreeSet<_>>();
        }
        set(&mut policy.max_steps, b.max_steps);
        apply_limits(&mut policy.default_limits, &b.default_limits);
        apply_limits(&mut policy.max_limits, &b.max_limits);
        set_dur(&mut config.heartbeat_interval, b.heartbeat_interval);
        set(&mut config.queue.max_running, b.queue.max_running);
        set(
            &mut config.queue.max_running_per_user,
            b.queue.max_running_per_user,
        );
        set(
            &mut config.queue.max_queued_per_user,
            b.queue.max_queued_per_user,
        );
        set(&mut config.workspace.max_bytes, b.workspace.max_bytes);
        set(&mut config.workspace.max_files, b.workspace.max_files);
        set(
            &mut config.workspace.max_file_bytes,
            b.workspace.max_file_bytes,
        );
        set_dur(
            &mut config.workspace.upload_idle_timeout,
            b.workspace.upload_idle_timeout,
        );
        set_dur(
            &mut config.workspace.upload_timeout,
            b.workspace.upload_timeout,
        );
        set_dur(
            &mut config.retention.finished_builds,
            b.retention.finished_builds,
        );
        set_dur(
            &mut config.retention.idle_workspaces,
            b.retention.idle_workspaces,
        );
        set_dur(
            &mut config.retention.cleanup_interval,
            b.retention.cleanup_interval,
        );
        config.sandbox.force_tier = match b.sandbox.tier.as_deref() {
            None => None,
            Some("A" | "a") => Some(kiln_sandbox::Tier::A),
            Some("B" | "b") => Some(kiln_sandbox::Tier::B),
            Some(other) => bail!("build.sandbox.tier: {other:?} is not a tier; use \"A\" or \"B\""),
        };
        set(
            &mut config.sandbox.allow_unsandboxed,
            b.sandbox.allow_unsandboxed,
        );
        set_dur(&mut config.sandbox.kill_grace, b.sandbox.kill_grace);
        validate_build(&config)?;
        Ok(config)
    }
}

fn apply_limits(limits: &mut BuildLimits, section: &LimitsSection) {
    set_dur(&mut limits.wall_timeout, section.wall_timeout);
    set_dur(&mut limits.cpu_time, section.cpu_time);
    set(&mut limits.memory_bytes, section.memory_bytes);
    set(&mut limits.output_bytes, section.output_bytes);
    set(&mut limits.disk_bytes, section.disk_bytes);
    set(&mut limits.processes, section.processes);
    set(&mut limits.open_files, section.open_files);
}

/// Rules a file can break that types cannot express.
fn validate_build(config: &BuildConfig) -> anyhow::Result<()> {
    let (d, m) = (&config.policy.default_limits, &config.policy.max_limits);
    let pairs: [(&str, u128, u128); 7] = [
        (
            "wall_timeout",
            d.wall_timeout.as_millis(),
            m.wall_timeout.as_millis(),
        ),
        ("cpu_time", d.cpu_time.as_millis(), m.cpu_time.as_millis()),
        ("memory_bytes", d.memory_bytes.into(), m.memory_bytes.into()),
        ("output_bytes", d.output_bytes.into(), m.output_bytes.into()),
        ("disk_bytes", d.disk_bytes.into(), m.disk_bytes.into()),
        ("processes", d.processes.into(), m.processes.into()),
        ("open_files", d.open_files.into(), m.open_files.into()),
    ];
    for (name, default, max) in pairs {
        if default == 0 {
            bail!("build.default_limits.{name} must be above 0");
        }
        if default > max {
            bail!("build.default_limits.{name} is above build.max_limits.{name}");
        }
    }
    let q = &config.queue;
    if q.max_running == 0 || q.max_running_per_user == 0 || q.max_queued_per_user == 0 {
        bail!("build.queue: every limit must be at least 1");
    }
    if config
        .policy
        .allowed_programs
        .iter()
        .any(|p| p.contains('/') || p.is_empty())
    {
        bail!(
            "build.allowed_programs: program names, not paths (they are looked up in the step's PATH)"
        );
    }
    for shell in ["sh", "bash", "dash", "zsh", "fish", "ksh", "csh", "tcsh"] {
        if config.policy.allowed_programs.contains(shell) {
            tracing::warn!(
                shell,
                "the build allowlist contains a shell: steps can then run anything"
            );
        }
    }
    Ok(())
}

fn limits_json(l: &BuildLimits) -> Value {
    json!({
        "wall_timeout": format_duration(l.wall_timeout),
        "cpu_time": format_duration(l.cpu_time),
        "memory_bytes": l.memory_bytes,
        "output_bytes": l.output_bytes,
        "disk_bytes": l.disk_bytes,
        "processes": l.processes,
        "open_files": l.open_files,
    })
}

/// The effective auth and build settings, as `kiln config check` prints them.
pub fn describe(
    auth: &AuthConfig,
    build: &BuildConfig,
    agent: &AgentConfig,
    api_key_cache: Duration,
) -> Value {
    let provider = &agent.provider;
    json!({
        "agent": {
            "default_model": agent.default_model.clone().unwrap_or_default(),
            "max_running_tasks": agent.max_running_tasks,
            "max_tasks_per_user": agent.max_tasks_per_user,
            "default_timeout": format_duration(agent.default_timeout),
            "max_timeout": format_duration(agent.max_timeout),
            "default_max_tokens": agent.default_max_tokens,
            "max_tokens_per_call": agent.max_tokens_per_call,
            "temperature": agent.temperature,
            "reply_format": match agent.reply_form {
                None => "auto",
                Some(ReplyForm::GrammarText) => "grammar",
                Some(ReplyForm::Json) => "json",
                Some(ReplyForm::PlainText) => "text",
            },
            "provider": {
                "kind": match provider.kind {
                    kiln_llm::ProviderKind::Openai => "openai",
                    kiln_llm::ProviderKind::Ollama => "ollama",
                },
                "base_url": provider.effective_base_url(),
                "api_key_env": provider.api_key_env.clone().unwrap_or_default(),
                "timeouts": {
                    "connect": format_duration(provider.timeouts.connect),
                    "request": format_duration(provider.timeouts.request),
                    "idle": format_duration(provider.timeouts.idle),
                },
                "retry": {
                    "max_attempts": provider.retry.max_attempts,
                    "initial_backoff": format_duration(provider.retry.initial_backoff),
                    "max_backoff": format_duration(provider.retry.max_backoff),
                    "max_retry_after": format_duration(provider.retry.max_retry_after),
                },
            },
        },
        "auth": {
            "access_token_ttl": format_duration(auth.access_ttl),
            "refresh_reuse_grace": format_duration(auth.refresh_reuse_grace),
            "refresh_idle_ttl": format_duration(auth.refresh_idle_ttl),
            "refresh_absolute_ttl": format_duration(auth.refresh_absolute_ttl),
            "key_rotation_interval": format_duration(auth.key_rotation_interval),
            "api_key_cache": format_duration(api_key_cache),
        },
        "build": {
            "allowed_programs": build.policy.allowed_programs,
            "allowed_env": build.policy.allowed_env,
            "max_steps": build.policy.max_steps,
            "heartbeat_interval": format_duration(build.heartbeat_interval),
            "default_limits": limits_json(&build.policy.default_limits),
            "max_limits": limits_json(&build.policy.max_limits),
            "queue": {
                "max_running": build.queue.max_running,
                "max_running_per_user": build.queue.max_running_per_user,
                "max_queued_per_user": build.queue.max_queued_per_user,
            },
            "workspace": {
                "max_bytes": build.workspace.max_bytes,
                "max_files": build.workspace.max_files,
                "max_file_bytes": build.workspace.max_file_bytes,
                "upload_idle_timeout": format_duration(build.workspace.upload_idle_timeout),
                "upload_timeout": format_duration(build.workspace.upload_timeout),
            },
            "retention": {
                "finished_builds": format_duration(build.retention.finished_builds),
                "idle_workspaces": format_duration(build.retention.idle_workspaces),
                "cleanup_interval": format_duration(build.retention.cleanup_interval),
            },
            "sandbox": {
                "tier": build.sandbox.force_tier.map_or("best available".to_owned(), |t| t.to_string()),
                "allow_unsandboxed": build.sandbox.allow_unsandboxed,
                "kill_grace": format_duration(build.sandbox.kill_grace),
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_API_KEY_CACHE: Duration = Duration::from_secs(30);

    fn effective(file: &ConfigFile) -> Value {
        let api_key_cache = file
            .auth
            .api_key_cache
            .map_or(DEFAULT_API_KEY_CACHE, |d| d.0);
        describe(
            &file.auth("/tmp/a".into()),
            &file.build("/tmp/b".into()).expect("valid"),
            &file.agent("/tmp/c".into()).expect("valid"),
            api_key_cache,
        )
    }

    #[test]
    fn the_example_file_documents_the_real_defaults() {
        let example: ConfigFile =
            toml::from_str(include_str!("../../examples/kiln.toml")).expect("parses");
        let mut expected = effective(&ConfigFile::default());
        let mut actual = effective(&example);
        // The queue's default is the number of cores, which the file cannot know.
        for v in [&mut expected, &mut actual] {
            v["build"]["queue"]["max_running"] = json!("cores");
        }
        assert_eq!(
            actual, expected,
            "examples/kiln.toml must state the defaults as they are"
        );
    }

    #[test]
    fn durations_read_in_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_duration("5 weeks").is_err());
        assert_eq!(format_duration(Duration::from_secs(900)), "15m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn typos_and_contradictions_are_errors() {
        let typo = toml::from_str::<ConfigFile>("[build]\nallowed_programms = [\"make\"]\n");
        let message = typo.expect_err("unknown key").to_string();
        assert!(message.contains("allowed_programms"), "{message}");

        let upside_down: ConfigFile =
            toml::from_str("[build.default_limits]\nmemory_bytes = 99999999999999\n")
                .expect("parses");
        let err = upside_down
            .build("/tmp/b".into())
            .expect_err("default above max");
        assert!(err.to_string().contains("memory_bytes"), "{err}");

        let bad_tier: ConfigFile =
            toml::from_str("[build.sandbox]\ntier = \"C\"\n").expect("parses");
        assert!(bad_tier.build("/tmp/b".into()).is_err());
    }

    #[test]
    fn a_file_overrides_the_defaults_it_names_and_nothing_else() {
        let file: ConfigFile = toml::from_str(
            "[auth]\naccess_token_ttl = \"5m\"\n[build]\nextra_programs = [\"zig\"]\n[build.queue]\nmax_queued_per_user = 3\n",
        )
        .expect("parses");
        let value = effective(&file);
        assert_eq!(value["auth"]["access_token_ttl"], "5m");
        assert_eq!(value["auth"]["refresh_reuse_grace"], "5s");
        assert_eq!(value["build"]["queue"]["max_queued_per_user"], 3);
        let programs = value["build"]["allowed_programs"].as_array().expect("list");
        assert!(programs.iter().any(|p| p == "zig") && programs.iter().any(|p| p == "cargo"));
    }
}
