//! TLS and identity at the edge: client certificates, workload identities for SERVICE
//! RPCs, tokens for signed-in RPCs, PUBLIC RPCs for anyone.

mod common;

use common::{Suite, reason};
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_proto::auth::{AuthenticateApiKeyRequest, GetJwksRequest, LoginRequest, WhoAmIRequest};
use kiln_proto::build::GetPolicyRequest;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::identity::WorkloadId;
use kiln_rpc::pki::CertificateAuthority;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A health check through `client`: the handshake, and one call.
async fn health_through(client: kiln_rpc::client::ClientConfig) -> Result<(), String> {
    let channel = client.connect().await.map_err(|e| e.to_string())?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| s.to_string())
}

/// A client of `suite` presenting the suite's own workload certificate of `service`.
fn as_workload(suite: &Suite, service: &str) -> kiln_rpc::client::ClientConfig {
    let pki = suite.pki();
    suite.client().identity(
        common::read(&pki.workload_cert(service)),
        common::read(&pki.workload_key(service)),
    )
}

fn authenticate_request() -> AuthenticateApiKeyRequest {
    AuthenticateApiKeyRequest {
        key: "kiln_abc_def".into(),
    }
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_fails_the_handshake() {
    let suite = Suite::start();
    let stranger = CertificateAuthority::new("someone else's CA").expect("ca");
    let cert = stranger
        .issue_workload(&WorkloadId {
            trust_domain: "kiln.local".into(),
            service: "build".into(),
        })
        .expect("cert");
    let result = health_through(suite.client().identity(cert.cert_pem, cert.key_pem)).await;
    assert!(
        result.is_err(),
        "a certificate of an untrusted CA must be refused: {result:?}"
    );

    // The same client with the suite's own workload certificate gets through.
    health_through(as_workload(&suite, "build"))
        .await
        .expect("trusted certificate connects");
}

#[tokio::test]
async fn a_client_without_a_certificate_reaches_public_rpcs() {
    let suite = Suite::start();
    let mut auth = AuthServiceClient::new(suite.channel().await);
    // The handler answers (no such user), so the layer let the call through.
    let status = auth
        .login(LoginRequest {
            username: "alice".into(),
            password: "correct horse".into(),
        })
        .await
        .expect_err("no such user");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status), "INVALID_CREDENTIALS");
    let jwks = auth
        .get_jwks(GetJwksRequest::default())
        .await
        .expect("public keys");
    assert!(!jwks.into_inner().keys.is_empty());
}

#[tokio::test]
async fn a_service_rpc_without_a_workload_certificate_is_refused() {
    let suite = Suite::start();
    let mut auth = AuthServiceClient::new(suite.channel().await);
    let status = auth
        .authenticate_api_key(authenticate_request())
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status), "WORKLOAD_IDENTITY_REQUIRED");
}

#[tokio::test]
async fn a_service_rpc_with_a_plain_client_certificate_is_denied() {
    let suite = Suite::start();
    // A certificate of the right CA but without a SPIFFE id: authenticated, not a service.
    let pki = suite.pki();
    let channel = suite
        .client()
        .identity(
            common::read(&pki.server_cert()),
            common::read(&pki.server_key()),
        )
        .connect()
        .await
        .expect("connects");
    let status = AuthServiceClient::new(channel)
        .authenticate_api_key(authenticate_request())
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "WORKLOAD_IDENTITY_REQUIRED");
}

#[tokio::test]
async fn a_service_rpc_with_a_workload_of_another_trust_domain_is_denied() {
    let suite = Suite::start();
    // Signed by the suite's own CA, so the handshake succeeds: only the domain is wrong.
    let pki = suite.pki();
    let ca = CertificateAuthority::load(&suite.ca_pem(), &common::read(&pki.ca_key()))
        .expect("dev CA loads");
    let foreign = ca
        .issue_workload(&WorkloadId {
            trust_domain: "evil.example".into(),
            service: "build".into(),
        })
        .expect("cert");
    let channel = suite
        .client()
        .identity(foreign.cert_pem, foreign.key_pem)
        .connect()
        .await
        .expect("connects");
    let status = AuthServiceClient::new(channel)
        .authenticate_api_key(authenticate_request())
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "WORKLOAD_IDENTITY_REQUIRED");
    assert!(
        status.message().contains("evil.example"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_service_rpc_with_the_suites_workload_certificate_reaches_its_handler() {
    let suite = Suite::start();
    let channel = as_workload(&suite, "agent")
        .connect()
        .await
        .expect("connects");
    // The handler itself answers: the key is unknown.
    let status = AuthServiceClient::new(channel)
        .authenticate_api_key(authenticate_request())
        .await
        .expect_err("unknown key");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status), "INVALID_API_KEY");
}

#[tokio::test]
async fn require_client_cert_refuses_clients_without_one() {
    let suite = Suite::start_with(&["--require-client-cert"]);
    let result = health_through(suite.client()).await;
    assert!(
        result.is_err(),
        "no client certificate must be refused: {result:?}"
    );
    health_through(as_workload(&suite, "build"))
        .await
        .expect("connects with a certificate");
}

#[tokio::test]
async fn signed_in_rpcs_need_a_token() {
    let suite = Suite::start();
    let status = AuthServiceClient::new(suite.channel().await)
        .who_am_i(WhoAmIRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "MISSING_CREDENTIALS");

    let status = BuildServiceClient::new(suite.channel().await)
        .get_policy(GetPolicyRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn garbage_and_oversized_authorization_headers_are_refused() {
    let suite = Suite::start();
    let mut auth = AuthServiceClient::new(suite.channel().await);
    for value in [
        "Basic YWxpY2U6c2VjcmV0".to_owned(),
        "Bearer".to_owned(),
        format!("Bearer {}", "x".repeat(9000)),
    ] {
        let mut request = tonic::Request::new(WhoAmIRequest::default());
        request
            .metadata_mut()
            .insert("authorization", value.parse().expect("ascii"));
        let status = auth.who_am_i(request).await.expect_err("refused");
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{value:.40}: {status:?}"
        );
        assert_eq!(reason(&status), "MALFORMED_CREDENTIALS", "{value:.40}");
    }
}

#[tokio::test]
async fn a_token_not_signed_by_kiln_auth_is_refused() {
    let suite = Suite::start();
    let channel = suite
        .client()
        .token("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.")
        .connect()
        .await
        .expect("connects");
    let status = AuthServiceClient::new(channel)
        .who_am_i(WhoAmIRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "INVALID_TOKEN");
}
