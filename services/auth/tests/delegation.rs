//! ExchangeToken: only the agent's workload may exchange a user's valid credential for
//! a delegated token, which names the user, the agent, the task and the build audience,
//! lives at most the configured maximum, and is ended by every user-wide revocation.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_server::AuthService;
use kiln_rpc::identity::WorkloadId;
use kiln_rpc::token::{AccessClaims, BUILD_AUDIENCE};
use kiln_rpc::{Principal, Role};
use tonic::{Code, Status};

const AGENT: &str = "spiffe://kiln.local/service/agent";

fn workload(uri: &str) -> Principal {
    Principal::workload(&WorkloadId::parse(uri).expect("workload id"))
}

fn request(subject_token: &str) -> pb::ExchangeTokenRequest {
    pb::ExchangeTokenRequest {
        subject_token: subject_token.into(),
        audience: BUILD_AUDIENCE.into(),
        task_id: "task-1".into(),
        workspace_id: Some("ws-1".into()),
        lifetime: Some(prost_types::Duration {
            seconds: 1800,
            nanos: 0,
        }),
    }
}

async fn exchange_as(
    h: &Harness,
    caller: Option<&Principal>,
    message: pb::ExchangeTokenRequest,
) -> Result<pb::ExchangeTokenResponse, Status> {
    h.api
        .exchange_token(req(message, caller, PEER))
        .await
        .map(|r| r.into_inner())
}

async fn exchange(
    h: &Harness,
    message: pb::ExchangeTokenRequest,
) -> Result<pb::ExchangeTokenResponse, Status> {
    exchange_as(h, Some(&workload(AGENT)), message).await
}

async fn claims(h: &Harness, token: &str) -> AccessClaims {
    h.verifier()
        .await
        .verify(token)
        .expect("delegated token verifies")
}

/// The `kid` in a JWT's header.
fn token_kid(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().expect("header");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .expect("base64url");
    let header: serde_json::Value = serde_json::from_slice(&json).expect("json");
    header["kid"].as_str().expect("kid").to_owned()
}

/// A user with `role` and an access token of it.
async fn user_token(h: &Harness, name: &str, role: pb::Role) -> (String, String) {
    let (id, password) = h.user(name, role).await;
    let login = h.login(name, &password).await.expect("login");
    (id, login.access_token)
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn the_agent_exchanges_a_user_token_for_a_delegated_build_token() {
    let h = harness().await;
    let (alice, token) = user_token(&h, "alice", pb::Role::User).await;
    let granted = exchange(&h, request(&token)).await.expect("exchanged");
    let c = claims(&h, &granted.access_token).await;
    let login = claims(&h, &token).await;
    assert_eq!(c.sub, alice);
    assert_eq!(c.name, "alice");
    assert_eq!(c.role, "user");
    assert_eq!(c.aud, BUILD_AUDIENCE);
    assert_eq!(c.act.as_ref().map(|a| a.sub.as_str()), Some(AGENT));
    assert_eq!(c.task.as_deref(), Some("task-1"));
    assert_eq!(c.workspace.as_deref(), Some("ws-1"));
    assert_ne!(c.sid, login.sid, "a delegation has its own id");
    assert!(c.iat_ms > login.iat_ms, "stamped like every other token");
    let now = kiln_rpc::token::unix_now();
    assert!(c.exp >= now + 1790 && c.exp <= now + 1810, "{}", c.exp);
    let principal = granted.principal.expect("principal");
    assert_eq!(
        (principal.user_id.as_str(), principal.actor.as_str()),
        (alice.as_str(), AGENT)
    );
    assert_eq!(principal.session_id, c.sid);
    // The layer's view of it: the user, acting through the agent, scoped to the task.
    let seen = c.principal().expect("known role");
    assert_eq!(seen.actor.as_deref(), Some(AGENT));
    let scope = seen.scope.expect("scope");
    assert_eq!(
        (scope.audience.as_str(), scope.task_id.as_str()),
        (BUILD_AUDIENCE, "task-1")
    );
    assert_eq!(scope.workspace_id.as_deref(), Some("ws-1"));

    let events = h
        .audit(pb::ListAuditEventsRequest {
            action: Some("token.exchange".into()),
            ..Default::default()
        })
        .await;
    let event = events.first().expect("audited");
    assert_eq!(event.outcome, pb::AuditOutcome::Success as i32);
    assert_eq!(
        event.actor.as_ref().map(|a| a.user_id.as_str()),
        Some(AGENT)
    );
    assert_eq!(event.target, format!("user/{alice}"));
    assert_eq!(
        event.details.get("task_id").map(String::as_str),
        Some("task-1")
    );
    assert_eq!(
        event.details.get("subject_user_id").map(String::as_str),
        Some(alice.as_str())
    );
    assert_eq!(event.details.get("delegation_id"), Some(&c.sid));
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn only_the_agent_workload_may_exchange() {
    let h = harness().await;
    let (_, token) = user_token(&h, "alice", pb::Role::User).await;
    let build = workload("spiffe://kiln.local/service/build");
    let err = exchange_as(&h, Some(&build), request(&token))
        .await
        .expect_err("build may not act for users");
    assert_status(&err, Code::PermissionDenied, "ACTOR_NOT_ALLOWED");
    // An end user calling it (were it ever mounted without the layer) is no workload.
    let alice = h.principal(&token).await;
    let err = exchange_as(&h, Some(&alice), request(&token))
        .await
        .expect_err("users may not exchange");
    assert_status(&err, Code::PermissionDenied, "WORKLOAD_IDENTITY_REQUIRED");
    let err = exchange_as(&h, None, request(&token))
        .await
        .expect_err("nobody may exchange");
    assert_eq!(err.code(), Code::Unauthenticated);

    let refused = h
        .audit(pb::ListAuditEventsRequest {
            action: Some("token.exchange".into()),
            ..Default::default()
        })
        .await;
    assert!(
        refused.iter().any(|e| e.reason == "ACTOR_NOT_ALLOWED"
            && e.actor.as_ref().is_some_and(|a| a.username == "build")),
        "{refused:?}"
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_viewer_cannot_delegate_and_an_admin_delegates_only_as_a_user() {
    let h = harness().await;
    let (_, viewer) = user_token(&h, "vera", pb::Role::Viewer).await;
    let err = exchange(&h, request(&viewer)).await.expect_err("viewer");
    assert_status(&err, Code::PermissionDenied, "DELEGATION_ROLE_TOO_LOW");
    let admin = h.login("admin", ADMIN_PASSWORD).await.expect("login");
    let granted = exchange(&h, request(&admin.access_token))
        .await
        .expect("admin delegates");
    assert_eq!(claims(&h, &granted.access_token).await.role, "user");
    assert_eq!(
        granted.principal.expect("principal").role,
        pb::Role::User as i32
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn invalid_expired_revoked_or_delegated_subject_tokens_are_refused() {
    let h = harness().await;
    let (alice, token) = user_token(&h, "alice", pb::Role::User).await;
    let refused = |r: Result<pb::ExchangeTokenResponse, Status>, what: &str| {
        let err = r.expect_err(what);
        assert_status(&err, Code::Unauthenticated, "INVALID_SUBJECT_TOKEN");
    };
    refused(exchange(&h, request("not.a.jwt")).await, "garbage");
    refused(
        exchange(&h, request(&format!("{token}x"))).await,
        "bad signature",
    );
    let delegated = exchange(&h, request(&token))
        .await
        .expect("first")
        .access_token;
    refused(
        exchange(&h, request(&delegated)).await,
        "a delegated subject",
    );

    // Revoked: a logout of the token's own session.
    let (_, other) = user_token(&h, "bob", pb::Role::User).await;
    let bob = h.principal(&other).await;
    h.api
        .logout(req(pb::LogoutRequest::default(), Some(&bob), PEER))
        .await
        .expect("logout");
    refused(exchange(&h, request(&other)).await, "logged out");

    // Disabled user.
    let admin = h.admin().await;
    h.api
        .update_user(req(
            pb::UpdateUserRequest {
                user_id: alice,
                disabled: Some(true),
                ..Default::default()
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect("disabled");
    refused(exchange(&h, request(&token)).await, "disabled");

    // Expired (by kiln-auth's own clock).
    let (_, carol) = user_token(&h, "carol", pb::Role::User).await;
    h.clock
        .advance(h.config.access_ttl + Duration::from_secs(1));
    refused(exchange(&h, request(&carol)).await, "expired");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn an_api_key_delegates_until_it_is_revoked_or_expires() {
    let h = harness().await;
    let (_, token) = user_token(&h, "alice", pb::Role::User).await;
    let alice = h.principal(&token).await;
    let created = h
        .create_key(
            &alice,
            pb::CreateApiKeyRequest {
                name: "ci".into(),
                ttl: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                ..Default::default()
            },
        )
        .await
        .expect("key");
    let granted = exchange(&h, request(&created.key))
        .await
        .expect("key delegates");
    let c = claims(&h, &granted.access_token).await;
    let key_expiry = created
        .api_key
        .as_ref()
        .and_then(|k| k.expires_at)
        .expect("expiry");
    assert_eq!(
        c.exp,
        u64::try_from(key_expiry.seconds).expect("positive"),
        "a delegation never outlives the key it came from"
    );
    let key_id = created.api_key.expect("key").id;
    h.api
        .revoke_api_key(req(
            pb::RevokeApiKeyRequest { api_key_id: key_id },
            Some(&alice),
            PEER,
        ))
        .await
        .expect("revoked");
    let page = h
        .api
        .list_revocations(req(pb::ListRevocationsRequest::default(), None, PEER))
        .await
        .expect("revocations")
        .into_inner();
    assert!(
        page.revocations.iter().any(|r| r.session_id == c.sid),
        "revoking the key ends its delegations: {page:?}"
    );
    let err = exchange(&h, request(&created.key))
        .await
        .expect_err("revoked key");
    assert_status(&err, Code::Unauthenticated, "INVALID_SUBJECT_TOKEN");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn the_lifetime_is_capped_and_the_request_validated() {
    let h = harness().await;
    let (_, token) = user_token(&h, "alice", pb::Role::User).await;
    let max = h.config.delegation_max_lifetime.as_secs();
    assert_eq!(max, 2 * 3600, "the documented default");
    for lifetime in [
        None,
        Some(prost_types::Duration {
            seconds: 10 * 3600,
            nanos: 0,
        }),
    ] {
        let granted = exchange(
            &h,
            pb::ExchangeTokenRequest {
                lifetime,
                ..request(&token)
            },
        )
        .await
        .expect("exchanged");
        let c = claims(&h, &granted.access_token).await;
        assert_eq!(c.exp - c.iat, max, "{lifetime:?}");
    }
    let bad = [
        (
            pb::ExchangeTokenRequest {
                audience: "kiln".into(),
                ..request(&token)
            },
            "audience",
        ),
        (
            pb::ExchangeTokenRequest {
                audience: "kiln-agent".into(),
                ..request(&token)
            },
            "audience",
        ),
        (
            pb::ExchangeTokenRequest {
                task_id: String::new(),
                ..request(&token)
            },
            "task_id",
        ),
        (
            pb::ExchangeTokenRequest {
                workspace_id: Some("x".repeat(129)),
                ..request(&token)
            },
            "workspace_id",
        ),
        (
            pb::ExchangeTokenRequest {
                lifetime: Some(prost_types::Duration::default()),
                ..request(&token)
            },
            "lifetime",
        ),
        (request(""), "subject_token"),
    ];
    for (message, field) in bad {
        let err = exchange(&h, message).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            violations(&err).contains(&field.to_owned()),
            "{field}: {err:?}"
        );
    }
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_demotion_ends_the_delegation_and_is_remembered_as_long_as_it_lives() {
    let h = harness().await;
    let (alice, token) = user_token(&h, "alice", pb::Role::User).await;
    let delegated = exchange(&h, request(&token)).await.expect("exchanged");
    let iat_ms = claims(&h, &delegated.access_token).await.iat_ms;
    let admin = h.admin().await;
    h.api
        .update_user(req(
            pb::UpdateUserRequest {
                user_id: alice.clone(),
                role: Some(pb::Role::Viewer as i32),
                ..Default::default()
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect("demoted");
    // Near the end of the delegation's life the verifiers must still be told.
    h.clock
        .advance(h.config.delegation_max_lifetime - Duration::from_secs(60));
    let page = h
        .api
        .list_revocations(req(pb::ListRevocationsRequest::default(), None, PEER))
        .await
        .expect("revocations")
        .into_inner();
    let retention = page.retention.expect("retention").seconds;
    assert!(
        u64::try_from(retention).expect("positive") >= h.config.delegation_max_lifetime.as_secs(),
        "revocations must outlive delegated tokens: {retention}s"
    );
    let entry = page
        .revocations
        .iter()
        .find(|r| r.user_id == alice && r.session_id.is_empty())
        .expect("the demotion is still published");
    let not_before = entry.not_before.expect("stamp");
    let not_before_ms = u64::try_from(not_before.seconds).expect("positive") * 1000
        + u64::try_from(not_before.nanos).expect("positive") / 1_000_000;
    assert!(iat_ms < not_before_ms, "the delegation is covered");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_delegated_token_keeps_verifying_after_a_key_rotation_until_it_expires() {
    let h = harness().await;
    let (_, token) = user_token(&h, "alice", pb::Role::User).await;
    let delegated = exchange(&h, request(&token)).await.expect("exchanged");
    h.api.rotate_signing_key().await.expect("rotated");
    // Past the access TTL, within the delegation's lifetime (30 min).
    h.clock
        .advance(h.config.access_ttl + Duration::from_secs(120));
    let jwks = h.jwks().await;
    let kid = token_kid(&delegated.access_token);
    assert!(
        jwks.keys.iter().any(|k| k.kid == kid),
        "the signing key of a live delegation is still published"
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_delegated_token_is_not_an_end_user_at_kiln_auth() {
    let h = harness().await;
    let (_, token) = user_token(&h, "alice", pb::Role::User).await;
    let delegated = exchange(&h, request(&token)).await.expect("exchanged");
    let as_agent = h.principal(&delegated.access_token).await;
    assert_eq!(as_agent.role, Some(Role::User));
    let err = h
        .create_key(
            &as_agent,
            pb::CreateApiKeyRequest {
                name: "escape".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("a delegation must not mint a long-lived key");
    assert_status(&err, Code::Unauthenticated, "TOKEN_AUDIENCE_MISMATCH");
}
}
