//! Redis in front of PostgreSQL, with `tower-backstop` between them.
//!
//! The pieces the example binary, the measurement command and the tests share:
//!
//! - [`cache`]: a Redis `GET` through the multiplexed `ConnectionManager`, as a tower
//!   service; a missing key is `Ok(None)`, a miss.
//! - [`database`]: a query through a `deadpool-postgres` pool, as a tower service
//!   wrapped in [`OnCancel`]: when `Fallback` drops the call because the cache hit,
//!   the server-side query is cancelled and the connection goes back to the pool only
//!   once the backend is idle again ([`CancelQuery`]).
//! - [`stack`]: the two behind `FallbackLayer`, a hit being `Ok(Some(_))` from Redis.
//!   A Redis error is a miss too (the database answers), and a database error is
//!   the request's error: both services share the [`Error`] type.
//!
//! The database query aggregates a window of [`WINDOW`] rows of a 200k-row table, a few
//! milliseconds of real work on the server, not a sleep in the client.

use std::{
    fmt,
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use redis::aio::ConnectionManager;
use tokio::{io::AsyncReadExt, net::TcpStream};
use tokio_postgres::NoTls;
use tower::{service_fn, Service, ServiceBuilder};
use tower_backstop::{
    cancel::{Cancel, OnCancel, Slot},
    launch::Launch,
    outcome::Stats,
    refill::Refill,
    FallbackLayer,
};

pub mod env;

/// Rows in the `items` table.
pub const ROWS: i64 = 200_000;
/// Rows the lookup query aggregates per key: a few ms of work for the server.
pub const WINDOW: i64 = 12_000;
/// The lookup: one row summarizing `WINDOW` rows after the key.
pub const LOOKUP: &str = "SELECT count(*)::bigint, coalesce(max(payload), '') \
     FROM items WHERE id > $1 AND id <= $1 + 12000";

/// One answer, from either side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The key looked up.
    pub key: i64,
    /// Rows counted in the key's window.
    pub count: i64,
    /// The largest payload in the window.
    pub digest: String,
    /// Who produced it.
    pub source: Source,
}

/// Who produced a [`Row`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Redis.
    Cache,
    /// PostgreSQL.
    Database,
}

impl Row {
    fn to_cache_value(&self) -> String {
        format!("{}:{}", self.count, self.digest)
    }

    fn from_cache_value(key: i64, value: &str) -> Option<Row> {
        let (count, digest) = value.split_once(':')?;
        Some(Row {
            key,
            count: count.parse().ok()?,
            digest: digest.to_owned(),
            source: Source::Cache,
        })
    }
}

/// The error of both services, so that they line up under `Fallback`.
#[derive(Debug)]
pub enum Error {
    /// Redis failed (the layer treats it as a miss: the database answers).
    Cache(redis::RedisError),
    /// No database connection could be had.
    Pool(deadpool_postgres::PoolError),
    /// The query failed.
    Database(tokio_postgres::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Cache(e) => write!(f, "cache: {e}"),
            Error::Pool(e) => write!(f, "database pool: {e}"),
            Error::Database(e) => write!(f, "database: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// What a request gets: a row, `None` for a cache miss (never from the database: every
/// key in range has a window).
pub type Answer = Result<Option<Row>, Error>;

/// The Redis key of a row.
pub fn cache_key(key: i64) -> String {
    format!("item:{key}")
}

/// Redis as a tower service: `GET item:{key}`.
pub fn cache(
    redis: ConnectionManager,
) -> impl Service<i64, Response = Option<Row>, Error = Error, Future: Send> + Clone {
    service_fn(move |key: i64| {
        let mut redis = redis.clone();
        async move {
            let value: Option<String> = redis::cmd("GET")
                .arg(cache_key(key))
                .query_async(&mut redis)
                .await
                .map_err(Error::Cache)?;
            Ok(value.and_then(|v| Row::from_cache_value(key, &v)))
        }
    })
}

/// Writes a row into Redis, with a one-hour expiry.
pub async fn put(redis: &mut ConnectionManager, row: &Row) -> redis::RedisResult<()> {
    redis::cmd("SETEX")
        .arg(cache_key(row.key))
        .arg(3600)
        .arg(row.to_cache_value())
        .query_async(redis)
        .await
}

/// What the database did, counted on the client.
#[derive(Debug, Default)]
pub struct DbCounters {
    /// Queries sent to the server.
    pub started: AtomicU64,
    /// Queries whose answer came back to the client.
    pub completed: AtomicU64,
    /// Cancel requests sent (calls dropped mid-query).
    pub cancels_sent: AtomicU64,
    /// Connections taken out of the pool because the cancel or the barrier failed.
    pub connections_discarded: AtomicU64,
}

/// The cancel action for a pooled PostgreSQL connection whose query was dropped.
///
/// Run by the call's [`Slot`] when `Fallback` drops the call mid-query. It spawns a
/// task that sends PostgreSQL's cancel request for the connection's backend, waits for
/// the server to close the cancel connection (by then the backend has been
/// signalled), then runs an empty barrier query on the connection: it completes only
/// once the cancelled query has ended, so the connection goes back to the pool idle
/// and a late cancel can never hit the next query. If any step fails or takes longer
/// than 5 s, the connection is taken out of the pool instead.
#[derive(Clone, Debug)]
pub struct CancelQuery {
    addr: Arc<str>,
    counters: Arc<DbCounters>,
}

impl Cancel<Object> for CancelQuery {
    fn cancel(self, conn: Object) {
        self.counters.cancels_sent.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            let released = tokio::time::timeout(Duration::from_secs(5), async {
                let token = conn.cancel_token();
                let mut stream = TcpStream::connect(&*self.addr).await.ok()?;
                token.cancel_query_raw(&mut stream, NoTls).await.ok()?;
                // The server closes the cancel connection after signalling the backend.
                let _ = stream.read(&mut [0; 1]).await;
                conn.batch_execute("").await.ok()
            })
            .await;
            if !matches!(released, Ok(Some(()))) {
                self.counters.connections_discarded.fetch_add(1, Relaxed);
                drop(Object::take(conn));
            }
            // Otherwise `conn` is dropped here: back to the pool, idle.
        });
    }
}

/// A `deadpool-postgres` pool for `database_url`, and the `host:port` its cancel
/// requests go to.
pub fn pool(
    database_url: &str,
    size: usize,
) -> Result<(Pool, Arc<str>), Box<dyn std::error::Error>> {
    let config: tokio_postgres::Config = database_url.parse()?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => return Err("DATABASE_URL must name a TCP host".into()),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(size).build()?;
    Ok((pool, format!("{host}:{port}").into()))
}

/// PostgreSQL as a tower service: runs `sql` with the key as `$1` (an `int8`), and
/// reads `(count int8, digest text)` from the single row it returns.
///
/// Wrapped in [`OnCancel`] with [`CancelQuery`]: the call fills its slot with the
/// pooled connection as soon as it has one and disarms it when the query is over.
pub fn database(
    pool: Pool,
    cancel_addr: Arc<str>,
    sql: &'static str,
    counters: Arc<DbCounters>,
) -> impl Service<i64, Response = Option<Row>, Error = Error, Future: Send> + Clone {
    let action = CancelQuery {
        addr: cancel_addr,
        counters: counters.clone(),
    };
    let query = service_fn(move |(key, mut slot): (i64, Slot<Object, CancelQuery>)| {
        let pool = pool.clone();
        let counters = counters.clone();
        async move {
            let conn = slot.fill(pool.get().await.map_err(Error::Pool)?);
            let result = async {
                let statement = conn.prepare_cached(sql).await?;
                counters.started.fetch_add(1, Relaxed);
                conn.query_one(&statement, &[&key]).await
            }
            .await;
            // Answer or error, the query is over: nothing to cancel.
            slot.disarm();
            let row = result.map_err(Error::Database)?;
            counters.completed.fetch_add(1, Relaxed);
            Ok(Some(Row {
                key,
                count: row.get(0),
                digest: row.get(1),
                source: Source::Database,
            }))
        }
    });
    OnCancel::new(query, action)
}

/// A hit: Redis answered with a row.
pub fn is_hit(answer: &Answer) -> bool {
    matches!(answer, Ok(Some(_)))
}

/// The cache in front of the database, under `launch`, counting into `stats`.
pub fn stack<C, D>(
    cache: C,
    database: D,
    launch: Launch,
    stats: Stats,
) -> impl Service<i64, Response = Option<Row>, Error = Error, Future: Send> + Clone
where
    C: Service<i64, Response = Option<Row>, Error = Error, Future: Send> + Clone + Send + 'static,
    D: Service<i64, Response = Option<Row>, Error = Error, Future: Send> + Clone + Send + 'static,
{
    ServiceBuilder::new()
        .layer(
            FallbackLayer::new(database)
                .accept(is_hit)
                .launch(launch)
                .stats(stats),
        )
        .service(cache)
}

/// The refill after a miss: writes the database's row into Redis, in a task of its
/// own, so the response is not delayed. A failed write is counted in `failures`.
#[derive(Clone)]
pub struct WriteBack {
    /// The Redis connection the writes go through.
    pub redis: ConnectionManager,
    /// Writes that failed.
    pub failures: Arc<AtomicU64>,
}

impl fmt::Debug for WriteBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBack")
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl Refill<i64, Option<Row>> for WriteBack {
    type Key = i64;
    type Error = std::convert::Infallible;

    fn key(&mut self, key: &i64) -> Option<i64> {
        Some(*key)
    }

    fn refill(&mut self, _key: i64, row: &Option<Row>) -> Result<(), Self::Error> {
        if let Some(row) = row.clone() {
            let mut redis = self.redis.clone();
            let failures = self.failures.clone();
            tokio::spawn(async move {
                if put(&mut redis, &row).await.is_err() {
                    failures.fetch_add(1, Relaxed);
                }
            });
        }
        Ok(())
    }
}

/// Creates and fills the `items` table (`ROWS` rows) unless it is already there.
pub async fn seed(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS items (
                 id bigint PRIMARY KEY, grp int NOT NULL, payload text NOT NULL)",
        )
        .await?;
    let count: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await?
        .get(0);
    if count != ROWS {
        client
            .batch_execute(&format!(
                "TRUNCATE items;
                 INSERT INTO items SELECT g, g % 1000, md5(g::text)
                     FROM generate_series(1, {ROWS}) g;
                 ANALYZE items;"
            ))
            .await?;
    }
    Ok(())
}

/// Connects to Redis, builds the pool, seeds the table.
pub async fn connect(
    env: &env::Servers,
    pool_size: usize,
) -> Result<(ConnectionManager, Pool, Arc<str>), Box<dyn std::error::Error>> {
    let redis = redis::Client::open(env.redis_url.as_str())?
        .get_connection_manager()
        .await?;
    let (pool, cancel_addr) = pool(&env.database_url, pool_size)?;
    let conn = pool.get().await?;
    seed(&conn).await?;
    drop(conn);
    Ok((redis, pool, cancel_addr))
}

/// A future that is `Send`, for the spawned request loops.
pub fn assert_send<F: Future + Send>(f: F) -> F {
    f
}
