//! Instances of one service, as a fleet runs them behind one Redis and one PostgreSQL,
//! and the stampede that a popular key's expiry sets off.
//!
//! Each [`Instance`] is what one process would hold: its own Redis connection, its own
//! pool, its own layer (and so its own coalescer), its own counters. [`stampede`] sends
//! concurrent requests for one key that just expired across a set of them, and reports
//! what the database saw.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use deadpool_postgres::Pool;
use tokio::time::Instant;
use tower::{util::BoxCloneService, Layer, Service, ServiceExt};
use tower_backstop::{launch::Launch, outcome::Stats, refill::NoRefill, FallbackLayer};

use crate::{
    cache, cache_key, database, env::Servers, is_hit, pool, DbCounters, Error, Lease, LeaseConfig,
    LeaseCounters, Row, WriteBack,
};

/// How the database calls of concurrent misses for one key are shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coalescing {
    /// Not at all: each miss queries, and each refills (`WriteBack`).
    Off,
    /// Per process: the layer's `coalesce_by(|key| Some(*key))`, one query per key in
    /// flight per instance, refilled once (`WriteBack`).
    PerProcess,
    /// Across instances: the database behind a [`Lease`] in Redis, which refills.
    Lease(LeaseConfig),
    /// Both: the instance's misses share one call, which goes through the lease.
    LeaseAndPerProcess(LeaseConfig),
}

impl Coalescing {
    /// A short name, for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Coalescing::Off => "off",
            Coalescing::PerProcess => "per process",
            Coalescing::Lease(_) => "lease",
            Coalescing::LeaseAndPerProcess(_) => "lease + per process",
        }
    }

    fn per_process(&self) -> bool {
        matches!(
            self,
            Coalescing::PerProcess | Coalescing::LeaseAndPerProcess(_)
        )
    }

    fn lease(&self) -> Option<LeaseConfig> {
        match *self {
            Coalescing::Lease(config) | Coalescing::LeaseAndPerProcess(config) => Some(config),
            _ => None,
        }
    }
}

/// One instance of the service: the stack and what it counts.
#[derive(Clone, Debug)]
pub struct Instance {
    /// The cache in front of the database, under the layer.
    pub service: BoxCloneService<i64, Option<Row>, Error>,
    /// What this instance's database service did.
    pub queries: Arc<DbCounters>,
    /// What its leases did (all zero without a lease).
    pub leases: Arc<LeaseCounters>,
    /// The layer's counters.
    pub stats: Stats,
    /// Its pool, to close at the end.
    pub pool: Pool,
}

/// Builds one instance: a Redis connection and a pool of `pool_size` of its own (its
/// connections opened before it returns), the database service running `sql` (as
/// [`database`] does: [`LOOKUP`](crate::LOOKUP) or a query of the same shape), the
/// database's calls shared as `coalescing` says, under `launch`. The `items` table must
/// be there already ([`connect`](crate::connect) seeds it).
pub async fn instance(
    servers: &Servers,
    pool_size: usize,
    launch: Launch,
    coalescing: Coalescing,
    sql: &'static str,
) -> Result<Instance, Box<dyn std::error::Error>> {
    let redis = redis::Client::open(servers.redis_url.as_str())?
        .get_connection_manager()
        .await?;
    let (pool, cancel_addr) = pool(&servers.database_url, pool_size)?;
    // Every connection opened now, held together so that each is a new one: a
    // stampede should measure queries, not PostgreSQL forking backends.
    let mut warm = Vec::with_capacity(pool_size);
    for _ in 0..pool_size {
        warm.push(pool.get().await?);
    }
    drop(warm);
    let queries = Arc::new(DbCounters::default());
    let leases = Arc::new(LeaseCounters::default());
    let stats = Stats::new();
    let db = database(
        pool.clone(),
        cancel_addr,
        sql,
        queries.clone(),
        stats.clone(),
    );
    let cache = cache(redis.clone());
    let per_process = coalescing.per_process();
    let service = match coalescing.lease() {
        // The lease refills, under its compare-and-set: no `WriteBack` beside it.
        Some(config) => {
            let db = Lease::new(db, redis, config, leases.clone());
            boxed(cache, db, NoRefill, launch, stats.clone(), per_process)
        }
        None => {
            let write_back = WriteBack {
                redis,
                stats: stats.clone(),
            };
            boxed(cache, db, write_back, launch, stats.clone(), per_process)
        }
    };
    Ok(Instance {
        service,
        queries,
        leases,
        stats,
        pool,
    })
}

fn boxed<C, D, R>(
    cache: C,
    db: D,
    refill: R,
    launch: Launch,
    stats: Stats,
    per_process: bool,
) -> BoxCloneService<i64, Option<Row>, Error>
where
    C: Service<i64, Response = Option<Row>, Error = Error, Future: Send + 'static>
        + Clone
        + Send
        + 'static,
    D: Service<i64, Response = Option<Row>, Error = Error, Future: Send + 'static>
        + Clone
        + Send
        + 'static,
    R: tower_backstop::refill::Refill<i64, Option<Row>, Key: Send> + Clone + Send + 'static,
{
    let layer = FallbackLayer::new(db)
        .accept(is_hit)
        .launch(launch)
        .stats(stats)
        .refill(refill);
    if per_process {
        BoxCloneService::new(layer.coalesce_by(|key: &i64| Some(*key)).layer(cache))
    } else {
        BoxCloneService::new(layer.layer(cache))
    }
}

/// What one [`stampede`] did.
#[derive(Clone, Debug, Default)]
pub struct Stampede {
    /// Database queries the instances sent for the key.
    pub queries: u64,
    /// Leases taken, across the instances.
    pub leases: u64,
    /// Requests that joined a call in flight in their instance (per-process
    /// coalescing), across the instances.
    pub joined: u64,
    /// Latency of every request that answered, in ms, sorted.
    pub latencies: Vec<f64>,
    /// Requests that failed or ran past the time bound.
    pub failed: usize,
}

impl Stampede {
    /// The `q`-quantile of the latencies (`q` in 0..=1), in ms; 0 if none answered.
    pub fn quantile(&self, q: f64) -> f64 {
        let v = &self.latencies;
        if v.is_empty() {
            return 0.0;
        }
        v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
    }
}

/// Expires `key` in Redis (and any lease on it) through `redis`, then sends `requests` concurrent
/// requests for it, spread in turn over `instances`, all released at once; each is
/// bounded by `time_bound`. Counts only what happened after the expiry.
pub async fn stampede(
    redis: &mut redis::aio::ConnectionManager,
    instances: &[Instance],
    key: i64,
    requests: usize,
    time_bound: Duration,
) -> Result<Stampede, Box<dyn std::error::Error>> {
    let _: () = redis::cmd("DEL")
        .arg(cache_key(key))
        .arg(format!("lease:{}", cache_key(key)))
        .query_async(redis)
        .await?;
    burst(instances, key, requests, time_bound).await
}

/// Sends `requests` concurrent requests for `key`, spread in turn over `instances`,
/// all released at once, each bounded by `time_bound`; counts what the database and
/// the leases did meanwhile. [`stampede`] without the expiry.
pub async fn burst(
    instances: &[Instance],
    key: i64,
    requests: usize,
    time_bound: Duration,
) -> Result<Stampede, Box<dyn std::error::Error>> {
    let queries_before: u64 = instances
        .iter()
        .map(|i| i.queries.started.load(Relaxed))
        .sum();
    let leases_before: u64 = instances.iter().map(|i| i.leases.taken.load(Relaxed)).sum();
    let joined = || -> u64 {
        instances
            .iter()
            .map(|i| i.stats.snapshot().coalesce_joined)
            .sum()
    };
    let joined_before = joined();
    let start = Arc::new(tokio::sync::Barrier::new(requests));
    let tasks: Vec<_> = (0..requests)
        .map(|n| {
            let svc = instances[n % instances.len()].service.clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let began = Instant::now();
                let answer = tokio::time::timeout(time_bound, svc.oneshot(key)).await;
                matches!(answer, Ok(Ok(Some(_)))).then(|| began.elapsed().as_secs_f64() * 1e3)
            })
        })
        .collect();
    let mut run = Stampede::default();
    for task in tasks {
        match task.await? {
            Some(ms) => run.latencies.push(ms),
            None => run.failed += 1,
        }
    }
    run.latencies.sort_by(f64::total_cmp);
    run.queries = instances
        .iter()
        .map(|i| i.queries.started.load(Relaxed))
        .sum::<u64>()
        - queries_before;
    run.joined = joined() - joined_before;
    run.leases = instances
        .iter()
        .map(|i| i.leases.taken.load(Relaxed))
        .sum::<u64>()
        - leases_before;
    Ok(run)
}
