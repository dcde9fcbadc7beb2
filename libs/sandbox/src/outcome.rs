//! How a step ended and what was enforced.

use std::fmt;
use std::time::Duration;

/// How the step's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// It never ran (spawn failure).
    NotStarted,
}

impl ExitStatus {
    pub(crate) fn from_wait_status(status: i32) -> Self {
        if libc::WIFEXITED(status) {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            ExitStatus::Signal(libc::WTERMSIG(status))
        } else {
            ExitStatus::NotStarted
        }
    }

    /// The exit code, if it exited.
    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Code(c) => Some(c),
            _ => None,
        }
    }

    /// The signal, if it was killed by one.
    pub fn signal(self) -> Option<i32> {
        match self {
            ExitStatus::Signal(s) => Some(s),
            _ => None,
        }
    }
}

/// Why the step ended. The names match `kiln.build.v1.StepFinishedReason`, plus
/// [`Reason::DiskLimit`] which the build service may map as it sees fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The process exited, or was killed by a signal that did not come from the sandbox.
    Exited,
    /// The wall-clock timeout or the CPU time limit was exceeded.
    TimedOut,
    /// [`ChildControl::cancel`](crate::ChildControl::cancel) stopped it.
    Cancelled,
    /// stdout + stderr reached the output limit.
    OutputLimit,
    /// The tree exceeded its memory limit (the cgroup OOM killer fired).
    MemoryLimit,
    /// The workspace grew past its disk limit and the step was killed.
    DiskLimit,
    /// The process could not be started; see [`Outcome::message`].
    SpawnFailed,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Exited => "EXITED",
            Reason::TimedOut => "TIMED_OUT",
            Reason::Cancelled => "CANCELLED",
            Reason::OutputLimit => "OUTPUT_LIMIT",
            Reason::MemoryLimit => "MEMORY_LIMIT",
            Reason::DiskLimit => "DISK_LIMIT",
            Reason::SpawnFailed => "SPAWN_FAILED",
        })
    }
}

/// A mechanism the sandbox used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mechanism {
    /// setrlimit(2) on each process.
    Rlimit,
    /// A cgroup v1 controller.
    CgroupV1,
    /// A cgroup v2 controller.
    CgroupV2,
    /// Landlock (with its ABI version).
    Landlock(u32),
    /// A seccomp-bpf deny list.
    Seccomp,
    /// Linux namespaces.
    Namespaces,
    /// The sandbox's own monitor (timers, output reader, disk checks).
    Monitor,
    /// A size-limited tmpfs.
    Tmpfs,
    /// A supervisor process with `PR_SET_CHILD_SUBREAPER`.
    Subreaper,
    /// `PR_SET_NO_NEW_PRIVS`.
    NoNewPrivs,
    /// A uid/gid switch to an unprivileged user.
    Credentials,
}

/// What a limit or protection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Control {
    /// Wall-clock timeout.
    WallTime,
    /// CPU time of each process.
    CpuTimePerProcess,
    /// CPU time of the whole tree.
    CpuTimeTree,
    /// CPU bandwidth.
    CpuBandwidth,
    /// Memory of the tree.
    Memory,
    /// Address space of each process.
    AddressSpace,
    /// Largest file.
    FileSize,
    /// Open files.
    OpenFiles,
    /// Number of processes.
    Processes,
    /// Output bytes.
    Output,
    /// Workspace disk use.
    Disk,
    /// Private /tmp size.
    TmpSize,
    /// Filesystem view (what can be read and written).
    Filesystem,
    /// Network access.
    Network,
    /// Signals and abstract sockets leaving the sandbox.
    Ipc,
    /// Dangerous system calls.
    Syscalls,
    /// Process visibility and tree lifetime.
    ProcessIsolation,
    /// Privileges (no setuid gains, no capabilities).
    Privileges,
}

/// One control and how it was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Enforcement {
    /// What is limited or protected.
    pub control: Control,
    /// By what.
    pub mechanism: Mechanism,
}

/// How a step ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Exit code or signal of the main process.
    pub status: ExitStatus,
    /// Why it ended.
    pub reason: Reason,
    /// For people: what went wrong (spawn failure, which limit), if anything.
    pub message: Option<String>,
    /// Spawn to exit.
    pub wall_time: Duration,
    /// User + system CPU time of the tree (cgroup where available, else rusage of the
    /// processes the supervisor reaped).
    pub cpu_time: Duration,
    /// Peak memory of the tree in bytes (cgroup high-water mark where available, else
    /// the largest resident set of one process).
    pub peak_memory_bytes: u64,
    /// Bytes of stdout and stderr delivered.
    pub stdout_bytes: u64,
    /// See `stdout_bytes`.
    pub stderr_bytes: u64,
    /// The sandbox tier the step ran in.
    pub tier: crate::Tier,
    /// Which controls were applied and how, sorted.
    pub enforced: Vec<Enforcement>,
}

impl Outcome {
    /// True when the step exited by itself with code 0.
    pub fn success(&self) -> bool {
        self.reason == Reason::Exited && self.status == ExitStatus::Code(0)
    }

    /// The mechanisms that enforced `control`.
    pub fn enforced_by(&self, control: Control) -> Vec<Mechanism> {
        self.enforced
            .iter()
            .filter(|e| e.control == control)
            .map(|e| e.mechanism)
            .collect()
    }
}
