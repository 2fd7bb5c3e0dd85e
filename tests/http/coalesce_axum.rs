//! Coalescing an axum stack: `share_responses` then `coalesce_by(HttpKey::new())`, with
//! a database router that counts its calls. Concurrent misses for one URI share one
//! call; requests that carry credentials never do.

use axum::{
    body::Body,
    http::{header, Request, StatusCode},
    routing::get,
    Router,
};
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc,
    },
    time::Duration,
};
use tower::ServiceExt;
use tower_backstop::{
    http::{accept::StatusIn, HttpKey},
    outcome::Stats,
    FallbackLayer,
};

/// A cache that misses every time, in front of a database router that takes 20 ms
/// and counts its calls; coalesced by the ready-made HTTP key.
fn app(calls: Arc<AtomicUsize>, stats: Stats) -> Router {
    let database = get(move || {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            "row 7"
        }
    });
    Router::new()
        .route("/user/7", get(|| async { StatusCode::NOT_FOUND }))
        .layer(
            FallbackLayer::new(database)
                .accept(StatusIn::SUCCESS)
                .stats(stats)
                .share_responses()
                .coalesce_by(HttpKey::new())
                .buffer_bodies(),
        )
}

async fn get_user(app: Router, authorization: Option<&'static str>) -> (StatusCode, String) {
    let mut request = Request::get("/user/7");
    if let Some(credentials) = authorization {
        request = request.header(header::AUTHORIZATION, credentials);
    }
    let response = app
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1024)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_for_one_uri_share_one_database_call() {
    let (calls, stats) = (Arc::new(AtomicUsize::new(0)), Stats::new());
    let app = app(calls.clone(), stats.clone());
    let answers =
        futures_util::future::join_all((0..20).map(|_| get_user(app.clone(), None))).await;
    assert!(answers
        .iter()
        .all(|a| *a == (StatusCode::OK, "row 7".to_owned())));
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(stats.snapshot().coalesce_joined, 19);
}

#[tokio::test(start_paused = true)]
async fn requests_with_credentials_never_share() {
    let (calls, stats) = (Arc::new(AtomicUsize::new(0)), Stats::new());
    let app = app(calls.clone(), stats.clone());
    let users = ["Bearer ada", "Bearer ada", "Bearer bob", "Bearer bob"];
    let answers = futures_util::future::join_all(
        users
            .into_iter()
            .map(|user| get_user(app.clone(), Some(user))),
    )
    .await;
    assert!(answers.iter().all(|a| a.0 == StatusCode::OK));
    // Not even the same user's two requests: a credentialed request is not shared
    // unless the key is told to (`HttpKey::share_credentialed`).
    assert_eq!(calls.load(SeqCst), 4);
    assert_eq!(stats.snapshot().coalesce_joined, 0);
}
