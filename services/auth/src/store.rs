//! The SQLite store: opening `auth.db`, its permissions, its migrations.
//!
//! Two pools: a single writer connection and a few readers. SQLite allows one writer at
//! a time anyway; funnelling every write through one connection means a transaction can
//! read-then-write without ever hitting SQLITE_BUSY on the lock upgrade, and readers
//! proceed concurrently thanks to WAL. The SQL itself is portable (no SQLite-only
//! syntax), so a Postgres store can reuse it with one pool.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::error::{AuthError, Result};

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
        ensure_private_dir(data_dir)?;
        let path = data_dir.join(DB_FILE);
        ensure_private_file(&path)?;
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { write, read })
    }

    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }
}

fn ensure_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| AuthError::io(dir, e))
}

fn ensure_private_file(path: &PathBuf) -> Result<()> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| AuthError::io(path, e))?;
    // An existing file keeps its mode on open; tighten it.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|e| AuthError::io(path, e))
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
