//! API keys: creation rules, the secret shown once, authentication, revocation, expiry.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_server::AuthService;
use kiln_rpc::Principal;
use tonic::Code;

fn named(name: &str) -> pb::CreateApiKeyRequest {
    pb::CreateApiKeyRequest {
        name: name.into(),
        ..Default::default()
    }
}

/// The secret part of `kiln_<id>_<secret>` (the secret itself may contain `_`).
fn secret_of(created: &pb::CreateApiKeyResponse) -> &str {
    let id = &created.api_key.as_ref().expect("key").id;
    &created.key[format!("kiln_{id}_").len()..]
}

async fn user_session(h: &Harness, name: &str, role: pb::Role) -> Principal {
    let (_, pw) = h.user(name, role).await;
    h.session(name, &pw).await.1
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_key_role_above_the_owners_is_refused() {
    let h = harness().await;
    let alice = user_session(&h, "alice", pb::Role::User).await;
    let err = h
        .create_key(
            &alice,
            pb::CreateApiKeyRequest {
                role: pb::Role::Admin as i32,
                ..named("too much")
            },
        )
        .await
        .expect_err("above owner");
    assert_status(&err, Code::PermissionDenied, "API_KEY_ROLE_TOO_HIGH");
    let ok = h
        .create_key(
            &alice,
            pb::CreateApiKeyRequest {
                role: pb::Role::Viewer as i32,
                ..named("read only")
            },
        )
        .await
        .expect("below owner");
    assert_eq!(ok.api_key.expect("key").role(), pb::Role::Viewer);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_viewer_scoped_key_cannot_mint_a_stronger_key() {
    let h = harness().await;
    let admin = h.admin().await;
    let viewer_key = h
        .create_key(
            &admin,
            pb::CreateApiKeyRequest {
                role: pb::Role::Viewer as i32,
                ..named("viewer")
            },
        )
        .await
        .expect("viewer key");
    let as_key = h.key_principal(&viewer_key.key).await;
    let err = h
        .create_key(
            &as_key,
            pb::CreateApiKeyRequest {
                role: pb::Role::Admin as i32,
                ..named("escalate")
            },
        )
        .await
        .expect_err("escalation");
    assert_eq!(reason(&err), "API_KEY_ROLE_TOO_HIGH");
    let default = h
        .create_key(&as_key, named("default"))
        .await
        .expect("default role");
    assert_eq!(default.api_key.expect("k").role(), pb::Role::Viewer);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn the_secret_is_shown_once_and_authenticates() {
    let h = harness().await;
    let alice = user_session(&h, "alice", pb::Role::User).await;
    let created = h
        .create_key(&alice, named("laptop"))
        .await
        .expect("created");
    let key = created.api_key.clone().expect("resource");
    assert!(
        created.key.starts_with(&format!("kiln_{}_", key.id)),
        "{}",
        created.key
    );
    assert!(created.key.starts_with(&key.prefix));
    assert_eq!(key.role(), pb::Role::User, "defaults to the owner's role");
    let auth = h
        .authenticate_key(&created.key)
        .await
        .expect("authenticates");
    let principal = auth.principal.expect("principal");
    assert_eq!(principal.user_id, alice.subject);
    assert_eq!(principal.username, "alice");
    assert_eq!(principal.role(), pb::Role::User);
    assert_eq!(principal.auth_method(), pb::AuthMethod::ApiKey);
    assert_eq!(principal.api_key_id, key.id);
    assert!(auth.expires_at.is_none());
    // Listing never returns the secret, but shows the last use.
    let listed = h
        .api
        .list_api_keys(req(pb::ListApiKeysRequest::default(), Some(&alice), PEER))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.api_keys.len(), 1);
    assert!(listed.api_keys[0].last_used_at.is_some());
    let debug = format!("{listed:?}");
    let secret = secret_of(&created);
    assert!(!debug.contains(secret));
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_wrong_or_malformed_secret_is_refused() {
    let h = harness().await;
    let admin = h.admin().await;
    let created = h.create_key(&admin, named("k")).await.expect("created");
    let mut tampered = created.key.clone();
    let last = tampered.pop().expect("char");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    for bad in [
        tampered.as_str(),
        "kiln_nope",
        "not-a-key",
        "kiln_0123456789abcdef0123456789abcdef_x",
    ] {
        let err = h.authenticate_key(bad).await.expect_err(bad);
        assert_status(&err, Code::Unauthenticated, "INVALID_API_KEY");
    }
    let err = h
        .authenticate_key(&"k".repeat(257))
        .await
        .expect_err("long");
    assert_eq!(err.code(), Code::InvalidArgument);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_revoked_key_stops_working() {
    let h = harness().await;
    let alice = user_session(&h, "alice", pb::Role::User).await;
    let created = h.create_key(&alice, named("k")).await.expect("created");
    let id = created.api_key.expect("k").id;
    h.authenticate_key(&created.key).await.expect("works");
    let revoked = h
        .api
        .revoke_api_key(req(
            pb::RevokeApiKeyRequest {
                api_key_id: id.clone(),
            },
            Some(&alice),
            PEER,
        ))
        .await
        .expect("revoke")
        .into_inner()
        .api_key
        .expect("key");
    assert!(revoked.revoked_at.is_some());
    let err = h.authenticate_key(&created.key).await.expect_err("revoked");
    assert_status(&err, Code::Unauthenticated, "INVALID_API_KEY");
    // Revoking again succeeds and changes nothing.
    let again = h
        .api
        .revoke_api_key(req(
            pb::RevokeApiKeyRequest { api_key_id: id },
            Some(&alice),
            PEER,
        ))
        .await
        .expect("idempotent")
        .into_inner()
        .api_key
        .expect("key");
    assert_eq!(again.revoked_at, revoked.revoked_at);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_disabled_users_key_stops_working_at_once() {
    let h = harness().await;
    let (id, pw) = h.user("alice", pb::Role::User).await;
    let alice = h.session("alice", &pw).await.1;
    let created = h.create_key(&alice, named("k")).await.expect("created");
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
    let err = h
        .authenticate_key(&created.key)
        .await
        .expect_err("disabled owner");
    assert_status(&err, Code::Unauthenticated, "INVALID_API_KEY");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn an_expired_key_stops_working() {
    let h = harness().await;
    let admin = h.admin().await;
    let created = h
        .create_key(
            &admin,
            pb::CreateApiKeyRequest {
                ttl: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..named("short")
            },
        )
        .await
        .expect("created");
    let auth = h.authenticate_key(&created.key).await.expect("fresh");
    assert!(auth.expires_at.is_some());
    h.clock.advance(Duration::from_secs(61));
    let err = h.authenticate_key(&created.key).await.expect_err("expired");
    assert_eq!(reason(&err), "INVALID_API_KEY");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_negative_or_zero_ttl_is_invalid() {
    let h = harness().await;
    let admin = h.admin().await;
    for seconds in [-5, 0] {
        let err = h
            .create_key(
                &admin,
                pb::CreateApiKeyRequest {
                    ttl: Some(prost_types::Duration { seconds, nanos: 0 }),
                    ..named("bad")
                },
            )
            .await
            .expect_err("bad ttl");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(violations(&err), ["ttl"]);
    }
    let err = h.create_key(&admin, named("")).await.expect_err("no name");
    assert_eq!(violations(&err), ["name"]);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_non_admin_asking_for_another_users_key_gets_not_found() {
    let h = harness().await;
    let alice = user_session(&h, "alice", pb::Role::User).await;
    let bob = user_session(&h, "bob", pb::Role::User).await;
    let created = h
        .create_key(&alice, named("alice's"))
        .await
        .expect("created");
    let id = created.api_key.expect("k").id;
    let err = h
        .api
        .revoke_api_key(req(
            pb::RevokeApiKeyRequest {
                api_key_id: id.clone(),
            },
            Some(&bob),
            PEER,
        ))
        .await
        .expect_err("not bob's");
    assert_eq!(err.code(), Code::NotFound);
    let unknown = h
        .api
        .revoke_api_key(req(
            pb::RevokeApiKeyRequest {
                api_key_id: "nope".into(),
            },
            Some(&bob),
            PEER,
        ))
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), err.code());
    h.authenticate_key(&created.key).await.expect("still works");
    // Naming another user when creating or listing is for admins only.
    let err = h
        .create_key(
            &bob,
            pb::CreateApiKeyRequest {
                user_id: Some(alice.subject.clone()),
                ..named("for alice")
            },
        )
        .await
        .expect_err("not admin");
    assert_status(&err, Code::PermissionDenied, "NOT_ADMIN");
    // An admin may revoke it.
    let admin = h.admin().await;
    h.api
        .revoke_api_key(req(
            pb::RevokeApiKeyRequest { api_key_id: id },
            Some(&admin),
            PEER,
        ))
        .await
        .expect("admin revokes");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn an_admin_creates_keys_for_others_capped_at_their_role() {
    let h = harness().await;
    let admin = h.admin().await;
    let (viewer_id, _) = h.user("vera", pb::Role::Viewer).await;
    let err = h
        .create_key(
            &admin,
            pb::CreateApiKeyRequest {
                user_id: Some(viewer_id.clone()),
                role: pb::Role::User as i32,
                ..named("x")
            },
        )
        .await
        .expect_err("above owner");
    assert_eq!(reason(&err), "API_KEY_ROLE_TOO_HIGH");
    let created = h
        .create_key(
            &admin,
            pb::CreateApiKeyRequest {
                user_id: Some(viewer_id.clone()),
                ..named("x")
            },
        )
        .await
        .expect("created");
    assert_eq!(created.api_key.expect("k").user_id, viewer_id);
    let err = h
        .create_key(
            &admin,
            pb::CreateApiKeyRequest {
                user_id: Some("no-such-user".into()),
                ..named("x")
            },
        )
        .await
        .expect_err("unknown owner");
    assert_eq!(err.code(), Code::NotFound);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_demoted_owner_caps_its_keys() {
    let h = harness().await;
    let (id, pw) = h.user("alice", pb::Role::User).await;
    let alice = h.session("alice", &pw).await.1;
    let created = h.create_key(&alice, named("k")).await.expect("created");
    let admin = h.admin().await;
    h.api
        .update_user(req(
            pb::UpdateUserRequest {
                user_id: id,
                role: Some(pb::Role::Viewer as i32),
                ..Default::default()
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect("demoted");
    let auth = h.authenticate_key(&created.key).await.expect("still valid");
    assert_eq!(auth.principal.expect("p").role(), pb::Role::Viewer);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_retried_create_with_the_same_request_id_returns_the_first_key_without_secret() {
    let h = harness().await;
    let admin = h.admin().await;
    let request_id = "6f1c0e4e-5a8b-4c1d-9f00-0123456789ab".to_string();
    let first = h
        .create_key(
            &admin,
            pb::CreateApiKeyRequest {
                request_id: request_id.clone(),
                ..named("k")
            },
        )
        .await
        .expect("first");
    let second = h
        .create_key(
            &admin,
            pb::CreateApiKeyRequest {
                request_id,
                ..named("k")
            },
        )
        .await
        .expect("retry");
    assert!(!first.key.is_empty());
    assert!(second.key.is_empty());
    assert_eq!(first.api_key.expect("a").id, second.api_key.expect("b").id);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn keys_list_newest_first_in_pages() {
    let h = harness().await;
    let admin = h.admin().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let k = h
            .create_key(&admin, named(&format!("k{i}")))
            .await
            .expect("created");
        ids.push(k.api_key.expect("k").id);
        h.clock.advance(Duration::from_millis(5));
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = h
            .api
            .list_api_keys(req(
                pb::ListApiKeysRequest {
                    page_size: 2,
                    page_token: token,
                    ..Default::default()
                },
                Some(&admin),
                PEER,
            ))
            .await
            .expect("page")
            .into_inner();
        assert!(page.api_keys.len() <= 2);
        seen.extend(page.api_keys.into_iter().map(|k| k.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn key_creation_is_audited() {
    let h = harness().await;
    let admin = h.admin().await;
    let created = h
        .create_key(&admin, named("audited"))
        .await
        .expect("created");
    let id = created.api_key.clone().expect("k").id;
    let events = h
        .audit(pb::ListAuditEventsRequest {
            action: Some("api_key.create".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].target, format!("api_key/{id}"));
    assert_eq!(events[0].outcome(), pb::AuditOutcome::Success);
    let dump = format!("{events:?}");
    assert!(!dump.contains(secret_of(&created)));
}
}
