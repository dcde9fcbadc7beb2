//! `kiln config view|set|unset`: the client's own settings (where it connects, which CA
//! it trusts, how it prints), kept in `<config dir>/config.toml` (see
//! [`crate::context`]). `kiln config check|example` (the `kiln up` file) sit next to them
//! under the same noun, as kubectl keeps its client config under `kubectl config`.
//!
//! `set` validates a value before saving it (an endpoint must parse, a CA file must hold
//! a PEM certificate, an output format must be one the CLI knows) and an unknown key is
//! an error naming it. The file is rewritten whole, through a temporary file and a
//! rename; comments in it are not kept.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use clap::ValueEnum;
use serde_json::json;

use crate::context::{
    ClientArgs, ConfigFile, DEFAULT_ENDPOINT, config_dir, config_file_path, dev_ca, read_ca,
    read_config,
};
use crate::output::{OutputChoice, OutputFormat, print_json};

/// `kiln config …`: the client's settings, and the `kiln up` configuration file.
#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Show the client's settings, the value in force and where each comes from.
    View,
    /// Save a client setting: endpoint, ca_file or output.
    Set {
        /// endpoint, ca_file or output.
        key: String,
        /// The value, e.g. https://kiln.example.com:7443, ./ca.pem or json.
        value: String,
    },
    /// Remove a client setting from the config file (its default applies again).
    Unset {
        /// endpoint, ca_file or output.
        key: String,
    },
    #[command(flatten)]
    Server(crate::up::ConfigCommand),
}

/// The keys of the client config file, in the order they are shown.
const KEYS: &[&str] = &["endpoint", "ca_file", "output"];

fn unknown_key(key: &str) -> anyhow::Error {
    anyhow!(
        "unknown client setting {key:?}: the settings are {}",
        KEYS.join(", ")
    )
}

/// One setting as `view` shows it.
struct Shown {
    key: &'static str,
    value: Option<String>,
    source: String,
}

pub fn run(args: &ClientArgs, command: ConfigCommand) -> anyhow::Result<i32> {
    let dir = config_dir();
    let path = config_file_path(&dir);
    match command {
        ConfigCommand::Server(command) => return crate::up::config(command),
        ConfigCommand::View => view(args, &path)?,
        ConfigCommand::Set { key, value } => {
            let mut file = read_config(&path)?;
            let saved = set(&mut file, &key, &value)?;
            save(&dir, &path, &file)?;
            report(args, &format!("{key} = {saved}"), &key, Some(&saved), &path);
        }
        ConfigCommand::Unset { key } => {
            let mut file = read_config(&path)?;
            match key.as_str() {
                "endpoint" => file.endpoint = None,
                "ca_file" => file.ca_file = None,
                "output" => file.output = None,
                _ => return Err(unknown_key(&key)),
            }
            save(&dir, &path, &file)?;
            report(args, &format!("{key} unset"), &key, None, &path);
        }
    }
    Ok(0)
}

fn report(args: &ClientArgs, text: &str, key: &str, value: Option<&str>, path: &Path) {
    // Only `-o`/KILN_OUTPUT choose: the file's `output` may be what just changed.
    if args.output.map(OutputChoice::apply) == Some(OutputFormat::Json) {
        print_json(&json!({ "key": key, "value": value, "config_file": path }));
    } else {
        println!("{text} (in {})", path.display());
    }
}

/// Checks `value` for `key` and stores it in `file`; returns the value as saved.
fn set(file: &mut ConfigFile, key: &str, value: &str) -> anyhow::Result<String> {
    match key {
        "endpoint" => {
            check_endpoint(value)?;
            file.endpoint = Some(value.to_owned());
            Ok(value.to_owned())
        }
        "ca_file" | "ca" => {
            // Saved absolute: the file is read from wherever kiln runs next.
            let path =
                std::path::absolute(value).with_context(|| format!("the CA file {value}"))?;
            read_ca(&path)?;
            let shown = path.display().to_string();
            file.ca_file = Some(path);
            Ok(shown)
        }
        "output" => {
            let format = OutputChoice::from_str(value, false).map_err(|_| {
                let known: Vec<String> = OutputChoice::value_variants()
                    .iter()
                    .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_owned()))
                    .collect();
                anyhow!(
                    "{value:?} is not an output format: use {}",
                    known.join(" or ")
                )
            })?;
            file.output = Some(format);
            Ok(value.to_owned())
        }
        _ => Err(unknown_key(key)),
    }
}

/// An endpoint is `https://host:port`, `http://host:port` (a plaintext mesh sidecar) or
/// `host:port` (https is implied).
fn check_endpoint(value: &str) -> anyhow::Result<()> {
    let with_scheme = if value.contains("://") {
        value.to_owned()
    } else {
        format!("https://{value}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .map_err(|e| anyhow!("{value:?} is not an endpoint ({e}): use https://HOST:PORT"))?;
    match uri.scheme_str() {
        Some("https" | "http") => {}
        _ => bail!(
            "{value:?} is not an endpoint: the scheme must be https (or http for a mesh sidecar)"
        ),
    }
    if uri.host().is_none_or(str::is_empty) {
        bail!("{value:?} is not an endpoint: it names no host");
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        bail!("{value:?} is not an endpoint: kiln endpoints have no path");
    }
    Ok(())
}

fn view(args: &ClientArgs, path: &Path) -> anyhow::Result<()> {
    let file = read_config(path)?;
    let from = |env: &str, file_has: bool| -> String {
        if std::env::var_os(env).is_some() {
            format!("environment {env}")
        } else if file_has {
            "config file".to_owned()
        } else {
            "default".to_owned()
        }
    };
    let flag_or = |flag: bool, env: &str, file_has: bool| {
        if flag && std::env::var_os(env).is_none() {
            "flag".to_owned()
        } else {
            from(env, file_has)
        }
    };
    let endpoint = args
        .endpoint
        .clone()
        .or(file.endpoint.clone())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
    let ca: Option<PathBuf> = args.ca.clone().or(file.ca_file.clone()).or_else(dev_ca);
    let ca_source = if args.ca.is_some() || file.ca_file.is_some() {
        flag_or(args.ca.is_some(), "KILN_CA", file.ca_file.is_some())
    } else if ca.is_some() {
        "the development CA of `kiln up`".to_owned()
    } else {
        "none: the system's trusted roots".to_owned()
    };
    let output = args.output.or(file.output).unwrap_or_default();
    let shown = [
        Shown {
            key: "endpoint",
            value: Some(endpoint),
            source: flag_or(
                args.endpoint.is_some(),
                "KILN_ENDPOINT",
                file.endpoint.is_some(),
            ),
        },
        Shown {
            key: "ca_file",
            value: ca.map(|p| p.display().to_string()),
            source: ca_source,
        },
        Shown {
            key: "output",
            value: output.to_possible_value().map(|v| v.get_name().to_owned()),
            source: flag_or(args.output.is_some(), "KILN_OUTPUT", file.output.is_some()),
        },
    ];
    let token = std::env::var("KILN_TOKEN").is_ok_and(|t| !t.is_empty());
    match output.apply() {
        OutputFormat::Json => {
            let settings: serde_json::Map<String, serde_json::Value> = shown
                .iter()
                .map(|s| {
                    (
                        s.key.to_owned(),
                        json!({ "value": s.value, "source": s.source }),
                    )
                })
                .collect();
            print_json(&json!({
                "config_file": path,
                "config_file_exists": path.exists(),
                "settings": settings,
                "kiln_token_set": token,
            }));
        }
        _ => {
            let exists = if path.exists() {
                ""
            } else {
                " (not created yet)"
            };
            println!("config file: {}{exists}", path.display());
            for s in &shown {
                println!(
                    "{:<9} {}  ({})",
                    format!("{}:", s.key),
                    s.value.as_deref().unwrap_or("-"),
                    s.source
                );
            }
            if token {
                println!("token:    KILN_TOKEN is set: it is used instead of the saved login");
            }
        }
    }
    Ok(())
}

/// Writes the file through a temporary file and a rename, so a crash never leaves half
/// a config behind.
fn save(dir: &Path, path: &Path, file: &ConfigFile) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = toml::to_string_pretty(file).context("writing the client config")?;
    let tmp = dir.join(".config.toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        for good in [
            "https://127.0.0.1:7443",
            "kiln.example.com:7443",
            "http://[::1]:9000",
        ] {
            check_endpoint(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["ftp://host:1", "https://", "https://host:1/api", "a b"] {
            assert!(check_endpoint(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = set(&mut ConfigFile::default(), "endpont", "x").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown client setting \"endpont\": the settings are endpoint, ca_file, output"
        );
    }
}
