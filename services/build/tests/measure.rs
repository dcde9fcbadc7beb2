//! Figures, not assertions (`cargo nextest run -p kiln-build --run-ignored only --test
//! measure --no-capture`, best with `--release`). The real benchmarks belong in bench/.

mod common;

use std::time::Instant;

use common::*;
use kiln_proto::build as pb;
use pb::build_event::Event;

#[tokio::test]
#[ignore = "measurement"]
async fn measure_submit_to_first_byte_and_throughput() {
    let rig = rig_with(|c| c.policy.max_limits.output_bytes = 1 << 30).await;
    let mut c = rig.client("alice-user").await;
    let ws = workspace(&mut c, vec![]).await;
    let mut firsts = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let mut s = c
            .run_build(build_req(&ws.id, vec![step(&["echo", "hi"])]))
            .await
            .expect("run")
            .into_inner();
        while let Some(e) = s.message().await.expect("ok") {
            if matches!(e.event, Some(Event::Output(_))) {
                firsts.push(t.elapsed());
                break;
            }
        }
        while s.message().await.expect("ok").is_some() {}
    }
    firsts.sort();
    eprintln!(
        "submit → first output byte of echo: p50 {:?}, p90 {:?}",
        firsts[15], firsts[27]
    );

    let mib = 256u64;
    let code = format!(
        "import sys\nb = b'x' * (1 << 20)\nfor _ in range({mib}): sys.stdout.buffer.write(b)\n"
    );
    let mut req = build_req(&ws.id, vec![step(&["python3", "-c", &code])]);
    req.limits = Some(pb::Limits {
        output_bytes: Some(1 << 30),
        ..Default::default()
    });
    let t = Instant::now();
    let mut s = c.run_build(req).await.expect("run").into_inner();
    let mut bytes = 0u64;
    while let Some(e) = s.message().await.expect("ok") {
        if let Some(Event::Output(o)) = e.event {
            bytes += o.data.len() as u64;
        }
    }
    let took = t.elapsed();
    assert_eq!(bytes, mib << 20);
    eprintln!(
        "{mib} MiB to one watcher over TLS: {:?} = {:.0} MiB/s",
        took,
        mib as f64 / took.as_secs_f64()
    );
    let t = Instant::now();
    let out = std::process::Command::new("python3")
        .args(["-c", &code])
        .output()
        .expect("raw");
    let raw = t.elapsed();
    eprintln!(
        "same through a raw pipe: {:?} = {:.0} MiB/s ({} bytes)",
        raw,
        mib as f64 / raw.as_secs_f64(),
        out.stdout.len()
    );

    let lines = 20_000;
    let code = format!(
        "import sys, time\nfor i in range({lines}):\n    sys.stdout.write('line %06d\\n' % i)\n    if i % 1000 == 0: sys.stdout.flush(); time.sleep(0.01)\n"
    );
    let build = c
        .start_build(build_req(&ws.id, vec![step(&["python3", "-c", &code])]))
        .await
        .expect("start")
        .into_inner();
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(rig.client("vera-viewer").await);
    }
    let t = Instant::now();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let mut cl = clients[i % 10].clone();
            let id = build.id.clone();
            tokio::spawn(async move { watch(&mut cl, &id, 0).await.stdout(0).len() })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("watcher"), lines * 12);
    }
    eprintln!(
        "1000 watchers of one build, all bytes received: {:?}",
        t.elapsed()
    );
}
