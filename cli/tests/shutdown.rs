//! Graceful shutdown: SIGTERM turns health NOT_SERVING, lets in-flight streams run up to
//! the grace period, and exits cleanly.

mod common;

use std::time::{Duration, Instant};

use common::Suite;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

#[tokio::test]
async fn sigterm_reports_not_serving_then_exits_after_the_grace_period() {
    let mut suite = Suite::start_with(&["--shutdown-grace-secs", "2"]);
    let mut health = HealthClient::new(suite.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let first: HealthCheckResponse = watch.message().await.expect("ok").expect("a status");
    assert_eq!(first.status(), ServingStatus::Serving);

    suite.terminate();
    let started = Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a status change arrives")
        .expect("stream still open during the grace period")
        .expect("a status");
    assert_eq!(next.status(), ServingStatus::NotServing);

    // The open watch keeps the server in its grace period; then it exits cleanly.
    let status = tokio::task::spawn_blocking(move || {
        let status = suite.wait_exit(Duration::from_secs(20));
        (status, suite.stdout_lines())
    })
    .await
    .expect("join");
    let (exit, lines) = status;
    let exit = exit.expect("kiln exits after its grace period");
    assert!(exit.success(), "{exit:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "grace period honoured"
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("kiln stopped"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn sigterm_with_no_calls_in_flight_exits_at_once() {
    let mut suite = Suite::start();
    let started = Instant::now();
    suite.terminate();
    let exit = suite.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(exit.success(), "{exit:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
