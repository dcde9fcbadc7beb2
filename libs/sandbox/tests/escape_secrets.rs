//! The service's command line and environment never reach a step.
//!
//! The supervisor is a `clone` of the service, without an `execve`: before it overwrote
//! its copy of the service's argument strings, a step read the service's command line
//! (`kiln up --admin-password …`) from `/proc/1/cmdline` in tier A and from its parent's
//! `/proc/<pid>/cmdline` in tier B. Here this test binary runs itself again as the
//! "service", with a secret in its argv (an extra test-name filter, which matches no
//! test) and in its original environment block; the step reads every
//! `/proc/<pid>/{cmdline,environ}` it can see and the supervisor's other files.

mod common;

use std::time::Duration;

use common::*;
use kiln_sandbox::{Limits, Tier};

/// Set in the re-run "service" process only: its secret.
const SECRET_ENV: &str = "KILN_TEST_SERVICE_SECRET";

const READ_PROC: &str = r#"
import os
ppid = os.getppid()
for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
    for name in ("cmdline", "environ"):
        try:
            with open("/proc/%s/%s" % (pid, name), "rb") as f:
                print(pid, name, "READ", f.read())
        except OSError as e:
            print(pid, name, "DENIED", e.errno)
for pid in sorted({"1", str(ppid)}):
    for name in ("maps", "mem", "status", "stat", "comm"):
        try:
            with open("/proc/%s/%s" % (pid, name), "rb") as f:
                print(pid, name, "READ", f.read(1 << 20))
        except OSError as e:
            print(pid, name, "DENIED", e.errno)
    for name in ("fd", "map_files"):
        try:
            print(pid, name, "READ", os.listdir("/proc/%s/%s" % (pid, name)))
        except OSError as e:
            print(pid, name, "DENIED", e.errno)
    for name in ("exe", "cwd", "root", "fd/0", "fd/3"):
        try:
            print(pid, name, "READ", os.readlink("/proc/%s/%s" % (pid, name)))
        except OSError as e:
            print(pid, name, "DENIED", e.errno)
print("supervisor", ppid)
"#;

/// How the step relates to the "service".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    A,
    B,
    /// Tier B with the step running as the service's own uid, as with an unprivileged
    /// service: neither a uid nor file permissions stand between the step and the
    /// service's `/proc/<pid>/environ`; landlock's ptrace scope (and the supervisor's
    /// non-dumpability) must.
    BSameUid,
}

impl Case {
    fn tier(self) -> Tier {
        match self {
            Case::A => Tier::A,
            _ => Tier::B,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Case::A => "tier_a",
            Case::B => "tier_b",
            Case::BSameUid => "tier_b_same_uid",
        }
    }
}

/// The step's view, from inside the "service" process.
async fn look_for_secret(case: Case, secret: &str) {
    let tier = case.tier();
    let s = if case == Case::BSameUid {
        let config = kiln_sandbox::SandboxConfig {
            force_tier: Some(Tier::B),
            run_as: Some((
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )),
            ..Default::default()
        };
        kiln_sandbox::Sandbox::new(config).ok()
    } else {
        sandbox(tier)
    };
    let Some(s) = s else {
        eprintln!("SKIPPED: tier {tier} unavailable");
        return;
    };
    let ws = Workspace::new(&s);
    let spec = py(&ws, READ_PROC).limits(Limits {
        wall_timeout: Duration::from_secs(60),
        output_bytes: Some(256 << 20),
        ..Limits::default()
    });
    let (o, out, err) = run(&s, spec).await;
    assert!(o.success(), "{o:?} {err}");
    let service = std::process::id().to_string();
    let supervisor = out
        .lines()
        .find_map(|l| l.strip_prefix("supervisor "))
        .expect("the step's report")
        .to_owned();
    for line in out.lines() {
        // Tier B shares the host's /proc: the service's own command line is readable
        // by every uid (the kernel has no switch for it short of hidepid on the host's
        // /proc mount). That is why no secret may be on a command line at all (`kiln up`
        // takes none); its environment is not readable.
        if tier == Tier::B && line.starts_with(&format!("{service} cmdline READ")) {
            assert!(line.contains(secret), "the probe lost its secret: {line}");
            continue;
        }
        assert!(!line.contains(secret), "the secret leaked: {line}");
    }
    // The supervisor names itself and shows nothing of the service's memory.
    let sup = if tier == Tier::A { "1" } else { &supervisor };
    let cmdline = format!("{sup} cmdline READ b'kiln-sandbox-init\\x00");
    assert!(out.contains(&cmdline), "{out}");
    for name in [
        "environ",
        "maps",
        "mem",
        "fd",
        "map_files",
        "exe",
        "cwd",
        "root",
        "fd/0",
        "fd/3",
    ] {
        // A non-dumpable process's /proc files belong to root, which here is the step's
        // own uid: it may list fd/ (numbers only), though not follow an entry.
        if case == Case::BSameUid && nix::unistd::geteuid().is_root() && name == "fd" {
            continue;
        }
        let prefix = format!("{sup} {name} ");
        let line = out.lines().find(|l| l.starts_with(&prefix)).unwrap();
        assert!(line.contains("DENIED"), "{line}");
    }
    println!("CHECKED {}", case.name());
}

/// Runs `inner::<case>` in a new process of this binary, with a fresh secret.
async fn service_secret_unreadable(case: Case) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let secret = format!(
        "kiln-service-secret-{}-{nanos}-{}",
        std::process::id(),
        case.name()
    );
    let name = format!("inner::{}", case.name());
    let out = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &name, "--nocapture", "--test-threads=1", &secret])
        .env(SECRET_ENV, &secret)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let checked = stdout.contains(&format!("CHECKED {}\n", case.name()));
    assert!(
        checked || stderr.contains("SKIPPED: tier"),
        "{stdout}\n{stderr}"
    );
}

mod inner {
    use super::*;

    async fn run_if_service(case: Case) {
        // Only in the re-run process; a no-op in the ordinary run.
        if let Ok(secret) = std::env::var(SECRET_ENV) {
            look_for_secret(case, &secret).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tier_a() {
        run_if_service(Case::A).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tier_b() {
        run_if_service(Case::B).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tier_b_same_uid() {
        run_if_service(Case::BSameUid).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_secret_unreadable_tier_a() {
    service_secret_unreadable(Case::A).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_secret_unreadable_tier_b() {
    service_secret_unreadable(Case::B).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_secret_unreadable_tier_b_same_uid() {
    service_secret_unreadable(Case::BSameUid).await;
}
