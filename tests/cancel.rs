//! `cancel::Slot`, `OnCancel` and `OnCancelLayer`: a call dropped while its slot is
//! filled runs the cancel action with the call's handle, once; a call that completes
//! — with or without `disarm`, or by an early `?` — (or never filled its slot) runs
//! nothing; nested calls, other threads and panics; the runs are counted in `Stats`;
//! under `Fallback`, a cache hit cancels the database call in flight and a miss does
//! not; nothing is allocated.
//!
//! The probe services hold their slot in their future; a `oneshot` sender kept by the
//! test decides when they answer, so "dropped before it answered" is exact.

use std::{
    convert::Infallible,
    future::{ready, Future},
    pin::pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
};

use futures_util::task::noop_waker_ref;
use tokio::sync::oneshot;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use tower_backstop::{
    cancel::{Cancel, OnCancel, OnCancelLayer, Slot},
    outcome::Stats,
    FallbackLayer,
};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

/// The handles the cancel action was given, in order.
#[derive(Clone, Default)]
struct Cancelled(Arc<Mutex<Vec<u64>>>);

impl Cancelled {
    fn action(&self) -> impl FnOnce(u64) + Clone {
        let seen = self.0.clone();
        move |handle| seen.lock().unwrap().push(handle)
    }

    fn seen(&self) -> Vec<u64> {
        self.0.lock().unwrap().clone()
    }
}

/// A database whose call fills its slot with `key * 10`, then waits for the test to
/// send its answer on the `oneshot` handed out through `gates`, then disarms.
fn gated_db<C>(
    gates: tokio::sync::mpsc::UnboundedSender<oneshot::Sender<u64>>,
) -> impl Service<(u64, Slot<u64, C>), Response = u64, Error = Infallible, Future: Send> + Clone
where
    C: Cancel<u64> + Send + 'static,
{
    gated(gates, true)
}

/// As [`gated_db`], disarming at the end only if `disarm`: a call that forgot.
fn gated<C>(
    gates: tokio::sync::mpsc::UnboundedSender<oneshot::Sender<u64>>,
    disarm: bool,
) -> impl Service<(u64, Slot<u64, C>), Response = u64, Error = Infallible, Future: Send> + Clone
where
    C: Cancel<u64> + Send + 'static,
{
    service_fn(move |(key, mut slot): (u64, Slot<u64, C>)| {
        let gates = gates.clone();
        async move {
            slot.fill(key * 10);
            let (tx, rx) = oneshot::channel();
            let _ = gates.send(tx);
            let answer = rx.await.unwrap_or(0);
            if disarm {
                slot.disarm();
            }
            Ok(answer)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn dropped_mid_call_runs_the_action_with_the_handle() {
    let cancelled = Cancelled::default();
    let (gates, mut opened) = tokio::sync::mpsc::unbounded_channel();
    let db = OnCancelLayer::new(cancelled.action()).layer(gated_db(gates));

    let mut fut = Box::pin(db.oneshot(4));
    assert!(futures_util::poll!(fut.as_mut()).is_pending());
    let gate = opened.recv().await.expect("the call started");
    assert!(
        cancelled.seen().is_empty(),
        "nothing cancelled while in flight"
    );
    drop(fut);
    assert_eq!(cancelled.seen(), [40]);
    assert!(gate.is_closed(), "the call's future is gone");
}

#[tokio::test(start_paused = true)]
async fn completed_call_runs_nothing() {
    let cancelled = Cancelled::default();
    let (gates, mut opened) = tokio::sync::mpsc::unbounded_channel();
    let db = OnCancelLayer::new(cancelled.action()).layer(gated_db(gates));

    let fut = tokio::spawn(db.oneshot(4));
    opened.recv().await.unwrap().send(99).unwrap();
    assert_eq!(fut.await.unwrap(), Ok(99));
    assert!(cancelled.seen().is_empty());
}

#[test]
fn slot_dropped_empty_runs_nothing() {
    let cancelled = Cancelled::default();
    let slot = Slot::new(cancelled.action());
    assert!(!slot.is_armed());
    drop(slot);
    assert!(cancelled.seen().is_empty());
}

#[test]
fn slot_cancels_at_most_once() {
    let cancelled = Cancelled::default();
    let mut slot = Slot::new(cancelled.action());
    slot.fill(1);
    assert!(slot.cancel());
    assert!(!slot.is_armed());
    // Spent: a handle filled afterwards is only held.
    slot.fill(2);
    assert!(!slot.cancel());
    drop(slot);
    assert_eq!(cancelled.seen(), [1]);
}

#[test]
fn refilling_a_slot_drops_the_old_handle_without_cancelling() {
    let cancelled = Cancelled::default();
    let mut slot = Slot::new(cancelled.action());
    slot.fill(1);
    slot.fill(2);
    assert_eq!(slot.get(), Some(&2));
    drop(slot);
    assert_eq!(cancelled.seen(), [2]);
}

/// The cache answers `Some` for even keys, `None` for odd ones, at once.
fn cache() -> impl Service<u64, Response = Option<u64>, Error = Infallible, Future: Send> + Clone {
    service_fn(|key: u64| ready(Ok::<_, Infallible>((key % 2 == 0).then_some(key))))
}

fn db_rows<S>(
    db: S,
) -> impl Service<u64, Response = Option<u64>, Error = Infallible, Future: Send> + Clone
where
    S: Service<u64, Response = u64, Error = Infallible, Future: Send> + Clone,
{
    db.map_response(Some)
}

#[tokio::test(start_paused = true)]
async fn under_fallback_a_hit_cancels_the_database_call_in_flight() {
    let cancelled = Cancelled::default();
    let (gates, mut opened) = tokio::sync::mpsc::unbounded_channel();
    let db = db_rows(OnCancelLayer::new(cancelled.action()).layer(gated_db(gates)));
    // The cache answers on its first poll, before the database call would even start:
    // make it pending once so that the database call is in flight when it hits.
    let cache = cache().then(|r| async move {
        tokio::task::yield_now().await;
        r
    });
    let svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new(db)
                .accept(|r: &Result<Option<u64>, Infallible>| matches!(r, Ok(Some(_)))),
        )
        .service(cache);

    assert_eq!(svc.oneshot(6).await, Ok(Some(6)));
    let gate = opened.recv().await.expect("the database call started");
    assert!(gate.is_closed());
    assert_eq!(cancelled.seen(), [60]);
}

#[tokio::test(start_paused = true)]
async fn under_fallback_a_miss_cancels_nothing() {
    let cancelled = Cancelled::default();
    let (gates, mut opened) = tokio::sync::mpsc::unbounded_channel();
    let db = db_rows(OnCancelLayer::new(cancelled.action()).layer(gated_db(gates)));
    let svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new(db)
                .accept(|r: &Result<Option<u64>, Infallible>| matches!(r, Ok(Some(_)))),
        )
        .service(cache());

    let fut = tokio::spawn(svc.oneshot(7));
    opened.recv().await.unwrap().send(7).unwrap();
    assert_eq!(fut.await.unwrap(), Ok(Some(7)));
    assert!(cancelled.seen().is_empty());
}

#[test]
fn errors_and_readiness_pass_through() {
    #[derive(Debug, PartialEq)]
    struct NotReady;
    struct Refusing;
    impl Service<(u64, Slot<u64, fn(u64)>)> for Refusing {
        type Response = u64;
        type Error = NotReady;
        type Future = std::future::Ready<Result<u64, NotReady>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), NotReady>> {
            Poll::Ready(Err(NotReady))
        }
        fn call(&mut self, _: (u64, Slot<u64, fn(u64)>)) -> Self::Future {
            ready(Err(NotReady))
        }
    }
    let mut svc: OnCancel<_, fn(u64), u64> = OnCancel::new(Refusing, |_| {});
    let mut cx = Context::from_waker(noop_waker_ref());
    assert_eq!(
        Service::<u64>::poll_ready(&mut svc, &mut cx),
        Poll::Ready(Err(NotReady))
    );
    let fut = pin!(svc.call(1));
    assert_eq!(fut.poll(&mut cx), Poll::Ready(Err(NotReady)));
}

#[test]
fn no_allocation_per_call_completed_or_dropped() {
    static CANCELS: AtomicUsize = AtomicUsize::new(0);
    let action = |_handle: u64| {
        CANCELS.fetch_add(1, Ordering::Relaxed);
    };
    let inner = service_fn(|(key, mut slot): (u64, Slot<u64, _>)| {
        slot.fill(key);
        // Odd keys "complete": they disarm; even keys are dropped armed.
        if key % 2 == 1 {
            slot.disarm();
        }
        ready(Ok::<_, Infallible>((key, slot)))
    });
    let mut svc = OnCancel::new(inner, action);
    let mut cx = Context::from_waker(noop_waker_ref());
    let (count, ()) = counting_alloc::allocations_in(|| {
        for key in 0..1000u64 {
            assert!(Service::<u64>::poll_ready(&mut svc, &mut cx).is_ready());
            let fut = pin!(svc.call(key));
            match fut.poll(&mut cx) {
                Poll::Ready(Ok((k, slot))) => {
                    assert_eq!(k, key);
                    drop(slot);
                }
                _ => unreachable!(),
            }
        }
    });
    assert_eq!(count, 0, "allocations in 1000 calls");
    assert_eq!(CANCELS.load(Ordering::Relaxed), 500);
}

// ---- A call that answered never runs its action, whatever its code forgot.

#[tokio::test(start_paused = true)]
async fn completed_call_without_disarm_runs_nothing() {
    let (cancelled, stats) = (Cancelled::default(), Stats::new());
    let (gates, mut opened) = tokio::sync::mpsc::unbounded_channel();
    let db = OnCancelLayer::new(cancelled.action())
        .stats(stats.clone())
        .layer(gated(gates, false));

    let fut = tokio::spawn(db.oneshot(4));
    opened.recv().await.unwrap().send(99).unwrap();
    assert_eq!(fut.await.unwrap(), Ok(99));
    assert!(
        cancelled.seen().is_empty(),
        "a completed call was cancelled"
    );
    assert_eq!(stats.snapshot().cancels, 0);
}

#[tokio::test(start_paused = true)]
async fn early_return_with_question_mark_runs_nothing() {
    let cancelled = Cancelled::default();
    let (gates, mut opened) = tokio::sync::mpsc::unbounded_channel();
    let db = OnCancelLayer::new(cancelled.action()).layer(service_fn(
        move |(key, mut slot): (u64, Slot<u64, _>)| {
            let gates = gates.clone();
            async move {
                slot.fill(key);
                let (tx, rx) = oneshot::channel::<Result<u64, &'static str>>();
                let _ = gates.send(tx);
                // The query failed: over, and returned at once, slot filled.
                let row = rx.await.unwrap()?;
                slot.disarm();
                Ok::<_, &'static str>(row)
            }
        },
    ));

    let fut = tokio::spawn(db.oneshot(4));
    opened
        .recv()
        .await
        .unwrap()
        .send(Err("no such row"))
        .unwrap();
    assert_eq!(fut.await.unwrap(), Err("no such row"));
    assert!(cancelled.seen().is_empty());
}

#[tokio::test(start_paused = true)]
async fn dropped_mid_call_runs_the_action_once_and_counts_it() {
    let (cancelled, stats) = (Cancelled::default(), Stats::new());
    let (gates, mut opened) = tokio::sync::mpsc::unbounded_channel();
    let db = OnCancelLayer::new(cancelled.action())
        .stats(stats.clone())
        .layer(gated(gates, false));

    let mut fut = Box::pin(db.clone().oneshot(4));
    assert!(futures_util::poll!(fut.as_mut()).is_pending());
    let _gate = opened.recv().await.unwrap();
    drop(fut);
    // One completed call next to it changes nothing.
    let done = tokio::spawn(db.oneshot(5));
    opened.recv().await.unwrap().send(5).unwrap();
    assert_eq!(done.await.unwrap(), Ok(5));

    assert_eq!(cancelled.seen(), [40]);
    let counted = stats.snapshot();
    assert_eq!(counted.cancels, 1);
    assert!(
        counted.to_string().ends_with("; 1 cancel actions run"),
        "{counted}"
    );
}

/// An outer `OnCancel` call whose code drives an inner `OnCancel` call: to its end
/// (no cancel, though neither disarms), or dropping it mid-way (the inner one is
/// cancelled, the outer one, which then answers, is not).
#[tokio::test(start_paused = true)]
async fn nested_calls_each_know_their_own() {
    let (outer_cancelled, inner_cancelled) = (Cancelled::default(), Cancelled::default());
    let (gates, mut opened) = tokio::sync::mpsc::unbounded_channel();
    let inner = OnCancelLayer::new(inner_cancelled.action()).layer(gated(gates, false));
    let outer = OnCancelLayer::new(outer_cancelled.action()).layer(service_fn(
        move |(key, mut slot): (u64, Slot<u64, _>)| {
            let inner = inner.clone();
            async move {
                slot.fill(key);
                let mut call = Box::pin(inner.oneshot(key));
                // Even keys: the inner call runs to its end. Odd keys: given up after
                // one poll, inside this call's poll.
                if key % 2 == 0 {
                    call.await
                } else {
                    assert!(futures_util::poll!(call.as_mut()).is_pending());
                    drop(call);
                    Ok(0)
                }
            }
        },
    ));

    let fut = tokio::spawn(outer.clone().oneshot(2));
    opened.recv().await.unwrap().send(20).unwrap();
    assert_eq!(fut.await.unwrap(), Ok(20));
    assert!(inner_cancelled.seen().is_empty());
    assert!(outer_cancelled.seen().is_empty());

    assert_eq!(outer.clone().oneshot(3).await, Ok(0));
    assert_eq!(
        inner_cancelled.seen(),
        [30],
        "the inner call dropped mid-way"
    );
    assert!(outer_cancelled.seen().is_empty(), "the outer call answered");

    // Both dropped from outside, mid-call: both cancelled.
    let mut fut = Box::pin(outer.oneshot(4));
    assert!(futures_util::poll!(fut.as_mut()).is_pending());
    let _gate = opened.recv().await.unwrap();
    drop(fut);
    assert_eq!(inner_cancelled.seen(), [30, 40]);
    assert_eq!(outer_cancelled.seen(), [4]);
}

/// A call polled on one thread and dropped, or run to its end, on another.
#[test]
fn calls_moved_to_another_thread() {
    let cancelled = Cancelled::default();
    let db = OnCancelLayer::new(cancelled.action()).layer(service_fn(
        |(key, mut slot): (u64, Slot<u64, _>)| async move {
            slot.fill(key);
            // Pending once, then done: no disarm.
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(key)
        },
    ));
    let mut cx = Context::from_waker(noop_waker_ref());

    let mut dropped = Box::pin(db.clone().oneshot(1));
    assert!(dropped.as_mut().poll(&mut cx).is_pending());
    std::thread::spawn(move || drop(dropped)).join().unwrap();
    assert_eq!(cancelled.seen(), [1], "dropped on another thread");

    let mut finished = Box::pin(db.oneshot(2));
    assert!(finished.as_mut().poll(&mut cx).is_pending());
    let answer = std::thread::spawn(move || {
        let mut cx = Context::from_waker(noop_waker_ref());
        finished.as_mut().poll(&mut cx)
    })
    .join()
    .unwrap();
    assert_eq!(answer, Poll::Ready(Ok(2)));
    assert_eq!(cancelled.seen(), [1], "completed on another thread");
}

/// A poll that panics is no answer: the slot runs its action (the work may still be
/// running), once, and the thread's mark is restored for the next call.
#[test]
fn a_panicking_poll_runs_the_action() {
    let cancelled = Cancelled::default();
    let db = OnCancelLayer::new(cancelled.action()).layer(service_fn(
        |(key, mut slot): (u64, Slot<u64, _>)| async move {
            slot.fill(key);
            tokio::task::yield_now().await;
            if key == 1 {
                panic!("the call panicked on purpose");
            }
            Ok::<_, Infallible>(key)
        },
    ));
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut fut = Box::pin(db.clone().oneshot(1));
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = fut.as_mut().poll(&mut cx);
    }));
    assert!(panicked.is_err());
    drop(fut);
    assert_eq!(cancelled.seen(), [1]);

    let mut fut = Box::pin(db.oneshot(2));
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    assert_eq!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(2)));
    drop(fut);
    assert_eq!(cancelled.seen(), [1]);
}

/// A slot made by hand belongs to no call: dropped filled it runs its action, even
/// inside an `OnCancel` call's poll.
#[tokio::test(start_paused = true)]
async fn a_slot_made_by_hand_always_runs_its_action() {
    let (by_hand, layered) = (Cancelled::default(), Cancelled::default());
    let by_hand_action = by_hand.action();
    let db = OnCancelLayer::new(layered.action()).layer(service_fn(
        move |(key, mut slot): (u64, Slot<u64, _>)| {
            let by_hand_action = by_hand_action.clone();
            async move {
                slot.fill(key);
                let mut own = Slot::new(by_hand_action);
                own.fill(key + 1);
                drop(own);
                Ok::<_, Infallible>(key)
            }
        },
    ));
    assert_eq!(db.oneshot(7).await, Ok(7));
    assert_eq!(by_hand.seen(), [8]);
    assert!(layered.seen().is_empty());
}

/// A hand-written call future that keeps its filled slot after answering: the slot is
/// dropped only with the future, outside any poll.
struct KeepsItsSlot<C: Cancel<u64>> {
    slot: Slot<u64, C>,
    answered: bool,
}

impl<C: Cancel<u64> + Unpin> Future for KeepsItsSlot<C> {
    type Output = Result<u64, Infallible>;

    fn poll(mut self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        assert!(!self.answered, "polled after it answered");
        self.answered = true;
        Poll::Ready(Ok(*self.slot.get().expect("filled in call")))
    }
}

#[test]
fn a_future_that_keeps_its_slot_after_answering_runs_nothing() {
    let (cancelled, stats) = (Cancelled::default(), Stats::new());
    let mut db = OnCancelLayer::new(cancelled.action())
        .stats(stats.clone())
        .layer(service_fn(|(key, mut slot): (u64, Slot<u64, _>)| {
            slot.fill(key);
            KeepsItsSlot {
                slot,
                answered: false,
            }
        }));
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut fut = Box::pin(db.call(3));
    assert_eq!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(3)));
    // Dropped after it answered, as `Fallback` drops a served branch's spent future.
    drop(fut);
    assert!(
        cancelled.seen().is_empty(),
        "a call that answered was cancelled"
    );
    assert_eq!(stats.snapshot().cancels, 0);
}
