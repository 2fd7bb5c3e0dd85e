//! A fleet of instances behind one cache and one database, simulated: the database's
//! load per launch policy, with coalescing off, per process, and with a lease.
//!
//! ```text
//! cargo run --release --features time --example fleet          # 100 instances, 2 s
//! cargo run --release --features time --example fleet -- 20 1  # 20 instances, 1 s
//! ```
//!
//! Every instance runs the real [`FallbackLayer`] in front of a simulated cache and
//! database, on tokio's paused clock, so a run is exact and repeatable. What a user
//! sizes the database by is printed, one row per policy and coalescing mode: queries
//! per second on average, the worst 10 ms window, and the worst 10 ms window in the
//! 50 ms after the hottest key expired.
//!
//! # Model
//!
//! - `INSTANCES` instances (default 100) at 1,000 requests/s each, round-robin, one
//!   arrival every 10 µs of modelled time across the fleet.
//! - Keys drawn from Zipf(10,000, s = 1): the hottest key gets about 10% of all
//!   requests. Every key is cached at the start, and a cached value lives `TTL_MS`
//!   (60 s); the keys' expiries are spread at random over the TTL, except the hottest
//!   key's, which expires 500 ms into the run.
//! - The cache answers in 0.5 ms, a value or a miss; the database in 5 ms. A miss's
//!   answer is written back (the layer's `refill`), landing 0.5 ms later.
//! - **Coalescing per process**: `coalesce_by(key)` on each instance's layer: one
//!   database call per key in flight per instance.
//! - **Lease** (the pattern of memcache leases, as `examples/redis-postgres` does with
//!   Redis): the first instance to miss a key takes a 100 ms lease on it (one cache
//!   round trip), queries, writes the value back and gives the lease up (the write
//!   landing 0.5 ms later; the layer's own refill is off, as in the example); the
//!   others poll the cache every 1 ms for up to 20 ms, then query themselves. A holder
//!   whose call is dropped gives the lease back. With per-process coalescing too.
//!
//! The services do not queue: a query takes 5 ms however many run at once. One tokio
//! millisecond stands for 10 µs of modelled time (`SCALE`), since tokio's timer counts
//! whole milliseconds; every number printed is in modelled time.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use rand::{rngs::StdRng, RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};
use tokio::time::{sleep, sleep_until, Instant};
use tower::{service_fn, util::BoxCloneService, Layer, ServiceExt};
use tower_backstop::{launch::Launch, refill::Write, FallbackLayer};

/// tokio milliseconds per modelled millisecond: one tokio millisecond is 10 µs.
const SCALE: u64 = 100;
const KEYS: usize = 10_000;
/// Modelled milliseconds.
const TTL_MS: u64 = 60_000;
const HOT_EXPIRY_MS: u64 = 500;
const LEASE_MS: u64 = 100;
const LEASE_PATIENCE_MS: u64 = 20;
/// Width of the windows the peaks are read over, modelled ms.
const WINDOW_MS: u64 = 10;

/// A modelled duration in tokio time: `tenths` tenths of a modelled millisecond.
fn ticks(tenths: u64) -> Duration {
    Duration::from_millis(tenths * SCALE / 10)
}

/// The cache's and the database's answer times, in tenths of a modelled ms.
const CACHE: u64 = 5;
const DATABASE: u64 = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Coalescing {
    Off,
    PerProcess,
    Lease,
}

/// The shared cache and the database's tally.
struct World {
    origin: Instant,
    /// Key → when its value expires (tokio time).
    cache: Mutex<HashMap<u64, Instant>>,
    /// Key → when its lease runs out.
    leases: Mutex<HashMap<u64, Instant>>,
    /// Queries started per `WINDOW_MS` window.
    queries: Mutex<Vec<u64>>,
}

impl World {
    fn new(rng: &mut StdRng) -> Arc<World> {
        let origin = Instant::now();
        let ttl = ticks(TTL_MS * 10);
        let cache = (1..=KEYS as u64)
            .map(|key| {
                let left = match key {
                    1 => ticks(HOT_EXPIRY_MS * 10),
                    _ => ticks(rng.random_range(1..TTL_MS * 10)),
                };
                (key, origin + left.min(ttl))
            })
            .collect();
        Arc::new(World {
            origin,
            cache: Mutex::new(cache),
            leases: Mutex::new(HashMap::new()),
            queries: Mutex::new(Vec::new()),
        })
    }

    fn cached(&self, key: u64) -> bool {
        let now = Instant::now();
        self.cache
            .lock()
            .unwrap()
            .get(&key)
            .is_some_and(|at| *at > now)
    }

    fn write_back(self: &Arc<Self>, key: u64) {
        let world = self.clone();
        tokio::spawn(async move {
            sleep(ticks(CACHE)).await;
            let expires = Instant::now() + ticks(TTL_MS * 10);
            world.cache.lock().unwrap().insert(key, expires);
        });
    }

    async fn query(&self) {
        let window = (Instant::now() - self.origin).as_millis() as u64 / (WINDOW_MS * SCALE);
        {
            let mut queries = self.queries.lock().unwrap();
            if queries.len() <= window as usize {
                queries.resize(window as usize + 1, 0);
            }
            queries[window as usize] += 1;
        }
        sleep(ticks(DATABASE)).await;
    }

    /// The lease holder's write-back: the value, then the lease given up, as one
    /// compare-and-set landing one cache round trip later.
    fn write_back_and_release(self: &Arc<Self>, key: u64) {
        let world = self.clone();
        tokio::spawn(async move {
            sleep(ticks(CACHE)).await;
            let expires = Instant::now() + ticks(TTL_MS * 10);
            world.cache.lock().unwrap().insert(key, expires);
            world.leases.lock().unwrap().remove(&key);
        });
    }

    /// `SET lease:key NX PX LEASE_MS`, one cache round trip.
    async fn take_lease(&self, key: u64) -> bool {
        sleep(ticks(CACHE)).await;
        let now = Instant::now();
        let mut leases = self.leases.lock().unwrap();
        match leases.get(&key) {
            Some(until) if *until > now => false,
            _ => {
                leases.insert(key, now + ticks(LEASE_MS * 10));
                true
            }
        }
    }
}

type Svc = BoxCloneService<u64, Option<u64>, Infallible>;

/// A lease taken and not yet handed on: dropped with its call, it gives the lease up.
struct Held {
    world: Arc<World>,
    key: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.world.leases.lock().unwrap().remove(&self.key);
    }
}

/// One instance's stack: the cache, with the layer in front of the database.
fn instance(world: &Arc<World>, launch: Launch, coalescing: Coalescing) -> Svc {
    let w = world.clone();
    let cache = service_fn(move |key: u64| {
        let w = w.clone();
        async move {
            sleep(ticks(CACHE)).await;
            Ok::<_, Infallible>(w.cached(key).then_some(key))
        }
    });
    let w = world.clone();
    let lease = coalescing == Coalescing::Lease;
    let database = service_fn(move |key: u64| {
        let w = w.clone();
        async move {
            if !lease {
                w.query().await;
                return Ok::<_, Infallible>(Some(key));
            }
            if w.take_lease(key).await {
                let held = Held {
                    world: w.clone(),
                    key,
                };
                w.query().await;
                std::mem::forget(held);
                w.write_back_and_release(key);
                return Ok(Some(key));
            }
            // Another instance holds the lease: wait for its write-back a while.
            let deadline = Instant::now() + ticks(LEASE_PATIENCE_MS * 10);
            while Instant::now() < deadline {
                sleep(ticks(10)).await;
                if w.cached(key) {
                    return Ok(Some(key));
                }
            }
            w.query().await;
            Ok(Some(key))
        }
    });
    let w = world.clone();
    let refill = move |key: u64, _: &Option<u64>| {
        // With the lease, its holder writes back.
        if lease {
            return Ok::<_, Infallible>(Write::Skipped);
        }
        w.write_back(key);
        Ok(Write::Started)
    };
    let layer = FallbackLayer::new(database)
        .accept(|r: &Result<Option<u64>, Infallible>| matches!(r, Ok(Some(_))))
        .launch(launch)
        .refill(refill);
    match coalescing {
        Coalescing::Off => BoxCloneService::new(layer.layer(cache)),
        Coalescing::PerProcess | Coalescing::Lease => {
            BoxCloneService::new(layer.coalesce_by(|key: &u64| Some(*key)).layer(cache))
        }
    }
}

struct Row {
    mean: f64,
    peak: u64,
    after_expiry: u64,
}

async fn run(instances: usize, seconds: u64, launch: Launch, coalescing: Coalescing) -> Row {
    let mut rng = StdRng::seed_from_u64(0x00F1_EE75);
    let world = World::new(&mut rng);
    let stacks: Vec<Svc> = (0..instances)
        .map(|_| instance(&world, launch.clone(), coalescing))
        .collect();
    let zipf = Zipf::new(KEYS as f64, 1.0).expect("valid Zipf parameters");
    // One arrival per tokio millisecond (10 µs): 100,000 requests/s across the fleet.
    let arrivals = seconds * 1_000 * SCALE;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..arrivals {
        sleep_until(world.origin + Duration::from_millis(i)).await;
        let key = zipf.sample(&mut rng) as u64;
        let svc = stacks[i as usize % instances].clone();
        tasks.spawn(svc.oneshot(key));
        // Reap what finished, so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}

    let queries = world.queries.lock().unwrap();
    let per_second = 1_000 / WINDOW_MS;
    let total: u64 = queries.iter().sum();
    let expiry = (HOT_EXPIRY_MS / WINDOW_MS) as usize;
    Row {
        mean: total as f64 / seconds as f64,
        peak: queries.iter().max().copied().unwrap_or(0) * per_second,
        after_expiry: queries
            .iter()
            .skip(expiry)
            .take(5)
            .max()
            .copied()
            .unwrap_or(0)
            * per_second,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let instances: usize = args.next().map_or(100, |a| a.parse().expect("INSTANCES"));
    let seconds: u64 = args.next().map_or(2, |a| a.parse().expect("SECONDS"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    println!(
        "{instances} instances × 1,000 requests/s for {seconds} s, Zipf(10,000, 1) keys, \
         60 s TTL, the hottest key expiring at {HOT_EXPIRY_MS} ms; database queries per second\n"
    );
    println!("| policy | coalescing | mean | peak (10 ms) | peak after the hot key expired |");
    println!("|---|---|---:|---:|---:|");
    let policies = [
        ("Sequential", Launch::Sequential),
        ("Concurrent", Launch::Concurrent),
        ("Delayed(1 ms)", Launch::Delayed(ticks(10))),
    ];
    for (name, launch) in policies {
        for coalescing in [Coalescing::Off, Coalescing::PerProcess, Coalescing::Lease] {
            let row = rt.block_on(run(instances, seconds, launch.clone(), coalescing));
            let mode = match coalescing {
                Coalescing::Off => "off",
                Coalescing::PerProcess => "per process",
                Coalescing::Lease => "lease",
            };
            println!(
                "| {name} | {mode} | {:.0} | {} | {} |",
                row.mean, row.peak, row.after_expiry
            );
        }
    }
}
