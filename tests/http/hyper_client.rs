//! hyper-util's client as both branches, over HTTP/1.1 and over HTTP/2: the stack
//! keeps the client's error type, and a branch that cannot connect is a rejection.

use crate::support::{client, dead_addr, Event, Server, Tracker};
use axum::{
    body::{Body, Bytes},
    extract::Path,
    http::{HeaderMap, Request, Response, StatusCode, Version},
    routing::{get, post},
    Router,
};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_backstop::{
    http::{accept::RejectServerErrors, BufferBodyLayer, ReplayBody},
    FallbackLayer,
};

type ClientError = hyper_util::client::legacy::Error;

/// A branch: a hyper-util client aimed at `target`, answering with axum's body type
/// (the buffering layer needs a response body with a `Default`).
pub fn branch(
    target: SocketAddr,
    http2: bool,
) -> impl Service<
    Request<ReplayBody>,
    Response = Response<Body>,
    Error = ClientError,
    Future = impl Send,
> + Clone
       + Send
       + Sync {
    ServiceBuilder::new()
        .map_response(|response: Response<hyper::body::Incoming>| response.map(Body::new))
        .map_request(move |mut req: Request<ReplayBody>| {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            *req.uri_mut() = format!("http://{target}{path}").parse().unwrap();
            req
        })
        .service(client(http2))
}

/// A server that names itself and the HTTP version it was reached with.
/// `fail_odd`: odd items answer 503.
fn named_server(name: &'static str, fail_odd: bool, calls: Tracker) -> Router {
    let items = calls.clone();
    Router::new()
        .route(
            "/item/{id}",
            get(move |Path(id): Path<u32>, version: Version| {
                let call = items.start(format!("/item/{id}"));
                async move {
                    call.finish();
                    let status = if fail_odd && id % 2 == 1 {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    };
                    (status, format!("{name} {id} {version:?}"))
                }
            }),
        )
        .route(
            "/echo",
            post(move |headers: HeaderMap, body: Bytes| {
                let call = calls.start("/echo");
                async move {
                    call.finish();
                    let status = if fail_odd {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    };
                    let length = headers.get("content-length").cloned();
                    (status, [("x-content-length", length.unwrap())], body)
                }
            }),
        )
}

async fn read(response: Response<Body>) -> (StatusCode, String) {
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn client_branches(http2: bool) {
    let version = if http2 { "HTTP/2.0" } else { "HTTP/1.1" };
    let (primary_calls, fallback_calls) = (Tracker::default(), Tracker::default());
    let primary = Server::axum(named_server("primary", true, primary_calls.clone())).await;
    let fallback = Server::axum(named_server("fallback", false, fallback_calls.clone())).await;

    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(FallbackLayer::new(branch(fallback.addr, http2)).accept(RejectServerErrors))
        .service(branch(primary.addr, http2));
    // The client's error type passes through, unchanged.
    fn error_type<S: Service<Request<Body>, Error = ClientError>>(_: &S) {}
    error_type(&svc);

    let call = |path: &str| {
        svc.clone().oneshot(
            Request::get(format!("http://app{path}"))
                .body(Body::empty())
                .unwrap(),
        )
    };
    // A hit: the primary's answer.
    let (status, body) = read(call("/item/2").await.unwrap()).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, format!("primary 2 {version}"))
    );
    // The primary's 503 is rejected: the fallback's answer.
    let (status, body) = read(call("/item/3").await.unwrap()).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, format!("fallback 3 {version}"))
    );

    // A body is buffered once and sent in full on both connections.
    let payload = vec![b'x'; 30_000];
    let req = Request::post("http://app/echo")
        .body(Body::from(payload.clone()))
        .unwrap();
    let response = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(response.headers()["x-content-length"], "30000");
    let (status, body) = read(response).await;
    assert_eq!((status, body.into_bytes()), (StatusCode::OK, payload));
    let echoed = |e: &Event| *e == Event::Completed("/echo".into());
    assert_eq!(primary_calls.count(echoed), 1);
    assert_eq!(fallback_calls.count(echoed), 1);

    // A primary that cannot be reached is an `Err`, rejected: the fallback serves.
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(FallbackLayer::new(branch(fallback.addr, http2)).accept(RejectServerErrors))
        .service(branch(dead_addr().await, http2));
    let response = svc
        .oneshot(
            Request::get("http://app/item/8")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(read(response).await.1, format!("fallback 8 {version}"));

    // Neither reachable: the fallback's error.
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new())
        .layer(FallbackLayer::new(branch(dead_addr().await, http2)))
        .service(branch(dead_addr().await, http2));
    let error = svc
        .oneshot(
            Request::get("http://app/item/8")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert!(error.is_connect(), "{error:?}");

    primary.stop().await;
    fallback.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_as_both_branches_over_http1() {
    client_branches(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_as_both_branches_over_http2() {
    client_branches(true).await;
}
