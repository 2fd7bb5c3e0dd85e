//! `ShareResponse`: an answer read whole into a body that clones, as coalesced waiters
//! need it; a body over the cap, one that fails and one that stalls become a marked
//! `502`; `share_responses` makes an axum stack's answers `Clone`. In memory, on
//! tokio's paused clock.

use axum::{body::Body, routing::get, Router};
use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use std::{convert::Infallible, io, time::Duration};
use tower::{service_fn, ServiceExt};
use tower_backstop::{
    accept::{Accept, And},
    http::{
        accept::{AcceptBody, RejectBody, StatusIn},
        read::IncompleteBody,
        ReplayBody, ShareResponse,
    },
    FallbackLayer,
};

type Frames = Vec<Result<Frame<Bytes>, io::Error>>;

fn data(bytes: &'static str) -> Result<Frame<Bytes>, io::Error> {
    Ok(Frame::data(Bytes::from_static(bytes.as_bytes())))
}

fn trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers.insert("x-checksum", "abc".parse().unwrap());
    trailers
}

/// An answer whose body yields `frames`, then (with `stall`) never ends.
fn answer(frames: Frames, stall: bool) -> Response<Body> {
    let body = stream::iter(frames);
    let body = if stall {
        Body::new(StreamBody::new(stream::StreamExt::chain(
            body,
            stream::pending(),
        )))
    } else {
        Body::new(StreamBody::new(body))
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain")
        .header("etag", "\"v7\"")
        .extension(Marker(7))
        .body(body)
        .unwrap()
}

#[derive(Clone, Debug, PartialEq)]
struct Marker(u32);

/// `ShareResponse` around a service that gives this answer once.
async fn shared(answer: Response<Body>) -> Response<ReplayBody> {
    let mut answer = Some(answer);
    let database = service_fn(move |_: ()| {
        let answer = answer.take().expect("called once");
        async move { Ok::<_, Infallible>(answer) }
    });
    ShareResponse::new(database).oneshot(()).await.unwrap()
}

async fn collect(response: Response<ReplayBody>) -> (Bytes, Option<HeaderMap>) {
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (collected.to_bytes(), trailers)
}

#[tokio::test(start_paused = true)]
async fn a_shared_answer_clones_byte_for_byte_with_its_trailers() {
    let frames = vec![
        data("row "),
        data(""),
        data("7, "),
        data("ada"),
        Ok(Frame::trailers(trailers())),
    ];
    let response = shared(answer(frames, false)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["etag"], "\"v7\"");
    assert_eq!(response.extensions().get::<Marker>(), Some(&Marker(7)));
    assert_eq!(response.extensions().get::<IncompleteBody>(), None);

    let copies: Vec<_> = (0..3).map(|_| response.clone()).collect();
    // A clone shares the bytes: the same memory, not a copy.
    assert_eq!(
        copies[0].body().data().as_ptr(),
        response.body().data().as_ptr()
    );
    for copy in copies.into_iter().chain([response]) {
        assert_eq!(copy.headers()["content-type"], "text/plain");
        let (bytes, trailers) = collect(copy).await;
        assert_eq!(bytes, "row 7, ada");
        assert_eq!(trailers, Some(self::trailers()));
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_cap_is_a_marked_bad_gateway() {
    let database = service_fn(|_: ()| async {
        Ok::<_, Infallible>(answer(vec![data("0123"), data("456789")], false))
    });
    let response = ShareResponse::new(database)
        .max_bytes(8)
        .oneshot(())
        .await
        .unwrap();
    assert_incomplete(response, IncompleteBody::TooLarge).await;
}

#[tokio::test(start_paused = true)]
async fn a_body_that_fails_is_a_marked_bad_gateway() {
    let failing = vec![data("row"), Err(io::Error::other("connection reset"))];
    let response = shared(answer(failing, false)).await;
    assert_incomplete(response, IncompleteBody::Failed).await;
}

#[tokio::test(start_paused = true)]
async fn a_body_that_stalls_is_a_marked_bad_gateway_after_max_wait() {
    let database =
        service_fn(|_: ()| async { Ok::<_, Infallible>(answer(vec![data("row")], true)) });
    let started = tokio::time::Instant::now();
    let response = ShareResponse::new(database)
        .max_wait(Duration::from_millis(300))
        .oneshot(())
        .await
        .unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_incomplete(response, IncompleteBody::TimedOut).await;
}

/// A `502` with no head fields (they described the body that is gone), the original's
/// extensions, the mark, and an empty body; its clones are the same.
async fn assert_incomplete(response: Response<ReplayBody>, why: IncompleteBody) {
    for response in [response.clone(), response] {
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert!(response.headers().is_empty(), "{:?}", response.headers());
        assert_eq!(response.extensions().get::<IncompleteBody>(), Some(&why));
        assert_eq!(response.extensions().get::<Marker>(), Some(&Marker(7)));
        assert_eq!(collect(response).await, (Bytes::new(), None));
    }
}

#[tokio::test(start_paused = true)]
async fn errors_pass_through() {
    let database = service_fn(|_: ()| async { Err::<Response<Body>, _>(io::Error::other("down")) });
    let error = ShareResponse::new(database).oneshot(()).await.unwrap_err();
    assert_eq!(error.to_string(), "down");
}

#[test]
fn a_shared_answer_is_clone_send_and_sync() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<Response<ReplayBody>>();
    fn service<
        S: tower::Service<Request<Body>, Response = Response<ReplayBody>, Error = Infallible>
            + Clone
            + Send
            + Sync,
    >(
        _: &S,
    ) {
    }
    service(&ShareResponse::new(Router::new()));
}

#[tokio::test(start_paused = true)]
async fn share_responses_makes_an_axum_stacks_answers_clone() {
    let database = get(|| async { "row 7" });
    let app = Router::new()
        .route("/user/7", get(|| async { StatusCode::NOT_FOUND }))
        .route("/user/8", get(|| async { "cached 8" }))
        .layer(
            FallbackLayer::new(database)
                .accept(StatusIn::SUCCESS)
                .share_responses()
                .buffer_bodies(),
        );
    for (path, want) in [("/user/7", "row 7"), ("/user/8", "cached 8")] {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(body, want);
    }
}

#[tokio::test(start_paused = true)]
async fn the_body_predicates_judge_a_shared_answer() {
    let database = get(|| async { "row 7" });
    // The cache answers `200` with an empty body on a miss.
    let app = Router::new()
        .route("/user/7", get(|| async {}))
        .route("/user/8", get(|| async { "cached 8" }))
        .layer(
            FallbackLayer::new(database)
                .accept(And::new(StatusIn::SUCCESS, RejectBody::EMPTY))
                .share_responses()
                .buffer_bodies(),
        );
    for (path, want) in [("/user/7", "row 7"), ("/user/8", "cached 8")] {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(body, want);
    }
    // A marked answer is not a whole body, whatever its bytes.
    let hit = AcceptBody::new(|_: &[u8]| true);
    let mut marked = Response::new(ReplayBody::empty());
    marked.extensions_mut().insert(IncompleteBody::TooLarge);
    assert!(!Accept::<_, Infallible>::accept(&hit, &Ok(marked)));
    let whole = Response::new(ReplayBody::new(Bytes::from_static(b"row")));
    assert!(Accept::<_, Infallible>::accept(&hit, &Ok(whole)));
}
