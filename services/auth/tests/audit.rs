//! The audit trail: paging and filters.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_server::AuthService;
use tonic::Code;

kiln_testkit::both_backends! {
#[tokio::test]
async fn audit_events_page_newest_first() {
    let h = harness().await;
    for i in 0..5 {
        h.login(&format!("nobody{i}"), "wrong-password")
            .await
            .expect_err("fail");
        h.clock.advance(Duration::from_millis(3));
    }
    let admin = h.admin_without_audit().await;
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = h
            .api
            .list_audit_events(req(
                pb::ListAuditEventsRequest {
                    action: Some("login".into()),
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
        names.extend(
            page.events
                .into_iter()
                .map(|e| e.actor.expect("a").username),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        names,
        ["nobody4", "nobody3", "nobody2", "nobody1", "nobody0"]
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn audit_events_filter_by_time_and_outcome() {
    let h = harness().await;
    h.login("nobody", "wrong-password").await.expect_err("fail");
    h.clock.advance(Duration::from_secs(10));
    let cut = prost_types::Timestamp::from(kiln_auth::Clock::now(&*h.clock));
    h.login("admin", ADMIN_PASSWORD).await.expect("ok");
    let after = h
        .audit(pb::ListAuditEventsRequest {
            action: Some("login".into()),
            start_time: Some(cut),
            ..Default::default()
        })
        .await;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].outcome(), pb::AuditOutcome::Success);
    let failures = h
        .audit(pb::ListAuditEventsRequest {
            action: Some("login".into()),
            outcome: pb::AuditOutcome::Failure as i32,
            ..Default::default()
        })
        .await;
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].actor.as_ref().expect("a").username, "nobody");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_bad_page_token_is_an_invalid_argument() {
    let h = harness().await;
    let admin = h.admin_without_audit().await;
    let err = h
        .api
        .list_audit_events(req(
            pb::ListAuditEventsRequest {
                page_token: "%%%".into(),
                ..Default::default()
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), ["page_token"]);
}
}
