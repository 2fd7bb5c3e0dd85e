//! `read_primary_body` against real servers on loopback: a primary that sends `200`
//! headers and then stalls its body, one whose body is over the cap or claims to be,
//! and a hit whose body (and trailers) arrive in time, through hyper-util clients.
//! The predicates over the body, on an axum router in memory.
//!
//! These run on the real clock, against real sockets: the waits are small, and no
//! outcome depends on how fast anything is — a stalled primary never finishes, a held
//! fallback never answers.

use crate::support::{proxy, text, Server, Tracker, OBSERVE_LIMIT};

/// The first bytes of a body, as text: enough to tell whose answer it is.
fn head(body: &Bytes) -> &str {
    std::str::from_utf8(&body[..body.len().min(40)]).expect("a text body")
}
use axum::{body::Body, routing::get, Router};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Request, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, StreamBody};
use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};
use tower::{Layer, ServiceExt};
use tower_backstop::{
    accept::And,
    http::{
        accept::{AcceptBody, RejectBody, StatusIn},
        read::ReadBodyLayer,
    },
    launch::Launch,
    FallbackLayer,
};

/// A body that sends `first`, then never yields again.
fn stalls_after(first: &'static str) -> Body {
    let chunk =
        futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from_static(first.as_bytes()))]);
    Body::from_stream(chunk.chain(futures_util::stream::pending()))
}

/// A body that claims `claim` bytes (hyper's server sends that `Content-Length`),
/// sends three, and stalls.
struct Claims {
    claim: u64,
    sent: bool,
}

impl http_body::Body for Claims {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if std::mem::replace(&mut self.sent, true) {
            return Poll::Pending;
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"abc")))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.claim)
    }
}

/// The primary's server: `/stall` sends `200` headers and part of a body, then
/// nothing; `/headers-only` sends only the headers; `/big` streams 4 KiB in 1 KiB
/// chunks (no `Content-Length`); `/claims` says `Content-Length: 10^12`; `/hit` sends
/// two chunks and trailers.
async fn primary() -> Server {
    let router = Router::new()
        .route("/stall", get(|| async { stalls_after("{\"partial\":") }))
        .route("/headers-only", get(|| async { stalls_after("") }))
        .route(
            "/big",
            get(|| async {
                let chunks = (0..4).map(|_| Ok::<_, Infallible>(Bytes::from(vec![b'x'; 1024])));
                Body::from_stream(futures_util::stream::iter(chunks))
            }),
        )
        .route(
            "/claims",
            get(|| async {
                Body::new(Claims {
                    claim: 1_000_000_000_000,
                    sent: false,
                })
            }),
        )
        .route(
            "/hit",
            get(|| async {
                let frames = [
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"hello, "))),
                    Ok(Frame::data(Bytes::from_static(b"world"))),
                    Ok(Frame::trailers(hit_trailers())),
                ];
                Body::new(StreamBody::new(futures_util::stream::iter(frames)))
            }),
        );
    Server::axum(router).await
}

fn hit_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "c0ffee".parse().unwrap());
    trailers
}

/// The fallback's server: answers every path after 5 ms.
async fn answering() -> Server {
    let router = Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        "from the fallback"
    });
    Server::axum(router).await
}

/// The stack under test: both branches proxied with hyper-util, the primary's body
/// read within 50 ms and up to 2 KiB.
fn stack(
    primary: &Server,
    fallback: &Server,
    http2: bool,
) -> impl tower::Service<
    Request<Body>,
    Response = http::Response<tower_backstop::http::read::ReadAheadBody<Body>>,
    Error = Infallible,
> {
    FallbackLayer::new(proxy(fallback.addr, http2))
        .accept(StatusIn::SUCCESS)
        .launch(Launch::Concurrent)
        .read_primary_body_with(
            ReadBodyLayer::new()
                .max_bytes(2048)
                .max_wait(Duration::from_millis(50)),
        )
        .buffer_bodies()
        .layer(proxy(primary.addr, http2))
}

/// Sends a `GET` for `path` through `svc` and reads the whole answer, within
/// [`OBSERVE_LIMIT`].
async fn fetch<S>(svc: S, path: &str) -> (StatusCode, Bytes, Option<HeaderMap>)
where
    S: tower::Service<
        Request<Body>,
        Response = http::Response<tower_backstop::http::read::ReadAheadBody<Body>>,
        Error = Infallible,
    >,
{
    let req = Request::get(path).body(Body::empty()).unwrap();
    let answer = async {
        let Ok(response) = svc.oneshot(req).await;
        let status = response.status();
        let collected = response.into_body().collect().await.unwrap();
        (status, collected.trailers().cloned(), collected.to_bytes())
    };
    let (status, trailers, bytes) = tokio::time::timeout(OBSERVE_LIMIT, answer)
        .await
        .expect("answered, body and all, not left waiting on the primary's body");
    (status, bytes, trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_stalls_after_its_headers_is_rejected_and_the_fallback_serves() {
    let (primary, fallback) = (primary().await, answering().await);
    for http2 in [false, true] {
        for path in ["/stall", "/headers-only"] {
            let (status, body, _) = fetch(stack(&primary, &fallback, http2), path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(text(&body), "from the fallback", "{path}, http2: {http2}");
        }
    }
    fallback.stop().await;
    drop(primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_cap_or_claiming_to_be_is_rejected() {
    let (primary, fallback) = (primary().await, answering().await);
    for http2 in [false, true] {
        // 4 KiB against a 2 KiB cap: read up to the chunk that crosses it.
        let (_, body, _) = fetch(stack(&primary, &fallback, http2), "/big").await;
        assert_eq!(head(&body), "from the fallback");
        // A TB by its `Content-Length`: refused before a byte is read, not after a
        // wait for bytes that never come.
        let (_, body, _) = fetch(stack(&primary, &fallback, http2), "/claims").await;
        assert_eq!(head(&body), "from the fallback");
    }
    fallback.stop().await;
    drop(primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_whose_body_arrives_in_time_reaches_the_caller_byte_for_byte_with_trailers() {
    let primary = primary().await;
    // A fallback that never answers: only the primary can.
    let calls = Tracker::default();
    let held = calls.clone();
    let fallback = Server::axum(Router::new().fallback(move || {
        let calls = held.clone();
        async move {
            let call = calls.start("fallback");
            calls.hold().await;
            call.finish();
            "from the fallback"
        }
    }))
    .await;
    // Trailers over HTTP/2; over HTTP/1.1 the body alone (chunked).
    for http2 in [true, false] {
        let svc = FallbackLayer::new(proxy(fallback.addr, http2))
            .accept(StatusIn::SUCCESS)
            .read_primary_body()
            .buffer_bodies()
            .layer(proxy(primary.addr, http2));
        let (status, body, trailers) = fetch(svc, "/hit").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(text(&body), "hello, world");
        if http2 {
            assert_eq!(trailers, Some(hit_trailers()));
        }
    }
    calls.release();
    fallback.stop().await;
    primary.stop().await;
}

/// A cache as an axum router: `/empty` answers `200` with no body, `/missing`
/// `{"found":false}`, `/present` a row.
fn cache() -> Router {
    Router::new()
        .route("/empty", get(|| async { StatusCode::OK }))
        .route("/missing", get(|| async { "{\"found\":false}" }))
        .route("/present", get(|| async { "{\"found\":true,\"id\":7}" }))
}

async fn served(app: Router, path: &str) -> String {
    let req = Request::get(path).body(Body::empty()).unwrap();
    let Ok(response) = app.oneshot(req).await;
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn a_predicate_over_the_body_is_one_line() {
    let database = || get(|| async { "from the database" });

    // A cache that answers `200` with an empty body on a miss.
    let app = cache().layer(
        FallbackLayer::new(database())
            .accept(And::new(StatusIn::SUCCESS, RejectBody::EMPTY))
            .read_primary_body()
            .buffer_bodies(),
    );
    assert_eq!(served(app.clone(), "/empty").await, "from the database");
    assert_eq!(served(app, "/present").await, "{\"found\":true,\"id\":7}");

    // One that answers `{"found":false}`.
    let app = cache().layer(
        FallbackLayer::new(database())
            .accept(RejectBody::equal_to(b"{\"found\":false}"))
            .read_primary_body()
            .buffer_bodies(),
    );
    assert_eq!(served(app.clone(), "/missing").await, "from the database");
    assert_eq!(served(app, "/present").await, "{\"found\":true,\"id\":7}");

    // Any test on the bytes.
    let app = cache().layer(
        FallbackLayer::new(database())
            .accept(AcceptBody::new(|body| body.starts_with(b"{\"found\":true")))
            .read_primary_body()
            .buffer_bodies(),
    );
    assert_eq!(served(app.clone(), "/missing").await, "from the database");
    assert_eq!(served(app.clone(), "/empty").await, "from the database");
    assert_eq!(served(app, "/present").await, "{\"found\":true,\"id\":7}");
}
