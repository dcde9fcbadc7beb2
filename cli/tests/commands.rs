//! The commands of issue 11 item 9 against a live suite, as a user types them:
//! `version`, `completion`, client `config view|set|unset`, `passwd`, `users` by name
//! with a no-echo prompt (on a real pseudo-terminal), `build logs`, `build policy`,
//! least-role API keys, the KILN_TOKEN warning and the `list`/`ls`, `delete`/`rm` verbs.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ADMIN_PASSWORD, Cli, Offline, Suite};
use kiln_proto::auth::Role;
use serde_json::Value;

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A CLI logged in as `username` with `password`.
fn logged_in_as<'a>(suite: &'a Suite, username: &str, password: &str) -> Cli<'a> {
    let cli = Cli::new(suite);
    let out = cli.run(
        &["login", "--username", username, "--password-stdin"],
        &format!("{password}\n"),
    );
    assert!(out.status.success(), "login: {}", stderr(&out));
    cli
}

fn admin(suite: &Suite) -> Cli<'_> {
    logged_in_as(suite, "admin", ADMIN_PASSWORD)
}

/// Polls `check` until it holds or `timeout` passes (the check is the synchronisation).
fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn version_names_the_client_and_the_server() {
    let suite = Suite::start();
    let cli = Cli::new(&suite);
    let version = env!("CARGO_PKG_VERSION");
    // No login needed: the version comes with any answer of the server.
    let out = cli.ok(&["version"]);
    assert_eq!(
        out,
        format!(
            "client: kiln {version}\nserver: kiln {version} at {}\n",
            suite.endpoint
        )
    );
    let out = json(&cli.ok(&["version", "-o", "json"]));
    assert_eq!(out["client"]["version"], version);
    assert_eq!(out["server"]["version"], version);
    assert_eq!(out["server"]["endpoint"], suite.endpoint.as_str());

    // A server that cannot be reached: the client's version, then the reason, exit 1.
    let unreachable = cli
        .command(&["version"])
        .env("KILN_ENDPOINT", "https://127.0.0.1:1")
        .output()
        .expect("kiln runs");
    assert_eq!(unreachable.status.code(), Some(1));
    assert_eq!(stdout(&unreachable), format!("client: kiln {version}\n"));
    assert!(
        stderr(&unreachable).contains("127.0.0.1:1"),
        "{}",
        stderr(&unreachable)
    );
    // --client never tries.
    let client_only = cli
        .command(&["version", "--client"])
        .env("KILN_ENDPOINT", "https://127.0.0.1:1")
        .output()
        .expect("kiln runs");
    assert!(client_only.status.success());
    assert_eq!(stdout(&client_only), format!("client: kiln {version}\n"));
}

#[test]
fn bash_completes_commands_and_flags() {
    let script = Offline
        .command(&["completion", "bash"])
        .output()
        .expect("kiln");
    assert!(script.status.success());
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kiln.bash");
    std::fs::write(&file, &script.stdout).expect("script written");
    // What bash offers after `kiln bu<TAB>` and `kiln build logs --t<TAB>`.
    let complete = |words: &str| {
        let probe = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             COMP_LINE=\"{words}\"; COMP_POINT=${{#COMP_LINE}}; \
             _kiln kiln \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file.display()
        );
        let out = Command::new("bash")
            .args(["--norc", "-c", &probe])
            .output()
            .expect("bash runs");
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(complete("kiln bu").trim(), "build");
    let flags = complete("kiln build logs --t");
    assert!(flags.contains("--timestamps"), "{flags}");
    assert!(flags.contains("--tail"), "{flags}");

    for shell in ["zsh", "fish"] {
        let out = Offline
            .command(&["completion", shell])
            .output()
            .expect("kiln");
        assert!(out.status.success());
        assert!(stdout(&out).contains("passwd"), "{shell}: {}", stdout(&out));
    }
    // fish can be asked what it would complete, where it is installed.
    if Command::new("fish").arg("--version").output().is_ok() {
        let zfile = dir.path().join("kiln.fish");
        let out = Offline
            .command(&["completion", "fish"])
            .output()
            .expect("kiln");
        std::fs::write(&zfile, &out.stdout).expect("written");
        let probe = format!("source {}; complete -C 'kiln pass'", zfile.display());
        let out = Command::new("fish")
            .args(["-c", &probe])
            .output()
            .expect("fish");
        assert!(stdout(&out).starts_with("passwd"), "{}", stdout(&out));
    } else {
        eprintln!("fish is not installed: the fish script is checked only for its content");
    }
    let bad = Offline
        .command(&["completion", "tcsh"])
        .output()
        .expect("kiln");
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("bash, zsh, fish"), "{}", stderr(&bad));
}

#[test]
fn client_config_view_set_unset_and_unknown_keys() {
    let suite = Suite::start();
    let cli = Cli::new(&suite);
    let file = cli.config_dir.path().join("config.toml");
    // The suite's endpoint and CA from the file, not the environment.
    let plain = |args: &[&str]| {
        cli.command(args)
            .env_remove("KILN_ENDPOINT")
            .env_remove("KILN_CA")
            .stdin(Stdio::null())
            .output()
            .expect("kiln runs")
    };
    let ca = suite.pki().ca_cert();
    for (key, value) in [
        ("endpoint", suite.endpoint.as_str()),
        ("ca_file", ca.to_str().expect("utf-8")),
        ("output", "json"),
    ] {
        let out = plain(&["config", "set", key, value]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(
            stdout(&out),
            format!("{key} = {value} (in {})\n", file.display())
        );
    }
    let view = plain(&["config", "view"]);
    let view = json(&stdout(&view));
    assert_eq!(
        view["settings"]["endpoint"]["value"],
        suite.endpoint.as_str()
    );
    assert_eq!(view["settings"]["endpoint"]["source"], "config file");
    assert_eq!(view["settings"]["output"]["value"], "json");
    // The file's settings are used: this reaches the suite and prints JSON.
    let health = plain(&["health"]);
    assert!(health.status.success(), "{}", stderr(&health));
    assert_eq!(json(&stdout(&health))["(overall)"], "SERVING");

    // A flag wins, and view says so.
    let view = plain(&["config", "view", "-o", "text"]);
    let text = stdout(&view);
    assert!(text.contains("output:   text  (flag)"), "{text}");
    assert!(
        text.contains(&format!("endpoint: {}  (config file)", suite.endpoint)),
        "{text}"
    );

    // Bad values are refused and leave the file alone.
    let before = std::fs::read_to_string(&file).expect("file");
    let not_pem = cli.config_dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").expect("written");
    for (args, says) in [
        (
            vec!["config", "set", "endpont", "x"],
            "unknown client setting \"endpont\": the settings are endpoint, ca_file, output",
        ),
        (
            vec!["config", "set", "endpoint", "ftp://host:21"],
            "the scheme must be https",
        ),
        (
            vec!["config", "set", "ca_file", not_pem.to_str().expect("utf-8")],
            "is not a PEM certificate",
        ),
        (
            vec!["config", "set", "output", "xml"],
            "\"xml\" is not an output format",
        ),
        (
            vec!["config", "unset", "colour"],
            "unknown client setting \"colour\"",
        ),
    ] {
        let out = plain(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(std::fs::read_to_string(&file).expect("file"), before);

    let out = plain(&["config", "unset", "output"]);
    assert!(out.status.success());
    let view = plain(&["config", "view"]);
    assert!(
        stdout(&view).contains("output:   text  (default)"),
        "{}",
        stdout(&view)
    );

    // An unknown key written by hand stops every client command, naming the key.
    std::fs::write(&file, format!("{before}endpont = \"https://x\"\n")).expect("written");
    for args in [&["health"][..], &["config", "view"], &["whoami"]] {
        let out = plain(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("unknown field `endpont`"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_get_the_least_role_and_never_more_than_the_creator() {
    let suite = Suite::start();
    let password = suite.create_user("alice", Role::User).await;
    let alice = logged_in_as(&suite, "alice", &password);

    // No --role: a viewer key, the least.
    let created = json(&alice.ok(&["keys", "create", "ci", "-o", "json"]));
    assert_eq!(created["api_key"]["role"], "viewer");
    let viewer_key = created["key"].as_str().expect("secret").to_owned();

    // Asking for more than alice has is refused, with the reason.
    let out = alice.run(&["keys", "create", "root", "--role", "admin"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("API_KEY_ROLE_TOO_HIGH"),
        "{}",
        stderr(&out)
    );

    // The viewer key tries to mint a user key for its owner: refused as well.
    let with_key = |args: &[&str]| {
        alice
            .command(args)
            .env("KILN_TOKEN", &viewer_key)
            .stdin(Stdio::null())
            .output()
            .expect("kiln runs")
    };
    let out = with_key(&["keys", "create", "escalate", "--role", "user"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("API_KEY_ROLE_TOO_HIGH"),
        "{}",
        stderr(&out)
    );
    // And the viewer key cannot build.
    let out = with_key(&["workspace", "create"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("PERMISSION_DENIED") || stderr(&out).contains("role"),
        "{}",
        stderr(&out)
    );

    // KILN_TOKEN over a saved login: a warning naming the login it overrides.
    let out = with_key(&["whoami", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&stdout(&out))["auth_method"], "AUTH_METHOD_API_KEY");
    assert!(
        stderr(&out)
            .contains("warning: KILN_TOKEN is set: using it instead of the saved login of alice"),
        "{}",
        stderr(&out)
    );
    // No saved login: nothing to warn about.
    let fresh = Cli::new(&suite);
    let out = fresh
        .command(&["whoami"])
        .env("KILN_TOKEN", &viewer_key)
        .output()
        .expect("kiln runs");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));

    // --role user is honoured; `keys ls` and `keys rm` are the list and revoke verbs.
    let user_key = json(&alice.ok(&["keys", "create", "builder", "--role", "user", "-o", "json"]));
    assert_eq!(user_key["api_key"]["role"], "user");
    let id = user_key["api_key"]["id"].as_str().expect("id").to_owned();
    assert!(alice.ok(&["keys", "ls"]).contains("builder"));
    alice.ok(&["keys", "rm", &id]);
    assert!(!alice.ok(&["keys", "list"]).contains("builder"));
}

/// The output of the pseudo-terminal so far, as text.
fn screen(buffer: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&buffer.lock().expect("lock")).into_owned()
}

/// `kiln ARGS` on a real pseudo-terminal that is its controlling terminal (so that a
/// no-echo prompt opens it as /dev/tty), typing each of `answers` once the screen shows
/// its prompt and the terminal's echo is off. Returns the exit code and the screen.
fn on_a_terminal(cli: &Cli<'_>, args: &[&str], answers: &[(&str, &str)]) -> (i32, String) {
    use nix::sys::termios::{LocalFlags, tcgetattr};
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave: OwnedFd = pty.slave;
    let mut command = Command::new("setsid");
    // setsid --ctty makes the pty (its stdin) the controlling terminal of the new session.
    command
        .args(["--ctty", "--wait", env!("CARGO_BIN_EXE_kiln")])
        .args(args)
        .env("KILN_ENDPOINT", &cli.suite.endpoint)
        .env("KILN_CA", cli.suite.pki().ca_cert())
        .env("KILN_CONFIG_DIR", cli.config_dir.path())
        .env_remove("KILN_TOKEN")
        .env_remove("KILN_OUTPUT")
        .stdin(slave.try_clone().expect("dup"))
        .stdout(slave.try_clone().expect("dup"))
        .stderr(slave.try_clone().expect("dup"));
    let mut child = command.spawn().expect("setsid runs (util-linux)");
    // The command holds copies of the terminal: the reader sees its end (EIO) only
    // once every copy but the one kept for tcgetattr is closed.
    drop(command);
    let mut master = std::fs::File::from(pty.master);
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let mut master = master.try_clone().expect("dup");
        let buffer = buffer.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            // EIO once the last process holding the terminal has closed it.
            while let Ok(n) = master.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buffer.lock().expect("lock").extend_from_slice(&chunk[..n]);
            }
        })
    };
    for (typed, (prompt, answer)) in answers.iter().enumerate() {
        eventually(Duration::from_secs(20), prompt, || {
            screen(&buffer).matches(prompt).count()
                > answers[..typed].iter().filter(|(p, _)| p == prompt).count()
        });
        eventually(Duration::from_secs(20), "the terminal's echo off", || {
            !tcgetattr(slave.as_fd())
                .expect("tcgetattr")
                .local_flags
                .contains(LocalFlags::ECHO)
        });
        master
            .write_all(format!("{answer}\n").as_bytes())
            .expect("typed");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kiln {args:?} did not end; the terminal shows {:?}",
                screen(&buffer)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(slave);
    drop(master);
    reader.join().expect("reader");
    (status.code().unwrap_or(-1), screen(&buffer))
}

#[tokio::test(flavor = "multi_thread")]
async fn users_are_managed_by_name_with_a_password_prompt_that_does_not_echo() {
    let suite = Suite::start();
    let cli = admin(&suite);
    let secret = "carol-secret-password-1";
    let (code, screen) = on_a_terminal(
        &cli,
        &["users", "create", "carol", "--role", "viewer"],
        &[
            ("password for carol: ", secret),
            ("again, to confirm: ", secret),
        ],
    );
    assert_eq!(code, 0, "{screen}");
    assert!(
        !screen.contains(secret),
        "the password was echoed: {screen:?}"
    );
    assert!(screen.contains("user carol (viewer) created"), "{screen}");
    suite.login("carol", secret).await.expect("carol logs in");

    // Two different passwords: nothing is created.
    let (code, screen) = on_a_terminal(
        &cli,
        &["users", "create", "dave"],
        &[
            ("password for dave: ", "dave-password-123"),
            ("again, to confirm: ", "dave-password-124"),
        ],
    );
    assert_eq!(code, 1, "{screen}");
    assert!(screen.contains("the two passwords differ"), "{screen}");
    assert!(!cli.ok(&["users", "ls"]).contains("dave"));

    // update and delete take the username (or the id).
    let out = cli.ok(&["users", "update", "carol", "--role", "user"]);
    assert_eq!(out, "user carol updated: role user, active\n");
    let out = cli.ok(&["users", "update", "CAROL", "--disable"]);
    assert_eq!(out, "user carol updated: role user, disabled\n");
    let listed = json(&cli.ok(&["users", "list", "--all", "-o", "json"]));
    let carol = listed
        .as_array()
        .expect("array")
        .iter()
        .find(|u| u["username"] == "carol")
        .expect("carol listed")
        .clone();
    let id = carol["id"].as_str().expect("id");
    cli.ok(&["users", "update", id, "--enable"]);
    let out = cli.run(
        &["users", "update", "carol", "--password-stdin"],
        "carol-new-password-2\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    suite
        .login("carol", "carol-new-password-2")
        .await
        .expect("reset password works");

    let out = cli.run(&["users", "delete", "nobody"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no user \"nobody\""),
        "{}",
        stderr(&out)
    );
    let out = cli.ok(&["users", "rm", "carol"]);
    assert_eq!(out, format!("user carol ({id}) deleted\n"));
    suite
        .login("carol", "carol-new-password-2")
        .await
        .expect_err("carol is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn passwd_checks_the_current_password_and_ends_the_other_sessions() {
    let suite = Suite::start();
    let password = suite.create_user("erin", Role::User).await;
    let here = logged_in_as(&suite, "erin", &password);
    let elsewhere = logged_in_as(&suite, "erin", &password);

    // A wrong current password (a thief at an unlocked terminal) changes nothing.
    let out = here.run(
        &["passwd", "--password-stdin"],
        "not-the-password\nstolen-password-1\n",
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "kiln: the current password is wrong; the password was not changed\n"
    );
    elsewhere.ok(&["whoami"]);
    suite
        .login("erin", &password)
        .await
        .expect("old password still works");

    // On a terminal: asked without echo, the new one twice.
    let new_password = "erin-new-password-42";
    let (code, screen) = on_a_terminal(
        &here,
        &["passwd"],
        &[
            ("current password: ", &password),
            ("new password: ", new_password),
            ("again, to confirm: ", new_password),
        ],
    );
    assert_eq!(code, 0, "{screen}");
    assert!(
        !screen.contains(new_password) && !screen.contains(&password),
        "{screen:?}"
    );
    assert!(
        // `elsewhere` and the test's own login above.
        screen.contains("password of erin changed; 2 other session(s) ended, this login stays"),
        "{screen}"
    );
    here.ok(&["whoami"]);
    // The other session's access token stops working within the revocation bound.
    eventually(Duration::from_secs(15), "the other session to end", || {
        !elsewhere.run(&["whoami"], "").status.success()
    });
    suite
        .login("erin", &password)
        .await
        .expect_err("old password gone");
    suite
        .login("erin", new_password)
        .await
        .expect("new password works");
}

/// A build printing to both streams, the last line unfinished.
const CHATTY: &str = "import sys\nfor i in range(5):\n    print('out', i, flush=True)\n    print('err', i, file=sys.stderr, flush=True)\nsys.stdout.write('partial')\n";

/// Prints a line, then waits; SIGTERM (a cancel) makes it print its last line and end.
const WAITING: &str = "import signal, sys, time\ndef bye(*_):\n    print('last', flush=True)\n    sys.exit(0)\nsignal.signal(signal.SIGTERM, bye)\nprint('first', flush=True)\nwhile True:\n    time.sleep(0.1)\n";

fn source(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("written");
    }
    dir
}

#[test]
fn build_logs_print_what_a_build_wrote() {
    let suite = Suite::start();
    let cli = admin(&suite);
    let dir = source(&[("chatty.py", CHATTY)]);
    let dir_arg = dir.path().to_str().expect("utf-8");
    let run = cli.run(
        &[
            "build",
            "run",
            "--from",
            dir_arg,
            "--",
            "python3",
            "chatty.py",
        ],
        "",
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let id = stderr(&run)
        .lines()
        .find_map(|l| l.strip_prefix("build "))
        .expect("build id printed")
        .to_owned();

    let logs = cli.run(&["build", "logs", &id], "");
    assert!(logs.status.success());
    assert_eq!(stdout(&logs), "out 0\nout 1\nout 2\nout 3\nout 4\npartial");
    assert_eq!(stderr(&logs), "err 0\nerr 1\nerr 2\nerr 3\nerr 4\n");

    let only_err = cli.run(&["build", "logs", &id, "--stream", "stderr"], "");
    assert_eq!(stdout(&only_err), "");
    assert_eq!(stderr(&only_err), "err 0\nerr 1\nerr 2\nerr 3\nerr 4\n");

    // The last 3 lines of stdout, the unfinished one included.
    let tail = cli.run(
        &["build", "logs", &id, "--tail", "3", "--stream", "stdout"],
        "",
    );
    assert_eq!(stdout(&tail), "out 3\nout 4\npartial");
    // Across both streams the two pipes' order is the sandbox's to choose: the last
    // 2 lines are the unfinished one and whichever of `out 4`/`err 4` came last.
    let tail = cli.run(&["build", "logs", &id, "--tail", "2"], "");
    let (out, err) = (stdout(&tail), stderr(&tail));
    assert!(out.ends_with("partial"), "{out:?}");
    assert!(
        (out == "partial" && err == "err 4\n") || (out == "out 4\npartial" && err.is_empty()),
        "{out:?} {err:?}"
    );

    // Timestamps start each line (the unfinished one too), UTC with milliseconds.
    let stamped = cli.run(
        &["build", "logs", &id, "--timestamps", "--stream", "stdout"],
        "",
    );
    let text = stdout(&stamped);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    assert_eq!(lines.len(), 6, "{text}");
    for (line, expected) in lines.iter().zip([
        "out 0\n", "out 1\n", "out 2\n", "out 3\n", "out 4\n", "partial",
    ]) {
        let (stamp, rest) = line.split_once(' ').expect("a stamp");
        assert_eq!(rest, expected);
        assert_eq!(stamp.len(), "2026-12-02T01:50:23.123Z".len(), "{stamp}");
        assert!(
            stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "{stamp}"
        );
    }

    // JSON: one object per chunk, with stream and time.
    let as_json = cli.ok(&["build", "logs", &id, "--stream", "stderr", "-o", "json"]);
    let first: Value = serde_json::Deserializer::from_str(&as_json)
        .into_iter::<Value>()
        .next()
        .expect("one object")
        .expect("JSON");
    assert_eq!(first["stream"], "stderr");
    assert!(first["time"].is_string(), "{first}");

    let unknown = cli.run(&["build", "logs", "no-such-build"], "");
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("NOT_FOUND") || stderr(&unknown).contains("not found"),
        "{}",
        stderr(&unknown)
    );
}

#[test]
fn build_logs_of_a_running_build_stop_at_now_or_follow_to_the_end() {
    let suite = Suite::start();
    let cli = admin(&suite);
    let dir = source(&[("waiting.py", WAITING)]);
    let dir_arg = dir.path().to_str().expect("utf-8");
    let started = cli.run(
        &[
            "build",
            "run",
            "--detach",
            "--from",
            dir_arg,
            "--",
            "python3",
            "waiting.py",
        ],
        "",
    );
    assert!(started.status.success(), "{}", stderr(&started));
    let id = stdout(&started).trim().to_owned();
    // Without --follow: what is logged so far, and back while the build still runs.
    eventually(Duration::from_secs(30), "the first line", || {
        stdout(&cli.run(&["build", "logs", &id], "")) == "first\n"
    });
    let build = json(&cli.ok(&["build", "get", &id, "-o", "json"]));
    assert_eq!(build["state"], "RUNNING");

    // --follow stays until the build ends and gets the rest.
    let mut follower = cli
        .command(&["build", "logs", &id, "--follow", "--tail", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln runs");
    let printed = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let mut pipe = follower.stdout.take().expect("stdout");
        let printed = printed.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 1024];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                printed.lock().expect("lock").extend_from_slice(&chunk[..n]);
            }
        })
    };
    eventually(Duration::from_secs(30), "the tail of the history", || {
        screen(&printed) == "first\n"
    });
    // The cancel's SIGTERM makes the step print its last line; then the build ends.
    cli.ok(&["build", "cancel", &id]);
    let status = follower.wait().expect("follower ends");
    reader.join().expect("reader");
    assert!(status.success());
    assert_eq!(screen(&printed), "first\nlast\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn build_policy_reads_like_the_servers_rules() {
    let suite = Suite::start();
    let cli = admin(&suite);
    let text = cli.ok(&["build", "policy"]);
    let policy = json(&cli.ok(&["build", "policy", "-o", "json"]));
    assert!(
        text.starts_with(&format!(
            "sandbox:   tier {}\n",
            policy["sandbox"]["tier"].as_str().expect("tier")
        )),
        "{text}"
    );
    assert!(text.contains("python3"), "{text}");
    // The out-of-the-box default output limit (16 MiB) and memory (2 GiB), readable.
    assert_eq!(policy["default_limits"]["output_bytes"], 16u64 << 20);
    assert!(
        text.lines()
            .any(|l| l.starts_with("output of a build") && l.contains("16 MiB")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("memory of a step") && l.contains("2 GiB")),
        "{text}"
    );
    assert!(
        text.contains(&format!("at most {} steps", policy["max_steps"])),
        "{text}"
    );
    // A viewer may read it too.
    let password = suite.create_user("vic", Role::Viewer).await;
    let viewer = logged_in_as(&suite, "vic", &password);
    assert_eq!(viewer.ok(&["build", "policy"]), text);
}

#[test]
fn every_noun_lists_with_list_and_ls_and_deletes_with_delete_and_rm() {
    for (noun, verbs) in [
        ("build", &["list", "ls"][..]),
        ("agent", &["list", "ls"]),
        ("keys", &["list", "ls", "revoke", "delete", "rm"]),
        ("users", &["list", "ls", "delete", "rm"]),
        ("workspace", &["list", "ls", "delete", "rm"]),
    ] {
        for verb in verbs {
            let out = Offline
                .command(&[noun, verb, "--help"])
                .output()
                .expect("kiln");
            assert!(out.status.success(), "kiln {noun} {verb}: {}", stderr(&out));
        }
    }
}

#[test]
fn help_has_examples_groups_global_flags_and_up_shows_only_server_flags() {
    let help = |args: &[&str]| {
        let out = Offline.command(args).output().expect("kiln");
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let logs = help(&["build", "logs", "--help"]);
    let own = logs.find("--follow").expect("own flag");
    let global = logs
        .find("Global options:")
        .expect("a heading for the global flags");
    let endpoint = logs.find("--endpoint").expect("global flag");
    assert!(own < global && global < endpoint, "{logs}");
    assert!(logs.contains("Examples:\n  kiln build logs "), "{logs}");
    // Exit codes stay next to the examples.
    let run = help(&["agent", "run", "--help"]);
    assert!(
        run.contains("130 when it ends CANCELLED") && run.contains("Examples:"),
        "{run}"
    );

    let up = help(&["up", "--help"]);
    assert!(up.contains("--listen") && up.contains("--data-dir"), "{up}");
    for client_flag in ["--endpoint", "--ca ", "--output"] {
        assert!(
            !up.contains(client_flag),
            "{client_flag} in `kiln up --help`: {up}"
        );
    }
    assert!(up.contains("Examples:\n  kiln up"), "{up}");
}
