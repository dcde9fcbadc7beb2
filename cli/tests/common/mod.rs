//! A real `kiln up` for tests: the binary under test, on 127.0.0.1 with a free port, a
//! temporary data directory and its own development PKI. Stopped (SIGTERM, then SIGKILL)
//! when dropped; only the process this harness started is ever signalled.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_rpc::client::{ClientConfig, KilnChannel};
use kiln_rpc::pki::DevPki;

/// The bootstrap admin's password in every test suite.
pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";

pub struct Suite {
    child: Child,
    /// `https://127.0.0.1:<port>`
    pub endpoint: String,
    /// `127.0.0.1:<port>`
    pub addr: String,
    pub data: tempfile::TempDir,
    stdout: mpsc::Receiver<String>,
}

impl Suite {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts `kiln up` with extra flags and waits until it prints its endpoint.
    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::start_with_env(extra_args, &[])
    }

    /// Starts `kiln up` with extra flags and environment variables.
    pub fn start_with_env(extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"), extra_args, true, env)
    }

    /// Starts `kiln up` whose admin password comes from `--admin-password-file`, not
    /// from the environment.
    pub fn start_with_password_file() -> Self {
        let data = tempfile::tempdir().expect("tempdir");
        let file = data.path().join("admin-password.txt");
        std::fs::write(&file, format!("{ADMIN_PASSWORD}\n")).expect("password file");
        let file = file.to_str().expect("utf-8 path").to_owned();
        Self::start_in(data, &["--admin-password-file", &file], false, &[])
    }

    fn start_in(
        data: tempfile::TempDir,
        extra_args: &[&str],
        password_env: bool,
        env: &[(&str, &str)],
    ) -> Self {
        let log = std::fs::File::create(data.path().join("kiln.log")).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        if password_env {
            command.env("KILN_ADMIN_PASSWORD", ADMIN_PASSWORD);
        } else {
            command.env_remove("KILN_ADMIN_PASSWORD");
        }
        let mut child = command
            .args([
                "up",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--data-dir",
            ])
            .arg(data.path())
            .args(extra_args)
            .env("KILN_LOG", "info,kiln_rpc=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("kiln binary starts");
        let (tx, stdout) = mpsc::channel();
        let pipe = child.stdout.take().expect("stdout piped");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = stdout
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                let log = std::fs::read_to_string(data.path().join("kiln.log")).unwrap_or_default();
                panic!("kiln up did not announce its endpoint; log:\n{log}")
            });
        let endpoint = first
            .strip_prefix("kiln is serving on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_owned();
        let addr = endpoint.trim_start_matches("https://").to_owned();
        Self {
            child,
            endpoint,
            addr,
            data,
            stdout,
        }
    }

    pub fn pki(&self) -> DevPki {
        DevPki {
            dir: self.data.path().join("pki"),
        }
    }

    pub fn ca_pem(&self) -> String {
        read(&self.pki().ca_cert())
    }

    /// A client trusting the suite's CA, without client certificate or token.
    pub fn client(&self) -> ClientConfig {
        ClientConfig::new(&self.endpoint).ca_pem(self.ca_pem())
    }

    pub async fn channel(&self) -> KilnChannel {
        self.client()
            .connect()
            .await
            .expect("connects to the suite")
    }

    /// Logs in over TLS and returns the access and refresh tokens.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
    ) -> Result<(String, String), tonic::Status> {
        use kiln_proto::auth::{LoginRequest, auth_service_client::AuthServiceClient};
        let mut auth = AuthServiceClient::new(self.channel().await);
        let response = auth
            .login(LoginRequest {
                username: username.into(),
                password: password.into(),
            })
            .await?
            .into_inner();
        Ok((response.access_token, response.refresh_token))
    }

    /// An access token of the bootstrap admin.
    pub async fn admin_token(&self) -> String {
        self.login("admin", ADMIN_PASSWORD)
            .await
            .expect("admin logs in")
            .0
    }

    /// A channel carrying `token`.
    pub async fn channel_as(&self, token: &str) -> KilnChannel {
        self.client()
            .token(token)
            .connect()
            .await
            .expect("connects")
    }

    /// Creates a user (as admin) and returns its password, `<username>-password-123`.
    pub async fn create_user(&self, username: &str, role: kiln_proto::auth::Role) -> String {
        use kiln_proto::auth::{CreateUserRequest, auth_service_client::AuthServiceClient};
        let password = format!("{username}-password-123");
        AuthServiceClient::new(self.channel_as(&self.admin_token().await).await)
            .create_user(CreateUserRequest {
                username: username.into(),
                password: password.clone(),
                role: role as i32,
                ..Default::default()
            })
            .await
            .expect("user created");
        password
    }

    /// Creates a user (as admin) and returns an access token of it.
    pub async fn user_token(&self, username: &str, role: kiln_proto::auth::Role) -> String {
        let password = self.create_user(username, role).await;
        self.login(username, &password)
            .await
            .expect("user logs in")
            .0
    }

    /// The suite's log so far (JSON lines).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("kiln.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM to the suite (the process this harness started).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits up to `timeout` for the suite to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Lines the suite printed on stdout after its first one.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.try_iter().collect()
    }
}

impl Drop for Suite {
    // SIGKILL: a test's own client connections are not polled any more while this runs,
    // so a graceful shutdown would sit out its grace period. Graceful shutdown has its
    // own tests, which call `terminate`.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `kiln` CLI pointed at a suite, with its own config directory (credentials).
pub struct Cli<'a> {
    pub suite: &'a Suite,
    pub config_dir: tempfile::TempDir,
}

impl<'a> Cli<'a> {
    pub fn new(suite: &'a Suite) -> Self {
        Self {
            suite,
            config_dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command
            .args(args)
            .env("KILN_ENDPOINT", &self.suite.endpoint)
            .env("KILN_CA", self.suite.pki().ca_cert())
            .env("KILN_CONFIG_DIR", self.config_dir.path())
            .env_remove("KILN_TOKEN")
            .env_remove("KILN_OUTPUT");
        command
    }

    /// Runs `kiln ARGS` with `stdin` as its standard input.
    pub fn run(&self, args: &[&str], stdin: &str) -> std::process::Output {
        use std::io::Write;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("stdin written");
        child.wait_with_output().expect("kiln finishes")
    }

    /// Runs `kiln ARGS` and returns its stdout, failing the test if it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args, "");
        assert!(
            output.status.success(),
            "kiln {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub fn login_admin(&self) {
        let output = self.run(
            &["login", "--username", "admin", "--password-stdin"],
            &format!("{ADMIN_PASSWORD}\n"),
        );
        assert!(
            output.status.success(),
            "login: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn credentials(&self) -> serde_json::Value {
        let text = read(&self.config_dir.path().join("credentials.json"));
        serde_json::from_str(&text).expect("credentials are JSON")
    }
}

/// The `kiln` binary for commands that need no suite (e.g. `kiln config check`).
pub struct Offline;

impl Offline {
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args(args).env_remove("KILN_CONFIG");
        command
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The grpcurl binary: `$GRPCURL`, `.tools/bin/grpcurl` (installed by `make tools`), or PATH.
pub fn grpcurl() -> PathBuf {
    if let Some(path) = std::env::var_os("GRPCURL") {
        return PathBuf::from(path);
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/grpcurl");
    if tools.exists() {
        return tools;
    }
    let on_path = Command::new("grpcurl").arg("-version").output();
    assert!(
        on_path.is_ok_and(|o| o.status.success()),
        "grpcurl is not installed: run `make tools` (it installs grpcurl into .tools/)"
    );
    PathBuf::from("grpcurl")
}

/// The reason in a status's ErrorInfo.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let details = status.get_error_details();
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "kiln.dev");
    info.reason.clone()
}
