//! kiln-auth through the whole suite, over real TLS: the ordinary flows and the attacks
//! people actually try (each its own test).

mod common;

use std::time::Duration;

use common::{ADMIN_PASSWORD, Suite, reason};
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_proto::build as build_pb;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::KilnChannel;
use tonic::Code;
use tonic_types::StatusExt;

async fn auth_as(suite: &Suite, token: &str) -> AuthServiceClient<KilnChannel> {
    AuthServiceClient::new(suite.channel_as(token).await)
}

#[tokio::test]
async fn login_whoami_refresh_and_logout() {
    let suite = Suite::start();
    let (access, refresh) = suite.login("admin", ADMIN_PASSWORD).await.expect("logs in");
    let me = auth_as(&suite, &access)
        .await
        .who_am_i(pb::WhoAmIRequest::default())
        .await
        .expect("whoami");
    let principal = me.into_inner().principal.expect("principal");
    assert_eq!(principal.username, "admin");
    assert_eq!(principal.role, pb::Role::Admin as i32);

    let mut anonymous = AuthServiceClient::new(suite.channel().await);
    let renewed = anonymous
        .refresh(pb::RefreshRequest {
            refresh_token: refresh.clone(),
        })
        .await
        .expect("refresh")
        .into_inner();
    assert_ne!(renewed.refresh_token, refresh, "the refresh token rotates");
    auth_as(&suite, &renewed.access_token)
        .await
        .who_am_i(pb::WhoAmIRequest::default())
        .await
        .expect("new token works");

    auth_as(&suite, &renewed.access_token)
        .await
        .logout(pb::LogoutRequest::default())
        .await
        .expect("logout");
    let status = anonymous
        .refresh(pb::RefreshRequest {
            refresh_token: renewed.refresh_token,
        })
        .await
        .expect_err("session ended");
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_refresh_token_used_twice_revokes_its_whole_family() {
    let suite = Suite::start_with(&["--refresh-reuse-grace-ms", "0"]);
    let (_, first) = suite.login("admin", ADMIN_PASSWORD).await.expect("logs in");
    let mut anonymous = AuthServiceClient::new(suite.channel().await);
    let second = anonymous
        .refresh(pb::RefreshRequest {
            refresh_token: first.clone(),
        })
        .await
        .expect("first use")
        .into_inner()
        .refresh_token;
    // The stolen copy of the first token is replayed: theft.
    let status = anonymous
        .refresh(pb::RefreshRequest {
            refresh_token: first,
        })
        .await
        .expect_err("reuse");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "REFRESH_TOKEN_REUSED");
    // The whole family is gone, including the legitimate newest token.
    let status = anonymous
        .refresh(pb::RefreshRequest {
            refresh_token: second,
        })
        .await
        .expect_err("family revoked");
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn two_concurrent_refreshes_inside_the_grace_window_both_succeed() {
    let suite = Suite::start();
    let (_, refresh) = suite.login("admin", ADMIN_PASSWORD).await.expect("logs in");
    let mut a = AuthServiceClient::new(suite.channel().await);
    let mut b = AuthServiceClient::new(suite.channel().await);
    let (ra, rb) = tokio::join!(
        a.refresh(pb::RefreshRequest {
            refresh_token: refresh.clone()
        }),
        b.refresh(pb::RefreshRequest {
            refresh_token: refresh.clone()
        }),
    );
    let (ra, rb) = (
        ra.expect("first").into_inner(),
        rb.expect("second").into_inner(),
    );
    // Both new access tokens belong to the same session.
    let sid = |token: &str| {
        let claims = token.split('.').nth(1).expect("jwt");
        use base64::Engine;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .expect("b64");
        serde_json::from_slice::<serde_json::Value>(&json).expect("json")["sid"]
            .as_str()
            .expect("sid")
            .to_owned()
    };
    assert_eq!(sid(&ra.access_token), sid(&rb.access_token), "one family");
}

#[tokio::test]
async fn brute_force_on_one_account_locks_it_with_the_same_answer_for_unknown_users() {
    let suite = Suite::start();
    let mut anonymous = AuthServiceClient::new(suite.channel().await);
    let channel = anonymous.clone();
    let attempt = |username: &'static str| {
        let mut client = channel.clone();
        async move {
            client
                .login(pb::LoginRequest {
                    username: username.into(),
                    password: "wrong-password-guess".into(),
                })
                .await
                .expect_err("wrong password")
        }
    };
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(attempt("admin").await);
    }
    assert_eq!(codes[0].code(), Code::Unauthenticated);
    assert_eq!(reason(&codes[0]), "INVALID_CREDENTIALS");
    let locked = codes.last().expect("six attempts");
    assert_eq!(locked.code(), Code::ResourceExhausted, "{locked:?}");
    assert!(
        locked
            .get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay)
            .is_some(),
        "RetryInfo"
    );
    // Now even the right password is refused until the lockout ends.
    let status = anonymous
        .login(pb::LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await
        .expect_err("locked");
    assert_eq!(status.code(), Code::ResourceExhausted);

    // An unknown user looks exactly the same: same first answer, same lockout.
    let unknown: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(attempt("nobody-here").await);
        }
        v
    };
    assert_eq!(unknown[0].code(), codes[0].code());
    assert_eq!(unknown[0].message(), codes[0].message());
    assert_eq!(reason(&unknown[0]), reason(&codes[0]));
    assert_eq!(unknown[5].code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn a_user_calling_an_admin_rpc_and_a_viewer_calling_a_user_rpc_are_denied() {
    let suite = Suite::start();
    let alice = suite.user_token("alice", pb::Role::User).await;
    let status = auth_as(&suite, &alice)
        .await
        .list_users(pb::ListUsersRequest::default())
        .await
        .expect_err("not an admin");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "INSUFFICIENT_ROLE");

    let vera = suite.user_token("vera", pb::Role::Viewer).await;
    let status = BuildServiceClient::new(suite.channel_as(&vera).await)
        .start_build(build_pb::StartBuildRequest::default())
        .await
        .expect_err("viewers change nothing");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "INSUFFICIENT_ROLE");
}

#[tokio::test]
async fn an_api_key_cannot_have_a_higher_role_than_its_owner() {
    let suite = Suite::start();
    let alice = suite.user_token("alice", pb::Role::User).await;
    let status = auth_as(&suite, &alice)
        .await
        .create_api_key(pb::CreateApiKeyRequest {
            name: "sneaky".into(),
            role: pb::Role::Admin as i32,
            ..Default::default()
        })
        .await
        .expect_err("above the owner's role");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "API_KEY_ROLE_TOO_HIGH");
}

async fn create_key(suite: &Suite, token: &str) -> (String, String) {
    let created = auth_as(suite, token)
        .await
        .create_api_key(pb::CreateApiKeyRequest {
            name: "ci".into(),
            role: pb::Role::User as i32,
            ..Default::default()
        })
        .await
        .expect("key created")
        .into_inner();
    (created.key, created.api_key.expect("resource").id)
}

async fn whoami_with(suite: &Suite, key: &str) -> Result<pb::Principal, tonic::Status> {
    let response = auth_as(suite, key)
        .await
        .who_am_i(pb::WhoAmIRequest::default())
        .await?;
    Ok(response.into_inner().principal.expect("principal"))
}

#[tokio::test]
async fn a_revoked_api_key_stops_working_within_the_cache_ttl() {
    let suite = Suite::start_with(&["--api-key-cache-ms", "200"]);
    let alice = suite.user_token("alice", pb::Role::User).await;
    let (key, id) = create_key(&suite, &alice).await;
    let principal = whoami_with(&suite, &key).await.expect("key works");
    assert_eq!(principal.auth_method, pb::AuthMethod::ApiKey as i32);
    auth_as(&suite, &alice)
        .await
        .revoke_api_key(pb::RevokeApiKeyRequest { api_key_id: id })
        .await
        .expect("revoked");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = whoami_with(&suite, &key).await.expect_err("revoked key");
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_disabled_users_key_and_login_stop_working() {
    let suite = Suite::start_with(&["--api-key-cache-ms", "200"]);
    let alice = suite.user_token("alice", pb::Role::User).await;
    let (key, _) = create_key(&suite, &alice).await;
    let alice_id = whoami_with(&suite, &key).await.expect("key works").user_id;
    auth_as(&suite, &suite.admin_token().await)
        .await
        .update_user(pb::UpdateUserRequest {
            user_id: alice_id,
            disabled: Some(true),
            ..Default::default()
        })
        .await
        .expect("disabled");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = whoami_with(&suite, &key).await.expect_err("disabled owner");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = suite
        .login("alice", "alice-password-123")
        .await
        .expect_err("disabled");
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn an_end_users_token_cannot_call_a_service_rpc() {
    let suite = Suite::start();
    let admin = suite.admin_token().await;
    let status = auth_as(&suite, &admin)
        .await
        .authenticate_api_key(pb::AuthenticateApiKeyRequest {
            key: "kiln_0_x".into(),
        })
        .await
        .expect_err("services only");
    assert_eq!(reason(&status), "WORKLOAD_IDENTITY_REQUIRED");
}

#[tokio::test]
async fn password_rules_hold_at_their_boundaries_over_the_wire() {
    let suite = Suite::start();
    let mut admin = auth_as(&suite, &suite.admin_token().await).await;
    let create = |password: String| pb::CreateUserRequest {
        username: "bob-the-builder".into(),
        password,
        role: pb::Role::User as i32,
        ..Default::default()
    };
    for bad in [
        "nine-char".to_owned(),
        "x".repeat(1025),
        "BOB-THE-BUILDER".to_owned(),
    ] {
        let status = admin
            .create_user(create(bad.clone()))
            .await
            .expect_err("weak password");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{bad:.20}: {status:?}"
        );
        let bad_request = status
            .get_error_details()
            .bad_request()
            .cloned()
            .expect("field violations");
        assert!(
            bad_request
                .field_violations
                .iter()
                .any(|v| v.field == "password"),
            "{bad_request:?}"
        );
    }
    admin
        .create_user(create("ten-chars!".into()))
        .await
        .expect("exactly 10 characters is fine");
}

#[tokio::test]
async fn signing_key_rotation_fails_no_request() {
    let suite = Suite::start();
    let admin = suite.admin_token().await;
    let (access, _) = suite.login("admin", ADMIN_PASSWORD).await.expect("logs in");
    // A client keeps calling a service with its token while the key rotates twice.
    let caller = {
        let channel = suite.channel_as(&access).await;
        tokio::spawn(async move {
            let mut build = BuildServiceClient::new(channel);
            let mut failures = Vec::new();
            for _ in 0..200 {
                if let Err(status) = build
                    .get_policy(build_pb::GetPolicyRequest::default())
                    .await
                    && status.code() == Code::Unauthenticated
                {
                    failures.push(status);
                }
            }
            failures
        })
    };
    let mut auth = auth_as(&suite, &admin).await;
    let first = auth
        .rotate_signing_key(pb::RotateSigningKeyRequest::default())
        .await
        .expect("rotated")
        .into_inner();
    // A token of the new key is accepted at once by every service.
    let (fresh, _) = suite.login("admin", ADMIN_PASSWORD).await.expect("logs in");
    let header = fresh.split('.').next().expect("jwt");
    use base64::Engine;
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .expect("b64"),
    )
    .expect("json");
    assert_eq!(header["kid"], first.key_id.as_str());
    let status = BuildServiceClient::new(suite.channel_as(&fresh).await)
        .get_policy(build_pb::GetPolicyRequest::default())
        .await;
    assert!(
        !matches!(&status, Err(s) if s.code() == Code::Unauthenticated),
        "{status:?}"
    );
    auth.rotate_signing_key(pb::RotateSigningKeyRequest::default())
        .await
        .expect("rotated again");
    let failures = caller.await.expect("join");
    assert!(
        failures.is_empty(),
        "requests failed during rotation: {failures:?}"
    );
    // The old token still verifies: its key stays in the JWKS until it expires.
    let jwks = auth
        .get_jwks(pb::GetJwksRequest::default())
        .await
        .expect("jwks")
        .into_inner();
    assert!(
        jwks.keys.len() >= 3,
        "current + two previous keys: {:?}",
        jwks.keys.iter().map(|k| &k.kid).collect::<Vec<_>>()
    );
}
