//! Delegated tokens at the identity layer, over real TLS: a correctly signed delegated
//! token is refused by a service it was not minted for (here kiln-auth) with a stable
//! reason, and tokens whose audience and delegation claims do not match are refused
//! outright; ordinary tokens keep working.

mod common;

use common::rig::{assert_refused, reason, rig};
use kiln_rpc::token::{ActorClaim, BUILD_AUDIENCE};
use tonic::Code;

fn delegated(rig: &common::rig::Rig) -> kiln_rpc::token::AccessClaims {
    kiln_rpc::token::AccessClaims {
        aud: BUILD_AUDIENCE.into(),
        sid: "d-1".into(),
        act: Some(ActorClaim {
            sub: "spiffe://kiln.local/service/agent".into(),
        }),
        task: Some("t-1".into()),
        ..rig.claims("user")
    }
}

#[tokio::test]
async fn a_delegated_token_is_refused_outside_its_audience() {
    let rig = rig().await;
    let token = rig.key.sign(&delegated(&rig)).expect("signed");
    let status = rig
        .who_am_i(&token)
        .await
        .expect_err("a build delegation is not valid at kiln-auth");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status), "TOKEN_AUDIENCE_MISMATCH", "{status:?}");
    // The same user's ordinary token still works.
    let ordinary = rig.key.sign(&rig.claims("user")).expect("signed");
    rig.who_am_i(&ordinary).await.expect("ordinary token");
}

#[tokio::test]
async fn audience_and_delegation_claims_must_match() {
    let rig = rig().await;
    // An ordinary token dressed with the build audience (no actor): not a delegation.
    let mut claims = rig.claims("user");
    claims.aud = BUILD_AUDIENCE.into();
    assert_refused(
        rig.who_am_i(&rig.key.sign(&claims).expect("signed")).await,
        "service audience without act",
    );
    // A delegation for the suite audience would be valid everywhere: refused.
    let mut claims = delegated(&rig);
    claims.aud = "kiln".into();
    assert_refused(
        rig.who_am_i(&rig.key.sign(&claims).expect("signed")).await,
        "act with the suite audience",
    );
    // A delegation without a task, or with an actor that is no workload.
    let mut claims = delegated(&rig);
    claims.task = None;
    assert_refused(
        rig.who_am_i(&rig.key.sign(&claims).expect("signed")).await,
        "no task",
    );
    let mut claims = delegated(&rig);
    claims.act = Some(ActorClaim {
        sub: "mallory".into(),
    });
    assert_refused(
        rig.who_am_i(&rig.key.sign(&claims).expect("signed")).await,
        "actor is not a workload",
    );
}
