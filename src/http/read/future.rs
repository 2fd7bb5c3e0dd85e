//! The response future of [`ReadBody`](super::ReadBody) and
//! [`PeekGrpcStatus`](crate::http::grpc::PeekGrpcStatus): one reader for both.

use super::{
    body::{ReadAheadBody, Then},
    IncompleteBody,
};
use crate::http::{
    collect::{field_bytes, Data, FRAMES_PER_POLL},
    grpc::{GrpcCode, PeekedStatus},
};
use bytes::{Buf, Bytes};
use http::{HeaderMap, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};
use tokio::time::Sleep;

/// How far a reader reads a response's body before handing the response on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Until {
    /// Nothing: the body is only wrapped (the fallback's side, whose body type must
    /// match the primary's).
    Nothing,
    /// The first frame that carries something, if the head has no gRPC status: the
    /// gRPC peek.
    FirstMessage,
    /// The end of the body, up to `max_bytes` of data and trailer fields.
    End { max_bytes: usize },
}

/// What a reader was told: how far, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reader {
    pub(crate) until: Until,
    pub(crate) max_wait: Duration,
}

pin_project! {
    /// Response future of [`ReadBody`](super::ReadBody) and
    /// [`PeekGrpcStatus`](crate::http::grpc::PeekGrpcStatus).
    ///
    /// It resolves when the inner service has answered and its body has been read as
    /// far as the service was told — or has failed, run over the byte cap, or not got
    /// there within the time bound (see [`IncompleteBody`]). It reads inside this
    /// future, at most 32 frames per poll; no task is spawned. Dropping it drops the
    /// inner future, or the response being read.
    ///
    /// Available with the `http` and `time` features.
    pub struct ReadFuture<F, B> {
        #[pin]
        state: State<F, B>,
        reader: Reader,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        // The inner service has the request.
        Waiting {
            #[pin]
            fut: F,
        },
        // Reading the body. `response` is `None` once handed out; the timer is set
        // the first time the body is not ready, or the poll's share of frames is used.
        Reading {
            response: Option<Response<B>>,
            read: Read,
            #[pin]
            deadline: Option<Sleep>,
        },
    }
}

/// What was read so far.
#[derive(Default)]
struct Read {
    data: Data,
    over: Bytes,
    trailers: Option<HeaderMap>,
    trailer_bytes: usize,
}

/// Why the reading stopped.
enum Stop<E> {
    /// The body ended (no frame, or no more).
    Ended,
    /// The trailers came: the end of the body as HTTP defines it.
    Trailers,
    /// A frame with data came, and only the first one was wanted.
    Message,
    /// The data and trailers are more than `max_bytes`.
    TooLarge,
    /// The body failed.
    Failed(E),
    /// The body was not read as far as wanted within `max_wait`.
    TimedOut,
}

impl<F, B> ReadFuture<F, B> {
    pub(crate) fn new(fut: F, reader: Reader) -> Self {
        ReadFuture {
            state: State::Waiting { fut },
            reader,
        }
    }
}

impl Read {
    /// Reads up to [`FRAMES_PER_POLL`] frames: `Pending` when the body is not ready
    /// or the poll's share is used (then the task is woken again).
    fn poll<B>(&mut self, body: &mut B, until: Until, cx: &mut Context<'_>) -> Poll<Stop<B::Error>>
    where
        B: Body + Unpin,
    {
        for _ in 0..FRAMES_PER_POLL {
            let frame = match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                None => return Poll::Ready(Stop::Ended),
                Some(Err(error)) => return Poll::Ready(Stop::Failed(error)),
                Some(Ok(frame)) => frame,
            };
            let frame = match frame.into_data() {
                // An empty data frame carries nothing: read on.
                Ok(chunk) if !chunk.has_remaining() => continue,
                Ok(mut chunk) => match until {
                    Until::End { max_bytes } => {
                        if self.push(chunk, body.size_hint().lower(), max_bytes) {
                            continue;
                        }
                        return Poll::Ready(Stop::TooLarge);
                    }
                    // A message came; the status comes after it.
                    Until::FirstMessage | Until::Nothing => {
                        let len = chunk.remaining();
                        self.data = Data::One(chunk.copy_to_bytes(len));
                        return Poll::Ready(Stop::Message);
                    }
                },
                Err(frame) => frame,
            };
            // A frame of a kind this crate does not know is left out, as
            // `BufferBody` leaves it out of requests.
            if let Ok(trailers) = frame.into_trailers() {
                self.trailer_bytes = self.trailer_bytes.saturating_add(field_bytes(&trailers));
                self.trailers = Some(trailers);
                if let Until::End { max_bytes } = until {
                    if self.data.len().saturating_add(self.trailer_bytes) > max_bytes {
                        return Poll::Ready(Stop::TooLarge);
                    }
                }
                return Poll::Ready(Stop::Trailers);
            }
        }
        // Bounded work per poll: yield, and ask to be polled again.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Keeps a chunk within the cap (`true`), or holds the one that crosses it as it
    /// is (`false`). `still_expected` is the body's own claim of what is left.
    fn push(&mut self, mut chunk: impl Buf, still_expected: u64, max_bytes: usize) -> bool {
        let len = chunk.remaining();
        // Saturating: lengths come from the body, and the sums are only compared.
        let total = self
            .data
            .len()
            .saturating_add(len)
            .saturating_add(self.trailer_bytes);
        if total > max_bytes {
            self.over = chunk.copy_to_bytes(len);
            return false;
        }
        self.data.push(chunk, still_expected, max_bytes);
        true
    }

    /// The response handed on: what was read goes back in front of the rest of the
    /// body, and how the reading ended is marked where predicates look.
    fn finish<B: Body>(
        self,
        response: Response<B>,
        until: Until,
        stop: Stop<B::Error>,
    ) -> Response<ReadAheadBody<B>> {
        let (mut parts, inner) = response.into_parts();
        let peek = until == Until::FirstMessage;
        // Rare paths: the extension's map is the only allocation.
        let extensions = &mut parts.extensions;
        let (then, whole) = match stop {
            Stop::Ended => {
                if peek {
                    // No frame at all: a `200` with no status, as tonic reads it.
                    extensions.insert(PeekedStatus(GrpcCode::Unknown));
                }
                (Then::Ended, true)
            }
            Stop::Trailers => {
                if peek {
                    let trailers = self.trailers.as_ref();
                    let code = trailers.and_then(GrpcCode::of_headers);
                    extensions.insert(PeekedStatus(code.unwrap_or(GrpcCode::Unknown)));
                }
                (Then::Rest, true)
            }
            Stop::Message => (Then::Rest, false),
            Stop::TooLarge => {
                extensions.insert(IncompleteBody::TooLarge);
                (Then::Rest, false)
            }
            Stop::Failed(error) => {
                if peek {
                    extensions.insert(PeekedStatus(GrpcCode::Unknown));
                }
                extensions.insert(IncompleteBody::Failed);
                (Then::Error(error), false)
            }
            Stop::TimedOut => {
                extensions.insert(IncompleteBody::TimedOut);
                (Then::Rest, false)
            }
        };
        // The peek reads at most a first frame: never the whole body, as far as a
        // predicate over the body can tell.
        let whole = whole && !peek;
        let body = ReadAheadBody::new(
            inner,
            self.data.freeze(),
            self.over,
            self.trailers,
            then,
            whole,
        );
        Response::from_parts(parts, body)
    }
}

impl<F, B, E> Future for ReadFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body + Unpin,
{
    type Output = Result<Response<ReadAheadBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let until = this.reader.until;
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting { fut } => {
                    let response = ready!(fut.poll(cx))?;
                    let read = match until {
                        Until::Nothing => false,
                        // Only a `200` without `grpc-status` has its status in the body.
                        Until::FirstMessage => GrpcCode::of_response(&response).is_none(),
                        Until::End { .. } => true,
                    };
                    if !read {
                        return Poll::Ready(Ok(response.map(ReadAheadBody::unread)));
                    }
                    // Claims decide before anything is read: an ended body is not
                    // polled, a body that says it is over the cap is not read at all.
                    // The `Content-Length` header is not one of them: a `HEAD`
                    // answer's describes a body it does not have.
                    let body = response.body();
                    let stop = if body.is_end_stream() {
                        Some(Stop::Ended)
                    } else {
                        match until {
                            Until::End { max_bytes }
                                if body.size_hint().lower()
                                    > u64::try_from(max_bytes).unwrap_or(u64::MAX) =>
                            {
                                Some(Stop::TooLarge)
                            }
                            _ => None,
                        }
                    };
                    if let Some(stop) = stop {
                        return Poll::Ready(Ok(Read::default().finish(response, until, stop)));
                    }
                    this.state.set(State::Reading {
                        response: Some(response),
                        read: Read::default(),
                        deadline: None,
                    });
                }
                StateProj::Reading {
                    response,
                    read,
                    mut deadline,
                } => {
                    let body = response
                        .as_mut()
                        .expect("polled after completion")
                        .body_mut();
                    let stop = match read.poll(body, until, cx) {
                        Poll::Ready(stop) => stop,
                        Poll::Pending => {
                            if deadline.is_none() {
                                deadline.set(Some(tokio::time::sleep(this.reader.max_wait)));
                            }
                            let timer = deadline.as_pin_mut().expect("set above");
                            ready!(timer.poll(cx));
                            Stop::TimedOut
                        }
                    };
                    let response = response.take().expect("polled after completion");
                    let read = std::mem::take(read);
                    return Poll::Ready(Ok(read.finish(response, until, stop)));
                }
            }
        }
    }
}

impl<F, B> fmt::Debug for ReadFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (state, read) = match &self.state {
            State::Waiting { .. } => ("Waiting", 0),
            State::Reading { read, .. } => ("Reading", read.data.len()),
        };
        f.debug_struct("ReadFuture")
            .field("state", &state)
            .field("read", &read)
            .field("until", &self.reader.until)
            .field("max_wait", &self.reader.max_wait)
            .finish()
    }
}
