//! One `kiln up` per data directory: a second one is refused before it touches anything,
//! and the live suite's builds are unaffected.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cli, Suite};

#[test]
fn a_second_kiln_up_on_a_live_data_directory_is_refused_and_changes_nothing() {
    let suite = Suite::start();
    let cli = Cli::new(&suite);
    cli.login_admin();
    let src = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        src.path().join("slow.py"),
        "import time\nprint('started', flush=True)\ntime.sleep(3)\nprint('done', flush=True)\n",
    )
    .expect("write");
    let id = cli
        .ok(&[
            "build",
            "run",
            "--detach",
            "--from",
            src.path().to_str().expect("utf-8"),
            "--",
            "python3",
            "slow.py",
        ])
        .trim()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: serde_json::Value =
            serde_json::from_str(&cli.ok(&["build", "get", &id, "-o", "json"])).expect("json");
        if got["state"] == "BUILD_STATE_RUNNING" || got["state"] == "RUNNING" {
            break;
        }
        assert!(Instant::now() < deadline, "the build never ran: {got}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Same data directory, another port: it would recover (and so interrupt) the live
    // suite's running build if it got that far.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(suite.data.path())
        .env("KILN_ADMIN_PASSWORD", common::ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln runs");
    // A refusal is immediate; one that serves instead is stopped (this test's own child).
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().expect("wait").is_none() {
        let _ = child.kill();
    }
    let second = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second kiln up must fail");
    assert!(
        stderr.contains("in use by another kiln process")
            && stderr.contains(&format!("pid {}", suite.pid())),
        "the refusal names the holder: {stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&second.stdout).contains("kiln is serving"),
        "it never served"
    );

    // The live suite's build runs to the end with all its output.
    let output = cli.ok(&["build", "watch", &id]);
    assert_eq!(output, "started\ndone\n");
    let got: serde_json::Value =
        serde_json::from_str(&cli.ok(&["build", "get", &id, "-o", "json"])).expect("json");
    let state = got["state"].as_str().unwrap_or_default();
    assert!(state.ends_with("SUCCEEDED"), "{got}");
}
