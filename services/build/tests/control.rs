//! Ending builds early: cancel, timeouts, the output limit; and who may do what.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::build as pb;
use tonic::Code;

/// A python step whose child process (a grandchild of the sandbox) ignores SIGTERM and
/// appends to `beat` every 20 ms; the parent ignores SIGTERM too.
fn stubborn_tree() -> pb::Step {
    let child = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    open('beat', 'a').write('.')\n    time.sleep(0.02)\n";
    let parent = format!(
        "import signal, subprocess, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nsubprocess.Popen([sys.executable, '-c', {child:?}])\nprint('started', flush=True)\ntime.sleep(600)\n"
    );
    step(&["python3", "-c", &parent])
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn cancel_mid_step_kills_the_whole_tree() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let build = c
        .start_build(build_req(
            &ws.id,
            vec![stubborn_tree(), step(&["echo", "never"])],
        ))
        .await
        .expect("start")
        .into_inner();
    let beat = rig.workspace_dir(&ws.id).join("beat");
    eventually("the grandchild beats", || {
        std::fs::metadata(&beat).is_ok_and(|m| m.len() > 2)
    })
    .await;
    let resp = c
        .cancel_build(pb::CancelBuildRequest {
            build_id: build.id.clone(),
            grace_period: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(
        resp.build.expect("build").state,
        pb::BuildState::Running as i32,
        "still stopping"
    );
    let log = watch(&mut c, &build.id, 0).await;
    assert_eq!(
        log.state(),
        pb::BuildState::Cancelled,
        "{:?}",
        log.finished()
    );
    let results = log.step_results();
    assert_eq!(results.len(), 1, "the second step never ran");
    assert_eq!(results[0].reason, pb::StepFinishedReason::Cancelled as i32);
    // The grandchild is gone: the file stops growing.
    let size = std::fs::metadata(&beat).expect("beat").len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        std::fs::metadata(&beat).expect("beat").len(),
        size,
        "a process of the tree survived"
    );
    // Cancelling again changes nothing.
    let again = c
        .cancel_build(pb::CancelBuildRequest {
            build_id: build.id,
            grace_period: None,
        })
        .await
        .expect("cancel again")
        .into_inner();
    assert_eq!(
        again.build.expect("build").state,
        pb::BuildState::Cancelled as i32
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_queued_build_cancels_at_once() {
    let rig = rig_with(|c| c.queue.max_running = 1).await;
    let mut c = rig.client("alice-user").await;
    let ws1 = workspace(&mut c, vec![]).await;
    let ws2 = workspace(&mut c, vec![]).await;
    let blocker = c
        .start_build(build_req(&ws1.id, vec![step(&["sleep", "30"])]))
        .await
        .expect("start")
        .into_inner();
    let queued = c
        .start_build(build_req(&ws2.id, vec![step(&["echo", "never"])]))
        .await
        .expect("start")
        .into_inner();
    let got = c
        .get_build(pb::GetBuildRequest {
            build_id: queued.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.state, pb::BuildState::Queued as i32);
    assert_eq!(got.queue_position, Some(1));
    let resp = c
        .cancel_build(pb::CancelBuildRequest {
            build_id: queued.id.clone(),
            grace_period: None,
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(
        resp.build.expect("build").state,
        pb::BuildState::Cancelled as i32
    );
    let log = watch(&mut c, &queued.id, 0).await;
    assert_eq!(
        log.events.len(),
        2,
        "Queued then Finished: {:?}",
        log.events
    );
    assert_eq!(log.state(), pb::BuildState::Cancelled);
    c.cancel_build(pb::CancelBuildRequest {
        build_id: blocker.id.clone(),
        grace_period: Some(prost_types::Duration::default()),
    })
    .await
    .expect("cancel");
    assert_eq!(
        watch(&mut c, &blocker.id, 0).await.state(),
        pb::BuildState::Cancelled
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_step_timeout_ends_the_build_timed_out() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let mut slow = step(&["sleep", "30"]);
    slow.timeout = Some(prost_types::Duration {
        seconds: 0,
        nanos: 500_000_000,
    });
    let log = run(&mut c, build_req(&ws.id, vec![slow])).await;
    assert_eq!(
        log.state(),
        pb::BuildState::TimedOut,
        "{:?}",
        log.finished()
    );
    let r = &log.step_results()[0];
    assert_eq!(r.reason, pb::StepFinishedReason::TimedOut as i32);
    assert!(!r.succeeded);
    let took = r.duration.expect("duration");
    assert!(took.seconds < 10, "{took:?}");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn the_build_wall_timeout_ends_the_build_timed_out() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let mut req = build_req(&ws.id, vec![step(&["true"]), step(&["sleep", "30"])]);
    req.limits = Some(pb::Limits {
        wall_timeout: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    });
    let log = run(&mut c, req).await;
    assert_eq!(
        log.state(),
        pb::BuildState::TimedOut,
        "{:?}",
        log.finished()
    );
    assert_eq!(
        log.step_results()[1].reason,
        pb::StepFinishedReason::TimedOut as i32
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn the_output_limit_ends_the_step_and_the_log_says_so() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let mut req = build_req(
        &ws.id,
        vec![
            step(&[
                "python3",
                "-c",
                "import sys\nwhile True: sys.stdout.write('y' * 1000 + '\\n')",
            ]),
            step(&["echo", "never"]),
        ],
    );
    req.limits = Some(pb::Limits {
        output_bytes: Some(100_000),
        ..Default::default()
    });
    let log = run(&mut c, req).await;
    assert_eq!(log.state(), pb::BuildState::Failed);
    let results = log.step_results();
    assert_eq!(results.len(), 1);
    assert_eq!(
        results[0].reason,
        pb::StepFinishedReason::OutputLimit as i32
    );
    assert!(
        results[0].message.contains("output limit of 100000 bytes"),
        "{}",
        results[0].message
    );
    assert!(
        log.finished().message.contains("output limit"),
        "{:?}",
        log.finished()
    );
    assert_eq!(
        log.stdout(0).len() + log.stderr(0).len(),
        100_000,
        "exactly the limit, not clipped silently"
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn another_users_build_is_not_found_for_get_watch_and_cancel() {
    let rig = rig().await;
    let mut alice = rig.client("alice-user").await;
    let mut bob = rig.client("bob-user").await;
    let ws = workspace(&mut alice, vec![file("secret.txt", "s")]).await;
    let build = alice
        .start_build(build_req(&ws.id, vec![step(&["true"])]))
        .await
        .expect("start")
        .into_inner();
    let s = bob
        .get_build(pb::GetBuildRequest {
            build_id: build.id.clone(),
        })
        .await
        .expect_err("hidden");
    assert_eq!(s.code(), Code::NotFound);
    let s = bob
        .watch_build(pb::WatchBuildRequest {
            build_id: build.id.clone(),
            after_sequence: 0,
        })
        .await
        .expect_err("hidden");
    assert_eq!(s.code(), Code::NotFound);
    let s = bob
        .cancel_build(pb::CancelBuildRequest {
            build_id: build.id.clone(),
            grace_period: None,
        })
        .await
        .expect_err("hidden");
    assert_eq!(s.code(), Code::NotFound);
    let s = bob
        .get_workspace(pb::GetWorkspaceRequest {
            workspace_id: ws.id.clone(),
        })
        .await
        .expect_err("hidden");
    assert_eq!(s.code(), Code::NotFound);
    let s = bob
        .start_build(build_req(&ws.id, vec![step(&["true"])]))
        .await
        .expect_err("hidden");
    assert_eq!(s.code(), Code::NotFound);
    let listed = bob
        .list_builds(pb::ListBuildsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.builds.is_empty());
    let listed = bob
        .list_builds(pb::ListBuildsRequest {
            owner: Some("alice".into()),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(listed.builds.is_empty());
    // An admin sees and controls everything.
    let mut adam = rig.client("adam-admin").await;
    adam.get_build(pb::GetBuildRequest { build_id: build.id })
        .await
        .expect("admin reads");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_viewer_watches_but_cannot_start() {
    let rig = rig().await;
    let mut alice = rig.client("alice-user").await;
    let mut vera = rig.client("vera-viewer").await;
    let ws = workspace(&mut alice, vec![]).await;
    let build = alice
        .start_build(build_req(&ws.id, vec![step(&["echo", "hi"])]))
        .await
        .expect("start")
        .into_inner();
    let log = watch(&mut vera, &build.id, 0).await;
    assert_eq!(log.stdout(0), b"hi\n");
    let s = vera
        .start_build(build_req(&ws.id, vec![step(&["true"])]))
        .await
        .expect_err("viewer");
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = vera
        .cancel_build(pb::CancelBuildRequest {
            build_id: build.id,
            grace_period: None,
        })
        .await
        .expect_err("viewer");
    assert_eq!(s.code(), Code::PermissionDenied);
    let listed = vera
        .list_builds(pb::ListBuildsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.builds.len(), 1);
}
}

kiln_testkit::both_backends! {
/// Only CancelBuild and the build's own timeouts end a build: not the RunBuild call that
/// started it running out of its deadline, and not its client going away.
#[tokio::test]
async fn a_run_build_deadline_or_disconnect_never_ends_the_build() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let slow = || {
        build_req(
            &ws.id,
            vec![step(&[
                "python3",
                "-c",
                "import time\nprint('begun', flush=True)\ntime.sleep(1)\nprint('done')\n",
            ])],
        )
    };

    // 1. A 400 ms deadline, enforced as grpcio and grpc-js clients do: the call is
    //    cancelled (RST_STREAM) when it passes, mid-step.
    //    The first event is awaited whatever the time, so that the build surely exists
    //    however slow this machine is; the rest of the call gets what is left.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(400);
    let mut request = tonic::Request::new(slow());
    request.set_timeout(Duration::from_millis(400));
    let mut stream = c.run_build(request).await.expect("run").into_inner();
    stream.message().await.expect("ok").expect("first event");
    let rest = async {
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    };
    let outcome = tokio::time::timeout_at(deadline, rest).await;
    assert!(
        outcome.is_err(),
        "the deadline passed mid-step: {outcome:?}"
    );
    drop(stream);

    // 2. The client drops the RunBuild stream after its first event.
    let mut stream = c.run_build(slow()).await.expect("run").into_inner();
    stream.message().await.expect("ok").expect("first event");
    drop(stream);

    // Both builds run to the end, with all their output.
    let builds = c
        .list_builds(pb::ListBuildsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .builds;
    assert_eq!(builds.len(), 2);
    for b in builds {
        let log = watch(&mut c, &b.id, 0).await;
        assert_eq!(
            log.state(),
            pb::BuildState::Succeeded,
            "{:?}",
            log.finished()
        );
        assert_eq!(log.stdout(0), b"begun\ndone\n");
    }
}
}
