//! The build service's configuration section. Every default is stated on its field and
//! set by [`BuildConfig::new`].

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use kiln_config::duration;
use kiln_sandbox::SandboxConfig;
use serde::{Deserialize, Serialize};

/// Everything kiln-build needs to run: the `[build]` section of the configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuildConfig {
    /// Where workspaces (`<data_dir>/workspaces/<id>`), staging areas
    /// (`<data_dir>/staging`) and the store (`<data_dir>/build.db`) live. Not a key of
    /// its own: `<server.data_dir>/build`.
    #[serde(skip)]
    pub data_dir: PathBuf,
    /// Where the store is: `sqlite:///path` or `postgres://user@host/db` (tables in
    /// schema `build`, so one database can hold all three services). Default: SQLite in
    /// `<data_dir>/build.db`. Env `KILN_BUILD__DATABASE_URL`, flag `--database-url`. Shown
    /// with its password redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<kiln_store::DatabaseUrl>,
    /// What builds may run and with which limits.
    pub policy: Policy,
    /// How many builds run at once and how many may wait.
    pub queue: QueueConfig,
    /// Size and path limits of workspaces.
    pub workspace: WorkspaceLimits,
    /// A watch stream that saw no event for this long gets a Heartbeat. Default 15 s.
    #[serde(with = "duration")]
    pub heartbeat_interval: Duration,
    /// How long finished builds and idle workspaces are kept.
    pub retention: Retention,
    /// The sandbox steps run in. Default: [`SandboxConfig::default`] (the best tier the
    /// host offers; refuses to start below tier B unless `allow_unsandboxed` is set).
    pub sandbox: SandboxConfig,
    /// How much of a running build's log is kept in memory for live watchers, in bytes of
    /// output; watchers further behind read from the store. Default 16 MiB.
    pub live_window_bytes: usize,
}

/// The defaults with no data directory yet (the loader sets it from `[server]`).
impl Default for BuildConfig {
    fn default() -> Self {
        Self::new(PathBuf::new())
    }
}

impl BuildConfig {
    /// Where the store is: `database_url`, or the SQLite file in `data_dir`.
    pub fn database(&self) -> kiln_store::DatabaseUrl {
        self.database_url
            .clone()
            .unwrap_or_else(|| kiln_store::DatabaseUrl::sqlite(self.data_dir.join("build.db")))
    }

    /// The defaults, with data under `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            database_url: None,
            policy: Policy::default(),
            queue: QueueConfig::default(),
            workspace: WorkspaceLimits::default(),
            heartbeat_interval: Duration::from_secs(15),
            retention: Retention::default(),
            sandbox: SandboxConfig::default(),
            live_window_bytes: 16 << 20,
        }
    }

    /// What a file can get wrong that types cannot express; also adds
    /// `policy.extra_programs` to the allowlist. Run by the loader, before
    /// [`BuildApi::open`](crate::BuildApi::open).
    pub fn check(&mut self) -> Result<(), kiln_config::Error> {
        let policy = &mut self.policy;
        policy
            .allowed_programs
            .extend(std::mem::take(&mut policy.extra_programs));
        let (d, m) = (&policy.default_limits, &policy.max_limits);
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
            let key = format!("build.policy.default_limits.{name}");
            if default == 0 {
                return Err(kiln_config::Error::rule(key, "must be above 0"));
            }
            if default > max {
                return Err(kiln_config::Error::rule(
                    key,
                    format!("is above build.policy.max_limits.{name}"),
                ));
            }
        }
        let q = &self.queue;
        if q.max_running == 0 || q.max_running_per_user == 0 || q.max_queued_per_user == 0 {
            return Err(kiln_config::Error::rule(
                "build.queue",
                "every limit must be at least 1",
            ));
        }
        if q.lease < Duration::from_secs(1) {
            return Err(kiln_config::Error::rule(
                "build.queue.lease",
                "must be at least 1s (it is renewed every third of it)",
            ));
        }
        if policy
            .allowed_programs
            .iter()
            .any(|p| p.contains('/') || p.is_empty())
        {
            return Err(kiln_config::Error::rule(
                "build.policy.allowed_programs",
                "program names, not paths (they are looked up in the step's PATH)",
            ));
        }
        for shell in ["sh", "bash", "dash", "zsh", "fish", "ksh", "csh", "tcsh"] {
            if policy.allowed_programs.contains(shell) {
                tracing::warn!(
                    shell,
                    "the build allowlist contains a shell: steps can then run anything"
                );
            }
        }
        Ok(())
    }

    pub(crate) fn workspaces_dir(&self) -> PathBuf {
        self.data_dir.join("workspaces")
    }

    pub(crate) fn staging_dir(&self) -> PathBuf {
        self.data_dir.join("staging")
    }
}

/// The limits of one build. In [`Policy`] they are the defaults and the maxima.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildLimits {
    /// Wall-clock time of the whole build (queue time not counted).
    #[serde(with = "duration")]
    pub wall_timeout: Duration,
    /// CPU time of each step's process tree.
    #[serde(with = "duration")]
    pub cpu_time: Duration,
    /// Memory of each step's process tree.
    pub memory_bytes: u64,
    /// stdout + stderr of the whole build.
    pub output_bytes: u64,
    /// Growth of the workspace during a step.
    pub disk_bytes: u64,
    /// Processes and threads of a step.
    pub processes: u32,
    /// Open files per process.
    pub open_files: u32,
}

impl BuildLimits {
    /// The out-of-the-box defaults: 15 min wall, 10 min CPU, 2 GiB memory, 16 MiB
    /// output, 1 GiB disk, 256 processes, 1024 open files.
    pub const DEFAULT: Self = Self {
        wall_timeout: Duration::from_secs(15 * 60),
        cpu_time: Duration::from_secs(10 * 60),
        memory_bytes: 2 << 30,
        output_bytes: 16 << 20,
        disk_bytes: 1 << 30,
        processes: 256,
        open_files: 1024,
    };

    /// The out-of-the-box maxima: 2 h wall, 2 h CPU, 8 GiB memory, 1 GiB output, 8 GiB
    /// disk, 1024 processes, 8192 open files.
    pub const MAX: Self = Self {
        wall_timeout: Duration::from_secs(2 * 3600),
        cpu_time: Duration::from_secs(2 * 3600),
        memory_bytes: 8 << 30,
        output_bytes: 1 << 30,
        disk_bytes: 8 << 30,
        processes: 1024,
        open_files: 8192,
    };
}

/// What a build may run. Enforced by StartBuild and served by GetPolicy. In the file:
/// `[build.policy]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Names argv[0] may be (exact match, no `/`). Default: common toolchains and harmless
    /// utilities, no shell and no exec wrapper: see [`Policy::DEFAULT_PROGRAMS`]. A
    /// program that an allowed wrapper would run (`env X`, `nice X`, `timeout 5 X`,
    /// `xargs X`, `find -exec X`, …) must be on the list too. The allowlist is a policy,
    /// not a security boundary: `make`, `python3`, `node`, `cargo` (build scripts) and
    /// friends run anything by design. It keeps honest mistakes and lazy injections out;
    /// the sandbox is what contains a hostile build.
    pub allowed_programs: BTreeSet<String>,
    /// Added to `allowed_programs` by [`BuildConfig::check`] (handy to keep the defaults
    /// and add one). Default: none.
    pub extra_programs: Vec<String>,
    /// Environment variable names a request may set. Default:
    /// [`Policy::DEFAULT_ENV`]. `LD_*`, `KILN_*`, `PATH` and `HOME` are refused even if
    /// listed here.
    pub allowed_env: BTreeSet<String>,
    /// Limits for fields a request leaves unset. Default [`BuildLimits::DEFAULT`].
    pub default_limits: BuildLimits,
    /// The highest limits a request may ask for. Default [`BuildLimits::MAX`].
    pub max_limits: BuildLimits,
    /// Most steps per build. Default 64 (the contract's maximum).
    pub max_steps: u32,
    /// The fixed `PATH` of every step. Default `/usr/local/bin:/usr/bin:/bin`, plus the
    /// service user's `$CARGO_HOME/bin` (or `~/.cargo/bin`) when it exists, which the
    /// sandbox mounts read-only. Not a setting: it follows the service user's
    /// toolchains.
    #[serde(skip)]
    pub path: String,
    /// Other fixed variables of every step, after PATH and HOME. Default: `RUSTUP_HOME`
    /// of the service user when a rustup installation exists (the rustup proxies in
    /// `~/.cargo/bin` need it, since HOME points into the workspace). Not a setting.
    #[serde(skip)]
    pub fixed_env: Vec<(String, String)>,
}

impl Policy {
    /// The default program allowlist. No `env` (a pure exec wrapper whose `NAME=VALUE`
    /// words would also bypass `allowed_env`); `find` stays, and its `-exec` family is
    /// checked like any wrapper.
    pub const DEFAULT_PROGRAMS: &[&str] = &[
        "cargo", "rustc", "python3", "python", "pip", "pip3", "node", "npm", "npx", "go", "make",
        "cc", "gcc", "g++", "c++", "clang", "ld", "ar", "true", "false", "echo", "cat", "ls",
        "test", "sleep", "printf", "head", "tail", "wc", "sort", "grep", "sed", "diff", "mkdir",
        "cp", "mv", "rm", "touch", "tar", "find",
    ];

    /// The default environment allowlist: build-tool knobs, never loader or server
    /// variables.
    pub const DEFAULT_ENV: &[&str] = &[
        "CC",
        "CXX",
        "CFLAGS",
        "CXXFLAGS",
        "CPPFLAGS",
        "LDFLAGS",
        "MAKEFLAGS",
        "RUSTFLAGS",
        "RUST_BACKTRACE",
        "RUST_LOG",
        "CARGO_TERM_COLOR",
        "CARGO_INCREMENTAL",
        "CARGO_BUILD_JOBS",
        "CARGO_NET_OFFLINE",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONHASHSEED",
        "PIP_NO_INDEX",
        "NODE_ENV",
        "GOFLAGS",
        "GOOS",
        "GOARCH",
        "CGO_ENABLED",
        "LANG",
        "LC_ALL",
        "TZ",
        "TERM",
        "NO_COLOR",
        "CI",
        "SOURCE_DATE_EPOCH",
    ];

    /// Whether a variable name can never be set by a request, whatever the allowlist says:
    /// the dynamic loader's (`LD_*`), kiln's own (`KILN_*`) and the fixed ones.
    pub fn env_forbidden(name: &str) -> bool {
        name.starts_with("LD_") || name.starts_with("KILN_") || name == "PATH" || name == "HOME"
    }
}

impl Default for Policy {
    fn default() -> Self {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let tool_dir = |var: &str, dir: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(dir)))
                .filter(|p| p.is_dir())
        };
        let mut path = "/usr/local/bin:/usr/bin:/bin".to_owned();
        if let Some(cargo_bin) = tool_dir("CARGO_HOME", ".cargo").map(|d| d.join("bin"))
            && cargo_bin.is_dir()
            && let Some(s) = cargo_bin.to_str()
        {
            path.push(':');
            path.push_str(s);
        }
        let fixed_env = tool_dir("RUSTUP_HOME", ".rustup")
            .and_then(|p| p.to_str().map(|s| ("RUSTUP_HOME".to_owned(), s.to_owned())))
            .into_iter()
            .collect();
        Self {
            allowed_programs: Self::DEFAULT_PROGRAMS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            extra_programs: Vec::new(),
            allowed_env: Self::DEFAULT_ENV.iter().map(|s| (*s).to_owned()).collect(),
            default_limits: BuildLimits::DEFAULT,
            max_limits: BuildLimits::MAX,
            max_steps: 64,
            path,
            fixed_env,
        }
    }
}

/// The queue's limits.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Builds running at once on this server. Default: the number of cores.
    pub max_running: usize,
    /// Builds one user may have running at once. Default 2.
    pub max_running_per_user: usize,
    /// Builds one user may have queued (not yet running). More answer RESOURCE_EXHAUSTED
    /// (reason QUEUE_FULL). Default 20.
    pub max_queued_per_user: usize,
    /// With several replicas on Postgres: how long a claimed build stays its replica's
    /// without renewal, so a dead replica's builds end INTERRUPTED within about this
    /// long. Renewed every third of it. Default 10 s, at least 1 s. Unused on SQLite.
    #[serde(with = "duration")]
    pub lease: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_running: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_running_per_user: 2,
            max_queued_per_user: 20,
            lease: Duration::from_secs(10),
        }
    }
}

/// Limits of workspaces, checked by every API change (builds are bounded by their
/// disk limit, and by `max_files` as the sandbox's entry limit).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkspaceLimits {
    /// Total apparent size of the files. Default 1 GiB.
    pub max_bytes: u64,
    /// Number of entries of every kind (files, directories, symlinks), in API changes
    /// and during builds. Default 100 000.
    pub max_files: u64,
    /// Largest single file. Default 256 MiB.
    pub max_file_bytes: u64,
    /// Longest path, in bytes. Default 1024 (the contract's rule, so not a setting).
    #[serde(skip)]
    pub max_path_bytes: usize,
    /// Longest path component, in bytes. Default 255 (the contract's rule, so not a
    /// setting).
    #[serde(skip)]
    pub max_component_bytes: usize,
    /// Most files (and delete paths) in one request. Default 10 000.
    pub max_files_per_request: usize,
    /// An UploadArchive stream that sends nothing for this long is abandoned
    /// (DEADLINE_EXCEEDED, nothing applied). Default 30 s.
    #[serde(with = "duration")]
    pub upload_idle_timeout: Duration,
    /// The longest an UploadArchive stream may take, however steadily it sends.
    /// Default 10 min.
    #[serde(with = "duration")]
    pub upload_timeout: Duration,
}

impl Default for WorkspaceLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            max_files: 100_000,
            max_file_bytes: 256 << 20,
            max_path_bytes: 1024,
            max_component_bytes: 255,
            max_files_per_request: 10_000,
            upload_idle_timeout: Duration::from_secs(30),
            upload_timeout: Duration::from_secs(600),
        }
    }
}

/// How long things are kept, and how often the cleanup runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Finished builds (and their logs) older than this are deleted. Default 30 days.
    #[serde(with = "duration")]
    pub finished_builds: Duration,
    /// Workspaces unchanged and unbuilt for this long are deleted (never while a build of
    /// them is queued or running). Default 14 days.
    #[serde(with = "duration")]
    pub idle_workspaces: Duration,
    /// How often the cleanup runs (also once at start). Default 1 hour.
    #[serde(with = "duration")]
    pub cleanup_interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            finished_builds: Duration::from_secs(30 * 24 * 3600),
            idle_workspaces: Duration::from_secs(14 * 24 * 3600),
            cleanup_interval: Duration::from_secs(3600),
        }
    }
}

/// The configuration file of the `kiln-build` binary: `[server]` (listener, certificates, the
/// other services' endpoints) and `[build]`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuildFile {
    pub server: kiln_config::ServerConfig,
    pub build: BuildConfig,
}

impl kiln_config::ConfigFile for BuildFile {
    const SECTIONS: &'static [&'static str] = &["server", "build"];

    fn finish(&mut self) -> Result<(), kiln_config::Error> {
        self.build.data_dir = self.server.effective_data_dir().join("build");
        self.build.check()
    }
}
