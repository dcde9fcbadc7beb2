//! The program process: drop everything, then `execve`.

use super::{ERR_FD, OUT_FD, STATUS_FD, STDIN_FD, Stage, errno, fail};
use crate::Tier;
use crate::landlock::LandlockStep;
use crate::plan::Plan;

const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Clears the bounding and ambient sets (so nothing can come back through a file
/// capability) and then every capability the process holds.
fn drop_capabilities() {
    // SAFETY: prctl and capset with valid arguments.
    unsafe {
        for cap in 0..64 {
            // EINVAL past the last capability the kernel knows; EPERM without
            // CAP_SETPCAP (unprivileged service): then there is nothing to drop.
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        let header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            fail(Stage::Capabilities, 0, errno());
        }
    }
}

pub(super) fn run(plan: &Plan<'_>) -> ! {
    // SAFETY: system calls on plan-owned data and fixed descriptors throughout.
    unsafe {
        // Own session and process group: TERM goes to the group, and the program has no
        // controlling terminal to inject input into.
        if libc::setsid() < 0 {
            fail(Stage::Session, 0, errno());
        }
        for (from, to) in [(STDIN_FD, 0), (OUT_FD, 1), (ERR_FD, 2)] {
            if libc::dup2(from, to) < 0 {
                fail(Stage::Stdio, to as usize, errno());
            }
        }
        // Keep only 0-2 and the status pipe (close-on-exec) for reporting.
        libc::close_range(STATUS_FD as u32 + 1, u32::MAX, 0);

        match (plan.tier, plan.ids) {
            (Tier::A, _) => drop_capabilities(),
            (_, Some((uid, gid))) => {
                if plan.may_setgroups && super::setgroups_empty() != 0 {
                    fail(Stage::Setgroups, 1, errno());
                }
                // Drop the bounding set while still privileged, then the switch from
                // root clears the rest.
                drop_capabilities_keep_setuid();
                super::setup::set_ids(uid, gid);
                drop_capabilities();
            }
            _ => {}
        }

        for (i, l) in plan.rlimits.iter().enumerate() {
            let lim = libc::rlimit {
                rlim_cur: l.soft,
                rlim_max: l.hard,
            };
            if libc::setrlimit(l.resource, &lim) != 0 {
                fail(Stage::Rlimit, i, errno());
            }
        }
        if libc::chdir(plan.cwd.as_ptr()) != 0 {
            fail(Stage::WorkingDir, 0, errno());
        }
        // setuid binaries and file capabilities grant nothing from here on.
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(Stage::NoNewPrivs, 0, errno());
        }
        if let Some(ll) = &plan.landlock
            && let Err((step, e)) = ll.apply()
        {
            match step {
                LandlockStep::Create => fail(Stage::LandlockCreate, 0, e),
                LandlockStep::AddRule(i) => fail(Stage::LandlockRule, i, e),
                LandlockStep::Restrict => fail(Stage::LandlockRestrict, 0, e),
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        // Last: from here on mount, ptrace & co fail, and nothing below needs them.
        if let Some(filters) = plan.seccomp
            && let Err(e) = filters.apply()
        {
            fail(Stage::Seccomp, 0, e);
        }
        let argv = plan.argv_ptrs.as_ptr();
        let envp = plan.envp_ptrs.as_ptr();
        let mut error = libc::ENOENT;
        for candidate in &plan.candidates {
            libc::execve(candidate.as_ptr(), argv, envp);
            let e = errno();
            // Like execvp: keep looking past missing entries, remember a permission
            // problem, stop at anything else.
            match e {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => error = e,
                _ => {
                    error = e;
                    break;
                }
            }
        }
        fail(Stage::Exec, 0, error)
    }
}

/// Bounding set only (keeps CAP_SETUID/CAP_SETGID effective for the switch that follows).
fn drop_capabilities_keep_setuid() {
    for cap in 0..64 {
        // SAFETY: plain prctl; see drop_capabilities.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
}
