//! The middleware that reads the first frame of a gRPC answer whose status is not in
//! its head.

use crate::{
    http::read::{ReadAheadBody, ReadFuture, Reader, Until},
    FallbackLayer,
};
use http::Response;
use http_body::Body;
use std::{
    task::{Context, Poll},
    time::Duration,
};
use tower_layer::{Layer, Stack};
use tower_service::Service;

/// How long [`PeekGrpcStatus`] waits for the first body frame by default: 1 second.
///
/// Servers that answer with no message send their trailers right behind the headers,
/// usually in the same packet; a second covers a lost packet and its retransmission
/// (Linux's shortest retransmission timeout is 200 ms). An answer that sends nothing
/// for longer has stalled, and is rejected; so is a server-streaming call whose first
/// message takes longer.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);

/// Judges gRPC answers whose status comes in the trailers with no message before it,
/// by reading the first frame of their body before handing them on.
///
/// Put it on the **primary**, inside a [`Fallback`](crate::Fallback) whose predicate is
/// [`GrpcStatus`](crate::http::accept::GrpcStatus) — most simply with
/// [`FallbackLayer::peek_grpc_status`], which also gives the fallback the same body
/// type. For each `Ok` response:
///
/// - **Status in the headers**, or an HTTP status other than `200` (see
///   [`GrpcCode::of_response`](super::GrpcCode::of_response)): handed on at once.
/// - **HTTP `200` without `grpc-status`**: the body's first frame is read, inside this
///   future (no task is spawned; dropping the future drops the response):
///   - **trailers**: the answer has no message. Their status is recorded as a
///     [`PeekedStatus`](super::PeekedStatus) extension, which the predicate reads.
///   - **a data frame**: a message came, the status will follow it. The response is
///     handed on at once, with no extension.
///   - **the end of the body**: recorded as `Unknown` (see
///     [`PeekedStatus`](super::PeekedStatus)).
///   - **an error**: recorded as `Unknown`, and marked
///     [`IncompleteBody::Failed`](crate::http::read::IncompleteBody::Failed).
///   - **nothing within `max_wait`** (default [`DEFAULT_MAX_WAIT`], 1 second, on
///     tokio's timer): marked
///     [`IncompleteBody::TimedOut`](crate::http::read::IncompleteBody::TimedOut), which
///     [`GrpcStatus`](crate::http::accept::GrpcStatus) rejects: a primary that sends
///     `200` headers and then nothing is a rejection, and the fallback serves. (A
///     predicate could not tell "a message came" from "nothing came in time"
///     otherwise, and the caller would wait on the body past every timeout that
///     bounds the headers.)
///
/// Empty data frames carry no message and are skipped (a body made only of them runs
/// into `max_wait`). In every case the response's body is a
/// [`ReadAheadBody`](crate::http::read::ReadAheadBody) that yields the frame read
/// ahead first and then the rest of the original body: the caller receives what the
/// server sent, less any empty data frames skipped before the first frame that
/// carries something. At most one frame is held, as the body yielded it (not copied);
/// the extensions are the only allocation, for answers with no message (or none in
/// time). This is the
/// reader of [`ReadBody`](crate::http::read::ReadBody), stopped at the first frame.
///
/// Errors from the inner service pass through. The body must be `Unpin` (hyper's,
/// tonic's and axum's bodies are): it is moved into the response after it was read.
/// Needs the `http` and `time` features, and a tokio runtime with time enabled.
///
/// ```
/// use bytes::Bytes;
/// use http::{HeaderMap, Response};
/// use http_body_util::{BodyExt, StreamBody};
/// use http_body::Frame;
/// use std::convert::Infallible;
/// use tower::{service_fn, ServiceExt};
/// use tower_backstop::http::grpc::{GrpcCode, PeekGrpcStatus};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // An akka-grpc style NOT_FOUND: `200` headers, then trailers with the status.
/// let server = service_fn(|_: ()| async {
///     let mut trailers = HeaderMap::new();
///     trailers.insert("grpc-status", "5".parse().unwrap());
///     let frames = [Ok::<_, Infallible>(Frame::<Bytes>::trailers(trailers))];
///     Ok::<_, Infallible>(Response::new(StreamBody::new(futures_util::stream::iter(frames))))
/// });
///
/// let response = PeekGrpcStatus::new(server).oneshot(()).await.unwrap();
/// assert_eq!(GrpcCode::of_response(&response), Some(GrpcCode::NotFound));
/// // The caller still reads the trailers.
/// let trailers = response.into_body().collect().await.unwrap().trailers().cloned();
/// assert_eq!(trailers.unwrap()["grpc-status"], "5");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PeekGrpcStatus<S> {
    inner: S,
    reader: Reader,
}

impl<S> PeekGrpcStatus<S> {
    /// Reads ahead the first frame of `inner`'s answers that have no status in their
    /// head, waiting up to [`DEFAULT_MAX_WAIT`] for it.
    pub const fn new(inner: S) -> Self {
        PeekGrpcStatus {
            inner,
            reader: PeekGrpcStatusLayer::new().reader,
        }
    }

    /// Wraps `inner`'s response bodies in [`ReadAheadBody`] without reading anything ahead:
    /// for the fallback branch, whose body type must match the primary's. Its answers
    /// are handed on the moment they arrive.
    pub const fn pass_through(inner: S) -> Self {
        PeekGrpcStatus {
            inner,
            reader: PeekGrpcStatusLayer::pass_through().reader,
        }
    }

    /// Sets how long to wait for the first body frame before handing the response on
    /// marked [`IncompleteBody::TimedOut`](crate::http::read::IncompleteBody::TimedOut).
    /// Default: [`DEFAULT_MAX_WAIT`] (1 second).
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

impl<S, Req, B> Service<Req> for PeekGrpcStatus<S>
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

/// A [`Layer`] that wraps services in [`PeekGrpcStatus`].
#[derive(Clone, Copy, Debug)]
pub struct PeekGrpcStatusLayer {
    reader: Reader,
}

impl PeekGrpcStatusLayer {
    /// Reads ahead, as [`PeekGrpcStatus::new`]: for the primary.
    pub const fn new() -> Self {
        PeekGrpcStatusLayer {
            reader: Reader {
                until: Until::FirstMessage,
                max_wait: DEFAULT_MAX_WAIT,
            },
        }
    }

    /// Only wraps bodies, as [`PeekGrpcStatus::pass_through`]: for the fallback.
    pub const fn pass_through() -> Self {
        PeekGrpcStatusLayer {
            reader: Reader {
                until: Until::Nothing,
                max_wait: DEFAULT_MAX_WAIT,
            },
        }
    }

    /// Sets how long to wait for the first body frame. Default: [`DEFAULT_MAX_WAIT`]
    /// (1 second). See [`PeekGrpcStatus::max_wait`].
    pub const fn max_wait(mut self, max_wait: Duration) -> Self {
        self.reader.max_wait = max_wait;
        self
    }
}

impl Default for PeekGrpcStatusLayer {
    fn default() -> Self {
        PeekGrpcStatusLayer::new()
    }
}

impl<S> Layer<S> for PeekGrpcStatusLayer {
    type Service = PeekGrpcStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeekGrpcStatus {
            inner,
            reader: self.reader,
        }
    }
}

impl<F, A, S, O, I, R> FallbackLayer<F, A, S, O, I, R> {
    /// Judges gRPC answers whose status comes in their trailers with no message before
    /// it (akka-grpc, Python's grpcio): wraps the primary in [`PeekGrpcStatus`] inside
    /// this layer, and the fallback in [`PeekGrpcStatus::pass_through`], so that both
    /// answer `Response<`[`ReadAheadBody`]`<B>>`. The wait for the first frame is
    /// [`DEFAULT_MAX_WAIT`] (1 second); for another, use
    /// [`peek_grpc_status_with`](FallbackLayer::peek_grpc_status_with).
    ///
    /// It can be called before or after any other builder method, and combines with
    /// [`buffer_bodies`](FallbackLayer::buffer_bodies) and
    /// [`mark_served_by`](FallbackLayer::mark_served_by). With
    /// [`GrpcStatus`](crate::http::accept::GrpcStatus) as the predicate, a `NOT_FOUND`
    /// sent as `200` headers and then trailers is rejected like one sent in the
    /// headers, and a primary that sends `200` headers and then nothing for
    /// `max_wait` is rejected too. On a tonic `Channel` pair:
    ///
    /// ```no_run
    /// use tonic::{body::Body, transport::Channel};
    /// use tonic_health::pb::health_client::HealthClient;
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tower_backstop::{
    ///     http::{accept::{GrpcCode, GrpcStatus}, BufferBodyLayer, ReplayBody},
    ///     FallbackLayer,
    /// };
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let primary = Channel::from_static("http://127.0.0.1:50051").connect().await?;
    /// let fallback = Channel::from_static("http://127.0.0.1:50052").connect().await?;
    /// let to_tonic = |req: http::Request<ReplayBody>| req.map(Body::new);
    ///
    /// let channel = ServiceBuilder::new()
    ///     .layer(BufferBodyLayer::new())
    ///     .layer(
    ///         FallbackLayer::new(fallback.map_request(to_tonic))
    ///             .accept(GrpcStatus::rejecting(&[GrpcCode::NotFound, GrpcCode::Unavailable]))
    ///             .peek_grpc_status(),
    ///     )
    ///     .map_request(to_tonic)
    ///     .service(primary);
    /// let mut client = HealthClient::new(channel);
    /// # let _ = &mut client;
    /// # Ok(()) }
    /// ```
    ///
    /// Available with the `http` and `time` features.
    #[cfg_attr(docsrs, doc(cfg(all(feature = "http", feature = "time"))))]
    pub fn peek_grpc_status(
        self,
    ) -> FallbackLayer<PeekGrpcStatus<F>, A, S, O, Stack<PeekGrpcStatusLayer, I>, R> {
        self.peek_grpc_status_with(PeekGrpcStatusLayer::new())
    }

    /// Like [`peek_grpc_status`](FallbackLayer::peek_grpc_status), with a
    /// [`PeekGrpcStatusLayer`] of your own, e.g.
    /// `PeekGrpcStatusLayer::new().max_wait(Duration::from_millis(200))`. The fallback
    /// gets the pass-through form of the same layer.
    ///
    /// Available with the `http` and `time` features.
    #[cfg_attr(docsrs, doc(cfg(all(feature = "http", feature = "time"))))]
    pub fn peek_grpc_status_with(
        self,
        peek: PeekGrpcStatusLayer,
    ) -> FallbackLayer<PeekGrpcStatus<F>, A, S, O, Stack<PeekGrpcStatusLayer, I>, R> {
        let pass_through = PeekGrpcStatusLayer::pass_through();
        self.with_parts(|fallback, a, s, o, i| {
            (pass_through.layer(fallback), a, s, o, Stack::new(peek, i))
        })
    }
}
