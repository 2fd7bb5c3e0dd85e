//! The future returned by a [`Fallback`](crate::Fallback) service.

// # Why a small hot future with a recycled cold part
//
// A caller that awaits `svc.call(req)` moves the response future a few times before its
// first poll, so every byte of it costs on every request, used or not. The future is
// therefore split in two. The hot part holds what every request needs: the primary's
// future, the fallback branch, the predicate, the plan and two flags. Everything only
// some layers use — the timer (a `tokio::time::Sleep`, 112 bytes), the outcome tracker
// and `tracing` span, the budget handle, the adaptive sampler, patience — is in one
// `Cold` behind one pointer (`cold.rs`), `None` for a request whose layer uses none of
// it: such a request never touches it, and no `#[cfg(feature)]` field appears in the
// hot part, so compiling features in changes neither its size nor its code.
//
// The cold part is a `Pin<Box<Cold>>` taken from a bounded per-thread free list (256)
// at `call` and emptied and put back when the future is dropped, so it allocates only
// when the list is empty (warm-up, or more than that many such futures alive on one
// thread at once). `Cold` is one concrete type whatever the services are, which is
// what makes one free list serve every layer; `Pin<Box<_>>` and pin-project keep it
// free of `unsafe`. Emptying drops every handle on a layer (budget, hook, sampler,
// span) so that a pooled part keeps no layer alive — except the handles that are only
// data, a `Stats` (counters) and an `Adaptive` (its estimate), kept for the next
// request of the same layer: counting and sampling then cost no reference-count
// traffic. Every time a timed request takes during one poll is one clock reading.
//
// The other road was a type-level split: the builder picks a future type per
// configuration (`Option<Sleep>` only when a delay is set, a tracker only with
// observers, and so on). It saves the free list's few nanoseconds on observed requests
// but multiplies the public types (a `Fallback` with a budget would be another type
// than one without, and `launch(..)` could no longer be changed at run time between a
// policy that waits and one that does not), and every combination of options is
// another state machine to test. One state machine with one optional pointer is
// what this crate chose.

use crate::{
    accept::Accept,
    launch::{Control, Launched, Plan, Settings},
    outcome::Served,
    refill::{NoRefill, Refill, Refilled, Write},
};
use pin_project_lite::pin_project;
use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};
use tower_service::Service;

mod cold;

use self::cold::ColdSlot;

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
    pub struct ResponseFuture<PF, F, Req, A, R = NoRefill>
    where
        F: Service<Req>,
        R: Refill<Req, F::Response>,
    {
        // `None` once the primary has answered (and its answer was rejected), or has been
        // dropped unanswered by the patience bound.
        #[pin]
        primary: Option<PF>,
        #[pin]
        fallback: Branch<F, Req>,
        accept: A,
        // The refill action and what it keeps of the request, if it may refill it: taken
        // when it runs. Zero-sized with `NoRefill`, whose key is uninhabited.
        refill: Option<(R, R::Key)>,
        // The plan and the flags, in one word: one field for the projection to point at.
        control: Control,
        // Everything optional. Last, so that it is dropped after both branches: an
        // abandoned request is reported once they are gone.
        cold: ColdSlot,
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

impl<PF, F, Req, A, R> ResponseFuture<PF, F, Req, A, R>
where
    F: Service<Req>,
    R: Refill<Req, F::Response>,
{
    /// Plans the request — the budget deposit, the cold part — and so must come after
    /// all the user code `call` runs.
    #[inline(always)]
    pub(crate) fn new(
        primary: PF,
        fallback: F,
        req: Req,
        accept: A,
        refill: Option<(R, R::Key)>,
        settings: &Settings,
        eligible: bool,
    ) -> Self {
        let control = settings.start(eligible);
        ResponseFuture {
            primary: Some(primary),
            fallback: Branch::NotReady {
                svc: fallback,
                req: Some(req),
            },
            accept,
            refill,
            control,
            cold: ColdSlot::new(settings, control.plan),
        }
    }
}

impl<PF, F, Req, A, R, T, E> Future for ResponseFuture<PF, F, Req, A, R>
where
    PF: Future<Output = Result<T, E>>,
    F: Service<Req, Response = T, Error = E>,
    A: Accept<T, E>,
    R: Refill<Req, T>,
{
    type Output = Result<T, E>;

    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The same check whatever features are compiled in: a request whose layer uses
        // nothing optional never leaves the hot path.
        if self.cold.is_some() {
            return self.poll_cold(cx);
        }
        self.poll_guarded(cx)
    }
}

impl<PF, F, Req, A, R, T, E> ResponseFuture<PF, F, Req, A, R>
where
    PF: Future<Output = Result<T, E>>,
    F: Service<Req, Response = T, Error = E>,
    A: Accept<T, E>,
    R: Refill<Req, T>,
{
    /// A poll of a request with a cold part: one clock reading for the whole poll (if
    /// the request is timed at all), inside the request's `tracing` span if it has one.
    #[inline(never)]
    fn poll_cold(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, E>> {
        // The first poll's budget deposit runs user code: guarded like the poll, so that
        // a `deposit` that panics poisons the future.
        if self.control.poisoned {
            poisoned();
        }
        let mut guard = PoisonOnUnwind(self.as_mut());
        if let Some(cold) = guard.0.as_mut().project().cold.get() {
            cold.new_poll();
        }
        std::mem::forget(guard);
        // A clone: the poll goes on to update the tracker while the span is entered.
        #[cfg(feature = "tracing")]
        if let Some(span) = self.cold.span() {
            let _entered = span.enter();
            return self.poll_guarded(cx);
        }
        self.poll_guarded(cx)
    }

    /// One poll, poisoning the future if it panics.
    #[inline(always)]
    fn poll_guarded(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, E>> {
        // CORRECTNESS: a panic in user code can leave the state half-updated — an answer
        // taken but not judged, a request taken but no call made. Such a future must
        // never serve anything, or it would serve what nobody decided to serve.
        if self.control.poisoned {
            poisoned();
        }
        // Only a panic unwinding out of the poll drops the guard, which poisons the
        // future; a poll that returns forgets it, and so costs no write at all.
        let mut guard = PoisonOnUnwind(self);
        let poll = guard.0.as_mut().poll_primary(cx);
        std::mem::forget(guard);
        poll
    }

    // Everything past the primary's answer is in `poll_fallback`. Both take the pinned future rather than its projection: projecting is pointer
    // arithmetic the compiler folds away, where a projection passed by reference would
    // be built in memory, one pointer per field, on every poll (the hit path's too).
    #[inline(always)]
    fn poll_primary(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, E>> {
        let mut this = self.as_mut().project();
        // The primary is polled first so that an answer it already has is judged before
        // the fallback is started at all.
        if let Some(primary) = this.primary.as_mut().as_pin_mut() {
            if let Poll::Ready(result) = primary.poll(cx) {
                // The answer and its latency are recorded before any more user code runs
                // (the spent future's drop, the predicate): if that panics, the outcome
                // still says the primary answered, and that nothing judged it.
                if let Some(cold) = this.cold.get() {
                    cold.primary_answered();
                }
                // CORRECTNESS: the primary's future is dropped here in both cases, so it
                // is never polled after it completed.
                this.primary.set(None);
                let accepted = this.accept.accept(&result);
                if let Some(cold) = this.cold.get() {
                    cold.tracker().judged(accepted);
                }
                if accepted {
                    // Drop the fallback — its readiness, its future or its held answer —
                    // before the response is handed back, and before it is reported.
                    this.fallback.set(Branch::Done);
                    if let Some(cold) = this.cold.get() {
                        cold.tracker().finish(Served::Primary);
                    }
                    return Poll::Ready(result);
                }
                // Rejected: the fallback starts now if it has not yet, whatever the
                // policy and the budget say. This launch is not speculative.
                if !this.control.launched {
                    this.control.launched = true;
                    let why = this.control.plan.reason(false);
                    if let Some(cold) = this.cold.get() {
                        cold.tracker().launched(why);
                    }
                }
            }
        }
        self.poll_fallback(cx)
    }

    /// Everything after the primary's first answer or its pending poll: launching and
    /// driving the fallback. Always inlined, into the hot poll and into `poll_cold`: out
    /// of line, a miss paid a call and the saving of six registers (31 instructions of
    /// its 124 on the hot path, 16 of a counted miss's 337 in `poll_cold`), and an
    /// accepted primary's path is no longer for it (the rare paths it reaches — timers,
    /// the cold part's updates, refills — are out of line themselves).
    #[inline(always)]
    fn poll_fallback(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, E>> {
        let mut this = self.project();
        let primary_pending = this.primary.is_some();

        if primary_pending && !this.control.launched {
            // A waiting plan without a cold part takes it late: now, to arm the delay.
            #[cfg(feature = "time")]
            if matches!(this.control.plan, Plan::Wait(_)) && !this.cold.is_some() {
                this.cold.take_late(this.control.deferred.get(), None);
            }
            if let Some(cold) = this.cold.get() {
                // A delay that never runs out: only a rejection launches.
                if !cold.primary_pending() {
                    this.control.plan = Plan::OnReject(Launched::AfterRejection);
                }
            }
            match this.control.plan {
                Plan::Now => {}
                Plan::OnReject(_) => return Poll::Pending,
                // A waiting plan always has a cold part, which holds the delay.
                Plan::Wait(_) => {
                    if let Some(cold) = this.cold.get() {
                        if cold.poll_launch_delay(cx).is_pending() {
                            return Poll::Pending;
                        }
                    }
                }
            }
            // A refused withdrawal (the budget's, or the limit's) turns the plan into
            // `OnReject`: the primary's answer, which wakes this task, launches the
            // fallback if it is rejected.
            if let Some(cold) = this.cold.get() {
                if let Some(refused) = cold.withdraw() {
                    this.control.plan = Plan::OnReject(refused);
                    return Poll::Pending;
                }
            }
            this.control.launched = true;
            let why = this.control.plan.reason(true);
            if let Some(cold) = this.cold.get() {
                cold.tracker().launched(why);
            }
        }

        loop {
            match this.fallback.as_mut().project() {
                BranchProj::NotReady { svc, req } => match svc.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let req = req.take().expect("request is present until called");
                        // Counted as called before the call: a `call` that panics was
                        // made all the same, and may have done some of its work.
                        if let Some(cold) = this.cold.get() {
                            cold.tracker().called();
                        }
                        let fut = svc.call(req);
                        this.fallback.set(Branch::Called { fut });
                    }
                    // A readiness error is the fallback's answer, served only if it is
                    // needed, like any other fallback error.
                    Poll::Ready(Err(error)) => {
                        if let Some(cold) = this.cold.get() {
                            cold.fallback_unready();
                        }
                        if !primary_pending {
                            this.fallback.set(Branch::Done);
                            if let Some(cold) = this.cold.get() {
                                cold.tracker().finish(Served::Fallback);
                            }
                            return Poll::Ready(Err(error));
                        }
                        this.fallback.set(Branch::Answered {
                            result: Some(Err(error)),
                        });
                    }
                    Poll::Pending => return Poll::Pending,
                },
                BranchProj::Called { mut fut } => {
                    // A coalesced call refills once, for the first of its waiters that is
                    // a miss when it takes the answer: a coalesced fallback is told
                    // whether this request is (its primary rejected already).
                    let refills = this.refill.is_some();
                    if refills {
                        crate::coalesce::mark::expect_miss(!primary_pending);
                    }
                    let poll = fut.as_mut().poll(cx);
                    if refills {
                        crate::coalesce::mark::expect_miss(false);
                    }
                    let result = match poll {
                        Poll::Ready(result) => result,
                        Poll::Pending => return Poll::Pending,
                    };
                    // A coalesced fallback's answer whose refill another waiter claimed
                    // is not this request's to refill. Read before the fallback's future
                    // is dropped, which clears the mark.
                    if this.refill.is_some() && crate::coalesce::mark::shared(&*fut) {
                        *this.refill = None;
                    }
                    if !primary_pending {
                        this.fallback.set(Branch::Done);
                        if let Some(cold) = this.cold.get() {
                            cold.tracker().fallback_answered(false);
                        }
                        // The primary was rejected: a miss.
                        if this.refill.is_some() {
                            refill(this.refill, &result, this.cold);
                        }
                        if let Some(cold) = this.cold.get() {
                            cold.tracker().finish(Served::Fallback);
                        }
                        return Poll::Ready(result);
                    }
                    // The primary is preferred: hold the fallback's answer until the
                    // primary's verdict, or until the patience bound runs out. A request
                    // taking its cold part late takes it now, if an `Ok` answer arms the
                    // patience (a waiting plan took it when it launched).
                    #[cfg(feature = "time")]
                    if result.is_ok()
                        && !this.cold.is_some()
                        && this.control.deferred != crate::launch::Deferred::NONE
                    {
                        this.cold.take_late(None, this.control.deferred.get());
                    }
                    if let Some(cold) = this.cold.get() {
                        cold.fallback_answered_first(result.is_ok());
                    }
                    this.fallback.set(Branch::Answered {
                        result: Some(result),
                    });
                }
                BranchProj::Answered { result } => {
                    // Served because the primary was rejected, not because patience ran out.
                    let miss = !primary_pending;
                    if primary_pending {
                        let Some(mut cold) = this.cold.get() else {
                            return Poll::Pending;
                        };
                        if cold.as_mut().poll_patience(cx).is_pending() {
                            return Poll::Pending;
                        }
                        // Patience ran out: serve the fallback, drop the primary unanswered.
                        this.primary.set(None);
                        cold.primary_cut_short();
                    }
                    let result = result.take().expect("answer is held until handed out");
                    this.fallback.set(Branch::Done);
                    if miss && this.refill.is_some() {
                        refill(this.refill, &result, this.cold);
                    }
                    if let Some(cold) = this.cold.get() {
                        cold.tracker().finish(Served::Fallback);
                    }
                    return Poll::Ready(result);
                }
                BranchProj::Done => panic!("`ResponseFuture` polled after completion"),
            }
        }
    }
}

/// Hands a miss's `Ok` answer to the refill action, once, and records how it went.
/// Out of line: only a request with a refill key gets here.
#[inline(never)]
fn refill<R, Req, T, E>(slot: &mut Option<(R, R::Key)>, result: &Result<T, E>, cold: &mut ColdSlot)
where
    R: Refill<Req, T>,
{
    let Ok(res) = result else {
        return;
    };
    let Some((mut action, key)) = slot.take() else {
        return;
    };
    let refilled = match action.refill(key, res) {
        Ok(Write::Started) => Refilled::Started,
        Ok(Write::Skipped) => Refilled::Skipped,
        Err(_) => Refilled::Failed,
    };
    if let Some(cold) = cold.get() {
        cold.tracker().refilled(refilled);
    }
}

/// Poisons the response future it holds when dropped: it is dropped only while a panic
/// unwinds out of a poll.
struct PoisonOnUnwind<'a, PF, F, Req, A, R>(Pin<&'a mut ResponseFuture<PF, F, Req, A, R>>)
where
    F: Service<Req>,
    R: Refill<Req, F::Response>;

impl<PF, F, Req, A, R> Drop for PoisonOnUnwind<'_, PF, F, Req, A, R>
where
    F: Service<Req>,
    R: Refill<Req, F::Response>,
{
    #[cold]
    fn drop(&mut self) {
        self.0.as_mut().project().control.poisoned = true;
    }
}

/// Out of line: only a caller that caught a panic from `poll` gets here.
#[cold]
#[inline(never)]
fn poisoned() -> ! {
    panic!("`ResponseFuture` polled after it panicked")
}

impl<PF, F, Req, A, R> fmt::Debug for ResponseFuture<PF, F, Req, A, R>
where
    F: Service<Req>,
    R: Refill<Req, F::Response>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let primary = if self.primary.is_some() {
            "Pending"
        } else {
            "Done"
        };
        let fallback = match &self.fallback {
            Branch::NotReady { .. } if !self.control.launched => "Waiting",
            Branch::NotReady { .. } => "NotReady",
            Branch::Called { .. } => "Called",
            Branch::Answered { .. } => "Answered",
            Branch::Done => "Done",
        };
        f.debug_struct("ResponseFuture")
            .field("primary", &primary)
            .field("fallback", &fallback)
            .field("plan", &self.control.plan)
            .field("launched", &self.control.launched)
            .field("refill", &self.refill.is_some())
            .field("tracker", &self.cold)
            .field("poisoned", &self.control.poisoned)
            .finish_non_exhaustive()
    }
}
