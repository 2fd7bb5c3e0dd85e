//! HTTP and gRPC: request bodies, status predicates, and how the layer sits in axum,
//! hyper and tonic stacks.
//!
//! Available with the `http` feature; `Reroute` needs the `axum` feature.
//!
//! A [`Fallback`] gives the fallback a clone of each request, and an
//! `http::Request<B>` is only `Clone` when its body is — a streamed body (axum's,
//! hyper's, tonic's) is not. [`BufferBody`] (or [`BufferBodyLayer`]) reads the body
//! into memory first, up to a cap, and calls the fallback service with an
//! `http::Request<`[`ReplayBody`]`>`, whose body clones for the price of a reference
//! count (the head — URI, headers, extensions — is copied as `Request::clone` does):
//!
//! ```text
//! request ──▶ BufferBody ──▶ Fallback ─┬─▶ primary   (Request<ReplayBody>)
//!   (Request<B>)  reads the body       └─▶ fallback  (a clone of it)
//! ```
//!
//! - Requests without a body (`GET`, `HEAD`, ...) are passed on at once: nothing is read
//!   or allocated.
//! - A body over the cap (64 KiB by default, trailers included) is answered
//!   `413 Payload Too Large` without calling either branch, refused before it is read
//!   when its `Content-Length` says so. A body that fails while being read, or whose
//!   `Content-Length` / `Transfer-Encoding` is invalid or contradicts the bytes it
//!   sends, is answered `400 Bad Request` (see [`BufferBody`]). Both are responses, so the error type is not widened: an axum
//!   stack stays `Infallible`, and needs no `HandleErrorLayer`.
//!
//! The [`accept`] module has predicates that judge the primary's answer by its HTTP
//! status ([`RejectServerErrors`](accept::RejectServerErrors),
//! [`RejectStatus`](accept::RejectStatus), [`StatusIn`](accept::StatusIn)) or by its
//! gRPC status ([`GrpcStatus`](accept::GrpcStatus)); the [`grpc`] module reads gRPC
//! statuses, in the trailers too.
//!
//! # The primary's whole answer
//!
//! A predicate judges the primary's answer when its future resolves, and an HTTP
//! client's future resolves with the headers. A primary that sends `200` headers and
//! then stalls its body is accepted and served, and the caller waits on the body until
//! its own timeout, while the fallback had a complete answer milliseconds in; a timeout
//! on the primary bounds the headers, not the body.
//! [`read_primary_body`](crate::FallbackLayer::read_primary_body) (features `http` and
//! `time`) reads the primary's body first, whole, up to a byte cap within a time bound
//! (defaults [`read::DEFAULT_MAX_BYTES`], 1 MiB, and [`read::DEFAULT_MAX_WAIT`],
//! 1 second; see their docs for why):
//!
//! - a body that stalls, runs over the cap (or says it will, in its `Content-Length`)
//!   or fails is marked [`IncompleteBody`](read::IncompleteBody), which every predicate
//!   of [`accept`] rejects: under [`Launch::Concurrent`](crate::launch::Launch) the
//!   fallback, running all along, serves at once;
//! - a body read whole can be judged by its bytes, with
//!   [`RejectBody`](accept::RejectBody) or [`AcceptBody`](accept::AcceptBody);
//! - an answer that stands reaches the caller byte for byte, trailers included: what
//!   was read is replayed, then the rest, in a [`ReadAheadBody`](read::ReadAheadBody).
//!   Memory follows the bytes received, never a claim, up to the cap.
//!
//! A stalled primary gives way after `max_wait`; with
//! [`patience`](crate::FallbackLayer::patience)`(d)` as well, a fallback answer that is
//! ready waits at most `d` for the primary's body.
//!
//! ```
//! # #[cfg(feature = "time")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use axum::{body::Body, http::Request, routing::get, Router};
//! use tower::ServiceExt;
//! use tower_backstop::{accept::And, http::accept::{RejectBody, StatusIn}, FallbackLayer};
//!
//! let database = get(|| async { "row 7" });
//! // The cache answers `200` with an empty body on a miss.
//! let app = Router::new().route("/user/7", get(|| async {})).layer(
//!     FallbackLayer::new(database)
//!         .accept(And::new(StatusIn::SUCCESS, RejectBody::EMPTY))
//!         .read_primary_body()
//!         .buffer_bodies(),
//! );
//! let response = app.oneshot(Request::get("/user/7").body(Body::empty()).unwrap()).await.unwrap();
//! let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
//! assert_eq!(body, "row 7");
//! # }
//! # #[cfg(not(feature = "time"))]
//! # fn main() {}
//! ```
//!
//! The gRPC peek ([`peek_grpc_status`](crate::FallbackLayer::peek_grpc_status)) is the
//! same reader, stopped at the first frame that carries something; a primary that
//! sends `200` headers and then nothing within its wait is rejected the same way. See
//! the [`read`] module.
//!
//! # Coalescing
//!
//! Requests that coalesce share one fallback call, and each gets the same answer. Two
//! pieces make that safe and possible for HTTP:
//!
//! - **[`HttpKey`], the key.** Two requests share a call only if their method, URI and
//!   the request fields that vary the answer ([`DEFAULT_VARY`]: content negotiation,
//!   `Host`, ranges, conditionals; more with [`vary`](HttpKey::vary)) are equal. It
//!   never keys a request that is not `GET` or `HEAD`, that may have a body, or that
//!   carries credentials (`Authorization`, `Cookie`, `Proxy-Authorization`), unless
//!   told to with [`share_credentialed`](HttpKey::share_credentialed), which puts the
//!   credentials in the key. **A key that leaves out what varies the answer hands one
//!   caller's response to another**: with credentials, a data leak. Add every field
//!   your fallback answers by; see [`HttpKey`] for what it cannot see.
//! - **[`ShareResponse`], the answer** (features `http` and `time`). Each waiter gets
//!   a clone of the answer, and an `http::Response` with a streamed body cannot be
//!   cloned. `ShareResponse` reads the body whole (1 MiB, 1 second by default, the
//!   reader of [`read_primary_body`](crate::FallbackLayer::read_primary_body)) into a
//!   [`ReplayBody`]: `http::Response<ReplayBody>` is `Clone`, `Send` and `Sync`, and a
//!   clone shares the bytes. A body over the cap, failed or stalled is answered
//!   `502 Bad Gateway` marked [`IncompleteBody`](read::IncompleteBody), the same for
//!   every waiter. [`share_responses`](crate::FallbackLayer::share_responses) puts
//!   one on each branch, so that both answer the same `Clone` type — what a
//!   [`Fallback`] needs of its two branches — and an axum stack type-checks as it is:
//!
//! ```
//! # #[cfg(feature = "time")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use axum::{body::Body, http::{header, Request, StatusCode}, routing::get, Router};
//! use tower::ServiceExt;
//! use tower_backstop::{
//!     coalesce::CoalesceKey,
//!     http::{accept::StatusIn, HttpKey},
//!     FallbackLayer,
//! };
//!
//! // The fallback answers by tenant too: that field goes in the key.
//! let key = HttpKey::new().vary(header::HeaderName::from_static("x-tenant"));
//! let get_item = |tenant: &'static str| {
//!     Request::get("/item/7").header("x-tenant", tenant).body(Body::empty()).unwrap()
//! };
//! assert_eq!(key.key(&get_item("a")), key.key(&get_item("a")));
//! assert_ne!(key.key(&get_item("a")), key.key(&get_item("b")));
//!
//! let database = get(|| async { "row 7" });
//! let app = Router::new().route("/item/7", get(|| async { StatusCode::NOT_FOUND })).layer(
//!     FallbackLayer::new(database)
//!         .accept(StatusIn::SUCCESS)
//!         // Both branches answer `Response<ReplayBody>`, which clones.
//!         .share_responses()
//!         .buffer_bodies(),
//! );
//! let response = app.oneshot(get_item("a")).await.unwrap();
//! assert_eq!(axum::body::to_bytes(response.into_body(), 64).await.unwrap(), "row 7");
//! # let _ = key;
//! # }
//! # #[cfg(not(feature = "time"))]
//! # fn main() {}
//! ```
//!
//! To share the fallback's answers without reading the primary's body, put
//! [`ShareResponseLayer`] on the fallback alone, inside the coalescing, and turn its
//! `Response<ReplayBody>` back into the primary's response type outside it (in axum,
//! `map_response(|r: Response<ReplayBody>| r.map(axum::body::Body::new))`): each
//! waiter then converts its own clone.
//!
//! # axum
//!
//! `Router::layer` and `Router::route_layer` take the layer with one more builder
//! call, [`buffer_bodies`](crate::FallbackLayer::buffer_bodies) (the builder methods
//! can be called in any order). The fallback is any `Infallible` service answering
//! axum's `Response`: another `Router`, a handler, or a proxy to another service (see
//! the next section).
//!
//! **A `Router` as the fallback** goes in a `Reroute` (feature `axum`). Behind
//! `layer` and `route_layer` a request has been routed already, and axum keeps the
//! path parameters it matched in the request's extensions; a second router would add
//! its own to them, and its `Path` extractors would answer
//! `500 Wrong number of path arguments for Path. Expected 1 but got 2`. `Reroute`
//! resets axum's routing state and keeps every other extension, so what your own
//! layers add (an `Extension` from an auth layer, a request id, `ConnectInfo`) reaches
//! both branches:
//!
//! ```
//! # #[cfg(feature = "axum")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use axum::{body::Body, extract::Path, http::{Request, StatusCode}, routing::get, Extension, Router};
//! use tower::ServiceExt;
//! use tower_backstop::{
//!     http::{accept::RejectStatus, Reroute, SafeMethods},
//!     FallbackLayer,
//! };
//!
//! #[derive(Clone)]
//! struct CurrentUser(&'static str);
//!
//! // The database: an axum router of its own.
//! let database = Router::new().route(
//!     "/user/{id}",
//!     get(|Path(id): Path<u32>, Extension(user): Extension<CurrentUser>| async move {
//!         format!("user {id} for {}", user.0)
//!     }),
//! );
//!
//! // The cache answers 404 on a miss.
//! let app = Router::new()
//!     .route("/user/{id}", get(|Path(_id): Path<u32>| async { StatusCode::NOT_FOUND }))
//!     .route_layer(
//!         FallbackLayer::new(Reroute::new(database))
//!             .accept(RejectStatus(StatusCode::NOT_FOUND))
//!             // Writes reach the database only after the cache said no.
//!             .speculate_if(SafeMethods)
//!             .buffer_bodies(),
//!     )
//!     // An auth layer's extension, outermost: both routers see it.
//!     .layer(Extension(CurrentUser("ada")));
//!
//! let response = app
//!     .oneshot(Request::get("/user/7").body(Body::empty()).unwrap())
//!     .await
//!     .unwrap(); // `Infallible`
//! assert_eq!(response.status(), StatusCode::OK); // "user 7 for ada", from the database
//! # }
//! # #[cfg(not(feature = "axum"))]
//! # fn main() {}
//! ```
//!
//! With `Router::layer` instead of `route_layer`, the layer also wraps the router's own
//! fallback, so a path this router does not have (its `404`) is sent to the fallback
//! too. To set the body cap, use
//! [`buffer_bodies_with`](crate::FallbackLayer::buffer_bodies_with)`(BufferBodyLayer::new().max_bytes(n))`.
//!
//! A handler or a `MethodRouter` as the fallback (`FallbackLayer::new(get(handler))`)
//! does not route again: its `Path` extractor reads the parameters the primary's route
//! matched, which are the ones it wants, so it needs no `Reroute` and no `axum`
//! feature. The layer can also wrap a whole primary router, where it sees requests
//! before any routing; serve that with `axum::serve` as below:
//!
//! ```no_run
//! use axum::{extract::Path, http::StatusCode, routing::get, Router};
//! use tower::Layer;
//! use tower_backstop::{http::accept::RejectStatus, FallbackLayer};
//!
//! # #[tokio::main]
//! # async fn main() -> std::io::Result<()> {
//! let database = Router::new().route("/user/{id}", get(|Path(id): Path<u32>| async move {
//!     format!("user {id}")
//! }));
//! let cache = Router::new().route("/user/{id}", get(|| async { StatusCode::NOT_FOUND }));
//! let app = FallbackLayer::new(database)
//!     .accept(RejectStatus(StatusCode::NOT_FOUND))
//!     .buffer_bodies()
//!     .layer(cache);
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, axum::ServiceExt::<axum::extract::Request>::into_make_service(app)).await
//! # }
//! ```
//!
//! # hyper and other clients as a branch
//!
//! Each branch receives `http::Request<ReplayBody>`. A branch that wants a body type of
//! its own gets it with tower's `map_request`, *on that branch*, since the clone is
//! made before it: `svc.map_request(|req: Request<ReplayBody>| req.map(MyBody::new))`.
//! hyper-util's `Client` takes a `ReplayBody` as it is. It needs an absolute URI, and
//! its answers and errors have to become the other branch's response type — in axum,
//! an `Infallible` service answering `axum::response::Response`:
//!
//! ```
//! use axum::{body::Body, http::{Request, StatusCode, Uri}, response::{IntoResponse, Response}};
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use std::convert::Infallible;
//! use tower::service_fn;
//! use tower_backstop::http::ReplayBody;
//!
//! let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody>();
//! let origin = service_fn(move |mut req: Request<ReplayBody>| {
//!     let client = client.clone();
//!     async move {
//!         let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
//!         *req.uri_mut() = Uri::try_from(format!("http://127.0.0.1:8081{path}")).unwrap();
//!         Ok::<Response, Infallible>(match client.request(req).await {
//!             Ok(response) => response.map(Body::new),
//!             Err(_) => StatusCode::BAD_GATEWAY.into_response(),
//!         })
//!     }
//! });
//! // `FallbackLayer::new(origin)` now fits an axum router.
//! # let _ = origin;
//! ```
//!
//! tower's combinators (`map_err`, `map_result`, `then`) cannot turn an error into an
//! `Infallible` answer, hence the `service_fn`.
//!
//! **Cancellation on the wire.** When the primary is accepted, the fallback's response
//! future is dropped, and hyper abandons the request: over HTTP/2 it resets the stream
//! (`RST_STREAM`, the connection stays up); over HTTP/1.1 it must close the connection,
//! since a request in flight cannot be taken back, and the next request opens a new
//! one. The fallback server sees its handler cancelled either way. If most requests
//! are hits, delay the fallback's launch (`Launch::Delayed`, `Launch::Adaptive`) so
//! that few calls are cancelled at all, or talk HTTP/2 to the fallback
//! (`Client::builder(..).http2_only(true)`) — but then raise two limits that HTTP/2
//! implementations set against "rapid reset" floods, or a busy `Launch::Concurrent`
//! layer trips them and the fallback's connection is closed with
//! `GOAWAY ENHANCE_YOUR_CALM`, failing the misses in flight on it too:
//!
//! - on the fallback's hyper server, `http2::Builder::max_pending_accept_reset_streams`
//!   (default 20);
//! - on the hyper-util client, `Builder::http2_max_concurrent_reset_streams` (it
//!   remembers 50 cancelled streams by default, and closes the connection after too
//!   many late answers to streams it has forgotten).
//!
//! `examples/soak.rs` runs a million requests this way, and shows the failure with
//! hyper's defaults (`--h2-defaults`).
//!
//! # tonic
//!
//! A gRPC client puts the layer on its channel. `tonic`'s `Channel` takes
//! `Request<tonic::body::Body>`, so each branch converts the replayed body back,
//! [`GrpcStatus`](accept::GrpcStatus) judges the primary's answer, and
//! [`peek_grpc_status`](crate::FallbackLayer::peek_grpc_status) lets it judge answers
//! whose status comes in the trailers with no message before it (akka-grpc's and
//! grpcio's errors), by reading the primary's first body frame (see [`grpc`]); a
//! primary that sends `200` headers and then nothing for its wait (1 second) is a
//! rejection, so the client is not left waiting on its body:
//!
//! ```no_run
//! # // `peek_grpc_status` also needs the `time` feature.
//! # #[cfg(feature = "time")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tonic::{body::Body, transport::Channel};
//! use tonic_health::pb::health_client::HealthClient;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_backstop::{
//!     http::{accept::{GrpcCode, GrpcStatus}, BufferBodyLayer, ReplayBody},
//!     FallbackLayer,
//! };
//!
//! let primary = Channel::from_static("http://127.0.0.1:50051").connect().await?;
//! let fallback = Channel::from_static("http://127.0.0.1:50052").connect().await?;
//! let to_tonic = |req: http::Request<ReplayBody>| req.map(Body::new);
//!
//! let channel = ServiceBuilder::new()
//!     .layer(BufferBodyLayer::new())
//!     .layer(
//!         FallbackLayer::new(fallback.map_request(to_tonic))
//!             .accept(GrpcStatus::rejecting(&[GrpcCode::NotFound, GrpcCode::Unavailable]))
//!             .peek_grpc_status(),
//!     )
//!     .map_request(to_tonic)
//!     .service(primary);
//! let mut client = HealthClient::new(channel);
//! # let _ = &mut client;
//! # Ok(()) }
//! ```
//!
//! The buffering reads a whole request body before either branch is called, which
//! suits unary calls (and server streaming). Do not put it in front of client-streaming
//! or bidirectional calls: a stream longer than the cap is refused, and a client that
//! waits for a reply before it sends more never reaches either branch. Route those
//! around the layer (for example with a separate channel for them).
//!
//! A gRPC request over the cap is answered `RESOURCE_EXHAUSTED`, one whose body fails
//! (or contradicts its framing) `INTERNAL`, both as trailers-only gRPC responses; a
//! gRPC-Web request gets the same statuses under a gRPC-Web content type. The
//! `content-type` is matched without regard to case (RFC 9110 §8.3.1). Which gRPC
//! answers can be judged is described in [`accept`](accept#grpc).
//!
//! # Stacking with timeouts and retries
//!
//! Where a timeout or a retry goes decides what it bounds and what it costs:
//!
//! - **A timeout on the primary alone** turns a slow primary into a rejection, served
//!   by the fallback, which has been running all along — a slow *head*: it stops
//!   bounding the primary once the headers arrive. For the body, add
//!   [`read_primary_body`](crate::FallbackLayer::read_primary_body) (above). With tower-http's
//!   `TimeoutLayer`, the primary answers `408` (or the status you choose) and the
//!   error type stays put; reject that status in the predicate
//!   ([`StatusIn::SUCCESS`](accept::StatusIn::SUCCESS) does). With tower's `Timeout`
//!   the primary's error becomes `BoxError`, so the fallback's must be mapped to match.
//! - **A timeout around the whole layer** bounds the request: when it fires, both
//!   branches are dropped, and cancelled on the wire as above.
//! - **A retry outside the layer** (and inside [`BufferBody`], which is what makes the
//!   request clonable for it) runs both branches again on every attempt: with `n`
//!   attempts, the fallback sees up to `n` calls per request instead of one. Put a
//!   retry on the fallback branch alone (and on the primary alone) to retry each
//!   branch without multiplying the other's load.

pub mod accept;
mod body;
mod buffer;
mod collect;
mod eligible;
pub mod future;
pub mod grpc;
mod key;
mod mark;
pub mod read;
#[cfg(feature = "axum")]
mod reroute;
#[cfg(feature = "time")]
mod share;

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use self::reroute::{Reroute, RerouteLayer};
#[cfg(feature = "time")]
#[cfg_attr(docsrs, doc(cfg(feature = "time")))]
pub use self::share::{ShareFuture, ShareResponse, ShareResponseLayer};
pub use self::{
    body::ReplayBody,
    buffer::{BufferBody, BufferBodyLayer, DEFAULT_MAX_BYTES},
    eligible::{IdempotentMethods, SafeMethods},
    key::{HttpKey, RequestKey, CREDENTIALS, DEFAULT_VARY},
    mark::{MarkFuture, MarkServedBy, MarkServedByLayer, ServedBy, X_SERVED_BY},
};

use crate::{Fallback, FallbackLayer};
use tower_layer::Stack;

impl<F, A, S, O, I, R> FallbackLayer<F, A, S, O, I, R> {
    /// Buffers request bodies in front of the fallback, up to 64 KiB, so that
    /// `http::Request`s with streamed bodies can be cloned for it.
    ///
    /// The layer then builds a [`BufferBody`] around the [`Fallback`], and both branches
    /// receive `http::Request<`[`ReplayBody`]`>`. It can be called before or after any
    /// other builder method; calling it again replaces the cap. Equivalent to
    /// `ServiceBuilder::new().layer(BufferBodyLayer::new()).layer(layer)`. See the
    /// [`http`](crate::http) module.
    ///
    /// Available with the `http` feature.
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn buffer_bodies(self) -> FallbackLayer<F, A, S, BufferBodyLayer, I, R> {
        self.buffer_bodies_with(BufferBodyLayer::new())
    }

    /// Like [`buffer_bodies`](FallbackLayer::buffer_bodies), with a
    /// [`BufferBodyLayer`] of your own, e.g. `BufferBodyLayer::new().max_bytes(1 << 20)`
    /// for a 1 MiB cap.
    ///
    /// Available with the `http` feature.
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn buffer_bodies_with(
        self,
        buffer: BufferBodyLayer,
    ) -> FallbackLayer<F, A, S, BufferBodyLayer, I, R> {
        self.with_parts(|f, a, s, _, i| (f, a, s, buffer, i))
    }

    /// Marks every response with the branch that served it: a [`ServedBy`] response
    /// extension, and with `header: Some(name)` (e.g. [`X_SERVED_BY`]) a header too.
    ///
    /// The primary is wrapped in [`MarkServedBy`] (inside the layer, so the accept
    /// predicate sees the marked primary response) and the fallback in another. It can
    /// be called before or after any other builder method, such as
    /// [`buffer_bodies`](FallbackLayer::buffer_bodies).
    ///
    /// Available with the `http` feature.
    ///
    /// ```
    /// use axum::{body::Body, http::{Request, StatusCode}, routing::get, Router};
    /// use tower::ServiceExt;
    /// use tower_backstop::{
    ///     http::{accept::RejectStatus, ServedBy, X_SERVED_BY},
    ///     FallbackLayer,
    /// };
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let origin = get(|| async { "from the origin" });
    /// let app = Router::new()
    ///     .route("/", get(|| async { StatusCode::NOT_FOUND }))
    ///     .layer(
    ///         FallbackLayer::new(origin)
    ///             .accept(RejectStatus(StatusCode::NOT_FOUND))
    ///             .mark_served_by(Some(X_SERVED_BY))
    ///             .buffer_bodies(),
    ///     );
    ///
    /// let response = app.oneshot(Request::get("/").body(Body::empty()).unwrap()).await.unwrap();
    /// assert_eq!(response.headers()[X_SERVED_BY], "fallback");
    /// assert_eq!(response.extensions().get::<ServedBy>(), Some(&ServedBy::Fallback));
    /// # }
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn mark_served_by(
        self,
        header: Option<http::HeaderName>,
    ) -> FallbackLayer<MarkServedBy<F>, A, S, O, Stack<MarkServedByLayer, I>, R> {
        let mut primary = MarkServedByLayer::primary();
        if let Some(name) = &header {
            primary = primary.header(name.clone());
        }
        self.with_parts(|fallback, a, s, o, i| {
            let marked = MarkServedBy::new(fallback, ServedBy::Fallback);
            let marked = match header {
                Some(name) => marked.header(name),
                None => marked,
            };
            (marked, a, s, o, Stack::new(primary, i))
        })
    }
}

impl<P, F, A, S, R> Fallback<P, F, A, S, R> {
    /// Wraps this service in a [`BufferBody`] with the default cap (64 KiB), so that it
    /// accepts `http::Request`s with streamed bodies. See the [`http`](crate::http)
    /// module.
    ///
    /// Available with the `http` feature.
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn buffer_bodies(self) -> BufferBody<Self> {
        BufferBody::new(self)
    }
}
