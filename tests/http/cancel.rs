//! Real cancellation: when the primary is accepted, the fallback's request in flight is
//! abandoned on the wire, and the fallback's server sees its handler dropped before it
//! finished — by a closed connection over HTTP/1.1, by a reset stream over HTTP/2.

use crate::support::{get, held_origin, proxy, send, text, Server, Tracker};
use axum::{extract::Path, http::StatusCode, routing::get as get_route, Router};
use tower_backstop::{http::accept::RejectStatus, FallbackLayer};

/// The primary answers a hit, but only once the fallback's handler has started, so
/// that there is a request in flight on the fallback's server to cancel.
fn cache_after_the_fallback_started(
    fallback_calls: Tracker,
    target: std::net::SocketAddr,
    http2: bool,
) -> Router {
    Router::new()
        .route(
            "/slow/{id}",
            get_route(move |Path(id): Path<u32>| {
                let fallback_calls = fallback_calls.clone();
                async move {
                    if fallback_calls.wait_started(id as usize).await {
                        (StatusCode::OK, format!("cache {id}"))
                    } else {
                        let why = "the fallback's request never reached its server";
                        (StatusCode::INTERNAL_SERVER_ERROR, why.to_owned())
                    }
                }
            }),
        )
        .route_layer(
            FallbackLayer::new(proxy(target, http2))
                .accept(RejectStatus(StatusCode::NOT_FOUND))
                .buffer_bodies(),
        )
}

async fn accepted_primary_cancels_the_fallback(http2: bool) {
    let origin_calls = Tracker::default();
    let origin = Server::axum(held_origin(origin_calls.clone())).await;
    let app = cache_after_the_fallback_started(origin_calls.clone(), origin.addr, http2);
    let server = Server::axum(app).await;

    for id in 1..=2u32 {
        let (status, _, body) = send(get(server.url(&format!("/slow/{id}")))).await;
        assert_eq!(
            (status, text(&body)),
            (StatusCode::OK, &*format!("cache {id}"))
        );
        // The origin's handler is held until `release`: only a cancellation ends it.
        assert!(
            origin_calls.wait_cancelled(id as usize).await,
            "the origin never saw request {id} cancelled: {:?}",
            origin_calls.events()
        );
        assert_eq!(origin_calls.completed(), 0);
    }

    if http2 {
        // A reset stream leaves the connection up: both requests shared it.
        assert_eq!(origin.connections(), 1);
    } else {
        // HTTP/1.1 cannot take a request back: each abandoned one cost its connection.
        assert_eq!(origin.connections(), 2);
    }

    origin_calls.release();
    server.stop().await;
    origin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_the_fallback_connection_is_closed() {
    accepted_primary_cancels_the_fallback(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_the_fallback_stream_is_reset() {
    accepted_primary_cancels_the_fallback(true).await;
}
