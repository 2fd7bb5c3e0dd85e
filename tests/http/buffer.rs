//! `BufferBody` in memory: what each branch receives, what is read and when, the cap,
//! failing bodies, and readiness.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
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
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_backstop::{
    http::{accept::RejectStatus, BufferBody, BufferBodyLayer, ReplayBody, DEFAULT_MAX_BYTES},
    Fallback, FallbackLayer,
};

/// A request body that yields scripted frames, one per poll, and counts its polls.
struct Scripted {
    frames: VecDeque<Result<Frame<Bytes>, std::io::Error>>,
    hint: SizeHint,
    polls: Arc<AtomicUsize>,
}

impl Scripted {
    fn new(frames: impl IntoIterator<Item = Result<Frame<Bytes>, std::io::Error>>) -> Self {
        Scripted {
            frames: frames.into_iter().collect(),
            hint: SizeHint::default(),
            polls: Arc::default(),
        }
    }

    fn chunks(chunks: &[&'static [u8]]) -> Self {
        Scripted::new(
            chunks
                .iter()
                .map(|c| Ok(Frame::data(Bytes::from_static(c)))),
        )
    }

    fn hint(mut self, hint: SizeHint) -> Self {
        self.hint = hint;
        self
    }

    fn polls(&self) -> Arc<AtomicUsize> {
        self.polls.clone()
    }
}

impl Body for Scripted {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.polls.fetch_add(1, SeqCst);
        Poll::Ready(self.frames.pop_front())
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// A body that says it is empty and must never be read.
struct Untouchable;

impl Body for Untouchable {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        panic!("a bodiless request's body was read")
    }

    fn is_end_stream(&self) -> bool {
        true
    }
}

/// An extension that must reach both branches.
#[derive(Clone, Debug, PartialEq)]
struct Tag(&'static str);

/// One request as a branch received it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    uri: String,
    version: Version,
    headers: HeaderMap,
    tag: Option<Tag>,
    body: Bytes,
    trailers: Option<HeaderMap>,
    /// Where the body's bytes were, to tell a shared buffer from a copy.
    data_ptr: usize,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A branch that records what it received and answers `status`.
fn recorder(
    name: &'static str,
    status: StatusCode,
    log: Log,
) -> impl Service<
    Request<ReplayBody>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |req: Request<ReplayBody>| {
        let log = log.clone();
        async move {
            let (parts, body) = req.into_parts();
            let data_ptr = body.data().as_ptr() as usize;
            let collected = body.collect().await.unwrap();
            let trailers = collected.trailers().cloned();
            log.lock().unwrap().push(Seen {
                method: parts.method,
                uri: parts.uri.to_string(),
                version: parts.version,
                headers: parts.headers,
                tag: parts.extensions.get::<Tag>().cloned(),
                body: collected.to_bytes(),
                trailers,
                data_ptr,
            });
            let mut response = Response::new(name.to_owned());
            *response.status_mut() = status;
            Ok(response)
        }
    })
}

fn request<B>(body: B) -> Request<B> {
    let mut req = Request::builder()
        .method(Method::PUT)
        .uri("http://example.test/item/7?x=1")
        .version(Version::HTTP_2)
        .header("x-key", "seven")
        .body(body)
        .unwrap();
    req.extensions_mut().insert(Tag("tagged"));
    req
}

/// A primary that rejects everything (404) and a fallback that serves (200), both
/// recording what they received.
fn both_branches() -> (
    impl Service<Request<Scripted>, Response = Response<String>, Error = Infallible> + Clone,
    Log,
    Log,
) {
    let (primary_log, fallback_log) = (Log::default(), Log::default());
    let svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new(recorder("fallback", StatusCode::OK, fallback_log.clone()))
                .accept(RejectStatus(StatusCode::NOT_FOUND))
                .buffer_bodies(),
        )
        .service(recorder(
            "primary",
            StatusCode::NOT_FOUND,
            primary_log.clone(),
        ));
    (svc, primary_log, fallback_log)
}

#[tokio::test]
async fn each_branch_gets_the_whole_request_and_body() {
    let (svc, primary_log, fallback_log) = both_branches();
    let body = Scripted::chunks(&[b"hello ", b"streamed ", b"world"]);
    let Ok(response) = svc.oneshot(request(body)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.into_body(), "fallback");

    for log in [primary_log, fallback_log] {
        let seen = log.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let seen = &seen[0];
        assert_eq!(seen.method, Method::PUT);
        assert_eq!(seen.uri, "http://example.test/item/7?x=1");
        assert_eq!(seen.version, Version::HTTP_2);
        assert_eq!(seen.headers["x-key"], "seven");
        assert_eq!(seen.tag, Some(Tag("tagged")));
        assert_eq!(seen.body, "hello streamed world");
        assert_eq!(seen.trailers, None);
    }
}

#[tokio::test]
async fn trailers_are_replayed_to_both_branches() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc"));
    let body = Scripted::new([
        Ok(Frame::data(Bytes::from_static(b"payload"))),
        Ok(Frame::trailers(trailers.clone())),
    ]);
    let (svc, primary_log, fallback_log) = both_branches();
    let Ok(_) = svc.oneshot(request(body)).await;
    for log in [primary_log, fallback_log] {
        let seen = log.lock().unwrap();
        assert_eq!(seen[0].body, "payload");
        assert_eq!(seen[0].trailers.as_ref(), Some(&trailers));
    }
}

#[tokio::test]
async fn a_body_in_one_chunk_is_shared_not_copied() {
    let chunk = Bytes::from(vec![7u8; 1000]);
    let original = chunk.as_ptr() as usize;
    let (svc, primary_log, fallback_log) = both_branches();
    let Ok(_) = svc
        .oneshot(request(Scripted::new([Ok(Frame::data(chunk))])))
        .await;
    // Both branches read the very bytes the body yielded.
    assert_eq!(primary_log.lock().unwrap()[0].data_ptr, original);
    assert_eq!(fallback_log.lock().unwrap()[0].data_ptr, original);
}

#[tokio::test]
async fn a_bodiless_request_is_passed_on_without_reading() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let inner = service_fn(move |req: Request<ReplayBody>| {
        seen.fetch_add(1, SeqCst);
        assert!(req.body().is_end_stream());
        async { Ok::<_, Infallible>(Response::new(String::from("ok"))) }
    });
    let mut svc = BufferBody::new(inner);
    let req = Request::get("/item/1").body(Untouchable).unwrap();
    let fut = ServiceExt::<Request<Untouchable>>::ready(&mut svc)
        .await
        .unwrap()
        .call(req);
    // Called from `call` itself, before the future is polled: nothing was awaited.
    assert_eq!(calls.load(SeqCst), 1);
    let Ok(response) = fut.await;
    assert_eq!(response.into_body(), "ok");
}

#[tokio::test]
async fn a_declared_oversize_body_is_refused_unread_and_reaches_no_branch() {
    // By the body's own size hint...
    let (svc, primary_log, fallback_log) = both_branches();
    let body = Scripted::chunks(&[b"never read"]).hint(SizeHint::with_exact(100_000));
    let polls = body.polls();
    let Ok(response) = svc.oneshot(request(body)).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(response.into_body(), "", "the body's `Default`");
    assert_eq!(polls.load(SeqCst), 0);

    // ...and by the `Content-Length` header.
    let (svc2, primary_log2, fallback_log2) = both_branches();
    let body = Scripted::chunks(&[b"never read"]);
    let polls = body.polls();
    let mut req = request(body);
    req.headers_mut().insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(DEFAULT_MAX_BYTES + 1),
    );
    let Ok(response) = svc2.oneshot(req).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(polls.load(SeqCst), 0);

    for log in [primary_log, fallback_log, primary_log2, fallback_log2] {
        assert!(log.lock().unwrap().is_empty(), "no branch was called");
    }
}

#[tokio::test]
async fn a_streamed_body_is_cut_off_as_soon_as_it_passes_the_cap() {
    let (primary_log, fallback_log) = (Log::default(), Log::default());
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new().max_bytes(10))
        .layer(FallbackLayer::new(recorder(
            "fallback",
            StatusCode::OK,
            fallback_log.clone(),
        )))
        .service(recorder("primary", StatusCode::OK, primary_log.clone()));

    // Exactly at the cap: served.
    let Ok(response) = svc
        .clone()
        .oneshot(request(Scripted::chunks(&[b"01234", b"56789"])))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(primary_log.lock().unwrap()[0].body, "0123456789");

    // One byte over, with no size announced: refused on the chunk that crosses the
    // cap, and the rest of the body is never read.
    let body = Scripted::chunks(&[b"01234", b"567890", b"never read"]);
    let polls = body.polls();
    let Ok(response) = svc.oneshot(request(body)).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(polls.load(SeqCst), 2);
    assert_eq!(
        primary_log.lock().unwrap().len(),
        1,
        "only the first request"
    );
    assert_eq!(fallback_log.lock().unwrap().len(), 0);
}

#[tokio::test]
async fn a_failing_body_is_a_bad_request_and_reaches_no_branch() {
    let (svc, primary_log, fallback_log) = both_branches();
    let body = Scripted::new([
        Ok(Frame::data(Bytes::from_static(b"partial"))),
        Err(std::io::Error::other("connection reset")),
    ]);
    let Ok(response) = svc.oneshot(request(body)).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(primary_log.lock().unwrap().is_empty());
    assert!(fallback_log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn grpc_requests_are_refused_with_grpc_statuses() {
    let grpc = |body: Scripted| {
        let mut req = request(body);
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        req
    };

    let (svc, _, _) = both_branches();
    let body = Scripted::chunks(&[b"x"]).hint(SizeHint::with_exact(1 << 20));
    let Ok(response) = svc.oneshot(grpc(body)).await;
    // Trailers-only: HTTP 200 with the status in the headers, as gRPC clients expect.
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "8", "RESOURCE_EXHAUSTED");
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/grpc");

    let (svc, _, _) = both_branches();
    let body = Scripted::new([Err(std::io::Error::other("broken"))]);
    let Ok(response) = svc.oneshot(grpc(body)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "13", "INTERNAL");
}

/// A service that insists on being readied before each call, and whose clones start
/// out un-readied.
struct MustBeReady {
    ready: bool,
    calls: Arc<AtomicUsize>,
}

impl Clone for MustBeReady {
    fn clone(&self) -> Self {
        MustBeReady {
            ready: false,
            calls: self.calls.clone(),
        }
    }
}

impl Service<Request<ReplayBody>> for MustBeReady {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody>) -> Self::Future {
        assert!(self.ready, "called without being readied");
        self.ready = false;
        self.calls.fetch_add(1, SeqCst);
        std::future::ready(Ok(Response::new(format!(
            "{} bytes",
            req.body().data().len()
        ))))
    }
}

#[tokio::test]
async fn the_readied_service_is_the_one_called_after_reading() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = BufferBody::new(MustBeReady {
        ready: false,
        calls: calls.clone(),
    });
    // Two requests readied and called back to back, their bodies read afterwards:
    // each future must carry the instance that was readied for it.
    let first = ServiceExt::<Request<Scripted>>::ready(&mut svc)
        .await
        .unwrap()
        .call(request(Scripted::chunks(&[b"abc"])));
    let second = ServiceExt::<Request<Scripted>>::ready(&mut svc)
        .await
        .unwrap()
        .call(request(Scripted::chunks(&[b"de"])));
    assert_eq!(
        calls.load(SeqCst),
        0,
        "nothing is called before its body is read"
    );
    let Ok(second) = second.await;
    let Ok(first) = first.await;
    assert_eq!(first.into_body(), "3 bytes");
    assert_eq!(second.into_body(), "2 bytes");
    assert_eq!(calls.load(SeqCst), 2);
}

#[tokio::test]
async fn a_fallback_service_buffers_with_one_call() {
    let (primary_log, fallback_log) = (Log::default(), Log::default());
    let svc = Fallback::new(
        recorder("primary", StatusCode::SERVICE_UNAVAILABLE, primary_log),
        recorder("fallback", StatusCode::OK, fallback_log.clone()),
    )
    .accept(tower_backstop::http::accept::RejectServerErrors)
    .buffer_bodies();
    assert_eq!(
        format!("{:?}", BufferBodyLayer::new()),
        "BufferBodyLayer { max_bytes: 65536 }"
    );
    let Ok(response) = svc.oneshot(request(Scripted::chunks(&[b"body"]))).await;
    assert_eq!(response.into_body(), "fallback");
    assert_eq!(fallback_log.lock().unwrap()[0].body, "body");
}

#[test]
fn replay_body_clones_share_bytes_and_replay_from_the_start() {
    let data = Bytes::from_static(b"replayed");
    let body = ReplayBody::new(data.clone());
    let copy = body.clone();
    assert_eq!(copy.data().as_ptr(), data.as_ptr());
    assert_eq!(body.size_hint().exact(), Some(8));
    assert!(!body.is_end_stream());
    assert!(ReplayBody::empty().is_end_stream());
    assert_eq!(format!("{body:?}"), "ReplayBody { len: 8, trailers: None }");

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let read = body.collect().await.unwrap().to_bytes();
        assert_eq!(read, "replayed");
        let again = copy.collect().await.unwrap().to_bytes();
        assert_eq!(again, "replayed");
    });
}
