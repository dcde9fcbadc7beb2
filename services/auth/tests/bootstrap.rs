//! The first admin and the store's files.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use common::*;
use kiln_auth::{ADMIN_PASSWORD_FILE, AuthApi, DB_FILE, ManualClock};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_generated_admin_password_is_written_once_0600_and_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let clock = Arc::new(ManualClock::new());
    let mut config = test_config(&data, &clock).await;
    config.admin_password = None;
    let api = AuthApi::open(config.clone()).await.expect("open");
    let file = data.join(ADMIN_PASSWORD_FILE);
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&data), 0o700);
    if kiln_testkit::backend() == kiln_testkit::Backend::Sqlite {
        assert_eq!(mode(&data.join(DB_FILE)), 0o600);
    }
    let password = std::fs::read_to_string(&file)
        .expect("read")
        .trim()
        .to_owned();
    assert!(password.len() >= 20);
    api.close().await;
    drop(api);
    // A reused store keeps the same admin and does not rewrite the file.
    std::fs::remove_file(&file).expect("remove");
    let api = AuthApi::open(config).await.expect("reopen");
    assert!(!file.exists(), "no second password");
    let h = Harness {
        api,
        clock,
        dir,
        config: test_config(&data, &Arc::new(ManualClock::new())).await,
    };
    let login = h
        .login("admin", &password)
        .await
        .expect("generated password logs in");
    assert_eq!(
        login.principal.expect("p").role(),
        kiln_proto::auth::Role::Admin
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_configured_admin_password_is_used_and_no_file_written() {
    let h = harness().await;
    assert!(!h.config.data_dir.join(ADMIN_PASSWORD_FILE).exists());
    h.login("admin", ADMIN_PASSWORD)
        .await
        .expect("configured password");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_weak_configured_admin_password_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new());
    let mut config = test_config(dir.path(), &clock).await;
    config.admin_password = Some("short".into());
    let err = AuthApi::open(config).await.expect_err("weak");
    assert!(err.to_string().contains("KILN_ADMIN_PASSWORD"), "{err}");
}
}
