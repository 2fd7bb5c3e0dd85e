//! The per-request record: what the observers will be told about one request.

use super::{
    stats::Class, Fate, LatencyClock, Launched, Outcome, Refilled, Served, Stats, Verdict,
};
use std::{fmt, sync::Arc, time::Duration};

#[cfg(not(feature = "time"))]
use std::time::Instant;
#[cfg(feature = "time")]
use tokio::time::Instant;

pub(crate) type Hook = Arc<dyn Fn(&Outcome) + Send + Sync>;

/// The observers a layer was given. A layer with none holds no `Observers` at all.
#[derive(Clone, Default)]
pub(crate) struct Observers {
    pub(crate) hook: Option<Hook>,
    pub(crate) stats: Option<Stats>,
    #[cfg(feature = "metrics")]
    pub(crate) metrics: Option<Arc<super::MetricsHandles>>,
}

impl Observers {
    /// Whether an observer wants latencies, which cost clock reads. `Stats` does not.
    fn want_latencies(&self) -> bool {
        #[cfg(feature = "metrics")]
        if self.metrics.is_some() {
            return true;
        }
        self.hook.is_some()
    }
}

impl fmt::Debug for Observers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Observers");
        s.field("hook", &self.hook.as_ref().map(|_| "Fn(&Outcome)"));
        s.field("stats", &self.stats);
        #[cfg(feature = "metrics")]
        s.field("metrics", &self.metrics.as_ref().map(|m| m.layer));
        s.finish()
    }
}

/// How far the fallback got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Waiting,
    Launched,
    Called,
    Answered,
    Unready,
}

/// One request's record, kept in the cold part of its response future.
///
/// What `Stats` needs — how far the fallback got, why it started, the budget's refusal —
/// is a few bytes, updated in place. The rest (observers, clock readings, latencies, the
/// span) is in `timed`, `Some` only for a hook, `metrics` or a listening `tracing`
/// subscriber: counting reads no clock.
pub(crate) struct Tracker {
    /// Observed and not reported yet: every update below is one branch on it.
    active: bool,
    stage: Stage,
    verdict: Verdict,
    launched: Option<Launched>,
    budget_refused: bool,
    speculation_limited: bool,
    fallback_first: bool,
    refill: Option<Refilled>,
    /// Whether the response future has been polled: one that is dropped before its
    /// first poll never ran, and is reported as such.
    polled: bool,
    /// The layer's `Stats`, if it counts. Kept when the cold part is pooled, and reused
    /// by the next request of a layer with the same `Stats`: counting then costs no
    /// reference-count traffic. (It holds counters only: keeping it runs no user code
    /// and keeps nothing else of the layer alive.)
    stats: Option<Stats>,
    timed: Option<Timed>,
    /// The one clock reading of the current poll, as the time since the request was
    /// called: every time taken during one poll is this one, and costs one subtraction
    /// of instants at most. Cleared by [`new_poll`](Tracker::new_poll).
    reading: Option<Duration>,
}

/// What only the observers that want an `Outcome` need.
struct Timed {
    /// A hook or `metrics`, if any (`Stats` is kept apart).
    observers: Option<Arc<Observers>>,
    /// When the request was called, on the layer's clock.
    start: Start,
    /// When the fallback was launched, after `start`.
    launched_after: Option<Duration>,
    primary_latency: Option<Duration>,
    fallback_latency: Option<Duration>,
    /// The request's span, if a subscriber listens.
    #[cfg(feature = "tracing")]
    span: Option<tracing::Span>,
}

/// When a timed request was called, on the clock its layer reads.
#[derive(Clone, Copy)]
enum Start {
    Monotonic(Instant),
    #[cfg(feature = "quanta")]
    Tsc(quanta::Instant),
}

impl Start {
    #[inline]
    fn now(clock: LatencyClock) -> Start {
        match clock {
            LatencyClock::Monotonic => Start::Monotonic(Instant::now()),
            #[cfg(feature = "quanta")]
            LatencyClock::Tsc => Start::Tsc(quanta::Instant::now()),
        }
    }

    /// The time since, on the same clock: one reading. Out of line, so that the
    /// tracker's updates stay small enough to inline where nothing is timed.
    #[inline(never)]
    fn elapsed(self) -> Duration {
        match self {
            Start::Monotonic(start) => Instant::now().saturating_duration_since(start),
            #[cfg(feature = "quanta")]
            Start::Tsc(start) => quanta::Instant::now().saturating_duration_since(start),
        }
    }
}

impl Timed {
    /// The record of a request called now.
    #[inline]
    fn new(
        observers: Option<&Arc<Observers>>,
        clock: LatencyClock,
        #[cfg(feature = "tracing")] span: Option<tracing::Span>,
    ) -> Timed {
        Timed {
            observers: observers.cloned(),
            start: Start::now(clock),
            launched_after: None,
            primary_latency: None,
            fallback_latency: None,
            #[cfg(feature = "tracing")]
            span,
        }
    }
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            active: false,
            stage: Stage::Waiting,
            verdict: Verdict::Pending,
            launched: None,
            budget_refused: false,
            speculation_limited: false,
            fallback_first: false,
            refill: None,
            polled: false,
            stats: None,
            timed: None,
            reading: None,
        }
    }
}

impl Tracker {
    /// Starts the record of a request `observers` (or a `tracing` subscriber) observe;
    /// returns whether anything does.
    #[inline]
    fn start(&mut self, observers: Option<&Arc<Observers>>, clock: LatencyClock) -> bool {
        match observers.and_then(|o| o.stats.as_ref()) {
            Some(stats) if self.stats.as_ref().is_some_and(|kept| kept.same(stats)) => {}
            Some(stats) => self.stats = Some(stats.clone()),
            None => self.stats = None,
        }
        self.reading = None;
        self.stage = Stage::Waiting;
        self.verdict = Verdict::Pending;
        self.launched = None;
        self.budget_refused = false;
        self.speculation_limited = false;
        self.fallback_first = false;
        self.refill = None;
        self.polled = false;

        let timed = observers.filter(|o| o.want_latencies());
        // No span at all unless a subscriber may want it: making one costs even when
        // nobody listens.
        #[cfg(feature = "tracing")]
        if tracing_may_listen() {
            if let Some(span) = listening_span() {
                self.active = true;
                self.timed = Some(Timed::new(timed, clock, Some(span)));
                return true;
            }
        }
        self.active = observers.is_some();
        // `timed` is `None` here: `report` takes it, and only `start` sets it.
        if timed.is_some() {
            self.timed = Some(Timed::new(
                timed,
                clock,
                #[cfg(feature = "tracing")]
                None,
            ));
        }
        self.active
    }

    /// Starts the record of a request nobody observes (unless a `tracing` subscriber
    /// listens): the common case, kept short.
    #[inline]
    pub(crate) fn start_unless_observed(
        &mut self,
        observers: Option<&Arc<Observers>>,
        clock: LatencyClock,
    ) -> bool {
        if observers.is_none() && !tracing_may_listen() {
            self.active = false;
            self.stats = None;
            return false;
        }
        self.start(observers, clock)
    }

    /// Makes a pooled record that of a request nobody observes, whatever listens now: for
    /// a cold part taken after `call`, which observers would have had to time from it.
    #[cfg(feature = "time")]
    #[inline]
    pub(crate) fn unobserved(&mut self) {
        self.active = false;
        self.stats = None;
    }

    /// A poll begins: times taken from now on read the clock again (once).
    #[inline]
    pub(crate) fn new_poll(&mut self) {
        self.reading = None;
        self.polled = true;
    }

    /// The time since `start`, for a timed request: one clock reading per poll.
    #[inline]
    fn elapsed(reading: &mut Option<Duration>, start: Start) -> Duration {
        *reading.get_or_insert_with(|| start.elapsed())
    }

    /// The request's span, to enter for one poll (a clone: the poll goes on to update
    /// the tracker while the span is entered). `None` if there is no span to enter.
    #[cfg(feature = "tracing")]
    #[inline]
    pub(crate) fn span(&self) -> Option<tracing::Span> {
        if !self.active {
            return None;
        }
        self.timed.as_ref()?.span.clone()
    }

    #[inline]
    pub(crate) fn launched(&mut self, why: Launched) {
        if self.active {
            self.stage = Stage::Launched;
            self.launched = Some(why);
            if let Some(t) = &mut self.timed {
                t.launched_after = Some(Tracker::elapsed(&mut self.reading, t.start));
            }
        }
    }

    #[cfg(feature = "budget")]
    #[inline]
    pub(crate) fn budget_refused(&mut self) {
        self.budget_refused = true;
    }

    #[inline]
    pub(crate) fn speculation_limited(&mut self) {
        self.speculation_limited = true;
    }

    #[inline]
    pub(crate) fn called(&mut self) {
        self.stage = Stage::Called;
    }

    /// The fallback's `poll_ready` failed: its error is its answer, but it did no work.
    #[inline]
    pub(crate) fn fallback_unready(&mut self) {
        self.stage = Stage::Unready;
        self.fallback_latency();
    }

    #[inline]
    pub(crate) fn fallback_answered(&mut self, primary_pending: bool) {
        self.stage = Stage::Answered;
        self.fallback_first = primary_pending;
        self.fallback_latency();
    }

    #[inline]
    fn fallback_latency(&mut self) {
        if let (true, Some(t)) = (self.active, &mut self.timed) {
            let now = Tracker::elapsed(&mut self.reading, t.start);
            t.fallback_latency = t.launched_after.map(|at| now.saturating_sub(at));
        }
    }

    /// The primary answered; its answer is not judged yet. Until [`judged`] says
    /// otherwise, a panic is what became of it.
    ///
    /// [`judged`]: Tracker::judged
    #[inline]
    pub(crate) fn primary_answered(&mut self) {
        self.verdict = Verdict::Panicked;
        if let (true, Some(t)) = (self.active, &mut self.timed) {
            t.primary_latency = Some(Tracker::elapsed(&mut self.reading, t.start));
        }
    }

    /// The predicate returned its verdict on the primary's answer.
    #[inline]
    pub(crate) fn judged(&mut self, accepted: bool) {
        self.verdict = if accepted {
            Verdict::Accepted
        } else {
            Verdict::Rejected
        };
    }

    /// The refill action ran on the served answer, and this became of it. Counted at
    /// once: only a request that is about to be served gets here.
    #[inline]
    pub(crate) fn refilled(&mut self, refilled: Refilled) {
        if self.active {
            self.refill = Some(refilled);
            if let Some(stats) = &self.stats {
                stats.count_refill(refilled);
            }
        }
    }

    /// Reports the request as finished. Later calls, and the drop, report nothing.
    #[inline]
    pub(crate) fn finish(&mut self, served: Served) {
        if self.active {
            self.active = false;
            self.report(served);
        }
    }

    /// Reports the request as abandoned: its response future is being dropped, now.
    ///
    /// CORRECTNESS: a drop is not a poll. The clock reading kept from the last poll is
    /// stale by however long the future then sat unpolled (a caller gone, a `select!`
    /// whose other branch won), so the elapsed time is read afresh.
    #[inline]
    pub(crate) fn abandon(&mut self) {
        self.reading = None;
        self.finish(Served::Abandoned);
    }

    /// Counts the request into `Stats`, inline, and hands an `Outcome` to the observers
    /// that want one, out of line.
    #[inline]
    fn report(&mut self, served: Served) {
        let fallback = match (served, self.stage) {
            (Served::Fallback, _) => Fate::Served,
            (_, Stage::Waiting) => Fate::NotLaunched,
            (_, Stage::Launched) => Fate::DroppedBeforeReady,
            (_, Stage::Called) => Fate::DroppedInFlight,
            (_, Stage::Answered) => Fate::Discarded,
            (_, Stage::Unready) => Fate::ReadinessFailed,
        };
        if let Some(stats) = &self.stats {
            stats.count(Class {
                served,
                fallback,
                launched: self.launched,
                budget_refused: self.budget_refused,
                fallback_first: self.fallback_first,
            });
            if !self.polled {
                stats.count_unpolled();
            }
            if self.speculation_limited {
                stats.count_limited();
            }
        }
        // Only the observers that want latencies get an `Outcome`; counting needs none.
        if self.timed.is_some() {
            self.report_timed(served, fallback);
        }
    }

    #[inline(never)]
    fn report_timed(&mut self, served: Served, fallback: Fate) {
        // Read in place: moving the record out first copied it whole, on every request.
        let Some(t) = &mut self.timed else {
            return;
        };
        let elapsed = Tracker::elapsed(&mut self.reading, t.start);
        let outcome = Outcome {
            served,
            primary: self.verdict,
            fallback,
            launched: self.launched,
            launched_after: t.launched_after,
            budget_refused: self.budget_refused,
            speculation_limited: self.speculation_limited,
            fallback_first: self.fallback_first,
            primary_latency: t.primary_latency,
            fallback_latency: t.fallback_latency,
            elapsed,
            refill: self.refill,
            polled: self.polled,
        };
        // The record is emptied before any user code runs — a subscriber's, a hook's —
        // so that a part pooled after a panic in it holds no handle on the layer and no
        // span. (`finish` reports only once.)
        let observers = t.observers.take();
        #[cfg(feature = "tracing")]
        let span = t.span.take();
        self.timed = None;
        #[cfg(feature = "tracing")]
        if let Some(span) = &span {
            super::export::trace(span, &outcome);
        }
        let Some(observers) = observers else {
            return;
        };
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &observers.metrics {
            metrics.record(&outcome);
        }
        if let Some(hook) = &observers.hook {
            hook(&outcome);
        }
    }
}

/// The request's span, if a subscriber listens for it.
#[cfg(feature = "tracing")]
#[inline(never)]
fn listening_span() -> Option<tracing::Span> {
    let span = tracing::debug_span!(
        "backstop",
        served = tracing::field::Empty,
        primary = tracing::field::Empty,
        fallback = tracing::field::Empty,
        launched = tracing::field::Empty,
        budget_refused = tracing::field::Empty,
        speculation_limited = tracing::field::Empty,
        fallback_first = tracing::field::Empty,
        primary_latency_us = tracing::field::Empty,
        fallback_latency_us = tracing::field::Empty,
        refill = tracing::field::Empty,
        polled = tracing::field::Empty,
    );
    // A callsite once enabled by any subscriber makes spans even where none listens;
    // those go to the no-op subscriber and are not worth tracking for.
    let listening = !span.is_disabled()
        && !tracing::dispatcher::get_default(|d| d.is::<tracing::subscriber::NoSubscriber>());
    listening.then_some(span)
}

/// Whether a `tracing` subscriber may want the request's span: a cheap check of the
/// static and global level filters before any span is made.
#[inline]
pub(crate) fn tracing_may_listen() -> bool {
    #[cfg(feature = "tracing")]
    {
        use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
        STATIC_MAX_LEVEL >= LevelFilter::DEBUG && LevelFilter::current() >= LevelFilter::DEBUG
    }
    #[cfg(not(feature = "tracing"))]
    false
}

impl Drop for Tracker {
    #[inline]
    fn drop(&mut self) {
        // Still unreported when dropped: the response future was abandoned.
        self.abandon();
    }
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("observed", &self.active)
            .finish()
    }
}
