//! Real servers on loopback and what their handlers saw.
//!
//! A [`Server`] serves an axum router on `127.0.0.1:0` and counts the connections it
//! accepted; [`Grpc`] serves a tonic service. A [`Tracker`] records, for every handler
//! call, whether it started, completed, or was dropped before completing — the drop is
//! how a test sees a request cancelled on the server side. Handlers that must stay in
//! flight wait on a [`Tracker::hold`] that the test releases (or that gives up by
//! itself after [`HOLD_LIMIT`], so that a failing test never leaves them hanging).

use axum::{
    body::{Body, Bytes},
    serve::ListenerExt,
    Router,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch, Notify},
    task::JoinHandle,
};
use tower_backstop::http::ReplayBody;

/// How long a test waits for a server to observe something before failing.
pub const OBSERVE_LIMIT: Duration = Duration::from_secs(5);
/// How long a held handler waits for its release before giving up on its own.
pub const HOLD_LIMIT: Duration = Duration::from_secs(10);
/// How long a server gets to shut down gracefully before it is aborted.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

/// A server task on loopback, stopped by [`Server::stop`] or, failing that, on drop.
pub struct Server {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `router` over HTTP/1.1 and HTTP/2 (prior knowledge) on a fresh port.
    pub async fn axum(router: Router) -> Server {
        Server::serve(router).await
    }

    /// Serves any service `axum::serve` takes, over HTTP/1.1 and HTTP/2.
    pub async fn serve<S>(service: S) -> Server
    where
        S: tower::Service<
                axum::extract::Request,
                Response = axum::response::Response,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + 'static,
        S::Future: Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let listener = listener.tap_io(move |_| {
            counter.fetch_add(1, SeqCst);
        });
        let (shutdown, signal) = oneshot::channel::<()>();
        let make_service = axum::ServiceExt::<axum::extract::Request>::into_make_service(service);
        let task = tokio::spawn(async move {
            axum::serve(listener, make_service)
                .with_graceful_shutdown(async move {
                    let _ = signal.await;
                })
                .await
                .unwrap();
        });
        Server {
            addr,
            connections,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// Serves a tonic service on a fresh port.
    pub async fn grpc<S>(service: S) -> Server
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, signal) = oneshot::channel::<()>();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = signal.await;
                })
                .await
                .unwrap();
        });
        Server {
            addr,
            connections: Arc::new(AtomicUsize::new(0)),
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// TCP connections accepted so far (axum servers only).
    pub fn connections(&self) -> usize {
        self.connections.load(SeqCst)
    }

    /// Shuts the server down gracefully, aborting it if that takes too long.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_LIMIT, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A port on which nothing listens: bound, then released.
pub async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// What happened to one handler call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Started(String),
    Completed(String),
    Cancelled(String),
}

#[derive(Default)]
struct Log {
    events: Mutex<Vec<Event>>,
    changed: Notify,
}

/// Records the fate of a server's handler calls; clones share the record.
#[derive(Clone)]
pub struct Tracker {
    log: Arc<Log>,
    release: Arc<watch::Sender<bool>>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            log: Arc::default(),
            release: Arc::new(watch::channel(false).0),
        }
    }
}

impl Tracker {
    /// Marks a handler call as started; the call counts as cancelled unless the
    /// returned guard is [`finish`](Call::finish)ed.
    pub fn start(&self, what: impl Into<String>) -> Call {
        let what = what.into();
        self.push(Event::Started(what.clone()));
        Call {
            tracker: self.clone(),
            what,
            finished: false,
        }
    }

    fn push(&self, event: Event) {
        self.log.events.lock().unwrap().push(event);
        self.log.changed.notify_waiters();
    }

    pub fn events(&self) -> Vec<Event> {
        self.log.events.lock().unwrap().clone()
    }

    pub fn count(&self, wanted: impl Fn(&Event) -> bool) -> usize {
        self.log
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| wanted(e))
            .count()
    }

    pub fn started(&self) -> usize {
        self.count(|e| matches!(e, Event::Started(_)))
    }

    pub fn completed(&self) -> usize {
        self.count(|e| matches!(e, Event::Completed(_)))
    }

    /// Waits until `done` holds for the events, at most [`OBSERVE_LIMIT`]; returns
    /// whether it did.
    pub async fn wait_until(&self, done: impl Fn(&[Event]) -> bool) -> bool {
        let wait = async {
            loop {
                let changed = self.log.changed.notified();
                tokio::pin!(changed);
                // Registered before the check, so that no change is missed.
                changed.as_mut().enable();
                if done(&self.log.events.lock().unwrap()) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(OBSERVE_LIMIT, wait).await.is_ok()
    }

    /// Waits until `n` calls have started.
    pub async fn wait_started(&self, n: usize) -> bool {
        self.wait_until(|events| {
            events
                .iter()
                .filter(|e| matches!(e, Event::Started(_)))
                .count()
                >= n
        })
        .await
    }

    /// Waits until `n` calls have been cancelled.
    pub async fn wait_cancelled(&self, n: usize) -> bool {
        self.wait_until(|events| {
            events
                .iter()
                .filter(|e| matches!(e, Event::Cancelled(_)))
                .count()
                >= n
        })
        .await
    }

    /// Resolves once the test calls [`release`](Tracker::release), or after
    /// [`HOLD_LIMIT`] in any case.
    pub async fn hold(&self) {
        let mut released = self.release.subscribe();
        let _ = tokio::time::timeout(HOLD_LIMIT, released.wait_for(|r| *r)).await;
    }

    /// Lets every held handler go on.
    pub fn release(&self) {
        self.release.send_replace(true);
    }
}

/// One handler call in flight; see [`Tracker::start`].
pub struct Call {
    tracker: Tracker,
    what: String,
    finished: bool,
}

impl Call {
    pub fn finish(mut self) {
        self.finished = true;
        self.tracker.push(Event::Completed(self.what.clone()));
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            self.tracker
                .push(Event::Cancelled(std::mem::take(&mut self.what)));
        }
    }
}

/// A hyper-util client taking the replayed body, over HTTP/1.1 or HTTP/2 (prior
/// knowledge).
pub fn client(http2: bool) -> Client<HttpConnector, ReplayBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http()
}

/// A hyper-util client for the tests' own requests.
pub fn test_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `req` with the test client and reads the whole answer.
pub async fn send(req: http::Request<Body>) -> (http::StatusCode, http::HeaderMap, Bytes) {
    use http_body_util::BodyExt;
    let response = tokio::time::timeout(OBSERVE_LIMIT, test_client().request(req))
        .await
        .expect("the server answers in time")
        .expect("the request reaches the server");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, bytes)
}

pub fn get(url: String) -> http::Request<Body> {
    http::Request::get(url).body(Body::empty()).unwrap()
}

pub fn post(url: String, body: impl Into<Body>) -> http::Request<Body> {
    http::Request::post(url).body(body.into()).unwrap()
}

/// An axum-ready branch that forwards each request to `target` with a hyper-util
/// client (HTTP/1.1 or HTTP/2); a request that fails becomes a `502`, so the branch is
/// `Infallible` like an axum route.
pub fn proxy(
    target: SocketAddr,
    http2: bool,
) -> tower::util::BoxCloneSyncService<
    http::Request<ReplayBody>,
    axum::response::Response,
    std::convert::Infallible,
> {
    use axum::response::IntoResponse;
    let client = client(http2);
    tower::util::BoxCloneSyncService::new(tower::service_fn(
        move |mut req: http::Request<ReplayBody>| {
            let client = client.clone();
            async move {
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                *req.uri_mut() = format!("http://{target}{path}").parse().unwrap();
                Ok(match client.request(req).await {
                    Ok(response) => response.map(Body::new),
                    Err(_) => http::StatusCode::BAD_GATEWAY.into_response(),
                })
            }
        },
    ))
}

/// A server whose `/slow/{id}` handler stays in flight until `calls` is released.
pub fn held_origin(calls: Tracker) -> Router {
    use axum::{extract::Path, routing::get};
    Router::new().route(
        "/slow/{id}",
        get(move |Path(id): Path<u32>| {
            let calls = calls.clone();
            async move {
                let call = calls.start(format!("/slow/{id}"));
                calls.hold().await;
                call.finish();
                format!("origin {id}")
            }
        }),
    )
}

/// A response body read as text.
pub fn text(body: &Bytes) -> &str {
    std::str::from_utf8(body).expect("a text body")
}

// ---- gRPC (tonic) helpers shared by the tonic tests ----

/// A tonic channel to a server on `addr`, connected.
pub async fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A health-check request for `service`.
pub fn ask(service: &str) -> tonic_health::pb::HealthCheckRequest {
    tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    }
}

/// The `x-served-by` metadata the test servers put on their answers.
pub fn served_by<T>(response: &tonic::Response<T>) -> &str {
    response
        .metadata()
        .get("x-served-by")
        .unwrap()
        .to_str()
        .unwrap()
}
