//! kiln-auth's store: SQLite `auth.db` or schema `auth` on Postgres, opened the kiln
//! way (`kiln_store`: 0600 file, WAL, one writer and a few readers on SQLite; one pool
//! and a schema of its own on Postgres; embedded migrations per engine). The SQL is
//! written once for both: `$n` placeholders, integers for times and flags.

use std::ops::Deref;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_store::{Database, DatabaseUrl, Migrations};

use crate::error::Result;

static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The store's file name inside the data directory (SQLite).
pub const DB_FILE: &str = "auth.db";

/// The schema of kiln-auth's tables on Postgres.
pub const SCHEMA: &str = "auth";

/// The connections to the store: `write`, `read` and `backend` through `Deref`.
#[derive(Debug, Clone)]
pub struct Store {
    db: Database,
}

impl Deref for Store {
    type Target = Database;

    fn deref(&self) -> &Database {
        &self.db
    }
}

impl Store {
    /// Opens (creating if needed) the store at `url` and runs the embedded migrations.
    ///
    /// A SQLite file is created 0600 in a 0700 directory before SQLite touches it: it
    /// holds password hashes and the private signing keys.
    pub async fn open(url: &DatabaseUrl) -> Result<Self> {
        let migrations = Migrations {
            sqlite: &SQLITE,
            postgres: &POSTGRES,
        };
        let db = Database::open(url, SCHEMA, migrations).await?;
        Ok(Self { db })
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

/// A flag as stored: 0 or 1 (`sqlx::Any` cannot decode a SQLite boolean).
pub fn flag(b: bool) -> i64 {
    i64::from(b)
}

#[cfg(test)]
mod migration_tests {
    /// The SQLite migrations of earlier releases, byte for byte (moved to
    /// `migrations/sqlite/`): sqlx checks an applied migration's checksum at every
    /// start, so a changed file would make every existing database refuse to open.
    #[test]
    fn the_released_sqlite_migrations_are_unchanged() {
        let released: &[(i64, &str)] = &[
            (
                1,
                "f461ea980aed2de82a2082deb35e2c876bd607cd6e1e9e9ddd5afded408951769e34de831ea1876657b68121e85efaf3",
            ),
            (
                2,
                "bea00903995c49be1b65bbf1267058da43a1ee3d0852c8e5119a59bb43b7d09908981ec042297de4b1bb49521cb04d22",
            ),
            (
                3,
                "a42bd1cd1c2c6820d2bd324d4491a3dcfbb516aa2d3aa3f48a6900f8aaa53e7b981933b685d61442a6d216e1e2e6de10",
            ),
        ];
        assert_eq!(
            kiln_store::changed_migrations(&super::SQLITE, released),
            Vec::<i64>::new(),
            "released migrations changed"
        );
        // And the check sees a change: a wrong checksum, and a version that is gone.
        assert_eq!(
            kiln_store::changed_migrations(&super::SQLITE, &[(1, "00"), (999, "00")]),
            vec![1, 999]
        );
    }
}
