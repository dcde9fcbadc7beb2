//! `kiln build` from a terminal's point of view: live output on the right streams, exit
//! codes that scripts can use, Ctrl-C, and watching that resumes without repeats.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Cli, Suite};

/// A source directory with the given files.
fn source(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).expect("write");
    }
    dir
}

fn logged_in(suite: &Suite) -> Cli<'_> {
    let cli = Cli::new(suite);
    cli.login_admin();
    cli
}

fn run_build(cli: &Cli<'_>, dir: &std::path::Path, argv: &[&str]) -> std::process::Output {
    let mut args = vec!["build", "run", "--from", dir.to_str().expect("utf-8"), "--"];
    args.extend_from_slice(argv);
    cli.run(&args, "")
}

#[test]
fn exit_codes_follow_the_step() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let dir = source(&[(
        "exit.py",
        "import os, signal, sys\nif sys.argv[1] == 'signal':\n    os.kill(os.getpid(), signal.SIGTERM)\nsys.exit(int(sys.argv[1]))\n",
    )]);
    assert_eq!(
        run_build(&cli, dir.path(), &["python3", "exit.py", "0"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        run_build(&cli, dir.path(), &["python3", "exit.py", "3"])
            .status
            .code(),
        Some(3)
    );
    let killed = run_build(&cli, dir.path(), &["python3", "exit.py", "signal"]);
    assert_eq!(
        killed.status.code(),
        Some(128 + 15),
        "{}",
        String::from_utf8_lossy(&killed.stderr)
    );
}

#[test]
fn stdout_and_stderr_go_to_the_terminals_stdout_and_stderr() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let dir = source(&[(
        "both.py",
        "import sys\nfor i in range(3):\n    print(f'out {i}', flush=True)\n    print(f'err {i}', file=sys.stderr, flush=True)\n",
    )]);
    let output = run_build(&cli, dir.path(), &["python3", "both.py"]);
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "out 0\nout 1\nout 2\n"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errs: Vec<&str> = stderr.lines().filter(|l| l.starts_with("err ")).collect();
    assert_eq!(errs, ["err 0", "err 1", "err 2"], "{stderr}");
    assert!(
        stderr.contains("SUCCEEDED"),
        "the result is reported on stderr: {stderr}"
    );
}

#[test]
fn json_output_is_one_event_per_line() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let dir = source(&[("hi.py", "print('hi')\n")]);
    let output = cli.run(
        &[
            "-o",
            "json",
            "build",
            "run",
            "--from",
            dir.path().to_str().expect("utf-8"),
            "--",
            "python3",
            "hi.py",
        ],
        "",
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let sequences: Vec<u64> = events
        .iter()
        .map(|e| e["sequence"].as_u64().expect("sequence"))
        .collect();
    assert!(
        sequences.windows(2).all(|w| w[1] == w[0] + 1),
        "dense: {sequences:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "output" && e["data"] == "hi\n"),
        "{events:?}"
    );
    assert_eq!(events.last().expect("events")["state"], "SUCCEEDED");
}

/// Starts `kiln ARGS` and returns it with a reader of its stdout lines.
fn spawn_cli(cli: &Cli<'_>, args: &[&str]) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = cli
        .command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

fn sigint(child: &Child) {
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

fn wait(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "kiln did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A step that prints `n` numbered lines, one every `gap` seconds.
const TICKER: &str = "import sys, time\nn, gap = int(sys.argv[1]), float(sys.argv[2])\nfor i in range(n):\n    print(f'line {i}', flush=True)\n    time.sleep(gap)\n";

#[test]
fn ctrl_c_cancels_the_build() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let dir = source(&[("tick.py", TICKER)]);
    let (mut child, lines) = spawn_cli(
        &cli,
        &[
            "build",
            "run",
            "--from",
            dir.path().to_str().expect("utf-8"),
            "--",
            "python3",
            "tick.py",
            "600",
            "0.1",
        ],
    );
    assert_eq!(
        lines
            .recv_timeout(Duration::from_secs(30))
            .expect("first line"),
        "line 0"
    );
    sigint(&child);
    let status = wait(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(130), "a cancelled build exits 130");
    let listed: serde_json::Value =
        serde_json::from_str(&cli.ok(&["-o", "json", "build", "list"])).expect("json");
    assert_eq!(listed["builds"][0]["state"], "CANCELLED", "{listed}");
}

#[test]
fn watch_resumes_where_the_terminal_left_off_without_repeating() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let dir = source(&[("tick.py", TICKER)]);
    let id = cli
        .ok(&[
            "build",
            "run",
            "--detach",
            "--from",
            dir.path().to_str().expect("utf-8"),
            "--",
            "python3",
            "tick.py",
            "12",
            "0.15",
        ])
        .trim()
        .to_owned();

    // Watch a few lines, then Ctrl-C: watching stops, the build goes on.
    let (mut first, lines) = spawn_cli(&cli, &["build", "watch", &id]);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(lines.recv_timeout(Duration::from_secs(30)).expect("a line"));
    }
    sigint(&first);
    // Detaching has its own status (75), distinct from a cancelled build's 130.
    assert_eq!(wait(&mut first, Duration::from_secs(30)).code(), Some(75));
    seen.extend(lines.try_iter());

    // The next watch prints the rest, and only the rest.
    let rest = cli.ok(&["build", "watch", &id]);
    seen.extend(rest.lines().map(str::to_owned));
    let expected: Vec<String> = (0..12).map(|i| format!("line {i}")).collect();
    assert_eq!(seen, expected, "every line exactly once, in order");
}

#[test]
fn a_finished_build_can_be_watched_again_from_the_start() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let dir = source(&[("tick.py", TICKER)]);
    let id = cli
        .ok(&[
            "build",
            "run",
            "--detach",
            "--from",
            dir.path().to_str().expect("utf-8"),
            "--",
            "python3",
            "tick.py",
            "3",
            "0",
        ])
        .trim()
        .to_owned();
    let first = cli.ok(&["build", "watch", &id]);
    assert_eq!(first, "line 0\nline 1\nline 2\n");
    let again = cli.ok(&["build", "watch", "--from-start", &id]);
    assert_eq!(again, first);
}

#[test]
fn a_terminal_gets_a_status_line_and_a_pipe_gets_plain_lines() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let dir = source(&[("tick.py", TICKER)]);
    let dir_arg = dir.path().to_str().expect("utf-8");
    // Under a pseudo-terminal (util-linux `script`), stderr carries the status line.
    let inner = format!(
        "{} build run --from {dir_arg} -- python3 tick.py 3 0.6",
        env!("CARGO_BIN_EXE_kiln")
    );
    let tty = std::process::Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .env("KILN_ENDPOINT", &suite.endpoint)
        .env("KILN_CA", suite.pki().ca_cert())
        .env("KILN_CONFIG_DIR", cli.config_dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("script runs");
    let screen = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{screen}");
    assert!(
        screen.contains("[step 1/1 · 00:0"),
        "a status line with step and time: {screen:?}"
    );
    assert!(screen.contains("RUNNING]"), "and the state: {screen:?}");

    // Through a pipe: no escape codes, just the output and the result line.
    let plain = run_build(&cli, dir.path(), &["python3", "tick.py", "2", "0"]);
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(
        !err.contains('\x1b'),
        "no terminal codes in a pipe: {err:?}"
    );
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "line 0\nline 1\n");
}
