//! Where `kiln up` takes the bootstrap admin's password from: the environment or a file,
//! never a flag's value (a command line is readable by every process on the host,
//! builds included, through `/proc/<pid>/cmdline`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ADMIN_PASSWORD, Suite};

/// Runs `kiln up` with `args` expecting it to refuse to start; kills it (by its pid)
/// and fails if it is still running after 60 s.
fn refused(args: &[&str], env_password: bool) -> String {
    let data = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .args(args)
        .env_remove("KILN_ADMIN_PASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if env_password {
        command.env("KILN_ADMIN_PASSWORD", ADMIN_PASSWORD);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("kiln up {args:?} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    stderr
}

#[test]
fn a_password_on_the_command_line_is_refused() {
    let stderr = refused(&["--admin-password", ADMIN_PASSWORD], false);
    assert!(stderr.contains("--admin-password"), "{stderr}");
    assert!(stderr.contains("unexpected argument"), "{stderr}");
}

#[test]
fn both_a_password_file_and_the_environment_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, ADMIN_PASSWORD).unwrap();
    let stderr = refused(&["--admin-password-file", file.to_str().unwrap()], true);
    assert!(stderr.contains("not both"), "{stderr}");
}

#[test]
fn an_empty_password_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, "\n").unwrap();
    let stderr = refused(&["--admin-password-file", file.to_str().unwrap()], false);
    assert!(stderr.contains("holds no admin password"), "{stderr}");
}

#[tokio::test]
async fn the_password_comes_from_a_file() {
    let suite = Suite::start_with_password_file();
    suite
        .login("admin", ADMIN_PASSWORD)
        .await
        .expect("the admin logs in with the file's password");
    // Nothing was generated: the file's password is the admin's.
    assert!(!suite.data.path().join("auth/admin-password").exists());
}
