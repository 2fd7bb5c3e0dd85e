//! The future returned by a [`BufferBody`](super::BufferBody) service.
//!
//! Available with the `http` feature.

use super::{
    buffer::{Framing, Protocol, Rejection},
    collect::{field_bytes, Data, FRAMES_PER_POLL},
    ReplayBody,
};
use bytes::Buf;
use http::{request::Parts, HeaderMap, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};
use tower_service::Service;

pin_project! {
    /// Response future of [`BufferBody`](super::BufferBody).
    ///
    /// It reads the request body (if there is one to read), at most 32 frames per
    /// poll, then calls the inner service with the buffered request and resolves to
    /// its answer — or, if the body was too large, failed, or contradicted its framing
    /// headers, to a `413` or `400` response (or its gRPC form) without calling it.
    /// See [`BufferBody`](super::BufferBody).
    ///
    /// Available with the `http` feature.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<ReplayBody>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<ReplayBody>>,
    {
        // Reading the body. `collected` holds the readied service and the request's
        // head, and is `None` only for the instant between the last frame and the call.
        Collecting {
            #[pin]
            body: B,
            collected: Option<Collected<S>>,
        },
        // The inner service has the request.
        Called {
            #[pin]
            fut: S::Future,
        },
        // Answered without calling the inner service; `None` once handed out.
        Rejected {
            response: Option<S::Response>,
        },
    }
}

/// What a request is made of while its body is read.
struct Collected<S> {
    inner: S,
    parts: Parts,
    data: Data,
    trailers: Option<HeaderMap>,
    /// What the trailers count against the cap (see [`field_bytes`]).
    trailer_bytes: usize,
    max_bytes: usize,
    framing: Framing,
    protocol: Protocol,
}

impl<S> Collected<S> {
    /// Appends a chunk, or refuses it if the body grows past its `Content-Length`
    /// or past the cap. `still_expected` is the body's own lower bound on what is
    /// left after this chunk: a claim, trusted only as far as the bytes received.
    fn push(&mut self, chunk: impl Buf, still_expected: u64) -> Result<(), Rejection> {
        let len = chunk.remaining();
        // Saturating: lengths come from the body, and the sums are only compared.
        let total = self.data.len().saturating_add(len);
        if let Some(declared) = self.framing.declared() {
            if u64::try_from(total).unwrap_or(u64::MAX) > declared {
                // More than the header said: the branches would see a body its
                // `Content-Length` contradicts.
                return Err(Rejection::Malformed);
            }
        }
        if total.saturating_add(self.trailer_bytes) > self.max_bytes {
            return Err(Rejection::TooLarge);
        }
        self.data.push(chunk, still_expected, self.max_bytes);
        Ok(())
    }

    /// Keeps a trailers frame, counted against the cap before it is kept.
    fn push_trailers(&mut self, trailers: HeaderMap) -> Result<(), Rejection> {
        let trailer_bytes = self.trailer_bytes.saturating_add(field_bytes(&trailers));
        if self.data.len().saturating_add(trailer_bytes) > self.max_bytes {
            return Err(Rejection::TooLarge);
        }
        self.trailer_bytes = trailer_bytes;
        match &mut self.trailers {
            Some(held) => held.extend(trailers),
            None => self.trailers = Some(trailers),
        }
        Ok(())
    }

    /// Checks the framing headers against the whole body, once it has ended.
    fn finish(&mut self) -> Result<(), Rejection> {
        let received = u64::try_from(self.data.len()).unwrap_or(u64::MAX);
        self.framing.finish(received, &mut self.parts.headers)
    }

    fn into_request(self) -> (S, Request<ReplayBody>) {
        let body = ReplayBody::with_trailers(self.data.freeze(), self.trailers);
        (self.inner, Request::from_parts(self.parts, body))
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody>>,
{
    pub(crate) fn called(fut: S::Future) -> Self {
        ResponseFuture {
            state: State::Called { fut },
        }
    }

    pub(crate) fn rejected(response: S::Response) -> Self {
        ResponseFuture {
            state: State::Rejected {
                response: Some(response),
            },
        }
    }

    pub(crate) fn collecting(
        inner: S,
        parts: Parts,
        body: B,
        max_bytes: usize,
        framing: Framing,
        protocol: Protocol,
    ) -> Self {
        let collected = Collected {
            inner,
            parts,
            data: Data::Empty,
            trailers: None,
            trailer_bytes: 0,
            max_bytes,
            framing,
            protocol,
        };
        ResponseFuture {
            state: State::Collecting {
                body,
                collected: Some(collected),
            },
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody>, Response = Response<ResBody>>,
    B: Body,
    ResBody: Default,
{
    type Output = Result<Response<ResBody>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let mut budget = FRAMES_PER_POLL;
        loop {
            match this.state.as_mut().project() {
                StateProj::Collecting {
                    mut body,
                    collected,
                } => {
                    if budget == 0 {
                        // Bounded work per poll: yield, and ask to be polled again.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    budget -= 1;
                    let held = collected.as_mut().expect("held until the call");
                    let frame = ready!(body.as_mut().poll_frame(cx));
                    let refused = match frame {
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(chunk) => held.push(chunk, body.size_hint().lower()),
                            Err(frame) => match frame.into_trailers() {
                                Ok(trailers) => held.push_trailers(trailers),
                                // A frame of a kind this crate does not know: not
                                // part of the request either branch sees.
                                Err(_) => Ok(()),
                            },
                        },
                        // The error itself cannot be returned without widening the
                        // error type; the request is answered instead.
                        Some(Err(_)) => Err(Rejection::Unreadable),
                        None => match held.finish() {
                            Ok(()) => {
                                let held = collected.take().expect("held until the call");
                                let (mut inner, req) = held.into_request();
                                // `inner` was readied by `BufferBody::poll_ready`
                                // before it moved into this future.
                                let fut = inner.call(req);
                                this.state.set(State::Called { fut });
                                continue;
                            }
                            Err(rejection) => Err(rejection),
                        },
                    };
                    let Err(rejection) = refused else {
                        continue;
                    };
                    let protocol = held.protocol;
                    // CORRECTNESS: the body and the readied service are dropped here,
                    // with the state: neither branch is ever called for this request.
                    let response = rejection.response(protocol);
                    this.state.set(State::Rejected {
                        response: Some(response),
                    });
                }
                StateProj::Called { fut } => return fut.poll(cx),
                StateProj::Rejected { response } => {
                    let response = response.take().expect("polled after completion");
                    return Poll::Ready(Ok(response));
                }
            }
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (state, buffered) = match &self.state {
            State::Collecting { collected, .. } => (
                "Collecting",
                collected.as_ref().map_or(0, |held| held.data.len()),
            ),
            State::Called { .. } => ("Called", 0),
            State::Rejected { .. } => ("Rejected", 0),
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("buffered", &buffered)
            .finish()
    }
}
