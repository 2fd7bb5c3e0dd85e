//! [`OnCancel`](super::OnCancel)'s response future.

use super::call::{CallId, Running};
use pin_project_lite::pin_project;
use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

pin_project! {
    /// The response future of [`OnCancel`](super::OnCancel): the inner service's
    /// future, run as its call's own.
    ///
    /// While it polls the inner future it marks its call as running on this thread, so
    /// that the call's [`Slot`](super::Slot), if the call's own code drops it (the call
    /// answered, or returned early), knows not to run its action. It adds nothing else:
    /// the output is the inner future's, and dropping it drops the inner future, whose
    /// slot, still filled, then runs its action. An inner future that answers is
    /// dropped at once, still marked: a future that keeps its slot after answering (a
    /// hand-written one, with the slot a field) runs no action either.
    pub struct ResponseFuture<F> {
        // `None` once it answered.
        #[pin]
        inner: Option<F>,
        call: CallId,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, call: CallId) -> Self {
        ResponseFuture {
            inner: Some(inner),
            call,
        }
    }
}

impl<F: Future> Future for ResponseFuture<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        let _running = Running::enter(*this.call);
        let inner = this
            .inner
            .as_mut()
            .as_pin_mut()
            .expect("`cancel::ResponseFuture` polled after completion");
        let output = std::task::ready!(inner.poll(cx));
        // CORRECTNESS: dropped while still marked, whatever it holds: the call answered.
        this.inner.set(None);
        Poll::Ready(output)
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("inner", &format_args!("{}", std::any::type_name::<F>()))
            .finish()
    }
}
