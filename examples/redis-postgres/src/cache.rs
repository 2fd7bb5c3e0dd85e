//! Redis: the cache as a tower service, and the write-back after a miss.

use std::fmt;

use redis::aio::ConnectionManager;
use tower::{service_fn, Service};
use tower_backstop::{
    outcome::Stats,
    refill::{Refill, Write},
};

use crate::{Error, Row};

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
                .map_err(Error::from)?;
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

/// The refill after a miss: writes the database's row into Redis, in a task of its
/// own, so the response is not delayed. A write that fails is counted in `stats`
/// ([`Snapshot::refill_writes_failed`](tower_backstop::outcome::Snapshot::refill_writes_failed));
/// an answer without a row is counted as skipped.
#[derive(Clone)]
pub struct WriteBack {
    /// The Redis connection the writes go through.
    pub redis: ConnectionManager,
    /// Where a failed write is counted: the layer's own `Stats`, to read it next to
    /// the refills started.
    pub stats: Stats,
}

impl fmt::Debug for WriteBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBack")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Refill<i64, Option<Row>> for WriteBack {
    type Key = i64;
    type Error = std::convert::Infallible;

    fn key(&mut self, key: &i64) -> Option<i64> {
        Some(*key)
    }

    fn refill(&mut self, _key: i64, row: &Option<Row>) -> Result<Write, Self::Error> {
        let Some(row) = row.clone() else {
            return Ok(Write::Skipped); // nothing to cache
        };
        let mut redis = self.redis.clone();
        let stats = self.stats.clone();
        tokio::spawn(async move {
            if put(&mut redis, &row).await.is_err() {
                stats.refill_write_failed();
            }
        });
        Ok(Write::Started)
    }
}
