//! Watching: resume without gap or duplicate, slow and idle watchers, many watchers,
//! replay after the end, store errors.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use kiln_eventlog::watch;

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn resuming_after_n_gets_exactly_the_events_after_n() {
    let store = MemStore::default();
    // 100-byte events, a 4 KiB window: the window holds the last ~35 events.
    let (logs, log) = live("a", 4096);
    let last = write(&store, &log, 1000, 100).await;
    assert_eq!(last, 1001);
    for after in [0, 1, 500, 990, 1000, 1001] {
        let reads = store.reads();
        let got = sequences(watch(store.clone(), logs.clone(), "a".into(), after, HOUR)).await;
        assert_eq!(got, range(after + 1, last), "live, after {after}");
        if after >= 990 {
            assert_eq!(
                store.reads(),
                reads,
                "after {after}: served from the window"
            );
        } else {
            assert!(
                store.reads() > reads,
                "after {after}: fell behind the window"
            );
        }
    }
    // The log is over and no longer live: the same from the store alone.
    logs.remove("a");
    for after in [0, 1, 500, 990, 1000, 1001] {
        let got = sequences(watch(store.clone(), logs.clone(), "a".into(), after, HOUR)).await;
        assert_eq!(got, range(after + 1, last), "stored, after {after}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_falls_behind_the_window_catches_up_from_the_store() {
    let store = MemStore::default();
    let (logs, log) = live("a", 1024);
    let mut stream = Box::pin(watch(store.clone(), logs.clone(), "a".into(), 0, HOUR));
    let writer = {
        let (store, log) = (store.clone(), log.clone());
        tokio::spawn(async move { write(&store, &log, 5000, 30).await })
    };
    // Read slowly, a yield per event, while the writer runs ahead.
    let mut got = Vec::new();
    while let Some(e) = stream.next().await {
        got.push(e.unwrap().seq);
        tokio::task::yield_now().await;
    }
    let last = writer.await.unwrap();
    assert_eq!(got, range(1, last));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_does_not_block_the_writer() {
    let store = MemStore::default();
    let (logs, log) = live("a", 8 * 1024);
    log.append(&store, vec![data(10)], vec![]).await.unwrap();
    let mut idle = Box::pin(watch(store.clone(), logs.clone(), "a".into(), 0, HOUR));
    // The idle watcher has started: it has its position and is subscribed to the log.
    assert_eq!(idle.next().await.unwrap().unwrap().seq, 1);
    let reads = store.reads();
    let writer = {
        let (store, log) = (store.clone(), log.clone());
        tokio::spawn(async move { write(&store, &log, 20_000, 100).await })
    };
    // Bounded, so a writer that waited for the idle watcher fails the test instead of
    // hanging it; the writer needs well under a second.
    let last = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("the writer was held up by a watcher that does not read")
        .unwrap();
    assert_eq!(last, 20_002);
    // It loses nothing: the rest comes from the store, then the window.
    let mut got = vec![1];
    while let Some(e) = idle.next().await {
        got.push(e.unwrap().seq);
    }
    assert_eq!(got, range(1, last));
    assert!(
        store.reads() > reads,
        "it read what left the window from the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watchers_each_get_every_event() {
    let store = MemStore::default();
    let (logs, log) = live("a", 16 * 1024);
    let watchers: Vec<_> = (0..200)
        .map(|_| {
            let stream = watch(store.clone(), logs.clone(), "a".into(), 0, HOUR);
            tokio::spawn(sequences(stream))
        })
        .collect();
    let last = write(&store, &log, 2000, 50).await;
    for w in watchers {
        assert_eq!(w.await.unwrap(), range(1, last));
    }
}

#[tokio::test]
async fn a_finished_log_replays_and_closes() {
    let store = MemStore::default();
    let (logs, log) = live("a", 1 << 20);
    let last = write(&store, &log, 10, 5).await;
    // Still registered (a writer that has not deregistered yet): replay from the window.
    let got = sequences(watch(store.clone(), logs.clone(), "a".into(), 0, HOUR)).await;
    assert_eq!(got, range(1, last));
    logs.remove("a");
    // Deregistered: replay from the store, then close.
    let got = sequences(watch(store.clone(), logs.clone(), "a".into(), 3, HOUR)).await;
    assert_eq!(got, range(4, last));
    // Nothing after the end: closes at once. A sequence far past the end, too.
    for after in [last, u64::MAX] {
        let got = sequences(watch(store.clone(), logs.clone(), "a".into(), after, HOUR)).await;
        assert!(got.is_empty());
    }
    // A log the store does not have is closed.
    let got = sequences(watch(store.clone(), logs.clone(), "nope".into(), 0, HOUR)).await;
    assert!(got.is_empty());
}

#[tokio::test]
async fn sources_that_overlap_give_neither_a_gap_nor_a_duplicate() {
    // The store hands back everything from the start on every read, so the window and
    // the store overlap; the watcher still yields each event after its start once.
    let store = MemStore::default();
    store.sloppy_reads(true);
    let (logs, log) = live("a", 512);
    let last = write(&store, &log, 300, 20).await;
    for after in [0, 7, 150, 299] {
        let got = sequences(watch(store.clone(), logs.clone(), "a".into(), after, HOUR)).await;
        assert_eq!(got, range(after + 1, last), "after {after}");
    }
}

#[tokio::test]
async fn a_store_error_ends_the_watch_after_it_is_yielded() {
    let store = MemStore::default();
    store.put(
        "a",
        vec![
            Ev {
                seq: 1,
                kind: Kind::Data(vec![]),
            },
            Ev {
                seq: 2,
                kind: Kind::Final,
            },
        ],
    );
    let logs = std::sync::Arc::new(Registry::default());
    store.fail_reads(true);
    let got: Vec<_> = watch(store.clone(), logs, "a".into(), 0, HOUR)
        .collect()
        .await;
    assert_eq!(got, vec![Err(StoreError("read failed"))]);
}
