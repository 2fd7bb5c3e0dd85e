//! PostgreSQL: the database as a tower service whose dropped queries are cancelled on
//! the server.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio::{io::AsyncReadExt, net::TcpStream};
use tokio_postgres::NoTls;
use tower::{service_fn, Service};
use tower_backstop::{
    cancel::{Cancel, OnCancel, Slot},
    outcome::Stats,
};

use crate::{Error, Row, Source, ROWS};

/// What the database did, counted on the client.
#[derive(Debug, Default)]
pub struct DbCounters {
    /// Queries sent to the server.
    pub started: AtomicU64,
    /// Queries whose answer came back to the client.
    pub completed: AtomicU64,
    /// Cancel requests sent (calls dropped mid-query, never calls that answered).
    pub cancels_sent: AtomicU64,
    /// Connections taken out of the pool because the cancel or the barrier failed.
    pub connections_discarded: AtomicU64,
}

/// The cancel action for a pooled PostgreSQL connection whose query was dropped.
///
/// Run by the call's [`Slot`] when `Fallback` drops the call mid-query (never for a
/// call that answered, whether or not it disarmed its slot). It spawns a
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
/// Wrapped in [`OnCancel`] with [`CancelQuery`], counting the cancel requests it sends
/// into `stats` ([`Snapshot::cancels`](tower_backstop::outcome::Snapshot::cancels)):
/// the call fills its slot with the pooled connection as soon as it has one, and
/// disarms it as soon as the query is over, so that the connection goes back to the
/// pool before the row is read. (Without the `disarm` nothing would be cancelled
/// either: a slot its own call drops, at its end or on an early `?`, runs nothing.)
pub fn database(
    pool: Pool,
    cancel_addr: Arc<str>,
    sql: &'static str,
    counters: Arc<DbCounters>,
    stats: Stats,
) -> impl Service<i64, Response = Option<Row>, Error = Error, Future: Send> + Clone {
    let action = CancelQuery {
        addr: cancel_addr,
        counters: counters.clone(),
    };
    let query = service_fn(move |(key, mut slot): (i64, Slot<Object, CancelQuery>)| {
        let pool = pool.clone();
        let counters = counters.clone();
        async move {
            let conn = slot.fill(pool.get().await.map_err(Error::from)?);
            let result = async {
                let statement = conn.prepare_cached(sql).await?;
                counters.started.fetch_add(1, Relaxed);
                conn.query_one(&statement, &[&key]).await
            }
            .await;
            // Answer or error, the query is over: nothing to cancel, and the
            // connection can go back to the pool now.
            slot.disarm();
            let row = result.map_err(Error::from)?;
            counters.completed.fetch_add(1, Relaxed);
            Ok(Some(Row {
                key,
                count: row.get(0),
                digest: row.get(1),
                source: Source::Database,
            }))
        }
    });
    OnCancel::new(query, action).stats(stats)
}

impl CancelQuery {
    /// The action for connections whose server takes cancel requests at `addr`
    /// (`host:port`, as [`pool`] returns it), counting into `counters`.
    pub fn new(addr: Arc<str>, counters: Arc<DbCounters>) -> Self {
        CancelQuery { addr, counters }
    }
}

/// The advisory lock key `seed` holds while it looks at and fills the table (any
/// constant; it names nothing else in this database).
const SEED_LOCK: i64 = 0x6261_636b_7374_6f70; // "backstop"

/// Creates and fills the `items` table (`ROWS` rows) unless it is already there.
///
/// Safe to run from many tests and processes at once: everything happens in one
/// transaction that first takes a transaction-scoped advisory lock, so one session
/// creates and fills the table while the others wait, then find it full and change
/// nothing. (Two bare `CREATE TABLE IF NOT EXISTS` racing on a fresh database fail
/// with `duplicate key value violates unique constraint "pg_type_typname_nsp_index"`.)
/// The table is the one `search_path` names: `items` in the first schema of the path.
pub async fn seed(client: &mut tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // Released at commit or rollback: an error or a dropped future leaves no lock.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SEED_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS items (
             id bigint PRIMARY KEY, grp int NOT NULL, payload text NOT NULL)",
    )
    .await?;
    let count: i64 = tx
        .query_one("SELECT count(*) FROM items", &[])
        .await?
        .get(0);
    if count != ROWS {
        tx.batch_execute(&format!(
            "TRUNCATE items;
             INSERT INTO items SELECT g, g % 1000, md5(g::text)
                 FROM generate_series(1, {ROWS}) g;
             ANALYZE items;"
        ))
        .await?;
    }
    tx.commit().await
}
