//! Opening a database an earlier release wrote: its builds (proto blobs) read back as
//! they did then, on both engines.

use std::borrow::Cow;
use std::collections::HashMap;

use kiln_proto::build as pb;
use prost::Message;
use sqlx::migrate::Migrator;

use super::{POSTGRES, SCHEMA, SQLITE, Store};
use crate::model::BuildState;
use crate::store::ListFilter;
use crate::wire;

/// The migrations of the release before the model (0001–0003): the schema whose
/// `builds` rows hold only proto blobs.
fn previous(all: &'static Migrator) -> &'static Migrator {
    Box::leak(Box::new(Migrator {
        migrations: Cow::Owned(
            all.migrations
                .iter()
                .filter(|m| m.version <= 3)
                .cloned()
                .collect(),
        ),
        ignore_missing: all.ignore_missing,
        locking: all.locking,
        no_tx: all.no_tx,
        table_name: all.table_name.clone(),
        create_schemas: all.create_schemas.clone(),
    }))
}

fn dur(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

/// A finished build as the previous release's StartBuild and runner left it: a
/// command step and an argv step, env, limits, labels, and two step results (one of a
/// step that never started, so without durations).
fn old_build() -> pb::Build {
    pb::Build {
        id: "0b6f3c1e-0000-4000-8000-000000000001".into(),
        workspace_id: "ws-1".into(),
        owner: "alice".into(),
        state: pb::BuildState::Failed as i32,
        steps: vec![
            pb::Step {
                command: Some("make 'all targets'".into()),
                working_dir: "src".into(),
                timeout: dur(30, 500),
                allow_failure: true,
                ..Default::default()
            },
            pb::Step {
                argv: vec!["cargo".into(), "test".into()],
                ..Default::default()
            },
        ],
        env: HashMap::from([("RUST_LOG".into(), "debug".into())]),
        limits: Some(wire::limits_to_proto(&crate::config::BuildLimits::MAX)),
        labels: HashMap::from([("ci".into(), "nightly".into())]),
        created_at: Some(wire::timestamp(1_700_000_000_123_456)),
        started_at: Some(wire::timestamp(1_700_000_001_000_000)),
        finished_at: Some(wire::timestamp(1_700_000_009_000_001)),
        failure_message: "step 2 of 2 (`cargo test`) exited with code 101".into(),
        last_sequence: 7,
        queue_position: None,
        current_step_index: None,
        step_results: vec![
            pb::StepFinished {
                step_index: 0,
                exit_code: Some(2),
                reason: pb::StepFinishedReason::Exited as i32,
                duration: dur(1, 250_000_000),
                cpu_time: dur(0, 900_000_000),
                peak_memory_bytes: 12 << 20,
                succeeded: true,
                ..Default::default()
            },
            pb::StepFinished {
                step_index: 1,
                reason: pb::StepFinishedReason::SpawnFailed as i32,
                message: "invalid command: no such program".into(),
                ..Default::default()
            },
        ],
    }
}

/// Writes `b` the way the previous release's `insert_build` and log appends did.
async fn insert_the_old_way(db: &kiln_store::Database, b: &pb::Build) {
    let spec = pb::Build {
        id: b.id.clone(),
        workspace_id: b.workspace_id.clone(),
        owner: b.owner.clone(),
        steps: b.steps.clone(),
        env: b.env.clone(),
        limits: b.limits,
        labels: b.labels.clone(),
        ..Default::default()
    };
    let mut results = Vec::new();
    for r in &b.step_results {
        r.encode_length_delimited(&mut results).expect("encode");
    }
    let micros = |t: &Option<prost_types::Timestamp>| {
        t.map(|t| t.seconds * 1_000_000 + i64::from(t.nanos / 1000))
    };
    sqlx::query(
        "INSERT INTO workspaces (id, owner, created_at, updated_at, last_used_at) \
         VALUES ($1, $2, 0, 0, 0) ON CONFLICT DO NOTHING",
    )
    .bind(&b.workspace_id)
    .bind(&b.owner)
    .execute(&db.write)
    .await
    .expect("workspace");
    sqlx::query(
        "INSERT INTO builds (id, workspace_id, owner, state, spec, created_at, started_at, \
         finished_at, failure_message, last_sequence, step_results, request_id, request_hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(&b.id)
    .bind(&b.workspace_id)
    .bind(&b.owner)
    .bind(b.state)
    .bind(spec.encode_to_vec())
    .bind(micros(&b.created_at).expect("created"))
    .bind(micros(&b.started_at))
    .bind(micros(&b.finished_at))
    .bind(&b.failure_message)
    .bind(i64::try_from(b.last_sequence).expect("sequence"))
    .bind(results)
    .bind(format!("retry-{}", b.id))
    .bind("hash-1")
    .execute(&db.write)
    .await
    .expect("build");
    for (k, v) in &b.labels {
        sqlx::query("INSERT INTO build_labels (build_id, key, value) VALUES ($1, $2, $3)")
            .bind(&b.id)
            .bind(k)
            .bind(v)
            .execute(&db.write)
            .await
            .expect("label");
    }
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_build_of_the_previous_release_reads_back_identically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = kiln_testkit::database_url()
        .await
        .unwrap_or_else(|| kiln_store::DatabaseUrl::sqlite(dir.path().join("build.db")));
    let migrations = kiln_store::Migrations {
        sqlite: previous(&SQLITE),
        postgres: previous(&POSTGRES),
    };
    let old = kiln_store::Database::open(&url, SCHEMA, migrations)
        .await
        .expect("the previous schema");
    let before = old_build();
    insert_the_old_way(&old, &before).await;
    old.close().await;

    for opening in ["first", "second"] {
        let store = Store::open(&url, &dir.path().join("outputs"))
            .await
            .expect("opens");
        let row = store
            .get_build(&before.id)
            .await
            .expect("read")
            .expect("the build is still there");
        assert_eq!(
            wire::build_to_proto(&row.build, None),
            before,
            "{opening} opening: as the previous release answered GetBuild"
        );
        assert_eq!(row.request_hash.as_deref(), Some("hash-1"));
        assert_eq!(
            row.build.spec.steps[0].argv,
            ["make", "all targets"],
            "the command is split in the model"
        );
        let filtered = store
            .list_builds(&ListFilter {
                states: vec![BuildState::Failed.code()],
                labels: vec![("ci".into(), "nightly".into())],
                limit: 10,
                ..ListFilter::default()
            })
            .await
            .expect("list");
        assert_eq!(filtered.len(), 1, "found by state and label");
        let by_request = store
            .build_by_request("alice", &format!("retry-{}", before.id))
            .await
            .expect("by request");
        assert!(by_request.is_some(), "a retry still finds it");
        // Converted, not read through the blobs: they were emptied.
        let blob: Vec<u8> = sqlx::query_scalar("SELECT spec FROM builds WHERE id = $1")
            .bind(&before.id)
            .fetch_one(&store.read)
            .await
            .expect("blob");
        assert!(blob.is_empty(), "the old blob was replaced by the model's JSON");
        store.close().await;
    }
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_corrupt_old_row_is_left_as_it_is_and_the_others_are_converted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = kiln_testkit::database_url()
        .await
        .unwrap_or_else(|| kiln_store::DatabaseUrl::sqlite(dir.path().join("build.db")));
    let migrations = kiln_store::Migrations {
        sqlite: previous(&SQLITE),
        postgres: previous(&POSTGRES),
    };
    let old = kiln_store::Database::open(&url, SCHEMA, migrations)
        .await
        .expect("the previous schema");
    let good = old_build();
    let bad = pb::Build {
        id: "0b6f3c1e-0000-4000-8000-000000000000".into(),
        ..old_build()
    };
    insert_the_old_way(&old, &bad).await;
    insert_the_old_way(&old, &good).await;
    sqlx::query("UPDATE builds SET spec = $1 WHERE id = $2")
        .bind(vec![0xffu8, 0xff, 0xff])
        .bind(&bad.id)
        .execute(&old.write)
        .await
        .expect("corrupt it");
    old.close().await;
    let store = Store::open(&url, &dir.path().join("outputs"))
        .await
        .expect("one bad row does not keep the service down");
    let read = store.get_build(&good.id).await.expect("read").expect("there");
    assert_eq!(wire::build_to_proto(&read.build, None), good);
    let err = store.get_build(&bad.id).await.expect_err("corrupt");
    assert!(matches!(err, crate::error::BuildError::Corrupt(_)), "{err}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM builds WHERE spec_json IS NULL")
        .fetch_one(&store.read)
        .await
        .expect("count");
    assert_eq!(left, 1, "only the corrupt row stays unconverted, its blob kept");
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_build_queued_by_the_previous_release_runs_after_the_upgrade() {
    use futures::StreamExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = crate::BuildConfig::new(dir.path().to_path_buf());
    config.database_url = kiln_testkit::database_url_in(dir.path()).await;
    let url = config.database();
    let migrations = kiln_store::Migrations {
        sqlite: previous(&SQLITE),
        postgres: previous(&POSTGRES),
    };
    let old = kiln_store::Database::open(&url, SCHEMA, migrations)
        .await
        .expect("the previous schema");
    let queued = pb::Build {
        id: "0b6f3c1e-0000-4000-8000-0000000000aa".into(),
        workspace_id: "6c1b2f0e-0000-4000-8000-00000000000a".into(),
        state: pb::BuildState::Queued as i32,
        steps: vec![
            pb::Step {
                command: Some("echo 'from the old release'".into()),
                ..Default::default()
            },
            pb::Step {
                argv: vec!["true".into()],
                ..Default::default()
            },
        ],
        started_at: None,
        finished_at: None,
        failure_message: String::new(),
        last_sequence: 1,
        step_results: Vec::new(),
        ..old_build()
    };
    insert_the_old_way(&old, &queued).await;
    let first = pb::BuildEvent {
        sequence: 1,
        time: queued.created_at,
        event: Some(pb::build_event::Event::Queued(pb::Queued {
            position: 1,
            build_id: queued.id.clone(),
        })),
    };
    sqlx::query("INSERT INTO build_events (build_id, sequence, time, event) VALUES ($1, 1, 0, $2)")
        .bind(&queued.id)
        .bind(first.encode_to_vec())
        .execute(&old.write)
        .await
        .expect("event");
    old.close().await;
    std::fs::create_dir_all(config.workspaces_dir().join(&queued.workspace_id)).expect("ws dir");

    let api = crate::BuildApi::open(config).await.expect("opens");
    let shared = api.shared().clone();
    let events: Vec<pb::BuildEvent> = crate::log::watch(
        shared.store.clone(),
        shared.logs.clone(),
        queued.id.clone(),
        0,
        std::time::Duration::from_secs(15),
    )
    .map(|e| e.expect("event"))
    .take_while(|e| {
        let go_on = !matches!(e.event, Some(pb::build_event::Event::Finished(_)));
        async move { go_on }
    })
    .collect()
    .await;
    let argv: Vec<Vec<String>> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::build_event::Event::StepStarted(s)) => Some(s.argv.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        argv,
        [vec!["echo".to_owned(), "from the old release".to_owned()], vec!["true".to_owned()]],
        "the old spec's command ran split as it was accepted"
    );
    let output: Vec<u8> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::build_event::Event::Output(o)) => Some(o.data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(output, b"from the old release\n");
    let row = shared.store.get_build(&queued.id).await.expect("read").expect("there");
    assert_eq!(row.build.state, BuildState::Succeeded, "{}", row.build.failure_message);
    assert_eq!(row.build.step_results.len(), 2);
    let shown = wire::build_to_proto(&row.build, None);
    assert_eq!(shown.steps, queued.steps, "GetBuild still shows the steps as sent");
    api.shutdown().await;
}
}
