//! The one-command demo: a cache in front of a real SQLite database, over HTTP, under
//! every launch policy.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --help
//! ```
//!
//! With the defaults it takes about 20 seconds on two cores.
//!
//! Within one process, on 127.0.0.1, it starts:
//!
//! - a **database** service (axum): an embedded SQLite database (`rusqlite`, bundled),
//!   seeded with 10,000 rows at start, answering each request with a real `SELECT`
//!   and counting the queries it ran;
//! - a **cache** service (axum): a `moka` store warmed with a fraction of the rows (the
//!   hit rate), answering `404` on a miss;
//! - a **front** service (axum), whose handler reads through [`FallbackLayer`] with
//!   hyper-util's pooled HTTP/1.1 clients (HTTP/2 with `--http2`): the cache is the
//!   primary, the database the fallback, and the cache's answer stands unless it is a
//!   `404` or a `5xx`;
//! - a **load generator**, which sends the very same requests (a seeded key sequence),
//!   a fixed number of them at a fixed concurrency, through the front under each launch
//!   policy in turn.
//!
//! It prints a table — latency percentiles measured by the load generator, throughput,
//! the queries the database actually ran, and the layer's own counters — and writes a
//! latency CDF to `target/demo-latency.svg`.
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
//! The front talks HTTP/1.1 to both services, so a database call cancelled in flight
//! also costs its connection: hyper closes it, and the next call opens a new one. That
//! work, on the same two cores as everything else, is most of what `Concurrent` adds
//! to the median. With `--http2` a cancellation resets one stream instead.

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header::HeaderName, uri::Authority, HeaderMap, Request, Response, StatusCode, Uri},
    response::IntoResponse,
    routing::get,
    serve::ListenerExt,
    Router,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client, Error as ClientError, ResponseFuture},
    rt::TokioExecutor,
};
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::{
    error::Error,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle, time::sleep};
use tower::{retry::budget::TpsBudget, Service, ServiceBuilder, ServiceExt};
use tower_backstop::{
    accept::And,
    http::{
        accept::{RejectServerErrors, RejectStatus},
        MarkServedBy, ReplayBody, X_SERVED_BY,
    },
    launch::{Adaptive, Launch},
    outcome::{Outcome, Snapshot, Stats},
    Fallback, FallbackLayer,
};

/// Rows in the database; keys are `1..=ROWS`.
const ROWS: u64 = 10_000;
/// Seeds the key sequence and the simulated latencies: every run sends the same requests.
const SEED: u64 = 0x5EED_CAFE_F00D_D00D;
/// The request's position in the workload, from which each service draws its latency.
const SEQ: HeaderName = HeaderName::from_static("x-demo-seq");
/// Which service produced an answer: `cache` or `database`.
const SOURCE: HeaderName = HeaderName::from_static("x-source");
/// A request that takes longer than this counts as an error (and ends its worker's wait).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to close its connections when it is stopped.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// The SQLite database, shared by every connection of the pool, in memory.
const DB_URI: &str = "file:tower-backstop-demo?mode=memory&cache=shared";
/// Where the latency plot goes.
const PLOT: &str = "target/demo-latency.svg";

const HELP: &str = "\
The tower-backstop demo: a cache in front of a SQLite database, over HTTP on 127.0.0.1,
under each launch policy (Sequential, Concurrent, Delayed, Adaptive, Adaptive + budget).

USAGE:
    cargo run --release --example demo -- [FLAGS]

FLAGS:
    --requests N      requests sent under each policy             [default: 20000]
    --concurrency N   requests in flight at once                  [default: 24]
    --hit-rate F      fraction of the keys in the cache, 0 to 1   [default: 0.95]
    --cache-ms X      median simulated latency of a cache hit     [default: 2]
    --miss-ms X       median simulated latency of a cache miss    [default: 8]
                      (the second cache tier is asked too)
    --db-ms Y         median simulated latency of the database    [default: 10]
    --http2           talk HTTP/2, not HTTP/1.1, to the cache and the database:
                      a cancelled call resets a stream instead of closing a connection
    -h, --help        print this help

Latencies are sleeps inside the handlers, lognormal with a slow tail; tokio's timer
rounds each one up to the next millisecond.";

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Config {
    requests: usize,
    concurrency: usize,
    hit_rate: f64,
    cache_ms: f64,
    miss_ms: f64,
    db_ms: f64,
    /// Whether the front talks HTTP/2 to the cache and the database, not HTTP/1.1.
    http2: bool,
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
            http2: false,
        }
    }
}

#[path = "support/flags.rs"]
mod flags;

/// Parses `--flag value` and `--flag=value`; `Ok(None)` asks for the help text.
fn parse_args(args: Vec<std::ffi::OsString>) -> Result<Option<Config>, String> {
    let mut args = pico_args::Arguments::from_vec(args);
    if args.contains(["-h", "--help"]) {
        return Ok(None);
    }
    let d = Config::default();
    let config = Config {
        http2: args.contains("--http2"),
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

// ---------------------------------------------------------------------------------------
// Deterministic randomness and the latency model
// ---------------------------------------------------------------------------------------

/// SplitMix64's finaliser: a well-mixed hash of `x`.
fn mix(x: u64) -> u64 {
    let mut x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform draw in `[0, 1)` from `x`.
fn unit(x: u64) -> f64 {
    (mix(x) >> 11) as f64 / (1u64 << 53) as f64
}

/// A standard normal draw from `x` (Box–Muller).
fn normal(x: u64) -> f64 {
    let u1 = unit(x ^ 0x1111).max(f64::MIN_POSITIVE);
    let u2 = unit(x ^ 0x2222);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A simulated network latency: lognormal around a median, with a slow tail.
#[derive(Clone, Copy, Debug)]
struct Latency {
    median_ms: f64,
    /// The lognormal's spread: about 68% of draws fall within `exp(±sigma)` of the median.
    sigma: f64,
    /// The fraction of draws in the slow tail ...
    tail: f64,
    /// ... and how many times slower they are.
    tail_factor: f64,
    /// Which stream of draws: each latency of a request is drawn independently.
    stream: u64,
}

impl Latency {
    /// A cache hit: answered by the first tier.
    fn cache_hit(config: &Config) -> Latency {
        Latency {
            median_ms: config.cache_ms,
            sigma: 0.25,
            tail: 0.02,
            tail_factor: 5.0,
            stream: 1,
        }
    }

    /// A cache miss: answered once the second tier has missed too.
    fn cache_miss(config: &Config) -> Latency {
        Latency {
            median_ms: config.miss_ms,
            sigma: 0.25,
            tail: 0.02,
            tail_factor: 3.0,
            stream: 2,
        }
    }

    /// The database's round trip.
    fn database(config: &Config) -> Latency {
        Latency {
            median_ms: config.db_ms,
            sigma: 0.3,
            tail: 0.01,
            tail_factor: 4.0,
            stream: 3,
        }
    }

    /// The latency of request `seq`: the same for every policy.
    fn draw(&self, seq: u64) -> Duration {
        let x = mix(SEED ^ self.stream.wrapping_mul(0x9E37_79B9) ^ seq);
        let mut ms = self.median_ms * (self.sigma * normal(x)).exp();
        if unit(x ^ 0x3333) < self.tail {
            ms *= self.tail_factor;
        }
        Duration::from_secs_f64(ms / 1_000.0)
    }
}

/// Which keys the cache holds: a fraction `hit_rate` of them, fixed by the seed.
fn is_cached(key: u64, hit_rate: f64) -> bool {
    unit(SEED ^ 0xCAC4E ^ key) < hit_rate
}

/// The key of the `i`-th request of the workload, uniform over the rows.
fn key_of(i: usize) -> u64 {
    1 + mix(SEED ^ 0xC0FFEE ^ i as u64) % ROWS
}

/// The row `key` is seeded with: its name, price in cents and stock.
fn item(key: u64) -> (String, u64, u64) {
    let h = mix(key ^ 0xD00D);
    (format!("item {key:05}"), 100 + h % 99_900, (h >> 32) % 500)
}

/// The only correct answer for `key`, whichever service gives it.
fn row_of(key: u64) -> String {
    let (name, price_cents, stock) = item(key);
    format!(r#"{{"id":{key},"name":"{name}","price_cents":{price_cents},"stock":{stock}}}"#)
}

/// The request's position in the workload, as sent by the load generator.
fn seq_of(headers: &HeaderMap) -> u64 {
    headers
        .get(&SEQ)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------

/// An axum server on 127.0.0.1, stopped by [`Server::stop`].
struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(app: Router) -> std::io::Result<Server> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Server { addr, stop, task })
    }

    /// Stops accepting, lets open connections finish, and gives up after a timeout.
    async fn stop(self) {
        let _ = self.stop.send(());
        let abort = self.task.abort_handle();
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, self.task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

/// The cache: an in-memory store; a miss is answered `404`.
struct CacheService {
    store: moka::sync::Cache<u64, Bytes>,
    config: Config,
}

async fn cache_get(
    State(cache): State<Arc<CacheService>>,
    Path(key): Path<u64>,
    headers: HeaderMap,
) -> axum::response::Response {
    let found = cache.store.get(&key);
    let seq = seq_of(&headers);
    let latency = match found {
        Some(_) => Latency::cache_hit(&cache.config),
        None => Latency::cache_miss(&cache.config),
    };
    sleep(latency.draw(seq)).await;
    match found {
        Some(row) => (StatusCode::OK, [(SOURCE, "cache")], row).into_response(),
        None => (StatusCode::NOT_FOUND, [(SOURCE, "cache")], "miss").into_response(),
    }
}

/// The database: SQLite, one connection per query in flight, from a pool.
struct Database {
    /// Idle connections. `rusqlite::Connection` is `Send` but not `Sync`: a query takes
    /// one out, runs on a blocking thread, and puts it back.
    idle: Mutex<Vec<Connection>>,
    queries: AtomicU64,
    config: Config,
}

impl Database {
    /// Creates the database in memory and seeds it.
    fn open(config: Config) -> rusqlite::Result<Database> {
        let mut conn = Database::connect()?;
        conn.execute_batch(
            "CREATE TABLE items (
                 id          INTEGER PRIMARY KEY,
                 name        TEXT    NOT NULL,
                 price_cents INTEGER NOT NULL,
                 stock       INTEGER NOT NULL
             );",
        )?;
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO items (id, name, price_cents, stock) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for key in 1..=ROWS {
                let (name, price_cents, stock) = item(key);
                // SQLite's integers are `i64`; every value here fits.
                insert.execute((key as i64, name, price_cents as i64, stock as i64))?;
            }
        }
        tx.commit()?;
        Ok(Database {
            // This first connection stays in the pool for good, and with it the
            // in-memory database, which lives as long as one connection to it is open.
            idle: Mutex::new(vec![conn]),
            queries: AtomicU64::new(0),
            config,
        })
    }

    fn connect() -> rusqlite::Result<Connection> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        Connection::open_with_flags(DB_URI, flags)
    }

    /// Runs one `SELECT` (blocking: call it on a blocking thread).
    fn select(&self, key: u64) -> rusqlite::Result<Option<String>> {
        let pooled = self.idle.lock().unwrap().pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => Database::connect()?,
        };
        let row = conn
            .prepare_cached("SELECT id, name, price_cents, stock FROM items WHERE id = ?1")
            .and_then(|mut select| select.query_row([key as i64], render).optional());
        self.queries.fetch_add(1, Relaxed);
        self.idle.lock().unwrap().push(conn);
        row
    }

    /// Every row, to warm the cache with (blocking). Not counted as a query.
    fn all_rows(&self) -> rusqlite::Result<Vec<(u64, String)>> {
        let conn = self
            .idle
            .lock()
            .unwrap()
            .pop()
            .expect("the seeding connection");
        let rows = conn
            .prepare("SELECT id, name, price_cents, stock FROM items ORDER BY id")
            .and_then(|mut all| {
                all.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, render(r)?)))?
                    .collect()
            });
        self.idle.lock().unwrap().push(conn);
        rows
    }
}

/// A row as the services send it: JSON.
fn render(r: &rusqlite::Row<'_>) -> rusqlite::Result<String> {
    Ok(format!(
        r#"{{"id":{},"name":"{}","price_cents":{},"stock":{}}}"#,
        r.get::<_, i64>(0)?,
        r.get::<_, String>(1)?,
        r.get::<_, i64>(2)?,
        r.get::<_, i64>(3)?,
    ))
}

async fn db_get(
    State(db): State<Arc<Database>>,
    Path(key): Path<u64>,
    headers: HeaderMap,
) -> axum::response::Response {
    // The query runs to completion even if this handler is cancelled meanwhile: the
    // blocking task owns its connection and returns it to the pool itself.
    let query = tokio::task::spawn_blocking({
        let db = Arc::clone(&db);
        move || db.select(key)
    });
    let row = query.await;
    sleep(Latency::database(&db.config).draw(seq_of(&headers))).await;
    match row {
        Ok(Ok(Some(row))) => (StatusCode::OK, [(SOURCE, "database")], row).into_response(),
        Ok(Ok(None)) => {
            (StatusCode::NOT_FOUND, [(SOURCE, "database")], "no such row").into_response()
        }
        Ok(Err(_)) | Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

// ---------------------------------------------------------------------------------------
// The front: a handler reading through the layer
// ---------------------------------------------------------------------------------------

/// A hyper-util client bound to one upstream service: it completes each request's
/// relative URI with the upstream's address.
#[derive(Clone)]
struct Upstream {
    client: Client<HttpConnector, ReplayBody>,
    authority: Authority,
}

impl Upstream {
    fn new(addr: SocketAddr, http2: bool) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Upstream {
            client: Client::builder(TokioExecutor::new())
                .http2_only(http2)
                .build(connector),
            authority: Authority::try_from(addr.to_string()).expect("a socket address"),
        }
    }
}

impl Service<Request<ReplayBody>> for Upstream {
    type Response = Response<Incoming>;
    type Error = ClientError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Request<ReplayBody>>::poll_ready(&mut self.client, cx)
    }

    fn call(&mut self, mut req: Request<ReplayBody>) -> ResponseFuture {
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        *req.uri_mut() = Uri::from_parts(parts).expect("a path plus an authority");
        self.client.request(req)
    }
}

/// The cache's answer stands unless it is a miss (`404`) or the cache is in trouble
/// (`5xx`, or no answer at all).
type Hit = And<RejectStatus, RejectServerErrors>;

fn hit() -> Hit {
    And::new(RejectStatus(StatusCode::NOT_FOUND), RejectServerErrors)
}

/// The cache, backed by the database; every answer marked `x-served-by: primary` or
/// `x-served-by: fallback` by the layer.
type Reader = Fallback<MarkServedBy<Upstream>, MarkServedBy<Upstream>, Hit>;

async fn front_get(
    State(reader): State<Reader>,
    Path(key): Path<u64>,
    headers: HeaderMap,
) -> axum::response::Response {
    let mut req = Request::get(format!("/item/{key}"))
        .body(ReplayBody::empty())
        .expect("a valid request");
    if let Some(seq) = headers.get(&SEQ) {
        req.headers_mut().insert(SEQ, seq.clone());
    }
    match reader.oneshot(req).await {
        Ok(res) => res.map(Body::new),
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

/// The front service, reading through `reader`.
fn front(reader: Reader) -> Router {
    Router::new()
        .route("/item/{id}", get(front_get))
        .with_state(reader)
}

// ---------------------------------------------------------------------------------------
// Launch policies
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Sequential,
    Concurrent,
    Delayed,
    Adaptive,
    AdaptiveBudget,
}

impl Policy {
    const ALL: [Policy; 5] = [
        // Sequential first: its run measures the cache's p90 for `Delayed`.
        Policy::Sequential,
        Policy::Concurrent,
        Policy::Delayed,
        Policy::Adaptive,
        Policy::AdaptiveBudget,
    ];

    fn name(self, delayed_at: Duration) -> String {
        match self {
            Policy::Sequential => "Sequential".into(),
            Policy::Concurrent => "Concurrent".into(),
            Policy::Delayed => format!("Delayed {:.1} ms (cache p90)", ms(delayed_at)),
            Policy::Adaptive => "Adaptive p90".into(),
            Policy::AdaptiveBudget => "Adaptive p90 + 10% budget".into(),
        }
    }

    fn layer(
        self,
        db: Upstream,
        config: &Config,
        delayed_at: Duration,
    ) -> FallbackLayer<Upstream, Hit> {
        // Until it has seen 100 answers, the adaptive delay starts at twice a hit's
        // median: a guess, which it then replaces with what it measures.
        let adaptive = || {
            Adaptive::new(
                0.9,
                Duration::from_secs_f64(2.0 * config.cache_ms / 1_000.0),
            )
        };
        let layer = FallbackLayer::new(db).accept(hit());
        match self {
            Policy::Sequential => layer.launch(Launch::Sequential),
            Policy::Concurrent => layer.launch(Launch::Concurrent),
            Policy::Delayed => layer.launch(Launch::Delayed(delayed_at)),
            Policy::Adaptive => layer.launch(Launch::Adaptive(adaptive())),
            // At most 10% of requests (plus one a second) may start the database early.
            Policy::AdaptiveBudget => layer
                .launch(Launch::Adaptive(adaptive()))
                .budget(TpsBudget::new(Duration::from_secs(10), 1, 0.1)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Load generator
// ---------------------------------------------------------------------------------------

/// What one run of the workload measured, at the client.
struct Run {
    /// Every request's latency, sorted.
    latencies: Vec<Duration>,
    wall: Duration,
    /// Requests that failed, timed out, or were not answered `200`.
    errors: usize,
    /// `200` answers with the wrong row, or from the wrong service, or marked by the
    /// layer as served by the wrong branch.
    wrong: usize,
}

/// Sends requests `0..count` of the workload to `target`, `concurrency` at a time.
async fn load(target: SocketAddr, config: &Config, count: usize, bar: &ProgressBar) -> Run {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.min(count) {
        let (client, next, bar, hit_rate) = (
            client.clone(),
            Arc::clone(&next),
            bar.clone(),
            config.hit_rate,
        );
        workers.spawn(async move {
            let mut run = Run {
                latencies: Vec::new(),
                wall: Duration::ZERO,
                errors: 0,
                wrong: 0,
            };
            // Bounded: every worker stops once `count` requests have been handed out.
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= count {
                    return run;
                }
                let key = key_of(i);
                let req = Request::get(format!("http://{target}/item/{key}"))
                    .header(SEQ, i)
                    .body(Empty::new())
                    .expect("a valid request");
                let t = Instant::now();
                let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    let res = client.request(req).await.ok()?;
                    let status = res.status();
                    let source = res.headers().get(&SOURCE).cloned();
                    let served_by = res.headers().get(&X_SERVED_BY).cloned();
                    let body = res.into_body().collect().await.ok()?.to_bytes();
                    Some((status, source, served_by, body))
                })
                .await;
                run.latencies.push(t.elapsed());
                bar.inc(1);
                match answer {
                    Ok(Some((StatusCode::OK, source, served_by, body))) => {
                        // What the service that answered says, and what the layer says.
                        let expected = if is_cached(key, hit_rate) {
                            ("cache", "primary")
                        } else {
                            ("database", "fallback")
                        };
                        if body != row_of(key).as_bytes()
                            || source.is_none_or(|s| s != expected.0)
                            || served_by.is_none_or(|s| s != expected.1)
                        {
                            run.wrong += 1;
                        }
                    }
                    _ => run.errors += 1,
                }
            }
        });
    }
    let mut total = Run {
        latencies: Vec::with_capacity(count),
        wall: Duration::ZERO,
        errors: 0,
        wrong: 0,
    };
    while let Some(run) = workers.join_next().await {
        let run = run.expect("a load worker panicked");
        total.latencies.extend(run.latencies);
        total.errors += run.errors;
        total.wrong += run.wrong;
    }
    total.wall = started.elapsed();
    total.latencies.sort_unstable();
    total
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// The nearest-rank `q` quantile of sorted latencies.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

struct Row {
    name: String,
    run: Run,
    stats: Snapshot,
    queries: u64,
}

fn table(rows: &[Row], requests: usize) -> String {
    let per_req = |n: u64| n as f64 / requests as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| {:<27} | {:>8} | {:>8} | {:>8} | {:>6} | {:>11} | {:>12} | {:>9} | {:>6} |",
        "policy",
        "p50",
        "p99",
        "p99.9",
        "req/s",
        "queries/req",
        "launches/req",
        "cancelled",
        "wasted"
    );
    let _ = writeln!(
        out,
        "|{:-<29}|{:->10}|{:->10}|{:->10}|{:->8}|{:->13}|{:->14}|{:->11}|{:->8}|",
        ":", ":", ":", ":", ":", ":", ":", ":", ":"
    );
    for r in rows {
        let l = &r.run.latencies;
        let _ = writeln!(
            out,
            "| {:<27} | {:>5.1} ms | {:>5.1} ms | {:>5.1} ms | {:>6.0} | {:>11.3} | {:>12.3} | {:>9} | {:>6} |",
            r.name,
            ms(quantile(l, 0.5)),
            ms(quantile(l, 0.99)),
            ms(quantile(l, 0.999)),
            l.len() as f64 / r.run.wall.as_secs_f64(),
            per_req(r.queries),
            per_req(r.stats.fallback_launches),
            r.stats.fallbacks_cancelled,
            r.stats.fallbacks_wasted,
        );
    }
    out
}

/// The plot's y coordinate of quantile `q`: thousandths of its "nines", -log10(1 - q).
/// (An integer axis: plotters formats custom tick marks only on integer axes.)
fn nines(q: f64) -> i32 {
    (-1_000.0 * (1.0 - q).log10()).round() as i32
}

fn plot(rows: &[Row]) -> Result<(), Box<dyn Error>> {
    let root = SVGBackend::new(PLOT, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let lo = rows
        .iter()
        .map(|r| ms(r.run.latencies[0]))
        .fold(f64::MAX, f64::min)
        .max(0.01);
    let hi = rows
        .iter()
        .map(|r| ms(*r.run.latencies.last().unwrap()))
        .fold(0.0, f64::max);
    let n = rows[0].run.latencies.len();
    let top = nines((n as f64 - 1.0) / n as f64).max(1);
    let keys: Vec<i32> = [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999]
        .into_iter()
        .map(nines)
        .filter(|&y| y <= top)
        .collect();
    // Ticks at 1, 2, 5 times the powers of ten, from 0.1 ms to 500 s.
    let x_keys: Vec<f64> = (-1..=5)
        .flat_map(|e| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(e)))
        .filter(|x| (lo * 0.9..=hi * 1.1).contains(x))
        .collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "tower-backstop demo: latency seen by the client",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (lo * 0.9..hi * 1.1).log_scale().with_key_points(x_keys),
            (0..top).with_key_points(keys),
        )?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log scale)")
        .y_desc("percentile of requests")
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| {
            let p = 100.0 * (1.0 - 10f64.powf(-f64::from(*y) / 1_000.0));
            format!("p{}", (p * 100.0).round() / 100.0)
        })
        .draw()?;
    let colors = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x94, 0x67, 0xbd),
    ];
    for (r, &color) in rows.iter().zip(colors.iter().cycle()) {
        let l = &r.run.latencies;
        let points = (0..=500).map(|k| {
            let y = top * k / 500;
            let q = 1.0 - 10f64.powf(-f64::from(y) / 1_000.0);
            (ms(quantile(l, q)), y)
        });
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(r.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
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
    let db = Arc::new(tokio::task::spawn_blocking(move || Database::open(config)).await??);
    let store = moka::sync::Cache::new(ROWS);
    let rows = tokio::task::spawn_blocking({
        let db = Arc::clone(&db);
        move || db.all_rows()
    })
    .await??;
    for (key, row) in rows {
        if is_cached(key, config.hit_rate) {
            store.insert(key, Bytes::from(row));
        }
    }
    store.run_pending_tasks();
    let cached = store.entry_count();
    db.queries.store(0, Relaxed);

    let db_server = Server::start(
        Router::new()
            .route("/item/{id}", get(db_get))
            .with_state(Arc::clone(&db)),
    )
    .await?;
    let cache_server = Server::start(
        Router::new()
            .route("/item/{id}", get(cache_get))
            .with_state(Arc::new(CacheService { store, config })),
    )
    .await?;
    // One pooled client per upstream, shared by every policy's front.
    let (cache_client, db_client) = (
        Upstream::new(cache_server.addr, config.http2),
        Upstream::new(db_server.addr, config.http2),
    );

    let hits = (0..config.requests)
        .filter(|&i| is_cached(key_of(i), config.hit_rate))
        .count();
    println!("tower-backstop demo: a cache in front of a SQLite database, over HTTP on 127.0.0.1");
    println!(
        "  database  SQLite in memory, {ROWS} rows, one SELECT per request, at {}; simulated latency {} ms",
        db_server.addr, config.db_ms
    );
    println!(
        "  cache     moka, {cached} of {ROWS} rows, 404 on a miss, at {}; simulated latency {} ms on a hit, {} ms on a miss",
        cache_server.addr, config.cache_ms, config.miss_ms
    );
    println!("  front     axum; its handler reads through FallbackLayer: cache first, database as the fallback,");
    println!(
        "            the cache's answer served unless 404 or 5xx (hyper-util pooled clients, {})",
        if config.http2 { "HTTP/2" } else { "HTTP/1.1" }
    );
    println!(
        "  workload  {} requests, {} at a time, the same seeded keys under every policy: {:.1}% hits",
        config.requests,
        config.concurrency,
        100.0 * hits as f64 / config.requests as f64
    );
    println!();

    let bar_style =
        ProgressStyle::with_template("{prefix:>28} [{bar:40}] {pos}/{len} {per_sec:>10}")?
            .progress_chars("=> ");
    let mut delayed_at = Duration::from_secs_f64(2.0 * config.cache_ms / 1_000.0);
    let mut results = Vec::new();

    // A warm-up, not reported: opens the pooled connections and the database's.
    {
        let reader = ServiceBuilder::new()
            .layer(
                FallbackLayer::new(db_client.clone())
                    .accept(hit())
                    .mark_served_by(Some(X_SERVED_BY)),
            )
            .service(cache_client.clone());
        let front = Server::start(front(reader)).await?;
        let warm_up = config.requests.min(500);
        let _ = load(front.addr, &config, warm_up, &ProgressBar::hidden()).await;
        front.stop().await;
    }

    for policy in Policy::ALL {
        let name = policy.name(delayed_at);
        let stats = Stats::new();
        // The Sequential run records the cache's latency, as the layer measures it.
        let primary_latencies = Arc::new(Mutex::new(Vec::with_capacity(config.requests)));
        let mut layer = policy
            .layer(db_client.clone(), &config, delayed_at)
            .stats(stats.clone());
        if policy == Policy::Sequential {
            let samples = Arc::clone(&primary_latencies);
            layer = layer.on_outcome(move |o: &Outcome| {
                if let Some(latency) = o.primary_latency {
                    samples.lock().unwrap().push(latency);
                }
            });
        }
        let reader: Reader = ServiceBuilder::new()
            .layer(layer.mark_served_by(Some(X_SERVED_BY)))
            .service(cache_client.clone());
        let front = Server::start(front(reader)).await?;

        let bar = ProgressBar::new(config.requests as u64)
            .with_style(bar_style.clone())
            .with_prefix(name.clone());
        let queries_before = db.queries.load(Relaxed);
        let run = load(front.addr, &config, config.requests, &bar).await;
        bar.finish_and_clear();
        front.stop().await;
        // Cancelled database calls finish their query in the background: let them.
        sleep(Duration::from_millis(50)).await;
        let queries = db.queries.load(Relaxed) - queries_before;

        if policy == Policy::Sequential {
            let mut samples = std::mem::take(&mut *primary_latencies.lock().unwrap());
            samples.sort_unstable();
            if !samples.is_empty() {
                delayed_at = quantile(&samples, 0.9);
            }
        }
        println!(
            "{name:>28}: {} requests in {:.2} s, {} errors, {} wrong answers",
            run.latencies.len(),
            run.wall.as_secs_f64(),
            run.errors,
            run.wrong
        );
        results.push(Row {
            name,
            run,
            stats: stats.snapshot(),
            queries,
        });
    }

    println!();
    print!("{}", table(&results, config.requests));
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

    plot(&results)?;
    println!();
    println!(
        "Latency CDF: {}",
        std::fs::canonicalize(PLOT).map_or_else(|_| PLOT.into(), |p| p.display().to_string())
    );

    tokio::join!(cache_server.stop(), db_server.stop());
    println!("Done in {:.1} s.", wall.elapsed().as_secs_f64());
    Ok(())
}
