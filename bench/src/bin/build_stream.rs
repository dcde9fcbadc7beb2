//! Build output streaming through the real suite: a `kiln up` child (TLS, password login,
//! JWT authentication, rate limits, the sandbox, the store) against the same work done
//! without kiln, in the same run.
//!
//! 1. Submit → first output byte of `echo hi` through RunBuild, p50/p90 after 5 warm-ups;
//!    peer: a plain `tokio::process::Command` spawn of `echo hi` to its first stdout byte.
//! 2. Throughput of one step writing 512 MiB to stdout (python3, 1 MiB blocks) to its
//!    one watcher; peer: the same program through a pipe this process reads to the end.
//! 3. 1000 concurrent watchers (WatchBuild from sequence 0, over 10 connections) of a
//!    build printing 20 000 lines slowly, each of which must get every byte; peer: the
//!    same build with one watcher. Each connection carries its own login of a viewer:
//!    the rate limit (burst 400 per credential and method) stays on, as shipped.
//!
//! The suite is the `kiln` binary next to this executable, started on a free
//! 127.0.0.1 port with a temporary data directory and the shipped defaults (`KILN_*`
//! variables of the caller are not passed on). It gets SIGTERM at the end, SIGKILL if the
//! benchmark panics.
//!
//! `cargo build --release -p kiln-cli && cargo run --release -p kiln-bench --bin
//! build_stream [first-byte runs]` (default 30).

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln_bench::{ms, percentile};
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_proto::auth::{CreateUserRequest, LoginRequest, Role};
use kiln_proto::build as pb;
use kiln_proto::build::build_event::Event;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::{ClientConfig, KilnChannel};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

type Client = BuildServiceClient<KilnChannel>;

/// The bootstrap admin's password in the benchmark's suite.
const ADMIN_PASSWORD: &str = "build-stream-bench-admin";
/// The viewer the watchers log in as.
const WATCHER: (&str, &str) = ("watcher", "build-stream-bench-watcher");
const WARM_UPS: usize = 5;
const THROUGHPUT_MIB: u64 = 512;
/// Throughput runs per side; the best of each is compared.
const THROUGHPUT_ROUNDS: usize = 3;
const WATCHERS: usize = 1000;
const WATCH_CONNECTIONS: usize = 10;
const LINES: u64 = 20_000;
/// `line 000000\n`
const LINE_BYTES: u64 = 12;

/// The `kiln up` child this benchmark started. Dropped while it still runs (a panic), it
/// is killed; [`Suite::stop`] ends it with SIGTERM.
struct Suite {
    child: Child,
    /// `https://127.0.0.1:<port>`
    endpoint: String,
    ca: String,
    /// Holds `data/` (the suite's data directory) and `kiln.log` (its stdout and stderr).
    dir: tempfile::TempDir,
}

impl Suite {
    async fn start(kiln: &Path) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // Tier B steps of a root service run as nobody and must reach the data directory.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .expect("chmod");
        let log = std::fs::File::create(dir.path().join("kiln.log")).expect("log file");
        let port = free_port();
        let mut command = std::process::Command::new(kiln);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("KILN_") {
                command.env_remove(name);
            }
        }
        let child = command
            .args(["up", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("KILN_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("kiln up starts");
        let mut suite = Self {
            child,
            endpoint: format!("https://127.0.0.1:{port}"),
            ca: String::new(),
            dir,
        };
        suite.wait_serving().await;
        suite
    }

    /// Polls grpc.health.v1 (overall) until SERVING, as a load balancer would.
    async fn wait_serving(&mut self) {
        let ca_path = self.dir.path().join("data/pki/ca.pem");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "kiln up exited ({status}) before serving; its log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "kiln up was not SERVING after 60 s; its log:\n{}",
                self.log()
            );
            if let Ok(ca) = std::fs::read_to_string(&ca_path)
                && health(&self.endpoint, &ca).await == Some(ServingStatus::Serving)
            {
                self.ca = ca;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kiln.log")).unwrap_or_default()
    }

    fn client(&self) -> ClientConfig {
        ClientConfig::new(&self.endpoint).ca_pem(&self.ca)
    }

    /// Logs in through kiln.auth.v1.AuthService/Login; returns the access token.
    async fn login(&self, username: &str, password: &str) -> String {
        let channel = self.client().connect().await.expect("connects");
        AuthServiceClient::new(channel)
            .login(LoginRequest {
                username: username.into(),
                password: password.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{username} logs in: {e}"))
            .into_inner()
            .access_token
    }

    /// A build client on its own connection, sending `token`.
    async fn build_client(&self, token: &str) -> Client {
        BuildServiceClient::new(
            self.client()
                .token(token)
                .connect()
                .await
                .expect("connects"),
        )
    }

    /// SIGTERM to the child (and nothing else), then waits for it to exit; SIGKILL if it
    /// has not after 60 s.
    fn stop(mut self) -> ExitStatus {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("a pid"));
        kill(pid, Signal::SIGTERM).expect("SIGTERM to kiln up");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("kiln up did not stop within 60 s of SIGTERM: killing it");
        let _ = self.child.kill();
        self.child.wait().expect("wait")
    }
}

impl Drop for Suite {
    fn drop(&mut self) {
        // Only while it still runs: once reaped, its pid may belong to someone else.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port free on 127.0.0.1 a moment ago (kiln up binds it right after).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("local addr").port()
}

/// The overall health status, or None while the server cannot be reached.
async fn health(endpoint: &str, ca: &str) -> Option<ServingStatus> {
    let channel = ClientConfig::new(endpoint)
        .ca_pem(ca)
        .connect()
        .await
        .ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .ok()?;
    Some(response.into_inner().status())
}

/// `kiln` next to this executable (cargo puts both in the same target directory).
fn kiln_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let kiln = exe.parent().expect("a directory").join("kiln");
    if !kiln.is_file() {
        eprintln!(
            "{} not found: build it first: cargo build --release -p kiln-cli",
            kiln.display()
        );
        std::process::exit(2);
    }
    kiln
}

fn build_request(ws: &str, argv: &[&str]) -> pb::StartBuildRequest {
    pb::StartBuildRequest {
        workspace_id: ws.into(),
        steps: vec![pb::Step {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// What a build stream delivered.
struct Watched {
    stdout_bytes: u64,
    /// When the first Output event arrived.
    first_output: Option<Instant>,
    /// The step's wall time as the server measured it.
    step_duration: Duration,
}

/// Reads a build's event stream to its end; panics unless the build succeeded.
async fn follow(mut events: tonic::Streaming<pb::BuildEvent>) -> Watched {
    let mut watched = Watched {
        stdout_bytes: 0,
        first_output: None,
        step_duration: Duration::ZERO,
    };
    let mut state = None;
    while let Some(event) = events.message().await.expect("the event stream") {
        match event.event {
            Some(Event::Output(o)) => {
                watched.first_output.get_or_insert_with(Instant::now);
                assert_eq!(o.stream, pb::OutputStream::Stdout as i32, "{o:?}");
                watched.stdout_bytes += o.data.len() as u64;
            }
            Some(Event::StepFinished(s)) => {
                let d = s.duration.unwrap_or_default();
                watched.step_duration = Duration::new(d.seconds as u64, d.nanos as u32);
            }
            Some(Event::Finished(f)) => state = Some((f.state(), f.message)),
            _ => {}
        }
    }
    match state {
        Some((pb::BuildState::Succeeded, _)) => watched,
        other => panic!("the build did not succeed: {other:?}"),
    }
}

async fn kiln_first_byte(client: &mut Client, ws: &str) -> Duration {
    let started = Instant::now();
    let events = client
        .run_build(build_request(ws, &["echo", "hi"]))
        .await
        .expect("RunBuild")
        .into_inner();
    let watched = follow(events).await;
    assert_eq!(watched.stdout_bytes, 3);
    watched.first_output.expect("an Output event") - started
}

async fn plain_first_byte() -> Duration {
    let started = Instant::now();
    let mut child = tokio::process::Command::new("echo")
        .arg("hi")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("echo starts");
    let mut byte = [0u8; 1];
    let mut stdout = child.stdout.take().expect("stdout");
    stdout.read_exact(&mut byte).await.expect("a first byte");
    let took = started.elapsed();
    drop(stdout);
    assert!(child.wait().await.expect("wait").success());
    took
}

/// Times `once` `runs` times after the warm-ups; returns (p50, p90).
async fn p50_p90<F, Fut>(runs: usize, mut once: F) -> (Duration, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Duration>,
{
    for _ in 0..WARM_UPS {
        once().await;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        times.push(once().await);
    }
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.9))
}

async fn first_byte(client: &Client, ws: &str, runs: usize) {
    println!("1. submit -> first output byte of `echo hi`: {runs} runs after {WARM_UPS} warm-ups");
    let kiln = p50_p90(runs, || {
        let mut client = client.clone();
        async move { kiln_first_byte(&mut client, ws).await }
    })
    .await;
    let plain = p50_p90(runs, plain_first_byte).await;
    println!("   {:<34} {:>9} {:>9}", "", "p50 ms", "p90 ms");
    for (name, (p50, p90)) in [
        ("kiln RunBuild (TLS, JWT, sandbox)", kiln),
        ("plain tokio::process spawn", plain),
    ] {
        println!("   {name:<34} {:>9.3} {:>9.3}", ms(p50), ms(p90));
    }
    println!(
        "   kiln - plain: +{:.3} ms (p50), +{:.3} ms (p90); kiln / plain: {:.1}x (p50)\n",
        ms(kiln.0) - ms(plain.0),
        ms(kiln.1) - ms(plain.1),
        ms(kiln.0) / ms(plain.0)
    );
}

/// A python3 program writing `mib` MiB of `x` to stdout in 1 MiB blocks.
fn writer_program(mib: u64) -> String {
    [
        "import sys".to_owned(),
        "b = b'x' * (1 << 20)".to_owned(),
        format!("for _ in range({mib}): sys.stdout.buffer.write(b)"),
    ]
    .join("\n")
}

/// A python3 program printing `LINES` lines of `LINE_BYTES` bytes, flushing and sleeping
/// 10 ms every 1000 lines.
fn slow_printer_program() -> String {
    [
        "import sys, time".to_owned(),
        format!("for i in range({LINES}):"),
        "    sys.stdout.write('line %06d\\n' % i)".to_owned(),
        "    if i % 1000 == 0: sys.stdout.flush(); time.sleep(0.01)".to_owned(),
    ]
    .join("\n")
}

async fn kiln_throughput(client: &mut Client, ws: &str, code: &str) -> Duration {
    let mut request = build_request(ws, &["python3", "-c", code]);
    request.limits = Some(pb::Limits {
        output_bytes: Some(THROUGHPUT_MIB << 20),
        ..Default::default()
    });
    let started = Instant::now();
    let events = client
        .run_build(request)
        .await
        .expect("RunBuild")
        .into_inner();
    let watched = follow(events).await;
    let took = started.elapsed();
    assert_eq!(watched.stdout_bytes, THROUGHPUT_MIB << 20, "bytes received");
    took
}

async fn raw_throughput(code: &str) -> Duration {
    let started = Instant::now();
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", code])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 64 << 10];
    let mut bytes = 0u64;
    loop {
        let n = stdout.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        bytes += n as u64;
    }
    assert!(child.wait().await.expect("wait").success());
    let took = started.elapsed();
    assert_eq!(bytes, THROUGHPUT_MIB << 20, "bytes read");
    took
}

async fn throughput(client: &mut Client, ws: &str) {
    println!("2. {THROUGHPUT_MIB} MiB of stdout (python3, 1 MiB blocks) to one watcher");
    let code = writer_program(THROUGHPUT_MIB);
    let rate = |d: Duration| THROUGHPUT_MIB as f64 / d.as_secs_f64();
    let (mut kiln, mut raw) = (0.0f64, 0.0f64);
    for round in 1..=THROUGHPUT_ROUNDS {
        let k = rate(kiln_throughput(client, ws, &code).await);
        let r = rate(raw_throughput(&code).await);
        println!("   round {round}: kiln {k:>6.0} MiB/s, raw pipe {r:>6.0} MiB/s");
        kiln = kiln.max(k);
        raw = raw.max(r);
    }
    println!("   best of {THROUGHPUT_ROUNDS}:");
    println!("   kiln RunBuild over TLS:  {kiln:>6.0} MiB/s (every byte counted)");
    println!("   raw pipe, same process:  {raw:>6.0} MiB/s");
    println!("   kiln / raw = {:.2}\n", kiln / raw);
}

/// Starts the slow 20 000-line build and has `watchers` watch it from sequence 0, spread
/// over `clients`; returns the time from the first watch to the last watcher's end and
/// the step's own duration.
async fn watched_build(
    owner: &mut Client,
    ws: &str,
    clients: &[Client],
    watchers: usize,
) -> (Duration, Duration) {
    let build = owner
        .start_build(build_request(
            ws,
            &["python3", "-c", &slow_printer_program()],
        ))
        .await
        .expect("StartBuild")
        .into_inner();
    let started = Instant::now();
    let tasks: Vec<_> = (0..watchers)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let request = pb::WatchBuildRequest {
                build_id: build.id.clone(),
                after_sequence: 0,
            };
            tokio::spawn(async move {
                let events = client
                    .watch_build(request)
                    .await
                    .expect("WatchBuild")
                    .into_inner();
                follow(events).await
            })
        })
        .collect();
    let mut step = Duration::ZERO;
    for task in tasks {
        let watched = task.await.expect("a watcher");
        assert_eq!(
            watched.stdout_bytes,
            LINES * LINE_BYTES,
            "bytes a watcher got"
        );
        step = watched.step_duration;
    }
    (started.elapsed(), step)
}

async fn watchers(suite: &Suite, owner: &mut Client, admin_token: &str, ws: &str) {
    println!(
        "3. {WATCHERS} concurrent watchers of one slow build ({WATCH_CONNECTIONS} connections)"
    );
    AuthServiceClient::new(
        suite
            .client()
            .token(admin_token)
            .connect()
            .await
            .expect("connects"),
    )
    .create_user(CreateUserRequest {
        username: WATCHER.0.into(),
        password: WATCHER.1.into(),
        role: Role::Viewer as i32,
        ..Default::default()
    })
    .await
    .expect("the watcher user is created");
    let mut clients = Vec::with_capacity(WATCH_CONNECTIONS);
    for _ in 0..WATCH_CONNECTIONS {
        let token = suite.login(WATCHER.0, WATCHER.1).await;
        clients.push(suite.build_client(&token).await);
    }
    let (one, step_one) = watched_build(owner, ws, &clients[..1], 1).await;
    let (many, step_many) = watched_build(owner, ws, &clients, WATCHERS).await;
    println!(
        "   1 watcher:     {:>7.0} ms from watch start to its end (the step ran {:.0} ms)",
        ms(one),
        ms(step_one)
    );
    println!(
        "   {WATCHERS} watchers: {:>7.0} ms until each had all {} bytes (the step ran {:.0} ms)",
        ms(many),
        LINES * LINE_BYTES,
        ms(step_many)
    );
    println!("   {WATCHERS} / 1 = {:.2}\n", ms(many) / ms(one));
}

async fn measure(suite: &Suite, runs: usize) {
    let admin_token = suite.login("admin", ADMIN_PASSWORD).await;
    let mut client = suite.build_client(&admin_token).await;
    let policy = client
        .get_policy(pb::GetPolicyRequest {})
        .await
        .expect("GetPolicy")
        .into_inner();
    let max_output = policy.max_limits.and_then(|l| l.output_bytes).unwrap_or(0);
    assert!(
        max_output >= THROUGHPUT_MIB << 20,
        "the policy's max output ({max_output} bytes) is below {THROUGHPUT_MIB} MiB: \
         set [build.policy.max_limits] output_bytes in a `kiln up --config` file"
    );
    println!("   sandbox: {}\n", policy.sandbox_description);
    let ws = client
        .create_workspace(pb::CreateWorkspaceRequest::default())
        .await
        .expect("CreateWorkspace")
        .into_inner()
        .id;
    first_byte(&client, &ws, runs).await;
    throughput(&mut client, &ws).await;
    watchers(suite, &mut client, &admin_token, &ws).await;
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(30);
    let kiln = kiln_binary();
    let suite = Suite::start(&kiln).await;
    println!("build streaming through `kiln up` on {}", suite.endpoint);
    tokio::time::timeout(Duration::from_secs(600), measure(&suite, runs))
        .await
        .expect("the benchmark finished within 10 minutes");
    let status = suite.stop();
    println!("kiln up stopped after SIGTERM: {status}");
}
