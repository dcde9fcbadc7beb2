//! Login: success, and failures that all look alike.

mod common;

use common::*;
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_server::AuthService;
use kiln_rpc::Role;
use tonic::Code;

kiln_testkit::both_backends! {
#[tokio::test]
async fn login_returns_tokens_and_the_principal() {
    let h = harness().await;
    let (id, pw) = h.user("alice", pb::Role::User).await;
    let login = h.login("alice", &pw).await.expect("login");
    let principal = login.principal.clone().expect("principal");
    assert_eq!(principal.user_id, id);
    assert_eq!(principal.username, "alice");
    assert_eq!(principal.role(), pb::Role::User);
    assert_eq!(principal.auth_method(), pb::AuthMethod::Password);
    assert!(!principal.session_id.is_empty());
    assert!(login.refresh_token.len() >= 43, "256-bit refresh token");
    let access_exp = unix(login.access_expires_at.as_ref().expect("exp"));
    let now = h.clock_now();
    let ttl = access_exp.duration_since(now).expect("future");
    assert!(
        ttl <= std::time::Duration::from_secs(15 * 60)
            && ttl >= std::time::Duration::from_secs(14 * 60)
    );
    let claims = h
        .verifier()
        .await
        .verify(&login.access_token)
        .expect("verifies");
    assert_eq!(claims.sub, id);
    assert_eq!(claims.sid, principal.session_id);
    assert_eq!(claims.role, "user");
    assert_eq!(claims.iss, "kiln");
    assert_eq!(claims.aud, "kiln");
    assert!(!claims.jti.is_empty());
    let header = jsonwebtoken_header(&login.access_token);
    assert!(header.contains("\"kid\""), "{header}");
    assert!(header.contains("EdDSA"), "{header}");
}
}

fn jsonwebtoken_header(token: &str) -> String {
    use base64::Engine;
    let head = token.split('.').next().expect("header");
    String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(head)
            .expect("base64"),
    )
    .expect("utf8")
}

trait ClockNow {
    fn clock_now(&self) -> std::time::SystemTime;
}

impl ClockNow for Harness {
    fn clock_now(&self) -> std::time::SystemTime {
        use kiln_auth::Clock;
        self.clock.now()
    }
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn unknown_user_and_wrong_password_get_the_same_answer() {
    let h = harness().await;
    let (_, _) = h.user("alice", pb::Role::User).await;
    let wrong = h
        .login("alice", "not-the-password")
        .await
        .expect_err("wrong");
    let unknown = h
        .login("nobody", "not-the-password")
        .await
        .expect_err("unknown");
    for err in [&wrong, &unknown] {
        assert_status(err, Code::Unauthenticated, "INVALID_CREDENTIALS");
    }
    assert_eq!(wrong.message(), unknown.message());
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn disabled_user_cannot_log_in_and_gets_the_same_answer() {
    let h = harness().await;
    let (id, pw) = h.user("alice", pb::Role::User).await;
    let admin = h.admin().await;
    h.api
        .update_user(req(
            pb::UpdateUserRequest {
                user_id: id,
                disabled: Some(true),
                ..Default::default()
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect("disabled");
    let err = h.login("alice", &pw).await.expect_err("disabled");
    assert_status(&err, Code::Unauthenticated, "INVALID_CREDENTIALS");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn empty_or_oversized_credentials_are_invalid_arguments() {
    let h = harness().await;
    let err = h.login("", "").await.expect_err("empty");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), ["username", "password"]);
    let err = h.login("alice", &"x".repeat(1025)).await.expect_err("long");
    assert_eq!(violations(&err), ["password"]);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn whoami_returns_the_callers_principal_and_expiry() {
    let h = harness().await;
    let (login, principal) = h.session("admin", ADMIN_PASSWORD).await;
    let me = h
        .api
        .who_am_i(req(pb::WhoAmIRequest {}, Some(&principal), PEER))
        .await
        .expect("whoami")
        .into_inner()
        .principal
        .expect("principal");
    assert_eq!(me.username, "admin");
    assert_eq!(me.role(), pb::Role::Admin);
    assert_eq!(me.auth_method(), pb::AuthMethod::AccessToken);
    assert_eq!(me.session_id, login.principal.expect("p").session_id);
    assert_eq!(me.expires_at, login.access_expires_at);
    assert_eq!(principal.role, Some(Role::Admin));
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn whoami_without_a_principal_is_unauthenticated() {
    let h = harness().await;
    let err = h
        .api
        .who_am_i(req(pb::WhoAmIRequest {}, None, PEER))
        .await
        .expect_err("no principal");
    assert_eq!(err.code(), Code::Unauthenticated);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn logins_are_audited_with_outcome_and_peer() {
    let h = harness().await;
    let (id, pw) = h.user("alice", pb::Role::User).await;
    h.login("alice", "wrong-password").await.expect_err("wrong");
    h.login("alice", &pw).await.expect("ok");
    let events = h
        .audit(pb::ListAuditEventsRequest {
            action: Some("login".into()),
            actor_user_id: Some(id.clone()),
            ..Default::default()
        })
        .await;
    assert_eq!(events.len(), 2, "{events:#?}");
    // Newest first.
    assert_eq!(events[0].outcome(), pb::AuditOutcome::Success);
    assert_eq!(events[1].outcome(), pb::AuditOutcome::Failure);
    assert_eq!(events[1].reason, "INVALID_CREDENTIALS");
    for e in &events {
        assert_eq!(e.peer, PEER);
        assert_eq!(e.actor.as_ref().expect("actor").username, "alice");
    }
    let unknown = h.login("ghost", "whatever-pw").await.expect_err("unknown");
    assert_eq!(reason(&unknown), "INVALID_CREDENTIALS");
    let failures = h
        .audit(pb::ListAuditEventsRequest {
            action: Some("login".into()),
            outcome: pb::AuditOutcome::Failure as i32,
            ..Default::default()
        })
        .await;
    assert!(
        failures
            .iter()
            .any(|e| e.actor.as_ref().expect("a").username == "ghost")
    );
}
}
