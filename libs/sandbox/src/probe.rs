//! What the host allows, and which tier that makes.

use std::fmt;
use std::io::Read;
use std::os::fd::AsRawFd;

use crate::cgroup::{CgroupBase, CgroupVersion};
use crate::config::{SandboxConfig, Tier};
use crate::outcome::Enforcement;
use crate::plan::{self, HostFacts};
use crate::spawn::{self, IdMap};
use crate::spec::CommandSpec;
use crate::status::{self, Labels};
use crate::sys;

/// The result of probing the host.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The best tier this host supports.
    pub tier: Tier,
    /// Whether a full tier A sandbox could be built (a dry run that creates the
    /// namespaces, the new root and /proc), or why not.
    pub namespaces: Result<(), String>,
    /// Landlock ABI version, 0 when unavailable.
    pub landlock_abi: u32,
    /// seccomp-bpf available.
    pub seccomp: bool,
    /// The cgroup hierarchy the sandbox can create step cgroups in, or why not.
    pub cgroup: Result<CgroupInfo, String>,
    /// The service runs as root (uid 0).
    pub root: bool,
}

/// A usable cgroup hierarchy.
#[derive(Debug, Clone)]
pub struct CgroupInfo {
    /// v1 or v2.
    pub version: CgroupVersion,
    /// Controllers steps get limits from (memory, pids, cpu, cpuacct).
    pub controllers: Vec<&'static str>,
    pub(crate) base: CgroupBase,
}

impl Probe {
    /// Why tier B is not available, if it is not.
    pub fn tier_b_missing(&self) -> Option<String> {
        let mut missing = Vec::new();
        if self.landlock_abi == 0 {
            missing.push("landlock is unavailable (kernel < 5.13 or not in the LSM list)");
        }
        if !self.seccomp {
            missing.push("seccomp-bpf is unavailable");
        }
        (!missing.is_empty()).then(|| missing.join("; "))
    }

    /// Why tier A is not available, if it is not.
    pub fn tier_a_missing(&self) -> Option<String> {
        match (&self.namespaces, self.seccomp) {
            (Err(e), _) => Some(format!("namespaces: {e}")),
            (Ok(()), false) => Some("seccomp-bpf is unavailable".into()),
            _ => None,
        }
    }

    /// Short feature names, for GetPolicy and metrics labels.
    pub fn features(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.namespaces.is_ok() {
            f.push("namespaces".to_owned());
        }
        if self.landlock_abi > 0 {
            f.push(format!("landlock-abi-{}", self.landlock_abi));
        }
        if self.seccomp {
            f.push("seccomp".to_owned());
        }
        if let Ok(cg) = &self.cgroup {
            let v = match cg.version {
                CgroupVersion::V1 => "v1",
                CgroupVersion::V2 => "v2",
            };
            f.extend(cg.controllers.iter().map(|c| format!("cgroup-{v}-{c}")));
        }
        f
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tier {} ({})", self.tier, self.features().join(", "))?;
        if let Some(why) = self.tier_a_missing() {
            write!(f, "; no tier A: {why}")?;
        }
        Ok(())
    }
}

/// Probes the host: landlock ABI, seccomp, cgroups, and a dry run of a tier A sandbox.
/// Takes a few milliseconds; the result does not change while the service runs, so
/// [`Sandbox::new`](crate::Sandbox::new) does it once.
pub fn probe() -> Probe {
    probe_with(&SandboxConfig::default())
}

pub(crate) fn probe_with(config: &SandboxConfig) -> Probe {
    let landlock_abi = sys::landlock_abi();
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Seccomp:")));
    let root = nix::unistd::geteuid().is_root();
    let cgroup = if config.use_cgroups {
        CgroupBase::detect().map(|base| CgroupInfo {
            version: base.version,
            controllers: base.controllers(),
            base,
        })
    } else {
        Err("disabled by configuration".into())
    };
    let namespaces = dry_run_tier_a(config, landlock_abi, root);
    let mut probe = Probe {
        tier: Tier::None,
        namespaces,
        landlock_abi,
        seccomp,
        cgroup,
        root,
    };
    probe.tier = if probe.tier_a_missing().is_none() {
        Tier::A
    } else if probe.tier_b_missing().is_none() {
        Tier::B
    } else {
        Tier::None
    };
    probe
}

/// Builds a complete tier A sandbox (namespaces, id maps, root, /proc) that runs nothing:
/// the only honest answer to "may we?" on hosts where, say, user namespaces work but
/// /proc cannot be mounted.
fn dry_run_tier_a(config: &SandboxConfig, landlock_abi: u32, root: bool) -> Result<(), String> {
    // Unique per probe, not per process: two sandboxes probed at once in one process
    // (parallel tests) must not remove each other's directory.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kiln-sandbox-probe-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let result = (|| {
        let spec = CommandSpec::new(["/bin/true"], &dir);
        let facts = HostFacts {
            landlock_abi,
            root,
            cgroup_memory: false,
            cgroup_pids: false,
            arg_area: plan::ArgArea::of_self(),
        };
        let mut enforced: Vec<Enforcement> = Vec::new();
        let mut plan = plan::build(config, Tier::A, &spec, &dir, facts, None, &mut enforced)
            .map_err(|e| e.to_string())?;
        plan.probe_only = true;
        let labels = Labels::of(&plan);
        let (host_uid, host_gid) = config.effective_run_as();
        let ids = IdMap {
            inner: config.inner_ids,
            host: (host_uid, host_gid),
            privileged: root,
        };
        let launched = spawn::launch(&plan, Some(ids), None).map_err(|e| e.to_string())?;
        sys::wait4(launched.pid).map_err(|e| e.to_string())?;
        let mut bytes = Vec::new();
        let mut status = std::fs::File::from(launched.status);
        let _ = status.read_to_end(&mut bytes);
        let _ = launched.lifeline.as_raw_fd();
        let report = status::parse(&bytes, &labels);
        match (report.setup_error, report.exit_status) {
            (Some(e), _) => Err(e),
            (None, Some(0)) => Ok(()),
            _ => Err("the probe sandbox died without reporting".into()),
        }
    })();
    let _ = std::fs::remove_dir(&dir);
    result
}
