//! Model-based tests of the response future's state machine.
//!
//! Each case is a random [`Schedule`] for one request: when each branch becomes ready
//! (or never, or — the fallback — fails to), when and what it answers, the primary's
//! verdict, the launch policy, eligibility, budget, patience, and when (if ever) the
//! caller drops the response future. The schedule is run twice:
//!
//! - through the real layer on a paused current-thread runtime, with scripted probes
//!   that log every readiness poll, call, completion and drop on the virtual clock, and
//!   panic on a call without readiness or a poll after completion ([`run`]);
//! - through [`model`], a pure function that derives the same log from the schedule and
//!   the documented contract alone.
//!
//! The two [`Trace`]s must be equal: what was served and at which millisecond, which
//! calls were made and when, what became of every branch future (completed or dropped,
//! exactly once, and when), what the predicate judged, what the budget was asked, that
//! no branch future or fallback clone is still alive when the response is handed back,
//! and — when an `on_outcome` hook is set — the one [`Outcome`] reported.
//!
//! 10,000 cases run by default (a few seconds); set `BACKSTOP_MODEL_CASES` for more.
//! Failing seeds are saved to `proptest-regressions/model.txt`, which is committed and
//! replayed before the random cases on every run.
//!
//! Ties are where state machines break, so times are drawn from small ranges and tie
//! often. All of them are whole milliseconds: tokio's timer rounds up to the next one.

use proptest::{
    prelude::*,
    test_runner::{Config, FileFailurePersistence},
};
use std::{
    future::Future,
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};
use tokio::time::{Instant, Sleep};
use tower::Service;
use tower_backstop::{
    launch::{Launch, Launched},
    outcome::{self, Outcome, Served, Verdict},
    Fallback,
};

/// A request nobody dropped is given up on here: far beyond every scheduled time.
const HORIZON: u64 = 1_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------------
// Schedules
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Primary,
    Fallback,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Answer {
    from: Side,
    value: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// A branch's call answered `Err`.
    Call(Side),
    /// The fallback's `poll_ready` answered `Err`.
    NotReady,
}

type Out = Result<Answer, Failure>;

/// What a branch's call answers.
#[derive(Clone, Copy, Debug)]
enum Reply {
    Hit(u64),
    Empty,
    Fail,
}

impl Reply {
    fn result(self, from: Side) -> Out {
        match self {
            Reply::Hit(v) => Ok(Answer {
                from,
                value: Some(v),
            }),
            Reply::Empty => Ok(Answer { from, value: None }),
            Reply::Fail => Err(Failure::Call(from)),
        }
    }
}

/// When a branch's `poll_ready` stops returning `Pending`: an absolute time in ms from
/// the start of the case, like capacity that frees up at that moment.
#[derive(Clone, Copy, Debug)]
enum Ready {
    At(u64),
    /// `Err` from this time on (only generated for the fallback).
    Fails(u64),
    /// `Pending` forever, without ever waking the task.
    Never,
}

/// How long a call takes, from the moment it is made.
#[derive(Clone, Copy, Debug)]
enum Latency {
    /// `Ready` on the first poll, with no timer involved.
    Immediate,
    After(u64),
    /// `Pending` forever, without ever waking the task.
    Never,
}

impl Latency {
    fn after(self, start: u64) -> Option<u64> {
        match self {
            Latency::Immediate => Some(start),
            Latency::After(k) => Some(start + k),
            Latency::Never => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Branch {
    ready: Ready,
    latency: Latency,
    reply: Reply,
}

#[derive(Clone, Copy, Debug)]
enum Policy {
    Concurrent,
    Sequential,
    Delayed(u64),
    /// The adaptive delay kept on its initial value (the estimate never warms up).
    #[cfg(feature = "adaptive")]
    Adaptive(u64),
}

#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "budget"), allow(dead_code))]
enum BudgetKind {
    /// A counting budget that allows every withdrawal.
    Allows,
    /// A counting budget that refuses every withdrawal.
    Refuses,
    /// tower's `TpsBudget` with a reserve: allows a request's one withdrawal.
    TpsReserve,
    /// tower's `TpsBudget` with no reserve and no deposit value: refuses.
    TpsEmpty,
}

impl BudgetKind {
    fn allows(self) -> bool {
        matches!(self, BudgetKind::Allows | BudgetKind::TpsReserve)
    }

    fn counts(self) -> bool {
        matches!(self, BudgetKind::Allows | BudgetKind::Refuses)
    }
}

#[derive(Clone, Debug)]
struct Schedule {
    primary: Branch,
    fallback: Branch,
    /// The accept predicate's verdict on the primary's answer, whatever it is.
    accept: bool,
    policy: Policy,
    /// What the `speculate_if` predicate says.
    eligible: bool,
    budget: Option<BudgetKind>,
    patience: Option<u64>,
    /// When the caller drops the response future, if it has not resolved by then.
    drop_at: Option<u64>,
    /// Whether an `on_outcome` hook is set (which switches the outcome tracking on).
    observed: bool,
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        2 => (0..100u64).prop_map(Reply::Hit),
        1 => Just(Reply::Empty),
        1 => Just(Reply::Fail),
    ]
}

fn latency() -> impl Strategy<Value = Latency> {
    prop_oneof![
        2 => Just(Latency::Immediate),
        8 => (1..=12u64).prop_map(Latency::After),
        1 => Just(Latency::Never),
    ]
}

fn primary() -> impl Strategy<Value = Branch> {
    let ready = prop_oneof![
        12 => Just(Ready::At(0)),
        6 => (1..=5u64).prop_map(Ready::At),
        1 => Just(Ready::Never),
    ];
    (ready, latency(), reply()).prop_map(|(ready, latency, reply)| Branch {
        ready,
        latency,
        reply,
    })
}

fn fallback() -> impl Strategy<Value = Branch> {
    let ready = prop_oneof![
        5 => Just(Ready::At(0)),
        3 => (1..=15u64).prop_map(Ready::At),
        1 => (0..=15u64).prop_map(Ready::Fails),
        1 => Just(Ready::Never),
    ];
    (ready, latency(), reply()).prop_map(|(ready, latency, reply)| Branch {
        ready,
        latency,
        reply,
    })
}

fn policy() -> impl Strategy<Value = Policy> {
    let policy = prop_oneof![
        3 => Just(Policy::Concurrent),
        1 => Just(Policy::Sequential),
        3 => (0..=10u64).prop_map(Policy::Delayed),
    ];
    #[cfg(feature = "adaptive")]
    let policy = prop_oneof![6 => policy, 1 => (0..=10u64).prop_map(Policy::Adaptive)];
    policy
}

fn budget() -> BoxedStrategy<Option<BudgetKind>> {
    #[cfg(feature = "budget")]
    return prop_oneof![
        4 => Just(None),
        1 => Just(Some(BudgetKind::Allows)),
        1 => Just(Some(BudgetKind::Refuses)),
        1 => Just(Some(BudgetKind::TpsReserve)),
        1 => Just(Some(BudgetKind::TpsEmpty)),
    ]
    .boxed();
    #[cfg(not(feature = "budget"))]
    Just(None).boxed()
}

fn schedule() -> impl Strategy<Value = Schedule> {
    (
        primary(),
        fallback(),
        any::<bool>(),
        policy(),
        prop::bool::weighted(0.8),
        budget(),
        prop::option::of(0..=10u64),
        prop::option::weighted(0.3, 0..=25u64),
        any::<bool>(),
    )
        .prop_map(
            |(primary, fallback, accept, policy, eligible, budget, patience, drop_at, observed)| {
                Schedule {
                    primary,
                    fallback,
                    accept,
                    policy,
                    eligible,
                    budget,
                    patience,
                    drop_at,
                    observed,
                }
            },
        )
}

// ---------------------------------------------------------------------------------
// Traces
// ---------------------------------------------------------------------------------

/// What became of one branch future.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Polled to `Ready` at this time.
    Completed(u64),
    /// Dropped unfinished at this time.
    Dropped(u64),
}

#[derive(Debug, Default, PartialEq, Eq)]
struct BranchTrace {
    /// When readiness was first asked for.
    first_ready_poll: Option<u64>,
    /// When each call was made.
    calls: Vec<u64>,
    /// One entry per call, in order.
    fates: Vec<Fate>,
}

#[derive(Debug, PartialEq, Eq)]
struct Trace {
    /// When and what the response future resolved to; `None` if the caller dropped it.
    served: Option<(u64, Out)>,
    primary: BranchTrace,
    fallback: BranchTrace,
    /// Every result the accept predicate was asked about.
    judged: Vec<Out>,
    /// Deposits and withdrawals, for the counting budgets.
    budget: Option<(usize, usize)>,
    /// When the response future resolved (still alive) or was dropped: branch futures
    /// of the primary and of the fallback still alive, and fallback clones alive.
    live_at_end: (usize, usize, usize),
    /// What the `on_outcome` hook was told, if set.
    outcomes: Vec<Report>,
}

/// An [`Outcome`], with times in whole milliseconds.
#[derive(Debug, PartialEq, Eq)]
struct Report {
    served: Served,
    primary: Verdict,
    fallback: outcome::Fate,
    launched: Option<Launched>,
    budget_refused: bool,
    fallback_first: bool,
    primary_latency: Option<u64>,
    fallback_latency: Option<u64>,
    elapsed: u64,
}

impl From<&Outcome> for Report {
    fn from(o: &Outcome) -> Self {
        let whole = |d: Duration| {
            assert_eq!(d.subsec_nanos() % 1_000_000, 0, "{d:?}");
            u64::try_from(d.as_millis()).unwrap()
        };
        Report {
            served: o.served,
            primary: o.primary,
            fallback: o.fallback,
            launched: o.launched,
            budget_refused: o.budget_refused,
            fallback_first: o.fallback_first,
            primary_latency: o.primary_latency.map(whole),
            fallback_latency: o.fallback_latency.map(whole),
            elapsed: whole(o.elapsed),
        }
    }
}

// ---------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------

/// The fallback's life once launched at `launch`: when it is called (if readiness
/// comes), and when and what it answers (a readiness error is an answer, with no call).
struct Timeline {
    call_at: Option<u64>,
    answer: Option<(u64, Out)>,
}

fn timeline(fallback: &Branch, launch: u64) -> Timeline {
    match fallback.ready {
        Ready::Never => Timeline {
            call_at: None,
            answer: None,
        },
        Ready::Fails(at) => Timeline {
            call_at: None,
            answer: Some((launch.max(at), Err(Failure::NotReady))),
        },
        Ready::At(at) => {
            let call = launch.max(at);
            Timeline {
                call_at: Some(call),
                answer: fallback
                    .latency
                    .after(call)
                    .map(|t| (t, fallback.reply.result(Side::Fallback))),
            }
        }
    }
}

/// The contract, from the schedule alone:
///
/// - The request is called when the primary is ready; the caller drops the response
///   future at `drop_at`, after everything due at that very millisecond has happened.
/// - The fallback launches speculatively when the policy says (at the call, after the
///   delay, or never), if the request is eligible, the primary is still pending and the
///   budget allows it; otherwise it launches when the primary is rejected.
/// - A launched fallback is called once readiness comes; a readiness error is its
///   answer.
/// - Within one millisecond the primary is looked at first: it wins every tie.
/// - An accepted primary answer is served at once and the fallback dropped; a rejected
///   one is replaced by the fallback's answer, held if it came first.
/// - A successful fallback answer held while the primary is pending waits `patience`,
///   then is served and the primary dropped.
/// - One outcome is reported per call, saying just that.
fn model(s: &Schedule) -> Trace {
    let end = s.drop_at.unwrap_or(HORIZON);
    let counting = s.budget.filter(|b| b.counts()).map(|_| (0, 0));
    let mut trace = Trace {
        served: None,
        primary: BranchTrace {
            first_ready_poll: Some(0),
            ..BranchTrace::default()
        },
        fallback: BranchTrace::default(),
        judged: Vec::new(),
        budget: counting,
        live_at_end: (0, 0, 1),
        outcomes: Vec::new(),
    };

    let call = match s.primary.ready {
        Ready::At(at) if at <= end => at,
        _ => return trace,
    };
    trace.primary.calls.push(call);
    if let Some((deposits, _)) = &mut trace.budget {
        *deposits += 1;
    }
    let answer = s.primary.latency.after(call);
    let pending_at = |t: u64| answer.is_none_or(|a| t < a);

    // The speculative launch.
    let planned = match (s.eligible, s.policy) {
        (false, _) | (_, Policy::Sequential) => None,
        (true, Policy::Concurrent) => Some(call),
        (true, Policy::Delayed(d)) => Some(call + d),
        #[cfg(feature = "adaptive")]
        (true, Policy::Adaptive(d)) => Some(call + d),
    };
    let mut launch = None;
    let mut refused = false;
    if let Some(at) = planned.filter(|&at| at <= end && pending_at(at)) {
        if let Some((_, withdrawals)) = &mut trace.budget {
            *withdrawals += 1;
        }
        if s.budget.is_none_or(|b| b.allows()) {
            launch = Some(at);
        } else {
            refused = true;
        }
    }
    let speculative = launch.is_some();
    // A fallback answer that comes while the primary is pending is held.
    let held = launch
        .and_then(|at| timeline(&s.fallback, at).answer)
        .filter(|&(at, _)| at <= end && pending_at(at));
    // ...and, if it is a success, waits at most `patience` for the primary.
    let cut = match (held, s.patience) {
        (Some((at, Ok(_))), Some(p)) if pending_at(at + p) => Some(at + p),
        _ => None,
    };

    // Whether the primary's answer was judged, and accepted; and when.
    let mut judged_at = None;
    let mut accepted_at = None;
    if let Some(cut) = cut.filter(|&c| c <= end) {
        trace.served = held.map(|(_, result)| (cut, result));
        trace.primary.fates.push(Fate::Dropped(cut));
    } else if let Some(at) = answer.filter(|&a| a <= end) {
        let result = s.primary.reply.result(Side::Primary);
        trace.judged.push(result);
        judged_at = Some(at);
        trace.primary.fates.push(Fate::Completed(at));
        if s.accept {
            trace.served = Some((at, result));
            accepted_at = Some(at);
        } else if let Some((_, result)) = held {
            trace.served = Some((at, result));
        } else {
            // Launched now if it was not yet; whenever it was, its answer is served.
            let launched = *launch.get_or_insert(at);
            trace.served = timeline(&s.fallback, launched)
                .answer
                .filter(|&(t, _)| t <= end);
        }
    } else {
        trace.primary.fates.push(Fate::Dropped(end));
    }

    // The fallback's calls and fate: it runs until an accepted primary answer (which,
    // being looked at first, beats anything due at the same millisecond) or until the
    // response is served or dropped (everything due at that millisecond happens).
    let finished = trace.served.map_or(end, |(at, _)| at);
    let alive_at = |t: u64| accepted_at.map_or(t <= finished, |a| t < a);
    // When the fallback's answer (or readiness error) was seen, if it was.
    let mut fallback_answered = None;
    if let Some(launched) = launch {
        trace.fallback.first_ready_poll = Some(launched);
        let tl = timeline(&s.fallback, launched);
        fallback_answered = tl.answer.map(|(at, _)| at).filter(|&at| alive_at(at));
        if let Some(call) = tl.call_at.filter(|&t| alive_at(t)) {
            trace.fallback.calls.push(call);
            trace.fallback.fates.push(match fallback_answered {
                Some(at) => Fate::Completed(at),
                None => Fate::Dropped(accepted_at.unwrap_or(finished)),
            });
        }
    }

    if s.observed {
        let served = match (accepted_at, trace.served) {
            (Some(_), _) => Served::Primary,
            (None, Some(_)) => Served::Fallback,
            (None, None) => Served::Abandoned,
        };
        let launched = launch.map(|_| match (speculative, s.policy) {
            (true, Policy::Concurrent) => Launched::Concurrent,
            (true, Policy::Delayed(_)) => Launched::Delayed,
            #[cfg(feature = "adaptive")]
            (true, Policy::Adaptive(_)) => Launched::Adaptive,
            (true, Policy::Sequential) => unreachable!("sequential never speculates"),
            (false, p) if !s.eligible && !matches!(p, Policy::Sequential) => Launched::NotEligible,
            (false, _) if refused => Launched::BudgetRefused,
            (false, _) => Launched::AfterRejection,
        });
        trace.outcomes.push(Report {
            served,
            primary: match (judged_at, accepted_at) {
                (_, Some(_)) => Verdict::Accepted,
                (Some(_), None) => Verdict::Rejected,
                (None, None) => Verdict::Pending,
            },
            fallback: match (served, launch, fallback_answered) {
                (Served::Fallback, _, _) => outcome::Fate::Served,
                (_, None, _) => outcome::Fate::NotLaunched,
                // A readiness error answered without a call: no work was done.
                (_, Some(_), Some(_)) if trace.fallback.calls.is_empty() => {
                    outcome::Fate::ReadinessFailed
                }
                (_, Some(_), Some(_)) => outcome::Fate::Discarded,
                _ if trace.fallback.calls.is_empty() => outcome::Fate::DroppedBeforeReady,
                _ => outcome::Fate::DroppedInFlight,
            },
            launched,
            budget_refused: refused,
            fallback_first: held.is_some() && !trace.fallback.calls.is_empty(),
            primary_latency: judged_at.map(|at| at - call),
            fallback_latency: fallback_answered.zip(launch).map(|(at, l)| at - l),
            elapsed: finished - call,
        });
    }
    trace
}

// ---------------------------------------------------------------------------------
// The real layer, with probes
// ---------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Log {
    first_ready_poll: Option<u64>,
    calls: Vec<u64>,
    fates: Vec<Fate>,
    clones: usize,
}

type SharedLog = Arc<Mutex<Log>>;

/// Milliseconds since `origin`, checked to be whole.
fn since(origin: Instant) -> u64 {
    let elapsed = Instant::now() - origin;
    assert_eq!(elapsed.subsec_nanos() % 1_000_000, 0, "{elapsed:?}");
    u64::try_from(elapsed.as_millis()).unwrap()
}

/// A scripted branch service that logs everything that happens to it.
struct Probe {
    side: Side,
    script: Branch,
    origin: Instant,
    log: SharedLog,
    /// `poll_ready` returned `Ready(Ok)` and no call has consumed it yet.
    readied: bool,
    wake_when_ready: Option<Pin<Box<Sleep>>>,
}

impl Probe {
    fn new(side: Side, script: Branch, origin: Instant) -> (Self, SharedLog) {
        let log = SharedLog::default();
        log.lock().unwrap().clones = 1;
        let probe = Probe {
            side,
            script,
            origin,
            log: log.clone(),
            readied: false,
            wake_when_ready: None,
        };
        (probe, log)
    }
}

impl Clone for Probe {
    fn clone(&self) -> Self {
        self.log.lock().unwrap().clones += 1;
        Probe {
            side: self.side,
            script: self.script,
            origin: self.origin,
            log: self.log.clone(),
            readied: false,
            wake_when_ready: None,
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.log.lock().unwrap().clones -= 1;
    }
}

impl Service<u64> for Probe {
    type Response = Answer;
    type Error = Failure;
    type Future = ProbeFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        let now = since(self.origin);
        self.log.lock().unwrap().first_ready_poll.get_or_insert(now);
        let (at, fails) = match self.script.ready {
            Ready::At(at) => (at, false),
            Ready::Fails(at) => (at, true),
            Ready::Never => return Poll::Pending,
        };
        if now < at {
            let origin = self.origin;
            let wake = self
                .wake_when_ready
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(origin + ms(at))));
            // Registers the waker for `at`; not due before then.
            let _ = wake.as_mut().poll(cx);
            return Poll::Pending;
        }
        if fails {
            return Poll::Ready(Err(Failure::NotReady));
        }
        self.readied = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _key: u64) -> ProbeFuture {
        assert!(
            std::mem::take(&mut self.readied),
            "{:?} called without `poll_ready` returning `Ready(Ok)`",
            self.side
        );
        self.log.lock().unwrap().calls.push(since(self.origin));
        ProbeFuture {
            side: self.side,
            sleep: match self.script.latency {
                Latency::After(k) => Some(Box::pin(tokio::time::sleep(ms(k)))),
                Latency::Immediate | Latency::Never => None,
            },
            script: self.script,
            origin: self.origin,
            log: self.log.clone(),
            done: false,
        }
    }
}

/// A call in flight: logs its completion, or its drop if it never completed, and
/// panics if polled after completion.
struct ProbeFuture {
    side: Side,
    script: Branch,
    sleep: Option<Pin<Box<Sleep>>>,
    origin: Instant,
    log: SharedLog,
    done: bool,
}

impl Future for ProbeFuture {
    type Output = Out;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Out> {
        assert!(!self.done, "{:?} future polled after completion", self.side);
        match self.script.latency {
            Latency::Immediate => {}
            Latency::After(_) => {
                let sleep = self.sleep.as_mut().expect("set at the call");
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            Latency::Never => return Poll::Pending,
        }
        self.done = true;
        let now = since(self.origin);
        self.log.lock().unwrap().fates.push(Fate::Completed(now));
        Poll::Ready(self.script.reply.result(self.side))
    }
}

impl Drop for ProbeFuture {
    fn drop(&mut self) {
        if !self.done {
            let now = since(self.origin);
            self.log.lock().unwrap().fates.push(Fate::Dropped(now));
        }
    }
}

#[cfg(feature = "budget")]
mod counting {
    use std::sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc,
    };

    /// A deterministic budget that counts what it is asked.
    pub(crate) struct Counting {
        pub(crate) allow: bool,
        pub(crate) tally: Arc<(AtomicUsize, AtomicUsize)>,
    }

    impl tower::retry::budget::Budget for Counting {
        fn deposit(&self) {
            self.tally.0.fetch_add(1, SeqCst);
        }

        fn withdraw(&self) -> bool {
            self.tally.1.fetch_add(1, SeqCst);
            self.allow
        }
    }
}

/// Runs the schedule through the real layer on a fresh paused runtime.
fn run(s: &Schedule) -> Trace {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(run_on_paused_clock(s))
}

async fn run_on_paused_clock(s: &Schedule) -> Trace {
    let origin = Instant::now();
    let (primary, primary_log) = Probe::new(Side::Primary, s.primary, origin);
    let (fallback, fallback_log) = Probe::new(Side::Fallback, s.fallback, origin);
    let judged = Arc::new(Mutex::new(Vec::new()));
    let verdict = s.accept;
    let accept = {
        let judged = judged.clone();
        move |result: &Out| {
            judged.lock().unwrap().push(*result);
            verdict
        }
    };
    let eligible = s.eligible;
    let launch = match s.policy {
        Policy::Concurrent => Launch::Concurrent,
        Policy::Sequential => Launch::Sequential,
        Policy::Delayed(d) => Launch::Delayed(ms(d)),
        #[cfg(feature = "adaptive")]
        Policy::Adaptive(d) => Launch::Adaptive(
            tower_backstop::launch::Adaptive::new(0.9, ms(d)).min_samples(u64::MAX),
        ),
    };
    let mut svc = Fallback::new(primary, fallback)
        .accept(accept)
        .speculate_if(move |_: &u64| eligible)
        .launch(launch);
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    if s.observed {
        let outcomes = outcomes.clone();
        svc = svc.on_outcome(move |o: &Outcome| outcomes.lock().unwrap().push(Report::from(o)));
    }
    if let Some(p) = s.patience {
        svc = svc.patience(ms(p));
    }
    let tally = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    #[cfg(feature = "budget")]
    if let Some(kind) = s.budget {
        use tower::retry::budget::TpsBudget;
        let tally = tally.clone();
        svc = match kind {
            BudgetKind::Allows => svc.budget(counting::Counting { allow: true, tally }),
            BudgetKind::Refuses => svc.budget(counting::Counting {
                allow: false,
                tally,
            }),
            BudgetKind::TpsReserve => svc.budget(TpsBudget::new(Duration::from_secs(10), 1, 0.0)),
            BudgetKind::TpsEmpty => svc.budget(TpsBudget::new(Duration::from_secs(10), 0, 0.0)),
        };
    }
    #[cfg(not(feature = "budget"))]
    assert!(s.budget.is_none());

    let mut give_up = pin!(tokio::time::sleep_until(
        origin + ms(s.drop_at.unwrap_or(HORIZON))
    ));
    // The caller: anything due at the give-up time itself still happens first.
    let ready = std::future::poll_fn(|cx| match svc.poll_ready(cx) {
        Poll::Ready(ready) => Poll::Ready(Some(ready)),
        Poll::Pending => give_up.as_mut().poll(cx).map(|()| None),
    })
    .await;
    let mut served = None;
    let live_at_end;
    if let Some(ready) = ready {
        ready.expect("the primary's readiness never fails");
        // Boxed, so that dropping it below drops the future itself.
        let mut fut = Box::pin(svc.call(1));
        let result = std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
            Poll::Ready(result) => Poll::Ready(Some(result)),
            Poll::Pending => give_up.as_mut().poll(cx).map(|()| None),
        })
        .await;
        served = result.map(|result| (since(origin), result));
        // The response future is still alive here, resolved or not: whatever it no
        // longer needs must already be gone.
        if served.is_some() {
            live_at_end = live(&primary_log, &fallback_log);
        } else {
            drop(fut);
            live_at_end = live(&primary_log, &fallback_log);
        }
    } else {
        live_at_end = live(&primary_log, &fallback_log);
    }
    drop(svc);
    assert_eq!(
        fallback_log.lock().unwrap().clones,
        0,
        "a fallback clone leaked"
    );

    let branch = |log: &SharedLog| {
        let mut log = log.lock().unwrap();
        BranchTrace {
            first_ready_poll: log.first_ready_poll,
            calls: std::mem::take(&mut log.calls),
            fates: std::mem::take(&mut log.fates),
        }
    };
    let judged = std::mem::take(&mut *judged.lock().unwrap());
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    Trace {
        served,
        primary: branch(&primary_log),
        fallback: branch(&fallback_log),
        judged,
        budget: s
            .budget
            .filter(|b| b.counts())
            .map(|_| (tally.0.load(SeqCst), tally.1.load(SeqCst))),
        live_at_end,
        outcomes,
    }
}

/// Branch futures alive (called, neither completed nor dropped) and fallback clones.
fn live(primary: &SharedLog, fallback: &SharedLog) -> (usize, usize, usize) {
    let in_flight = |log: &SharedLog| {
        let log = log.lock().unwrap();
        log.calls.len() - log.fates.len()
    };
    (
        in_flight(primary),
        in_flight(fallback),
        fallback.lock().unwrap().clones,
    )
}

// ---------------------------------------------------------------------------------
// The property
// ---------------------------------------------------------------------------------

fn config() -> Config {
    let cases = std::env::var("BACKSTOP_MODEL_CASES")
        .ok()
        .map(|v| v.parse().expect("BACKSTOP_MODEL_CASES is a number"))
        .unwrap_or(10_000);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/model.txt"
        )))),
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_layer_follows_the_model(s in schedule()) {
        let expected = model(&s);
        let actual = run(&s);
        prop_assert_eq!(actual, expected);
    }
}

/// The generator must reach every situation the model distinguishes, ties included,
/// or the property above would pass without testing them. Runs the model only.
#[test]
fn the_schedules_reach_every_situation() {
    use proptest::{strategy::ValueTree, test_runner::TestRunner};

    const N: usize = 10_000;
    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..N {
        let s = schedule().new_tree(&mut runner).unwrap().current();
        let t = model(&s);
        let answer = match (s.primary.ready, t.primary.calls.first()) {
            (_, Some(&call)) => s.primary.latency.after(call),
            _ => None,
        };
        let fallback_answer = t.fallback.fates.first().map(|f| match f {
            Fate::Completed(at) | Fate::Dropped(at) => *at,
        });
        let mut saw = |what: &str| *seen.entry(what.to_string()).or_default() += 1;
        for report in &t.outcomes {
            saw(&format!("outcome {:?}", report.fallback));
            if let Some(launched) = report.launched {
                saw(&format!("outcome {launched:?}"));
            }
        }
        match t.served {
            None if t.primary.calls.is_empty() => saw("never called"),
            None => saw("dropped by the caller"),
            Some((
                _,
                Ok(Answer {
                    from: Side::Primary,
                    ..
                })
                | Err(Failure::Call(Side::Primary)),
            )) => saw("primary served"),
            Some((_, Err(Failure::NotReady))) => saw("readiness error served"),
            Some((at, _)) if t.primary.fates == [Fate::Dropped(at)] => saw("patience cut"),
            Some((at, _)) if Some(at) == answer => saw("held fallback answer served"),
            Some(_) => saw("fallback served after the rejection"),
        }
        if let (Some((at, _)), Some(drop_at)) = (t.served, s.drop_at) {
            if at == drop_at {
                saw("served at the drop time");
            }
        }
        if t.fallback
            .fates
            .iter()
            .any(|f| matches!(f, Fate::Dropped(_)))
        {
            saw("fallback call dropped");
        }
        if answer.is_some() && answer == fallback_answer && !t.fallback.calls.is_empty() {
            saw("primary and fallback due at once");
        }
        match (s.budget, t.budget) {
            (Some(BudgetKind::Allows), Some((1, 1))) => saw("budget allowed"),
            (Some(BudgetKind::Refuses), Some((1, 1))) => saw("budget refused"),
            _ => {}
        }
        let fallback_ok = !matches!(s.fallback.reply, Reply::Fail);
        if let (Some(_), true, Some((at, _)), [Fate::Completed(f)]) =
            (s.patience, fallback_ok, t.served, &t.fallback.fates[..])
        {
            if Some(at) == answer && *f < at {
                saw("patience waited out by the primary");
            }
        }
        if let (Some(first), Some(&call)) = (t.fallback.first_ready_poll, t.primary.calls.first()) {
            if first > call && answer.is_none_or(|a| first < a) {
                saw("delayed speculative launch");
            }
        }
        if t.fallback.first_ready_poll.is_some() && t.fallback.calls.is_empty() {
            saw("fallback launched, never called");
        }
    }
    println!("{seen:#?}");
    #[allow(unused_mut)]
    let mut expected = vec![
        "dropped by the caller",
        "fallback call dropped",
        "fallback launched, never called",
        "fallback served after the rejection",
        "held fallback answer served",
        "never called",
        "patience cut",
        "patience waited out by the primary",
        "primary and fallback due at once",
        "primary served",
        "readiness error served",
        "served at the drop time",
        "delayed speculative launch",
    ];
    expected.extend([
        "outcome NotLaunched",
        "outcome DroppedBeforeReady",
        "outcome DroppedInFlight",
        "outcome Discarded",
        "outcome ReadinessFailed",
        "outcome Served",
        "outcome Concurrent",
        "outcome Delayed",
        "outcome AfterRejection",
        "outcome NotEligible",
    ]);
    #[cfg(feature = "adaptive")]
    expected.push("outcome Adaptive");
    #[cfg(feature = "budget")]
    expected.extend(["budget allowed", "budget refused", "outcome BudgetRefused"]);
    for what in expected {
        let count = seen.get(what).copied().unwrap_or(0);
        assert!(count >= N / 200, "{what}: only {count} of {N}");
    }
}

/// Fixed schedules: the smallest ones that told deliberately broken copies of
/// `src/future.rs` and `src/launch.rs` from the real ones, and the tie rules. Kept so that
/// each stays checked whatever the generator does.
#[test]
fn regressions() {
    let branch = |ready, latency, reply| Branch {
        ready,
        latency,
        reply,
    };
    let at_once = branch(Ready::At(0), Latency::Immediate, Reply::Hit(1));
    let after = |k| branch(Ready::At(0), Latency::After(k), Reply::Hit(2));
    let hung = branch(Ready::At(0), Latency::Never, Reply::Hit(2));
    let base = |primary, policy| Schedule {
        primary,
        fallback: at_once,
        accept: false,
        policy,
        eligible: true,
        budget: None,
        patience: None,
        drop_at: None,
        observed: true,
    };
    #[allow(unused_mut)]
    let mut cases = vec![
        // An accepted primary drops the fallback (here, its unasked readiness) at once.
        Schedule {
            accept: true,
            eligible: false,
            ..base(at_once, Policy::Concurrent)
        },
        // The predicate is asked exactly once, and its verdict stands.
        base(at_once, Policy::Concurrent),
        // The patience cut drops the primary at once; it follows successes only.
        Schedule {
            patience: Some(0),
            ..base(hung, Policy::Concurrent)
        },
        Schedule {
            fallback: branch(Ready::At(0), Latency::Immediate, Reply::Fail),
            patience: Some(0),
            ..base(hung, Policy::Delayed(0))
        },
        // Patience is exact.
        Schedule {
            patience: Some(0),
            ..base(after(8), Policy::Concurrent)
        },
        Schedule {
            patience: Some(3),
            ..base(after(8), Policy::Concurrent)
        },
        // A readiness error, like an answer, is held until the primary's verdict.
        Schedule {
            fallback: branch(Ready::Fails(0), Latency::Immediate, Reply::Hit(1)),
            ..base(after(7), Policy::Concurrent)
        },
        base(after(5), Policy::Delayed(0)),
        // Launches are on time: concurrent at once, delayed after the delay, ineligible
        // requests only on rejection.
        base(after(1), Policy::Concurrent),
        base(after(2), Policy::Delayed(0)),
        base(after(5), Policy::Delayed(3)),
        Schedule {
            eligible: false,
            ..base(after(1), Policy::Concurrent)
        },
        // Ties: the primary is looked at first, and an answer due when the caller gives
        // up is still served.
        Schedule {
            fallback: after(4),
            accept: true,
            ..base(after(4), Policy::Concurrent)
        },
        Schedule {
            fallback: after(4),
            ..base(after(4), Policy::Concurrent)
        },
        Schedule {
            accept: true,
            drop_at: Some(4),
            ..base(after(4), Policy::Concurrent)
        },
    ];
    #[cfg(feature = "budget")]
    cases.extend([
        // The budget is asked for delayed launches too...
        Schedule {
            budget: Some(BudgetKind::Allows),
            ..base(after(8), Policy::Delayed(0))
        },
        // ...once per request: a refusal makes the request sequential...
        Schedule {
            budget: Some(BudgetKind::Refuses),
            drop_at: Some(1),
            ..base(after(8), Policy::Concurrent)
        },
        // ...and nothing launches before the rejection.
        Schedule {
            budget: Some(BudgetKind::TpsEmpty),
            ..base(after(1), Policy::Concurrent)
        },
    ]);
    for s in cases {
        assert_eq!(run(&s), model(&s), "{s:#?}");
    }
}
