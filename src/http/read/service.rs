//! The middleware that reads the primary's response body before it is judged.

use super::future::{ReadFuture, Reader, Until};
use super::ReadAheadBody;
use crate::{Fallback, FallbackLayer};
use http::Response;
use http_body::Body;
use std::{
    task::{Context, Poll},
    time::Duration,
};
use tower_layer::{Layer, Stack};
use tower_service::Service;

/// The default cap on a response body read by [`ReadBody`]: 1 MiB, data and trailer
/// fields together.
///
/// A primary whose answer is larger is rejected, so the cap must sit above the
/// primary's honest answers, or every large hit costs a fallback call. 1 MiB is
/// memcached's default item size limit, the largest value such a cache holds unless
/// told otherwise; each request being read holds up to this much (about twice while
/// the buffer grows) until its answer is handed on.
///
/// Available with the `http` and `time` features.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;

/// How long [`ReadBody`] waits for a response body to end by default: 1 second.
///
/// A cache or a replica sends its whole answer right behind its headers; a second
/// covers a lost packet and its retransmission (Linux's shortest retransmission
/// timeout is 200 ms) and a body of [`DEFAULT_MAX_BYTES`] at 10 Mbit/s (0.84 s).
/// A body still unfinished then is a stalled one, and the fallback serves.
///
/// Available with the `http` and `time` features.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);

/// Reads each response's whole body, up to a byte cap and within a time bound, before
/// handing the response on: so that a [`Fallback`]'s predicate judges the primary's
/// whole answer, and a body that stalls after its headers, runs over the cap or fails
/// is a rejection.
///
/// Put it on the **primary**, most simply with
/// [`FallbackLayer::read_primary_body`], which also gives the fallback the same body
/// type ([`ReadBody::pass_through`]). For each `Ok` response, its body is read inside
/// this future (no task is spawned; dropping the future drops the response) until:
///
/// - **it ends** — its last data frame and its trailers, if any, within the bounds:
///   the response is handed on at once, and
///   [`ReadAheadBody::whole`] gives its data to the predicate. A body that says it is
///   empty ([`is_end_stream`](Body::is_end_stream)) is not polled at all.
/// - **it is over the cap** (default [`DEFAULT_MAX_BYTES`], 1 MiB, data plus trailer
///   fields, each counted as HTTP/2 counts a header list: name + value + 32 bytes):
///   marked [`IncompleteBody::TooLarge`](super::IncompleteBody::TooLarge). A body
///   whose size hint already says so (hyper's, from a `Content-Length`) is not read at
///   all; otherwise it is read up to the chunk that crosses the cap.
/// - **it fails**: marked [`IncompleteBody::Failed`](super::IncompleteBody::Failed).
/// - **it has not ended within `max_wait`** (default [`DEFAULT_MAX_WAIT`], 1 second,
///   on tokio's timer, counted from the first time the body is not ready — in
///   practice, from the headers): marked
///   [`IncompleteBody::TimedOut`](super::IncompleteBody::TimedOut).
///
/// The predicates of [`http::accept`](crate::http::accept) reject a response marked
/// [`IncompleteBody`](super::IncompleteBody), so under [`Launch::Concurrent`]
/// (the default) the fallback, which has been running all along, serves.
/// [`AcceptOk`](crate::accept::AcceptOk), the layer's default predicate, judges only
/// `Ok` against `Err` and would accept it, and so would a closure of yours or a
/// [`Not`](crate::accept::Not) of a rejection: **give the layer one of these predicates,
/// or wrap yours in [`Complete`](crate::http::accept::Complete)**. A
/// [`patience`](FallbackLayer::patience) bound counts the reading too: a successful
/// fallback answer waits that long for the primary's body, not `max_wait`. So do the
/// primary's latency in an [`Outcome`](crate::outcome::Outcome) and the estimate of
/// `Launch::Adaptive`: they measure the primary's whole answer.
///
/// Nothing is lost when a response stands: its body is a [`ReadAheadBody`] that yields
/// what was read, then the rest of the original body (when the reading stopped
/// before its end), so the caller receives every byte and trailer field the server
/// sent. Memory follows the bytes received, never a claim: at most the cap (about
/// twice it while the buffer grows; a body in one chunk is kept as that chunk) plus
/// the one chunk that crossed it, held as the body yielded it. Size hints are only
/// compared, with saturating arithmetic. At most 32 frames are read per poll: a body
/// that is always ready cannot hold the thread, and `max_wait` still applies to it.
///
/// Errors from the inner service pass through. The body must be `Unpin` (hyper's,
/// tonic's and axum's bodies are): it is moved into the response after it was read.
/// Needs the `http` and `time` features, and a tokio runtime with time enabled.
///
/// ```
/// use bytes::Bytes;
/// use http::Response;
/// use http_body_util::{BodyExt, Full};
/// use std::convert::Infallible;
/// use tower::{service_fn, ServiceExt};
/// use tower_backstop::http::read::ReadBody;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cache = service_fn(|_: ()| async {
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{\"found\":false}"))))
/// });
///
/// let response = ReadBody::new(cache).oneshot(()).await.unwrap();
/// // The whole body, before anyone reads it...
/// assert_eq!(response.body().whole().unwrap(), &b"{\"found\":false}"[..]);
/// // ...and still all there for the caller.
/// let bytes = response.into_body().collect().await.unwrap().to_bytes();
/// assert_eq!(bytes, &b"{\"found\":false}"[..]);
/// # }
/// ```
///
/// [`Launch::Concurrent`]: crate::launch::Launch::Concurrent
#[derive(Clone, Debug)]
pub struct ReadBody<S> {
    inner: S,
    reader: Reader,
}

impl<S> ReadBody<S> {
    /// Reads `inner`'s response bodies to their end, up to [`DEFAULT_MAX_BYTES`] and
    /// within [`DEFAULT_MAX_WAIT`].
    pub const fn new(inner: S) -> Self {
        ReadBody {
            inner,
            reader: ReadBodyLayer::new().reader,
        }
    }

    /// Wraps `inner`'s response bodies in [`ReadAheadBody`] without reading anything:
    /// for the fallback branch, whose body type must match the primary's. Its answers
    /// are handed on the moment they arrive.
    pub const fn pass_through(inner: S) -> Self {
        ReadBody {
            inner,
            reader: ReadBodyLayer::pass_through().reader,
        }
    }

    /// Sets the largest body that is read, in bytes, data and trailer fields
    /// together; a larger one is marked
    /// [`TooLarge`](super::IncompleteBody::TooLarge). Default: [`DEFAULT_MAX_BYTES`]
    /// (1 MiB). No effect on a pass-through.
    pub const fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.reader = ReadBodyLayer {
            reader: self.reader,
        }
        .max_bytes(max_bytes)
        .reader;
        self
    }

    /// Sets how long to wait for the body to end; one still unfinished then is marked
    /// [`TimedOut`](super::IncompleteBody::TimedOut). Default: [`DEFAULT_MAX_WAIT`]
    /// (1 second).
    pub const fn max_wait(mut self, max_wait: Duration) -> Self {
        self.reader.max_wait = max_wait;
        self
    }

    /// Returns a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Returns a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req, B> Service<Req> for ReadBody<S>
where
    S: Service<Req, Response = Response<B>>,
    B: Body + Unpin,
{
    type Response = Response<ReadAheadBody<B>>;
    type Error = S::Error;
    type Future = ReadFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ReadFuture::new(self.inner.call(req), self.reader)
    }
}

/// A [`Layer`] that wraps services in [`ReadBody`].
///
/// Available with the `http` and `time` features.
#[derive(Clone, Copy, Debug)]
pub struct ReadBodyLayer {
    reader: Reader,
}

impl ReadBodyLayer {
    /// Reads whole bodies, as [`ReadBody::new`]: for the primary.
    pub const fn new() -> Self {
        ReadBodyLayer {
            reader: Reader {
                until: Until::End {
                    max_bytes: DEFAULT_MAX_BYTES,
                },
                max_wait: DEFAULT_MAX_WAIT,
            },
        }
    }

    /// Only wraps bodies, as [`ReadBody::pass_through`]: for the fallback.
    pub const fn pass_through() -> Self {
        ReadBodyLayer {
            reader: Reader {
                until: Until::Nothing,
                max_wait: DEFAULT_MAX_WAIT,
            },
        }
    }

    /// Sets the largest body that is read, in bytes. Default: [`DEFAULT_MAX_BYTES`]
    /// (1 MiB). See [`ReadBody::max_bytes`].
    pub const fn max_bytes(mut self, max_bytes: usize) -> Self {
        if let Until::End { .. } = self.reader.until {
            self.reader.until = Until::End { max_bytes };
        }
        self
    }

    /// Sets how long to wait for a body to end. Default: [`DEFAULT_MAX_WAIT`]
    /// (1 second). See [`ReadBody::max_wait`].
    pub const fn max_wait(mut self, max_wait: Duration) -> Self {
        self.reader.max_wait = max_wait;
        self
    }
}

impl Default for ReadBodyLayer {
    fn default() -> Self {
        ReadBodyLayer::new()
    }
}

impl<S> Layer<S> for ReadBodyLayer {
    type Service = ReadBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReadBody {
            inner,
            reader: self.reader,
        }
    }
}

impl<F, A, S, O, I, R> FallbackLayer<F, A, S, O, I, R> {
    /// Judges the primary's whole answer: wraps the primary in [`ReadBody`] inside this
    /// layer, and the fallback in [`ReadBody::pass_through`], so that both answer
    /// `Response<`[`ReadAheadBody`]`<B>>`. The primary's body is read up to
    /// [`DEFAULT_MAX_BYTES`] (1 MiB) within [`DEFAULT_MAX_WAIT`] (1 second); for other
    /// bounds, use [`read_primary_body_with`](FallbackLayer::read_primary_body_with).
    ///
    /// A body that stalls after its headers, runs over the cap or fails is then
    /// rejected by every predicate of [`http::accept`](crate::http::accept), and the
    /// fallback serves (not by the default [`AcceptOk`](crate::accept::AcceptOk), which
    /// tells only `Ok` from `Err`, nor by a closure: wrap it in
    /// [`Complete`](crate::http::accept::Complete)); [`AcceptBody`](crate::http::accept::AcceptBody) and
    /// [`RejectBody`](crate::http::accept::RejectBody) judge the body's bytes. It can
    /// be called before or after any other builder method, and combines with
    /// [`buffer_bodies`](FallbackLayer::buffer_bodies) and
    /// [`mark_served_by`](FallbackLayer::mark_served_by). A cache that answers `200`
    /// with `{"found":false}` on a miss:
    ///
    /// ```
    /// use axum::{body::Body, http::{Request, StatusCode}, routing::get, Router};
    /// use tower::ServiceExt;
    /// use tower_backstop::{
    ///     accept::And,
    ///     http::accept::{RejectBody, StatusIn},
    ///     FallbackLayer,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let database = get(|| async { "{\"found\":true,\"name\":\"ada\"}" });
    /// let app = Router::new()
    ///     .route("/user", get(|| async { "{\"found\":false}" }))
    ///     .layer(
    ///         FallbackLayer::new(database)
    ///             .accept(And::new(StatusIn::SUCCESS, RejectBody::equal_to(b"{\"found\":false}")))
    ///             .read_primary_body()
    ///             .buffer_bodies(),
    ///     );
    ///
    /// let response = app.oneshot(Request::get("/user").body(Body::empty()).unwrap()).await.unwrap();
    /// assert_eq!(response.status(), StatusCode::OK);
    /// let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
    /// assert_eq!(body, "{\"found\":true,\"name\":\"ada\"}");
    /// # }
    /// ```
    ///
    /// Available with the `http` and `time` features.
    #[cfg_attr(docsrs, doc(cfg(all(feature = "http", feature = "time"))))]
    pub fn read_primary_body(
        self,
    ) -> FallbackLayer<ReadBody<F>, A, S, O, Stack<ReadBodyLayer, I>, R> {
        self.read_primary_body_with(ReadBodyLayer::new())
    }

    /// Like [`read_primary_body`](FallbackLayer::read_primary_body), with a
    /// [`ReadBodyLayer`] of your own, e.g.
    /// `ReadBodyLayer::new().max_bytes(64 * 1024).max_wait(Duration::from_millis(200))`.
    /// The fallback gets the pass-through form.
    ///
    /// Available with the `http` and `time` features.
    #[cfg_attr(docsrs, doc(cfg(all(feature = "http", feature = "time"))))]
    pub fn read_primary_body_with(
        self,
        read: ReadBodyLayer,
    ) -> FallbackLayer<ReadBody<F>, A, S, O, Stack<ReadBodyLayer, I>, R> {
        self.with_parts(|fallback, a, s, o, i| {
            (
                ReadBody::pass_through(fallback),
                a,
                s,
                o,
                Stack::new(read, i),
            )
        })
    }
}

impl<P, F, A, S, R> Fallback<P, F, A, S, R> {
    /// Judges the primary's whole answer, as
    /// [`FallbackLayer::read_primary_body`] does: the primary is wrapped in
    /// [`ReadBody`], the fallback in [`ReadBody::pass_through`].
    ///
    /// Available with the `http` and `time` features.
    #[cfg_attr(docsrs, doc(cfg(all(feature = "http", feature = "time"))))]
    pub fn read_primary_body(self) -> Fallback<ReadBody<P>, ReadBody<F>, A, S, R> {
        self.read_primary_body_with(ReadBodyLayer::new())
    }

    /// Like [`read_primary_body`](Fallback::read_primary_body), with a
    /// [`ReadBodyLayer`] of your own.
    ///
    /// Available with the `http` and `time` features.
    #[cfg_attr(docsrs, doc(cfg(all(feature = "http", feature = "time"))))]
    pub fn read_primary_body_with(
        self,
        read: ReadBodyLayer,
    ) -> Fallback<ReadBody<P>, ReadBody<F>, A, S, R> {
        self.map_branches(|primary, fallback| {
            (read.layer(primary), ReadBody::pass_through(fallback))
        })
    }
}
