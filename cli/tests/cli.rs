//! The `kiln` CLI against a live suite: what a person at a terminal (or a script with
//! `--output json`) sees.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Cli, Suite};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn login_whoami_logout() {
    let suite = Suite::start();
    let cli = Cli::new(&suite);
    cli.login_admin();
    let whoami = cli.ok(&["whoami"]);
    assert!(
        whoami.starts_with("admin (admin) at https://127.0.0.1:"),
        "{whoami}"
    );

    let mode = std::fs::metadata(cli.config_dir.path().join("credentials.json"))
        .expect("saved")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "credentials must be private");

    let out = cli.ok(&["logout"]);
    assert!(out.contains("logged out admin"), "{out}");
    let output = cli.run(&["whoami"], "");
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("not logged in"),
        "{}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("kiln login"),
        "a hint: {}",
        stderr(&output)
    );
}

#[test]
fn a_wrong_password_is_one_clear_line_with_its_reason() {
    let suite = Suite::start();
    let cli = Cli::new(&suite);
    let output = cli.run(
        &["login", "-u", "admin", "--password-stdin"],
        "not-the-password\n",
    );
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.starts_with("kiln: invalid username or password (INVALID_CREDENTIALS)"),
        "{err}"
    );
}

#[test]
fn an_expired_access_token_is_refreshed_on_its_own() {
    // Access tokens live 5 s here, under the CLI's 30 s refresh margin: every command
    // must renew the token (and save the rotated refresh token) before calling.
    let suite = Suite::start_with(&["--access-token-ttl-secs", "5"]);
    let cli = Cli::new(&suite);
    cli.login_admin();
    let endpoint = suite.endpoint.clone();
    let first = cli.credentials()["entries"][&endpoint]["refresh_token"]
        .as_str()
        .expect("saved")
        .to_owned();
    cli.ok(&["whoami"]);
    let second = cli.credentials()["entries"][&endpoint]["refresh_token"]
        .as_str()
        .expect("saved")
        .to_owned();
    assert_ne!(first, second, "the refresh token was used and rotated");
    cli.ok(&["whoami"]);
}

#[test]
fn json_output_parses() {
    let suite = Suite::start();
    let cli = Cli::new(&suite);
    cli.login_admin();
    let whoami: serde_json::Value =
        serde_json::from_str(&cli.ok(&["-o", "json", "whoami"])).expect("json");
    assert_eq!(whoami["username"], "admin");
    assert_eq!(whoami["role"], "admin");

    let created: serde_json::Value = serde_json::from_str(&cli.ok(&[
        "--output", "json", "keys", "create", "ci", "--role", "viewer",
    ]))
    .expect("json");
    assert!(
        created["key"]
            .as_str()
            .expect("secret")
            .starts_with("kiln_")
    );
    assert_eq!(created["api_key"]["role"], "viewer");
    let keys: serde_json::Value =
        serde_json::from_str(&cli.ok(&["-o", "json", "keys", "list"])).expect("json");
    assert_eq!(keys.as_array().expect("list").len(), 1);

    let health: serde_json::Value =
        serde_json::from_str(&cli.ok(&["-o", "json", "health"])).expect("json");
    assert_eq!(health["kiln.auth.v1.AuthService"], "SERVING");
}

#[test]
fn an_api_key_in_kiln_token_works_without_login() {
    let suite = Suite::start();
    let cli = Cli::new(&suite);
    cli.login_admin();
    let key = cli
        .ok(&["keys", "create", "script", "--role", "user"])
        .trim()
        .to_owned();
    let other = Cli::new(&suite); // a fresh machine: no saved login
    let output = other
        .command(&["whoami"])
        .env("KILN_TOKEN", &key)
        .output()
        .expect("runs");
    assert!(output.status.success(), "{}", stderr(&output));
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(out.contains("(user)") && out.contains("api key"), "{out}");
}

#[test]
fn users_are_managed_by_admins_only() {
    let suite = Suite::start();
    let admin = Cli::new(&suite);
    admin.login_admin();
    let output = admin.run(
        &["users", "create", "carol", "--role", "user"],
        "carol-password-1\n",
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let listed = admin.ok(&["users", "list"]);
    assert!(listed.contains("carol"), "{listed}");

    let carol = Cli::new(&suite);
    let output = carol.run(
        &["login", "-u", "carol", "--password-stdin"],
        "carol-password-1\n",
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let output = carol.run(&["users", "list"], "");
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("INSUFFICIENT_ROLE") && err.contains("hint:"),
        "{err}"
    );
}

#[test]
fn a_suite_that_is_down_gets_a_clear_message() {
    let suite = Suite::start();
    let cli = Cli::new(&suite);
    // A port nobody listens on (the suite's own port after it stopped).
    let endpoint = suite.endpoint.clone();
    drop(cli);
    let ca = suite.pki().ca_cert();
    let config = tempfile::tempdir().expect("tempdir");
    let mut suite = suite;
    suite.terminate();
    suite
        .wait_exit(std::time::Duration::from_secs(10))
        .expect("stopped");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["health"])
        .env("KILN_ENDPOINT", &endpoint)
        .env("KILN_CA", &ca)
        .env("KILN_CONFIG_DIR", config.path())
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains(&format!("cannot reach kiln at {endpoint}")),
        "{err}"
    );
    assert!(err.contains("kiln up"), "a hint: {err}");
}

#[test]
fn a_config_file_sets_the_build_policy_and_flags_override_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kiln.toml");
    std::fs::write(
        &file,
        "[auth]\naccess_token_ttl = \"2m\"\n[build.policy]\nextra_programs = [\"zig\"]\nmax_steps = 3\n[build.queue]\nmax_queued_per_user = 4\n",
    )
    .expect("write");
    // The file says 2 minutes; the flag says 60 s and wins.
    let suite = Suite::start_with(&[
        "--config",
        file.to_str().expect("utf-8"),
        "--access-token-ttl-secs",
        "60",
    ]);
    let cli = Cli::new(&suite);
    cli.login_admin();
    let whoami: serde_json::Value =
        serde_json::from_str(&cli.ok(&["-o", "json", "whoami"])).expect("json");
    let expires = time::OffsetDateTime::parse(
        whoami["expires_at"].as_str().expect("expiry"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("rfc3339");
    let left = expires - time::OffsetDateTime::now_utc();
    assert!(
        left <= time::Duration::seconds(61),
        "the flag's TTL: {left}"
    );

    let policy = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let token = suite.admin_token().await;
            kiln_proto::build::build_service_client::BuildServiceClient::new(
                suite.channel_as(&token).await,
            )
            .get_policy(kiln_proto::build::GetPolicyRequest::default())
            .await
            .expect("policy")
            .into_inner()
        });
    assert!(
        policy.allowed_programs.iter().any(|p| p == "zig"),
        "{:?}",
        policy.allowed_programs
    );
    assert!(
        policy.allowed_programs.iter().any(|p| p == "cargo"),
        "defaults kept"
    );
    assert_eq!(policy.max_steps, 3);
    assert_eq!(policy.max_queued_builds_per_user, 4);
}

#[test]
fn config_check_accepts_the_example_and_names_a_typo() {
    let suite_free = common::Offline;
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/kiln.toml");
    let output = suite_free
        .command(&["config", "check", example])
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let effective: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(
        effective["build"]["policy"]["default_limits"]["wall_timeout"],
        "15m"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[build.queue]\nmax_runing = 2\n").expect("write");
    let output = suite_free
        .command(&["config", "check", bad.to_str().expect("utf-8")])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("max_runing"),
        "{}",
        stderr(&output)
    );
}
