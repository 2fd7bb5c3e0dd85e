//! A deterministic latency study of the launch policies: a cache in front of a database.
//!
//! Run it with:
//!
//! ```text
//! cargo run --release --all-features --example latency_study
//! ```
//!
//! It sends the same 100,000 simulated requests through the real [`Fallback`] service
//! under each launch policy, on tokio's paused clock, and prints one markdown table per
//! scenario: p50, p99 and p99.9 of the served latency, and the extra load on the
//! database, next to the oracle. It also writes a plot, to `target/latency-cdf.svg`
//! (`-- --plot PATH` for another place: `-- --plot docs/latency-cdf.svg` refreshes the
//! repository's copy). The results are written up in `docs/latency-study.md`.
//!
//! # Model
//!
//! - The cache (primary) answers a hit or a miss; only hits are accepted.
//! - The database (fallback) always answers.
//! - Every request's cache latency, cache outcome and database latency is drawn up front
//!   from a seeded generator, so every policy sees the very same requests and two runs
//!   print the very same numbers.
//! - Requests arrive as a Poisson process (50,000 per modelled second) and run
//!   concurrently, at most `MAX_IN_FLIGHT` at once, so the adaptive estimate and the
//!   budget see requests interleave as they would in a server.
//! - The services do not queue: a database call takes its drawn latency however many
//!   run at once. Extra load is counted, but costs no latency here.
//!
//! # Scaling
//!
//! tokio's timer counts whole milliseconds, too coarse for a cache that answers in about
//! one. So one tokio millisecond stands for **10 µs** of modelled time: every modelled
//! latency is multiplied by 100 and rounded to a whole tokio millisecond. All the
//! numbers printed are in modelled time. Rates and windows in tokio time are 100 times
//! longer: `TpsBudget` reads tokio's clock (`tokio::time::Instant`), so on the paused
//! clock its 10 s `ttl` covers 10 s of *tokio* time — 100 ms of modelled traffic, about
//! 5,000 requests — whatever the wall-clock run time.
//!
//! # What is measured, and how
//!
//! Everything is measured at the services, independently of the layer: the cache logs
//! when each request reached it, the database when each call started and whether it
//! completed (a drop guard tells a call dropped in flight), and every answer carries its
//! source, checked against the request's drawn outcome.

use plotters::prelude::*;
use rand::{rngs::StdRng, RngExt, SeedableRng};
use rand_distr::{Distribution, Exp, LogNormal, Pareto};
use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    sync::Semaphore,
    task::JoinSet,
    time::{sleep, sleep_until, Instant},
};
use tower::{retry::budget::TpsBudget, Service, ServiceExt};
use tower_backstop::{
    launch::{Adaptive, Launch},
    Fallback,
};

/// Requests per policy and scenario.
const REQUESTS: usize = 100_000;
/// tokio milliseconds per modelled millisecond (one tokio millisecond is 10 µs).
const SCALE: f64 = 100.0;
/// Mean gap between arrivals, in modelled milliseconds: 50,000 requests per second.
const MEAN_GAP_MS: f64 = 0.02;
/// The most requests in flight at once; an arrival past it waits for a slot.
const MAX_IN_FLIGHT: usize = 4_096;
/// The seed of each scenario's draws.
const SEED: u64 = 0x0BAC_5709;
/// Where the plot goes unless `--plot PATH` says otherwise.
const PLOT: &str = "target/latency-cdf.svg";

/// One request, drawn up front: latencies in tokio milliseconds.
#[derive(Clone, Copy, Debug)]
struct Draw {
    /// When the request arrives, from the start of the run.
    arrival: u64,
    cache: u64,
    hit: bool,
    db: u64,
}

/// A lognormal by its median (modelled ms) and the σ of its logarithm.
fn lognormal(median: f64, sigma: f64) -> LogNormal<f64> {
    LogNormal::new(median.ln(), sigma).expect("valid lognormal")
}

/// Modelled milliseconds to whole tokio milliseconds, at least one.
fn ticks(ms: f64) -> u64 {
    (ms * SCALE).round().max(1.0) as u64
}

/// Modelled milliseconds of a tick count.
fn ms(ticks: u64) -> f64 {
    ticks as f64 / SCALE
}

struct Scenario {
    title: &'static str,
    model: &'static str,
    draws: Arc<[Draw]>,
}

/// The database in both scenarios: lognormal around 5 ms, and 2% of calls in a
/// Pareto tail from 10 ms (shape 1.5), cut at one second.
fn database(rng: &mut StdRng) -> u64 {
    let ms = if rng.random_bool(0.02) {
        Pareto::new(10.0, 1.5).expect("valid pareto").sample(rng)
    } else {
        lognormal(5.0, 0.5).sample(rng)
    };
    ticks(ms.min(1_000.0))
}

/// Draws `REQUESTS` requests: `cache` gives the cache's (latency in ms, hit).
fn draw(seed: u64, cache: impl Fn(&mut StdRng) -> (f64, bool)) -> Arc<[Draw]> {
    let mut rng = StdRng::seed_from_u64(seed);
    let gap = Exp::new(1.0 / MEAN_GAP_MS).expect("valid exponential");
    let mut clock = 0.0;
    (0..REQUESTS)
        .map(|_| {
            clock += gap.sample(&mut rng);
            let (cache_ms, hit) = cache(&mut rng);
            Draw {
                arrival: (clock * SCALE).round() as u64,
                cache: ticks(cache_ms),
                hit,
                db: database(&mut rng),
            }
        })
        .collect()
}

/// (a) Misses are as fast as hits: 20% of requests miss, whatever their latency.
fn scenario_a() -> Scenario {
    let draws = draw(SEED, |rng| {
        let latency = if rng.random_bool(0.02) {
            lognormal(10.0, 0.5).sample(rng)
        } else {
            lognormal(1.0, 0.4).sample(rng)
        };
        (latency, !rng.random_bool(0.2))
    });
    Scenario {
        title: "(a) misses as fast as hits",
        model: "cache: 20% misses, independent of latency; latency lognormal (median 1 ms, \
                σ 0.4), 2% in a slow mode (lognormal, median 10 ms, σ 0.5). database: \
                lognormal (median 5 ms, σ 0.5), 2% in a Pareto tail (from 10 ms, shape 1.5, \
                cut at 1 s).",
        draws,
    }
}

/// (b) The cache's slow answers are mostly its rejections.
fn scenario_b() -> Scenario {
    let draws = draw(SEED + 1, |rng| {
        if rng.random_bool(0.2) {
            (lognormal(4.0, 0.5).sample(rng), false)
        } else if rng.random_bool(0.01) {
            (lognormal(10.0, 0.5).sample(rng), true)
        } else {
            (lognormal(0.8, 0.3).sample(rng), true)
        }
    });
    Scenario {
        title: "(b) slow answers are mostly misses",
        model: "cache: 20% misses, lognormal (median 4 ms, σ 0.5); hits lognormal (median \
                0.8 ms, σ 0.3), 1% of them in a slow mode (lognormal, median 10 ms, σ 0.5). \
                database: as in (a).",
        draws,
    }
}

/// Which service produced an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Cache,
    Database,
}

#[derive(Clone, Copy, Debug)]
struct Reply {
    from: Source,
    found: bool,
}

type Answer = Result<Reply, Infallible>;
type BoxFuture = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// What the services saw of one request, in tokio milliseconds from the run's start.
#[derive(Clone, Copy, Debug, Default)]
struct Log {
    called: Option<u64>,
    db_started: Option<u64>,
    db_completed: bool,
    /// The launch delay the request was planned with (`None`: sequential).
    delay: Option<u64>,
}

#[derive(Clone)]
struct Logs {
    start: Instant,
    logs: Arc<Mutex<Vec<Log>>>,
}

impl Logs {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn with(&self, i: usize, f: impl FnOnce(&mut Log)) {
        f(&mut self.logs.lock().expect("not poisoned")[i]);
    }
}

/// The cache: answers request `i` after its drawn latency, a hit or a miss.
#[derive(Clone)]
struct Cache {
    draws: Arc<[Draw]>,
    logs: Logs,
}

impl Service<usize> for Cache {
    type Response = Reply;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, i: usize) -> BoxFuture {
        let now = self.logs.now();
        self.logs.with(i, |log| log.called = Some(now));
        let Draw { cache, hit, .. } = self.draws[i];
        Box::pin(async move {
            sleep(Duration::from_millis(cache)).await;
            Ok(Reply {
                from: Source::Cache,
                found: hit,
            })
        })
    }
}

/// The database: answers request `i` after its drawn latency, and logs the call.
#[derive(Clone)]
struct Database {
    draws: Arc<[Draw]>,
    logs: Logs,
}

/// Marks the call completed if it was; a guard dropped first was dropped in flight.
struct Completion {
    logs: Logs,
    i: usize,
    done: bool,
}

impl Drop for Completion {
    fn drop(&mut self) {
        let done = self.done;
        self.logs.with(self.i, |log| log.db_completed = done);
    }
}

impl Service<usize> for Database {
    type Response = Reply;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, i: usize) -> BoxFuture {
        let now = self.logs.now();
        self.logs.with(i, |log| {
            assert!(log.db_started.is_none(), "one database call per request");
            log.db_started = Some(now);
        });
        let guard = Completion {
            logs: self.logs.clone(),
            i,
            done: false,
        };
        let latency = self.draws[i].db;
        Box::pin(async move {
            // Moved whole into the future (not just its field), so that it drops with it.
            let mut guard = guard;
            sleep(Duration::from_millis(latency)).await;
            guard.done = true;
            Ok(Reply {
                from: Source::Database,
                found: true,
            })
        })
    }
}

fn found(result: &Answer) -> bool {
    matches!(result, Ok(Reply { found: true, .. }))
}

#[derive(Clone, Copy, Debug)]
enum Policy {
    Sequential,
    Concurrent,
    /// A fixed delay at the cache's p90, read off the scenario's own draws.
    Delayed,
    Adaptive,
    AdaptiveBudget,
}

const POLICIES: [Policy; 5] = [
    Policy::Sequential,
    Policy::Concurrent,
    Policy::Delayed,
    Policy::Adaptive,
    Policy::AdaptiveBudget,
];

/// The adaptive policies' quantile and their delay before the first estimate.
const QUANTILE: f64 = 0.9;
const INITIAL_DELAY_MS: f64 = 2.0;
/// The budget: deposits live 10 s of tokio time (100 ms modelled, about 5,000
/// requests); one withdrawal per 10 deposits, and a reserve of 1 per tokio second.
const BUDGET_TTL: Duration = Duration::from_secs(10);
const BUDGET_MIN_PER_SEC: u32 = 1;
const BUDGET_PERCENT: f32 = 0.1;

/// What one policy did to one scenario's requests.
struct Run {
    /// Served latency per request, tokio milliseconds.
    served: Vec<u64>,
    logs: Vec<Log>,
    max_in_flight: usize,
}

/// A percentile by nearest rank, of sorted tick counts, in modelled ms.
fn percentile(sorted: &[u64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    ms(sorted[rank - 1])
}

/// Runs every request of `draws` through a `Fallback` configured for `policy`, on a
/// fresh paused-clock runtime.
fn run(draws: &Arc<[Draw]>, policy: Policy, delayed_at: u64) -> Run {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let logs = Logs {
            start: Instant::now(),
            logs: Arc::new(Mutex::new(vec![Log::default(); draws.len()])),
        };
        let cache = Cache {
            draws: draws.clone(),
            logs: logs.clone(),
        };
        let db = Database {
            draws: draws.clone(),
            logs: logs.clone(),
        };
        let adaptive = Adaptive::new(QUANTILE, Duration::from_millis(ticks(INITIAL_DELAY_MS)));
        let base = Fallback::new(cache, db).accept(found);
        let svc = match policy {
            Policy::Sequential => base.launch(Launch::Sequential),
            Policy::Concurrent => base.launch(Launch::Concurrent),
            Policy::Delayed => base.launch(Launch::Delayed(Duration::from_millis(delayed_at))),
            Policy::Adaptive => base.launch(Launch::Adaptive(adaptive.clone())),
            // Built inside the runtime: `TpsBudget` reads tokio's (paused) clock.
            Policy::AdaptiveBudget => {
                base.launch(Launch::Adaptive(adaptive.clone()))
                    .budget(TpsBudget::new(
                        BUDGET_TTL,
                        BUDGET_MIN_PER_SEC,
                        BUDGET_PERCENT,
                    ))
            }
        };
        // The delay each request is planned with, as the layer computes it in `call`.
        let planned = move || match policy {
            Policy::Sequential => None,
            Policy::Concurrent => Some(0),
            Policy::Delayed => Some(delayed_at),
            Policy::Adaptive | Policy::AdaptiveBudget => Some(
                // `delay` is rounded up to tokio's whole milliseconds already.
                adaptive.delay().as_millis() as u64,
            ),
        };

        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut served = vec![0; draws.len()];
        let mut max_in_flight = 0;
        let mut tasks = JoinSet::new();
        let mut collect = |(i, latency, reply): (usize, u64, Reply)| {
            let Draw { hit, .. } = draws[i];
            let expected = if hit { Source::Cache } else { Source::Database };
            assert_eq!(
                reply.from, expected,
                "request {i} served by the wrong branch"
            );
            served[i] = latency;
        };
        for (i, d) in draws.iter().enumerate() {
            sleep_until(logs.start + Duration::from_millis(d.arrival)).await;
            let slot = slots.clone().acquire_owned().await.expect("never closed");
            max_in_flight = max_in_flight.max(MAX_IN_FLIGHT - slots.available_permits());
            let svc = svc.clone();
            let (planned, logs) = (planned.clone(), logs.clone());
            tasks.spawn(async move {
                // Read in the same poll as `oneshot` calls the service, so that no other
                // request can move the adaptive estimate in between.
                logs.with(i, |log| log.delay = planned());
                let start = Instant::now();
                let Ok(reply) = svc.oneshot(i).await;
                drop(slot);
                (i, start.elapsed().as_millis() as u64, reply)
            });
            while let Some(done) = tasks.try_join_next() {
                collect(done.expect("request task"));
            }
        }
        while let Some(done) = tasks.join_next().await {
            collect(done.expect("request task"));
        }
        let logs = std::mem::take(&mut *logs.logs.lock().expect("not poisoned"));
        Run {
            served,
            logs,
            max_in_flight,
        }
    })
}

/// One row of a table.
struct Row {
    name: String,
    /// Sorted served latencies, tokio milliseconds.
    sorted: Vec<u64>,
    /// Database calls started for hits, as a fraction of requests.
    extra: f64,
    /// Of those, the fraction of requests whose wasted call ran to completion.
    extra_completed: f64,
    /// Misses whose database call started before the cache's answer, as a fraction of
    /// misses.
    early_misses: f64,
    /// Requests whose cache was still pending at their planned delay, as a fraction of
    /// requests: those the policy launches speculatively.
    due: f64,
    /// Of those, the ones whose database call did not start then: refused by the budget.
    refused: f64,
}

fn row(name: String, draws: &[Draw], run: &Run) -> Row {
    let n = draws.len() as f64;
    let misses = draws.iter().filter(|d| !d.hit).count() as f64;
    let (mut extra, mut extra_completed, mut early_misses) = (0, 0, 0);
    let (mut due, mut refused) = (0, 0);
    for (d, log) in draws.iter().zip(&run.logs) {
        let called = log.called.expect("every request reached the cache");
        let early = log.db_started.is_some_and(|s| s - called < d.cache);
        if d.hit && log.db_started.is_some() {
            extra += 1;
            extra_completed += usize::from(log.db_completed);
        }
        if !d.hit && early {
            early_misses += 1;
        }
        if log.delay.is_some_and(|delay| d.cache > delay) {
            due += 1;
            refused += usize::from(!early);
        }
    }
    let mut sorted = run.served.clone();
    sorted.sort_unstable();
    Row {
        name,
        sorted,
        extra: extra as f64 / n,
        extra_completed: extra_completed as f64 / n,
        early_misses: early_misses as f64 / misses,
        due: due as f64 / n,
        refused: refused as f64 / n,
    }
}

/// The best any launch policy can do for each request, knowing its outcome: a hit
/// costs the cache alone (the database never starts); a miss starts the database with
/// the cache and costs the slower of the two, since the layer serves the database's
/// answer only once the cache has said "miss".
fn oracle_ticks(d: &Draw) -> u64 {
    if d.hit {
        d.cache
    } else {
        d.cache.max(d.db)
    }
}

/// The oracle's row: see [`oracle_ticks`].
fn oracle(draws: &[Draw]) -> Row {
    let sorted = sorted(draws.iter().map(oracle_ticks));
    Row {
        name: "Oracle".into(),
        sorted,
        extra: 0.0,
        extra_completed: 0.0,
        early_misses: 1.0,
        due: 0.0,
        refused: 0.0,
    }
}

const QS: [f64; 3] = [0.5, 0.99, 0.999];

fn table(rows: &[Row]) -> String {
    let oracle = rows.last().expect("oracle row");
    let mut out = String::from(
        "| policy | p50 (ms) | p99 (ms) | p99.9 (ms) | p50 / p99 / p99.9 vs oracle \
         | extra database load | of it ran to completion | misses started early |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let p: Vec<f64> = QS.iter().map(|&q| percentile(&r.sorted, q)).collect();
        let vs: Vec<String> = QS
            .iter()
            .zip(&p)
            .map(|(&q, v)| format!("{:.2}x", v / percentile(&oracle.sorted, q)))
            .collect();
        out += &format!(
            "| {} | {:.2} | {:.2} | {:.2} | {} | {:.1}% | {:.1}% | {:.1}% |\n",
            r.name,
            p[0],
            p[1],
            p[2],
            vs.join(" / "),
            100.0 * r.extra,
            100.0 * r.extra_completed,
            100.0 * r.early_misses,
        );
    }
    out
}

/// The plot's y coordinate of quantile `q`: its "nines", -log10(1 - q).
fn nines(q: f64) -> f64 {
    -(1.0 - q).log10()
}

/// The plot's y axis starts at the median: below it every policy serves the same hits.
const PLOT_FROM: f64 = 0.5;

/// The plot's y coordinate: thousandths of a nine. (An integer axis, because plotters
/// formats custom tick marks only on integer axes.)
fn y_of(q: f64) -> i32 {
    (1_000.0 * nines(q)).round() as i32
}

/// Points of a CDF on the nines scale, from the median up: x in modelled ms.
fn cdf_points(sorted: &[u64]) -> Vec<(f64, i32)> {
    let n = sorted.len();
    let (bottom, top) = (nines(PLOT_FROM), nines((n as f64 - 1.0) / n as f64));
    let steps = 400;
    (0..=steps)
        .map(|k| {
            let y = bottom + (top - bottom) * k as f64 / steps as f64;
            let q = 1.0 - 10f64.powf(-y);
            let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
            (ms(sorted[rank - 1]), (1_000.0 * y).round() as i32)
        })
        .collect()
}

/// A label for a point of the nines axis: `p99.9`.
fn percentile_label(y: &i32) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-f64::from(*y) / 1_000.0));
    format!("p{}", (p * 100.0).round() / 100.0)
}

fn plot(
    scenarios: &[(&Scenario, Vec<Row>)],
    path: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(path, (1200, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, scenarios.len()));
    // Sequential, Concurrent, Delayed, Adaptive, Adaptive with a budget; the oracle is
    // drawn last, dashed, over Concurrent's wide line.
    let colors = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x94, 0x67, 0xbd),
    ];
    for (panel, (scenario, rows)) in panels.iter().zip(scenarios) {
        let lo = rows
            .iter()
            .map(|r| percentile(&r.sorted, PLOT_FROM))
            .fold(f64::MAX, f64::min);
        let hi = rows
            .iter()
            .map(|r| percentile(&r.sorted, 0.9999))
            .fold(0.0, f64::max);
        let y_keys = [0.5, 0.9, 0.99, 0.999, 0.9999].map(y_of).to_vec();
        let mut chart = ChartBuilder::on(panel)
            .caption(scenario.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (lo * 0.8..hi * 1.25).log_scale(),
                (y_of(PLOT_FROM)..y_of(0.9999)).with_key_points(y_keys),
            )?;
        chart
            .configure_mesh()
            .x_desc("served latency, ms (log scale)")
            .y_desc("percentile of requests")
            .y_label_formatter(&percentile_label)
            .x_label_formatter(&|x| format!("{x}"))
            .draw()?;
        let (policies, oracle) = rows.split_at(rows.len() - 1);
        // Delayed and the two Adaptive runs often coincide: drawn wide to thin, each
        // stays visible as a stripe along the others; Concurrent goes over them, the
        // oracle over it.
        let order = [(0, 2), (2, 6), (3, 3), (4, 1), (1, 5)];
        for (r, color, width) in order
            .into_iter()
            .filter(|&(i, _)| i < policies.len())
            .map(|(i, width)| (&policies[i], colors[i], width))
        {
            chart
                .draw_series(LineSeries::new(
                    cdf_points(&r.sorted),
                    color.stroke_width(width),
                ))?
                .label(r.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width))
                });
        }
        chart
            .draw_series(DashedLineSeries::new(
                cdf_points(&oracle[0].sorted),
                6,
                4,
                BLACK.stroke_width(2),
            ))?
            .label("Oracle")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
        // Lower right: below every CDF curve (a low percentile at a high latency), so
        // no line crosses the legend.
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = pico_args::Arguments::from_env();
    if args.contains(["-h", "--help"]) {
        println!("cargo run --release --all-features --example latency_study [-- --plot PATH]");
        println!("  --plot PATH   where the latency plot goes [default: {PLOT}]");
        return Ok(());
    }
    let plot_path: std::path::PathBuf = args
        .opt_value_from_str("--plot")?
        .unwrap_or_else(|| PLOT.into());
    let rest = args.finish();
    if let Some(arg) = rest.first() {
        return Err(format!("unknown argument {arg:?} (try --help)").into());
    }
    let wall = std::time::Instant::now();
    let scenarios = [scenario_a(), scenario_b()];
    let mut panels = Vec::new();
    for scenario in &scenarios {
        let draws = &scenario.draws;
        let delayed_at = sorted_quantile(draws.iter().map(|d| d.cache), 0.9);
        let hits = draws.iter().filter(|d| d.hit).count();
        let cache = |q| percentile(&sorted(draws.iter().map(|d| d.cache)), q);
        let db = |q| percentile(&sorted(draws.iter().map(|d| d.db)), q);
        println!("## Scenario {}\n", scenario.title);
        println!("{}\n", scenario.model);
        println!(
            "{} requests, {:.1}% hits. Cache p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms; \
             database p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms.\n",
            thousands(REQUESTS),
            100.0 * hits as f64 / draws.len() as f64,
            cache(0.5),
            cache(0.9),
            cache(0.99),
            db(0.5),
            db(0.99),
            db(0.999),
        );
        let mut rows = Vec::new();
        let mut notes = Vec::new();
        let mut max_in_flight = 0;
        for policy in POLICIES {
            let run = run(draws, policy, delayed_at);
            max_in_flight = max_in_flight.max(run.max_in_flight);
            let name = match policy {
                Policy::Sequential => "Sequential".into(),
                Policy::Concurrent => "Concurrent".into(),
                Policy::Delayed => format!("Delayed ({:.2} ms, the cache's p90)", ms(delayed_at)),
                Policy::Adaptive => "Adaptive (p90)".into(),
                Policy::AdaptiveBudget => "Adaptive (p90), 10% budget".into(),
            };
            let r = row(name, draws, &run);
            if matches!(policy, Policy::Concurrent) {
                let off = draws
                    .iter()
                    .zip(&run.served)
                    .filter(|&(d, &served)| served != oracle_ticks(d))
                    .count();
                notes.push(format!(
                    "- Concurrent: {off} requests served at a latency other than the oracle's."
                ));
            }
            if matches!(policy, Policy::Adaptive | Policy::AdaptiveBudget) {
                let delays = sorted(run.logs.iter().filter_map(|l| l.delay));
                notes.push(format!(
                    "- {}: the delay requests were planned with, p10 / p50 / p90: \
                     {:.2} / {:.2} / {:.2} ms. Cache still pending at its delay: {:.1}% of \
                     requests; of those, refused by the budget: {:.2}% of requests.",
                    r.name,
                    percentile(&delays, 0.1),
                    percentile(&delays, 0.5),
                    percentile(&delays, 0.9),
                    100.0 * r.due,
                    100.0 * r.refused,
                ));
            }
            rows.push(r);
        }
        rows.push(oracle(draws));
        println!("{}", table(&rows));
        for note in notes {
            println!("{note}");
        }
        let eager = sorted(draws.iter().map(|d| if d.hit { d.cache } else { d.db }));
        println!(
            "- Lower bound if a miss did not wait for the cache's verdict (outside the layer's \
             contract: the database's answer served as it arrives): p50 / p99 / p99.9 \
             {:.2} / {:.2} / {:.2} ms.",
            percentile(&eager, 0.5),
            percentile(&eager, 0.99),
            percentile(&eager, 0.999),
        );
        println!(
            "- At most {max_in_flight} requests were in flight at once (bound: {MAX_IN_FLIGHT}).\n"
        );
        panels.push((scenario, rows));
    }
    remote_cache::print();
    plot(&panels, &plot_path)?;
    eprintln!(
        "wrote {}; {} policies x {} scenarios x {REQUESTS} requests in {:.2} s",
        plot_path.display(),
        POLICIES.len(),
        panels.len(),
        wall.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Sorts tick counts.
fn sorted(ticks: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut v: Vec<u64> = ticks.collect();
    v.sort_unstable();
    v
}

/// A quantile of tick counts, in ticks.
fn sorted_quantile(ticks: impl Iterator<Item = u64>, q: f64) -> u64 {
    let v = sorted(ticks);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// `100000` as `100,000`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Scenario (c): a remote cache answering in hundreds of microseconds, at true scale.
///
/// Scenarios (a) and (b) scale time by 100 so that tokio's millisecond timer can stand
/// for a 1 ms cache, which hides the timer's own resolution. Here nothing is scaled:
/// the cache and the database answer at their drawn instant to the nanosecond (the
/// clock is advanced in 10 µs steps and the request polled after each, so neither waits
/// for a timer tick), while the launch delay runs on tokio's 1 ms ticks, as it does in
/// production. Requests run one at a time, arriving at random points between ticks.
mod remote_cache {
    use super::{lognormal, sorted_quantile, Policy, QUANTILE, SEED};
    use rand::{rngs::StdRng, RngExt, SeedableRng};
    use rand_distr::{Distribution, Exp};
    use std::{
        convert::Infallible,
        future::Future,
        pin::{pin, Pin},
        sync::{
            atomic::{AtomicUsize, Ordering::Relaxed},
            Arc,
        },
        task::{Context, Poll},
        time::Duration,
    };
    use tokio::time::{advance, Instant};
    use tower::{service_fn, ServiceExt};
    use tower_backstop::{
        launch::{Adaptive, Launch},
        Fallback,
    };

    pub(super) const REQUESTS: usize = 5_000;
    /// How far the clock moves between two polls of a request.
    const STEP: Duration = Duration::from_micros(10);

    #[derive(Clone, Copy)]
    struct Draw {
        /// Time since the previous request's answer.
        gap: Duration,
        cache: Duration,
        hit: bool,
        db: Duration,
    }

    /// cache: 20% misses; latency lognormal (median 300 µs, σ 0.3), 2% in a slow mode
    /// (lognormal, median 3 ms, σ 0.5). database: lognormal (median 5 ms, σ 0.5).
    fn draws() -> Vec<Draw> {
        let mut rng = StdRng::seed_from_u64(SEED + 2);
        let gap = Exp::new(1.0 / 0.2).expect("valid exponential");
        let ms = |ms: f64| Duration::from_secs_f64(ms / 1_000.0);
        (0..REQUESTS)
            .map(|_| {
                let cache = if rng.random_bool(0.02) {
                    lognormal(3.0, 0.5).sample(&mut rng)
                } else {
                    lognormal(0.3, 0.3).sample(&mut rng)
                };
                Draw {
                    gap: ms(gap.sample(&mut rng)),
                    cache: ms(cache),
                    hit: !rng.random_bool(0.2),
                    db: ms(lognormal(5.0, 0.5).sample(&mut rng)),
                }
            })
            .collect()
    }

    /// Ready once the clock reaches `at`; the driver polls it after every step.
    struct At<T>(Instant, T);

    impl<T: Copy + Unpin> Future for At<T> {
        type Output = Result<T, Infallible>;

        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
            if Instant::now() >= self.0 {
                Poll::Ready(Ok(self.1))
            } else {
                Poll::Pending
            }
        }
    }

    /// What one policy did: served latencies, database calls for hits, the final delay.
    struct Run {
        served: Vec<Duration>,
        extra: usize,
        estimate: Option<Duration>,
        delay: Option<Duration>,
    }

    fn run(draws: &Arc<[Draw]>, policy: Policy, delayed_at: Duration) -> Run {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let extra = Arc::new(AtomicUsize::new(0));
            let d = draws.clone();
            // `(hit, source is the cache)`.
            let cache =
                service_fn(move |i: usize| At(Instant::now() + d[i].cache, (d[i].hit, true)));
            let (d, calls) = (draws.clone(), extra.clone());
            let db = service_fn(move |i: usize| {
                if d[i].hit {
                    calls.fetch_add(1, Relaxed);
                }
                At(Instant::now() + d[i].db, (true, false))
            });
            let adaptive = Adaptive::new(QUANTILE, Duration::from_millis(2));
            let launch = match policy {
                Policy::Sequential => Launch::Sequential,
                Policy::Concurrent => Launch::Concurrent,
                Policy::Delayed => Launch::Delayed(delayed_at),
                _ => Launch::Adaptive(adaptive.clone()),
            };
            let svc = Fallback::new(cache, db)
                .accept(|r: &Result<(bool, bool), Infallible>| matches!(r, Ok((true, _))))
                .launch(launch);
            let mut served = Vec::with_capacity(draws.len());
            for (i, draw) in draws.iter().enumerate() {
                advance(draw.gap).await;
                let start = Instant::now();
                let mut fut = pin!(svc.clone().oneshot(i));
                // Bounded: every request is answered within a second of modelled time.
                let reply = loop {
                    let poll = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx)));
                    if let Poll::Ready(reply) = poll.await {
                        break reply;
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(1),
                        "request {i} hangs"
                    );
                    advance(STEP).await;
                };
                let Ok((_, from_cache)) = reply;
                assert_eq!(
                    from_cache, draw.hit,
                    "request {i} served by the wrong branch"
                );
                served.push(start.elapsed());
            }
            served.sort_unstable();
            let is_adaptive = matches!(policy, Policy::Adaptive);
            Run {
                served,
                extra: extra.load(Relaxed),
                estimate: adaptive.estimate().filter(|_| is_adaptive),
                delay: is_adaptive.then(|| adaptive.delay()),
            }
        })
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1_000.0
    }

    /// Prints the scenario's table.
    pub(super) fn print() {
        let draws: Arc<[Draw]> = draws().into();
        let caches: Vec<u64> = draws.iter().map(|d| d.cache.as_nanos() as u64).collect();
        let quantile = |q| Duration::from_nanos(sorted_quantile(caches.iter().copied(), q));
        let delayed_at = quantile(0.9);
        println!("## Scenario (c) a remote cache at a few hundred microseconds\n");
        println!(
            "cache: 20% misses; latency lognormal (median 300 µs, σ 0.3), 2% in a slow mode \
             (lognormal, median 3 ms, σ 0.5). database: lognormal (median 5 ms, σ 0.5). \
             True scale, one request at a time, {} requests. Cache p50 {:.3} ms, p90 \
             {:.3} ms, p99 {:.3} ms.\n",
            REQUESTS,
            ms(quantile(0.5)),
            ms(delayed_at),
            ms(quantile(0.99)),
        );
        println!(
            "| policy | p50 (ms) | p99 (ms) | p99.9 (ms) | extra database load | delay applied |"
        );
        println!("|---|---|---|---|---|---|");
        let policies = [
            Policy::Sequential,
            Policy::Concurrent,
            Policy::Delayed,
            Policy::Adaptive,
        ];
        for policy in policies {
            let r = run(&draws, policy, delayed_at);
            let p = |q: f64| {
                let rank = ((q * r.served.len() as f64).ceil() as usize).clamp(1, r.served.len());
                ms(r.served[rank - 1])
            };
            let (name, delay) = match policy {
                Policy::Sequential => ("Sequential".to_string(), "—".to_string()),
                Policy::Concurrent => ("Concurrent".to_string(), "0".to_string()),
                Policy::Delayed => (
                    format!("Delayed ({:.3} ms, the cache's p90)", ms(delayed_at)),
                    format!(
                        "{} ms (rounded up), on the next tick",
                        delayed_at.as_nanos().div_ceil(1_000_000)
                    ),
                ),
                _ => (
                    format!(
                        "Adaptive (p90; final estimate {:.3} ms)",
                        r.estimate.map_or(f64::NAN, ms)
                    ),
                    format!("{:.0} ms (`Adaptive::delay`)", r.delay.map_or(f64::NAN, ms)),
                ),
            };
            println!(
                "| {name} | {:.3} | {:.3} | {:.3} | {:.1}% | {delay} |",
                p(0.5),
                p(0.99),
                p(0.999),
                100.0 * r.extra as f64 / REQUESTS as f64,
            );
        }
        println!();
    }
}
