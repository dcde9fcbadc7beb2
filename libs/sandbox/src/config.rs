//! Sandbox configuration: which tier, which host directories a step may see, who it runs as.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The isolation a sandbox provides. See the crate README for the full matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// No isolation at all (only timeouts, rlimits and the output limit). Only used
    /// when [`SandboxConfig::allow_unsandboxed`] is set.
    None,
    /// landlock + seccomp + rlimits + no_new_privs + a subreaper supervisor (and cgroups
    /// where writable). For hosts that refuse namespaces, e.g. an unprivileged pod.
    B,
    /// Tier B plus user, mount, pid, net, uts, ipc and cgroup namespaces and a fresh root.
    A,
}

impl Tier {
    /// What this tier leaves visible or shared, in one line for GetPolicy (the README's
    /// tier matrix says it at length). None when nothing notable is left.
    pub fn caveats(self) -> Option<&'static str> {
        match self {
            Tier::A => None,
            // Hiding other uids' processes needs `hidepid=` on the host's /proc mount,
            // which only the host's root can set; an unprivileged process cannot mount a
            // /proc of its own without a pid namespace.
            Tier::B => Some(
                "not isolated here: the host's process list and every process's command \
                 line (other builds' argv included) are visible in /proc, and the host's \
                 network namespace is shared (internet sockets other than TCP, and TCP \
                 bind/connect with landlock >= 4, are refused; unix sockets only as \
                 socketpair)",
            ),
            Tier::None => Some("no isolation at all: builds run as the service"),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::A => "A",
            Tier::B => "B",
            Tier::None => "none",
        })
    }
}

/// A host path made visible read-only inside the sandbox.
///
/// In tier A it is bind-mounted at `target`; in tier B the host path itself is used
/// (`target` is ignored) and landlock allows reading and executing beneath it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Host path (file or directory). Missing paths are skipped silently, so one default
    /// list serves Debian, Alpine and friends.
    pub source: PathBuf,
    /// Absolute path inside the sandbox (tier A).
    pub target: PathBuf,
}

impl Bind {
    /// The same path outside and inside.
    pub fn same(path: impl AsRef<Path>) -> Self {
        Bind {
            source: path.as_ref().to_path_buf(),
            target: path.as_ref().to_path_buf(),
        }
    }
}

/// The default read-only view: system directories, the few files of `/etc` that
/// toolchains need (dynamic linker cache, alternatives symlinks used by `cc`, time zone,
/// TLS roots), and the Rust toolchain of the service's user when it exists.
pub fn default_read_only_binds() -> Vec<Bind> {
    let mut binds: Vec<Bind> = [
        "/usr",
        "/bin",
        "/sbin",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/etc/alternatives",
        "/etc/ld.so.cache",
        "/etc/ld.so.conf",
        "/etc/ld.so.conf.d",
        "/etc/localtime",
        "/etc/nsswitch.conf",
        "/etc/hosts",
        "/etc/ssl",
        "/etc/ca-certificates",
        "/etc/python3",
        "/etc/python3.11",
        "/etc/python3.12",
        "/etc/python3.13",
        "/etc/gcc",
    ]
    .into_iter()
    .map(Bind::same)
    .collect();
    // Toolchains installed per user (rustup, cargo). The environment wins over the
    // conventional location, as rustup itself does.
    let home = std::env::var_os("HOME").map(PathBuf::from);
    for (var, dir) in [("CARGO_HOME", ".cargo"), ("RUSTUP_HOME", ".rustup")] {
        if let Some(path) = std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(dir)))
        {
            binds.push(Bind::same(path));
        }
    }
    binds
}

/// How a [`Sandbox`](crate::Sandbox) isolates its steps. In the configuration file it is
/// `[build.sandbox]`; the fields a host's layout decides (binds, ids, hostname) are not
/// settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Use exactly this tier (`"A"` or `"B"`), failing if the host cannot provide it.
    /// `None` (default): the best tier the probe finds. Tests use `Some(Tier::B)` to
    /// exercise tier B on a host that allows A.
    #[serde(rename = "tier", with = "tier_name")]
    pub force_tier: Option<Tier>,
    /// Run steps without isolation when the host offers neither tier. Default `false`:
    /// [`Sandbox::new`](crate::Sandbox::new) then fails with [`Error::NoIsolation`](crate::Error::NoIsolation).
    pub allow_unsandboxed: bool,
    /// Host paths visible read-only. Default: [`default_read_only_binds`].
    #[serde(skip)]
    pub read_only_binds: Vec<Bind>,
    /// Host uid and gid the step runs as. Default: 65534:65534 (nobody) when the service
    /// runs as root, else the service's own ids (an unprivileged process cannot switch).
    /// The workspace must be writable by them, see
    /// [`Sandbox::prepare_workspace`](crate::Sandbox::prepare_workspace).
    #[serde(skip)]
    pub run_as: Option<(u32, u32)>,
    /// Uid and gid the step sees inside the user namespace (tier A). Default 1000:1000.
    #[serde(skip, default = "default_inner_ids")]
    pub inner_ids: (u32, u32),
    /// Hostname inside the sandbox (tier A). Default `kiln-sandbox`.
    #[serde(skip, default = "default_hostname")]
    pub hostname: String,
    /// Time between SIGTERM and SIGKILL when a step times out or is cancelled.
    /// Default 2 s.
    #[serde(with = "kiln_config::duration")]
    pub kill_grace: Duration,
    /// How often the workspace's disk use (and the tree's CPU time, where a cgroup
    /// measures it) is checked. Default 100 ms; the check backs off by itself when
    /// walking the workspace gets expensive.
    #[serde(with = "kiln_config::duration")]
    pub check_interval: Duration,
    /// Use cgroups when the host lets us. Default `true`.
    pub use_cgroups: bool,
}

fn default_inner_ids() -> (u32, u32) {
    (1000, 1000)
}

fn default_hostname() -> String {
    "kiln-sandbox".to_owned()
}

/// `force_tier` in a file: `"A"` or `"B"` (a file cannot ask for no isolation: that is
/// `allow_unsandboxed`).
mod tier_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Tier;

    pub fn serialize<S: Serializer>(tier: &Option<Tier>, s: S) -> Result<S::Ok, S::Error> {
        match tier {
            Some(t) => s.serialize_some(&t.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Tier>, D::Error> {
        match Option::<String>::deserialize(d)?.as_deref() {
            None => Ok(None),
            Some("A" | "a") => Ok(Some(Tier::A)),
            Some("B" | "b") => Ok(Some(Tier::B)),
            Some(other) => Err(serde::de::Error::custom(format!(
                "{other:?} is not a tier; use \"A\" or \"B\""
            ))),
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            force_tier: None,
            allow_unsandboxed: false,
            read_only_binds: default_read_only_binds(),
            run_as: None,
            inner_ids: default_inner_ids(),
            hostname: default_hostname(),
            kill_grace: Duration::from_secs(2),
            check_interval: Duration::from_millis(100),
            use_cgroups: true,
        }
    }
}

impl SandboxConfig {
    /// The host ids steps run as, after applying the default.
    pub fn effective_run_as(&self) -> (u32, u32) {
        self.run_as.unwrap_or_else(|| {
            let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
            if uid.is_root() {
                (65534, 65534)
            } else {
                (uid.as_raw(), gid.as_raw())
            }
        })
    }
}
