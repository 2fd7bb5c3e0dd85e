//! The middleware that reads a request body into a [`ReplayBody`].

mod framing;

pub(crate) use self::framing::Framing;
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
/// - **Bodies over the cap** (default [`DEFAULT_MAX_BYTES`], 64 KiB) are answered
///   `413 Payload Too Large` and the inner service is not called. When the
///   `Content-Length` header or the body's size hint already says the body is too
///   large, it is not read at all; otherwise it is read up to the chunk that crosses
///   the cap. The cap counts the data bytes plus the trailers, each trailer field as
///   HTTP/2 counts a header list: name length + value length + 32 bytes.
/// - **A body that fails while being read** is answered `400 Bad Request` and the
///   inner service is not called.
///
/// # Framing headers
///
/// Both branches receive the request's `Content-Length` and `Transfer-Encoding`
/// headers as they came, so they must describe the bytes forwarded. A hyper server
/// guarantees that for what it reads off the wire; a layer outside `BufferBody` that
/// replaces the body, or an in-process caller, may not. As a proxy does
/// (RFC 9110 §8.6, RFC 9112 §6), a request is answered `400 Bad Request`, reaching
/// neither branch, when:
///
/// - its `Content-Length` is not a valid length (digits only), or lists different
///   values — refused before the body is read;
/// - its body is longer than its `Content-Length` — refused at the first chunk past
///   it — or shorter — refused when the body ends (an empty body included);
/// - its `Transfer-Encoding` does not end in `chunked`, or applies it twice;
/// - it has both `Content-Length` and `Transfer-Encoding` (a sign of request
///   smuggling; hyper's server drops the `Content-Length` instead, so no request from
///   a hyper server has both).
///
/// A valid `Transfer-Encoding` (ending in `chunked`, which delimits any length) is
/// forwarded as it came; hyper's HTTP/1.1 client then sends the body chunked, and its
/// HTTP/2 client drops the header and sends a `Content-Length`. A `Content-Length`
/// listing one value several times (`10, 10`) is forwarded as that one value.
///
/// # Memory, claims and fairness
///
/// Size hints and `Content-Length` are claims: they can get a body refused, never
/// memory reserved. A body's buffer grows with the bytes received, to at most about
/// twice them (and a body in one chunk is kept as that chunk); lengths a body reports are only
/// compared, with saturating arithmetic, never trusted to add up. The body is read
/// 32 frames at most per poll: then the future wakes itself and returns `Pending`,
/// so a body that is always ready (with empty frames, say) cannot hold the thread,
/// and a timeout around the layer fires as it should. A request body that stalls is
/// the caller's own, and is waited for with no bound of its own: a timeout around
/// the layer (tower-http's `TimeoutLayer`, or the server's) bounds it. (The primary's
/// *response* body is bounded by
/// [`read_primary_body`](crate::FallbackLayer::read_primary_body).)
///
/// # Answers
///
/// The refusals are responses, not errors: the error type passes through, so an
/// `Infallible` axum stack stays `Infallible`. They are built with the response body's
/// [`Default`] (axum's, tonic's and `http_body_util`'s body types have one), and have
/// no message in the body.
///
/// For a gRPC request they are trailers-only gRPC answers: HTTP `200`, the status in
/// the headers — `grpc-status` `8` (`RESOURCE_EXHAUSTED`) for a body over the cap,
/// `13` (`INTERNAL`) for a body that failed or contradicted its framing — with a
/// `grpc-message`. A gRPC client (tonic's among them) reports that status. A request
/// is gRPC by its `Content-Type`, compared without regard to case (RFC 9110 §8.3.1):
/// `application/grpc`, then the end, a `+format` suffix or parameters
/// (`application/grpcfoo` is not gRPC). The answer's content type is the one tonic
/// and tonic-web use for the request's protocol:
///
/// | request `Content-Type` | answer `Content-Type` |
/// |---|---|
/// | `application/grpc`, `application/grpc+proto`, ... | `application/grpc` |
/// | `application/grpc-web`, `application/grpc-web+proto`, ... | `application/grpc-web+proto` |
/// | `application/grpc-web-text`, `application/grpc-web-text+proto`, ... | `application/grpc-web-text+proto` |
///
/// gRPC-Web keeps the trailers-only form, so a gRPC-Web client reads the status from
/// the headers (a browser client needs them exposed by CORS, as for any answer).
///
/// # Readiness
///
/// `poll_ready` is the inner service's. When a body has to be read first, the service
/// that was readied moves into the response future and a clone is left in its place,
/// as tower's `AsyncFilter` does, so the inner service must be `Clone`. A request
/// refused before its body is read leaves the readied service in place for the next.
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

    /// Sets the largest body that is buffered, in bytes, trailers included (see
    /// [`BufferBody`]); larger ones are answered `413 Payload Too Large`. Default:
    /// [`DEFAULT_MAX_BYTES`] (64 KiB).
    ///
    /// Every buffered request holds up to this much memory (about twice as much while
    /// its buffer grows) until both branches are done with it. A body is never given
    /// more memory than its bytes need, whatever it claims, so raising the cap (even to
    /// `usize::MAX`) raises what honest large bodies may use, not what a claim gets.
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
        let (mut parts, body) = req.into_parts();
        let protocol = Protocol::of(&parts.headers);
        // Refused answers leave the readied service readied for the next call, as
        // with any service that turns a request away.
        let refuse = |rejection: Rejection| ResponseFuture::rejected(rejection.response(protocol));
        let framing = match Framing::of(&parts.headers) {
            Ok(framing) => framing,
            Err(rejection) => return refuse(rejection),
        };
        if body.is_end_stream() {
            // Nothing to read: the readied service is called right away.
            if let Err(rejection) = framing.finish(0, &mut parts.headers) {
                return refuse(rejection);
            }
            let req = Request::from_parts(parts, ReplayBody::empty());
            return ResponseFuture::called(self.inner.call(req));
        }
        // A claim is only ever compared with the cap: memory follows the bytes.
        let declared = framing
            .declared()
            .unwrap_or(0)
            .max(body.size_hint().lower());
        if declared > u64::try_from(self.max_bytes).unwrap_or(u64::MAX) {
            return refuse(Rejection::TooLarge);
        }
        // The body is read before the call: move the readied service into the future.
        let clone = self.inner.clone();
        let inner = mem::replace(&mut self.inner, clone);
        ResponseFuture::collecting(inner, parts, body, self.max_bytes, framing, protocol)
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
    /// The body (with its trailers) is larger than the cap.
    TooLarge,
    /// The body failed while being read.
    Unreadable,
    /// The framing headers are invalid, or contradict the body.
    Malformed,
}

impl Rejection {
    /// The answer, in the form the request's protocol reads. Built on the cold path:
    /// the static header values cost no allocation, the header map does.
    pub(crate) fn response<B: Default>(self, protocol: Protocol) -> Response<B> {
        let mut response = Response::new(B::default());
        let content_type = match protocol {
            Protocol::Http => {
                *response.status_mut() = match self {
                    Rejection::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                    Rejection::Unreadable | Rejection::Malformed => StatusCode::BAD_REQUEST,
                };
                return response;
            }
            // As tonic answers.
            Protocol::Grpc => "application/grpc",
            // As tonic-web answers; a grpc-web client decodes by this type.
            Protocol::GrpcWeb => "application/grpc-web+proto",
            Protocol::GrpcWebText => "application/grpc-web-text+proto",
        };
        // A trailers-only answer: HTTP 200, the status in the headers, no message.
        // gRPC-Web keeps this form as it is. The codes are those of the gRPC spec's
        // HTTP-to-gRPC mapping (413 has none: RESOURCE_EXHAUSTED is what servers use).
        let (code, message) = match self {
            Rejection::TooLarge => ("8", "request body is larger than the buffer limit"),
            Rejection::Unreadable => ("13", "request body could not be read"),
            Rejection::Malformed => ("13", "request body does not match its framing headers"),
        };
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert("grpc-status", HeaderValue::from_static(code));
        headers.insert("grpc-message", HeaderValue::from_static(message));
        response
    }
}

/// The protocol a request speaks, by its `Content-Type`: it decides the form of a
/// refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http,
    /// `application/grpc`, alone or with `+format` or parameters.
    Grpc,
    /// `application/grpc-web`, alone or with `+format` or parameters.
    GrpcWeb,
    /// `application/grpc-web-text`, alone or with `+format` or parameters.
    GrpcWebText,
}

impl Protocol {
    pub(crate) fn of(headers: &HeaderMap) -> Protocol {
        let Some(value) = headers.get(header::CONTENT_TYPE) else {
            return Protocol::Http;
        };
        // Media types are case-insensitive (RFC 9110 §8.3.1).
        let Some(rest) = strip_prefix_ignore_case(value.as_bytes(), b"application/grpc") else {
            return Protocol::Http;
        };
        if subtype_ends(rest) {
            return Protocol::Grpc;
        }
        let Some(rest) = strip_prefix_ignore_case(rest, b"-web") else {
            return Protocol::Http;
        };
        if subtype_ends(rest) {
            return Protocol::GrpcWeb;
        }
        match strip_prefix_ignore_case(rest, b"-text") {
            Some(rest) if subtype_ends(rest) => Protocol::GrpcWebText,
            _ => Protocol::Http,
        }
    }
}

fn strip_prefix_ignore_case<'a>(value: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

/// Whether a media subtype ends here: at the end, at a `+format` suffix, or at the
/// parameters (`OWS ";"`). `application/grpcfoo` is another type.
fn subtype_ends(rest: &[u8]) -> bool {
    match rest.first() {
        None | Some(b'+') => true,
        Some(_) => matches!(
            rest.iter().find(|&&b| b != b' ' && b != b'\t'),
            None | Some(b';')
        ),
    }
}
