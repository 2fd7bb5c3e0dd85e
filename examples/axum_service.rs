//! An axum service whose cache routes fall back to a database service, over loopback.
//!
//! Run it with:
//!
//! ```text
//! cargo run --all-features --example axum_service
//! ```
//!
//! Two servers start on `127.0.0.1` (ports chosen by the system):
//!
//! - the **database**, a separate HTTP service that knows every user and takes 50 ms;
//! - the **app**, whose `/user/{id}` routes answer from an in-memory cache, `404` when a
//!   user is not cached. Its `route_layer` sends every read to the database too —
//!   through a hyper-util client speaking HTTP/2 — and serves the database's answer
//!   only when the cache says `404`. Writes (`POST`) are not started speculatively:
//!   `speculate_if` lets only safe methods (RFC 9110 §9.2.1) start the database early,
//!   so a `POST` reaches the database only once the cache has refused it. Bodies are
//!   buffered (64 KiB at most) so that a `POST` can reach both.
//!
//! The example then sends a few requests to the app, prints who served each, shuts
//! both servers down and prints what the layer and the database counted: the database
//! sees a call for every read, and the ones the cache answered are cancelled in
//! flight (their HTTP/2 streams reset) rather than completed.

use axum::{
    body::{Body, Bytes},
    extract::Path,
    http::{Request, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use http_body_util::BodyExt;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use std::{
    convert::Infallible,
    error::Error,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tower::service_fn;
use tower_backstop::{
    http::{accept::RejectStatus, ReplayBody},
    outcome::Stats,
    FallbackLayer,
};

/// Who answered, in a response header.
const SERVED_BY: &str = "x-served-by";

/// What the database's handlers did: started, and completed or dropped in flight.
#[derive(Default)]
struct DbCalls {
    started: AtomicUsize,
    completed: AtomicUsize,
    cancelled: AtomicUsize,
}

/// Counts a database call as cancelled unless it completed.
struct InFlight {
    calls: Arc<DbCalls>,
    done: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let counter = if self.done {
            &self.calls.completed
        } else {
            &self.calls.cancelled
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

fn database(calls: Arc<DbCalls>) -> Router {
    async fn call<T>(calls: Arc<DbCalls>, answer: T) -> T {
        calls.started.fetch_add(1, Ordering::SeqCst);
        let mut in_flight = InFlight { calls, done: false };
        // The database's latency.
        tokio::time::sleep(Duration::from_millis(50)).await;
        in_flight.done = true;
        answer
    }
    let (reads, writes) = (calls.clone(), calls);
    Router::new().route(
        "/user/{id}",
        get(move |Path(id): Path<u32>| {
            let answer = ([(SERVED_BY, "database")], format!("user {id}"));
            call(reads.clone(), answer)
        })
        .post(move |Path(id): Path<u32>, body: Bytes| {
            let answer = (
                [(SERVED_BY, "database")],
                format!("saved {} bytes for user {id}", body.len()),
            );
            call(writes.clone(), answer)
        }),
    )
}

/// The app's own routes: a cache that knows users 1 to 3, takes 5 ms, and stores
/// nothing.
fn cache() -> Router {
    Router::new().route(
        "/user/{id}",
        get(|Path(id): Path<u32>| async move {
            // The cache's latency: short, but long enough for the database call to
            // be on its way.
            tokio::time::sleep(Duration::from_millis(5)).await;
            if (1..=3).contains(&id) {
                ([(SERVED_BY, "cache")], format!("user {id}")).into_response()
            } else {
                (StatusCode::NOT_FOUND, "not cached").into_response()
            }
        })
        .post(|| async { (StatusCode::NOT_FOUND, "the cache stores nothing") }),
    )
}

/// The fallback branch: the request, body included, forwarded to the database.
/// A failed request becomes a `502`, so the branch is `Infallible` like the routes.
fn forward_to(
    database: SocketAddr,
) -> impl tower::Service<
    Request<ReplayBody>,
    Response = Response,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    let client: Client<HttpConnector, ReplayBody> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    service_fn(move |mut req: Request<ReplayBody>| {
        let client = client.clone();
        async move {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            *req.uri_mut() = Uri::try_from(format!("http://{database}{path}")).unwrap();
            Ok(match client.request(req).await {
                Ok(response) => response.map(Body::new),
                Err(_) => StatusCode::BAD_GATEWAY.into_response(),
            })
        }
    })
}

/// A server on loopback and the way to stop it.
struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn serve(router: Router) -> std::io::Result<Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    Ok(Running { addr, stop, task })
}

impl Running {
    async fn shut_down(self) -> Result<(), Box<dyn Error>> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(5), self.task).await???;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let db_calls = Arc::new(DbCalls::default());
    let db = serve(database(db_calls.clone())).await?;

    let stats = Stats::new();
    let app = cache().route_layer(
        FallbackLayer::new(forward_to(db.addr))
            .accept(RejectStatus(StatusCode::NOT_FOUND))
            // Only reads start the database alongside the cache; a write waits for the
            // cache's answer, so it is never run twice.
            .speculate_if(|req: &Request<ReplayBody>| req.method().is_safe())
            .stats(stats.clone())
            .buffer_bodies(),
    );
    let app = serve(app).await?;
    println!("database on {}, app on {}\n", db.addr, app.addr);

    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let requests = [
        ("GET", "/user/1", Body::empty()),
        ("GET", "/user/2", Body::empty()),
        ("GET", "/user/42", Body::empty()),
        ("POST", "/user/42", Body::from(r#"{"name":"Ada"}"#)),
        ("POST", "/user/43", Body::from(vec![b'x'; 100 * 1024])),
        ("GET", "/nowhere", Body::empty()),
    ];
    for (method, path, body) in requests {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", app.addr))
            .body(body)?;
        let response = client.request(req).await?;
        let status = response.status();
        let served_by = response
            .headers()
            .get(SERVED_BY)
            .map_or("-", |v| v.to_str().unwrap_or("?"))
            .to_owned();
        let body = response.into_body().collect().await?.to_bytes();
        let body = String::from_utf8_lossy(&body);
        let status = status.to_string();
        println!("{method:<4} {path:<10} -> {status:<21} served by {served_by:<8} {body:?}");
    }

    app.shut_down().await?;
    db.shut_down().await?;

    println!("\nlayer: {}", stats.snapshot());
    println!(
        "database: {} calls started, {} completed, {} cancelled in flight",
        db_calls.started.load(Ordering::SeqCst),
        db_calls.completed.load(Ordering::SeqCst),
        db_calls.cancelled.load(Ordering::SeqCst),
    );
    println!("(`/nowhere` has no route: `route_layer` leaves it to the app's own 404)");
    Ok(())
}
