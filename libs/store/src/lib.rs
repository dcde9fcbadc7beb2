//! kiln-store: how a kiln service opens its database, on SQLite or PostgreSQL (and
//! locks its data directory: see [`DirLock`]).
//!
//! Each service owns its own tables (services never share tables); what they share is
//! how the database is opened, as a [`Database`] of `sqlx::Any` pools, from a
//! [`DatabaseUrl`]:
//!
//! **SQLite** (`sqlite:///path`, the default: `<data_dir>/<service>/<service>.db`), for
//! one process per file:
//! - the file is created 0600 (and an existing one tightened) in a directory created
//!   0700, before SQLite touches it: stores hold password hashes, keys and build logs;
//!   SQLite gives its `-wal` and `-shm` files the database file's mode;
//! - WAL journal, `synchronous = NORMAL` (durable across process crashes, at most the
//!   last transactions lost on power loss), foreign keys on, a 5 s busy timeout;
//! - two pools: one writer connection and four read-only readers. SQLite has one writer
//!   at a time anyway; funnelling writes through one connection means a transaction can
//!   read-then-write without SQLITE_BUSY on the lock upgrade, and WAL lets readers go on
//!   meanwhile.
//!
//! **PostgreSQL** (`postgres://…`), for several replicas on one server:
//! - one pool, cloned into `write` and `read` (Postgres has no single-writer rule);
//! - each service in its own schema (`auth`, `build`, `agent`), created at open and
//!   put first on every connection's `search_path`, so one URL can serve all three
//!   services and their `_sqlx_migrations` tables do not collide;
//! - [`Database::begin`] takes a transaction-scoped advisory lock per schema, so the
//!   read-then-write transactions written for SQLite's one writer (the last admin, the
//!   next revocation number…) stay serialised across replicas.
//!
//! On both, the service's embedded migrations for that engine ([`Migrations`]) run
//! before anything else. SQL that runs on both uses `$1, $2…` placeholders ([`Sql`]
//! numbers them in queries built at run time); where the engines really differ, the
//! service branches on [`Database::backend`].
//!
//! Replicas on Postgres learn of each other's appends through [`Appended`]
//! (`LISTEN`/`NOTIFY` on a channel per service, announced in the append's transaction),
//! so a watcher wakes as soon as another replica stores an event it follows.

pub mod appended;
mod dir_lock;
mod sql;
mod unavailable;
mod url;

pub use appended::{Appended, forward_notifications};
pub use dir_lock::{DirLock, LOCK_FILE, LockError};
pub use sql::{Sql, Tuple};
pub use unavailable::is_unavailable;
pub use url::{Backend, DatabaseUrl, UrlError};

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::{Any, AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor, Transaction};

/// Readers in the SQLite read pool.
const READERS: u32 = 4;
/// Connections in a Postgres pool (per service and process).
const PG_CONNECTIONS: u32 = 10;
/// How long a call waits for a pooled connection (or a new one) before it fails. A
/// Postgres that is down makes calls fail this fast (as UNAVAILABLE, see
/// [`is_unavailable`]) instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A service's embedded migrations, one directory per engine (`migrations/sqlite/`,
/// `migrations/postgres/`).
#[derive(Debug, Clone, Copy)]
pub struct Migrations {
    pub sqlite: &'static Migrator,
    pub postgres: &'static Migrator,
}

/// The connections to one service's database.
#[derive(Debug, Clone)]
pub struct Database {
    /// Connections that write (on SQLite the one writer).
    pub write: AnyPool,
    /// Connections for reads (on Postgres the same pool as `write`).
    pub read: AnyPool,
    pub backend: Backend,
}

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error("invalid schema name `{0}`")]
    Schema(String),
}

/// The drivers `Any` dispatches to, installed once per process.
fn install_drivers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(sqlx::any::install_default_drivers);
}

impl Database {
    /// Opens the database at `url` for the service whose schema (on Postgres) is
    /// `schema`, and runs its migrations.
    pub async fn open(
        url: &DatabaseUrl,
        schema: &str,
        migrations: Migrations,
    ) -> Result<Self, Error> {
        match url {
            DatabaseUrl::Sqlite(path) => Self::open_sqlite(path, migrations.sqlite).await,
            DatabaseUrl::Postgres(_) => {
                Self::open_postgres(&url.expose(), schema, migrations.postgres).await
            }
        }
    }

    /// Opens (creating if needed) the SQLite database at `path` and runs `migrator`.
    pub async fn open_sqlite(path: &Path, migrator: &Migrator) -> Result<Self, Error> {
        install_drivers();
        create_private_file(path)?;
        let file = SqliteConnectOptions::new().filename(path);
        let url = |options: SqliteConnectOptions| {
            AnyConnectOptions::from_url(&options.to_url_lossy()).map_err(Error::Sqlx)
        };
        // Any connects from a URL, which carries the open mode but not the pragmas;
        // those are set on each new connection. sqlx's own defaults already give
        // foreign keys on and a 5 s busy timeout.
        let write = AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
                        .await?;
                    Ok(())
                })
            })
            .connect_with(url(file.clone().create_if_missing(true))?)
            .await?;
        migrator.run(&write).await?;
        let read = AnyPoolOptions::new()
            .max_connections(READERS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(url(file.read_only(true))?)
            .await?;
        Ok(Self {
            write,
            read,
            backend: Backend::Sqlite,
        })
    }

    /// Opens a pool on the Postgres server at `url`, in schema `schema` (created if
    /// missing), and runs `migrator` there.
    async fn open_postgres(url: &str, schema: &str, migrator: &Migrator) -> Result<Self, Error> {
        install_drivers();
        // The name is spliced into SQL (a schema cannot be a bind parameter): only
        // plain identifiers.
        if schema.is_empty()
            || !schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(Error::Schema(schema.to_string()));
        }
        let options: AnyConnectOptions = url.parse()?;
        let mut conn = sqlx::AnyConnection::connect_with(&options).await?;
        create_schema(&mut conn, schema).await?;
        conn.close().await?;
        let set_path = format!("SET search_path TO {schema}");
        let pool = AnyPoolOptions::new()
            .max_connections(PG_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _| {
                let set_path = set_path.clone();
                Box::pin(async move {
                    conn.execute(sqlx::AssertSqlSafe(set_path)).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        migrator.run(&pool).await?;
        Ok(Self {
            write: pool.clone(),
            read: pool,
            backend: Backend::Postgres,
        })
    }

    /// A write transaction. On Postgres it first takes a transaction-scoped advisory
    /// lock keyed by the schema: the services' transactions read, decide, then write
    /// (no second enabled admin disabled, revocation numbers MAX + 1), which SQLite's
    /// one writer serialises; across replicas the lock does.
    pub async fn begin(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        let mut tx = self.write.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext(current_schema()))")
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    /// Whether the database is usable: a query on a reader, and (on SQLite) the write
    /// lock taken and released on the writer. Fails on a closed pool, a database that
    /// cannot be locked for writing, an unreachable server or a broken file system. For
    /// health checks.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        match self.backend {
            Backend::Sqlite => {
                let mut conn = self.write.acquire().await?;
                sqlx::raw_sql("BEGIN IMMEDIATE; ROLLBACK;")
                    .execute(&mut *conn)
                    .await?;
            }
            Backend::Postgres => {
                sqlx::query("SELECT 1").execute(&self.write).await?;
            }
        }
        Ok(())
    }

    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }
}

/// The versions among `released` (version, lower-case hex SHA-384 of its SQL) whose
/// migration in `migrator` is missing or no longer has that checksum. sqlx compares the
/// checksum with the `_sqlx_migrations` row of an applied migration at every start, so a
/// changed released migration would make every existing database refuse to open: tests
/// pin the released ones with this and expect an empty answer.
pub fn changed_migrations(migrator: &Migrator, released: &[(i64, &str)]) -> Vec<i64> {
    released
        .iter()
        .filter(|(version, checksum)| {
            !migrator.iter().any(|m| {
                let hex: String = m.checksum.iter().map(|b| format!("{b:02x}")).collect();
                m.version == *version && hex == *checksum
            })
        })
        .map(|(version, _)| *version)
        .collect()
}

/// `CREATE SCHEMA IF NOT EXISTS` can still fail with a unique violation when two
/// replicas create the same schema at once; the loser finds it there.
async fn create_schema(conn: &mut sqlx::AnyConnection, schema: &str) -> Result<(), sqlx::Error> {
    let sql = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    match conn.execute(sqlx::AssertSqlSafe(sql)).await {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e))
            if matches!(e.code().as_deref(), Some("23505") | Some("42P06")) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Creates `path` 0600 (tightening an existing file) inside a directory created 0700.
fn create_private_file(path: &Path) -> Result<(), Error> {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    static NO_MIGRATIONS: Migrator = Migrator::DEFAULT;

    #[tokio::test]
    async fn the_database_is_private_and_writable_through_the_writer_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/service.db");
        let db = Database::open_sqlite(&path, &NO_MIGRATIONS)
            .await
            .expect("opens");
        let mode = |p: &Path| fs::metadata(p).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&db.write)
            .await
            .expect("writer writes");
        let refused = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&db.read)
            .await;
        assert!(refused.is_err(), "readers are read-only");
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&db.write)
            .await
            .expect("pragma");
        assert_eq!(journal, "wal");
        let mut q = Sql::new("INSERT INTO t VALUES (");
        q.bind(7_i64).push(")");
        q.build().execute(&db.write).await.expect("$1 on SQLite");
        let x: i64 = sqlx::query_scalar("SELECT x FROM t WHERE x = $1")
            .bind(7_i64)
            .fetch_one(&db.read)
            .await
            .expect("reads");
        assert_eq!(x, 7);
        db.ping().await.expect("usable");
        db.close().await;
        assert!(db.ping().await.is_err(), "a closed database is not ready");
    }

    #[tokio::test]
    async fn a_schema_name_is_an_identifier() {
        let url: DatabaseUrl = "postgres://127.0.0.1:1/x".parse().unwrap();
        let migrations = Migrations {
            sqlite: &NO_MIGRATIONS,
            postgres: &NO_MIGRATIONS,
        };
        let err = Database::open(&url, "auth; DROP", migrations)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Schema(_)), "{err}");
    }
}
