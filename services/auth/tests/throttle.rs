//! Brute force: per-account and per-peer lockout, growing, with RetryInfo.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::auth as pb;
use tonic::Code;

async fn fail(h: &Harness, user: &str, times: usize, peer: &str) {
    for _ in 0..times {
        let err = h
            .login_from(user, "wrong-password", peer)
            .await
            .expect_err("wrong");
        assert_status(&err, Code::Unauthenticated, "INVALID_CREDENTIALS");
    }
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn brute_force_on_one_account_locks_it_with_retry_info() {
    let h = harness().await;
    let (_, pw) = h.user("alice", pb::Role::User).await;
    fail(&h, "alice", 5, PEER).await;
    // Locked: even the right password is not checked.
    let err = h.login("alice", &pw).await.expect_err("locked");
    assert_status(&err, Code::ResourceExhausted, "LOGIN_THROTTLED");
    assert_eq!(retry_after(&err), Some(Duration::from_secs(30)));
    // Other accounts from other peers are not affected.
    h.login_from("admin", ADMIN_PASSWORD, "198.51.100.1:1")
        .await
        .expect("admin");
    let events = h
        .audit(pb::ListAuditEventsRequest {
            action: Some("login.locked_out".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(events.len(), 1);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn an_unknown_user_is_locked_out_exactly_like_a_known_one() {
    let h = harness().await;
    h.user("alice", pb::Role::User).await;
    fail(&h, "alice", 5, "198.51.100.1:1").await;
    fail(&h, "ghost", 5, "198.51.100.2:1").await;
    let known = h
        .login_from("alice", "x-password", "198.51.100.1:1")
        .await
        .expect_err("locked");
    let unknown = h
        .login_from("ghost", "x-password", "198.51.100.2:1")
        .await
        .expect_err("locked");
    assert_status(&known, Code::ResourceExhausted, "LOGIN_THROTTLED");
    assert_status(&unknown, Code::ResourceExhausted, "LOGIN_THROTTLED");
    assert_eq!(known.message(), unknown.message());
    assert_eq!(retry_after(&known), retry_after(&unknown));
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn lockout_grows_with_each_further_failure_and_expires() {
    let h = harness().await;
    let (_, pw) = h.user("alice", pb::Role::User).await;
    fail(&h, "alice", 5, PEER).await;
    h.clock.advance(Duration::from_secs(31));
    // The first attempt after the lockout fails again: the next lockout is twice as long.
    fail(&h, "alice", 1, PEER).await;
    let err = h.login("alice", &pw).await.expect_err("locked");
    assert_eq!(retry_after(&err), Some(Duration::from_secs(60)));
    h.clock.advance(Duration::from_secs(61));
    h.login("alice", &pw).await.expect("lockout over");
    // Success clears the account's counter.
    fail(&h, "alice", 4, PEER).await;
    h.login("alice", &pw)
        .await
        .expect("still below the threshold");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn one_peer_guessing_many_accounts_is_locked_out() {
    let h = harness_with(|c| c.throttle.peer_free_failures = 6).await;
    let attacker = "203.0.113.7:5555";
    for i in 0..6 {
        let err = h
            .login_from(&format!("user{i}"), "guess-password", attacker)
            .await
            .expect_err("wrong");
        assert_eq!(reason(&err), "INVALID_CREDENTIALS");
    }
    // Another port of the same IP is the same peer.
    let err = h
        .login_from("admin", ADMIN_PASSWORD, "203.0.113.7:6666")
        .await
        .expect_err("peer locked");
    assert_status(&err, Code::ResourceExhausted, "LOGIN_THROTTLED");
    assert!(retry_after(&err).is_some());
    // Another peer logs in fine.
    h.login_from("admin", ADMIN_PASSWORD, "203.0.113.8:1")
        .await
        .expect("other peer");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn username_case_does_not_bypass_the_account_counter() {
    let h = harness().await;
    h.user("alice", pb::Role::User).await;
    for name in ["alice", "Alice", "ALICE", "aLice", "alicE"] {
        h.login(name, "wrong-password").await.expect_err("wrong");
    }
    let err = h
        .login("alice", "wrong-password")
        .await
        .expect_err("locked");
    assert_eq!(reason(&err), "LOGIN_THROTTLED");
}
}

kiln_testkit::both_backends! {
/// 60 guesses at once for one account from one peer: the attempts are reserved before
/// hashing, so at most the account's free failures (5) are evaluated; the rest get the
/// lockout answer at once, and the account ends locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_guesses_cannot_outrun_the_lockout() {
    let h = harness().await;
    let (_, password) = h.user("carol", pb::Role::User).await;
    let answers = futures::future::join_all(
        (0..60).map(|_| h.login_from("carol", "not-carols-password", "192.0.2.77:1")),
    )
    .await;
    let evaluated = answers
        .iter()
        .filter(|a| {
            a.as_ref()
                .is_err_and(|s| reason(s) == "INVALID_CREDENTIALS")
        })
        .count();
    let throttled = answers
        .iter()
        .filter(|a| a.as_ref().is_err_and(|s| reason(s) == "LOGIN_THROTTLED"))
        .count();
    assert!(evaluated <= 5, "{evaluated} guesses were evaluated");
    assert_eq!(evaluated + throttled, 60);
    let s = h
        .login_from("carol", &password, "192.0.2.78:1")
        .await
        .expect_err("locked");
    assert_status(&s, Code::ResourceExhausted, "LOGIN_THROTTLED");
}
}

kiln_testkit::both_backends! {
/// A flood of logins from a locked-out peer is audited as one row per peer and minute
/// that counts the attempts, not as a row per attempt.
#[tokio::test]
async fn a_locked_out_flood_adds_a_bounded_number_of_audit_rows() {
    let h = harness().await;
    let attacker = "203.0.113.50:1000";
    fail(&h, "mallory", 5, attacker).await;
    let count = async || {
        h.audit(pb::ListAuditEventsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .len()
    };
    let before = count().await;
    for _ in 0..500 {
        let err = h
            .login_from("mallory", "guess-password", attacker)
            .await
            .expect_err("locked out");
        assert_eq!(reason(&err), "LOGIN_THROTTLED");
    }
    // 500 attempts within one minute (the clock is manual): one row, counting them.
    assert_eq!(count().await - before, 1);
    let events = h
        .audit(pb::ListAuditEventsRequest {
            action: Some("login.locked_out".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].details.get("attempts").map(String::as_str),
        Some("500")
    );
}
}

/// Two auth replicas on one Postgres database are one set of guesses, not two: 60
/// concurrent wrong passwords for one account, half to each replica, get at most the
/// account's free failures (5) evaluated between them, and the account is then locked on
/// both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_lockout() {
    kiln_testkit::on_postgres(async {
        let a = harness().await;
        let b = harness_with(|c| {
            c.database_url = a.config.database_url.clone();
            c.clock = a.clock.clone();
        })
        .await;
        let (_, password) = a.user("carol", pb::Role::User).await;
        let answers = futures::future::join_all((0..60).map(|i| {
            let replica = if i % 2 == 0 { &a } else { &b };
            replica.login_from("carol", "not-carols-password", "192.0.2.77:1")
        }))
        .await;
        let evaluated = answers
            .iter()
            .filter(|r| {
                r.as_ref()
                    .is_err_and(|s| reason(s) == "INVALID_CREDENTIALS")
            })
            .count();
        let throttled = answers
            .iter()
            .filter(|r| r.as_ref().is_err_and(|s| reason(s) == "LOGIN_THROTTLED"))
            .count();
        assert!(evaluated <= 5, "{evaluated} guesses were evaluated");
        assert_eq!(evaluated + throttled, 60);
        for replica in [&a, &b] {
            let s = replica
                .login_from("carol", &password, "192.0.2.78:1")
                .await
                .expect_err("locked on every replica");
            assert_status(&s, Code::ResourceExhausted, "LOGIN_THROTTLED");
        }
    })
    .await;
}

kiln_testkit::both_backends! {
/// The stored counters stay bounded by `max_entries` per kind: past it the oldest goes
/// (here the locked account's, so it can log in again).
#[tokio::test]
async fn the_stored_counters_stay_bounded() {
    let h = harness_with(|c| {
        c.throttle.max_entries = 3;
        c.throttle.peer_free_failures = 1000;
    })
    .await;
    let (_, pw) = h.user("alice", pb::Role::User).await;
    fail(&h, "alice", 5, PEER).await;
    h.login("alice", &pw).await.expect_err("locked");
    h.clock.advance(Duration::from_millis(5));
    for name in ["b", "c", "d"] {
        fail(&h, name, 1, PEER).await;
        h.clock.advance(Duration::from_millis(5));
    }
    h.login("alice", &pw)
        .await
        .expect("alice's counter, the oldest, was dropped");
}
}
