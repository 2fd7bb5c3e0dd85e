//! A cache in front of a database, with and without `tower-backstop`.
//!
//! Run it with:
//!
//! ```text
//! cargo run --all-features --example cache_db
//! ```
//!
//! The usual read-through code asks the cache and, only after the cache says "miss",
//! asks the database: a miss costs the cache's latency *plus* the database's. With
//! [`FallbackLayer`] the database is asked at the same time as the cache, inside one
//! response future:
//!
//! - on a **hit** the cache's row is served and the database call, still in flight, is
//!   dropped on the spot — the request costs the cache's latency alone;
//! - on a **miss** the database's row is served — the request costs the slower of the
//!   two, not their sum.
//!
//! Both services simulate their latency with `tokio::time::sleep` (a few
//! milliseconds, deterministic per key), and every request is sent twice, through the
//! layer and sequentially, to the very same services, so the two timings are measured,
//! not computed. Each row carries a `source` field naming the service that produced
//! it, and the database counts the calls it started and completed: a call started but
//! never completed is one the layer dropped because the cache hit.

use std::{
    collections::HashMap,
    convert::Infallible,
    error::Error,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tokio::time::sleep;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_backstop::{outcome::Stats, FallbackLayer};

/// The keys requested, in order.
const KEYS: std::ops::RangeInclusive<u64> = 1..=16;

/// The `source` of a row served by the cache, and of one served by the database.
const CACHE: &str = "cache";
const DATABASE: &str = "database";

/// A row, stamped with the service that produced it.
#[derive(Clone, Debug)]
struct Row {
    key: u64,
    source: &'static str,
}

/// Counts database calls: started when called, completed when the row is returned.
#[derive(Debug, Default)]
struct DbCalls {
    started: AtomicUsize,
    completed: AtomicUsize,
}

impl DbCalls {
    fn snapshot(&self) -> (usize, usize) {
        (
            self.started.load(Ordering::SeqCst),
            self.completed.load(Ordering::SeqCst),
        )
    }
}

/// A tiny deterministic hash (SplitMix64's finaliser), so that which keys are cached
/// and how long each lookup takes are "random" yet the same on every run.
fn mix(key: u64) -> u64 {
    let mut x = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// About 60% of keys are in the cache.
fn is_cached(key: u64) -> bool {
    mix(key) % 5 < 3
}

/// A cache hit takes 2 ms; a miss takes 2–6 ms (a miss may have to look further).
fn cache_latency(key: u64, hit: bool) -> Duration {
    let ms = if hit { 2 } else { 2 + (mix(key) >> 8) % 5 };
    Duration::from_millis(ms)
}

/// The database always finds the row, in 5–15 ms.
fn db_latency(key: u64) -> Duration {
    Duration::from_millis(5 + (mix(key) >> 16) % 11)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Time saved by the layer, rounded to 0.1 ms; adding `0.0` turns a rounded `-0.0`
/// into `0.0`, so timer noise on a hit never prints as "-0.0 ms".
fn saved_ms(layered: Duration, sequential: Duration) -> f64 {
    ((ms(sequential) - ms(layered)) * 10.0).round() / 10.0 + 0.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    // The cache holds a fixed set of rows and answers `Ok(None)` for any other key.
    let rows: Arc<HashMap<u64, Row>> = Arc::new(
        KEYS.filter(|&key| is_cached(key))
            .map(|key| (key, Row { key, source: CACHE }))
            .collect(),
    );
    let cache = service_fn(move |key: u64| {
        let rows = Arc::clone(&rows);
        async move {
            let row = rows.get(&key).cloned();
            sleep(cache_latency(key, row.is_some())).await;
            Ok::<_, Infallible>(row)
        }
    });

    // The database finds every row, and counts its calls.
    let calls = Arc::new(DbCalls::default());
    let db = {
        let calls = Arc::clone(&calls);
        service_fn(move |key: u64| {
            // Counted when called, not when first polled: this is the cost the
            // database sees.
            calls.started.fetch_add(1, Ordering::SeqCst);
            let calls = Arc::clone(&calls);
            async move {
                sleep(db_latency(key)).await;
                calls.completed.fetch_add(1, Ordering::SeqCst);
                let row = Row {
                    key,
                    source: DATABASE,
                };
                Ok::<_, Infallible>(Some(row))
            }
        })
    };

    // Serve the cache's answer if it has the row; otherwise the database's. The layer
    // counts what it did into `stats`, readable from anywhere.
    let stats = Stats::new();
    let mut svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new(db)
                .accept(|r: &Result<Option<Row>, Infallible>| matches!(r, Ok(Some(_))))
                .stats(stats.clone()),
        )
        .service(cache);

    println!(
        "A cache in front of a database: {} keys, each fetched twice from the same two services.",
        KEYS.count()
    );
    println!("  layered     FallbackLayer asks the cache and the database at once and serves");
    println!("              the cache's row if it has one, else the database's.");
    println!("  sequential  asks the cache, then the database only after a miss.");
    println!("Simulated latencies ('cache' and 'database' columns): cache 2 ms on a hit,");
    println!("2-6 ms on a miss; database 5-15 ms. A hit costs the cache alone either way;");
    println!("a miss costs max(cache, database) layered, cache + database sequential.");
    println!("Measured times run ~1 ms over the simulated ones (tokio's timer rounds each");
    println!("sleep up to the next millisecond), plus some noise on a busy machine.");
    println!();
    println!(
        "{:>3}  {:>10}  {:>8}  {:<9}  {:>8}  {:>10}  {:>8}  database call (layered)",
        "key", "cache", "database", "served by", "layered", "sequential", "saved"
    );

    let (mut hits, mut misses) = (0, 0);
    let (mut total_layered, mut total_sequential) = (Duration::ZERO, Duration::ZERO);
    let (mut layered_started, mut layered_completed) = (0, 0);
    let (mut seq_started, mut seq_completed) = (0, 0);

    for key in KEYS {
        // Through the layer.
        let (started0, completed0) = calls.snapshot();
        let t = Instant::now();
        let row = svc
            .ready()
            .await?
            .call(key)
            .await?
            .expect("the database has every row");
        let layered = t.elapsed();
        let (started1, completed1) = calls.snapshot();
        let (started, completed) = (started1 - started0, completed1 - completed0);
        layered_started += started;
        layered_completed += completed;

        // Sequentially, on the very same services: the cache inside the layer and the
        // database the layer clones for each request.
        let t = Instant::now();
        let seq_row = match svc.get_mut().ready().await?.call(key).await? {
            Some(row) => row,
            None => {
                let db = svc.fallback_mut();
                db.ready()
                    .await?
                    .call(key)
                    .await?
                    .expect("the database has every row")
            }
        };
        let sequential = t.elapsed();
        let (started2, completed2) = calls.snapshot();
        seq_started += started2 - started1;
        seq_completed += completed2 - completed1;
        assert_eq!((seq_row.key, seq_row.source), (row.key, row.source));

        let hit = row.source == CACHE;
        if hit {
            hits += 1;
        } else {
            misses += 1;
        }
        total_layered += layered;
        total_sequential += sequential;

        let cache_col = format!(
            "{} {:>2} ms",
            if is_cached(key) { "hit " } else { "miss" },
            cache_latency(key, is_cached(key)).as_millis()
        );
        let db_col = format!("{:>2} ms", db_latency(key).as_millis());
        let db_call = match (started, completed) {
            (1, 0) => "started, dropped unfinished",
            (1, 1) if hit => "completed, answer discarded",
            (1, 1) => "completed, served",
            (0, 0) => "never started",
            _ => "unexpected",
        };
        println!(
            "{:>3}  {:>10}  {:>8}  {:<9}  {:>5.1} ms  {:>7.1} ms  {:>5.1} ms  {}",
            key,
            cache_col,
            db_col,
            row.source,
            ms(layered),
            ms(sequential),
            saved_ms(layered, sequential),
            db_call,
        );
    }

    let saved = saved_ms(total_layered, total_sequential);
    println!();
    println!("Summary");
    println!(
        "  requests    {} ({hits} hits, {misses} misses)",
        hits + misses
    );
    println!(
        "  total time  layered {:.1} ms, sequential {:.1} ms: saved {saved:.1} ms ({:.0}%)",
        ms(total_layered),
        ms(total_sequential),
        100.0 * saved / ms(total_sequential),
    );
    let dropped = layered_started - layered_completed;
    println!(
        "  database    layered:    {layered_started} calls started, \
         {layered_completed} completed, {dropped} dropped unfinished"
    );
    println!("              sequential: {seq_started} calls started, {seq_completed} completed");
    let counts = stats.snapshot();
    println!(
        "  layer stats {} requests: {} served by the cache, {} by the database;",
        counts.requests, counts.served_by_primary, counts.served_by_fallback
    );
    println!(
        "              {} database calls started ({} speculative), {} cancelled, {} wasted;",
        counts.fallback_launches,
        counts.speculative_launches,
        counts.fallbacks_cancelled,
        counts.fallbacks_wasted
    );
    println!(
        "              the database answered before the cache {} times",
        counts.fallback_first
    );
    println!();
    println!("The layer saves the cache's latency on every miss; the price is a database call");
    println!("started, and dropped unfinished, on every hit.");
    Ok(())
}
