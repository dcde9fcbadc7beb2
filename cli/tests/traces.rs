//! Traces end to end, through a real OpenTelemetry collector: `kiln up` and the CLI
//! export over OTLP to `rotel` (installed by `make tools`), which forwards to a small
//! OTLP receiver in this test built on the official `opentelemetry-proto` types.
//! Without rotel the collector test says so in one line and skips; the hanging-collector
//! test needs none.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cli, Suite};
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// One span as the receiver got it: ids in hex, the resource's attributes flattened in.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    resource: HashMap<String, String>,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
}

#[derive(Debug, Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource: HashMap<String, String> = rs
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|kv| match kv.value.and_then(|v| v.value) {
                    Some(Value::StringValue(s)) => Some((kv.key, s)),
                    _ => None,
                })
                .collect();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push(Got {
                        service: resource.get("service.name").cloned().unwrap_or_default(),
                        resource: resource.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        name: span.name,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Receiver {
    /// Serves OTLP/gRPC on a free loopback port until the test's runtime ends.
    async fn start() -> (Self, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let receiver = Self::default();
        // Collectors compress what they forward (rotel: gzip).
        let service = TraceServiceServer::new(receiver.clone())
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, addr)
    }

    fn spans(&self) -> Vec<Got> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (the collectors batch, so this takes a moment) until the trace holds a span
    /// of each name.
    async fn wait_for(&self, trace_id: &str, names: &[&str], rotel: &Rotel) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let spans: Vec<Got> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            let missing: Vec<&&str> = names
                .iter()
                .filter(|n| !spans.iter().any(|s| s.name == **n))
                .collect();
            if missing.is_empty() {
                return spans;
            }
            if Instant::now() > deadline {
                let seen: Vec<_> = spans.iter().map(|s| (&s.service, &s.name)).collect();
                let all = self.spans().len();
                panic!(
                    "trace {trace_id} lacks {missing:?}; it has {seen:?} ({all} spans received in all); rotel's log:\n{}",
                    rotel.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn rotel_binary() -> Option<PathBuf> {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/bin/rotel"));
    if path.exists() {
        Some(path)
    } else {
        println!("SKIP: rotel is not installed (`make tools` installs it into .tools/)");
        None
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A rotel collector on free loopback ports, forwarding traces to `forward_to`. Killed
/// (it is this test's own child) when dropped.
struct Rotel {
    child: Child,
    grpc: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Rotel {
    async fn start(binary: &PathBuf, forward_to: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("rotel.log")).expect("log");
        let child = Command::new(binary)
            .args(["start", "--otlp-grpc-endpoint", &grpc.to_string()])
            .args(["--otlp-http-endpoint", &http])
            .args(["--exporter", "otlp", "--otlp-exporter-protocol", "grpc"])
            .args(["--otlp-exporter-endpoint", &format!("http://{forward_to}")])
            .args(["--batch-timeout", "100ms"])
            .arg("--pid-file")
            .arg(dir.path().join("rotel.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("rotel starts");
        let mut rotel = Self {
            child,
            grpc,
            _dir: dir,
        };
        // Ready when its gRPC port takes connections.
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(grpc).await.is_err() {
            if let Ok(Some(status)) = rotel.child.try_wait() {
                panic!("rotel exited: {status}");
            }
            assert!(Instant::now() < deadline, "rotel did not listen on {grpc}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rotel
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("rotel.log")).unwrap_or_default()
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The chain of parents of `span` within `spans`, nearest first.
fn ancestors<'a>(spans: &'a [Got], span: &Got) -> Vec<&'a Got> {
    let mut chain = Vec::new();
    let mut parent = span.parent.clone();
    while let Some(p) = spans.iter().find(|s| s.span_id == parent) {
        chain.push(p);
        parent = p.parent.clone();
    }
    chain
}

fn named<'a>(spans: &'a [Got], name: &str) -> &'a Got {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name}"))
}

/// `kiln build run` starts its build with RunBuild (StartBuild and stream in one call).
const RUN_BUILD: &str = "kiln.build.v1.BuildService/RunBuild";
const AUTHENTICATE_API_KEY: &str = "kiln.auth.v1.AuthService/AuthenticateApiKey";

/// Runs `kiln --trace build run --from <source> -- cat hello.txt` as the API key's
/// holder, exporting to `rotel`, with `OTEL_TRACES_SAMPLER` when given; returns the trace
/// id it printed.
fn traced_build_run(
    cli: &Cli<'_>,
    source: &std::path::Path,
    key: &str,
    rotel: &Rotel,
    sampler: Option<&str>,
) -> String {
    let mut command = cli.command(&["--trace", "build", "run", "--from"]);
    command
        .arg(source)
        .args(["--", "cat", "hello.txt"])
        .env("KILN_TOKEN", key)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", rotel.endpoint());
    if let Some(sampler) = sampler {
        command.env("OTEL_TRACES_SAMPLER", sampler);
    }
    let output = command.output().expect("kiln runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "build run failed: {stderr}");
    let trace_id = stderr
        .lines()
        .find_map(|l| l.strip_prefix("kiln: trace "))
        .unwrap_or_else(|| panic!("--trace printed no trace id: {stderr}"))
        .trim()
        .to_owned();
    assert_eq!(trace_id.len(), 32, "a W3C trace id: {trace_id}");
    trace_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_cli_build_and_auth_with_the_queue_and_the_steps() {
    let Some(rotel_bin) = rotel_binary() else {
        return;
    };
    let (receiver, receiver_addr) = Receiver::start().await;
    let rotel = Rotel::start(&rotel_bin, receiver_addr).await;
    let suite = Suite::start_with_env(
        &["--otlp-endpoint", &rotel.endpoint()],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let admin = Cli::new(&suite);
    admin.login_admin();
    let key = admin
        .ok(&["keys", "create", "traced", "--role", "user"])
        .trim()
        .to_owned();
    let source = tempfile::tempdir().expect("tempdir");
    std::fs::write(source.path().join("hello.txt"), "hello\n").expect("write");

    // A fresh CLI, authenticated by the API key only: the build service asks kiln-auth
    // about the key, inside this command's trace.
    let cli = Cli::new(&suite);
    let trace_id = traced_build_run(&cli, source.path(), &key, &rotel, None);

    let spans = receiver
        .wait_for(
            &trace_id,
            &[
                "kiln build run",
                RUN_BUILD,
                AUTHENTICATE_API_KEY,
                "build.queue_wait",
                "build.run",
                "build.step",
            ],
            &rotel,
        )
        .await;

    // The command's span is the root, and it is the CLI's.
    let root = named(&spans, "kiln build run");
    assert_eq!(root.service, "kiln-cli");
    assert!(root.parent.is_empty(), "the command starts the trace");
    for key in ["service.version", "service.instance.id"] {
        assert!(root.resource.contains_key(key), "resource lacks {key}");
    }

    // RunBuild is the suite's, a direct child of the CLI's span (its traceparent).
    let start = named(&spans, RUN_BUILD);
    assert_eq!(start.service, "kiln");
    assert_eq!(
        start.parent, root.span_id,
        "RunBuild's parent is the CLI's span"
    );

    // The API-key look-up: kiln-auth's server span, called from inside a build-service
    // call of the same command.
    let auth = named(&spans, AUTHENTICATE_API_KEY);
    let chain = ancestors(&spans, auth);
    assert!(
        chain
            .iter()
            .any(|s| s.name.starts_with("kiln.build.v1.BuildService/")),
        "the key was checked for a build-service call: {chain:?}"
    );
    assert_eq!(chain.last().map(|s| &s.span_id), Some(&root.span_id));

    // Queue wait and run hang under RunBuild though they ran in other tasks later;
    // the step under the run.
    for name in ["build.queue_wait", "build.run"] {
        let span = named(&spans, name);
        assert!(
            ancestors(&spans, span)
                .iter()
                .any(|s| s.span_id == start.span_id),
            "{name} is under RunBuild"
        );
    }
    let run = named(&spans, "build.run");
    assert_eq!(named(&spans, "build.step").parent, run.span_id);

    // The same command with the CLI not sampling it (`always_off`): its trace id reaches
    // every service flagged not sampled, and none records anything of it — neither its
    // spans nor, for a call or a queued build that lost the context, a trace of its own
    // (the services sample every new trace: the default sampler).
    let unsampled_trace = traced_build_run(&cli, source.path(), &key, &rotel, Some("always_off"));
    // A sampled command after it: once its spans are in, the services have exported
    // whatever they recorded of the one before.
    let after_trace = traced_build_run(&cli, source.path(), &key, &rotel, None);
    receiver
        .wait_for(
            &after_trace,
            &["kiln build run", RUN_BUILD, "build.step"],
            &rotel,
        )
        .await;
    let all = receiver.spans();
    assert!(
        !all.iter().any(|s| s.trace_id == unsampled_trace),
        "spans of the unsampled command were recorded"
    );
    // (AuthenticateApiKey too: the sampled commands' own look-ups are in their traces.)
    for name in [
        RUN_BUILD,
        AUTHENTICATE_API_KEY,
        "build.queue_wait",
        "build.run",
        "build.step",
    ] {
        let elsewhere: Vec<&Got> = all
            .iter()
            .filter(|s| s.name == name && s.trace_id != trace_id && s.trace_id != after_trace)
            .collect();
        assert!(
            elsewhere.is_empty(),
            "{name} recorded outside the sampled commands' traces (the unsampled one's context was lost): {elsewhere:?}"
        );
    }
}

/// A collector that takes the connection and never answers: every export hangs.
fn blackhole() -> (SocketAddr, Arc<Mutex<Vec<std::net::TcpStream>>>) {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            keep.lock().unwrap().push(stream);
        }
    });
    (addr, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_hangs_slows_no_request_and_dropped_spans_are_counted() {
    let (hole, held) = blackhole();
    // Exports wait up to two minutes for the collector; the queue holds 16 spans.
    let mut suite = Suite::start_with_env(
        &["--otlp-endpoint", &format!("http://{hole}")],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "20"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "16"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "120000"),
        ],
    );
    let token = suite.admin_token().await;
    let mut client = AuthServiceClient::new(suite.channel_as(&token).await);
    // Each call makes spans; far more than the queue holds.
    let mut slowest = Duration::ZERO;
    for _ in 0..200 {
        let started = Instant::now();
        client
            .who_am_i(kiln_proto::auth::WhoAmIRequest::default())
            .await
            .expect("WhoAmI");
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        !held.lock().unwrap().is_empty(),
        "the exporter connected to the hanging collector (so its export is stuck)"
    );
    // A call that waited for the export would take the two-minute export timeout.
    assert!(
        slowest < Duration::from_secs(10),
        "a call took {slowest:?} while the collector hung"
    );
    suite.terminate();
    suite
        .wait_exit(Duration::from_secs(60))
        .expect("kiln up exits while the collector hangs");
    let log = suite.log();
    let dropped = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "trace spans were dropped")
        .unwrap_or_else(|| panic!("no count of dropped spans in the log:\n{log}"));
    assert!(
        dropped["fields"]["dropped"].as_u64().unwrap_or(0) > 100,
        "200 calls' spans against a queue of 16: {dropped}"
    );
}

#[test]
fn an_otlp_endpoint_that_is_not_a_url_is_refused_at_start_from_the_flag_or_the_file() {
    let data = tempfile::tempdir().expect("tempdir");
    let file = data.path().join("kiln.toml");
    std::fs::write(&file, "[telemetry]\notlp_endpoint = \"collector:4317\"\n").expect("write");
    let flag = ["--otlp-endpoint", "127.0.0.1:4317"];
    let config = ["--config", file.to_str().expect("utf-8")];
    for args in [&flag[..], &config[..]] {
        let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path().join("data"))
            .args(args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("KILN_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .output()
            .expect("kiln runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains("must be an http:// or https:// URL"),
            "{args:?}: {stderr}"
        );
    }
}
