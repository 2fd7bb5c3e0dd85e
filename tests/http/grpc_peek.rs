//! `PeekGrpcStatus` in memory, on tokio's paused clock: what it reads ahead, what it
//! records, what it replays, and how long it waits.

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use std::{
    convert::Infallible,
    future::Future,
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};
use tokio::{sync::mpsc, time::Instant};
use tower::{service_fn, Layer, ServiceExt};
use tower_backstop::{
    accept::Accept,
    http::{
        accept::GrpcStatus,
        grpc::{GrpcCode, PeekGrpcStatus, PeekGrpcStatusLayer, PeekedStatus, DEFAULT_MAX_WAIT},
        read::{IncompleteBody, ReadAheadBody},
    },
    FallbackLayer,
};

type Sent = Result<Frame<Bytes>, &'static str>;

/// A response body fed by the test, frame by frame; ends when the sender is dropped.
/// Counts how often it was polled and whether it was dropped.
struct Fed {
    frames: mpsc::UnboundedReceiver<Sent>,
    polls: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

impl Body for Fed {
    type Data = Bytes;
    type Error = &'static str;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Sent>> {
        self.polls.fetch_add(1, SeqCst);
        self.frames.poll_recv(cx)
    }
}

impl Drop for Fed {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, SeqCst);
    }
}

struct Feed {
    tx: mpsc::UnboundedSender<Sent>,
    polls: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

impl Feed {
    fn send(&self, frame: Sent) {
        self.tx.send(frame).unwrap();
    }
}

/// An HTTP `200` response whose body the returned feed controls.
fn fed(headers: &[(&'static str, &'static str)]) -> (Response<Fed>, Feed) {
    let (tx, frames) = mpsc::unbounded_channel();
    let (polls, dropped) = (Arc::default(), Arc::default());
    let body = Fed {
        frames,
        polls: Arc::clone(&polls),
        dropped: Arc::clone(&dropped),
    };
    let mut response = Response::new(body);
    for (name, value) in headers {
        response.headers_mut().insert(*name, value.parse().unwrap());
    }
    let feed = Feed { tx, polls, dropped };
    (response, feed)
}

fn trailers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(name, value)| (name.parse().unwrap(), value.parse().unwrap()))
        .collect()
}

/// Runs `response` through `PeekGrpcStatus` (as configured by `layer`).
async fn peek(layer: PeekGrpcStatusLayer, response: Response<Fed>) -> Response<ReadAheadBody<Fed>> {
    let mut response = Some(response);
    let server = service_fn(move |()| {
        let response = response.take().unwrap();
        async move { Ok::<_, Infallible>(response) }
    });
    layer.layer(server).oneshot(()).await.unwrap()
}

fn peeked<B>(response: &Response<B>) -> Option<GrpcCode> {
    response.extensions().get::<PeekedStatus>().map(|s| s.0)
}

fn incomplete<B>(response: &Response<B>) -> Option<IncompleteBody> {
    response.extensions().get::<IncompleteBody>().copied()
}

#[tokio::test(start_paused = true)]
async fn trailers_first_are_judged_and_replayed_unchanged() {
    let (response, feed) = fed(&[("content-type", "application/grpc")]);
    let sent = trailers(&[
        ("grpc-status", "5"),
        ("grpc-message", "no such key"),
        ("x-id", "7"),
    ]);
    feed.send(Ok(Frame::trailers(sent.clone())));
    drop(feed.tx);

    let response = peek(PeekGrpcStatusLayer::new(), response).await;
    assert_eq!(peeked(&response), Some(GrpcCode::NotFound));
    assert_eq!(GrpcCode::of_response(&response), Some(GrpcCode::NotFound));
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers(), Some(&sent));
    assert!(collected.to_bytes().is_empty());
}

#[tokio::test(start_paused = true)]
async fn trailers_without_a_status_are_unknown() {
    let (response, feed) = fed(&[]);
    feed.send(Ok(Frame::trailers(trailers(&[("x-id", "7")]))));
    let response = peek(PeekGrpcStatusLayer::new(), response).await;
    assert_eq!(peeked(&response), Some(GrpcCode::Unknown));
}

#[tokio::test(start_paused = true)]
async fn a_status_in_the_trailers_is_parsed_as_tonic_parses_it() {
    for value in ["05", "+5", "17"] {
        let (response, feed) = fed(&[]);
        feed.send(Ok(Frame::trailers(trailers(&[("grpc-status", value)]))));
        let response = peek(PeekGrpcStatusLayer::new(), response).await;
        assert_eq!(peeked(&response), Some(GrpcCode::Unknown), "{value}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_message_first_is_handed_on_at_once_and_replayed() {
    let (response, feed) = fed(&[]);
    feed.send(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02\x08\x01"))));
    let start = Instant::now();
    let response = peek(PeekGrpcStatusLayer::new(), response).await;
    // Not a moment waited for the rest: the status comes after the message.
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(peeked(&response), None);
    assert_eq!(GrpcCode::of_response(&response), None);

    let sent = trailers(&[("grpc-status", "0"), ("x-id", "7")]);
    feed.send(Ok(Frame::trailers(sent.clone())));
    drop(feed.tx);
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers(), Some(&sent));
    assert_eq!(collected.to_bytes(), &b"\0\0\0\0\x02\x08\x01"[..]);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_ends_without_a_frame_is_unknown() {
    let (response, feed) = fed(&[]);
    drop(feed.tx);
    let response = peek(PeekGrpcStatusLayer::new(), response).await;
    assert_eq!(peeked(&response), Some(GrpcCode::Unknown));
    let mut body = response.into_body();
    assert!(body.is_end_stream());
    let polls = feed.polls.load(SeqCst);
    assert!(body.frame().await.is_none());
    // The ended body is not polled again.
    assert_eq!(feed.polls.load(SeqCst), polls);
}

#[tokio::test(start_paused = true)]
async fn an_error_before_any_frame_is_unknown_and_replayed() {
    let (response, feed) = fed(&[]);
    feed.send(Err("stream reset"));
    let response = peek(PeekGrpcStatusLayer::new(), response).await;
    assert_eq!(peeked(&response), Some(GrpcCode::Unknown));
    assert_eq!(incomplete(&response), Some(IncompleteBody::Failed));
    let error = response.into_body().frame().await.unwrap().unwrap_err();
    assert_eq!(error, "stream reset");
}

#[tokio::test(start_paused = true)]
async fn a_status_in_the_head_is_not_read_ahead() {
    let (response, feed) = fed(&[("grpc-status", "5")]);
    let response = peek(PeekGrpcStatusLayer::new(), response).await;
    assert_eq!(feed.polls.load(SeqCst), 0);
    assert_eq!(peeked(&response), None);
    assert_eq!(GrpcCode::of_response(&response), Some(GrpcCode::NotFound));
}

#[tokio::test(start_paused = true)]
async fn pass_through_never_reads_ahead() {
    let (response, feed) = fed(&[]);
    let start = Instant::now();
    let response = peek(PeekGrpcStatusLayer::pass_through(), response).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(feed.polls.load(SeqCst), 0);
    assert_eq!(peeked(&response), None);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_never_yields_is_marked_timed_out_after_max_wait_and_not_lost() {
    let (response, feed) = fed(&[]);
    let start = Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(60),
        peek(PeekGrpcStatusLayer::new(), response),
    )
    .await
    .expect("handed on within the bound");
    assert_eq!(start.elapsed(), DEFAULT_MAX_WAIT);
    assert_eq!(DEFAULT_MAX_WAIT, Duration::from_secs(1));
    assert_eq!(peeked(&response), None, "status unknown");
    // Marked, so that a predicate can tell "nothing came in time" from "a message came".
    assert_eq!(incomplete(&response), Some(IncompleteBody::TimedOut));
    let result = Ok::<_, Infallible>(response);
    assert!(!GrpcStatus::new().accept(&result), "rejected");
    let Ok(response) = result;

    // What the server sends later reaches the caller, all of it.
    feed.send(Ok(Frame::data(Bytes::from_static(b"late"))));
    let sent = trailers(&[("grpc-status", "0")]);
    feed.send(Ok(Frame::trailers(sent.clone())));
    drop(feed.tx);
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers(), Some(&sent));
    assert_eq!(collected.to_bytes(), "late");
}

#[tokio::test(start_paused = true)]
async fn max_wait_is_configurable() {
    let (response, _feed) = fed(&[]);
    let start = Instant::now();
    let layer = PeekGrpcStatusLayer::new().max_wait(Duration::from_millis(30));
    tokio::time::timeout(Duration::from_secs(60), peek(layer, response))
        .await
        .expect("handed on within the bound");
    assert_eq!(start.elapsed(), Duration::from_millis(30));
}

/// Always ready with an empty data frame, then (after many) the trailers.
struct Empties(Arc<AtomicUsize>);

const EMPTIES: usize = 100_000;

impl Body for Empties {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0.fetch_add(1, SeqCst) < EMPTIES {
            Poll::Ready(Some(Ok(Frame::data(Bytes::new()))))
        } else {
            Poll::Ready(Some(Ok(Frame::trailers(HeaderMap::new()))))
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_of_empty_frames_yields_between_polls_and_ends_within_max_wait() {
    let polls = Arc::new(AtomicUsize::new(0));
    let body = Empties(Arc::clone(&polls));
    let mut response = Some(Response::new(body));
    let server = service_fn(move |()| {
        let response = response.take().unwrap();
        async move { Ok::<_, Infallible>(response) }
    });
    let start = Instant::now();
    let mut fut = pin!(PeekGrpcStatus::new(server).oneshot(()));

    // One poll returns: it skips a few empty frames, then yields to the runtime.
    let waker = futures_util::task::noop_waker();
    let first = fut.as_mut().poll(&mut Context::from_waker(&waker));
    assert!(first.is_pending());
    assert!(
        polls.load(SeqCst) <= 64,
        "{} frames in one poll",
        polls.load(SeqCst)
    );

    // The task never goes idle, so the paused clock does not advance by itself: move
    // it by hand between polls.
    let mut rounds = 0;
    let response = loop {
        if let Poll::Ready(result) = fut.as_mut().poll(&mut Context::from_waker(&waker)) {
            break result.unwrap();
        }
        rounds += 1;
        assert!(rounds <= 20, "still reading after {:?}", start.elapsed());
        tokio::time::advance(Duration::from_millis(100)).await;
    };
    let waited = start.elapsed();
    assert!(waited >= DEFAULT_MAX_WAIT, "{waited:?}");
    assert!(
        waited <= DEFAULT_MAX_WAIT + Duration::from_millis(100),
        "{waited:?}"
    );
    assert_eq!(peeked(&response), None);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_while_reading_drops_the_response() {
    let (response, feed) = fed(&[]);
    let mut response = Some(response);
    let server = service_fn(move |()| {
        let response = response.take().unwrap();
        async move { Ok::<_, Infallible>(response) }
    });
    let fut = PeekGrpcStatus::new(server).oneshot(());
    // The body has nothing yet: the future is left reading it.
    assert!(tokio::time::timeout(Duration::from_millis(10), fut)
        .await
        .is_err());
    assert!(feed.polls.load(SeqCst) > 0);
    assert_eq!(feed.dropped.load(SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn the_fallback_is_served_when_the_trailers_reject_the_primary() {
    let primary = service_fn(|()| async {
        let (response, feed) = fed(&[("content-type", "application/grpc")]);
        feed.send(Ok(Frame::trailers(trailers(&[("grpc-status", "5")]))));
        Ok::<_, Infallible>(response)
    });
    let fallback = service_fn(|()| async {
        let (response, feed) = fed(&[("x-served-by", "fallback")]);
        feed.send(Ok(Frame::data(Bytes::from_static(b"row"))));
        Ok::<_, Infallible>(response)
    });
    let layer = FallbackLayer::new(fallback)
        .accept(GrpcStatus::new())
        .peek_grpc_status();
    let response = layer.layer(primary).oneshot(()).await.unwrap();
    assert_eq!(response.headers()["x-served-by"], "fallback");
    // Without the layer, the same answer is accepted: its head has no status.
    let primary = service_fn(|()| async {
        let (response, feed) = fed(&[("content-type", "application/grpc")]);
        feed.send(Ok(Frame::trailers(trailers(&[("grpc-status", "5")]))));
        Ok::<_, Infallible>(response)
    });
    let fallback =
        service_fn(|()| async { Ok::<_, Infallible>(fed(&[("x-served-by", "fallback")]).0) });
    let plain = FallbackLayer::new(fallback).accept(GrpcStatus::new());
    let response = plain.layer(primary).oneshot(()).await.unwrap();
    assert!(!response.headers().contains_key("x-served-by"));
}

#[tokio::test(start_paused = true)]
async fn peek_combines_with_marking_in_either_order_and_takes_its_own_wait() {
    use tower_backstop::http::{ServedBy, X_SERVED_BY};
    let primary = || {
        service_fn(|()| async {
            let (response, feed) = fed(&[("content-type", "application/grpc")]);
            feed.send(Ok(Frame::trailers(trailers(&[("grpc-status", "5")]))));
            Ok::<_, Infallible>(response)
        })
    };
    let fallback = || service_fn(|()| async { Ok::<_, Infallible>(fed(&[]).0) });
    let wait = PeekGrpcStatusLayer::new().max_wait(Duration::from_millis(20));

    // Peek, then mark: the trailers' NOT_FOUND is judged, the fallback serves and is marked.
    let peek_first = FallbackLayer::new(fallback())
        .peek_grpc_status_with(wait)
        .accept(GrpcStatus::new())
        .mark_served_by(Some(X_SERVED_BY));
    let response = peek_first.layer(primary()).oneshot(()).await.unwrap();
    assert_eq!(response.headers()[X_SERVED_BY], "fallback");
    assert_eq!(
        response.extensions().get::<ServedBy>(),
        Some(&ServedBy::Fallback)
    );

    // Mark, then peek: the same answer.
    let mark_first = FallbackLayer::new(fallback())
        .mark_served_by(Some(X_SERVED_BY))
        .accept(GrpcStatus::new())
        .peek_grpc_status_with(wait);
    let response = mark_first.layer(primary()).oneshot(()).await.unwrap();
    assert_eq!(response.headers()[X_SERVED_BY], "fallback");

    // The custom wait applies: a primary whose first frame never comes is rejected
    // after 20 ms rather than the default second, and the fallback serves.
    let silent = service_fn(|()| async {
        let (response, feed) = fed(&[("content-type", "application/grpc")]);
        std::mem::forget(feed);
        Ok::<_, Infallible>(response)
    });
    let layer = FallbackLayer::new(fallback())
        .accept(GrpcStatus::new())
        .mark_served_by(Some(X_SERVED_BY))
        .peek_grpc_status_with(wait);
    let start = Instant::now();
    let response = layer.layer(silent).oneshot(()).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(20));
    assert_eq!(response.headers()[X_SERVED_BY], "fallback");
}
