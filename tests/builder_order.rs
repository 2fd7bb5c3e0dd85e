//! The `http` builder methods of `FallbackLayer` in any order: every order compiles,
//! fits `Router::layer` and `Router::route_layer`, builds the same layer and serves
//! the same responses.

use axum::{
    body::Body,
    http::{Request, StatusCode},
    response::Response,
    routing::{get, MethodRouter},
    Router,
};
use std::time::Duration;
use tower::ServiceExt;
use tower_backstop::{
    http::{accept::RejectStatus, BufferBodyLayer, SafeMethods, ServedBy, X_SERVED_BY},
    launch::Launch,
    FallbackLayer,
};

fn origin() -> MethodRouter {
    get(|| async { "origin" }).post(|| async { "origin saved" })
}

/// The cache: `/hit` answers, `/miss` is a 404.
fn cache() -> Router {
    Router::new()
        .route(
            "/hit",
            get(|| async { "cache" }).post(|| async { "cache saved" }),
        )
        .route("/miss", get(|| async { StatusCode::NOT_FOUND }))
}

fn same_type<T>(_: &T, _: &T) {}

#[test]
fn mark_then_buffer_and_buffer_then_mark_build_the_same_layer() {
    let marked_first = FallbackLayer::new(origin())
        .accept(RejectStatus(StatusCode::NOT_FOUND))
        .mark_served_by(Some(X_SERVED_BY))
        .buffer_bodies();
    let buffered_first = FallbackLayer::new(origin())
        .buffer_bodies()
        .mark_served_by(Some(X_SERVED_BY))
        .accept(RejectStatus(StatusCode::NOT_FOUND));
    same_type(&marked_first, &buffered_first);
}

#[test]
fn every_order_fits_router_layer_and_route_layer() {
    let settings_after_http = FallbackLayer::new(origin())
        .buffer_bodies_with(BufferBodyLayer::new().max_bytes(1024))
        .mark_served_by(None)
        .accept(RejectStatus(StatusCode::NOT_FOUND))
        .speculate_if(SafeMethods)
        .launch(Launch::Delayed(Duration::from_millis(5)))
        .patience(Duration::from_millis(50));
    let http_after_settings = FallbackLayer::new(origin())
        .launch(Launch::Sequential)
        .speculate_if(SafeMethods)
        .accept(RejectStatus(StatusCode::NOT_FOUND))
        .mark_served_by(Some(X_SERVED_BY))
        .buffer_bodies();
    let _: Router = cache()
        .route_layer(settings_after_http.clone())
        .layer(settings_after_http);
    let _: Router = cache()
        .route_layer(http_after_settings.clone())
        .layer(http_after_settings);
}

async fn answer(
    app: &Router,
    req: Request<Body>,
) -> (StatusCode, Option<String>, Option<ServedBy>) {
    let response: Response = app.clone().oneshot(req).await.unwrap();
    let header = response
        .headers()
        .get(X_SERVED_BY)
        .map(|v| v.to_str().unwrap().to_owned());
    let served = response.extensions().get::<ServedBy>().copied();
    (response.status(), header, served)
}

#[tokio::test]
async fn both_orders_serve_the_same_responses() {
    let marked_first = cache().layer(
        FallbackLayer::new(origin())
            .accept(RejectStatus(StatusCode::NOT_FOUND))
            .mark_served_by(Some(X_SERVED_BY))
            .buffer_bodies(),
    );
    let buffered_first = cache().layer(
        FallbackLayer::new(origin())
            .buffer_bodies()
            .mark_served_by(Some(X_SERVED_BY))
            .accept(RejectStatus(StatusCode::NOT_FOUND)),
    );
    for app in [&marked_first, &buffered_first] {
        let hit = Request::get("/hit").body(Body::empty()).unwrap();
        assert_eq!(
            answer(app, hit).await,
            (
                StatusCode::OK,
                Some("primary".into()),
                Some(ServedBy::Primary)
            )
        );
        let miss = Request::get("/miss").body(Body::empty()).unwrap();
        assert_eq!(
            answer(app, miss).await,
            (
                StatusCode::OK,
                Some("fallback".into()),
                Some(ServedBy::Fallback)
            )
        );
        // The bodies are buffered in both orders: over the 64 KiB cap, `413`.
        let big = Request::post("/hit")
            .body(Body::from(vec![0u8; 100_000]))
            .unwrap();
        assert_eq!(answer(app, big).await.0, StatusCode::PAYLOAD_TOO_LARGE);
        // And a body under the cap is served, marked.
        let small = Request::post("/hit").body(Body::from("x")).unwrap();
        assert_eq!(
            answer(app, small).await,
            (
                StatusCode::OK,
                Some("primary".into()),
                Some(ServedBy::Primary)
            )
        );
    }
}
