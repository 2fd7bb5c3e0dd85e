//! Refill on a miss: the refill action sees the fallback's `Ok` answer exactly when it
//! is served because the primary was rejected — once, with the key it kept of the
//! request — and never otherwise; writes started and answers skipped are counted
//! apart; its failures, and a spawned write's later failure, are counted and change
//! nothing; and it adds no allocation per request.

mod support;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use std::{
    convert::Infallible,
    future::{ready, Future},
    hint::black_box,
    panic::AssertUnwindSafe,
    pin::pin,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::task::noop_waker_ref;
use support::{hit, Answer, Probe, ProbeError, Reply};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_backstop::{
    outcome::{Outcome, Served, Stats},
    refill::{Refill, Refilled, Write},
    Fallback, FallbackLayer,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Keys from here on are never refilled: the refill keeps nothing of them.
const NOT_REFILLED: u64 = 1000;

/// A refill that records every call; `fail` makes it return an error, `panic_on_key`
/// makes its `key` panic for that request.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<(u64, Answer)>>>,
    fail: bool,
    panic_on_key: Option<u64>,
}

impl Recorder {
    fn failing() -> Self {
        Recorder {
            fail: true,
            ..Recorder::default()
        }
    }

    fn calls(&self) -> Vec<(u64, Answer)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Refill<u64, Answer> for Recorder {
    type Key = u64;
    type Error = &'static str;

    fn key(&mut self, key: &u64) -> Option<u64> {
        if self.panic_on_key == Some(*key) {
            panic!("key panicked on purpose");
        }
        (*key < NOT_REFILLED).then_some(*key)
    }

    /// An answer without a value (a `404`) has nothing to write: skipped.
    fn refill(&mut self, key: u64, answer: &Answer) -> Result<Write, &'static str> {
        self.calls.lock().unwrap().push((key, answer.clone()));
        if self.fail {
            Err("the cache refused the write")
        } else if answer.value.is_some() {
            Ok(Write::Started)
        } else {
            Ok(Write::Skipped)
        }
    }
}

/// Collects the outcomes a service reports.
#[derive(Clone, Default)]
struct Outcomes(Arc<Mutex<Vec<Outcome>>>);

impl Outcomes {
    fn hook(&self) -> impl Fn(&Outcome) + Send + Sync + 'static {
        let seen = self.0.clone();
        move |o: &Outcome| seen.lock().unwrap().push(o.clone())
    }

    fn only(&self) -> Outcome {
        let mut all = std::mem::take(&mut *self.0.lock().unwrap());
        assert_eq!(all.len(), 1, "{all:?}");
        all.pop().unwrap()
    }
}

fn from(name: &'static str, value: Option<u64>) -> Answer {
    Answer { from: name, value }
}

/// One request for `key` through `cache` and `db` with `refill`, counted and observed.
async fn serve(
    cache: Probe,
    db: Probe,
    refill: Recorder,
    key: u64,
) -> (Result<Answer, ProbeError>, Stats, Outcome) {
    let (stats, outcomes) = (Stats::new(), Outcomes::default());
    let svc = Fallback::new(cache, db)
        .accept(hit)
        .stats(stats.clone())
        .on_outcome(outcomes.hook())
        .refill(refill);
    let result = svc.oneshot(key).await;
    (result, stats, outcomes.only())
}

#[tokio::test(start_paused = true)]
async fn a_miss_refills_once_with_the_key_and_the_served_answer() {
    let refill = Recorder::default();
    let (result, stats, outcome) = serve(
        Probe::fixed("cache", 1, Reply::Empty),
        Probe::fixed("db", 5, Reply::Value(7)),
        refill.clone(),
        3,
    )
    .await;

    assert_eq!(result, Ok(from("db", Some(7))));
    assert_eq!(refill.calls(), [(3, from("db", Some(7)))]);
    let counted = stats.snapshot();
    assert_eq!((counted.refills, counted.refill_failures), (1, 0));
    assert_eq!(outcome.refill, Some(Refilled::Started));
}

#[tokio::test(start_paused = true)]
async fn a_hit_does_not_refill() {
    let refill = Recorder::default();
    let (result, stats, outcome) = serve(
        Probe::fixed("cache", 1, Reply::Value(1)),
        Probe::fixed("db", 5, Reply::Value(7)),
        refill.clone(),
        3,
    )
    .await;

    assert_eq!(result, Ok(from("cache", Some(1))));
    assert!(refill.calls().is_empty());
    assert_eq!(stats.snapshot().refills, 0);
    assert_eq!(outcome.refill, None);
}

#[tokio::test(start_paused = true)]
async fn a_fallback_answer_held_until_the_primary_is_rejected_refills() {
    // The database answers at 2 ms; the cache misses at 10 ms.
    let refill = Recorder::default();
    let (result, stats, outcome) = serve(
        Probe::fixed("cache", 10, Reply::Empty),
        Probe::fixed("db", 2, Reply::Value(7)),
        refill.clone(),
        3,
    )
    .await;

    assert_eq!(result, Ok(from("db", Some(7))));
    assert!(outcome.fallback_first);
    assert_eq!(refill.calls(), [(3, from("db", Some(7)))]);
    assert_eq!(stats.snapshot().refills, 1);
}

#[tokio::test(start_paused = true)]
async fn an_answer_served_after_patience_ran_out_does_not_refill() {
    // The cache never said it missed: it was only slow. Its data may be newer.
    let refill = Recorder::default();
    let (stats, outcomes) = (Stats::new(), Outcomes::default());
    let svc = Fallback::new(
        Probe::fixed("cache", 100, Reply::Value(1)),
        Probe::fixed("db", 2, Reply::Value(7)),
    )
    .accept(hit)
    .patience(ms(10))
    .stats(stats.clone())
    .on_outcome(outcomes.hook())
    .refill(refill.clone());

    let result = svc.oneshot(3).await;

    assert_eq!(result, Ok(from("db", Some(7))));
    assert_eq!(outcomes.only().served, Served::Fallback);
    assert!(refill.calls().is_empty());
    assert_eq!(stats.snapshot().refills, 0);
}

#[tokio::test(start_paused = true)]
async fn an_error_from_the_fallback_does_not_refill() {
    // After the rejection, and held from before it.
    for db_ms in [5, 1] {
        let refill = Recorder::default();
        let (result, stats, outcome) = serve(
            Probe::fixed("cache", 2, Reply::Empty),
            Probe::fixed("db", db_ms, Reply::Fail),
            refill.clone(),
            3,
        )
        .await;

        assert_eq!(result, Err(ProbeError("db")), "db at {db_ms} ms");
        assert!(refill.calls().is_empty(), "db at {db_ms} ms");
        let counted = stats.snapshot();
        assert_eq!((counted.refills, counted.refill_failures), (0, 0));
        assert_eq!(outcome.refill, None);
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_refill_changes_nothing_but_is_counted() {
    let refill = Recorder::failing();
    let (result, stats, outcome) = serve(
        Probe::fixed("cache", 1, Reply::Empty),
        Probe::fixed("db", 5, Reply::Value(7)),
        refill.clone(),
        3,
    )
    .await;

    assert_eq!(result, Ok(from("db", Some(7))));
    assert_eq!(refill.calls().len(), 1);
    let counted = stats.snapshot();
    assert_eq!((counted.refills, counted.refill_failures), (0, 1));
    assert_eq!(counted.served_by_fallback, 1);
    assert_eq!(outcome.refill, Some(Refilled::Failed));
    assert!(
        counted
            .to_string()
            .contains("0 refills started (0 failed later), 0 skipped, 1 failed"),
        "{counted}"
    );
}

/// The database's `404`-style `Ok(None)` handed to the refill, which writes nothing:
/// counted as skipped, not as a refill.
#[tokio::test(start_paused = true)]
async fn an_answer_with_nothing_to_write_is_counted_as_skipped() {
    let refill = Recorder::default();
    let (result, stats, outcome) = serve(
        Probe::fixed("cache", 1, Reply::Empty),
        Probe::fixed("db", 5, Reply::Empty),
        refill.clone(),
        3,
    )
    .await;

    assert_eq!(result, Ok(from("db", None)));
    assert_eq!(refill.calls(), [(3, from("db", None))]);
    let counted = stats.snapshot();
    assert_eq!(
        (
            counted.refills,
            counted.refills_skipped,
            counted.refill_failures
        ),
        (0, 1, 0)
    );
    assert_eq!(outcome.refill, Some(Refilled::Skipped));
    assert!(
        counted
            .to_string()
            .contains("0 refills started (0 failed later), 1 skipped"),
        "{counted}"
    );
}

/// A refill that spawns its write and reports the write's failure later, through a
/// clone of the layer's `Stats`: counted, next to the write it started.
#[tokio::test(start_paused = true)]
async fn a_spawned_write_that_fails_later_is_counted() {
    let stats = Stats::new();
    let for_writes = stats.clone();
    let write_back = move |key: u64, answer: &Answer| {
        if answer.value.is_none() {
            return Ok::<_, Infallible>(Write::Skipped);
        }
        let stats = for_writes.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(3)).await;
            // The cache refuses odd keys.
            if key % 2 == 1 {
                stats.refill_write_failed();
            }
        });
        Ok(Write::Started)
    };
    let svc = Fallback::new(
        Probe::fixed("cache", 1, Reply::Empty),
        Probe::fixed("db", 5, Reply::Value(7)),
    )
    .accept(hit)
    .stats(stats.clone())
    .refill(write_back);

    for key in 1..=4 {
        assert_eq!(svc.clone().oneshot(key).await, Ok(from("db", Some(7))));
    }
    tokio::time::sleep(ms(10)).await;
    let counted = stats.snapshot();
    assert_eq!((counted.refills, counted.refill_writes_failed), (4, 2));
    assert_eq!(counted.refill_failures, 0);
    assert!(
        counted
            .to_string()
            .contains("4 refills started (2 failed later)"),
        "{counted}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_without_a_key_is_not_refilled() {
    let refill = Recorder::default();
    let (result, stats, outcome) = serve(
        Probe::fixed("cache", 1, Reply::Empty),
        Probe::fixed("db", 5, Reply::Value(7)),
        refill.clone(),
        NOT_REFILLED,
    )
    .await;

    assert_eq!(result, Ok(from("db", Some(7))));
    assert!(refill.calls().is_empty());
    assert_eq!(stats.snapshot().refills, 0);
    assert_eq!(outcome.refill, None);
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_key_leaves_no_trace() {
    let cache = Probe::fixed("cache", 1, Reply::Empty);
    let db = Probe::fixed("db", 5, Reply::Value(7));
    let (cache_counts, db_counts) = (cache.counts(), db.counts());
    let refill = Recorder {
        panic_on_key: Some(3),
        ..Recorder::default()
    };
    let (stats, outcomes) = (Stats::new(), Outcomes::default());
    let mut svc = Fallback::new(cache, db)
        .accept(hit)
        .stats(stats.clone())
        .on_outcome(outcomes.hook())
        .refill(refill.clone());

    let ready = svc.ready().await.unwrap();
    let panic = std::panic::catch_unwind(AssertUnwindSafe(|| drop(ready.call(3))))
        .expect_err("call was expected to panic");
    assert_eq!(panic.downcast_ref(), Some(&"key panicked on purpose"));

    assert_eq!((cache_counts.started(), db_counts.started()), (0, 0));
    assert_eq!(stats.snapshot().requests, 0);
    assert!(outcomes.0.lock().unwrap().is_empty());

    // The service carries on, and refills the next miss.
    let result = svc.ready().await.unwrap().call(4).await;
    assert_eq!(result, Ok(from("db", Some(7))));
    assert_eq!(refill.calls(), [(4, from("db", Some(7)))]);
    assert_eq!(stats.snapshot().requests, 1);
}

/// A refill that allocates nothing: it counts what it was given.
#[derive(Clone)]
struct Sum(Arc<AtomicU64>);

impl Refill<u64, Option<u64>> for Sum {
    type Key = u64;
    type Error = Infallible;

    fn key(&mut self, key: &u64) -> Option<u64> {
        Some(*key)
    }

    fn refill(&mut self, key: u64, row: &Option<u64>) -> Result<Write, Infallible> {
        self.0.fetch_add(key + row.unwrap_or(0), Relaxed);
        Ok(Write::Started)
    }
}

#[test]
fn a_refill_that_allocates_nothing_adds_no_allocation() {
    const N: u64 = 1000;
    let sum = Arc::new(AtomicU64::new(0));
    let stats = Stats::new();
    let cache = service_fn(|key: u64| ready(Ok::<_, Infallible>((key % 2 == 0).then_some(key))));
    let db = service_fn(|key: u64| ready(Ok::<_, Infallible>(Some(key))));
    let mut svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new(db)
                .accept(|r: &Result<Option<u64>, Infallible>| matches!(r, Ok(Some(_))))
                .stats(stats.clone())
                .refill(Sum(sum.clone())),
        )
        .service(cache);
    let mut serve = |key: u64| {
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(svc.poll_ready(&mut cx).is_ready());
        match pin!(svc.call(black_box(key))).poll(&mut cx) {
            Poll::Ready(answer) => answer == Ok(Some(key)),
            Poll::Pending => panic!("response future pending"),
        }
    };
    // Warm-up, outside the window: the cold part's free list is filled.
    assert!((0..20).all(&mut serve));
    sum.store(0, Relaxed);

    let (allocations, correct) =
        counting_alloc::allocations_in(|| (0..2 * N).filter(|key| serve(*key)).count());

    assert_eq!(correct as u64, 2 * N, "every answer is right");
    assert_eq!(
        allocations, 0,
        "allocations while serving {N} hits and {N} misses"
    );
    // Every odd key was a miss, refilled with its own row: 2 × the sum of the odd keys.
    assert_eq!(sum.load(Relaxed), 2 * N * N);
    assert_eq!(stats.snapshot().refills, 10 + N);
}
