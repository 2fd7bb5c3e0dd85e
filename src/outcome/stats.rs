//! The shared outcome counters: one atomic add per request, no clock.

use super::{Fate, Launched, Refilled, Served};
use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
};

/// Shared outcome counters, set with [`Fallback::stats`](crate::Fallback::stats).
///
/// Cloning is cheap and every clone reads and writes the same counters, so one handle
/// can be given to a layer (and so to every service it builds) and read elsewhere.
///
/// Counting needs no clock: each finished request costs one relaxed atomic add, into a
/// counter for its class of outcome (who served it, what became of the fallback, why it
/// started, whether the budget refused it and whether the fallback answered first);
/// [`snapshot`](Stats::snapshot) sums the classes. A request whose answer is handed
/// to a [`refill`](crate::Fallback::refill) action costs one more, into a refill
/// counter; so does a cancel action run by an
/// [`OnCancel`](crate::cancel::OnCancel::stats) that counts here, and a spawned refill
/// write reported with [`refill_write_failed`](Stats::refill_write_failed). A handle
/// holds about 4 KiB of counters.
#[derive(Clone, Default)]
pub struct Stats {
    inner: Arc<Counters>,
}

/// Classes of outcome: served (3) × fate (6) × launched (none + 7) × budget refused (2)
/// × fallback first (2).
const CLASSES: usize = 3 * 6 * 8 * 2 * 2;

struct Counters {
    by_class: [AtomicU64; CLASSES],
    /// Refills started, skipped and failed: counted apart from the classes, when a
    /// refill runs, so that the classes do not double.
    refills: [AtomicU64; 3],
    /// Started refill writes that reported failing later.
    refill_writes_failed: AtomicU64,
    /// Cancel actions run by `OnCancel` slots.
    cancels: AtomicU64,
    /// Requests abandoned before their first poll, counted apart from the classes as
    /// well (each is also one of the abandoned ones).
    unpolled: AtomicU64,
    /// Requests kept from a speculative launch by the layer's `max_speculative`.
    limited: AtomicU64,
    // ---- coalescing (`coalesce`), counted by the coalescer, apart from the classes ----
    /// Requests that joined a coalesced call in flight.
    coalesce_joined: AtomicU64,
    /// Coalesced calls ended: answered, dropped (last waiter gone), panicked.
    coalesce_ends: [AtomicU64; 3],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            by_class: std::array::from_fn(|_| AtomicU64::new(0)),
            refills: std::array::from_fn(|_| AtomicU64::new(0)),
            refill_writes_failed: AtomicU64::new(0),
            cancels: AtomicU64::new(0),
            unpolled: AtomicU64::new(0),
            limited: AtomicU64::new(0),
            coalesce_joined: AtomicU64::new(0),
            coalesce_ends: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// What [`Stats`] counts of one request: everything its class is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Class {
    pub(crate) served: Served,
    pub(crate) fallback: Fate,
    pub(crate) launched: Option<Launched>,
    pub(crate) budget_refused: bool,
    pub(crate) fallback_first: bool,
}

const SERVED: [Served; 3] = [Served::Primary, Served::Fallback, Served::Abandoned];
const FATES: [Fate; 6] = [
    Fate::NotLaunched,
    Fate::DroppedBeforeReady,
    Fate::DroppedInFlight,
    Fate::Discarded,
    Fate::ReadinessFailed,
    Fate::Served,
];
const LAUNCHED: [Option<Launched>; 8] = [
    None,
    Some(Launched::Concurrent),
    Some(Launched::Delayed),
    Some(Launched::Adaptive),
    Some(Launched::AfterRejection),
    Some(Launched::BudgetRefused),
    Some(Launched::NotEligible),
    Some(Launched::LimitReached),
];

impl Class {
    #[inline]
    fn index(self) -> usize {
        let served = match self.served {
            Served::Primary => 0,
            Served::Fallback => 1,
            Served::Abandoned => 2,
        };
        let fate = match self.fallback {
            Fate::NotLaunched => 0,
            Fate::DroppedBeforeReady => 1,
            Fate::DroppedInFlight => 2,
            Fate::Discarded => 3,
            Fate::ReadinessFailed => 4,
            Fate::Served => 5,
        };
        let launched = match self.launched {
            None => 0,
            Some(Launched::Concurrent) => 1,
            Some(Launched::Delayed) => 2,
            Some(Launched::Adaptive) => 3,
            Some(Launched::AfterRejection) => 4,
            Some(Launched::BudgetRefused) => 5,
            Some(Launched::NotEligible) => 6,
            Some(Launched::LimitReached) => 7,
        };
        (((served * 6 + fate) * 8 + launched) * 2 + usize::from(self.budget_refused)) * 2
            + usize::from(self.fallback_first)
    }

    fn from_index(i: usize) -> Class {
        Class {
            fallback_first: i % 2 == 1,
            budget_refused: (i / 2) % 2 == 1,
            launched: LAUNCHED[(i / 4) % 8],
            fallback: FATES[(i / 32) % 6],
            served: SERVED[i / 192],
        }
    }
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
    /// Of the `abandoned`, those whose response future was dropped before its first
    /// poll: they ran nothing of the layer's after `call` (see
    /// [`Outcome::polled`](super::Outcome::polled)). Many of these mean callers give up
    /// before their requests are even started — an overloaded server.
    pub abandoned_unpolled: u64,
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
    /// Speculative launches not made because as many speculative calls as the layer's
    /// [`max_speculative`](crate::Fallback::max_speculative) allows were in flight.
    pub speculation_limited: u64,
    /// Requests whose fallback answered while the primary was still pending. If this is
    /// close to `requests`, the primary is not saving latency.
    pub fallback_first: u64,
    /// Refills that started a write: fallback answers served after a miss and handed
    /// to the [`refill`](crate::Fallback::refill) action, which returned
    /// `Ok(Write::Started)` ([`Write`](crate::refill::Write)).
    pub refills: u64,
    /// Refills that wrote nothing: the action was handed the answer and returned
    /// `Ok(Write::Skipped)` (a `404`, an empty row: nothing to cache).
    pub refills_skipped: u64,
    /// Refills that failed: the [`refill`](crate::Fallback::refill) action returned an
    /// error (the answer was served all the same).
    pub refill_failures: u64,
    /// Refill writes that started (counted in `refills`) and failed later, as the
    /// action's spawned write reported with
    /// [`Stats::refill_write_failed`](Stats::refill_write_failed).
    pub refill_writes_failed: u64,
    /// Cancel actions run: calls of an [`OnCancel`](crate::cancel::OnCancel) counting
    /// here ([`OnCancel::stats`](crate::cancel::OnCancel::stats)) dropped unanswered
    /// while their slot was filled, and [`Slot::cancel`](crate::cancel::Slot::cancel)
    /// calls that ran the action. Compare with `fallbacks_cancelled`, the fallback
    /// futures dropped (filled slot or not).
    pub cancels: u64,

    // ---- coalescing: see the `coalesce` module ----
    /// Requests that joined a coalesced call already in flight for their key, rather
    /// than starting one: calls the backend was spared.
    pub coalesce_joined: u64,
    /// Coalesced calls that answered: every waiter still there got the answer.
    pub coalesce_answered: u64,
    /// Coalesced calls dropped unanswered because their last waiter left.
    pub coalesce_dropped: u64,
    /// Coalesced calls that panicked: each of their waiters panicked too.
    pub coalesce_panicked: u64,
}

impl Snapshot {
    fn add(&mut self, class: Class, n: u64) {
        let when = |yes: bool| if yes { n } else { 0 };
        self.requests += n;
        self.served_by_primary += when(class.served == Served::Primary);
        self.served_by_fallback += when(class.served == Served::Fallback);
        self.abandoned += when(class.served == Served::Abandoned);
        self.fallback_launches += when(class.launched.is_some());
        self.speculative_launches += when(class.launched.is_some_and(Launched::is_speculative));
        self.fallbacks_cancelled += when(matches!(
            class.fallback,
            Fate::DroppedBeforeReady | Fate::DroppedInFlight
        ));
        self.fallbacks_wasted += when(class.fallback == Fate::Discarded);
        self.budget_refusals += when(class.budget_refused);
        self.fallback_first += when(class.fallback_first);
    }
}

impl Stats {
    /// Creates a handle with every counter at zero.
    pub fn new() -> Self {
        Stats::default()
    }

    /// Reads the counters.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (i, counter) in self.inner.by_class.iter().enumerate() {
            let n = counter.load(Relaxed);
            if n != 0 {
                snapshot.add(Class::from_index(i), n);
            }
        }
        let [started, skipped, failed] = &self.inner.refills;
        snapshot.refills = started.load(Relaxed);
        snapshot.refills_skipped = skipped.load(Relaxed);
        snapshot.refill_failures = failed.load(Relaxed);
        snapshot.abandoned_unpolled = self.inner.unpolled.load(Relaxed);
        snapshot.speculation_limited = self.inner.limited.load(Relaxed);
        snapshot.refill_writes_failed = self.inner.refill_writes_failed.load(Relaxed);
        snapshot.cancels = self.inner.cancels.load(Relaxed);
        snapshot.coalesce_joined = self.inner.coalesce_joined.load(Relaxed);
        let [answered, dropped, panicked] = &self.inner.coalesce_ends;
        snapshot.coalesce_answered = answered.load(Relaxed);
        snapshot.coalesce_dropped = dropped.load(Relaxed);
        snapshot.coalesce_panicked = panicked.load(Relaxed);
        snapshot
    }

    /// Counts a refill write that failed after its action returned: for an action
    /// that spawns its write (and so returned `Ok(Write::Started)` before knowing how
    /// it went), to call from the spawned task when the write fails. Read in
    /// [`Snapshot::refill_writes_failed`]; one relaxed atomic add.
    ///
    /// Give the action a clone of the handle the layer counts into, and each write
    /// it spawns a clone of that (`examples/redis-postgres`'s `WriteBack` does):
    ///
    /// ```
    /// use tower_backstop::outcome::Stats;
    ///
    /// let stats = Stats::new();
    /// let for_the_write = stats.clone(); // moved into the spawned write
    /// // ...which, when the cache refuses the write:
    /// for_the_write.refill_write_failed();
    /// assert_eq!(stats.snapshot().refill_writes_failed, 1);
    /// ```
    pub fn refill_write_failed(&self) {
        self.inner.refill_writes_failed.fetch_add(1, Relaxed);
    }

    /// A cancel action ran.
    #[inline]
    pub(crate) fn count_cancel(&self) {
        self.inner.cancels.fetch_add(1, Relaxed);
    }

    /// Whether `self` and `other` are handles on the same counters.
    #[inline]
    pub(crate) fn same(&self, other: &Stats) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    #[inline]
    pub(crate) fn count(&self, class: Class) {
        self.inner.by_class[class.index()].fetch_add(1, Relaxed);
    }

    /// A request was abandoned before its first poll (and counted as abandoned too).
    #[inline]
    pub(crate) fn count_unpolled(&self) {
        self.inner.unpolled.fetch_add(1, Relaxed);
    }

    /// A request joined a coalesced call in flight.
    #[inline]
    pub(crate) fn count_coalesce_joined(&self) {
        self.inner.coalesce_joined.fetch_add(1, Relaxed);
    }

    /// A coalesced call ended: answered (0), dropped (1) or panicked (2).
    #[inline]
    pub(crate) fn count_coalesce_end(&self, end: usize) {
        self.inner.coalesce_ends[end].fetch_add(1, Relaxed);
    }

    /// A request was kept from a speculative launch by the layer's limit.
    #[inline]
    pub(crate) fn count_limited(&self) {
        self.inner.limited.fetch_add(1, Relaxed);
    }

    /// A refill ran, and what became of it.
    #[inline]
    pub(crate) fn count_refill(&self, refilled: Refilled) {
        let i = match refilled {
            Refilled::Started => 0,
            Refilled::Skipped => 1,
            Refilled::Failed => 2,
        };
        self.inner.refills[i].fetch_add(1, Relaxed);
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
            "{} requests: {} by primary, {} by fallback, {} abandoned ({} unpolled); \
             {} fallback launches ({} speculative, {} cancelled, {} wasted); \
             {} budget refusals, {} over the speculation limit; fallback first {} times; \
             {} refills started ({} failed later), {} skipped, {} failed; \
             {} cancel actions run",
            self.requests,
            self.served_by_primary,
            self.served_by_fallback,
            self.abandoned,
            self.abandoned_unpolled,
            self.fallback_launches,
            self.speculative_launches,
            self.fallbacks_cancelled,
            self.fallbacks_wasted,
            self.budget_refusals,
            self.speculation_limited,
            self.fallback_first,
            self.refills,
            self.refill_writes_failed,
            self.refills_skipped,
            self.refill_failures,
            self.cancels,
        )?;
        // Coalescing, only where it happened: a layer without it reads as before.
        let coalesce = [
            self.coalesce_joined,
            self.coalesce_answered,
            self.coalesce_dropped,
            self.coalesce_panicked,
        ];
        if coalesce.iter().any(|&n| n != 0) {
            write!(
                f,
                "; {} joined coalesced calls ({} answered, {} dropped, {} panicked)",
                self.coalesce_joined,
                self.coalesce_answered,
                self.coalesce_dropped,
                self.coalesce_panicked,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_round_trips_through_its_index() {
        for i in 0..CLASSES {
            assert_eq!(Class::from_index(i).index(), i);
        }
    }
}
