//! Where the CLI connects and as whom.
//!
//! Settings come from, in order of precedence: flags (`--endpoint`, `--ca`, `--output`),
//! the environment (`KILN_ENDPOINT`, `KILN_CA`, `KILN_TOKEN`, `KILN_OUTPUT`), the client
//! config file (`<config dir>/kiln/config.toml`: `endpoint`, `ca_file`, `output`), and
//! defaults (`https://127.0.0.1:7443`, and the development CA of `kiln up` when it
//! exists). Credentials from `kiln login` live in `<config dir>/kiln/credentials.json`,
//! created 0600, one entry per endpoint; an expired access token is refreshed on its own
//! (the refresh token rotates, and the new one is saved).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow};
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_rpc::client::{ClientConfig, KilnChannel};
use serde::{Deserialize, Serialize};

use crate::output::{OutputChoice, OutputFormat};

pub const DEFAULT_ENDPOINT: &str = "https://127.0.0.1:7443";

/// Refresh the access token when it has less than this left.
const REFRESH_MARGIN: Duration = Duration::from_secs(30);

/// Flags every client command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// The kiln endpoint. Default: the config file's, else https://127.0.0.1:7443.
    #[arg(long, global = true, env = "KILN_ENDPOINT")]
    pub endpoint: Option<String>,

    /// CA certificate (PEM) of the server. Default: the config file's `ca_file`, else the
    /// development CA of `kiln up` when present.
    #[arg(long, global = true, env = "KILN_CA")]
    pub ca: Option<PathBuf>,

    /// Output format: `text` for people, `json` or `yaml` for programs.
    #[arg(long, short = 'o', global = true, env = "KILN_OUTPUT")]
    pub output: Option<OutputChoice>,
}

/// `<config dir>/kiln/config.toml`.
///
/// An unknown key is an error naming it (a typo such as `endpont` must not silently fall
/// back to the default endpoint).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub endpoint: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub output: Option<OutputChoice>,
}

/// Tokens of one endpoint, as saved by `kiln login`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub username: String,
    pub access_token: String,
    pub refresh_token: String,
    /// Unix seconds.
    pub access_expires_at: u64,
    /// Unix seconds.
    pub refresh_expires_at: u64,
}

/// The resolved settings of one CLI invocation.
#[derive(Debug, Clone)]
pub struct Context {
    pub endpoint: String,
    pub ca_pem: Option<String>,
    /// Where `ca_pem` came from, to name it in errors.
    pub ca_path: Option<PathBuf>,
    pub output: OutputFormat,
    config_dir: PathBuf,
}

pub fn config_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_CONFIG_DIR") {
        return PathBuf::from(dir);
    }
    dirs::config_dir().map_or_else(|| PathBuf::from(".kiln-config"), |d| d.join("kiln"))
}

/// The client config file in `config_dir`.
pub fn config_file_path(config_dir: &Path) -> PathBuf {
    config_dir.join("config.toml")
}

/// The development CA of `kiln up` on this machine, when it exists (the last fallback
/// for `--ca`).
pub fn dev_ca() -> Option<PathBuf> {
    let dev = crate::up::default_data_dir().join("pki/ca.pem");
    dev.exists().then_some(dev)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn timestamp_secs(t: Option<&prost_types::Timestamp>) -> u64 {
    t.map_or(0, |t| u64::try_from(t.seconds).unwrap_or(0))
}

impl Context {
    pub fn resolve(args: &ClientArgs) -> anyhow::Result<Self> {
        let config_dir = config_dir();
        let file = read_config(&config_file_path(&config_dir))?;
        let endpoint = args
            .endpoint
            .clone()
            .or(file.endpoint)
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let endpoint = if endpoint.contains("://") {
            endpoint
        } else {
            format!("https://{endpoint}")
        };
        let ca_path = args.ca.clone().or(file.ca_file).or_else(dev_ca);
        let ca_pem = ca_path.as_deref().map(read_ca).transpose()?;
        let output = args.output.or(file.output).unwrap_or_default().apply();
        Ok(Self {
            endpoint,
            ca_pem,
            ca_path,
            output,
            config_dir,
        })
    }

    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new(&self.endpoint);
        if let Some(ca) = &self.ca_pem {
            config = config.ca_pem(ca.clone());
        }
        config
    }

    fn connect_error(&self, err: kiln_rpc::Error) -> anyhow::Error {
        if let Some(line) = self.diagnose(&err) {
            return anyhow!("cannot reach kiln at {}: {line}", self.endpoint);
        }
        anyhow!(
            "cannot reach kiln at {}: {err}\nhint: is the suite running (`kiln up`)? check --endpoint and --ca",
            self.endpoint
        )
    }

    /// Why a connection failed, in one line a user can act on (see [`crate::transport`]).
    pub fn diagnose(&self, err: &(dyn std::error::Error + 'static)) -> Option<String> {
        crate::transport::diagnose(err, &self.endpoint, self.ca_path.as_deref())
    }

    /// A channel without credentials (for Login and other PUBLIC RPCs).
    pub async fn anonymous(&self) -> anyhow::Result<KilnChannel> {
        self.client()
            .connect()
            .await
            .map_err(|e| self.connect_error(e))
    }

    /// A channel carrying a valid token: `KILN_TOKEN` if set (an API key or an access
    /// token), else the saved login, refreshed first if it is about to expire.
    pub async fn authenticated(&self) -> anyhow::Result<KilnChannel> {
        let token = match std::env::var("KILN_TOKEN").ok().filter(|t| !t.is_empty()) {
            Some(token) => {
                self.warn_if_token_overrides_login();
                token
            }
            None => self.fresh_access_token().await?,
        };
        self.client()
            .token(token)
            .connect()
            .await
            .map_err(|e| self.connect_error(e))
    }

    /// KILN_TOKEN wins over a saved login; say so, or a user who logged in as someone
    /// else wonders why commands run as the token's principal. A broken credentials file
    /// is not this command's business (KILN_TOKEN does not need it), so it is ignored here.
    fn warn_if_token_overrides_login(&self) {
        if let Ok(store) = CredentialStore::load(&self.config_dir)
            && let Some(saved) = store.entries.get(&self.endpoint)
        {
            eprintln!(
                "warning: KILN_TOKEN is set: using it instead of the saved login of {} at {} (unset KILN_TOKEN to use the login)",
                saved.username, self.endpoint
            );
        }
    }

    async fn fresh_access_token(&self) -> anyhow::Result<String> {
        let not_logged_in =
            || anyhow!("not logged in to {}\nhint: run `kiln login`", self.endpoint);
        let mut store = CredentialStore::load(&self.config_dir)?;
        let creds = store
            .entries
            .get(&self.endpoint)
            .cloned()
            .ok_or_else(not_logged_in)?;
        let now = unix(SystemTime::now());
        if creds.access_expires_at > now + REFRESH_MARGIN.as_secs() {
            return Ok(creds.access_token);
        }
        if creds.refresh_expires_at <= now {
            return Err(anyhow!(
                "your session at {} has expired\nhint: run `kiln login`",
                self.endpoint
            ));
        }
        let mut auth = AuthServiceClient::new(self.anonymous().await?);
        let refreshed = auth
            .refresh(pb::RefreshRequest {
                refresh_token: creds.refresh_token.clone(),
            })
            .await
            .map_err(|status| {
                anyhow!(
                    "your session could not be renewed: {}\nhint: run `kiln login`",
                    status.message()
                )
            })?
            .into_inner();
        let renewed = Credentials {
            username: creds.username,
            access_token: refreshed.access_token.clone(),
            refresh_token: refreshed.refresh_token,
            access_expires_at: timestamp_secs(refreshed.access_expires_at.as_ref()),
            refresh_expires_at: timestamp_secs(refreshed.refresh_expires_at.as_ref()),
        };
        store.entries.insert(self.endpoint.clone(), renewed);
        store.save(&self.config_dir)?;
        Ok(refreshed.access_token)
    }

    pub fn save_credentials(&self, creds: Credentials) -> anyhow::Result<()> {
        let mut store = CredentialStore::load(&self.config_dir)?;
        store.entries.insert(self.endpoint.clone(), creds);
        store.save(&self.config_dir)
    }

    /// Removes the saved login of this endpoint; returns it if there was one.
    pub fn forget_credentials(&self) -> anyhow::Result<Option<Credentials>> {
        let mut store = CredentialStore::load(&self.config_dir)?;
        let removed = store.entries.remove(&self.endpoint);
        store.save(&self.config_dir)?;
        Ok(removed)
    }

    /// Where per-user CLI state lives (e.g. how far `kiln build watch` got).
    pub fn state_dir(&self) -> PathBuf {
        self.config_dir.join("state")
    }
}

/// The CA file's PEM, refusing a missing file or one without a certificate in it with
/// an error that names the file (not a TLS failure later).
pub fn read_ca(path: &Path) -> anyhow::Result<String> {
    let pem = match std::fs::read_to_string(path) {
        Ok(pem) => pem,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(anyhow!(
                "the CA file {} does not exist\nhint: check --ca, KILN_CA or `ca_file` in the client config",
                path.display()
            ));
        }
        Err(err) if err.kind() == std::io::ErrorKind::InvalidData => {
            return Err(anyhow!(
                "the CA file {} is not a PEM certificate (it is not even text)",
                path.display()
            ));
        }
        Err(err) => {
            return Err(err).with_context(|| format!("reading the CA file {}", path.display()));
        }
    };
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(anyhow!(
            "the CA file {} is not a PEM certificate (no -----BEGIN CERTIFICATE----- block)",
            path.display()
        ));
    }
    Ok(pem)
}

pub fn read_config(path: &Path) -> anyhow::Result<ConfigFile> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("reading {}", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

/// `credentials.json`: endpoint → credentials.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CredentialStore {
    entries: BTreeMap<String, Credentials>,
}

impl CredentialStore {
    fn path(dir: &Path) -> PathBuf {
        dir.join("credentials.json")
    }

    fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = Self::path(dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes through a 0600 temporary file and a rename, so the file is never readable
    /// by others and never half-written.
    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let path = Self::path(dir);
        let tmp = dir.join(".credentials.json.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}
