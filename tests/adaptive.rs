//! The adaptive launch delay against the latencies a primary really shows, on tokio's
//! paused clock: tails that are only ever cut short, latencies from tens of
//! microseconds to minutes, the timer's millisecond ticks, and a warm-up made only of
//! calls cut short.

mod support;

use std::{
    future::Future,
    pin::{pin, Pin},
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};
use support::{hit, Answer, Probe, ProbeError, Reply};
use tokio::time::{advance, timeout, Instant};
use tower::{Service, ServiceExt};
use tower_backstop::{
    launch::{Adaptive, Launch},
    outcome::Outcome,
    Fallback,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn us(n: u64) -> Duration {
    Duration::from_micros(n)
}

/// Whether `estimate` is `value`, or above it by no more than the buckets' 1/128.
fn within_a_bucket(estimate: Option<Duration>, value: Duration) -> bool {
    estimate.is_some_and(|e| value <= e && e <= value + value / 128)
}

// ---------------------------------------------------------------------------------
// Calls cut short
// ---------------------------------------------------------------------------------

/// 80% of calls answer in 10 ms, every fifth takes 2 s.
fn mostly_fast(key: u64) -> (Duration, Reply) {
    if key % 5 == 0 {
        (ms(2_000), Reply::Value(key))
    } else {
        (ms(10), Reply::Value(key))
    }
}

#[tokio::test(start_paused = true)]
async fn a_tail_only_ever_cut_short_keeps_the_estimate_beyond_the_cut() {
    // Every caller gives up at 500 ms, so the slow fifth is never seen to answer: the
    // p90 lies beyond 500 ms, and so must the estimate, window after window.
    let adaptive = Adaptive::new(0.9, ms(50)).window(200).min_samples(50);
    let svc = Fallback::new(
        Probe::new("cache", mostly_fast),
        Probe::fixed("db", 20, Reply::Value(0)),
    )
    .accept(hit)
    .launch(Launch::Adaptive(adaptive.clone()));

    let mut lowest = Duration::MAX;
    for key in 0..2_000 {
        let _ = timeout(ms(500), svc.clone().oneshot(key)).await;
        if key >= 50 {
            let estimate = adaptive.estimate().expect("warmed up");
            lowest = lowest.min(estimate);
        }
    }
    // The estimate is the longest cut: the fallback never starts before callers give up.
    assert!(within_a_bucket(Some(lowest), ms(500)), "lowest {lowest:?}");
    assert!(adaptive.delay() >= ms(501), "{adaptive:?}");
}

#[tokio::test(start_paused = true)]
async fn cut_short_calls_hand_their_weight_to_the_slower_answers() {
    // Three in four slow calls are cut at 500 ms, the fourth answers at 2 s. The cut
    // ones are not "500 ms" (that would make the p90 500 ms), nor are they nothing
    // (that would make it 10 ms): they ran at least that long, like the ones that
    // answered at 2 s. The p90 of what the primary does is 2 s.
    let adaptive = Adaptive::new(0.9, ms(50)).window(200).min_samples(50);
    let svc = Fallback::new(
        Probe::new("cache", mostly_fast),
        Probe::fixed("db", 20, Reply::Value(0)),
    )
    .accept(hit)
    .launch(Launch::Adaptive(adaptive.clone()));

    for key in 0..400 {
        let call = svc.clone().oneshot(key);
        if key % 5 == 0 && key % 20 != 0 {
            assert!(timeout(ms(500), call).await.is_err());
        } else {
            assert_eq!(call.await.map(|a| a.from), Ok("cache"));
        }
    }
    assert!(
        within_a_bucket(adaptive.estimate(), ms(2_000)),
        "{adaptive:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn callers_who_give_up_at_different_times_keep_the_tail() {
    // The slow fifth is cut short at 300 to 700 ms, depending on the caller; the fast
    // calls answer at 10 ms. Nothing is known beyond the cuts, so the estimate stays
    // at the longest cut held — never below the shortest cut, 300 ms — however each
    // cut compares with the current estimate.
    let adaptive = Adaptive::new(0.9, ms(50)).window(200).min_samples(50);
    let svc = Fallback::new(
        Probe::new("cache", mostly_fast),
        Probe::fixed("db", 20, Reply::Value(0)),
    )
    .accept(hit)
    .launch(Launch::Adaptive(adaptive.clone()));

    let mut lowest = Duration::MAX;
    for key in 0..2_000u64 {
        let patience = ms(300 + key.wrapping_mul(0x9E37_79B9_7F4A_7C15) % 400);
        let _ = timeout(patience, svc.clone().oneshot(key)).await;
        if key >= 200 {
            lowest = lowest.min(adaptive.estimate().expect("warmed up"));
        }
    }
    assert!(lowest >= ms(300), "lowest {lowest:?}");
}

// ---------------------------------------------------------------------------------
// Range and resolution
// ---------------------------------------------------------------------------------

/// A primary that answers once the clock reaches its deadline, whatever the timer's
/// ticks: the test advances the clock in sub-millisecond steps and polls again.
#[derive(Clone)]
struct Clocked(fn(u64) -> Duration);

struct ClockedFuture {
    at: Instant,
    key: u64,
}

impl Service<u64> for Clocked {
    type Response = Answer;
    type Error = ProbeError;
    type Future = ClockedFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProbeError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u64) -> ClockedFuture {
        ClockedFuture {
            at: Instant::now() + (self.0)(key),
            key,
        }
    }
}

impl Future for ClockedFuture {
    type Output = Result<Answer, ProbeError>;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        if Instant::now() >= self.at {
            Poll::Ready(Ok(Answer {
                from: "cache",
                value: Some(self.key),
            }))
        } else {
            Poll::Pending
        }
    }
}

/// Polls `fut`, advancing the clock by `step` between polls, until it is ready.
async fn drive<F: Future>(fut: F, step: Duration) -> F::Output {
    let mut fut = pin!(fut);
    for _ in 0..100_000 {
        let poll = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
        if let Poll::Ready(output) = poll {
            return output;
        }
        advance(step).await;
    }
    panic!("not ready after 100,000 steps");
}

#[tokio::test(start_paused = true)]
async fn follows_a_primary_of_tens_of_microseconds() {
    // 41.7, 42.7, ..., 50.7 µs: the p90 is 49.7 µs.
    let adaptive = Adaptive::new(0.9, ms(1)).window(200).min_samples(100);
    let svc = Fallback::new(
        Clocked(|key| Duration::from_nanos(41_700 + (key % 10) * 1_000)),
        Probe::fixed("db", 5, Reply::Value(0)),
    )
    .accept(hit)
    .launch(Launch::Adaptive(adaptive.clone()));
    for key in 0..100 {
        let answer = drive(svc.clone().oneshot(key), Duration::from_nanos(100)).await;
        assert_eq!(answer.map(|a| a.from), Ok("cache"));
    }
    assert!(
        within_a_bucket(adaptive.estimate(), Duration::from_nanos(49_700)),
        "{adaptive:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn follows_a_primary_of_minutes() {
    // 1, 2, ..., 10 minutes: the p90 is 9 minutes.
    let minute = Duration::from_secs(60);
    let adaptive = Adaptive::new(0.9, ms(50)).window(200).min_samples(100);
    let svc = Fallback::new(
        Probe::new("cache", move |key| {
            (minute * (key % 10 + 1) as u32, Reply::Value(key))
        }),
        Probe::fixed("db", 5, Reply::Value(0)),
    )
    .accept(hit)
    .launch(Launch::Adaptive(adaptive.clone()));
    for key in 0..100 {
        assert_eq!(svc.clone().oneshot(key).await.map(|a| a.from), Ok("cache"));
    }
    assert!(
        within_a_bucket(adaptive.estimate(), minute * 9),
        "{adaptive:?}"
    );
}

// ---------------------------------------------------------------------------------
// The timer's resolution
// ---------------------------------------------------------------------------------

/// A remote cache answering in 500 µs, and the database behind it.
fn sub_millisecond(launch: Launch) -> (impl Service<u64, Response = Answer> + Clone, Probe) {
    let db = Probe::fixed("db", 5, Reply::Value(0));
    let svc = Fallback::new(Clocked(|_| us(500)), db.clone())
        .accept(hit)
        .launch(launch);
    (svc, db)
}

#[tokio::test(start_paused = true)]
async fn a_sub_millisecond_delay_never_speculates_on_a_faster_primary() {
    // 100 µs rounds up to 1 ms: a 500 µs primary never starts its fallback, wherever
    // its call falls between two ticks of the timer.
    let (svc, db) = sub_millisecond(Launch::Delayed(us(100)));
    for key in 0..300u64 {
        advance(us(key * 130 % 1_000)).await;
        let answer = drive(svc.clone().oneshot(key), us(50)).await;
        assert!(answer.is_ok());
    }
    assert_eq!(db.counts().started(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_outcome_reports_the_delay_as_applied() {
    // A 100 µs delay against a 3 ms primary: the launch comes at 1 ms or later, on a
    // tick, and the outcome says so.
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let seen = outcomes.clone();
    let svc = Fallback::new(Clocked(|_| ms(3)), Probe::fixed("db", 5, Reply::Value(0)))
        .accept(hit)
        .launch(Launch::Delayed(us(100)))
        .on_outcome(move |o: &Outcome| seen.lock().unwrap().push(o.clone()));
    for key in 0..10u64 {
        advance(us(key * 130 % 1_000)).await;
        drive(svc.clone().oneshot(key), us(50)).await.unwrap();
    }
    let outcomes = outcomes.lock().unwrap();
    assert_eq!(outcomes.len(), 10);
    for o in outcomes.iter() {
        let after = o.launched_after.expect("launched");
        assert!(ms(1) <= after && after < ms(2), "{o:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_adaptive_delay_is_the_estimate_rounded_up_to_the_timer() {
    // 400 to 490 µs: the p90 estimate is 480 µs, the delay applied 1 ms, and no call
    // of this primary ever speculates.
    let adaptive = Adaptive::new(0.9, us(200)).window(200).min_samples(50);
    let db = Probe::fixed("db", 5, Reply::Value(0));
    let svc = Fallback::new(Clocked(|key| us(400 + key % 10 * 10)), db.clone())
        .accept(hit)
        .launch(Launch::Adaptive(adaptive.clone()));
    // The initial 200 µs is rounded up too.
    assert_eq!(adaptive.delay(), ms(1));
    for key in 0..300u64 {
        advance(us(key * 130 % 1_000)).await;
        drive(svc.clone().oneshot(key), us(10)).await.unwrap();
    }
    assert!(
        within_a_bucket(adaptive.estimate(), us(480)),
        "{adaptive:?}"
    );
    assert_eq!(adaptive.delay(), ms(1));
    assert_eq!(db.counts().started(), 0);
}

// ---------------------------------------------------------------------------------
// Warm-up
// ---------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_warm_up_of_calls_all_cut_short_still_ends() {
    // Initial delay 50 ms, and a 20 ms timeout around the layer: no call ever answers.
    // The warm-up counts them; the estimate is what callers are known to wait.
    let adaptive = Adaptive::new(0.9, ms(50)).window(200).min_samples(50);
    let svc = Fallback::new(
        Probe::fixed("cache", 100, Reply::Value(1)),
        Probe::fixed("db", 10, Reply::Value(2)),
    )
    .accept(hit)
    .launch(Launch::Adaptive(adaptive.clone()));
    for _ in 0..49 {
        assert!(timeout(ms(20), svc.clone().oneshot(1)).await.is_err());
    }
    assert_eq!(adaptive.estimate(), None);
    assert!(timeout(ms(20), svc.clone().oneshot(1)).await.is_err());
    assert!(within_a_bucket(adaptive.estimate(), ms(20)), "{adaptive:?}");
    assert_eq!(adaptive.delay(), ms(21));
}

#[tokio::test(start_paused = true)]
async fn futures_dropped_unpolled_teach_the_estimate_nothing() {
    // The case: a server under overload drops 1,000 response futures before
    // they run, then serves 10 requests whose primary answers in 20 ms. Those never-run
    // calls must neither end the warm-up nor pull the estimate to 0: the initial 50 ms
    // delay still applies, and no hit starts a fallback.
    let adaptive = Adaptive::new(0.9, ms(50)).window(200).min_samples(50);
    let db = Probe::fixed("db", 10, Reply::Value(2));
    let db_calls = db.counts();
    let mut svc = Fallback::new(Probe::fixed("cache", 20, Reply::Value(1)), db)
        .accept(hit)
        .launch(Launch::Adaptive(adaptive.clone()));
    for key in 0..1_000 {
        drop(svc.call(key));
    }
    assert_eq!(adaptive.estimate(), None, "{adaptive:?}");
    for key in 0..10 {
        svc.clone().oneshot(key).await.unwrap();
    }
    assert_eq!(adaptive.estimate(), None, "{adaptive:?}");
    assert_eq!(adaptive.delay(), ms(50));
    assert_eq!(db_calls.started(), 0);
}

// ---------------------------------------------------------------------------------
// Sampling
// ---------------------------------------------------------------------------------

/// How much slower the slow quarter of `quarter_slow`'s calls has become, in ms.
static SHIFT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Three calls in four answer on their first poll (these are sampled, one in eight);
/// every fourth takes 10 ms plus `SHIFT_MS` (these are all timed).
fn quarter_slow(key: u64) -> Duration {
    if key % 4 == 0 {
        ms(10 + SHIFT_MS.load(std::sync::atomic::Ordering::Relaxed))
    } else {
        Duration::ZERO
    }
}

/// Serves `calls` requests through an adaptive layer over `quarter_slow`.
async fn serve_quarter_slow(adaptive: &Adaptive, keys: std::ops::Range<u64>) {
    let svc = Fallback::new(
        Clocked(quarter_slow),
        Probe::fixed("db", 50, Reply::Value(0)),
    )
    .accept(hit)
    .launch(Launch::Adaptive(adaptive.clone()));
    for key in keys {
        let answer = drive(svc.clone().oneshot(key), ms(1)).await;
        assert_eq!(answer.map(|a| a.from), Ok("cache"));
    }
}

#[tokio::test(start_paused = true)]
async fn the_sampled_estimate_tracks_a_shift() {
    // The p90 lies in the slow quarter: 10 ms, then 30 ms once it slows down, within
    // one window — as when every call was timed.
    let adaptive = Adaptive::new(0.9, ms(5)).window(200).min_samples(50);
    serve_quarter_slow(&adaptive, 0..400).await;
    assert!(within_a_bucket(adaptive.estimate(), ms(10)), "{adaptive:?}");

    SHIFT_MS.store(20, std::sync::atomic::Ordering::Relaxed);
    serve_quarter_slow(&adaptive, 400..800).await;
    assert!(within_a_bucket(adaptive.estimate(), ms(30)), "{adaptive:?}");
}

#[tokio::test(start_paused = true)]
async fn sampled_instant_answers_keep_their_weight() {
    // Three calls in four answer at once: the median is 0. Recording one instant answer
    // in eight without its weight would make them a quarter of the samples, and the
    // median 10 ms.
    let adaptive = Adaptive::new(0.5, ms(5)).window(200).min_samples(50);
    serve_quarter_slow(&adaptive, 0..400).await;
    assert_eq!(adaptive.estimate(), Some(Duration::ZERO), "{adaptive:?}");
}
