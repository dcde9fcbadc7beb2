//! Revocation reaches access tokens (DESIGN §3.1): after each way of revoking, the old
//! access token is refused by kiln-auth and by kiln-build (which verifies tokens through
//! the JWKS and the revocations it polls, like a standalone service) within the bound of
//! 3 s, while the tokens that should survive keep working.

mod common;

use std::time::Duration;

use common::{Suite, reason};
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_proto::build as build_pb;
use kiln_proto::build::build_service_client::BuildServiceClient;
use tonic::Code;

/// What kiln-auth and kiln-build say to `token`: `Ok` or the refusal's reason.
async fn answers(suite: &Suite, token: &str) -> (Result<(), String>, Result<(), String>) {
    let channel = suite.channel_as(token).await;
    let refused = |s: tonic::Status| {
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
        reason(&s)
    };
    let auth = AuthServiceClient::new(channel.clone())
        .who_am_i(pb::WhoAmIRequest::default())
        .await
        .map(drop)
        .map_err(refused);
    let build = BuildServiceClient::new(channel)
        .get_policy(build_pb::GetPolicyRequest::default())
        .await
        .map(drop)
        .map_err(refused);
    (auth, build)
}

/// Waits until both services refuse `token` as revoked. The bound is 3 s; the loop
/// allows far more, so only a token that is never refused fails the test.
async fn refused_everywhere(suite: &Suite, token: &str, what: &str) {
    for _ in 0..200 {
        match answers(suite, token).await {
            (Err(a), Err(b)) => {
                assert_eq!((a.as_str(), b.as_str()), ("TOKEN_REVOKED", "TOKEN_REVOKED"));
                return;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    panic!("{what}: the old token still works");
}

async fn accepted_everywhere(suite: &Suite, token: &str, what: &str) {
    assert_eq!(answers(suite, token).await, (Ok(()), Ok(())), "{what}");
}

async fn admin(suite: &Suite) -> AuthServiceClient<kiln_rpc::client::KilnChannel> {
    AuthServiceClient::new(suite.channel_as(&suite.admin_token().await).await)
}

async fn user_id(suite: &Suite, token: &str) -> String {
    AuthServiceClient::new(suite.channel_as(token).await)
        .who_am_i(pb::WhoAmIRequest::default())
        .await
        .expect("whoami")
        .into_inner()
        .principal
        .expect("principal")
        .user_id
}

#[tokio::test]
async fn admin_changes_to_a_user_end_its_access_tokens_everywhere() {
    let suite = Suite::start();
    let mut admin = admin(&suite).await;
    for (name, change) in ["deleted", "disabled", "reset", "revoked"]
        .into_iter()
        .enumerate()
    {
        let username = format!("victim{name}");
        let token = suite.user_token(&username, pb::Role::User).await;
        accepted_everywhere(&suite, &token, change).await;
        let id = user_id(&suite, &token).await;
        match change {
            "deleted" => drop(
                admin
                    .delete_user(pb::DeleteUserRequest { user_id: id })
                    .await
                    .expect("deleted"),
            ),
            "disabled" => drop(
                admin
                    .update_user(pb::UpdateUserRequest {
                        user_id: id,
                        disabled: Some(true),
                        ..Default::default()
                    })
                    .await
                    .expect("disabled"),
            ),
            "reset" => drop(
                admin
                    .update_user(pb::UpdateUserRequest {
                        user_id: id,
                        password: Some("a-brand-new-password-1".into()),
                        ..Default::default()
                    })
                    .await
                    .expect("password reset"),
            ),
            _ => drop(
                admin
                    .revoke_user_sessions(pb::RevokeUserSessionsRequest {
                        user_id: id,
                        revoke_api_keys: false,
                    })
                    .await
                    .expect("sessions revoked"),
            ),
        }
        refused_everywhere(&suite, &token, change).await;
    }
}

#[tokio::test]
async fn a_demoted_admin_cannot_use_its_old_token_to_create_an_admin() {
    let suite = Suite::start();
    let password = suite.create_user("boss", pb::Role::Admin).await;
    let (token, _) = suite.login("boss", &password).await.expect("login");
    let id = user_id(&suite, &token).await;
    admin(&suite)
        .await
        .update_user(pb::UpdateUserRequest {
            user_id: id,
            role: Some(pb::Role::Viewer as i32),
            ..Default::default()
        })
        .await
        .expect("demoted");
    refused_everywhere(&suite, &token, "demotion").await;
    let status = AuthServiceClient::new(suite.channel_as(&token).await)
        .create_user(pb::CreateUserRequest {
            username: "sleeper".into(),
            password: "sleeper-password-123".into(),
            role: pb::Role::Admin as i32,
            ..Default::default()
        })
        .await
        .expect_err("the old admin token creates nobody");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "TOKEN_REVOKED");
    // A fresh login carries the new role and works (as a viewer).
    let (fresh, _) = suite.login("boss", &password).await.expect("login");
    accepted_everywhere(&suite, &fresh, "fresh token after the demotion").await;
}

#[tokio::test]
async fn logout_and_password_change_end_exactly_the_right_sessions() {
    let suite = Suite::start();
    let password = suite.create_user("pat", pb::Role::User).await;
    let (a, _) = suite.login("pat", &password).await.expect("session a");
    let (b, _) = suite.login("pat", &password).await.expect("session b");
    let (c, _) = suite.login("pat", &password).await.expect("session c");

    // Logout of session a ends a only.
    AuthServiceClient::new(suite.channel_as(&a).await)
        .logout(pb::LogoutRequest::default())
        .await
        .expect("logout");
    refused_everywhere(&suite, &a, "logout").await;
    accepted_everywhere(&suite, &b, "another session survives a logout").await;

    // A password change from session b ends c, and keeps b (the caller's session).
    AuthServiceClient::new(suite.channel_as(&b).await)
        .change_password(pb::ChangePasswordRequest {
            old_password: password.clone(),
            new_password: "pats-new-password-42".into(),
        })
        .await
        .expect("password changed");
    refused_everywhere(&suite, &c, "password change").await;
    accepted_everywhere(&suite, &b, "the caller's session survives its change").await;
    let (d, _) = suite
        .login("pat", "pats-new-password-42")
        .await
        .expect("new password");
    accepted_everywhere(&suite, &d, "a login after the change").await;
}
