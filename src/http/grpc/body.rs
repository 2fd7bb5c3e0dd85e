//! The response body that replays the frame read ahead.

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll},
};

pin_project! {
    /// Response body of [`PeekGrpcStatus`](super::PeekGrpcStatus): the body the
    /// service answered, with the frame that was read ahead of the caller given back
    /// first.
    ///
    /// It yields, in order: the frame read ahead, if any (a data frame, the trailers,
    /// or the error the body failed with), then the rest of the original body. Nothing
    /// is copied or reordered; the only frames left out are empty data frames skipped
    /// before the first one that carries something. Its
    /// `Data` and `Error` types are the original body's.
    ///
    /// Built by `PeekGrpcStatus`; both branches of a [`Fallback`](crate::Fallback)
    /// answer with it when the layer is applied with
    /// [`FallbackLayer::peek_grpc_status`](crate::FallbackLayer::peek_grpc_status).
    pub struct PeekBody<B>
    where
        B: Body,
    {
        held: Held<B::Data, B::Error>,
        #[pin]
        inner: B,
    }
}

/// What the body gives before (or instead of) polling the original body again.
pub(super) enum Held<D, E> {
    /// Nothing held: poll the original body.
    Nothing,
    /// A frame read ahead.
    Frame(Frame<D>),
    /// The error the body failed with, read ahead.
    Error(E),
    /// The original body has ended: it is not polled again.
    Ended,
}

impl<B: Body> PeekBody<B> {
    pub(super) fn new(inner: B, held: Held<B::Data, B::Error>) -> Self {
        PeekBody { held, inner }
    }

    /// Returns a reference to the original body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// Returns a mutable reference to the original body.
    pub fn get_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

/// An empty body, when `B`'s default is one: [`BufferBody`](crate::http::BufferBody)
/// builds its `413`/`400` (or gRPC) refusals with it.
impl<B: Body + Default> Default for PeekBody<B> {
    fn default() -> Self {
        PeekBody::new(B::default(), Held::Nothing)
    }
}

impl<B: Body> Body for PeekBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        match std::mem::replace(this.held, Held::Nothing) {
            Held::Nothing => {}
            Held::Frame(frame) => return Poll::Ready(Some(Ok(frame))),
            Held::Error(error) => return Poll::Ready(Some(Err(error))),
            Held::Ended => {
                *this.held = Held::Ended;
                return Poll::Ready(None);
            }
        }
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = frame {
            *this.held = Held::Ended;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        match &self.held {
            Held::Nothing => self.inner.is_end_stream(),
            Held::Frame(_) | Held::Error(_) => false,
            Held::Ended => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.held {
            Held::Nothing | Held::Error(_) => self.inner.size_hint(),
            Held::Frame(frame) => {
                let inner = self.inner.size_hint();
                let held = frame.data_ref().map_or(0, |data| data.remaining() as u64);
                // Saturating: a hint is a claim, and a hostile one must not overflow.
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(held));
                if let Some(upper) = inner.upper().and_then(|upper| upper.checked_add(held)) {
                    hint.set_upper(upper);
                }
                hint
            }
            Held::Ended => SizeHint::with_exact(0),
        }
    }
}

impl<B: Body> fmt::Debug for PeekBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = match &self.held {
            Held::Nothing => "nothing",
            Held::Frame(frame) if frame.is_data() => "data",
            Held::Frame(_) => "trailers",
            Held::Error(_) => "error",
            Held::Ended => "ended",
        };
        f.debug_struct("PeekBody")
            .field("held", &held)
            .finish_non_exhaustive()
    }
}
