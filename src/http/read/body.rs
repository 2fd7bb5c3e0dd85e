//! The response body that gives back what was read ahead, then the rest.

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll},
};

pin_project! {
    /// The body a service answered, with what was read ahead of the caller given back
    /// first: the response body of [`ReadBody`](super::ReadBody) and of
    /// [`PeekGrpcStatus`](crate::http::grpc::PeekGrpcStatus), for both branches of a
    /// [`Fallback`](crate::Fallback) built with
    /// [`read_primary_body`](crate::FallbackLayer::read_primary_body) or
    /// [`peek_grpc_status`](crate::FallbackLayer::peek_grpc_status).
    ///
    /// It yields, in order: the data read ahead (one data frame), the trailers read
    /// ahead, the error the body failed with, if it did — then, unless the body had
    /// ended, the rest of the original body, frame by frame. The caller receives the
    /// bytes and trailer fields the server sent, in their order; only the framing
    /// changes (the chunks read ahead come as one, empty data frames are left out).
    /// Its `Data` is [`Bytes`] (a chunk of the original body is converted with
    /// `copy_to_bytes`, which for the `Bytes` that hyper, axum and tonic bodies yield
    /// is a reference-count bump) and its `Error` the original body's.
    ///
    /// Before it is polled, a predicate can look at what was read:
    /// [`whole`](ReadAheadBody::whole) is the whole body's data when it was read to its
    /// end, [`trailers`](ReadAheadBody::trailers) its trailers.
    ///
    /// Available with the `http` and `time` features.
    pub struct ReadAheadBody<B>
    where
        B: Body,
    {
        data: Bytes,
        // The chunk that crossed the cap, held as the body yielded it (never copied
        // into `data`): memory follows the cap, whatever the size of one chunk.
        over: Bytes,
        trailers: Option<HeaderMap>,
        then: Then<B::Error>,
        // The body was read to its end (`data` and `trailers` are all of it).
        whole: bool,
        #[pin]
        inner: B,
    }
}

/// What comes after the frames read ahead.
pub(crate) enum Then<E> {
    /// The rest of the original body.
    Rest,
    /// The error the original body failed with; then the end.
    Error(E),
    /// The end: the original body has ended and is not polled again.
    Ended,
}

impl<B: Body> ReadAheadBody<B> {
    /// `inner`, with nothing read ahead.
    pub(crate) fn unread(inner: B) -> Self {
        ReadAheadBody::new(inner, Bytes::new(), Bytes::new(), None, Then::Rest, false)
    }

    pub(crate) fn new(
        inner: B,
        data: Bytes,
        over: Bytes,
        trailers: Option<HeaderMap>,
        then: Then<B::Error>,
        whole: bool,
    ) -> Self {
        ReadAheadBody {
            data,
            over,
            trailers,
            then,
            whole,
            inner,
        }
    }

    /// The whole body's data, when it was read to its end — its last data byte and
    /// any trailers received, within the reader's byte cap and time bound — and not
    /// yet polled; `None` otherwise (it was not read, or only in part: see
    /// [`IncompleteBody`](super::IncompleteBody)). An empty body is `Some` of no bytes.
    ///
    /// [`AcceptBody`](crate::http::accept::AcceptBody) and
    /// [`RejectBody`](crate::http::accept::RejectBody) judge this.
    pub fn whole(&self) -> Option<&Bytes> {
        self.whole.then_some(&self.data)
    }

    /// The trailers read ahead and not yet yielded, if any.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    /// The data read ahead and not yet yielded (all of it, if the body was read
    /// whole), without the chunk that crossed the byte cap, if one did.
    pub fn read_ahead(&self) -> &Bytes {
        &self.data
    }

    /// The whole body's data and trailers, when it was read to its end and not yet
    /// polled: what [`ShareResponse`](crate::http::ShareResponse) keeps.
    pub(crate) fn into_whole(self) -> Option<(Bytes, Option<HeaderMap>)> {
        if self.whole {
            Some((self.data, self.trailers))
        } else {
            None
        }
    }

    /// Returns a reference to the original body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// Returns a mutable reference to the original body. Frames taken from it
    /// directly skip nothing that was read ahead: those stay in this body.
    pub fn get_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    fn held(&self) -> u64 {
        let held = self.data.len().saturating_add(self.over.len());
        u64::try_from(held).unwrap_or(u64::MAX)
    }
}

/// An empty body, when `B`'s default is one: [`BufferBody`](crate::http::BufferBody)
/// builds its `413`/`400` (or gRPC) refusals with it.
impl<B: Body + Default> Default for ReadAheadBody<B> {
    fn default() -> Self {
        ReadAheadBody::unread(B::default())
    }
}

impl<B: Body> Body for ReadAheadBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        // Once polled, what was read ahead is no longer the whole body.
        *this.whole = false;
        for held in [&mut *this.data, &mut *this.over] {
            if !held.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(std::mem::take(held)))));
            }
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match std::mem::replace(this.then, Then::Ended) {
            Then::Rest => {}
            Then::Error(error) => return Poll::Ready(Some(Err(error))),
            Then::Ended => return Poll::Ready(None),
        }
        let frame = this.inner.poll_frame(cx);
        match &frame {
            Poll::Ready(None) => {}
            _ => *this.then = Then::Rest,
        }
        frame.map(|frame| {
            frame.map(|frame| {
                frame.map(|frame| frame.map_data(|mut d| d.copy_to_bytes(d.remaining())))
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
            && self.over.is_empty()
            && self.trailers.is_none()
            && match &self.then {
                Then::Rest => self.inner.is_end_stream(),
                Then::Error(_) => false,
                Then::Ended => true,
            }
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held();
        match &self.then {
            Then::Rest => {
                let inner = self.inner.size_hint();
                // Saturating: a hint is a claim, and a hostile one must not overflow.
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(held));
                if let Some(upper) = inner.upper().and_then(|upper| upper.checked_add(held)) {
                    hint.set_upper(upper);
                }
                hint
            }
            Then::Error(_) | Then::Ended => SizeHint::with_exact(held),
        }
    }
}

impl<B: Body> fmt::Debug for ReadAheadBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let then = match &self.then {
            Then::Rest => "rest",
            Then::Error(_) => "error",
            Then::Ended => "ended",
        };
        f.debug_struct("ReadAheadBody")
            .field("read_ahead", &self.held())
            .field("trailers", &self.trailers.as_ref().map(HeaderMap::len))
            .field("whole", &self.whole)
            .field("then", &then)
            .finish_non_exhaustive()
    }
}
