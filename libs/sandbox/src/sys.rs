//! Thin wrappers over the few system calls `libc`/`nix` do not cover (clone3, landlock,
//! pidfd signals). Everything here is a plain system call, usable after `clone`.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Landlock uapi (linux/landlock.h), stable since 5.13. Not in `libc` yet.
pub(crate) mod landlock {
    pub const CREATE_RULESET_VERSION: u32 = 1;
    pub const RULE_PATH_BENEATH: libc::c_int = 1;

    pub const FS_EXECUTE: u64 = 1 << 0;
    pub const FS_WRITE_FILE: u64 = 1 << 1;
    pub const FS_READ_FILE: u64 = 1 << 2;
    pub const FS_READ_DIR: u64 = 1 << 3;
    // Bits 4-12: remove dir/file, make char/dir/reg/sock/fifo/block/sym (ABI 1).
    /// ABI 2.
    pub const FS_REFER: u64 = 1 << 13;
    /// ABI 3.
    pub const FS_TRUNCATE: u64 = 1 << 14;
    /// ABI 5.
    pub const FS_IOCTL_DEV: u64 = 1 << 15;

    /// ABI 4.
    pub const NET_BIND_TCP: u64 = 1 << 0;
    pub const NET_CONNECT_TCP: u64 = 1 << 1;

    /// ABI 6.
    pub const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    pub const SCOPE_SIGNAL: u64 = 1 << 1;

    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct RulesetAttr {
        pub handled_access_fs: u64,
        pub handled_access_net: u64,
        pub scoped: u64,
    }

    #[repr(C, packed)]
    #[derive(Debug, Clone, Copy)]
    pub struct PathBeneathAttr {
        pub allowed_access: u64,
        pub parent_fd: i32,
    }

    /// All filesystem rights known to `abi`.
    pub fn fs_rights(abi: u32) -> u64 {
        let mut rights = (1 << 13) - 1;
        if abi >= 2 {
            rights |= FS_REFER;
        }
        if abi >= 3 {
            rights |= FS_TRUNCATE;
        }
        if abi >= 5 {
            rights |= FS_IOCTL_DEV;
        }
        rights
    }

    /// Rights to read and execute beneath a path.
    pub const READ_EXEC: u64 = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR;
}

/// The landlock ABI version of the running kernel, 0 when unsupported or disabled.
pub(crate) fn landlock_abi() -> u32 {
    // SAFETY: with a NULL attribute, size 0 and the VERSION flag the call only returns a
    // number; no memory is touched.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<landlock::RulesetAttr>(),
            0usize,
            landlock::CREATE_RULESET_VERSION,
        )
    };
    if v < 0 { 0 } else { v as u32 }
}

/// `clone3` with fork semantics: returns 0 in the child, the child's pid in the parent.
///
/// # Safety
/// The caller is a (possibly) multi-threaded process: in the child only
/// async-signal-safe operations are allowed until `execve` or `_exit` (no allocation,
/// no locks), exactly as after `fork`.
pub(crate) unsafe fn clone3(flags: u64, pidfd: &mut RawFd) -> io::Result<libc::pid_t> {
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = flags | libc::CLONE_PIDFD as u64;
    args.pidfd = pidfd as *mut RawFd as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    // SAFETY: args is a valid clone_args of the size we pass; the caller upholds the
    // fork-like contract above.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            size_of::<libc::clone_args>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as libc::pid_t)
    }
}

/// Sends `sig` through a pidfd: never hits a recycled pid.
pub(crate) fn pidfd_send_signal(pidfd: RawFd, sig: i32) -> io::Result<()> {
    // SAFETY: plain system call with integer arguments and a NULL siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reaps `pid` (already known to have exited) and returns its wait status and rusage.
pub(crate) fn wait4(pid: libc::pid_t) -> io::Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain old data.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid out-pointers to locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r >= 0 {
            return Ok((status, usage));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Wraps a descriptor returned by the kernel.
pub(crate) fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass a descriptor they just received and nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Keeps this process cheap to clone. Each step starts with a clone of the service, and a
/// clone costs in proportion to the resident memory it copies page tables for (a bench
/// with 100 MB touched: tier A spawn → first byte 4.5 → 11 ms). glibc raises its mmap
/// threshold after the first large free, so later large allocations (an Argon2 login
/// takes 19 MiB) stay resident in the heap of whichever thread ran them: four logins grew
/// `kiln up` from 37 to 58 MB. A fixed 4 MiB threshold hands such allocations back to
/// the kernel when freed (21 MB either way), while mid-size buffers of the output path
/// stay in the heap instead of costing an mmap each; the heap is trimmed above 8 MiB
/// free, the pair glibc's own adjustment would pick for 4 MiB. Call it at start, before
/// other threads exist.
pub fn keep_spawns_cheap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes malloc's tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}
