//! `cancel::Slot`, `OnCancel` and `OnCancelLayer`: a call dropped while its slot is
//! filled runs the cancel action with the call's handle, once; a call that completes
//! (or never filled its slot) runs nothing; under `Fallback`, a cache hit cancels the
//! database call in flight and a miss does not; nothing is allocated.
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
    cancel::{OnCancel, OnCancelLayer, Slot},
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
    C: tower_backstop::cancel::Cancel<u64> + Send + 'static,
{
    service_fn(move |(key, mut slot): (u64, Slot<u64, C>)| {
        let gates = gates.clone();
        async move {
            slot.fill(key * 10);
            let (tx, rx) = oneshot::channel();
            let _ = gates.send(tx);
            let answer = rx.await.unwrap_or(0);
            slot.disarm();
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
