//! kiln-store: how a kiln service opens its SQLite database (and locks its data
//! directory: see [`DirLock`]).
//!
//! Each service owns its own database file and tables (services never share tables);
//! what they share is how the file is opened:
//! - the file is created 0600 (and an existing one tightened) in a directory created
//!   0700, before SQLite touches it: stores hold password hashes, keys and build logs;
//!   SQLite gives its `-wal` and `-shm` files the database file's mode;
//! - WAL journal, `synchronous = NORMAL` (durable across process crashes, at most the
//!   last transactions lost on power loss), foreign keys on, a 5 s busy timeout;
//! - two pools: one writer connection and four readers. SQLite has one writer at a time
//!   anyway; funnelling writes through one connection means a transaction can
//!   read-then-write without SQLITE_BUSY on the lock upgrade, and WAL lets readers go on
//!   meanwhile;
//! - the service's embedded migrations run before anything else.

mod dir_lock;

pub use dir_lock::{DirLock, LOCK_FILE, LockError};

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// Readers in the read pool.
const READERS: u32 = 4;

/// The connections to one database.
#[derive(Debug, Clone)]
pub struct SqlitePools {
    /// The one connection that writes.
    pub write: SqlitePool,
    /// Connections for reads.
    pub read: SqlitePool,
}

impl SqlitePools {
    /// See [`ping`].
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        ping(&self.read, &self.write).await
    }

    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }
}

/// Whether a database is usable: a query on a reader, and the write lock taken (and
/// released) on the writer. Fails on a closed pool, a database that cannot be locked for
/// writing, or a broken file system. For health checks.
pub async fn ping(read: &SqlitePool, write: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(read).await?;
    let mut conn = write.acquire().await?;
    sqlx::raw_sql("BEGIN IMMEDIATE; ROLLBACK;")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

/// Opens (creating if needed) the SQLite database at `path` and runs `migrator`.
pub async fn open_sqlite(path: &Path, migrator: &Migrator) -> Result<SqlitePools, Error> {
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    // An existing file keeps its mode on open; tighten it.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)?;
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5));
    let write = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await?;
    migrator.run(&write).await?;
    let read = SqlitePoolOptions::new()
        .max_connections(READERS)
        .connect_with(options.read_only(true))
        .await?;
    Ok(SqlitePools { write, read })
}

#[cfg(test)]
mod tests {
    use super::*;

    static NO_MIGRATIONS: Migrator = Migrator::DEFAULT;

    #[tokio::test]
    async fn the_database_is_private_and_writable_through_the_writer_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/service.db");
        let pools = open_sqlite(&path, &NO_MIGRATIONS).await.expect("opens");
        let mode = |p: &Path| fs::metadata(p).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&pools.write)
            .await
            .expect("writer writes");
        let refused = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&pools.read)
            .await;
        assert!(refused.is_err(), "readers are read-only");
        pools.ping().await.expect("usable");
        pools.close().await;
        assert!(
            pools.ping().await.is_err(),
            "a closed database is not ready"
        );
    }
}
