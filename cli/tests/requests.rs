//! Request handling shared by every RPC: request ids, message size limits, unknown
//! methods.

mod common;

use common::{Suite, reason};
use kiln_proto::auth::LoginRequest;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn a_request_id_sent_is_echoed_on_success_and_on_error() {
    let suite = Suite::start();
    let mut health = HealthClient::new(suite.channel().await);
    let mut request = tonic::Request::new(HealthCheckRequest::default());
    request
        .metadata_mut()
        .insert("x-request-id", "trace-me-42".parse().expect("ascii"));
    let response = health.check(request).await.expect("serving");
    assert_eq!(
        response.metadata().get("x-request-id").expect("echoed"),
        "trace-me-42"
    );

    let mut auth = AuthServiceClient::new(suite.channel().await);
    let mut request = tonic::Request::new(LoginRequest::default());
    request
        .metadata_mut()
        .insert("x-request-id", "login-7".parse().expect("ascii"));
    let status = auth.login(request).await.expect_err("no such user");
    assert_eq!(
        status
            .metadata()
            .get("x-request-id")
            .expect("echoed on errors"),
        "login-7"
    );
}

#[tokio::test]
async fn a_request_without_an_id_gets_a_generated_one() {
    let suite = Suite::start();
    let mut health = HealthClient::new(suite.channel().await);
    let first = health
        .check(HealthCheckRequest::default())
        .await
        .expect("serving");
    let second = health
        .check(HealthCheckRequest::default())
        .await
        .expect("serving");
    let id = |r: &tonic::Response<_>| {
        r.metadata()
            .get("x-request-id")
            .expect("generated")
            .to_str()
            .expect("ascii")
            .to_owned()
    };
    let (a, b) = (id(&first), id(&second));
    assert_eq!(a.len(), 36, "a UUID: {a}");
    assert_eq!(a.matches('-').count(), 4, "a UUID: {a}");
    assert_ne!(a, b, "each request gets its own id");

    // An unusable id (too long) is replaced, not echoed.
    let mut request = tonic::Request::new(HealthCheckRequest::default());
    request
        .metadata_mut()
        .insert("x-request-id", "x".repeat(500).parse().expect("ascii"));
    let response = health.check(request).await.expect("serving");
    assert_eq!(id(&response).len(), 36);
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_refused_and_the_server_keeps_serving() {
    let suite = Suite::start_with(&["--max-message-bytes", "65536"]);
    let mut auth = AuthServiceClient::new(suite.channel().await);
    let status = auth
        .login(LoginRequest {
            username: "alice".into(),
            password: "p".repeat(100_000),
        })
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "MESSAGE_TOO_LARGE");
    assert!(status.message().contains("65536"), "{}", status.message());

    // Just under the limit goes through to the handler (which refuses a password that
    // long), on the same connection.
    let status = auth
        .login(LoginRequest {
            username: "alice".into(),
            password: "p".repeat(60_000),
        })
        .await
        .expect_err("too long a password");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // And the server is still healthy for everyone.
    let mut health = HealthClient::new(suite.channel().await);
    health
        .check(HealthCheckRequest::default())
        .await
        .expect("still serving");
}

#[tokio::test]
async fn an_rpc_this_server_does_not_have_is_unimplemented() {
    let suite = Suite::start();
    let mut grpc = tonic::client::Grpc::new(suite.channel().await);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static("/kiln.auth.v1.AuthService/BecomeAdmin");
    let status = grpc
        .unary::<_, HealthCheckRequest, _>(
            tonic::Request::new(HealthCheckRequest::default()),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("no such RPC");
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(reason(&status), "UNKNOWN_METHOD");
}
