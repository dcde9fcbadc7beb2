//! The SQLite store `auth.db`, opened the kiln way (`kiln_store`: 0600 file, WAL, one
//! writer and a few readers, embedded migrations). The SQL itself is portable (no
//! SQLite-only syntax), so a Postgres store can reuse it with one pool.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::SqlitePool;

use crate::error::Result;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The store's file name inside the data directory.
pub const DB_FILE: &str = "auth.db";

/// The connections to `auth.db`.
#[derive(Debug, Clone)]
pub struct Store {
    /// The one connection that writes.
    pub write: SqlitePool,
    /// Connections for reads.
    pub read: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) `<data_dir>/auth.db` and runs the embedded migrations.
    ///
    /// The data directory is created 0700 and the database file 0600 before SQLite
    /// touches it: it holds password hashes and the private signing keys. SQLite gives
    /// its `-wal` and `-shm` files the database file's mode.
    pub async fn open(data_dir: &Path) -> Result<Self> {
        let kiln_store::SqlitePools { write, read } =
            kiln_store::open_sqlite(&data_dir.join(DB_FILE), &MIGRATOR).await?;
        Ok(Self { write, read })
    }

    /// Whether the database is usable (health).
    pub async fn ping(&self) -> std::result::Result<(), sqlx::Error> {
        kiln_store::ping(&self.read, &self.write).await
    }

    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }
}

/// Unix milliseconds, the store's time unit.
pub fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The `SystemTime` of stored Unix milliseconds.
pub fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A duration in milliseconds, saturating.
pub fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
