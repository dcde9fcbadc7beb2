//! Readable output against a live suite: build tables and details as people read them
//! (ages, durations, signals, owners), the run/watch summary's real duration, listings
//! that page, `-o yaml`, JSON events that carry their time and id, and ids given by a
//! unique prefix (ambiguous, too short, and other users' ids never matched).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Cli, Suite};
use kiln_proto::auth::Role;
use kiln_proto::build as pb;
use kiln_proto::build::build_service_client::BuildServiceClient;
use serde_json::Value;

fn source(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).expect("write");
    }
    dir
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

/// The CLI logged in as a new user `name` (role user).
fn user_cli<'a>(suite: &'a Suite, rt: &tokio::runtime::Runtime, name: &str) -> Cli<'a> {
    let password = rt.block_on(suite.create_user(name, Role::User));
    let cli = Cli::new(suite);
    let output = cli.run(
        &["login", "-u", name, "--password-stdin"],
        &format!("{password}\n"),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    cli
}

/// The id after `prefix ` on a line of `text` (`build ID`, `workspace ID`).
fn id_after(text: &str, prefix: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned())
        .unwrap_or_else(|| panic!("no {prefix:?} line in {text}"))
}

fn wait_until_ended(cli: &Cli<'_>, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let build = json(&cli.ok(&["build", "get", id, "-o", "json"]));
        if !build["finished_at"].is_null() {
            return;
        }
        assert!(Instant::now() < deadline, "build {id} did not end: {build}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rfc3339(value: &Value) -> time::OffsetDateTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {value}"));
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{text} is not RFC 3339: {e}"))
}

/// The cells of a table line (columns are separated by two or more spaces).
fn cells(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn builds_read_like_a_person_and_machine_output_stays_exact() {
    let suite = Suite::start();
    let rt = runtime();
    let alice = user_cli(&suite, &rt, "alice");
    let admin = Cli::new(&suite);
    admin.login_admin();
    let dir = source(&[
        ("ok.py", "print('fine')\n"),
        (
            "die.py",
            "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
        ),
        ("nap.py", "import time\ntime.sleep(2)\nprint('rested')\n"),
    ]);
    let from = dir.path().to_str().expect("utf-8");

    let ok = alice.run(
        &[
            "build", "run", "--from", from, "--label", "team=a", "--", "python3", "ok.py",
        ],
        "",
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    let workspace = id_after(&stderr(&ok), "workspace ");
    let ok_id = id_after(&stderr(&ok), "build ");
    let died = alice.run(
        &[
            "build",
            "run",
            "--workspace",
            &workspace,
            "--",
            "python3",
            "die.py",
        ],
        "",
    );
    assert_eq!(died.status.code(), Some(128 + 9), "{}", stderr(&died));
    let died_id = id_after(&stderr(&died), "build ");

    // The summary is the build's own duration (server start to finish), not how long
    // this terminal watched: a watch of a build that ended says the 2 s it ran.
    let nap_id = alice
        .ok(&[
            "build",
            "run",
            "--detach",
            "--workspace",
            &workspace,
            "--",
            "python3",
            "nap.py",
        ])
        .trim()
        .to_owned();
    wait_until_ended(&alice, &nap_id);
    let watched = alice.run(&["build", "watch", &nap_id, "--from-start"], "");
    assert!(watched.status.success(), "{}", stderr(&watched));
    let summary = stderr(&watched)
        .lines()
        .find(|l| l.starts_with(&format!("build {nap_id} SUCCEEDED")))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no summary in {}", stderr(&watched)));
    assert!(
        // 2.000–2.049 s reads "2 s", longer "2.x s": either way the server's two seconds.
        summary.ends_with(" s)")
            && (summary.contains("SUCCEEDED (2.") || summary.contains("SUCCEEDED (2 s)")),
        "{summary}"
    );

    // The table: its own builds, so no OWNER column for alice.
    let table = alice.ok(&["build", "list"]);
    let mut lines = table.lines();
    assert_eq!(
        cells(lines.next().expect("header")),
        ["ID", "STATE", "AGE", "DURATION", "COMMAND"]
    );
    let rows: Vec<Vec<String>> = lines.map(cells).collect();
    assert_eq!(rows.len(), 3, "{table}");
    let nap_row = &rows[0];
    assert_eq!(nap_row[0], nap_id);
    assert_eq!(nap_row[1], "SUCCEEDED");
    assert!(
        nap_row[2].ends_with(" ago") || nap_row[2] == "just now",
        "{table}"
    );
    // The server's two seconds: "2 s" when under 2.05 s, else "2.1 s" and so on.
    assert!(
        nap_row[3] == "2 s" || (nap_row[3].starts_with("2.") && nap_row[3].ends_with(" s")),
        "{table}"
    );
    assert_eq!(nap_row[4], "python3 nap.py");
    assert_eq!(rows[1][1], "FAILED");
    // An admin sees everyone's builds, so the owner is named.
    let table = admin.ok(&["build", "list"]);
    let header = cells(table.lines().next().expect("header"));
    assert_eq!(
        header,
        ["ID", "STATE", "AGE", "DURATION", "OWNER", "COMMAND"]
    );
    assert!(
        table.lines().skip(1).all(|l| cells(l)[4] == "alice"),
        "{table}"
    );

    // Paging: a cut page says how to get the rest; --all follows the tokens.
    let cut = alice.run(&["build", "list", "--limit", "1"], "");
    assert_eq!(stdout(&cut).lines().count(), 2, "{}", stdout(&cut));
    let hint = stderr(&cut);
    let token = hint
        .trim()
        .strip_prefix("more: use --all or --page-token ")
        .unwrap_or_else(|| panic!("no paging hint: {hint}"))
        .to_owned();
    let rest = alice.ok(&["build", "list", "--page-token", &token]);
    let rest_ids: Vec<String> = rest.lines().skip(1).map(|l| cells(l)[0].clone()).collect();
    assert_eq!(rest_ids, [died_id.clone(), ok_id.clone()]);
    let all = alice.run(&["build", "list", "--all", "--page-size", "1"], "");
    assert_eq!(stdout(&all).lines().count(), 4, "{}", stdout(&all));
    assert!(!stderr(&all).contains("more:"), "{}", stderr(&all));
    let page = json(&alice.ok(&["build", "list", "--limit", "2", "-o", "json"]));
    assert_eq!(page["builds"].as_array().map(Vec::len), Some(2), "{page}");
    assert!(
        !page["next_page_token"].as_str().unwrap_or("").is_empty(),
        "{page}"
    );
    let page = json(&alice.ok(&["build", "list", "--all", "-o", "json"]));
    assert_eq!(page["next_page_token"], "", "{page}");

    // The detail view, by a unique prefix of the id.
    let shown = alice.ok(&["build", "get", &died_id[..8]]);
    for want in [
        format!("build {died_id} — FAILED"),
        "killed by signal 9 (SIGKILL)".to_owned(),
        "owner:     alice (".to_owned(),
        "duration:".to_owned(),
        "peak memory".to_owned(),
    ] {
        assert!(shown.contains(&want), "{want:?} in\n{shown}");
    }
    let shown = alice.ok(&["build", "get", &ok_id]);
    assert!(shown.contains("labels:    team=a"), "{shown}");
    let created = shown
        .lines()
        .find(|l| l.trim_start().starts_with("created:"))
        .unwrap_or_else(|| panic!("no created line in {shown}"));
    assert!(
        created.ends_with("ago)") || created.ends_with("just now)"),
        "{created}"
    );

    // JSON stays machine-exact: RFC 3339 times, durations in milliseconds.
    let exact = json(&alice.ok(&["build", "get", &nap_id, "-o", "json"]));
    let ran = rfc3339(&exact["finished_at"]) - rfc3339(&exact["started_at"]);
    assert!(ran >= time::Duration::seconds(2), "{exact}");
    assert!(
        exact["step_results"][0]["duration_ms"]
            .as_f64()
            .unwrap_or(0.0)
            >= 2000.0
    );

    // YAML is the same document (its emitter may write a float's last digit apart).
    let yaml: Value = yaml_serde::from_str(&alice.ok(&["build", "get", &nap_id, "-o", "yaml"]))
        .expect("yaml parses");
    assert!(same_document(&yaml, &exact), "{yaml}\n{exact}");
    let listed: Value =
        yaml_serde::from_str(&alice.ok(&["-o", "yaml", "build", "list"])).expect("yaml parses");
    assert_eq!(
        listed["builds"].as_array().map(Vec::len),
        Some(3),
        "{listed}"
    );

    // Event streams: every JSON line, and every YAML document, has its time and build.
    let events = alice.ok(&["build", "watch", &ok_id, "--from-start", "-o", "json"]);
    let lines: Vec<Value> = events.lines().map(json).collect();
    assert!(lines.len() >= 4, "{events}");
    for event in &lines {
        assert_eq!(event["build_id"], ok_id.as_str(), "{event}");
        rfc3339(&event["time"]);
    }
    assert_eq!(
        lines.last().map(|e| e["type"].clone()),
        Some("finished".into())
    );
    let events = alice.ok(&["build", "watch", &ok_id, "--from-start", "-o", "yaml"]);
    let documents: Vec<Value> = yaml_serde::Deserializer::from_str(&events)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("a YAML document"))
        .collect();
    assert_eq!(documents, lines, "the YAML stream holds the same events");
}

#[test]
fn workspace_listings_page() {
    let suite = Suite::start();
    let cli = Cli::new(&suite);
    cli.login_admin();
    let mut made: Vec<String> = (0..5)
        .map(|i| {
            cli.ok(&["workspace", "create", "--name", &format!("w{i}")])
                .trim()
                .to_owned()
        })
        .collect();
    made.reverse(); // newest first, as listed

    let first = cli.run(&["workspace", "ls", "--limit", "2"], "");
    assert!(first.status.success(), "{}", stderr(&first));
    let ids = |out: &str| -> Vec<String> {
        out.lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(ids(&stdout(&first)), made[..2]);
    let hint = stderr(&first);
    let token = hint
        .trim()
        .strip_prefix("more: use --all or --page-token ")
        .unwrap_or_else(|| panic!("no paging hint: {hint}"))
        .to_owned();
    let second = cli.run(
        &["workspace", "ls", "--limit", "2", "--page-token", &token],
        "",
    );
    assert_eq!(ids(&stdout(&second)), made[2..4]);
    let all = cli.run(&["workspace", "ls", "--all", "--page-size", "2"], "");
    assert_eq!(ids(&stdout(&all)), made);
    assert!(!stderr(&all).contains("more:"), "{}", stderr(&all));

    let page = json(&cli.ok(&["workspace", "ls", "--limit", "3", "-o", "json"]));
    assert_eq!(page["workspaces"].as_array().map(Vec::len), Some(3));
    let token = page["next_page_token"]
        .as_str()
        .expect("a token")
        .to_owned();
    assert!(!token.is_empty(), "{page}");
    let rest = json(&cli.ok(&["workspace", "ls", "--page-token", &token, "-o", "json"]));
    let rest_ids: Vec<&str> = rest["workspaces"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|w| w["id"].as_str())
        .collect();
    assert_eq!(rest_ids, made[3..]);
    assert_eq!(rest["next_page_token"], "");

    // Sizes for people: an empty workspace is 0 B; times relative.
    let table = cli.ok(&["workspace", "ls"]);
    let row = table.lines().nth(1).expect("a row");
    assert!(
        row.contains(" 0 B ") && (row.contains(" ago") || row.contains("just now")),
        "{row}"
    );
}

/// Workspaces created as `token` until `stop` says enough: their ids.
async fn create_until(
    build: &mut BuildServiceClient<kiln_rpc::client::KilnChannel>,
    mut stop: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..20_000 {
        let id = build
            .create_workspace(pb::CreateWorkspaceRequest::default())
            .await
            .expect("workspace created")
            .into_inner()
            .id;
        ids.push(id.clone());
        if stop(&id) {
            return ids;
        }
    }
    panic!("no id with the wanted prefix in 20000 workspaces");
}

#[test]
fn ids_are_taken_by_a_unique_prefix_among_what_the_caller_sees() {
    // Hundreds of CreateWorkspace calls: no rate limit for this suite.
    let suite = Suite::start_with(&["--rate-limit-per-second", "0"]);
    let rt = runtime();
    let alice_token = rt.block_on(suite.user_token("alice", Role::User));
    let bob_token = rt.block_on(suite.user_token("bob", Role::User));
    let as_user = |token: &str, args: &[&str]| {
        Cli::new(&suite)
            .command(args)
            .env("KILN_TOKEN", token)
            .output()
            .expect("kiln runs")
    };

    // Ids are random: alice makes workspaces until two share their first 4 characters,
    // then bob until one of his shares them with exactly one of alice's.
    let (alice_ids, bob_ids) = rt.block_on(async {
        let mut alice = BuildServiceClient::new(suite.channel_as(&alice_token).await);
        let mut bob = BuildServiceClient::new(suite.channel_as(&bob_token).await);
        let mut seen: HashMap<String, usize> = HashMap::new();
        let alice_ids = create_until(&mut alice, |id| {
            let n = seen.entry(id[..4].to_owned()).or_default();
            *n += 1;
            *n == 2
        })
        .await;
        let bob_ids = create_until(&mut bob, |id| seen.get(&id[..4]) == Some(&1)).await;
        (alice_ids, bob_ids)
    });
    let twins = &alice_ids[alice_ids.len() - 1][..4];
    let pair: Vec<&String> = alice_ids
        .iter()
        .filter(|id| id.starts_with(twins))
        .collect();
    assert_eq!(pair.len(), 2);

    // Ambiguous: refused, naming both.
    let out = as_user(&alice_token, &["workspace", "ls", twins]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("AMBIGUOUS_ID")
            && err.contains(pair[0].as_str())
            && err.contains(pair[1].as_str()),
        "{err}"
    );
    // One more character (or more) settles it when the ids differ there.
    let longer = longest_unique_prefix(pair[0], pair[1]);
    let out = as_user(&alice_token, &["-o", "json", "workspace", "ls", &longer]);
    assert!(out.status.success(), "{longer}: {}", stderr(&out));

    // Too short: refused with its own reason.
    let out = as_user(&alice_token, &["workspace", "ls", &twins[..3]]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ID_PREFIX_TOO_SHORT"),
        "{}",
        stderr(&out)
    );

    // Bob's workspace shares its prefix with one of alice's: for alice the prefix is
    // still unique (bob's is not hers to see), and for bob it is his own.
    let shared = &bob_ids[bob_ids.len() - 1][..4];
    let alice_one = alice_ids
        .iter()
        .find(|id| id.starts_with(shared))
        .expect("alice's");
    let out = as_user(&alice_token, &["-o", "json", "workspace", "ls", shared]);
    assert!(out.status.success(), "{shared}: {}", stderr(&out));
    // A prefix of alice's workspace means nothing to bob.
    let out = as_user(&bob_token, &["workspace", "ls", &alice_one[..8]]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));

    // Builds: alice's by prefix; bob's prefix is not found for alice.
    let (alice_build, bob_build) = rt.block_on(async {
        let mut alice = BuildServiceClient::new(suite.channel_as(&alice_token).await);
        let mut bob = BuildServiceClient::new(suite.channel_as(&bob_token).await);
        let start = |workspace: &str| pb::StartBuildRequest {
            workspace_id: workspace.to_owned(),
            steps: vec![pb::Step {
                argv: vec!["python3".into(), "-c".into(), "print('hi')".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let a = alice
            .start_build(start(alice_one))
            .await
            .expect("alice builds")
            .into_inner()
            .id;
        let b = bob
            .start_build(start(&bob_ids[0]))
            .await
            .expect("bob builds")
            .into_inner()
            .id;
        (a, b)
    });
    let out = as_user(&alice_token, &["build", "watch", &alice_build[..6]]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("build {alice_build} SUCCEEDED")),
        "the watch names the whole id: {}",
        stderr(&out)
    );
    let got = as_user(
        &alice_token,
        &["-o", "json", "build", "get", &alice_build[..6]],
    );
    assert_eq!(json(&stdout(&got))["id"], alice_build.as_str());
    let out = as_user(&alice_token, &["build", "get", &bob_build[..8]]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    let out = as_user(&alice_token, &["build", "cancel", &bob_build[..8]]);
    assert!(
        !out.status.success(),
        "another user's build is not cancelled by prefix"
    );
}

/// The shortest prefix of `a` that `b` does not share (at least 4 characters).
fn longest_unique_prefix(a: &str, b: &str) -> String {
    let common = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    a[..(common + 1).max(4)].to_owned()
}

/// `a` and `b` are equal, numbers within a relative 1e-12 of each other.
fn same_document(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(y.abs()).max(1.0),
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_document(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_document(v, w)))
        }
        _ => a == b,
    }
}
