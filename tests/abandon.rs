//! Abandoned requests: their elapsed time runs to the drop, whenever the future was
//! last polled, and a response future dropped before its first poll — a request that
//! never ran — is reported once, in one way, by every observer: counted as abandoned
//! and unpolled, depositing nothing in a budget, teaching an adaptive launch nothing.

mod support;

use std::{future::Future, task::Poll, time::Duration};
use support::{hit, poll_once, Outcomes, Probe, Reply};
use tower::Service;
use tower_backstop::{
    launch::Launch,
    outcome::{Fate, Outcome, Served, Stats, Verdict},
    Fallback,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A request under `launch` whose future is polled at each of `polls` (ms after the
/// call) and dropped at `drop_at`, with no poll then; both branches take a second.
async fn abandoned_at(launch: Launch, polls: &[u64], drop_at: u64) -> Outcome {
    let outcomes = Outcomes::default();
    let mut svc = Fallback::new(
        Probe::fixed("cache", 1_000, Reply::Value(1)),
        Probe::fixed("db", 1_000, Reply::Value(2)),
    )
    .accept(hit)
    .launch(launch)
    .on_outcome(outcomes.hook());
    let origin = tokio::time::Instant::now();
    let mut fut = Box::pin(svc.call(1));
    for &at in polls {
        tokio::time::sleep_until(origin + ms(at)).await;
        assert!(poll_once(&mut fut).await.is_pending());
    }
    tokio::time::sleep_until(origin + ms(drop_at)).await;
    drop(fut);
    outcomes.only()
}

#[tokio::test(start_paused = true)]
async fn elapsed_runs_to_the_drop_under_every_policy() {
    // The cases: polled at 0 and dropped at 500 ms with no poll then.
    let concurrent = abandoned_at(Launch::Concurrent, &[0], 500).await;
    assert_eq!(concurrent.served, Served::Abandoned);
    assert_eq!(concurrent.elapsed, ms(500), "{concurrent:?}");
    let delayed = abandoned_at(Launch::Delayed(ms(100)), &[0, 101], 500).await;
    assert_eq!(delayed.launched_after, Some(ms(101)));
    assert_eq!(delayed.elapsed, ms(500), "{delayed:?}");
    let sequential = abandoned_at(Launch::Sequential, &[0, 200], 500).await;
    assert_eq!(sequential.elapsed, ms(500), "{sequential:?}");
    #[cfg(feature = "adaptive")]
    {
        let adaptive = tower_backstop::launch::Adaptive::new(0.9, ms(100));
        let o = abandoned_at(Launch::Adaptive(adaptive), &[0, 101, 300], 500).await;
        assert_eq!(o.elapsed, ms(500), "{o:?}");
    }
    // Polled at the very moment it was dropped: the same answer.
    let polled_then = abandoned_at(Launch::Concurrent, &[0, 500], 500).await;
    assert_eq!(polled_then.elapsed, ms(500));
    assert!(polled_then.polled);
}

#[cfg(feature = "quanta")]
#[tokio::test]
async fn elapsed_runs_to_the_drop_on_the_tsc_clock() {
    use tower_backstop::outcome::LatencyClock;
    let outcomes = Outcomes::default();
    let mut svc = Fallback::new(
        Probe::fixed("cache", 60_000, Reply::Value(1)),
        Probe::fixed("db", 60_000, Reply::Value(2)),
    )
    .accept(hit)
    .latency_clock(LatencyClock::Tsc)
    .on_outcome(outcomes.hook());
    let mut fut = Box::pin(svc.call(1));
    assert!(poll_once(&mut fut).await.is_pending());
    // A real 30 ms without a poll, then the drop.
    tokio::time::sleep(ms(30)).await;
    drop(fut);
    let o = outcomes.only();
    assert!(o.elapsed >= ms(30), "{o:?}");
}

#[tokio::test(start_paused = true)]
async fn a_future_dropped_unpolled_is_reported_once_as_unpolled() {
    let outcomes = Outcomes::default();
    let stats = Stats::new();
    let mut svc = Fallback::new(
        Probe::fixed("cache", 5, Reply::Value(1)),
        Probe::fixed("db", 5, Reply::Value(2)),
    )
    .accept(hit)
    .stats(stats.clone())
    .on_outcome(outcomes.hook());
    let fut = svc.call(1);
    tokio::time::sleep(ms(7)).await;
    drop(fut);
    let o = outcomes.only();
    assert_eq!(
        (o.served, o.primary, o.fallback, o.launched),
        (Served::Abandoned, Verdict::Pending, Fate::NotLaunched, None)
    );
    assert!(!o.polled);
    assert_eq!(o.elapsed, ms(7));

    // One that ran is `polled`, abandoned or not.
    let mut fut = Box::pin(svc.call(2));
    assert!(poll_once(&mut fut).await.is_pending());
    drop(fut);
    assert!(outcomes.only().polled);
    let served = Box::pin(svc.call(3)).await.unwrap();
    assert_eq!(served.value, Some(1));
    assert!(outcomes.only().polled);

    let counts = stats.snapshot();
    assert_eq!((counts.requests, counts.abandoned), (3, 2));
    assert_eq!(counts.abandoned_unpolled, 1);
    assert!(
        counts.to_string().contains("2 abandoned (1 unpolled)"),
        "{counts}"
    );
}

/// Polls `fut` until it is ready, one millisecond of paused time at a time.
async fn drive<F: Future + Unpin>(mut fut: F) -> F::Output {
    loop {
        if let Poll::Ready(out) = poll_once(&mut fut).await {
            return out;
        }
        tokio::time::sleep(ms(1)).await;
    }
}

#[cfg(feature = "budget")]
mod budget {
    use super::*;
    use std::sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc,
    };

    /// A budget that allows everything and counts what it was asked.
    #[derive(Clone, Default)]
    struct Counting(Arc<(AtomicUsize, AtomicUsize)>);

    impl tower::retry::budget::Budget for Counting {
        fn deposit(&self) {
            self.0 .0.fetch_add(1, SeqCst);
        }
        fn withdraw(&self) -> bool {
            self.0 .1.fetch_add(1, SeqCst);
            true
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_dropped_unpolled_deposits_nothing() {
        let budget = Counting::default();
        let tally = budget.0.clone();
        let mut svc = Fallback::new(
            Probe::fixed("cache", 5, Reply::Value(1)),
            Probe::fixed("db", 5, Reply::Value(2)),
        )
        .accept(hit)
        .speculate_if(|key: &u64| *key % 2 == 0)
        .budget(budget);
        // A server shedding load: 100 futures dropped before they ran.
        for key in 0..100 {
            drop(svc.call(key));
        }
        assert_eq!((tally.0.load(SeqCst), tally.1.load(SeqCst)), (0, 0));
        // Requests that ran deposit once each, eligible or not; the eligible one
        // withdraws for its speculative launch.
        for key in [1, 2] {
            let fut = Box::pin(svc.call(key));
            drive(fut).await.unwrap();
        }
        assert_eq!((tally.0.load(SeqCst), tally.1.load(SeqCst)), (2, 1));
        // Dropped after its first poll, a request deposited: it ran.
        let mut fut: std::pin::Pin<Box<_>> = Box::pin(svc.call(4));
        assert!(poll_once(&mut fut).await.is_pending());
        drop(fut);
        assert_eq!((tally.0.load(SeqCst), tally.1.load(SeqCst)), (3, 2));
    }

    /// A budget whose `deposit` panics.
    struct Panicking;

    impl tower::retry::budget::Budget for Panicking {
        fn deposit(&self) {
            panic!("deposit panics on purpose");
        }
        fn withdraw(&self) -> bool {
            true
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_deposit_that_panics_poisons_the_future() {
        use futures_util::FutureExt;
        let mut svc = Fallback::new(
            Probe::fixed("cache", 5, Reply::Value(1)),
            Probe::fixed("db", 5, Reply::Value(2)),
        )
        .accept(hit)
        .budget(Panicking);
        let mut fut = Box::pin(svc.call(1));
        let first = std::panic::AssertUnwindSafe(poll_once(&mut fut))
            .catch_unwind()
            .await;
        assert!(first.is_err(), "the deposit's panic reaches the caller");
        // Polled again, it never serves: it panics as a poisoned future.
        let again = std::panic::AssertUnwindSafe(poll_once(&mut fut))
            .catch_unwind()
            .await;
        let message = again.expect_err("a poisoned future panics");
        let message = message.downcast_ref::<&str>().copied().unwrap_or_default();
        assert!(message.contains("polled after it panicked"), "{message}");
    }
}
