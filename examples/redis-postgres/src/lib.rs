//! Redis in front of PostgreSQL, with `tower-backstop` between them.
//!
//! The pieces the example binary, the measurement command and the tests share:
//!
//! - [`cache`]: a Redis `GET` through the multiplexed `ConnectionManager`, as a tower
//!   service; a missing key is `Ok(None)`, a miss.
//! - [`database`]: a query through a `deadpool-postgres` pool, as a tower service
//!   wrapped in [`OnCancel`](tower_backstop::cancel::OnCancel): when `Fallback` drops
//!   the call because the cache hit, the server-side query is cancelled and the
//!   connection goes back to the pool only once the backend is idle ([`CancelQuery`]).
//! - [`stack`]: the two behind `FallbackLayer`, a hit being `Ok(Some(_))` from Redis.
//!   A Redis error is a miss too (the database answers), and a database error is
//!   the request's error: both services share the [`Error`] type.
//! - [`Lease`]: the database behind a lease in Redis, so that one query per key runs
//!   across every instance of a fleet (memcache's leases); [`fleet`]: instances of one
//!   service, and the stampede a popular key's expiry sets off.
//!
//! The database query aggregates a window of [`WINDOW`] rows of a 200k-row table, a few
//! milliseconds of real work on the server, not a sleep in the client.

use std::{fmt, sync::Arc};

use deadpool_postgres::Pool;
use redis::aio::ConnectionManager;
use tower::{Service, ServiceBuilder};
use tower_backstop::{launch::Launch, outcome::Stats, FallbackLayer};

mod cache;
mod database;
pub mod env;
pub mod fleet;
mod lease;

pub use crate::{
    cache::{cache, cache_key, put, WriteBack},
    database::{database, pool, seed, CancelQuery, DbCounters},
    lease::{Lease, LeaseConfig, LeaseCounters},
};

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
    pub(crate) fn to_cache_value(&self) -> String {
        format!("{}:{}", self.count, self.digest)
    }

    pub(crate) fn from_cache_value(key: i64, value: &str) -> Option<Row> {
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
///
/// `Clone`, its causes shared behind an `Arc`: a coalesced call's error reaches every
/// request that shares the call. `From` each cause.
#[derive(Clone, Debug)]
pub enum Error {
    /// Redis failed (the layer treats it as a miss: the database answers).
    Cache(Arc<redis::RedisError>),
    /// No database connection could be had.
    Pool(Arc<deadpool_postgres::PoolError>),
    /// The query failed.
    Database(Arc<tokio_postgres::Error>),
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Cache(Arc::new(e))
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::Pool(Arc::new(e))
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Database(Arc::new(e))
    }
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

/// Connects to Redis, builds the pool, seeds the table.
pub async fn connect(
    env: &env::Servers,
    pool_size: usize,
) -> Result<(ConnectionManager, Pool, Arc<str>), Box<dyn std::error::Error>> {
    let redis = redis::Client::open(env.redis_url.as_str())?
        .get_connection_manager()
        .await?;
    let (pool, cancel_addr) = pool(&env.database_url, pool_size)?;
    let mut conn = pool.get().await?;
    seed(&mut conn).await?;
    drop(conn);
    Ok((redis, pool, cancel_addr))
}
