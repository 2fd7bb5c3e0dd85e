//! axum: the layer on `Router::layer` and `Router::route_layer`, with the fallback
//! being another router or a hyper-util client to a second server, over loopback.

use crate::support::{get, post, proxy, send, text, Event, Server, Tracker};
use axum::{
    body::{Body, Bytes},
    extract::Path,
    http::{header, Request, StatusCode},
    routing::{get as get_route, post as post_route},
    Router,
};
use std::convert::Infallible;
use tower::{Layer, Service, ServiceExt};
use tower_backstop::{
    http::{accept::RejectStatus, ReplayBody},
    FallbackLayer,
};

/// The cache: even ids are hits, odd ids are misses (404).
async fn cache_item(Path(id): Path<u32>) -> (StatusCode, String) {
    if id % 2 == 0 {
        (StatusCode::OK, format!("cache {id}"))
    } else {
        (StatusCode::NOT_FOUND, "miss".to_owned())
    }
}

/// The origin, as a router: every item, an echo of posted bodies, and its own 404.
fn origin(tracker: Tracker) -> Router {
    let items = tracker.clone();
    let echo = tracker;
    Router::new()
        .route(
            "/item/{id}",
            get_route(move |Path(id): Path<u32>| {
                let call = items.start(format!("/item/{id}"));
                async move {
                    call.finish();
                    format!("origin {id}")
                }
            }),
        )
        .route(
            "/echo",
            post_route(move |headers: axum::http::HeaderMap, body: Bytes| {
                let call = echo.start(format!("/echo {}", body.len()));
                async move {
                    call.finish();
                    let tag = headers
                        .get("x-tag")
                        .map_or("", |v| v.to_str().unwrap())
                        .to_owned();
                    ([("x-tag", tag)], body)
                }
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "origin: no such page") })
}

fn assert_infallible<S: Service<Request<Body>, Error = Infallible>>(_: &S) {}

fn without_extensions(mut req: Request<ReplayBody>) -> Request<ReplayBody> {
    req.extensions_mut().clear();
    req
}

#[test]
fn layered_routes_and_routers_stay_infallible() {
    let layer = FallbackLayer::new(Router::new())
        .accept(RejectStatus(StatusCode::NOT_FOUND))
        .buffer_bodies();
    // The service the layer builds around an axum route is `Infallible`...
    let svc = layer.layer(get_route(|| async { "cache" }));
    assert_infallible(&svc);
    // ...so both router methods take the layer, which requires `Error: Into<Infallible>`,
    // `Clone + Send + Sync` services and `Send` futures; and the router still serves.
    let app: Router = Router::new()
        .route("/a", get_route(|| async { "a" }))
        .route_layer(layer.clone())
        .layer(layer);
    assert_infallible(&app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_layer_with_a_router_fallback_serves_hits_misses_and_bodies() {
    let origin_calls = Tracker::default();
    // Behind `Router::layer` the request has been routed: axum's path parameters are in
    // its extensions, and a second router would add its own to them. The fallback
    // router gets the request without them.
    let origin = origin(origin_calls.clone()).map_request(without_extensions);
    let app = Router::new()
        .route("/item/{id}", get_route(cache_item))
        .layer(
            FallbackLayer::new(origin)
                .accept(RejectStatus(StatusCode::NOT_FOUND))
                .buffer_bodies(),
        );
    let server = Server::axum(app).await;

    let (status, _, body) = send(get(server.url("/item/2"))).await;
    assert_eq!((status, text(&body)), (StatusCode::OK, "cache 2"));
    let (status, _, body) = send(get(server.url("/item/3"))).await;
    assert_eq!((status, text(&body)), (StatusCode::OK, "origin 3"));

    // The cache has no `/echo`: with `Router::layer`, its own 404 reaches the layer
    // and the origin serves the post, body and headers intact.
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let mut req = post(server.url("/echo"), payload.clone());
    req.headers_mut().insert("x-tag", "tagged".parse().unwrap());
    let (status, headers, body) = send(req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-tag"], "tagged");
    assert_eq!(body.to_vec(), payload);

    // A page neither has: the fallback's own 404 is served.
    let (status, _, body) = send(get(server.url("/nowhere"))).await;
    assert_eq!(
        (status, text(&body)),
        (StatusCode::NOT_FOUND, "origin: no such page")
    );

    // Over the cap: 413, and the origin never sees it.
    let (status, _, _) = send(post(server.url("/echo"), vec![0u8; 100_000])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        origin_calls.count(|e| matches!(e, Event::Started(what) if what.starts_with("/echo"))),
        1
    );

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_body_over_the_cap_is_refused() {
    let origin_calls = Tracker::default();
    let app = Router::new()
        .route(
            "/echo",
            post_route(|| async { (StatusCode::NOT_FOUND, "miss") }),
        )
        .route_layer(
            FallbackLayer::new(origin(origin_calls.clone()))
                .accept(RejectStatus(StatusCode::NOT_FOUND))
                .buffer_bodies(),
        );
    let server = Server::axum(app).await;

    // Chunked, with no length announced: refused once 64 KiB have been read.
    let chunks = (0..10).map(|_| Ok::<_, Infallible>(Bytes::from(vec![1u8; 8 * 1024])));
    let body = Body::from_stream(futures_util::stream::iter(chunks));
    let req = Request::post(server.url("/echo"))
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(body)
        .unwrap();
    let (status, _, _) = send(req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // A chunked body under the cap goes through.
    let chunks = (0..4).map(|_| Ok::<_, Infallible>(Bytes::from(vec![1u8; 8 * 1024])));
    let req = post(
        server.url("/echo"),
        Body::from_stream(futures_util::stream::iter(chunks)),
    );
    let (status, _, body) = send(req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 32 * 1024);
    assert_eq!(origin_calls.completed(), 1);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_layer_with_a_client_to_a_second_server() {
    let origin_calls = Tracker::default();
    let origin_server = Server::axum(origin(origin_calls.clone())).await;

    let app = Router::new()
        .route("/item/{id}", get_route(cache_item))
        .route(
            "/echo",
            post_route(|| async { (StatusCode::NOT_FOUND, "miss") }),
        )
        .route_layer(
            FallbackLayer::new(proxy(origin_server.addr, false))
                .accept(RejectStatus(StatusCode::NOT_FOUND))
                .buffer_bodies(),
        );
    let server = Server::axum(app).await;

    let (status, _, body) = send(get(server.url("/item/4"))).await;
    assert_eq!((status, text(&body)), (StatusCode::OK, "cache 4"));
    let (status, _, body) = send(get(server.url("/item/5"))).await;
    assert_eq!((status, text(&body)), (StatusCode::OK, "origin 5"));

    // The replayed body crosses a second connection intact.
    let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
    let (status, _, body) = send(post(server.url("/echo"), payload.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.to_vec(), payload);

    // Over the cap: refused here, nothing is sent to the origin.
    let (status, _, _) = send(post(server.url("/echo"), vec![0u8; 65 * 1024])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // `route_layer` leaves unknown paths alone: the app's own 404, the origin not asked.
    let (status, _, body) = send(get(server.url("/nowhere"))).await;
    assert_eq!((status, text(&body)), (StatusCode::NOT_FOUND, ""));

    let events = origin_calls.events();
    assert!(
        !events.iter().any(|e| format!("{e:?}").contains("nowhere")),
        "{events:?}"
    );
    let echoes =
        origin_calls.count(|e| matches!(e, Event::Started(what) if what.starts_with("/echo")));
    assert_eq!(echoes, 1, "{events:?}");

    server.stop().await;
    origin_server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_routed_again_sees_the_primarys_path_parameters() {
    // What `without_extensions` is for: a fallback router given the request as the
    // primary's routing left it finds two path parameters where it expects one.
    let app = Router::new()
        .route("/item/{id}", get_route(cache_item))
        .route_layer(
            FallbackLayer::new(origin(Tracker::default()))
                .accept(RejectStatus(StatusCode::NOT_FOUND))
                .buffer_bodies(),
        );
    let response = app
        .oneshot(Request::get("/item/3").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_router_wrapped_before_routing() {
    // The layer around the router itself sees requests before any routing: the
    // fallback router needs nothing removed, and serves the paths the primary lacks.
    let origin_calls = Tracker::default();
    let cache = Router::new().route("/item/{id}", get_route(cache_item));
    let app = FallbackLayer::new(origin(origin_calls.clone()))
        .accept(RejectStatus(StatusCode::NOT_FOUND))
        .buffer_bodies()
        .layer(cache);
    assert_infallible(&app);
    let server = Server::serve(app).await;

    let (status, _, body) = send(get(server.url("/item/6"))).await;
    assert_eq!((status, text(&body)), (StatusCode::OK, "cache 6"));
    let (status, _, body) = send(get(server.url("/item/7"))).await;
    assert_eq!((status, text(&body)), (StatusCode::OK, "origin 7"));
    let (status, _, body) = send(post(server.url("/echo"), "posted")).await;
    assert_eq!((status, text(&body)), (StatusCode::OK, "posted"));
    let (status, _, _) = send(post(server.url("/echo"), vec![0u8; 70_000])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(origin_calls.completed(), 2);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_reaches_no_branch_and_hangs_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (cache_calls, origin_calls) = (Tracker::default(), Tracker::default());
    let cache = cache_calls.clone();
    let app = Router::new()
        .route(
            "/echo",
            post_route(move || {
                cache.start("/echo").finish();
                async { (StatusCode::NOT_FOUND, "miss") }
            }),
        )
        .route_layer(
            FallbackLayer::new(origin(origin_calls.clone()))
                .accept(RejectStatus(StatusCode::NOT_FOUND))
                .buffer_bodies(),
        );
    let server = Server::axum(app).await;

    // A client that announces 1000 bytes, sends 10 and stops sending.
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = "POST /echo HTTP/1.1\r\nhost: app\r\ncontent-length: 1000\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(b"0123456789").await.unwrap();
    stream.shutdown().await.unwrap();

    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        crate::support::OBSERVE_LIMIT,
        stream.read_to_end(&mut answer),
    )
    .await;
    assert!(read.is_ok(), "the server neither answered nor closed");
    // The body failed while being read: `400`, and neither branch saw the request.
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request"), "{answer}");
    assert_eq!(cache_calls.started(), 0);
    assert_eq!(origin_calls.started(), 0);

    server.stop().await;
}
