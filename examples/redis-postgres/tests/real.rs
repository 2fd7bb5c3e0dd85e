//! Against a real Redis and a real PostgreSQL, from `REDIS_URL` and `DATABASE_URL`
//! (`eval "$(bash .ci/services.sh)"` starts both). Without them each test prints a
//! "skipped: ..." line and passes, except under `CI=true`, where it fails.
//!
//! Each test uses keys of its own and a query text of its own, so the tests can run
//! in parallel against the same servers.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use redis::aio::ConnectionManager;
use redis_postgres::{
    cache, connect, database, env::Servers, is_hit, pool, put, seed, stack, Answer, DbCounters,
    Error, Row, Source, LOOKUP, ROWS,
};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_backstop::{launch::Launch, outcome::Stats, FallbackLayer};

/// A query that would run for 10 s, marked so `pg_stat_activity` finds it.
const SLOW: &str = "SELECT $1::bigint, 'slept'::text FROM pg_sleep(10) /* backstop-cancel-test */";
const SLOW_MARK: &str = "%backstop-cancel-test%";

async fn forget(redis: &mut ConnectionManager, key: i64) {
    let _: () = redis::cmd("DEL")
        .arg(redis_postgres::cache_key(key))
        .query_async(redis)
        .await
        .unwrap();
}

/// A plain connection for looking at the server from the side.
async fn monitor(servers: &Servers) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&servers.database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Active queries whose text matches `mark`, other than the monitor's own.
async fn active(monitor: &tokio_postgres::Client, mark: &str) -> i64 {
    monitor
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE state = 'active' AND query LIKE $1 AND pid <> pg_backend_pid()",
            &[&mark],
        )
        .await
        .unwrap()
        .get(0)
}

/// Whether backend `pid` is running a query matching `mark`.
async fn running(monitor: &tokio_postgres::Client, pid: i32, mark: &str) -> bool {
    monitor
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE pid = $1 AND state = 'active' AND query LIKE $2",
            &[&pid, &mark],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 1
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
    let admin = monitor(&servers).await;
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
            let (mut client, conn) =
                tokio_postgres::connect(&servers.database_url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
            tokio::spawn(conn);
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

#[tokio::test]
async fn hit_is_served_by_redis_and_miss_by_postgres() {
    let Some(servers) = Servers::for_test("hit_is_served_by_redis_and_miss_by_postgres") else {
        return;
    };
    let (mut redis, pool, cancel_addr) = connect(&servers, 2).await.unwrap();
    let counters = Arc::new(DbCounters::default());
    let stats = Stats::new();
    let svc = stack(
        cache(redis.clone()),
        database(pool, cancel_addr, LOOKUP, counters.clone()),
        Launch::Sequential,
        stats.clone(),
    );
    let cached = Row {
        key: 1001,
        count: 7,
        digest: "from redis".into(),
        source: Source::Cache,
    };
    put(&mut redis, &cached).await.unwrap();
    forget(&mut redis, 1002).await;

    let hit = svc.clone().oneshot(1001).await.unwrap().unwrap();
    assert_eq!(hit, cached);
    let miss = svc.oneshot(1002).await.unwrap().unwrap();
    assert_eq!(miss.source, Source::Database);
    assert_eq!(miss.count, 12_000);
    assert_eq!(
        counters.started.load(Relaxed),
        1,
        "sequential: one query, for the miss"
    );
    let counts = stats.snapshot();
    assert_eq!(
        (counts.served_by_primary, counts.served_by_fallback),
        (1, 1)
    );
}

#[tokio::test]
async fn redis_error_is_a_miss_and_postgres_answers() {
    let Some(servers) = Servers::for_test("redis_error_is_a_miss_and_postgres_answers") else {
        return;
    };
    let (_redis, pool, cancel_addr) = connect(&servers, 1).await.unwrap();
    // A cache that fails as a broken Redis would.
    let broken = service_fn(|_key: i64| async {
        Err::<Option<Row>, _>(Error::Cache(redis::RedisError::from((
            redis::ErrorKind::Io,
            "connection refused",
        ))))
    });
    let counters = Arc::new(DbCounters::default());
    let svc = stack(
        broken,
        database(pool, cancel_addr, LOOKUP, counters),
        Launch::Concurrent,
        Stats::new(),
    );
    let row = svc.oneshot(5).await.unwrap().unwrap();
    assert_eq!((row.source, row.count), (Source::Database, 12_000));
}

/// The cache hits after the database query is seen running on the server; the layer
/// then drops the database call. The query must leave `pg_stat_activity` long before
/// its 10 s are up, and the pool's one connection must serve the next query.
#[tokio::test]
async fn hit_cancels_the_query_on_the_server_and_the_connection_is_reused() {
    let name = "hit_cancels_the_query_on_the_server_and_the_connection_is_reused";
    let Some(servers) = Servers::for_test(name) else {
        return;
    };
    let (mut redis, _, _) = connect(&servers, 1).await.unwrap();
    let (pool, cancel_addr) = pool(&servers.database_url, 1).unwrap();
    let pid: i32 = pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let monitor = monitor(&servers).await;
    put(
        &mut redis,
        &Row {
            key: 2001,
            count: 1,
            digest: "cached".into(),
            source: Source::Cache,
        },
    )
    .await
    .unwrap();

    // Redis answers once the slow query is running on the server (bounded: 5 s).
    let redis_cache = cache(redis.clone());
    let monitor = Arc::new(monitor);
    let watch = monitor.clone();
    let slow_cache = service_fn(move |key: i64| {
        let redis_cache = redis_cache.clone();
        let watch = watch.clone();
        async move {
            for _ in 0..100 {
                if running(&watch, pid, SLOW_MARK).await {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            redis_cache.oneshot(key).await
        }
    });
    let counters = Arc::new(DbCounters::default());
    let svc = stack(
        slow_cache,
        database(pool.clone(), cancel_addr, SLOW, counters.clone()),
        Launch::Concurrent,
        Stats::new(),
    );

    let row = svc.oneshot(2001).await.unwrap().unwrap();
    assert_eq!(row.source, Source::Cache);
    assert_eq!(counters.started.load(Relaxed), 1, "the query was sent");
    assert_eq!(counters.cancels_sent.load(Relaxed), 1);

    // Gone from the server well before its 10 s: poll for at most 3 s.
    let mut still_running = true;
    for _ in 0..60 {
        still_running = running(&monitor, pid, SLOW_MARK).await;
        if !still_running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !still_running,
        "the slow query is still running on the server"
    );

    // The pool's only connection serves the next query, at once.
    let next = tokio::time::timeout(Duration::from_secs(3), async {
        let conn = pool.get().await.unwrap();
        let pid: i32 = conn
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        pid
    })
    .await
    .expect("the pool's connection is stuck behind the slow query");
    assert_eq!(next, pid, "the same connection was reused");
    assert_eq!(counters.connections_discarded.load(Relaxed), 0);
}

/// Many hits under `Concurrent`, each dropping a running query: afterwards nothing is
/// left running, no connection was discarded, and the pool kept its connections.
#[tokio::test]
async fn many_cancelled_queries_leave_the_pool_healthy() {
    let name = "many_cancelled_queries_leave_the_pool_healthy";
    let Some(servers) = Servers::for_test(name) else {
        return;
    };
    const SLOWISH: &str =
        "SELECT $1::bigint, 'slept'::text FROM pg_sleep(0.5) /* backstop-pool-test */";
    let (mut redis, _, _) = connect(&servers, 1).await.unwrap();
    let (pool, cancel_addr) = pool(&servers.database_url, 4).unwrap();
    for key in 3001..3041 {
        let row = Row {
            key,
            count: 1,
            digest: "cached".into(),
            source: Source::Cache,
        };
        put(&mut redis, &row).await.unwrap();
    }
    // Redis answers 20 ms after the call: the query has been sent by then.
    let redis_cache = cache(redis.clone());
    let late_cache = service_fn(move |key: i64| {
        let redis_cache = redis_cache.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            redis_cache.oneshot(key).await
        }
    });
    let counters = Arc::new(DbCounters::default());
    let svc = stack(
        late_cache,
        database(pool.clone(), cancel_addr, SLOWISH, counters.clone()),
        Launch::Concurrent,
        Stats::new(),
    );
    // 40 hits, 4 at a time.
    for chunk in (3001..3041i64).collect::<Vec<_>>().chunks(4) {
        let calls = chunk.iter().map(|&key| svc.clone().oneshot(key));
        for answer in futures_join(calls).await {
            assert_eq!(answer.unwrap().unwrap().source, Source::Cache);
        }
    }
    let monitor = monitor(&servers).await;
    let mut running = -1;
    for _ in 0..60 {
        running = active(&monitor, "%backstop-pool-test%").await;
        if running == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running, 0, "cancelled queries still running");
    assert!(counters.cancels_sent.load(Relaxed) > 0);
    assert_eq!(
        counters.completed.load(Relaxed),
        0,
        "no query ran to its end"
    );
    assert_eq!(counters.connections_discarded.load(Relaxed), 0);
    // Wait for the last cancel tasks to hand their connections back (bounded).
    for _ in 0..60 {
        if pool.status().available == pool.status().size {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = pool.status();
    assert_eq!(status.available, status.size, "{status:?}");
    assert!(status.size <= 4, "{status:?}");
}

/// Runs futures side by side (no `futures` dependency for this one use).
async fn futures_join<F: std::future::Future + Send + 'static>(
    calls: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

// ---- refill on a miss: `FallbackLayer::refill` writes the database's answer back.

/// The stack with a refill, counting into `stats`.
fn with_refill<R>(
    cache: impl Service<i64, Response = Option<Row>, Error = Error, Future: Send>
        + Clone
        + Send
        + 'static,
    db: impl Service<i64, Response = Option<Row>, Error = Error, Future: Send> + Clone + Send + 'static,
    refill: R,
    stats: Stats,
) -> impl Service<i64, Response = Option<Row>, Error = Error> + Clone
where
    R: tower_backstop::refill::Refill<i64, Option<Row>> + Clone,
{
    ServiceBuilder::new()
        .layer(
            FallbackLayer::new(db)
                .accept(is_hit)
                .launch(Launch::Concurrent)
                .stats(stats)
                .refill(refill),
        )
        .service(cache)
}

#[tokio::test]
async fn refill_a_miss_then_the_same_key_is_a_hit_from_redis() {
    let Some(servers) = Servers::for_test("refill_a_miss_then_the_same_key_is_a_hit_from_redis")
    else {
        return;
    };
    let (mut redis, pool, cancel_addr) = connect(&servers, 2).await.unwrap();
    forget(&mut redis, 4001).await;
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let write_back = redis_postgres::WriteBack {
        redis: redis.clone(),
        failures: failures.clone(),
    };
    let counters = Arc::new(DbCounters::default());
    let stats = Stats::new();
    let svc = with_refill(
        cache(redis.clone()),
        database(pool, cancel_addr, LOOKUP, counters.clone()),
        write_back,
        stats.clone(),
    );
    let first = svc.clone().oneshot(4001).await.unwrap().unwrap();
    assert_eq!(first.source, Source::Database);
    // The write runs in a task of its own: wait for it (bounded).
    let mut second = None;
    for _ in 0..40 {
        let row = svc.clone().oneshot(4001).await.unwrap().unwrap();
        if row.source == Source::Cache {
            second = Some(row);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let second = second.expect("the miss was never written back into Redis");
    assert_eq!((second.count, &second.digest), (first.count, &first.digest));
    assert_eq!(failures.load(Relaxed), 0);
    // One refill per miss served before the write landed, none failed.
    let counted = stats.snapshot();
    assert_eq!(counted.refills, counted.served_by_fallback);
    assert!(counted.refills >= 1);
    assert_eq!(counted.refill_failures, 0);
}

#[tokio::test]
async fn failing_refill_does_not_change_the_answer() {
    let Some(servers) = Servers::for_test("failing_refill_does_not_change_the_answer") else {
        return;
    };
    let (mut redis, pool, cancel_addr) = connect(&servers, 2).await.unwrap();
    forget(&mut redis, 4002).await;
    let failing = |_key: i64, _row: &Option<Row>| Err::<(), _>("the cache refused the write");
    let counters = Arc::new(DbCounters::default());
    let stats = Stats::new();
    let svc = with_refill(
        cache(redis.clone()),
        database(pool, cancel_addr, LOOKUP, counters),
        failing,
        stats.clone(),
    );
    let answer: Answer = svc.clone().oneshot(4002).await;
    let row = answer.unwrap().unwrap();
    assert_eq!((row.source, row.count), (Source::Database, 12_000));
    assert_eq!(stats.snapshot().refill_failures, 1);
    // Still a miss: nothing was written.
    let again = svc.oneshot(4002).await.unwrap().unwrap();
    assert_eq!(again.source, Source::Database);
    // Both misses were handed to the refill, which failed both times.
    let counted = stats.snapshot();
    assert_eq!((counted.refills, counted.refill_failures), (0, 2));
}
