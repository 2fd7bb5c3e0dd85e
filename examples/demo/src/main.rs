//! The one-command demo: a cache in front of a real SQLite database, over HTTP, under
//! every launch policy.
//!
//! ```text
//! cargo run --release --manifest-path examples/demo/Cargo.toml
//! cargo run --release --manifest-path examples/demo/Cargo.toml -- --help
//! ```
//!
//! With the defaults it takes about 20 seconds on two cores, after the build.
//!
//! Within one process, on 127.0.0.1, it starts:
//!
//! - a **database** service (axum, [`services`]): an embedded SQLite database
//!   (`rusqlite`, bundled), seeded with 10,000 rows at start, answering each request
//!   with a real `SELECT` and counting the queries it ran;
//! - a **cache** service (axum, [`services`]): a `moka` store warmed with a fraction of
//!   the rows (the hit rate), answering `404` on a miss;
//! - a **front** service (axum, [`front`]), whose handler reads through
//!   `FallbackLayer` with hyper-util's pooled clients: the cache is the primary, the
//!   database the fallback, and the cache's answer stands unless it is a `404` or a
//!   `5xx`;
//! - a **load generator** ([`load`]), which sends the very same requests (a seeded key
//!   sequence, [`model`]), a fixed number of them at a fixed concurrency, through the
//!   front under each launch policy in turn.
//!
//! It prints a table ([`report`]) — latency percentiles measured by the load
//! generator, throughput, the queries the database actually ran, and the layer's own
//! counters — and writes a latency CDF to `target/demo-latency-http2.svg` (with
//! `--http1`, `target/demo-latency-http1.svg`: one file per protocol, so two runs can
//! be compared).
//!
//! # The simulated network
//!
//! Loopback is too fast to be interesting, so each service sleeps inside its handler
//! for a simulated network latency, drawn from a lognormal distribution with a slow
//! tail. The draw is a function of the request's position in the workload (sent in an
//! `x-demo-seq` header), so every policy sees the same requests with the same
//! latencies. The cache is two-tiered: a hit answers after `--cache-ms`, a miss only
//! after the second tier was asked too, after `--miss-ms` — so the cache's slow answers
//! are mostly its misses, the case the delayed launch policies are made for.
//!
//! The database runs its query as soon as a request arrives and sleeps afterwards: a
//! call the layer cancels still costs the query, as it would on a real remote
//! database, where the cancellation travels no faster than the request did.
//!
//! # HTTP/2, the recommended set-up
//!
//! The front talks HTTP/2 to both services, with the two limits against "rapid reset"
//! floods raised (the server's pending-accept resets, the client's remembered resets),
//! as the `http` module docs of tower-backstop advise: a database call cancelled in
//! flight then resets one stream. With `--http1` it talks HTTP/1.1 instead, where a
//! cancelled call costs its connection: hyper closes it and the next call opens a new
//! one. On the same two cores as everything else, that work raises the median of
//! `Launch::Concurrent` above `Launch::Sequential`'s.

mod front;
mod load;
mod model;
mod report;
mod services;

use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use std::{
    error::Error,
    path::Path,
    sync::{atomic::Ordering::Relaxed, Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::time::sleep;
use tower::ServiceBuilder;
use tower_backstop::{
    http::X_SERVED_BY,
    outcome::{Outcome, Stats},
    FallbackLayer,
};

/// Where the latency plot goes, relative to the working directory: one file per
/// protocol, so that an `--http1` run does not overwrite the HTTP/2 one.
fn plot_path(http2: bool) -> &'static str {
    if http2 {
        "target/demo-latency-http2.svg"
    } else {
        "target/demo-latency-http1.svg"
    }
}

const HELP: &str = "\
The tower-backstop demo: a cache in front of a SQLite database, over HTTP on 127.0.0.1,
under each launch policy (Sequential, Concurrent, Delayed, Adaptive, Adaptive + budget).

USAGE:
    cargo run --release --manifest-path examples/demo/Cargo.toml -- [FLAGS]

FLAGS:
    --requests N      requests sent under each policy             [default: 20000]
    --concurrency N   requests in flight at once                  [default: 24]
    --hit-rate F      fraction of the keys in the cache, 0 to 1   [default: 0.95]
    --cache-ms X      median simulated latency of a cache hit     [default: 2]
    --miss-ms X       median simulated latency of a cache miss    [default: 8]
                      (the second cache tier is asked too)
    --db-ms Y         median simulated latency of the database    [default: 10]
    --http1           talk HTTP/1.1, not HTTP/2, to the cache and the database:
                      a cancelled call closes a connection instead of resetting a stream
    -h, --help        print this help

Latencies are sleeps inside the handlers, lognormal with a slow tail; tokio's timer
rounds each one up to the next millisecond. The plot is written to
target/demo-latency-http2.svg (target/demo-latency-http1.svg with --http1); its path is printed.";

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// The demo's knobs, set by its flags.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub requests: usize,
    pub concurrency: usize,
    pub hit_rate: f64,
    pub cache_ms: f64,
    pub miss_ms: f64,
    pub db_ms: f64,
    /// Whether the front talks HTTP/2 (the default) to the cache and the database.
    pub http2: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            requests: 20_000,
            concurrency: 24,
            hit_rate: 0.95,
            cache_ms: 2.0,
            miss_ms: 8.0,
            db_ms: 10.0,
            http2: true,
        }
    }
}

#[path = "../../support/flags.rs"]
mod flags;

/// Parses `--flag value` and `--flag=value`; `Ok(None)` asks for the help text.
fn parse_args(args: Vec<std::ffi::OsString>) -> Result<Option<Config>, String> {
    let mut args = pico_args::Arguments::from_vec(args);
    if args.contains(["-h", "--help"]) {
        return Ok(None);
    }
    let d = Config::default();
    let config = Config {
        http2: !args.contains("--http1"),
        requests: flags::in_range(&mut args, "--requests", d.requests, 1, 10_000_000)?,
        concurrency: flags::in_range(&mut args, "--concurrency", d.concurrency, 1, 1_024)?,
        hit_rate: flags::in_range(&mut args, "--hit-rate", d.hit_rate, 0.0, 1.0)?,
        cache_ms: flags::in_range(&mut args, "--cache-ms", d.cache_ms, 0.0, 10_000.0)?,
        miss_ms: flags::in_range(&mut args, "--miss-ms", d.miss_ms, 0.0, 10_000.0)?,
        db_ms: flags::in_range(&mut args, "--db-ms", d.db_ms, 0.0, 10_000.0)?,
    };
    flags::no_more(args)?;
    Ok(Some(config))
}

/// A progress bar's rate as a whole number of requests a second.
fn rate(state: &ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = write!(w, "{:.0}/s", state.per_sec());
}

// ---------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let config = match parse_args(std::env::args_os().skip(1).collect()) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{HELP}");
            return Ok(());
        }
        Err(message) => {
            eprintln!("error: {message}\n\n{HELP}");
            std::process::exit(2);
        }
    };
    let wall = Instant::now();

    // The database, seeded; the cache, warmed from it.
    let db = tokio::task::spawn_blocking(move || services::Database::open(config)).await??;
    let db = Arc::new(db);
    let (cache, cached) = tokio::task::spawn_blocking({
        let db = Arc::clone(&db);
        move || services::cache(&db, config)
    })
    .await??;
    db.queries.store(0, Relaxed);

    let db_server = services::Server::start(services::database(Arc::clone(&db))).await?;
    let cache_server = services::Server::start(cache).await?;
    // One pooled client per upstream, shared by every policy's front.
    let (cache_client, db_client) = (
        front::Upstream::new(cache_server.addr, config.http2),
        front::Upstream::new(db_server.addr, config.http2),
    );

    let hits = (0..config.requests)
        .filter(|&i| model::is_cached(model::key_of(i), config.hit_rate))
        .count();
    let rows = model::ROWS;
    println!("tower-backstop demo: a cache in front of a SQLite database, over HTTP on 127.0.0.1");
    println!(
        "  database  SQLite in memory, {rows} rows, one SELECT per request, at {}; simulated latency {} ms",
        db_server.addr, config.db_ms
    );
    println!(
        "  cache     moka, {cached} of {rows} rows, 404 on a miss, at {}; simulated latency {} ms on a hit, {} ms on a miss",
        cache_server.addr, config.cache_ms, config.miss_ms
    );
    println!("  front     axum; its handler reads through FallbackLayer: cache first, database as the fallback,");
    println!(
        "            the cache's answer served unless 404 or 5xx (hyper-util pooled clients, {})",
        if config.http2 {
            "HTTP/2, rapid-reset limits raised"
        } else {
            "HTTP/1.1"
        }
    );
    println!(
        "  workload  {} requests, {} at a time, the same seeded keys under every policy: {:.1}% hits",
        config.requests,
        config.concurrency,
        100.0 * hits as f64 / config.requests as f64
    );
    println!();

    let bar_style = ProgressStyle::with_template("{prefix:>28} [{bar:40}] {pos}/{len} {rate:>8}")?
        .with_key("rate", rate)
        .progress_chars("=> ");
    let mut delayed_at = Duration::from_secs_f64(2.0 * config.cache_ms / 1_000.0);
    let mut results = Vec::new();

    // A warm-up, not reported: opens the pooled connections and the database's.
    {
        let reader = ServiceBuilder::new()
            .layer(
                FallbackLayer::new(db_client.clone())
                    .accept(front::hit())
                    .mark_served_by(Some(X_SERVED_BY)),
            )
            .service(cache_client.clone());
        let front = services::Server::start(front::front(reader)).await?;
        let warm_up = config.requests.min(500);
        let _ = load::load(front.addr, &config, warm_up, &ProgressBar::hidden()).await;
        front.stop().await;
    }

    for policy in front::Policy::ALL {
        let name = policy.name(delayed_at);
        let stats = Stats::new();
        // The Sequential run records the cache's latency, as the layer measures it.
        let primary_latencies = Arc::new(Mutex::new(Vec::with_capacity(config.requests)));
        let mut layer = policy
            .layer(db_client.clone(), &config, delayed_at)
            .stats(stats.clone());
        if policy == front::Policy::Sequential {
            let samples = Arc::clone(&primary_latencies);
            layer = layer.on_outcome(move |o: &Outcome| {
                if let Some(latency) = o.primary_latency {
                    samples.lock().unwrap().push(latency);
                }
            });
        }
        let reader: front::Reader = ServiceBuilder::new()
            .layer(layer.mark_served_by(Some(X_SERVED_BY)))
            .service(cache_client.clone());
        let front = services::Server::start(front::front(reader)).await?;

        let bar = ProgressBar::new(config.requests as u64)
            .with_style(bar_style.clone())
            .with_prefix(name.clone());
        let queries_before = db.queries.load(Relaxed);
        let run = load::load(front.addr, &config, config.requests, &bar).await;
        bar.finish_and_clear();
        front.stop().await;
        // Cancelled database calls finish their query in the background: let them.
        sleep(Duration::from_millis(50)).await;
        let queries = db.queries.load(Relaxed) - queries_before;

        if policy == front::Policy::Sequential {
            let mut samples = std::mem::take(&mut *primary_latencies.lock().unwrap());
            samples.sort_unstable();
            if !samples.is_empty() {
                delayed_at = report::quantile(&samples, 0.9);
            }
        }
        println!(
            "{name:>28}: {} requests in {:.2} s, {} errors, {} wrong answers",
            run.latencies.len(),
            run.wall.as_secs_f64(),
            run.errors,
            run.wrong
        );
        results.push(report::Row {
            name,
            run,
            stats: stats.snapshot(),
            queries,
        });
    }

    println!();
    print!("{}", report::table(&results, config.requests));
    println!();
    println!(
        "Latencies are measured by the load generator, from sending a request to reading its body."
    );
    println!("queries/req: SELECTs the database ran (its own counter), a call cancelled in flight included.");
    println!("launches/req, cancelled, wasted: the layer's Stats; a cancelled call was dropped before it");
    println!(
        "answered, a wasted one answered and was thrown away (the cache's answer was served)."
    );
    let refusals: u64 = results.iter().map(|r| r.stats.budget_refusals).sum();
    if refusals > 0 {
        println!(
            "The budget refused {refusals} speculative launches; those requests ran sequentially."
        );
    }
    let bad: usize = results.iter().map(|r| r.run.errors + r.run.wrong).sum();
    if bad == 0 {
        println!("Every answer was checked: the right row, from the cache on a hit and from the database on");
        println!("a miss, as the answering service and the layer's x-served-by header both say.");
    } else {
        println!("{bad} answers were errors or wrong: see the lines above the table.");
    }

    let plot_name = plot_path(config.http2);
    let plot = Path::new(plot_name);
    if let Some(dir) = plot.parent() {
        std::fs::create_dir_all(dir)?;
    }
    report::plot(&results, plot)?;
    println!();
    println!(
        "Latency CDF: {}",
        std::fs::canonicalize(plot).map_or_else(|_| plot_name.into(), |p| p.display().to_string())
    );

    drop((cache_client, db_client));
    tokio::join!(cache_server.stop(), db_server.stop());
    println!("Done in {:.1} s.", wall.elapsed().as_secs_f64());
    Ok(())
}
