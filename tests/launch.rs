//! Launch policies on tokio's paused clock: when the fallback starts under each policy,
//! what a budget and the eligibility predicate do to speculative launches, the patience
//! bound, and the adaptive delay's warm-up, adaptation and censored samples.

mod support;

use std::time::Duration;
use support::{hit, Answer, Probe, Reply};
use tokio::time::Instant;
use tower::ServiceExt;
use tower_backstop::{launch::Launch, Fallback};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn from(name: &'static str, value: u64) -> Answer {
    Answer {
        from: name,
        value: Some(value),
    }
}

/// Runs one request through a fresh `Fallback` of `cache` and `db` under `launch`, and
/// returns the answer, when it was served, and when the database call started (if it
/// did), all relative to the call.
async fn run(
    cache: Probe,
    db: Probe,
    launch: Launch,
) -> (Answer, Duration, Option<Duration>, support::CountsRef) {
    let counts = db.counts();
    let svc = Fallback::new(cache, db).accept(hit).launch(launch);
    let start = Instant::now();
    let answer = svc.oneshot(1).await.unwrap();
    let served = start.elapsed();
    let started = counts.starts_since(start).first().copied();
    (answer, served, started, counts)
}

#[tokio::test(start_paused = true)]
async fn delayed_hit_before_the_delay_never_touches_the_fallback() {
    let (answer, served, started, db) = run(
        Probe::fixed("cache", 3, Reply::Value(1)),
        Probe::fixed("db", 10, Reply::Value(2)),
        Launch::Delayed(ms(5)),
    )
    .await;
    assert_eq!((answer, served, started), (from("cache", 1), ms(3), None));
    assert_eq!(db.ready_polls(), 0, "not even readiness was asked");
}

#[tokio::test(start_paused = true)]
async fn delayed_slow_hit_starts_the_fallback_at_the_delay_then_drops_it() {
    let (answer, served, started, db) = run(
        Probe::fixed("cache", 8, Reply::Value(1)),
        Probe::fixed("db", 10, Reply::Value(2)),
        Launch::Delayed(ms(5)),
    )
    .await;
    assert_eq!(
        (answer, served, started),
        (from("cache", 1), ms(8), Some(ms(5)))
    );
    assert_eq!((db.dropped(), db.completed()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn delayed_slow_miss_overlaps_the_branches() {
    let (answer, served, started, _) = run(
        Probe::fixed("cache", 8, Reply::Empty),
        Probe::fixed("db", 10, Reply::Value(2)),
        Launch::Delayed(ms(5)),
    )
    .await;
    // 5 ms delay + 10 ms database, not 8 + 10.
    assert_eq!(
        (answer, served, started),
        (from("db", 2), ms(15), Some(ms(5)))
    );
}

#[tokio::test(start_paused = true)]
async fn delayed_rejection_before_the_delay_starts_the_fallback_at_once() {
    let (answer, served, started, _) = run(
        Probe::fixed("cache", 2, Reply::Empty),
        Probe::fixed("db", 10, Reply::Value(2)),
        Launch::Delayed(ms(5)),
    )
    .await;
    assert_eq!(
        (answer, served, started),
        (from("db", 2), ms(12), Some(ms(2)))
    );
}

#[tokio::test(start_paused = true)]
async fn a_delay_too_long_to_represent_never_speculates() {
    // `Duration::MAX` cannot be added to an instant: it means "never", not a panic.
    let (answer, served, started, _) = run(
        Probe::fixed("cache", 3, Reply::Empty),
        Probe::fixed("db", 10, Reply::Value(2)),
        Launch::Delayed(Duration::MAX),
    )
    .await;
    assert_eq!(
        (answer, served, started),
        (from("db", 2), ms(13), Some(ms(3)))
    );
}

#[tokio::test(start_paused = true)]
async fn sequential_hit_never_touches_the_fallback() {
    let (answer, served, started, db) = run(
        Probe::fixed("cache", 30, Reply::Value(1)),
        Probe::fixed("db", 10, Reply::Value(2)),
        Launch::Sequential,
    )
    .await;
    assert_eq!((answer, served, started), (from("cache", 1), ms(30), None));
    assert_eq!(db.ready_polls(), 0);
}

#[tokio::test(start_paused = true)]
async fn sequential_miss_costs_the_sum() {
    let (answer, served, started, _) = run(
        Probe::fixed("cache", 3, Reply::Fail),
        Probe::fixed("db", 10, Reply::Value(2)),
        Launch::Sequential,
    )
    .await;
    assert_eq!(
        (answer, served, started),
        (from("db", 2), ms(13), Some(ms(3)))
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_is_the_default_and_starts_at_once() {
    let (answer, served, started, _) = run(
        Probe::fixed("cache", 3, Reply::Empty),
        Probe::fixed("db", 10, Reply::Value(2)),
        Launch::default(),
    )
    .await;
    assert_eq!(
        (answer, served, started),
        (from("db", 2), ms(10), Some(ms(0)))
    );
}

#[tokio::test(start_paused = true)]
async fn ineligible_requests_go_sequential() {
    // Even keys may speculate; odd keys must wait for the primary's rejection.
    let cache = Probe::fixed("cache", 4, Reply::Empty);
    let db = Probe::fixed("db", 10, Reply::Value(2));
    let counts = db.counts();
    let svc = Fallback::new(cache, db)
        .accept(hit)
        .speculate_if(|key: &u64| key % 2 == 0);

    let start = Instant::now();
    assert_eq!(svc.clone().oneshot(2).await, Ok(from("db", 2)));
    assert_eq!(start.elapsed(), ms(10));
    let second = Instant::now();
    assert_eq!(svc.oneshot(3).await, Ok(from("db", 2)));
    assert_eq!(second.elapsed(), ms(14));
    assert_eq!(counts.starts_since(start), vec![ms(0), ms(10 + 4)]);
}

#[tokio::test(start_paused = true)]
async fn ineligible_requests_under_a_delay_go_sequential_too() {
    let cache = Probe::fixed("cache", 20, Reply::Value(1));
    let db = Probe::fixed("db", 10, Reply::Value(2));
    let counts = db.counts();
    let svc = Fallback::new(cache, db)
        .accept(hit)
        .launch(Launch::Delayed(ms(5)))
        .speculate_if(|_: &u64| false);
    assert_eq!(svc.oneshot(1).await, Ok(from("cache", 1)));
    assert_eq!(counts.started(), 0);
}

#[tokio::test(start_paused = true)]
async fn without_patience_the_primary_is_always_awaited() {
    let (answer, served, _, db) = run(
        Probe::fixed("cache", 50, Reply::Value(1)),
        Probe::fixed("db", 5, Reply::Value(2)),
        Launch::Concurrent,
    )
    .await;
    assert_eq!((answer, served), (from("cache", 1), ms(50)));
    assert_eq!(db.completed(), 1);
}

#[tokio::test(start_paused = true)]
async fn patience_serves_a_successful_fallback_and_drops_the_primary() {
    let cache = Probe::fixed("cache", 50, Reply::Value(1));
    let cache_counts = cache.counts();
    let svc = Fallback::new(cache, Probe::fixed("db", 5, Reply::Value(2)))
        .accept(hit)
        .patience(ms(10));

    let start = Instant::now();
    assert_eq!(svc.oneshot(1).await, Ok(from("db", 2)));
    assert_eq!(start.elapsed(), ms(15));
    assert_eq!((cache_counts.dropped(), cache_counts.completed()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn patience_lets_a_primary_that_answers_in_time_win() {
    let svc = Fallback::new(
        Probe::fixed("cache", 12, Reply::Value(1)),
        Probe::fixed("db", 5, Reply::Value(2)),
    )
    .accept(hit)
    .patience(ms(10));
    let start = Instant::now();
    assert_eq!(svc.oneshot(1).await, Ok(from("cache", 1)));
    assert_eq!(start.elapsed(), ms(12));
}

#[tokio::test(start_paused = true)]
async fn patience_never_serves_a_fallback_error_early() {
    let svc = Fallback::new(
        Probe::fixed("cache", 50, Reply::Value(1)),
        Probe::fixed("db", 5, Reply::Fail),
    )
    .accept(hit)
    .patience(ms(10));
    let start = Instant::now();
    assert_eq!(svc.oneshot(1).await, Ok(from("cache", 1)));
    assert_eq!(start.elapsed(), ms(50));
}

#[tokio::test(start_paused = true)]
async fn patience_applies_after_a_delayed_launch() {
    let svc = Fallback::new(
        Probe::fixed("cache", 100, Reply::Value(1)),
        Probe::fixed("db", 5, Reply::Value(2)),
    )
    .accept(hit)
    .launch(Launch::Delayed(ms(20)))
    .patience(ms(10));
    let start = Instant::now();
    assert_eq!(svc.oneshot(1).await, Ok(from("db", 2)));
    assert_eq!(start.elapsed(), ms(20 + 5 + 10));
}

#[cfg(feature = "budget")]
mod budget {
    use super::*;
    use tower::retry::budget::TpsBudget;

    /// 1,000 requests at once on clones, every one a miss. A 10% budget with no reserve
    /// allows one speculative launch per ten deposits; the rest degrade to sequential
    /// and are still served by the fallback.
    #[tokio::test(start_paused = true)]
    async fn speculative_launches_stay_within_the_budget() {
        const N: usize = 1_000;
        let cache = Probe::fixed("cache", 10, Reply::Empty);
        let db = Probe::fixed("db", 5, Reply::Value(2));
        let counts = db.counts();
        let svc = Fallback::new(cache, db).accept(hit).budget(TpsBudget::new(
            Duration::from_secs(10),
            0,
            0.1,
        ));

        let start = Instant::now();
        let tasks: Vec<_> = (0..N)
            .map(|key| {
                let svc = svc.clone();
                tokio::spawn(async move { (svc.oneshot(key as u64).await, start.elapsed()) })
            })
            .collect();
        let mut served_at = Vec::new();
        for task in tasks {
            let (result, elapsed) = task.await.unwrap();
            assert_eq!(result, Ok(from("db", 2)), "every miss is served");
            served_at.push(elapsed);
        }

        let starts = counts.starts_since(start);
        assert_eq!(starts.len(), N);
        let speculative = starts.iter().filter(|t| **t < ms(10)).count();
        assert_eq!(
            speculative,
            N / 10,
            "one speculative launch per ten deposits"
        );
        assert!(starts.iter().all(|t| *t == ms(0) || *t == ms(10)));
        // Speculative misses were served at max(10, 5); degraded ones at 10 + 5.
        assert_eq!(served_at.iter().filter(|t| **t == ms(10)).count(), N / 10);
        assert_eq!(
            served_at.iter().filter(|t| **t == ms(15)).count(),
            N - N / 10
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_is_only_spent_by_speculative_launches() {
        // Sequential launches and hits before the delay never withdraw: with a budget
        // that allows nothing, they behave exactly as without one.
        let svc = Fallback::new(
            Probe::fixed("cache", 3, Reply::Empty),
            Probe::fixed("db", 5, Reply::Value(2)),
        )
        .accept(hit)
        .launch(Launch::Delayed(ms(4)))
        .budget(TpsBudget::new(Duration::from_secs(1), 0, 0.0));
        let start = Instant::now();
        assert_eq!(svc.oneshot(1).await, Ok(from("db", 2)));
        assert_eq!(start.elapsed(), ms(8), "rejected at 3 ms, launched at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_budget_spans_two_layers() {
        use std::sync::Arc;
        use tower::Layer;
        use tower_backstop::FallbackLayer;

        // One withdrawal in all, for two separately built layers.
        let budget = Arc::new(TpsBudget::new(Duration::from_secs(1), 1, 0.0));
        let db = Probe::fixed("db", 5, Reply::Value(2));
        let counts = db.counts();
        let layer = |db: Probe| {
            FallbackLayer::new(db)
                .accept(hit)
                .shared_budget(budget.clone())
        };
        let a = layer(db.clone()).layer(Probe::fixed("a", 10, Reply::Empty));
        let b = layer(db).layer(Probe::fixed("b", 10, Reply::Empty));
        let start = Instant::now();
        let (ra, rb) = tokio::join!(a.oneshot(1), b.oneshot(2));
        assert_eq!((ra, rb), (Ok(from("db", 2)), Ok(from("db", 2))));
        assert_eq!(counts.starts_since(start), vec![ms(0), ms(10)]);
    }

    #[tokio::test(start_paused = true)]
    async fn one_budget_is_shared_by_clones_and_by_the_layers_services() {
        use tower::Layer;
        use tower_backstop::FallbackLayer;

        // Deposits count for nothing (0%) and the reserve holds exactly one withdrawal
        // (1 per second for 1 s): one speculative launch in all, whoever asks first.
        let db = Probe::fixed("db", 5, Reply::Value(2));
        let counts = db.counts();
        let layer = FallbackLayer::new(db).accept(hit).budget(TpsBudget::new(
            Duration::from_secs(1),
            1,
            0.0,
        ));
        let a = layer.layer(Probe::fixed("a", 10, Reply::Empty));
        let b = layer.layer(Probe::fixed("b", 10, Reply::Empty));

        let start = Instant::now();
        let (ra, rb, rc) = tokio::join!(a.clone().oneshot(1), b.oneshot(2), a.oneshot(3));
        for result in [ra, rb, rc] {
            assert_eq!(result, Ok(from("db", 2)));
        }
        // Had each service or clone its own budget, all three would start at 0 ms.
        assert_eq!(counts.starts_since(start), vec![ms(0), ms(10), ms(10)]);
    }
}

#[cfg(feature = "adaptive")]
mod adaptive {
    use super::*;
    use std::sync::{
        atomic::{AtomicU64, Ordering::SeqCst},
        Arc,
    };
    use tower_backstop::launch::Adaptive;

    fn between(value: Option<Duration>, low: Duration, high: Duration) -> bool {
        value.is_some_and(|v| low <= v && v <= high)
    }

    #[tokio::test(start_paused = true)]
    async fn warms_up_on_the_initial_delay_then_follows_the_percentile_and_its_shifts() {
        // The cache hits after 2 * (key % 10 + 1) ms, plus a shift the test turns up
        // later. (Steps of 2 ms, because tokio's timer rounds up to the millisecond.)
        let shift = Arc::new(AtomicU64::new(0));
        let cache_shift = shift.clone();
        let cache = Probe::new("cache", move |key| {
            let latency = 2 * (key % 10 + 1) + cache_shift.load(SeqCst);
            (ms(latency), Reply::Value(key))
        });
        let db = Probe::fixed("db", 100, Reply::Value(0));
        let counts = db.counts();
        let adaptive = Adaptive::new(0.9, ms(5)).window(200).min_samples(50);
        let svc = Fallback::new(cache, db)
            .accept(hit)
            .launch(Launch::Adaptive(adaptive.clone()));

        // Warm-up: the first 49 answers leave the initial delay in force.
        for key in 0..49 {
            assert_eq!(svc.clone().oneshot(key).await, Ok(from("cache", key)));
        }
        assert_eq!(adaptive.estimate(), None);
        assert_eq!(adaptive.delay(), ms(5));
        // A 20 ms answer starts its fallback at the initial 5 ms.
        let start = Instant::now();
        svc.clone().oneshot(9).await.unwrap();
        assert_eq!(counts.starts_since(start), vec![ms(5)]);

        for key in 50..200 {
            svc.clone().oneshot(key).await.unwrap();
        }
        // Uniform over 2, 4, ..., 20 ms: the p90 is 18 ms (within the histogram's 1%).
        assert!(
            between(adaptive.estimate(), ms(18), Duration::from_micros(18_200)),
            "{adaptive:?}"
        );
        // A 20 ms answer launches at the estimate, on the next tick of tokio's timer.
        let start = Instant::now();
        svc.clone().oneshot(9).await.unwrap();
        assert_eq!(counts.starts_since(start), vec![ms(19)]);
        let start = Instant::now();
        svc.clone().oneshot(7).await.unwrap();
        assert!(
            counts.starts_since(start).is_empty(),
            "a 16 ms hit never launches"
        );

        // The primary slows down by 20 ms: within a window the delay follows.
        shift.store(20, SeqCst);
        for key in 0..200 {
            svc.clone().oneshot(key).await.unwrap();
        }
        assert!(
            between(adaptive.estimate(), ms(38), Duration::from_micros(38_400)),
            "{adaptive:?}"
        );
        assert_eq!(adaptive.skipped(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_cut_short_count_as_at_least_that_slow() {
        // The primary would answer after 100 ms, but every caller gives up at 30 ms.
        // Ignoring those calls would leave the estimate empty forever; recording them
        // as "at least 30 ms" moves the delay up to 30 ms.
        let adaptive = Adaptive::new(0.5, ms(1)).window(20).min_samples(10);
        let svc = Fallback::new(
            Probe::fixed("cache", 100, Reply::Value(1)),
            Probe::fixed("db", 1_000, Reply::Value(2)),
        )
        .accept(hit)
        .launch(Launch::Adaptive(adaptive.clone()));

        for _ in 0..20 {
            let gave_up = tokio::time::timeout(ms(30), svc.clone().oneshot(1)).await;
            assert!(gave_up.is_err());
        }
        assert!(
            between(adaptive.estimate(), ms(30), Duration::from_micros(30_300)),
            "{adaptive:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn patience_cuts_count_too() {
        // The fallback answers in 2 ms and the primary gets 8 ms more: every primary
        // call is cut at (delay + 2 + 8) ms, which is recorded.
        let adaptive = Adaptive::new(0.9, ms(1)).window(20).min_samples(10);
        let svc = Fallback::new(
            Probe::fixed("cache", 100, Reply::Value(1)),
            Probe::fixed("db", 2, Reply::Value(2)),
        )
        .accept(hit)
        .launch(Launch::Adaptive(adaptive.clone()))
        .patience(ms(8));
        for _ in 0..10 {
            assert_eq!(svc.clone().oneshot(1).await, Ok(from("db", 2)));
        }
        assert!(
            between(adaptive.estimate(), ms(11), Duration::from_micros(11_100)),
            "{adaptive:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ineligible_requests_still_time_the_primary() {
        // No request may speculate, yet every primary answer feeds the estimate.
        let adaptive = Adaptive::new(0.5, ms(1)).window(20).min_samples(10);
        let svc = Fallback::new(
            Probe::fixed("cache", 7, Reply::Value(1)),
            Probe::fixed("db", 2, Reply::Value(2)),
        )
        .accept(hit)
        .launch(Launch::Adaptive(adaptive.clone()))
        .speculate_if(|_: &u64| false);
        for _ in 0..10 {
            assert_eq!(svc.clone().oneshot(1).await, Ok(from("cache", 1)));
        }
        assert!(
            between(adaptive.estimate(), ms(7), Duration::from_micros(7_100)),
            "{adaptive:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_warm_up_longer_than_the_window_holds_still_ends() {
        // The default warm-up (100 answers) is more than a window of 100 ever holds
        // once it rotates: it is lowered to half the window, 50.
        let adaptive = Adaptive::new(0.5, ms(1)).window(100);
        let svc = Fallback::new(
            Probe::fixed("cache", 7, Reply::Value(1)),
            Probe::fixed("db", 20, Reply::Value(2)),
        )
        .accept(hit)
        .launch(Launch::Adaptive(adaptive.clone()));
        for _ in 0..49 {
            svc.clone().oneshot(1).await.unwrap();
        }
        assert_eq!(adaptive.estimate(), None);
        svc.clone().oneshot(1).await.unwrap();
        assert!(
            between(adaptive.estimate(), ms(7), Duration::from_micros(7_100)),
            "the estimate starts at the 50th answer: {adaptive:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_initial_delay_too_long_to_represent_never_speculates() {
        let adaptive = Adaptive::new(0.9, Duration::MAX);
        let (answer, served, started, _) = run(
            Probe::fixed("cache", 3, Reply::Empty),
            Probe::fixed("db", 10, Reply::Value(2)),
            Launch::Adaptive(adaptive),
        )
        .await;
        assert_eq!(
            (answer, served, started),
            (from("db", 2), ms(13), Some(ms(3)))
        );
    }

    #[test]
    fn bad_quantiles_are_clamped() {
        let fmt = |q: f64| format!("{:?}", Adaptive::new(q, ms(1)));
        assert!(fmt(1.5).contains("quantile: 1.0"));
        assert!(fmt(-0.5).contains("quantile: 0.0"));
        assert!(fmt(f64::NAN).contains("quantile: 1.0"));
    }
}
