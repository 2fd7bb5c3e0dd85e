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
//! Windows are serialized by a mutex and count only on the thread that opened them, so
//! the tests can run in parallel with each other and with the test harness.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    convert::Infallible,
    future::{ready, Future},
    hint::black_box,
    pin::pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, PoisonError,
    },
    task::{Context, Poll},
};

use futures_util::task::noop_waker_ref;
use tower::{service_fn, util::BoxService, Service, ServiceBuilder};
use tower_backstop::FallbackLayer;

/// Requests served in each measured window.
const N: u64 = 1000;

/// Added by the fallback to its answers, so the two services' answers differ.
const FROM_DB: u64 = 1 << 32;

type Answer = Result<Option<u64>, Infallible>;

// ---- the counting allocator ----

struct CountingAllocator;

/// Allocations made while counting was on, on any thread.
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread's allocations are counted. `const`-initialized and without a
    /// destructor, so reading it never allocates.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn count_one() {
    // `try_with`: the allocator can run while this thread's locals are being torn down.
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// only addition is an atomic counter update, which does not allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Only one measured window is open at a time, so `ALLOCATIONS` changes only for it.
static WINDOW: Mutex<()> = Mutex::new(());

/// Turns counting off when the window closes, even if the measured code panics.
struct CountingOn;

impl CountingOn {
    fn start() -> Self {
        COUNTING.with(|c| c.set(true));
        CountingOn
    }
}

impl Drop for CountingOn {
    fn drop(&mut self) {
        COUNTING.with(|c| c.set(false));
    }
}

/// Runs `f` and returns how many allocations this thread made meanwhile, with `f`'s
/// output.
fn allocations_in<R>(f: impl FnOnce() -> R) -> (usize, R) {
    // A test that failed while holding the lock leaves the counter consistent: counting
    // was switched off by `CountingOn`'s drop before the lock was released.
    let _window = WINDOW.lock().unwrap_or_else(PoisonError::into_inner);
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    let counting = CountingOn::start();
    let output = f();
    drop(counting);
    let after = ALLOCATIONS.load(Ordering::SeqCst);
    (after - before, output)
}

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

// ---- the tests ----

#[test]
fn hits_allocate_nothing() {
    let mut svc = stack();
    warm_up(&mut svc);

    let (allocations, served_by_cache) =
        allocations_in(|| serve_all(&mut svc, hit_keys(), from_cache));

    assert_eq!(served_by_cache, N, "every hit is served by the primary");
    assert_eq!(allocations, 0, "allocations while serving {N} hits");
}

#[test]
fn misses_allocate_nothing() {
    let mut svc = stack();
    warm_up(&mut svc);

    let (allocations, served_by_db) = allocations_in(|| serve_all(&mut svc, miss_keys(), from_db));

    assert_eq!(served_by_db, N, "every miss is served by the fallback");
    assert_eq!(allocations, 0, "allocations while serving {N} misses");
}

#[test]
fn control_counter_sees_a_box() {
    let (allocations, boxed) = allocations_in(|| black_box(Box::new(black_box(7_u64))));
    assert_eq!(*boxed, 7);
    assert_eq!(allocations, 1);

    let (allocations, ()) = allocations_in(|| {});
    assert_eq!(allocations, 0, "an empty window counts nothing");
}

#[test]
fn control_counter_sees_allocations_inside_requests() {
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
