//! Soak: a million requests through the layer, in front of real hyper servers on
//! 127.0.0.1, checking that nothing is lost, mixed up or leaked.
//!
//! ```text
//! cargo run --release --all-features --example soak -- --requests 1000000 --concurrency 256
//! cargo run --release --all-features --example soak -- --help
//! ```
//!
//! The full million takes about 15 seconds on two cores, plus the build. It exits
//! with status 1 if any check fails, after printing what failed. `tests/soak.rs` runs
//! this same code with 20,000 requests as part of `cargo test`.
//!
//! # What runs
//!
//! - Two hyper servers on loopback (hyper-util's `auto` builder): the **primary**
//!   ("cache") is reached over HTTP/1.1, the **fallback** ("origin") over HTTP/2, each
//!   with a hyper-util client, as in `examples/demo.rs`.
//! - The stack under test: tower's `Timeout` (the user's bound on a request) around
//!   [`BufferBody`] around [`Fallback`], whose branches are those two clients, each
//!   wrapped in a probe that counts its response futures alive. Requests go to one of
//!   three such stacks, sharing the clients: `Concurrent`, `Delayed(2 ms)`, and
//!   `Adaptive(p90)` with a 10% budget.
//! - A load generator that sends requests `0..N` at a fixed concurrency. The path of
//!   each names its kind and its id (`/miss/1234`), an `x-id` header repeats the id,
//!   and the kind says what each server answers: hits, misses, errors (`5xx`, a reset
//!   HTTP/2 stream, a closed HTTP/1.1 connection), slow answers on either side, bodies
//!   (`POST`, echoed back), and requests that hang on both servers until a timeout
//!   around the layer drops them. Every answer echoes the id it was for (body and
//!   `x-id` header) and is checked against what its kind must produce: which branch
//!   served it, the status, the body byte for byte; servers check the id and body they
//!   received.
//!
//! The load runs in rounds. Between rounds, with every request finished: no branch
//! future may be alive, every server handler must have finished or been dropped (a
//! dropped branch is cancelled on the wire, and the server sees it), and the resident
//! set is read from `/proc/self/statm`. At the end the clients are dropped, and every
//! server connection must close and the runtime's alive-task count must return to
//! where it started. The layer's own `Stats` must agree with the kinds sent.
//!
//! Every wait is bounded: requests by the timeout around the layer, rounds by a
//! deadline, shutdowns and settling by a few seconds each.
//!
//! # HTTP/2 and cancelled fallbacks
//!
//! Under `Launch::Concurrent` every hit cancels a fallback call in flight, which over
//! HTTP/2 is a `RST_STREAM`, thousands a second here. With hyper's defaults
//! (`--h2-defaults`), h2 — hyper's HTTP/2 — treats that as abuse on both sides and
//! closes the connection with `GOAWAY ENHANCE_YOUR_CALM`, failing every other fallback
//! call on it, the ones whose answer is needed included (here, 3 to 5% of the misses
//! in a release build, more than half in a debug build, where the server falls
//! further behind):
//!
//! - the **server** counts streams the client reset before the server accepted them
//!   (a loaded server often reads the reset with the request), a guard against the
//!   "rapid reset" attack (CVE-2023-44487): past 20 waiting at once, `too_many_resets`;
//! - the **client** remembers the streams it reset for a second, but at most 50 of
//!   them; an answer already on its way for a stream it does not remember is refused
//!   with a `RST_STREAM` of its own, and h2 allows 1,024 of those per connection,
//!   ever: then `too_many_internal_resets`. Every 50,000 requests or so, here.
//!
//! The soak raises both limits: `max_pending_accept_reset_streams` on the fallback's
//! server to [`H2_SERVER_RESETS`], and `http2_max_concurrent_reset_streams` on its
//! client to [`H2_CLIENT_RESETS`], above the cancellations of one second. A deployment
//! that cannot raise the server's should delay the fallback's launch
//! (`Launch::Delayed`, `Launch::Adaptive`) or talk HTTP/1.1 to it.

use bytes::Bytes;
use http::{
    header::HeaderName,
    uri::{Authority, Scheme},
    HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use std::{
    error::Error,
    fmt::{self, Write as _},
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    net::TcpListener,
    sync::oneshot,
    task::{JoinHandle, JoinSet},
    time::{sleep, timeout, Instant},
};
use tower::{
    retry::budget::TpsBudget, timeout::Timeout, BoxError, Service, ServiceBuilder, ServiceExt,
};
use tower_backstop::{
    http::{accept::StatusIn, BufferBody, BufferBodyLayer, ReplayBody},
    launch::{Adaptive, Launch},
    outcome::{Snapshot, Stats},
    Fallback, FallbackLayer,
};

const HELP: &str = "\
Soak test for tower-backstop: N requests through the layer in front of two hyper
servers on 127.0.0.1, checking every answer, counting leaks and the resident set.

USAGE:
    cargo run --release --all-features --example soak -- [FLAGS]

FLAGS:
    --requests N             requests to send                    [default: 1000000]
    --concurrency N          requests in flight at once          [default: 256]
    --rounds N               rounds (checks between rounds)      [default: 10]
    --max-rss-growth-mib N   allowed growth of the resident set
                             after the first round, in MiB       [default: 32]
    --deadline-secs N        give up (and fail) after this long  [default: 1800]
    --h2-defaults            keep hyper's HTTP/2 limits on reset streams (see the
                             example's docs): fallback calls then fail
    -h, --help               print this help

Exits 0 if every check passed, 1 otherwise.";

/// How long a request may take before the timeout around the layer turns it into an
/// error. Only a `hang` request should ever come close.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);
/// The caller's own, shorter timeout on `hang` requests, which drops the layer's
/// future with both branches in flight.
const HANG_TIMEOUT: Duration = Duration::from_millis(100);
/// How long a `hang` handler sleeps if nobody cancels it.
const HANG_LIMIT: Duration = Duration::from_secs(30);
/// How long server-side effects (cancelled handlers, closed connections, finished
/// tasks) get to settle before a check fails.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);
/// Problems described in full in the report; the rest are only counted.
const MAX_DESCRIBED: usize = 12;
/// How many HTTP/2 streams the fallback's client remembers having reset (h2 forgets
/// each after a second): more than the fallback calls `Concurrent` cancels in a
/// second here, about 10,000. See "HTTP/2 and cancelled fallbacks".
const H2_CLIENT_RESETS: usize = 65_536;
/// How many HTTP/2 streams reset before it accepted them the fallback's server
/// tolerates at once: far more than the 256 calls in flight.
const H2_SERVER_RESETS: usize = 4_096;
/// The request id, sent by the load generator and echoed by the servers.
const X_ID: HeaderName = HeaderName::from_static("x-id");

// ---------------------------------------------------------------------------------------
// Configuration and report
// ---------------------------------------------------------------------------------------

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub requests: u64,
    pub concurrency: usize,
    /// The load is sent in this many rounds, with the leak checks between them.
    pub rounds: u64,
    /// The resident set may grow by this much after the first round.
    pub max_rss_growth: u64,
    /// The whole load must be done by then.
    pub deadline: Duration,
    /// Print a line per round.
    pub verbose: bool,
    /// Keep hyper's HTTP/2 limits on reset streams, with which the soak fails. See
    /// "HTTP/2 and cancelled fallbacks" in the module docs.
    pub h2_defaults: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            requests: 1_000_000,
            concurrency: 256,
            rounds: 10,
            max_rss_growth: 32 << 20,
            deadline: Duration::from_secs(30 * 60),
            verbose: true,
            h2_defaults: false,
        }
    }
}

#[path = "support/flags.rs"]
mod flags;

/// Parses `--flag value` and `--flag=value`; `Ok(None)` asks for the help text.
pub fn parse_args(args: Vec<std::ffi::OsString>) -> Result<Option<Config>, String> {
    let mut args = pico_args::Arguments::from_vec(args);
    if args.contains(["-h", "--help"]) {
        return Ok(None);
    }
    let d = Config::default();
    let mut config = Config {
        h2_defaults: args.contains("--h2-defaults"),
        requests: flags::in_range(&mut args, "--requests", d.requests, 1, 100_000_000)?,
        concurrency: flags::in_range(&mut args, "--concurrency", d.concurrency, 1, 4_096)?,
        rounds: flags::in_range(&mut args, "--rounds", d.rounds, 1, 1_000)?,
        max_rss_growth: flags::in_range(
            &mut args,
            "--max-rss-growth-mib",
            d.max_rss_growth >> 20,
            0,
            1 << 20,
        )? << 20,
        deadline: Duration::from_secs(flags::in_range(
            &mut args,
            "--deadline-secs",
            d.deadline.as_secs(),
            1,
            86_400,
        )?),
        ..d
    };
    flags::no_more(args)?;
    config.rounds = config.rounds.min(config.requests);
    Ok(Some(config))
}

/// The state after one round of requests, every one of them finished.
#[derive(Clone, Debug)]
pub struct Round {
    pub done: u64,
    pub elapsed: Duration,
    pub rss: Option<u64>,
    pub alive_tasks: usize,
    pub primary_connections: usize,
    pub fallback_connections: usize,
}

/// What the soak measured, and every check that failed.
#[derive(Debug, Default)]
pub struct Report {
    pub requests: u64,
    pub concurrency: usize,
    /// Requests answered as their kind says they must be.
    pub correct: u64,
    /// Answers for another request, from the wrong branch, with the wrong status or body.
    pub mismatched: u64,
    /// Requests that hit the request limit, or whose outcome was never recorded.
    pub lost: u64,
    /// Errors where an answer was due, or the wrong error.
    pub unexpected_errors: u64,
    /// Requests sent, by kind.
    pub sent: Vec<(Kind, u64)>,
    pub elapsed: Duration,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
    pub rounds: Vec<Round>,
    pub alive_tasks_before: usize,
    pub alive_tasks_after: usize,
    pub stats: Snapshot,
    /// Response futures created, and the most alive at once, per branch.
    pub primary_futures: (u64, usize),
    pub fallback_futures: (u64, usize),
    pub primary_server: ServerCounts,
    pub fallback_server: ServerCounts,
    pub problems: Vec<String>,
    pub failures: Vec<String>,
}

/// What a server saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerCounts {
    pub connections: u64,
    pub max_open_connections: usize,
    pub handler_calls: u64,
    pub max_live_handlers: usize,
    /// Handlers dropped before they answered: requests cancelled on the wire.
    pub cancelled: u64,
    /// Requests whose id or body did not match their path.
    pub wrong: u64,
}

// ---------------------------------------------------------------------------------------
// The mix of requests
// ---------------------------------------------------------------------------------------

/// Which branch answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Fallback,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Fallback => "fallback",
        })
    }
}

/// What a request asks of the two servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The primary answers `200` at once.
    Hit,
    /// The primary answers `404`; the fallback `200`.
    Miss,
    /// The primary answers `503`; the fallback `200`.
    PrimaryError,
    /// The primary answers `200` after 1 to 20 ms; the fallback at once.
    SlowHit,
    /// The primary answers `404` after 1 to 20 ms; the fallback at once.
    SlowMiss,
    /// The primary answers `404` at once; the fallback `200` after 1 to 20 ms.
    SlowFallback,
    /// The primary answers `503`, the fallback `500`: the fallback's `500` is served.
    BothFail,
    /// The primary answers `503`; the fallback's server resets the HTTP/2 stream: the
    /// fallback's error is the caller's.
    FallbackReset,
    /// The primary's server closes the HTTP/1.1 connection instead of answering; the
    /// fallback answers `200`.
    PrimaryReset,
    /// Both servers hang: the caller's timeout around the layer drops the request.
    Hang,
    /// A `POST` whose body both servers echo; the primary's answer stands.
    PostHit,
    /// A `POST`; the primary answers `404`, the fallback echoes the body.
    PostMiss,
}

/// Each kind's share, in requests per 10,000.
const MIX: [(Kind, u64); 12] = [
    (Kind::Hit, 5_000),
    (Kind::Miss, 1_500),
    (Kind::PrimaryError, 500),
    (Kind::SlowHit, 700),
    (Kind::SlowMiss, 500),
    (Kind::SlowFallback, 500),
    (Kind::BothFail, 300),
    (Kind::FallbackReset, 200),
    (Kind::PrimaryReset, 20),
    (Kind::Hang, 10),
    (Kind::PostHit, 400),
    (Kind::PostMiss, 370),
];

/// What a server does with a request.
enum Answer {
    Status(StatusCode),
    /// Fail the request instead of answering: hyper resets the HTTP/2 stream, or
    /// closes the HTTP/1.1 connection.
    Reset,
}

/// What the caller must get.
enum Expect {
    Served(Role, StatusCode),
    ErrorFrom(Role),
    Abandoned,
}

impl Kind {
    /// The kind of request `id`: a fixed function of the id, so every run sends the
    /// same requests.
    pub fn of(id: u64) -> Kind {
        let mut draw = mix64(id) % 10_000;
        for (kind, share) in MIX {
            if draw < share {
                return kind;
            }
            draw -= share;
        }
        unreachable!("the shares add up to 10,000")
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Hit => "hit",
            Kind::Miss => "miss",
            Kind::PrimaryError => "primary-error",
            Kind::SlowHit => "slow-hit",
            Kind::SlowMiss => "slow-miss",
            Kind::SlowFallback => "slow-fallback",
            Kind::BothFail => "both-fail",
            Kind::FallbackReset => "fallback-reset",
            Kind::PrimaryReset => "primary-reset",
            Kind::Hang => "hang",
            Kind::PostHit => "post-hit",
            Kind::PostMiss => "post-miss",
        }
    }

    fn from_name(name: &str) -> Option<Kind> {
        MIX.iter()
            .map(|&(kind, _)| kind)
            .find(|kind| kind.name() == name)
    }

    fn has_body(self) -> bool {
        matches!(self, Kind::PostHit | Kind::PostMiss)
    }

    /// What `role`'s server answers, and how long it takes first.
    fn answer(self, role: Role, id: u64) -> (Answer, Duration) {
        use StatusCode as S;
        let slow = Duration::from_millis(1 + mix64(id ^ 0x5107) % 20);
        let now = Duration::ZERO;
        let ok = Answer::Status(S::OK);
        match (self, role) {
            (Kind::Hit | Kind::PostHit, _) => (ok, now),
            (Kind::Miss | Kind::SlowFallback | Kind::PostMiss, Role::Primary) => {
                (Answer::Status(S::NOT_FOUND), now)
            }
            (Kind::SlowMiss, Role::Primary) => (Answer::Status(S::NOT_FOUND), slow),
            (Kind::SlowHit, Role::Primary) => (ok, slow),
            (Kind::SlowFallback, Role::Fallback) => (ok, slow),
            (Kind::PrimaryError | Kind::BothFail | Kind::FallbackReset, Role::Primary) => {
                (Answer::Status(S::SERVICE_UNAVAILABLE), now)
            }
            (Kind::BothFail, Role::Fallback) => (Answer::Status(S::INTERNAL_SERVER_ERROR), now),
            (Kind::FallbackReset, Role::Fallback) | (Kind::PrimaryReset, Role::Primary) => {
                (Answer::Reset, now)
            }
            (Kind::Hang, _) => (ok, HANG_LIMIT),
            (
                Kind::Miss
                | Kind::PrimaryError
                | Kind::SlowHit
                | Kind::SlowMiss
                | Kind::PrimaryReset
                | Kind::PostMiss,
                Role::Fallback,
            ) => (ok, now),
        }
    }

    fn expect(self) -> Expect {
        match self {
            Kind::Hit | Kind::SlowHit | Kind::PostHit => {
                Expect::Served(Role::Primary, StatusCode::OK)
            }
            Kind::Miss
            | Kind::PrimaryError
            | Kind::SlowMiss
            | Kind::SlowFallback
            | Kind::PrimaryReset
            | Kind::PostMiss => Expect::Served(Role::Fallback, StatusCode::OK),
            Kind::BothFail => Expect::Served(Role::Fallback, StatusCode::INTERNAL_SERVER_ERROR),
            Kind::FallbackReset => Expect::ErrorFrom(Role::Fallback),
            Kind::Hang => Expect::Abandoned,
        }
    }
}

/// SplitMix64: a well-mixed, fixed function of the id.
fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The body of a `POST` request: 64 to 4,063 bytes, made of the id.
fn payload(id: u64) -> Bytes {
    let len = 64 + (mix64(id ^ 0xB0D7) % 4_000) as usize;
    let unit = format!("{id:016x}");
    Bytes::from(unit.bytes().cycle().take(len).collect::<Vec<u8>>())
}

/// What a server answers for request `id` (with a `POST`'s body echoed after it).
fn answer_body(role: Role, id: u64, echo: &[u8]) -> Bytes {
    let mut body = format!("{role} {id}").into_bytes();
    if !echo.is_empty() {
        body.push(b'\n');
        body.extend_from_slice(echo);
    }
    Bytes::from(body)
}

fn request(id: u64, kind: Kind) -> Request<Full<Bytes>> {
    let (method, body) = if kind.has_body() {
        (Method::POST, payload(id))
    } else {
        (Method::GET, Bytes::new())
    };
    Request::builder()
        .method(method)
        .uri(format!("/{}/{id}", kind.name()))
        .header(X_ID, id)
        .body(Full::new(body))
        .expect("a valid request")
}

// ---------------------------------------------------------------------------------------
// Counting what is alive
// ---------------------------------------------------------------------------------------

/// Things alive now, the most ever alive at once, and how many there were in all.
#[derive(Debug, Default)]
struct Gauge {
    live: AtomicUsize,
    max: AtomicUsize,
    total: AtomicU64,
}

impl Gauge {
    fn enter(self: &Arc<Self>) -> Alive {
        let now = self.live.fetch_add(1, Relaxed) + 1;
        self.max.fetch_max(now, Relaxed);
        self.total.fetch_add(1, Relaxed);
        Alive(self.clone())
    }

    fn live(&self) -> usize {
        self.live.load(Relaxed)
    }
}

/// One thing counted alive until it is dropped.
struct Alive(Arc<Gauge>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Relaxed);
    }
}

// ---------------------------------------------------------------------------------------
// The branches: a hyper-util client each, counting its response futures
// ---------------------------------------------------------------------------------------

/// A branch's error, naming the branch.
#[derive(Debug)]
pub struct BranchError {
    role: Role,
    error: BoxError,
}

impl fmt::Display for BranchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} branch: {}", self.role, self.error)
    }
}

impl Error for BranchError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.error)
    }
}

type BranchFuture = Pin<Box<dyn Future<Output = Result<Response<Bytes>, BranchError>> + Send>>;

/// A hyper-util client bound to one server. Its response future reads the whole
/// answer and holds an [`Alive`] from `call` until it is dropped.
#[derive(Clone)]
struct Branch {
    role: Role,
    client: Client<HttpConnector, ReplayBody>,
    authority: Authority,
    futures: Arc<Gauge>,
}

impl Branch {
    fn new(
        role: Role,
        addr: SocketAddr,
        http2: bool,
        h2_defaults: bool,
        futures: Arc<Gauge>,
    ) -> Branch {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let mut client = Client::builder(TokioExecutor::new());
        client.http2_only(http2);
        if !h2_defaults {
            client.http2_max_concurrent_reset_streams(H2_CLIENT_RESETS);
        }
        Branch {
            role,
            client: client.build(connector),
            authority: Authority::try_from(addr.to_string()).expect("a socket address"),
            futures,
        }
    }
}

impl Service<Request<ReplayBody>> for Branch {
    type Response = Response<Bytes>;
    type Error = BranchError;
    type Future = BranchFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BranchError>> {
        // hyper-util's client is always ready: it queues on its pool.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ReplayBody>) -> BranchFuture {
        let alive = self.futures.enter();
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        *req.uri_mut() = Uri::from_parts(parts).expect("a path plus an authority");
        let role = self.role;
        let response = self.client.request(req);
        Box::pin(async move {
            let _alive = alive;
            let fail = |error: BoxError| BranchError { role, error };
            let response = response.await.map_err(|e| fail(e.into()))?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| fail(e.into()))?;
            Ok(Response::from_parts(parts, body.to_bytes()))
        })
    }
}

/// The stack under test: the caller's timeout, the body buffering, the layer.
type Stack = Timeout<BufferBody<Fallback<Branch, Branch, StatusIn>>>;

fn stack(primary: Branch, fallback: Branch, launch: Launch, stats: &Stats) -> Stack {
    let layer = FallbackLayer::new(fallback)
        .accept(StatusIn::SUCCESS)
        .launch(launch.clone())
        .stats(stats.clone());
    // The adaptive stack also caps speculation: 10% of requests, plus one a second.
    let layer = match launch {
        Launch::Adaptive(_) => layer.budget(TpsBudget::new(Duration::from_secs(10), 1, 0.1)),
        _ => layer,
    };
    ServiceBuilder::new()
        .timeout(REQUEST_LIMIT)
        .layer(BufferBodyLayer::new())
        .layer(layer)
        .service(primary)
}

// ---------------------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct ServerShared {
    connections: Arc<Gauge>,
    handlers: Arc<Gauge>,
    cancelled: AtomicU64,
    wrong: AtomicU64,
    accept_errors: AtomicU64,
}

impl ServerShared {
    fn counts(&self) -> ServerCounts {
        ServerCounts {
            connections: self.connections.total.load(Relaxed),
            max_open_connections: self.connections.max.load(Relaxed),
            handler_calls: self.handlers.total.load(Relaxed),
            max_live_handlers: self.handlers.max.load(Relaxed),
            cancelled: self.cancelled.load(Relaxed),
            wrong: self.wrong.load(Relaxed),
        }
    }
}

/// A handler call in flight: counted alive, and cancelled unless it finishes.
struct Call {
    shared: Arc<ServerShared>,
    _alive: Alive,
    finished: bool,
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.cancelled.fetch_add(1, Relaxed);
        }
    }
}

/// A hyper server on `127.0.0.1:0`, HTTP/1.1 and HTTP/2, counting its connections.
struct Server {
    addr: SocketAddr,
    shared: Arc<ServerShared>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(role: Role, h2_defaults: bool) -> std::io::Result<Server> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(ServerShared::default());
        let (stop, mut stopped) = oneshot::channel::<()>();
        let accepting = shared.clone();
        let task = tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            if !h2_defaults {
                builder
                    .http2()
                    .max_pending_accept_reset_streams(H2_SERVER_RESETS);
            }
            // Bounded by the stop signal, which `Server::stop` sends.
            loop {
                let stream = tokio::select! {
                    _ = &mut stopped => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => {
                            // Out of file descriptors, say: counted as a failure.
                            accepting.accept_errors.fetch_add(1, Relaxed);
                            sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                let open = accepting.connections.enter();
                let (builder, shared) = (builder.clone(), accepting.clone());
                tokio::spawn(async move {
                    let _open = open;
                    let service =
                        hyper::service::service_fn(move |req| handle(role, shared.clone(), req));
                    // A connection ends when the client closes it, or with an error
                    // (the `PrimaryReset` kind closes its own).
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Server {
            addr,
            shared,
            stop: Some(stop),
            task,
        })
    }

    /// Stops accepting; open connections are left to close on their own.
    async fn stop(&mut self) -> bool {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(SETTLE_LIMIT, &mut self.task).await.is_ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    role: Role,
    shared: Arc<ServerShared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let mut call = Call {
        _alive: shared.handlers.enter(),
        shared: shared.clone(),
        finished: false,
    };
    let (parts, body) = req.into_parts();
    let mut segments = parts.uri.path().trim_start_matches('/').splitn(2, '/');
    let kind = segments.next().and_then(Kind::from_name);
    let id = segments.next().and_then(|id| id.parse::<u64>().ok());
    let (Some(kind), Some(id)) = (kind, id) else {
        shared.wrong.fetch_add(1, Relaxed);
        call.finished = true;
        return Ok(status_response(StatusCode::BAD_REQUEST, Bytes::new(), None));
    };
    let header_id = parts
        .headers
        .get(&X_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = body.collect().await?.to_bytes();
    let expected_body = if kind.has_body() {
        payload(id)
    } else {
        Bytes::new()
    };
    if header_id != Some(id) || body != expected_body {
        shared.wrong.fetch_add(1, Relaxed);
    }
    let (answer, delay) = kind.answer(role, id);
    if !delay.is_zero() {
        sleep(delay).await;
    }
    call.finished = true;
    match answer {
        Answer::Status(status) => Ok(status_response(
            status,
            answer_body(role, id, &body),
            Some(id),
        )),
        Answer::Reset => Err(format!("{role} server fails request {id} on purpose").into()),
    }
}

fn status_response(status: StatusCode, body: Bytes, id: Option<u64>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    if let Some(id) = id {
        response.headers_mut().insert(X_ID, HeaderValue::from(id));
    }
    response
}

// ---------------------------------------------------------------------------------------
// The load generator
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    correct: AtomicU64,
    mismatched: AtomicU64,
    lost: AtomicU64,
    unexpected_errors: AtomicU64,
    problems: Mutex<Vec<String>>,
}

impl Tally {
    fn problem(&self, counter: &AtomicU64, what: impl FnOnce() -> String) {
        counter.fetch_add(1, Relaxed);
        let mut problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        if problems.len() < MAX_DESCRIBED {
            problems.push(what());
        }
    }
}

struct Load {
    /// One stack per launch policy; request `id` goes to `stacks[id % 3]`.
    stacks: [Stack; 3],
    next: AtomicU64,
    tally: Tally,
}

impl Load {
    /// Sends request `id` and checks what comes back.
    async fn one(&self, id: u64) {
        let kind = Kind::of(id);
        let svc = self.stacks[(id % 3) as usize].clone();
        let call = svc.oneshot(request(id, kind));
        let result = if kind == Kind::Hang {
            timeout(HANG_TIMEOUT, call).await.ok()
        } else {
            Some(call.await)
        };
        let tally = &self.tally;
        match (kind.expect(), result) {
            (Expect::Abandoned, None) => {
                tally.correct.fetch_add(1, Relaxed);
            }
            (_, None) => unreachable!("only `hang` requests have the short timeout"),
            (Expect::Abandoned, Some(result)) => tally.problem(&tally.mismatched, || {
                format!(
                    "request {id} ({}): should hang, got {result:?}",
                    kind.name()
                )
            }),
            (_, Some(Err(error))) if error.is::<tower::timeout::error::Elapsed>() => {
                tally.problem(&tally.lost, || {
                    format!(
                        "request {id} ({}): no answer within {REQUEST_LIMIT:?}",
                        kind.name()
                    )
                })
            }
            (Expect::ErrorFrom(role), Some(Err(error))) => {
                match error.downcast_ref::<BranchError>() {
                    Some(e) if e.role == role => {
                        tally.correct.fetch_add(1, Relaxed);
                    }
                    _ => tally.problem(&tally.unexpected_errors, || {
                        format!(
                            "request {id} ({}): wanted the {role}'s error, got {error}",
                            kind.name()
                        )
                    }),
                }
            }
            (Expect::Served(..), Some(Err(error))) => tally
                .problem(&tally.unexpected_errors, || {
                    format!("request {id} ({}): {}", kind.name(), chain(&*error))
                }),
            (Expect::ErrorFrom(role), Some(Ok(response))) => {
                tally.problem(&tally.mismatched, || {
                    format!(
                        "request {id} ({}): wanted the {role}'s error, got {} {:?}",
                        kind.name(),
                        response.status(),
                        response.body()
                    )
                })
            }
            (Expect::Served(role, status), Some(Ok(response))) => {
                let echo = if kind.has_body() {
                    payload(id)
                } else {
                    Bytes::new()
                };
                let want = answer_body(role, id, &echo);
                let header_ok = response.headers().get(&X_ID) == Some(&HeaderValue::from(id));
                if response.status() == status && header_ok && *response.body() == want {
                    tally.correct.fetch_add(1, Relaxed);
                } else {
                    tally.problem(&tally.mismatched, || {
                        let body = response.body();
                        let shown = String::from_utf8_lossy(&body[..body.len().min(40)]);
                        format!(
                            "request {id} ({}): wanted {status} from the {role}, got {} {:?} \
                             (x-id {:?})",
                            kind.name(),
                            response.status(),
                            shown,
                            response.headers().get(&X_ID),
                        )
                    })
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Measuring the process
// ---------------------------------------------------------------------------------------

/// The resident set, in bytes, from `/proc/self/statm`; `None` where there is none.
pub fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// The page size, from the auxiliary vector (`AT_PAGESZ`); 4 KiB if it cannot be read.
fn page_size() -> u64 {
    const AT_PAGESZ: u64 = 6;
    let Ok(auxv) = std::fs::read("/proc/self/auxv") else {
        return 4096;
    };
    auxv.chunks_exact(16)
        .map(|pair| {
            let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().expect("8 bytes"));
            (word(&pair[..8]), word(&pair[8..]))
        })
        .find(|&(key, _)| key == AT_PAGESZ)
        .map_or(4096, |(_, value)| value)
}

/// An error and its sources, `: `-separated.
fn chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Polls `done` every 5 ms until it holds, at most `limit`; returns whether it did.
async fn settle(limit: Duration, done: impl Fn() -> bool) -> bool {
    let give_up = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= give_up {
            return false;
        }
        sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// Runs the soak on the current tokio runtime (multi-threaded, with time and I/O).
pub async fn run(config: &Config) -> Report {
    let mut report = Report {
        requests: config.requests,
        concurrency: config.concurrency,
        alive_tasks_before: alive_tasks(),
        ..Report::default()
    };
    let started = Instant::now();
    let deadline = started + config.deadline;
    let mut failures = Vec::new();

    let (mut primary_server, mut fallback_server) = match (
        Server::start(Role::Primary, config.h2_defaults).await,
        Server::start(Role::Fallback, config.h2_defaults).await,
    ) {
        (Ok(p), Ok(f)) => (p, f),
        (Err(e), _) | (_, Err(e)) => {
            report.failures.push(format!("cannot start a server: {e}"));
            return report;
        }
    };
    report.rss_before = rss();

    let (primary_futures, fallback_futures) = (Arc::<Gauge>::default(), Arc::<Gauge>::default());
    let primary = Branch::new(
        Role::Primary,
        primary_server.addr,
        false,
        config.h2_defaults,
        primary_futures.clone(),
    );
    let fallback = Branch::new(
        Role::Fallback,
        fallback_server.addr,
        true,
        config.h2_defaults,
        fallback_futures.clone(),
    );
    let stats = Stats::new();
    let load = Arc::new(Load {
        stacks: [
            stack(
                primary.clone(),
                fallback.clone(),
                Launch::Concurrent,
                &stats,
            ),
            stack(
                primary.clone(),
                fallback.clone(),
                Launch::Delayed(Duration::from_millis(2)),
                &stats,
            ),
            stack(
                primary,
                fallback,
                Launch::Adaptive(Adaptive::new(0.9, Duration::from_millis(5))),
                &stats,
            ),
        ],
        next: AtomicU64::new(0),
        tally: Tally::default(),
    });

    // The load, in rounds; between rounds, every request has finished.
    let mut done = 0;
    for round in 1..=config.rounds {
        let end = config.requests * round / config.rounds;
        let mut workers = JoinSet::new();
        for _ in 0..(config.concurrency as u64).min(end - done) {
            let load = load.clone();
            // Bounded: each worker stops once the round's last request is handed out.
            workers.spawn(async move {
                loop {
                    let id = load.next.fetch_add(1, Relaxed);
                    if id >= end {
                        return;
                    }
                    load.one(id).await;
                }
            });
        }
        let finished = tokio::time::timeout_at(deadline, async {
            let mut panicked = 0;
            while let Some(joined) = workers.join_next().await {
                panicked += usize::from(joined.is_err());
            }
            panicked
        })
        .await;
        match finished {
            Ok(0) => {}
            Ok(n) => failures.push(format!("round {round}: {n} load workers panicked")),
            Err(_) => {
                failures.push(format!(
                    "round {round}: not finished by the deadline ({:?})",
                    config.deadline
                ));
                workers.abort_all();
                break;
            }
        }
        // Leaves `next` at `end` whether or not every worker ran: ids are never reused.
        load.next.store(end, Relaxed);
        done = end;

        // Every request of the round has finished, so no branch future may be alive:
        // the layer drops them before it answers (or when it is dropped).
        let live = (primary_futures.live(), fallback_futures.live());
        if live != (0, 0) {
            failures.push(format!(
                "round {round}: branch futures alive with no request in flight: \
                 {} primary, {} fallback",
                live.0, live.1
            ));
        }
        // Dropped branches are cancelled on the wire: the servers see their handlers
        // dropped a moment later.
        let handlers_done = settle(SETTLE_LIMIT, || {
            primary_server.shared.handlers.live() == 0
                && fallback_server.shared.handlers.live() == 0
        })
        .await;
        if !handlers_done {
            failures.push(format!(
                "round {round}: server handlers still running {SETTLE_LIMIT:?} after the \
                 last answer: {} primary, {} fallback",
                primary_server.shared.handlers.live(),
                fallback_server.shared.handlers.live()
            ));
        }
        let state = Round {
            done,
            elapsed: started.elapsed(),
            rss: rss(),
            alive_tasks: alive_tasks(),
            primary_connections: primary_server.shared.connections.live(),
            fallback_connections: fallback_server.shared.connections.live(),
        };
        if config.verbose {
            println!(
                "round {round:>3}/{}: {done:>9} requests, {:>7.1} s, rss {}, {} tasks alive, \
                 open connections: {} primary, {} fallback",
                config.rounds,
                state.elapsed.as_secs_f64(),
                mib(state.rss),
                state.alive_tasks,
                state.primary_connections,
                state.fallback_connections,
            );
        }
        report.rounds.push(state);
    }
    report.elapsed = started.elapsed();

    // The answers.
    let tally = &load.tally;
    report.correct = tally.correct.load(Relaxed);
    report.mismatched = tally.mismatched.load(Relaxed);
    report.unexpected_errors = tally.unexpected_errors.load(Relaxed);
    let timed_out = tally.lost.load(Relaxed);
    let recorded = report.correct + report.mismatched + report.unexpected_errors + timed_out;
    // A request handed out but never recorded is lost too.
    report.lost = timed_out + done.saturating_sub(recorded);
    report.problems = tally
        .problems
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if report.correct != config.requests {
        failures.push(format!(
            "{} of {} requests answered correctly: {} mismatched, {} lost, {} unexpected errors",
            report.correct,
            config.requests,
            report.mismatched,
            report.lost,
            report.unexpected_errors
        ));
    }

    // The layer's own counters against the kinds sent.
    let mut sent = MIX.map(|(kind, _)| (kind, 0u64));
    for id in 0..done {
        let kind = Kind::of(id);
        if let Some(entry) = sent.iter_mut().find(|(k, _)| *k == kind) {
            entry.1 += 1;
        }
    }
    report.sent = sent.to_vec();
    let count = |wanted: fn(Expect) -> bool| -> u64 {
        sent.iter()
            .filter(|(kind, _)| wanted(kind.expect()))
            .map(|(_, n)| n)
            .sum()
    };
    let by_primary = count(|e| matches!(e, Expect::Served(Role::Primary, _)));
    let abandoned = count(|e| matches!(e, Expect::Abandoned));
    report.stats = stats.snapshot();
    let s = report.stats;
    let want = (done, by_primary, done - by_primary - abandoned, abandoned);
    let got = (
        s.requests,
        s.served_by_primary,
        s.served_by_fallback,
        s.abandoned,
    );
    if got != want {
        failures.push(format!(
            "the layer's stats (requests, by primary, by fallback, abandoned) are {got:?}, \
             the kinds sent say {want:?}"
        ));
    }

    // Branch futures: one primary call per request; a fallback call for every rejected
    // primary at least, and at most one per request.
    report.primary_futures = (
        primary_futures.total.load(Relaxed),
        primary_futures.max.load(Relaxed),
    );
    report.fallback_futures = (
        fallback_futures.total.load(Relaxed),
        fallback_futures.max.load(Relaxed),
    );
    if report.primary_futures.0 != done {
        failures.push(format!(
            "{} primary calls for {done} requests",
            report.primary_futures.0
        ));
    }
    let rejected = done - by_primary - abandoned;
    if !(rejected..=done).contains(&report.fallback_futures.0) {
        failures.push(format!(
            "{} fallback calls for {done} requests, {rejected} of them rejected",
            report.fallback_futures.0
        ));
    }
    for (role, max) in [
        (Role::Primary, report.primary_futures.1),
        (Role::Fallback, report.fallback_futures.1),
    ] {
        if max > config.concurrency {
            failures.push(format!(
                "{max} {role} futures alive at once, with {} requests in flight",
                config.concurrency
            ));
        }
    }

    // Memory: flat after the first round.
    if let (Some(first), Some(peak)) = (
        report.rounds.first().and_then(|r| r.rss),
        report.rounds.iter().skip(1).filter_map(|r| r.rss).max(),
    ) {
        let growth = peak.saturating_sub(first);
        if growth > config.max_rss_growth {
            failures.push(format!(
                "the resident set grew by {} after the first round (allowed: {})",
                mib(Some(growth)),
                mib(Some(config.max_rss_growth))
            ));
        }
    }

    // Teardown: without clients, every connection closes, and every task ends.
    drop(load);
    let closed = settle(SETTLE_LIMIT, || {
        primary_server.shared.connections.live() == 0
            && fallback_server.shared.connections.live() == 0
    })
    .await;
    if !closed {
        failures.push(format!(
            "connections still open {SETTLE_LIMIT:?} after the clients were dropped: \
             {} primary, {} fallback",
            primary_server.shared.connections.live(),
            fallback_server.shared.connections.live()
        ));
    }
    for server in [&mut primary_server, &mut fallback_server] {
        if !server.stop().await {
            failures.push("a server did not stop".into());
        }
    }
    report.primary_server = primary_server.shared.counts();
    report.fallback_server = fallback_server.shared.counts();
    for (role, server) in [
        (Role::Primary, &primary_server),
        (Role::Fallback, &fallback_server),
    ] {
        let (wrong, accept_errors) = (
            server.shared.wrong.load(Relaxed),
            server.shared.accept_errors.load(Relaxed),
        );
        if wrong + accept_errors > 0 {
            failures.push(format!(
                "the {role} server saw {wrong} requests with the wrong id or body, and \
                 {accept_errors} accept errors"
            ));
        }
    }
    let baseline = report.alive_tasks_before;
    let tasks_ended = settle(SETTLE_LIMIT, || alive_tasks() <= baseline).await;
    report.alive_tasks_after = alive_tasks();
    if !tasks_ended {
        failures.push(format!(
            "{} tasks alive after the teardown, {baseline} before the start",
            report.alive_tasks_after
        ));
    }
    report.rss_after = rss();
    report.failures = failures;
    report
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        writeln!(
            f,
            "{} requests at concurrency {} in {secs:.1} s ({:.0} req/s)",
            self.requests,
            self.concurrency,
            self.rounds.last().map_or(0, |r| r.done) as f64 / secs.max(1e-9),
        )?;
        let mut sent = String::new();
        for (kind, n) in &self.sent {
            let _ = write!(sent, " {} {n},", kind.name());
        }
        writeln!(f, "sent:{}", sent.trim_end_matches(','))?;
        writeln!(
            f,
            "answers: {} correct, {} mismatched, {} lost, {} unexpected errors",
            self.correct, self.mismatched, self.lost, self.unexpected_errors
        )?;
        let s = &self.stats;
        writeln!(
            f,
            "layer stats: {} requests, {} by primary, {} by fallback, {} abandoned; \
             {} fallback launches ({} speculative), {} cancelled, {} wasted, {} budget refusals",
            s.requests,
            s.served_by_primary,
            s.served_by_fallback,
            s.abandoned,
            s.fallback_launches,
            s.speculative_launches,
            s.fallbacks_cancelled,
            s.fallbacks_wasted,
            s.budget_refusals
        )?;
        writeln!(
            f,
            "branch futures (created, most alive at once): primary {:?}, fallback {:?}",
            self.primary_futures, self.fallback_futures
        )?;
        for (role, c) in [
            (Role::Primary, &self.primary_server),
            (Role::Fallback, &self.fallback_server),
        ] {
            writeln!(
                f,
                "{role} server: {} handler calls ({} cancelled, at most {} at once), \
                 {} connections (at most {} open), {} wrong requests",
                c.handler_calls,
                c.cancelled,
                c.max_live_handlers,
                c.connections,
                c.max_open_connections,
                c.wrong
            )?;
        }
        writeln!(
            f,
            "tasks alive: {} before, {} after",
            self.alive_tasks_before, self.alive_tasks_after
        )?;
        let rss_at = |i: usize| self.rounds.get(i).and_then(|r| r.rss);
        let mid = self.rounds.len().saturating_sub(1) / 2;
        writeln!(
            f,
            "resident set: {} before, {} after round 1, {} after round {} (mid), {} after the \
             last round, {} after teardown",
            mib(self.rss_before),
            mib(rss_at(0)),
            mib(rss_at(mid)),
            mid + 1,
            mib(self.rounds.last().and_then(|r| r.rss)),
            mib(self.rss_after)
        )?;
        for problem in &self.problems {
            writeln!(f, "  problem: {problem}")?;
        }
        if self.failures.is_empty() {
            write!(f, "PASS: every check passed")
        } else {
            for failure in &self.failures {
                writeln!(f, "  FAILED: {failure}")?;
            }
            write!(f, "FAIL: {} checks failed", self.failures.len())
        }
    }
}

#[tokio::main]
async fn main() {
    let config = match parse_args(std::env::args_os().skip(1).collect()) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{HELP}");
            return;
        }
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    println!(
        "soak: {} requests at concurrency {}, in {} rounds",
        config.requests, config.concurrency, config.rounds
    );
    let report = run(&config).await;
    println!("{report}");
    if !report.failures.is_empty() {
        std::process::exit(1);
    }
}
