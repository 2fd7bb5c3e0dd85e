//! Faults and misuse: a panicking predicate or branch fails its own request and nothing
//! else; a fallback whose readiness fails costs only the requests that need it; calling
//! without `poll_ready`, polling after completion and dropping mid-flight do what the
//! docs say. Every test runs on tokio's paused clock.

mod support;

use futures_util::FutureExt;
use std::{
    any::Any,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};
use support::{hit, poll_once, Answer, Outcomes, Probe, ProbeError, Reply};
use tokio::time::{Instant, Sleep};
use tower::{Service, ServiceExt};
use tower_backstop::{
    launch::{Launch, Launched},
    outcome::{Fate, Outcome, Served, Stats, Verdict},
    Fallback,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn from(name: &'static str, value: u64) -> Answer {
    Answer {
        from: name,
        value: Some(value),
    }
}

/// The message a panic carried.
fn message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Polls a future to completion and hands back its output, keeping the future.
async fn finish<F: Future + Unpin>(fut: &mut F) -> F::Output {
    std::future::poll_fn(|cx| Pin::new(&mut *fut).poll(cx)).await
}

/// Polls a future once more, expecting a panic; returns its message.
fn poll_again<F: Future + Unpin>(fut: &mut F) -> String {
    let mut cx = Context::from_waker(Waker::noop());
    let payload = std::panic::catch_unwind(AssertUnwindSafe(|| {
        Pin::new(&mut *fut).poll(&mut cx).is_ready()
    }))
    .expect_err("polling a completed `ResponseFuture` must panic");
    message(&*payload)
}

// ---------------------------------------------------------------------------------
// Faulty services
// ---------------------------------------------------------------------------------

/// Wraps a service so that the future of every request `panics_on` approves panics
/// when it is polled at or after `at` from its call.
#[derive(Clone)]
struct Panicking<S> {
    inner: S,
    panics_on: fn(u64) -> bool,
    at: Duration,
}

impl<S> Service<u64> for Panicking<S>
where
    S: Service<u64>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = PanickingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, key: u64) -> Self::Future {
        PanickingFuture {
            bomb: (self.panics_on)(key).then(|| Box::pin(tokio::time::sleep(self.at))),
            inner: self.inner.call(key),
        }
    }
}

struct PanickingFuture<F> {
    inner: F,
    bomb: Option<Pin<Box<Sleep>>>,
}

impl<F: Future + Unpin> Future for PanickingFuture<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if let Some(bomb) = &mut self.bomb {
            if bomb.as_mut().poll(cx).is_ready() {
                panic!("branch future panicked on purpose");
            }
        }
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// A fallback whose `poll_ready` is `Pending` until `at` after `origin`, then `Err`.
struct NotReady {
    origin: Instant,
    at: Duration,
    polls: Arc<AtomicUsize>,
    wait: Option<Pin<Box<Sleep>>>,
}

impl NotReady {
    fn new(at: Duration) -> Self {
        NotReady {
            origin: Instant::now(),
            at,
            polls: Arc::default(),
            wait: None,
        }
    }
}

impl Clone for NotReady {
    fn clone(&self) -> Self {
        NotReady {
            origin: self.origin,
            at: self.at,
            polls: self.polls.clone(),
            wait: None,
        }
    }
}

impl Service<u64> for NotReady {
    type Response = Answer;
    type Error = ProbeError;
    type Future = std::future::Ready<Result<Answer, ProbeError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProbeError>> {
        self.polls.fetch_add(1, SeqCst);
        let deadline = self.origin + self.at;
        let wait = self
            .wait
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match wait.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(ProbeError("db not ready"))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, _key: u64) -> Self::Future {
        unreachable!("a fallback that never became ready was called")
    }
}

/// The test predicate, except that it panics on an `Ok` carrying `0`.
fn hit_or_panic_on_zero(result: &Result<Answer, ProbeError>) -> bool {
    if matches!(result, Ok(Answer { value: Some(0), .. })) {
        panic!("predicate panicked on purpose");
    }
    hit(result)
}

// ---------------------------------------------------------------------------------
// Panics
// ---------------------------------------------------------------------------------

/// Runs `keys` at once, each on its own clone of `svc` in its own task, and returns
/// each key's result or panic message.
async fn run_all<S>(svc: &S, keys: impl Iterator<Item = u64>) -> Vec<(u64, Result<Answer, String>)>
where
    S: Service<u64, Response = Answer, Error = ProbeError> + Clone + Send + 'static,
    S::Future: Send,
{
    let tasks: Vec<_> = keys
        .map(|key| (key, tokio::spawn(svc.clone().oneshot(key))))
        .collect();
    let mut results = Vec::new();
    for (key, task) in tasks {
        let result = match task.await {
            Ok(answer) => Ok(answer.expect("no probe here fails")),
            Err(e) => {
                assert!(e.is_panic(), "{e}");
                Err(message(&*e.into_panic()))
            }
        };
        results.push((key, result));
    }
    results
}

/// Even keys hit the cache at 2 ms; odd keys miss and are served by the database at
/// 5 ms. Keys ending in 0 hit with the value 0, on which the predicate panics.
fn cache_and_db() -> (Probe, Probe) {
    let cache = Probe::new("cache", |key| {
        let reply = match key {
            k if k % 10 == 0 => Reply::Value(0),
            k if k % 2 == 0 => Reply::Value(k),
            _ => Reply::Empty,
        };
        (ms(2), reply)
    });
    let db = Probe::new("db", |key| (ms(5), Reply::Value(key * 100)));
    (cache, db)
}

#[tokio::test(start_paused = true)]
async fn a_panicking_predicate_fails_only_its_request() {
    let (cache, db) = cache_and_db();
    let (cache_counts, db_counts) = (cache.counts(), db.counts());
    let stats = Stats::new();
    let mut svc = Fallback::new(cache, db)
        .accept(hit_or_panic_on_zero)
        .stats(stats.clone());

    for (key, result) in run_all(&svc, 0..100).await {
        match key {
            k if k % 10 == 0 => assert_eq!(result, Err("predicate panicked on purpose".into())),
            k if k % 2 == 0 => assert_eq!(result, Ok(from("cache", k))),
            k => assert_eq!(result, Ok(from("db", k * 100))),
        }
    }
    // Every branch future of the failed requests was dropped with them; only the
    // service's own fallback is left.
    assert_eq!((cache_counts.in_flight(), db_counts.in_flight()), (0, 0));
    assert_eq!(db_counts.alive(), 1);
    // The stats count the failed requests as abandoned: their futures were dropped
    // unfinished.
    let counts = stats.snapshot();
    assert_eq!(counts.requests, 100);
    assert_eq!(counts.abandoned, 10);
    assert_eq!(counts.served_by_primary, 40);
    assert_eq!(counts.served_by_fallback, 50);

    // The service and its clones carry on as before.
    assert_eq!(
        svc.ready().await.unwrap().call(4).await,
        Ok(from("cache", 4))
    );
    assert_eq!(svc.clone().oneshot(5).await, Ok(from("db", 500)));
    assert_eq!(stats.snapshot().requests, 102);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_primary_future_fails_only_its_request() {
    let (cache, db) = cache_and_db();
    let (cache_counts, db_counts) = (cache.counts(), db.counts());
    // Keys divisible by 3 panic in the cache's future at 1 ms, with the database's call
    // in flight.
    let cache = Panicking {
        inner: cache,
        panics_on: |key| key % 3 == 0,
        at: ms(1),
    };
    let stats = Stats::new();
    let svc = Fallback::new(cache, db).accept(hit).stats(stats.clone());

    let keys = (1..100).filter(|k| k % 10 != 0);
    let panicked = keys.clone().filter(|k| k % 3 == 0).count();
    let hits = keys.clone().filter(|k| k % 3 != 0 && k % 2 == 0).count();
    for (key, result) in run_all(&svc, keys).await {
        match key {
            k if k % 3 == 0 => assert_eq!(result, Err("branch future panicked on purpose".into())),
            k if k % 2 == 0 => assert_eq!(result, Ok(from("cache", k))),
            k => assert_eq!(result, Ok(from("db", k * 100))),
        }
    }
    assert_eq!((cache_counts.in_flight(), db_counts.in_flight()), (0, 0));
    assert_eq!(db_counts.alive(), 1);
    // The database calls of the failed requests were dropped in flight at 1 ms, those of
    // the hits at 2 ms.
    assert_eq!(db_counts.dropped(), panicked + hits);
    let counts = stats.snapshot();
    assert_eq!((counts.requests, counts.abandoned), (90, panicked as u64));

    assert_eq!(svc.clone().oneshot(4).await, Ok(from("cache", 4)));
    assert_eq!(svc.oneshot(7).await, Ok(from("db", 700)));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_fallback_future_fails_only_its_request() {
    let (cache, db) = cache_and_db();
    let (cache_counts, db_counts) = (cache.counts(), db.counts());
    // Keys divisible by 3 panic in the database's future at 1 ms, before the cache has
    // answered: the request fails even where the cache would have been accepted.
    let db = Panicking {
        inner: db,
        panics_on: |key| key % 3 == 0,
        at: ms(1),
    };
    let svc = Fallback::new(cache, db).accept(hit);

    let keys = (1..100).filter(|k| k % 10 != 0);
    let panicked = keys.clone().filter(|k| k % 3 == 0).count();
    for (key, result) in run_all(&svc, keys).await {
        match key {
            k if k % 3 == 0 => assert_eq!(result, Err("branch future panicked on purpose".into())),
            k if k % 2 == 0 => assert_eq!(result, Ok(from("cache", k))),
            k => assert_eq!(result, Ok(from("db", k * 100))),
        }
    }
    assert_eq!((cache_counts.in_flight(), db_counts.in_flight()), (0, 0));
    assert_eq!(db_counts.alive(), 1);
    // The failed requests' cache calls were dropped in flight at 1 ms.
    assert_eq!(cache_counts.dropped(), panicked);

    assert_eq!(svc.clone().oneshot(4).await, Ok(from("cache", 4)));
    assert_eq!(svc.oneshot(7).await, Ok(from("db", 700)));
}

#[cfg(feature = "budget")]
mod budget {
    use super::*;
    use std::sync::atomic::AtomicU8;

    /// Counts what it is asked, allowing every withdrawal.
    #[derive(Clone, Default)]
    struct Counting(Arc<(AtomicUsize, AtomicUsize)>);

    impl tower::retry::budget::Budget for Counting {
        fn deposit(&self) {
            (self.0).0.fetch_add(1, SeqCst);
        }

        fn withdraw(&self) -> bool {
            (self.0).1.fetch_add(1, SeqCst);
            true
        }
    }

    /// The user code `call` runs, and the place a test arms it to panic.
    #[derive(Clone, Copy, Debug, PartialEq)]
    #[repr(u8)]
    enum Site {
        Nowhere,
        Eligible,
        RequestClone,
        FallbackClone,
        AcceptClone,
        PrimaryCall,
    }

    /// Shared by every piece of a test's stack: panics at the armed site.
    #[derive(Clone, Default)]
    struct Armed(Arc<AtomicU8>);

    impl Armed {
        fn arm(&self, site: Site) {
            self.0.store(site as u8, SeqCst);
        }
        fn check(&self, site: Site) {
            if self.0.load(SeqCst) == site as u8 {
                panic!("{site:?} panicked on purpose");
            }
        }
    }

    struct Req(Armed);

    impl Clone for Req {
        fn clone(&self) -> Self {
            self.0.check(Site::RequestClone);
            Req(self.0.clone())
        }
    }

    /// Counts its calls, panicking ones included, and answers `Ok(1)` at once; its clones
    /// and calls panic where armed.
    struct Branch {
        armed: Armed,
        calls: Arc<AtomicUsize>,
        clone_site: Site,
        call_site: Site,
    }

    impl Clone for Branch {
        fn clone(&self) -> Self {
            self.armed.check(self.clone_site);
            Branch {
                armed: self.armed.clone(),
                calls: self.calls.clone(),
                clone_site: self.clone_site,
                call_site: self.call_site,
            }
        }
    }

    impl Service<Req> for Branch {
        type Response = u32;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<u32, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Req) -> Self::Future {
            self.calls.fetch_add(1, SeqCst);
            self.armed.check(self.call_site);
            std::future::ready(Ok(1))
        }
    }

    /// Accepts everything; its clones panic where armed.
    struct AcceptAny(Armed);

    impl Clone for AcceptAny {
        fn clone(&self) -> Self {
            self.0.check(Site::AcceptClone);
            AcceptAny(self.0.clone())
        }
    }

    impl<T, E> tower_backstop::accept::Accept<T, E> for AcceptAny {
        fn accept(&self, _: &Result<T, E>) -> bool {
            true
        }
    }

    /// A panic in any user code `call` runs leaves no trace: no budget deposit, no
    /// outcome, no count, and — where a clone panicked — no call to the primary.
    #[tokio::test(start_paused = true)]
    async fn a_panic_in_call_leaves_no_trace() {
        let sites = [
            Site::Eligible,
            Site::RequestClone,
            Site::FallbackClone,
            Site::AcceptClone,
            Site::PrimaryCall,
        ];
        for site in sites {
            let armed = Armed::default();
            let branch = |clone_site, call_site| Branch {
                armed: armed.clone(),
                calls: Arc::default(),
                clone_site,
                call_site,
            };
            let primary = branch(Site::Nowhere, Site::PrimaryCall);
            let fallback = branch(Site::FallbackClone, Site::Nowhere);
            let (primary_calls, fallback_calls) = (primary.calls.clone(), fallback.calls.clone());
            let eligible_armed = armed.clone();
            let (budget, outcomes, stats) =
                (Counting::default(), Outcomes::default(), Stats::new());
            let mut svc = Fallback::new(primary, fallback)
                .accept(AcceptAny(armed.clone()))
                .speculate_if(move |_: &Req| {
                    eligible_armed.check(Site::Eligible);
                    true
                })
                .budget(budget.clone())
                .stats(stats.clone())
                .on_outcome(outcomes.hook());

            armed.arm(site);
            let svc = svc.ready().await.unwrap();
            let panic = std::panic::catch_unwind(AssertUnwindSafe(|| {
                drop(svc.call(Req(armed.clone())));
            }))
            .expect_err("call was expected to panic");
            assert_eq!(message(&*panic), format!("{site:?} panicked on purpose"));

            let primary_called = usize::from(site == Site::PrimaryCall);
            assert_eq!(primary_calls.load(SeqCst), primary_called, "{site:?}");
            assert_eq!(fallback_calls.load(SeqCst), 0, "{site:?}");
            assert_eq!((budget.0).0.load(SeqCst), 0, "{site:?}: no deposit");
            assert_eq!(stats.snapshot().requests, 0, "{site:?}");
            assert!(outcomes.take().is_empty(), "{site:?}");

            // The service carries on.
            armed.arm(Site::Nowhere);
            assert_eq!(
                svc.ready().await.unwrap().call(Req(armed.clone())).await,
                Ok(1)
            );
            assert_eq!((budget.0).0.load(SeqCst), 1, "{site:?}");
            assert_eq!(tally(&stats), (1, 1, 0, 0, 0, 0, 0, 0), "{site:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_budget_stays_consistent_through_panics() {
        let (cache, db) = cache_and_db();
        let db_counts = db.counts();
        let cache = Panicking {
            inner: cache,
            panics_on: |key| key % 3 == 0,
            at: ms(1),
        };
        let budget = Counting::default();
        let svc = Fallback::new(cache, db)
            .accept(hit_or_panic_on_zero)
            .budget(budget.clone());

        let results = run_all(&svc, 0..100).await;
        let panics = results.iter().filter(|(_, r)| r.is_err()).count();
        assert_eq!(
            panics,
            34 + 10 - 4,
            "multiples of 3, then the rest of those of 10"
        );
        // One deposit per request and one withdrawal per speculative launch, panics or
        // not: each request started its fallback at once, and was never asked twice.
        let tally = &budget.0;
        assert_eq!((tally.0.load(SeqCst), tally.1.load(SeqCst)), (100, 100));
        assert_eq!(db_counts.started(), 100);

        svc.clone().oneshot(7).await.unwrap();
        assert_eq!((tally.0.load(SeqCst), tally.1.load(SeqCst)), (101, 101));

        // tower's own budget, shared the same way, is just as unaffected: with no
        // reserve and deposits worth nothing, it refuses every launch before and after.
        let (cache, db) = cache_and_db();
        let db_counts = db.counts();
        let svc = Fallback::new(cache, db)
            .accept(hit_or_panic_on_zero)
            .budget(tower::retry::budget::TpsBudget::new(
                Duration::from_secs(10),
                0,
                0.0,
            ));
        let start = Instant::now();
        let results = run_all(&svc, 0..20).await;
        assert_eq!(results.iter().filter(|(_, r)| r.is_err()).count(), 2);
        // Only the misses launched, each at its rejection at 2 ms.
        assert_eq!(db_counts.starts_since(start), [ms(2); 10]);
        let after = Instant::now();
        assert_eq!(svc.oneshot(7).await, Ok(from("db", 700)));
        assert_eq!(db_counts.starts_since(after), [ms(2)]);
    }
}

#[cfg(feature = "adaptive")]
#[tokio::test(start_paused = true)]
async fn the_adaptive_estimate_keeps_recording_after_panics() {
    use std::sync::atomic::AtomicU64;
    use tower_backstop::launch::Adaptive;

    // The cache answers after `latency` ms; keys divisible by 5 panic in its future at
    // 1 ms, keys ending in 2 get an answer the predicate panics on.
    let latency = Arc::new(AtomicU64::new(4));
    let cache_latency = latency.clone();
    let cache = Probe::new("cache", move |key| {
        let reply = if key % 10 == 2 {
            Reply::Value(0)
        } else {
            Reply::Value(key)
        };
        (ms(cache_latency.load(SeqCst)), reply)
    });
    let cache = Panicking {
        inner: cache,
        panics_on: |key| key % 5 == 0,
        at: ms(1),
    };
    let adaptive = Adaptive::new(0.5, ms(1)).window(40).min_samples(10);
    let svc = Fallback::new(cache, Probe::fixed("db", 100, Reply::Value(1)))
        .accept(hit_or_panic_on_zero)
        .launch(Launch::Adaptive(adaptive.clone()));

    // One request at a time, so that no sample finds the recorder busy.
    let mut panics = 0;
    for key in 1..=40 {
        if tokio::spawn(svc.clone().oneshot(key)).await.is_err() {
            panics += 1;
        }
    }
    assert_eq!(panics, 8 + 4);
    // The p50 of mostly 4 ms answers (and 1 ms cut-short calls, recorded as at least
    // 1 ms): the recorder saw every request, panicked or not.
    let estimate = adaptive.estimate().expect("warmed up");
    assert!(ms(4) <= estimate && estimate < ms(5), "{estimate:?}");

    // The primary slows down: the estimate follows, so the recorder is still in use.
    latency.store(9, SeqCst);
    for key in 41..=120 {
        let _ = tokio::spawn(svc.clone().oneshot(key)).await;
    }
    let estimate = adaptive.estimate().expect("warmed up");
    assert!(ms(9) <= estimate && estimate < ms(10), "{estimate:?}");
    assert_eq!(adaptive.skipped(), 0);
}

// ---------------------------------------------------------------------------------
// Panics: what each one leaves behind
// ---------------------------------------------------------------------------------

/// The counters a panicking request may touch: (requests, by primary, by fallback,
/// abandoned, fallback launches, speculative launches, cancelled, wasted).
fn tally(stats: &Stats) -> (u64, u64, u64, u64, u64, u64, u64, u64) {
    let s = stats.snapshot();
    (
        s.requests,
        s.served_by_primary,
        s.served_by_fallback,
        s.abandoned,
        s.fallback_launches,
        s.speculative_launches,
        s.fallbacks_cancelled,
        s.fallbacks_wasted,
    )
}

/// One request, abandoned after a panic, whose fallback was launched with the primary
/// and cancelled.
const ABANDONED_AND_CANCELLED: (u64, u64, u64, u64, u64, u64, u64, u64) = (1, 0, 0, 1, 1, 1, 1, 0);

/// Drives a future until it panics, catching the panic; returns its message.
async fn expect_panic<F: Future + Unpin>(fut: &mut F) -> String {
    let payload = AssertUnwindSafe(finish(fut))
        .catch_unwind()
        .await
        .map(drop)
        .expect_err("the future was expected to panic");
    message(&*payload)
}

const POISONED: &str = "`ResponseFuture` polled after it panicked";

/// Where a [`Faulty`] service panics.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    PollReady,
    Call,
    /// Its future panics when polled at or after this long from the call.
    Future(Duration),
    /// Its future panics when dropped (unless it is dropped while unwinding).
    Drop,
}

/// Wraps a service so that it panics at one place, with a message naming it.
#[derive(Clone)]
struct Faulty<S> {
    inner: S,
    fault: Fault,
}

impl<S> Service<u64> for Faulty<S>
where
    S: Service<u64>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = FaultyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if self.fault == Fault::PollReady {
            panic!("poll_ready panicked on purpose");
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, key: u64) -> Self::Future {
        if self.fault == Fault::Call {
            panic!("call panicked on purpose");
        }
        let bomb = match self.fault {
            Fault::Future(at) => Some(Box::pin(tokio::time::sleep(at))),
            _ => None,
        };
        FaultyFuture {
            inner: self.inner.call(key),
            bomb,
            panics_on_drop: self.fault == Fault::Drop,
        }
    }
}

struct FaultyFuture<F> {
    inner: F,
    bomb: Option<Pin<Box<Sleep>>>,
    panics_on_drop: bool,
}

impl<F: Future + Unpin> Future for FaultyFuture<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if let Some(bomb) = &mut self.bomb {
            if bomb.as_mut().poll(cx).is_ready() {
                panic!("future panicked on purpose");
            }
        }
        Pin::new(&mut self.inner).poll(cx)
    }
}

impl<F> Drop for FaultyFuture<F> {
    fn drop(&mut self) {
        if self.panics_on_drop && !std::thread::panicking() {
            panic!("drop panicked on purpose");
        }
    }
}

/// A predicate that panics on the primary's answer: the outcome says the primary
/// answered, when, and that a panic kept its answer from being judged.
#[tokio::test(start_paused = true)]
async fn a_panicking_predicate_is_reported_with_the_primary_answer() {
    let (outcomes, stats) = (Outcomes::default(), Stats::new());
    let mut svc = Fallback::new(
        Probe::fixed("cache", 2, Reply::Value(0)),
        Probe::fixed("db", 10, Reply::Value(2)),
    )
    .accept(hit_or_panic_on_zero)
    .stats(stats.clone())
    .on_outcome(outcomes.hook());

    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert_eq!(
        expect_panic(&mut fut).await,
        "predicate panicked on purpose"
    );
    assert!(
        outcomes.take().is_empty(),
        "reported when the future is dropped"
    );
    drop(fut);

    let o = outcomes.only();
    assert_eq!(
        (o.served, o.primary, o.fallback),
        (Served::Abandoned, Verdict::Panicked, Fate::DroppedInFlight)
    );
    assert_eq!((o.primary_latency, o.fallback_latency), (Some(ms(2)), None));
    assert_eq!(o.launched, Some(Launched::Concurrent));
    assert_eq!(tally(&stats), ABANDONED_AND_CANCELLED);
}

/// A response future whose predicate panicked is poisoned: polled again — at once, or
/// after the fallback could have answered — it panics, and never serves the fallback.
#[tokio::test(start_paused = true)]
async fn a_future_whose_predicate_panicked_never_serves() {
    // (launch, db started, fate, launch reported)
    let cases = [
        (
            Launch::Concurrent,
            1,
            Fate::DroppedInFlight,
            Some(Launched::Concurrent),
        ),
        (Launch::Sequential, 0, Fate::NotLaunched, None),
        (Launch::Delayed(ms(5)), 0, Fate::NotLaunched, None),
    ];
    for (launch, started, fate, launched) in cases {
        let what = format!("{launch:?}");
        let (outcomes, stats) = (Outcomes::default(), Stats::new());
        let db = Probe::fixed("db", 3, Reply::Value(2));
        let db_counts = db.counts();
        let mut svc = Fallback::new(Probe::fixed("cache", 2, Reply::Value(0)), db)
            .accept(hit_or_panic_on_zero)
            .launch(launch)
            .stats(stats.clone())
            .on_outcome(outcomes.hook());

        let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
        assert_eq!(
            expect_panic(&mut fut).await,
            "predicate panicked on purpose"
        );
        assert_eq!(poll_again(&mut fut), POISONED, "{what}");
        tokio::time::sleep(ms(20)).await;
        assert_eq!(poll_again(&mut fut), POISONED, "{what}: later");
        drop(fut);

        assert_eq!(
            (db_counts.started(), db_counts.completed()),
            (started, 0),
            "{what}"
        );
        let o = outcomes.only();
        assert_eq!(
            (o.served, o.primary, o.fallback, o.launched),
            (Served::Abandoned, Verdict::Panicked, fate, launched),
            "{what}"
        );
        let launches = started as u64;
        assert_eq!(
            tally(&stats),
            (1, 0, 0, 1, launches, launches, launches, 0),
            "{what}"
        );
    }
}

/// A primary whose future panics, or whose spent future panics when dropped: the
/// outcome tells the two apart, and the future is poisoned.
#[tokio::test(start_paused = true)]
async fn a_panicking_primary_is_reported_as_far_as_it_got() {
    // (primary fault, message, verdict, primary latency)
    let cases = [
        (
            Fault::Future(ms(1)),
            "future panicked on purpose",
            Verdict::Pending,
            None,
        ),
        (
            Fault::Drop,
            "drop panicked on purpose",
            Verdict::Panicked,
            Some(ms(2)),
        ),
    ];
    for (fault, panic, verdict, latency) in cases {
        let (outcomes, stats) = (Outcomes::default(), Stats::new());
        let cache = Faulty {
            inner: Probe::fixed("cache", 2, Reply::Value(1)),
            fault,
        };
        let db = Probe::fixed("db", 10, Reply::Value(2));
        let db_counts = db.counts();
        let mut svc = Fallback::new(cache, db)
            .accept(hit)
            .stats(stats.clone())
            .on_outcome(outcomes.hook());

        let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
        assert_eq!(expect_panic(&mut fut).await, panic, "{fault:?}");
        assert_eq!(poll_again(&mut fut), POISONED, "{fault:?}");
        drop(fut);

        assert_eq!(db_counts.dropped(), 1, "{fault:?}");
        let o = outcomes.only();
        assert_eq!(
            (o.served, o.primary, o.fallback, o.primary_latency),
            (Served::Abandoned, verdict, Fate::DroppedInFlight, latency),
            "{fault:?}"
        );
        assert_eq!(tally(&stats), ABANDONED_AND_CANCELLED, "{fault:?}");
    }
}

/// A fallback that panics in `poll_ready`, `call`, its future or its future's drop:
/// the outcome says how far it got, and the future is poisoned.
#[tokio::test(start_paused = true)]
async fn a_panicking_fallback_is_reported_as_far_as_it_got() {
    // (fallback fault, message, verdict, fate). The cache answers a hit at 2 ms; the
    // database would answer at 10.
    let cases = [
        (
            Fault::PollReady,
            "poll_ready panicked on purpose",
            Verdict::Pending,
            Fate::DroppedBeforeReady,
        ),
        (
            Fault::Call,
            "call panicked on purpose",
            Verdict::Pending,
            Fate::DroppedInFlight,
        ),
        (
            Fault::Future(ms(1)),
            "future panicked on purpose",
            Verdict::Pending,
            Fate::DroppedInFlight,
        ),
        // Dropped in flight when the cache's hit is accepted.
        (
            Fault::Drop,
            "drop panicked on purpose",
            Verdict::Accepted,
            Fate::DroppedInFlight,
        ),
    ];
    for (fault, panic, verdict, fate) in cases {
        let (outcomes, stats) = (Outcomes::default(), Stats::new());
        let cache = Probe::fixed("cache", 2, Reply::Value(1));
        let cache_counts = cache.counts();
        let db = Faulty {
            inner: Probe::fixed("db", 10, Reply::Value(2)),
            fault,
        };
        let mut svc = Fallback::new(cache, db)
            .accept(hit)
            .stats(stats.clone())
            .on_outcome(outcomes.hook());

        let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
        assert_eq!(expect_panic(&mut fut).await, panic, "{fault:?}");
        assert_eq!(poll_again(&mut fut), POISONED, "{fault:?}");
        drop(fut);

        assert_eq!(cache_counts.in_flight(), 0, "{fault:?}");
        let o = outcomes.only();
        assert_eq!(
            (o.served, o.primary, o.fallback, o.launched),
            (Served::Abandoned, verdict, fate, Some(Launched::Concurrent)),
            "{fault:?}"
        );
        assert_eq!(tally(&stats), ABANDONED_AND_CANCELLED, "{fault:?}");
    }
}

/// A hook that panics: the outcome was counted first and is never counted twice; the
/// answer is lost with the panic, and the future is poisoned.
#[tokio::test(start_paused = true)]
async fn a_panicking_hook_leaves_the_counts_true() {
    let stats = Stats::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let hook_calls = calls.clone();
    let mut svc = Fallback::new(
        Probe::fixed("cache", 2, Reply::Value(1)),
        Probe::fixed("db", 10, Reply::Value(2)),
    )
    .accept(hit)
    .stats(stats.clone())
    .on_outcome(move |_: &Outcome| {
        hook_calls.fetch_add(1, SeqCst);
        panic!("hook panicked on purpose");
    });

    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert_eq!(expect_panic(&mut fut).await, "hook panicked on purpose");
    assert_eq!(poll_again(&mut fut), POISONED);
    drop(fut);

    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(tally(&stats), (1, 1, 0, 0, 1, 1, 1, 0));
}

// ---------------------------------------------------------------------------------
// A fallback whose readiness fails
// ---------------------------------------------------------------------------------

type WithNotReady = Fallback<Probe, NotReady, fn(&Result<Answer, ProbeError>) -> bool>;

/// Serves one request through a fresh `Fallback` of `cache` and a fallback whose
/// readiness fails at `fails_at`; returns the result, when it came, and how often the
/// fallback's readiness was polled.
async fn with_failing_readiness(
    cache: Probe,
    fails_at: u64,
    configure: impl FnOnce(WithNotReady) -> WithNotReady,
) -> (Result<Answer, ProbeError>, Duration, usize) {
    let db = NotReady::new(ms(fails_at));
    let polls = db.polls.clone();
    let svc = configure(Fallback::new(cache, db).accept(hit as fn(&_) -> bool));
    let start = Instant::now();
    let result = svc.oneshot(1).await;
    (result, start.elapsed(), polls.load(SeqCst))
}

#[tokio::test(start_paused = true)]
async fn a_readiness_error_is_not_served_when_the_primary_is_accepted() {
    // The error comes first and is held; the primary's hit is served, the error dropped.
    let (result, at, polls) =
        with_failing_readiness(Probe::fixed("cache", 5, Reply::Value(1)), 2, |s| s).await;
    assert_eq!((result, at), (Ok(from("cache", 1)), ms(5)));
    assert_eq!(polls, 2, "asked at the call, failed at 2 ms");

    // The primary answers before readiness fails.
    let (result, at, _) =
        with_failing_readiness(Probe::fixed("cache", 5, Reply::Value(1)), 8, |s| s).await;
    assert_eq!((result, at), (Ok(from("cache", 1)), ms(5)));
}

#[tokio::test(start_paused = true)]
async fn a_readiness_error_is_served_when_the_primary_is_rejected() {
    // Held from 2 ms until the primary's miss at 5 ms.
    let (result, at, _) =
        with_failing_readiness(Probe::fixed("cache", 5, Reply::Empty), 2, |s| s).await;
    assert_eq!((result, at), (Err(ProbeError("db not ready")), ms(5)));

    // After the miss at 5 ms, the request waits for readiness and gets its error at 8.
    let (result, at, _) =
        with_failing_readiness(Probe::fixed("cache", 5, Reply::Fail), 8, |s| s).await;
    assert_eq!((result, at), (Err(ProbeError("db not ready")), ms(8)));
}

#[tokio::test(start_paused = true)]
async fn a_readiness_error_never_cuts_the_primary_short() {
    // Patience is for a successful fallback answer: an error waits for the primary.
    let (result, at, _) =
        with_failing_readiness(Probe::fixed("cache", 50, Reply::Value(1)), 2, |s| {
            s.patience(ms(1))
        })
        .await;
    assert_eq!((result, at), (Ok(from("cache", 1)), ms(50)));
}

#[tokio::test(start_paused = true)]
async fn a_sequential_fallback_is_not_even_asked_for_readiness_on_a_hit() {
    let (result, _, polls) =
        with_failing_readiness(Probe::fixed("cache", 5, Reply::Value(1)), 0, |s| {
            s.launch(Launch::Sequential)
        })
        .await;
    assert_eq!((result, polls), (Ok(from("cache", 1)), 0));

    let (result, at, polls) =
        with_failing_readiness(Probe::fixed("cache", 5, Reply::Empty), 0, |s| {
            s.launch(Launch::Sequential)
        })
        .await;
    assert_eq!(
        (result, at, polls),
        (Err(ProbeError("db not ready")), ms(5), 1)
    );
}

/// `poll_ready` is the primary's alone, so the primary's readiness error goes to the
/// caller, as documented: no request exists yet, and the fallback is not asked.
#[tokio::test(start_paused = true)]
async fn a_primary_readiness_error_goes_to_the_caller() {
    let db = Probe::fixed("db", 5, Reply::Value(2));
    let db_counts = db.counts();
    let mut svc = Fallback::new(NotReady::new(ms(3)), db).accept(hit);
    let start = Instant::now();
    assert_eq!(svc.ready().await.err(), Some(ProbeError("db not ready")));
    assert_eq!(start.elapsed(), ms(3));
    assert_eq!((db_counts.ready_polls(), db_counts.started()), (0, 0));
}

/// Response futures own what they need: dropping the service and every clone of it
/// while requests are in flight changes nothing for them.
#[tokio::test(start_paused = true)]
async fn requests_outlive_the_service() {
    let (cache, db) = cache_and_db();
    let db_counts = db.counts();
    let mut svc = Fallback::new(cache, db).accept(hit);
    let hit_fut = svc.ready().await.unwrap().call(2);
    let miss_fut = svc.ready().await.unwrap().call(3);
    drop(svc);
    assert_eq!(db_counts.alive(), 2, "one clone in each response future");
    assert_eq!(hit_fut.await, Ok(from("cache", 2)));
    assert_eq!(miss_fut.await, Ok(from("db", 300)));
    assert_eq!((db_counts.alive(), db_counts.in_flight()), (0, 0));
}

// ---------------------------------------------------------------------------------
// Misuse
// ---------------------------------------------------------------------------------

/// `Fallback::poll_ready` is the primary's, and `call` goes straight to the primary:
/// skipping `poll_ready` is the primary's business. A primary that tolerates it serves
/// as usual, and the fallback is readied in the response future all the same.
#[tokio::test(start_paused = true)]
async fn calling_without_poll_ready_is_up_to_the_primary() {
    let db = Probe::fixed("db", 5, Reply::Value(2));
    let db_counts = db.counts();
    let mut svc = Fallback::new(Probe::fixed("cache", 2, Reply::Empty), db).accept(hit);
    assert_eq!(svc.call(1).await, Ok(from("db", 2)));
    assert_eq!((db_counts.ready_polls(), db_counts.started()), (1, 1));
}

/// A primary that requires `poll_ready`, such as tower's `ConcurrencyLimit`, panics in
/// `call` — synchronously, before any response future exists.
#[tokio::test(start_paused = true)]
#[should_panic(expected = "poll_ready must be called first")]
async fn calling_without_poll_ready_panics_in_a_primary_that_requires_it() {
    let cache = tower::limit::ConcurrencyLimit::new(Probe::fixed("cache", 2, Reply::Empty), 1);
    let mut svc = Fallback::new(cache, Probe::fixed("db", 5, Reply::Value(2))).accept(hit);
    drop(svc.call(1));
}

/// The fallback is never called without readiness: each response future drives its own
/// clone, so a fallback behind tower's `ConcurrencyLimit` (which panics otherwise) works,
/// and the permits of dropped fallback calls come back.
#[tokio::test(start_paused = true)]
async fn the_fallback_is_always_readied_before_it_is_called() {
    let db = Probe::fixed("db", 5, Reply::Value(2));
    let db_counts = db.counts();
    let db = tower::limit::ConcurrencyLimit::new(db, 1);
    let cache = Probe::new("cache", |key| {
        (
            ms(2),
            if key < 10 {
                Reply::Value(key)
            } else {
                Reply::Empty
            },
        )
    });
    let svc = Fallback::new(cache, db).accept(hit);

    // Ten hits at once: one database call holds the permit and is dropped at 2 ms, the
    // other nine never got it and are dropped waiting.
    let start = Instant::now();
    let hits = run_all(&svc, 0..10).await;
    assert!(hits.iter().all(|(key, r)| *r == Ok(from("cache", *key))));
    assert_eq!((db_counts.started(), db_counts.dropped()), (1, 1));

    // Three misses at once share the one permit: served at 5, 10 and 15 ms.
    let start_misses = Instant::now();
    let tasks: Vec<_> = (10..13)
        .map(|key| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let result = svc.oneshot(key).await;
                (result, start_misses.elapsed())
            })
        })
        .collect();
    let mut served_at = Vec::new();
    for task in tasks {
        let (result, at) = task.await.unwrap();
        assert_eq!(result, Ok(from("db", 2)));
        served_at.push(at);
    }
    served_at.sort();
    assert_eq!(served_at, [ms(5), ms(10), ms(15)]);
    assert_eq!(db_counts.starts_since(start).len(), 4);
}

/// Polling a `ResponseFuture` after it returned `Ready` panics, as the `Future` contract
/// allows, with this message.
#[tokio::test(start_paused = true)]
#[should_panic(expected = "`ResponseFuture` polled after completion")]
async fn polling_after_completion_panics() {
    let mut svc = Fallback::new(
        Probe::fixed("cache", 2, Reply::Value(1)),
        Probe::fixed("db", 5, Reply::Value(2)),
    );
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert!(finish(&mut fut).await.is_ok());
    let _ = poll_once(&mut fut).await;
}

/// ...whichever way it completed, and the service is none the worse for it.
#[tokio::test(start_paused = true)]
async fn polling_after_completion_panics_on_every_path() {
    let answer = |ms_, reply| Probe::fixed("cache", ms_, reply);
    let db = || Probe::fixed("db", 5, Reply::Value(2));
    type Case = (
        &'static str,
        Probe,
        Probe,
        Option<Duration>,
        Result<Answer, ProbeError>,
    );
    let cases: Vec<Case> = vec![
        (
            "primary accepted on the first poll",
            answer(0, Reply::Value(1)),
            db(),
            None,
            Ok(from("cache", 1)),
        ),
        (
            "primary accepted",
            answer(2, Reply::Value(1)),
            db(),
            None,
            Ok(from("cache", 1)),
        ),
        (
            "fallback after a rejection",
            answer(2, Reply::Empty),
            db(),
            None,
            Ok(from("db", 2)),
        ),
        (
            "held fallback answer",
            answer(9, Reply::Fail),
            db(),
            None,
            Ok(from("db", 2)),
        ),
        (
            "patience ran out",
            answer(90, Reply::Value(1)),
            db(),
            Some(ms(1)),
            Ok(from("db", 2)),
        ),
        (
            "fallback failed",
            answer(2, Reply::Empty),
            Probe::fixed("db", 5, Reply::Fail),
            None,
            Err(ProbeError("db")),
        ),
    ];
    for (what, cache, db, patience, expected) in cases {
        let mut svc = Fallback::new(cache, db).accept(hit);
        if let Some(patience) = patience {
            svc = svc.patience(patience);
        }
        let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
        assert_eq!(finish(&mut fut).await, expected, "{what}");
        assert_eq!(
            poll_again(&mut fut),
            "`ResponseFuture` polled after completion",
            "{what}"
        );
        drop(fut);
        assert_eq!(
            svc.oneshot(1).await,
            expected,
            "{what}: the service still serves"
        );
    }

    // A readiness error is a completion too.
    let mut svc =
        Fallback::new(Probe::fixed("cache", 2, Reply::Empty), NotReady::new(ms(1))).accept(hit);
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert_eq!(finish(&mut fut).await, Err(ProbeError("db not ready")));
    assert_eq!(
        poll_again(&mut fut),
        "`ResponseFuture` polled after completion"
    );
}

/// Dropping the response future drops whatever it holds at that moment — the primary's
/// future, the fallback's clone waiting for readiness, its call in flight, its held
/// answer, the launch delay or the patience timer — and nothing happens afterwards.
#[tokio::test(start_paused = true)]
async fn dropping_mid_flight_at_every_stage() {
    struct Stage {
        what: &'static str,
        cache: Probe,
        db: Probe,
        launch: Launch,
        patience: Option<Duration>,
        /// (cache completed, cache dropped, db asked for readiness, db completed, db
        /// dropped)
        expected: (usize, usize, bool, usize, usize),
    }
    let stages = [
        Stage {
            what: "waiting for the launch delay",
            cache: Probe::fixed("cache", 10, Reply::Value(1)),
            db: Probe::fixed("db", 5, Reply::Value(2)),
            launch: Launch::Delayed(ms(8)),
            patience: None,
            expected: (0, 1, false, 0, 0),
        },
        Stage {
            what: "fallback waiting for readiness",
            cache: Probe::fixed("cache", 10, Reply::Value(1)),
            db: Probe::fixed("db", 5, Reply::Value(2)).never_ready(),
            launch: Launch::Concurrent,
            patience: None,
            expected: (0, 1, true, 0, 0),
        },
        Stage {
            what: "both in flight",
            cache: Probe::fixed("cache", 10, Reply::Value(1)),
            db: Probe::fixed("db", 10, Reply::Value(2)),
            launch: Launch::Concurrent,
            patience: None,
            expected: (0, 1, true, 0, 1),
        },
        Stage {
            what: "fallback answer held",
            cache: Probe::fixed("cache", 10, Reply::Value(1)),
            db: Probe::fixed("db", 2, Reply::Value(2)),
            launch: Launch::Concurrent,
            patience: None,
            expected: (0, 1, true, 1, 0),
        },
        Stage {
            what: "waiting out the patience",
            cache: Probe::fixed("cache", 10, Reply::Value(1)),
            db: Probe::fixed("db", 2, Reply::Value(2)),
            launch: Launch::Concurrent,
            patience: Some(ms(5)),
            expected: (0, 1, true, 1, 0),
        },
        Stage {
            what: "fallback in flight after the rejection",
            cache: Probe::fixed("cache", 2, Reply::Empty),
            db: Probe::fixed("db", 10, Reply::Value(2)),
            launch: Launch::Sequential,
            patience: None,
            expected: (1, 0, true, 0, 1),
        },
    ];
    for stage in stages {
        let what = stage.what;
        let (cache, db) = (stage.cache.counts(), stage.db.counts());
        let mut svc = Fallback::new(stage.cache, stage.db)
            .accept(hit)
            .launch(stage.launch);
        if let Some(patience) = stage.patience {
            svc = svc.patience(patience);
        }
        let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
        // Dropped at 4 ms, by a timeout around the call.
        let outcome = tokio::time::timeout(ms(4), finish(&mut fut)).await;
        assert!(outcome.is_err(), "{what}: nothing is served by 4 ms");
        drop(fut);
        let observed = (
            cache.completed(),
            cache.dropped(),
            db.ready_polls() > 0,
            db.completed(),
            db.dropped(),
        );
        assert_eq!(observed, stage.expected, "{what}");
        assert_eq!((cache.in_flight(), db.in_flight()), (0, 0), "{what}");
        assert_eq!(db.alive(), 1, "{what}: the future's fallback clone is gone");

        // Nothing is asked, started or completed later.
        let snapshot = || {
            (
                db.ready_polls(),
                cache.started() + db.started(),
                cache.completed() + db.completed(),
            )
        };
        let before = snapshot();
        tokio::time::sleep(ms(100)).await;
        assert_eq!(snapshot(), before, "{what}");
    }
}

/// A withdrawal is spent when the fallback launches: a caller who then gives up does
/// not get it back.
#[cfg(feature = "budget")]
#[tokio::test(start_paused = true)]
async fn a_dropped_request_keeps_its_withdrawal_spent() {
    use tower::retry::budget::TpsBudget;

    // A reserve of exactly one withdrawal (1 per second for 1 s), deposits worth nothing.
    let db = Probe::fixed("db", 5, Reply::Value(2));
    let db_counts = db.counts();
    let svc = Fallback::new(Probe::fixed("cache", 10, Reply::Empty), db)
        .accept(hit)
        .budget(TpsBudget::new(Duration::from_secs(1), 1, 0.0));

    let start = Instant::now();
    let gave_up = tokio::time::timeout(ms(3), svc.clone().oneshot(1)).await;
    assert!(gave_up.is_err());
    assert_eq!(db_counts.dropped(), 1);
    // The next request finds the budget empty: it launches only at its rejection.
    let second = Instant::now();
    assert_eq!(svc.oneshot(2).await, Ok(from("db", 2)));
    assert_eq!(second.elapsed(), ms(15));
    assert_eq!(db_counts.starts_since(start), [ms(0), ms(3 + 10)]);
}
