//! Per-request overhead of the `Fallback` middleware over hand-written code doing the
//! same work.
//!
//! Two paths, one criterion group each:
//!
//! - `hit`: the primary answers `Ok(Some(v))`, the predicate accepts it, the fallback is
//!   dropped;
//! - `miss`: the primary answers `Ok(None)`, the predicate rejects it, and the fallback's
//!   `Ok(Some(v))` is served.
//!
//! In each group, `floor` is the same work written by hand with no middleware: clone
//! the request, ready and call the fallback up front, ready and call and poll the
//! primary, drop the fallback's future on a hit or poll it on a miss. `fallback_layer`
//! is a `Fallback` built by `FallbackLayer`. Both services answer with
//! `std::future::Ready`, and every future is polled by hand with a no-op waker, so
//! there is no runtime in the measured loop: the difference between the two is the
//! middleware's own cost.
//!
//! Launch policies added later get one more function each, called from `paths`, so
//! they land in the same groups next to `floor`.
//!
//! Run with `cargo bench --bench overhead` (about 20 seconds).

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use futures_util::task::noop_waker_ref;
use std::{
    convert::Infallible,
    future::{ready, Future, Ready},
    hint::black_box,
    pin::pin,
    task::{Context, Poll},
    time::Duration,
};
use tower::{Layer, Service};
use tower_backstop::{accept::Accept, FallbackLayer};

type Answer = Result<Option<u64>, Infallible>;

/// Added by the fallback to its answers, so the two services' answers differ.
const FROM_FALLBACK: u64 = 1 << 32;

/// The primary: a cache that always hits (`HIT = true`) or always misses.
#[derive(Clone, Copy, Debug)]
struct Cache<const HIT: bool>;

impl<const HIT: bool> Service<u64> for Cache<HIT> {
    type Response = Option<u64>;
    type Error = Infallible;
    type Future = Ready<Answer>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u64) -> Self::Future {
        ready(Ok(HIT.then_some(key)))
    }
}

/// The fallback: a database that always has the row.
#[derive(Clone, Copy, Debug)]
struct Db;

impl Service<u64> for Db {
    type Response = Option<u64>;
    type Error = Infallible;
    type Future = Ready<Answer>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u64) -> Self::Future {
        ready(Ok(Some(key | FROM_FALLBACK)))
    }
}

/// Accepts only a cache hit. A plain `fn` item so that the floor and every middleware
/// variant share one predicate (a closure literal would give each its own type).
fn is_hit(r: &Answer) -> bool {
    matches!(r, Ok(Some(_)))
}

fn expect_ready<T>(poll: Poll<T>) -> T {
    match poll {
        Poll::Ready(t) => t,
        Poll::Pending => unreachable!("every service here answers on the first poll"),
    }
}

/// Serves one request through any service, the way a caller does: ready, call, poll.
fn drive<S>(svc: &mut S, req: u64) -> Answer
where
    S: Service<u64, Response = Option<u64>, Error = Infallible>,
{
    let mut cx = Context::from_waker(noop_waker_ref());
    expect_ready(svc.poll_ready(&mut cx)).unwrap();
    let fut = pin!(svc.call(req));
    expect_ready(fut.poll(&mut cx))
}

/// The same work as the middleware, written out by hand.
fn floor_call<P, F, A>(primary: &mut P, fallback: &mut F, accept: &A, req: u64) -> Answer
where
    P: Service<u64, Response = Option<u64>, Error = Infallible>,
    F: Service<u64, Response = Option<u64>, Error = Infallible>,
    A: Accept<Option<u64>, Infallible>,
{
    let mut cx = Context::from_waker(noop_waker_ref());
    expect_ready(primary.poll_ready(&mut cx)).unwrap();
    #[allow(clippy::clone_on_copy)] // the middleware clones the request: so does the floor
    let fallback_req = req.clone();
    let primary_fut = pin!(primary.call(req));
    expect_ready(fallback.poll_ready(&mut cx)).unwrap();
    let fallback_fut = fallback.call(fallback_req);

    let result = expect_ready(primary_fut.poll(&mut cx));
    if accept.accept(&result) {
        drop(fallback_fut);
        return result;
    }
    expect_ready(pin!(fallback_fut).poll(&mut cx))
}

fn floor<const HIT: bool>(
    group: &mut BenchmarkGroup<'_, impl criterion::measurement::Measurement>,
) {
    let (mut cache, mut db) = (Cache::<HIT>, Db);
    group.bench_function("floor", |b| {
        b.iter(|| floor_call(&mut cache, &mut db, &is_hit, black_box(7)))
    });
}

fn fallback_layer<const HIT: bool>(
    group: &mut BenchmarkGroup<'_, impl criterion::measurement::Measurement>,
) {
    let mut svc = FallbackLayer::new(Db).accept(is_hit).layer(Cache::<HIT>);
    group.bench_function("fallback_layer", |b| {
        b.iter(|| drive(&mut svc, black_box(7)))
    });
}

/// One group per path; every variant of the middleware is one function in each.
fn paths(c: &mut Criterion) {
    check_answers();

    let mut hit = c.benchmark_group("hit");
    floor::<true>(&mut hit);
    fallback_layer::<true>(&mut hit);
    hit.finish();

    let mut miss = c.benchmark_group("miss");
    floor::<false>(&mut miss);
    fallback_layer::<false>(&mut miss);
    miss.finish();
}

/// Makes sure every variant does the work it is timed for before timing it.
fn check_answers() {
    let mut hit = FallbackLayer::new(Db).accept(is_hit).layer(Cache::<true>);
    let mut miss = FallbackLayer::new(Db).accept(is_hit).layer(Cache::<false>);
    assert_eq!(drive(&mut hit, 7), Ok(Some(7)));
    assert_eq!(drive(&mut miss, 7), Ok(Some(7 | FROM_FALLBACK)));
    assert_eq!(
        floor_call(&mut Cache::<true>, &mut Db, &is_hit, 7),
        Ok(Some(7))
    );
    assert_eq!(
        floor_call(&mut Cache::<false>, &mut Db, &is_hit, 7),
        Ok(Some(7 | FROM_FALLBACK))
    );
}

criterion_group! {
    name = overhead;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = paths
}
criterion_main!(overhead);
