//! Racing requests: retries of one request and rivals for one name. Each answer is one a
//! client can act on (never INTERNAL), and the store ends as one serial order would leave
//! it.

mod common;

use std::collections::BTreeSet;

use common::*;
use futures::future::join_all;
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_server::AuthService;
use tonic::Code;

const RACERS: usize = 16;

fn alice(request_id: &str) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        username: "alice".into(),
        password: "alice-password".into(),
        role: pb::Role::User as i32,
        request_id: request_id.into(),
    }
}

kiln_testkit::both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rivals_for_one_username_get_one_user_and_already_exists() {
    let h = harness().await;
    let admin = h.admin().await;
    let answers =
        join_all((0..RACERS).map(|_| h.api.create_user(req(alice(""), Some(&admin), PEER)))).await;
    let mut created = 0;
    for a in answers {
        match a {
            Ok(_) => created += 1,
            Err(s) => assert_status(&s, Code::AlreadyExists, "USERNAME_TAKEN"),
        }
    }
    assert_eq!(created, 1);
    h.login("alice", "alice-password")
        .await
        .expect("the one alice logs in");
}
}

kiln_testkit::both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_retries_of_one_create_user_return_the_same_user() {
    let h = harness().await;
    let admin = h.admin().await;
    let rid = "1e0b7a52-2f6d-4b1e-9d0c-000000000042";
    let answers =
        join_all((0..RACERS).map(|_| h.api.create_user(req(alice(rid), Some(&admin), PEER)))).await;
    let ids: BTreeSet<String> = answers
        .into_iter()
        .map(|a| a.expect("every retry succeeds").into_inner().id)
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
}
}

kiln_testkit::both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_retries_of_one_create_api_key_make_one_key_shown_once() {
    let h = harness().await;
    let admin = h.admin().await;
    let message = pb::CreateApiKeyRequest {
        name: "ci".into(),
        request_id: "5d9e2c1a-7b3f-4e8a-a1b2-000000000007".into(),
        ..Default::default()
    };
    let answers = join_all((0..RACERS).map(|_| h.create_key(&admin, message.clone()))).await;
    let mut ids = BTreeSet::new();
    let mut secrets = 0;
    for a in answers {
        let a = a.expect("every retry succeeds");
        secrets += usize::from(!a.key.is_empty());
        ids.insert(a.api_key.expect("key").id);
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(secrets, 1, "the secret is shown exactly once");
    let listed = h
        .api
        .list_api_keys(req(pb::ListApiKeysRequest::default(), Some(&admin), PEER))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.api_keys.len(), 1);
}
}

kiln_testkit::both_backends! {
/// A burst of wrong passwords for one account in parallel: every answer is the usual
/// refusal, the lockout counts them all, and the right password is then refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_burst_of_wrong_passwords_is_counted_and_locks_the_account() {
    let h = harness().await;
    let (_, password) = h.user("bob", pb::Role::User).await;
    let peers: Vec<String> = (0..RACERS)
        .map(|i| format!("198.51.100.{i}:4000"))
        .collect();
    let answers = join_all(
        peers
            .iter()
            .map(|peer| h.login_from("bob", "not-bobs-password", peer)),
    )
    .await;
    for a in answers {
        let s = a.expect_err("wrong password");
        assert!(
            matches!(s.code(), Code::Unauthenticated | Code::ResourceExhausted),
            "{s:?}"
        );
    }
    let s = h
        .login_from("bob", &password, "203.0.113.9:4000")
        .await
        .expect_err("locked");
    assert_status(&s, Code::ResourceExhausted, "LOGIN_THROTTLED");
    assert!(retry_after(&s).is_some(), "says when to retry");
}
}
