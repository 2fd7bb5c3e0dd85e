//! The cold part of a response future: everything only some layers use, behind one
//! pointer, recycled through a small per-thread free list.
//!
//! See the top of `future.rs` for why it is a recycled box rather than a type chosen by
//! the builder.

use crate::{
    launch::{Launched, Plan, Settings, Timer},
    outcome::{tracing_may_listen, Tracker},
};
use pin_project_lite::pin_project;
use std::{
    cell::{Cell, RefCell},
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

#[cfg(feature = "time")]
use std::time::Duration;

/// Cold parts kept per thread for reuse, at most, besides the spare: beyond that many
/// response futures with a cold part alive at once on one thread, the extra ones are
/// freed.
const POOL_CAP: usize = 256;

thread_local! {
    /// The part put back last, taken first: a thread serving one observed request at a
    /// time never goes further. Two dependent loads to reach it, where the free list
    /// behind it takes four (its borrow flag, its length, its buffer, the element).
    static SPARE: Cell<Option<Pin<Box<Cold>>>> = const { Cell::new(None) };
    static POOL: RefCell<Vec<Pin<Box<Cold>>>> = const { RefCell::new(Vec::new()) };
}

pin_project! {
    /// Everything optional about one request. Every field is empty in a pooled `Cold`.
    pub(crate) struct Cold {
        // The launch delay while the fallback waits to start speculatively; later, the
        // patience bound while a fallback answer waits for the primary. Never both.
        #[pin]
        timer: Option<Timer>,
        parts: Parts,
    }
}

#[derive(Default)]
struct Parts {
    /// Whether anything of the launch below (or the timer) was filled in: only then does
    /// `recycle` have any of it to empty.
    filled: bool,
    /// The launch delay of a `Plan::Wait`, until it is armed.
    #[cfg(feature = "time")]
    delay: Option<Duration>,
    #[cfg(feature = "time")]
    patience: Option<Duration>,
    /// Every request of a layer with a budget holds it: to deposit into at its first
    /// poll, and, if it may speculate, to withdraw from once.
    #[cfg(feature = "budget")]
    budget: Option<crate::launch::SharedBudget>,
    /// The deposit is still to be made: at the first poll, so that a response future
    /// dropped unpolled — a request that never ran — deposits nothing.
    #[cfg(feature = "budget")]
    deposit_due: bool,
    /// The request may still withdraw, once.
    #[cfg(feature = "budget")]
    may_withdraw: bool,
    /// The layer's cap on speculative calls in flight, for a request that may
    /// speculate under one, and its slot while it holds one.
    limit: crate::launch::LimitHold,
    /// Times the primary for an adaptive launch, if this request is sampled.
    #[cfg(feature = "adaptive")]
    sampler: crate::launch::adaptive::Sampler,
    /// What the outcome observers will be told.
    tracker: Tracker,
}

/// The response future's handle on its cold part: `None` for a request whose layer uses
/// nothing optional. Dropping it reports an unfinished request as abandoned and puts
/// the cold part back on this thread's free list.
#[derive(Default)]
pub(crate) struct ColdSlot(Option<Pin<Box<Cold>>>);

impl ColdSlot {
    /// The cold part a request planned as `plan` needs under `settings`, if any.
    #[inline]
    pub(crate) fn new(settings: &Settings, plan: Plan) -> Self {
        let needed = settings.needs_cold(plan);
        if !needed && !tracing_may_listen() {
            return ColdSlot(None);
        }
        ColdSlot(Cold::take(settings, plan, needed))
    }

    /// Takes the cold part of a request whose layer takes it late (its `Deferred` is set), at
    /// the first poll that needs it: holding `delay` to arm, or `patience`.
    #[cfg(feature = "time")]
    #[cold]
    #[inline(never)]
    pub(crate) fn take_late(&mut self, delay: Option<Duration>, patience: Option<Duration>) {
        let mut cold = Cold::pop();
        let parts = cold.as_mut().project().parts;
        // Nobody observes the request: a `tracing` subscriber that listened at `call`
        // would have had its cold part taken then.
        parts.tracker.unobserved();
        parts.filled = true;
        parts.delay = delay;
        parts.patience = patience;
        self.0 = Some(cold);
    }

    #[inline(always)]
    pub(crate) fn is_some(&self) -> bool {
        self.0.is_some()
    }

    #[inline(always)]
    pub(crate) fn get(&mut self) -> Option<Pin<&mut Cold>> {
        self.0.as_mut().map(Pin::as_mut)
    }

    #[cfg(feature = "tracing")]
    #[inline]
    pub(crate) fn span(&self) -> Option<tracing::Span> {
        self.0.as_ref().and_then(|cold| cold.parts.tracker.span())
    }
}

impl Drop for ColdSlot {
    #[inline]
    fn drop(&mut self) {
        if let Some(cold) = self.0.take() {
            Cold::recycle(cold);
        }
    }
}

impl fmt::Debug for ColdSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            // What the tracker of a request nobody observes would print.
            None => f.debug_struct("Tracker").field("observed", &false).finish(),
            Some(cold) => fmt::Debug::fmt(&cold.parts.tracker, f),
        }
    }
}

impl Parts {
    /// The request's one deposit. Out of line: only a layer with a budget gets here.
    #[cfg(feature = "budget")]
    #[inline(never)]
    fn deposit(&mut self) {
        self.deposit_due = false;
        if let Some(budget) = &self.budget {
            budget.deposit();
        }
    }
}

impl Cold {
    /// A cold part from this thread's free list (or a new one), filled for one request.
    /// Out of line but not `#[cold]`: it is the common path of every observed request.
    #[inline(never)]
    fn take(settings: &Settings, plan: Plan, needed: bool) -> Option<Pin<Box<Cold>>> {
        let mut cold = Cold::pop();
        // A pooled part holds stale tracker data, which `start` resets, and no handle but
        // a `Stats` and an `Adaptive` (see `Tracker::stats`, `Sampler`).
        let parts = cold.as_mut().project().parts;
        let observed = parts
            .tracker
            .start_unless_observed(settings.observers.as_ref(), settings.clock);
        // Only a `tracing` subscriber that may listen asked for this part, and none does
        // on this thread.
        if !needed && !observed {
            Cold::recycle(cold);
            return None;
        }
        // A pooled part holds no delay, patience or budget, and its sampler is idle (see
        // `recycle`).
        if !settings.launch_state {
            return Some(cold);
        }
        // Only what the layer has is written, and marks the part `filled` for `recycle`
        // to empty: a pooled part holds none of it already.
        #[cfg(feature = "time")]
        {
            if let Some(patience) = settings.patience {
                parts.patience = Some(patience);
                parts.filled = true;
            }
            // An adaptive launch's delay is read from its sampler when it is armed.
            if let (crate::launch::Launch::Delayed(delay), Plan::Wait(_)) = (&settings.launch, plan)
            {
                parts.delay = Some(*delay);
                parts.filled = true;
            }
        }
        if let (Some(limit), true) = (&settings.limit, plan.may_speculate()) {
            parts.limit.set(limit);
            parts.filled = true;
        }
        #[cfg(feature = "budget")]
        {
            if let Some(budget) = &settings.budget {
                parts.budget = Some(budget.clone());
                parts.deposit_due = true;
                parts.may_withdraw = plan.may_speculate();
                parts.filled = true;
            }
        }
        // Every primary call under an adaptive launch is timed or sampled, eligible or
        // not: the estimate is of the primary's latency, whatever happens to the fallback.
        #[cfg(feature = "adaptive")]
        {
            if let crate::launch::Launch::Adaptive(adaptive) = &settings.launch {
                parts.sampler.begin(adaptive, matches!(plan, Plan::Wait(_)));
            }
        }
        Some(cold)
    }

    /// A cold part from this thread's spare or free list, or a new one: holding stale
    /// tracker data and no handle but a `Stats` and an `Adaptive`.
    #[inline(always)]
    fn pop() -> Pin<Box<Cold>> {
        if let Ok(Some(cold)) = SPARE.try_with(Cell::take) {
            return cold;
        }
        POOL.try_with(|pool| pool.try_borrow_mut().ok()?.pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                Box::pin(Cold {
                    timer: None,
                    parts: Parts::default(),
                })
            })
    }

    /// Reports an unfinished request as abandoned, drops every handle the part holds
    /// (but a `Stats` and an `Adaptive` estimate, which are only data) and puts it back
    /// on the free list.
    #[inline(never)]
    fn recycle(mut cold: Pin<Box<Cold>>) {
        let mut this = cold.as_mut().project();
        // A response future dropped while its primary was pending (the caller gave up,
        // or a timeout fired) cut the primary short.
        #[cfg(feature = "adaptive")]
        this.parts.sampler.record_at_least();
        // The slot goes back before any user code runs.
        this.parts.limit.release();
        // Runs the outcome hook, which may panic: then the cold part is simply freed.
        this.parts.tracker.abandon();
        // Only a part filled with something of the launch holds anything more to empty.
        if std::mem::take(&mut this.parts.filled) {
            this.timer.set(None);
            this.parts.limit.clear();
            // The budget goes before the part is pooled: a pooled part keeps no handle
            // that may run user code when dropped (a `Stats` or an `Adaptive` is only
            // data).
            #[cfg(feature = "budget")]
            {
                this.parts.budget = None;
                this.parts.deposit_due = false;
                this.parts.may_withdraw = false;
            }
            #[cfg(feature = "time")]
            {
                this.parts.delay = None;
                this.parts.patience = None;
            }
        }
        // The spare is usually empty: this request took it.
        let Ok(Some(cold)) = SPARE.try_with(|spare| spare.replace(Some(cold))) else {
            return;
        };
        let _ = POOL.try_with(|pool| {
            if let Ok(mut pool) = pool.try_borrow_mut() {
                if pool.len() < POOL_CAP {
                    pool.push(cold);
                }
            }
        });
    }

    /// The primary answered. Its answer is not judged yet. Inlined into the cold poll:
    /// counting alone needs nothing more of it than the tracker's update.
    #[inline(always)]
    pub(crate) fn primary_answered(self: Pin<&mut Self>) {
        let mut this = self.project();
        #[cfg(feature = "adaptive")]
        this.parts.sampler.record();
        this.parts.tracker.primary_answered();
        // Accepted, the fallback is dropped; rejected, its call is a miss's: speculative
        // no more.
        this.parts.limit.release();
        // Neither a launch delay nor the patience bound applies any more.
        if this.timer.is_some() {
            this.timer.set(None);
        }
    }

    /// The primary was dropped unanswered by the patience bound.
    #[inline(never)]
    pub(crate) fn primary_cut_short(self: Pin<&mut Self>) {
        #[cfg(feature = "adaptive")]
        self.project().parts.sampler.record_at_least();
        #[cfg(not(feature = "adaptive"))]
        let _ = self;
    }

    /// A poll begins: the tracker reads the clock afresh, and the first poll makes the
    /// budget deposit. Inlined into the cold poll.
    #[inline(always)]
    pub(crate) fn new_poll(self: Pin<&mut Self>) {
        let parts = self.project().parts;
        parts.tracker.new_poll();
        #[cfg(feature = "budget")]
        if parts.deposit_due {
            parts.deposit();
        }
    }

    /// The fallback's `poll_ready` failed: it never ran, and needs no slot.
    #[inline(never)]
    pub(crate) fn fallback_unready(self: Pin<&mut Self>) {
        let parts = self.project().parts;
        parts.tracker.fallback_unready();
        parts.limit.release();
    }

    /// The request's record, to update.
    #[inline(always)]
    pub(crate) fn tracker(self: Pin<&mut Self>) -> &mut Tracker {
        &mut self.project().parts.tracker
    }

    /// The primary was found pending, and the fallback is not launched: starts what
    /// counts from the first such poll — the launch delay, the adaptive sample — on one
    /// clock read. `false` if the launch delay is too long to ever run out.
    #[inline(never)]
    pub(crate) fn primary_pending(self: Pin<&mut Self>) -> bool {
        #[cfg(feature = "time")]
        {
            let mut this = self.project();
            #[cfg(feature = "adaptive")]
            let sampler_waits = this.parts.sampler.needs_start();
            #[cfg(not(feature = "adaptive"))]
            let sampler_waits = false;
            if this.parts.delay.is_none() && !sampler_waits {
                return true;
            }
            let now = tokio::time::Instant::now();
            #[cfg(feature = "adaptive")]
            if this.parts.sampler.needs_start() {
                this.parts.sampler.pending_at(now);
            }
            let delay = this.parts.delay.take();
            #[cfg(feature = "adaptive")]
            let delay = delay.or_else(|| this.parts.sampler.take_delay());
            if let Some(delay) = delay {
                match Plan::deadline(now, delay) {
                    Some(deadline) => {
                        // An adaptive launch's timer is the first thing its part holds
                        // for `recycle` to empty.
                        this.parts.filled = true;
                        this.timer.set(Some(tokio::time::sleep_until(deadline)));
                    }
                    None => return false,
                }
            }
        }
        #[cfg(not(feature = "time"))]
        let _ = self;
        true
    }

    /// Waits out the launch delay armed by [`primary_pending`](Cold::primary_pending):
    /// `Ready` once it has run out (or if there is none).
    #[inline(never)]
    pub(crate) fn poll_launch_delay(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let Some(timer) = this.timer.as_mut().as_pin_mut() else {
            return Poll::Ready(());
        };
        if timer.poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.timer.set(None);
        Poll::Ready(())
    }

    /// Asks the layer's limit for a slot and the budget for one speculative launch,
    /// once: why the launch was refused, if it was.
    ///
    /// The limit is asked first: a slot can be given back if the budget then refuses,
    /// a budget's withdrawal cannot.
    #[inline(never)]
    pub(crate) fn withdraw(self: Pin<&mut Self>) -> Option<Launched> {
        let parts = self.project().parts;
        if !parts.limit.try_acquire() {
            parts.tracker.speculation_limited();
            return Some(Launched::LimitReached);
        }
        #[cfg(feature = "budget")]
        {
            if let (true, Some(budget)) = (std::mem::take(&mut parts.may_withdraw), &parts.budget) {
                if !budget.withdraw() {
                    parts.tracker.budget_refused();
                    parts.limit.release();
                    return Some(Launched::BudgetRefused);
                }
            }
        }
        None
    }

    /// The fallback answered while the primary is pending: with patience set and an
    /// `Ok` answer, the primary gets that much longer.
    #[inline(never)]
    pub(crate) fn fallback_answered_first(self: Pin<&mut Self>, ok: bool) {
        let this = self.project();
        this.parts.tracker.fallback_answered(true);
        // Its work is done: a call no longer running needs no slot.
        this.parts.limit.release();
        #[cfg(feature = "time")]
        if let (Some(patience), true) = (this.parts.patience, ok) {
            let mut timer = this.timer;
            timer.set(Some(tokio::time::sleep(patience)));
        }
        #[cfg(not(feature = "time"))]
        let _ = ok;
    }

    /// Waits out the patience bound: `Ready` once it has run out. Pending forever if
    /// none was set (the primary's answer then wakes the task).
    #[inline(never)]
    pub(crate) fn poll_patience(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        // Only a successful fallback answer ever sets the patience timer.
        let Some(timer) = this.timer.as_mut().as_pin_mut() else {
            return Poll::Pending;
        };
        if timer.poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.timer.set(None);
        Poll::Ready(())
    }
}
