//! Helpers shared by the sandbox integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_sandbox::{CommandSpec, Limits, Outcome, Sandbox, SandboxConfig, Tier};

/// A sandbox of the given tier, or None (with the reason printed) when the host cannot
/// provide it. Tier A is required when KILN_SANDBOX_REQUIRE_TIER_A or CI is set.
pub fn sandbox(tier: Tier) -> Option<Sandbox> {
    let config = SandboxConfig {
        force_tier: Some(tier),
        kill_grace: Duration::from_millis(500),
        ..SandboxConfig::default()
    };
    match Sandbox::new(config) {
        Ok(s) => Some(s),
        Err(e) => {
            let required = std::env::var_os("KILN_SANDBOX_REQUIRE_TIER_A").is_some()
                || std::env::var_os("CI").is_some();
            if required {
                panic!("tier {tier} is required here but unavailable: {e}");
            }
            eprintln!("SKIPPED: tier {tier} unavailable on this host: {e}");
            None
        }
    }
}

/// A workspace the sandbox user owns.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new(sandbox: &Sandbox) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-ws-")
            .tempdir()
            .expect("tempdir");
        sandbox
            .prepare_workspace(dir.path())
            .expect("prepare workspace");
        Workspace { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

/// The PATH given to every test step.
pub const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A spec with a PATH, short limits suited to tests.
pub fn spec(ws: &Workspace, argv: &[&str]) -> CommandSpec {
    CommandSpec::new(argv.iter().copied(), ws.path())
        .env("PATH", PATH)
        .limits(Limits {
            wall_timeout: Duration::from_secs(30),
            memory_bytes: Some(512 << 20),
            ..Limits::default()
        })
}

/// `sh -c script`.
pub fn sh(ws: &Workspace, script: &str) -> CommandSpec {
    spec(ws, &["/bin/sh", "-c", script])
}

/// `python3 -c code`.
pub fn py(ws: &Workspace, code: &str) -> CommandSpec {
    spec(ws, &["/usr/bin/python3", "-I", "-S", "-c", code])
}

/// Runs to completion, returning the outcome and the output as strings.
pub async fn run(sandbox: &Sandbox, spec: CommandSpec) -> (Outcome, String, String) {
    let child = sandbox.spawn(spec).await.expect("spawn");
    let (outcome, out, err) =
        tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .expect("the step must end within 120 s");
    (
        outcome,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// Generates `mod name { tier_a, tier_b }` tests from `async fn name(sandbox, tier)`.
/// Multi-threaded runtimes, like the service's: spawning from a process with several
/// threads is what the child code must survive (glibc's set*id wrappers, malloc locks).
#[macro_export]
macro_rules! both_tiers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tier_a() {
                if let Some(s) = $crate::common::sandbox(kiln_sandbox::Tier::A) {
                    super::$name(&s, kiln_sandbox::Tier::A).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tier_b() {
                if let Some(s) = $crate::common::sandbox(kiln_sandbox::Tier::B) {
                    super::$name(&s, kiln_sandbox::Tier::B).await;
                }
            }
        }
    )*};
}

/// Generates a tier A-only test.
#[macro_export]
macro_rules! tier_a_only {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tier_a() {
                if let Some(s) = $crate::common::sandbox(kiln_sandbox::Tier::A) {
                    super::$name(&s, kiln_sandbox::Tier::A).await;
                }
            }
        }
    )*};
}
