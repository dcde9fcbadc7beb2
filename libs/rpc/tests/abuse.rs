//! Attacks on the identity layer that are not forgeries: revoked tokens used anyway, a
//! verifier cut off from kiln-auth, floods of random key ids and of junk credentials.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::rig::{reason, rig_with};
use kiln_proto::auth as pb;
use kiln_rpc::ratelimit::RateLimit;
use kiln_rpc::token::SigningKey;
use tonic::Code;

/// Polls `check` until it is true; a bound far above the documented 3 s, so only a
/// verifier that never learns the revocation fails.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never: {what}");
}

fn revocation(user: &str, sid: &str, not_before_ms: u64, keep: &str) -> pb::TokenRevocation {
    pb::TokenRevocation {
        user_id: user.into(),
        session_id: sid.into(),
        not_before: Some(prost_types::Timestamp::from(
            std::time::UNIX_EPOCH + Duration::from_millis(not_before_ms),
        )),
        keep_session_id: keep.into(),
    }
}

#[tokio::test]
async fn revoked_sessions_and_users_are_refused_and_other_sessions_survive() {
    let rig = rig_with(|_| {}, |a| a.revocation_poll = Duration::from_millis(50)).await;
    let mut claims = rig.claims("admin");
    let s1 = rig.key.sign(&claims).expect("signed");
    claims.sid = "s-2".into();
    claims.jti = "j-2".into();
    let s2 = rig.key.sign(&claims).expect("signed");
    rig.who_am_i(&s1).await.expect("s-1 works");
    rig.who_am_i(&s2).await.expect("s-2 works");

    // Logout of s-1: s-1 is refused (also from the verified-token cache), s-2 is not.
    rig.state
        .revocations
        .lock()
        .expect("lock")
        .push(revocation("u-1", "s-1", 0, ""));
    eventually("s-1 refused", async || {
        rig.who_am_i(&s1)
            .await
            .is_err_and(|s| s.code() == Code::Unauthenticated && reason(&s) == "TOKEN_REVOKED")
    })
    .await;
    rig.who_am_i(&s2).await.expect("another session survives");

    // A user-wide revocation (demotion): every token issued before it is refused, one
    // issued after it works.
    let before = claims.iat_ms + 1;
    rig.state
        .revocations
        .lock()
        .expect("lock")
        .push(revocation("u-1", "", before, ""));
    eventually("s-2 refused", async || {
        rig.who_am_i(&s2)
            .await
            .is_err_and(|s| reason(&s) == "TOKEN_REVOKED")
    })
    .await;
    claims.sid = "s-3".into();
    claims.iat_ms = before + 1;
    let fresh = rig.key.sign(&claims).expect("signed");
    rig.who_am_i(&fresh)
        .await
        .expect("a token issued after works");
}

#[tokio::test]
async fn tokens_fail_closed_when_revocations_cannot_be_learnt() {
    let rig = rig_with(
        |_| {},
        |a| {
            a.revocation_poll = Duration::from_millis(50);
            a.revocation_max_staleness = Duration::from_millis(300);
        },
    )
    .await;
    let token = rig.key.sign(&rig.claims("user")).expect("signed");
    rig.who_am_i(&token).await.expect("works");
    rig.state.revocations_down.store(true, Ordering::SeqCst);
    eventually("refused while kiln-auth is unreachable", async || {
        rig.who_am_i(&token).await.is_err_and(|s| {
            s.code() == Code::Unavailable && reason(&s) == "TOKEN_VERIFICATION_UNAVAILABLE"
        })
    })
    .await;
    rig.state.revocations_down.store(false, Ordering::SeqCst);
    eventually("accepted again", async || {
        rig.who_am_i(&token).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_flood_of_random_kids_does_not_delay_a_freshly_rotated_key() {
    let rig = rig_with(|s| s.rate_limit = None, |_| {}).await;
    rig.who_am_i(&rig.key.sign(&rig.claims("user")).expect("signed"))
        .await
        .expect("warm-up");
    let before = rig.state.jwks_fetches.load(Ordering::SeqCst);
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (forged, _) = SigningKey::generate(format!("k-random-{i}")).expect("key");
        let token = forged.sign(&rig.claims("admin")).expect("signed");
        let client = rig.client(&token).await;
        flood.spawn(async move {
            let mut client = client;
            client.who_am_i(pb::WhoAmIRequest::default()).await
        });
    }
    eventually("the flood reached the verifier", async || {
        rig.state.jwks_fetches.load(Ordering::SeqCst) > before
    })
    .await;
    // kiln-auth rotates; a fresh login's token arrives in the middle of the flood.
    let (next, _) = SigningKey::generate("k-next").expect("key");
    rig.state
        .jwks
        .lock()
        .expect("lock")
        .keys
        .insert(0, next.public_jwk());
    rig.who_am_i(&next.sign(&rig.claims("user")).expect("signed"))
        .await
        .expect("the rotated key is accepted");
    let fetches = rig.state.jwks_fetches.load(Ordering::SeqCst) - before;
    // One fetch the flood started, at most one more that saw the new key (the old
    // code fetched once per queued caller, a second apart).
    assert!(
        fetches <= 3,
        "{fetches} JWKS fetches before the valid token got in"
    );
    while let Some(result) = flood.join_next().await {
        let status = result
            .expect("joined")
            .expect_err("a random kid is refused");
        assert_eq!(reason(&status), "INVALID_TOKEN");
    }
}

#[tokio::test]
async fn junk_credentials_from_one_peer_share_one_bucket() {
    let limit = RateLimit {
        per_second: std::num::NonZeroU32::new(1).expect("non-zero"),
        burst: std::num::NonZeroU32::new(3).expect("non-zero"),
    };
    let rig = rig_with(|s| s.rate_limit = Some(limit), |_| {}).await;
    let mut limited = 0;
    for i in 0..30 {
        // A fresh junk header, a fresh unknown API key, on a fresh connection each time.
        let junk = if i % 2 == 0 {
            format!("junk{i}")
        } else {
            format!("kiln_random{i}")
        };
        let status = rig.who_am_i(&junk).await.expect_err("junk is refused");
        if status.code() == Code::ResourceExhausted {
            limited += 1;
        }
    }
    assert!(
        limited >= 20,
        "only {limited} of 30 junk calls were rate limited"
    );
    // Only calls within the peer's burst (and refills) cost a look-up at kiln-auth.
    let lookups = rig.state.key_lookups.load(Ordering::SeqCst);
    assert!(lookups <= 8, "{lookups} API-key look-ups for junk");
}
