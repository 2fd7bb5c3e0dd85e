//! Outcomes: every fate of the fallback and every launch reason is reported, abandoned
//! requests too, with exact latencies on tokio's paused clock; the shared counters add
//! up across clones.

mod support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use support::{hit, Outcomes, Probe, Reply};
use tower::{Service, ServiceExt};
use tower_backstop::{
    launch::{Launch, Launched},
    outcome::{Fate, Outcome, Served, Snapshot, Stats, Verdict},
    Fallback,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Runs one request through `cache` and `db` under `launch` and returns its outcome.
async fn outcome_of(cache: Probe, db: Probe, launch: Launch) -> Outcome {
    let outcomes = Outcomes::default();
    let svc = Fallback::new(cache, db)
        .accept(hit)
        .launch(launch)
        .on_outcome(outcomes.hook());
    let _ = svc.oneshot(1).await;
    outcomes.only()
}

#[tokio::test(start_paused = true)]
async fn hit_with_the_fallback_dropped_in_flight() {
    let o = outcome_of(
        Probe::fixed("cache", 2, Reply::Value(1)),
        Probe::fixed("db", 10, Reply::Value(2)),
        Launch::Concurrent,
    )
    .await;
    assert_eq!(o.served, Served::Primary);
    assert_eq!(o.primary, Verdict::Accepted);
    assert_eq!(o.fallback, Fate::DroppedInFlight);
    assert_eq!(o.launched, Some(Launched::Concurrent));
    assert_eq!((o.primary_latency, o.fallback_latency), (Some(ms(2)), None));
    assert_eq!(o.elapsed, ms(2));
    assert!(!o.fallback_first && !o.budget_refused);
}

#[tokio::test(start_paused = true)]
async fn hit_after_the_fallback_finished_is_wasted_work() {
    let o = outcome_of(
        Probe::fixed("cache", 12, Reply::Value(1)),
        Probe::fixed("db", 5, Reply::Value(2)),
        Launch::Concurrent,
    )
    .await;
    assert_eq!((o.served, o.fallback), (Served::Primary, Fate::Discarded));
    assert_eq!(
        (o.primary_latency, o.fallback_latency),
        (Some(ms(12)), Some(ms(5)))
    );
    assert!(o.fallback_first);
}

#[tokio::test(start_paused = true)]
async fn hit_before_the_delay_never_launches() {
    let o = outcome_of(
        Probe::fixed("cache", 3, Reply::Value(1)),
        Probe::fixed("db", 5, Reply::Value(2)),
        Launch::Delayed(ms(5)),
    )
    .await;
    assert_eq!(
        (o.served, o.fallback, o.launched),
        (Served::Primary, Fate::NotLaunched, None)
    );
}

#[tokio::test(start_paused = true)]
async fn hit_while_the_fallback_waits_for_readiness() {
    let o = outcome_of(
        Probe::fixed("cache", 3, Reply::Value(1)),
        Probe::fixed("db", 5, Reply::Value(2)).never_ready(),
        Launch::Concurrent,
    )
    .await;
    assert_eq!(
        (o.served, o.fallback),
        (Served::Primary, Fate::DroppedBeforeReady)
    );
    assert_eq!(o.launched, Some(Launched::Concurrent));
}

#[tokio::test(start_paused = true)]
async fn miss_served_by_the_fallback() {
    let o = outcome_of(
        Probe::fixed("cache", 3, Reply::Empty),
        Probe::fixed("db", 10, Reply::Value(2)),
        Launch::Concurrent,
    )
    .await;
    assert_eq!(o.served, Served::Fallback);
    assert_eq!((o.primary, o.fallback), (Verdict::Rejected, Fate::Served));
    assert_eq!(
        (o.primary_latency, o.fallback_latency),
        (Some(ms(3)), Some(ms(10)))
    );
    assert_eq!(o.elapsed, ms(10));
    assert!(!o.fallback_first);
}

#[tokio::test(start_paused = true)]
async fn launch_reasons() {
    let miss = || Probe::fixed("cache", 6, Reply::Empty);
    let db = || Probe::fixed("db", 10, Reply::Value(2));

    let o = outcome_of(miss(), db(), Launch::Delayed(ms(4))).await;
    assert_eq!(o.launched, Some(Launched::Delayed));
    assert_eq!((o.fallback_latency, o.elapsed), (Some(ms(10)), ms(14)));

    let o = outcome_of(miss(), db(), Launch::Delayed(ms(8))).await;
    assert_eq!(
        o.launched,
        Some(Launched::AfterRejection),
        "rejected before the delay"
    );

    let o = outcome_of(miss(), db(), Launch::Sequential).await;
    assert_eq!(o.launched, Some(Launched::AfterRejection));
    assert_eq!((o.fallback_latency, o.elapsed), (Some(ms(10)), ms(16)));

    let outcomes = Outcomes::default();
    let svc = Fallback::new(miss(), db())
        .accept(hit)
        .speculate_if(|_: &u64| false)
        .on_outcome(outcomes.hook());
    svc.oneshot(1).await.unwrap();
    assert_eq!(outcomes.only().launched, Some(Launched::NotEligible));
    assert!(Launched::Concurrent.is_speculative() && !Launched::NotEligible.is_speculative());
}

#[cfg(feature = "adaptive")]
#[tokio::test(start_paused = true)]
async fn adaptive_launch_reason() {
    use tower_backstop::launch::Adaptive;
    let o = outcome_of(
        Probe::fixed("cache", 6, Reply::Empty),
        Probe::fixed("db", 10, Reply::Value(2)),
        Launch::Adaptive(Adaptive::new(0.9, ms(2))),
    )
    .await;
    assert_eq!(o.launched, Some(Launched::Adaptive));
    assert_eq!(o.elapsed, ms(12));
}

#[cfg(feature = "budget")]
#[tokio::test(start_paused = true)]
async fn budget_refusal_is_reported_and_counted() {
    use tower::retry::budget::TpsBudget;
    let outcomes = Outcomes::default();
    let stats = Stats::new();
    let svc = Fallback::new(
        Probe::fixed("cache", 6, Reply::Empty),
        Probe::fixed("db", 10, Reply::Value(2)),
    )
    .accept(hit)
    .budget(TpsBudget::new(Duration::from_secs(1), 0, 0.0))
    .stats(stats.clone())
    .on_outcome(outcomes.hook());
    svc.oneshot(1).await.unwrap();
    let o = outcomes.only();
    assert_eq!(o.launched, Some(Launched::BudgetRefused));
    assert!(o.budget_refused);
    assert_eq!(o.elapsed, ms(16));
    let s = stats.snapshot();
    assert_eq!((s.budget_refusals, s.speculative_launches), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn patience_reports_a_pending_primary() {
    let outcomes = Outcomes::default();
    let svc = Fallback::new(
        Probe::fixed("cache", 50, Reply::Value(1)),
        Probe::fixed("db", 5, Reply::Value(2)),
    )
    .accept(hit)
    .patience(ms(10))
    .on_outcome(outcomes.hook());
    svc.oneshot(1).await.unwrap();
    let o = outcomes.only();
    assert_eq!(o.served, Served::Fallback);
    assert_eq!((o.primary, o.fallback), (Verdict::Pending, Fate::Served));
    assert_eq!((o.primary_latency, o.elapsed), (None, ms(15)));
    assert!(o.fallback_first);
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_request_is_reported_when_dropped() {
    let outcomes = Outcomes::default();
    let mut svc = Fallback::new(
        Probe::fixed("cache", 50, Reply::Value(1)),
        Probe::fixed("db", 40, Reply::Value(2)),
    )
    .accept(hit)
    .on_outcome(outcomes.hook());

    let timed_out = tokio::time::timeout(ms(20), svc.ready().await.unwrap().call(1)).await;
    assert!(timed_out.is_err());
    let o = outcomes.only();
    assert_eq!(o.served, Served::Abandoned);
    assert_eq!(
        (o.primary, o.fallback),
        (Verdict::Pending, Fate::DroppedInFlight)
    );
    assert_eq!(o.elapsed, ms(20));

    // Abandoned after the primary's rejection, while waiting for the fallback.
    let svc = Fallback::new(
        Probe::fixed("cache", 5, Reply::Empty),
        Probe::fixed("db", 40, Reply::Value(2)),
    )
    .accept(hit)
    .on_outcome(outcomes.hook());
    assert!(tokio::time::timeout(ms(20), svc.oneshot(1)).await.is_err());
    let o = outcomes.only();
    assert_eq!(
        (o.served, o.primary),
        (Served::Abandoned, Verdict::Rejected)
    );

    // A future dropped before its first poll is reported too, exactly once.
    let mut svc = Fallback::new(
        Probe::fixed("cache", 5, Reply::Empty),
        Probe::fixed("db", 40, Reply::Value(2)),
    )
    .on_outcome(outcomes.hook());
    drop(svc.call(1));
    let o = outcomes.only();
    assert_eq!(
        (o.served, o.fallback),
        (Served::Abandoned, Fate::NotLaunched)
    );
}

#[tokio::test(start_paused = true)]
async fn stats_add_up_across_clones_and_a_layer() {
    use tower::Layer;
    use tower_backstop::FallbackLayer;

    // Keys 0..4 hit fast; 4..6 hit slowly, after the database finished (wasted);
    // 6..10 miss.
    let cache = Probe::new("cache", |key| match key {
        0..=3 => (ms(2), Reply::Value(key)),
        4..=5 => (ms(20), Reply::Value(key)),
        _ => (ms(3), Reply::Empty),
    });
    let stats = Stats::new();
    let layer = FallbackLayer::new(Probe::fixed("db", 10, Reply::Value(0)))
        .accept(hit)
        .stats(stats.clone());
    let svc = layer.layer(cache);

    let tasks: Vec<_> = (0..10)
        .map(|key| tokio::spawn(svc.clone().oneshot(key)))
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let s: Snapshot = stats.snapshot();
    assert_eq!(
        (
            s.requests,
            s.served_by_primary,
            s.served_by_fallback,
            s.abandoned
        ),
        (10, 6, 4, 0)
    );
    assert_eq!(
        (
            s.fallback_launches,
            s.speculative_launches,
            s.budget_refusals
        ),
        (10, 10, 0)
    );
    assert_eq!(
        (s.fallbacks_cancelled, s.fallbacks_wasted, s.fallback_first),
        (4, 2, 2)
    );
    assert!(stats
        .snapshot()
        .to_string()
        .starts_with("10 requests: 6 by primary"));
}

#[tokio::test(start_paused = true)]
async fn nothing_is_observed_without_observers() {
    // The Debug output shows whether a request is being tracked.
    let mut svc = Fallback::new(
        Probe::fixed("cache", 5, Reply::Empty),
        Probe::fixed("db", 40, Reply::Value(2)),
    );
    let fut = svc.call(1);
    assert!(format!("{fut:?}").contains("observed: false"), "{fut:?}");
    let mut svc = svc.stats(Stats::new());
    let fut = svc.call(1);
    assert!(format!("{fut:?}").contains("observed: true"), "{fut:?}");
}

/// A fallback whose `poll_ready` fails at once.
#[derive(Clone)]
struct Unready;

impl Service<u64> for Unready {
    type Response = support::Answer;
    type Error = support::ProbeError;
    type Future = std::future::Ready<Result<support::Answer, support::ProbeError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Err(support::ProbeError("unready")))
    }

    fn call(&mut self, _: u64) -> Self::Future {
        unreachable!("never ready, never called")
    }
}

#[tokio::test(start_paused = true)]
async fn a_readiness_failure_is_neither_wasted_work_nor_an_answer_first() {
    let outcomes = Outcomes::default();
    let stats = Stats::new();
    let svc = Fallback::new(Probe::fixed("cache", 5, Reply::Value(1)), Unready)
        .accept(hit)
        .stats(stats.clone())
        .on_outcome(outcomes.hook());
    svc.oneshot(1).await.unwrap();
    let o = outcomes.only();
    assert_eq!(
        (o.served, o.fallback),
        (Served::Primary, Fate::ReadinessFailed)
    );
    assert!(!o.fallback_first);
    let s = stats.snapshot();
    assert_eq!((s.fallbacks_wasted, s.fallback_first), (0, 0));

    // When the primary is rejected, the readiness error is the answer served.
    let svc = Fallback::new(Probe::fixed("cache", 5, Reply::Empty), Unready)
        .accept(hit)
        .on_outcome(outcomes.hook());
    assert_eq!(svc.oneshot(1).await, Err(support::ProbeError("unready")));
    assert_eq!(outcomes.only().fallback, Fate::Served);
}

#[tokio::test(start_paused = true)]
async fn the_outcome_is_reported_after_the_fallback_is_dropped() {
    let db = Probe::fixed("db", 10, Reply::Value(2));
    let db_counts = db.counts();
    let seen = Arc::new(Mutex::new(None));
    let record = seen.clone();
    let svc = Fallback::new(Probe::fixed("cache", 2, Reply::Value(1)), db)
        .accept(hit)
        .on_outcome(move |o: &Outcome| {
            // What the hook can observe when it runs.
            *record.lock().unwrap() = Some((o.fallback, db_counts.dropped(), db_counts.alive()));
        });
    svc.oneshot(1).await.unwrap();
    let seen = seen.lock().unwrap().take().unwrap();
    // `oneshot` dropped the service at the call: no clone of the fallback is left.
    assert_eq!(seen, (Fate::DroppedInFlight, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn sequential_requests_report_after_rejection_whatever_their_eligibility() {
    let o = {
        let outcomes = Outcomes::default();
        let svc = Fallback::new(
            Probe::fixed("cache", 3, Reply::Empty),
            Probe::fixed("db", 5, Reply::Value(2)),
        )
        .accept(hit)
        .launch(Launch::Sequential)
        .speculate_if(|_: &u64| false)
        .on_outcome(outcomes.hook());
        svc.oneshot(1).await.unwrap();
        outcomes.only()
    };
    assert_eq!(o.launched, Some(Launched::AfterRejection));
}

/// The outcome of one hit whose cache answers after `cache_ms` of tokio's time, with
/// the latencies read from `clock`.
#[cfg(feature = "quanta")]
async fn hit_timed_on(clock: tower_backstop::outcome::LatencyClock, cache_ms: u64) -> Outcome {
    let outcomes = Outcomes::default();
    let svc = Fallback::new(
        Probe::fixed("cache", cache_ms, Reply::Value(1)),
        Probe::fixed("db", 2 * cache_ms, Reply::Value(2)),
    )
    .accept(hit)
    .latency_clock(clock)
    .on_outcome(outcomes.hook());
    let _ = svc.oneshot(1).await;
    outcomes.only()
}

#[cfg(feature = "quanta")]
#[tokio::test]
async fn the_tsc_clock_measures_real_time() {
    use tower_backstop::outcome::LatencyClock;
    // A real 20 ms wait: the counter's latencies are at least that, and consistent.
    let o = hit_timed_on(LatencyClock::Tsc, 20).await;
    let primary = o.primary_latency.expect("the primary answered");
    assert!(primary >= ms(20), "{primary:?}");
    assert!(o.elapsed >= primary, "{o:?}");
    assert_eq!(o.launched_after.map(|after| after <= primary), Some(true));
}

#[cfg(feature = "quanta")]
#[tokio::test(start_paused = true)]
async fn only_the_monotonic_clock_follows_a_paused_clock() {
    use tower_backstop::outcome::LatencyClock;
    // An hour of paused time passes in next to no real time: the default clock reports
    // it exactly, the time-stamp counter reports the real time, far less.
    let hour = 3_600_000;
    let monotonic = hit_timed_on(LatencyClock::Monotonic, hour).await;
    assert_eq!(monotonic.primary_latency, Some(ms(hour)));
    let tsc = hit_timed_on(LatencyClock::Tsc, hour).await;
    let primary = tsc.primary_latency.expect("the primary answered");
    assert!(primary < ms(hour), "{primary:?}");
}
