//! Bounded HTTP/2 resources: streams per connection, connections per peer, and the
//! unauthenticated long-lived streams (Health/Watch) anyone may open.

mod common;

use common::rig::{Rig, rig_with};
use kiln_rpc::client::ClientConfig;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

type Watch = tonic::Streaming<HealthCheckResponse>;

fn client(rig: &Rig) -> ClientConfig {
    let ca = std::fs::read_to_string(rig.pki.ca_cert()).expect("ca");
    ClientConfig::new(&rig.endpoint).ca_pem(ca)
}

/// Opens a Health/Watch stream and waits for its first answer.
async fn watch(
    health: &mut HealthClient<kiln_rpc::client::KilnChannel>,
) -> Result<Watch, tonic::Status> {
    let mut stream = health
        .watch(HealthCheckRequest::default())
        .await?
        .into_inner();
    stream.message().await?.expect("a first status");
    Ok(stream)
}

#[tokio::test]
async fn unauthenticated_watch_streams_are_capped_per_peer() {
    let rig = rig_with(
        |s| {
            s.max_open_streams_per_peer = 5;
            s.max_concurrent_streams = 100;
        },
        |_| {},
    )
    .await;
    let mut health = HealthClient::new(client(&rig).connect().await.expect("connects"));
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        match watch(&mut health).await {
            Ok(stream) => open.push(stream),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((open.len(), refused), (5, 15));
    // Another connection from the same address shares the cap.
    let mut other = HealthClient::new(client(&rig).connect().await.expect("connects"));
    assert!(watch(&mut other).await.is_err());
    // Closing a stream gives its slot back.
    drop(open.pop());
    let mut again = None;
    for _ in 0..100 {
        if let Ok(stream) = watch(&mut other).await {
            again = Some(stream);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "a freed slot is reused");
}

#[tokio::test]
async fn streams_beyond_the_connections_limit_wait_for_a_free_one() {
    let rig = rig_with(
        |s| {
            s.max_open_streams_per_peer = 100;
            s.max_concurrent_streams = 3;
        },
        |_| {},
    )
    .await;
    let channel = client(&rig).connect().await.expect("connects");
    let mut health = HealthClient::new(channel.clone());
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(watch(&mut health).await.expect("within the limit"));
    }
    // The server's SETTINGS_MAX_CONCURRENT_STREAMS makes the fourth wait, on the same
    // connection, until a stream ends.
    let mut fourth = HealthClient::new(channel);
    let queued = tokio::spawn(async move { watch(&mut fourth).await.map(drop) });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!queued.is_finished(), "a fourth stream was served at once");
    drop(open.pop());
    queued
        .await
        .expect("joined")
        .expect("served once a stream ended");
}

#[tokio::test]
async fn connections_per_peer_are_capped() {
    let rig = rig_with(|s| s.max_connections_per_peer = 3, |_| {}).await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        match client(&rig).connect().await {
            Ok(channel) => {
                let mut health = HealthClient::new(channel);
                match health.check(HealthCheckRequest::default()).await {
                    Ok(_) => held.push(health),
                    Err(_) => refused += 1,
                }
            }
            Err(_) => refused += 1,
        }
    }
    assert_eq!((held.len(), refused), (3, 3));
}
