//! The core contract: both branches start together, an accepted primary answer is
//! served and the fallback dropped on the spot, a rejected one is replaced by the
//! fallback's answer. Every test runs on tokio's paused clock, so latencies are exact.

mod support;

use std::{task::Poll, time::Duration};
use support::{hit, poll_once, Answer, Probe, ProbeError, Reply};
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tower_backstop::Fallback;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn answer(from: &'static str, value: u64) -> Answer {
    Answer {
        from,
        value: Some(value),
    }
}

#[tokio::test(start_paused = true)]
async fn hit_drops_the_in_flight_fallback_before_answering() {
    let cache = Probe::fixed("cache", 2, Reply::Value(1));
    let db = Probe::fixed("db", 10, Reply::Value(2));
    let db_counts = db.counts();
    let mut svc = Fallback::new(cache, db).accept(hit);

    let start = Instant::now();
    let mut fut = Box::pin(svc.ready().await.unwrap().call(7));
    // First poll: the primary is pending, so the fallback is readied and called.
    assert!(poll_once(&mut fut).await.is_pending());
    assert_eq!(db_counts.started(), 1);

    let result = loop {
        if let Poll::Ready(result) = poll_once(&mut fut).await {
            break result;
        }
        tokio::time::sleep(ms(1)).await;
    };
    assert_eq!(result, Ok(answer("cache", 1)));
    assert_eq!(start.elapsed(), ms(2));
    // The response future is still alive here: the fallback's call must already be
    // gone, dropped in flight and never completed, and its service clone released.
    assert_eq!(db_counts.dropped(), 1);
    assert_eq!(db_counts.completed(), 0);
    assert_eq!(
        db_counts.alive(),
        1,
        "only the service's own fallback is left"
    );
    drop(fut);

    // Nothing completes later either.
    tokio::time::sleep(ms(100)).await;
    assert_eq!(db_counts.completed(), 0);
}

#[tokio::test(start_paused = true)]
async fn miss_costs_the_slower_branch_not_the_sum() {
    let cache = Probe::fixed("cache", 3, Reply::Empty);
    let db = Probe::fixed("db", 10, Reply::Value(2));
    let db_counts = db.counts();
    let svc = Fallback::new(cache, db).accept(hit);

    let start = Instant::now();
    let result = svc.oneshot(7).await;
    assert_eq!(result, Ok(answer("db", 2)));
    // Sequentially this would take 3 + 10 ms.
    assert_eq!(start.elapsed(), ms(10));
    assert_eq!(db_counts.started(), 1);
    assert_eq!(db_counts.completed(), 1);
}

#[tokio::test(start_paused = true)]
async fn slow_miss_is_served_as_soon_as_it_is_rejected() {
    // The fallback is done first; its answer is held until the primary is rejected.
    let cache = Probe::fixed("cache", 12, Reply::Empty);
    let db = Probe::fixed("db", 4, Reply::Value(2));
    let svc = Fallback::new(cache, db).accept(hit);

    let start = Instant::now();
    assert_eq!(svc.oneshot(7).await, Ok(answer("db", 2)));
    assert_eq!(start.elapsed(), ms(12));
}

#[tokio::test(start_paused = true)]
async fn primary_is_preferred_when_the_fallback_answers_first() {
    let cache = Probe::fixed("cache", 12, Reply::Value(1));
    let db = Probe::fixed("db", 4, Reply::Value(2));
    let db_counts = db.counts();
    let svc = Fallback::new(cache, db).accept(hit);

    let start = Instant::now();
    assert_eq!(svc.oneshot(7).await, Ok(answer("cache", 1)));
    assert_eq!(start.elapsed(), ms(12));
    // The fallback's answer was complete but discarded.
    assert_eq!(db_counts.completed(), 1);
}

#[tokio::test(start_paused = true)]
async fn default_predicate_accepts_any_ok_and_rejects_errors() {
    // `AcceptOk`: an empty `Ok` from the primary stands...
    let svc = Fallback::new(
        Probe::fixed("cache", 1, Reply::Empty),
        Probe::fixed("db", 5, Reply::Value(2)),
    );
    let served = svc.oneshot(1).await.unwrap();
    assert_eq!(served.from, "cache");
    assert_eq!(served.value, None);

    // ...and an error is replaced by the fallback's answer.
    let svc = Fallback::new(
        Probe::fixed("cache", 1, Reply::Fail),
        Probe::fixed("db", 5, Reply::Value(2)),
    );
    assert_eq!(svc.oneshot(1).await, Ok(answer("db", 2)));
}

#[tokio::test(start_paused = true)]
async fn both_failing_returns_the_fallbacks_error() {
    let start = Instant::now();
    let svc = Fallback::new(
        Probe::fixed("cache", 2, Reply::Fail),
        Probe::fixed("db", 5, Reply::Fail),
    );
    assert_eq!(svc.oneshot(1).await, Err(ProbeError("db")));
    assert_eq!(start.elapsed(), ms(5));

    // Order does not matter: a fallback error held while the primary runs is served
    // once the primary fails too.
    let start = Instant::now();
    let svc = Fallback::new(
        Probe::fixed("cache", 9, Reply::Fail),
        Probe::fixed("db", 5, Reply::Fail),
    );
    assert_eq!(svc.oneshot(1).await, Err(ProbeError("db")));
    assert_eq!(start.elapsed(), ms(9));
}

#[tokio::test(start_paused = true)]
async fn rejected_primary_with_a_failing_fallback_returns_the_error() {
    let svc = Fallback::new(
        Probe::fixed("cache", 2, Reply::Empty),
        Probe::fixed("db", 5, Reply::Fail),
    )
    .accept(hit);
    assert_eq!(svc.oneshot(1).await, Err(ProbeError("db")));
}

#[tokio::test(start_paused = true)]
async fn never_ready_fallback_does_not_delay_an_accepted_answer() {
    let db = Probe::fixed("db", 1, Reply::Value(2)).never_ready();
    let db_counts = db.counts();
    let mut svc = Fallback::new(Probe::fixed("cache", 3, Reply::Value(1)), db).accept(hit);

    let start = Instant::now();
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    let result = loop {
        if let Poll::Ready(result) = poll_once(&mut fut).await {
            break result;
        }
        tokio::time::sleep(ms(1)).await;
    };
    assert_eq!(result, Ok(answer("cache", 1)));
    assert_eq!(start.elapsed(), ms(3));
    // The clone that was waiting for readiness is gone before the future is dropped.
    assert!(db_counts.ready_polls() >= 1);
    assert_eq!(db_counts.alive(), 1);
    assert_eq!(db_counts.started(), 0);
}

#[tokio::test(start_paused = true)]
async fn never_ready_fallback_leaves_a_rejected_request_pending() {
    let db = Probe::fixed("db", 1, Reply::Value(2)).never_ready();
    let db_counts = db.counts();
    let svc = Fallback::new(Probe::fixed("cache", 3, Reply::Empty), db).accept(hit);

    let outcome = tokio::time::timeout(ms(1_000), svc.oneshot(1)).await;
    assert!(outcome.is_err(), "the request must wait for the fallback");
    assert_eq!(db_counts.started(), 0);
    assert_eq!(
        db_counts.alive(),
        0,
        "the timed-out future released its clone"
    );
}

#[tokio::test(start_paused = true)]
async fn poll_ready_reflects_the_primary_alone() {
    let (primary, mut handle) = tower_test::mock::pair::<u64, Answer>();
    let db = Probe::fixed("db", 1, Reply::Value(2)).never_ready();
    let db_counts = db.counts();
    let mut svc = tower_test::mock::Spawn::new(
        Fallback::new(primary.map_err(|_| ProbeError("mock")), db).accept(hit),
    );

    handle.allow(0);
    assert!(svc.poll_ready().is_pending());
    handle.allow(1);
    assert!(svc.poll_ready().is_ready());
    // The fallback itself is never asked: its clones are readied in the futures.
    assert_eq!(db_counts.ready_polls(), 0);
}

#[tokio::test(start_paused = true)]
async fn fallback_readiness_is_driven_inside_the_future() {
    let db = Probe::fixed("db", 1, Reply::Value(2));
    let db_counts = db.counts();
    let mut svc = Fallback::new(Probe::fixed("cache", 3, Reply::Empty), db).accept(hit);

    svc.ready().await.unwrap();
    assert_eq!(db_counts.ready_polls(), 0);
    let result = svc.call(1).await;
    assert_eq!(result, Ok(answer("db", 2)));
    assert_eq!(db_counts.ready_polls(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_response_future_drops_both_branches() {
    let cache = Probe::fixed("cache", 10, Reply::Value(1));
    let db = Probe::fixed("db", 10, Reply::Value(2));
    let (cache_counts, db_counts) = (cache.counts(), db.counts());
    let mut svc = Fallback::new(cache, db).accept(hit);

    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert!(poll_once(&mut fut).await.is_pending());
    tokio::time::sleep(ms(5)).await;
    assert!(poll_once(&mut fut).await.is_pending());
    assert_eq!((cache_counts.in_flight(), db_counts.in_flight()), (1, 1));

    drop(fut);
    assert_eq!(cache_counts.dropped(), 1);
    assert_eq!(db_counts.dropped(), 1);
    assert_eq!(db_counts.alive(), 1);
    tokio::time::sleep(ms(100)).await;
    assert_eq!(cache_counts.completed() + db_counts.completed(), 0);
}

#[tokio::test(start_paused = true)]
async fn primary_answering_on_first_poll_never_starts_the_fallback() {
    // A primary that is ready at once is judged before the fallback is touched.
    let cache =
        tower::service_fn(|key: u64| async move { Ok::<_, ProbeError>(answer("cache", key)) });
    let db = Probe::fixed("db", 1, Reply::Value(2));
    let db_counts = db.counts();
    let svc = Fallback::new(cache, db).accept(hit);
    assert_eq!(svc.oneshot(5).await, Ok(answer("cache", 5)));
    assert_eq!((db_counts.ready_polls(), db_counts.started()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn many_requests_in_flight_on_clones() {
    // Even keys are cache hits at 2 ms; odd keys miss at 4 ms; the database takes
    // 3 ms + (key % 7) ms. Every request runs at once on its own clone.
    let cache = Probe::new("cache", |key| {
        if key % 2 == 0 {
            (ms(2), Reply::Value(key))
        } else {
            (ms(4), Reply::Empty)
        }
    });
    let db = Probe::new("db", |key| (ms(3 + key % 7), Reply::Value(key * 10)));
    let (cache_counts, db_counts) = (cache.counts(), db.counts());
    let svc = Fallback::new(cache, db).accept(hit);

    const N: u64 = 1_000;
    let start = Instant::now();
    let tasks: Vec<_> = (0..N)
        .map(|key| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let result = svc.oneshot(key).await;
                (key, result, start.elapsed())
            })
        })
        .collect();

    for task in tasks {
        let (key, result, elapsed) = task.await.unwrap();
        if key % 2 == 0 {
            assert_eq!(result, Ok(answer("cache", key)));
            assert_eq!(elapsed, ms(2));
        } else {
            assert_eq!(result, Ok(answer("db", key * 10)));
            assert_eq!(elapsed, ms(4).max(ms(3 + key % 7)));
        }
    }
    assert_eq!(cache_counts.started(), N as usize);
    assert_eq!(db_counts.started(), N as usize);
    // Every hit dropped its database call in flight (3 ms or more > 2 ms); every miss
    // used it.
    assert_eq!(db_counts.dropped(), N as usize / 2);
    assert_eq!(db_counts.completed(), N as usize / 2);
    assert_eq!(db_counts.in_flight(), 0);
    drop(svc);
    assert_eq!((cache_counts.alive(), db_counts.alive()), (0, 0));
}
