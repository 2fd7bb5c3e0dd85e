//! An axum `Router` as the fallback behind `Router::layer` and `Router::route_layer`,
//! wrapped in `Reroute`: `Path` extractors in both routers, the user's own extensions
//! reaching both branches, hits and misses, over a real loopback server and client.

#[allow(dead_code)]
#[path = "../http/support.rs"]
mod support;

use axum::{
    extract::{ConnectInfo, MatchedPath, Path},
    http::StatusCode,
    routing::get,
    Extension, Router,
};
use std::net::SocketAddr;
use support::{get as get_req, send, text, Server};
use tower_backstop::{
    http::{accept::RejectStatus, BufferBodyLayer, Reroute},
    launch::AnyRequest,
    FallbackLayer,
};

/// What an auth layer in front of the app would put in the request.
#[derive(Clone)]
struct CurrentUser(&'static str);

/// What a request-id layer would put in the request.
#[derive(Clone)]
struct RequestId(u64);

/// The cache: even ids are hits, odd ids are misses (404).
fn cache() -> Router {
    Router::new().route(
        "/user/{id}",
        get(
            |Path(id): Path<u32>, Extension(user): Extension<CurrentUser>| async move {
                if id % 2 == 0 {
                    (StatusCode::OK, format!("cache {id} for {}", user.0))
                } else {
                    (StatusCode::NOT_FOUND, "miss".to_owned())
                }
            },
        ),
    )
}

/// The database, a router of its own: every user, a route the cache lacks with two
/// parameters, and its own 404.
fn database() -> Router {
    Router::new()
        .route(
            "/user/{id}",
            get(
                |Path(id): Path<u32>,
                 path: MatchedPath,
                 Extension(user): Extension<CurrentUser>,
                 Extension(request): Extension<RequestId>| async move {
                    format!(
                        "database {id} for {} (request {}, route {})",
                        user.0,
                        request.0,
                        path.as_str()
                    )
                },
            ),
        )
        .route(
            "/team/{team}/user/{id}",
            get(|Path((team, id)): Path<(String, u32)>| async move {
                format!("database {team}/{id}")
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "database: no such page") })
}

fn layer() -> FallbackLayer<Reroute<Router>, RejectStatus, AnyRequest, BufferBodyLayer> {
    FallbackLayer::new(Reroute::new(database()))
        .accept(RejectStatus(StatusCode::NOT_FOUND))
        .buffer_bodies()
}

/// The user's own layers, outermost.
fn with_users_extensions(app: Router) -> Router {
    app.layer(Extension(RequestId(42)))
        .layer(Extension(CurrentUser("ada")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_layer_router_fallback_serves_misses_with_path_and_extensions() {
    let app = with_users_extensions(cache().route_layer(layer()));
    let server = Server::axum(app).await;

    let (status, _, body) = send(get_req(server.url("/user/2"))).await;
    assert_eq!((status, text(&body)), (StatusCode::OK, "cache 2 for ada"));
    let (status, _, body) = send(get_req(server.url("/user/3"))).await;
    assert_eq!(
        (status, text(&body)),
        (
            StatusCode::OK,
            "database 3 for ada (request 42, route /user/{id})"
        )
    );
    // `route_layer` leaves paths the cache lacks alone: the app's own 404.
    let (status, _, body) = send(get_req(server.url("/team/a/user/3"))).await;
    assert_eq!((status, text(&body)), (StatusCode::NOT_FOUND, ""));

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_layer_router_fallback_serves_misses_with_path_and_extensions() {
    let app = with_users_extensions(cache().layer(layer()));
    let server = Server::axum(app).await;

    let (status, _, body) = send(get_req(server.url("/user/4"))).await;
    assert_eq!((status, text(&body)), (StatusCode::OK, "cache 4 for ada"));
    let (status, _, body) = send(get_req(server.url("/user/5"))).await;
    assert_eq!(
        (status, text(&body)),
        (
            StatusCode::OK,
            "database 5 for ada (request 42, route /user/{id})"
        )
    );
    // A path only the database has: the cache's 404 reaches the layer, and the
    // database routes it with both of its parameters.
    let (status, _, body) = send(get_req(server.url("/team/blue/user/5"))).await;
    assert_eq!((status, text(&body)), (StatusCode::OK, "database blue/5"));
    // A path neither has: the database's own 404.
    let (status, _, body) = send(get_req(server.url("/nowhere"))).await;
    assert_eq!(
        (status, text(&body)),
        (StatusCode::NOT_FOUND, "database: no such page")
    );

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_info_reaches_the_fallback_router() {
    let database = Router::new().route(
        "/user/{id}",
        get(
            |Path(id): Path<u32>, ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                format!("database {id} for {}", peer.ip())
            },
        ),
    );
    let app = Router::new()
        .route(
            "/user/{id}",
            get(|Path(_id): Path<u32>| async { StatusCode::NOT_FOUND }),
        )
        .route_layer(
            FallbackLayer::new(Reroute::new(database))
                .accept(RejectStatus(StatusCode::NOT_FOUND))
                .buffer_bodies(),
        );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });

    let (status, _, body) = send(get_req(format!("http://{addr}/user/7"))).await;
    assert_eq!(
        (status, text(&body)),
        (StatusCode::OK, "database 7 for 127.0.0.1")
    );

    let _ = stop.send(());
    let _ = tokio::time::timeout(support::OBSERVE_LIMIT, server).await;
}
