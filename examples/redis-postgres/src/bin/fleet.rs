//! Measures what coalescing saves the database, on real Redis and PostgreSQL, and
//! prints two markdown tables.
//!
//! ```text
//! eval "$(bash .ci/services.sh)"
//! cd examples/redis-postgres && cargo run --bin fleet -- [REQUESTS] [stampede|zipf]
//! ```
//!
//! Both tables by default; `stampede` or `zipf` prints only that one.
//!
//! - **Stampede**: one hot key expires under 256 concurrent requests spread over 4
//!   instances (each with its own Redis connection, pool of 4, layer and coalescer),
//!   all released at once, `Launch::Sequential`. Per way of sharing the calls:
//!   database queries, leases taken, and latency over the 256 requests.
//! - **Zipf**: `REQUESTS` lookups (default 20,000; at most 60 s per row) over 10,000
//!   keys drawn from a Zipf distribution (s = 1; the hottest key is 10% of requests),
//!   64 at a time on one instance (pool of 8), from a cold cache (every key deleted
//!   before each row), each miss refilled. The same key sequence for every row.
//!   Misses: requests the cache did not answer; a miss that waited for a lease's
//!   refill is answered from Redis, and is not among the "database answers".

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use redis::aio::ConnectionManager;
use redis_postgres::{
    cache_key, connect,
    env::Servers,
    fleet::{instance, stampede, Coalescing, Stampede},
    LeaseConfig, Source, LOOKUP,
};
use tower::ServiceExt;
use tower_backstop::launch::Launch;

const TIME_BOUND: Duration = Duration::from_secs(60);
const KEYS: u64 = 10_000;
const IN_FLIGHT: usize = 64;

fn modes() -> [Coalescing; 4] {
    let lease = LeaseConfig::default();
    [
        Coalescing::Off,
        Coalescing::PerProcess,
        Coalescing::Lease(lease),
        Coalescing::LeaseAndPerProcess(lease),
    ]
}

fn quantiles(run: &Stampede) -> String {
    format!(
        "{:.1} / {:.1} / {:.1}",
        run.quantile(0.5),
        run.quantile(0.99),
        run.quantile(1.0)
    )
}

async fn stampedes(
    servers: &Servers,
    redis: &mut ConnectionManager,
) -> Result<(), Box<dyn std::error::Error>> {
    println!("One hot key expiring under 256 concurrent requests, 4 instances; latency in ms (p50 / p99 / max)\n");
    println!("| coalescing | requests | answered | database queries | joined in process | leases | latency |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for (i, coalescing) in modes().into_iter().enumerate() {
        let mut fleet = Vec::new();
        for _ in 0..4 {
            fleet.push(instance(servers, 4, Launch::Sequential, coalescing, LOOKUP).await?);
        }
        // A key per row: a refill still in flight from the last row lands elsewhere.
        let run = stampede(redis, &fleet, 170_001 + i as i64, 256, TIME_BOUND).await?;
        println!(
            "| {} | 256 | {} | {} | {} | {} | {} |",
            coalescing.name(),
            run.latencies.len(),
            run.queries,
            run.joined,
            run.leases,
            quantiles(&run)
        );
        for instance in fleet {
            instance.pool.close();
        }
    }
    Ok(())
}

/// The database id of Zipf rank `rank` (1 = hottest).
fn zipf_key(rank: u64) -> i64 {
    rank as i64 * 18
}

async fn zipf(
    servers: &Servers,
    redis: &mut ConnectionManager,
    requests: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let distribution = Zipf::new(KEYS as f64, 1.0)?;
    let mut rng = StdRng::seed_from_u64(19);
    let keys: Arc<[i64]> = (0..requests)
        .map(|_| zipf_key(distribution.sample(&mut rng) as u64))
        .collect();
    println!(
        "\n{requests} requests over {KEYS} Zipf keys (s = 1), {IN_FLIGHT} in flight, one \
         instance, cold cache; latency in ms (p50 / p99 / max)\n"
    );
    println!("| coalescing | answered | misses | joined in process | database queries | queries per request | latency, all | latency, database answers |");
    println!("|---|---:|---:|---:|---:|---:|---|---|");
    for coalescing in modes() {
        let mut flush = redis::pipe();
        for rank in 1..=KEYS {
            let key = cache_key(zipf_key(rank));
            flush.del(format!("lease:{key}")).ignore().del(key).ignore();
        }
        let () = flush.query_async(redis).await?;
        let instance = instance(servers, 8, Launch::Sequential, coalescing, LOOKUP).await?;
        let next = Arc::new(AtomicUsize::new(0));
        let samples = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let deadline = Instant::now() + TIME_BOUND;
        let workers: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                let (svc, next, samples) =
                    (instance.service.clone(), next.clone(), samples.clone());
                let keys = keys.clone();
                tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(1, Relaxed);
                        if n >= keys.len() || Instant::now() > deadline {
                            break;
                        }
                        let start = Instant::now();
                        let Ok(Some(row)) = svc.clone().oneshot(keys[n]).await else {
                            continue;
                        };
                        let ms = start.elapsed().as_secs_f64() * 1e3;
                        let mut s = samples.lock().unwrap();
                        s.0.push(ms);
                        if row.source == Source::Database {
                            s.1.push(ms);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.await?;
        }
        let (all, misses) = std::mem::take(&mut *samples.lock().unwrap());
        let queries = instance.queries.started.load(Relaxed);
        let snapshot = instance.stats.snapshot();
        let (missed, joined) = (snapshot.served_by_fallback, snapshot.coalesce_joined);
        let sorted = |mut latencies: Vec<f64>| {
            latencies.sort_by(f64::total_cmp);
            Stampede {
                latencies,
                ..Stampede::default()
            }
        };
        let (all, misses) = (sorted(all), sorted(misses));
        println!(
            "| {} | {} | {missed} | {joined} | {queries} | {:.3} | {} | {} |",
            coalescing.name(),
            all.latencies.len(),
            queries as f64 / all.latencies.len().max(1) as f64,
            quantiles(&all),
            quantiles(&misses),
        );
        instance.pool.close();
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let requests: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let only = args.next();
    let servers = Servers::required()?;
    let (mut redis, _, _) = connect(&servers, 1).await?;
    if only.as_deref() != Some("zipf") {
        stampedes(&servers, &mut redis).await?;
    }
    if only.as_deref() != Some("stampede") {
        zipf(&servers, &mut redis, requests).await?;
    }
    Ok(())
}
