//! Random schedules of poll, answer and drop across the requests of one layer, checked
//! against a simple model of what every observer must say.
//!
//! Each case is a handful of requests on one layer, each called at some millisecond,
//! its response future polled at chosen moments only (no wake-up is honoured in
//! between, as when a task is busy elsewhere), then either dropped — before its first
//! poll, between polls, after its fallback's launch — or polled every millisecond until
//! it answers. The primary answers a few milliseconds after its first poll, a hit or a
//! miss; the fallback answers on the poll that calls it.
//!
//! The model says, per request: who served it and when (the first poll at or after the
//! primary's answer, unless the future was dropped first), its `elapsed` (to that poll,
//! or to the drop, whenever the future was last polled), whether it was `polled`, its
//! primary latency; and for the layer: the `Stats` counters, the budget's deposits (one
//! per request that ran) and withdrawals, and — under an adaptive launch — that
//! requests dropped unpolled teach the estimate nothing: the same schedule without them
//! ends with the same estimate.
//!
//! 2,000 cases by default; set `BACKSTOP_SCHEDULE_CASES` for more.

use proptest::{prelude::*, test_runner::Config};
use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc, Mutex,
    },
    task::{Context, Waker},
    time::Duration,
};
use tokio::time::Instant;
use tower::{service_fn, Service, ServiceExt};
use tower_backstop::{
    launch::Launch,
    outcome::{Outcome, Served, Snapshot, Stats, Verdict},
    Fallback,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One request's schedule; every time in whole milliseconds.
#[derive(Clone, Debug)]
struct Request {
    call_at: u64,
    /// When its future is polled, after the call: sorted, distinct.
    polls: Vec<u64>,
    /// When its future is dropped, after the call (after a poll due at the same time);
    /// `None`: after its last scheduled poll it is polled every millisecond until it
    /// answers.
    drop_at: Option<u64>,
    /// The primary answers this long after its first poll (never on it, so every
    /// primary call that ran was found pending and is timed, not sampled at random).
    latency: u64,
    hit: bool,
}

#[derive(Clone, Copy, Debug)]
enum Policy {
    Concurrent,
    Sequential,
    Delayed(u64),
    #[cfg(feature = "adaptive")]
    Adaptive,
}

#[derive(Clone, Debug)]
struct Schedule {
    requests: Vec<Request>,
    policy: Policy,
    budget: bool,
}

fn request() -> impl Strategy<Value = Request> {
    (
        0..8u64,
        proptest::collection::btree_set(0..12u64, 0..4),
        prop_oneof![Just(None), (0..16u64).prop_map(Some)],
        1..8u64,
        any::<bool>(),
    )
        .prop_map(|(call_at, polls, drop_at, latency, hit)| {
            let polls: Vec<u64> = polls.into_iter().collect();
            // A drop comes at or after the last scheduled poll.
            let drop_at = drop_at.map(|d| d.max(polls.last().copied().unwrap_or(0)));
            Request {
                call_at,
                polls,
                drop_at,
                latency,
                hit,
            }
        })
}

fn policy() -> BoxedStrategy<Policy> {
    let timed = prop_oneof![
        Just(Policy::Concurrent),
        Just(Policy::Sequential),
        (1..6u64).prop_map(Policy::Delayed),
    ];
    #[cfg(feature = "adaptive")]
    let timed = prop_oneof![timed, Just(Policy::Adaptive)];
    timed.boxed()
}

fn schedule() -> impl Strategy<Value = Schedule> {
    (
        proptest::collection::vec(request(), 1..8),
        policy(),
        any::<bool>(),
    )
        .prop_map(|(requests, policy, budget)| Schedule {
            requests,
            policy,
            budget: budget && cfg!(feature = "budget"),
        })
}

// ---------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------

/// What the observers must say of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Report {
    served: Served,
    primary: Verdict,
    elapsed: Duration,
    polled: bool,
    primary_latency: Option<Duration>,
}

impl From<&Outcome> for Report {
    fn from(o: &Outcome) -> Self {
        Report {
            served: o.served,
            primary: o.primary,
            elapsed: o.elapsed,
            polled: o.polled,
            primary_latency: o.primary_latency,
        }
    }
}

/// The polls a request's future gets, after its call, until `end`.
fn polls_until(r: &Request, end: u64) -> impl Iterator<Item = u64> + '_ {
    let last = r.polls.last().copied();
    let then = match r.drop_at {
        Some(_) => None,
        None => Some(last.map_or(0, |l| l + 1)..),
    };
    r.polls
        .iter()
        .copied()
        .chain(then.into_iter().flatten())
        .take_while(move |&p| p <= end)
}

/// What became of one request, by the model: its report, and whether it withdrew.
fn model_request(r: &Request, policy: Policy) -> (Report, bool) {
    let end = r.drop_at.unwrap_or(u64::MAX);
    let first = polls_until(r, end).next();
    let Some(first) = first else {
        let report = Report {
            served: Served::Abandoned,
            primary: Verdict::Pending,
            elapsed: ms(r.drop_at.expect("a request without a drop is polled")),
            polled: false,
            primary_latency: None,
        };
        return (report, false);
    };
    let answer = first + r.latency;
    let seen = polls_until(r, end).find(|&p| p >= answer);
    // A speculative launch withdraws, on a poll that finds the primary pending once
    // the launch delay (counted from the first poll) has passed.
    let withdraws = match policy {
        Policy::Concurrent => true,
        Policy::Sequential => false,
        Policy::Delayed(d) => polls_until(r, end)
            .take_while(|&p| p < answer)
            .any(|p| p >= first + d),
        #[cfg(feature = "adaptive")]
        Policy::Adaptive => false, // not modelled: the delay follows the estimate
    };
    let report = match seen {
        Some(at) => Report {
            served: if r.hit {
                Served::Primary
            } else {
                Served::Fallback
            },
            primary: if r.hit {
                Verdict::Accepted
            } else {
                Verdict::Rejected
            },
            elapsed: ms(at),
            polled: true,
            primary_latency: Some(ms(at)),
        },
        None => Report {
            served: Served::Abandoned,
            primary: Verdict::Pending,
            elapsed: ms(end),
            polled: true,
            primary_latency: None,
        },
    };
    (report, withdraws)
}

// ---------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------

/// What a run of the real layer said.
#[derive(Debug)]
struct Said {
    reports: Vec<Option<Report>>,
    snapshot: Snapshot,
    budget: (usize, usize),
    #[cfg_attr(not(feature = "adaptive"), allow(dead_code))]
    estimate: Option<Duration>,
}

#[cfg(feature = "budget")]
#[derive(Clone, Default)]
struct Counting(Arc<(AtomicUsize, AtomicUsize)>);

#[cfg(feature = "budget")]
impl tower::retry::budget::Budget for Counting {
    fn deposit(&self) {
        self.0 .0.fetch_add(1, SeqCst);
    }
    fn withdraw(&self) -> bool {
        self.0 .1.fetch_add(1, SeqCst);
        true
    }
}

fn run(s: &Schedule) -> Said {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(run_on_paused_clock(s))
}

type Answer = Result<Option<usize>, Infallible>;

async fn run_on_paused_clock(s: &Schedule) -> Said {
    let script: Arc<Vec<(u64, bool)>> =
        Arc::new(s.requests.iter().map(|r| (r.latency, r.hit)).collect());
    let primary = service_fn(move |i: usize| {
        let (latency, hit) = script[i];
        async move {
            tokio::time::sleep(ms(latency)).await;
            Ok::<_, Infallible>(hit.then_some(i))
        }
    });
    let fallback = service_fn(|i: usize| async move { Ok::<_, Infallible>(Some(1_000 + i)) });

    // The request being called, polled or dropped: the hook runs inside those.
    let current = Arc::new(AtomicUsize::new(usize::MAX));
    let reports = Arc::new(Mutex::new(vec![None; s.requests.len()]));
    let stats = Stats::new();
    #[cfg(feature = "adaptive")]
    let adaptive = tower_backstop::launch::Adaptive::new(0.5, ms(3))
        .window(8)
        .min_samples(2);
    let launch = match s.policy {
        Policy::Concurrent => Launch::Concurrent,
        Policy::Sequential => Launch::Sequential,
        Policy::Delayed(d) => Launch::Delayed(ms(d)),
        #[cfg(feature = "adaptive")]
        Policy::Adaptive => Launch::Adaptive(adaptive.clone()),
    };
    let mut svc = Fallback::new(primary, fallback)
        .accept(|r: &Answer| matches!(r, Ok(Some(_))))
        .launch(launch)
        .stats(stats.clone())
        .on_outcome({
            let (current, reports) = (current.clone(), reports.clone());
            move |o: &Outcome| {
                let i = current.load(SeqCst);
                let mut reports = reports.lock().unwrap();
                assert!(reports[i].is_none(), "request {i} reported twice");
                reports[i] = Some(Report::from(o));
            }
        });
    #[cfg(feature = "budget")]
    let counting = Counting::default();
    #[cfg(feature = "budget")]
    if s.budget {
        svc = svc.budget(counting.clone());
    }

    let origin = Instant::now();
    let mut futures: Vec<Option<Pin<Box<_>>>> = (0..s.requests.len()).map(|_| None).collect();
    let mut done = vec![false; s.requests.len()];
    let mut cx = Context::from_waker(Waker::noop());
    let mut now = 0;
    while done.iter().any(|d| !d) {
        assert!(now < 1_000, "a schedule never ended: {s:?}");
        tokio::time::sleep_until(origin + ms(now)).await;
        for (i, r) in s.requests.iter().enumerate() {
            if done[i] || now < r.call_at {
                continue;
            }
            current.store(i, SeqCst);
            let since_call = now - r.call_at;
            if now == r.call_at {
                let ready = ServiceExt::<usize>::ready(&mut svc).await.unwrap();
                futures[i] = Some(Box::pin(ready.call(i)));
            }
            let due = polls_until(r, since_call).last() == Some(since_call);
            if due {
                let fut = futures[i].as_mut().expect("alive until done");
                if fut.as_mut().poll(&mut cx).is_ready() {
                    futures[i] = None;
                    done[i] = true;
                    continue;
                }
            }
            if r.drop_at == Some(since_call) {
                futures[i] = None;
                done[i] = true;
            }
        }
        now += 1;
    }
    drop(svc);

    #[cfg(feature = "budget")]
    let budget = (counting.0 .0.load(SeqCst), counting.0 .1.load(SeqCst));
    #[cfg(not(feature = "budget"))]
    let budget = (0, 0);
    let reports = std::mem::take(&mut *reports.lock().unwrap());
    Said {
        reports,
        snapshot: stats.snapshot(),
        budget,
        #[cfg(feature = "adaptive")]
        estimate: adaptive.estimate(),
        #[cfg(not(feature = "adaptive"))]
        estimate: None,
    }
}

// ---------------------------------------------------------------------------------
// The property
// ---------------------------------------------------------------------------------

fn check(s: &Schedule) -> Result<(), TestCaseError> {
    let said = run(s);
    let modelled: Vec<(Report, bool)> = s
        .requests
        .iter()
        .map(|r| model_request(r, s.policy))
        .collect();
    for (i, (want, _)) in modelled.iter().enumerate() {
        prop_assert_eq!(said.reports[i].as_ref(), Some(want), "request {}", i);
    }

    let count = |f: &dyn Fn(&Report) -> bool| modelled.iter().filter(|(r, _)| f(r)).count() as u64;
    let snapshot = said.snapshot;
    prop_assert_eq!(snapshot.requests, s.requests.len() as u64);
    prop_assert_eq!(
        snapshot.served_by_primary,
        count(&|r| r.served == Served::Primary)
    );
    prop_assert_eq!(
        snapshot.served_by_fallback,
        count(&|r| r.served == Served::Fallback)
    );
    prop_assert_eq!(
        snapshot.abandoned,
        count(&|r| r.served == Served::Abandoned)
    );
    prop_assert_eq!(snapshot.abandoned_unpolled, count(&|r| !r.polled));

    if s.budget {
        let deposits = count(&|r| r.polled) as usize;
        prop_assert_eq!(said.budget.0, deposits, "deposits");
        #[cfg(feature = "adaptive")]
        let modelled_withdrawals = !matches!(s.policy, Policy::Adaptive);
        #[cfg(not(feature = "adaptive"))]
        let modelled_withdrawals = true;
        if modelled_withdrawals {
            let withdrawals = modelled.iter().filter(|(_, w)| *w).count();
            prop_assert_eq!(said.budget.1, withdrawals, "withdrawals");
        }
    }

    // Requests that never ran teach the estimate nothing: without them, the same.
    #[cfg(feature = "adaptive")]
    if matches!(s.policy, Policy::Adaptive) {
        let ran = Schedule {
            requests: s
                .requests
                .iter()
                .zip(&modelled)
                .filter(|(_, (report, _))| report.polled)
                .map(|(r, _)| r.clone())
                .collect(),
            ..s.clone()
        };
        let without = match ran.requests.is_empty() {
            true => None,
            false => run(&ran).estimate,
        };
        prop_assert_eq!(said.estimate, without, "estimate");
    }
    Ok(())
}

fn config() -> Config {
    let cases = std::env::var("BACKSTOP_SCHEDULE_CASES")
        .ok()
        .map(|v| v.parse().expect("BACKSTOP_SCHEDULE_CASES is a number"))
        .unwrap_or(2_000);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn observers_follow_the_model(s in schedule()) {
        check(&s)?;
    }
}

/// The schedules, always run: a drop long after the last poll, under each
/// policy; a drop before the first poll; a launch then a drop.
#[test]
fn the_reported_schedules() {
    let request = |polls: Vec<u64>, drop_at: Option<u64>| Request {
        call_at: 0,
        polls,
        drop_at,
        latency: 7,
        hit: true,
    };
    #[cfg_attr(not(feature = "adaptive"), allow(unused_mut))]
    let mut policies = vec![Policy::Concurrent, Policy::Sequential, Policy::Delayed(2)];
    #[cfg(feature = "adaptive")]
    policies.push(Policy::Adaptive);
    for policy in policies {
        for budget in [false, cfg!(feature = "budget")] {
            let s = Schedule {
                requests: vec![
                    request(vec![0], Some(6)),
                    request(vec![0, 3], Some(5)),
                    request(vec![], Some(4)),
                    request(vec![1], None),
                ],
                policy,
                budget,
            };
            check(&s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        }
    }
}
