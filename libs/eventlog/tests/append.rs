//! Appending: dense numbering, persisted before published, failed appends undone.

mod common;

use std::sync::Arc;

use common::*;
use futures::StreamExt;
use kiln_eventlog::{LiveLog, watch};

#[tokio::test]
async fn numbers_densely_from_the_last_stored_sequence() {
    let store = MemStore::default();
    let log = Log::new("a", 5, (), 1 << 20);
    assert_eq!(log.last_sequence(), 5);
    let last = log
        .append(&store, vec![data(1), data(2), data(3)], vec![])
        .await
        .unwrap();
    assert_eq!(last, 8);
    // An empty batch stores nothing and keeps the numbering.
    assert_eq!(log.append(&store, vec![], vec![]).await.unwrap(), 8);
    assert_eq!(log.append(&store, vec![fin()], vec![]).await.unwrap(), 9);
    let seqs: Vec<u64> = store.stored("a").iter().map(|e| e.seq).collect();
    assert_eq!(seqs, range(6, 9));
    assert_eq!(
        store.updates().len(),
        2,
        "one store write per non-empty batch"
    );
    assert!(log.is_finished());
}

#[tokio::test]
async fn a_failed_append_publishes_nothing_and_its_sequences_are_reused() {
    let store = MemStore::default();
    let (logs, log) = live("a", 1 << 20);
    log.append(&store, vec![data(1)], vec![]).await.unwrap();
    store.fail_appends(1);
    assert_eq!(
        log.append(&store, vec![data(1), data(1)], vec![])
            .await
            .unwrap_err(),
        StoreError("append failed")
    );
    assert_eq!(log.last_sequence(), 1);
    assert_eq!(log.append(&store, vec![fin()], vec![]).await.unwrap(), 2);
    let got = sequences(watch(store.clone(), logs, "a".into(), 0, HOUR)).await;
    assert_eq!(got, range(1, 2));
}

#[tokio::test]
async fn writer_state_follows_only_the_batches_the_store_took() {
    // The state records the sequences of the events folded into it; each update carries
    // the whole state (as a build's step results do).
    let store = MemStore::default();
    let log: Arc<LiveLog<MemStore, Vec<u64>>> = LiveLog::new("a", 0, Vec::new(), 1 << 20);
    let fold = |state: &mut Vec<u64>, events: &[Ev]| {
        state.extend(events.iter().map(|e| e.seq));
        state.clone()
    };
    log.append_with(&store, vec![data(1)], fold).await.unwrap();
    store.fail_appends(1);
    log.append_with(&store, vec![data(1), data(1)], fold)
        .await
        .unwrap_err();
    log.append_with(&store, vec![data(1)], fold).await.unwrap();
    // A plain append leaves the state alone.
    log.append(&store, vec![data(1)], vec![]).await.unwrap();
    log.append_with(&store, vec![fin()], fold).await.unwrap();
    let updates: Vec<Vec<u64>> = store.updates().into_iter().map(|(_, u)| u).collect();
    assert_eq!(
        updates,
        vec![vec![1], vec![1, 2], vec![], vec![1, 2, 4]],
        "the failed batch (2, 3) left no trace; its sequences went to the next batch"
    );
}

const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_never_see_an_event_the_store_does_not_have() {
    let store = MemStore::default();
    let (logs, log) = live("a", 2048);
    let watchers: Vec<_> = (0..20)
        .map(|_| {
            let mut stream = Box::pin(watch(store.clone(), logs.clone(), "a".into(), 0, HOUR));
            let store = store.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(e) = stream.next().await {
                    let e = e.unwrap();
                    assert!(
                        store.stored_last("a") >= e.seq,
                        "event {} was shown before it was stored",
                        e.seq
                    );
                    got.push(e.seq);
                }
                got
            })
        })
        .collect();
    let last = write(&store, &log, 3000, 40).await;
    for w in watchers {
        assert_eq!(w.await.unwrap(), range(1, last));
    }
}
