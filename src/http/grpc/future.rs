//! The response future of [`PeekGrpcStatus`](super::PeekGrpcStatus).

use super::{
    body::{Held, PeekBody},
    GrpcCode, PeekedStatus,
};
use bytes::Buf;
use http::Response;
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

/// How many empty data frames one poll skips before it yields: a body that is always
/// ready with empty frames must not keep the task in one poll forever.
const EMPTY_FRAMES_PER_POLL: usize = 16;

pin_project! {
    /// Response future of [`PeekGrpcStatus`](super::PeekGrpcStatus).
    ///
    /// It resolves when the inner service has answered and, for a response whose
    /// status is not in its head, when the body's first frame has arrived or the wait
    /// for it has run out. Dropping it drops the inner future or the response being
    /// read.
    pub struct PeekFuture<F, B> {
        #[pin]
        state: State<F, B>,
        peek: bool,
        max_wait: Duration,
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
        // Reading the first frame of the body. `response` is `None` once handed out;
        // the timer is set the first time the body is not ready.
        Peeking {
            response: Option<Response<B>>,
            #[pin]
            deadline: Option<Sleep>,
        },
    }
}

impl<F, B> PeekFuture<F, B> {
    pub(super) fn new(fut: F, peek: bool, max_wait: Duration) -> Self {
        PeekFuture {
            state: State::Waiting { fut },
            peek,
            max_wait,
        }
    }
}

impl<F, B, E> Future for PeekFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body + Unpin,
{
    type Output = Result<Response<PeekBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting { fut } => {
                    let response = ready!(fut.poll(cx))?;
                    // Only a `200` without `grpc-status` has its status in the body.
                    if !*this.peek || GrpcCode::of_response(&response).is_some() {
                        return Poll::Ready(Ok(response.map(|b| PeekBody::new(b, Held::Nothing))));
                    }
                    this.state.set(State::Peeking {
                        response: Some(response),
                        deadline: None,
                    });
                }
                StateProj::Peeking {
                    response,
                    mut deadline,
                } => {
                    let body = response
                        .as_mut()
                        .expect("polled after completion")
                        .body_mut();
                    let mut skipped = 0;
                    let read = loop {
                        match Pin::new(&mut *body).poll_frame(cx) {
                            Poll::Ready(Some(Ok(frame))) => {
                                if frame.data_ref().is_some_and(|data| !data.has_remaining()) {
                                    // An empty data frame is no message: look further.
                                    skipped += 1;
                                    if skipped < EMPTY_FRAMES_PER_POLL {
                                        continue;
                                    }
                                    cx.waker().wake_by_ref();
                                    break None;
                                }
                                // Trailers first: the answer has no message, judge them.
                                // Data first: a message came, the status comes later.
                                let code = frame.trailers_ref().map(|trailers| {
                                    GrpcCode::of_headers(trailers).unwrap_or(GrpcCode::Unknown)
                                });
                                break Some((Held::Frame(frame), code));
                            }
                            Poll::Ready(Some(Err(error))) => {
                                break Some((Held::Error(error), Some(GrpcCode::Unknown)))
                            }
                            // No frame at all: a `200` with no status, as tonic reads it.
                            Poll::Ready(None) => {
                                break Some((Held::Ended, Some(GrpcCode::Unknown)))
                            }
                            Poll::Pending => break None,
                        }
                    };
                    let (held, code) = match read {
                        Some(read) => read,
                        None => {
                            if deadline.is_none() {
                                deadline.set(Some(tokio::time::sleep(*this.max_wait)));
                            }
                            let timer = deadline.as_pin_mut().expect("set above");
                            ready!(timer.poll(cx));
                            // Waited long enough: hand the response on as it is, its
                            // status still unknown. No frame that carries anything was
                            // taken from the body.
                            (Held::Nothing, None)
                        }
                    };
                    let mut response = response.take().expect("polled after completion");
                    if let Some(code) = code {
                        response.extensions_mut().insert(PeekedStatus(code));
                    }
                    return Poll::Ready(Ok(response.map(|b| PeekBody::new(b, held))));
                }
            }
        }
    }
}

impl<F, B> fmt::Debug for PeekFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Waiting { .. } => "Waiting",
            State::Peeking { .. } => "Peeking",
        };
        f.debug_struct("PeekFuture")
            .field("state", &state)
            .field("peek", &self.peek)
            .field("max_wait", &self.max_wait)
            .finish()
    }
}
