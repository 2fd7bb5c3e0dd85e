//! The layer in real stacks: inside a `ServiceBuilder` next to tower's `retry` and
//! `timeout`, with the error type passed through (an `Infallible` stack stays
//! `Infallible`) and the auto traits users' frameworks require.

mod support;

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc,
    },
    time::Duration,
};
use support::{hit, Answer, Probe, ProbeError, Reply};
use tokio::time::Instant;
use tower::{
    retry::Policy, service_fn, timeout::error::Elapsed, BoxError, Service, ServiceBuilder,
    ServiceExt,
};
use tower_backstop::{accept::AcceptOk, Fallback, FallbackLayer};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>(_: &T) {}
fn assert_send<T: Send + 'static>(_: &T) {}
fn assert_infallible<S: Service<u64, Error = Infallible>>(_: &S) {}

#[test]
fn fallback_is_clone_send_sync_and_its_future_is_send() {
    let svc = Fallback::new(
        Probe::fixed("cache", 1, Reply::Empty),
        Probe::fixed("db", 1, Reply::Value(1)),
    )
    .accept(hit);
    assert_send_sync_clone(&svc);
    let layer = FallbackLayer::new(Probe::fixed("db", 1, Reply::Value(1))).accept(hit);
    assert_send_sync_clone(&layer);

    let mut svc = svc;
    let fut = svc.call(1);
    assert_send(&fut);
}

#[tokio::test(start_paused = true)]
async fn infallible_stack_stays_infallible() {
    let cache = service_fn(|key: u64| async move {
        tokio::time::sleep(ms(2)).await;
        Ok::<_, Infallible>((key % 2 == 0).then_some(key))
    });
    let db = service_fn(|key: u64| async move {
        tokio::time::sleep(ms(5)).await;
        Ok::<_, Infallible>(Some(key + 1000))
    });
    let svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new(db)
                .accept(|r: &Result<Option<u64>, Infallible>| matches!(r, Ok(Some(_)))),
        )
        .service(cache);
    assert_infallible(&svc);

    let Ok(hit) = svc.clone().oneshot(4).await;
    assert_eq!(hit, Some(4));
    let Ok(miss) = svc.oneshot(5).await;
    assert_eq!(miss, Some(1005));
}

/// Retries every error, up to `attempts` more times, and counts attempts.
#[derive(Clone)]
struct RetryErrors {
    attempts: usize,
}

impl<E> Policy<u64, Answer, E> for RetryErrors {
    type Future = std::future::Ready<()>;

    fn retry(&mut self, _: &mut u64, result: &mut Result<Answer, E>) -> Option<Self::Future> {
        if result.is_err() && self.attempts > 0 {
            self.attempts -= 1;
            Some(std::future::ready(()))
        } else {
            None
        }
    }

    fn clone_request(&mut self, req: &u64) -> Option<u64> {
        Some(*req)
    }
}

#[tokio::test(start_paused = true)]
async fn retry_outside_the_layer_retries_both_branches() {
    // Both branches fail on the first attempt and succeed afterwards.
    fn flaky(name: &'static str, value: u64) -> (Probe, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let probe = Probe::new(name, move |_| {
            if seen.fetch_add(1, SeqCst) == 0 {
                (ms(2), Reply::Fail)
            } else {
                (ms(2), Reply::Value(value))
            }
        });
        (probe, calls)
    }
    let (cache, cache_calls) = flaky("cache", 1);
    let (db, db_calls) = flaky("db", 2);

    let svc = ServiceBuilder::new()
        .retry(RetryErrors { attempts: 2 })
        .layer(FallbackLayer::new(db))
        .service(cache);
    assert_eq!(
        svc.oneshot(1).await,
        Ok(Answer {
            from: "cache",
            value: Some(1)
        })
    );
    // The retry went through the whole layer: each branch was called twice. A retry
    // outside the layer multiplies the fallback's load by the number of attempts.
    assert_eq!(cache_calls.load(SeqCst), 2);
    assert_eq!(db_calls.load(SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn timeout_around_the_layer_bounds_the_whole_request() {
    let db = Probe::fixed("db", 50, Reply::Value(2));
    let db_counts = db.counts();
    let svc = ServiceBuilder::new()
        .timeout(ms(20))
        .layer(FallbackLayer::new(db).accept(hit))
        .service(Probe::fixed("cache", 5, Reply::Empty));

    let start = Instant::now();
    let err: BoxError = svc.oneshot(1).await.unwrap_err();
    assert!(err.is::<Elapsed>());
    assert_eq!(start.elapsed(), ms(20));
    // The timeout dropped the layer's future, and with it the fallback's call.
    assert_eq!(db_counts.dropped(), 1);
}

#[tokio::test(start_paused = true)]
async fn timeout_on_the_primary_alone_turns_a_slow_cache_into_a_rejection() {
    let cache =
        ServiceBuilder::new()
            .timeout(ms(5))
            .service(Probe::fixed("cache", 100, Reply::Value(1)));
    let db = ServiceBuilder::new()
        .map_err(BoxError::from)
        .service(Probe::fixed("db", 8, Reply::Value(2)));
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(db).accept(AcceptOk))
        .service(cache);

    let start = Instant::now();
    let served = svc.oneshot(1).await.unwrap();
    assert_eq!(served.from, "db");
    // The database was started at 0 ms, so the slow cache costs nothing extra.
    assert_eq!(start.elapsed(), ms(8));
}

#[tokio::test(start_paused = true)]
async fn layer_builds_services_that_share_the_fallback() {
    let db = Probe::fixed("db", 3, Reply::Value(2));
    let db_counts = db.counts();
    let layer = FallbackLayer::new(db).accept(hit);
    let a = ServiceBuilder::new()
        .layer(layer.clone())
        .service(Probe::fixed("a", 1, Reply::Empty));
    let b = ServiceBuilder::new()
        .layer(layer)
        .service(Probe::fixed("b", 1, Reply::Empty));
    assert_eq!(a.oneshot(1).await.unwrap().from, "db");
    assert_eq!(b.oneshot(2).await.unwrap().from, "db");
    assert_eq!(db_counts.completed(), 2);
}

#[test]
fn debug_output_names_the_parts() {
    #[derive(Debug, Clone)]
    struct Named;
    let layer = FallbackLayer::new(Named).accept(|r: &Result<u64, ProbeError>| r.is_ok());
    let text = format!("{layer:?}");
    assert!(
        text.starts_with("FallbackLayer { fallback: Named, accept: "),
        "{text}"
    );

    let svc = Fallback::new(Named, Named);
    let text = format!("{svc:?}");
    assert!(
        text.starts_with(
            "Fallback { primary: Named, fallback: Named, accept: tower_backstop::accept::AcceptOk, \
             eligible: tower_backstop::launch::AnyRequest, refill: tower_backstop::refill::NoRefill, \
             settings: Settings { launch: Concurrent"
        ),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn response_future_debug_shows_both_branches() {
    let mut svc = Fallback::new(
        Probe::fixed("cache", 5, Reply::Empty),
        Probe::fixed("db", 5, Reply::Value(2)),
    );
    let fut = svc.call(1);
    let text = format!("{fut:?}");
    assert!(text.contains("primary: \"Pending\""), "{text}");
    assert!(text.contains("fallback: \"Waiting\""), "{text}");
    assert!(text.contains("plan: Now, launched: false"), "{text}");
    let _: &dyn Future<Output = Result<Answer, ProbeError>> = &fut;
}
