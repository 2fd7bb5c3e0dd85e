//! The request body each branch reads: a buffered body that is cheap to clone.

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use std::{
    convert::Infallible,
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

/// A request body held in memory, which clones replay.
///
/// A clone replays what its original had left to give when it was cloned: clones made
/// before the body is read — as [`Fallback`](crate::Fallback) makes them — replay it
/// from the start.
///
/// [`BufferBody`](super::BufferBody) reads a request's body into a `ReplayBody` so
/// that `http::Request<ReplayBody>` is `Clone` and a [`Fallback`](crate::Fallback) can
/// give each branch its own copy. Cloning is cheap: the bytes are shared by reference
/// count ([`Bytes`]), never copied, and so are the trailers, if the request had any.
///
/// A `ReplayBody` yields its bytes as one data frame, then its trailers, and never
/// fails (`Error = Infallible`). Its [`size_hint`](Body::size_hint) is exact and, as
/// `http-body` defines it, counts the data bytes only, not the trailers. A branch that needs a body type of its own converts
/// it, e.g. `tonic::body::Body::new(body)` or `axum::body::Body::new(body)`.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::BodyExt;
/// use tower_backstop::http::ReplayBody;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let body = ReplayBody::new(Bytes::from_static(b"hello"));
/// let copy = body.clone();
/// assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
/// assert_eq!(copy.collect().await.unwrap().to_bytes(), "hello");
/// # }
/// ```
///
/// Available with the `http` feature.
#[derive(Clone, Default)]
pub struct ReplayBody {
    // What is left to yield: the data is taken by the first poll, the trailers by the
    // next one. A clone made before polling starts again from the beginning.
    data: Bytes,
    trailers: Option<Arc<HeaderMap>>,
}

impl ReplayBody {
    /// A body with these bytes and no trailers.
    pub fn new(data: Bytes) -> Self {
        ReplayBody {
            data,
            trailers: None,
        }
    }

    /// An empty body. Allocates nothing.
    pub const fn empty() -> Self {
        ReplayBody {
            data: Bytes::new(),
            trailers: None,
        }
    }

    pub(crate) fn with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        ReplayBody {
            data,
            trailers: trailers.map(Arc::new),
        }
    }

    /// The bytes this body has yet to yield: all of them until it is polled.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The trailers this body has yet to yield, if the request had any.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_deref()
    }
}

impl From<Bytes> for ReplayBody {
    fn from(data: Bytes) -> Self {
        ReplayBody::new(data)
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if !this.data.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut this.data)))));
        }
        let frame = this.trailers.take().map(|trailers| {
            // Only a body whose clones are all gone owns its trailers; the others copy.
            let trailers = Arc::try_unwrap(trailers).unwrap_or_else(|shared| (*shared).clone());
            Ok(Frame::trailers(trailers))
        });
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.len() as u64)
    }
}

impl fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayBody")
            .field("len", &self.data.len())
            .field("trailers", &self.trailers.as_ref().map(|t| t.len()))
            .finish()
    }
}
