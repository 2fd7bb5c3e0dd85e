//! The per-request record: what the observers will be told about one request.

use super::{stats::Class, Fate, Launched, Outcome, Served, Stats, Verdict};
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

/// One request's record, kept in the cold part of its response future. `None` when
/// nobody observes, so that every method is a single branch.
#[derive(Default)]
pub(crate) struct Tracker {
    track: Option<Track>,
}

struct Track {
    observers: Option<Arc<Observers>>,
    /// When the request was called: `Some` only if an observer wants latencies.
    start: Option<Instant>,
    stage: Stage,
    verdict: Verdict,
    launched: Option<Launched>,
    launched_at: Option<Instant>,
    budget_refused: bool,
    fallback_first: bool,
    primary_latency: Option<Duration>,
    fallback_latency: Option<Duration>,
    #[cfg(feature = "tracing")]
    span: tracing::Span,
}

impl Tracker {
    /// Starts the record of a request `observers` (or a `tracing` subscriber) observe.
    #[inline(never)]
    pub(crate) fn start(observers: Option<&Arc<Observers>>) -> Self {
        // No span at all unless a subscriber may want it: making one costs even when
        // nobody listens.
        #[cfg(feature = "tracing")]
        let span = if !tracing_may_listen() {
            tracing::Span::none()
        } else {
            tracing::debug_span!(
                "backstop",
                served = tracing::field::Empty,
                primary = tracing::field::Empty,
                fallback = tracing::field::Empty,
                launched = tracing::field::Empty,
                budget_refused = tracing::field::Empty,
                fallback_first = tracing::field::Empty,
                primary_latency_us = tracing::field::Empty,
                fallback_latency_us = tracing::field::Empty,
            )
        };
        // A callsite once enabled by any subscriber makes spans even where none listens;
        // those go to the no-op subscriber and are not worth tracking for.
        #[cfg(feature = "tracing")]
        let listening = !span.is_disabled()
            && !tracing::dispatcher::get_default(|d| d.is::<tracing::subscriber::NoSubscriber>());
        #[cfg(not(feature = "tracing"))]
        let listening = false;

        if observers.is_none() && !listening {
            return Tracker { track: None };
        }
        let timed = listening || observers.is_some_and(|o| o.want_latencies());
        Tracker {
            track: Some(Track {
                observers: observers.cloned(),
                start: timed.then(Instant::now),
                stage: Stage::Waiting,
                verdict: Verdict::Pending,
                launched: None,
                launched_at: None,
                budget_refused: false,
                fallback_first: false,
                primary_latency: None,
                fallback_latency: None,
                #[cfg(feature = "tracing")]
                span,
            }),
        }
    }

    /// Whether anything observes this request.
    #[inline]
    pub(crate) fn is_observed(&self) -> bool {
        self.track.is_some()
    }

    /// The request's span, to enter for one poll (a clone: the poll goes on to update
    /// the tracker while the span is entered). `None` if there is no span to enter.
    #[cfg(feature = "tracing")]
    pub(crate) fn span(&self) -> Option<tracing::Span> {
        self.track
            .as_ref()
            .filter(|t| !t.span.is_none())
            .map(|t| t.span.clone())
    }

    #[inline]
    pub(crate) fn launched(&mut self, why: Launched) {
        if let Some(t) = &mut self.track {
            t.stage = Stage::Launched;
            t.launched = Some(why);
            if t.start.is_some() {
                t.launched_at = Some(Instant::now());
            }
        }
    }

    #[cfg(feature = "budget")]
    #[inline]
    pub(crate) fn budget_refused(&mut self) {
        if let Some(t) = &mut self.track {
            t.budget_refused = true;
        }
    }

    #[inline]
    pub(crate) fn called(&mut self) {
        if let Some(t) = &mut self.track {
            t.stage = Stage::Called;
        }
    }

    /// The fallback's `poll_ready` failed: its error is its answer, but it did no work.
    #[inline]
    pub(crate) fn fallback_unready(&mut self) {
        if let Some(t) = &mut self.track {
            t.stage = Stage::Unready;
            t.fallback_latency = t.launched_at.map(|at| at.elapsed());
        }
    }

    #[inline]
    pub(crate) fn fallback_answered(&mut self, primary_pending: bool) {
        if let Some(t) = &mut self.track {
            t.stage = Stage::Answered;
            t.fallback_first = primary_pending;
            t.fallback_latency = t.launched_at.map(|at| at.elapsed());
        }
    }

    /// The primary answered; its answer is not judged yet. Until [`judged`] says
    /// otherwise, a panic is what became of it.
    ///
    /// [`judged`]: Tracker::judged
    #[inline]
    pub(crate) fn primary_answered(&mut self) {
        if let Some(t) = &mut self.track {
            t.primary_latency = t.start.map(|start| start.elapsed());
            t.verdict = Verdict::Panicked;
        }
    }

    /// The predicate returned its verdict on the primary's answer.
    #[inline]
    pub(crate) fn judged(&mut self, accepted: bool) {
        if let Some(t) = &mut self.track {
            t.verdict = if accepted {
                Verdict::Accepted
            } else {
                Verdict::Rejected
            };
        }
    }

    /// Reports the request as finished. Later calls, and the drop, report nothing.
    #[inline]
    pub(crate) fn finish(&mut self, served: Served) {
        if let Some(t) = self.track.take() {
            t.report(served);
        }
    }
}

impl Track {
    #[inline(never)]
    fn report(self, served: Served) {
        let fallback = match (served, self.stage) {
            (Served::Fallback, _) => Fate::Served,
            (_, Stage::Waiting) => Fate::NotLaunched,
            (_, Stage::Launched) => Fate::DroppedBeforeReady,
            (_, Stage::Called) => Fate::DroppedInFlight,
            (_, Stage::Answered) => Fate::Discarded,
            (_, Stage::Unready) => Fate::ReadinessFailed,
        };
        let class = Class {
            served,
            fallback,
            launched: self.launched,
            budget_refused: self.budget_refused,
            fallback_first: self.fallback_first,
        };
        let observers = self.observers.as_deref();
        if let Some(stats) = observers.and_then(|o| o.stats.as_ref()) {
            stats.count(class);
        }
        // Only the observers that want latencies get an `Outcome`; counting needs none.
        let Some(start) = self.start else {
            return;
        };
        let outcome = Outcome {
            served,
            primary: self.verdict,
            fallback,
            launched: self.launched,
            launched_after: self.launched_at.map(|at| at.duration_since(start)),
            budget_refused: self.budget_refused,
            fallback_first: self.fallback_first,
            primary_latency: self.primary_latency,
            fallback_latency: self.fallback_latency,
            elapsed: start.elapsed(),
        };
        #[cfg(feature = "tracing")]
        if !self.span.is_none() {
            super::export::trace(&self.span, &outcome);
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
        self.finish(Served::Abandoned);
    }
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("observed", &self.track.is_some())
            .finish()
    }
}
