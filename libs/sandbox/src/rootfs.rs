//! The tier A root filesystem, as a list of operations for the child.
//!
//! Layout (all inside a private mount namespace, nothing visible to the host):
//! a fresh tmpfs as `/` (read-only once built), the configured system paths bind-mounted
//! read-only, the workspace read-write at `/workspace` (nosuid, nodev), a private size-
//! limited tmpfs `/tmp`, a `/dev` with only null, zero, full, random, urandom and tty, a
//! `/proc` of the new pid namespace with `/proc/sys` read-only, and a generated
//! `/etc/passwd` and `/etc/group` naming the sandbox user.
//!
//! The host tree is reached through `/oldroot` after the first `pivot_root` (as
//! bubblewrap does), so a workspace under the host's `/tmp` is not hidden by the new
//! root's staging mount.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::config::SandboxConfig;
use crate::error::Result;
use std::ffi::CString;

use crate::plan::{DEVICES, FIRST_SLOT, FsOp, FsStep, WORKSPACE_MOUNT, c, cstr};

const MS_RO: libc::c_ulong = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;

struct Builder {
    opens: Vec<FsStep>,
    steps: Vec<FsStep>,
    dirs: HashSet<PathBuf>,
}

impl Builder {
    fn push(&mut self, op: FsOp, what: impl Into<String>) {
        self.steps.push(FsStep {
            op,
            what: what.into(),
            optional: false,
        });
    }

    fn optional(&mut self, op: FsOp, what: impl Into<String>) {
        self.steps.push(FsStep {
            op,
            what: what.into(),
            optional: true,
        });
    }

    /// mkdir -p, remembering what exists already.
    fn dirs(&mut self, path: &Path) -> Result<()> {
        let mut acc = PathBuf::from("/");
        for part in path.components().skip(1) {
            acc.push(part);
            if self.dirs.insert(acc.clone()) {
                self.push(
                    FsOp::MakeDir(c(&acc)?),
                    format!("creating {}", acc.display()),
                );
            }
        }
        Ok(())
    }

    fn tmpfs(&mut self, target: &str, flags: libc::c_ulong, data: &str) -> Result<()> {
        self.push(
            FsOp::Mount {
                source: cstr("tmpfs")?,
                target: c(target)?,
                fstype: cstr("tmpfs")?,
                flags,
                data: cstr(data)?,
            },
            format!("mounting a tmpfs on {target}"),
        );
        Ok(())
    }

    /// A host path as a bind source: opened early into a slot, used via /proc.
    fn source(&mut self, host: &Path) -> Result<CString> {
        let slot = FIRST_SLOT + self.opens.len() as i32;
        self.opens.push(FsStep {
            op: FsOp::Open {
                path: c(host)?,
                slot,
            },
            what: format!("opening {}", host.display()),
            optional: false,
        });
        cstr(format!("/oldroot/proc/self/fd/{slot}"))
    }

    fn bind(&mut self, source: &Path, target: &Path, flags: libc::c_ulong) -> Result<()> {
        let slot = self.source(source)?;
        self.push(
            FsOp::Bind {
                source: slot,
                target: c(target)?,
            },
            format!("bind-mounting {} on {}", source.display(), target.display()),
        );
        self.push(
            FsOp::Remount {
                target: c(target)?,
                flags,
            },
            format!("remounting {}", target.display()),
        );
        Ok(())
    }
}

pub(crate) fn steps(
    config: &SandboxConfig,
    workspace: &Path,
    disk_bytes: Option<u64>,
) -> Result<(Vec<FsStep>, Vec<FsStep>)> {
    let mut b = Builder {
        opens: Vec::new(),
        steps: Vec::new(),
        dirs: HashSet::new(),
    };
    let size = |bytes: Option<u64>| bytes.map(|n| format!(",size={n}")).unwrap_or_default();
    b.push(
        FsOp::Mount {
            source: cstr("none")?,
            target: c("/")?,
            fstype: cstr("")?,
            flags: libc::MS_REC | libc::MS_PRIVATE,
            data: cstr("")?,
        },
        "making mounts private",
    );
    // Staging: the new root is a tmpfs mounted over /tmp of the private namespace.
    b.tmpfs(
        "/tmp",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755,size=4m",
    )?;
    b.push(FsOp::MakeDir(c("/tmp/oldroot")?), "creating /oldroot");
    b.push(
        FsOp::PivotRoot {
            new_root: c("/tmp")?,
            put_old: c("/tmp/oldroot")?,
        },
        "pivot_root into the new root",
    );
    b.push(FsOp::Chdir(c("/")?), "chdir /");
    b.dirs.insert(PathBuf::from("/oldroot"));

    let mut etc_bound = false;
    for bind in &config.read_only_binds {
        let Ok(meta) = std::fs::symlink_metadata(&bind.source) else {
            continue; // a default the host lacks
        };
        if !bind.target.is_absolute() {
            continue;
        }
        if bind.target == Path::new("/etc") || bind.target == Path::new("/etc/passwd") {
            etc_bound = true;
        }
        if let Some(parent) = bind.target.parent() {
            b.dirs(parent)?;
        }
        // Merged-/usr hosts have /bin -> usr/bin: recreate the link instead of a mount.
        if meta.file_type().is_symlink() && bind.source == bind.target {
            let dest = std::fs::read_link(&bind.source)
                .map_err(|e| crate::Error::io(format!("reading {}", bind.source.display()), e))?;
            b.push(
                FsOp::Symlink {
                    target: c(&dest)?,
                    link: c(&bind.target)?,
                },
                format!("linking {}", bind.target.display()),
            );
            continue;
        }
        if std::fs::metadata(&bind.source).is_ok_and(|m| m.is_dir()) {
            b.dirs(&bind.target)?;
        } else {
            b.push(
                FsOp::MakeFile(c(&bind.target)?),
                format!("creating {}", bind.target.display()),
            );
        }
        b.bind(&bind.source, &bind.target, MS_RO)?;
    }
    if !etc_bound {
        b.dirs(Path::new("/etc"))?;
        let (uid, gid) = config.inner_ids;
        let passwd = format!(
            "root:x:0:0:root:/root:/usr/sbin/nologin\n\
             kiln:x:{uid}:{gid}:kiln sandbox:{WORKSPACE_MOUNT}:/usr/sbin/nologin\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        );
        let group = format!("root:x:0:\nkiln:x:{gid}:\nnogroup:x:65534:\n");
        for (path, contents) in [("/etc/passwd", passwd), ("/etc/group", group)] {
            b.push(
                FsOp::WriteFile {
                    path: c(path)?,
                    contents: contents.into_bytes(),
                },
                format!("writing {path}"),
            );
        }
    }

    b.dirs(Path::new(WORKSPACE_MOUNT))?;
    b.bind(
        workspace,
        Path::new(WORKSPACE_MOUNT),
        libc::MS_NOSUID | libc::MS_NODEV,
    )?;

    b.dirs(Path::new("/tmp"))?;
    b.tmpfs(
        "/tmp",
        libc::MS_NOSUID | libc::MS_NODEV,
        &format!("mode=1777{}", size(disk_bytes)),
    )?;

    b.dirs(Path::new("/dev"))?;
    b.tmpfs(
        "/dev",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "mode=0755,size=64k",
    )?;
    for dev in DEVICES {
        let path = Path::new("/dev").join(dev);
        // Only a real character device is bound: a regular file in its place (a broken
        // container image) would give every step a host file it can write to.
        let is_device = std::fs::symlink_metadata(&path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()));
        if !is_device {
            continue;
        }
        b.push(
            FsOp::MakeFile(c(&path)?),
            format!("creating {}", path.display()),
        );
        // A bind of a device node keeps working after /dev is remounted read-only.
        let source = b.source(&path)?;
        b.push(
            FsOp::Bind {
                source,
                target: c(&path)?,
            },
            format!("bind-mounting {}", path.display()),
        );
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        b.push(
            FsOp::Symlink {
                target: c(target)?,
                link: c(link)?,
            },
            format!("linking {link}"),
        );
    }
    b.dirs(Path::new("/dev/shm"))?;
    b.tmpfs(
        "/dev/shm",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        &format!("mode=1777{}", size(disk_bytes)),
    )?;
    b.push(
        FsOp::Remount {
            target: c("/dev")?,
            flags: libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        },
        "remounting /dev read-only",
    );

    b.dirs(Path::new("/proc"))?;
    b.push(
        FsOp::Mount {
            source: cstr("proc")?,
            target: c("/proc")?,
            fstype: cstr("proc")?,
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data: cstr("")?,
        },
        "mounting /proc",
    );
    b.optional(
        FsOp::Bind {
            source: c("/proc/sys")?,
            target: c("/proc/sys")?,
        },
        "binding /proc/sys",
    );
    b.optional(
        FsOp::Remount {
            target: c("/proc/sys")?,
            flags: MS_RO,
        },
        "remounting /proc/sys read-only",
    );

    b.push(FsOp::CloseSlots, "closing bind sources");
    b.push(FsOp::Detach(c("/oldroot")?), "detaching the host root");
    b.push(FsOp::RemoveDir(c("/oldroot")?), "removing /oldroot");
    b.push(
        FsOp::Remount {
            target: c("/")?,
            flags: MS_RO,
        },
        "remounting / read-only",
    );
    Ok((b.opens, b.steps))
}
