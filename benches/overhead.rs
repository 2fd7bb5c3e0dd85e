//! Per-request overhead of the `Fallback` middleware, next to hand-written code doing the
//! same work and next to the alternatives users choose between, measured in one run.
//!
//! Two paths, one criterion group each:
//!
//! - `hit`: the primary answers `Ok(Some(v))`, the predicate accepts it, the fallback is
//!   dropped (or never started);
//! - `miss`: the primary answers `Ok(None)`, the predicate rejects it, and the fallback's
//!   `Ok(Some(v))` is served.
//!
//! Both services answer with `std::future::Ready`, and every future is polled by hand
//! with a no-op waker: there is no executor in the measured loop, so the differences
//! between rows are the middleware's own cost. A current-thread tokio runtime with time
//! enabled is *entered* (not run) for the whole process, because the policies and
//! alternatives that arm a timer (`Delayed`, `Adaptive`, both hedges) create
//! `tokio::time::Sleep`s, which need a runtime context. Every row runs in that same
//! context, floors included; none of them needs a runtime to drive it (nothing is
//! spawned, no timer fires), so nothing is measured with `block_on` or `to_async`.
//!
//! In each group:
//!
//! - `floor` is the same work written by hand with no middleware: clone the request,
//!   ready and call the fallback up front, ready and call and poll the primary, drop the
//!   fallback's future on a hit or poll it on a miss. Every ratio is to this row.
//!   `floor_sequential` is the hand-written sequential version (the fallback is readied
//!   and called only after a rejection): the floor for `Sequential` and the sequential
//!   alternatives.
//! - one row per launch policy of this crate, and `Concurrent` with a budget, with an
//!   outcome hook, and with `Stats`;
//! - the alternatives: `tower-fallback` (sequential), `tower-resilience`'s fallback
//!   (sequential) and hedge, and `tower::hedge`. The two hedges re-send the request to the
//!   *same* service and serve whichever answer comes first, without judging it: they
//!   cannot serve a rejected answer from another service, so they only have a `hit` row
//!   (the primary answers, the hedge is armed and never fires).
//! - `realistic_*`: the same comparison where the services do a little real work, as a
//!   real stack does: the request is a `String` built by the caller, the fallback is a
//!   client handle holding an `Arc` (cloned by the layer for each request, as tower's
//!   rules require), and both services hash the key. `realistic_floor` is its floor.
//!
//! Before each row is timed, its answer is checked, and its heap allocations are counted
//! over many requests by a counting global allocator (outside the timed loop). At the end
//! the run prints a markdown table: median time per request, ratio to the floor, and
//! allocations per request, for both paths (read back from criterion's `estimates.json`
//! files written by this run).
//!
//! Run with `cargo bench --bench overhead --all-features` (about 2.5 minutes);
//! `--all-features` adds the `Adaptive` and budget rows.

use criterion::{measurement::WallTime, BenchmarkGroup, Criterion};
use futures_util::task::noop_waker_ref;
use std::{
    convert::Infallible,
    fmt::Debug,
    fs,
    future::{ready, Future, Ready},
    hint::black_box,
    path::{Path, PathBuf},
    pin::pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};
use tower::{Layer, Service};
use tower_backstop::{
    accept::Accept,
    launch::Launch,
    outcome::{Outcome, Stats},
    FallbackLayer,
};

type Answer = Result<Option<u64>, Infallible>;

/// Added by the fallback to its answers, so the two services' answers differ.
const FROM_FALLBACK: u64 = 1 << 32;

/// A delay that never runs out while a request is served here: the primary always
/// answers on its first poll.
const NEVER: Duration = Duration::from_secs(1);

/// Requests served per row while allocations are counted.
const COUNTED: usize = 10_000;

// ---- the counting allocator ----

#[path = "../tests/support/counting_alloc.rs"]
mod counting_alloc;

/// Allocations this thread made while `f` ran.
fn allocations_in(f: impl FnOnce()) -> usize {
    counting_alloc::allocations_in(f).0
}

// ---- the trivial services ----

/// The primary: a cache that always hits (`HIT = true`) or always misses.
#[derive(Clone, Copy, Debug)]
struct Cache<const HIT: bool>;

impl<const HIT: bool> Service<u64> for Cache<HIT> {
    type Response = Option<u64>;
    type Error = Infallible;
    type Future = Ready<Answer>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u64) -> Self::Future {
        ready(Ok(HIT.then_some(key)))
    }
}

/// The fallback: a database that always has the row.
#[derive(Clone, Copy, Debug)]
struct Db;

impl Service<u64> for Db {
    type Response = Option<u64>;
    type Error = Infallible;
    type Future = Ready<Answer>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u64) -> Self::Future {
        ready(Ok(Some(key | FROM_FALLBACK)))
    }
}

// ---- the realistic services ----

/// FNV-1a: the "real work" both realistic services do with the key.
fn digest(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) >> 32
}

/// A cache keyed by strings that always hits (`HIT = true`) or always misses.
#[derive(Clone, Copy, Debug)]
struct KvCache<const HIT: bool>;

impl<const HIT: bool> Service<String> for KvCache<HIT> {
    type Response = Option<u64>;
    type Error = Infallible;
    type Future = Ready<Answer>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: String) -> Self::Future {
        ready(Ok(HIT.then(|| digest(&key))))
    }
}

/// A database client: a cheap handle to a shared pool, as real clients are. Cloning it
/// bumps a reference count.
#[derive(Clone, Debug)]
struct Pool {
    shared: Arc<PoolShared>,
}

#[derive(Debug)]
struct PoolShared {
    queries: AtomicU64,
}

impl Pool {
    fn new() -> Self {
        Pool {
            shared: Arc::new(PoolShared {
                queries: AtomicU64::new(0),
            }),
        }
    }
}

impl Service<String> for Pool {
    type Response = Option<u64>;
    type Error = Infallible;
    type Future = Ready<Answer>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: String) -> Self::Future {
        self.shared.queries.fetch_add(1, Ordering::Relaxed);
        ready(Ok(Some(digest(&key) | FROM_FALLBACK)))
    }
}

/// The realistic request, built by the caller for each request.
fn realistic_request() -> String {
    String::from(black_box("user:000042"))
}

// ---- predicates ----

/// Accepts only a cache hit. A plain `fn` item so that the floor and every middleware
/// variant share one predicate (a closure literal would give each its own type).
fn is_hit(r: &Answer) -> bool {
    matches!(r, Ok(Some(_)))
}

/// `tower-fallback`'s policy says when to *use* the fallback, and sees the primary's
/// error already boxed.
fn tower_fallback_rejects(r: &Result<Option<u64>, tower_fallback::BoxedError>) -> bool {
    !matches!(r, Ok(Some(_)))
}

/// `tower::hedge`: hedge every request.
#[derive(Clone, Copy, Debug)]
struct HedgeAll;

impl tower::hedge::Policy<u64> for HedgeAll {
    fn clone_request(&self, req: &u64) -> Option<u64> {
        Some(*req)
    }

    fn can_retry(&self, _: &u64) -> bool {
        true
    }
}

// ---- serving one request ----

fn expect_ready<T>(poll: Poll<T>) -> T {
    match poll {
        Poll::Ready(t) => t,
        Poll::Pending => unreachable!("every service here answers on the first poll"),
    }
}

/// Serves one request through any service, the way a caller does: ready, call, poll.
#[inline(always)]
fn drive<S, R>(svc: &mut S, req: R) -> Result<Option<u64>, S::Error>
where
    S: Service<R, Response = Option<u64>>,
    S::Error: Debug,
{
    let mut cx = Context::from_waker(noop_waker_ref());
    expect_ready(svc.poll_ready(&mut cx)).expect("ready");
    let fut = pin!(svc.call(req));
    expect_ready(fut.poll(&mut cx))
}

/// The same work as the middleware under `Launch::Concurrent`, written out by hand.
#[inline(always)]
fn floor_call<P, F, A, R>(primary: &mut P, fallback: &mut F, accept: &A, req: R) -> Answer
where
    P: Service<R, Response = Option<u64>, Error = Infallible>,
    F: Service<R, Response = Option<u64>, Error = Infallible>,
    A: Accept<Option<u64>, Infallible>,
    R: Clone,
{
    let mut cx = Context::from_waker(noop_waker_ref());
    expect_ready(primary.poll_ready(&mut cx)).unwrap();
    let fallback_req = req.clone();
    let primary_fut = pin!(primary.call(req));
    expect_ready(fallback.poll_ready(&mut cx)).unwrap();
    let fallback_fut = fallback.call(fallback_req);

    let result = expect_ready(primary_fut.poll(&mut cx));
    if accept.accept(&result) {
        drop(fallback_fut);
        return result;
    }
    expect_ready(pin!(fallback_fut).poll(&mut cx))
}

/// The same work as the middleware under `Launch::Sequential`, written out by hand.
#[inline(always)]
fn floor_sequential_call<P, F, A, R>(
    primary: &mut P,
    fallback: &mut F,
    accept: &A,
    req: R,
) -> Answer
where
    P: Service<R, Response = Option<u64>, Error = Infallible>,
    F: Service<R, Response = Option<u64>, Error = Infallible>,
    A: Accept<Option<u64>, Infallible>,
    R: Clone,
{
    let mut cx = Context::from_waker(noop_waker_ref());
    expect_ready(primary.poll_ready(&mut cx)).unwrap();
    let fallback_req = req.clone();
    let result = expect_ready(pin!(primary.call(req)).poll(&mut cx));
    if accept.accept(&result) {
        return result;
    }
    expect_ready(fallback.poll_ready(&mut cx)).unwrap();
    expect_ready(pin!(fallback.call(fallback_req)).poll(&mut cx))
}

// ---- rows ----

/// One timed row: what it is, and what was measured before timing it.
struct Row {
    path: &'static str,
    id: &'static str,
    floor: &'static str,
    allocations: f64,
}

/// One group being filled, and the rows registered so far.
struct Bench<'a, 'c> {
    group: BenchmarkGroup<'c, WallTime>,
    path: &'static str,
    rows: &'a mut Vec<Row>,
}

impl Bench<'_, '_> {
    /// Checks one row's answer, counts its allocations per request, then times it.
    fn row<R, E: Debug>(
        &mut self,
        id: &'static str,
        floor: &'static str,
        request: impl Fn() -> R,
        expected: Option<u64>,
        mut serve: impl FnMut(R) -> Result<Option<u64>, E>,
    ) {
        for _ in 0..100 {
            let answer = serve(request()).expect("no row fails");
            assert_eq!(answer, expected, "{}/{id} answers wrongly", self.path);
        }
        let allocations = allocations_in(|| {
            for _ in 0..COUNTED {
                black_box(serve(request()).ok());
            }
        });
        self.rows.push(Row {
            path: self.path,
            id,
            floor,
            allocations: allocations as f64 / COUNTED as f64,
        });
        self.group
            .bench_function(id, |b| b.iter(|| serve(request())));
    }
}

/// Every row on the trivial services, for one path.
fn trivial<const HIT: bool>(b: &mut Bench<'_, '_>) {
    let key = || black_box(7_u64);
    let expected = Some(if HIT { 7 } else { 7 | FROM_FALLBACK });
    let layer = || FallbackLayer::new(Db).accept(is_hit);

    let (mut cache, mut db) = (Cache::<HIT>, Db);
    b.row("floor", "floor", key, expected, |k| {
        floor_call(&mut cache, &mut db, &is_hit, k)
    });
    b.row("floor_sequential", "floor", key, expected, |k| {
        floor_sequential_call(&mut cache, &mut db, &is_hit, k)
    });

    let mut svc = layer().layer(Cache::<HIT>);
    b.row("concurrent", "floor", key, expected, |k| drive(&mut svc, k));

    let mut svc = layer().launch(Launch::Sequential).layer(Cache::<HIT>);
    b.row("sequential", "floor", key, expected, |k| drive(&mut svc, k));

    #[cfg(feature = "time")]
    {
        let mut svc = layer().launch(Launch::Delayed(NEVER)).layer(Cache::<HIT>);
        b.row("delayed", "floor", key, expected, |k| drive(&mut svc, k));
    }

    #[cfg(feature = "adaptive")]
    {
        use tower_backstop::launch::Adaptive;
        let adaptive = Adaptive::new(0.9, NEVER);
        let mut svc = layer()
            .launch(Launch::Adaptive(adaptive))
            .layer(Cache::<HIT>);
        b.row("adaptive", "floor", key, expected, |k| drive(&mut svc, k));
    }

    #[cfg(feature = "budget")]
    {
        use tower::retry::budget::TpsBudget;
        let mut svc = layer().budget(TpsBudget::default()).layer(Cache::<HIT>);
        b.row("concurrent_budget", "floor", key, expected, |k| {
            drive(&mut svc, k)
        });
    }

    let mut svc = layer().on_outcome(|_: &Outcome| ()).layer(Cache::<HIT>);
    b.row("concurrent_hook", "floor", key, expected, |k| {
        drive(&mut svc, k)
    });

    let stats = Stats::new();
    let mut svc = layer().stats(stats.clone()).layer(Cache::<HIT>);
    b.row("concurrent_stats", "floor", key, expected, |k| {
        drive(&mut svc, k)
    });
    assert!(stats.snapshot().requests > 0, "stats were counted");

    // tower-fallback 0.2 is built on tower 0.4, whose `Service` is the same
    // `tower_service::Service` as tower 0.5's: it wraps these services unchanged. Its
    // error type is a `Box<dyn Error>`: an `Infallible` error never gets boxed here.
    let mut svc =
        tower_fallback::Fallback::new_with_policy(Cache::<HIT>, Db, tower_fallback_rejects);
    b.row("tower_fallback", "floor", key, expected, |k| {
        drive(&mut svc, k)
    });

    let mut svc =
        tower_resilience::fallback::FallbackLayer::<u64, Option<u64>, Infallible>::tower_service(
            Db,
        )
        .handle_response(|r: &Option<u64>| r.is_none())
        .layer(Cache::<HIT>);
    b.row("resilience_fallback", "floor", key, expected, |k| {
        drive(&mut svc, k)
    });

    if HIT {
        let mut svc = tower_resilience::hedge::HedgeLayer::builder()
            .delay(NEVER)
            .max_hedged_attempts(2)
            .build()
            .layer(Cache::<HIT>);
        b.row("resilience_hedge", "floor", key, expected, |k| {
            drive(&mut svc, k)
        });

        // Warmed up, so it hedges every request: the recorded latencies put the hedge
        // delay (its p90) at 1 s, and the histogram does not rotate during the run.
        let mut svc = tower::hedge::Hedge::new_with_mock_latencies::<u64>(
            Cache::<HIT>,
            HedgeAll,
            1,
            0.9,
            Duration::from_secs(3600),
            &[NEVER.as_millis() as u64; 10],
        );
        b.row("tower_hedge", "floor", key, expected, |k| {
            drive(&mut svc, k)
        });
    }
}

/// The realistic rows, for one path.
fn realistic<const HIT: bool>(b: &mut Bench<'_, '_>) {
    let key = digest("user:000042");
    let expected = Some(if HIT { key } else { key | FROM_FALLBACK });
    let floor = "realistic_floor";
    let layer = |pool: &Pool| FallbackLayer::new(pool.clone()).accept(is_hit);

    let (mut cache, mut pool) = (KvCache::<HIT>, Pool::new());
    b.row(floor, floor, realistic_request, expected, |k| {
        floor_call(&mut cache, &mut pool, &is_hit, k)
    });

    let mut svc = layer(&pool).layer(KvCache::<HIT>);
    b.row(
        "realistic_concurrent",
        floor,
        realistic_request,
        expected,
        |k| drive(&mut svc, k),
    );

    let mut svc = layer(&pool)
        .launch(Launch::Sequential)
        .layer(KvCache::<HIT>);
    b.row(
        "realistic_sequential",
        floor,
        realistic_request,
        expected,
        |k| drive(&mut svc, k),
    );

    let mut svc = tower_fallback::Fallback::new_with_policy(
        KvCache::<HIT>,
        pool.clone(),
        tower_fallback_rejects,
    );
    b.row(
        "realistic_tower_fallback",
        floor,
        realistic_request,
        expected,
        |k| drive(&mut svc, k),
    );
}

/// What each row is, for the final table.
fn describe(id: &str) -> &'static str {
    match id {
        "floor" => "hand-written: fallback called up front, dropped on a hit",
        "floor_sequential" => "hand-written: fallback called only after a rejection",
        "concurrent" => "`Launch::Concurrent` (the default)",
        "sequential" => "`Launch::Sequential`",
        "delayed" => "`Launch::Delayed(1 s)`",
        "adaptive" => "`Launch::Adaptive` (p90, 1 s until estimated)",
        "concurrent_budget" => "Concurrent + `.budget(TpsBudget::default())`",
        // A `|` inside a markdown table cell must be escaped, code span or not.
        "concurrent_hook" => "Concurrent + `.on_outcome(\\|_\\| ())`",
        "concurrent_stats" => "Concurrent + `.stats(stats)`",
        "tower_fallback" => "`tower-fallback` 0.2 (sequential)",
        "resilience_fallback" => {
            "`tower-resilience` 0.13 fallback, `tower_service` backup (sequential)"
        }
        "resilience_hedge" => "`tower-resilience` 0.13 hedge, 1 s delay, 2 attempts (hit only)",
        "tower_hedge" => "`tower::hedge::Hedge`, p90 = 1 s (hit only)",
        "realistic_floor" => "realistic: hand-written floor",
        "realistic_concurrent" => "realistic: `Launch::Concurrent`",
        "realistic_sequential" => "realistic: `Launch::Sequential`",
        "realistic_tower_fallback" => "realistic: `tower-fallback` 0.2",
        _ => "",
    }
}

// ---- reading criterion's results back ----

/// Where criterion writes its results; set explicitly so that this file reads the same
/// place: `$CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`, else the `criterion`
/// folder of the target directory this bench was built in.
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return home.into();
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return Path::new(&target).join("criterion");
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(|t| t.join("criterion")))
        .unwrap_or_else(|| "target/criterion".into())
}

/// The median time per iteration, in nanoseconds, of a row timed by this run.
fn median_ns(dir: &Path, row: &Row, since: SystemTime) -> Option<f64> {
    let file = dir.join(row.path).join(row.id).join("new/estimates.json");
    let fresh = fs::metadata(&file).ok()?.modified().ok()? >= since;
    if !fresh {
        return None;
    }
    let json = fs::read_to_string(file).ok()?;
    let median = &json[json.find("\"median\"")?..];
    let value = &median[median.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = value.find([',', '}'])?;
    value[..end].trim().parse().ok()
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn print_allocations(rows: &[Row]) {
    println!("\n| variant | path | allocations/request |\n|---|---|---|");
    for row in rows {
        println!("| `{}` | {} | {:.2} |", row.id, row.path, row.allocations);
    }
}

fn print_table(rows: &[Row], dir: &Path, since: SystemTime) {
    let timed = |path: &str, id: &str| {
        let row = rows.iter().find(|r| r.path == path && r.id == id)?;
        Some((row, median_ns(dir, row, since)))
    };
    let cell = |path: &str, id: &str, floor: &str| match timed(path, id) {
        None => "— | — | —".to_owned(),
        Some((row, ns)) => {
            let floor_ns = timed(path, floor).and_then(|(_, ns)| ns);
            let time = ns.map_or("not timed".into(), |ns| format!("{ns:.2} ns"));
            let ratio = match (ns, floor_ns) {
                (Some(ns), Some(f)) => format!("{:.2}×", ns / f),
                _ => "—".into(),
            };
            format!("{time} | {ratio} | {:.2}", row.allocations)
        }
    };
    println!(
        "\n| variant | does | hit: time | hit: × floor | hit: allocs | \
         miss: time | miss: × floor | miss: allocs |\n|---|---|---|---|---|---|---|---|"
    );
    let mut seen: Vec<&str> = Vec::new();
    for row in rows {
        if seen.contains(&row.id) {
            continue;
        }
        seen.push(row.id);
        println!(
            "| `{}` | {} | {} | {} |",
            row.id,
            describe(row.id),
            cell("hit", row.id, row.floor),
            cell("miss", row.id, row.floor),
        );
    }
}

fn main() {
    let started = SystemTime::now();
    let load_before = load_average();
    let dir = criterion_dir();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args()
        .output_directory(&dir);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    let _entered = rt.enter();

    let mut rows = Vec::new();
    for path in ["hit", "miss"] {
        let mut b = Bench {
            group: c.benchmark_group(path),
            path,
            rows: &mut rows,
        };
        if path == "hit" {
            trivial::<true>(&mut b);
            realistic::<true>(&mut b);
        } else {
            trivial::<false>(&mut b);
            realistic::<false>(&mut b);
        }
        b.group.finish();
    }
    c.final_summary();

    println!(
        "\nmachine: {} cores, {}; load average (1, 5, 15 min) {} before the run, {} after",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        load_before,
        load_average(),
    );
    print_allocations(&rows);
    print_table(&rows, &dir, started);
}
