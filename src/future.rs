//! The future returned by a [`Fallback`](crate::Fallback) service.

use crate::{
    accept::Accept,
    launch::{Plan, Speculation, Timer},
    outcome::Served,
};
use pin_project_lite::pin_project;
use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};
use tower_service::Service;

pin_project! {
    /// Response future of [`Fallback`](crate::Fallback).
    ///
    /// It drives the primary's future and the fallback's readiness and future side by
    /// side, without spawning a task. It resolves to the primary's result as soon as
    /// the predicate accepts it — dropping the fallback's future, or its pending
    /// readiness, on the spot — and otherwise to the fallback's result.
    ///
    /// Like most futures, it panics if polled again after it has completed. Dropping
    /// it at any point drops both branches (and, with an outcome observer, reports the
    /// request as [`Served::Abandoned`](crate::outcome::Served::Abandoned)).
    ///
    /// # Panics
    ///
    /// A panic in code it runs — either branch's future, the fallback's `poll_ready`
    /// and `call`, the [`Accept`] predicate, the outcome hook, a branch's `drop` —
    /// propagates out of `poll` and poisons the future: polling it again panics with
    /// "`ResponseFuture` polled after it panicked" and never serves an answer. See
    /// [`Fallback`'s panics section](crate::Fallback#panics) for what is reported.
    #[project = ResponseFutureProj]
    pub struct ResponseFuture<PF, F, Req, A>
    where
        F: Service<Req>,
    {
        // `None` once the primary has answered (and its answer was rejected), or has been
        // dropped unanswered by the patience bound.
        #[pin]
        primary: Option<PF>,
        #[pin]
        fallback: Branch<F, Req>,
        // The launch delay while the fallback waits to start speculatively; later, the
        // patience bound while a fallback answer waits for the primary. Never both.
        #[pin]
        timer: Option<Timer>,
        accept: A,
        speculation: Speculation,
        // Set for the length of each `poll`: still set afterwards only if that poll
        // panicked, which poisons the future.
        polling: bool,
    }
}

pin_project! {
    #[project = BranchProj]
    enum Branch<F, Req>
    where
        F: Service<Req>,
    {
        // Holding a clone of the fallback and the request. Until the launch, readiness
        // is not even asked; after it, the clone is driven to readiness.
        NotReady {
            svc: F,
            req: Option<Req>,
        },
        // The fallback has been called and its future is in flight.
        Called {
            #[pin]
            fut: F::Future,
        },
        // The fallback answered (or failed to become ready) while the primary was still
        // pending; the result is held in case the primary is rejected.
        Answered {
            result: Option<Result<F::Response, F::Error>>,
        },
        // The fallback is no longer wanted, or its result has been handed out.
        Done,
    }
}

impl<PF, F, Req, A> ResponseFuture<PF, F, Req, A>
where
    F: Service<Req>,
{
    pub(crate) fn new(
        primary: PF,
        fallback: F,
        req: Req,
        accept: A,
        speculation: Speculation,
    ) -> Self {
        ResponseFuture {
            primary: Some(primary),
            fallback: Branch::NotReady {
                svc: fallback,
                req: Some(req),
            },
            timer: None,
            accept,
            speculation,
            polling: false,
        }
    }
}

impl<PF, F, Req, A, T, E> Future for ResponseFuture<PF, F, Req, A>
where
    PF: Future<Output = Result<T, E>>,
    F: Service<Req, Response = T, Error = E>,
    A: Accept<T, E>,
{
    type Output = Result<T, E>;

    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        #[cfg(feature = "tracing")]
        if self.speculation.tracker.is_observed() {
            return self.poll_in_span(cx);
        }
        self.poll_guarded(cx)
    }
}

impl<PF, F, Req, A, T, E> ResponseFuture<PF, F, Req, A>
where
    PF: Future<Output = Result<T, E>>,
    F: Service<Req, Response = T, Error = E>,
    A: Accept<T, E>,
{
    /// A poll of an observed request, inside its `tracing` span.
    #[cfg(feature = "tracing")]
    #[inline(never)]
    fn poll_in_span(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, E>> {
        // A clone: the poll goes on to update the tracker while the span is entered.
        let span = self.speculation.tracker.span();
        let _entered = span.as_ref().map(tracing::Span::enter);
        self.poll_guarded(cx)
    }

    /// One poll, poisoning the future if it panics.
    #[inline(always)]
    fn poll_guarded(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, E>> {
        let mut this = self.project();
        // CORRECTNESS: a panic in user code can leave the state half-updated — an answer
        // taken but not judged, a request taken but no call made. Such a future must
        // never serve anything, or it would serve what nobody decided to serve.
        if *this.polling {
            poisoned();
        }
        *this.polling = true;
        let poll = Self::poll_primary(&mut this, cx);
        *this.polling = false;
        poll
    }

    // The body is small: everything past the primary's answer is in `poll_fallback`.
    #[inline(always)]
    fn poll_primary(
        this: &mut ResponseFutureProj<'_, PF, F, Req, A>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<T, E>> {
        // The primary is polled first so that an answer it already has is judged before
        // the fallback is started at all.
        if let Some(primary) = this.primary.as_mut().as_pin_mut() {
            if let Poll::Ready(result) = primary.poll(cx) {
                // The answer and its latency are recorded before any more user code runs
                // (the spent future's drop, the predicate): if that panics, the outcome
                // still says the primary answered, and that nothing judged it.
                this.speculation.primary_answered();
                this.speculation.tracker.primary_answered();
                // CORRECTNESS: the primary's future is dropped here in both cases, so it
                // is never polled after it completed.
                this.primary.set(None);
                // Neither a launch delay nor the patience bound applies any more.
                if this.timer.is_some() {
                    this.timer.set(None);
                }
                let accepted = this.accept.accept(&result);
                this.speculation.tracker.judged(accepted);
                if accepted {
                    // Drop the fallback — its readiness, its future or its held answer —
                    // before the response is handed back, and before it is reported.
                    this.fallback.set(Branch::Done);
                    this.speculation.tracker.finish(Served::Primary);
                    return Poll::Ready(result);
                }
                // Rejected: the fallback starts now if it has not yet, whatever the
                // policy and the budget say. This launch is not speculative.
                if !this.speculation.launched {
                    this.speculation.launched = true;
                    let why = this.speculation.plan.reason(false);
                    this.speculation.tracker.launched(why);
                }
            }
        }
        Self::poll_fallback(this, cx)
    }

    /// Everything after the primary's first answer or its pending poll: launching and
    /// driving the fallback. Kept out of line so that `poll`'s path for an accepted
    /// primary stays small enough to inline into the caller.
    #[inline(never)]
    fn poll_fallback(
        this: &mut ResponseFutureProj<'_, PF, F, Req, A>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<T, E>> {
        let primary_pending = this.primary.is_some();

        if primary_pending && !this.speculation.launched {
            // Without the `time` feature there is nothing to wait for, hence no looping.
            #[cfg_attr(not(feature = "time"), allow(clippy::never_loop))]
            loop {
                match this.speculation.plan {
                    Plan::Now => break,
                    Plan::OnReject(_) => return Poll::Pending,
                    // The delay counts from the first poll that finds the primary
                    // pending: a primary that answers at once costs no clock read.
                    #[cfg(feature = "time")]
                    Plan::After(delay, why) => {
                        this.speculation.plan =
                            Plan::after(tokio::time::Instant::now(), delay, why);
                    }
                    #[cfg(feature = "time")]
                    Plan::At(deadline, _) => {
                        if this.timer.is_none() {
                            this.timer.set(Some(tokio::time::sleep_until(deadline)));
                        }
                        let timer = this
                            .timer
                            .as_mut()
                            .as_pin_mut()
                            .expect("timer was just set");
                        if timer.poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        this.timer.set(None);
                        break;
                    }
                }
            }
            // A refused withdrawal turns the plan into `OnReject`: the primary's answer,
            // which wakes this task, launches the fallback if it is rejected.
            if !this.speculation.withdraw() {
                return Poll::Pending;
            }
            this.speculation.launched = true;
            let why = this.speculation.plan.reason(true);
            this.speculation.tracker.launched(why);
        }

        loop {
            match this.fallback.as_mut().project() {
                BranchProj::NotReady { svc, req } => match svc.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let req = req.take().expect("request is present until called");
                        // Counted as called before the call: a `call` that panics was
                        // made all the same, and may have done some of its work.
                        this.speculation.tracker.called();
                        let fut = svc.call(req);
                        this.fallback.set(Branch::Called { fut });
                    }
                    // A readiness error is the fallback's answer, served only if it is
                    // needed, like any other fallback error.
                    Poll::Ready(Err(error)) => {
                        this.speculation.tracker.fallback_unready();
                        if !primary_pending {
                            this.fallback.set(Branch::Done);
                            this.speculation.tracker.finish(Served::Fallback);
                            return Poll::Ready(Err(error));
                        }
                        this.fallback.set(Branch::Answered {
                            result: Some(Err(error)),
                        });
                    }
                    Poll::Pending => return Poll::Pending,
                },
                BranchProj::Called { fut } => {
                    let result = match fut.poll(cx) {
                        Poll::Ready(result) => result,
                        Poll::Pending => return Poll::Pending,
                    };
                    this.speculation.tracker.fallback_answered(primary_pending);
                    if !primary_pending {
                        this.fallback.set(Branch::Done);
                        this.speculation.tracker.finish(Served::Fallback);
                        return Poll::Ready(result);
                    }
                    // The primary is preferred: hold the fallback's answer until the
                    // primary's verdict, or until the patience bound runs out.
                    #[cfg(feature = "time")]
                    if let (Some(patience), Ok(_)) = (this.speculation.patience, &result) {
                        this.timer.set(Some(tokio::time::sleep(patience)));
                    }
                    this.fallback.set(Branch::Answered {
                        result: Some(result),
                    });
                }
                BranchProj::Answered { result } => {
                    if primary_pending {
                        // Only a successful fallback answer ever sets the patience timer.
                        let Some(timer) = this.timer.as_mut().as_pin_mut() else {
                            return Poll::Pending;
                        };
                        if timer.poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        // Patience ran out: serve the fallback, drop the primary unanswered.
                        this.timer.set(None);
                        this.primary.set(None);
                        this.speculation.primary_cut_short();
                    }
                    let result = result.take().expect("answer is held until handed out");
                    this.fallback.set(Branch::Done);
                    this.speculation.tracker.finish(Served::Fallback);
                    return Poll::Ready(result);
                }
                BranchProj::Done => panic!("`ResponseFuture` polled after completion"),
            }
        }
    }
}

/// Out of line: only a caller that caught a panic from `poll` gets here.
#[cold]
#[inline(never)]
fn poisoned() -> ! {
    panic!("`ResponseFuture` polled after it panicked")
}

impl<PF, F, Req, A> fmt::Debug for ResponseFuture<PF, F, Req, A>
where
    F: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let primary = if self.primary.is_some() {
            "Pending"
        } else {
            "Done"
        };
        let fallback = match &self.fallback {
            Branch::NotReady { .. } if !self.speculation.launched => "Waiting",
            Branch::NotReady { .. } => "NotReady",
            Branch::Called { .. } => "Called",
            Branch::Answered { .. } => "Answered",
            Branch::Done => "Done",
        };
        f.debug_struct("ResponseFuture")
            .field("primary", &primary)
            .field("fallback", &fallback)
            .field("speculation", &self.speculation)
            .field("poisoned", &self.polling)
            .finish_non_exhaustive()
    }
}
