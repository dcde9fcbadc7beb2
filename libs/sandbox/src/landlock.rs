//! Landlock: the filesystem (and TCP, and signal) allow-list of a step.
//!
//! The rules are prepared in the parent as plain data ([`LandlockPlan`]) and applied in the
//! child with raw system calls ([`LandlockPlan::apply`]): the `landlock` crate's builder
//! allocates, which is not allowed between `clone` and `execve` in a multi-threaded
//! process. In tier A the paths are those of the new root, so they can only be opened
//! after `pivot_root`, in the child.

use std::ffi::CString;
use std::path::Path;

use crate::sys::landlock as ll;

/// One rule: everything beneath `path` gets `access`.
#[derive(Debug)]
pub(crate) struct PathRule {
    pub path: CString,
    pub access: u64,
}

/// A complete ruleset, ready to apply.
#[derive(Debug)]
pub(crate) struct LandlockPlan {
    pub abi: u32,
    pub attr: ll::RulesetAttr,
    pub rules: Vec<PathRule>,
}

/// The rights that apply to a file (as opposed to a directory).
const FILE_RIGHTS: u64 =
    ll::FS_EXECUTE | ll::FS_WRITE_FILE | ll::FS_READ_FILE | ll::FS_TRUNCATE | ll::FS_IOCTL_DEV;

/// What a landlock failure was doing (for the spawn error message).
#[derive(Debug, Clone, Copy)]
pub(crate) enum LandlockStep {
    Create,
    AddRule(usize),
    Restrict,
}

impl LandlockPlan {
    /// `deny_tcp`: handle TCP bind/connect with no rule, i.e. deny both (tier B; in tier A
    /// the network namespace already isolates, and loopback servers in tests are fine).
    pub fn new(abi: u32, deny_tcp: bool) -> Self {
        let mut attr = ll::RulesetAttr {
            handled_access_fs: ll::fs_rights(abi),
            ..Default::default()
        };
        if deny_tcp && abi >= 4 {
            attr.handled_access_net = ll::NET_BIND_TCP | ll::NET_CONNECT_TCP;
        }
        if abi >= 6 {
            // Signals and abstract unix sockets may not leave the sandbox's domain: the
            // step cannot signal the service (or another step running as the same uid).
            attr.scoped = ll::SCOPE_SIGNAL | ll::SCOPE_ABSTRACT_UNIX_SOCKET;
        }
        LandlockPlan {
            abi,
            attr,
            rules: Vec::new(),
        }
    }

    fn push(&mut self, path: &Path, access: u64) {
        if let Ok(path) = CString::new(path.as_os_str().as_encoded_bytes()) {
            let access = access & self.attr.handled_access_fs;
            self.rules.push(PathRule { path, access });
        }
    }

    /// Read, list and execute beneath `path`.
    pub fn read_exec(&mut self, path: &Path) {
        self.push(path, ll::READ_EXEC);
    }

    /// Read and list beneath `path` (no execute).
    pub fn read_only(&mut self, path: &Path) {
        self.push(path, ll::FS_READ_FILE | ll::FS_READ_DIR);
    }

    /// Everything beneath `path`.
    pub fn read_write(&mut self, path: &Path) {
        self.push(path, ll::fs_rights(self.abi));
    }

    /// Character devices such as /dev/null: read, write, ioctl.
    pub fn device(&mut self, path: &Path) {
        self.push(
            path,
            ll::FS_READ_FILE | ll::FS_WRITE_FILE | ll::FS_IOCTL_DEV | ll::FS_TRUNCATE,
        );
    }

    /// Applies the ruleset to the calling thread. Async-signal-safe: system calls only.
    /// Paths that do not exist are skipped (a default bind the host lacks).
    /// `no_new_privs` must already be set.
    pub fn apply(&self) -> Result<(), (LandlockStep, i32)> {
        // SAFETY: attr is a valid, initialised landlock_ruleset_attr of the given size.
        let ruleset = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &self.attr as *const ll::RulesetAttr,
                ruleset_attr_size(self.abi),
                0u32,
            )
        } as i32;
        if ruleset < 0 {
            return Err((LandlockStep::Create, errno()));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.access == 0 {
                continue;
            }
            // SAFETY: rule.path is a NUL-terminated string owned by the plan.
            let fd = unsafe { libc::open(rule.path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if fd < 0 {
                let e = errno();
                // Missing, or out of the sandbox user's reach anyway (/root is 0700):
                // nothing to allow.
                if e == libc::ENOENT || e == libc::ENOTDIR || e == libc::EACCES {
                    continue;
                }
                close(ruleset);
                return Err((LandlockStep::AddRule(i), e));
            }
            // Rights on a file are only the file rights (the kernel says EINVAL to
            // directory rights there), e.g. for /etc/ld.so.cache or /dev/null.
            // SAFETY: fstat on our O_PATH descriptor into a local.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            let is_dir = unsafe { libc::fstat(fd, &mut st) } == 0
                && st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            let access = if is_dir {
                rule.access
            } else {
                rule.access & FILE_RIGHTS
            };
            let attr = ll::PathBeneathAttr {
                allowed_access: access,
                parent_fd: fd,
            };
            // SAFETY: attr is a valid landlock_path_beneath_attr; fds are ours.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_landlock_add_rule,
                    ruleset,
                    ll::RULE_PATH_BENEATH,
                    &attr as *const ll::PathBeneathAttr,
                    0u32,
                )
            };
            let e = errno();
            close(fd);
            if r < 0 {
                close(ruleset);
                return Err((LandlockStep::AddRule(i), e));
            }
        }
        // SAFETY: ruleset is a landlock ruleset descriptor we own.
        let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) };
        let e = errno();
        close(ruleset);
        if r < 0 {
            return Err((LandlockStep::Restrict, e));
        }
        Ok(())
    }
}

/// Older kernels reject a ruleset attribute larger than they know (E2BIG), so pass the
/// size of the fields the ABI has: fs only (ABI 1–3), + net (4–5), + scoped (6+).
fn ruleset_attr_size(abi: u32) -> usize {
    match abi {
        0..=3 => 8,
        4 | 5 => 16,
        _ => 24,
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn close(fd: i32) {
    // SAFETY: closing a descriptor this module opened.
    unsafe { libc::close(fd) };
}
