//! The identity layer over real TLS, against a fake kiln-auth whose signing keys the test
//! holds: every way of forging, stretching or misusing a token is tried and must fail
//! with UNAUTHENTICATED (or PERMISSION_DENIED for a role that is too low).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::rig::{Rig, assert_refused, reason, rig, rig_with};
use kiln_proto::auth as pb;
use kiln_rpc::ratelimit::RateLimit;
use kiln_rpc::token::{AccessClaims, Jwks, SigningKey, unix_now};
use tonic::Code;
use tonic_types::StatusExt;

/// A JWT from raw parts (to forge what no honest library would produce).
fn raw_jwt(header: &serde_json::Value, claims: &AccessClaims, signature: &[u8]) -> String {
    let part = |v: &[u8]| URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.{}",
        part(header.to_string().as_bytes()),
        part(serde_json::to_string(claims).expect("json").as_bytes()),
        part(signature)
    )
}

#[tokio::test]
async fn a_valid_token_authenticates_its_principal() {
    let rig = rig().await;
    let token = rig.key.sign(&rig.claims("user")).expect("signed");
    let principal = rig.who_am_i(&token).await.expect("accepted");
    assert_eq!(principal.username, "alice");
    assert_eq!(principal.role, pb::Role::User as i32);
    assert_eq!(principal.session_id, "s-1");
}

#[tokio::test]
async fn alg_none_is_refused() {
    let rig = rig().await;
    let header = serde_json::json!({"alg": "none", "typ": "JWT", "kid": "k1"});
    let token = raw_jwt(&header, &rig.claims("admin"), b"");
    assert_refused(rig.who_am_i(&token).await, "alg none");
    let header = serde_json::json!({"alg": "None", "typ": "JWT", "kid": "k1"});
    assert_refused(
        rig.who_am_i(&raw_jwt(&header, &rig.claims("admin"), b""))
            .await,
        "alg None",
    );
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_is_refused() {
    // Algorithm confusion: the attacker knows the public key from the JWKS and uses it as
    // an HMAC secret, hoping the verifier takes the header's word for the algorithm.
    let rig = rig().await;
    let jwk = rig.key.public_jwk();
    let public_raw = URL_SAFE_NO_PAD.decode(&jwk.x).expect("b64");
    for secret in [public_raw.as_slice(), jwk.x.as_bytes()] {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some("k1".into());
        let token = jsonwebtoken::encode(
            &header,
            &rig.claims("admin"),
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .expect("hs256");
        assert_refused(rig.who_am_i(&token).await, "HS256 with the public key");
    }
}

#[tokio::test]
async fn a_tampered_payload_is_refused() {
    let rig = rig().await;
    let token = rig.key.sign(&rig.claims("viewer")).expect("signed");
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
    claims["role"] = "admin".into();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    );
    assert_refused(rig.who_am_i(&forged).await, "tampered role");
    // And the honest token still works.
    rig.who_am_i(&token).await.expect("original accepted");
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_refused() {
    let rig = rig().await;
    let mut expired = rig.claims("user");
    expired.iat -= 3600;
    expired.nbf -= 3600;
    expired.exp = unix_now() - 60;
    let status = assert_refused(
        rig.who_am_i(&rig.key.sign(&expired).expect("signed")).await,
        "expired",
    );
    assert!(status.message().contains("expired"), "{}", status.message());

    let mut premature = rig.claims("user");
    premature.nbf = unix_now() + 600;
    let status = assert_refused(
        rig.who_am_i(&rig.key.sign(&premature).expect("signed"))
            .await,
        "nbf in the future",
    );
    assert!(
        status.message().contains("not valid yet"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_token_for_another_issuer_or_audience_is_refused() {
    let rig = rig().await;
    let mut claims = rig.claims("user");
    claims.iss = "https://evil.example".into();
    assert_refused(
        rig.who_am_i(&rig.key.sign(&claims).expect("signed")).await,
        "wrong iss",
    );
    let mut claims = rig.claims("user");
    claims.aud = "another-service".into();
    assert_refused(
        rig.who_am_i(&rig.key.sign(&claims).expect("signed")).await,
        "wrong aud",
    );
}

#[tokio::test]
async fn an_unknown_kid_is_refused_and_cannot_hammer_the_jwks_endpoint() {
    let rig = rig_with(|_| {}, |a| a.jwks_min_refresh = Duration::from_millis(300)).await;
    rig.who_am_i(&rig.key.sign(&rig.claims("user")).expect("signed"))
        .await
        .expect("warm-up");
    let before = rig.state.jwks_fetches.load(Ordering::SeqCst);
    let (stranger, _) = SigningKey::generate("k-forged").expect("key");
    let started = std::time::Instant::now();
    for _ in 0..6 {
        let token = stranger.sign(&rig.claims("admin")).expect("signed");
        assert_refused(rig.who_am_i(&token).await, "unknown kid");
    }
    let fetches = rig.state.jwks_fetches.load(Ordering::SeqCst) - before;
    let allowed = 1 + (started.elapsed().as_millis() / 300) as usize;
    assert!(
        fetches <= allowed,
        "{fetches} JWKS fetches in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_freshly_rotated_key_is_accepted_at_once() {
    let rig = rig().await;
    rig.who_am_i(&rig.key.sign(&rig.claims("user")).expect("signed"))
        .await
        .expect("old key");
    // kiln-auth rotates: the JWKS now has the new key and the old one.
    let (next, _) = SigningKey::generate("k2").expect("key");
    rig.state
        .jwks
        .lock()
        .expect("lock")
        .keys
        .insert(0, next.public_jwk());
    rig.who_am_i(&next.sign(&rig.claims("user")).expect("signed"))
        .await
        .expect("new key accepted");
    rig.who_am_i(&rig.key.sign(&rig.claims("user")).expect("signed"))
        .await
        .expect("old key still accepted");
}

#[tokio::test]
async fn a_token_of_a_key_rotated_out_after_its_lifetime_is_refused() {
    let rig = rig().await;
    let (next, _) = SigningKey::generate("k2").expect("key");
    // The old key has left the JWKS (all its tokens should have expired by now).
    *rig.state.jwks.lock().expect("lock") = Jwks {
        keys: vec![next.public_jwk()],
    };
    let mut late = rig.claims("user");
    late.iat -= 7200;
    late.nbf -= 7200;
    late.exp = unix_now() - 3600;
    assert_refused(
        rig.who_am_i(&rig.key.sign(&late).expect("signed")).await,
        "rotated-out key",
    );
    // Even an unexpired token of the old key no longer verifies.
    assert_refused(
        rig.who_am_i(&rig.key.sign(&rig.claims("user")).expect("signed"))
            .await,
        "old key gone",
    );
}

#[tokio::test]
async fn roles_are_enforced_by_the_layer() {
    let rig = rig().await;
    for (role, allowed) in [("viewer", false), ("user", false), ("admin", true)] {
        let token = rig.key.sign(&rig.claims(role)).expect("signed");
        let result = rig
            .client(&token)
            .await
            .create_user(pb::CreateUserRequest::default())
            .await;
        match (allowed, result) {
            (true, Ok(_)) => {}
            (false, Err(status)) => {
                assert_eq!(status.code(), Code::PermissionDenied, "{role}: {status:?}");
                assert_eq!(reason(&status), "INSUFFICIENT_ROLE");
            }
            (allowed, result) => panic!("{role}: allowed={allowed} but got {result:?}"),
        }
    }
}

#[tokio::test]
async fn an_unknown_role_in_a_signed_token_is_refused() {
    let rig = rig().await;
    let token = rig.key.sign(&rig.claims("superuser")).expect("signed");
    assert_refused(rig.who_am_i(&token).await, "unknown role");
}

#[tokio::test]
async fn an_end_users_token_cannot_call_a_service_rpc() {
    let rig = rig().await;
    let token = rig.key.sign(&rig.claims("admin")).expect("signed");
    let status = rig
        .client(&token)
        .await
        .authenticate_api_key(pb::AuthenticateApiKeyRequest {
            key: "kiln_k1_goodsecret".into(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status), "WORKLOAD_IDENTITY_REQUIRED");
}

#[tokio::test]
async fn api_keys_are_resolved_once_and_cached() {
    let rig = rig().await;
    for _ in 0..3 {
        let principal = rig.who_am_i("kiln_k1_goodsecret").await.expect("valid key");
        assert_eq!(principal.role, pb::Role::User as i32);
    }
    assert_eq!(
        rig.state.key_lookups.load(Ordering::SeqCst),
        1,
        "cached after the first look-up"
    );
    for _ in 0..3 {
        assert_refused(rig.who_am_i("kiln_k2_wrongsecret").await, "unknown key");
    }
    assert_eq!(
        rig.state.key_lookups.load(Ordering::SeqCst),
        2,
        "refusals are cached too"
    );
}

/// `kiln_authn_cache_lookups_total` of `kind` and `result`, as exposed.
fn cache_lookups(rig: &Rig, kind: &str, result: &str) -> u64 {
    let series = format!("kiln_authn_cache_lookups_total{{kind=\"{kind}\",result=\"{result}\"}} ");
    let text = kiln_metrics::render(&rig.metrics);
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[tokio::test]
async fn cache_hits_and_misses_are_counted_per_kind() {
    let rig = rig_with(|_| {}, |a| a.api_key_ttl = Duration::from_millis(300)).await;
    for (kind, result) in [
        ("token", "hit"),
        ("token", "miss"),
        ("api_key", "hit"),
        ("api_key", "miss"),
    ] {
        assert_eq!(
            cache_lookups(&rig, kind, result),
            0,
            "{kind} {result} exists at 0"
        );
    }
    // A key: the first look-up asks kiln-auth, the next two are answered from the cache.
    for _ in 0..3 {
        rig.who_am_i("kiln_k1_goodsecret").await.expect("valid key");
    }
    assert_eq!(cache_lookups(&rig, "api_key", "miss"), 1);
    assert_eq!(cache_lookups(&rig, "api_key", "hit"), 2);
    // A refused key is cached too: a miss, then a hit.
    for _ in 0..2 {
        assert_refused(rig.who_am_i("kiln_k2_wrongsecret").await, "unknown key");
    }
    assert_eq!(cache_lookups(&rig, "api_key", "miss"), 2);
    assert_eq!(cache_lookups(&rig, "api_key", "hit"), 3);
    // An expired entry is a miss again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    rig.who_am_i("kiln_k1_goodsecret").await.expect("valid key");
    assert_eq!(cache_lookups(&rig, "api_key", "miss"), 3);
    // Tokens: verified once, then from the cache; a forged one is a miss every time.
    let token = rig.key.sign(&rig.claims("user")).expect("sign");
    for _ in 0..3 {
        rig.who_am_i(&token).await.expect("valid token");
    }
    assert_eq!(cache_lookups(&rig, "token", "miss"), 1);
    assert_eq!(cache_lookups(&rig, "token", "hit"), 2);
    let (other, _) = SigningKey::generate("k1").expect("key");
    let forged = other.sign(&rig.claims("admin")).expect("sign");
    for _ in 0..2 {
        assert_refused(rig.who_am_i(&forged).await, "a token of another key");
    }
    assert_eq!(
        cache_lookups(&rig, "token", "miss"),
        3,
        "refused tokens are not cached"
    );
    assert_eq!(cache_lookups(&rig, "token", "hit"), 2);
    assert_eq!(
        cache_lookups(&rig, "api_key", "hit"),
        3,
        "keys unaffected by tokens"
    );
}

#[tokio::test]
async fn a_revoked_api_key_stops_working_within_the_cache_ttl() {
    let rig = rig_with(|_| {}, |a| a.api_key_ttl = Duration::from_millis(200)).await;
    rig.who_am_i("kiln_k1_goodsecret").await.expect("valid key");
    rig.state.valid_keys.lock().expect("lock").clear(); // revoked in kiln-auth
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_refused(rig.who_am_i("kiln_k1_goodsecret").await, "revoked key");
}

#[tokio::test]
async fn a_caller_over_the_rate_limit_gets_retry_info() {
    let limit = RateLimit {
        per_second: std::num::NonZeroU32::new(1).expect("non-zero"),
        burst: std::num::NonZeroU32::new(3).expect("non-zero"),
    };
    let rig = rig_with(|s| s.rate_limit = Some(limit), |_| {}).await;
    let token = rig.key.sign(&rig.claims("user")).expect("signed");
    let mut client = rig.client(&token).await;
    // The burst always passes; soon after, a call is refused. (Counting to exactly the
    // 4th call would make the test depend on the machine's speed: a stall of a second
    // refills a token.)
    let mut refused = None;
    for call in 0..50 {
        match client.who_am_i(pb::WhoAmIRequest::default()).await {
            Ok(_) => {}
            Err(status) => {
                assert!(
                    call >= 3,
                    "refused within the burst (call {call}): {status:?}"
                );
                refused = Some(status);
                break;
            }
        }
    }
    let status = refused.expect("a caller hammering one method is limited");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "RATE_LIMITED");
    let retry = status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(1),
        "{retry:?}"
    );
    // Another user is not affected; another token of the same user is (the bucket is
    // the verified identity, not the credential).
    let mut claims = rig.claims("viewer");
    let same_user = rig.key.sign(&claims).expect("signed");
    let status = rig.who_am_i(&same_user).await.expect_err("same user");
    assert_eq!(status.code(), Code::ResourceExhausted);
    claims.sub = "u-2".into();
    let other = rig.key.sign(&claims).expect("signed");
    rig.who_am_i(&other).await.expect("other caller");
}
