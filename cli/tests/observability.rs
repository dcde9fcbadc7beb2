//! Metrics, dashboards and alerts against a real Prometheus: `kiln up --metrics-listen`
//! is scraped by a Prometheus this test starts on a loopback port, after a known
//! workload (two logins, one of them failing, and a build); its HTTP API must then
//! answer the expected series. The exposition passes `promtool check metrics`, the alert
//! rules `promtool check rules` and their unit tests `promtool test rules`, and every
//! query of the Grafana dashboard parses and evaluates on the live server; the
//! workload's audit records are in the log, in the shared schema.
//!
//! Prometheus and promtool come from apt (`make prometheus`, a dependency of
//! `make test`); without them each test prints one line saying so and skips.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ADMIN_PASSWORD, Cli, Suite};

fn observability_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/observability")
}

/// Whether `tool` runs; if not, prints the one line of the skip.
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        println!(
            "SKIPPED: `{tool}` is not installed (make prometheus installs it from apt as root)"
        );
    }
    found
}

/// A plain HTTP/1.1 GET on loopback: (status code, body).
fn http_get(addr: SocketAddr, path_and_query: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A Prometheus server scraping `target` every second; killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: kiln\n    static_configs:\n      - targets: ['{target}']\n",
                observability_dir().join("alerts.yaml").display()
            ),
        )
        .expect("config");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let prometheus = Self {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !prometheus.ready() {
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready:\n{}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    fn ready(&self) -> bool {
        TcpStream::connect(self.addr).is_ok() && http_get(self.addr, "/-/ready").0 == 200
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query through the HTTP API: the JSON answer.
    fn query(&self, expr: &str) -> serde_json::Value {
        let (status, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", url_encode(expr)),
        );
        let answer: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(status, 200, "{expr}: {answer}");
        answer
    }

    /// The value of a query answering one sample; `None` while it answers none.
    fn value(&self, expr: &str) -> Option<f64> {
        let answer = self.query(expr);
        let result = answer["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "{expr}: {answer}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits (scrapes are every second) until `expr` answers `expected`.
    fn expect(&self, expr: &str, expected: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let value = self.value(expr);
            if value == Some(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{expr} = {value:?}, expected {expected}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The metrics address `kiln up` printed after its first line.
fn metrics_addr(suite: &Suite) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        seen.extend(suite.stdout_lines());
        if let Some(url) = seen.iter().find_map(|l| l.trim().strip_prefix("metrics:")) {
            let url = url.trim();
            return url
                .trim_start_matches("http://")
                .trim_end_matches("/metrics")
                .parse()
                .unwrap_or_else(|_| panic!("a metrics address: {url}"));
        }
        assert!(Instant::now() < deadline, "no metrics line in {seen:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn alert_rules_are_valid_and_their_unit_tests_pass() {
    if !have("promtool") {
        return;
    }
    let dir = observability_dir();
    for args in [
        vec!["check", "rules", "alerts.yaml"],
        vec!["test", "rules", "alerts_test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn metrics_are_off_unless_asked_for() {
    let suite = Suite::start();
    std::thread::sleep(Duration::from_millis(200));
    let lines = suite.stdout_lines();
    assert!(
        !lines.iter().any(|l| l.contains("metrics")),
        "kiln up serves no metrics by default: {lines:?}"
    );
}

#[test]
fn prometheus_scrapes_a_known_workload_and_the_dashboard_queries_evaluate() {
    if !have("prometheus") || !have("promtool") {
        return;
    }
    let suite = Suite::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_addr(&suite);

    // The workload: one failed login, one good one (the CLI's), one build of one step.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let failed = runtime.block_on(suite.login("admin", "not-the-password"));
    assert!(failed.is_err(), "a wrong password is refused");
    let cli = Cli::new(&suite);
    cli.run(
        &["login", "--username", "admin", "--password-stdin"],
        ADMIN_PASSWORD,
    );
    let source = tempfile::tempdir().expect("tempdir");
    std::fs::write(source.path().join("hello.txt"), "hello\n").expect("write");
    let build = cli.run(
        &[
            "build",
            "run",
            "--from",
            source.path().to_str().expect("utf-8"),
            "--",
            "cat",
            "hello.txt",
        ],
        "",
    );
    assert!(
        build.status.success(),
        "the build runs: {}",
        String::from_utf8_lossy(&build.stderr)
    );

    // The exposition itself is valid for Prometheus's own linter.
    let (status, exposition) = http_get(metrics, "/metrics");
    assert_eq!(status, 200);
    // (The one report every OpenMetrics exposition draws is accepted: see the kit.)
    if let Some(lint) = kiln_e2e::promtool::check_metrics(&exposition) {
        lint.unwrap_or_else(|problems| panic!("promtool check metrics: {problems}\n{exposition}"));
    }

    let prometheus = Prometheus::start(metrics);
    prometheus.expect(r#"up{job="kiln"}"#, 1.0);
    prometheus.expect(r#"kiln_auth_logins_total{outcome="failure"}"#, 1.0);
    prometheus.expect(r#"kiln_auth_logins_total{outcome="success"}"#, 1.0);
    prometheus.expect(
        r#"sum(kiln_rpc_requests_total{service="kiln.auth.v1.AuthService",method="Login",code!="OK"})"#,
        1.0,
    );
    prometheus.expect(
        r#"sum(kiln_rpc_requests_total{service="kiln.auth.v1.AuthService",method="Login",code="OK"})"#,
        1.0,
    );
    prometheus.expect("kiln_build_queue_wait_seconds_count", 1.0);
    prometheus.expect(r#"kiln_build_sandbox_spawns_total{outcome="ok"}"#, 1.0);
    prometheus.expect(r#"sum(kiln_build_step_duration_seconds_count)"#, 1.0);
    prometheus.expect("kiln_build_output_bytes_total", 6.0);
    prometheus.expect("kiln_build_running", 0.0);
    prometheus.expect("kiln_build_queue_depth", 0.0);
    prometheus.expect("sum(kiln_rpc_in_flight_requests)", 0.0);
    // kiln up registers the agent's metrics and its verifier's cache counter: every
    // series of their fixed label sets is there from the start.
    prometheus.expect("count(kiln_agent_tasks)", 7.0);
    prometheus.expect("sum(kiln_agent_tasks)", 0.0);
    prometheus.expect("count(kiln_agent_model_tokens_total)", 2.0);
    prometheus.expect("count(kiln_authn_cache_lookups_total)", 4.0);
    prometheus.expect(
        r#"sum(kiln_authn_cache_lookups_total{kind="token"}) > bool 0"#,
        // The CLI's calls with its token went through the cache (at least one miss).
        1.0,
    );
    // The build's stream was measured to its end, not to its headers.
    let streamed = prometheus
        .value(r#"sum(kiln_rpc_request_duration_seconds_sum{method=~"RunBuild|WatchBuild"})"#)
        .expect("the build stream is measured");
    assert!(streamed > 0.0);
    // The development certificates are valid for a while yet.
    let days_left = prometheus
        .value(r#"min((kiln_tls_certificate_expiry_timestamp_seconds - time()) / 86400)"#)
        .expect("certificate expiry is exported");
    assert!(days_left > 14.0, "{days_left}");
    // Nothing fires on a healthy suite.
    prometheus.expect("count(ALERTS) or vector(0)", 0.0);

    // Every dashboard query parses and evaluates (Grafana's interval variable filled in).
    let dashboard: serde_json::Value =
        serde_json::from_str(&common::read(&observability_dir().join("dashboard.json")))
            .expect("the dashboard is JSON");
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("an expr");
            let answer = prometheus.query(&expr.replace("$__rate_interval", "1m"));
            assert_eq!(answer["status"], "success", "{expr}: {answer}");
            queries += 1;
        }
    }
    assert!(queries >= 15, "{queries} dashboard queries");

    // The audit records of the workload, in the one schema every service writes.
    let audit: Vec<serde_json::Value> = suite
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "audit")
        .map(|l| {
            if l["fields"].is_object() {
                l["fields"].clone()
            } else {
                l
            }
        })
        .collect();
    let find = |service: &str, action: &str, outcome: &str| {
        audit
            .iter()
            .find(|r| r["service"] == service && r["action"] == action && r["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {service} {action} {outcome} audit record in {audit:#?}"))
            .clone()
    };
    let failed = find("auth", "login", "failure");
    assert_eq!(failed["reason"], "INVALID_CREDENTIALS");
    assert_eq!(failed["actor_username"], "admin");
    let started = find("build", "build.start", "success");
    assert_eq!(started["actor_username"], "admin");
    assert!(
        started["target_resource"]
            .as_str()
            .is_some_and(|t| t.starts_with("build/")),
        "{started}"
    );
    assert!(
        !started["request_id"].as_str().unwrap_or("").is_empty(),
        "{started}"
    );
    for record in [&failed, &started] {
        assert_eq!(record["audit_schema"], 1, "{record}");
        let text = record.to_string();
        assert!(
            !text.contains(ADMIN_PASSWORD) && !text.contains("not-the-password"),
            "{text}"
        );
    }
}
