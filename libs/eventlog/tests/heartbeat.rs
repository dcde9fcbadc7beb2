//! Heartbeats during silence, on tokio's paused clock (no real sleeps).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use kiln_eventlog::watch;
use tokio::time::Instant;

const BEAT: Duration = Duration::from_secs(15);

#[tokio::test(start_paused = true)]
async fn a_silent_live_log_sends_heartbeats_with_the_last_sequence() {
    let store = MemStore::default();
    let (logs, log) = live("a", 1 << 20);
    log.append(&store, vec![data(1), data(1)], vec![])
        .await
        .unwrap();
    let mut stream = Box::pin(watch(store.clone(), logs, "a".into(), 0, BEAT));
    assert_eq!(stream.next().await.unwrap().unwrap().seq, 1);
    assert_eq!(stream.next().await.unwrap().unwrap().seq, 2);
    for _ in 0..3 {
        let start = Instant::now();
        let e = stream.next().await.unwrap().unwrap();
        assert_eq!(
            e,
            Ev {
                seq: 2,
                kind: Kind::Heartbeat
            }
        );
        assert_eq!(
            start.elapsed(),
            BEAT,
            "one heartbeat per interval of silence"
        );
    }
    // An event after the silence comes next, and heartbeats are never stored.
    log.append(&store, vec![fin()], vec![]).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap().seq, 3);
    assert!(stream.next().await.is_none());
    assert!(store.stored("a").iter().all(|e| e.kind != Kind::Heartbeat));
}

#[tokio::test(start_paused = true)]
async fn no_heartbeat_while_events_keep_coming() {
    let store = MemStore::default();
    let (logs, log) = live("a", 1 << 20);
    let writer = {
        let (store, log) = (store.clone(), log.clone());
        tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(BEAT / 2).await;
                log.append(&store, vec![data(1)], vec![]).await.unwrap();
            }
            log.append(&store, vec![fin()], vec![]).await.unwrap();
        })
    };
    let got = sequences(watch(store.clone(), logs, "a".into(), 0, BEAT)).await;
    assert_eq!(got, range(1, 21));
    writer.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stored_log_that_is_not_over_sends_heartbeats_then_follows_it() {
    // No live log here (another process writes it, or it is stored but not registered
    // yet): the watcher follows the store, with heartbeats while nothing arrives.
    let store = MemStore::default();
    let logs = Arc::new(Registry::default());
    store.put(
        "a",
        vec![Ev {
            seq: 1,
            kind: Kind::Data(vec![]),
        }],
    );
    let mut stream = Box::pin(watch(store.clone(), logs.clone(), "a".into(), 0, BEAT));
    assert_eq!(stream.next().await.unwrap().unwrap().seq, 1);
    let start = Instant::now();
    let e = stream.next().await.unwrap().unwrap();
    assert_eq!(e.kind, Kind::Heartbeat);
    assert_eq!(e.seq, 1);
    assert!(start.elapsed() >= BEAT);
    // It went live: the watcher switches to the live log and gets what is published.
    let log = Log::new("a", 1, (), 1 << 20);
    logs.insert(log.clone());
    log.append(&store, vec![data(1), fin()], vec![])
        .await
        .unwrap();
    assert_eq!(sequences(stream).await, range(2, 3));
}
