//! The seccomp deny list, compiled once per [`Sandbox`](crate::Sandbox) with seccompiler.
//!
//! A deny list (not an allow list) because build tools use a very wide and changing set of
//! system calls; what is denied is what lets a process leave or attack its sandbox: new
//! namespaces and mounts, tracing other processes, kernel keyrings, BPF, kernel modules,
//! perf, userfaultfd (used to widen kernel race windows), handle-based opens that bypass
//! path checks, terminal injection, io_uring (whose operations bypass seccomp).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::error::{Error, Result};

/// System calls that fail with EPERM, whatever their arguments.
const DENIED: &[(i64, &str)] = &[
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_fsopen, "fsopen"),
    (libc::SYS_fsconfig, "fsconfig"),
    (libc::SYS_fsmount, "fsmount"),
    (libc::SYS_fspick, "fspick"),
    (libc::SYS_move_mount, "move_mount"),
    (libc::SYS_open_tree, "open_tree"),
    (libc::SYS_mount_setattr, "mount_setattr"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_process_madvise, "process_madvise"),
    (libc::SYS_pidfd_getfd, "pidfd_getfd"),
    (libc::SYS_kcmp, "kcmp"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_name_to_handle_at, "name_to_handle_at"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_uring_register, "io_uring_register"),
    (libc::SYS_acct, "acct"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_swapoff, "swapoff"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_syslog, "syslog"),
    (libc::SYS_quotactl, "quotactl"),
    (libc::SYS_settimeofday, "settimeofday"),
    (libc::SYS_clock_settime, "clock_settime"),
    (libc::SYS_clock_adjtime, "clock_adjtime"),
    (libc::SYS_adjtimex, "adjtimex"),
    (libc::SYS_iopl, "iopl"),
    (libc::SYS_ioperm, "ioperm"),
    (libc::SYS_lookup_dcookie, "lookup_dcookie"),
    (libc::SYS_vhangup, "vhangup"),
    (libc::SYS_fanotify_init, "fanotify_init"),
];

/// The clone flags that create namespaces: `clone` with any of them is denied like
/// `unshare`.
const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWCGROUP
    | 0x80) as u64; // CLONE_NEWTIME

/// The names of the denied system calls, for the README and GetPolicy.
pub fn denied_syscalls() -> Vec<&'static str> {
    let mut names: Vec<_> = DENIED.iter().map(|(_, n)| *n).collect();
    names.extend([
        "socket(AF_VSOCK)",
        "clone(CLONE_NEW*)",
        "clone3 (ENOSYS)",
        "ioctl(TIOCSTI/TIOCLINUX)",
    ]);
    names
}

/// Which internet sockets a step may create. Tier A has its own network namespace (only
/// its own loopback), so it needs no rule; tier B shares the host's network, where
/// landlock (ABI ≥ 4) can deny TCP bind/connect but has no say over UDP or raw sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InetSockets {
    /// Any: the network namespace isolates (tier A).
    Any,
    /// TCP stream sockets only, whose bind/connect landlock denies; datagram, raw and
    /// other types or protocols answer EPERM (tier B with landlock ABI ≥ 4).
    StreamOnly,
    /// None at all: nothing else would stop TCP (tier B with landlock ABI < 4).
    None,
}

/// `socket(2)` types that are not `SOCK_STREAM` (the low 4 bits; the flags above them are
/// `SOCK_NONBLOCK`/`SOCK_CLOEXEC`).
const NON_STREAM_TYPES: [u64; 6] = [
    libc::SOCK_DGRAM as u64,
    libc::SOCK_RAW as u64,
    libc::SOCK_RDM as u64,
    libc::SOCK_SEQPACKET as u64,
    6,  // SOCK_DCCP
    10, // SOCK_PACKET (deprecated in libc, still accepted by the kernel)
];

/// Whether a step may create `AF_UNIX` sockets with `socket(2)`. `socketpair(2)` (what
/// runtimes use for their own plumbing: libuv's child stdio, python's multiprocessing)
/// is a different system call and always allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnixSockets {
    /// Tier A: the mount namespace shows no host socket files outside the read-only
    /// system binds, and abstract sockets belong to the step's network namespace.
    Any,
    /// Tier B: a pathname socket of the host (an agent's, a database's, a docker socket
    /// left world-writable under /tmp) is reachable by path, landlock does not check
    /// `connect` on socket files, and a socket file's mode is the only other guard.
    PairOnly,
}

/// `AF_VSOCK`: talks to the hypervisor and sibling VMs, outside every namespace.
const AF_VSOCK: u64 = 40;

/// The compiled filters, installed in order right before `execve`.
#[derive(Debug)]
pub(crate) struct SeccompFilters {
    pub programs: Vec<BpfProgram>,
}

fn arch() -> Result<TargetArch> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| Error::Seccomp(format!("unsupported architecture: {e}")))
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| Error::Seccomp(e.to_string()))
}

/// A condition on a C `int` argument: only the low 32 bits are defined.
fn int_cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| Error::Seccomp(e.to_string()))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule> {
    SeccompRule::new(conditions).map_err(|e| Error::Seccomp(e.to_string()))
}

impl SeccompFilters {
    pub fn build(inet: InetSockets, unix: UnixSockets) -> Result<Self> {
        let arch = arch()?;
        let mut denied: BTreeMap<i64, Vec<SeccompRule>> =
            DENIED.iter().map(|(nr, _)| (*nr, Vec::new())).collect();
        // One rule per flag (rules are OR-ed): any single namespace flag is enough to deny.
        let per_flag: Result<Vec<_>> = (0..64)
            .map(|bit| 1u64 << bit)
            .filter(|flag| NAMESPACE_FLAGS & flag != 0)
            .map(|flag| rule(vec![cond(0, SeccompCmpOp::MaskedEq(flag), flag)?]))
            .collect();
        denied.insert(libc::SYS_clone, per_flag?);
        denied.insert(
            libc::SYS_ioctl,
            vec![
                rule(vec![cond(1, SeccompCmpOp::Eq, libc::TIOCSTI)?])?,
                rule(vec![cond(1, SeccompCmpOp::Eq, libc::TIOCLINUX)?])?,
            ],
        );
        let mut socket_rules = inet_socket_rules(inet)?;
        // vsock reaches the host (or the hypervisor) whatever the network namespace.
        socket_rules.push(rule(vec![int_cond(0, SeccompCmpOp::Eq, AF_VSOCK)?])?);
        if unix == UnixSockets::PairOnly {
            socket_rules.push(rule(vec![int_cond(
                0,
                SeccompCmpOp::Eq,
                libc::AF_UNIX as u64,
            )?])?);
        }
        denied.insert(libc::SYS_socket, socket_rules);
        let eperm = SeccompFilter::new(
            denied,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .map_err(|e| Error::Seccomp(e.to_string()))?;
        // clone3 passes its flags in memory, out of BPF's reach: answer ENOSYS so libc
        // falls back to clone, whose flags the filter above can see.
        let enosys = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(|e| Error::Seccomp(e.to_string()))?;
        let programs = [eperm, enosys]
            .into_iter()
            .map(|f| BpfProgram::try_from(f).map_err(|e| Error::Seccomp(e.to_string())))
            .collect::<Result<_>>()?;
        Ok(SeccompFilters { programs })
    }

    /// Installs the filters on the calling thread. Async-signal-safe: system calls only.
    /// `no_new_privs` must already be set.
    pub fn apply(&self) -> Result<(), i32> {
        for program in &self.programs {
            let prog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: prog points at a valid BPF program that outlives the call.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &prog as *const libc::sock_fprog,
                )
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO));
            }
        }
        Ok(())
    }
}

/// The `socket(domain, type, protocol)` calls to deny (rules are OR-ed, the conditions
/// of one rule AND-ed).
fn inet_socket_rules(inet: InetSockets) -> Result<Vec<SeccompRule>> {
    let families = [libc::AF_INET as u64, libc::AF_INET6 as u64];
    let mut rules = Vec::new();
    match inet {
        InetSockets::Any => {}
        InetSockets::StreamOnly => {
            for family in families {
                // Landlock's TCP rules cover TCP only: a stream socket of another
                // protocol (SCTP, MPTCP) would slip past them.
                rules.push(rule(vec![
                    int_cond(0, SeccompCmpOp::Eq, family)?,
                    int_cond(2, SeccompCmpOp::Ne, 0)?,
                    int_cond(2, SeccompCmpOp::Ne, libc::IPPROTO_TCP as u64)?,
                ])?);
                for ty in NON_STREAM_TYPES {
                    rules.push(rule(vec![
                        int_cond(0, SeccompCmpOp::Eq, family)?,
                        int_cond(1, SeccompCmpOp::MaskedEq(0xf), ty)?,
                    ])?);
                }
            }
        }
        InetSockets::None => {
            for family in families {
                rules.push(rule(vec![int_cond(0, SeccompCmpOp::Eq, family)?])?);
            }
        }
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        for inet in [InetSockets::Any, InetSockets::StreamOnly, InetSockets::None] {
            for unix in [UnixSockets::Any, UnixSockets::PairOnly] {
                let f = SeccompFilters::build(inet, unix).unwrap();
                assert_eq!(f.programs.len(), 2);
            }
        }
    }
}
