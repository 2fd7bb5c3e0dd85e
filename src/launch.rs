//! When the fallback starts, and how much extra load it may add.
//!
//! Starting the fallback with every request is what makes a miss cheap, and it is
//! also extra load on the fallback — usually the database the primary exists to
//! protect. The [`Launch`] policy chooses *when* a fallback call starts, a budget caps
//! how many start *speculatively* (before the primary was rejected), and an
//! [`Eligible`] predicate keeps some requests from speculating at all.
//!
//! | policy | fallback starts | extra fallback load | a miss costs |
//! |---|---|---|---|
//! | [`Launch::Concurrent`] (default) | with the primary | one call per request (hits included) | `max(primary, fallback)` |
//! | `Launch::Delayed(d)` | on the first 1 ms timer tick once the primary has been pending for `d` rounded up to a whole ms (`D`) | one call per request slower than `D` to `D + 1 ms` | `max(primary, D + fallback)` (plus up to 1 ms) if the miss is slower than `D`, else `primary + fallback` |
//! | `Launch::Adaptive(..)` | as `Delayed`, with `d` a percentile `q` of the primary's recent latency (cut-short calls included) | at most `1 - q` of requests (10% at p90); none from a primary faster than 1 ms | as `Delayed` |
//! | [`Launch::Sequential`] | after the primary is rejected | none | `primary + fallback` |
//!
//! Whatever the policy, a rejected primary always gets its fallback, started at once:
//! the policy only decides how early the fallback may start before that.
//!
//! The policies that wait run on tokio's timer, which fires on whole-millisecond
//! ticks: a delay is rounded up to a whole millisecond, and the launch comes on the
//! first tick at or after it. A primary that answers within the rounded delay never
//! starts its fallback; sub-millisecond delays are not honoured as such.
//!
//! A *speculative* launch is one that starts before the primary has been rejected.
//! [`Fallback::max_speculative`](crate::Fallback::max_speculative) caps how many such
//! calls are in flight at once (beyond it a request is served sequentially), so that
//! calls started for what turn out to be hits cannot hold the pooled connections and
//! server time the misses need.
//! With a budget set (`Fallback::budget`, feature `budget`), every request deposits
//! into it (at its response future's first poll: one dropped unpolled never ran, and
//! deposits nothing) and every speculative launch withdraws from it; a refused withdrawal
//! degrades that one request to sequential. Size the two together: an adaptive launch
//! at percentile `q` speculates for at most about `1 - q` of the requests, so a budget below
//! that refuses some of exactly the slow requests speculation is for (the latency
//! study in the repository measured p90 with a 10% budget: almost no refusals).

use crate::outcome::{LatencyClock, Observers};
#[cfg(feature = "time")]
use std::time::Duration;
use std::{fmt, sync::Arc};

#[cfg(feature = "adaptive")]
pub use self::adaptive::Adaptive;
/// Re-exported from [`outcome`](crate::outcome), where the reports that carry it live.
pub use crate::outcome::Launched;

/// When the fallback call starts, relative to the primary's.
///
/// Set with [`Fallback::launch`](crate::Fallback::launch) or
/// [`FallbackLayer::launch`](crate::FallbackLayer::launch). The policies that wait use
/// tokio's timer and need the `time` feature (on by default) and a tokio runtime with
/// time enabled.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum Launch {
    /// Start the fallback together with the primary. The default.
    ///
    /// Costs one fallback call per request whose primary does not answer on its first
    /// poll; a miss costs the slower of the two branches.
    #[default]
    Concurrent,
    /// Start the fallback only after the primary's answer was rejected.
    ///
    /// No extra load on the fallback; a miss costs both latencies, one after the other.
    Sequential,
    /// Start the fallback once the primary has been pending for this long, or at once
    /// if the primary is rejected sooner.
    ///
    /// The delay counts from the response future's first poll that finds the primary
    /// pending (normally right after `call`), so a primary that answers at once never
    /// reads the clock. It runs on tokio's timer, which fires on whole-millisecond
    /// ticks: the delay is rounded **up** to a whole millisecond `D` (`100 µs` acts as
    /// `1 ms`; `0` stays `0`), and the fallback starts on the first tick at or after
    /// `D` — between `D` and `D + 1 ms` after the primary was found pending, later if
    /// the runtime is busy. A primary that answers within `D` never starts its
    /// fallback. [`Outcome::launched_after`](crate::outcome::Outcome::launched_after)
    /// reports when each launch actually came.
    ///
    /// Extra load is one call per request whose primary takes longer than that;
    /// choosing the delay at the primary's p95 latency costs at most about 5% extra
    /// load. A delay too long to represent (`Duration::MAX`) never runs out.
    ///
    /// Available with the `time` feature (on by default).
    #[cfg(feature = "time")]
    #[cfg_attr(docsrs, doc(cfg(feature = "time")))]
    Delayed(Duration),
    /// Like [`Launch::Delayed`], with the delay following a percentile of the
    /// primary's recent latency, calls cut short included; rounded up to a whole
    /// millisecond like any delay. See [`Adaptive`].
    ///
    /// Available with the `adaptive` feature.
    #[cfg(feature = "adaptive")]
    #[cfg_attr(docsrs, doc(cfg(feature = "adaptive")))]
    Adaptive(Adaptive),
}

/// Decides whether a request may start its fallback speculatively.
///
/// Requests it refuses are served sequentially: their fallback starts only after the
/// primary is rejected. Implemented for every `Fn(&Req) -> bool`.
///
/// ```
/// # #[cfg(feature = "time")] {
/// use std::convert::Infallible;
/// use tower::service_fn;
/// use tower_backstop::FallbackLayer;
///
/// #[derive(Clone)]
/// enum Op { Read(u32), Write(u32) }
///
/// let db = service_fn(|_op: Op| async { Ok::<_, Infallible>(()) });
/// // Only reads are safe to run twice.
/// let layer = FallbackLayer::new(db).speculate_if(|op: &Op| matches!(op, Op::Read(_)));
/// # let _ = layer; }
/// ```
pub trait Eligible<Req> {
    /// Returns `true` if `req` may start its fallback before the primary is rejected.
    fn eligible(&self, req: &Req) -> bool;
}

impl<Req, F> Eligible<Req> for F
where
    F: Fn(&Req) -> bool,
{
    fn eligible(&self, req: &Req) -> bool {
        self(req)
    }
}

/// Lets every request speculate: the default [`Eligible`] predicate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnyRequest;

impl<Req> Eligible<Req> for AnyRequest {
    fn eligible(&self, _req: &Req) -> bool {
        true
    }
}

#[cfg(feature = "budget")]
pub(crate) type SharedBudget = Arc<dyn tower::retry::budget::Budget + Send + Sync>;

/// The cap of [`Fallback::max_speculative`](crate::Fallback::max_speculative):
/// speculative fallback calls in flight, shared by every service one layer builds.
///
/// A slot is taken at a speculative launch and given back as soon as the call is no
/// longer speculative or no longer running: when the primary answers (accepted, the
/// call is dropped; rejected, it is a miss's call, needed), when the fallback answers
/// first, or when the response future is dropped. A request that finds every slot
/// taken is served sequentially, as a budget refusal does.
#[derive(Clone, Debug)]
pub(crate) struct SpeculationLimit(Arc<LimitInner>);

#[derive(Debug)]
struct LimitInner {
    max: usize,
    in_flight: std::sync::atomic::AtomicUsize,
}

impl SpeculationLimit {
    fn new(max: usize) -> Self {
        SpeculationLimit(Arc::new(LimitInner {
            max,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    /// Takes a slot, if one is free.
    #[inline]
    pub(crate) fn try_acquire(&self) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let inner = &*self.0;
        inner
            .in_flight
            .fetch_update(AcqRel, Acquire, |n| (n < inner.max).then_some(n + 1))
            .is_ok()
    }

    /// Gives back a slot taken by [`try_acquire`](SpeculationLimit::try_acquire).
    #[inline]
    fn release(&self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One request's hold on its layer's [`SpeculationLimit`], if it may speculate under
/// one: the handle, and whether it has a slot.
///
/// CORRECTNESS: dropping it gives the slot back, so that no way out of a request — a
/// panicking outcome hook while it is abandoned, a cold part freed rather than
/// pooled — can keep a slot for good.
#[derive(Debug, Default)]
pub(crate) struct LimitHold {
    limit: Option<SpeculationLimit>,
    holding: bool,
}

impl LimitHold {
    /// This request may speculate under `limit`.
    #[inline]
    pub(crate) fn set(&mut self, limit: &SpeculationLimit) {
        self.limit = Some(limit.clone());
    }

    /// Takes a slot for a speculative launch: `false` if every slot is taken. `true`
    /// at once without a limit.
    #[inline]
    pub(crate) fn try_acquire(&mut self) -> bool {
        match &self.limit {
            None => true,
            Some(limit) => {
                self.holding = limit.try_acquire();
                self.holding
            }
        }
    }

    /// The call is speculative no more, or no longer running: its slot goes back.
    #[inline]
    pub(crate) fn release(&mut self) {
        if std::mem::take(&mut self.holding) {
            if let Some(limit) = &self.limit {
                limit.release();
            }
        }
    }

    /// Gives the slot back and the handle up: for a cold part about to be pooled.
    #[inline]
    pub(crate) fn clear(&mut self) {
        self.release();
        self.limit = None;
    }
}

impl Drop for LimitHold {
    fn drop(&mut self) {
        self.release();
    }
}

/// Launch settings shared by a layer and every service it builds.
///
/// The fields are read anywhere in the crate but written only through the setters,
/// which precompute what `call` needs: one word to copy per request (the response
/// future's [`Control`]), the same whatever features are compiled in, and a check of
/// the budget when `budget` is.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) launch: Launch,
    #[cfg(feature = "budget")]
    pub(crate) budget: Option<SharedBudget>,
    /// The cap on speculative calls in flight, if any.
    pub(crate) limit: Option<SpeculationLimit>,
    #[cfg(feature = "time")]
    pub(crate) patience: Option<Duration>,
    /// `None` until an observer is set: one pointer for a request to check, and to
    /// clone if observed.
    pub(crate) observers: Option<Arc<Observers>>,
    /// What a timed request's latencies are read from.
    pub(crate) clock: LatencyClock,
    /// How a response future starts out — its plan, what it takes a cold part late for,
    /// its flags cleared — for an ineligible request and for an eligible one: copied
    /// whole into the future at `call`, one word.
    starts: [Control; 2],
    /// Which requests need a cold part at `call` (a `tracing` subscriber aside).
    cold: NeedsCold,
    /// Whether a request's cold part holds anything of the launch: a delay, patience, a
    /// budget or an adaptive sample (rather than observers alone).
    pub(crate) launch_state: bool,
    /// The calls in flight of the coalescer the fallback was wrapped in by
    /// `coalesce_by`, if any: told about the layer's `Stats` and `metrics`. Never read
    /// by a request.
    coalesce: Option<Arc<crate::coalesce::Registry>>,
}

/// What a response future whose cold part is taken late fills it with, in the hot part:
/// the launch delay of a `Plan::Wait`, or else the patience, in whole milliseconds (four
/// bytes, which the hot future's flags leave as padding anyway). [`Deferred::NONE`] if
/// there is nothing to take a cold part late for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Deferred(u32);

impl Deferred {
    pub(crate) const NONE: Deferred = Deferred(u32::MAX);

    /// `d` if it is a whole number of milliseconds this can hold, else `None`.
    #[cfg(feature = "time")]
    fn exact(d: Duration) -> Option<Deferred> {
        if d.subsec_nanos() % 1_000_000 != 0 {
            return None;
        }
        let ms = u32::try_from(d.as_millis()).ok()?;
        (ms != u32::MAX).then_some(Deferred(ms))
    }

    /// The duration held, if any.
    #[cfg(feature = "time")]
    #[inline]
    pub(crate) fn get(self) -> Option<Duration> {
        (self != Deferred::NONE).then(|| Duration::from_millis(u64::from(self.0)))
    }
}

impl Default for Settings {
    fn default() -> Self {
        let mut settings = Settings {
            launch: Launch::default(),
            #[cfg(feature = "budget")]
            budget: None,
            limit: None,
            #[cfg(feature = "time")]
            patience: None,
            observers: None,
            clock: LatencyClock::Monotonic,
            starts: [Control::new(Plan::Now, Deferred::NONE); 2],
            cold: NeedsCold::Never,
            launch_state: false,
            coalesce: None,
        };
        settings.refresh();
        settings
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Settings");
        s.field("launch", &self.launch);
        #[cfg(feature = "budget")]
        s.field("budget", &self.budget.as_ref().map(|_| "Budget"));
        s.field("max_speculative", &self.limit.as_ref().map(|l| l.0.max));
        #[cfg(feature = "time")]
        s.field("patience", &self.patience);
        s.field("observers", &self.observers);
        s.field("clock", &self.clock);
        s.finish()
    }
}

impl Settings {
    pub(crate) fn set_launch(&mut self, launch: Launch) {
        self.launch = launch;
        self.refresh();
    }

    #[cfg(feature = "budget")]
    pub(crate) fn set_budget(&mut self, budget: SharedBudget) {
        self.budget = Some(budget);
        self.refresh();
    }

    pub(crate) fn set_max_speculative(&mut self, max: usize) {
        self.limit = Some(SpeculationLimit::new(max));
        self.refresh();
    }

    #[cfg(feature = "time")]
    pub(crate) fn set_patience(&mut self, patience: Duration) {
        self.patience = Some(patience);
        self.refresh();
    }

    pub(crate) fn set_clock(&mut self, clock: LatencyClock) {
        // The first reading calibrates the counter: here, rather than in a request.
        #[cfg(feature = "quanta")]
        if clock == LatencyClock::Tsc {
            let _ = quanta::Instant::now();
        }
        self.clock = clock;
    }

    /// Ties the layer's observers to the coalescer its fallback was wrapped in: its
    /// `Stats` and `metrics` count what the coalescer did too, whatever the order of the
    /// builder calls.
    pub(crate) fn set_coalesce(&mut self, calls: Arc<crate::coalesce::Registry>) {
        self.coalesce = Some(calls);
        self.share_observers();
    }

    /// Hands the layer's `Stats` and `metrics` to its coalescer, if it has one: after
    /// either changes.
    pub(crate) fn share_observers(&self) {
        let Some(calls) = &self.coalesce else {
            return;
        };
        let observers = self.observers.as_deref();
        calls.set_observers(crate::coalesce::Observers {
            stats: observers.and_then(|o| o.stats.clone()),
            #[cfg(feature = "metrics")]
            metrics: observers
                .and_then(|o| o.metrics.as_ref())
                .map(|m| Arc::new(m.coalesce())),
        });
    }

    /// The observers, to add one to.
    pub(crate) fn observers_mut(&mut self) -> &mut Observers {
        // The first observer changes what every request needs: recomputed like any
        // other setting, rather than patched here.
        if self.observers.is_none() {
            self.observers = Some(Arc::default());
            self.refresh();
        }
        Arc::make_mut(self.observers.get_or_insert_with(Default::default))
    }

    /// Recomputes what `call` reads.
    fn refresh(&mut self) {
        let eligible = match &self.launch {
            Launch::Concurrent => Plan::Now,
            Launch::Sequential => Plan::OnReject(Launched::AfterRejection),
            #[cfg(feature = "time")]
            Launch::Delayed(_) => Plan::Wait(Launched::Delayed),
            #[cfg(feature = "adaptive")]
            Launch::Adaptive(_) => Plan::Wait(Launched::Adaptive),
        };
        // Sequential never speculates: eligibility makes no difference to it.
        let ineligible = match eligible {
            Plan::OnReject(_) => eligible,
            _ => Plan::OnReject(Launched::NotEligible),
        };

        // A delay waits on a timer; an adaptive launch also samples every request.
        let launch = matches!(eligible, Plan::Wait(_));
        #[cfg(feature = "time")]
        let launch = launch || self.patience.is_some();
        #[cfg(feature = "budget")]
        let budget = self.budget.is_some();
        #[cfg(not(feature = "budget"))]
        let budget = false;
        let limited = self.limit.is_some();
        self.launch_state = launch || budget || limited;
        // Every request of a layer with a budget deposits into it, from its cold part; a
        // speculative call under a limit holds its slot there, and only a request that
        // may speculate can take one.
        self.cold = match (launch || budget || self.observers.is_some(), limited) {
            (true, _) => NeedsCold::Always,
            (false, true) => NeedsCold::IfSpeculating,
            (false, false) => NeedsCold::Never,
        };
        // What a cold part taken late is filled with: `Deferred::NONE` unless requests
        // take their cold part late. Such requests need none at `call`
        // (`cold` is `false`), and one at the first poll that needs it — to arm the
        // launch delay when the primary is first found pending, or the patience bound
        // when the fallback answers first — so a primary that answers on its first poll
        // never needs one.
        #[cfg(feature = "time")]
        let late = match launch && !budget && !limited && self.observers.is_none() {
            true => self.late(),
            false => None,
        };
        #[cfg(not(feature = "time"))]
        let late = None;
        let deferred = match late {
            Some(late) => {
                self.cold = NeedsCold::Never;
                late
            }
            None => Deferred::NONE,
        };
        self.starts = [
            Control::new(ineligible, deferred),
            Control::new(eligible, deferred),
        ];
    }

    /// What a request of a layer whose only options are a delay or patience (not both)
    /// needs to take its cold part late, if that can be held in a [`Deferred`]: anything
    /// else — an adaptive launch, which samples every request from its `call`, a delay
    /// with patience, a duration that is not a whole number of milliseconds — takes it
    /// at `call`.
    #[cfg(feature = "time")]
    fn late(&self) -> Option<Deferred> {
        match (&self.launch, self.patience) {
            (Launch::Delayed(delay), None) => Deferred::exact(on_timer(*delay)),
            (Launch::Concurrent | Launch::Sequential, Some(patience)) => Deferred::exact(patience),
            _ => None,
        }
    }

    /// Plans one request: called once per request, in `call`, after all the user code
    /// `call` runs. (A request of a layer with a budget deposits into it at its first
    /// poll, from its cold part.)
    #[inline]
    pub(crate) fn start(&self, eligible: bool) -> Control {
        self.starts[usize::from(eligible)]
    }

    /// Whether a request with this plan needs anything beyond the plan at `call`: a
    /// timer, a budget to deposit into and withdraw from, a slot under the speculation
    /// limit, an adaptive sample, patience, an observer. (A `tracing` subscriber is
    /// checked apart: only one that listens needs a cold part.)
    #[inline]
    pub(crate) fn needs_cold(&self, plan: Plan) -> bool {
        match self.cold {
            NeedsCold::Never => false,
            NeedsCold::IfSpeculating => plan.may_speculate(),
            NeedsCold::Always => true,
        }
    }
}

/// Which requests need a cold part at `call`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NeedsCold {
    Never,
    /// Only requests that may speculate: a layer whose only option is a speculation
    /// limit, whose slot a request that never speculates cannot take.
    IfSpeculating,
    Always,
}

/// The plan and the flags of a response future, in one word: one field for its
/// projection to point at, and one copy from [`Settings`] to start it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Control {
    /// When the fallback may start speculatively, and why.
    pub(crate) plan: Plan,
    /// The delay or patience to fill a cold part taken late with: `Deferred::NONE` unless
    /// the layer's requests take none at `call`, and one at the first poll that needs it.
    #[cfg_attr(not(feature = "time"), allow(dead_code))]
    pub(crate) deferred: Deferred,
    /// Whether the fallback has been launched (it may still be waiting for readiness).
    pub(crate) launched: bool,
    /// Set if a poll panicked: the future then never serves anything.
    pub(crate) poisoned: bool,
}

impl Control {
    const fn new(plan: Plan, deferred: Deferred) -> Control {
        Control {
            plan,
            deferred,
            launched: false,
            poisoned: false,
        }
    }
}

/// When one request's fallback may start speculatively: part of the hot future, so
/// two bytes; the delay a `Wait` waits for is in the cold part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// On the first poll that finds the primary pending.
    Now,
    /// Once the primary has been pending for the launch delay (for this reason),
    /// counted from the first poll that finds it pending.
    #[cfg_attr(not(feature = "time"), allow(dead_code))]
    Wait(Launched),
    /// Never speculatively: only after the primary is rejected (for this reason).
    OnReject(Launched),
}

impl Plan {
    /// Speculate once `delay`, rounded up for the timer (see [`on_timer`]), has passed
    /// since `start`: the deadline, or `None` for a delay too long to be represented
    /// (`Duration::MAX`, say), which never passes — the fallback then starts only after
    /// a rejection, as with `Launch::Sequential`.
    #[cfg(feature = "time")]
    #[inline]
    pub(crate) fn deadline(
        start: tokio::time::Instant,
        delay: Duration,
    ) -> Option<tokio::time::Instant> {
        start.checked_add(on_timer(delay))
    }

    /// Whether the fallback may start before the primary is rejected.
    #[inline]
    pub(crate) fn may_speculate(self) -> bool {
        !matches!(self, Plan::OnReject(_))
    }

    /// The reason a launch made now would be reported with.
    #[inline]
    pub(crate) fn reason(self, primary_pending: bool) -> Launched {
        match self {
            Plan::OnReject(why) => why,
            // A speculative plan overtaken by the primary's rejection.
            _ if !primary_pending => Launched::AfterRejection,
            Plan::Now => Launched::Concurrent,
            Plan::Wait(why) => why,
        }
    }
}

/// A launch delay as tokio's timer can honour it: rounded up to a whole millisecond.
///
/// The timer fires on millisecond ticks, rounding every deadline up to the next one, so
/// a deadline `start + 100 µs` fires anywhere from 100 µs to 1.1 ms after `start`,
/// depending on where `start` falls between ticks. Rounding the delay up first makes
/// the launch come between `D` and `D + 1 ms`: never before the delay that is reported
/// (`Adaptive::delay`, the docs), so a primary faster than `D` never speculates.
#[cfg(feature = "time")]
#[inline]
pub(crate) fn on_timer(delay: Duration) -> Duration {
    const TICK_NANOS: u32 = 1_000_000;
    let past_tick = delay.subsec_nanos() % TICK_NANOS;
    if past_tick == 0 {
        return delay;
    }
    delay
        .checked_add(Duration::from_nanos(u64::from(TICK_NANOS - past_tick)))
        .unwrap_or(Duration::MAX)
}

/// The timer a response future waits on: a launch delay, then the patience bound.
#[cfg(feature = "time")]
pub(crate) type Timer = tokio::time::Sleep;

/// Without the `time` feature nothing waits: the timer cannot exist.
#[cfg(not(feature = "time"))]
#[derive(Debug)]
pub(crate) enum Timer {}

#[cfg(not(feature = "time"))]
impl std::future::Future for Timer {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        match *self {}
    }
}

#[cfg(feature = "adaptive")]
pub(crate) mod adaptive;
