//! `max_speculative`: at most that many speculative fallback calls in flight across a
//! layer's services; the rest served sequentially, and every slot given back — when
//! the primary answers, when the fallback answers first, when a future is dropped.

mod support;

use std::time::Duration;
use support::{hit, poll_once, Outcomes, Probe, Reply};
use tower::{Layer, Service, ServiceExt};
use tower_backstop::{
    launch::Launched,
    outcome::{Served, Stats},
    Fallback, FallbackLayer,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Keys below 100 are hits after 10 ms; the others misses after 10 ms.
fn cache() -> Probe {
    Probe::new("cache", |key| match key {
        0..100 => (ms(10), Reply::Value(key)),
        _ => (ms(10), Reply::Empty),
    })
}

#[tokio::test(start_paused = true)]
async fn only_max_speculative_calls_run_at_once_across_the_layers_services() {
    let db = Probe::fixed("db", 50, Reply::Value(7));
    let db_calls = db.counts();
    let stats = Stats::new();
    let outcomes = Outcomes::default();
    let layer = FallbackLayer::new(db)
        .accept(hit)
        .max_speculative(2)
        .stats(stats.clone())
        .on_outcome(outcomes.hook());
    // Two services of one layer, and clones of them: one cap.
    let (a, b) = (layer.layer(cache()), layer.layer(cache()));
    let requests = (0..6).map(|key| {
        let svc = if key % 2 == 0 { a.clone() } else { b.clone() };
        svc.oneshot(key)
    });
    let answers = futures_util::future::join_all(requests).await;
    assert!(answers.iter().all(|a| a.as_ref().unwrap().from == "cache"));
    // Two speculated, four were kept from it: they were hits, so no call at all.
    assert_eq!(db_calls.started(), 2);
    let counts = stats.snapshot();
    assert_eq!(counts.speculative_launches, 2);
    assert_eq!(counts.speculation_limited, 4);
    assert!(counts.to_string().contains("4 over the speculation limit"));
    let limited = outcomes.take();
    assert_eq!(limited.iter().filter(|o| o.speculation_limited).count(), 4);

    // Every slot came back when the primaries answered: the next wave speculates again.
    let again = (0..2).map(|key| a.clone().oneshot(key));
    futures_util::future::join_all(again).await;
    assert_eq!(db_calls.started(), 4);
    assert_eq!(stats.snapshot().speculation_limited, 4);
}

#[tokio::test(start_paused = true)]
async fn a_miss_over_the_limit_is_served_sequentially() {
    let db = Probe::fixed("db", 50, Reply::Value(7));
    let db_calls = db.counts();
    let outcomes = Outcomes::default();
    let svc = Fallback::new(cache(), db)
        .accept(hit)
        .max_speculative(1)
        .on_outcome(outcomes.hook());
    let hit_first = svc.clone().oneshot(1);
    let miss = svc.clone().oneshot(200);
    let (hit_answer, miss_answer) = tokio::join!(hit_first, miss);
    assert_eq!(hit_answer.unwrap().from, "cache");
    assert_eq!(miss_answer.unwrap().from, "db");
    let all = outcomes.take();
    let miss = all.iter().find(|o| o.served == Served::Fallback).unwrap();
    assert_eq!(miss.launched, Some(Launched::LimitReached));
    assert!(miss.speculation_limited);
    // Sequential: the cache's 10 ms, then the database's 50 (on tokio's paused clock,
    // which the latencies follow with the `time` feature; without it they are real).
    #[cfg(feature = "time")]
    {
        assert_eq!(miss.elapsed, ms(60));
        assert_eq!(miss.launched_after, Some(ms(10)));
    }
    assert_eq!(db_calls.started(), 2);
}

#[tokio::test(start_paused = true)]
async fn slots_come_back_when_futures_are_dropped_and_when_the_fallback_answers_first() {
    let db = Probe::fixed("db", 5, Reply::Value(7));
    let db_calls = db.counts();
    let slow_cache = Probe::fixed("cache", 1_000, Reply::Value(1));
    let stats = Stats::new();
    let mut svc = Fallback::new(slow_cache, db)
        .accept(hit)
        .max_speculative(1)
        .stats(stats.clone());

    // Takes the slot, then is dropped mid-call: the slot comes back.
    let mut first = Box::pin(svc.call(1));
    assert!(poll_once(&mut first).await.is_pending());
    let mut kept_out = Box::pin(svc.call(2));
    assert!(poll_once(&mut kept_out).await.is_pending());
    assert_eq!(db_calls.started(), 1);
    drop(first);
    let mut next = Box::pin(svc.call(3));
    assert!(poll_once(&mut next).await.is_pending());
    assert_eq!(
        db_calls.started(),
        2,
        "the dropped future's slot was given back"
    );

    // The fallback answers first (5 ms) while the cache takes a second: its call is
    // over, so its slot comes back although the request is still waiting.
    tokio::time::sleep(ms(6)).await;
    assert!(poll_once(&mut next).await.is_pending());
    let mut after = Box::pin(svc.call(4));
    assert!(poll_once(&mut after).await.is_pending());
    assert_eq!(db_calls.started(), 3);
    drop((kept_out, next, after));
    assert_eq!(stats.snapshot().speculation_limited, 1);

    // Nothing leaked: with every future gone, a full wave speculates again.
    let mut last = Box::pin(svc.call(5));
    assert!(poll_once(&mut last).await.is_pending());
    assert_eq!(db_calls.started(), 4);
}

#[tokio::test(start_paused = true)]
async fn zero_never_speculates() {
    let db = Probe::fixed("db", 5, Reply::Value(7));
    let db_calls = db.counts();
    let svc = Fallback::new(cache(), db).accept(hit).max_speculative(0);
    assert_eq!(svc.clone().oneshot(1).await.unwrap().from, "cache");
    assert_eq!(db_calls.started(), 0);
    assert_eq!(svc.oneshot(200).await.unwrap().from, "db");
}

#[tokio::test(start_paused = true)]
async fn a_rejected_primary_gives_its_slot_back_while_the_misses_call_runs() {
    let db = Probe::fixed("db", 50, Reply::Value(7));
    let db_calls = db.counts();
    let stats = Stats::new();
    let mut svc = Fallback::new(cache(), db)
        .accept(hit)
        .max_speculative(1)
        .stats(stats.clone());
    // A miss: speculates, its primary is rejected at 10 ms, its call runs to 50 ms.
    let mut miss = Box::pin(svc.call(200));
    assert!(poll_once(&mut miss).await.is_pending());
    tokio::time::sleep(ms(11)).await;
    assert!(poll_once(&mut miss).await.is_pending());
    // Its call is a miss's now, not speculation: the slot is free for the next one.
    let mut next = Box::pin(svc.call(1));
    assert!(poll_once(&mut next).await.is_pending());
    assert_eq!(db_calls.started(), 2);
    assert_eq!(stats.snapshot().speculation_limited, 0);
}

#[tokio::test(start_paused = true)]
async fn a_fallback_that_fails_readiness_holds_no_slot() {
    use std::task::{Context, Poll};
    /// A fallback whose readiness always fails.
    #[derive(Clone)]
    struct Unready;
    impl Service<u64> for Unready {
        type Response = support::Answer;
        type Error = support::ProbeError;
        type Future = std::future::Ready<Result<support::Answer, support::ProbeError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Err(support::ProbeError("db")))
        }
        fn call(&mut self, _: u64) -> Self::Future {
            unreachable!("never ready")
        }
    }
    let stats = Stats::new();
    let slow_cache = Probe::fixed("cache", 1_000, Reply::Value(1));
    let mut svc = Fallback::new(slow_cache, Unready)
        .accept(hit)
        .max_speculative(1)
        .stats(stats.clone());
    let mut first = Box::pin(svc.call(1));
    assert!(poll_once(&mut first).await.is_pending());
    // The first request's fallback failed readiness: it runs nothing and needs no slot.
    let mut second = Box::pin(svc.call(2));
    assert!(poll_once(&mut second).await.is_pending());
    drop((first, second));
    assert_eq!(stats.snapshot().speculation_limited, 0);
}

#[tokio::test(start_paused = true)]
async fn a_hook_that_panics_on_an_abandoned_request_leaks_no_slot() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let db = Probe::fixed("db", 50, Reply::Value(7));
    let db_calls = db.counts();
    let panicked = std::sync::Arc::new(AtomicBool::new(false));
    let once = panicked.clone();
    let mut svc = Fallback::new(Probe::fixed("cache", 1_000, Reply::Value(1)), db)
        .accept(hit)
        .max_speculative(1)
        .on_outcome(move |o: &tower_backstop::outcome::Outcome| {
            if o.served == Served::Abandoned && !once.swap(true, SeqCst) {
                panic!("the hook panics once, on purpose");
            }
        });
    let mut first = Box::pin(svc.call(1));
    assert!(poll_once(&mut first).await.is_pending());
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(first)));
    assert!(dropped.is_err() && panicked.load(SeqCst));
    // The slot came back before the hook ran: the next request speculates.
    let mut next = Box::pin(svc.call(2));
    assert!(poll_once(&mut next).await.is_pending());
    assert_eq!(db_calls.started(), 2);
}
