//! Code that runs in the cloned child, before `execve`.
//!
//! The service is multi-threaded, so after `clone` only async-signal-safe operations are
//! allowed: system calls on data prepared by the parent ([`crate::plan`]), no allocation,
//! no locks, no panics (everything that can fail reports a fixed-size record on the
//! status pipe and exits).
//!
//! Process tree:
//!
//! ```text
//! service ──clone3──▶ supervisor (tier A: pid 1 of the new pid namespace;
//!                     │            tier B: a child subreaper)
//!                     └──fork──▶ program (setsid, drop privileges, rlimits, landlock,
//!                                         seccomp, execve)
//! ```
//!
//! The supervisor reaps, forwards SIGTERM, kills the whole tree on request, when the
//! program exits, or when the service dies (its lifeline pipe closes), and reports the
//! program's wait status to the service.

mod program;
mod setup;
mod supervisor;

pub(crate) use supervisor::KILL_TREE;

use std::os::fd::RawFd;

use crate::plan::Plan;

/// Fixed descriptor numbers in the child.
pub(crate) const STATUS_FD: RawFd = 3;
pub(crate) const SYNC_FD: RawFd = 4;
pub(crate) const LIFELINE_FD: RawFd = 5;
pub(crate) const OUT_FD: RawFd = 6;
pub(crate) const ERR_FD: RawFd = 7;
pub(crate) const STDIN_FD: RawFd = 8;
pub(crate) const SIGNAL_FD: RawFd = 9;

/// The descriptors the parent hands over (its numbers, before the child renumbers them).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildFds {
    pub status: RawFd,
    pub sync: RawFd,
    pub lifeline: RawFd,
    pub out: RawFd,
    pub err: RawFd,
    pub stdin: RawFd,
}

/// Record kinds on the status pipe.
pub(crate) const RECORD_SETUP_ERROR: u32 = 1;
pub(crate) const RECORD_EXIT: u32 = 2;

/// Where a setup failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Stage {
    Descriptors = 1,
    SetIds,
    Setgroups,
    Filesystem,
    Hostname,
    Loopback,
    Subreaper,
    Signals,
    Fork,
    Session,
    Stdio,
    Capabilities,
    Rlimit,
    WorkingDir,
    NoNewPrivs,
    LandlockCreate,
    LandlockRule,
    LandlockRestrict,
    Seccomp,
    Exec,
    CgroupNamespace,
    Dumpable,
}

impl Stage {
    pub(crate) fn from_u32(v: u32) -> Option<Stage> {
        use Stage::*;
        [
            Descriptors,
            SetIds,
            Setgroups,
            Filesystem,
            Hostname,
            Loopback,
            Subreaper,
            Signals,
            Fork,
            Session,
            Stdio,
            Capabilities,
            Rlimit,
            WorkingDir,
            NoNewPrivs,
            LandlockCreate,
            LandlockRule,
            LandlockRestrict,
            Seccomp,
            Exec,
            CgroupNamespace,
            Dumpable,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }
}

/// Writes one 16-byte record (atomic: below PIPE_BUF) to the status pipe.
pub(crate) fn record(kind: u32, a: u32, b: u32, c: u32) {
    let words = [kind, a, b, c];
    // SAFETY: writing 16 bytes from a local array.
    unsafe { libc::write(STATUS_FD, words.as_ptr().cast(), 16) };
}

/// Reports a setup failure and exits. `index` says which item of a list failed.
pub(crate) fn fail(stage: Stage, index: usize, errno: i32) -> ! {
    record(RECORD_SETUP_ERROR, stage as u32, index as u32, errno as u32);
    exit(127)
}

pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `setgroups(0, NULL)` as a raw system call. glibc's wrappers of the set*id family
/// broadcast the change to every thread it believes exists (and wait for them on a
/// futex); after clone from a multi-threaded service those threads do not exist in the
/// child, so the wrapper would hang forever. The raw call changes just this thread, which
/// here is the whole process.
pub(crate) fn setgroups_empty() -> libc::c_long {
    // SAFETY: an empty group list.
    unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) }
}

pub(crate) fn exit(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and skips atexit handlers and stdio flushing,
    // which belong to the parent.
    unsafe { libc::_exit(code) }
}

/// `fork` without glibc's atfork handlers and malloc locks (which another thread of the
/// service may have held at clone time).
pub(crate) fn raw_fork() -> libc::pid_t {
    // SAFETY: clone with only SIGCHLD is fork; the caller follows the same rules after it.
    unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        ) as libc::pid_t
    }
}

/// Entry point of the cloned child. Never returns.
///
/// # Safety
/// Must be called in a freshly cloned child of the process that built `plan`, with all
/// signals blocked, and only there.
pub(crate) unsafe fn child_main(plan: &Plan<'_>, fds: ChildFds) -> ! {
    setup::reset_signal_handlers();
    setup::arrange_fds(fds);
    let mut go = [0u8; 1];
    // SAFETY: reading one byte into a local buffer.
    if unsafe { libc::read(SYNC_FD, go.as_mut_ptr().cast(), 1) } != 1 {
        exit(0); // the parent gave up before releasing us
    }
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(SYNC_FD) };
    // Before anything the step could observe: our memory is the service's.
    setup::hide_service(plan);

    if plan.tier == crate::Tier::A {
        // Now that the service has moved us into the step's cgroup, make it the root of
        // a cgroup namespace: the step's /proc/self/cgroup shows "/", not the host's
        // hierarchy (which names the service's unit and its sibling steps).
        // SAFETY: plain system call; we hold CAP_SYS_ADMIN in our new user namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
            fail(Stage::CgroupNamespace, 0, errno());
        }
        setup::open_sources(plan);
    }
    if plan.may_setgroups && plan.init_ids.is_some() {
        // Drop the service's supplementary groups: they would still count on host files.
        // SAFETY: an empty group list.
        if setgroups_empty() != 0 {
            fail(Stage::Setgroups, 0, errno());
        }
    }
    if let Some((uid, gid)) = plan.init_ids {
        setup::set_ids(uid, gid);
    }
    // After set_ids: a change of credentials resets dumpability to fs.suid_dumpable,
    // which an administrator may have set to 1.
    setup::not_dumpable();
    match plan.tier {
        crate::Tier::A => {
            setup::build_root(plan);
            setup::set_hostname(plan);
            setup::loopback_up();
        }
        _ => {
            // SAFETY: plain prctl.
            if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
                fail(Stage::Subreaper, 0, errno());
            }
        }
    }
    if plan.probe_only {
        record(RECORD_EXIT, 0, 0, 0);
        exit(0);
    }
    supervisor::open_signalfd();
    let pid = raw_fork();
    if pid < 0 {
        fail(Stage::Fork, 0, errno());
    }
    if pid == 0 {
        program::run(plan);
    }
    supervisor::run(plan, pid)
}
