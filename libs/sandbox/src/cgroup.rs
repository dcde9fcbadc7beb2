//! cgroup limits (memory, pids, CPU) for a step's tree, on v1 and v2 hierarchies.
//!
//! Steps get a child cgroup of the service's own cgroup (never one elsewhere in the
//! tree): a step stays inside whatever limits the service itself runs under, and the
//! service only needs its own subtree delegated (as Kubernetes and systemd do).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::outcome::{Control, Enforcement, Mechanism};
use crate::spec::Limits;

/// Which cgroup hierarchy the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies.
    V1,
    /// The unified hierarchy.
    V2,
}

/// Where step cgroups are created: one base directory per controller (v1) or one (v2).
#[derive(Debug, Clone)]
pub(crate) struct CgroupBase {
    pub version: CgroupVersion,
    /// (controller, directory). In v2 every controller maps to the same directory.
    pub dirs: Vec<(&'static str, PathBuf)>,
}

const CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "cpuacct"];

impl CgroupBase {
    /// Finds the service's own cgroups and checks that children can be created there.
    pub fn detect() -> Result<Self, String> {
        let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let base = if let Some(v2) = detect_v2(&own, &mountinfo)? {
            v2
        } else {
            detect_v1(&own, &mountinfo)?
        };
        base.check_writable()?;
        Ok(base)
    }

    fn check_writable(&self) -> Result<(), String> {
        let probe = format!("kiln-probe-{}", std::process::id());
        for (_, dir) in &self.dirs {
            let d = dir.join(&probe);
            fs::create_dir(&d)
                .map_err(|e| format!("cannot create a cgroup under {}: {e}", dir.display()))?;
            let _ = fs::remove_dir(&d);
        }
        Ok(())
    }

    /// The controllers we can use.
    pub fn controllers(&self) -> Vec<&'static str> {
        self.dirs.iter().map(|(c, _)| *c).collect()
    }
}

/// A cgroup file system mount: where it is mounted, and which cgroup it shows there.
#[derive(Debug, Clone, PartialEq)]
struct CgroupMount {
    /// The mount point (mountinfo field 5).
    point: PathBuf,
    /// The cgroup that appears at the mount point (mountinfo field 4): `/` with a cgroup
    /// namespace or on the host, the container's own cgroup when a runtime bind-mounts
    /// just that subtree (Docker without cgroupns).
    root: String,
}

impl CgroupMount {
    fn parse(left: &str) -> Option<Self> {
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?.to_owned();
        let point = PathBuf::from(fields.next()?);
        Some(CgroupMount { point, root })
    }

    /// The directory of cgroup `path` (as /proc/self/cgroup names it) under this mount,
    /// or None when that cgroup is outside what the mount shows.
    fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let root = self.root.trim_end_matches('/');
        let rest = path.strip_prefix(root)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None; // "/docker/abc" is not under the root "/docker/a"
        }
        Some(self.point.join(rest.trim_start_matches('/')))
    }
}

fn cgroup2_mount(mountinfo: &str) -> Option<CgroupMount> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        CgroupMount::parse(left)
    })
}

fn detect_v2(own: &str, mountinfo: &str) -> Result<Option<CgroupBase>, String> {
    let Some(mount) = cgroup2_mount(mountinfo) else {
        return Ok(None);
    };
    // A pure v2 host lists only "0::/path"; a hybrid host (v1 controllers + an empty v2
    // tree) is treated as v1.
    if own.lines().any(|l| !l.starts_with("0::")) {
        return Ok(None);
    }
    let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Ok(None);
    };
    let Some(base) = mount.dir_of(path) else {
        return Err(format!(
            "the service's cgroup {path} is outside the cgroup2 mount at {}",
            mount.point.display()
        ));
    };
    enable_v2_controllers(&base)?;
    let enabled = fs::read_to_string(base.join("cgroup.subtree_control")).unwrap_or_default();
    let dirs = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|c| enabled.split_whitespace().any(|e| e == *c))
        .map(|c| (c, base.clone()))
        .collect::<Vec<_>>();
    if dirs.is_empty() {
        return Err(format!("no controller enabled in {}", base.display()));
    }
    Ok(Some(CgroupBase {
        version: CgroupVersion::V2,
        dirs,
    }))
}

/// v2 forbids processes in a cgroup whose children have controllers ("no internal
/// processes"), so if the service sits in its delegated cgroup with controllers off, it
/// moves itself into a `kiln-service` leaf first and then turns them on for its subtree.
fn enable_v2_controllers(base: &Path) -> Result<(), String> {
    let control = base.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&control).map_err(|e| e.to_string())?;
    let available = fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<_> = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let request: String = missing.iter().map(|c| format!("+{c} ")).collect();
    if fs::write(&control, request.trim()).is_ok() {
        return Ok(());
    }
    let leaf = base.join("kiln-service");
    let _ = fs::create_dir(&leaf);
    let procs = fs::read_to_string(base.join("cgroup.procs")).map_err(|e| e.to_string())?;
    for pid in procs.lines() {
        // Kernel threads and vanished processes cannot move; ignore them.
        let _ = fs::write(leaf.join("cgroup.procs"), pid);
    }
    fs::write(&control, request.trim())
        .map_err(|e| format!("cannot enable {missing:?} in {}: {e}", control.display()))
}

fn detect_v1(own: &str, mountinfo: &str) -> Result<CgroupBase, String> {
    let mut dirs = Vec::new();
    for controller in CONTROLLERS {
        let Some(path) = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            ctrls.split(',').any(|c| c == controller).then_some(path)
        }) else {
            continue;
        };
        let Some(mount) = mountinfo.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut r = right.split_whitespace();
            if r.next()? != "cgroup" || !r.nth(1)?.split(',').any(|o| o == controller) {
                return None;
            }
            CgroupMount::parse(left)
        }) else {
            continue;
        };
        let Some(dir) = mount.dir_of(path) else {
            continue;
        };
        // cpu and cpuacct are often co-mounted: both names then map to one directory,
        // which create() and attach() handle once.
        dirs.push((controller, dir));
    }
    if dirs.is_empty() {
        return Err("no cgroup v1 controller mounted".into());
    }
    Ok(CgroupBase {
        version: CgroupVersion::V1,
        dirs,
    })
}

/// The cgroup(s) of one step.
#[derive(Debug)]
pub(crate) struct StepCgroup {
    version: CgroupVersion,
    dirs: Vec<(&'static str, PathBuf)>,
}

impl StepCgroup {
    /// Creates the step's cgroup(s) and writes the limits. Returns what was enforced.
    pub fn create(
        base: &CgroupBase,
        name: &str,
        limits: &Limits,
    ) -> io::Result<(Self, Vec<Enforcement>)> {
        let mut dirs: Vec<(&'static str, PathBuf)> = Vec::new();
        for (controller, dir) in &base.dirs {
            let d = dir.join(name);
            if !dirs.iter().any(|(_, x)| x == &d) {
                create_fresh(&d)?;
            }
            dirs.push((controller, d));
        }
        let cg = StepCgroup {
            version: base.version,
            dirs,
        };
        let mechanism = match cg.version {
            CgroupVersion::V1 => Mechanism::CgroupV1,
            CgroupVersion::V2 => Mechanism::CgroupV2,
        };
        let mut enforced = Vec::new();
        let mut note = |control| enforced.push(Enforcement { control, mechanism });
        if let (Some(bytes), Some(dir)) = (limits.memory_bytes, cg.dir("memory")) {
            match cg.version {
                CgroupVersion::V1 => {
                    fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string())?;
                    // No swapping around the limit where swap accounting exists.
                    let _ = fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string());
                }
                CgroupVersion::V2 => {
                    fs::write(dir.join("memory.max"), bytes.to_string())?;
                    let _ = fs::write(dir.join("memory.swap.max"), "0");
                    // One OOM kill takes the whole tree down, like a failed step should.
                    let _ = fs::write(dir.join("memory.oom.group"), "1");
                }
            }
            note(Control::Memory);
        }
        if let (Some(n), Some(dir)) = (limits.processes, cg.dir("pids")) {
            fs::write(dir.join("pids.max"), n.to_string())?;
            note(Control::Processes);
        }
        if let (Some(cores), Some(dir)) = (limits.cpu_cores, cg.dir("cpu")) {
            let period = 100_000u64;
            let quota = ((cores * period as f64) as u64).max(1000);
            match cg.version {
                CgroupVersion::V1 => {
                    fs::write(dir.join("cpu.cfs_period_us"), period.to_string())?;
                    fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
                }
                CgroupVersion::V2 => fs::write(dir.join("cpu.max"), format!("{quota} {period}"))?,
            }
            note(Control::CpuBandwidth);
        }
        if limits.cpu_time.is_some() && cg.cpu_usage().is_some() {
            note(Control::CpuTimeTree);
        }
        Ok((cg, enforced))
    }

    fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, d)| d.as_path())
    }

    /// Moves `pid` (and so everything it will start) into the step's cgroup(s).
    pub fn attach(&self, pid: i32) -> io::Result<()> {
        let mut done: Vec<&Path> = Vec::new();
        for (_, dir) in &self.dirs {
            if !done.contains(&dir.as_path()) {
                fs::write(dir.join("cgroup.procs"), pid.to_string())?;
                done.push(dir);
            }
        }
        Ok(())
    }

    /// CPU time used by the tree so far.
    pub fn cpu_usage(&self) -> Option<Duration> {
        match self.version {
            CgroupVersion::V1 => {
                let dir = self.dir("cpuacct")?;
                let ns: u64 = read_trimmed(&dir.join("cpuacct.usage"))?.parse().ok()?;
                Some(Duration::from_nanos(ns))
            }
            CgroupVersion::V2 => {
                let stat = fs::read_to_string(self.dirs.first()?.1.join("cpu.stat")).ok()?;
                let usec = keyed(&stat, "usage_usec")?;
                Some(Duration::from_micros(usec))
            }
        }
    }

    /// The tree's memory high-water mark.
    pub fn peak_memory(&self) -> Option<u64> {
        let dir = self.dir("memory")?;
        let file = match self.version {
            CgroupVersion::V1 => "memory.max_usage_in_bytes",
            CgroupVersion::V2 => "memory.peak",
        };
        read_trimmed(&dir.join(file))?.parse().ok()
    }

    /// Whether the OOM killer fired in this cgroup.
    pub fn oom_killed(&self) -> bool {
        let Some(dir) = self.dir("memory") else {
            return false;
        };
        let (file, key) = match self.version {
            CgroupVersion::V1 => ("memory.oom_control", "oom_kill"),
            CgroupVersion::V2 => ("memory.events", "oom_kill"),
        };
        fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|s| keyed(&s, key))
            .is_some_and(|n| n > 0)
    }

    /// SIGKILLs every process in the cgroup (a backstop behind the supervisor).
    pub fn kill_all(&self) {
        if self.version == CgroupVersion::V2
            && let Some((_, dir)) = self.dirs.first()
            && fs::write(dir.join("cgroup.kill"), "1").is_ok()
        {
            return;
        }
        for _ in 0..16 {
            let mut any = false;
            for (_, dir) in &self.dirs {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
                    any = true;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if !any {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Tries once to remove the cgroup(s); true when they are all gone.
    pub fn try_remove(&self) -> bool {
        self.dirs.iter().all(|(_, dir)| match fs::remove_dir(dir) {
            Ok(()) => true,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        })
    }

    /// Removes the cgroup(s); the tree must be gone. A v1 memory cgroup may need a moment
    /// to let go of its last task, hence the retry.
    pub fn remove(&self) {
        for (_, dir) in &self.dirs {
            for attempt in 0..50 {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if attempt == 49 => {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove step cgroup");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

/// Creates a cgroup directory; an empty one of the same name left by a process that
/// died before cleaning up is removed first (a cgroup with tasks cannot be removed,
/// so a live group is never taken over).
fn create_fresh(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_dir(dir)?;
            fs::create_dir(dir)
        }
        other => other,
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_empty_group_of_the_same_name_is_replaced_and_a_busy_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let group = dir.path().join("kiln-step-1-0");
        create_fresh(&group).expect("created");
        // Left behind by a dead process whose pid came round again: taken over.
        create_fresh(&group).expect("a stale empty group is replaced");
        // Not empty (a real cgroup with tasks cannot be removed either): refused.
        fs::write(group.join("cgroup.procs"), "42").expect("write");
        assert!(create_fresh(&group).is_err());
    }

    fn put(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, text).expect("write");
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// This host has cgroup v1; most Kubernetes nodes have v2. The v2 path is checked
    /// here against a directory laid out like a delegated v2 cgroup: the files written
    /// and read are the kernel's (cgroup-v2.rst), their parsing is ours.
    #[test]
    fn v2_writes_the_unified_limit_files_and_reads_the_unified_counters() {
        let fs_root = tempfile::tempdir().expect("tempdir");
        let ctr = fs_root.path().join("kubepods/pod1/ctr");
        put(
            &ctr.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        );
        put(&ctr.join("cgroup.subtree_control"), "cpu memory pids\n");
        let mountinfo = format!(
            "30 25 0:26 / {} rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n",
            fs_root.path().display()
        );
        let base = detect_v2("0::/kubepods/pod1/ctr\n", &mountinfo)
            .expect("detected")
            .expect("v2");
        assert_eq!(base.version, CgroupVersion::V2);
        assert_eq!(base.controllers(), ["memory", "pids", "cpu"]);
        assert!(base.dirs.iter().all(|(_, d)| d == &ctr));

        let limits = Limits {
            memory_bytes: Some(256 << 20),
            processes: Some(64),
            cpu_cores: Some(0.5),
            ..Limits::default()
        };
        let (cg, enforced) = StepCgroup::create(&base, "kiln-step-7", &limits).expect("create");
        let step = ctr.join("kiln-step-7");
        assert_eq!(read(&step.join("memory.max")), "268435456");
        assert_eq!(read(&step.join("memory.swap.max")), "0");
        assert_eq!(read(&step.join("memory.oom.group")), "1");
        assert_eq!(read(&step.join("pids.max")), "64");
        assert_eq!(read(&step.join("cpu.max")), "50000 100000");
        let controls: Vec<_> = enforced.iter().map(|e| e.control).collect();
        assert_eq!(
            controls,
            [Control::Memory, Control::Processes, Control::CpuBandwidth]
        );
        assert!(enforced.iter().all(|e| e.mechanism == Mechanism::CgroupV2));

        cg.attach(4242).expect("attach");
        assert_eq!(
            read(&step.join("cgroup.procs")),
            "4242",
            "one write: one tree"
        );
        put(
            &step.join("cpu.stat"),
            "usage_usec 1500000\nuser_usec 1000000\n",
        );
        put(&step.join("memory.peak"), "123456789\n");
        put(
            &step.join("memory.events"),
            "low 0\nhigh 0\nmax 7\noom 1\noom_kill 0\n",
        );
        assert_eq!(cg.cpu_usage(), Some(Duration::from_millis(1500)));
        assert_eq!(cg.peak_memory(), Some(123_456_789));
        assert!(
            !cg.oom_killed(),
            "`oom` counts events, `oom_kill` counts kills"
        );
        put(
            &step.join("memory.events"),
            "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n",
        );
        assert!(cg.oom_killed());
        cg.kill_all();
        assert_eq!(
            read(&step.join("cgroup.kill")),
            "1",
            "v2 kills the tree at once"
        );
    }

    #[test]
    fn a_hybrid_host_is_v1_and_a_foreign_cgroup_is_refused() {
        let mountinfo = "30 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let hybrid = "4:memory:/svc\n0::/svc\n";
        assert!(detect_v2(hybrid, mountinfo).expect("no error").is_none());
        // A runtime that bind-mounts only the container's subtree shows it at the mount
        // point; a cgroup outside it cannot be used.
        let bound = "30 25 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let err = detect_v2("0::/docker/other\n", bound).expect_err("outside");
        assert!(err.contains("outside"), "{err}");
    }

    #[test]
    fn cgroup_paths_are_taken_relative_to_the_mount_root() {
        let host = CgroupMount {
            point: PathBuf::from("/sys/fs/cgroup/memory"),
            root: "/".into(),
        };
        assert_eq!(
            host.dir_of("/process_api/b92"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/b92"))
        );
        let bound = CgroupMount {
            point: PathBuf::from("/sys/fs/cgroup/memory"),
            root: "/docker/abc".into(),
        };
        assert_eq!(
            bound.dir_of("/docker/abc"),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            bound.dir_of("/docker/abc/step"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/step"))
        );
        assert_eq!(bound.dir_of("/docker/abcd"), None);
        let line =
            "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory";
        let v1 = detect_v1("4:memory:/docker/abc\n", line).expect("v1");
        assert_eq!(
            v1.dirs,
            [("memory", PathBuf::from("/sys/fs/cgroup/memory"))]
        );
    }
}
