//! Delegated tokens end to end on a real `kiln up`: the test presents the agent's
//! workload certificate from the suite's development PKI, exchanges a user's token, and
//! uses the delegated token at kiln-build as the user, with the agent recorded as the
//! actor. Nobody else may exchange, a viewer cannot delegate, the token works nowhere
//! but kiln-build and only on its workspace, and demoting or deleting the user ends it
//! within the revocation bound.

mod common;

use std::time::Duration;

use common::{Suite, read, reason};
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_proto::build as build_pb;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::KilnChannel;
use tonic::Code;

const AGENT: &str = "spiffe://kiln.local/service/agent";

/// A channel with the workload certificate of `service` (no bearer token).
async fn workload_channel(suite: &Suite, service: &str) -> KilnChannel {
    let pki = suite.pki();
    suite
        .client()
        .identity(
            read(&pki.workload_cert(service)),
            read(&pki.workload_key(service)),
        )
        .connect()
        .await
        .expect("connects with a workload certificate")
}

fn exchange_request(subject_token: &str, workspace_id: Option<&str>) -> pb::ExchangeTokenRequest {
    pb::ExchangeTokenRequest {
        subject_token: subject_token.into(),
        audience: "kiln-build".into(),
        task_id: "task-42".into(),
        workspace_id: workspace_id.map(str::to_owned),
        lifetime: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
    }
}

async fn exchange(
    channel: KilnChannel,
    message: pb::ExchangeTokenRequest,
) -> Result<pb::ExchangeTokenResponse, tonic::Status> {
    AuthServiceClient::new(channel)
        .exchange_token(message)
        .await
        .map(|r| r.into_inner())
}

async fn build_as(suite: &Suite, token: &str) -> BuildServiceClient<KilnChannel> {
    BuildServiceClient::new(suite.channel_as(token).await)
}

async fn create_workspace(suite: &Suite, token: &str) -> String {
    build_as(suite, token)
        .await
        .create_workspace(build_pb::CreateWorkspaceRequest::default())
        .await
        .expect("workspace created")
        .into_inner()
        .id
}

/// Waits until kiln-build refuses `token` as revoked (the bound is 3 s; the loop allows
/// far more, so only a token that is never refused fails the test).
async fn refused_at_build(suite: &Suite, token: &str, what: &str) {
    let mut build = build_as(suite, token).await;
    for _ in 0..200 {
        match build
            .get_policy(build_pb::GetPolicyRequest::default())
            .await
        {
            Err(status) => {
                assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
                assert_eq!(reason(&status), "TOKEN_REVOKED", "{what}");
                return;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    panic!("{what}: the delegated token still works");
}

#[tokio::test]
async fn the_agent_acts_for_a_user_at_kiln_build_and_nowhere_else() {
    let suite = Suite::start();
    let alice = suite.user_token("alice", pb::Role::User).await;
    let workspace = create_workspace(&suite, &alice).await;
    let other = create_workspace(&suite, &alice).await;
    let agent = workload_channel(&suite, "agent").await;
    let granted = exchange(agent.clone(), exchange_request(&alice, Some(&workspace)))
        .await
        .expect("the agent exchanges alice's token");
    let principal = granted.principal.expect("principal");
    assert_eq!(
        (principal.username.as_str(), principal.actor.as_str()),
        ("alice", AGENT)
    );
    let delegated = granted.access_token;

    // At kiln-build it is alice: the build is hers.
    let mut build = build_as(&suite, &delegated).await;
    let started = build
        .start_build(build_pb::StartBuildRequest {
            workspace_id: workspace.clone(),
            steps: vec![build_pb::Step {
                argv: vec!["true".into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .expect("the delegated token starts a build")
        .into_inner();
    assert_eq!(started.owner, principal.user_id);
    // The log is written by the suite's own thread: wait (bounded) for the line.
    let names_the_actor = |log: &str| {
        log.lines().any(|l| {
            l.contains(&started.id)
                && l.contains(AGENT)
                && l.contains("task-42")
                && l.contains("on behalf of alice")
        })
    };
    for _ in 0..100 {
        if names_the_actor(&suite.log()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        names_the_actor(&suite.log()),
        "the build's audit line names the agent acting for alice:\n{}",
        suite.log()
    );

    // Only its workspace, and nothing at all at kiln-auth.
    let status = build
        .get_workspace(build_pb::GetWorkspaceRequest {
            workspace_id: other,
        })
        .await
        .expect_err("another workspace of alice");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = AuthServiceClient::new(suite.channel_as(&delegated).await)
        .create_api_key(pb::CreateApiKeyRequest {
            name: "escape".into(),
            ..Default::default()
        })
        .await
        .expect_err("a delegation cannot mint an API key");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status), "TOKEN_AUDIENCE_MISMATCH");
    // Alice's own token keeps working everywhere.
    AuthServiceClient::new(suite.channel_as(&alice).await)
        .who_am_i(pb::WhoAmIRequest::default())
        .await
        .expect("an ordinary token still works");
}

#[tokio::test]
async fn only_the_agent_may_exchange_and_only_for_a_user_who_may_build() {
    let suite = Suite::start();
    let alice = suite.user_token("alice", pb::Role::User).await;
    let status = exchange(
        workload_channel(&suite, "build").await,
        exchange_request(&alice, None),
    )
    .await
    .expect_err("kiln-build may not act for users");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "ACTOR_NOT_ALLOWED");
    let status = exchange(
        suite.channel_as(&alice).await,
        exchange_request(&alice, None),
    )
    .await
    .expect_err("an end user may not call a SERVICE RPC");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status), "WORKLOAD_IDENTITY_REQUIRED");
    let viewer = suite.user_token("vera", pb::Role::Viewer).await;
    let status = exchange(
        workload_channel(&suite, "agent").await,
        exchange_request(&viewer, None),
    )
    .await
    .expect_err("a viewer's task cannot build");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "DELEGATION_ROLE_TOO_LOW");
}

#[tokio::test]
async fn demoting_or_deleting_the_user_ends_the_delegation_within_the_bound() {
    let suite = Suite::start();
    let mut admin = AuthServiceClient::new(suite.channel_as(&suite.admin_token().await).await);
    let agent = workload_channel(&suite, "agent").await;
    for change in ["demoted", "deleted"] {
        let name = format!("user{change}");
        let token = suite.user_token(&name, pb::Role::User).await;
        let delegated = exchange(agent.clone(), exchange_request(&token, None))
            .await
            .expect("exchanged");
        let user_id = delegated.principal.expect("principal").user_id;
        build_as(&suite, &delegated.access_token)
            .await
            .get_policy(build_pb::GetPolicyRequest::default())
            .await
            .expect("the delegation works before");
        if change == "demoted" {
            admin
                .update_user(pb::UpdateUserRequest {
                    user_id,
                    role: Some(pb::Role::Viewer as i32),
                    ..Default::default()
                })
                .await
                .expect("demoted");
        } else {
            admin
                .delete_user(pb::DeleteUserRequest { user_id })
                .await
                .expect("deleted");
        }
        refused_at_build(&suite, &delegated.access_token, change).await;
    }
}
