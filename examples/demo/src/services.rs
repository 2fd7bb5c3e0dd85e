//! The two upstream services — the cache and the SQLite database — and the small HTTP
//! server all three services (cache, database, front) run on.

use crate::{
    model::{is_cached, item, seq_of, Latency, ROWS, SOURCE},
    Config,
};
use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use bytes::Bytes;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle, time::sleep};

/// How long a server may take to close its connections when it is stopped.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// The SQLite database, shared by every connection of the pool, in memory.
const DB_URI: &str = "file:tower-backstop-demo?mode=memory&cache=shared";
/// How many streams an HTTP/2 client may reset before the server accepted them, at
/// once. hyper's default (20) is a guard against "rapid reset" floods, which a busy
/// `Launch::Concurrent` layer looks like: every hit resets the database's stream.
/// See the `http` module docs of tower-backstop.
pub const H2_SERVER_RESETS: usize = 65_536;

// ---------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------

/// An axum router served on 127.0.0.1 over HTTP/1.1 and HTTP/2 (with the rapid-reset
/// limit raised), stopped by [`Server::stop`].
pub struct Server {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    pub async fn start(app: Router) -> std::io::Result<Server> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http2()
                .max_pending_accept_reset_streams(H2_SERVER_RESETS);
            let graceful = GracefulShutdown::new();
            // Bounded by the stop signal, which `Server::stop` sends.
            loop {
                let stream = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        // Out of file descriptors, say: try again shortly.
                        Err(_) => {
                            sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(app.clone());
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            // Idle connections close now, busy ones once their requests are answered.
            let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, graceful.shutdown()).await;
        });
        Ok(Server { addr, stop, task })
    }

    /// Stops accepting, lets open connections finish, and gives up after a timeout.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

// ---------------------------------------------------------------------------------------
// Cache
// ---------------------------------------------------------------------------------------

/// The cache service, holding the rows of `db` whose keys `is_cached` picks (blocking:
/// call it on a blocking thread). Returns it and how many rows it holds.
pub fn cache(db: &Database, config: Config) -> rusqlite::Result<(Router, u64)> {
    let store = moka::sync::Cache::new(ROWS);
    for (key, row) in db.all_rows()? {
        if is_cached(key, config.hit_rate) {
            store.insert(key, Bytes::from(row));
        }
    }
    store.run_pending_tasks();
    let cached = store.entry_count();
    let router = Router::new()
        .route("/item/{id}", get(cache_get))
        .with_state(Arc::new(CacheService { store, config }));
    Ok((router, cached))
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

// ---------------------------------------------------------------------------------------
// Database
// ---------------------------------------------------------------------------------------

/// The database: SQLite, one connection per query in flight, from a pool.
pub struct Database {
    /// Idle connections. `rusqlite::Connection` is `Send` but not `Sync`: a query takes
    /// one out, runs on a blocking thread, and puts it back.
    idle: Mutex<Vec<Connection>>,
    /// The `SELECT`s run so far, a call cancelled in flight included.
    pub queries: AtomicU64,
    config: Config,
}

impl Database {
    /// Creates the database in memory and seeds it.
    pub fn open(config: Config) -> rusqlite::Result<Database> {
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
    pub fn all_rows(&self) -> rusqlite::Result<Vec<(u64, String)>> {
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

/// The database service, answering from `db`.
pub fn database(db: Arc<Database>) -> Router {
    Router::new()
        .route("/item/{id}", get(db_get))
        .with_state(db)
}
