//! kiln-auth's configuration: every knob with its default, and the clock.

use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use kiln_config::duration;
use serde::{Deserialize, Serialize};

/// Settings of the auth service: the `[auth]` section of the configuration file.
/// [`AuthConfig::new`] gives the defaults stated on each field; kiln-config layers the
/// file, `KILN_AUTH__*` variables and flags on top.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Where `auth.db` (and, when generated, `admin-password`) live. Created 0700 if
    /// missing. Not a key of its own: `<server.data_dir>/auth`.
    #[serde(skip)]
    pub data_dir: PathBuf,
    /// Where the store is: `sqlite:///path` or `postgres://user@host/db` (tables in
    /// schema `auth`, so one database can hold all three services). Default: SQLite
    /// in `<data_dir>/auth.db`. Env `KILN_AUTH__DATABASE_URL`, flag `--database-url`.
    /// Shown with its password redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<kiln_store::DatabaseUrl>,
    /// The `iss` claim of access tokens. Default `kiln`.
    pub issuer: String,
    /// The `aud` claim of access tokens. Default `kiln`.
    pub audience: String,
    /// Lifetime of an access token. Default 15 minutes: short, because access tokens are
    /// verified locally by every service and cannot be revoked before they expire.
    #[serde(rename = "access_token_ttl", with = "duration")]
    pub access_ttl: Duration,
    /// A refresh token unused for this long expires (idle lifetime). Default 7 days.
    #[serde(with = "duration")]
    pub refresh_idle_ttl: Duration,
    /// No session outlives this, however often it is refreshed (absolute lifetime).
    /// Default 30 days.
    #[serde(with = "duration")]
    pub refresh_absolute_ttl: Duration,
    /// A rotated refresh token presented again within this window is taken for a
    /// concurrent refresh (two tabs, a retried request) and answered with new tokens of
    /// the same session instead of revoking it. Default 5 seconds.
    #[serde(with = "duration")]
    pub refresh_reuse_grace: Duration,
    /// The signing key is replaced when it is older than this. Default 24 hours.
    #[serde(with = "duration")]
    pub key_rotation_interval: Duration,
    /// How often the background task checks whether the signing key is due. Default 1
    /// minute.
    #[serde(with = "duration")]
    pub key_rotation_check: Duration,
    /// The longest lifetime of a delegated token (`ExchangeToken`); longer requests are
    /// capped, and a request without a lifetime gets this. Default 2 hours: long enough
    /// for an agent task's budget, short enough that a leaked delegation dies soon.
    /// Revocations and retired signing keys are kept for the longest token lifetime
    /// (this or `access_ttl`), so delegated tokens stay revocable and verifiable to
    /// their end.
    #[serde(with = "duration")]
    pub delegation_max_lifetime: Duration,
    /// The workloads (the `<name>` of `spiffe://<trust-domain>/service/<name>`) that may
    /// call `ExchangeToken`. Default `["agent"]`: only kiln-agent acts for users.
    pub token_exchange_actors: Vec<String>,
    /// Login throttling; see [`ThrottleConfig`].
    pub throttle: ThrottleConfig,
    /// Argon2id cost; see [`PasswordCost`]. Default: the OWASP parameters. Not a
    /// setting: a file must not be able to make password hashes cheap to crack.
    #[serde(skip)]
    pub password_cost: PasswordCost,
    /// Password of the bootstrap `admin` user, used only when the store is empty. `kiln
    /// up` fills it from `KILN_ADMIN_PASSWORD` or `--admin-password-file`, never from a
    /// flag's value (command lines are world-readable in /proc). Default `None`: a
    /// password is generated and written once to `<data_dir>/admin-password` (mode 0600).
    /// Never a key of the file either.
    #[serde(skip)]
    pub admin_password: Option<String>,
    /// Concurrent Argon2 computations. Default: the number of CPU cores, so that hashing
    /// (about 20 ms of one core each) never takes every blocking thread and logins queue
    /// instead of starving the runtime.
    pub hashing_concurrency: usize,
    /// The source of the current time. Default: the system clock. Tests use
    /// [`ManualClock`] to expire tokens and lockouts without sleeping.
    #[serde(skip, default = "system_clock")]
    pub clock: std::sync::Arc<dyn Clock>,
}

impl AuthConfig {
    /// The longest any token kiln-auth signs can live: what revocations and retired
    /// signing keys must outlive.
    pub fn max_token_lifetime(&self) -> Duration {
        self.access_ttl.max(self.delegation_max_lifetime)
    }

    /// Where the store is: `database_url`, or the SQLite file in `data_dir`.
    pub fn database(&self) -> kiln_store::DatabaseUrl {
        self.database_url
            .clone()
            .unwrap_or_else(|| kiln_store::DatabaseUrl::sqlite(self.data_dir.join(crate::DB_FILE)))
    }

    /// The defaults, with the store in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            database_url: None,
            issuer: "kiln".into(),
            audience: "kiln".into(),
            access_ttl: Duration::from_secs(15 * 60),
            refresh_idle_ttl: Duration::from_secs(7 * 24 * 3600),
            refresh_absolute_ttl: Duration::from_secs(30 * 24 * 3600),
            refresh_reuse_grace: Duration::from_secs(5),
            key_rotation_interval: Duration::from_secs(24 * 3600),
            key_rotation_check: Duration::from_secs(60),
            delegation_max_lifetime: Duration::from_secs(2 * 3600),
            token_exchange_actors: vec!["agent".into()],
            throttle: ThrottleConfig::default(),
            password_cost: PasswordCost::OWASP,
            admin_password: None,
            hashing_concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            clock: system_clock(),
        }
    }
}

/// The defaults with no data directory yet (the loader sets it from `[server]`).
impl Default for AuthConfig {
    fn default() -> Self {
        Self::new(PathBuf::new())
    }
}

fn system_clock() -> std::sync::Arc<dyn Clock> {
    std::sync::Arc::new(SystemClock)
}

/// Login throttling. Failures are counted per account (the username as typed, whether
/// or not it exists, so an unknown user is throttled exactly like a known one) and per
/// peer IP address. The failure that brings a counter to its allowance, and every one
/// after it, locks the account (or peer) for a period that doubles with each failure:
/// `base_lockout`, then twice that, up to `max_lockout` (defaults: the 5th wrong
/// password for one account locks it 30 s, the 6th 60 s, … at most 15 min). While locked, logins answer RESOURCE_EXHAUSTED
/// (reason LOGIN_THROTTLED) with RetryInfo without checking the password. A successful
/// login clears its account's counter (not the peer's: one valid account must not let an
/// attacker reset the peer's count). Counters are forgotten after `failure_window`
/// without failures. Counters and attempts in flight are kept in the store, so every
/// replica on one database counts the same guesses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// The number of failures per account that starts the first lockout. Default 5.
    pub account_free_failures: u32,
    /// The number of failures per peer IP (over all accounts) that starts its first
    /// lockout. Default 20.
    pub peer_free_failures: u32,
    /// The first lockout. Default 30 seconds.
    #[serde(with = "duration")]
    pub base_lockout: Duration,
    /// The longest lockout. Default 15 minutes.
    #[serde(with = "duration")]
    pub max_lockout: Duration,
    /// Counters without a failure for this long are dropped. Default 1 hour.
    #[serde(with = "duration")]
    pub failure_window: Duration,
    /// At most this many counters are kept per kind (account, peer) in the store;
    /// expired counters are dropped first, then the oldest. Default 100 000.
    pub max_entries: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            account_free_failures: 5,
            peer_free_failures: 20,
            base_lockout: Duration::from_secs(30),
            max_lockout: Duration::from_secs(15 * 60),
            failure_window: Duration::from_secs(3600),
            max_entries: 100_000,
        }
    }
}

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordCost {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Iterations.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl PasswordCost {
    /// OWASP's recommendation for Argon2id: 19 MiB, 2 iterations, 1 lane.
    pub const OWASP: Self = Self {
        memory_kib: 19 * 1024,
        iterations: 2,
        parallelism: 1,
    };
    /// The cheapest Argon2id allows. **For tests only**: it makes hashes fast to crack.
    pub const INSECURE_FOR_TESTS: Self = Self {
        memory_kib: 8,
        iterations: 1,
        parallelism: 1,
    };
}

/// The current time. A trait so that tests can move time forward instead of sleeping.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that starts at the system time and moves only when told to.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<SystemTime>,
}

impl ManualClock {
    pub fn new() -> Self {
        Self {
            now: Mutex::new(SystemTime::now()),
        }
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The configuration file of the `kiln-auth` binary: `[server]` (listener, certificates, the
/// other services' endpoints) and `[auth]`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthFile {
    pub server: kiln_config::ServerConfig,
    pub auth: AuthConfig,
}

impl kiln_config::ConfigFile for AuthFile {
    const SECTIONS: &'static [&'static str] = &["server", "auth"];

    fn finish(&mut self) -> Result<(), kiln_config::Error> {
        self.auth.data_dir = self.server.effective_data_dir().join("auth");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kiln_config::{ConfigFile, Overrides};

    use super::*;

    fn load(toml: &str, overrides: Overrides) -> Result<AuthFile, kiln_config::Error> {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("kiln.toml");
        std::fs::write(&file, toml).expect("write");
        AuthFile::load(Some(&file), overrides)
    }

    #[test]
    fn the_database_defaults_to_the_sqlite_file_and_takes_a_postgres_url() {
        let file = load("", Overrides::new()).expect("defaults");
        assert_eq!(
            file.auth.database().sqlite_path(),
            Some(file.auth.data_dir.join(crate::DB_FILE).as_path())
        );
        let file = load(
            "[auth]\ndatabase_url = \"postgres://kiln:s3cret@db/kiln\"\n",
            Overrides::new(),
        )
        .expect("postgres");
        assert_eq!(
            file.auth.database().backend(),
            kiln_store::Backend::Postgres
        );
        assert!(!format!("{:?}", file.auth).contains("s3cret"));
        // The flag (last layer) wins over the file.
        let file = load(
            "[auth]\ndatabase_url = \"postgres://db/kiln\"\n",
            Overrides::new().set("auth.database_url", Some("sqlite:///tmp/x.db")),
        )
        .expect("flag");
        assert_eq!(
            file.auth.database().sqlite_path(),
            Some(std::path::Path::new("/tmp/x.db"))
        );
    }

    #[test]
    fn an_unknown_scheme_is_refused_by_name_without_its_password() {
        let err = load(
            "[auth]\ndatabase_url = \"mysql://root:s3cret@db/kiln\"\n",
            Overrides::new(),
        )
        .expect_err("mysql");
        let shown = err.to_string();
        assert!(shown.contains("`mysql`"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
