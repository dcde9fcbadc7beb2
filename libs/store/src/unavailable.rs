//! Which database errors mean "the database cannot be reached right now" — answered as
//! gRPC UNAVAILABLE (retry later) rather than INTERNAL (a bug): the server is down or
//! restarting, the network dropped, or no connection could be had in time. sqlx's pool
//! drops broken connections and opens new ones, so such calls succeed again by
//! themselves once the server is back.

/// Whether `err` is a lost or refused connection rather than a fault in the query.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(e) => {
            let code = e.code().unwrap_or_default();
            if e.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // SQLITE_BUSY (5) or SQLITE_LOCKED (6), extended codes in the high
                // bytes: the busy timeout ran out behind another process's lock.
                code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
            } else {
                // Postgres: class 08 connection exception; 57P01 admin shutdown, 57P02
                // crash shutdown, 57P03 cannot connect now (starting up or shutting
                // down); 53300 too many connections.
                code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Database, DatabaseUrl, Migrations};

    static NONE: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;

    #[tokio::test]
    async fn a_fault_in_the_query_is_not_unavailable_a_closed_or_unreachable_database_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::open_sqlite(&dir.path().join("x.db"), &NONE)
            .await
            .expect("opens");
        let syntax = sqlx::query("SELEC 1").execute(&db.read).await.unwrap_err();
        assert!(!is_unavailable(&syntax), "{syntax}");
        let missing = sqlx::query("SELECT * FROM nowhere")
            .execute(&db.read)
            .await
            .unwrap_err();
        assert!(!is_unavailable(&missing), "{missing}");
        db.close().await;
        let closed = sqlx::query("SELECT 1").execute(&db.read).await.unwrap_err();
        assert!(is_unavailable(&closed), "{closed}");

        // Nothing listens on port 1 of the loopback: connection refused.
        let url: DatabaseUrl = "postgres://kiln@127.0.0.1:1/kiln".parse().expect("url");
        let migrations = Migrations {
            sqlite: &NONE,
            postgres: &NONE,
        };
        match Database::open(&url, "auth", migrations).await {
            Err(crate::Error::Sqlx(e)) => assert!(is_unavailable(&e), "{e}"),
            other => panic!("expected a connection error, got {other:?}"),
        }
    }
}
