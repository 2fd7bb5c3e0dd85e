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
//!   [`Stats`] handle: one atomic add per request and no clock, readable from
//!   anywhere.
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

//! # Layout
//!
//! This file holds the report types. The per-request record lives in `track.rs`, the
//! shared counters in `stats.rs`, the `tracing` and `metrics` export in `export.rs`;
//! none of them depends on the rest of the crate.

use std::time::Duration;

mod export;
mod stats;
mod track;

#[cfg(feature = "metrics")]
pub(crate) use self::export::metrics::{
    CoalesceHandles as CoalesceMetrics, Handles as MetricsHandles,
};
pub use self::stats::{Snapshot, Stats};
pub(crate) use self::track::{tracing_may_listen, Observers, Tracker};

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
    /// Whether this request was kept from a speculative launch because as many
    /// speculative calls as [`max_speculative`](crate::Fallback::max_speculative)
    /// allows were in flight.
    pub speculation_limited: bool,
    /// Whether the fallback answered while the primary was still pending (a readiness
    /// error does not count: the fallback did no work).
    pub fallback_first: bool,
    /// From the call to the primary's answer, if it answered.
    pub primary_latency: Option<Duration>,
    /// From the fallback's launch to its answer, if it answered.
    pub fallback_latency: Option<Duration>,
    /// From the call to the end of the request: to the poll that handed out its answer,
    /// or, for an abandoned request, to the moment its response future was dropped
    /// (read at the drop, whether or not the future was polled then).
    pub elapsed: Duration,
    /// Whether the fallback's answer was written back by the layer's
    /// [`refill`](crate::Fallback::refill) action, and how that went (a write the action
    /// spawned and that fails later is not known here: see
    /// [`Stats::refill_write_failed`]). `None` when no refill ran: after a hit, without a refill action, for a request it keeps no key
    /// of, for an answer served after the patience bound ran out, for an `Err`.
    pub refill: Option<Refilled>,
    /// Whether the response future was polled at all. `false` only for a request
    /// abandoned before its first poll (a caller that dropped the future unawaited, a
    /// server shedding a request before its handler ran): such a request ran nothing of
    /// the layer's after `call`. It is reported and counted like every abandoned
    /// request ([`Served::Abandoned`], [`Fate::NotLaunched`], `elapsed` from the call to
    /// the drop) and also counted in
    /// [`Snapshot::abandoned_unpolled`]; it deposits nothing in a budget and
    /// teaches an adaptive launch's estimate nothing.
    pub polled: bool,
}

/// The clock an [`Outcome`]'s latencies (and the `metrics` histograms' and the
/// `tracing` span's) are read from: see
/// [`Fallback::latency_clock`](crate::Fallback::latency_clock).
///
/// A timed request reads its clock twice when its primary answers on the first poll
/// (once at `call`, once in that poll), and at most once per poll after that, so the
/// clock is most of what a hook costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LatencyClock {
    /// The system's monotonic clock: `tokio::time::Instant` with the `time` feature,
    /// which follows tokio's paused clock in tests (`tokio::time::pause`,
    /// `start_paused`), else `std::time::Instant`. The default. 23 ns a reading on the
    /// machine of `docs/overhead.md` (a virtual machine, where reading the time-stamp
    /// counter alone takes 10 ns).
    #[default]
    Monotonic,
    /// The CPU's own counter — the x86-64 time-stamp counter, the aarch64 system
    /// counter — read through [`quanta`](https://docs.rs/quanta), which falls back to
    /// the monotonic clock where there is none it can trust (an x86-64 CPU without an
    /// invariant TSC, another architecture). 10 ns a reading on the same machine. It does **not**
    /// follow tokio's paused clock: a test that pauses time sees real latencies.
    /// Setting it calibrates the counter once per process, about 0.6 ms there (at most
    /// 200 ms, per quanta).
    ///
    /// Available with the `quanta` feature.
    #[cfg(feature = "quanta")]
    #[cfg_attr(docsrs, doc(cfg(feature = "quanta")))]
    Tsc,
}

/// What became of a request's [`refill`](crate::Fallback::refill), as reported in an
/// [`Outcome`].
///
/// Also re-exported as [`refill::Refilled`](crate::refill::Refilled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refilled {
    /// The refill action returned `Ok(Write::Started)`: the write was started.
    ///
    /// [`Write`](crate::refill::Write)
    Started,
    /// The refill action was handed the answer and wrote nothing: it returned
    /// `Ok(Write::Skipped)` (a `404`, an empty row: nothing to cache).
    Skipped,
    /// The refill action returned an error, which was dropped. The answer was served
    /// all the same.
    Failed,
}

/// Why a request's fallback started when it did, as reported in an [`Outcome`].
///
/// Also re-exported as [`launch::Launched`](crate::launch::Launched), next to the
/// policies it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Launched {
    /// Speculatively, with the primary ([`Launch::Concurrent`](crate::launch::Launch::Concurrent)).
    Concurrent,
    /// Speculatively, once the primary had been pending for the configured delay.
    Delayed,
    /// Speculatively, once the primary had been pending for the adaptive delay.
    Adaptive,
    /// After the primary was rejected: the policy is
    /// [`Launch::Sequential`](crate::launch::Launch::Sequential), or the primary was
    /// rejected before the speculative launch (on its first poll, or before a delay ran
    /// out).
    AfterRejection,
    /// After the primary was rejected, because the budget refused a speculative launch.
    BudgetRefused,
    /// After the primary was rejected, because as many speculative calls as the layer's
    /// [`max_speculative`](crate::Fallback::max_speculative) allows were already in
    /// flight.
    LimitReached,
    /// After the primary was rejected, because the request was not
    /// [`Eligible`](crate::launch::Eligible).
    NotEligible,
}

impl Launched {
    /// Whether the launch came before the primary was rejected, and so was extra load.
    pub fn is_speculative(self) -> bool {
        matches!(
            self,
            Launched::Concurrent | Launched::Delayed | Launched::Adaptive
        )
    }
}
