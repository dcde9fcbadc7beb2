//! Password and username rules, at their boundaries.

mod common;

use common::*;
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_server::AuthService;
use tonic::Code;

async fn create(h: &Harness, username: &str, password: &str) -> Result<pb::User, tonic::Status> {
    let admin = h.admin().await;
    h.api
        .create_user(req(
            pb::CreateUserRequest {
                username: username.into(),
                password: password.into(),
                role: pb::Role::User as i32,
                request_id: String::new(),
            },
            Some(&admin),
            PEER,
        ))
        .await
        .map(|r| r.into_inner())
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn password_of_nine_characters_is_refused_and_ten_accepted() {
    let h = harness().await;
    let err = create(&h, "alice", "123456789").await.expect_err("9 chars");
    assert_status(&err, Code::InvalidArgument, "WEAK_PASSWORD");
    assert_eq!(violations(&err), ["password"]);
    create(&h, "alice", "1234567890").await.expect("10 chars");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn characters_not_bytes_count_towards_the_minimum() {
    let h = harness().await;
    // 9 characters, 18 bytes: still too short.
    let err = create(&h, "alice", &"é".repeat(9))
        .await
        .expect_err("9 chars");
    assert_status(&err, Code::InvalidArgument, "WEAK_PASSWORD");
    create(&h, "alice", &"é".repeat(10))
        .await
        .expect("10 chars");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn password_of_1024_bytes_is_accepted_and_1025_refused() {
    let h = harness().await;
    let err = create(&h, "alice", &"a".repeat(1025))
        .await
        .expect_err("1025 bytes");
    assert_status(&err, Code::InvalidArgument, "WEAK_PASSWORD");
    assert_eq!(violations(&err), ["password"]);
    create(&h, "alice", &"a".repeat(1024))
        .await
        .expect("1024 bytes");
    h.login("alice", &"a".repeat(1024))
        .await
        .expect("long password logs in");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn password_equal_to_the_username_is_refused_in_any_case() {
    let h = harness().await;
    for pw in ["longusername", "LongUserName"] {
        let err = create(&h, "longusername", pw).await.expect_err(pw);
        assert_status(&err, Code::InvalidArgument, "WEAK_PASSWORD");
    }
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn usernames_outside_the_safe_set_are_refused() {
    let h = harness().await;
    let sixty_five = "a".repeat(65);
    for bad in [
        "",
        "9lives",
        "_x",
        "has space",
        "ünïcode",
        "a/b",
        sixty_five.as_str(),
    ] {
        let err = create(&h, bad, "good-password-1").await.expect_err(bad);
        assert_status(&err, Code::InvalidArgument, "INVALID_ARGUMENT");
        assert_eq!(violations(&err), ["username"], "{bad:?}");
    }
    create(&h, &"a".repeat(64), "good-password-1")
        .await
        .expect("64 chars");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn usernames_are_folded_to_lower_case() {
    let h = harness().await;
    let user = create(&h, "Bob.Smith-2", "good-password-1")
        .await
        .expect("created");
    assert_eq!(user.username, "bob.smith-2");
    h.login("bob.smith-2", "good-password-1")
        .await
        .expect("login");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn every_bad_field_is_reported_at_once() {
    let h = harness().await;
    let admin = h.admin().await;
    let err = h
        .api
        .create_user(req(
            pb::CreateUserRequest {
                username: "".into(),
                password: "short".into(),
                role: 42,
                request_id: "not-a-uuid".into(),
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields = violations(&err);
    for field in ["username", "role", "password", "request_id"] {
        assert!(
            fields.iter().any(|f| f == field),
            "{field} missing in {fields:?}"
        );
    }
}
}

#[tokio::test]
async fn default_cost_is_owasp_argon2id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = kiln_auth::AuthConfig::new(dir.path().join("data"));
    assert_eq!(config.password_cost, kiln_auth::PasswordCost::OWASP);
    config.admin_password = Some(ADMIN_PASSWORD.into());
    let _api = kiln_auth::AuthApi::open(config).await.expect("opens");
    let db = sqlx_hash(&dir.path().join("data").join(kiln_auth::DB_FILE)).await;
    assert!(db.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{db}");
}

async fn sqlx_hash(path: &std::path::Path) -> String {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite:{}", path.display()))
        .await
        .expect("db");
    sqlx::query_scalar("SELECT password_hash FROM users WHERE username = 'admin'")
        .fetch_one(&mut conn)
        .await
        .expect("admin row")
}
