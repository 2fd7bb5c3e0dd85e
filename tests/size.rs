//! The response future stays small, whatever features are compiled in and whatever
//! options the layer uses: a caller that awaits it moves it a few times before its
//! first poll, so every byte costs on every request.
//!
//! Everything optional (timers, the outcome tracker, the budget, the adaptive sample)
//! is behind one pointer, so the size below holds for every feature set; CI runs the
//! tests with the default features and with all of them.

use std::{
    convert::Infallible,
    future::{ready, Ready},
    mem::size_of,
};
use tower::{service_fn, Service};
use tower_backstop::{
    refill::{NoRefill, Write},
    Fallback,
};

type Answer = Result<Option<u64>, Infallible>;

fn is_hit(r: &Answer) -> bool {
    matches!(r, Ok(Some(_)))
}

fn future_size<S: Service<u64>>(_: &S) -> usize {
    size_of::<S::Future>()
}

#[test]
fn the_hot_future_holds_the_branches_the_predicate_and_a_word() {
    // The trivial services: a cache and a database answering
    // `std::future::Ready`, and a predicate that is a function pointer.
    let cache = service_fn(|k: u64| ready(Ok::<_, Infallible>((k % 2 == 0).then_some(k))));
    let db = service_fn(|k: u64| ready(Ok::<_, Infallible>(Some(k))));
    let svc = Fallback::new(cache, db).accept(is_hit as fn(&Answer) -> bool);

    // The primary's future; the fallback's branch: its future or the request, and a
    // tag; the predicate; a word for the plan and the flags; the cold part's pointer.
    // (Before the split: 312 bytes with the default features, 400 with all.)
    let word = size_of::<usize>();
    let primary = size_of::<Option<Ready<Answer>>>();
    let branch = size_of::<Ready<Answer>>().max(size_of::<Option<u64>>()) + word;
    let bound = primary + branch + size_of::<fn()>() + word + word;
    let size = future_size(&svc);
    assert!(size <= bound, "{size} bytes, more than {bound}");
}

#[test]
fn no_refill_adds_nothing_to_the_future() {
    let cache = service_fn(|k: u64| ready(Ok::<_, Infallible>((k % 2 == 0).then_some(k))));
    let db = service_fn(|k: u64| ready(Ok::<_, Infallible>(Some(k))));
    let svc = Fallback::new(cache, db).accept(is_hit as fn(&Answer) -> bool);

    // `NoRefill` keeps an uninhabited key: the hot part's refill slot is zero-sized,
    // and the future is as large as before refills existed (64 bytes on 64-bit
    // targets, measured on both sides of the change).
    assert_eq!(size_of::<Option<(NoRefill, Infallible)>>(), 0);
    let plain = future_size(&svc);
    assert_eq!(future_size(&svc.clone().refill(NoRefill)), plain);
    if size_of::<usize>() == 8 {
        assert_eq!(plain, 64);
    }

    // A refill that keeps a `u64` key costs that key, its tag and the action.
    let refill = |_key: u64, _res: &Option<u64>| Ok::<_, Infallible>(Write::Started);
    let with_refill = future_size(&svc.refill(refill));
    assert!(
        with_refill <= plain + 2 * size_of::<u64>(),
        "{with_refill} bytes"
    );
}
