//! kiln-config: how every kiln process reads its settings.
//!
//! One rule for `kiln up` and the per-service binaries alike, lowest precedence first:
//!
//! 1. the built-in defaults (stated on each config struct's fields and in
//!    `examples/kiln.toml`);
//! 2. a TOML file (`--config FILE` or `KILN_CONFIG`);
//! 3. `KILN_<SECTION>__<KEY>…` environment variables, `__` separating nested keys:
//!    `KILN_BUILD__QUEUE__MAX_RUNNING=4` sets `[build.queue] max_running`. Only variables
//!    whose first part names a section of the file are read, so `KILN_LOG`, `KILN_TOKEN`
//!    and friends are not mistaken for settings;
//! 4. flags, as [`Overrides`].
//!
//! Unknown keys are errors at every layer (a typo must not silently do nothing), and the
//! error names the key and where it came from. Durations are written `"500ms"`, `"90s"`,
//! `"15m"`, `"2h"`, `"7d"` or as a number of seconds ([`duration`]).
//!
//! The loader is [figment]'s (as restate's `config_loader` uses it): kiln only adds the
//! section filter for the environment and an error for a file that is not there.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod duration;
mod server;

pub use duration::{format_duration, parse_duration};
pub use server::{Endpoints, ServerConfig, TelemetryConfig, TlsPaths};

/// The prefix of every environment variable that is a setting.
pub const ENV_PREFIX: &str = "KILN_";

/// Why settings could not be loaded. The message names the offending key and its source
/// (the file, or the environment variable).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration file {0}: no such file")]
    NoFile(PathBuf),
    #[error("{0}")]
    Invalid(Box<figment::Error>),
    /// A rule that types cannot express (a default above its maximum, …).
    #[error("{key}: {message}")]
    Rule { key: String, message: String },
}

impl From<figment::Error> for Error {
    fn from(err: figment::Error) -> Self {
        Self::Invalid(Box::new(err))
    }
}

impl Error {
    /// A broken rule about `key` (dotted, as in the file: `build.queue.max_running`).
    pub fn rule(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Rule {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Values given by flags: the last and strongest layer. Keys are dotted paths as in the
/// file (`server.listen`); a flag the user did not give is simply not set.
#[derive(Debug, Default)]
pub struct Overrides {
    figment: Figment,
}

impl Overrides {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value` when `value` is `Some`.
    pub fn set<T: Serialize>(mut self, key: &str, value: Option<T>) -> Self {
        if let Some(value) = value {
            self.figment = self.figment.merge(Serialized::default(key, value));
        }
        self
    }
}

/// A whole configuration file: one field per section, `#[serde(default,
/// deny_unknown_fields)]` on it and on every section, so that every key is optional and
/// none is unknown. Implemented by each service's file (`[server]` + its own section) and
/// by `kiln up`'s (all of them).
pub trait ConfigFile: Serialize + DeserializeOwned + Default {
    /// The top-level sections, which are also the `KILN_<SECTION>__…` prefixes read.
    const SECTIONS: &'static [&'static str];

    /// Rules types cannot express, and settings derived from others (each service's
    /// data directory under `server.data_dir`). Runs after every layer is merged.
    fn finish(&mut self) -> Result<(), Error>;

    /// Defaults → `file` → environment → `overrides`, then [`ConfigFile::finish`].
    fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, Error> {
        let mut config = load(&Self::default(), file, Self::SECTIONS, overrides)?;
        config.finish()?;
        Ok(config)
    }

    /// Defaults → `file` only (no environment, no flags): what `kiln config check FILE`
    /// validates, so that the answer is about the file and not the shell it runs in.
    fn check_file(file: &Path) -> Result<Self, Error> {
        let mut config = load_file(&Self::default(), file)?;
        config.finish()?;
        Ok(config)
    }
}

/// Loads `T` from its defaults, then `file`, then the `KILN_*` variables of the
/// sections `T` has (`sections`, e.g. `["server", "build"]`), then `overrides`.
///
/// `T` is the whole file: a struct with one field per section, `deny_unknown_fields`
/// and `default` on it and on every section, so that every key is optional and none is
/// unknown.
pub fn load<T>(
    defaults: &T,
    file: Option<&Path>,
    sections: &[&str],
    overrides: Overrides,
) -> Result<T, Error>
where
    T: Serialize + DeserializeOwned,
{
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(Error::NoFile(path.to_path_buf()));
        }
        figment = figment.merge(Toml::file(path));
    }
    Ok(figment
        .merge(environment(sections))
        .merge(overrides.figment)
        .extract()?)
}

/// Parses a whole file (no environment, no flags): what `kiln config check` validates.
pub fn load_file<T>(defaults: &T, file: &Path) -> Result<T, Error>
where
    T: Serialize + DeserializeOwned,
{
    if !file.is_file() {
        return Err(Error::NoFile(file.to_path_buf()));
    }
    Ok(Figment::from(Serialized::defaults(defaults))
        .merge(Toml::file(file))
        .extract()?)
}

/// The `KILN_<SECTION>__…` variables of `sections`, `__` nesting keys.
fn environment(sections: &[&str]) -> Env {
    let sections: Vec<String> = sections.iter().map(|s| s.to_ascii_lowercase()).collect();
    Env::prefixed(ENV_PREFIX)
        .filter(move |key| {
            let key = key.as_str().to_ascii_lowercase();
            let first = key.split("__").next().unwrap_or_default();
            // `KILN_BUILD__X` is a setting, `KILN_BUILD_TOKEN` (no `__`) is not.
            key.contains("__") && sections.iter().any(|s| s == first)
        })
        .split("__")
}

#[cfg(test)]
// figment::Jail's closures return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use std::time::Duration;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct File {
        server: Section,
        build: Nested,
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Section {
        name: String,
        #[serde(with = "duration")]
        grace: Duration,
        optional: Option<u32>,
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Nested {
        queue: Queue,
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Queue {
        max_running: usize,
        per_user: usize,
    }

    impl Default for File {
        fn default() -> Self {
            Self {
                server: Section {
                    name: "default".into(),
                    grace: Duration::from_secs(30),
                    optional: None,
                },
                build: Nested {
                    queue: Queue {
                        max_running: 2,
                        per_user: 1,
                    },
                },
            }
        }
    }

    const SECTIONS: &[&str] = &["server", "build"];

    fn with_file(text: &str, body: impl FnOnce(&Path)) {
        let dir = std::env::temp_dir().join(format!("kiln-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{:x}.toml", fxhash(text)));
        std::fs::write(&path, text).unwrap();
        body(&path);
        std::fs::remove_file(&path).unwrap();
    }

    fn fxhash(text: &str) -> u64 {
        text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }

    #[test]
    fn each_layer_overrides_the_one_below_key_by_key() {
        with_file(
            "[server]\nname = \"file\"\ngrace = \"90s\"\n[build.queue]\nper_user = 5\n",
            |path| {
                figment::Jail::expect_with(|jail| {
                    jail.set_env("KILN_BUILD__QUEUE__MAX_RUNNING", "7");
                    jail.set_env("KILN_SERVER__NAME", "env");
                    // Not settings: no section, or no `__` after the section.
                    jail.set_env("KILN_LOG", "debug");
                    jail.set_env("KILN_SERVER_TOKEN", "x");
                    let loaded: File = load(
                        &File::default(),
                        Some(path),
                        SECTIONS,
                        Overrides::new()
                            .set("server.name", Some("flag"))
                            .set::<u32>("server.optional", None),
                    )
                    .map_err(|e| e.to_string())?;
                    assert_eq!(loaded.server.name, "flag");
                    assert_eq!(loaded.server.grace, Duration::from_secs(90));
                    assert_eq!(loaded.server.optional, None);
                    assert_eq!(loaded.build.queue.max_running, 7);
                    assert_eq!(loaded.build.queue.per_user, 5);
                    Ok(())
                });
            },
        );
    }

    #[test]
    fn an_unknown_key_is_refused_by_name_in_the_file_and_in_the_environment() {
        with_file("[build.queue]\nmax_runing = 3\n", |path| {
            let err = load_file(&File::default(), path)
                .expect_err("typo")
                .to_string();
            assert!(err.contains("max_runing"), "{err}");
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("KILN_BUILD__QUEUE__MAX_RUNING", "3");
            let err = load(&File::default(), None, SECTIONS, Overrides::new())
                .expect_err("typo")
                .to_string();
            assert!(err.contains("max_runing"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_is_an_error_not_the_defaults() {
        let err = load(
            &File::default(),
            Some(Path::new("/nonexistent/kiln.toml")),
            SECTIONS,
            Overrides::new(),
        )
        .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/kiln.toml"), "{err}");
    }

    #[test]
    fn a_bad_duration_names_its_key() {
        with_file("[server]\ngrace = \"5 weeks\"\n", |path| {
            let err = load_file(&File::default(), path)
                .expect_err("bad")
                .to_string();
            assert!(err.contains("grace") && err.contains("5 weeks"), "{err}");
        });
    }
}
