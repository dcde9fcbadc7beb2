//! What kiln-auth publishes through ListRevocations: the right entry for each way of
//! ending tokens, ordered exactly against token issue stamps even when the clock does
//! not move, and a cursor that survives a replaced store.

mod common;

use common::*;
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_server::AuthService;

async fn revocations(h: &Harness, after: i64) -> pb::ListRevocationsResponse {
    h.api
        .list_revocations(req(
            pb::ListRevocationsRequest {
                after,
                page_size: 0,
            },
            None,
            PEER,
        ))
        .await
        .expect("list revocations")
        .into_inner()
}

async fn iat_ms(h: &Harness, token: &str) -> u64 {
    h.verifier().await.verify(token).expect("verifies").iat_ms
}

fn stamp(t: &Option<prost_types::Timestamp>) -> u64 {
    let t = t.as_ref().expect("not_before");
    u64::try_from(t.seconds).expect("positive") * 1000
        + u64::try_from(t.nanos).expect("positive") / 1_000_000
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_demotion_is_ordered_exactly_between_the_tokens_before_and_after_it() {
    // The manual clock never moves here: ordering must not depend on time passing.
    let h = harness().await;
    let (bob, password) = h.user("bob", pb::Role::Admin).await;
    let before = h.login("bob", &password).await.expect("login").access_token;
    let admin = h.admin().await;
    h.api
        .update_user(req(
            pb::UpdateUserRequest {
                user_id: bob.clone(),
                role: Some(pb::Role::Viewer as i32),
                ..Default::default()
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect("demoted");
    let after = h.login("bob", &password).await.expect("login").access_token;
    let page = revocations(&h, 0).await;
    let entry = page
        .revocations
        .iter()
        .find(|r| r.user_id == bob)
        .expect("a user-wide revocation for bob");
    assert!(entry.session_id.is_empty() && entry.keep_session_id.is_empty());
    let not_before = stamp(&entry.not_before);
    assert!(iat_ms(&h, &before).await < not_before);
    assert!(iat_ms(&h, &after).await > not_before);
    assert_eq!(h.principal(&after).await.role, Some(kiln_rpc::Role::Viewer));
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn logout_password_change_and_the_cursor() {
    let h = harness().await;
    let (carl, password) = h.user("carl", pb::Role::User).await;
    let (_, a) = h.session("carl", &password).await;
    let (_, b) = h.session("carl", &password).await;
    let start = revocations(&h, 0).await.cursor;

    h.api
        .logout(req(pb::LogoutRequest::default(), Some(&a), PEER))
        .await
        .expect("logout");
    h.api
        .change_password(req(
            pb::ChangePasswordRequest {
                old_password: password.clone(),
                new_password: "carls-new-password-9".into(),
            },
            Some(&b),
            PEER,
        ))
        .await
        .expect("changed");
    let page = revocations(&h, start).await;
    assert_eq!(page.revocations.len(), 2, "{page:?}");
    assert_eq!(
        page.revocations[0].session_id,
        a.session_id.clone().expect("sid")
    );
    assert_eq!(page.revocations[1].user_id, carl);
    assert_eq!(
        page.revocations[1].keep_session_id,
        b.session_id.clone().expect("sid")
    );
    assert!(!page.more && !page.reset);
    assert!(page.retention.is_some() && page.server_time.is_some());

    // Nothing new after the cursor; a cursor from another store starts over.
    assert!(revocations(&h, page.cursor).await.revocations.is_empty());
    let foreign = revocations(&h, page.cursor + 1000).await;
    assert!(foreign.reset);
    assert!(foreign.revocations.len() >= 2);
}
}
