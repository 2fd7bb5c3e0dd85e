//! Measures the layer on real Redis and PostgreSQL and prints a markdown table.
//!
//! ```text
//! eval "$(bash .ci/services.sh)"
//! cd examples/redis-postgres && cargo run --bin measure -- [REQUESTS] [CONCURRENCY] [POOL]
//! ```
//!
//! For each launch policy (and `Concurrent` with `max_speculative` 1 and 2, and with
//! the database behind the example's `Lease`, whose refill is always on), with
//! the refill off and then on: `REQUESTS` lookups
//! (default 2000; at most 60 s each), `CONCURRENCY` at a time (default 4), over 1000
//! keys of which 80% are in Redis at the start of each run, through a pool of `POOL`
//! connections (default: `CONCURRENCY`). With the refill on, each
//! miss's row is written back into Redis (`WriteBack`), so later lookups of that key
//! are hits.
//! Latency is per request, from `call` to the answer, split by who answered (hit:
//! Redis, miss: PostgreSQL). The database columns: queries sent to the server,
//! cancel requests sent for calls dropped mid-query, queries cancelled by the server (transactions rolled back, from `pg_stat_database`), and
//! wasted: sent, not served, and not cancelled — run to the end for nothing;
//! speculation limited: requests `max_speculative` kept sequential.
//!
//! Each policy gets a fresh pool, closed at the end so the server's statistics are
//! flushed before they are read.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use redis::aio::ConnectionManager;
use redis_postgres::{
    cache, connect, database, env::Servers, is_hit, pool, put, DbCounters, Error, Lease,
    LeaseConfig, LeaseCounters, Row, Source, WriteBack, LOOKUP,
};
use tower::{util::BoxCloneService, Layer, Service, ServiceExt};
use tower_backstop::{
    launch::{Adaptive, Launch},
    outcome::Stats,
    refill::{Refill, Write},
    FallbackLayer,
};

const KEYS: usize = 1000;
const HIT_PERCENT: u64 = 80;
const TIME_BOUND: Duration = Duration::from_secs(60);

/// SplitMix64's finaliser: deterministic "random" keys and hits.
fn mix(x: u64) -> u64 {
    let mut x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn key(i: usize) -> i64 {
    1 + (i as i64 * 181) % 188_000
}

fn cached(i: usize) -> bool {
    mix(i as u64 + 1_000_000) % 100 < HIT_PERCENT
}

fn percentiles(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "–".into();
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    format!("{:.2} / {:.2} / {:.2}", at(0.5), at(0.99), at(0.999))
}

/// The refill, or none: one type for both rows of a policy.
#[derive(Clone)]
struct Toggle(Option<WriteBack>);

impl Refill<i64, Option<Row>> for Toggle {
    type Key = i64;
    type Error = std::convert::Infallible;

    fn key(&mut self, key: &i64) -> Option<i64> {
        self.0.as_mut()?.key(key)
    }

    fn refill(&mut self, key: i64, row: &Option<Row>) -> Result<Write, Self::Error> {
        match &mut self.0 {
            Some(write_back) => write_back.refill(key, row),
            None => Ok(Write::Skipped),
        }
    }
}

/// Puts Redis back in its starting state: exactly the cached keys' rows, read from
/// PostgreSQL through `warm`.
async fn reset_cache<W>(
    redis: &mut ConnectionManager,
    warm: &W,
) -> Result<(), Box<dyn std::error::Error>>
where
    W: Service<i64, Response = Option<Row>, Error = Error> + Clone,
{
    for i in 0..KEYS {
        let _: () = redis::cmd("DEL")
            .arg(redis_postgres::cache_key(key(i)))
            .query_async(redis)
            .await?;
        if cached(i) {
            let row = warm.clone().oneshot(key(i)).await?.expect("a row");
            put(redis, &row).await?;
        }
    }
    Ok(())
}

/// The cache in front of `db` under `launch`, at most `cap` speculative calls.
fn boxed<D>(
    db: D,
    refill: Toggle,
    launch: Launch,
    cap: Option<usize>,
    stats: &Stats,
    redis: &ConnectionManager,
) -> BoxCloneService<i64, Option<Row>, Error>
where
    D: Service<i64, Response = Option<Row>, Error = Error, Future: Send + 'static>
        + Clone
        + Send
        + 'static,
{
    let mut layer = FallbackLayer::new(db)
        .accept(is_hit)
        .launch(launch)
        .stats(stats.clone())
        .refill(refill);
    if let Some(cap) = cap {
        layer = layer.max_speculative(cap);
    }
    BoxCloneService::new(layer.layer(cache(redis.clone())))
}

async fn rollbacks(monitor: &tokio_postgres::Client) -> i64 {
    monitor
        .query_one(
            "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let requests: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2000);
    let concurrency: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4);
    let pool_size: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(concurrency);
    let servers = Servers::required()?;
    let (mut redis, seed_pool, _) = connect(&servers, 1).await?;
    let (monitor, conn) =
        tokio_postgres::connect(&servers.database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);

    // Fills Redis with the cached keys' rows, from PostgreSQL, before each run. These
    // calls are never dropped, so their cancel address is never used.
    let warm = database(
        seed_pool,
        "127.0.0.1:1".into(),
        LOOKUP,
        Default::default(),
        Stats::new(),
    );

    // The third column: the layer's `max_speculative`, the cap on speculative
    // fallback calls in flight (the pool holds `pool_size` connections); the fourth:
    // the database behind the example's `Lease`, which reads the value before it
    // queries and refills itself (one row, the refill always on).
    let policies: Vec<(&str, Launch, Option<usize>, bool)> = vec![
        ("Sequential", Launch::Sequential, None, false),
        ("Concurrent", Launch::Concurrent, None, false),
        (
            "Concurrent, max_speculative(1)",
            Launch::Concurrent,
            Some(1),
            false,
        ),
        (
            "Concurrent, max_speculative(2)",
            Launch::Concurrent,
            Some(2),
            false,
        ),
        ("Concurrent, lease", Launch::Concurrent, None, true),
        (
            "Delayed(2 ms)",
            Launch::Delayed(Duration::from_millis(2)),
            None,
            false,
        ),
        (
            "Adaptive(p90)",
            Launch::Adaptive(Adaptive::new(0.9, Duration::from_millis(2))),
            None,
            false,
        ),
    ];
    println!(
        "{requests} requests per policy, {concurrency} at a time, {HIT_PERCENT}% hits, \
         a pool of {pool_size}; latency in ms (p50 / p99 / p99.9)\n"
    );
    println!("| policy | refill | hits | hit latency | misses | miss latency | queries sent | cancel requests | cancelled on server | wasted | speculation limited | queries per request |");
    println!("|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|");
    let runs = policies.into_iter().flat_map(|(name, launch, cap, lease)| {
        let refills: &[bool] = if lease { &[true] } else { &[false, true] };
        refills
            .iter()
            .map(move |&refill| (name, launch.clone(), cap, lease, refill))
    });
    for (name, launch, cap, lease, refill) in runs {
        reset_cache(&mut redis, &warm).await?;
        let (pool, cancel_addr) = pool(&servers.database_url, pool_size)?;
        let counters = Arc::new(DbCounters::default());
        let stats = Stats::new();
        let db = database(
            pool.clone(),
            cancel_addr,
            LOOKUP,
            counters.clone(),
            stats.clone(),
        );
        let svc = if lease {
            let leases = Arc::new(LeaseCounters::default());
            let db = Lease::new(db, redis.clone(), LeaseConfig::default(), leases);
            boxed(db, Toggle(None), launch, cap, &stats, &redis)
        } else {
            let write_back = refill.then(|| WriteBack {
                redis: redis.clone(),
                stats: stats.clone(),
            });
            boxed(db, Toggle(write_back), launch, cap, &stats, &redis)
        };
        let rolled_back_before = rollbacks(&monitor).await;
        let next = Arc::new(AtomicUsize::new(0));
        let samples = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let deadline = Instant::now() + TIME_BOUND;
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (svc, next, samples) = (svc.clone(), next.clone(), samples.clone());
                tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(1, Relaxed);
                        if n >= requests || Instant::now() > deadline {
                            break;
                        }
                        let i = mix(n as u64) as usize % KEYS;
                        let start = Instant::now();
                        let row = svc.clone().oneshot(key(i)).await.unwrap().expect("a row");
                        let ms = start.elapsed().as_secs_f64() * 1e3;
                        let mut s = samples.lock().unwrap();
                        match row.source {
                            Source::Cache => s.0.push(ms),
                            Source::Database => s.1.push(ms),
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.await?;
        }
        // Let the cancel tasks hand their connections back, then close them all so
        // their backends flush their statistics.
        for _ in 0..100 {
            let s = pool.status();
            if s.available == s.size {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(svc);
        pool.close();
        drop(pool);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let cancelled = rollbacks(&monitor).await - rolled_back_before;

        let (hits, misses) = std::mem::take(&mut *samples.lock().unwrap());
        let sent = counters.started.load(Relaxed) as i64;
        let snapshot = stats.snapshot();
        let served = snapshot.served_by_fallback as i64;
        let done = (hits.len() + misses.len()) as f64;
        println!(
            "| {name} | {} | {} | {} | {} | {} | {sent} | {} | {cancelled} | {} | {} | {:.2} |",
            match (lease, refill) {
                (true, _) => "lease",
                (false, true) => "on",
                (false, false) => "off",
            },
            hits.len(),
            percentiles(hits),
            misses.len(),
            percentiles(misses),
            counters.cancels_sent.load(Relaxed),
            (sent - served - cancelled).max(0),
            snapshot.speculation_limited,
            sent as f64 / done,
        );
    }
    Ok(())
}
