//! kiln from other languages' gRPC stacks, against a live suite: the example clients in
//! `examples/clients/` (Python with grpcio, Node with @grpc/grpc-js) and the README's
//! grpcurl walkthrough, line by line.
//!
//! What they need is installed by `make tools`; when it is missing these tests fail
//! (never skip) and say so.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;
use common::{Suite, grpcurl, read};
use kiln_proto::auth::Role;

/// Longest a client program may take (it needs about a second).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(45);
/// Longest one grpcurl command of the walkthrough may take.
const GRPCURL_TIMEOUT: Duration = Duration::from_secs(20);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

/// Fails the test, with the hint to run `make tools`, when any of `paths` is missing.
fn require_installed(what: &str, paths: &[PathBuf]) {
    let missing: Vec<String> = paths
        .iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: not installed (missing: {}): run `make tools`",
        missing.join(", ")
    );
}

/// Runs `command` to its end with no stdin, killing it (by its pid) after `timeout`.
fn run_bounded(mut command: Command, timeout: Duration) -> Output {
    let shown = format!("{command:?}");
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{shown} does not start: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.unwrap_or_else(|e| panic!("{shown}: {e}")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{shown} did not finish within {timeout:?}")
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The environment the example clients read: endpoint, CA and a fresh user.
async fn client_env(suite: &Suite, username: &str) -> Vec<(&'static str, String)> {
    let password = suite.create_user(username, Role::User).await;
    vec![
        ("KILN_ENDPOINT", suite.addr.clone()),
        ("KILN_CA", suite.pki().ca_cert().display().to_string()),
        ("KILN_USERNAME", username.to_owned()),
        ("KILN_PASSWORD", password),
    ]
}

/// Checks a client's exit code and the lines that show each of its checks passed.
fn assert_client_passed(name: &str, output: &Output) {
    let stdout = text(&output.stdout);
    let stderr = text(&output.stderr);
    assert!(
        output.status.success(),
        "{name} failed ({}):\n--- stdout\n{stdout}--- stderr\n{stderr}",
        output.status
    );
    for expected in [
        "logged in as alice (role ROLE_USER)",
        "created workspace ",
        "  [3] step 0 started: python3 hello.py",
        "disconnected after sequence 3",
        "resuming after sequence 3:",
        "stdout | hello from kiln",
        "stderr | a line on stderr",
        "build finished: BUILD_STATE_SUCCEEDED",
        "no gap, no duplicate, identical to a full replay",
        "build succeeded",
        "CreateWorkspace with path /etc/passwd: INVALID_ARGUMENT: ",
        "  field violation: files[0].path: must be relative",
        "  error info: reason=INVALID_PATH domain=kiln.dev",
        "StartBuild with an empty argv: INVALID_ARGUMENT: ",
        "  field violation: steps[0].argv: must not be empty",
        "  error info: reason=INVALID_ARGUMENT domain=kiln.dev",
        "GetPolicy without a token: UNAUTHENTICATED: ",
        "  error info: reason=MISSING_CREDENTIALS domain=kiln.dev",
        "client: all checks passed",
    ] {
        assert!(
            stdout.contains(expected),
            "{name}: {expected:?} missing from its output:\n{stdout}--- stderr\n{stderr}"
        );
    }
    // The output arrived in the resumed stream, not before the disconnect.
    let resumed = stdout
        .split("resuming after sequence 3:")
        .nth(1)
        .unwrap_or_default();
    assert!(resumed.contains("hello from kiln"), "{stdout}");
}

#[tokio::test]
async fn python_client_logs_in_builds_streams_resumes_and_decodes_errors() {
    let deps = repo().join(".tools/python");
    require_installed(
        "the Python client's grpcio, grpcio-tools, grpcio-status and googleapis-common-protos",
        &[
            deps.join("grpc/__init__.py"),
            deps.join("grpc_tools/protoc.py"),
            deps.join("grpc_status/rpc_status.py"),
            deps.join("google/rpc/error_details_pb2.py"),
        ],
    );
    let suite = Suite::start();
    let mut command = Command::new("python3");
    command
        .arg(repo().join("examples/clients/python/kiln_client.py"))
        .current_dir(repo())
        .env("PYTHONPATH", &deps)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .envs(client_env(&suite, "alice").await);
    let output = run_bounded(command, CLIENT_TIMEOUT);
    assert_client_passed("the Python client", &output);
    assert!(text(&output.stdout).contains("python client: all checks passed"));
}

#[tokio::test]
async fn node_client_logs_in_builds_streams_resumes_and_decodes_errors() {
    let modules = repo().join("examples/clients/node/node_modules");
    require_installed(
        "the Node client's @grpc/grpc-js, @grpc/proto-loader, protobufjs and google-proto-files",
        &[
            modules.join("@grpc/grpc-js/package.json"),
            modules.join("@grpc/proto-loader/package.json"),
            modules.join("protobufjs/package.json"),
            modules.join("google-proto-files/google/rpc/error_details.proto"),
        ],
    );
    let suite = Suite::start();
    let mut command = Command::new("node");
    command
        .arg(repo().join("examples/clients/node/kiln_client.js"))
        .current_dir(repo())
        .envs(client_env(&suite, "alice").await);
    let output = run_bounded(command, CLIENT_TIMEOUT);
    assert_client_passed("the Node client", &output);
    assert!(text(&output.stdout).contains("node client: all checks passed"));
}

/// One `grpcurl` line of the README's walkthrough.
struct Line {
    /// The command as written, without a trailing `# fails: REASON`.
    command: String,
    /// The ErrorInfo reason the command must fail with, from `# fails: REASON`.
    fails_with: Option<String>,
}

/// The `grpcurl …` lines of the ```sh blocks of "## Calling kiln with grpcurl", in order.
fn walkthrough() -> Vec<Line> {
    let readme = read(&repo().join("README.md"));
    let start = readme
        .find("## Calling kiln with grpcurl\n")
        .expect("README has a section \"Calling kiln with grpcurl\"");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut lines = Vec::new();
    let (mut in_block, mut in_sh) = (false, false);
    for line in section.lines() {
        if line.trim_start().starts_with("```") {
            in_sh = !in_block && line.trim() == "```sh";
            in_block = !in_block;
            continue;
        }
        if !in_sh || !line.starts_with("grpcurl ") {
            continue;
        }
        let (command, fails_with) = match line.split_once("# fails:") {
            Some((command, reason)) => (command, Some(reason.trim().to_owned())),
            None => (line, None),
        };
        lines.push(Line {
            command: command.trim().to_owned(),
            fails_with,
        });
    }
    lines
}

fn json(stdout: &str, command: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{command}: not JSON ({e}):\n{stdout}"))
}

#[tokio::test]
async fn readme_grpcurl_walkthrough_runs() {
    let grpcurl = grpcurl(); // fails with "run `make tools`" when missing
    let lines = walkthrough();
    let suite = Suite::start();
    // The walkthrough acts as alice, with the password the README logs in with.
    let password = suite.create_user("alice", Role::User).await;
    assert!(
        lines.iter().any(|l| l.command.contains(&password)),
        "the README's Login line should use alice's password {password:?}"
    );

    let mut vars: Vec<(&str, String)> = vec![
        ("CA", suite.pki().ca_cert().display().to_string()),
        ("ADDR", suite.addr.clone()),
    ];
    let mut covered = BTreeSet::new();
    for line in &lines {
        let command = &line.command;
        // Run as a reader would paste it into bash, with the grpcurl of `make tools`; an
        // unset variable (a line run before the one that yields it) is an error.
        let script = format!(
            "'{}'{}",
            grpcurl.display(),
            command.strip_prefix("grpcurl").expect("a grpcurl line")
        );
        let mut bash = Command::new("bash");
        bash.args(["-u", "-o", "pipefail", "-c", &script])
            .current_dir(repo())
            .envs(vars.iter().map(|(k, v)| (*k, v)));
        let output = run_bounded(bash, GRPCURL_TIMEOUT);
        let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));

        if let Some(reason) = &line.fails_with {
            assert!(
                !output.status.success(),
                "{command}: should fail with {reason}, succeeded:\n{stdout}"
            );
            assert!(
                stderr.contains(&format!(r#""reason":"{reason}""#))
                    && stderr.contains("google.rpc.BadRequest"),
                "{command}: no ErrorInfo reason {reason} and BadRequest in:\n{stderr}"
            );
            covered.insert("a failing call with its details");
            continue;
        }
        assert!(
            output.status.success(),
            "{command} failed ({}):\n{stdout}{stderr}",
            output.status
        );

        let target = command.split_whitespace().last().unwrap_or_default();
        if command.contains(" list") && target == "list" {
            for service in ["kiln.auth.v1.AuthService", "kiln.build.v1.BuildService"] {
                assert!(stdout.lines().any(|l| l == service), "{command}:\n{stdout}");
            }
            covered.insert("list");
        } else if command.contains(" describe ") {
            if target == "kiln.build.v1.BuildService" {
                assert!(stdout.contains("rpc RunBuild"), "{command}:\n{stdout}");
            }
            covered.insert("describe");
        } else if target == "grpc.health.v1.Health/Check" {
            assert!(
                stdout.contains(r#""status": "SERVING""#),
                "{command}:\n{stdout}"
            );
            covered.insert("health");
        } else if target == "kiln.auth.v1.AuthService/Login" {
            let token = json(&stdout, command)["accessToken"]
                .as_str()
                .unwrap_or_else(|| panic!("{command}: no accessToken in\n{stdout}"))
                .to_owned();
            vars.push(("TOKEN", token));
            covered.insert("Login");
        } else if target == "kiln.auth.v1.AuthService/WhoAmI" {
            let me = json(&stdout, command);
            assert_eq!(me["principal"]["username"], "alice", "{stdout}");
            assert_eq!(me["principal"]["role"], "ROLE_USER", "{stdout}");
            covered.insert("WhoAmI");
        } else if target == "kiln.build.v1.BuildService/GetPolicy" {
            let policy = json(&stdout, command);
            let programs = policy["allowedPrograms"].as_array().cloned();
            assert!(
                programs.is_some_and(|p| p.iter().any(|v| v == "python3")),
                "{command}: python3 should be allowed:\n{stdout}"
            );
            covered.insert("GetPolicy");
        } else if target == "kiln.build.v1.BuildService/CreateWorkspace" {
            let workspace = json(&stdout, command);
            let id = workspace["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{command}: no id in\n{stdout}"))
                .to_owned();
            vars.push(("WORKSPACE", id));
            covered.insert("CreateWorkspace");
        } else if target == "kiln.build.v1.BuildService/RunBuild" {
            // One JSON object per event, streamed until Finished.
            let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&stdout)
                .into_iter()
                .collect::<Result<_, _>>()
                .unwrap_or_else(|e| panic!("{command}: not a JSON stream ({e}):\n{stdout}"));
            let sequences: Vec<String> = events
                .iter()
                .map(|e| e["sequence"].as_str().unwrap_or_default().to_owned())
                .collect();
            let dense: Vec<String> = (1..=events.len()).map(|i| i.to_string()).collect();
            assert_eq!(sequences, dense, "{stdout}");
            let stdout_bytes: Vec<u8> = events
                .iter()
                .filter(|e| e["output"]["stream"] == "OUTPUT_STREAM_STDOUT")
                .flat_map(|e| {
                    base64::engine::general_purpose::STANDARD
                        .decode(e["output"]["data"].as_str().unwrap_or_default())
                        .expect("output data is base64")
                })
                .collect();
            assert_eq!(text(&stdout_bytes), "hello from kiln\n", "{stdout}");
            let last = events.last().expect("at least one event");
            assert_eq!(
                last["finished"]["state"], "BUILD_STATE_SUCCEEDED",
                "{stdout}"
            );
            covered.insert("RunBuild");
        }
    }
    let wanted = BTreeSet::from([
        "list",
        "describe",
        "health",
        "Login",
        "WhoAmI",
        "GetPolicy",
        "CreateWorkspace",
        "RunBuild",
        "a failing call with its details",
    ]);
    let missing: Vec<_> = wanted.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "the README's grpcurl walkthrough lacks {missing:?} (ran {} lines)",
        lines.len()
    );
}
