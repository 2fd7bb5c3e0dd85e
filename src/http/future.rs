//! The future returned by a [`BufferBody`](super::BufferBody) service.
//!
//! Available with the `http` feature.

use super::{buffer::Rejection, ReplayBody};
use bytes::{Buf, BufMut, Bytes, BytesMut};
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
    /// It reads the request body (if there is one to read), then calls the inner
    /// service with the buffered request and resolves to its answer — or, if the body
    /// was too large or failed, to a `413` or `400` response without calling it.
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
    max_bytes: usize,
    grpc: bool,
}

/// The body read so far.
enum Data {
    Empty,
    // A single chunk is kept as the body sent it: no copy.
    One(Bytes),
    // From the second chunk on, chunks are copied into one buffer.
    Many(BytesMut),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::Empty => 0,
            Data::One(bytes) => bytes.len(),
            Data::Many(buf) => buf.len(),
        }
    }
}

impl<S> Collected<S> {
    /// Appends a chunk, or refuses it if the body would grow past the cap.
    /// `still_expected` is the body's own lower bound on what is left after this chunk.
    fn push(&mut self, mut chunk: impl Buf, still_expected: u64) -> Result<(), Rejection> {
        let len = chunk.remaining();
        let total = self.data.len() + len;
        if total > self.max_bytes {
            return Err(Rejection::TooLarge);
        }
        if len == 0 {
            return Ok(());
        }
        self.data = match std::mem::replace(&mut self.data, Data::Empty) {
            // `copy_to_bytes` on `Bytes` (what hyper and axum bodies yield) is a
            // reference-count bump, not a copy.
            Data::Empty => Data::One(chunk.copy_to_bytes(len)),
            Data::One(first) => {
                let expected = total as u64 + still_expected;
                let capacity = expected.min(self.max_bytes as u64) as usize;
                let mut buf = BytesMut::with_capacity(capacity.max(total));
                buf.put(first);
                buf.put(chunk);
                Data::Many(buf)
            }
            Data::Many(mut buf) => {
                buf.put(chunk);
                Data::Many(buf)
            }
        };
        Ok(())
    }

    fn push_trailers(&mut self, trailers: HeaderMap) {
        match &mut self.trailers {
            Some(held) => held.extend(trailers),
            None => self.trailers = Some(trailers),
        }
    }

    fn into_request(self) -> (S, Request<ReplayBody>) {
        let data = match self.data {
            Data::Empty => Bytes::new(),
            Data::One(bytes) => bytes,
            Data::Many(buf) => buf.freeze(),
        };
        let body = ReplayBody::with_trailers(data, self.trailers);
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
        grpc: bool,
    ) -> Self {
        let collected = Collected {
            inner,
            parts,
            data: Data::Empty,
            trailers: None,
            max_bytes,
            grpc,
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
        loop {
            match this.state.as_mut().project() {
                StateProj::Collecting {
                    mut body,
                    collected,
                } => {
                    let held = collected.as_mut().expect("held until the call");
                    let frame = ready!(body.as_mut().poll_frame(cx));
                    let rejection = match frame {
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(chunk) => match held.push(chunk, body.size_hint().lower()) {
                                Ok(()) => continue,
                                Err(rejection) => rejection,
                            },
                            Err(frame) => {
                                if let Ok(trailers) = frame.into_trailers() {
                                    held.push_trailers(trailers);
                                }
                                continue;
                            }
                        },
                        // The error itself cannot be returned without widening the
                        // error type; the request is answered instead.
                        Some(Err(_)) => Rejection::Unreadable,
                        None => {
                            let held = collected.take().expect("held until the call");
                            let (mut inner, req) = held.into_request();
                            // `inner` was readied by `BufferBody::poll_ready` before it
                            // moved into this future.
                            let fut = inner.call(req);
                            this.state.set(State::Called { fut });
                            continue;
                        }
                    };
                    // CORRECTNESS: the body and the readied service are dropped here,
                    // with the state: neither branch is ever called for this request.
                    let response = rejection.response(held.grpc);
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
