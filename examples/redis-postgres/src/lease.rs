//! One database query per key for a whole fleet: a lease in Redis, as memcache's
//! leases do it.
//!
//! [`Lease`] wraps the database service (the layer's fallback). Per-process coalescing
//! makes one query per key per instance; behind one Redis, the lease makes it one per
//! fleet:
//!
//! 1. The first call for key `K` that finds `item:K` missing takes the lease,
//!    `SET lease:item:K <token> NX PX <lease>`, queries the database and refills
//!    `item:K` — only if `lease:item:K` still holds its token (a compare-and-set in a
//!    Lua script), and deletes the lease in the same step.
//! 2. The others, on any instance, find the lease taken and wait: every
//!    [`poll`](LeaseConfig::poll) they read the value and the lease (`MGET`), and
//!    when the lease is gone without a value (its holder released it, or died and it
//!    expired) they try to take it, in the same script that took the first. So a
//!    holder that dies costs the others one [`lease`](LeaseConfig::lease) time, and
//!    one of them takes over.
//! 3. A caller that has waited its [`patience`](LeaseConfig::patience) queries the
//!    database itself, and writes only if `item:K` is still missing (`SET NX`): no
//!    request is ever stuck behind a lease.
//!
//! A holder whose lease expired before its answer came (a slow query, a pause) writes
//! nothing: by then another caller may hold the lease and have written a newer value,
//! which a late write would overwrite ([`LeaseCounters::refills_refused`]). Its own
//! caller still gets its answer.
//!
//! The refill is the lease's own: a stack with a lease needs no
//! [`WriteBack`](crate::WriteBack) (whose plain `SETEX` would undo the compare-and-set).
//! A Redis error while taking the lease or waiting is not the request's error: the call
//! queries the database, as without a lease.

use std::{
    fmt,
    future::Future,
    hash::{BuildHasher, Hasher, RandomState},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use redis::{aio::ConnectionManager, Cmd};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::{cache_key, Error, Row};

/// Returns `{1, value}` if the value is there, else takes the lease for `ARGV[1]` and
/// returns `{2, ''}`, else (someone holds it) `{0, ''}`.
const ACQUIRE: &str = r"local v = redis.call('GET', KEYS[1])
          if v then return {1, v} end
          if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, ''} end
          return {0, ''}";

/// Writes the value (with its expiry) and deletes the lease, only if the lease still
/// holds this token: 1 if written, 0 if not.
const REFILL: &str = r"if redis.call('GET', KEYS[2]) == ARGV[1] then
            redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
            redis.call('DEL', KEYS[2])
            return 1
          end
          return 0";

/// Deletes the lease only if it still holds this token.
const RELEASE: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
          return 0";

/// The parameters of a [`Lease`]. `Default` gives the values below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a lease lasts, on Redis's clock: a bound on the database call of its
    /// holder, and what a holder that dies costs the others. Longer than the query's
    /// slow tail, or a slow holder's refill is refused and a second caller queries.
    /// Default: 250 ms.
    pub lease: Duration,
    /// How long a caller that found the lease taken waits for the refill before it
    /// queries the database itself. Longer than `lease`, so that a dead holder's
    /// waiters take over one at a time instead of all querying. Default: 1 s.
    pub patience: Duration,
    /// How often a waiter looks for the refill (one `MGET` each time).
    /// Default: 10 ms. Each waiter polls: with per-process coalescing in front, an
    /// instance has one waiter per key.
    pub poll: Duration,
    /// The refilled value's expiry in Redis. Default: 3600 s, as
    /// [`put`](crate::put) writes.
    pub ttl: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            lease: Duration::from_millis(250),
            patience: Duration::from_secs(1),
            poll: Duration::from_millis(10),
            ttl: Duration::from_secs(3600),
        }
    }
}

/// What the leases of one [`Lease`] service (and its clones) did.
#[derive(Debug, Default)]
pub struct LeaseCounters {
    /// Leases taken (each one is a database query).
    pub taken: AtomicU64,
    /// Calls that found the lease taken and waited.
    pub waited: AtomicU64,
    /// Calls answered from the value a holder wrote (after waiting, or because it was
    /// written between the cache's miss and the lease).
    pub served_by_refill: AtomicU64,
    /// Calls that waited their patience out and queried the database themselves.
    pub impatient: AtomicU64,
    /// Values written by a holder whose lease was still its own.
    pub refills_written: AtomicU64,
    /// Values a holder did not write because its lease had expired (maybe taken and
    /// refilled by someone else since).
    pub refills_refused: AtomicU64,
    /// Leases given back without a value: the query failed, found no row, or its call
    /// was dropped.
    pub released: AtomicU64,
    /// Redis errors that made a call query without a lease.
    pub redis_errors: AtomicU64,
}

/// The database service `D` behind a Redis lease: one query per key in flight across
/// every instance that shares the Redis (see [the module docs](self)).
///
/// A `Service<i64>` with `D`'s response and error; always ready (it readies a clone of
/// `D` only when it queries, with `oneshot`). Each call's future is boxed: this is the
/// example's code, next to a database query, not the layer's hot path.
#[derive(Clone)]
pub struct Lease<D> {
    inner: D,
    redis: ConnectionManager,
    config: LeaseConfig,
    counters: Arc<LeaseCounters>,
    /// This service's tokens are `{instance}:{n}`: unique across instances and calls.
    instance: u64,
    next: Arc<AtomicU64>,
}

impl<D> Lease<D> {
    /// `inner` behind leases in `redis`, with `config`, counting into `counters`.
    pub fn new(
        inner: D,
        redis: ConnectionManager,
        config: LeaseConfig,
        counters: Arc<LeaseCounters>,
    ) -> Self {
        Lease {
            inner,
            redis,
            config,
            counters,
            // Random per service: two instances never share a token.
            instance: RandomState::new().build_hasher().finish(),
            next: Arc::default(),
        }
    }
}

impl<D> fmt::Debug for Lease<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("inner", &std::any::type_name::<D>())
            .field("config", &self.config)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// The key and lease names of one call.
struct Names {
    key: i64,
    value: String,
    lease: String,
    token: String,
}

impl<D> Service<i64> for Lease<D>
where
    D: Service<i64, Response = Option<Row>, Error = Error, Future: Send> + Clone + Send + 'static,
{
    type Response = Option<Row>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Option<Row>, Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: i64) -> Self::Future {
        let this = self.clone();
        let n = self.next.fetch_add(1, Relaxed);
        let value = cache_key(key);
        let names = Names {
            key,
            lease: format!("lease:{value}"),
            value,
            token: format!("{:x}:{n}", self.instance),
        };
        Box::pin(this.run(names))
    }
}

impl<D> Lease<D>
where
    D: Service<i64, Response = Option<Row>, Error = Error, Future: Send> + Clone + Send + 'static,
{
    async fn run(mut self, names: Names) -> Result<Option<Row>, Error> {
        let deadline = Instant::now() + self.config.patience;
        let mut waited = false;
        // The script first and whenever the lease is seen gone; a plain `MGET` while
        // it is held (cheaper for Redis than a script, with every waiter polling).
        let mut acquire = true;
        loop {
            let found: redis::RedisResult<(i64, String)> = if acquire {
                script(ACQUIRE, 2)
                    .arg(&names.value)
                    .arg(&names.lease)
                    .arg(&names.token)
                    .arg(self.config.lease.as_millis() as u64)
                    .query_async(&mut self.redis)
                    .await
            } else {
                redis::cmd("MGET")
                    .arg(&names.value)
                    .arg(&names.lease)
                    .query_async(&mut self.redis)
                    .await
                    .map(|found| match found {
                        (Some(value), _) => (1, value),
                        (None, None) => (3, String::new()), // released or expired
                        (None, Some::<String>(_)) => (0, String::new()),
                    })
            };
            match found {
                Ok((1, value)) => {
                    if let Some(row) = Row::from_cache_value(names.key, &value) {
                        self.counters.served_by_refill.fetch_add(1, Relaxed);
                        return Ok(Some(row));
                    }
                    break; // not a value of ours: the database decides
                }
                Ok((2, _)) => return self.hold(names).await,
                Ok((3, _)) => {
                    acquire = true;
                    continue; // take it over now
                }
                Ok(_) => acquire = false,
                Err(_) => {
                    self.counters.redis_errors.fetch_add(1, Relaxed);
                    return self.inner.oneshot(names.key).await;
                }
            }
            if !waited {
                waited = true;
                self.counters.waited.fetch_add(1, Relaxed);
            }
            if Instant::now() + self.config.poll > deadline {
                break;
            }
            tokio::time::sleep(self.config.poll).await;
        }
        self.counters.impatient.fetch_add(1, Relaxed);
        let answer = self.inner.clone().oneshot(names.key).await?;
        if let Some(row) = &answer {
            // Only where nothing is: a value written meanwhile is as new as ours.
            let _: redis::RedisResult<()> = redis::cmd("SET")
                .arg(&names.value)
                .arg(row.to_cache_value())
                .arg("NX")
                .arg("EX")
                .arg(self.config.ttl.as_secs())
                .query_async(&mut self.redis)
                .await;
        }
        Ok(answer)
    }

    /// The lease is ours: query, then refill if it still is.
    async fn hold(self, names: Names) -> Result<Option<Row>, Error> {
        self.counters.taken.fetch_add(1, Relaxed);
        let mut held = Held {
            redis: Some(self.redis.clone()),
            lease: names.lease.clone(),
            token: names.token.clone(),
            counters: self.counters.clone(),
        };
        let answer = self.inner.oneshot(names.key).await;
        // Still armed while the refill or the release runs: a call dropped in the middle
        // gives the lease back (a no-op if the script already ran: the token is gone).
        let mut redis = held.redis.clone().expect("disarmed only below");
        match &answer {
            Ok(Some(row)) => {
                let written: redis::RedisResult<i64> = script(REFILL, 2)
                    .arg(&names.value)
                    .arg(&names.lease)
                    .arg(&names.token)
                    .arg(row.to_cache_value())
                    .arg(self.config.ttl.as_secs())
                    .query_async(&mut redis)
                    .await;
                match written {
                    Ok(1) => self.counters.refills_written.fetch_add(1, Relaxed),
                    Ok(_) => self.counters.refills_refused.fetch_add(1, Relaxed),
                    Err(_) => self.counters.redis_errors.fetch_add(1, Relaxed),
                };
            }
            // Nothing to write: let a waiter take over now rather than at expiry.
            _ => release(redis, &names.lease, &names.token, &self.counters).await,
        }
        held.redis = None;
        answer
    }
}

async fn release(mut redis: ConnectionManager, lease: &str, token: &str, counters: &LeaseCounters) {
    counters.released.fetch_add(1, Relaxed);
    let _: redis::RedisResult<i64> = script(RELEASE, 1)
        .arg(lease)
        .arg(token)
        .query_async(&mut redis)
        .await;
}

/// `EVAL source keys ...`: the scripts are short enough to send whole each time.
fn script(source: &str, keys: usize) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(source).arg(keys);
    cmd
}

/// A lease held while its query runs. Dropped with the call (the cache hit, the caller
/// left), it gives the lease back in a task of its own, so the waiters need not wait
/// for it to expire. A holder that dies without running this (a crashed process) costs
/// them one lease time.
struct Held {
    /// `Some` while the lease is held and not yet handed on.
    redis: Option<ConnectionManager>,
    lease: String,
    token: String,
    counters: Arc<LeaseCounters>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(redis) = self.redis.take() else {
            return;
        };
        // Outside a runtime nothing can be sent: the lease expires on its own.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (lease, token, counters) = (
            std::mem::take(&mut self.lease),
            std::mem::take(&mut self.token),
            self.counters.clone(),
        );
        runtime.spawn(async move { release(redis, &lease, &token, &counters).await });
    }
}
