//! Refresh rotation, reuse detection, lifetimes, logout and password changes.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_server::AuthService;
use tonic::Code;

kiln_testkit::both_backends! {
#[tokio::test]
async fn refresh_rotates_the_token_in_the_same_session() {
    let h = harness().await;
    let login = h.login("admin", ADMIN_PASSWORD).await.expect("login");
    let sid = login.principal.expect("p").session_id;
    let next = h.refresh(&login.refresh_token).await.expect("refresh");
    assert_ne!(next.refresh_token, login.refresh_token);
    assert_ne!(next.access_token, login.access_token);
    let principal = next.principal.expect("principal");
    assert_eq!(principal.session_id, sid);
    assert_eq!(principal.username, "admin");
    let claims = h
        .verifier()
        .await
        .verify(&next.access_token)
        .expect("verifies");
    assert_eq!(claims.sid, sid);
    h.refresh(&next.refresh_token).await.expect("chain goes on");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_refresh_token_used_twice_revokes_the_whole_family() {
    let h = harness_with(|c| c.refresh_reuse_grace = Duration::ZERO).await;
    let login = h.login("admin", ADMIN_PASSWORD).await.expect("login");
    let second = h.refresh(&login.refresh_token).await.expect("first use");
    h.clock.advance(Duration::from_millis(10));
    let err = h.refresh(&login.refresh_token).await.expect_err("reuse");
    assert_status(&err, Code::Unauthenticated, "REFRESH_TOKEN_REUSED");
    // The newest token of the family is dead too.
    let err = h
        .refresh(&second.refresh_token)
        .await
        .expect_err("family revoked");
    assert_status(&err, Code::Unauthenticated, "INVALID_REFRESH_TOKEN");
    let events = h
        .audit(pb::ListAuditEventsRequest {
            action: Some("refresh.reuse_detected".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, "REFRESH_TOKEN_REUSED");
    // Another session of the same user is untouched.
    let other = h.login("admin", ADMIN_PASSWORD).await.expect("login");
    h.refresh(&other.refresh_token)
        .await
        .expect("other session");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn reuse_after_the_grace_window_is_theft() {
    let h = harness().await;
    let login = h.login("admin", ADMIN_PASSWORD).await.expect("login");
    h.refresh(&login.refresh_token).await.expect("first use");
    h.clock.advance(Duration::from_secs(6));
    let err = h.refresh(&login.refresh_token).await.expect_err("reuse");
    assert_eq!(reason(&err), "REFRESH_TOKEN_REUSED");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn two_concurrent_refreshes_inside_the_grace_window_both_succeed_in_one_family() {
    let h = harness().await;
    let login = h.login("admin", ADMIN_PASSWORD).await.expect("login");
    let sid = login.principal.expect("p").session_id;
    let (a, b) = tokio::join!(
        h.refresh(&login.refresh_token),
        h.refresh(&login.refresh_token)
    );
    let (a, b) = (a.expect("first"), b.expect("second"));
    assert_ne!(a.refresh_token, b.refresh_token);
    assert_eq!(a.principal.expect("p").session_id, sid);
    assert_eq!(b.principal.expect("p").session_id, sid);
    // Both successors keep working.
    h.refresh(&a.refresh_token).await.expect("a continues");
    h.refresh(&b.refresh_token).await.expect("b continues");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn an_idle_refresh_token_expires() {
    let h = harness_with(|c| c.refresh_idle_ttl = Duration::from_secs(60)).await;
    let login = h.login("admin", ADMIN_PASSWORD).await.expect("login");
    let next = h.refresh(&login.refresh_token).await.expect("fresh");
    h.clock.advance(Duration::from_secs(61));
    let err = h.refresh(&next.refresh_token).await.expect_err("idle");
    assert_status(&err, Code::Unauthenticated, "INVALID_REFRESH_TOKEN");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_session_ends_at_its_absolute_lifetime_however_often_refreshed() {
    let h = harness_with(|c| {
        c.refresh_idle_ttl = Duration::from_secs(60);
        c.refresh_absolute_ttl = Duration::from_secs(150);
    })
    .await;
    let start = kiln_auth::Clock::now(&*h.clock);
    let login = h.login("admin", ADMIN_PASSWORD).await.expect("login");
    let mut token = login.refresh_token;
    for _ in 0..2 {
        h.clock.advance(Duration::from_secs(50));
        let next = h.refresh(&token).await.expect("within both lifetimes");
        token = next.refresh_token;
    }
    // At 100 s the idle expiry would be 160 s, but the session ends at 150 s.
    let last = h.refresh(&token).await.expect("at 100 s");
    let expires = unix(last.refresh_expires_at.as_ref().expect("exp"));
    assert!(
        expires <= start + Duration::from_secs(150),
        "capped at the absolute lifetime"
    );
    h.clock.advance(Duration::from_secs(51));
    let err = h.refresh(&last.refresh_token).await.expect_err("absolute");
    assert_eq!(reason(&err), "INVALID_REFRESH_TOKEN");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn unknown_and_malformed_refresh_tokens_are_refused() {
    let h = harness().await;
    let err = h.refresh("no-such-token").await.expect_err("unknown");
    assert_status(&err, Code::Unauthenticated, "INVALID_REFRESH_TOKEN");
    let err = h.refresh("").await.expect_err("empty");
    assert_eq!(violations(&err), ["refresh_token"]);
    let err = h.refresh(&"x".repeat(1025)).await.expect_err("long");
    assert_eq!(err.code(), Code::InvalidArgument);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn logout_revokes_the_calling_session_only() {
    let h = harness().await;
    let (first, principal) = h.session("admin", ADMIN_PASSWORD).await;
    let second = h.login("admin", ADMIN_PASSWORD).await.expect("second");
    let out = h
        .api
        .logout(req(
            pb::LogoutRequest {
                all_sessions: false,
            },
            Some(&principal),
            PEER,
        ))
        .await
        .expect("logout")
        .into_inner();
    assert_eq!(out.revoked_sessions, 1);
    let err = h
        .refresh(&first.refresh_token)
        .await
        .expect_err("logged out");
    assert_eq!(reason(&err), "INVALID_REFRESH_TOKEN");
    h.refresh(&second.refresh_token)
        .await
        .expect("other session lives");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn logout_of_all_sessions_revokes_every_one() {
    let h = harness().await;
    let (first, principal) = h.session("admin", ADMIN_PASSWORD).await;
    let second = h.login("admin", ADMIN_PASSWORD).await.expect("second");
    let out = h
        .api
        .logout(req(
            pb::LogoutRequest { all_sessions: true },
            Some(&principal),
            PEER,
        ))
        .await
        .expect("logout")
        .into_inner();
    assert_eq!(out.revoked_sessions, 2);
    for token in [&first.refresh_token, &second.refresh_token] {
        h.refresh(token).await.expect_err("revoked");
    }
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn logout_with_an_api_key_needs_all_sessions() {
    let h = harness().await;
    let admin = h.admin().await;
    let key = h
        .create_key(
            &admin,
            pb::CreateApiKeyRequest {
                name: "ci".into(),
                ..Default::default()
            },
        )
        .await
        .expect("key");
    let key_principal = h.key_principal(&key.key).await;
    let err = h
        .api
        .logout(req(
            pb::LogoutRequest {
                all_sessions: false,
            },
            Some(&key_principal),
            PEER,
        ))
        .await
        .expect_err("no session");
    assert_status(&err, Code::FailedPrecondition, "NO_SESSION");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn change_password_checks_the_old_one_and_revokes_other_sessions() {
    let h = harness().await;
    let (_, pw) = h.user("alice", pb::Role::User).await;
    let (current, principal) = h.session("alice", &pw).await;
    let other = h.login("alice", &pw).await.expect("other");
    let change = |old: &str, new: &str| {
        h.api.change_password(req(
            pb::ChangePasswordRequest {
                old_password: old.into(),
                new_password: new.into(),
            },
            Some(&principal),
            PEER,
        ))
    };
    let err = change("wrong-old-password", "new-password-42")
        .await
        .expect_err("wrong old");
    assert_status(&err, Code::Unauthenticated, "INVALID_CREDENTIALS");
    let err = change(&pw, "short").await.expect_err("weak new");
    assert_status(&err, Code::InvalidArgument, "WEAK_PASSWORD");
    assert_eq!(violations(&err), ["new_password"]);
    let err = change(&pw, &pw).await.expect_err("same");
    assert_eq!(violations(&err), ["new_password"]);
    let out = change(&pw, "new-password-42")
        .await
        .expect("changed")
        .into_inner();
    assert_eq!(out.revoked_sessions, 1);
    h.refresh(&other.refresh_token)
        .await
        .expect_err("other session revoked");
    h.refresh(&current.refresh_token)
        .await
        .expect("calling session stays");
    h.login("alice", &pw).await.expect_err("old password gone");
    h.login("alice", "new-password-42")
        .await
        .expect("new password");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn refresh_shows_a_changed_role_and_fails_for_a_disabled_user() {
    let h = harness().await;
    let (id, pw) = h.user("alice", pb::Role::User).await;
    let login = h.login("alice", &pw).await.expect("login");
    let admin = h.admin().await;
    let update =
        |message: pb::UpdateUserRequest| h.api.update_user(req(message, Some(&admin), PEER));
    update(pb::UpdateUserRequest {
        user_id: id.clone(),
        disabled: Some(true),
        ..Default::default()
    })
    .await
    .expect("disable");
    update(pb::UpdateUserRequest {
        user_id: id.clone(),
        disabled: Some(false),
        role: Some(pb::Role::Viewer as i32),
        ..Default::default()
    })
    .await
    .expect("re-enable as viewer");
    // Disabling revoked the session; a new login shows the new role.
    h.refresh(&login.refresh_token)
        .await
        .expect_err("revoked by disable");
    let again = h.login("alice", &pw).await.expect("login");
    let next = h.refresh(&again.refresh_token).await.expect("refresh");
    assert_eq!(next.principal.expect("p").role(), pb::Role::Viewer);
}
}
