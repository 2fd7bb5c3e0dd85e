//! Redis in front of PostgreSQL, with `tower-backstop` starting the database query
//! alongside the cache lookup, and cancelling it on the server when the cache hits.
//!
//! ```text
//! eval "$(bash .ci/services.sh)"      # Redis and PostgreSQL on 127.0.0.1
//! cd examples/redis-postgres && cargo run
//! ```
//!
//! Half the keys are put in Redis first. Each lookup prints who answered and how
//! long it took; at the end, what the database did: queries started, answers used,
//! and cancel requests sent for the queries a cache hit made useless.

use std::{sync::atomic::Ordering::Relaxed, sync::Arc, time::Instant};

use redis_postgres::{cache, connect, database, env::Servers, put, stack, DbCounters, LOOKUP};
use tower::ServiceExt;
use tower_backstop::{launch::Launch, outcome::Stats};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let servers = Servers::required()?;
    let (mut redis, pool, cancel_addr) = connect(&servers, 4).await?;

    let counters = Arc::new(DbCounters::default());
    let stats = Stats::new();
    let db = database(
        pool.clone(),
        cancel_addr,
        LOOKUP,
        counters.clone(),
        stats.clone(),
    );
    let svc = stack(
        cache(redis.clone()),
        db.clone(),
        Launch::Concurrent,
        stats.clone(),
    );

    // Warm the cache with the even keys, from the database itself.
    let keys: Vec<i64> = (1..=12).map(|i| i * 7919).collect();
    for &key in keys.iter().filter(|k| *k % 2 == 0) {
        if let Some(row) = db.clone().oneshot(key).await? {
            put(&mut redis, &row).await?;
        }
    }
    let warm_queries = counters.started.load(Relaxed);

    println!(
        "{:>7}  {:>8}  {:>9}  {:>6}",
        "key", "source", "latency", "rows"
    );
    for &key in &keys {
        let start = Instant::now();
        let row = svc
            .clone()
            .oneshot(key)
            .await?
            .expect("every key has a window");
        println!(
            "{key:>7}  {:>8}  {:>7.2}ms  {:>6}",
            format!("{:?}", row.source),
            start.elapsed().as_secs_f64() * 1e3,
            row.count
        );
    }
    // Let the last cancel tasks finish before reading the counters.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    println!("\n{}", stats.snapshot());
    println!(
        "database: {} queries started, {} answered, {} cancel requests sent",
        counters.started.load(Relaxed) - warm_queries,
        counters.completed.load(Relaxed) - warm_queries,
        counters.cancels_sent.load(Relaxed),
    );
    let status = pool.status();
    println!(
        "pool: {} connections, {} idle, {} discarded",
        status.size,
        status.available,
        counters.connections_discarded.load(Relaxed)
    );
    Ok(())
}
