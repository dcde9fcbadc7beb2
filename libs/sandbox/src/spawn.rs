//! The parent side of starting a sandbox: pipes, `clone3`, id maps, cgroup, release.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::OFlag;

use crate::Tier;
use crate::cgroup::StepCgroup;
use crate::child::{self, ChildFds};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::sys;

/// A started supervisor and the parent's ends of its pipes.
#[derive(Debug)]
pub(crate) struct Launched {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub status: OwnedFd,
    /// Never written; closing it (the service dying, or the step's handle dropped) makes
    /// the supervisor kill the tree.
    pub lifeline: OwnedFd,
}

/// Who the sandbox is inside a tier A user namespace, and who that is on the host.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdMap {
    pub inner: (u32, u32),
    pub host: (u32, u32),
    /// An unprivileged service may only map itself, and must deny setgroups first.
    pub privileged: bool,
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::io("creating a pipe", e))
}

fn set_nonblocking(fd: &OwnedFd) -> Result<()> {
    let flags =
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).map_err(|e| Error::io("fcntl", e))?;
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(|e| Error::io("fcntl", e))?;
    Ok(())
}

/// Starts the supervisor for `plan` and releases it once the host side (id maps, cgroup)
/// is in place. Cheap: one clone3, a few small writes to /proc and cgroupfs.
pub(crate) fn launch(
    plan: &Plan<'_>,
    ids: Option<IdMap>,
    cgroup: Option<&StepCgroup>,
) -> Result<Launched> {
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let (sync_r, sync_w) = pipe()?;
    let (life_r, life_w) = pipe()?;
    // The program's stdin: a pipe whose write end is closed at once, so reading it is EOF
    // whatever the host's /dev/null is (a CI container once had a regular file there).
    let (stdin_r, stdin_w) = pipe()?;
    drop(stdin_w);
    for fd in [&out_r, &err_r, &status_r] {
        set_nonblocking(fd)?;
    }
    let fds = ChildFds {
        status: status_w.as_raw_fd(),
        sync: sync_r.as_raw_fd(),
        lifeline: life_r.as_raw_fd(),
        out: out_w.as_raw_fd(),
        err: err_w.as_raw_fd(),
        stdin: stdin_r.as_raw_fd(),
    };
    let flags = match plan.tier {
        Tier::A => {
            (libc::CLONE_NEWUSER
                | libc::CLONE_NEWNS
                | libc::CLONE_NEWPID
                | libc::CLONE_NEWNET
                | libc::CLONE_NEWUTS
                | libc::CLONE_NEWIPC) as u64
        }
        _ => 0,
    };

    // Block every signal across clone: the child must not run the service's handlers
    // before it has reset them, and it inherits the blocked mask for its signalfd.
    let mut all: libc::sigset_t = unsafe_zeroed_sigset();
    let mut old: libc::sigset_t = unsafe_zeroed_sigset();
    // SAFETY: sigset_t values on the stack.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let mut pidfd = -1;
    // SAFETY: in the child we only call child_main, which is async-signal-safe and never
    // returns.
    let cloned = unsafe { sys::clone3(flags, &mut pidfd) };
    if let Ok(0) = cloned {
        // SAFETY: we are the freshly cloned child, with all signals blocked.
        unsafe { child::child_main(plan, fds) }
    }
    // SAFETY: restoring the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    let pid = cloned.map_err(|e| Error::io(format!("clone3 (tier {})", plan.tier), e))?;
    let pidfd = sys::owned(pidfd);
    drop((out_w, err_w, status_w, sync_r, life_r, stdin_r));

    let release = || -> Result<()> {
        if let Some(ids) = ids {
            write_id_maps(pid, ids)?;
        }
        if let Some(cg) = cgroup {
            cg.attach(pid)
                .map_err(|e| Error::io("moving the step into its cgroup", e))?;
        }
        nix::unistd::write(&sync_w, b"g").map_err(|e| Error::io("releasing the sandbox", e))?;
        Ok(())
    };
    if let Err(e) = release() {
        let _ = sys::pidfd_send_signal(pidfd.as_raw_fd(), libc::SIGKILL);
        let _ = sys::wait4(pid);
        return Err(e);
    }
    Ok(Launched {
        pid,
        pidfd,
        stdout: out_r,
        stderr: err_r,
        status: status_r,
        lifeline: life_w,
    })
}

fn unsafe_zeroed_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; all-zero is a valid (empty) set.
    unsafe { std::mem::zeroed() }
}

fn write_id_maps(pid: libc::pid_t, ids: IdMap) -> Result<()> {
    let proc = format!("/proc/{pid}");
    let write = |file: &str, text: String| {
        fs::write(format!("{proc}/{file}"), text)
            .map_err(|e| Error::io(format!("writing {file} of the sandbox"), e))
    };
    if !ids.privileged {
        write("setgroups", "deny".into())?;
    }
    write("uid_map", format!("{} {} 1\n", ids.inner.0, ids.host.0))?;
    write("gid_map", format!("{} {} 1\n", ids.inner.1, ids.host.1))?;
    Ok(())
}
