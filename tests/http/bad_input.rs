//! Bad input: request bodies that never end, response bodies that never end, and
//! unusual header values. Each case ends with a clear status or error, nothing hangs,
//! and whatever reaches a branch reaches it intact.
//!
//! `Content-Length` and `Transfer-Encoding` headers that are malformed or lie are in
//! `framing.rs`; bodies whose size hints lie, that never yield, or whose trailers
//! would pass the cap, and the content types of gRPC refusals, in `hostile_body.rs`.
//!
//! Bodies over the cap and bodies failing mid-stream are in `buffer.rs`
//! (`a_streamed_body_is_cut_off_as_soon_as_it_passes_the_cap`,
//! `a_failing_body_is_a_bad_request_and_reaches_no_branch`) and `axum_stack.rs`
//! (`streamed_body_over_the_cap_is_refused`,
//! `a_body_cut_short_reaches_no_branch_and_hangs_nothing`); a timeout around the layer
//! cancelling both branches in flight is in `stacking.rs`.

use crate::{
    hyper_client::branch,
    support::{Server, Tracker, OBSERVE_LIMIT},
};
use axum::{
    body::Body,
    routing::{any, post},
    Router,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_backstop::{
    http::{accept::StatusIn, BufferBodyLayer, ReplayBody},
    FallbackLayer,
};

/// Counts things alive: `enter` on creation, the guard's drop on the way out.
#[derive(Clone, Default)]
struct Alive {
    live: Arc<AtomicUsize>,
}

impl Alive {
    fn enter(&self) -> Guard {
        self.live.fetch_add(1, SeqCst);
        Guard(self.live.clone())
    }

    fn live(&self) -> usize {
        self.live.load(SeqCst)
    }
}

struct Guard(Arc<AtomicUsize>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// A body that yields `first`, then never another frame, and never ends. Its
/// `Default` (which tower-http's timeout answers with) is empty and ends at once.
#[derive(Default)]
struct Endless {
    first: Option<Bytes>,
    // `None` for the empty default.
    alive: Option<Guard>,
}

impl Endless {
    fn new(first: &'static [u8], alive: &Alive) -> Self {
        Endless {
            first: Some(Bytes::from_static(first)),
            alive: Some(alive.enter()),
        }
    }
}

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.first.take() {
            Some(first) => Poll::Ready(Some(Ok(Frame::data(first)))),
            None if self.alive.is_none() => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.alive.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A branch that counts its calls and its response futures alive, and answers
/// `status` with `body()` — or, if `answer` is false, never.
fn probe<B>(
    status: StatusCode,
    calls: Arc<AtomicUsize>,
    futures: Alive,
    body: impl Fn() -> B + Clone + Send + 'static,
    answer: bool,
) -> impl Service<Request<ReplayBody>, Response = Response<B>, Error = Infallible, Future = impl Send>
       + Clone
where
    B: Send + 'static,
{
    tower::service_fn(move |_req: Request<ReplayBody>| {
        calls.fetch_add(1, SeqCst);
        let guard = futures.enter();
        let body = body.clone();
        async move {
            let _guard = guard;
            // Pending once, as over a network: the layer launches the other branch.
            tokio::task::yield_now().await;
            if !answer {
                std::future::pending::<()>().await;
            }
            let mut response = Response::new(body());
            *response.status_mut() = status;
            Ok(response)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_request_body_that_never_ends_is_cut_off_by_the_timeout_around_the_layer() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (futures, bodies) = (Alive::default(), Alive::default());
    let branch = |status| probe(status, calls.clone(), futures.clone(), String::new, true);
    let svc = ServiceBuilder::new()
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(1),
        ))
        .layer(BufferBodyLayer::new())
        .layer(FallbackLayer::new(branch(StatusCode::OK)).accept(StatusIn::SUCCESS))
        .service(branch(StatusCode::NOT_FOUND));

    let started = tokio::time::Instant::now();
    let req = Request::post("/upload")
        .body(Endless::new(b"the first chunk", &bodies))
        .unwrap();
    let Ok(response) = svc.oneshot(req).await;
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(1),
        "the timeout, exactly"
    );
    // The body was still being read: neither branch was called, and the body is gone.
    assert_eq!(calls.load(SeqCst), 0);
    assert_eq!(bodies.live(), 0, "the endless body was dropped");
}

#[tokio::test(start_paused = true)]
async fn a_response_body_that_never_ends_is_outside_the_layer_and_bounded_by_a_body_timeout() {
    // The primary's answer is accepted by its head; its body never ends. The layer
    // serves the head at once and drops the fallback; the body is the caller's to
    // bound, here with tower-http's `ResponseBodyTimeoutLayer`.
    let calls = Arc::new(AtomicUsize::new(0));
    let (futures, bodies) = (Alive::default(), Alive::default());
    let endless = {
        let bodies = bodies.clone();
        move || Endless::new(b"the first chunk", &bodies)
    };
    let primary = probe(
        StatusCode::OK,
        calls.clone(),
        futures.clone(),
        endless.clone(),
        true,
    );
    // The fallback never answers: it is in flight when the primary is accepted.
    let fallback = probe(
        StatusCode::OK,
        calls.clone(),
        futures.clone(),
        endless,
        false,
    );
    let svc = ServiceBuilder::new()
        .layer(tower_http::timeout::ResponseBodyTimeoutLayer::new(
            Duration::from_secs(2),
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            Duration::from_secs(1),
        ))
        .layer(FallbackLayer::new(fallback).accept(StatusIn::SUCCESS))
        .service(primary);

    let started = tokio::time::Instant::now();
    let req = Request::get("/stream").body(ReplayBody::empty()).unwrap();
    let Ok(response) = svc.oneshot(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(started.elapsed(), Duration::ZERO, "the head, at once");
    assert_eq!(calls.load(SeqCst), 2, "both branches were called");
    assert_eq!(
        futures.live(),
        0,
        "the fallback's future was dropped with the answer"
    );

    {
        let mut body = std::pin::pin!(response.into_body());
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "the first chunk");
        let error = body.frame().await.unwrap().unwrap_err();
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2),
            "the body timeout"
        );
        assert!(error.is::<tower_http::timeout::TimeoutError>(), "{error}");
    }
    assert_eq!(bodies.live(), 0, "the endless body went with its reader");
}

/// A front server whose `/upload` goes through the layer — a cache that misses, an
/// origin that serves, both counting their calls — inside `outer`, a timeout.
async fn upload_front<L>(outer: L, cache_calls: &Tracker, origin_calls: &Tracker) -> Server
where
    L: tower::Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
    L::Service: Service<axum::extract::Request, Error = Infallible> + Clone + Send + Sync + 'static,
    <L::Service as Service<axum::extract::Request>>::Response:
        axum::response::IntoResponse + 'static,
    <L::Service as Service<axum::extract::Request>>::Future: Send + 'static,
{
    let (cache, origin) = (cache_calls.clone(), origin_calls.clone());
    let origin = Router::new()
        .route(
            "/upload",
            post(move || {
                origin.start("/upload").finish();
                async { "stored" }
            }),
        )
        .map_request(|mut req: Request<ReplayBody>| {
            req.extensions_mut().clear();
            req
        });
    let app = Router::new()
        .route(
            "/upload",
            post(move || {
                cache.start("/upload").finish();
                async { StatusCode::NOT_FOUND }
            }),
        )
        .route_layer(
            FallbackLayer::new(origin)
                .accept(StatusIn::SUCCESS)
                .buffer_bodies(),
        )
        .layer(outer);
    Server::axum(app).await
}

/// Sends a chunked `POST /upload` whose body never ends — the head and one chunk, then
/// nothing, the connection held open — and returns the status line of the answer.
async fn endless_upload_over_http1(server: &Server) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = "POST /upload HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(b"5\r\nhello\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(OBSERVE_LIMIT, async {
        let mut buf = [0u8; 1024];
        while !answer.windows(2).any(|w| w == b"\r\n") {
            match stream.read(&mut buf).await.unwrap() {
                0 => break,
                n => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer while the body was still open");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_upload_over_http1_is_answered_408_by_the_timeout_around_the_layer() {
    let (cache_calls, origin_calls) = (Tracker::default(), Tracker::default());
    let timeout = tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        Duration::from_millis(300),
    );
    let server = upload_front(timeout, &cache_calls, &origin_calls).await;
    assert_eq!(
        endless_upload_over_http1(&server).await,
        "HTTP/1.1 408 Request Timeout"
    );
    // The body was never complete: neither branch was ever called.
    assert_eq!(cache_calls.started() + origin_calls.started(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_upload_with_a_body_timeout_is_a_bad_request() {
    // tower-http's `RequestBodyTimeoutLayer` makes a body that stalls fail; a body that
    // fails while being buffered is answered 400.
    let (cache_calls, origin_calls) = (Tracker::default(), Tracker::default());
    let timeout = tower_http::timeout::RequestBodyTimeoutLayer::new(Duration::from_millis(300));
    let server = upload_front(timeout, &cache_calls, &origin_calls).await;
    assert_eq!(
        endless_upload_over_http1(&server).await,
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(cache_calls.started() + origin_calls.started(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_upload_over_http2_is_answered_408_by_the_timeout_around_the_layer() {
    use futures_util::StreamExt;
    let (cache_calls, origin_calls) = (Tracker::default(), Tracker::default());
    let timeout = tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        Duration::from_millis(300),
    );
    let server = upload_front(timeout, &cache_calls, &origin_calls).await;

    let endless = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from_static(b"hello"))])
        .chain(futures_util::stream::pending());
    let req = Request::post(server.url("/upload"))
        .body(Body::from_stream(endless))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Body>();
    let response = tokio::time::timeout(OBSERVE_LIMIT, client.request(req))
        .await
        .expect("an answer while the body was still open")
        .unwrap();
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(cache_calls.started() + origin_calls.started(), 0);
    server.stop().await;
}

/// The header cases: (name, value) pairs, appended in this order.
fn header_cases() -> Vec<(&'static str, Vec<(HeaderName, HeaderValue)>)> {
    let name = HeaderName::from_static;
    vec![
        (
            // Bytes 0x80-0xFF are allowed in a field value (RFC 9110 `obs-text`), though
            // not UTF-8: `to_str` fails on them.
            "obs-text",
            vec![(
                name("x-obs-text"),
                HeaderValue::from_bytes(b"caf\xe9 \x80\xff end").unwrap(),
            )],
        ),
        (
            "empty value, inner whitespace",
            vec![
                (name("x-empty"), HeaderValue::from_static("")),
                (name("x-tabs"), HeaderValue::from_static("a\tb  c")),
            ],
        ),
        (
            "200 repeated",
            (0..200)
                .map(|i| (name("x-many"), HeaderValue::from(i)))
                .collect(),
        ),
        (
            "a 16 KiB value",
            vec![(
                name("x-large"),
                HeaderValue::from_bytes(&vec![b'v'; 16 * 1024]).unwrap(),
            )],
        ),
    ]
}

/// Whether `seen` has exactly the values of `sent` under each of its names, in order.
fn intact(sent: &[(HeaderName, HeaderValue)], seen: &HeaderMap) -> bool {
    sent.iter().all(|(name, _)| {
        let want = sent.iter().filter(|(n, _)| n == name).map(|(_, v)| v);
        want.eq(seen.get_all(name).iter())
    })
}

#[test]
fn values_http_refuses_never_reach_the_layer() {
    // What `HeaderValue` will not hold cannot be in a request: control characters
    // other than tab, and DEL. So "invalid" values reaching the layer are the odd but
    // valid ones below.
    for bad in [&b"a\nb"[..], b"a\rb", b"a\0b", b"a\x7fb"] {
        assert!(HeaderValue::from_bytes(bad).is_err(), "{bad:?}");
    }
}

/// One request as a branch received it.
#[derive(Clone, Debug)]
struct Seen {
    headers: HeaderMap,
    sensitive: Vec<bool>,
    body: Bytes,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A branch that records what it received and answers `status`.
fn recorder(
    status: StatusCode,
    log: Log,
) -> impl Service<
    Request<ReplayBody>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |req: Request<ReplayBody>| {
        let log = log.clone();
        async move {
            let (parts, body) = req.into_parts();
            let sensitive = parts
                .headers
                .get_all("x-secret")
                .iter()
                .map(HeaderValue::is_sensitive)
                .collect();
            let body = body.collect().await.unwrap().to_bytes();
            log.lock().unwrap().push(Seen {
                headers: parts.headers,
                sensitive,
                body,
            });
            let mut response = Response::new(String::from("recorded"));
            *response.status_mut() = status;
            Ok(response)
        }
    })
}

/// A primary that misses (404) and a fallback that serves, both recording.
fn recorded_branches() -> (
    impl Service<Request<Body>, Response = Response<String>, Error = Infallible> + Clone,
    Log,
    Log,
) {
    let (primary, fallback) = (Log::default(), Log::default());
    let svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new(recorder(StatusCode::OK, fallback.clone()))
                .accept(StatusIn::SUCCESS)
                .buffer_bodies(),
        )
        .service(recorder(StatusCode::NOT_FOUND, primary.clone()));
    (svc, primary, fallback)
}

#[tokio::test]
async fn unusual_header_values_reach_both_branches_intact() {
    let mut sent: Vec<_> = header_cases().into_iter().flat_map(|(_, h)| h).collect();
    let mut secret = HeaderValue::from_static("token");
    secret.set_sensitive(true);
    sent.push((HeaderName::from_static("x-secret"), secret));

    let (svc, primary, fallback) = recorded_branches();
    let mut req = Request::post("/item").body(Body::from("payload")).unwrap();
    for (name, value) in &sent {
        req.headers_mut().append(name.clone(), value.clone());
    }
    let original = req.headers().clone();
    let Ok(response) = svc.oneshot(req).await;
    assert_eq!(response.status(), StatusCode::OK);

    for log in [primary, fallback] {
        let seen = log.lock().unwrap();
        assert_eq!(seen.len(), 1);
        // Every value, byte for byte, every repetition in order, and nothing else.
        assert_eq!(seen[0].headers, original);
        assert!(intact(&sent, &seen[0].headers));
        assert_eq!(seen[0].headers.get_all("x-many").iter().count(), 200);
        // The flag that keeps a value out of logs and HPACK tables survives the copy.
        assert_eq!(seen[0].sensitive, [true]);
        assert_eq!(seen[0].body, "payload");
    }
}

/// A server on loopback that records the headers of every request and answers
/// `status`, on any method and path.
async fn recording_server(status: StatusCode, seen: Arc<Mutex<Vec<HeaderMap>>>) -> Server {
    Server::axum(Router::new().fallback(any(move |headers: HeaderMap| {
        seen.lock().unwrap().push(headers);
        async move { (status, "recorded") }
    })))
    .await
}

/// Sends each header case through the layer, whose branches are hyper-util clients to
/// two servers, and returns per case: the status served, and whether each server
/// received the request (with the headers intact: anything else fails here).
async fn headers_over_the_wire(http2: bool) -> Vec<(&'static str, StatusCode, bool, bool)> {
    let mut outcomes = Vec::new();
    for (case, headers) in header_cases() {
        let (primary_seen, fallback_seen) = (Arc::default(), Arc::default());
        let primary = recording_server(StatusCode::NOT_FOUND, Arc::clone(&primary_seen)).await;
        let fallback = recording_server(StatusCode::OK, Arc::clone(&fallback_seen)).await;
        let svc = ServiceBuilder::new()
            .layer(BufferBodyLayer::new())
            .layer(FallbackLayer::new(branch(fallback.addr, http2)).accept(StatusIn::SUCCESS))
            .service(branch(primary.addr, http2));
        let mut req = Request::post("http://app/item")
            .body(Body::from("payload"))
            .unwrap();
        for (name, value) in &headers {
            req.headers_mut().append(name.clone(), value.clone());
        }
        let response = tokio::time::timeout(OBSERVE_LIMIT, svc.oneshot(req))
            .await
            .unwrap_or_else(|_| panic!("{case} (http2: {http2}): no answer"))
            .unwrap_or_else(|e| panic!("{case} (http2: {http2}): {e}"));
        let mut reached = [false; 2];
        for (reached, seen) in reached.iter_mut().zip([primary_seen, fallback_seen]) {
            let seen = seen.lock().unwrap();
            assert!(seen.len() <= 1, "{case}: {} requests", seen.len());
            if let Some(seen) = seen.first() {
                assert!(intact(&headers, seen), "{case} (http2: {http2}): {seen:?}");
                *reached = true;
            }
        }
        outcomes.push((case, response.status(), reached[0], reached[1]));
        primary.stop().await;
        fallback.stop().await;
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_headers_over_http1_arrive_intact_or_are_refused_431() {
    // hyper's HTTP/1.1 server reads at most 100 header lines: beyond that it answers
    // 431 itself, to each branch, and the fallback's 431 is served. A 16 KiB value is
    // well within its 400 KiB buffer.
    assert_eq!(
        headers_over_the_wire(false).await,
        [
            ("obs-text", StatusCode::OK, true, true),
            ("empty value, inner whitespace", StatusCode::OK, true, true),
            (
                "200 repeated",
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                false,
                false
            ),
            ("a 16 KiB value", StatusCode::OK, true, true),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_headers_over_http2_arrive_intact_or_are_refused_431() {
    // hyper's HTTP/2 server has no limit on the number of fields but takes a header
    // list of at most 16 KiB (`max_header_list_size`): beyond that, 431.
    assert_eq!(
        headers_over_the_wire(true).await,
        [
            ("obs-text", StatusCode::OK, true, true),
            ("empty value, inner whitespace", StatusCode::OK, true, true),
            ("200 repeated", StatusCode::OK, true, true),
            (
                "a 16 KiB value",
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                false,
                false
            ),
        ]
    );
}
