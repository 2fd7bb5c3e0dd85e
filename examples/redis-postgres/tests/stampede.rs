//! One key expiring under many concurrent requests, across instances that share one
//! Redis and one PostgreSQL (`REDIS_URL`, `DATABASE_URL`; `eval "$(bash .ci/services.sh)"`
//! starts both). Without them each test prints a "skipped: ..." line and passes,
//! except under `CI=true`, where it fails.
//!
//! Each test uses keys of its own (150,000 and up), so they run in parallel with the
//! other tests against the same servers.

use std::{
    future::pending,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use redis::aio::ConnectionManager;
use redis_postgres::{
    cache_key, connect,
    env::Servers,
    fleet::{burst, instance, stampede, Coalescing, Instance},
    Lease, LeaseConfig, LeaseCounters, Row, Source,
};
use tower::{service_fn, Service, ServiceExt};
use tower_backstop::launch::Launch;

const INSTANCES: usize = 4;
const POOL: usize = 4;
const TIME_BOUND: Duration = Duration::from_secs(30);
/// The lookup, 100 ms slower: every request's cache read is done long before the
/// first refill lands, however loaded the machine, so "off" is every request.
const SLOW_LOOKUP: &str = "SELECT count(*)::bigint, coalesce(max(payload), '') \
     FROM items, pg_sleep(0.1) WHERE id > $1 AND id <= $1 + 12000 /* stampede-test */";

async fn fleet(servers: &Servers, coalescing: Coalescing) -> Vec<Instance> {
    let mut fleet = Vec::new();
    for _ in 0..INSTANCES {
        let instance = instance(servers, POOL, Launch::Sequential, coalescing, SLOW_LOOKUP);
        fleet.push(instance.await.unwrap());
    }
    fleet
}

async fn redis(servers: &Servers) -> ConnectionManager {
    redis::Client::open(servers.redis_url.as_str())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap()
}

async fn exists(redis: &mut ConnectionManager, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(redis)
        .await
        .unwrap()
        == 1
}

/// Deletes `key`'s value and lease; returns the lease's name.
async fn expire(redis: &mut ConnectionManager, key: i64) -> String {
    let lease_key = format!("lease:{}", cache_key(key));
    let _: () = redis::cmd("DEL")
        .arg(cache_key(key))
        .arg(&lease_key)
        .query_async(redis)
        .await
        .unwrap();
    lease_key
}

/// Waits (at most 5 s) until `key`'s existence in Redis is `want`.
async fn until_exists(redis: &mut ConnectionManager, key: &str, want: bool) {
    for _ in 0..500 {
        if exists(redis, key).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{key} still {}", if want { "missing" } else { "there" });
}

/// 256 concurrent requests for one expired key over 4 instances (own pools, layers,
/// Redis connections): every one answers, and the database runs about 256 queries
/// without coalescing, at most one per instance with per-process coalescing, and one
/// with the lease. (Fails on a main without the lease: there is nothing to build.)
/// The query runs 100 ms longer than the example's, so that every request's cache
/// read is over before the first refill lands, however loaded the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_expired_key_under_256_requests_over_4_instances() {
    let name = "one_expired_key_under_256_requests_over_4_instances";
    let Some(servers) = Servers::for_test(name) else {
        return;
    };
    let (mut redis, _, _) = connect(&servers, 1).await.unwrap();
    let lease = LeaseConfig::default();
    let modes = [
        Coalescing::Off,
        Coalescing::PerProcess,
        Coalescing::Lease(lease),
        Coalescing::LeaseAndPerProcess(lease),
    ];
    for (i, coalescing) in modes.into_iter().enumerate() {
        let fleet = fleet(&servers, coalescing).await;
        // A key per mode: a refill still in flight from the last mode lands elsewhere.
        let key = 150_001 + i as i64;
        let run = stampede(&mut redis, &fleet, key, 256, TIME_BOUND)
            .await
            .unwrap();
        eprintln!(
            "{}: {} queries, {} joined, {} leases, p99 {:.1} ms",
            coalescing.name(),
            run.queries,
            run.joined,
            run.leases,
            run.quantile(0.99)
        );
        assert_eq!(
            run.failed,
            0,
            "{}: every request answers",
            coalescing.name()
        );
        match coalescing {
            // "Or near": a request whose cache read comes after the first refill hits.
            Coalescing::Off => assert!(run.queries >= 250, "off: {} queries", run.queries),
            Coalescing::PerProcess => assert!(run.queries <= 4, "{} queries", run.queries),
            Coalescing::Lease(_) | Coalescing::LeaseAndPerProcess(_) => {
                assert_eq!((run.queries, run.leases), (1, 1), "{}", coalescing.name())
            }
        }
        if matches!(
            coalescing,
            Coalescing::PerProcess | Coalescing::LeaseAndPerProcess(_)
        ) {
            // One call per instance; every other request joined one.
            assert_eq!(run.joined, 256 - INSTANCES as u64, "{}", coalescing.name());
        }
        for instance in fleet {
            instance.pool.close();
        }
    }
}

/// A holder that died with the lease (never released, as a crashed process leaves it):
/// the others wait one lease time, then one of them takes the lease over and queries;
/// nobody waits past that, nobody gives up, and the database runs one query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holder_costs_the_others_one_lease_time() {
    let name = "a_dead_holder_costs_the_others_one_lease_time";
    let Some(servers) = Servers::for_test(name) else {
        return;
    };
    let (mut redis, _, _) = connect(&servers, 1).await.unwrap();
    let config = LeaseConfig {
        lease: Duration::from_millis(400),
        patience: Duration::from_secs(5),
        ..LeaseConfig::default()
    };
    let fleet = fleet(&servers, Coalescing::Lease(config)).await;
    let key = 150_101;
    let lease_key = expire(&mut redis, key).await;
    // The dead instance's lease, fresh: its 400 ms start now.
    let _: () = redis::cmd("SET")
        .arg(lease_key)
        .arg("dead-instance:0")
        .arg("PX")
        .arg(400)
        .query_async(&mut redis)
        .await
        .unwrap();
    let run = burst(&fleet, key, 64, TIME_BOUND).await.unwrap();
    let impatient: u64 = fleet.iter().map(|i| i.leases.impatient.load(Relaxed)).sum();
    eprintln!(
        "dead holder: {} queries, latency {:.0} to {:.0} ms",
        run.queries,
        run.quantile(0.0),
        run.quantile(1.0)
    );
    assert_eq!(run.failed, 0);
    assert_eq!((run.queries, run.leases, impatient), (1, 1, 0));
    // The lease's time on Redis's clock, then a poll or two and one query: far less
    // than the 5 s of patience.
    assert!(run.quantile(0.0) >= 350.0, "waited for the lease: {run:?}");
    assert!(
        run.quantile(1.0) < 2_500.0,
        "one lease time, not patience: {run:?}"
    );
    for instance in fleet {
        instance.pool.close();
    }
}

/// The holder's request is dropped mid-query (its call never answers): the lease is
/// handed back as it goes, so the others take over at once instead of waiting the 5 s
/// lease out, and the database runs one query for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_dropped_mid_query_hands_the_lease_on() {
    let name = "a_holder_dropped_mid_query_hands_the_lease_on";
    let Some(servers) = Servers::for_test(name) else {
        return;
    };
    let (mut redis, _, _) = connect(&servers, 1).await.unwrap();
    let key = 150_201;
    let lease_key = expire(&mut redis, key).await;
    let config = LeaseConfig {
        lease: Duration::from_secs(5),
        patience: Duration::from_secs(20),
        ..LeaseConfig::default()
    };
    // The first query never answers; the others do at once.
    let queries = Arc::new(AtomicUsize::new(0));
    let db = {
        let queries = queries.clone();
        service_fn(move |key: i64| {
            let n = queries.fetch_add(1, Relaxed);
            async move {
                if n == 0 {
                    pending::<()>().await;
                }
                Ok(Some(row(key, "fresh")))
            }
        })
    };
    let counters = Arc::new(LeaseCounters::default());
    let lease = |redis| Lease::new(db.clone(), redis, config, counters.clone());
    let holder = tokio::spawn(lease(redis.clone()).oneshot(key));
    until_exists(&mut redis, &lease_key, true).await;

    // Two more instances' worth of waiters, each with a Redis connection of its own.
    let mut waiters = Vec::new();
    for _ in 0..2 {
        let svc = lease(self::redis(&servers).await);
        for _ in 0..8 {
            waiters.push(tokio::spawn(svc.clone().oneshot(key)));
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    holder.abort();
    assert!(holder.await.unwrap_err().is_cancelled());
    // Far less than the 5 s lease: the dropped holder gave it back.
    let answers = tokio::time::timeout(Duration::from_secs(3), async {
        let mut answers = Vec::new();
        for waiter in waiters {
            answers.push(waiter.await.unwrap().unwrap());
        }
        answers
    })
    .await
    .expect("the waiters took over before the lease ran out");
    assert!(answers
        .iter()
        .all(|a| a.as_ref().unwrap().digest == "fresh"));
    assert_eq!(queries.load(Relaxed), 2, "the dropped one and one takeover");
    assert_eq!(counters.released.load(Relaxed), 1);
    assert_eq!(counters.taken.load(Relaxed), 2);
    assert_eq!(counters.refills_written.load(Relaxed), 1);
}

/// A holder whose lease expired while its query ran, and whose key another caller has
/// since leased and refilled, does not write its older answer over the newer one; its
/// own caller still gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_holder_does_not_overwrite_a_newer_value() {
    let name = "a_stale_holder_does_not_overwrite_a_newer_value";
    let Some(servers) = Servers::for_test(name) else {
        return;
    };
    let (mut redis, _, _) = connect(&servers, 1).await.unwrap();
    let key = 150_301;
    let lease_key = expire(&mut redis, key).await;
    let config = LeaseConfig {
        lease: Duration::from_millis(100),
        ..LeaseConfig::default()
    };
    // The slow holder answers "old" once told to, long after its lease.
    let (answer, answered) = tokio::sync::oneshot::channel::<()>();
    let answered = Arc::new(tokio::sync::Mutex::new(Some(answered)));
    let slow_db = service_fn(move |key: i64| {
        let answered = answered.clone();
        async move {
            if let Some(answered) = answered.lock().await.take() {
                let _ = answered.await;
            }
            Ok(Some(row(key, "old")))
        }
    });
    let fast_db = service_fn(|key: i64| async move { Ok(Some(row(key, "new"))) });
    let slow_counters = Arc::new(LeaseCounters::default());
    let fast_counters = Arc::new(LeaseCounters::default());
    let mut slow = Lease::new(slow_db, redis.clone(), config, slow_counters.clone());
    let mut fast = Lease::new(
        fast_db,
        self::redis(&servers).await,
        config,
        fast_counters.clone(),
    );

    let stale = tokio::spawn(slow.ready().await.unwrap().call(key));
    until_exists(&mut redis, &lease_key, true).await;
    until_exists(&mut redis, &lease_key, false).await; // expired
    let newer = fast
        .ready()
        .await
        .unwrap()
        .call(key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(newer.digest, "new");
    answer.send(()).unwrap();
    let old = stale.await.unwrap().unwrap().unwrap();
    assert_eq!(
        old.digest, "old",
        "the stale holder's caller gets its answer"
    );

    let cached: String = redis::cmd("GET")
        .arg(cache_key(key))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(cached.ends_with(":new"), "Redis holds {cached:?}");
    assert_eq!(fast_counters.refills_written.load(Relaxed), 1);
    assert_eq!(slow_counters.refills_refused.load(Relaxed), 1);
    assert_eq!(slow_counters.refills_written.load(Relaxed), 0);
    assert!(!exists(&mut redis, &lease_key).await);
}

/// A caller whose patience runs out behind a lease that is not released queries the
/// database itself, and writes its answer only where nothing is: a value written
/// meanwhile (here by the database service itself, as another writer would) stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_patience_a_caller_queries_and_writes_only_where_nothing_is() {
    let name = "out_of_patience_a_caller_queries_and_writes_only_where_nothing_is";
    let Some(servers) = Servers::for_test(name) else {
        return;
    };
    let (mut redis, _, _) = connect(&servers, 1).await.unwrap();
    let key = 150_401;
    let lease_key = expire(&mut redis, key).await;
    let _: () = redis::cmd("SET")
        .arg(&lease_key)
        .arg("stuck-instance:0")
        .arg("PX")
        .arg(10_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    let config = LeaseConfig {
        lease: Duration::from_secs(10),
        patience: Duration::from_millis(200),
        ..LeaseConfig::default()
    };
    let writer = redis.clone();
    let db = service_fn(move |key: i64| {
        let mut writer = writer.clone();
        async move {
            let () = redis::cmd("SET")
                .arg(cache_key(key))
                .arg("1:newer")
                .query_async(&mut writer)
                .await
                .unwrap();
            Ok(Some(row(key, "mine")))
        }
    });
    let counters = Arc::new(LeaseCounters::default());
    let svc = Lease::new(db, redis.clone(), config, counters.clone());
    let answer = tokio::time::timeout(Duration::from_secs(5), svc.oneshot(key))
        .await
        .expect("patience bounds the wait, not the 10 s lease")
        .unwrap()
        .unwrap();
    assert_eq!(answer.digest, "mine");
    assert_eq!(counters.impatient.load(Relaxed), 1);
    assert_eq!(counters.taken.load(Relaxed), 0);
    let cached: String = redis::cmd("GET")
        .arg(cache_key(key))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(cached, "1:newer");
}

fn row(key: i64, digest: &str) -> Row {
    Row {
        key,
        count: 1,
        digest: digest.into(),
        source: Source::Database,
    }
}
