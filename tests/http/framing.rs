//! Framing headers after buffering: what `Content-Length` and `Transfer-Encoding` say
//! must match the body forwarded to both branches, or the request is refused `400`,
//! as a proxy does (RFC 9110 §8.6, RFC 9112 §6). In memory, and through a real
//! front server whose branches are hyper-util clients.
//!
//! A hyper server never hands on a body that contradicts its headers; a layer outside
//! `BufferBody` that maps the body (and forgets the header) does, and so do
//! in-process callers.

use crate::support::{proxy, send, Server, OBSERVE_LIMIT};
use axum::{body::Body, routing::any, Router};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc, Mutex,
    },
    task::{Context, Poll},
};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_backstop::{
    http::{accept::StatusIn, BufferBodyLayer, ReplayBody},
    FallbackLayer,
};

/// A body that yields its chunks, one per poll, and counts the polls. It reports
/// `is_end_stream` honestly, so an empty one is a bodiless request.
struct Chunks {
    chunks: VecDeque<Bytes>,
    polls: Arc<AtomicUsize>,
}

impl Chunks {
    fn new(chunks: &[&'static str]) -> Self {
        Chunks {
            chunks: chunks
                .iter()
                .map(|c| Bytes::from_static(c.as_bytes()))
                .collect(),
            polls: Arc::default(),
        }
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.polls.fetch_add(1, SeqCst);
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// One request as a branch received it.
#[derive(Clone, Debug)]
struct Seen {
    headers: HeaderMap,
    body: Bytes,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn recorder(
    status: StatusCode,
    log: Log,
) -> impl Service<Request<ReplayBody>, Response = Response<String>, Error = Infallible> + Clone {
    tower::service_fn(move |req: Request<ReplayBody>| {
        let log = log.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            log.lock().unwrap().push(Seen {
                headers: parts.headers,
                body,
            });
            let mut response = Response::new(String::new());
            *response.status_mut() = status;
            Ok(response)
        }
    })
}

/// Sends `req` through the layer to a primary that misses and a fallback that
/// serves; returns the status and what each branch received.
async fn through_layer(req: Request<Chunks>) -> (StatusCode, Vec<Seen>, Vec<Seen>) {
    let (primary, fallback) = (Log::default(), Log::default());
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(
            FallbackLayer::new(recorder(StatusCode::OK, fallback.clone()))
                .accept(StatusIn::SUCCESS),
        )
        .service(recorder(StatusCode::NOT_FOUND, primary.clone()));
    let Ok(response) = svc.oneshot(req).await;
    let seen = |log: Log| log.lock().unwrap().clone();
    (response.status(), seen(primary), seen(fallback))
}

fn post(body: Chunks, headers: &[(header::HeaderName, &'static [u8])]) -> Request<Chunks> {
    let mut req = Request::post("/item").body(body).unwrap();
    for (name, value) in headers {
        req.headers_mut()
            .append(name.clone(), HeaderValue::from_bytes(value).unwrap());
    }
    req
}

#[tokio::test]
async fn a_body_longer_than_its_content_length_is_refused_at_the_first_byte_past_it() {
    let body = Chunks::new(&["012", "3456789", "never read"]);
    let polls = body.polls.clone();
    let req = post(body, &[(header::CONTENT_LENGTH, b"3")]);
    let (status, primary, fallback) = through_layer(req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(polls.load(SeqCst), 2, "read up to the first byte too many");
    assert!(
        primary.is_empty() && fallback.is_empty(),
        "no branch called"
    );
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_is_refused() {
    let req = post(Chunks::new(&["01234"]), &[(header::CONTENT_LENGTH, b"100")]);
    let (status, primary, fallback) = through_layer(req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        primary.is_empty() && fallback.is_empty(),
        "no branch called"
    );
}

#[tokio::test]
async fn a_bodiless_request_with_a_nonzero_content_length_is_refused() {
    let req = post(Chunks::new(&[]), &[(header::CONTENT_LENGTH, b"5")]);
    let (status, primary, fallback) = through_layer(req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        primary.is_empty() && fallback.is_empty(),
        "no branch called"
    );

    // `Content-Length: 0` says what an empty body is.
    let req = post(Chunks::new(&[]), &[(header::CONTENT_LENGTH, b"0")]);
    assert_eq!(through_layer(req).await.0, StatusCode::OK);
}

#[tokio::test]
async fn an_invalid_content_length_is_refused_unread() {
    // RFC 9112 §6.3: a request whose Content-Length is invalid is answered 400.
    // hyper's server refuses the same values on the wire.
    let values: [&[u8]; 8] = [
        b"abc",
        b"-1",
        b"+10",
        b"",
        b"10, 11",
        b"10,",
        b"99999999999999999999999",
        b"1\xff",
    ];
    for value in values {
        let body = Chunks::new(&["0123456789"]);
        let polls = body.polls.clone();
        let (status, primary, fallback) =
            through_layer(post(body, &[(header::CONTENT_LENGTH, value)])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{value:?}");
        assert_eq!(polls.load(SeqCst), 0, "{value:?}: refused unread");
        assert!(primary.is_empty() && fallback.is_empty(), "{value:?}");
    }
}

#[tokio::test]
async fn equal_repeated_content_lengths_are_forwarded_as_one_value() {
    // RFC 9110 §8.6: a recipient may replace a list of one repeated valid value by
    // a single value. The branches are never left to parse the list themselves.
    let lists: [&[(header::HeaderName, &[u8])]; 2] = [
        &[(header::CONTENT_LENGTH, b"10, 10")],
        &[
            (header::CONTENT_LENGTH, b"10"),
            (header::CONTENT_LENGTH, b"10"),
        ],
    ];
    for headers in lists {
        let (status, primary, fallback) =
            through_layer(post(Chunks::new(&["01234", "56789"]), headers)).await;
        assert_eq!(status, StatusCode::OK, "{headers:?}");
        for seen in [&primary[0], &fallback[0]] {
            let lengths: Vec<_> = seen
                .headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .collect();
            assert_eq!(lengths, ["10"], "{headers:?}");
            assert_eq!(seen.body, "0123456789");
        }
    }
}

#[tokio::test]
async fn a_transfer_encoding_not_ending_in_one_chunked_is_refused_unread() {
    // RFC 9112 §6.3: a request whose final transfer coding is not `chunked` has no
    // reliable length; §6.1: `chunked` is applied once.
    let values: [&[u8]; 5] = [
        b"gzip",
        b"chunked, gzip",
        b"chunked, chunked",
        b"",
        b"chunked;x=1",
    ];
    for value in values {
        let body = Chunks::new(&["0123456789"]);
        let polls = body.polls.clone();
        let (status, primary, fallback) =
            through_layer(post(body, &[(header::TRANSFER_ENCODING, value)])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{value:?}");
        assert_eq!(polls.load(SeqCst), 0, "{value:?}: refused unread");
        assert!(primary.is_empty() && fallback.is_empty(), "{value:?}");
    }
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_unread() {
    // RFC 9112 §6.1: a sign of request smuggling; a server may refuse it.
    let body = Chunks::new(&["0123456789"]);
    let polls = body.polls.clone();
    let headers: &[(header::HeaderName, &[u8])] = &[
        (header::TRANSFER_ENCODING, b"chunked"),
        (header::CONTENT_LENGTH, b"10"),
    ];
    let (status, primary, fallback) = through_layer(post(body, headers)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(polls.load(SeqCst), 0);
    assert!(primary.is_empty() && fallback.is_empty());
}

#[tokio::test]
async fn a_chunked_request_is_forwarded_with_its_transfer_encoding() {
    // `chunked` delimits any length, so it stays right for the buffered body:
    // forwarded as it came, codings (case) and all.
    for value in [&b"chunked"[..], b"gzip, Chunked"] {
        let headers = [(header::TRANSFER_ENCODING, value)];
        let (status, primary, fallback) =
            through_layer(post(Chunks::new(&["01234", "56789"]), &headers)).await;
        assert_eq!(status, StatusCode::OK);
        for seen in [&primary[0], &fallback[0]] {
            assert_eq!(seen.headers[header::TRANSFER_ENCODING], value);
            assert!(seen.headers.get(header::CONTENT_LENGTH).is_none());
            assert_eq!(seen.body, "0123456789");
        }
    }
}

/// A backend on loopback that records every request and answers `status`.
async fn backend(status: StatusCode, log: Log) -> Server {
    Server::axum(
        Router::new().fallback(any(move |headers: HeaderMap, body: Bytes| {
            log.lock().unwrap().push(Seen { headers, body });
            async move { (status, "recorded") }
        })),
    )
    .await
}

/// A front server whose requests have their body replaced by `body` (headers kept,
/// as a careless body-mapping layer does) before the layer, whose branches are
/// hyper-util clients to two backends. Returns the front's answer to `req` and
/// what each backend received.
async fn over_the_wire(
    http2: bool,
    body: &'static str,
    req: impl FnOnce(&Server) -> Request<Body>,
) -> (StatusCode, Vec<Seen>, Vec<Seen>) {
    let (primary_log, fallback_log) = (Log::default(), Log::default());
    let primary = backend(StatusCode::NOT_FOUND, primary_log.clone()).await;
    let fallback = backend(StatusCode::OK, fallback_log.clone()).await;
    let front = ServiceBuilder::new()
        .map_request(move |req: Request<Body>| req.map(|_| Body::from(body)))
        .layer(BufferBodyLayer::new())
        .layer(FallbackLayer::new(proxy(fallback.addr, http2)).accept(StatusIn::SUCCESS))
        .service(proxy(primary.addr, http2));
    let front = Server::serve(front).await;
    let (status, _, _) = send(req(&front)).await;
    // Whatever reached a backend has been recorded by the time the front answered.
    let seen = |log: Log| log.lock().unwrap().clone();
    let seen = (status, seen(primary_log), seen(fallback_log));
    front.stop().await;
    primary.stop().await;
    fallback.stop().await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_wire_a_stale_content_length_reaches_no_backend() {
    for http2 in [false, true] {
        // Says 3, the body forwarded is 10: a hyper client branch would send 3.
        let (status, primary, fallback) = over_the_wire(http2, "0123456789", |front| {
            crate::support::post(front.url("/item"), "abc")
        })
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "http2: {http2}");
        assert!(primary.is_empty() && fallback.is_empty(), "http2: {http2}");

        // Says 100, the body forwarded is 5: a hyper client branch would leave its
        // backend waiting for 95 more.
        let (status, primary, fallback) = tokio::time::timeout(
            OBSERVE_LIMIT * 2,
            over_the_wire(http2, "01234", |front| {
                crate::support::post(front.url("/item"), vec![b'x'; 100])
            }),
        )
        .await
        .expect("no hang");
        assert_eq!(status, StatusCode::BAD_REQUEST, "http2: {http2}");
        assert!(primary.is_empty() && fallback.is_empty(), "http2: {http2}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_wire_a_chunked_upload_reaches_both_backends_whole() {
    for http2 in [false, true] {
        let (primary_log, fallback_log) = (Log::default(), Log::default());
        let primary = backend(StatusCode::NOT_FOUND, primary_log.clone()).await;
        let fallback = backend(StatusCode::OK, fallback_log.clone()).await;
        let front = ServiceBuilder::new()
            .layer(BufferBodyLayer::new())
            .layer(FallbackLayer::new(proxy(fallback.addr, http2)).accept(StatusIn::SUCCESS))
            .service(proxy(primary.addr, http2));
        let front = Server::serve(front).await;
        // A streamed body of unknown length: the test client sends it chunked over
        // HTTP/1.1, and the front's branches forward `transfer-encoding: chunked`.
        let chunks = ["hello ", "chunked ", "world"].map(|c| Ok::<_, Infallible>(Bytes::from(c)));
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let (status, _, answer) = send(Request::post(front.url("/item")).body(body).unwrap()).await;
        assert_eq!(
            (status, &answer[..]),
            (StatusCode::OK, &b"recorded"[..]),
            "http2: {http2}"
        );
        for log in [primary_log, fallback_log] {
            let seen = log.lock().unwrap();
            assert_eq!(seen.len(), 1, "http2: {http2}");
            assert_eq!(seen[0].body, "hello chunked world", "http2: {http2}");
        }
        front.stop().await;
        primary.stop().await;
        fallback.stop().await;
    }
}
