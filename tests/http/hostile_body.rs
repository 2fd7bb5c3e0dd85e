//! Request bodies that lie or misbehave, straight into `BufferBody`: size hints that
//! overflow or claim far more than is sent, bodies that are always ready and never
//! end, trailers that would slip past the cap, and the content types that decide
//! whether a refusal is an HTTP or a gRPC (or gRPC-Web) answer.

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
    time::Duration,
};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_backstop::{
    http::{accept::StatusIn, BufferBody, BufferBodyLayer, ReplayBody},
    FallbackLayer,
};

/// A body that yields scripted frames, one per poll, and reports the size hint
/// scripted for each point: `hints[i]` after `i` frames (the last one from then on).
struct Liar {
    frames: VecDeque<Frame<Bytes>>,
    hints: Vec<SizeHint>,
    polled: usize,
}

impl Liar {
    fn new(frames: impl IntoIterator<Item = Frame<Bytes>>, hints: Vec<SizeHint>) -> Self {
        Liar {
            frames: frames.into_iter().collect(),
            hints,
            polled: 0,
        }
    }
}

impl http_body::Body for Liar {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.polled += 1;
        Poll::Ready(self.frames.pop_front().map(Ok))
    }

    fn size_hint(&self) -> SizeHint {
        let last = self.hints.len() - 1;
        self.hints[self.polled.min(last)]
    }
}

fn data(bytes: &'static str) -> Frame<Bytes> {
    Frame::data(Bytes::from_static(bytes.as_bytes()))
}

type Log = Arc<Mutex<Vec<(Bytes, Option<HeaderMap>)>>>;

/// A branch that records the body and trailers it received and answers `status`.
fn recorder(
    status: StatusCode,
    log: Log,
) -> impl Service<Request<ReplayBody>, Response = Response<String>, Error = Infallible> + Clone {
    tower::service_fn(move |req: Request<ReplayBody>| {
        let log = log.clone();
        async move {
            let collected = req.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned();
            log.lock().unwrap().push((collected.to_bytes(), trailers));
            let mut response = Response::new(String::new());
            *response.status_mut() = status;
            Ok(response)
        }
    })
}

/// The layer with a cap of `max_bytes`, over a primary that misses and a fallback that
/// serves, both recording.
fn layer_with_cap(
    max_bytes: usize,
) -> (
    impl Service<Request<Liar>, Response = Response<String>, Error = Infallible>,
    Log,
    Log,
) {
    let (primary, fallback) = (Log::default(), Log::default());
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new().max_bytes(max_bytes))
        .layer(
            FallbackLayer::new(recorder(StatusCode::OK, fallback.clone()))
                .accept(StatusIn::SUCCESS),
        )
        .service(recorder(StatusCode::NOT_FOUND, primary.clone()));
    (svc, primary, fallback)
}

#[tokio::test]
async fn a_size_hint_jumping_to_u64_max_mid_stream_is_only_a_claim() {
    // Unknown at first, then "at least u64::MAX more" once the first chunk is out:
    // the sum of what is held and what is claimed overflowed (a panic in debug).
    // The body then ends after four bytes, and that is the body both branches get.
    let hints = vec![SizeHint::default(), SizeHint::with_exact(u64::MAX)];
    let body = Liar::new([data("ab"), data("cd")], hints);
    let (svc, primary, fallback) = layer_with_cap(1024);
    let Ok(response) = svc.oneshot(Request::post("/").body(body).unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    for log in [primary, fallback] {
        assert_eq!(log.lock().unwrap()[0].0, "ab".to_owned() + "cd");
    }
}

#[tokio::test]
async fn memory_follows_the_bytes_received_not_a_claimed_tebibyte() {
    // No cap to speak of, a body claiming 1 TiB and sending two bytes: the buffer
    // was sized by the claim (the process aborted, allocating 1 TiB).
    const TIB: u64 = 1 << 40;
    let body = Liar::new([data("a"), data("b")], vec![SizeHint::with_exact(TIB)]);
    let capacity = Arc::new(AtomicUsize::new(usize::MAX));
    let seen = capacity.clone();
    // One branch alone, so that the bytes it receives are not shared and their
    // buffer's capacity can be read back.
    let inner = tower::service_fn(move |req: Request<ReplayBody>| {
        let data = req.into_body().data().clone();
        assert_eq!(data, "ab");
        let buffer = data.try_into_mut().expect("the only reference");
        seen.store(buffer.capacity(), SeqCst);
        async { Ok::<_, Infallible>(Response::new(String::new())) }
    });
    let svc = BufferBody::new(inner).max_bytes(usize::MAX);
    let Ok(_) = svc.oneshot(Request::post("/").body(body).unwrap()).await;
    let capacity = capacity.load(SeqCst);
    assert!(capacity <= 4, "{capacity} bytes held for 2 received");
}

/// A body that is always ready with an empty data frame, `limit` times, then ends.
struct Spinning {
    frames: usize,
    limit: usize,
}

impl http_body::Body for Spinning {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.frames == self.limit {
            return Poll::Ready(None);
        }
        self.frames += 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::new()))))
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_always_ready_with_empty_frames_lets_a_timeout_fire() {
    // The body would end after 100,000 empty frames, so that reading it all in one
    // poll (the fault) ends this test, in failure, rather than hanging it.
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let inner = tower::service_fn(move |_: Request<ReplayBody>| {
        counted.fetch_add(1, SeqCst);
        async { Ok::<_, Infallible>(Response::new(String::new())) }
    });
    let svc = BufferBody::new(inner);
    let body = Spinning {
        frames: 0,
        limit: 100_000,
    };
    let call = svc.oneshot(Request::post("/").body(body).unwrap());
    // A task that always wakes itself keeps the paused clock from advancing on its
    // own: another task moves it, which it can only do if the buffer yields.
    let clock = tokio::spawn(tokio::time::advance(Duration::from_secs(2)));
    let outcome = tokio::time::timeout(Duration::from_secs(1), call).await;
    assert!(
        outcome.is_err(),
        "the timeout fired while the body was read"
    );
    assert_eq!(calls.load(SeqCst), 0, "and nothing was called");
    clock.await.unwrap();
}

fn trailers(value_len: usize) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    let value = HeaderValue::from_bytes(&vec![b'v'; value_len]).unwrap();
    trailers.insert("x-checksum", value);
    trailers
}

#[tokio::test]
async fn trailers_count_against_the_cap() {
    // A trailer field counts as HTTP/2 counts it: name (10) + value + 32.
    let field = |value_len: usize| 10 + value_len + 32;
    let cap: usize = 100;

    // Ten bytes of data and a field that brings the total to the cap: served.
    let fits = cap - 10 - field(0);
    let body = Liar::new(
        [data("0123456789"), Frame::trailers(trailers(fits))],
        vec![SizeHint::default()],
    );
    let (svc, primary, _) = layer_with_cap(cap);
    let Ok(response) = svc.oneshot(Request::post("/").body(body).unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(primary.lock().unwrap()[0].1, Some(trailers(fits)));

    // One byte more: refused, and no branch sees the request.
    let body = Liar::new(
        [data("0123456789"), Frame::trailers(trailers(fits + 1))],
        vec![SizeHint::default()],
    );
    let (svc, primary, fallback) = layer_with_cap(cap);
    let Ok(response) = svc.oneshot(Request::post("/").body(body).unwrap()).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(primary.lock().unwrap().is_empty() && fallback.lock().unwrap().is_empty());
}

/// The answer to a request of `content_type` whose body claims more than the cap.
async fn refused_as(content_type: &'static str) -> Response<String> {
    let body = Liar::new([data("x")], vec![SizeHint::with_exact(1 << 20)]);
    let req = Request::post("/pkg.Service/Method")
        .header(header::CONTENT_TYPE, content_type)
        .body(body)
        .unwrap();
    let (svc, _, _) = layer_with_cap(1024);
    let Ok(response) = svc.oneshot(req).await;
    response
}

#[tokio::test]
async fn grpc_media_types_are_recognised_in_any_case() {
    // RFC 9110 §8.3.1: type, subtype and parameter names are case-insensitive.
    for content_type in [
        "Application/GRPC",
        "APPLICATION/grpc+Proto",
        "application/gRPC; charset=utf-8",
    ] {
        let response = refused_as(content_type).await;
        assert_eq!(response.status(), StatusCode::OK, "{content_type}");
        assert_eq!(response.headers()["grpc-status"], "8", "{content_type}");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/grpc");
    }
}

#[tokio::test]
async fn a_longer_subtype_is_not_grpc() {
    // `application/grpc`, then the end, `+format` or parameters; anything else is
    // another media type, and gets an HTTP answer.
    for content_type in [
        "application/grpcfoo",
        "application/grpc-webfoo",
        "application/grpc-web-textual",
        "application/grpc-",
    ] {
        let response = refused_as(content_type).await;
        assert_eq!(
            response.status(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "{content_type}"
        );
        assert!(
            response.headers().get("grpc-status").is_none(),
            "{content_type}"
        );
    }
}

#[tokio::test]
async fn grpc_web_requests_are_refused_in_grpc_web_form() {
    // A gRPC-Web client reads a trailers-only answer (status in the headers) but
    // only under a gRPC-Web content type: the one tonic-web answers with.
    let cases = [
        ("application/grpc-web", "application/grpc-web+proto"),
        ("application/grpc-web+proto", "application/grpc-web+proto"),
        (
            "Application/gRPC-Web-Text",
            "application/grpc-web-text+proto",
        ),
        (
            "application/grpc-web-text+proto",
            "application/grpc-web-text+proto",
        ),
    ];
    for (request, answer) in cases {
        let response = refused_as(request).await;
        assert_eq!(response.status(), StatusCode::OK, "{request}");
        assert_eq!(response.headers()["grpc-status"], "8", "{request}");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            answer,
            "{request}"
        );
        assert_eq!(response.body(), "", "{request}: no message");
    }
}
