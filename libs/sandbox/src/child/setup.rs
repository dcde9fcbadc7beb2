//! Supervisor-side setup: descriptors, signals, identities, the tier A root, network.

use super::{
    ChildFds, ERR_FD, LIFELINE_FD, OUT_FD, SIGNAL_FD, STATUS_FD, STDIN_FD, SYNC_FD, Stage, errno,
    exit, fail,
};
use crate::plan::{FIRST_SLOT, FsOp, Plan};

/// Handlers installed by the service (tokio's SIGCHLD handler, say) must not run here.
pub(super) fn reset_signal_handlers() {
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: SIG_DFL for one signal; errors (glibc-reserved signals) are harmless.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}

/// Renumbers the inherited descriptors to the fixed slots and closes everything else
/// (the service's sockets, database, other steps' pipes).
pub(super) fn arrange_fds(fds: ChildFds) {
    let sources = [
        fds.status,
        fds.sync,
        fds.lifeline,
        fds.out,
        fds.err,
        fds.stdin,
    ];
    let targets = [STATUS_FD, SYNC_FD, LIFELINE_FD, OUT_FD, ERR_FD, STDIN_FD];
    let mut high = [-1; 6];
    // First above every target, so no dup3 below clobbers a source not yet moved.
    for (i, fd) in sources.iter().enumerate() {
        // SAFETY: duplicating a descriptor we own.
        high[i] = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 16) };
        if high[i] < 0 {
            exit(126);
        }
    }
    for (i, target) in targets.iter().enumerate() {
        // SAFETY: as above; every slot is close-on-exec, only 0-2 survive execve.
        if unsafe { libc::dup3(high[i], *target, libc::O_CLOEXEC) } < 0 {
            exit(126);
        }
    }
    // SAFETY: closes descriptors this process no longer needs.
    if unsafe { libc::close_range(SIGNAL_FD as u32, u32::MAX, 0) } != 0 {
        fail(Stage::Descriptors, 0, errno());
    }
}

/// What the supervisor shows in `/proc/<pid>/cmdline` instead of the service's argv.
const INIT_NAME: &[u8] = b"kiln-sandbox-init\0";

/// Overwrites the service's command line and environment strings in our copy of its
/// memory (see [`crate::plan::ArgArea`]) and renames the thread, so the step reads
/// `kiln-sandbox-init` from `/proc/<supervisor>/{cmdline,comm}` and nothing from
/// `environ`, whatever else protects those files.
pub(super) fn hide_service(plan: &Plan<'_>) {
    if let Some(area) = plan.arg_area {
        let (start, end) = area.arg;
        let name = INIT_NAME.len().min(end - start);
        // SAFETY: both ranges are the strings on our initial stack, as the kernel reported
        // them for the service before clone; that mapping is private, writable and ours.
        // Nothing in the child reads argv or the environment.
        unsafe {
            std::ptr::copy_nonoverlapping(INIT_NAME.as_ptr(), start as *mut u8, name);
            std::ptr::write_bytes((start + name) as *mut u8, 0, end - start - name);
            let (start, end) = area.env;
            std::ptr::write_bytes(start as *mut u8, 0, end - start);
        }
    }
    // SAFETY: PR_SET_NAME with a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"kiln-init".as_ptr(), 0, 0, 0) };
}

/// Makes the supervisor (and the program until its `execve`, which share the service's
/// memory image) non-dumpable: `/proc/<pid>/{environ,mem,maps,fd,…}` become root-owned
/// and ptrace-style access needs `CAP_SYS_PTRACE` on the host, whatever the step's uid.
pub(super) fn not_dumpable() {
    // SAFETY: plain prctl.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        fail(Stage::Dumpable, 0, errno());
    }
}

/// Raw system calls, not glibc's wrappers: see [`super::setgroups_empty`].
pub(crate) fn set_ids(uid: u32, gid: u32) {
    // SAFETY: plain system calls with integer arguments.
    unsafe {
        if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
            fail(Stage::SetIds, 0, errno());
        }
        if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
            fail(Stage::SetIds, 1, errno());
        }
    }
}

/// Opens the tier A bind sources (with the service's uid, before the switch).
pub(super) fn open_sources(plan: &Plan<'_>) {
    for (i, step) in plan.fs_open.iter().enumerate() {
        if let Err(e) = fs_op(&step.op) {
            fail(Stage::Filesystem, plan.fs.len() + i, e);
        }
    }
}

/// Runs the tier A filesystem plan.
pub(super) fn build_root(plan: &Plan<'_>) {
    for (i, step) in plan.fs.iter().enumerate() {
        if let Err(e) = fs_op(&step.op)
            && !step.optional
        {
            fail(Stage::Filesystem, i, e);
        }
    }
}

fn check(r: libc::c_int) -> Result<(), i32> {
    if r < 0 { Err(errno()) } else { Ok(()) }
}

fn fs_op(op: &FsOp) -> Result<(), i32> {
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: every pointer is a NUL-terminated string owned by the plan.
    unsafe {
        match op {
            FsOp::MakeDir(path) => match check(libc::mkdir(path.as_ptr(), 0o755)) {
                Err(libc::EEXIST) => Ok(()),
                r => r,
            },
            FsOp::MakeFile(path) => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                check(fd)?;
                libc::close(fd);
                Ok(())
            }
            FsOp::Symlink { target, link } => check(libc::symlink(target.as_ptr(), link.as_ptr())),
            FsOp::WriteFile { path, contents } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC | libc::O_CLOEXEC,
                    0o644,
                );
                check(fd)?;
                let n = libc::write(fd, contents.as_ptr().cast(), contents.len());
                libc::close(fd);
                if n != contents.len() as isize {
                    return Err(libc::EIO);
                }
                Ok(())
            }
            FsOp::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => {
                let data = if data.is_empty() { null } else { data.as_ptr() };
                let fstype = if fstype.is_empty() {
                    null
                } else {
                    fstype.as_ptr()
                };
                check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    fstype,
                    *flags,
                    data.cast(),
                ))
            }
            FsOp::Bind { source, target } => check(libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )),
            FsOp::Remount { target, flags } => {
                let locked = locked_flags(target.as_ptr())?;
                check(libc::mount(
                    null,
                    target.as_ptr(),
                    null,
                    libc::MS_REMOUNT | libc::MS_BIND | flags | locked,
                    std::ptr::null(),
                ))
            }
            FsOp::PivotRoot { new_root, put_old } => check(libc::syscall(
                libc::SYS_pivot_root,
                new_root.as_ptr(),
                put_old.as_ptr(),
            ) as libc::c_int),
            FsOp::Chdir(path) => check(libc::chdir(path.as_ptr())),
            FsOp::Detach(path) => check(libc::umount2(path.as_ptr(), libc::MNT_DETACH)),
            FsOp::RemoveDir(path) => check(libc::rmdir(path.as_ptr())),
            FsOp::Open { path, slot } => {
                let fd = libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                check(fd)?;
                let r = libc::dup3(fd, *slot, libc::O_CLOEXEC);
                libc::close(fd);
                check(r)
            }
            FsOp::CloseSlots => check(libc::close_range(FIRST_SLOT as u32, u32::MAX, 0)),
        }
    }
}

/// The flags of the mount at `path` that an unprivileged remount must keep (the kernel
/// locks them on mounts inherited from a more privileged namespace).
fn locked_flags(path: *const libc::c_char) -> Result<libc::c_ulong, i32> {
    // The kernel's struct statfs on 64-bit targets is 15 words with f_flags at index 10;
    // libc hides that field, so call the system call with a word buffer.
    let mut words = [0u64; 16];
    // SAFETY: the buffer is larger than the kernel's struct statfs.
    check(unsafe { libc::syscall(libc::SYS_statfs, path, words.as_mut_ptr()) } as libc::c_int)?;
    let f = words[10] as libc::c_ulong;
    let mut out = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
        (libc::ST_RDONLY, libc::MS_RDONLY),
    ] {
        if f & st_flag as libc::c_ulong != 0 {
            out |= ms_flag;
        }
    }
    Ok(out)
}

pub(super) fn set_hostname(plan: &Plan<'_>) {
    let name = plan.hostname.as_bytes();
    // SAFETY: pointer and length of a plan-owned buffer.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        fail(Stage::Hostname, 0, errno());
    }
}

/// A new network namespace has only `lo`, and it is down.
pub(super) fn loopback_up() {
    // SAFETY: a socket for the ioctl, an ifreq on the stack, and close.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            fail(Stage::Loopback, 0, errno());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr) != 0 {
            fail(Stage::Loopback, 1, errno());
        }
        libc::close(sock);
    }
}
