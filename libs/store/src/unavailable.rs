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
