//! Coalescing: concurrent calls with equal keys share one call of the inner service
//! (`coalesce::Coalesce`, `FallbackLayer::coalesce_by`).

mod support;

use futures_util::future::join_all;
use std::{
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc,
    },
    task::Poll,
    time::Duration,
};
use support::{hit, poll_once, Answer, Probe, ProbeError, Reply};
use tower::{service_fn, Service, ServiceExt};
use tower_backstop::{
    cancel::{OnCancelLayer, Slot},
    coalesce::{Coalesce, CoalesceLayer},
    outcome::Stats,
    FallbackLayer,
};
use tower_layer::Layer;

fn same(k: &u64) -> Option<u64> {
    Some(*k)
}

fn db_answer(v: u64) -> Answer {
    Answer {
        from: "db",
        value: Some(v),
    }
}

/// A database whose every call fills a cancel slot, sleeps `ms` and disarms it; counts
/// its calls and the cancellations its slots ran.
fn cancellable_db(
    ms: u64,
) -> (
    impl Service<u64, Response = Answer, Error = ProbeError, Future: Send> + Clone + Send + 'static,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
) {
    let (calls, cancels) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let cancelled = cancels.clone();
    let counted = calls.clone();
    let svc = OnCancelLayer::new(move |_: u64| {
        cancelled.fetch_add(1, SeqCst);
    })
    .layer(service_fn(move |(key, mut slot): (u64, Slot<u64, _>)| {
        counted.fetch_add(1, SeqCst);
        async move {
            slot.fill(key);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            slot.disarm();
            Ok::<_, ProbeError>(db_answer(key))
        }
    }));
    (svc, calls, cancels)
}

#[tokio::test(start_paused = true)]
async fn fifty_concurrent_misses_make_one_fallback_call_and_one_refill() {
    let cache = Probe::fixed("cache", 10, Reply::Empty);
    let db = Probe::fixed("db", 50, Reply::Value(7));
    let (cache_counts, db_counts) = (cache.counts(), db.counts());
    let refills = Arc::new(AtomicUsize::new(0));
    let refilled = refills.clone();
    let stats = Stats::new();
    let svc = FallbackLayer::new(db)
        .accept(hit)
        .refill(move |_key: u64, _answer: &Answer| {
            refilled.fetch_add(1, SeqCst);
            Ok::<_, ProbeError>(tower_backstop::refill::Write::Started)
        })
        .stats(stats.clone())
        .coalesce_by(same)
        .layer(cache);

    let answers = join_all((0..50).map(|_| svc.clone().oneshot(1))).await;
    assert_eq!(answers.len(), 50);
    assert!(
        answers.iter().all(|a| *a == Ok(db_answer(7))),
        "{answers:?}"
    );
    assert_eq!(cache_counts.started(), 50);
    assert_eq!(db_counts.started(), 1);
    assert_eq!(refills.load(SeqCst), 1, "one refill per shared call");
    let s = stats.snapshot();
    assert_eq!(s.served_by_fallback, 50);
    assert_eq!(s.refills, 1);
    assert_eq!(s.coalesce_joined, 49);
    assert_eq!(s.coalesce_answered, 1);
    assert_eq!((s.coalesce_dropped, s.coalesce_panicked), (0, 0));
    assert!(
        s.to_string()
            .contains("49 joined coalesced calls (1 answered, 0 dropped, 0 panicked)"),
        "{s}"
    );

    // The next stampede is a call of its own, with a refill of its own.
    let answers = join_all((0..5).map(|_| svc.clone().oneshot(1))).await;
    assert!(answers.iter().all(|a| *a == Ok(db_answer(7))));
    assert_eq!(db_counts.started(), 2);
    assert_eq!(refills.load(SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_leaves_while_others_remain_leaves_the_call_going() {
    let (db, calls, cancels) = cancellable_db(50);
    let mut svc = Coalesce::new(db, same);
    let mut first = Box::pin(svc.call(1));
    let mut second = Box::pin(svc.call(1));
    // The first drives the call; the second waits.
    assert!(poll_once(&mut first).await.is_pending());
    assert!(poll_once(&mut second).await.is_pending());
    drop(first);
    assert_eq!(second.await, Ok(db_answer(1)));
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(
        cancels.load(SeqCst),
        0,
        "the call went on: nothing cancelled"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_primary_is_accepted_leaves_the_shared_call_to_the_misses() {
    // The cache hits the first request for the key and misses the second.
    let seen = Arc::new(AtomicUsize::new(0));
    let cache = Probe::new("cache", move |_| {
        let reply = match seen.fetch_add(1, SeqCst) {
            0 => Reply::Value(1),
            _ => Reply::Empty,
        };
        (Duration::from_millis(10), reply)
    });
    let (db, calls, cancels) = cancellable_db(50);
    let svc = FallbackLayer::new(db)
        .accept(hit)
        .coalesce_by(same)
        .layer(cache);
    let (hit_answer, miss_answer) = tokio::join!(svc.clone().oneshot(1), svc.oneshot(1));
    assert_eq!(hit_answer.unwrap().from, "cache");
    assert_eq!(miss_answer, Ok(db_answer(1)));
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(cancels.load(SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn the_last_waiter_to_leave_drops_the_call_and_its_cancel_slot_fires_once() {
    let (db, calls, cancels) = cancellable_db(50);
    let stats = Stats::new();
    let mut svc = Coalesce::new(db, same).stats(stats.clone());
    let mut waiters: Vec<_> = (0..3).map(|_| Box::pin(svc.call(1))).collect();
    for w in &mut waiters {
        assert!(poll_once(w).await.is_pending());
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    while waiters.len() > 1 {
        drop(waiters.pop());
        assert_eq!(cancels.load(SeqCst), 0, "others still wait");
    }
    drop(waiters.pop());
    assert_eq!(cancels.load(SeqCst), 1, "dropped with its last waiter");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(cancels.load(SeqCst), 1, "once");
    assert_eq!(calls.load(SeqCst), 1);
    let s = stats.snapshot();
    assert_eq!(
        (s.coalesce_joined, s.coalesce_dropped, s.coalesce_answered),
        (2, 1, 0)
    );

    // The key is free again: the next request starts a new call.
    assert_eq!(svc.call(1).await, Ok(db_answer(1)));
    assert_eq!(calls.load(SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_after_the_call_ended_starts_a_new_one() {
    let db = Probe::fixed("db", 5, Reply::Value(3));
    let counts = db.counts();
    let svc = Coalesce::new(db, same);
    assert_eq!(svc.clone().oneshot(1).await, Ok(db_answer(3)));
    assert_eq!(svc.clone().oneshot(1).await, Ok(db_answer(3)));
    assert_eq!(counts.started(), 2, "nothing is cached");
}

fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_shared_call_reaches_every_waiter_and_the_next_call_starts_afresh() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let db = service_fn(move |key: u64| {
        let n = counted.fetch_add(1, SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if n == 0 {
                panic!("the database blew up");
            }
            Ok::<_, ProbeError>(db_answer(key))
        }
    });
    let stats = Stats::new();
    let svc = Coalesce::new(db, same).stats(stats.clone());
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(1)))
        .collect();
    let mut messages = Vec::new();
    for task in tasks {
        let error = task.await.expect_err("every waiter panics");
        assert!(error.is_panic());
        messages.push(panic_message(error));
    }
    messages.sort();
    assert_eq!(
        messages,
        [
            "the coalesced call this request joined panicked",
            "the coalesced call this request joined panicked",
            "the coalesced call this request joined panicked",
            "the database blew up",
        ]
    );
    let s = stats.snapshot();
    assert_eq!((s.coalesce_panicked, s.coalesce_joined), (1, 3));
    assert_eq!(svc.oneshot(1).await, Ok(db_answer(1)));
    assert_eq!(calls.load(SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn errors_reach_every_waiter() {
    let db = Probe::fixed("db", 5, Reply::Fail);
    let counts = db.counts();
    let svc = Coalesce::new(db, same);
    let answers = join_all((0..10).map(|_| svc.clone().oneshot(1))).await;
    assert!(
        answers.iter().all(|a| *a == Err(ProbeError("db"))),
        "{answers:?}"
    );
    assert_eq!(counts.started(), 1);
}

#[tokio::test(start_paused = true)]
async fn different_keys_do_not_share_and_a_none_key_never_does() {
    let db = Probe::new("db", |k| (Duration::from_millis(5), Reply::Value(k)));
    let counts = db.counts();
    // Odd keys are never shared.
    let svc = Coalesce::new(db, |k: &u64| (k % 2 == 0).then_some(*k));
    let answers = join_all([2, 4, 6, 2, 4, 6].map(|k| svc.clone().oneshot(k))).await;
    assert_eq!(
        answers,
        [2, 4, 6, 2, 4, 6].map(|k| Ok(db_answer(k))).to_vec()
    );
    assert_eq!(counts.started(), 3, "one call per key");
    let answers = join_all((0..5).map(|_| svc.clone().oneshot(1))).await;
    assert!(answers.iter().all(|a| *a == Ok(db_answer(1))));
    assert_eq!(counts.started(), 8, "`None`: a call each");
}

#[tokio::test(start_paused = true)]
async fn clones_and_the_services_of_one_layer_share_one_map() {
    let db = Probe::fixed("db", 5, Reply::Value(9));
    let counts = db.counts();
    let layer = CoalesceLayer::new(same);
    let (a, b) = (layer.layer(db.clone()), layer.layer(db));
    let answers = join_all([
        a.clone().oneshot(1),
        a.clone().oneshot(1),
        b.clone().oneshot(1),
        layer
            .clone()
            .layer(Probe::fixed("db", 5, Reply::Value(9)))
            .oneshot(1),
    ])
    .await;
    assert!(
        answers.iter().all(|r| *r == Ok(db_answer(9))),
        "{answers:?}"
    );
    assert_eq!(counts.started(), 1);

    // Two Fallbacks of one layer, around two caches, share the fallback's calls.
    let db = Probe::fixed("db", 20, Reply::Value(9));
    let counts = db.counts();
    let layer = FallbackLayer::new(db).accept(hit).coalesce_by(same);
    let one = layer.layer(Probe::fixed("cache", 1, Reply::Empty));
    let two = layer.layer(Probe::fixed("cache", 2, Reply::Empty));
    let (x, y) = tokio::join!(one.oneshot(1), two.oneshot(1));
    assert_eq!((x, y), (Ok(db_answer(9)), Ok(db_answer(9))));
    assert_eq!(counts.started(), 1);
}

#[tokio::test(start_paused = true)]
async fn joiners_dropped_before_their_first_poll_leave_and_unpolled_calls_never_start() {
    let db = Probe::fixed("db", 5, Reply::Value(2));
    let counts = db.counts();
    let stats = Stats::new();
    let mut svc = Coalesce::new(db, same).stats(stats.clone());
    // A joiner dropped unpolled: the first request is served as if alone.
    let first = svc.call(1);
    drop(svc.call(1));
    assert_eq!(first.await, Ok(db_answer(2)));
    // The request that started the call dropped unpolled: the joiner drives it.
    let leader = svc.call(1);
    let joiner = svc.call(1);
    drop(leader);
    assert_eq!(joiner.await, Ok(db_answer(2)));
    assert_eq!(counts.started(), 2);
    // Every waiter dropped unpolled: the call is dropped before it was ever made.
    let (a, b) = (svc.call(1), svc.call(1));
    drop((a, b));
    assert_eq!(counts.started(), 2);
    let s = stats.snapshot();
    assert_eq!(
        (s.coalesce_joined, s.coalesce_answered, s.coalesce_dropped),
        (3, 2, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn joining_needs_no_readiness_and_only_the_driver_readies_its_clone() {
    let db = Probe::fixed("db", 5, Reply::Value(1)).never_ready();
    let counts = db.counts();
    let mut svc = Coalesce::new(db, same);
    assert!(
        poll_once(&mut Box::pin(std::future::poll_fn(|cx| svc.poll_ready(cx))))
            .await
            .is_ready()
    );
    let mut waiters: Vec<_> = (0..5).map(|_| Box::pin(svc.call(1))).collect();
    for w in &mut waiters {
        assert!(poll_once(w).await.is_pending());
    }
    assert_eq!(counts.ready_polls(), 1, "one readiness poll, by the driver");
    assert_eq!(counts.started(), 0);
}

#[tokio::test(start_paused = true)]
async fn waiters_are_woken_not_spinning() {
    let polls = Arc::new(AtomicUsize::new(0));
    let counted = polls.clone();
    let db = service_fn(move |key: u64| {
        let polls = counted.clone();
        let mut sleep = Box::pin(tokio::time::sleep(Duration::from_millis(50)));
        std::future::poll_fn(move |cx| {
            polls.fetch_add(1, SeqCst);
            match sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Ok::<_, ProbeError>(db_answer(key))),
                Poll::Pending => Poll::Pending,
            }
        })
    });
    let svc = Coalesce::new(db, same);
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot(1)))
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), Ok(db_answer(1)));
    }
    // The first poll, and the one the timer woke: no waiter polls the call in a loop.
    assert_eq!(polls.load(SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_driver_that_leaves_wakes_another_waiter_to_take_over() {
    let db = Probe::fixed("db", 50, Reply::Value(5));
    let counts = db.counts();
    let svc = Coalesce::new(db, same);
    let mut driver = Box::pin(svc.clone().oneshot(1));
    assert!(poll_once(&mut driver).await.is_pending());
    // A task that waits behind the driver.
    let waiter = tokio::spawn(svc.oneshot(1));
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(driver);
    // Only the woken waiter can drive the call to its end now.
    assert_eq!(waiter.await.unwrap(), Ok(db_answer(5)));
    assert_eq!(
        (counts.started(), counts.completed(), counts.dropped()),
        (1, 1, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_woken_to_take_over_that_leaves_passes_the_call_on() {
    let db = Probe::fixed("db", 50, Reply::Value(5));
    let svc = Coalesce::new(db, same);
    let mut driver = Box::pin(svc.clone().oneshot(1));
    assert!(poll_once(&mut driver).await.is_pending());
    // Next in line: polled once, so it is the one the driver wakes.
    let mut next = Box::pin(svc.clone().oneshot(1));
    assert!(poll_once(&mut next).await.is_pending());
    let last = tokio::spawn(svc.oneshot(1));
    tokio::task::yield_now().await;
    drop(driver);
    // Woken to take over, it leaves before driving: the last waiter must be woken.
    drop(next);
    let answer = tokio::time::timeout(Duration::from_secs(10), last).await;
    assert_eq!(
        answer.expect("the call was passed on").unwrap(),
        Ok(db_answer(5))
    );
}

/// A database that answers only once the gate opens, counting its calls.
fn gated_db() -> (
    impl Service<u64, Response = Answer, Error = ProbeError, Future: Send> + Clone + Send + 'static,
    Arc<AtomicUsize>,
    Arc<tokio::sync::Semaphore>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (counted, opened) = (calls.clone(), gate.clone());
    let svc = service_fn(move |key: u64| {
        counted.fetch_add(1, SeqCst);
        let gate = opened.clone();
        async move {
            // Each permit lets one call through, once.
            gate.acquire()
                .await
                .expect("the gate is never closed")
                .forget();
            Ok::<_, ProbeError>(db_answer(key))
        }
    });
    (svc, calls, gate)
}

async fn until(what: impl Fn() -> bool) {
    while !what() {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_threads_share_one_call_and_leave_it_from_anywhere() {
    let (db, calls, gate) = gated_db();
    let stats = Stats::new();
    let svc = Coalesce::new(db, same).stats(stats.clone());
    let tasks: Vec<_> = (0..64)
        .map(|_| tokio::spawn(svc.clone().oneshot(1)))
        .collect();
    until(|| stats.snapshot().coalesce_joined == 63).await;
    // Half the waiters go away, from whatever thread runs them.
    let mut kept = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        if i % 2 == 0 {
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled());
        } else {
            kept.push(task);
        }
    }
    gate.add_permits(1);
    for task in kept {
        assert_eq!(task.await.unwrap(), Ok(db_answer(1)));
    }
    assert_eq!(calls.load(SeqCst), 1);

    // Every waiter gone: the call is dropped, from another thread.
    let tasks: Vec<_> = (0..16)
        .map(|_| tokio::spawn(svc.clone().oneshot(2)))
        .collect();
    until(|| stats.snapshot().coalesce_joined == 63 + 15).await;
    for task in tasks {
        task.abort();
        let _ = task.await;
    }
    let s = stats.snapshot();
    assert_eq!((s.coalesce_answered, s.coalesce_dropped), (1, 1));
    assert_eq!(calls.load(SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn the_refill_is_made_by_a_miss_even_when_the_driver_turns_out_a_hit() {
    // A's cache is slow (a hit at 100 ms), so A starts the shared call and drives it; B's
    // cache misses at once, so B joins; the database answers at 50 ms, while A's primary
    // is still pending. B is the miss: B refills, although A drove the call.
    let cache = Probe::new("cache", |key| match key {
        1 => (Duration::from_millis(100), Reply::Value(1)),
        _ => (Duration::from_millis(1), Reply::Empty),
    });
    let db = Probe::fixed("db", 50, Reply::Value(7));
    let db_counts = db.counts();
    let refills = Arc::new(AtomicUsize::new(0));
    let refilled = refills.clone();
    let svc = FallbackLayer::new(db)
        .accept(hit)
        .refill(move |_key: u64, _answer: &Answer| {
            refilled.fetch_add(1, SeqCst);
            Ok::<_, ProbeError>(tower_backstop::refill::Write::Started)
        })
        // Both requests share one database call, whatever their cache key.
        .coalesce_by(|_: &u64| Some(()))
        .layer(cache);
    let (a, b) = tokio::join!(svc.clone().oneshot(1), svc.clone().oneshot(2));
    assert_eq!(a.unwrap().from, "cache");
    assert_eq!(b.unwrap().from, "db");
    assert_eq!(db_counts.started(), 1);
    assert_eq!(refills.load(SeqCst), 1, "the miss refilled");
}

/// A request whose drop panics when told to: user code the coalescer runs.
#[derive(Debug)]
struct Fragile(u64, bool);

impl Drop for Fragile {
    fn drop(&mut self) {
        if self.1 && !std::thread::panicking() {
            panic!("a request that panics when dropped");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_joiner_whose_request_panics_when_dropped_leaves_the_call_it_joined() {
    let (db, calls, cancels) = cancellable_db(50);
    let db = tower::ServiceBuilder::new()
        .map_request(|r: Fragile| r.0)
        .service(db);
    let mut svc = Coalesce::new(db, |r: &Fragile| Some(r.0));
    let mut first = Box::pin(svc.clone().oneshot(Fragile(1, false)));
    assert!(poll_once(&mut first).await.is_pending());
    // The joiner's request is dropped when it joins (the call has the first one's):
    // its panic reaches the caller of `call`.
    let joiner =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| svc.call(Fragile(1, true))));
    assert!(joiner.is_err(), "the request's drop panicked in `call`");
    // The joiner is not left in the call: its last real waiter leaving drops it.
    drop(first);
    assert_eq!((calls.load(SeqCst), cancels.load(SeqCst)), (1, 1));
    // And the next request starts a call of its own.
    assert_eq!(svc.oneshot(Fragile(1, false)).await, Ok(db_answer(1)));
    assert_eq!(calls.load(SeqCst), 2);
}

/// A key whose drop panics when told to; equal to another by its number alone.
#[derive(Debug)]
struct FragileKey(u64, bool);

impl PartialEq for FragileKey {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for FragileKey {}

impl std::hash::Hash for FragileKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl Drop for FragileKey {
    fn drop(&mut self) {
        if self.1 && !std::thread::panicking() {
            panic!("a key that panics when dropped");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_key_that_panics_when_dropped_after_the_answer_panics_once_and_leaves_no_call() {
    use futures_util::FutureExt;
    let db = service_fn(|(k, _): (u64, bool)| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok::<_, ProbeError>(db_answer(k))
    });
    // The call keeps the key of the request that started it; the last waiter to take
    // the answer drops it. Alone: the driver; with a joiner: the joiner.
    let svc = Coalesce::new(db, |r: &(u64, bool)| Some(FragileKey(r.0, r.1)));
    let alone = std::panic::AssertUnwindSafe(svc.clone().oneshot((1, true)))
        .catch_unwind()
        .await;
    assert!(
        alone.is_err(),
        "the key's drop panicked in the driver's poll"
    );

    let mut driver = Box::pin(svc.clone().oneshot((2, true)));
    assert!(poll_once(&mut driver).await.is_pending());
    let mut joiner = Box::pin(svc.clone().oneshot((2, false)));
    assert!(poll_once(&mut joiner).await.is_pending());
    assert_eq!(driver.as_mut().await, Ok(db_answer(2)));
    let joined = std::panic::AssertUnwindSafe(joiner).catch_unwind().await;
    assert!(
        joined.is_err(),
        "the key's drop panicked in the last waiter's poll"
    );
    drop(driver);
    // Nothing is left in flight: each key starts afresh.
    for k in [1, 2] {
        assert_eq!(svc.clone().oneshot((k, false)).await, Ok(db_answer(k)));
    }
}
