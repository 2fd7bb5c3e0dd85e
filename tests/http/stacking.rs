//! Where timeouts and retries go around the layer, and what each order does — over
//! loopback, with the servers reporting what they saw.

use crate::{
    hyper_client::branch,
    support::{get, held_origin, proxy, send, text, Event, Server, Tracker},
};
use axum::{
    body::{Body, Bytes},
    extract::Path,
    http::{Request, Response, StatusCode},
    routing::{get as get_route, post as post_route},
    Router,
};
use std::time::Duration;
use tower::{retry::Policy, timeout::error::Elapsed, BoxError, ServiceBuilder, ServiceExt};
use tower_backstop::{
    http::{
        accept::{RejectServerErrors, RejectStatus, StatusIn},
        BufferBodyLayer, ReplayBody,
    },
    FallbackLayer,
};
use tower_http::timeout::TimeoutLayer;

/// A cache handler that stays in flight until released.
fn held_cache(calls: Tracker) -> axum::routing::MethodRouter {
    get_route(move |Path(id): Path<u32>| {
        let calls = calls.clone();
        async move {
            let call = calls.start(format!("/slow/{id}"));
            calls.hold().await;
            call.finish();
            format!("cache {id}")
        }
    })
}

/// A cache handler that waits for the fallback's request to reach its server, then
/// stays in flight until released.
fn cache_held_after(calls: Tracker, fallback_calls: Tracker) -> axum::routing::MethodRouter {
    get_route(move |Path(id): Path<u32>| {
        let (calls, fallback_calls) = (calls.clone(), fallback_calls.clone());
        async move {
            let call = calls.start(format!("/slow/{id}"));
            fallback_calls.wait_started(1).await;
            calls.hold().await;
            call.finish();
            format!("cache {id}")
        }
    })
}

fn origin_router() -> Router {
    Router::new().route(
        "/slow/{id}",
        get_route(|Path(id): Path<u32>| async move { format!("origin {id}") }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_http_timeout_on_the_primary_alone_makes_a_slow_cache_a_rejection() {
    let cache_calls = Tracker::default();
    let app = Router::new()
        .route(
            "/slow/{id}",
            held_cache(cache_calls.clone()).layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_millis(100),
            )),
        )
        // The timeout's 408 is not a success: rejected, the origin serves.
        .route_layer(
            FallbackLayer::new(origin_router().map_request(|mut req: Request<ReplayBody>| {
                // A routed request carries the primary's path parameters; see the
                // `axum_stack` tests.
                req.extensions_mut().clear();
                req
            }))
            .accept(StatusIn::SUCCESS)
            .buffer_bodies(),
        );
    let server = Server::axum(app).await;

    let (status, _, body) = send(get(server.url("/slow/7"))).await;
    assert_eq!((status, text(&body)), (StatusCode::OK, "origin 7"));
    // The timeout dropped the cache's handler.
    assert!(cache_calls.wait_cancelled(1).await);
    assert_eq!(cache_calls.completed(), 0);

    cache_calls.release();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_timeout_on_the_primary_alone_needs_the_fallbacks_error_to_match() {
    let cache_calls = Tracker::default();
    let cache =
        Server::axum(Router::new().route("/slow/{id}", held_cache(cache_calls.clone()))).await;
    let origin = Server::axum(origin_router()).await;

    // tower's `Timeout` makes the primary's error a `BoxError`; the fallback's is
    // mapped to match. `Elapsed` is an `Err`, rejected by the predicate.
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(
            FallbackLayer::new(branch(origin.addr, false).map_err(BoxError::from))
                .accept(RejectServerErrors),
        )
        .timeout(Duration::from_millis(100))
        .service(branch(cache.addr, false));
    let response: Response<Body> = svc
        .oneshot(
            Request::get("http://app/slow/3")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap();
    assert_eq!(body.to_bytes(), "origin 3");
    // The cache's server saw the abandoned request cancelled.
    assert!(cache_calls.wait_cancelled(1).await);

    cache_calls.release();
    cache.stop().await;
    origin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_http_timeout_around_the_layer_bounds_the_request_and_cancels_both() {
    let (cache_calls, origin_calls) = (Tracker::default(), Tracker::default());
    let origin = Server::axum(held_origin(origin_calls.clone())).await;
    let app = Router::new()
        .route(
            "/slow/{id}",
            cache_held_after(cache_calls.clone(), origin_calls.clone()),
        )
        .route_layer(
            FallbackLayer::new(proxy(origin.addr, true))
                .accept(RejectStatus(StatusCode::NOT_FOUND))
                .buffer_bodies(),
        )
        // Applied last, so outermost: it bounds the cache and the origin together.
        .route_layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            Duration::from_millis(500),
        ));
    let server = Server::axum(app).await;

    let (status, _, _) = send(get(server.url("/slow/1"))).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    // Both branches were in flight, and both were dropped: the cache's handler in
    // this process, the origin's on its server.
    assert!(
        cache_calls.wait_cancelled(1).await,
        "{:?}",
        cache_calls.events()
    );
    assert!(
        origin_calls.wait_cancelled(1).await,
        "{:?}",
        origin_calls.events()
    );
    assert_eq!(cache_calls.completed() + origin_calls.completed(), 0);

    cache_calls.release();
    origin_calls.release();
    server.stop().await;
    origin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_timeout_around_the_layer_is_an_elapsed_error() {
    let (cache_calls, origin_calls) = (Tracker::default(), Tracker::default());
    let origin = Server::axum(held_origin(origin_calls.clone())).await;
    let cache = Server::axum(Router::new().route(
        "/slow/{id}",
        cache_held_after(cache_calls.clone(), origin_calls.clone()),
    ))
    .await;

    let svc = ServiceBuilder::new()
        .timeout(Duration::from_millis(500))
        .layer(BufferBodyLayer::new())
        .layer(FallbackLayer::new(branch(origin.addr, true)).accept(RejectServerErrors))
        .service(branch(cache.addr, true));
    let error = svc
        .oneshot(
            Request::get("http://app/slow/1")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert!(error.is::<Elapsed>(), "{error:?}");
    assert!(
        cache_calls.wait_cancelled(1).await,
        "{:?}",
        cache_calls.events()
    );
    assert!(
        origin_calls.wait_cancelled(1).await,
        "{:?}",
        origin_calls.events()
    );

    cache_calls.release();
    origin_calls.release();
    cache.stop().await;
    origin.stop().await;
}

/// Retries a `5xx` answer up to `left` more times.
#[derive(Clone)]
struct RetryServerErrors {
    left: usize,
}

impl<E> Policy<Request<ReplayBody>, Response<Body>, E> for RetryServerErrors {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Request<ReplayBody>,
        result: &mut Result<Response<Body>, E>,
    ) -> Option<Self::Future> {
        let failed = match result {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        };
        (failed && self.left > 0).then(|| {
            self.left -= 1;
            std::future::ready(())
        })
    }

    fn clone_request(&mut self, req: &Request<ReplayBody>) -> Option<Request<ReplayBody>> {
        // A buffered request clones for the price of its head.
        Some(req.clone())
    }
}

/// A server whose `/flaky` always answers 503, recording the body length it got.
fn failing(calls: Tracker) -> Router {
    Router::new().route(
        "/flaky",
        post_route(move |body: Bytes| {
            calls.start(format!("/flaky {}", body.len())).finish();
            async { StatusCode::SERVICE_UNAVAILABLE }
        }),
    )
}

fn full_bodies(calls: &Tracker, len: usize) -> usize {
    let wanted = Event::Completed(format!("/flaky {len}"));
    calls.count(|e| *e == wanted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_outside_the_layer_multiplies_the_fallbacks_load() {
    let (cache_calls, origin_calls) = (Tracker::default(), Tracker::default());
    let cache = Server::axum(failing(cache_calls.clone())).await;
    let origin = Server::axum(failing(origin_calls.clone())).await;
    let request = || {
        Request::post("http://app/flaky")
            .body(Body::from(vec![b'r'; 5000]))
            .unwrap()
    };

    // Outside the layer (and inside the buffering, which makes the request clonable
    // for it): every attempt runs both branches.
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .retry(RetryServerErrors { left: 2 })
        .layer(FallbackLayer::new(branch(origin.addr, false)).accept(RejectServerErrors))
        .service(branch(cache.addr, false));
    let response = svc.oneshot(request()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Three attempts: three calls to each branch, each with the whole body.
    assert_eq!(full_bodies(&cache_calls, 5000), 3);
    assert_eq!(full_bodies(&origin_calls, 5000), 3);

    // On the fallback branch alone: the primary is asked once, the fallback retried.
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(
            FallbackLayer::new(
                ServiceBuilder::new()
                    .retry(RetryServerErrors { left: 2 })
                    .service(branch(origin.addr, false)),
            )
            .accept(RejectServerErrors),
        )
        .service(branch(cache.addr, false));
    let response = svc.oneshot(request()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(full_bodies(&cache_calls, 5000), 3 + 1);
    assert_eq!(full_bodies(&origin_calls, 5000), 3 + 3);

    cache.stop().await;
    origin.stop().await;
}
