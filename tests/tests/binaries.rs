//! The per-service binaries, each started alone from files a test PKI wrote, talking to
//! each other over mTLS with their own workload identities:
//! - a build with an API key through kiln-build, which resolves the key at kiln-auth
//!   (a SERVICE RPC, as spiffe://…/service/build);
//! - an agent task started through kiln-agent, which creates its workspace at
//!   kiln-build (as the user) and gets its delegated token from kiln-auth (a SERVICE
//!   RPC that only the agent's identity may call);
//! - identities that are not the caller's own are refused: build's certificate cannot
//!   exchange tokens, a certificate of another trust domain gets no SERVICE RPC, and a
//!   binary started with another service's certificate refuses to start;
//! - each binary serves `[server] metrics_listen`: scraped after the build and the task,
//!   with the series the workload must have moved, and linted by `promtool check
//!   metrics` when promtool is installed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::agent::agent_service_client::AgentServiceClient;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_proto::{agent as agent_pb, auth as auth_pb, build as build_pb};

const ADMIN_PASSWORD: &str = "correct horse battery staple";

use kiln_e2e::services::{Pki, Service, TRUST_DOMAIN, start};
use kiln_e2e::tools::workspace_binary as binary;

/// `GET /metrics` of `service`, as a scraper sends it: the exposition.
fn scrape(service: &Service) -> String {
    let addr = service.metrics.expect("metrics are on");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    if let Some(lint) = kiln_e2e::promtool::check_metrics(body) {
        lint.unwrap_or_else(|problems| panic!("promtool check metrics: {problems}\n{body}"));
    }
    body.to_owned()
}

/// The value of one series (`name{labels}` as exposed); `None` when absent.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
}

fn expect_sample(text: &str, series: &str, value: f64) {
    assert_eq!(sample(text, series), Some(value), "{series} in:\n{text}");
}

/// An OpenAI-compatible model server that lists one model: enough for StartTask (the
/// task's later model calls fail, which this test does not look at).
fn fake_model_server() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let handle = std::thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { break };
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                request.push(byte[0]);
            }
            let body = r#"{"object":"list","data":[{"id":"e2e-model","object":"model"}]}"#;
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, handle)
}

fn code(err: &tonic::Status) -> tonic::Code {
    err.code()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_binary_starts_alone_and_the_three_talk_over_mtls_as_themselves() {
    let pki = Pki::new();
    let auth_certs = pki.workload("auth", TRUST_DOMAIN, "auth");
    let build_certs = pki.workload("build", TRUST_DOMAIN, "build");
    let agent_certs = pki.workload("agent", TRUST_DOMAIN, "agent");
    let foreign = pki.workload("foreign", "elsewhere.test", "build");

    let metrics_on = ("KILN_SERVER__METRICS_LISTEN", "127.0.0.1:0".to_owned());
    let auth = start(
        "auth",
        &pki,
        &auth_certs,
        &[
            ("KILN_ADMIN_PASSWORD", ADMIN_PASSWORD.into()),
            metrics_on.clone(),
        ],
    );
    let peers = |extra: &[(&'static str, String)]| {
        let mut env = vec![
            ("KILN_SERVER__ENDPOINTS__AUTH", auth.endpoint.clone()),
            metrics_on.clone(),
        ];
        env.extend(extra.iter().cloned());
        env
    };
    let build = start("build", &pki, &build_certs, &peers(&[]));
    let (model_url, _model) = fake_model_server();
    let agent = start(
        "agent",
        &pki,
        &agent_certs,
        &peers(&[
            ("KILN_SERVER__ENDPOINTS__BUILD", build.endpoint.clone()),
            ("KILN_AGENT__PROVIDER__BASE_URL", model_url),
        ]),
    );

    // The exec probe of a pod: the service's health over mTLS, as itself.
    for (name, service, certs) in [
        ("auth", &auth, &auth_certs),
        ("build", &build, &build_certs),
        ("agent", &agent, &agent_certs),
    ] {
        let port = service.endpoint.rsplit(':').next().expect("port");
        let probe = Command::new(binary(&format!("kiln-{name}")))
            .arg("--probe")
            .env_remove("KILN_CONFIG")
            .env("KILN_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("KILN_SERVER__TRUST_DOMAIN", TRUST_DOMAIN)
            .env("KILN_SERVER__TLS__CERT", certs.join("tls.crt"))
            .env("KILN_SERVER__TLS__KEY", certs.join("tls.key"))
            .env("KILN_SERVER__TLS__CA", pki.dir.path().join("ca.crt"))
            .output()
            .expect("probe runs");
        assert!(
            probe.status.success() && String::from_utf8_lossy(&probe.stdout).contains("SERVING"),
            "kiln-{name} --probe: {probe:?}"
        );
    }

    // A user: log in at kiln-auth (no client certificate), make an API key.
    let channel = pki
        .client(&auth.endpoint, None)
        .connect()
        .await
        .expect("auth");
    let login = AuthServiceClient::new(channel)
        .login(auth_pb::LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await
        .expect("login")
        .into_inner();
    let channel = pki
        .client(&auth.endpoint, None)
        .token(login.access_token.clone())
        .connect()
        .await
        .expect("auth");
    let key = AuthServiceClient::new(channel)
        .create_api_key(auth_pb::CreateApiKeyRequest {
            name: "e2e".into(),
            ..Default::default()
        })
        .await
        .expect("create key")
        .into_inner()
        .key;

    // A build with the API key: kiln-build asks kiln-auth who the key is, as itself.
    let channel = pki
        .client(&build.endpoint, None)
        .token(key.clone())
        .connect()
        .await
        .expect("build");
    let mut builds = BuildServiceClient::new(channel);
    let workspace = builds
        .create_workspace(build_pb::CreateWorkspaceRequest::default())
        .await
        .expect("workspace through an API key resolved at kiln-auth")
        .into_inner();
    let mut events = builds
        .run_build(build_pb::StartBuildRequest {
            workspace_id: workspace.id.clone(),
            steps: vec![build_pb::Step {
                argv: vec!["echo".into(), "hello from kiln-build".into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .expect("run build")
        .into_inner();
    let mut output = Vec::new();
    let mut finished = None;
    while let Some(event) = events.message().await.expect("event") {
        match event.event {
            Some(build_pb::build_event::Event::Output(o)) => output.extend(o.data),
            Some(build_pb::build_event::Event::Finished(f)) => finished = Some(f),
            _ => {}
        }
    }
    let finished = finished.expect("a Finished event");
    assert_eq!(
        finished.state,
        build_pb::BuildState::Succeeded as i32,
        "{finished:?}"
    );
    assert_eq!(String::from_utf8_lossy(&output), "hello from kiln-build\n");

    // The build as kiln-build's metrics tell it: one RunBuild, one sandbox spawn, the
    // key resolved once at kiln-auth (CreateWorkspace) and then from the cache (RunBuild).
    let text = scrape(&build);
    expect_sample(
        &text,
        r#"kiln_rpc_requests_total{service="kiln.build.v1.BuildService",method="RunBuild",code="OK"}"#,
        1.0,
    );
    expect_sample(
        &text,
        r#"kiln_build_sandbox_spawns_total{outcome="ok"}"#,
        1.0,
    );
    expect_sample(&text, "kiln_build_running", 0.0);
    expect_sample(&text, "kiln_build_output_bytes_total", 22.0);
    expect_sample(
        &text,
        r#"kiln_authn_cache_lookups_total{kind="api_key",result="miss"}"#,
        1.0,
    );
    expect_sample(
        &text,
        r#"kiln_authn_cache_lookups_total{kind="api_key",result="hit"}"#,
        1.0,
    );
    // kiln-auth: the login, and the key resolved for kiln-build.
    let text = scrape(&auth);
    expect_sample(&text, r#"kiln_auth_logins_total{outcome="success"}"#, 1.0);
    expect_sample(
        &text,
        r#"kiln_rpc_requests_total{service="kiln.auth.v1.AuthService",method="AuthenticateApiKey",code="OK"}"#,
        1.0,
    );
    expect_sample(
        &text,
        r#"kiln_authn_cache_lookups_total{kind="token",result="miss"}"#,
        1.0,
    );

    // An agent task: kiln-agent creates its workspace at kiln-build as the user and
    // gets a delegated token from kiln-auth as spiffe://kiln.test/service/agent.
    let channel = pki
        .client(&agent.endpoint, None)
        .token(login.access_token.clone())
        .connect()
        .await
        .expect("agent");
    let task = AgentServiceClient::new(channel)
        .start_task(agent_pb::StartTaskRequest {
            prompt: "print hello".into(),
            toolchain: "python".into(),
            model: "e2e-model".into(),
            ..Default::default()
        })
        .await
        .expect("start a task through kiln-agent → kiln-build and kiln-auth")
        .into_inner();
    assert!(!task.workspace_id.is_empty(), "{task:?}");
    let seen = builds
        .get_workspace(build_pb::GetWorkspaceRequest {
            workspace_id: task.workspace_id.clone(),
        })
        .await
        .expect("the task's workspace exists at kiln-build")
        .into_inner();
    assert_eq!(seen.id, task.workspace_id);

    // kiln-agent's metrics: the StartTask call, and the task, which ends FAILED at its
    // first model call (this model server answers every path with the model list).
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = scrape(&agent);
        let finished = sample(
            &text,
            r#"kiln_agent_tasks_finished_total{phase="FAILED",reason="PROVIDER_ERROR"}"#,
        );
        if finished.is_some() || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    expect_sample(
        &text,
        r#"kiln_agent_tasks_finished_total{phase="FAILED",reason="PROVIDER_ERROR"}"#,
        1.0,
    );
    expect_sample(
        &text,
        r#"kiln_agent_model_calls_total{phase="PLAN",outcome="error"}"#,
        1.0,
    );
    expect_sample(&text, r#"kiln_agent_tasks{phase="PLAN"}"#, 0.0);
    expect_sample(
        &text,
        r#"kiln_rpc_requests_total{service="kiln.agent.v1.AgentService",method="StartTask",code="OK"}"#,
        1.0,
    );

    // Identities are the callers' own. kiln-build's certificate may resolve API keys
    // but not act for users (ExchangeToken is the agent's alone)…
    let as_build = pki
        .client(&auth.endpoint, Some(&build_certs))
        .connect()
        .await
        .expect("auth as build");
    let mut auth_as_build = AuthServiceClient::new(as_build);
    let resolved = auth_as_build
        .authenticate_api_key(auth_pb::AuthenticateApiKeyRequest { key: key.clone() })
        .await
        .expect("build may resolve API keys");
    assert!(resolved.into_inner().principal.is_some());
    let refused = auth_as_build
        .exchange_token(auth_pb::ExchangeTokenRequest {
            subject_token: login.access_token.clone(),
            audience: "kiln-build".into(),
            task_id: "t".into(),
            ..Default::default()
        })
        .await
        .expect_err("build is not the agent");
    assert_eq!(code(&refused), tonic::Code::PermissionDenied, "{refused:?}");

    // …a workload of another trust domain (same CA) gets no SERVICE RPC…
    let foreign_channel = pki
        .client(&auth.endpoint, Some(&foreign))
        .connect()
        .await
        .expect("TLS itself is fine: the CA is trusted");
    let refused = AuthServiceClient::new(foreign_channel)
        .authenticate_api_key(auth_pb::AuthenticateApiKeyRequest { key })
        .await
        .expect_err("another trust domain");
    assert!(
        matches!(
            code(&refused),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        ),
        "{refused:?}"
    );

    // …and no anonymous caller either.
    let anonymous = pki
        .client(&auth.endpoint, None)
        .connect()
        .await
        .expect("auth");
    let refused = AuthServiceClient::new(anonymous)
        .authenticate_api_key(auth_pb::AuthenticateApiKeyRequest {
            key: "kiln_x".into(),
        })
        .await
        .expect_err("no workload certificate");
    assert!(
        matches!(
            code(&refused),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        ),
        "{refused:?}"
    );
    drop((agent, build, auth));
}

#[test]
fn a_binary_given_another_services_certificate_refuses_to_start() {
    let pki = Pki::new();
    let auth_certs = pki.workload("auth", TRUST_DOMAIN, "auth");
    let output = Command::new(binary("kiln-build"))
        .env_remove("KILN_CONFIG")
        .env("KILN_SERVER__LISTEN", "127.0.0.1:0")
        .env("KILN_SERVER__DATA_DIR", pki.dir.path().join("data"))
        .env("KILN_SERVER__TRUST_DOMAIN", TRUST_DOMAIN)
        .env("KILN_SERVER__TLS__CERT", auth_certs.join("tls.crt"))
        .env("KILN_SERVER__TLS__KEY", auth_certs.join("tls.key"))
        .env("KILN_SERVER__TLS__CA", pki.dir.path().join("ca.crt"))
        .env("KILN_SERVER__ENDPOINTS__AUTH", "https://localhost:1")
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("spiffe://kiln.test/service/auth")
            && stderr.contains("spiffe://kiln.test/service/build"),
        "{stderr}"
    );
}

#[test]
fn a_typo_in_the_environment_is_refused_by_name() {
    let output = Command::new(binary("kiln-auth"))
        .env_remove("KILN_CONFIG")
        .env("KILN_AUTH__ACCESS_TOKEN_TLL", "5m")
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("access_token_tll"), "{stderr}");
}
