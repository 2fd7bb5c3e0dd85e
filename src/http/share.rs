//! Answers that clone: a response's body read whole into a [`ReplayBody`], so that
//! coalesced requests each get a copy of one answer.

use super::{
    read::{IncompleteBody, ReadFuture, Reader, Until, DEFAULT_MAX_BYTES, DEFAULT_MAX_WAIT},
    ReplayBody,
};
use crate::{Fallback, FallbackLayer};
use http::{Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};
use tower_layer::{Layer, Stack};
use tower_service::Service;

/// Reads each response's body whole, up to a byte cap and within a time bound, into a
/// [`ReplayBody`]: its answer, `http::Response<ReplayBody>`, is `Clone`, `Send` and
/// `Sync`, and a clone shares the body's bytes and trailers by reference count.
///
/// This is what a coalesced fallback needs: requests that share one call each get a
/// clone of its answer, and an `http::Response` with a streamed body (hyper's, axum's,
/// tonic's) cannot be cloned. Cloning the answer copies its head as `Response::clone`
/// does (the header map's storage is allocated anew, each value is a reference
/// count; the extensions are cloned) and never the body.
///
/// The body is read by the same reader as [`ReadBody`](super::read::ReadBody)'s, inside
/// this future (no task is spawned; dropping the future drops the response):
///
/// - **read to its end** — data and trailers, within `max_bytes` (default
///   [`DEFAULT_MAX_BYTES`], 1 MiB, data and trailer fields together) and
///   `max_wait` (default [`DEFAULT_MAX_WAIT`], 1 second, counted from the first time
///   the body is not ready, in practice from the headers): the answer is the same
///   head with a `ReplayBody` that yields the same bytes, as one data frame, then the
///   same trailers.
/// - **over the cap, failed, or stalled**: the answer is `502 Bad Gateway` with an
///   empty body, no header fields, the original's extensions and version, and the
///   [`IncompleteBody`] extension saying which. It is not passed on unshared: a
///   streamed body goes to one caller only, and the others would have nothing, so
///   every caller gets the same clear answer instead. The original head is dropped
///   with its body, since it describes that body (`Content-Length`, `Content-Type`,
///   validators). It is a response, not an error, so the error type is not widened
///   (an axum stack stays `Infallible`), and every predicate of
///   [`http::accept`](super::accept) rejects it.
///
/// Errors of the inner service pass through. The body must be `Unpin` (hyper's, tonic's
/// and axum's are). Memory: up to the cap per answer being read (about twice while
/// its buffer grows), then exactly the body's bytes, held until the last clone is gone.
/// Needs the `http` and `time` features, and a tokio runtime with time enabled.
///
/// ```
/// use bytes::Bytes;
/// use http::Response;
/// use http_body_util::{BodyExt, Full};
/// use std::convert::Infallible;
/// use tower::{service_fn, ServiceExt};
/// use tower_backstop::http::ShareResponse;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let database = service_fn(|_: ()| async {
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"row 7"))))
/// });
///
/// let answer = ShareResponse::new(database).oneshot(()).await.unwrap();
/// let copy = answer.clone(); // the bytes are shared, not copied
/// assert_eq!(answer.into_body().collect().await.unwrap().to_bytes(), "row 7");
/// assert_eq!(copy.into_body().collect().await.unwrap().to_bytes(), "row 7");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ShareResponse<S> {
    inner: S,
    reader: Reader,
}

impl<S> ShareResponse<S> {
    /// Makes `inner`'s answers shareable, reading their bodies up to
    /// [`DEFAULT_MAX_BYTES`] within [`DEFAULT_MAX_WAIT`].
    pub const fn new(inner: S) -> Self {
        ShareResponseLayer::new().into_service(inner)
    }

    /// Sets the largest body that is read, in bytes, data and trailer fields together;
    /// a larger one is answered `502`, marked
    /// [`TooLarge`](IncompleteBody::TooLarge). Default: [`DEFAULT_MAX_BYTES`] (1 MiB).
    pub const fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.reader.until = Until::End { max_bytes };
        self
    }

    /// Sets how long to wait for the body to end; one still unfinished then is
    /// answered `502`, marked [`TimedOut`](IncompleteBody::TimedOut). Default:
    /// [`DEFAULT_MAX_WAIT`] (1 second).
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

impl<S, Req, B> Service<Req> for ShareResponse<S>
where
    S: Service<Req, Response = Response<B>>,
    B: Body + Unpin,
{
    type Response = Response<ReplayBody>;
    type Error = S::Error;
    type Future = ShareFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ShareFuture {
            read: ReadFuture::new(self.inner.call(req), self.reader),
        }
    }
}

/// A [`Layer`] that wraps services in [`ShareResponse`].
///
/// Available with the `http` and `time` features.
#[derive(Clone, Copy, Debug)]
pub struct ShareResponseLayer {
    reader: Reader,
}

impl ShareResponseLayer {
    /// Reads bodies up to [`DEFAULT_MAX_BYTES`] within [`DEFAULT_MAX_WAIT`], as
    /// [`ShareResponse::new`].
    pub const fn new() -> Self {
        ShareResponseLayer {
            reader: Reader {
                until: Until::End {
                    max_bytes: DEFAULT_MAX_BYTES,
                },
                max_wait: DEFAULT_MAX_WAIT,
            },
        }
    }

    /// Sets the largest body that is read, in bytes. Default: [`DEFAULT_MAX_BYTES`]
    /// (1 MiB). See [`ShareResponse::max_bytes`].
    pub const fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.reader.until = Until::End { max_bytes };
        self
    }

    /// Sets how long to wait for a body to end. Default: [`DEFAULT_MAX_WAIT`]
    /// (1 second). See [`ShareResponse::max_wait`].
    pub const fn max_wait(mut self, max_wait: Duration) -> Self {
        self.reader.max_wait = max_wait;
        self
    }

    const fn into_service<S>(self, inner: S) -> ShareResponse<S> {
        ShareResponse {
            inner,
            reader: self.reader,
        }
    }
}

impl Default for ShareResponseLayer {
    fn default() -> Self {
        ShareResponseLayer::new()
    }
}

impl<S> Layer<S> for ShareResponseLayer {
    type Service = ShareResponse<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.into_service(inner)
    }
}

pin_project! {
    /// Response future of [`ShareResponse`]: the inner service's answer, its body read
    /// whole into a [`ReplayBody`].
    ///
    /// Available with the `http` and `time` features.
    pub struct ShareFuture<F, B> {
        #[pin]
        read: ReadFuture<F, B>,
    }
}

impl<F, B, E> Future for ShareFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body + Unpin,
{
    type Output = Result<Response<ReplayBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = ready!(self.project().read.poll(cx))?;
        let (parts, body) = response.into_parts();
        if parts.extensions.get::<IncompleteBody>().is_none() {
            if let Some((data, trailers)) = body.into_whole() {
                let body = ReplayBody::with_trailers(data, trailers);
                return Poll::Ready(Ok(Response::from_parts(parts, body)));
            }
        }
        Poll::Ready(Ok(incomplete(parts)))
    }
}

/// The answer in place of a body that could not be read whole: rare, out of line.
#[cold]
fn incomplete(parts: http::response::Parts) -> Response<ReplayBody> {
    let mut response = Response::new(ReplayBody::empty());
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    *response.version_mut() = parts.version;
    let mut extensions = parts.extensions;
    // The reader marks every body it did not read whole; a mark is kept as it is.
    if extensions.get::<IncompleteBody>().is_none() {
        extensions.insert(IncompleteBody::Failed);
    }
    *response.extensions_mut() = extensions;
    response
}

impl<F, B> fmt::Debug for ShareFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShareFuture")
            .field("read", &self.read)
            .finish()
    }
}

impl<F, A, S, O, I, R> FallbackLayer<F, A, S, O, I, R> {
    /// Makes both branches' answers shareable: wraps the primary in [`ShareResponse`]
    /// inside this layer, and the fallback in another, so that both answer
    /// `http::Response<`[`ReplayBody`]`>`, which is `Clone` — the bound a coalesced
    /// fallback needs — and fits axum's `Router::layer` as it is.
    ///
    /// Each branch's body is read whole, up to [`DEFAULT_MAX_BYTES`] (1 MiB) within
    /// [`DEFAULT_MAX_WAIT`] (1 second); an answer that could not be is a `502` marked
    /// [`IncompleteBody`], which every predicate of [`http::accept`](super::accept)
    /// rejects (the layer's default [`AcceptOk`](crate::accept::AcceptOk) does not:
    /// give it a predicate). For the primary this is what
    /// [`read_primary_body`](FallbackLayer::read_primary_body) does, with the answer
    /// held in memory; call one of the two, not both. For other bounds, use
    /// [`share_responses_with`](FallbackLayer::share_responses_with).
    ///
    /// ```
    /// use axum::{body::Body, http::Request, routing::get, Router};
    /// use tower::ServiceExt;
    /// use tower_backstop::{http::accept::StatusIn, FallbackLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let database = get(|| async { "row 7" });
    /// let app = Router::new().route("/user/7", get(|| async { axum::http::StatusCode::NOT_FOUND })).layer(
    ///     FallbackLayer::new(database)
    ///         .accept(StatusIn::SUCCESS)
    ///         .share_responses()
    ///         .buffer_bodies(),
    /// );
    /// let response = app.oneshot(Request::get("/user/7").body(Body::empty()).unwrap()).await.unwrap();
    /// let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
    /// assert_eq!(body, "row 7");
    /// # }
    /// ```
    ///
    /// Available with the `http` and `time` features.
    #[cfg_attr(docsrs, doc(cfg(all(feature = "http", feature = "time"))))]
    pub fn share_responses(
        self,
    ) -> FallbackLayer<ShareResponse<F>, A, S, O, Stack<ShareResponseLayer, I>, R> {
        self.share_responses_with(ShareResponseLayer::new())
    }

    /// Like [`share_responses`](FallbackLayer::share_responses), with a
    /// [`ShareResponseLayer`] of your own for both branches, e.g.
    /// `ShareResponseLayer::new().max_bytes(64 * 1024)`.
    ///
    /// Available with the `http` and `time` features.
    #[cfg_attr(docsrs, doc(cfg(all(feature = "http", feature = "time"))))]
    pub fn share_responses_with(
        self,
        share: ShareResponseLayer,
    ) -> FallbackLayer<ShareResponse<F>, A, S, O, Stack<ShareResponseLayer, I>, R> {
        self.with_parts(|fallback, a, s, o, i| {
            (share.layer(fallback), a, s, o, Stack::new(share, i))
        })
    }
}

impl<P, F, A, S, R> Fallback<P, F, A, S, R> {
    /// Makes both branches' answers shareable, as
    /// [`FallbackLayer::share_responses`] does: each branch is wrapped in a
    /// [`ShareResponse`].
    ///
    /// Available with the `http` and `time` features.
    #[cfg_attr(docsrs, doc(cfg(all(feature = "http", feature = "time"))))]
    pub fn share_responses(self) -> Fallback<ShareResponse<P>, ShareResponse<F>, A, S, R> {
        self.share_responses_with(ShareResponseLayer::new())
    }

    /// Like [`share_responses`](Fallback::share_responses), with a
    /// [`ShareResponseLayer`] of your own.
    ///
    /// Available with the `http` and `time` features.
    #[cfg_attr(docsrs, doc(cfg(all(feature = "http", feature = "time"))))]
    pub fn share_responses_with(
        self,
        share: ShareResponseLayer,
    ) -> Fallback<ShareResponse<P>, ShareResponse<F>, A, S, R> {
        self.map_branches(|primary, fallback| (share.layer(primary), share.layer(fallback)))
    }
}
