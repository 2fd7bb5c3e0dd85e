//! The coalescing pieces on real requests and answers over loopback: `HttpKey` on the
//! requests an axum server parses (HTTP/1.1 and HTTP/2: their bodies must be known
//! empty, or no real request would ever be keyed), and `ShareResponse` on a
//! hyper-util client's streamed answer with trailers.
//!
//! These run on the real clock, against real sockets; no outcome depends on timing.

use crate::support::{client, test_client, Server, OBSERVE_LIMIT};
use axum::{body::Body, extract::Request, routing::get, Router};
use bytes::Bytes;
use futures_util::stream;
use http::{header, HeaderMap, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};
use tower::ServiceExt;
use tower_backstop::{
    coalesce::CoalesceKey,
    http::{HttpKey, ReplayBody, RequestKey, ShareResponse},
};

type Seen = Arc<Mutex<Vec<Option<RequestKey>>>>;

/// A server whose every route records the key of the request it received.
async fn recording() -> (Server, Seen) {
    let seen = Seen::default();
    let record = seen.clone();
    let handler = move |req: Request| {
        record.lock().unwrap().push(HttpKey::new().key(&req));
        async { StatusCode::NO_CONTENT }
    };
    let router = Router::new().route("/item/7", get(handler.clone()).post(handler));
    (Server::axum(router).await, seen)
}

#[tokio::test]
async fn requests_as_hyper_parses_them_are_keyed() {
    let (server, seen) = recording().await;
    let url = server.url("/item/7?v=2");
    let request = |method: http::Method, fields: &[(header::HeaderName, &str)], body: Body| {
        let mut req = http::Request::builder().method(method).uri(&url);
        for (name, value) in fields {
            req = req.header(name, *value);
        }
        req.body(body).unwrap()
    };
    let json = [(header::ACCEPT, "application/json")];
    let h1 = test_client();
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Body>();
    for req in [
        request(http::Method::GET, &json, Body::empty()),
        request(http::Method::GET, &json, Body::empty()),
        request(
            http::Method::GET,
            &[(header::ACCEPT, "text/html")],
            Body::empty(),
        ),
        request(
            http::Method::GET,
            &[(header::COOKIE, "id=1")],
            Body::empty(),
        ),
        request(http::Method::POST, &json, Body::from("{}")),
    ] {
        let answer = tokio::time::timeout(OBSERVE_LIMIT, h1.request(req)).await;
        assert_eq!(answer.unwrap().unwrap().status(), StatusCode::NO_CONTENT);
    }
    for _ in 0..2 {
        let req = request(http::Method::GET, &json, Body::empty());
        let answer = tokio::time::timeout(OBSERVE_LIMIT, h2.request(req)).await;
        assert_eq!(answer.unwrap().unwrap().status(), StatusCode::NO_CONTENT);
    }
    let seen = seen.lock().unwrap().clone();
    let [json_1, json_2, html, cookie, post, h2_1, h2_2] = seen.try_into().unwrap();
    // A bodiless GET is keyed, over HTTP/1.1 (origin form and `Host`)...
    assert!(json_1.is_some(), "hyper's bodiless GET must count as empty");
    assert_eq!(json_1, json_2);
    assert_ne!(json_1, html);
    assert_eq!((cookie, post), (None, None));
    // ...and over HTTP/2 (absolute URI, no `Host`): another key for the same resource.
    assert!(h2_1.is_some());
    assert_eq!(h2_1, h2_2);
    assert_ne!(h2_1, json_1);
    server.stop().await;
}

#[tokio::test]
async fn a_streamed_answer_with_trailers_is_shared_byte_for_byte() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "abc".parse().unwrap());
    let sent = trailers.clone();
    let origin = Router::new().route(
        "/row/7",
        get(move || {
            let frames = [
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"row 7: "))),
                Ok(Frame::data(Bytes::from(vec![b'a'; 100_000]))),
                Ok(Frame::trailers(sent.clone())),
            ];
            async move { Body::new(StreamBody::new(stream::iter(frames))) }
        }),
    );
    let server = Server::axum(origin).await;
    // Trailers need HTTP/2 (or a TE: trailers request over HTTP/1.1).
    let database = ShareResponse::new(client(true));
    let req = http::Request::get(server.url("/row/7"))
        .body(ReplayBody::empty())
        .unwrap();
    let answer = tokio::time::timeout(OBSERVE_LIMIT, database.oneshot(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let copies = [answer.clone(), answer.clone(), answer];
    for copy in copies {
        let collected = copy.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        let bytes = collected.to_bytes();
        assert_eq!(bytes.len(), 7 + 100_000);
        assert!(bytes.starts_with(b"row 7: aaa") && bytes.ends_with(b"aaa"));
    }
    server.stop().await;
}
