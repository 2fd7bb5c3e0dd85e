//! What happened to a request: which branch served it, and what the fallback cost.
//!
//! A layer that silently doubles traffic to a database, or silently serves most answers
//! from the fallback, is one nobody dares to deploy. Two opt-in observers report what
//! the layer did; with neither set (and no `tracing` subscriber listening) nothing is
//! timed or counted and a request costs exactly what it did before.
//!
//! - [`Fallback::on_outcome`](crate::Fallback::on_outcome) calls a hook with an
//!   [`Outcome`] for every finished request — including one whose response future the
//!   caller dropped.
//! - [`Fallback::stats`](crate::Fallback::stats) counts outcomes into a shared
//!   [`Stats`] handle: a few atomic counters, readable from anywhere.
//!
//! With the `tracing` feature, each request also gets a `backstop` span at debug level,
//! entered while its future is polled, carrying the outcome's fields, and a debug
//! event when it finishes.
//!
//! ```
//! use std::convert::Infallible;
//! use tower::{service_fn, ServiceExt};
//! use tower_backstop::{outcome::{Served, Stats}, Fallback};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let cache = service_fn(|id: u32| async move {
//!     Ok::<_, Infallible>(if id % 2 == 0 { Some(id) } else { None })
//! });
//! let db = service_fn(|id: u32| async move { Ok::<_, Infallible>(Some(id)) });
//!
//! let stats = Stats::new();
//! let svc = Fallback::new(cache, db)
//!     .accept(|r: &Result<Option<u32>, Infallible>| matches!(r, Ok(Some(_))))
//!     .stats(stats.clone())
//!     .on_outcome(|o: &tower_backstop::outcome::Outcome| {
//!         if o.served == Served::Fallback {
//!             println!("miss: fallback answered in {:?}", o.fallback_latency);
//!         }
//!     });
//!
//! for id in 0..10 {
//!     svc.clone().oneshot(id).await.unwrap();
//! }
//! let counts = stats.snapshot();
//! assert_eq!(counts.requests, 10);
//! assert_eq!(counts.served_by_primary, 5);
//! assert_eq!(counts.served_by_fallback, 5);
//! println!("{counts}");
//! # }
//! ```

use crate::launch::Launched;
use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

#[cfg(not(feature = "time"))]
use std::time::Instant;
#[cfg(feature = "time")]
use tokio::time::Instant;

/// Who answered a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Served {
    /// The primary's answer was accepted and served.
    Primary,
    /// The fallback's answer was served.
    Fallback,
    /// Nobody: the response future was dropped before it finished (the caller gave up,
    /// or a timeout around the layer fired).
    Abandoned,
}

/// What became of the primary's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Verdict {
    /// It answered and the predicate accepted the answer.
    Accepted,
    /// It answered and the predicate rejected the answer.
    Rejected,
    /// It had not answered when the request finished: the fallback's answer was served
    /// after the patience bound ran out, or the request was abandoned.
    Pending,
    /// It answered, but a panic kept the answer from being judged: the
    /// [`Accept`](crate::accept::Accept) predicate panicked on it (or dropping the
    /// primary's spent future did). Nothing was served: the request is reported as
    /// [`Served::Abandoned`] once its poisoned response future is dropped. See
    /// [`Fallback`'s panics section](crate::Fallback#panics).
    Panicked,
}

/// What became of the fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fate {
    /// It was never started: the primary was accepted first.
    NotLaunched,
    /// It was started, but dropped while still waiting for readiness: never called.
    DroppedBeforeReady,
    /// It was called, and its future was dropped before it answered.
    DroppedInFlight,
    /// It answered, and its answer was thrown away: wasted work.
    Discarded,
    /// It failed to become ready (its `poll_ready` returned an error) and that error was
    /// not needed: it was never called.
    ReadinessFailed,
    /// Its answer was served.
    Served,
}

/// One finished request, as reported to [`Fallback::on_outcome`](crate::Fallback::on_outcome).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outcome {
    /// Who answered.
    pub served: Served,
    /// What became of the primary's answer.
    pub primary: Verdict,
    /// What became of the fallback.
    pub fallback: Fate,
    /// Why the fallback started when it did, if it started.
    pub launched: Option<Launched>,
    /// From the call to the fallback's launch, if it started. After a delayed or
    /// adaptive launch, this is the delay as applied: at least the delay rounded up to a
    /// whole millisecond, on a tick of tokio's timer.
    pub launched_after: Option<Duration>,
    /// Whether the budget refused this request a speculative launch.
    pub budget_refused: bool,
    /// Whether the fallback answered while the primary was still pending (a readiness
    /// error does not count: the fallback did no work).
    pub fallback_first: bool,
    /// From the call to the primary's answer, if it answered.
    pub primary_latency: Option<Duration>,
    /// From the fallback's launch to its answer, if it answered.
    pub fallback_latency: Option<Duration>,
    /// From the call to the end of the request.
    pub elapsed: Duration,
}

/// Shared outcome counters, set with [`Fallback::stats`](crate::Fallback::stats).
///
/// Cloning is cheap and every clone reads and writes the same counters, so one handle
/// can be given to a layer (and so to every service it builds) and read elsewhere.
/// Each finished request costs a handful of relaxed atomic increments.
#[derive(Clone, Default)]
pub struct Stats {
    inner: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    served_by_primary: AtomicU64,
    served_by_fallback: AtomicU64,
    abandoned: AtomicU64,
    fallback_launches: AtomicU64,
    speculative_launches: AtomicU64,
    fallbacks_cancelled: AtomicU64,
    fallbacks_wasted: AtomicU64,
    budget_refusals: AtomicU64,
    fallback_first: AtomicU64,
}

/// A reading of [`Stats`]. Each counter is read on its own, so a snapshot taken while
/// requests finish may be off by the requests finishing meanwhile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Requests finished, abandoned ones included.
    pub requests: u64,
    /// Requests served by the primary (its answer accepted).
    pub served_by_primary: u64,
    /// Requests served by the fallback.
    pub served_by_fallback: u64,
    /// Requests whose response future was dropped before it finished.
    pub abandoned: u64,
    /// Fallback calls started, speculatively or not.
    pub fallback_launches: u64,
    /// Fallback calls started before the primary was rejected.
    pub speculative_launches: u64,
    /// Fallback calls dropped before they answered (before readiness, or in flight).
    pub fallbacks_cancelled: u64,
    /// Fallback answers computed and thrown away.
    pub fallbacks_wasted: u64,
    /// Speculative launches the budget refused.
    pub budget_refusals: u64,
    /// Requests whose fallback answered while the primary was still pending. If this is
    /// close to `requests`, the primary is not saving latency.
    pub fallback_first: u64,
}

impl Stats {
    /// Creates a handle with every counter at zero.
    pub fn new() -> Self {
        Stats::default()
    }

    /// Reads the counters.
    pub fn snapshot(&self) -> Snapshot {
        let c = &*self.inner;
        Snapshot {
            requests: c.requests.load(Relaxed),
            served_by_primary: c.served_by_primary.load(Relaxed),
            served_by_fallback: c.served_by_fallback.load(Relaxed),
            abandoned: c.abandoned.load(Relaxed),
            fallback_launches: c.fallback_launches.load(Relaxed),
            speculative_launches: c.speculative_launches.load(Relaxed),
            fallbacks_cancelled: c.fallbacks_cancelled.load(Relaxed),
            fallbacks_wasted: c.fallbacks_wasted.load(Relaxed),
            budget_refusals: c.budget_refusals.load(Relaxed),
            fallback_first: c.fallback_first.load(Relaxed),
        }
    }

    fn count(&self, outcome: &Outcome) {
        let c = &*self.inner;
        let bump = |counter: &AtomicU64, yes: bool| {
            if yes {
                counter.fetch_add(1, Relaxed);
            }
        };
        bump(&c.requests, true);
        bump(&c.served_by_primary, outcome.served == Served::Primary);
        bump(&c.served_by_fallback, outcome.served == Served::Fallback);
        bump(&c.abandoned, outcome.served == Served::Abandoned);
        bump(&c.fallback_launches, outcome.launched.is_some());
        bump(
            &c.speculative_launches,
            outcome.launched.is_some_and(Launched::is_speculative),
        );
        bump(
            &c.fallbacks_cancelled,
            matches!(
                outcome.fallback,
                Fate::DroppedBeforeReady | Fate::DroppedInFlight
            ),
        );
        bump(&c.fallbacks_wasted, outcome.fallback == Fate::Discarded);
        bump(&c.budget_refusals, outcome.budget_refused);
        bump(&c.fallback_first, outcome.fallback_first);
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Stats").field(&self.snapshot()).finish()
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests: {} by primary, {} by fallback, {} abandoned; \
             {} fallback launches ({} speculative, {} cancelled, {} wasted); \
             {} budget refusals; fallback first {} times",
            self.requests,
            self.served_by_primary,
            self.served_by_fallback,
            self.abandoned,
            self.fallback_launches,
            self.speculative_launches,
            self.fallbacks_cancelled,
            self.fallbacks_wasted,
            self.budget_refusals,
            self.fallback_first,
        )
    }
}

pub(crate) type Hook = Arc<dyn Fn(&Outcome) + Send + Sync>;

/// The observers a layer was given. Empty by default: then nothing is tracked.
#[derive(Clone, Default)]
pub(crate) struct Observers {
    pub(crate) hook: Option<Hook>,
    pub(crate) stats: Option<Stats>,
    #[cfg(feature = "metrics")]
    pub(crate) metrics: Option<Arc<metrics_export::Handles>>,
}

impl Observers {
    #[inline]
    fn is_empty(&self) -> bool {
        #[cfg(feature = "metrics")]
        if self.metrics.is_some() {
            return false;
        }
        self.hook.is_none() && self.stats.is_none()
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

/// One request's record, carried inline in its response future (no allocation).
/// `None` when nobody observes, so that every method is a single branch.
pub(crate) struct Tracker {
    track: Option<Track>,
}

struct Track {
    observers: Observers,
    start: Instant,
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
    // Always inline: returned through memory from an out-of-line call, the mostly
    // empty `Tracker` costs a store-forwarding stall on every unobserved request.
    #[inline(always)]
    pub(crate) fn new(observers: &Observers) -> Self {
        if observers.is_empty() && !tracing_may_listen() {
            return Tracker { track: None };
        }
        Tracker::observed(observers)
    }

    #[inline(never)]
    fn observed(observers: &Observers) -> Self {
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

        if observers.is_empty() && !listening {
            return Tracker { track: None };
        }
        Tracker {
            track: Some(Track {
                observers: observers.clone(),
                start: Instant::now(),
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
    #[cfg(feature = "tracing")]
    #[inline(always)]
    pub(crate) fn is_observed(&self) -> bool {
        self.track.is_some()
    }

    /// The request's span, to enter for one poll (a clone: the poll goes on to update
    /// the tracker while the span is entered).
    #[cfg(feature = "tracing")]
    pub(crate) fn span(&self) -> Option<tracing::Span> {
        self.track.as_ref().map(|t| t.span.clone())
    }

    #[inline]
    pub(crate) fn launched(&mut self, why: Launched) {
        if let Some(t) = &mut self.track {
            t.stage = Stage::Launched;
            t.launched = Some(why);
            t.launched_at = Some(Instant::now());
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
            t.primary_latency = Some(t.start.elapsed());
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
        let outcome = Outcome {
            served,
            primary: self.verdict,
            fallback,
            launched: self.launched,
            launched_after: self.launched_at.map(|at| at.duration_since(self.start)),
            budget_refused: self.budget_refused,
            fallback_first: self.fallback_first,
            primary_latency: self.primary_latency,
            fallback_latency: self.fallback_latency,
            elapsed: self.start.elapsed(),
        };
        #[cfg(feature = "tracing")]
        self.trace(&outcome);
        if let Some(stats) = &self.observers.stats {
            stats.count(&outcome);
        }
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.observers.metrics {
            metrics.record(&outcome);
        }
        if let Some(hook) = &self.observers.hook {
            hook(&outcome);
        }
    }
}

#[cfg(feature = "tracing")]
impl Track {
    fn trace(&self, o: &Outcome) {
        let span = &self.span;
        span.record("served", tracing::field::debug(o.served));
        span.record("primary", tracing::field::debug(o.primary));
        span.record("fallback", tracing::field::debug(o.fallback));
        if let Some(launched) = o.launched {
            span.record("launched", tracing::field::debug(launched));
        }
        span.record("budget_refused", o.budget_refused);
        span.record("fallback_first", o.fallback_first);
        if let Some(latency) = o.primary_latency {
            span.record("primary_latency_us", latency.as_micros() as u64);
        }
        if let Some(latency) = o.fallback_latency {
            span.record("fallback_latency_us", latency.as_micros() as u64);
        }
        tracing::debug!(
            parent: span,
            served = ?o.served,
            primary = ?o.primary,
            fallback = ?o.fallback,
            elapsed_us = o.elapsed.as_micros() as u64,
            "request finished"
        );
    }
}

/// Whether a `tracing` subscriber may want the request's span: a cheap check of the
/// static and global level filters before any span is made.
#[inline]
fn tracing_may_listen() -> bool {
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

#[cfg(feature = "metrics")]
pub(crate) mod metrics_export {
    //! Outcomes through the `metrics` facade, on handles registered once per layer.
    use super::{Fate, Outcome, Served};
    use crate::launch::Launched;
    use metrics::{Counter, Histogram};

    /// Every handle a layer reports into, labelled `layer = <name>`.
    pub(crate) struct Handles {
        pub(crate) layer: &'static str,
        served: [Counter; 3],
        fate: [Counter; 6],
        launched: [Counter; 6],
        budget_refusals: Counter,
        fallback_first: Counter,
        primary_latency: Histogram,
        fallback_latency: Histogram,
    }

    impl Handles {
        pub(crate) fn register(layer: &'static str) -> Self {
            metrics::describe_counter!(
                "backstop_requests_total",
                "Requests finished, by who served them (primary, fallback, abandoned)."
            );
            metrics::describe_counter!(
                "backstop_fallback_total",
                "Requests by what became of their fallback."
            );
            metrics::describe_counter!(
                "backstop_fallback_launches_total",
                "Fallback calls started, by why they started when they did."
            );
            metrics::describe_counter!(
                "backstop_budget_refusals_total",
                "Speculative launches the budget refused."
            );
            metrics::describe_counter!(
                "backstop_fallback_first_total",
                "Requests whose fallback answered while the primary was still pending."
            );
            metrics::describe_histogram!(
                "backstop_primary_latency_seconds",
                metrics::Unit::Seconds,
                "Time from the call to the primary's answer."
            );
            metrics::describe_histogram!(
                "backstop_fallback_latency_seconds",
                metrics::Unit::Seconds,
                "Time from the fallback's launch to its answer."
            );
            let served = |by: &'static str| metrics::counter!("backstop_requests_total", "layer" => layer, "served" => by);
            let fate = |fate: &'static str| metrics::counter!("backstop_fallback_total", "layer" => layer, "fate" => fate);
            let launched = |why: &'static str| {
                metrics::counter!(
                    "backstop_fallback_launches_total",
                    "layer" => layer,
                    "launched" => why
                )
            };
            Handles {
                layer,
                served: [served("primary"), served("fallback"), served("abandoned")],
                fate: [
                    fate("not_launched"),
                    fate("dropped_before_ready"),
                    fate("dropped_in_flight"),
                    fate("discarded"),
                    fate("served"),
                    fate("readiness_failed"),
                ],
                launched: [
                    launched("concurrent"),
                    launched("delayed"),
                    launched("adaptive"),
                    launched("after_rejection"),
                    launched("budget_refused"),
                    launched("not_eligible"),
                ],
                budget_refusals: metrics::counter!("backstop_budget_refusals_total", "layer" => layer),
                fallback_first: metrics::counter!("backstop_fallback_first_total", "layer" => layer),
                primary_latency: metrics::histogram!(
                    "backstop_primary_latency_seconds",
                    "layer" => layer
                ),
                fallback_latency: metrics::histogram!(
                    "backstop_fallback_latency_seconds",
                    "layer" => layer
                ),
            }
        }

        pub(crate) fn record(&self, o: &Outcome) {
            let served = match o.served {
                Served::Primary => 0,
                Served::Fallback => 1,
                Served::Abandoned => 2,
            };
            self.served[served].increment(1);
            let fate = match o.fallback {
                Fate::NotLaunched => 0,
                Fate::DroppedBeforeReady => 1,
                Fate::DroppedInFlight => 2,
                Fate::Discarded => 3,
                Fate::Served => 4,
                Fate::ReadinessFailed => 5,
            };
            self.fate[fate].increment(1);
            if let Some(why) = o.launched {
                let why = match why {
                    Launched::Concurrent => 0,
                    Launched::Delayed => 1,
                    Launched::Adaptive => 2,
                    Launched::AfterRejection => 3,
                    Launched::BudgetRefused => 4,
                    Launched::NotEligible => 5,
                };
                self.launched[why].increment(1);
            }
            if o.budget_refused {
                self.budget_refusals.increment(1);
            }
            if o.fallback_first {
                self.fallback_first.increment(1);
            }
            if let Some(latency) = o.primary_latency {
                self.primary_latency.record(latency.as_secs_f64());
            }
            if let Some(latency) = o.fallback_latency {
                self.fallback_latency.record(latency.as_secs_f64());
            }
        }
    }
}
