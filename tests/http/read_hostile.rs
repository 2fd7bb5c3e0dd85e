//! `ReadBody` in memory, on tokio's paused clock: bodies that lie about their size,
//! never yield, are always ready, fail midway or run over the cap; what is marked,
//! what is replayed, and when a stalled primary gives way to the fallback.

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::{
    collections::VecDeque,
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
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};
use tower_backstop::{
    accept::Accept,
    http::{
        accept::{AcceptBody, GrpcStatus, RejectBody, RejectServerErrors, RejectStatus, StatusIn},
        read::{
            IncompleteBody, ReadAheadBody, ReadBody, ReadBodyLayer, DEFAULT_MAX_BYTES,
            DEFAULT_MAX_WAIT,
        },
    },
    Fallback,
};

type Sent = Result<Frame<Bytes>, &'static str>;

/// A body that yields scripted frames, one per poll, then (if `stall`) never again;
/// reports the size hint scripted for each point (`hints[i]` after `i` frames, the
/// last from then on) and counts its polls.
struct Script {
    frames: VecDeque<Sent>,
    stall: bool,
    hints: Vec<SizeHint>,
    taken: usize,
    polls: Arc<AtomicUsize>,
}

impl Script {
    fn new(frames: impl IntoIterator<Item = Sent>) -> Self {
        Script {
            frames: frames.into_iter().collect(),
            stall: false,
            hints: vec![SizeHint::default()],
            taken: 0,
            polls: Arc::default(),
        }
    }

    fn stalling(mut self) -> Self {
        self.stall = true;
        self
    }

    fn hints(mut self, hints: Vec<SizeHint>) -> Self {
        self.hints = hints;
        self
    }
}

impl Body for Script {
    type Data = Bytes;
    type Error = &'static str;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Sent>> {
        self.polls.fetch_add(1, SeqCst);
        match self.frames.pop_front() {
            Some(frame) => {
                self.taken += 1;
                Poll::Ready(Some(frame))
            }
            // Never woken: the test's paused clock moves on to the timer.
            None if self.stall => Poll::Pending,
            None => Poll::Ready(None),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hints[self.taken.min(self.hints.len() - 1)]
    }
}

fn data(bytes: &'static str) -> Sent {
    Ok(Frame::data(Bytes::from_static(bytes.as_bytes())))
}

fn trailers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(name, value)| (name.parse().unwrap(), value.parse().unwrap()))
        .collect()
}

/// A service that answers its one call with `response`.
fn answers<B>(
    response: Response<B>,
) -> impl tower::Service<(), Response = Response<B>, Error = Infallible, Future = impl Send>
where
    B: Send + 'static,
{
    let mut response = Some(response);
    service_fn(move |()| {
        let response = response.take().expect("called once");
        async move { Ok::<_, Infallible>(response) }
    })
}

/// Runs a `200` with `body` through `ReadBody` as `layer` configures it.
async fn read(layer: ReadBodyLayer, body: Script) -> Response<ReadAheadBody<Script>> {
    let server = answers(Response::new(body));
    tokio::time::timeout(Duration::from_secs(60), layer.layer(server).oneshot(()))
        .await
        .expect("handed on within the bound")
        .unwrap()
}

fn incomplete<B>(response: &Response<B>) -> Option<IncompleteBody> {
    response.extensions().get::<IncompleteBody>().copied()
}

/// Every frame the body yields to the caller: data as text, trailers, the error.
async fn replay(body: ReadAheadBody<Script>) -> (String, Option<HeaderMap>, Option<&'static str>) {
    let mut body = pin!(body);
    let (mut text, mut trailers) = (String::new(), None);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(chunk) => text.push_str(std::str::from_utf8(&chunk).unwrap()),
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
            Err(error) => return (text, trailers, Some(error)),
        }
    }
    (text, trailers, None)
}

#[test]
fn the_defaults_are_documented() {
    assert_eq!(DEFAULT_MAX_BYTES, 1024 * 1024);
    assert_eq!(DEFAULT_MAX_WAIT, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_whole_body_is_judged_and_replayed_byte_for_byte_with_its_trailers() {
    let sent = trailers(&[("x-checksum", "c0ffee"), ("grpc-status", "0")]);
    let body = Script::new([
        data("hello, "),
        data(""),
        data("world"),
        Ok(Frame::trailers(sent.clone())),
    ]);
    let start = Instant::now();
    let response = read(ReadBodyLayer::new(), body).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(incomplete(&response), None);
    assert_eq!(response.body().whole().unwrap(), "hello, world");
    assert_eq!(response.body().trailers(), Some(&sent));
    assert_eq!(
        replay(response.into_body()).await,
        ("hello, world".into(), Some(sent), None)
    );
}

/// A body that says it has ended, and counts the polls it gets all the same.
struct Ended(Arc<AtomicUsize>);

impl Body for Ended {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.fetch_add(1, SeqCst);
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        true
    }
}

#[tokio::test(start_paused = true)]
async fn an_empty_body_is_whole_and_one_that_says_so_is_not_polled() {
    let response = read(ReadBodyLayer::new(), Script::new([])).await;
    assert_eq!(response.body().whole().unwrap(), "");
    assert!(response.body().is_end_stream());
    let answer = Ok::<_, Infallible>(response);
    assert!(!RejectBody::EMPTY.accept(&answer));
    assert!(StatusIn::SUCCESS.accept(&answer));

    let polls = Arc::new(AtomicUsize::new(0));
    let server = answers(Response::new(Ended(Arc::clone(&polls))));
    let response = ReadBody::new(server).oneshot(()).await.unwrap();
    assert_eq!(response.body().whole().unwrap(), "");
    let mut body = pin!(response.into_body());
    assert!(body.frame().await.is_none());
    assert_eq!(
        polls.load(SeqCst),
        0,
        "an ended body is not polled, by the reader or after"
    );
}

#[tokio::test(start_paused = true)]
async fn a_claim_over_the_cap_is_refused_before_a_poll_and_nothing_is_lost() {
    let body = Script::new([data("abc")]).hints(vec![SizeHint::with_exact(u64::MAX)]);
    let polls = Arc::clone(&body.polls);
    let response = read(ReadBodyLayer::new(), body).await;
    assert_eq!(polls.load(SeqCst), 0, "not read at all");
    assert_eq!(incomplete(&response), Some(IncompleteBody::TooLarge));
    assert_eq!(response.body().whole(), None);
    assert_eq!(replay(response.into_body()).await.0, "abc");
}

#[tokio::test(start_paused = true)]
async fn a_size_hint_that_overflows_mid_stream_is_only_a_claim() {
    // Unknown at first, then "u64::MAX more" once the first chunk is out: the buffer
    // is sized from the bytes received, and the sums saturate.
    let hints = vec![SizeHint::default(), SizeHint::with_exact(u64::MAX)];
    let body = Script::new([data("ab"), data("cd")]).hints(hints);
    let response = read(ReadBodyLayer::new().max_bytes(usize::MAX), body).await;
    assert_eq!(incomplete(&response), None);
    assert_eq!(response.body().whole().unwrap(), "abcd");
    assert_eq!(response.body().size_hint().lower(), 4);
}

#[tokio::test(start_paused = true)]
async fn the_chunk_that_crosses_the_cap_is_held_as_it_is_and_replayed() {
    let sent = trailers(&[("x-id", "7")]);
    let body = Script::new([
        data("ab"),
        data("cdefgh"),
        data("ij"),
        Ok(Frame::trailers(sent.clone())),
    ]);
    let response = read(ReadBodyLayer::new().max_bytes(4), body).await;
    assert_eq!(incomplete(&response), Some(IncompleteBody::TooLarge));
    // Memory follows the cap: what was kept is within it.
    assert_eq!(response.body().read_ahead(), "ab");
    assert_eq!(response.body().whole(), None);
    assert_eq!(
        replay(response.into_body()).await,
        ("abcdefghij".into(), Some(sent), None)
    );
}

#[tokio::test(start_paused = true)]
async fn trailers_count_against_the_cap() {
    // 2 bytes + ("x-id", "7"): 4 + 1 + 32 = 37 bytes of trailer fields.
    let sent = trailers(&[("x-id", "7")]);
    let body = Script::new([data("ab"), Ok(Frame::trailers(sent.clone()))]);
    let response = read(ReadBodyLayer::new().max_bytes(38), body).await;
    assert_eq!(incomplete(&response), Some(IncompleteBody::TooLarge));
    assert_eq!(
        replay(response.into_body()).await,
        ("ab".into(), Some(sent.clone()), None)
    );

    let body = Script::new([data("ab"), Ok(Frame::trailers(sent.clone()))]);
    let response = read(ReadBodyLayer::new().max_bytes(39), body).await;
    assert_eq!(incomplete(&response), None);
    assert_eq!(response.body().whole().unwrap(), "ab");
}

#[tokio::test(start_paused = true)]
async fn a_body_that_never_yields_times_out_at_max_wait_and_loses_nothing() {
    let body = Script::new([data("part")]).stalling();
    let start = Instant::now();
    let response = read(ReadBodyLayer::new(), body).await;
    assert_eq!(start.elapsed(), DEFAULT_MAX_WAIT);
    assert_eq!(incomplete(&response), Some(IncompleteBody::TimedOut));
    assert_eq!(response.body().whole(), None);
    assert_eq!(response.body().read_ahead(), "part");

    let body = Script::new([]).stalling();
    let start = Instant::now();
    let layer = ReadBodyLayer::new().max_wait(Duration::from_millis(30));
    let response = read(layer, body).await;
    assert_eq!(start.elapsed(), Duration::from_millis(30));
    assert_eq!(incomplete(&response), Some(IncompleteBody::TimedOut));
}

#[tokio::test(start_paused = true)]
async fn a_body_that_fails_midway_is_marked_and_its_error_replayed() {
    let body = Script::new([data("ab"), Err("connection reset"), data("never")]);
    let response = read(ReadBodyLayer::new(), body).await;
    assert_eq!(incomplete(&response), Some(IncompleteBody::Failed));
    assert_eq!(response.body().whole(), None);
    assert_eq!(
        replay(response.into_body()).await,
        ("ab".into(), None, Some("connection reset"))
    );
}

/// Always ready with an empty data frame: never ends, never sends a byte.
struct Empties(Arc<AtomicUsize>);

impl Body for Empties {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.fetch_add(1, SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::new()))))
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_that_is_always_ready_yields_between_polls_and_times_out() {
    let polls = Arc::new(AtomicUsize::new(0));
    let server = answers(Response::new(Empties(Arc::clone(&polls))));
    let start = Instant::now();
    let mut fut = pin!(ReadBody::new(server).oneshot(()));
    let waker = futures_util::task::noop_waker();
    assert!(fut
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_pending());
    assert!(
        polls.load(SeqCst) <= 64,
        "{} frames in one poll",
        polls.load(SeqCst)
    );
    // The task never goes idle, so the paused clock does not advance by itself.
    let mut rounds = 0;
    let response = loop {
        if let Poll::Ready(result) = fut.as_mut().poll(&mut Context::from_waker(&waker)) {
            break result.unwrap();
        }
        rounds += 1;
        assert!(rounds <= 20, "still reading after {:?}", start.elapsed());
        tokio::time::advance(Duration::from_millis(100)).await;
    };
    assert!(start.elapsed() >= DEFAULT_MAX_WAIT);
    assert!(start.elapsed() <= DEFAULT_MAX_WAIT + Duration::from_millis(100));
    assert_eq!(incomplete(&response), Some(IncompleteBody::TimedOut));
}

type Answer = Result<Response<ReadAheadBody<Script>>, Infallible>;

/// `predicate` accepts the whole answer and rejects the stalled one.
fn judges<P: Accept<Response<ReadAheadBody<Script>>, Infallible>>(
    predicate: P,
    whole: &Answer,
    stalled: &Answer,
) {
    assert!(predicate.accept(whole), "{}", std::any::type_name::<P>());
    assert!(!predicate.accept(stalled), "{}", std::any::type_name::<P>());
}

#[tokio::test(start_paused = true)]
async fn every_http_predicate_rejects_an_incomplete_body() {
    let whole = Ok(read(ReadBodyLayer::new(), Script::new([data("row")])).await);
    let layer = ReadBodyLayer::new().max_wait(Duration::from_millis(1));
    let stalled = Ok(read(layer, Script::new([data("row")]).stalling()).await);
    judges(StatusIn::SUCCESS, &whole, &stalled);
    judges(RejectServerErrors, &whole, &stalled);
    judges(RejectStatus(StatusCode::NOT_FOUND), &whole, &stalled);
    // A `200` without `grpc-status` would be accepted: its status comes later.
    judges(GrpcStatus::new(), &whole, &stalled);
    judges(AcceptBody::new(|body| body == b"row"), &whole, &stalled);
    judges(RejectBody::EMPTY, &whole, &stalled);
    judges(RejectBody::equal_to(b"{}"), &whole, &stalled);
    assert!(!RejectBody::equal_to(b"row").accept(&whole));
    assert!(!AcceptBody::new(|body| body.is_empty()).accept(&whole));
}

#[tokio::test(start_paused = true)]
async fn a_stalled_primary_gives_way_at_max_wait_or_at_the_patience_bound() {
    let primary = || {
        service_fn(|()| async {
            Ok::<_, Infallible>(Response::new(Script::new([data("{\"par")]).stalling()))
        })
    };
    let fallback = || {
        service_fn(|()| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let mut response = Response::new(Script::new([data("row")]));
            *response.status_mut() = StatusCode::OK;
            response
                .headers_mut()
                .insert("x-served-by", "fallback".parse().unwrap());
            Ok::<_, Infallible>(response)
        })
    };
    let wait = ReadBodyLayer::new().max_wait(Duration::from_millis(100));

    let svc = Fallback::new(primary(), fallback())
        .accept(StatusIn::SUCCESS)
        .read_primary_body_with(wait);
    let start = Instant::now();
    let response = svc.oneshot(()).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(response.headers()["x-served-by"], "fallback");
    assert_eq!(replay(response.into_body()).await.0, "row");

    // `patience` bounds the reading too: the fallback's answer (at 5 ms) waits 10 ms.
    let svc = Fallback::new(primary(), fallback())
        .accept(StatusIn::SUCCESS)
        .patience(Duration::from_millis(10))
        .read_primary_body_with(wait);
    let start = Instant::now();
    let response = svc.oneshot(()).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(15));
    assert_eq!(response.headers()["x-served-by"], "fallback");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_while_reading_drops_the_response() {
    let body = Script::new([data("a")]).stalling();
    let polls = Arc::clone(&body.polls);
    let server = answers(Response::new(body));
    let fut = ReadBody::new(server).oneshot(());
    // The body stalls: the future is left reading it, and dropped by the timeout.
    assert!(tokio::time::timeout(Duration::from_millis(10), fut)
        .await
        .is_err());
    assert!(polls.load(SeqCst) > 0);
    assert_eq!(
        Arc::strong_count(&polls),
        1,
        "the body went with the future"
    );
}

#[tokio::test(start_paused = true)]
async fn reading_combines_with_marking_in_either_order() {
    use tower_backstop::{
        http::{ServedBy, X_SERVED_BY},
        FallbackLayer,
    };
    let primary = || answers(Response::new(Script::new([data("{\"par")]).stalling()));
    let fallback = || {
        service_fn(|()| async { Ok::<_, Infallible>(Response::new(Script::new([data("row")]))) })
    };
    let wait = ReadBodyLayer::new().max_wait(Duration::from_millis(20));

    let read_first = FallbackLayer::new(fallback())
        .read_primary_body_with(wait)
        .accept(StatusIn::SUCCESS)
        .mark_served_by(Some(X_SERVED_BY));
    let response = read_first.layer(primary()).oneshot(()).await.unwrap();
    assert_eq!(response.headers()[X_SERVED_BY], "fallback");
    assert_eq!(
        response.extensions().get::<ServedBy>(),
        Some(&ServedBy::Fallback)
    );

    let mark_first = FallbackLayer::new(fallback())
        .mark_served_by(Some(X_SERVED_BY))
        .accept(StatusIn::SUCCESS)
        .read_primary_body_with(wait);
    let start = Instant::now();
    let response = mark_first.layer(primary()).oneshot(()).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(20));
    assert_eq!(response.headers()[X_SERVED_BY], "fallback");
    assert_eq!(replay(response.into_body()).await.0, "row");
}

/// A body that trickles: one byte every 10 ms, `left` of them, then its end.
struct Trickle {
    left: usize,
    tick: Pin<Box<tokio::time::Sleep>>,
}

impl Body for Trickle {
    type Data = Bytes;
    type Error = &'static str;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Sent>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        std::task::ready!(self.tick.as_mut().poll(cx));
        self.left -= 1;
        let next = Instant::now() + Duration::from_millis(10);
        self.tick.as_mut().reset(next);
        Poll::Ready(Some(data("x")))
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_that_keeps_sending_is_bounded_by_max_wait_from_the_first_wait() {
    // 100 bytes at one every 10 ms take a second; the bound is 35 ms, however steadily
    // bytes arrive: it does not start again with each chunk.
    let body = Trickle {
        left: 100,
        tick: Box::pin(tokio::time::sleep(Duration::from_millis(10))),
    };
    let layer = ReadBodyLayer::new().max_wait(Duration::from_millis(35));
    let server = answers(Response::new(body));
    let start = Instant::now();
    let response = layer.layer(server).oneshot(()).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(35));
    assert_eq!(
        response.extensions().get::<IncompleteBody>(),
        Some(&IncompleteBody::TimedOut)
    );
    assert_eq!(response.body().read_ahead(), "xxx");
    // Nothing is lost: the caller gets the rest, byte for byte.
    let rest = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(rest.len(), 100);
}
