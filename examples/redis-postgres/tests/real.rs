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
    cache, connect, database, env::Servers, is_hit, pool, put, stack, Answer, CancelQuery,
    DbCounters, Error, Row, Source, LOOKUP,
};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_backstop::{
    cancel::{OnCancel, Slot},
    launch::Launch,
    outcome::Stats,
    refill::Write,
    FallbackLayer,
};

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
        database(pool, cancel_addr, LOOKUP, counters.clone(), stats.clone()),
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
        Err::<Option<Row>, _>(Error::from(redis::RedisError::from((
            redis::ErrorKind::Io,
            "connection refused",
        ))))
    });
    let counters = Arc::new(DbCounters::default());
    let svc = stack(
        broken,
        database(pool, cancel_addr, LOOKUP, counters, Stats::new()),
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
    let stats = Stats::new();
    let svc = stack(
        slow_cache,
        database(
            pool.clone(),
            cancel_addr,
            SLOW,
            counters.clone(),
            stats.clone(),
        ),
        Launch::Concurrent,
        stats.clone(),
    );

    let row = svc.oneshot(2001).await.unwrap().unwrap();
    assert_eq!(row.source, Source::Cache);
    assert_eq!(counters.started.load(Relaxed), 1, "the query was sent");
    assert_eq!(counters.cancels_sent.load(Relaxed), 1);
    assert_eq!(stats.snapshot().cancels, 1, "counted where users look");

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
        database(
            pool.clone(),
            cancel_addr,
            SLOWISH,
            counters.clone(),
            Stats::new(),
        ),
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
    let counters = Arc::new(DbCounters::default());
    let stats = Stats::new();
    let write_back = redis_postgres::WriteBack {
        redis: redis.clone(),
        stats: stats.clone(),
    };
    let svc = with_refill(
        cache(redis.clone()),
        database(pool, cancel_addr, LOOKUP, counters.clone(), stats.clone()),
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
    // One refill per miss served before the write landed, none failed; the cancel
    // requests (for hits under `Concurrent`) are the cancels `Stats` counted.
    let counted = stats.snapshot();
    assert_eq!(counted.refills, counted.served_by_fallback);
    assert!(counted.refills >= 1);
    assert_eq!(
        (counted.refill_failures, counted.refill_writes_failed),
        (0, 0)
    );
    assert_eq!(counted.cancels, counters.cancels_sent.load(Relaxed));
}

#[tokio::test]
async fn failing_refill_does_not_change_the_answer() {
    let Some(servers) = Servers::for_test("failing_refill_does_not_change_the_answer") else {
        return;
    };
    let (mut redis, pool, cancel_addr) = connect(&servers, 2).await.unwrap();
    forget(&mut redis, 4002).await;
    let failing = |_key: i64, _row: &Option<Row>| Err::<Write, _>("the cache refused the write");
    let counters = Arc::new(DbCounters::default());
    let stats = Stats::new();
    let svc = with_refill(
        cache(redis.clone()),
        database(pool, cancel_addr, LOOKUP, counters, stats.clone()),
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

// ---- A call that answered never sends a cancel request, disarmed or not.

/// A database call written as a new user would: it fills its slot with the pooled
/// connection and never disarms it. Completed queries send no cancel request and hold
/// no connection for one: the pool has its connection back at once.
#[tokio::test]
async fn a_completed_query_without_disarm_sends_no_cancel() {
    let Some(servers) = Servers::for_test("a_completed_query_without_disarm_sends_no_cancel")
    else {
        return;
    };
    let (_redis, _, _) = connect(&servers, 1).await.unwrap();
    let (pool, cancel_addr) = pool(&servers.database_url, 1).unwrap();
    let counters = Arc::new(DbCounters::default());
    let stats = Stats::new();
    let query = service_fn({
        let (pool, counters) = (pool.clone(), counters.clone());
        move |(key, mut slot): (i64, Slot<deadpool_postgres::Object, CancelQuery>)| {
            let (pool, counters) = (pool.clone(), counters.clone());
            async move {
                let conn = slot.fill(pool.get().await.map_err(Error::from)?);
                counters.started.fetch_add(1, Relaxed);
                let row = conn.query_one(LOOKUP, &[&key]).await.map_err(Error::from)?;
                counters.completed.fetch_add(1, Relaxed);
                // No `slot.disarm()`.
                Ok::<_, Error>(row.get::<_, i64>(0))
            }
        }
    });
    let db = OnCancel::new(
        query,
        CancelQuery::new(cancel_addr.clone(), counters.clone()),
    )
    .stats(stats.clone());

    for key in 5001..5006 {
        assert_eq!(db.clone().oneshot(key).await.unwrap(), 12_000);
        // The connection is back in the pool as soon as the call answered.
        assert_eq!(pool.status().available, 1, "{:?}", pool.status());
    }
    // An early `?` (the query failed: no such column) cancels nothing either.
    let failing = OnCancel::new(
        service_fn({
            let pool = pool.clone();
            move |((), mut slot): ((), Slot<deadpool_postgres::Object, CancelQuery>)| {
                let pool = pool.clone();
                async move {
                    let conn = slot.fill(pool.get().await.map_err(Error::from)?);
                    conn.batch_execute("SELECT no_such_column FROM items")
                        .await
                        .map_err(Error::from)?;
                    Ok::<_, Error>(())
                }
            }
        }),
        CancelQuery::new(cancel_addr, counters.clone()),
    )
    .stats(stats.clone());
    assert!(matches!(failing.oneshot(()).await, Err(Error::Database(_))));

    assert_eq!(counters.completed.load(Relaxed), 5);
    assert_eq!(
        counters.cancels_sent.load(Relaxed),
        0,
        "cancel requests sent"
    );
    assert_eq!(stats.snapshot().cancels, 0);
    assert_eq!(counters.connections_discarded.load(Relaxed), 0);
}

/// The same mistake with a handle that is only a cancel token: a cancel request sent
/// after the call answered would hit whatever the connection runs next. Nothing is
/// sent, and the next query on the connection runs to its end.
#[tokio::test]
async fn a_cancel_token_left_in_a_completed_call_cancels_nothing_next() {
    let name = "a_cancel_token_left_in_a_completed_call_cancels_nothing_next";
    let Some(servers) = Servers::for_test(name) else {
        return;
    };
    let (client, conn) = tokio_postgres::connect(&servers.database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let client = Arc::new(client);
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cancel = {
        let sent = sent.clone();
        move |token: tokio_postgres::CancelToken| {
            sent.fetch_add(1, Relaxed);
            tokio::spawn(async move { token.cancel_query(tokio_postgres::NoTls).await });
        }
    };
    let query = service_fn({
        let client = client.clone();
        move |((), mut slot): ((), Slot<tokio_postgres::CancelToken, _>)| {
            let client = client.clone();
            async move {
                slot.fill(client.cancel_token());
                let one: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
                Ok::<_, tokio_postgres::Error>(one)
            }
        }
    });
    let db = OnCancel::new(query, cancel);

    assert_eq!(db.oneshot(()).await.unwrap(), 1);
    let next = client
        .batch_execute("SELECT pg_sleep(0.5) /* backstop-token-test */")
        .await;
    assert!(next.is_ok(), "the next query was cancelled: {next:?}");
    assert_eq!(sent.load(Relaxed), 0);
}

/// `WriteBack` spawns its write; a write Redis refuses (a user without write rights,
/// `NOPERM`) is counted in the layer's `Stats` when it fails, after the answer went out.
#[tokio::test]
async fn a_refill_write_redis_refuses_is_counted() {
    let Some(servers) = Servers::for_test("a_refill_write_redis_refuses_is_counted") else {
        return;
    };
    let (mut redis, pool, cancel_addr) = connect(&servers, 2).await.unwrap();
    forget(&mut redis, 4003).await;
    // A Redis user who may read, not write.
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "backstop_reader",
            "on",
            ">reader",
            "~*",
            "resetchannels",
        ])
        .arg(&["-@all", "+@read", "+@connection"])
        .query_async(&mut redis)
        .await
        .unwrap();
    let reader_url = servers
        .redis_url
        .replacen("redis://", "redis://backstop_reader:reader@", 1);
    let reader = redis::Client::open(reader_url)
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let stats = Stats::new();
    let write_back = redis_postgres::WriteBack {
        redis: reader,
        stats: stats.clone(),
    };
    let counters = Arc::new(DbCounters::default());
    let svc = with_refill(
        cache(redis.clone()),
        database(pool, cancel_addr, LOOKUP, counters, stats.clone()),
        write_back,
        stats.clone(),
    );
    let row = svc.oneshot(4003).await.unwrap().unwrap();
    assert_eq!(row.source, Source::Database);
    // The write runs in a task of its own: wait for its failure (bounded).
    for _ in 0..40 {
        if stats.snapshot().refill_writes_failed == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let counted = stats.snapshot();
    assert_eq!(
        (counted.refills, counted.refill_writes_failed),
        (1, 1),
        "{counted}"
    );
}
