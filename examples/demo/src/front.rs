//! The front service: an axum handler that reads through `FallbackLayer`, with the
//! cache as the primary and the database as the fallback, and the launch policies the
//! demo compares.

use crate::{model::SEQ, Config};
use axum::{
    body::Body,
    extract::{Path, State},
    http::{uri::Authority, HeaderMap, Request, Response, StatusCode, Uri},
    response::IntoResponse,
    routing::get,
    Router,
};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client, Error as ClientError, ResponseFuture},
    rt::TokioExecutor,
};
use std::{
    net::SocketAddr,
    task::{Context, Poll},
    time::Duration,
};
use tower::{retry::budget::TpsBudget, Service, ServiceExt};
use tower_backstop::{
    accept::And,
    http::{
        accept::{RejectServerErrors, RejectStatus},
        MarkServedBy, ReplayBody,
    },
    launch::{Adaptive, Launch},
    Fallback, FallbackLayer,
};

/// How many cancelled HTTP/2 streams the client remembers, so that a late answer to
/// one is not taken for abuse (hyper-util's default is 50). See the `http` module docs
/// of tower-backstop.
const H2_CLIENT_RESETS: usize = 65_536;

/// A hyper-util client bound to one upstream service: it completes each request's
/// relative URI with the upstream's address.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, ReplayBody>,
    authority: Authority,
}

impl Upstream {
    /// A pooled client for `addr`, over HTTP/2 (its reset-stream limit raised) or
    /// HTTP/1.1.
    pub fn new(addr: SocketAddr, http2: bool) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let mut client = Client::builder(TokioExecutor::new());
        client
            .http2_only(http2)
            .http2_max_concurrent_reset_streams(H2_CLIENT_RESETS);
        Upstream {
            client: client.build(connector),
            authority: Authority::try_from(addr.to_string()).expect("a socket address"),
        }
    }
}

impl Service<Request<ReplayBody>> for Upstream {
    type Response = Response<Incoming>;
    type Error = ClientError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Request<ReplayBody>>::poll_ready(&mut self.client, cx)
    }

    fn call(&mut self, mut req: Request<ReplayBody>) -> ResponseFuture {
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        *req.uri_mut() = Uri::from_parts(parts).expect("a path plus an authority");
        self.client.request(req)
    }
}

/// The cache's answer stands unless it is a miss (`404`) or the cache is in trouble
/// (`5xx`, or no answer at all).
pub type Hit = And<RejectStatus, RejectServerErrors>;

pub fn hit() -> Hit {
    And::new(RejectStatus(StatusCode::NOT_FOUND), RejectServerErrors)
}

/// The cache, backed by the database; every answer marked `x-served-by: primary` or
/// `x-served-by: fallback` by the layer.
pub type Reader = Fallback<MarkServedBy<Upstream>, MarkServedBy<Upstream>, Hit>;

async fn front_get(
    State(reader): State<Reader>,
    Path(key): Path<u64>,
    headers: HeaderMap,
) -> axum::response::Response {
    let mut req = Request::get(format!("/item/{key}"))
        .body(ReplayBody::empty())
        .expect("a valid request");
    if let Some(seq) = headers.get(&SEQ) {
        req.headers_mut().insert(SEQ, seq.clone());
    }
    match reader.oneshot(req).await {
        Ok(res) => res.map(Body::new),
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

/// The front service, reading through `reader`.
pub fn front(reader: Reader) -> Router {
    Router::new()
        .route("/item/{id}", get(front_get))
        .with_state(reader)
}

// ---------------------------------------------------------------------------------------
// Launch policies
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Sequential,
    Concurrent,
    Delayed,
    Adaptive,
    AdaptiveBudget,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        // Sequential first: its run measures the cache's p90 for `Delayed`.
        Policy::Sequential,
        Policy::Concurrent,
        Policy::Delayed,
        Policy::Adaptive,
        Policy::AdaptiveBudget,
    ];

    pub fn name(self, delayed_at: Duration) -> String {
        match self {
            Policy::Sequential => "Sequential".into(),
            Policy::Concurrent => "Concurrent".into(),
            Policy::Delayed => format!(
                "Delayed {:.1} ms (cache p90)",
                crate::report::ms(delayed_at)
            ),
            Policy::Adaptive => "Adaptive p90".into(),
            Policy::AdaptiveBudget => "Adaptive p90 + 10% budget".into(),
        }
    }

    pub fn layer(
        self,
        db: Upstream,
        config: &Config,
        delayed_at: Duration,
    ) -> FallbackLayer<Upstream, Hit> {
        // Until it has seen 100 answers, the adaptive delay starts at twice a hit's
        // median: a guess, which it then replaces with what it measures.
        let adaptive = || {
            Adaptive::new(
                0.9,
                Duration::from_secs_f64(2.0 * config.cache_ms / 1_000.0),
            )
        };
        let layer = FallbackLayer::new(db).accept(hit());
        match self {
            Policy::Sequential => layer.launch(Launch::Sequential),
            Policy::Concurrent => layer.launch(Launch::Concurrent),
            Policy::Delayed => layer.launch(Launch::Delayed(delayed_at)),
            Policy::Adaptive => layer.launch(Launch::Adaptive(adaptive())),
            // At most 10% of requests (plus one a second) may start the database early.
            Policy::AdaptiveBudget => layer
                .launch(Launch::Adaptive(adaptive()))
                .budget(TpsBudget::new(Duration::from_secs(10), 1, 0.1)),
        }
    }
}
