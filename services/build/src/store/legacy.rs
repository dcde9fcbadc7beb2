//! Builds stored by releases before the model (proto blobs in `builds.spec` and
//! `builds.step_results`), rewritten into the model's JSON columns when the store
//! opens. Migration 0004 added the columns; SQL cannot decode protobuf, so this part of
//! the upgrade is Rust.
//!
//! Decided against reading both formats forever: the blobs would have to stay
//! writable, and every read path would keep a second decoder. Only a row an older
//! replica inserts during a rolling upgrade is read from its blob (see
//! `Store::build_from_row`); the next open converts it.
//!
//! Idempotent and safe to race: each batch is one transaction (on Postgres under the
//! schema's advisory lock, see `kiln_store::Database::begin`), and a row is only
//! touched while its `spec_json` is still NULL, so a second replica opening at the
//! same moment, or a restart halfway through, finds only what is left.

use sqlx::Row;

use crate::error::Result;
use crate::store::results_json;
use crate::wire::{legacy_spec, legacy_step_results};

/// Rows decoded per transaction: bounds how long one holds the writer.
const BATCH: i64 = 256;

/// Fills `spec_json` and `step_results_json` of every row that has only blobs, and
/// empties the blobs. A row whose blobs do not decode is left as it is, blobs and
/// all, with a warning: that one build answers INTERNAL on reads (as it did before),
/// and the service still opens. Returns how many rows it converted.
pub(super) async fn backfill(db: &kiln_store::Database) -> Result<u64> {
    let mut converted = 0;
    // Keyset paging: rows left unconverted (corrupt) are not selected again.
    let mut after = String::new();
    loop {
        let mut tx = db.begin().await?;
        let rows = sqlx::query(
            "SELECT id, spec, step_results FROM builds WHERE spec_json IS NULL AND id > $1 \
             ORDER BY id LIMIT $2",
        )
        .bind(&after)
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else {
            tx.commit().await?;
            break;
        };
        after = last.try_get("id")?;
        for row in &rows {
            let id: String = row.try_get("id")?;
            let decoded = legacy_spec(&row.try_get::<Vec<u8>, _>("spec")?).and_then(|spec| {
                let results = legacy_step_results(&row.try_get::<Vec<u8>, _>("step_results")?)?;
                Ok((spec, results))
            });
            let (spec, results) = match decoded {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(build = %id, error = %e, "a build of an earlier release does not decode; left unconverted");
                    continue;
                }
            };
            let spec = serde_json::to_string(&spec)
                .map_err(|e| crate::error::BuildError::Corrupt(format!("build spec: {e}")))?;
            sqlx::query(
                // Results a newer replica already wrote as JSON (a build an older one
                // inserted, during a rolling upgrade) are newer than the blob.
                "UPDATE builds SET spec_json = $1, \
                 step_results_json = COALESCE(step_results_json, $2), spec = $3, \
                 step_results = $4 WHERE id = $5 AND spec_json IS NULL",
            )
            .bind(spec)
            .bind(results_json(&results))
            .bind(Vec::<u8>::new())
            .bind(Vec::<u8>::new())
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            converted += 1;
        }
        tx.commit().await?;
    }
    if converted > 0 {
        tracing::info!(
            builds = converted,
            "converted builds of an earlier release to the stored model"
        );
    }
    Ok(converted)
}
