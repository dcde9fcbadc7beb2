//! Signing keys: JWKS, rotation on demand and on schedule, retirement.

mod common;

use std::time::Duration;

use common::*;
use kiln_rpc::token::TokenError;

kiln_testkit::both_backends! {
#[tokio::test]
async fn jwks_serves_the_current_ed25519_key_with_issuer_and_audience() {
    let h = harness().await;
    let jwks = h.jwks().await;
    assert_eq!(jwks.keys.len(), 1);
    let key = &jwks.keys[0];
    assert_eq!(
        (
            key.kty.as_str(),
            key.crv.as_str(),
            key.alg.as_str(),
            key.r#use.as_str()
        ),
        ("OKP", "Ed25519", "EdDSA", "sig")
    );
    assert_eq!(key.kid, h.api.current_key_id());
    assert_eq!(
        (jwks.issuer.as_str(), jwks.audience.as_str()),
        ("kiln", "kiln")
    );
    let json: serde_json::Value = serde_json::from_str(&jwks.jwks_json).expect("json");
    assert_eq!(json["keys"][0]["kid"], key.kid.as_str());
    assert!(json["keys"][0].get("d").is_none(), "no private part");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn rotation_keeps_the_old_key_until_its_tokens_expire() {
    let h = harness().await;
    let old_kid = h.api.current_key_id();
    let before = h.login("admin", ADMIN_PASSWORD).await.expect("login");
    let new_kid = h.api.rotate_signing_key().await.expect("rotated");
    assert_ne!(old_kid, new_kid);
    let after = h.login("admin", ADMIN_PASSWORD).await.expect("login");
    let jwks = h.jwks().await;
    let kids: Vec<_> = jwks.keys.iter().map(|k| k.kid.clone()).collect();
    assert_eq!(kids, [new_kid, old_kid.clone()], "current key first");
    let verifier = h.verifier().await;
    verifier
        .verify(&before.access_token)
        .expect("old key's token verifies");
    verifier
        .verify(&after.access_token)
        .expect("new key's token verifies");
    // Just before the old key's last token expires (+ leeway) it is still published.
    // The longest token it may have signed is a delegated one (2 h by default), not
    // an access token (15 min).
    let longest = h.config.max_token_lifetime();
    assert_eq!(longest, Duration::from_secs(2 * 3600));
    h.clock.advance(longest + Duration::from_secs(4));
    assert!(h.verifier().await.knows(&old_kid));
    h.clock.advance(Duration::from_secs(2));
    let verifier = h.verifier().await;
    assert!(!verifier.knows(&old_kid));
    assert_eq!(
        verifier.verify(&before.access_token),
        Err(TokenError::UnknownKey)
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn keys_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = std::sync::Arc::new(kiln_auth::ManualClock::new());
    let config = test_config(dir.path(), &clock).await;
    let api = kiln_auth::AuthApi::open(config.clone())
        .await
        .expect("open");
    let kid = api.current_key_id();
    api.close().await;
    drop(api);
    let again = kiln_auth::AuthApi::open(config).await.expect("reopen");
    assert_eq!(again.current_key_id(), kid);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_key_older_than_the_interval_is_rotated_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = std::sync::Arc::new(kiln_auth::ManualClock::new());
    let config = test_config(dir.path(), &clock).await;
    let api = kiln_auth::AuthApi::open(config.clone())
        .await
        .expect("open");
    let kid = api.current_key_id();
    api.close().await;
    drop(api);
    clock.advance(Duration::from_secs(25 * 3600));
    let again = kiln_auth::AuthApi::open(config).await.expect("reopen");
    assert_ne!(again.current_key_id(), kid);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn the_schedule_rotates_a_due_key() {
    let h = harness_with(|c| {
        c.key_rotation_interval = Duration::from_secs(3600);
        c.key_rotation_check = Duration::from_millis(20);
    })
    .await;
    let kid = h.api.current_key_id();
    h.clock.advance(Duration::from_secs(3601));
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while h.api.current_key_id() == kid {
        assert!(
            std::time::Instant::now() < deadline,
            "not rotated by the schedule"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.jwks().await.keys.len(), 2);
}
}
