//! `kiln up --database-url postgres://…`: all three services in one Postgres database,
//! each in its own schema, and no SQLite file written.

mod common;

use common::{Cli, Suite};
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_up_keeps_all_three_services_in_one_postgres_database() {
    kiln_testkit::on_postgres(async {
        let url = kiln_testkit::database_url().await.expect("a database");
        let suite = Suite::start_with(&["--database-url", &url.expose()]);
        let cli = Cli::new(&suite);
        cli.login_admin();
        let src = tempfile::tempdir().expect("tempdir");
        let out = cli.run(
            &[
                "build",
                "run",
                "--from",
                src.path().to_str().expect("utf-8"),
                "--",
                "echo",
                "hello from postgres",
            ],
            "",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("hello from postgres"));

        let mut conn = sqlx::PgConnection::connect(&url.expose())
            .await
            .expect("connect");
        let schemas: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT table_schema::text FROM information_schema.tables \
             WHERE table_name = '_sqlx_migrations' ORDER BY 1",
        )
        .fetch_all(&mut conn)
        .await
        .expect("schemas");
        // build_control: the queue shared by kiln-build replicas; agent_control: the
        // agent replicas' task claims (each with its own migrations).
        assert_eq!(
            schemas,
            ["agent", "agent_control", "auth", "build", "build_control"]
        );
        let builds: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM build.builds")
            .fetch_one(&mut conn)
            .await
            .expect("builds");
        assert_eq!(builds, 1);
        for db in ["auth/auth.db", "build/build.db", "agent/agent.db"] {
            assert!(!suite.data.path().join(db).exists(), "{db} was written");
        }
    })
    .await;
}
