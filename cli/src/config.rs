//! The `kiln up` configuration file: `[server]` and every service's section, loaded by
//! kiln-config (defaults → TOML file → `KILN_*` environment → flags). Each section is the
//! service's own config struct, so the file, its defaults and `kiln config check`'s
//! output cannot drift apart; `examples/kiln.toml` states the defaults, and a test keeps
//! it honest.

use kiln_agent::{AgentConfig, AgentFile};
use kiln_auth::{AuthConfig, AuthFile};
use kiln_build::{BuildConfig, BuildFile};
use kiln_config::{ConfigFile, Error, ServerConfig, TelemetryConfig};
use serde::{Deserialize, Serialize};

/// Everything `kiln up` runs, in one file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SuiteFile {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub build: BuildConfig,
    pub agent: AgentConfig,
    pub telemetry: TelemetryConfig,
}

impl ConfigFile for SuiteFile {
    const SECTIONS: &'static [&'static str] = &["server", "auth", "build", "agent", "telemetry"];

    fn finish(&mut self) -> Result<(), Error> {
        // One process makes its own PKI and calls itself: a certificate or an endpoint
        // given here would be silently unused, so it is refused like a typo.
        if self.server.tls.is_some() {
            return Err(Error::rule(
                "server.tls",
                "kiln up makes its own development PKI; certificates are for the per-service binaries (kiln-auth, kiln-build, kiln-agent)",
            ));
        }
        if self.server.mesh {
            return Err(Error::rule(
                "server.mesh",
                "kiln up calls itself over mTLS with its own development PKI; mesh mode is for the per-service binaries behind a sidecar",
            ));
        }
        if self.server.endpoints != Default::default() {
            return Err(Error::rule(
                "server.endpoints",
                "kiln up runs every service itself; endpoints are for the per-service binaries",
            ));
        }
        let data_dir = self.server.effective_data_dir();
        self.auth.data_dir = data_dir.join("auth");
        self.build.data_dir = data_dir.join("build");
        self.agent.data_dir = data_dir.join("agent");
        self.build.check()?;
        self.agent.check()
    }
}

/// Which file `kiln config check` reads: `kiln up`'s, or one service binary's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FileKind {
    Auth,
    Build,
    Agent,
}

/// Validates `path` as the file of `kind` (`None`: `kiln up`'s) and returns the effective
/// settings, as `kiln config check` prints them.
pub fn check(path: &std::path::Path, kind: Option<FileKind>) -> Result<serde_json::Value, Error> {
    fn effective<F: ConfigFile>(path: &std::path::Path) -> Result<serde_json::Value, Error> {
        let file = F::check_file(path)?;
        Ok(serde_json::to_value(&file).expect("config structs serialize"))
    }
    match kind {
        None => effective::<SuiteFile>(path),
        Some(FileKind::Auth) => effective::<AuthFile>(path),
        Some(FileKind::Build) => effective::<BuildFile>(path),
        Some(FileKind::Agent) => effective::<AgentFile>(path),
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use serde_json::{Value, json};

    use super::*;

    fn example() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kiln.toml")
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    /// Values the file cannot state because they depend on the machine.
    fn machine_neutral(mut v: Value) -> Value {
        v["build"]["queue"]["max_running"] = json!("cores");
        v["auth"]["hashing_concurrency"] = json!("cores");
        v
    }

    #[test]
    fn the_example_file_documents_the_real_defaults() {
        let actual = check(&example(), None).expect("the example is valid");
        let mut defaults = SuiteFile::default();
        defaults.finish().expect("the defaults are valid");
        let expected = serde_json::to_value(&defaults).expect("serializes");
        assert_eq!(
            machine_neutral(actual),
            machine_neutral(expected),
            "examples/kiln.toml must state the defaults as they are"
        );
    }

    #[test]
    fn typos_and_contradictions_are_errors_that_name_the_key() {
        let (_d, typo) = file("[build.policy]\nallowed_programms = [\"make\"]\n");
        let message = check(&typo, None).expect_err("unknown key").to_string();
        assert!(message.contains("allowed_programms"), "{message}");

        let (_d, upside_down) =
            file("[build.policy.default_limits]\nmemory_bytes = 99999999999999\n");
        let err = check(&upside_down, None)
            .expect_err("default above max")
            .to_string();
        assert!(err.contains("memory_bytes"), "{err}");

        let (_d, bad_tier) = file("[build.sandbox]\ntier = \"C\"\n");
        let err = check(&bad_tier, None).expect_err("no tier C").to_string();
        assert!(err.contains("tier"), "{err}");

        let (_d, certs) = file("[server.tls]\ncert = \"a\"\nkey = \"b\"\nca = \"c\"\n");
        let err = check(&certs, None)
            .expect_err("kiln up makes its own")
            .to_string();
        assert!(err.contains("server.tls"), "{err}");

        let (_d, mesh) = file("[server]\nmesh = true\n");
        let err = check(&mesh, None)
            .expect_err("kiln up has no sidecar")
            .to_string();
        assert!(err.contains("server.mesh"), "{err}");
    }

    #[test]
    fn a_service_file_holds_its_own_section_and_no_other() {
        let (_d, path) = file(
            "[server]\nlisten = \"0.0.0.0:7443\"\n[server.endpoints]\nauth = \"https://kiln-auth:7443\"\n[build.queue]\nmax_running = 3\n",
        );
        let value = check(&path, Some(FileKind::Build)).expect("a build file");
        assert_eq!(value["build"]["queue"]["max_running"], 3);
        assert_eq!(
            value["server"]["endpoints"]["auth"],
            "https://kiln-auth:7443"
        );
        let err = check(&path, Some(FileKind::Auth))
            .expect_err("[build] in an auth file")
            .to_string();
        assert!(err.contains("build"), "{err}");
    }

    #[test]
    fn a_file_overrides_the_defaults_it_names_and_nothing_else() {
        let (_d, path) = file(
            "[auth]\naccess_token_ttl = \"5m\"\n[build.policy]\nextra_programs = [\"zig\"]\n[build.queue]\nmax_queued_per_user = 3\n",
        );
        let value = check(&path, None).expect("valid");
        assert_eq!(value["auth"]["access_token_ttl"], "5m");
        assert_eq!(value["auth"]["refresh_reuse_grace"], "5s");
        assert_eq!(value["build"]["queue"]["max_queued_per_user"], 3);
        let programs = value["build"]["policy"]["allowed_programs"]
            .as_array()
            .expect("list");
        assert!(programs.iter().any(|p| p == "zig") && programs.iter().any(|p| p == "cargo"));
    }
}
