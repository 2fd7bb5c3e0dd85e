//! `SafeMethods` and `IdempotentMethods`: which requests may start their fallback
//! speculatively, by method (RFC 9110 §9.2.1 and §9.2.2).

use http::{Method, Request};
use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc,
    },
};
use tower::{service_fn, Layer, ServiceExt};
use tower_backstop::{
    http::{IdempotentMethods, SafeMethods},
    launch::Eligible,
    FallbackLayer,
};

fn request(method: Method) -> Request<()> {
    Request::builder().method(method).body(()).unwrap()
}

const SAFE: [&str; 4] = ["GET", "HEAD", "OPTIONS", "TRACE"];
const OTHERS: [&str; 5] = ["POST", "PATCH", "CONNECT", "PURGE", "LOCK"];

fn method(name: &str) -> Method {
    Method::from_bytes(name.as_bytes()).unwrap()
}

#[test]
fn safe_methods_are_get_head_options_and_trace() {
    for name in SAFE {
        assert!(SafeMethods.eligible(&request(method(name))), "{name}");
    }
    for name in OTHERS.iter().chain(&["PUT", "DELETE"]) {
        assert!(!SafeMethods.eligible(&request(method(name))), "{name}");
    }
}

#[test]
fn idempotent_methods_are_the_safe_ones_and_put_and_delete() {
    for name in SAFE.iter().chain(&["PUT", "DELETE"]) {
        assert!(IdempotentMethods.eligible(&request(method(name))), "{name}");
    }
    for name in OTHERS {
        assert!(
            !IdempotentMethods.eligible(&request(method(name))),
            "{name}"
        );
    }
}

/// Calls a layer whose primary is pending once and then answers `accepted`, and
/// returns how many times the fallback was called.
async fn fallback_calls(
    eligible: impl Eligible<Request<()>> + Clone,
    m: Method,
    accepted: bool,
) -> usize {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let fallback = service_fn(move |_req: Request<()>| {
        counted.fetch_add(1, SeqCst);
        async { Ok::<_, Infallible>("fallback") }
    });
    let primary = service_fn(move |_req: Request<()>| async move {
        tokio::task::yield_now().await;
        Ok::<_, Infallible>(if accepted { "primary" } else { "miss" })
    });
    let svc = FallbackLayer::new(fallback)
        .accept(|r: &Result<&'static str, Infallible>| matches!(r, Ok("primary")))
        .speculate_if(eligible)
        .layer(primary);
    let answer = svc.oneshot(request(m)).await.unwrap();
    assert_eq!(answer, if accepted { "primary" } else { "fallback" });
    calls.load(SeqCst)
}

#[tokio::test]
async fn a_safe_request_speculates_and_a_post_waits_for_the_rejection() {
    // A hit: the GET started its fallback alongside; the POST did not.
    assert_eq!(fallback_calls(SafeMethods, Method::GET, true).await, 1);
    assert_eq!(fallback_calls(SafeMethods, Method::POST, true).await, 0);
    // A miss: the POST still reaches the fallback, after the rejection.
    assert_eq!(fallback_calls(SafeMethods, Method::POST, false).await, 1);
}

#[tokio::test]
async fn a_put_speculates_under_idempotent_methods_and_a_patch_does_not() {
    assert_eq!(
        fallback_calls(IdempotentMethods, Method::PUT, true).await,
        1
    );
    assert_eq!(
        fallback_calls(IdempotentMethods, Method::PATCH, true).await,
        0
    );
    assert_eq!(
        fallback_calls(IdempotentMethods, Method::PATCH, false).await,
        1
    );
}
