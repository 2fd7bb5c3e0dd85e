//! The middleware allocates nothing per request.
//!
//! A counting global allocator counts every allocation made by the current thread while
//! a measured window is open. A `Fallback` stack built with `ServiceBuilder` over two
//! services that do not allocate (their futures are `std::future::Ready`) serves 1000
//! hits and 1000 misses inside such a window, and the count must stay at exactly 0.
//! Every answer is checked too (a hit is the primary's value, a miss the fallback's), so
//! a test cannot pass by not doing the work. Two control tests show that the counter
//! does see allocations in the window, so the 0 means something.
//!
//! The same holds under every launch policy and option, one test each: `Sequential`,
//! `Delayed` and `Adaptive` (inside an entered tokio runtime), patience, a `TpsBudget`,
//! an outcome hook, `Stats`, a `tracing` subscriber, and all of them at once. Those
//! tests also serve "slow" requests, whose primary is pending on its first poll: that
//! is what launches the fallback speculatively, arms a launch delay in tokio's timer
//! (and cancels it when the primary answers), times an adaptive sample, arms the
//! patience bound, and withdraws from a budget. A request that uses any option takes
//! its cold part from a per-thread free list, which the warm-up fills.
//!
//! Windows are serialized by a mutex and count only on the thread that opened them, so
//! the tests can run in parallel with each other and with the test harness.
//!
//! Set `ALLOC_BACKTRACE=1` to print a backtrace of the first few allocations counted in
//! each window: `ALLOC_BACKTRACE=1 cargo test --all-features --test alloc -- --nocapture`.

use std::{
    convert::Infallible,
    future::{ready, Future},
    hint::black_box,
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use futures_util::task::noop_waker_ref;
use tower::{service_fn, util::BoxService, Layer, Service, ServiceBuilder};
use tower_backstop::{
    launch::Launch,
    outcome::{Outcome, Served, Stats},
    FallbackLayer,
};

/// Requests served in each measured window.
const N: u64 = 1000;

/// Added by the fallback to its answers, so the two services' answers differ.
const FROM_DB: u64 = 1 << 32;

type Answer = Result<Option<u64>, Infallible>;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::allocations_in;

// ---- the services ----

/// A cache that hits on even keys (`Some(key)`) and misses on odd ones (`None`), in
/// front of a database that has every row (`Some(key | FROM_DB)`), both answering with
/// `std::future::Ready`.
fn stack() -> impl Service<u64, Response = Option<u64>, Error = Infallible> {
    let cache = service_fn(|key: u64| ready(Ok::<_, Infallible>((key % 2 == 0).then_some(key))));
    let db = service_fn(|key: u64| ready(Ok::<_, Infallible>(Some(key | FROM_DB))));
    ServiceBuilder::new()
        .layer(FallbackLayer::new(db).accept(|r: &Answer| matches!(r, Ok(Some(_)))))
        .service(cache)
}

/// Serves one request the way a caller does: `poll_ready`, `call`, then poll the
/// response future, all with a no-op waker. The services here never return `Pending`.
fn serve<S>(svc: &mut S, key: u64) -> Answer
where
    S: Service<u64, Response = Option<u64>, Error = Infallible>,
{
    let mut cx = Context::from_waker(noop_waker_ref());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(never)) => match never {},
        Poll::Pending => panic!("service not ready"),
    }
    let future = pin!(svc.call(key));
    match future.poll(&mut cx) {
        Poll::Ready(answer) => answer,
        Poll::Pending => panic!("response future pending"),
    }
}

/// Serves each key in turn; returns how many answers were `expected(key)`.
fn serve_all<S>(svc: &mut S, keys: impl Iterator<Item = u64>, expected: fn(u64) -> u64) -> u64
where
    S: Service<u64, Response = Option<u64>, Error = Infallible>,
{
    let mut correct = 0;
    for key in keys {
        if serve(svc, black_box(key)) == Ok(Some(expected(key))) {
            correct += 1;
        }
    }
    correct
}

fn hit_keys() -> impl Iterator<Item = u64> {
    (0..N).map(|i| 2 * i)
}

fn miss_keys() -> impl Iterator<Item = u64> {
    (0..N).map(|i| 2 * i + 1)
}

fn from_cache(key: u64) -> u64 {
    key
}

fn from_db(key: u64) -> u64 {
    key | FROM_DB
}

/// Serves a few hits and misses outside any window, so that nothing done once per
/// service or per thread is counted.
fn warm_up<S>(svc: &mut S)
where
    S: Service<u64, Response = Option<u64>, Error = Infallible>,
{
    assert_eq!(serve_all(svc, hit_keys().take(10), from_cache), 10);
    assert_eq!(serve_all(svc, miss_keys().take(10), from_db), 10);
}

/// Every test here runs alone. A `tracing` subscriber, even a scoped one, raises the
/// process-wide level filter, and with it every thread's requests take a cold part to
/// check for a listening span: a test warmed up before that and measured during it
/// would count the cold part its first such request takes. The filter stays raised
/// after the subscriber is gone (tracing recomputes it only when a subscriber is
/// registered, and counts its no-op subscriber as listening at every level); a test
/// that needs it low lowers it (`lower_tracing_filter`).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---- the tests ----

#[test]
fn hits_allocate_nothing() {
    let _serial = serial();
    let mut svc = stack();
    warm_up(&mut svc);

    let (allocations, served_by_cache) =
        allocations_in(|| serve_all(&mut svc, hit_keys(), from_cache));

    assert_eq!(served_by_cache, N, "every hit is served by the primary");
    assert_eq!(allocations, 0, "allocations while serving {N} hits");
}

#[test]
fn misses_allocate_nothing() {
    let _serial = serial();
    let mut svc = stack();
    warm_up(&mut svc);

    let (allocations, served_by_db) = allocations_in(|| serve_all(&mut svc, miss_keys(), from_db));

    assert_eq!(served_by_db, N, "every miss is served by the fallback");
    assert_eq!(allocations, 0, "allocations while serving {N} misses");
}

#[test]
fn control_counter_sees_a_box() {
    let _serial = serial();
    let (allocations, boxed) = allocations_in(|| black_box(Box::new(black_box(7_u64))));
    assert_eq!(*boxed, 7);
    assert_eq!(allocations, 1);

    let (allocations, ()) = allocations_in(|| {});
    assert_eq!(allocations, 0, "an empty window counts nothing");
}

#[test]
fn control_counter_sees_allocations_inside_requests() {
    let _serial = serial();
    // The same stack, but the primary boxes every response future: one allocation per
    // request, which `serve` must make inside the window.
    let cache = BoxService::new(service_fn(|key: u64| {
        ready(Ok::<_, Infallible>((key % 2 == 0).then_some(key)))
    }));
    let db = service_fn(|key: u64| ready(Ok::<_, Infallible>(Some(key | FROM_DB))));
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(db).accept(|r: &Answer| matches!(r, Ok(Some(_)))))
        .service(cache);
    warm_up(&mut svc);

    let (allocations, served_by_cache) =
        allocations_in(|| serve_all(&mut svc, hit_keys(), from_cache));

    assert_eq!(served_by_cache, N);
    assert_eq!(allocations, N as usize, "one boxed future per request");
}

// ---- every launch policy and option ----

/// A key with this bit set is "slow": the cache's future is pending on its first poll.
const SLOW: u64 = 1 << 40;

/// Requests served in the warm-up of each kind (fast and slow, hits and misses).
const WARM_UP: u64 = 10;

/// A future that answers on its second poll if `pending`, else on its first.
struct PendingOnce<T> {
    pending: bool,
    answer: Option<T>,
}

impl<T: Unpin> Future for PendingOnce<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        if self.pending {
            self.pending = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.answer.take().expect("polled after completion"))
    }
}

/// A cache that hits on even keys and misses on odd ones, and is pending once on slow
/// keys. A named type, so that every test builds its stack with the same helper.
#[derive(Clone, Copy, Debug)]
struct Cache;

impl Service<u64> for Cache {
    type Response = Option<u64>;
    type Error = Infallible;
    type Future = PendingOnce<Answer>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u64) -> Self::Future {
        PendingOnce {
            pending: key & SLOW != 0,
            answer: Some(Ok((key % 2 == 0).then_some(key))),
        }
    }
}

/// A database that has every row, and answers at once.
#[derive(Clone, Copy, Debug)]
struct Db;

impl Service<u64> for Db {
    type Response = Option<u64>;
    type Error = Infallible;
    type Future = std::future::Ready<Answer>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u64) -> Self::Future {
        ready(Ok(Some(key | FROM_DB)))
    }
}

fn is_hit(r: &Answer) -> bool {
    matches!(r, Ok(Some(_)))
}

/// The layer every policy test starts from.
fn layer() -> FallbackLayer<Db, fn(&Answer) -> bool> {
    FallbackLayer::new(Db).accept(is_hit as fn(&Answer) -> bool)
}

/// Serves one request, polling until it answers: at most twice, since the cache is
/// pending at most once and the database never.
fn serve_polling<S>(svc: &mut S, key: u64) -> Answer
where
    S: Service<u64, Response = Option<u64>, Error = Infallible>,
{
    let mut cx = Context::from_waker(noop_waker_ref());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(never)) => match never {},
        Poll::Pending => panic!("service not ready"),
    }
    let mut future = pin!(svc.call(key));
    for _ in 0..2 {
        if let Poll::Ready(answer) = future.as_mut().poll(&mut cx) {
            return answer;
        }
    }
    panic!("response future still pending after the primary answered");
}

/// The four kinds of request every policy test serves.
const KINDS: [(&str, u64, bool); 4] = [
    ("hits", 0, true),
    ("misses", 1, false),
    ("slow hits", SLOW, true),
    ("slow misses", SLOW | 1, false),
];

/// `n` keys of one kind, all distinct.
fn keys(first: u64, n: u64) -> impl Iterator<Item = u64> {
    (0..n).map(move |i| first + 2 * i)
}

/// Layers `layer` over the cache, warms it up, then serves `N` requests of every kind
/// inside a window each: every answer must be right and the window must count 0
/// allocations.
fn serves_every_kind_without_allocating<L>(layer: L)
where
    L: Layer<Cache>,
    L::Service: Service<u64, Response = Option<u64>, Error = Infallible>,
{
    let mut svc = layer.layer(Cache);
    for (kind, first, hit) in KINDS {
        let expected = if hit { from_cache } else { from_db };
        for key in keys(first, WARM_UP) {
            assert_eq!(
                serve_polling(&mut svc, key),
                Ok(Some(expected(key))),
                "{kind}"
            );
        }
    }

    for (kind, first, hit) in KINDS {
        let expected = if hit { from_cache } else { from_db };
        let (allocations, correct) = allocations_in(|| {
            let mut correct = 0;
            for key in keys(first, N) {
                if serve_polling(&mut svc, black_box(key)) == Ok(Some(expected(key))) {
                    correct += 1;
                }
            }
            correct
        });
        let by = if hit { "primary" } else { "fallback" };
        assert_eq!(correct, N, "every one of the {kind} is served by the {by}");
        assert_eq!(allocations, 0, "allocations while serving {N} {kind}");
    }
}

/// Requests each policy test serves in all, warm-up included, and how many of them the
/// primary and the fallback serve.
const SERVED: u64 = 4 * (WARM_UP + N);
const SERVED_BY_EACH: u64 = SERVED / 2;

#[test]
fn concurrent_with_slow_primaries_allocates_nothing() {
    let _serial = serial();
    // The existing tests' primaries always answer on the first poll, so the fallback is
    // only ever launched after a rejection; slow ones launch it speculatively.
    serves_every_kind_without_allocating(layer());
}

#[test]
fn sequential_allocates_nothing() {
    let _serial = serial();
    serves_every_kind_without_allocating(layer().launch(Launch::Sequential));
}

#[cfg(feature = "time")]
#[test]
fn delayed_allocates_nothing() {
    let _serial = serial();
    // A slow request arms the launch delay in tokio's timer on its first poll and
    // cancels it on the second, when the primary answers (the delay never runs out).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _entered = rt.enter();
    serves_every_kind_without_allocating(
        layer().launch(Launch::Delayed(std::time::Duration::from_secs(60))),
    );
}

#[cfg(feature = "budget")]
#[test]
fn budget_allocates_nothing() {
    let _serial = serial();
    use tower::retry::budget::TpsBudget;
    // Every request deposits; every slow one withdraws for its speculative launch. A
    // refused withdrawal makes the request sequential, which is still served right.
    serves_every_kind_without_allocating(layer().budget(TpsBudget::default()));
}

#[test]
fn outcome_hook_allocates_nothing() {
    let _serial = serial();
    let served = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let counts = Arc::clone(&served);
    let hook = move |outcome: &Outcome| {
        let i = match outcome.served {
            Served::Primary => 0,
            Served::Fallback => 1,
            _ => 2,
        };
        counts[i].fetch_add(1, Ordering::Relaxed);
    };
    serves_every_kind_without_allocating(layer().on_outcome(hook));

    let [by_primary, by_fallback, other] = &*served;
    assert_eq!(by_primary.load(Ordering::Relaxed) as u64, SERVED_BY_EACH);
    assert_eq!(by_fallback.load(Ordering::Relaxed) as u64, SERVED_BY_EACH);
    assert_eq!(other.load(Ordering::Relaxed), 0, "nothing abandoned");
}

#[cfg(feature = "quanta")]
#[test]
fn a_hook_on_the_tsc_clock_allocates_nothing() {
    let _serial = serial();
    let timed = Arc::new(AtomicUsize::new(0));
    let counts = Arc::clone(&timed);
    let layer = layer()
        .latency_clock(tower_backstop::outcome::LatencyClock::Tsc)
        .on_outcome(move |outcome: &Outcome| {
            if outcome.primary_latency.is_some() {
                counts.fetch_add(1, Ordering::Relaxed);
            }
        });
    serves_every_kind_without_allocating(layer);
    assert_eq!(
        timed.load(Ordering::Relaxed) as u64,
        SERVED,
        "every request timed"
    );
}

#[test]
fn stats_allocate_nothing() {
    let _serial = serial();
    let stats = Stats::new();
    serves_every_kind_without_allocating(layer().stats(stats.clone()));

    let counted = stats.snapshot();
    assert_eq!(counted.requests, SERVED);
    assert_eq!(counted.served_by_primary, SERVED_BY_EACH);
    assert_eq!(counted.served_by_fallback, SERVED_BY_EACH);
    assert_eq!(counted.abandoned, 0);
    // Slow requests launch speculatively under `Concurrent`; fast misses after rejection.
    assert_eq!(counted.speculative_launches, 2 * (WARM_UP + N));
    assert_eq!(counted.fallback_launches, 3 * (WARM_UP + N));
}

#[cfg(feature = "time")]
fn timer_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

#[cfg(feature = "adaptive")]
#[test]
fn adaptive_allocates_nothing() {
    let _serial = serial();
    use tower_backstop::launch::Adaptive;
    // Slow requests start their sample and arm the delay on their first poll; instant
    // answers are sampled one in eight. The delay never runs out.
    let rt = timer_runtime();
    let _entered = rt.enter();
    let adaptive = Adaptive::new(0.9, std::time::Duration::from_secs(60))
        .window(100)
        .min_samples(10);
    serves_every_kind_without_allocating(layer().launch(Launch::Adaptive(adaptive.clone())));
    assert!(adaptive.estimate().is_some(), "the calls were recorded");
}

#[cfg(feature = "time")]
#[test]
fn patience_allocates_nothing() {
    let _serial = serial();
    // A slow request's fallback answers first, which arms the patience bound; the
    // primary answers on the next poll, which cancels it.
    let rt = timer_runtime();
    let _entered = rt.enter();
    serves_every_kind_without_allocating(layer().patience(std::time::Duration::from_secs(60)));
}

/// A `tracing` subscriber that listens to everything and allocates nothing; a `deaf`
/// one listens to nothing, and says so in its level hint.
#[cfg(feature = "tracing")]
#[derive(Default)]
struct Listening {
    next_id: Arc<std::sync::atomic::AtomicU64>,
    deaf: bool,
}

#[cfg(feature = "tracing")]
impl tracing::Subscriber for Listening {
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.deaf
            .then_some(tracing::level_filters::LevelFilter::OFF)
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        !self.deaf
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[cfg(feature = "tracing")]
#[test]
fn tracing_with_a_subscriber_allocates_nothing() {
    let _serial = serial();
    // Every request makes a span, enters it for each poll and records its outcome.
    let spans = Arc::default();
    let subscriber = Listening {
        next_id: Arc::clone(&spans),
        deaf: false,
    };
    tracing::subscriber::with_default(subscriber, || {
        serves_every_kind_without_allocating(layer());
    });
    assert_eq!(
        spans.load(Ordering::Relaxed),
        SERVED,
        "one span per request"
    );
}

#[cfg(all(feature = "adaptive", feature = "budget", feature = "tracing"))]
#[test]
fn every_option_at_once_allocates_nothing() {
    let _serial = serial();
    use tower::retry::budget::TpsBudget;
    use tower_backstop::launch::Adaptive;
    let rt = timer_runtime();
    let _entered = rt.enter();
    let stats = Stats::new();
    let adaptive = Adaptive::new(0.9, std::time::Duration::from_secs(60));
    let layer = layer()
        .launch(Launch::Adaptive(adaptive))
        .budget(TpsBudget::default())
        .patience(std::time::Duration::from_secs(60))
        .stats(stats.clone())
        .on_outcome(|outcome: &Outcome| {
            black_box(outcome);
        });
    tracing::subscriber::with_default(Listening::default(), || {
        serves_every_kind_without_allocating(layer);
    });
    assert_eq!(stats.snapshot().requests, SERVED);
}

#[cfg(feature = "budget")]
#[test]
fn recycled_cold_parts_keep_nothing_of_a_layer_alive() {
    let _serial = serial();
    use tower::retry::budget::TpsBudget;
    // A hit never withdraws, so its cold part still holds the budget when the future is
    // dropped: emptying the part before it is pooled lets the budget go with the layer.
    // The hook's closure goes with it too.
    let budget = Arc::new(TpsBudget::default());
    let in_hook = Arc::new(());
    let held = Arc::clone(&in_hook);
    let mut svc = layer()
        .shared_budget(Arc::clone(&budget))
        .on_outcome(move |_: &Outcome| {
            let _ = &held;
        })
        .layer(Cache);
    assert_eq!(serve_polling(&mut svc, 0), Ok(Some(0)));
    drop(svc);
    assert_eq!(
        Arc::strong_count(&budget),
        1,
        "only the test holds the budget"
    );
    assert_eq!(
        Arc::strong_count(&in_hook),
        1,
        "only the test holds the hook's Arc"
    );
}

#[test]
fn a_panicking_hook_leaves_nothing_of_its_layer_in_the_free_list() {
    let _serial = serial();
    // The hook panics in the middle of the report: the cold part goes back to the free
    // list all the same, and must not hold the hook's closure there.
    let in_hook = Arc::new(());
    let held = Arc::clone(&in_hook);
    let mut svc = layer()
        .on_outcome(move |_: &Outcome| {
            let _ = &held;
            panic!("hook panicked on purpose");
        })
        .layer(Cache);
    let served =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve_polling(&mut svc, 0)));
    assert!(served.is_err(), "the hook's panic reaches the caller");
    drop(svc);
    assert_eq!(
        Arc::strong_count(&in_hook),
        1,
        "only the test holds the hook's Arc"
    );
}

/// Puts tracing's process-wide level filter back to `OFF`, as if no subscriber had
/// ever been installed: registering a subscriber recomputes it from the live ones, and
/// this one, the only one alive while the tests run one at a time, listens to nothing.
#[cfg(all(feature = "tracing", feature = "time"))]
fn lower_tracing_filter() {
    let deaf = Listening {
        deaf: true,
        ..Listening::default()
    };
    drop(tracing::subscriber::set_default(deaf));
    assert_eq!(
        tracing::level_filters::LevelFilter::current(),
        tracing::level_filters::LevelFilter::OFF
    );
}

/// Serves `N` hits and `N` misses whose primary answers on its first poll through
/// `layer`, on a thread of its own and without a warm-up, so that its free list of cold
/// parts is empty: taking one would allocate it. Returns the allocations counted.
#[cfg(feature = "time")]
fn first_poll_answers_on_a_new_thread<L>(layer: L) -> usize
where
    L: Layer<Cache> + Send + 'static,
    L::Service: Service<u64, Response = Option<u64>, Error = Infallible>,
{
    // Whatever tests ran before: no request may take a cold part for `tracing`.
    #[cfg(feature = "tracing")]
    lower_tracing_filter();
    std::thread::spawn(move || {
        let rt = timer_runtime();
        let _entered = rt.enter();
        let mut svc = layer.layer(Cache);
        let (allocations, correct) = allocations_in(|| {
            let hits = keys(0, N).filter(|&k| serve_polling(&mut svc, k) == Ok(Some(k)));
            let hits = hits.count() as u64;
            let misses = keys(1, N).filter(|&k| serve_polling(&mut svc, k) == Ok(Some(from_db(k))));
            hits + misses.count() as u64
        });
        assert_eq!(
            correct,
            2 * N,
            "every request is served by the right service"
        );
        allocations
    })
    .join()
    .unwrap()
}

#[cfg(feature = "time")]
#[test]
fn a_delayed_layer_takes_no_cold_part_when_the_primary_answers_at_once() {
    let _serial = serial();
    // The launch delay is armed only when the primary is found pending.
    let layer = layer().launch(Launch::Delayed(std::time::Duration::from_millis(50)));
    assert_eq!(first_poll_answers_on_a_new_thread(layer), 0);
}

#[cfg(feature = "time")]
#[test]
fn a_patient_layer_takes_no_cold_part_when_the_primary_answers_at_once() {
    let _serial = serial();
    // The patience bound is armed only when the fallback answers first.
    let layer = layer().patience(std::time::Duration::from_millis(50));
    assert_eq!(first_poll_answers_on_a_new_thread(layer), 0);
}
