//! The per-step task that watches a running sandbox: exit, timeouts, cancellation, output
//! and disk limits, and finally assembles the [`Outcome`].

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::Tier;
use crate::cgroup::StepCgroup;
use crate::child::KILL_TREE;
use crate::outcome::{Enforcement, ExitStatus, Outcome, Reason};
use crate::output::Budget;
use crate::spec::Limits;
use crate::status::{self, Labels};
use crate::sys;

/// Requests from [`ChildControl`](crate::ChildControl).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Request {
    /// TERM now, KILL after the grace (the configured one when `None`).
    Cancel(Option<Duration>),
    Signal(i32),
}

pub(crate) struct Monitor {
    pub tier: Tier,
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
    pub lifeline: OwnedFd,
    pub status: OwnedFd,
    pub readers: Vec<JoinHandle<u64>>,
    pub budget: Arc<Budget>,
    pub requests: mpsc::UnboundedReceiver<Request>,
    pub cgroup: Option<StepCgroup>,
    pub limits: Limits,
    pub grace: Duration,
    pub check_interval: Duration,
    pub workspace: PathBuf,
    pub started: Instant,
    pub labels: Labels,
    pub enforced: Vec<Enforcement>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").field("pid", &self.pid).finish()
    }
}

/// How far the stopping of a tree has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopping {
    Running,
    /// SIGTERM sent; SIGKILL at this instant.
    Terminating(Instant),
    /// Kill requested; last-resort measures at this instant.
    Killing(Instant),
}

impl Monitor {
    fn signal(&self, sig: i32) {
        let _ = sys::pidfd_send_signal(self.pidfd.as_raw_fd(), sig);
    }

    /// TERM to the tree (the supervisor forwards it), KILL after the grace period.
    fn terminate(&self, stopping: &mut Stopping) {
        self.terminate_within(stopping, self.grace);
    }

    fn terminate_within(&self, stopping: &mut Stopping, grace: Duration) {
        if *stopping == Stopping::Running {
            self.signal(libc::SIGTERM);
            *stopping = Stopping::Terminating(Instant::now() + grace);
        }
    }

    fn kill(&self, stopping: &mut Stopping) {
        if matches!(stopping, Stopping::Killing(_)) {
            return;
        }
        match self.tier {
            // pid 1 dies, and the kernel kills everything else in its namespace.
            Tier::A => self.signal(libc::SIGKILL),
            // The subreaper kills its tree and exits.
            _ => self.signal(KILL_TREE),
        }
        *stopping = Stopping::Killing(Instant::now() + Duration::from_secs(5));
    }

    /// The supervisor did not manage in time: kill it and sweep the cgroup.
    fn last_resort(&self) {
        tracing::warn!(
            pid = self.pid,
            "sandbox supervisor did not exit; killing it"
        );
        self.signal(libc::SIGKILL);
        if let Some(cg) = &self.cgroup {
            cg.kill_all();
        }
    }

    pub async fn run(mut self) -> Outcome {
        let status_fd = self.status.try_clone();
        let status_task = tokio::spawn(async move {
            let mut bytes = Vec::new();
            if let Ok(fd) = status_fd
                && let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
            {
                let _ = pipe.read_to_end(&mut bytes).await;
            }
            bytes
        });
        let exited = match self.pidfd.try_clone() {
            // SAFETY: the AsyncFd owns a fresh duplicate of the pidfd, which stays open
            // for as long as it is registered.
            Ok(fd) => match unsafe { AsyncFd::register(fd) } {
                Ok(fd) => fd,
                Err(_) => return self.broken().await,
            },
            Err(_) => return self.broken().await,
        };
        let deadline = self.started + self.limits.wall_timeout;
        let mut reason: Option<(Reason, String)> = None;
        let mut stopping = Stopping::Running;
        let mut requests_open = true;
        let checks = self.limits.disk_bytes.is_some()
            || self.limits.disk_entries.is_some()
            || (self.limits.cpu_time.is_some() && self.cgroup.is_some());
        let mut next_check = Instant::now() + self.check_interval;
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        loop {
            let stop_at = match stopping {
                Stopping::Running => far,
                Stopping::Terminating(t) | Stopping::Killing(t) => t,
            };
            tokio::select! {
                biased;
                _ = exited.readable() => break,
                _ = sleep_until(deadline), if reason.is_none() => {
                    reason = Some((Reason::TimedOut, format!(
                        "wall-clock timeout of {:?} exceeded", self.limits.wall_timeout)));
                    self.terminate(&mut stopping);
                }
                _ = self.budget.exceeded.notified(), if reason.is_none() => {
                    reason = Some((Reason::OutputLimit, format!(
                        "output limit of {} bytes reached; later output was dropped",
                        self.limits.output_bytes.unwrap_or_default())));
                    self.kill(&mut stopping);
                }
                request = self.requests.recv(), if requests_open => match request {
                    Some(Request::Cancel(grace)) => {
                        if reason.is_none() {
                            reason = Some((Reason::Cancelled, "cancelled".into()));
                        }
                        self.terminate_within(&mut stopping, grace.unwrap_or(self.grace));
                    }
                    Some(Request::Signal(sig)) => self.signal(sig),
                    None => requests_open = false,
                },
                _ = sleep_until(stop_at), if stopping != Stopping::Running => match stopping {
                    Stopping::Terminating(_) => self.kill(&mut stopping),
                    _ => {
                        self.last_resort();
                        stopping = Stopping::Killing(far);
                    }
                },
                _ = sleep_until(next_check), if checks && reason.is_none() => {
                    let started = Instant::now();
                    if let Some(r) = self.check_limits().await {
                        reason = Some(r);
                        self.kill(&mut stopping);
                    }
                    // Walking a big workspace is not free: never spend more than ~10%
                    // of the time on it.
                    next_check = Instant::now() + self.check_interval.max(started.elapsed() * 10);
                }
            }
        }
        self.finish(reason, status_task).await
    }

    /// Disk use and tree CPU time.
    async fn check_limits(&self) -> Option<(Reason, String)> {
        if let (Some(limit), Some(cg)) = (self.limits.cpu_time, &self.cgroup)
            && cg.cpu_usage().is_some_and(|used| used > limit)
        {
            return Some((
                Reason::TimedOut,
                format!("CPU time limit of {limit:?} exceeded by the process tree"),
            ));
        }
        if self.limits.disk_bytes.is_some() || self.limits.disk_entries.is_some() {
            let ws = self.workspace.clone();
            let used = tokio::task::spawn_blocking(move || crate::disk::usage(&ws))
                .await
                .unwrap_or_default();
            if let Some(limit) = self.limits.disk_bytes
                && used.bytes > limit
            {
                return Some((
                    Reason::DiskLimit,
                    format!(
                        "workspace uses {} bytes, over the disk limit of {limit}",
                        used.bytes
                    ),
                ));
            }
            // Directories and symlinks count: each costs an inode like a file.
            if let Some(limit) = self.limits.disk_entries
                && used.entries > limit
            {
                return Some((
                    Reason::DiskLimit,
                    format!(
                        "workspace holds {} entries (files, directories and symlinks), over the limit of {limit}",
                        used.entries
                    ),
                ));
            }
        }
        None
    }

    async fn finish(
        mut self,
        reason: Option<(Reason, String)>,
        status_task: JoinHandle<Vec<u8>>,
    ) -> Outcome {
        let waited = sys::wait4(self.pid);
        let wall_time = self.started.elapsed();
        // The supervisor is gone; so is every process that could hold the pipes, except
        // after a last-resort kill, hence the bound.
        let bound = Duration::from_secs(5);
        let bytes = tokio::time::timeout(bound, status_task)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let mut counts = [0u64; 2];
        for (i, reader) in self.readers.drain(..).enumerate() {
            let abort = reader.abort_handle();
            match tokio::time::timeout(bound, reader).await {
                Ok(Ok(n)) => counts[i] = n,
                _ => abort.abort(),
            }
        }
        let report = status::parse(&bytes, &self.labels);
        let (sup_status, usage) = match waited {
            Ok((s, u)) => (Some(s), Some(u)),
            Err(_) => (None, None),
        };
        let status = match (&report.setup_error, report.exit_status, sup_status) {
            (Some(_), _, _) => ExitStatus::NotStarted,
            (None, Some(s), _) => ExitStatus::from_wait_status(s),
            (None, None, Some(s)) => ExitStatus::from_wait_status(s),
            (None, None, None) => ExitStatus::NotStarted,
        };
        let oom = self.cgroup.as_ref().is_some_and(|c| c.oom_killed());
        let (reason, message) = if let Some(e) = report.setup_error {
            (Reason::SpawnFailed, Some(e))
        } else if let Some((r, m)) = reason {
            (r, Some(m))
        } else if oom {
            (
                Reason::MemoryLimit,
                Some(format!(
                    "memory limit of {} bytes exceeded",
                    self.limits.memory_bytes.unwrap_or_default()
                )),
            )
        } else if status == ExitStatus::Signal(libc::SIGXCPU) {
            (Reason::TimedOut, Some("CPU time limit exceeded".into()))
        } else if status == ExitStatus::Signal(libc::SIGXFSZ) {
            (Reason::DiskLimit, Some("file size limit exceeded".into()))
        } else {
            (Reason::Exited, None)
        };
        let rusage_cpu = usage
            .map(|u| tv(u.ru_utime) + tv(u.ru_stime))
            .unwrap_or_default();
        let cpu_time = self
            .cgroup
            .as_ref()
            .and_then(|c| c.cpu_usage())
            .unwrap_or(rusage_cpu);
        let peak_memory_bytes = self
            .cgroup
            .as_ref()
            .and_then(|c| c.peak_memory())
            .unwrap_or_else(|| usage.map(|u| u.ru_maxrss as u64 * 1024).unwrap_or(0));
        if let Some(cg) = self.cgroup.take() {
            cg.kill_all();
            // The statistics are read. Usually the directories go at once; when a v1
            // memory cgroup needs a moment to let go, retrying need not delay the outcome.
            if !cg.try_remove() {
                drop(tokio::task::spawn_blocking(move || cg.remove()));
            }
        }
        self.enforced.sort();
        self.enforced.dedup();
        drop(self.lifeline);
        Outcome {
            status,
            reason,
            message,
            wall_time,
            cpu_time,
            peak_memory_bytes,
            stdout_bytes: counts[0],
            stderr_bytes: counts[1],
            tier: self.tier,
            enforced: self.enforced,
        }
    }

    /// The pidfd could not be registered with the runtime: kill and report.
    async fn broken(self) -> Outcome {
        self.signal(libc::SIGKILL);
        let status_task = tokio::spawn(async { Vec::new() });
        let mut outcome = self.finish(None, status_task).await;
        outcome.reason = Reason::SpawnFailed;
        outcome.message = Some("cannot watch the sandbox process".into());
        outcome
    }
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}
