//! The middleware that reads a request body into a [`ReplayBody`].

use super::{future::ResponseFuture, ReplayBody};
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use std::{
    mem,
    task::{Context, Poll},
};
use tower_layer::Layer;
use tower_service::Service;

/// The default cap on a buffered request body: 64 KiB.
///
/// Available with the `http` feature.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024;

/// Reads each request's body into memory, so that the request can be cloned.
///
/// The inner service — typically a [`Fallback`](crate::Fallback) — is called with an
/// `http::Request<ReplayBody>`, which is `Clone`: same method, URI, version, headers,
/// extensions and body bytes, in a body whose clones share the bytes.
///
/// - **Bodiless requests** (a `GET`, any body that reports
///   [`is_end_stream`](Body::is_end_stream)) are passed on at once with an empty
///   [`ReplayBody`]: nothing is read, nothing is allocated.
/// - **Bodies up to the cap** are read completely before the inner service is called.
///   A body that arrives in one chunk is kept as it is, without a copy.
/// - **Bodies over the cap** (default [`DEFAULT_MAX_BYTES`], 64 KiB): the inner service
///   is not called. When the `Content-Length` header or the body's size hint already
///   says it is too large, the body is not read at all. The answer is
///   `413 Payload Too Large`.
/// - **A body that fails while being read** is answered `400 Bad Request` and the
///   inner service is not called.
///
/// Those two answers are responses, not errors: the error type passes through, so an
/// `Infallible` axum stack stays `Infallible`. They are built with the response body's
/// [`Default`] (axum's, tonic's and `http_body_util`'s body types have one). For a gRPC
/// request (`content-type: application/grpc...`) they are gRPC answers instead: HTTP
/// `200` with `grpc-status` `RESOURCE_EXHAUSTED` (8) or `INTERNAL` (13) in the headers,
/// which a tonic client reports as that status.
///
/// # Readiness
///
/// `poll_ready` is the inner service's. When a body has to be read first, the service
/// that was readied moves into the response future and a clone is left in its place,
/// as tower's `AsyncFilter` does, so the inner service must be `Clone`.
///
/// Available with the `http` feature.
#[derive(Clone, Debug)]
pub struct BufferBody<S> {
    inner: S,
    max_bytes: usize,
}

impl<S> BufferBody<S> {
    /// Wraps `inner`, buffering bodies of up to [`DEFAULT_MAX_BYTES`].
    pub const fn new(inner: S) -> Self {
        BufferBody {
            inner,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }

    /// Sets the largest body that is buffered, in bytes; larger ones are answered
    /// `413 Payload Too Large`. Default: [`DEFAULT_MAX_BYTES`] (64 KiB).
    ///
    /// Every buffered request holds up to this much memory until both branches are
    /// done with it.
    pub const fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
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

impl<S, B, ResBody> Service<Request<B>> for BufferBody<S>
where
    S: Service<Request<ReplayBody>, Response = Response<ResBody>> + Clone,
    B: Body,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        if body.is_end_stream() {
            // Nothing to read: the readied service is called right away.
            let req = Request::from_parts(parts, ReplayBody::empty());
            return ResponseFuture::called(self.inner.call(req));
        }
        let grpc = is_grpc(&parts.headers);
        if declared_len(&parts.headers, &body) > self.max_bytes as u64 {
            // Refused before a byte is read. The readied service stays readied for the
            // next call, as with any service that turns a request away.
            return ResponseFuture::rejected(Rejection::TooLarge.response(grpc));
        }
        // The body is read before the call: move the readied service into the future.
        let clone = self.inner.clone();
        let inner = mem::replace(&mut self.inner, clone);
        ResponseFuture::collecting(inner, parts, body, self.max_bytes, grpc)
    }
}

/// A [`Layer`] that wraps services in [`BufferBody`].
///
/// Put it outside the [`FallbackLayer`](crate::FallbackLayer), or use
/// [`FallbackLayer::buffer_bodies`](crate::FallbackLayer::buffer_bodies), which does
/// exactly that with the default cap.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_backstop::{http::BufferBodyLayer, FallbackLayer};
/// # let cache = tower::service_fn(|_: http::Request<tower_backstop::http::ReplayBody>| async {
/// #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// # });
/// # let db = cache.clone();
///
/// let svc = ServiceBuilder::new()
///     .layer(BufferBodyLayer::new().max_bytes(16 * 1024))
///     .layer(FallbackLayer::new(db))
///     .service(cache);
/// # let _ = svc;
/// ```
///
/// Available with the `http` feature.
#[derive(Clone, Copy, Debug)]
pub struct BufferBodyLayer {
    max_bytes: usize,
}

impl BufferBodyLayer {
    /// A layer that buffers bodies of up to [`DEFAULT_MAX_BYTES`] (64 KiB).
    pub const fn new() -> Self {
        BufferBodyLayer {
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }

    /// Sets the largest body that is buffered, in bytes. Default:
    /// [`DEFAULT_MAX_BYTES`]. See [`BufferBody::max_bytes`].
    pub const fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }
}

impl Default for BufferBodyLayer {
    fn default() -> Self {
        BufferBodyLayer::new()
    }
}

impl<S> Layer<S> for BufferBodyLayer {
    type Service = BufferBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BufferBody::new(inner).max_bytes(self.max_bytes)
    }
}

/// Why a request was answered without calling the inner service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// The body is larger than the cap.
    TooLarge,
    /// The body failed while being read.
    Unreadable,
}

impl Rejection {
    pub(crate) fn response<B: Default>(self, grpc: bool) -> Response<B> {
        let mut response = Response::new(B::default());
        if grpc {
            // A trailers-only gRPC answer: the status travels in the headers.
            let (code, message) = match self {
                Rejection::TooLarge => ("8", "request body is larger than the buffer limit"),
                Rejection::Unreadable => ("13", "request body could not be read"),
            };
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from_static(code));
            headers.insert("grpc-message", HeaderValue::from_static(message));
        } else {
            *response.status_mut() = match self {
                Rejection::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                Rejection::Unreadable => StatusCode::BAD_REQUEST,
            };
        }
        response
    }
}

/// The body's length as announced before reading it: its size hint's lower bound, or
/// the `Content-Length` header, whichever is larger.
fn declared_len<B: Body>(headers: &HeaderMap, body: &B) -> u64 {
    let hinted = body.size_hint().lower();
    let header = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    header.map_or(hinted, |header| header.max(hinted))
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}
