//! Everything the child needs, computed in the parent before `clone`.
//!
//! After `clone` in a multi-threaded process the child may not allocate, so every path,
//! argument vector and system-call argument is prepared here as plain data, and the child
//! only walks these lists making system calls ([`crate::child`]).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::config::{SandboxConfig, Tier};
use crate::error::{Error, Result};
use crate::landlock::LandlockPlan;
use crate::outcome::{Control, Enforcement, Mechanism};
use crate::seccomp::SeccompFilters;
use crate::spec::CommandSpec;

/// Where the workspace appears inside a tier A sandbox.
pub const WORKSPACE_MOUNT: &str = "/workspace";

/// One filesystem operation of the tier A root construction.
#[derive(Debug)]
pub(crate) enum FsOp {
    MakeDir(CString),
    MakeFile(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    WriteFile {
        path: CString,
        contents: Vec<u8>,
    },
    Mount {
        source: CString,
        target: CString,
        fstype: CString,
        flags: libc::c_ulong,
        data: CString,
    },
    Bind {
        source: CString,
        target: CString,
    },
    /// Remount a bind with these flags added to the ones the kernel locked (a user
    /// namespace may not clear nosuid/nodev/noexec/atime flags of the host's mount).
    Remount {
        target: CString,
        flags: libc::c_ulong,
    },
    PivotRoot {
        new_root: CString,
        put_old: CString,
    },
    Chdir(CString),
    Detach(CString),
    RemoveDir(CString),
    /// Opens a host path (O_PATH) into a fixed descriptor slot, while the supervisor still
    /// has the service's uid: later binds use `/proc/self/fd/<slot>`, so sources below
    /// directories only the service may search (e.g. `/root/.cargo`) work.
    Open {
        path: CString,
        slot: i32,
    },
    /// Closes every slot once the binds are done.
    CloseSlots,
}

/// First descriptor slot for pre-opened bind sources.
pub(crate) const FIRST_SLOT: i32 = 100;

/// A step of the child's setup, for error messages.
#[derive(Debug)]
pub(crate) struct FsStep {
    pub op: FsOp,
    pub what: String,
    /// Failure is tolerated (hardening that some kernels refuse).
    pub optional: bool,
}

/// Resource limits the child applies with setrlimit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rlimit {
    pub resource: libc::__rlimit_resource_t,
    pub soft: u64,
    pub hard: u64,
}

/// Everything the child does, as data.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    pub tier: Tier,
    /// Tier A: the bind sources to open before switching ids. Empty otherwise.
    pub fs_open: Vec<FsStep>,
    /// Tier A: the root construction. Empty otherwise.
    pub fs: Vec<FsStep>,
    pub hostname: CString,
    /// Ids inside the sandbox the program switches to (tier A: inner ids; tier B when
    /// root: the unprivileged host ids). None: keep the service's ids.
    pub ids: Option<(u32, u32)>,
    /// Tier A: the supervisor (init) takes the inner ids before building the root, so
    /// files it creates in the new tmpfs have mapped owners.
    pub init_ids: Option<(u32, u32)>,
    /// Whether `setgroups` may be called (false in a user namespace set up unprivileged).
    pub may_setgroups: bool,
    pub rlimits: Vec<Rlimit>,
    pub cwd: CString,
    pub candidates: Vec<CString>,
    pub argv: Vec<CString>,
    #[expect(dead_code, reason = "owns the strings envp_ptrs points into")]
    pub envp: Vec<CString>,
    /// NULL-terminated pointers into `argv` and `envp` (CString buffers never move).
    pub argv_ptrs: Vec<*const libc::c_char>,
    pub envp_ptrs: Vec<*const libc::c_char>,
    pub landlock: Option<LandlockPlan>,
    pub seccomp: Option<&'a SeccompFilters>,
    /// The service's argument and environment strings, which the supervisor (a copy of
    /// the service's memory) overwrites first thing: see [`ArgArea`].
    pub arg_area: Option<ArgArea>,
    /// Probe mode: build the sandbox, report success, run nothing.
    pub probe_only: bool,
}

/// Where the kernel finds a process's command line and environment: the strings on the
/// initial stack, `[arg_start, arg_end)` and `[env_start, env_end)` (fields 48–51 of
/// `/proc/<pid>/stat`). `/proc/<pid>/cmdline` is readable by every process that can see
/// the pid, whatever its uid, and the supervisor is a `clone` of the service without an
/// `execve`: unless it overwrites these bytes it shows the service's command line (and
/// environment) to the step, as pid 1 in tier A and as the step's parent in tier B.
/// Setting them elsewhere (`PR_SET_MM_ARG_START`) needs `CAP_SYS_RESOURCE` on the host,
/// and an `execve` of a separate init would cost a binary and an exec per step; writing
/// over our own copy is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ArgArea {
    pub arg: (usize, usize),
    pub env: (usize, usize),
}

impl ArgArea {
    /// This process's areas, or None if /proc says something unexpected (then the
    /// supervisor shows the service's command line, as before; the caller logs it).
    pub(crate) fn of_self() -> Option<ArgArea> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) may contain spaces and parentheses: count fields
        // from the last ')', after which field 3 comes.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<usize> = rest
            .split_whitespace()
            .skip(48 - 3)
            .take(4)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let [arg_start, arg_end, env_start, env_end] = fields[..] else {
            return None;
        };
        (arg_start < arg_end && env_start <= env_end).then_some(ArgArea {
            arg: (arg_start, arg_end),
            env: (env_start, env_end),
        })
    }
}

pub(crate) fn cstr(bytes: impl AsRef<[u8]>) -> Result<CString> {
    CString::new(bytes.as_ref())
        .map_err(|_| Error::InvalidCommand("a path or argument contains a NUL byte".into()))
}

fn cpath(path: &Path) -> Result<CString> {
    cstr(path.as_os_str().as_bytes())
}

/// Null-terminated pointer arrays for execve, built in the parent. The pointers borrow
/// from the plan's CStrings, which outlive the child's use of them.
pub(crate) fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Host facts the plan depends on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostFacts {
    pub landlock_abi: u32,
    pub root: bool,
    pub cgroup_memory: bool,
    pub cgroup_pids: bool,
    /// The service's argv/environment strings, for the supervisor to overwrite.
    pub arg_area: Option<ArgArea>,
}

/// Builds the plan and lists the controls it applies.
pub(crate) fn build<'a>(
    config: &SandboxConfig,
    tier: Tier,
    spec: &CommandSpec,
    workspace: &Path,
    host: HostFacts,
    seccomp: Option<&'a SeccompFilters>,
    enforced: &mut Vec<Enforcement>,
) -> Result<Plan<'a>> {
    let mut note = |control, mechanism| enforced.push(Enforcement { control, mechanism });
    let (run_uid, run_gid) = config.effective_run_as();
    let in_sandbox_ws = match tier {
        Tier::A => PathBuf::from(WORKSPACE_MOUNT),
        _ => workspace.to_path_buf(),
    };
    let cwd = in_sandbox_ws.join(&spec.working_dir);
    let program = &spec.argv[0];
    let candidates = if program.contains('/') {
        let p = Path::new(program);
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            cwd.join(p)
        };
        vec![cpath(&p)?]
    } else {
        spec.search_path()
            .split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| cpath(&Path::new(d).join(program)))
            .collect::<Result<_>>()?
    };
    let argv = spec.argv.iter().map(cstr).collect::<Result<Vec<_>>>()?;
    let envp = spec
        .env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}")))
        .collect::<Result<Vec<_>>>()?;

    let (ids, init_ids) = match tier {
        Tier::A => (Some(config.inner_ids), Some(config.inner_ids)),
        _ if host.root => (Some((run_uid, run_gid)), None),
        _ => (None, None),
    };
    if ids.is_some() {
        note(Control::Privileges, Mechanism::Credentials);
    }
    let rlimits = rlimits(spec, tier, host, &mut note);

    let mut landlock = None;
    if host.landlock_abi > 0 && tier != Tier::None {
        let mut ll = LandlockPlan::new(host.landlock_abi, tier == Tier::B);
        match tier {
            Tier::A => {
                for bind in &config.read_only_binds {
                    ll.read_exec(&bind.target);
                }
                ll.read_only(Path::new("/etc"));
                ll.read_write(Path::new(WORKSPACE_MOUNT));
                ll.read_write(Path::new("/tmp"));
                ll.read_write(Path::new("/dev/shm"));
                ll.read_only(Path::new("/proc"));
                for dev in DEVICES {
                    ll.device(&Path::new("/dev").join(dev));
                }
            }
            _ => {
                for bind in &config.read_only_binds {
                    ll.read_exec(&bind.source);
                }
                ll.read_only(Path::new("/etc/passwd"));
                ll.read_only(Path::new("/etc/group"));
                ll.read_write(workspace);
                ll.read_only(Path::new("/proc"));
                for dev in DEVICES {
                    ll.device(&Path::new("/dev").join(dev));
                }
                if host.landlock_abi >= 4 {
                    note(Control::Network, Mechanism::Landlock(host.landlock_abi));
                }
            }
        }
        note(Control::Filesystem, Mechanism::Landlock(host.landlock_abi));
        if host.landlock_abi >= 6 {
            note(Control::Ipc, Mechanism::Landlock(host.landlock_abi));
        }
        landlock = Some(ll);
    }
    if tier != Tier::None {
        note(Control::Privileges, Mechanism::NoNewPrivs);
        if seccomp.is_some() {
            note(Control::Syscalls, Mechanism::Seccomp);
        }
    }
    let (fs_open, fs) = if tier == Tier::A {
        note(Control::Filesystem, Mechanism::Namespaces);
        note(Control::Network, Mechanism::Namespaces);
        note(Control::Ipc, Mechanism::Namespaces);
        note(Control::ProcessIsolation, Mechanism::Namespaces);
        if spec.limits.disk_bytes.is_some() {
            note(Control::TmpSize, Mechanism::Tmpfs);
        }
        crate::rootfs::steps(config, workspace, spec.limits.disk_bytes)?
    } else {
        note(Control::ProcessIsolation, Mechanism::Subreaper);
        (Vec::new(), Vec::new())
    };
    Ok(Plan {
        tier,
        fs_open,
        fs,
        hostname: cstr(&config.hostname)?,
        ids,
        init_ids,
        may_setgroups: host.root,
        rlimits,
        cwd: cpath(&cwd)?,
        candidates,
        argv_ptrs: pointers(&argv),
        envp_ptrs: pointers(&envp),
        argv,
        envp,
        landlock,
        seccomp: if tier == Tier::None { None } else { seccomp },
        arg_area: host.arg_area,
        probe_only: false,
    })
}

/// Character devices a step may use.
pub(crate) const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

fn rlimits(
    spec: &CommandSpec,
    tier: Tier,
    host: HostFacts,
    note: &mut impl FnMut(Control, Mechanism),
) -> Vec<Rlimit> {
    let l = &spec.limits;
    let mut out = Vec::new();
    let mut add = |resource, value: Option<u64>, slack: u64, control| {
        if let Some(v) = value {
            out.push(Rlimit {
                resource,
                soft: v,
                hard: v.saturating_add(slack),
            });
            note(control, Mechanism::Rlimit);
        }
    };
    // CPU: SIGXCPU at the soft limit, SIGKILL one second later for those who ignore it.
    add(
        libc::RLIMIT_CPU,
        l.cpu_time.map(|d| d.as_secs().max(1)),
        1,
        Control::CpuTimePerProcess,
    );
    let address_space = l.address_space_bytes.or(if host.cgroup_memory {
        None
    } else {
        l.memory_bytes
    });
    add(libc::RLIMIT_AS, address_space, 0, Control::AddressSpace);
    add(
        libc::RLIMIT_FSIZE,
        l.file_size_bytes.or(l.disk_bytes),
        0,
        Control::FileSize,
    );
    add(libc::RLIMIT_NOFILE, l.open_files, 0, Control::OpenFiles);
    // RLIMIT_NPROC counts every process of the uid, so in tier B (shared host uid) it
    // would let one step's fork bomb starve another step: there the pids cgroup is used
    // when available. In tier A the count is per user namespace, so it is always safe.
    if tier == Tier::A || !host.cgroup_pids {
        add(libc::RLIMIT_NPROC, l.processes, 0, Control::Processes);
    }
    out.push(Rlimit {
        resource: libc::RLIMIT_CORE,
        soft: 0,
        hard: 0,
    });
    clamp_to_host(&mut out);
    out
}

/// Without CAP_SYS_RESOURCE (absent in many containers, and on these machines) a hard
/// limit cannot be raised, so never ask for more than the host's current hard limit.
fn clamp_to_host(limits: &mut [Rlimit]) {
    for l in limits {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-pointer.
        if unsafe { libc::getrlimit(l.resource, &mut cur) } == 0
            && cur.rlim_max != libc::RLIM_INFINITY
        {
            l.hard = l.hard.min(cur.rlim_max);
            l.soft = l.soft.min(l.hard);
        }
    }
}

pub(crate) fn c(path: impl AsRef<Path>) -> Result<CString> {
    cpath(path.as_ref())
}
