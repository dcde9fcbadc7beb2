//! `kiln build run|watch|cancel` as a person at a terminal meets them (issue 11, items
//! 1, 2, 6, 7): a status line that never erases the program's output, a build that
//! survives a cut connection, `| head`, and Ctrl-C and cancel messages that say what
//! really happened.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cli, Suite};
use kiln_proto::build as pb;
use kiln_proto::build::build_event::Event;
use kiln_proto::build::build_service_client::BuildServiceClient;

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

fn utf8(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Lines of a child's pipe, read on their own thread.
fn lines_of(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// `kiln ARGS` with stdout and stderr each read line by line.
fn spawn(command: &mut Command) -> (Child, Receiver<String>, Receiver<String>) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln starts");
    let out = lines_of(child.stdout.take().expect("stdout"));
    let err = lines_of(child.stderr.take().expect("stderr"));
    (child, out, err)
}

/// Waits for a line satisfying `pred`, returning it; the lines before it are kept in
/// `seen`.
fn expect_line(
    rx: &Receiver<String>,
    seen: &mut Vec<String>,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if pred(&line) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no such line within 60 s; saw {seen:?}"),
        }
    }
}

fn sigint(child: &Child) {
    let status = Command::new("kill")
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

/// `kiln ARGS` under a pseudo-terminal (util-linux `script`): everything it wrote to
/// the terminal, escape codes included.
fn on_a_terminal(cli: &Cli<'_>, args: &str, env: &[(&str, &str)]) -> String {
    let inner = format!("{} {args}", env!("CARGO_BIN_EXE_kiln"));
    let mut command = Command::new("script");
    command
        .args(["-qec", &inner, "/dev/null"])
        .env("KILN_ENDPOINT", &cli.suite.endpoint)
        .env("KILN_CA", cli.suite.pki().ca_cert())
        .env("KILN_CONFIG_DIR", cli.config_dir.path())
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .env_remove("KILN_PROGRESS")
        .stdin(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().expect("script runs");
    let screen = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{screen}");
    screen
}

/// A unittest-like step: the start of a line, a pause longer than the status line's
/// clock tick, then the end of it.
const HALF_LINE: &str = "import sys, time\nsys.stdout.write('test_add (test_calc.T.test_add) ... ')\nsys.stdout.flush()\ntime.sleep(2.5)\nprint('ok', flush=True)\nprint('done', flush=True)\n";
const PENDING: &str = "test_add (test_calc.T.test_add) ... ";

#[test]
fn the_status_line_never_erases_an_unfinished_line() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let dir = source(&[("half.py", HALF_LINE)]);
    let screen = on_a_terminal(
        &cli,
        &format!("build run --from {} -- python3 half.py", utf8(dir.path())),
        &[],
    );
    let start = screen.find(PENDING).unwrap_or_else(|| panic!("{screen:?}")) + PENDING.len();
    let end = screen[start..]
        .find("ok")
        .unwrap_or_else(|| panic!("{screen:?}"))
        + start;
    // Between the half line and its end nothing may move the cursor back over it.
    let between = &screen[start..end];
    assert!(
        !between.contains('\r') && !between.contains("\x1b[2K"),
        "the half-printed line was erased: {between:?} in {screen:?}"
    );
    assert!(
        screen.contains(&format!("{PENDING}ok")),
        "the line reads as the program wrote it: {screen:?}"
    );
    // The status line is still there, on lines of its own.
    assert!(screen.contains("[step 1/1 · 00:0"), "{screen:?}");
}

#[test]
fn progress_honours_no_color_dumb_terminals_and_the_switch() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let dir = source(&[("half.py", HALF_LINE.replace("2.5", "1.2").as_str())]);
    let run = format!("build run --from {} -- python3 half.py", utf8(dir.path()));

    let no_color = on_a_terminal(&cli, &run, &[("NO_COLOR", "1")]);
    assert!(no_color.contains("[step 1/1 · "), "{no_color:?}");
    assert!(
        !no_color.contains("\x1b[2m") && !no_color.contains("\x1b[1m"),
        "NO_COLOR: no colours or weights: {no_color:?}"
    );

    let dumb = on_a_terminal(&cli, &run, &[("TERM", "dumb")]);
    assert!(
        !dumb.contains('\x1b'),
        "TERM=dumb: no escape codes: {dumb:?}"
    );
    assert!(
        dumb.contains("kiln: RUNNING"),
        "plain progress lines: {dumb:?}"
    );
    assert!(dumb.contains("▶ python3 half.py"), "{dumb:?}");

    let never = on_a_terminal(
        &cli,
        &format!(
            "build run --progress never --from {} -- python3 half.py",
            utf8(dir.path())
        ),
        &[],
    );
    assert!(!never.contains('\x1b'), "--progress never: {never:?}");
    assert!(!never.contains("[step"), "{never:?}");
    assert!(never.contains(&format!("{PENDING}ok")), "{never:?}");

    // Through a pipe, `plain` still says what happens, without codes.
    let plain = cli.run(
        &[
            "build",
            "run",
            "--progress",
            "plain",
            "--from",
            utf8(dir.path()),
            "--",
            "python3",
            "half.py",
        ],
        "",
    );
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(plain.status.success(), "{err}");
    assert!(!err.contains('\x1b'), "{err:?}");
    assert!(
        err.contains("kiln: RUNNING") && err.contains("▶ python3 half.py"),
        "{err}"
    );
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        format!("{PENDING}ok\ndone\n")
    );
}

/// A TCP relay to the suite whose connections can all be cut at once, as a flaky
/// network or a restarting proxy would; new connections go through again afterwards.
struct CutProxy {
    endpoint: String,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl CutProxy {
    fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("https://{}", listener.local_addr().expect("addr"));
        let open = Arc::new(Mutex::new(Vec::new()));
        let conns = open.clone();
        let target = target.to_owned();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let mut list = conns.lock().expect("lock");
                list.push(client.try_clone().expect("clone"));
                list.push(server.try_clone().expect("clone"));
                drop(list);
                for (mut from, mut to) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    ),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self { endpoint, open }
    }

    /// Drops every connection open now.
    fn cut(&self) {
        for stream in self.open.lock().expect("lock").drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

const TICKER: &str = "import sys, time\nn, gap = int(sys.argv[1]), float(sys.argv[2])\nfor i in range(n):\n    print(f'line {i}', flush=True)\n    time.sleep(gap)\n";

#[test]
fn a_cut_connection_says_so_and_the_build_is_followed_to_its_end() {
    let suite = Suite::start();
    let cli = Cli::new(&suite);
    let proxy = CutProxy::start(&suite.addr);
    // Logins are kept per endpoint: log in through the proxy.
    let mut login = cli
        .command(&["login", "--username", "admin", "--password-stdin"])
        .env("KILN_ENDPOINT", &proxy.endpoint)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("kiln login");
    std::io::Write::write_all(
        &mut login.stdin.take().expect("stdin"),
        format!("{}\n", common::ADMIN_PASSWORD).as_bytes(),
    )
    .expect("password");
    assert!(login.wait().expect("login ends").success());
    let dir = source(&[("tick.py", TICKER)]);
    let (mut child, out, err) = spawn(
        cli.command(&[
            "build",
            "run",
            "--from",
            utf8(dir.path()),
            "--",
            "python3",
            "tick.py",
            "30",
            "0.1",
        ])
        .env("KILN_ENDPOINT", &proxy.endpoint),
    );
    let mut stderr = Vec::new();
    // The new workspace's id and the build's id come first, before any output.
    let first = expect_line(&err, &mut stderr, |l| l.starts_with("build "));
    let id = first.trim_start_matches("build ").to_owned();
    assert_eq!(id.len(), 36, "a build id: {first:?}");
    assert!(
        stderr
            .iter()
            .any(|l| l.starts_with("workspace ") && l.len() == 46),
        "the workspace's id before the build's: {stderr:?}"
    );
    let mut stdout = Vec::new();
    stdout.push(expect_line(&out, &mut Vec::new(), |l| l == "line 2"));
    proxy.cut();
    expect_line(&err, &mut stderr, |l| {
        l == format!("kiln: connection lost; build {id} continues — kiln build watch {id}")
    });
    let status = wait(&mut child, Duration::from_secs(60));
    stdout.extend(out.try_iter());
    stderr.extend(err.try_iter());
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    let expected: Vec<String> = (2..30).map(|i| format!("line {i}")).collect();
    assert_eq!(stdout, expected, "every line once, in order: {stderr:?}");
    assert!(
        stderr
            .iter()
            .any(|l| l.starts_with(&format!("build {id} SUCCEEDED"))),
        "{stderr:?}"
    );
}

#[tokio::test]
async fn run_build_names_its_build_in_a_header_and_in_the_first_event() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let dir = source(&[("tick.py", TICKER)]);
    let created = cli.ok(&[
        "-o",
        "json",
        "workspace",
        "create",
        "--from",
        utf8(dir.path()),
    ]);
    let workspace: serde_json::Value = serde_json::from_str(&created).expect("json");
    let token = suite.admin_token().await;
    let mut client = BuildServiceClient::new(suite.channel_as(&token).await);
    let response = client
        .run_build(pb::StartBuildRequest {
            request_id: "header-test".into(),
            workspace_id: workspace["id"].as_str().expect("id").to_owned(),
            steps: vec![pb::Step {
                argv: vec!["python3".into(), "tick.py".into(), "1".into(), "0".into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .expect("RunBuild");
    let header = response
        .metadata()
        .get("kiln-build-id")
        .expect("kiln-build-id header")
        .to_str()
        .expect("ascii")
        .to_owned();
    let mut stream = response.into_inner();
    let first = stream.message().await.expect("stream").expect("an event");
    assert_eq!(first.sequence, 1);
    match first.event {
        Some(Event::Queued(q)) => assert_eq!(q.build_id, header),
        other => panic!("the first event is Queued: {other:?}"),
    }
    let build = client
        .get_build(pb::GetBuildRequest {
            build_id: header.clone(),
        })
        .await
        .expect("the header names a real build")
        .into_inner();
    assert_eq!(build.id, header);
}

/// A step that ignores SIGTERM, so only SIGKILL after the grace ends it.
const STUBBORN: &str = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(120)\n";

#[test]
fn ctrl_c_twice_says_the_build_was_asked_to_cancel_and_detach_exits_75() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let dir = source(&[("stubborn.py", STUBBORN)]);
    let (mut child, out, err) = spawn(&mut cli.command(&[
        "build",
        "run",
        "--grace",
        "3s",
        "--from",
        utf8(dir.path()),
        "--",
        "python3",
        "stubborn.py",
    ]));
    let mut stderr = Vec::new();
    let id = expect_line(&err, &mut stderr, |l| l.starts_with("build "))
        .trim_start_matches("build ")
        .to_owned();
    expect_line(&out, &mut Vec::new(), |l| l == "ready");
    sigint(&child);
    expect_line(&err, &mut stderr, |l| {
        l == format!(
            "cancel requested for build {id}: SIGTERM sent, SIGKILL in 3 s (Ctrl-C again to detach)…"
        )
    });
    sigint(&child);
    let status = wait(&mut child, Duration::from_secs(30));
    stderr.extend(err.try_iter());
    assert_eq!(status.code(), Some(75), "{stderr:?}");
    let last = stderr.last().expect("a message");
    assert!(
        last.starts_with(&format!(
            "detached; build {id} was asked to cancel and ends on its own"
        )) && last.ends_with(&format!("kiln build watch {id}")),
        "{stderr:?}"
    );
    assert!(!last.contains("goes on"), "it does not go on: {last}");
}

#[test]
fn cancel_uses_the_configured_kill_grace_and_says_when_sigkill_follows() {
    let config = tempfile::tempdir().expect("tempdir");
    let file = config.path().join("kiln.toml");
    std::fs::write(&file, "[build.sandbox]\nkill_grace = \"1s\"\n").expect("write");
    let suite = Suite::start_with(&["--config", utf8(&file)]);
    let cli = logged_in(&suite);
    let dir = source(&[("stubborn.py", STUBBORN)]);
    let id = cli
        .ok(&[
            "build",
            "run",
            "--detach",
            "--from",
            utf8(dir.path()),
            "--",
            "python3",
            "stubborn.py",
        ])
        .trim()
        .to_owned();
    let (mut watcher, out, err) = spawn(&mut cli.command(&["build", "watch", &id]));
    expect_line(&out, &mut Vec::new(), |l| l == "ready");

    let asked = Instant::now();
    let said = cli.ok(&["build", "cancel", &id]);
    assert_eq!(
        said.trim(),
        format!("cancel requested: SIGTERM sent, SIGKILL in 1 s (build {id})")
    );
    let status = wait(&mut watcher, Duration::from_secs(30));
    let took = asked.elapsed();
    let stderr: Vec<String> = err.try_iter().collect();
    assert_eq!(status.code(), Some(130), "{stderr:?}");
    // The configured 1 s, not the 10 s that used to be hard-wired.
    assert!(took < Duration::from_secs(6), "cancel took {took:?}");
    assert!(
        stderr.iter().all(|l| !l.contains("CancelBuild")),
        "no RPC names in messages: {stderr:?}"
    );
    assert!(
        stderr.iter().any(|l| l.contains("cancelled on request")),
        "{stderr:?}"
    );

    // Cancelling it again says it is over.
    let again = cli.ok(&["build", "cancel", &id]);
    assert_eq!(again.trim(), format!("build {id} is cancelled"));
}

#[test]
fn a_closed_stdout_ends_quietly_with_141() {
    let suite = Suite::start();
    let cli = logged_in(&suite);
    let dir = source(&[("many.py", "for i in range(200000):\n    print('line', i)\n")]);
    // `kiln build run … | head -1`: the reader goes away after one line.
    let mut child = cli
        .command(&[
            "build",
            "run",
            "--from",
            utf8(dir.path()),
            "--",
            "python3",
            "many.py",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln starts");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("a line");
    assert_eq!(first, "line 0\n");
    drop(stdout);
    let output = child.wait_with_output().expect("kiln ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(141), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("kiln:"),
        "{stderr}"
    );

    // A command that prints with println! into a pipe already closed.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let output = cli
        .command(&["build", "list"])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("kiln runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
