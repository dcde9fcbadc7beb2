//! User management by admins.

mod common;

use common::*;
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_server::AuthService;
use kiln_rpc::Principal;
use tonic::Code;

fn create(name: &str, role: pb::Role) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        username: name.into(),
        password: format!("{name}-password"),
        role: role as i32,
        request_id: String::new(),
    }
}

async fn update(
    h: &Harness,
    admin: &Principal,
    message: pb::UpdateUserRequest,
) -> Result<pb::User, tonic::Status> {
    h.api
        .update_user(req(message, Some(admin), PEER))
        .await
        .map(|r| r.into_inner().user.expect("user"))
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn admin_creates_and_gets_a_user() {
    let h = harness().await;
    let admin = h.admin().await;
    let user = h
        .api
        .create_user(req(
            create("alice", pb::Role::Unspecified),
            Some(&admin),
            PEER,
        ))
        .await
        .expect("created")
        .into_inner();
    assert_eq!(user.role(), pb::Role::User, "default role");
    assert!(!user.disabled);
    assert!(user.created_at.is_some() && user.password_changed_at.is_some());
    assert!(user.last_login_at.is_none());
    let got = h
        .api
        .get_user(req(
            pb::GetUserRequest {
                user_id: user.id.clone(),
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got, user);
    let err = h
        .api
        .get_user(req(
            pb::GetUserRequest {
                user_id: "nope".into(),
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_taken_username_is_already_exists_but_a_retried_request_id_is_not() {
    let h = harness().await;
    let admin = h.admin().await;
    let rid = "0a1b2c3d-0000-4000-8000-000000000001".to_string();
    let first = h
        .api
        .create_user(req(
            pb::CreateUserRequest {
                request_id: rid.clone(),
                ..create("alice", pb::Role::User)
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect("first")
        .into_inner();
    let retry = h
        .api
        .create_user(req(
            pb::CreateUserRequest {
                request_id: rid,
                ..create("alice", pb::Role::User)
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(first.id, retry.id);
    let err = h
        .api
        .create_user(req(create("ALICE", pb::Role::User), Some(&admin), PEER))
        .await
        .expect_err("taken");
    assert_status(&err, Code::AlreadyExists, "USERNAME_TAKEN");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn users_list_by_name_in_pages_with_filters() {
    let h = harness().await;
    let admin = h.admin().await;
    for name in ["dave", "carol", "bob", "erin"] {
        h.api
            .create_user(req(create(name, pb::Role::Viewer), Some(&admin), PEER))
            .await
            .expect("created");
    }
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = h
            .api
            .list_users(req(
                pb::ListUsersRequest {
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
        assert!(page.users.len() <= 2);
        names.extend(page.users.into_iter().map(|u| u.username));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, ["admin", "bob", "carol", "dave", "erin"]);
    let viewers = h
        .api
        .list_users(req(
            pb::ListUsersRequest {
                role: Some(pb::Role::Viewer as i32),
                ..Default::default()
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect("viewers")
        .into_inner();
    assert_eq!(viewers.users.len(), 4);
    for bad in [
        pb::ListUsersRequest {
            page_size: -1,
            ..Default::default()
        },
        pb::ListUsersRequest {
            page_token: "garbage!".into(),
            ..Default::default()
        },
        pb::ListUsersRequest {
            role: Some(99),
            ..Default::default()
        },
    ] {
        let err = h
            .api
            .list_users(req(bad, Some(&admin), PEER))
            .await
            .expect_err("invalid");
        assert_eq!(err.code(), Code::InvalidArgument);
    }
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn disabled_users_are_listed_only_on_request() {
    let h = harness().await;
    let admin = h.admin().await;
    let (id, _) = h.user("alice", pb::Role::User).await;
    update(
        &h,
        &admin,
        pb::UpdateUserRequest {
            user_id: id,
            disabled: Some(true),
            ..Default::default()
        },
    )
    .await
    .expect("disabled");
    let list = |include_disabled| {
        h.api.list_users(req(
            pb::ListUsersRequest {
                include_disabled,
                ..Default::default()
            },
            Some(&admin),
            PEER,
        ))
    };
    assert_eq!(list(false).await.expect("l").into_inner().users.len(), 1);
    assert_eq!(list(true).await.expect("l").into_inner().users.len(), 2);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn an_admin_password_reset_works_and_revokes_sessions() {
    let h = harness().await;
    let admin = h.admin().await;
    let (id, pw) = h.user("alice", pb::Role::User).await;
    let session = h.login("alice", &pw).await.expect("login");
    let err = update(
        &h,
        &admin,
        pb::UpdateUserRequest {
            user_id: id.clone(),
            password: Some("short".into()),
            ..Default::default()
        },
    )
    .await
    .expect_err("weak");
    assert_eq!(violations(&err), ["password"]);
    update(
        &h,
        &admin,
        pb::UpdateUserRequest {
            user_id: id,
            password: Some("reset-password-1".into()),
            ..Default::default()
        },
    )
    .await
    .expect("reset");
    h.refresh(&session.refresh_token)
        .await
        .expect_err("sessions revoked");
    h.login("alice", &pw).await.expect_err("old password");
    h.login("alice", "reset-password-1")
        .await
        .expect("new password");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn the_last_enabled_admin_cannot_be_demoted_disabled_or_deleted() {
    let h = harness().await;
    let admin = h.admin().await;
    for change in [
        pb::UpdateUserRequest {
            user_id: admin.subject.clone(),
            role: Some(pb::Role::User as i32),
            ..Default::default()
        },
        pb::UpdateUserRequest {
            user_id: admin.subject.clone(),
            disabled: Some(true),
            ..Default::default()
        },
    ] {
        let err = update(&h, &admin, change).await.expect_err("last admin");
        assert_status(&err, Code::FailedPrecondition, "LAST_ADMIN");
    }
    let err = h
        .api
        .delete_user(req(
            pb::DeleteUserRequest {
                user_id: admin.subject.clone(),
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect_err("self");
    assert_status(&err, Code::FailedPrecondition, "CANNOT_DELETE_SELF");
    // With a second admin, the first may step down.
    h.user("root2", pb::Role::Admin).await;
    update(
        &h,
        &admin,
        pb::UpdateUserRequest {
            user_id: admin.subject.clone(),
            role: Some(pb::Role::User as i32),
            ..Default::default()
        },
    )
    .await
    .expect("demoted");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn deleting_a_user_removes_its_sessions_and_keys() {
    let h = harness().await;
    let admin = h.admin().await;
    let (id, pw) = h.user("alice", pb::Role::User).await;
    let (login, alice) = h.session("alice", &pw).await;
    let key = h
        .create_key(
            &alice,
            pb::CreateApiKeyRequest {
                name: "k".into(),
                ..Default::default()
            },
        )
        .await
        .expect("key");
    h.api
        .delete_user(req(
            pb::DeleteUserRequest {
                user_id: id.clone(),
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect("deleted");
    h.refresh(&login.refresh_token)
        .await
        .expect_err("session gone");
    h.authenticate_key(&key.key).await.expect_err("key gone");
    let err = h
        .api
        .get_user(req(pb::GetUserRequest { user_id: id }, Some(&admin), PEER))
        .await
        .expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn revoke_user_sessions_optionally_revokes_keys() {
    let h = harness().await;
    let admin = h.admin().await;
    let (id, pw) = h.user("alice", pb::Role::User).await;
    let (login, alice) = h.session("alice", &pw).await;
    let key = h
        .create_key(
            &alice,
            pb::CreateApiKeyRequest {
                name: "k".into(),
                ..Default::default()
            },
        )
        .await
        .expect("key");
    let out = h
        .api
        .revoke_user_sessions(req(
            pb::RevokeUserSessionsRequest {
                user_id: id.clone(),
                revoke_api_keys: false,
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect("revoked")
        .into_inner();
    assert_eq!((out.revoked_sessions, out.revoked_api_keys), (1, 0));
    h.refresh(&login.refresh_token)
        .await
        .expect_err("session revoked");
    h.authenticate_key(&key.key).await.expect("key kept");
    let out = h
        .api
        .revoke_user_sessions(req(
            pb::RevokeUserSessionsRequest {
                user_id: id,
                revoke_api_keys: true,
            },
            Some(&admin),
            PEER,
        ))
        .await
        .expect("revoked")
        .into_inner();
    assert_eq!(out.revoked_api_keys, 1);
    h.authenticate_key(&key.key).await.expect_err("key revoked");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_non_admin_cannot_manage_users() {
    let h = harness().await;
    let (_, pw) = h.user("alice", pb::Role::User).await;
    let alice = h.session("alice", &pw).await.1;
    let err = h
        .api
        .create_user(req(create("mallory", pb::Role::Admin), Some(&alice), PEER))
        .await
        .expect_err("not admin");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .api
        .list_audit_events(req(
            pb::ListAuditEventsRequest::default(),
            Some(&alice),
            PEER,
        ))
        .await
        .expect_err("not admin");
    assert_eq!(err.code(), Code::PermissionDenied);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn user_changes_are_audited() {
    let h = harness().await;
    let admin = h.admin().await;
    let (id, _) = h.user("alice", pb::Role::User).await;
    update(
        &h,
        &admin,
        pb::UpdateUserRequest {
            user_id: id.clone(),
            role: Some(pb::Role::Viewer as i32),
            ..Default::default()
        },
    )
    .await
    .expect("updated");
    let events = h
        .audit(pb::ListAuditEventsRequest {
            action: Some("user.update".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].target, format!("user/{id}"));
    assert_eq!(
        events[0].details.get("role").map(String::as_str),
        Some("viewer")
    );
    assert_eq!(
        events[0].actor.as_ref().expect("actor").user_id,
        admin.subject
    );
}
}
