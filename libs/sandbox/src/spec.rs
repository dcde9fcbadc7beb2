//! What to run: argv, working directory, environment and limits.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// Resource limits of one step. `None` means "not limited" (beyond what the host imposes).
///
/// How each limit is enforced depends on the tier and the host; the
/// [`Outcome`](crate::Outcome) lists what was actually applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Wall-clock time from spawn to exit. Enforced by the monitor: SIGTERM to the whole
    /// tree, SIGKILL after the grace period. Default 15 min.
    pub wall_timeout: Duration,
    /// CPU time (user + system). Per process by `RLIMIT_CPU`, and for the whole tree by
    /// the monitor where a cgroup measures it. Default 10 min.
    pub cpu_time: Option<Duration>,
    /// Memory of the whole tree: cgroup `memory.max` / `memory.limit_in_bytes` where
    /// available (exceeding it ends the step with MEMORY_LIMIT), else `RLIMIT_AS` of each
    /// process. Default 2 GiB.
    pub memory_bytes: Option<u64>,
    /// Explicit `RLIMIT_AS` per process, independent of `memory_bytes`. Default none:
    /// virtual address space says little about memory use (runtimes reserve gigabytes).
    pub address_space_bytes: Option<u64>,
    /// Largest file a process may write (`RLIMIT_FSIZE`). Default: `disk_bytes`.
    pub file_size_bytes: Option<u64>,
    /// Open file descriptors per process (`RLIMIT_NOFILE`). Default 1024.
    pub open_files: Option<u64>,
    /// Processes and threads of the tree: cgroup `pids.max` where available, else
    /// `RLIMIT_NPROC`. Default 256.
    pub processes: Option<u64>,
    /// stdout + stderr bytes delivered. The reader stops at exactly this many bytes and
    /// kills the tree (reason OUTPUT_LIMIT). Default 16 MiB.
    pub output_bytes: Option<u64>,
    /// Growth of the workspace during the step, and the size of the private `/tmp`
    /// (tier A). See the README for how it is enforced. Default 1 GiB.
    pub disk_bytes: Option<u64>,
    /// Entries of any kind (files, directories, symlinks) the workspace may hold during
    /// the step, checked by the monitor with the disk use (reason DISK_LIMIT). Default
    /// none.
    pub disk_entries: Option<u64>,
    /// CPU bandwidth in cores (cgroup `cpu.max` / CFS quota), e.g. `1.5`. Default none.
    pub cpu_cores: Option<f64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            wall_timeout: Duration::from_secs(15 * 60),
            cpu_time: Some(Duration::from_secs(10 * 60)),
            memory_bytes: Some(2 << 30),
            address_space_bytes: None,
            file_size_bytes: None,
            open_files: Some(1024),
            processes: Some(256),
            output_bytes: Some(16 << 20),
            disk_bytes: Some(1 << 30),
            disk_entries: None,
            cpu_cores: None,
        }
    }
}

/// One command to run in the sandbox.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// Program and arguments. A program without `/` is looked up in the `PATH` of
    /// [`env`](Self::env) as seen inside the sandbox; there is no shell.
    pub argv: Vec<String>,
    /// Host path of the workspace: the only directory the step can write (besides a
    /// private `/tmp` in tier A). In tier A it appears at
    /// [`WORKSPACE_MOUNT`](crate::WORKSPACE_MOUNT).
    pub workspace: PathBuf,
    /// Working directory relative to the workspace root; empty means the root. Absolute
    /// paths and `..` are refused.
    pub working_dir: PathBuf,
    /// The complete environment of the step; nothing is inherited from the service.
    pub env: Vec<(String, String)>,
    /// Resource limits.
    pub limits: Limits,
}

impl CommandSpec {
    /// A command with default limits, an empty environment, running at the workspace root.
    pub fn new<I, S>(argv: I, workspace: impl Into<PathBuf>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        CommandSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            workspace: workspace.into(),
            working_dir: PathBuf::new(),
            env: Vec::new(),
            limits: Limits::default(),
        }
    }

    /// Sets the working directory (relative to the workspace).
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.working_dir = dir.into();
        self
    }

    /// Adds one environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Replaces the limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The PATH the program is looked up in: the last `PATH` of `env`, else a fixed
    /// default. The service's own PATH never leaks in.
    pub(crate) fn search_path(&self) -> &str {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or("/usr/local/bin:/usr/bin:/bin")
    }

    /// Checks everything that can be checked without touching the host.
    pub(crate) fn validate(&self) -> Result<()> {
        let Some(program) = self.argv.first() else {
            return Err(Error::InvalidCommand("argv is empty".into()));
        };
        if program.is_empty() {
            return Err(Error::InvalidCommand("argv[0] is empty".into()));
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Err(Error::InvalidCommand("argv contains a NUL byte".into()));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(Error::InvalidCommand(format!(
                    "invalid environment variable {k:?}"
                )));
            }
        }
        validate_working_dir(&self.working_dir)?;
        if self.limits.wall_timeout.is_zero() {
            return Err(Error::InvalidCommand("wall_timeout is zero".into()));
        }
        if let Some(cores) = self.limits.cpu_cores
            && !(cores.is_finite() && cores > 0.0)
        {
            return Err(Error::InvalidCommand(format!(
                "cpu_cores {cores} is not > 0"
            )));
        }
        Ok(())
    }
}

/// A working directory must be relative and must not climb: `..` is refused outright
/// rather than normalised, because a path that needs normalising is a mistake or an
/// attack, and either way the caller should hear about it.
pub(crate) fn validate_working_dir(dir: &Path) -> Result<()> {
    let refuse = |why| {
        Err(Error::InvalidWorkingDir {
            path: dir.to_path_buf(),
            why,
        })
    };
    if dir.as_os_str().as_encoded_bytes().contains(&0) {
        return refuse("contains a NUL byte");
    }
    for component in dir.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return refuse("`..` is not allowed"),
            Component::RootDir | Component::Prefix(_) => {
                return refuse("must be relative to the workspace");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_dir_rules() {
        assert!(validate_working_dir(Path::new("")).is_ok());
        assert!(validate_working_dir(Path::new("a/b/./c")).is_ok());
        assert!(validate_working_dir(Path::new("a/../b")).is_err());
        assert!(validate_working_dir(Path::new("..")).is_err());
        assert!(validate_working_dir(Path::new("/etc")).is_err());
    }
}
