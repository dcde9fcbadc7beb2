//! Live output: resuming, many watchers, a watcher that never reads.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_proto::build as pb;
use pb::build_event::Event;

/// A step printing `lines` numbered lines, flushing each, pausing `pause` s every 50.
fn printer(lines: usize, pause: f64) -> pb::Step {
    let code = format!(
        "import sys, time\nfor i in range({lines}):\n    sys.stdout.write('line %06d\\n' % i); sys.stdout.flush()\n    if i % 50 == 0: time.sleep({pause})\n"
    );
    step(&["python3", "-c", &code])
}

fn expected(lines: usize) -> Vec<u8> {
    (0..lines)
        .flat_map(|i| format!("line {i:06}\n").into_bytes())
        .collect()
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_watcher_that_disconnects_resumes_with_exactly_the_rest() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let build = c
        .start_build(build_req(&ws.id, vec![printer(1000, 0.01)]))
        .await
        .expect("start")
        .into_inner();
    let mut first = c
        .watch_build(pb::WatchBuildRequest {
            build_id: build.id.clone(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 8 {
        let e = first.message().await.expect("ok").expect("more");
        if !matches!(e.event, Some(Event::Heartbeat(_))) {
            seen.push(e);
        }
    }
    drop(first); // disconnect mid-build
    let last = seen.last().expect("events").sequence;
    let rest = watch(&mut c, &build.id, last).await;
    assert_eq!(
        rest.events.first().expect("more").sequence,
        last + 1,
        "no gap, no duplicate"
    );
    let mut all = Log { events: seen };
    all.events.extend(rest.events);
    all.assert_dense_from(1);
    assert_eq!(all.stdout(0), expected(1000));
    assert_eq!(all.state(), pb::BuildState::Succeeded);
    // The whole log, replayed after the end, is the same.
    let replay = watch(&mut c, &build.id, 0).await;
    assert_eq!(replay.events, all.events);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn two_hundred_concurrent_watchers_all_receive_every_byte() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let lines = 20_000;
    let build = c
        .start_build(build_req(&ws.id, vec![printer(lines, 0.002)]))
        .await
        .expect("start")
        .into_inner();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(rig.client("vera-viewer").await);
    }
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut client = clients[i % clients.len()].clone();
        let id = build.id.clone();
        tasks.push(tokio::spawn(
            async move { watch(&mut client, &id, 0).await },
        ));
    }
    let want = expected(lines);
    for t in tasks {
        let log = t.await.expect("watcher");
        log.assert_dense_from(1);
        assert_eq!(log.stdout(0), want);
        assert_eq!(log.state(), pb::BuildState::Succeeded);
    }
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_watcher_that_never_reads_slows_neither_the_build_nor_the_others() {
    let rig = rig_with(|c| c.live_window_bytes = 256 * 1024).await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    // 8 MiB of output, as fast as python can write it.
    let code =
        "import sys\nb = b'x' * 65535 + b'\\n'\nfor _ in range(128): sys.stdout.buffer.write(b)\n";
    let build = c
        .start_build(build_req(&ws.id, vec![step(&["python3", "-c", code])]))
        .await
        .expect("start")
        .into_inner();
    let mut stalled_client = rig.client("vera-viewer").await;
    let stalled = stalled_client
        .watch_build(pb::WatchBuildRequest {
            build_id: build.id.clone(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let started = Instant::now();
    let log = watch(&mut c, &build.id, 0).await;
    let took = started.elapsed();
    assert_eq!(log.state(), pb::BuildState::Succeeded);
    assert_eq!(log.stdout(0).len(), 8 << 20);
    assert!(
        took < Duration::from_secs(30),
        "build and reader took {took:?}"
    );
    // The stalled watcher has lost nothing: it reads everything now, from the store.
    let late = tokio::time::timeout(Duration::from_secs(60), collect(stalled))
        .await
        .expect("in time");
    assert_eq!(late.events, log.events);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn heartbeats_repeat_the_last_sequence_during_silence() {
    let rig = rig_with(|c| c.heartbeat_interval = Duration::from_millis(200)).await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let mut stream = c
        .run_build(build_req(&ws.id, vec![step(&["sleep", "1"])]))
        .await
        .expect("run")
        .into_inner();
    let mut last = 0;
    let mut heartbeats = 0;
    while let Some(e) = stream.message().await.expect("ok") {
        match e.event {
            Some(Event::Heartbeat(_)) => {
                assert_eq!(e.sequence, last, "a heartbeat repeats the last sequence");
                heartbeats += 1;
            }
            _ => last = e.sequence,
        }
    }
    assert!(heartbeats >= 2, "{heartbeats} heartbeats");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_finished_build_replays_from_any_sequence_and_closes() {
    let rig = rig().await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let full = run(&mut c, build_req(&ws.id, vec![step(&["echo", "hi"])])).await;
    let n = full.events.len() as u64;
    let build = c
        .list_builds(pb::ListBuildsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .builds
        .remove(0);
    for after in [0, 2, n - 1, n, n + 5] {
        let rest = watch(&mut c, &build.id, after).await;
        let want: Vec<_> = full
            .events
            .iter()
            .filter(|e| e.sequence > after)
            .cloned()
            .collect();
        assert_eq!(rest.events, want, "after {after}");
    }
    assert_eq!(build.last_sequence, n);
}
}
