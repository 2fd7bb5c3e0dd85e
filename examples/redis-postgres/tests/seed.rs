//! Seeding a fresh database from many sessions at once, against the PostgreSQL of
//! `DATABASE_URL` (`eval "$(bash .ci/services.sh)"` starts it). Without it the test
//! prints a "skipped: ..." line and passes, except under `CI=true`, where it fails.

use std::sync::Arc;

use redis_postgres::{env::Servers, seed, ROWS};

async fn connect(servers: &Servers) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&servers.database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// A fresh database seeded by many sessions at once, as the tests of one `cargo test`
/// (and two `cargo test`s) do: every session succeeds and the table is filled once.
/// Each round uses a fresh schema of its own (`search_path`), so the other tests'
/// `items` is left alone; bare `CREATE TABLE IF NOT EXISTS` failed here in most rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeding_a_fresh_database_from_many_sessions_at_once() {
    let Some(servers) = Servers::for_test("seeding_a_fresh_database_from_many_sessions_at_once")
    else {
        return;
    };
    const SESSIONS: usize = 8;
    let admin = connect(&servers).await;
    for round in 0..3 {
        let schema = format!("backstop_seed_test_{}_{round}", std::process::id());
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .await
            .unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(SESSIONS));
        let mut seeding = Vec::new();
        for _ in 0..SESSIONS {
            let mut client = connect(&servers).await;
            client
                .batch_execute(&format!("SET search_path TO {schema}"))
                .await
                .unwrap();
            let start = start.clone();
            seeding.push(tokio::spawn(async move {
                start.wait().await;
                seed(&mut client).await.map_err(|e| match e.as_db_error() {
                    Some(db) => db.message().to_owned(),
                    None => e.to_string(),
                })
            }));
        }
        let mut failed = Vec::new();
        for session in seeding {
            if let Err(e) = session.await.unwrap() {
                failed.push(e);
            }
        }
        let rows: i64 = admin
            .query_one(&format!("SELECT count(*) FROM {schema}.items"), &[])
            .await
            .unwrap()
            .get(0);
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
        assert!(failed.is_empty(), "round {round}: {failed:?}");
        assert_eq!(rows, ROWS, "round {round}");
    }
}
