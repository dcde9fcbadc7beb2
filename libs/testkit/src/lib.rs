//! kiln-testkit: what kiln's test suites share to run on both database engines.
//!
//! - [`both_backends!`] turns each test into two, `<name>::sqlite` and
//!   `<name>::postgres`; code under test asks [`database_url`] where its store goes
//!   (`None`: the service's default SQLite file; `Some`: a fresh Postgres database).
//! - [`postgres`] is the PostgreSQL server of this test process: the one named by
//!   `KILN_TEST_POSTGRES_URL` (what `make test` starts once for the whole run, see
//!   `kiln-test-postgres`), or else a throwaway cluster of its own, started on first
//!   use and stopped when the process ends (see [`cluster`]).
//! - [`Cluster::start`] is a private cluster a test may stop and start (a Postgres
//!   restart under load).
//!
//! When the PostgreSQL 15 binaries are missing, the Postgres half of a test prints one
//! line saying it skipped and why, and passes: `make postgres` installs them.

pub mod cluster;

use std::future::Future;
use std::sync::OnceLock;

pub use cluster::Cluster;
pub use kiln_store::{Backend, DatabaseUrl};

/// The variable naming a running server to use instead of a cluster per process. Its
/// user must be allowed to `CREATE DATABASE`.
pub const POSTGRES_URL_VAR: &str = "KILN_TEST_POSTGRES_URL";

tokio::task_local! {
    static BACKEND: Backend;
    /// The databases a Postgres half created, dropped when it passes.
    static CREATED: std::sync::Mutex<Vec<String>>;
}

/// Runs `test` with `backend` as the engine [`database_url`] answers for.
pub async fn scope<F: Future>(backend: Backend, test: F) -> F::Output {
    BACKEND.scope(backend, test).await
}

/// The engine of the current test (SQLite outside [`scope`]).
pub fn backend() -> Backend {
    BACKEND.try_with(|b| *b).unwrap_or(Backend::Sqlite)
}

/// Where the current test's store goes: `None` on SQLite (the service's default file
/// in its data directory), a fresh, empty Postgres database otherwise.
pub async fn database_url() -> Option<DatabaseUrl> {
    match backend() {
        Backend::Sqlite => None,
        Backend::Postgres => Some(
            postgres()
                .expect("the Postgres half of a test runs only with a server")
                .fresh_database()
                .await,
        ),
    }
}

/// Like [`database_url`], for a service reopened on the same data directory (a restart,
/// recovery): the first call for `dir` creates the database and notes its URL in
/// `dir/.test-database-url`; later calls for `dir` (in this process or a child)
/// return the same database.
pub async fn database_url_in(dir: &std::path::Path) -> Option<DatabaseUrl> {
    // The note first, whatever the backend: a child process (a server to SIGKILL) runs
    // outside the parent test's scope but must open the parent's database.
    let note = dir.join(".test-database-url");
    if let Ok(url) = std::fs::read_to_string(&note) {
        return Some(url.parse().expect("a noted database URL"));
    }
    if backend() == Backend::Sqlite {
        return None;
    }
    let url = database_url().await?;
    std::fs::create_dir_all(dir).expect("create the data directory");
    std::fs::write(&note, url.expose()).expect("note the database URL");
    Some(url)
}

/// A Postgres server tests create databases on.
#[derive(Debug)]
pub struct Server {
    /// A URL of a database on the server (`postgres`), as a superuser.
    admin_url: String,
    /// Keeps a cluster of this process alive (none when the server is external).
    _cluster: Option<Cluster>,
}

impl Server {
    /// A new database with a random name; its URL. Databases are not dropped: they die
    /// with the throwaway cluster.
    pub async fn fresh_database(&self) -> DatabaseUrl {
        let (url, name) = create(&self.admin_url).await;
        let _ = CREATED.try_with(|c| c.lock().expect("created").push(name));
        url
    }

    /// Drops `names`, closing what is still connected to them (services of the test
    /// that are still running). An empty PostgreSQL database takes about 7 MB: a run of
    /// the whole suite would otherwise leave gigabytes in the cluster.
    async fn drop_databases(&self, names: Vec<String>) {
        use sqlx::Connection as _;
        let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin_url).await else {
            return;
        };
        for name in names {
            let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await;
        }
        let _ = conn.close().await;
    }
}

/// Creates a database with a random name on the server of `admin_url`; its URL.
pub async fn create_database(admin_url: &str) -> DatabaseUrl {
    create(admin_url).await.0
}

async fn create(admin_url: &str) -> (DatabaseUrl, String) {
    use sqlx::Connection as _;
    let name = format!("t_{:016x}", fastrand::u64(..));
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("connect to the test server: {e}"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    let _ = conn.close().await;
    let url = with_database(admin_url, &name)
        .parse()
        .expect("a postgres URL");
    (url, name)
}

/// `admin_url` with its database replaced by `name`.
fn with_database(admin_url: &str, name: &str) -> String {
    let (base, query) = admin_url
        .split_once('?')
        .map_or((admin_url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// This process's Postgres server, or why there is none (binaries missing, a cluster
/// that would not start).
pub fn postgres() -> Result<&'static Server, String> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            if let Ok(url) = std::env::var(POSTGRES_URL_VAR) {
                return Ok(Server {
                    admin_url: url,
                    _cluster: None,
                });
            }
            let cluster = Cluster::start()?;
            Ok(Server {
                admin_url: cluster.admin_url(),
                _cluster: Some(cluster),
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs a Postgres half of a test: skips (printing why) without a server. The
/// databases it created are dropped when it passes (kept when it panics, to look at).
pub async fn on_postgres<F: Future<Output = ()>>(test: F) {
    match postgres() {
        Ok(server) => {
            let created = CREATED
                .scope(std::sync::Mutex::default(), async {
                    scope(Backend::Postgres, test).await;
                    CREATED.with(|c| std::mem::take(&mut *c.lock().expect("created")))
                })
                .await;
            server.drop_databases(created).await;
        }
        Err(why) => eprintln!("skipped on Postgres: {why}"),
    }
}

/// Contract tests of a trait with several implementations: each case is an
/// `async fn(Make)` of the calling module, and `make` a function (or constant) of the
/// calling module that the case is given, so that
/// `contract!(local: a_case, another)` makes `mod local { #[tokio::test] async fn
/// a_case() }` and so on, each calling `super::a_case(super::local)`.
#[macro_export]
macro_rules! contract {
    ($implementation:ident: $($case:ident),* $(,)?) => {
        mod $implementation {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::$implementation).await;
                }
            )*
        }
    };
}

/// Each test inside becomes a module with two tests, `sqlite` and `postgres`, running
/// the same body with [`backend`] answering each engine in turn:
///
/// ```ignore
/// kiln_testkit::both_backends! {
///     /// A user can log in.
///     #[tokio::test]
///     async fn login_works() {
///         let h = harness().await; // asks kiln_testkit::database_url()
///         …
///     }
/// }
/// ```
#[macro_export]
macro_rules! both_backends {
    ($(
        $(#[$attr:meta])*
        async fn $name:ident() $body:block
    )*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$attr])*
            async fn sqlite() {
                $crate::scope($crate::Backend::Sqlite, async $body).await
            }

            $(#[$attr])*
            async fn postgres() {
                $crate::on_postgres(async $body).await
            }
        }
    )*};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_replaces_the_path() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5/postgres", "t_1"),
            "postgres://u@127.0.0.1:5/t_1"
        );
        assert_eq!(
            with_database("postgres://u@h:5?sslmode=disable", "t_1"),
            "postgres://u@h:5/t_1?sslmode=disable"
        );
    }

    crate::both_backends! {
        /// The macro's two halves see their own engine; the Postgres one a database
        /// that takes a table.
        #[tokio::test]
        async fn each_half_sees_its_backend() {
            match database_url().await {
                None => assert_eq!(backend(), Backend::Sqlite),
                Some(url) => {
                    use sqlx::Connection as _;
                    assert_eq!(backend(), Backend::Postgres);
                    let mut conn = sqlx::PgConnection::connect(&url.expose()).await.expect("connects");
                    sqlx::raw_sql("CREATE TABLE t (x BIGINT)").execute(&mut conn).await.expect("creates");
                }
            }
        }
    }
}
