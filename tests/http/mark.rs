//! Outcome marking end to end: an axum server whose route layer marks each response
//! with the branch that served it, read by a real client over loopback, and the
//! layer's counters agreeing with what the client saw.

use crate::support::{get, proxy, send, text, Server};
use axum::{extract::Path, http::StatusCode, routing::get as get_route, Router};
use tower::ServiceBuilder;
use tower_backstop::{
    http::{accept::RejectStatus, BufferBodyLayer, X_SERVED_BY},
    outcome::Stats,
    FallbackLayer,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_say_which_branch_served_them() {
    // The origin is a second server, reached with a hyper-util client.
    let origin = Server::axum(Router::new().route(
        "/item/{id}",
        get_route(|Path(id): Path<u32>| async move { format!("origin {id}") }),
    ))
    .await;

    let stats = Stats::new();
    let app = Router::new()
        .route(
            "/item/{id}",
            get_route(|Path(id): Path<u32>| async move {
                if id % 2 == 0 {
                    (StatusCode::OK, format!("cache {id}"))
                } else {
                    (StatusCode::NOT_FOUND, "miss".to_owned())
                }
            }),
        )
        .route_layer(
            ServiceBuilder::new().layer(BufferBodyLayer::new()).layer(
                FallbackLayer::new(proxy(origin.addr, false))
                    .accept(RejectStatus(StatusCode::NOT_FOUND))
                    .stats(stats.clone())
                    .mark_served_by(Some(X_SERVED_BY)),
            ),
        );
    let front = Server::axum(app).await;

    let (status, headers, body) = send(get(front.url("/item/2"))).await;
    assert_eq!((status, text(&body)), (StatusCode::OK, "cache 2"));
    assert_eq!(headers[X_SERVED_BY], "primary");

    let (status, headers, body) = send(get(front.url("/item/3"))).await;
    assert_eq!((status, text(&body)), (StatusCode::OK, "origin 3"));
    assert_eq!(headers[X_SERVED_BY], "fallback");

    let counts = stats.snapshot();
    assert_eq!(
        (
            counts.requests,
            counts.served_by_primary,
            counts.served_by_fallback
        ),
        (2, 1, 1)
    );

    front.stop().await;
    origin.stop().await;
}
