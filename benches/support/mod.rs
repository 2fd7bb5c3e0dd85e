//! What the two overhead benches share: the trivial services, the hand-written floors,
//! the awaited loops every row is served through, and the list of rows.
//!
//! Every row serves requests the way callers do: inside one `block_on` of a
//! current-thread tokio runtime, a loop of `svc.ready().await?.call(key).await`. The
//! floors are the same work written as an `async fn` and awaited the same way. Whether
//! the cache hits is decided per request from the key and a ratio the caller passes
//! through `black_box`, so no path folds to a constant.
//!
//! Feature-dependent rows are gated with `#[cfg(feature = "...")]`: cargo compiles a
//! bench with the crate's own features, so `cargo bench --bench NAME` gives the rows of
//! the default build and `--all-features` those of the all-features build.
#![allow(dead_code, unreachable_pub)]

use std::{
    convert::Infallible,
    fmt::Debug,
    future::{ready, Ready},
    task::{Context, Poll},
    time::Duration,
};
use tower::{Layer, Service, ServiceExt};
use tower_backstop::{
    launch::Launch,
    outcome::{Outcome, Stats},
    FallbackLayer,
};

pub type Answer = Result<Option<u64>, Infallible>;

/// Added by the database to its answers, so the two services' answers differ.
pub const FROM_FALLBACK: u64 = 1 << 32;

/// A delay that never runs out while a request is served here: the primary always
/// answers on its first poll.
pub const NEVER: Duration = Duration::from_secs(1);

/// The features this bench was compiled with: the build every row belongs to.
pub fn build() -> String {
    let features: Vec<&str> = [
        ("time", cfg!(feature = "time")),
        ("adaptive", cfg!(feature = "adaptive")),
        ("budget", cfg!(feature = "budget")),
        ("http", cfg!(feature = "http")),
        ("tracing", cfg!(feature = "tracing")),
        ("metrics", cfg!(feature = "metrics")),
        ("quanta", cfg!(feature = "quanta")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    match features.as_slice() {
        ["time"] => "default".to_owned(),
        [_, _, _, _, _, _, _] => "all-features".to_owned(),
        [] => "no-default-features".to_owned(),
        other => other.join("+"),
    }
}

// ---- the trivial services ----

/// The primary: a cache that hits for the keys whose `key % 100` is below `hits`.
#[derive(Clone, Copy, Debug)]
pub struct Cache {
    /// Percentage of keys that hit; read through `black_box` by the caller.
    pub hits: u64,
}

impl Service<u64> for Cache {
    type Response = Option<u64>;
    type Error = Infallible;
    type Future = Ready<Answer>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u64) -> Self::Future {
        ready(Ok((key % 100 < self.hits).then_some(key)))
    }
}

/// The fallback: a database that always has the row.
#[derive(Clone, Copy, Debug)]
pub struct Db;

impl Service<u64> for Db {
    type Response = Option<u64>;
    type Error = Infallible;
    type Future = Ready<Answer>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u64) -> Self::Future {
        ready(Ok(Some(key | FROM_FALLBACK)))
    }
}

/// Accepts only a cache hit. A plain `fn` item, so that the floor and every variant of
/// the layer share one predicate type.
pub fn is_hit(r: &Answer) -> bool {
    matches!(r, Ok(Some(_)))
}

/// `tower-fallback`'s policy says when to *use* the fallback, and sees the primary's
/// error already boxed.
fn tower_fallback_rejects(r: &Result<Option<u64>, tower_fallback::BoxedError>) -> bool {
    !matches!(r, Ok(Some(_)))
}

/// `tower::hedge`: hedge every request.
#[derive(Clone, Copy, Debug)]
struct HedgeAll;

impl tower::hedge::Policy<u64> for HedgeAll {
    fn clone_request(&self, req: &u64) -> Option<u64> {
        Some(*req)
    }

    fn can_retry(&self, _: &u64) -> bool {
        true
    }
}

/// What a request served with `hits` percent of hits answers.
pub fn expected(key: u64, hits: u64) -> u64 {
    if key % 100 < hits {
        key
    } else {
        key | FROM_FALLBACK
    }
}

// ---- the floors: the same work written by hand ----

/// `Launch::Concurrent` by hand: the primary's future first, the fallback's created up
/// front and driven only on a rejection.
pub async fn floor(cache: &mut Cache, db: &mut Db, key: u64) -> Answer {
    let primary = cache.ready().await?.call(key);
    let fallback = db.ready().await?.call(key);
    let answer = primary.await;
    if is_hit(&answer) {
        return answer;
    }
    fallback.await
}

/// `Launch::Sequential` by hand: the fallback is readied and called only after a
/// rejection.
pub async fn floor_sequential(cache: &mut Cache, db: &mut Db, key: u64) -> Answer {
    let answer = cache.ready().await?.call(key).await;
    if is_hit(&answer) {
        return answer;
    }
    db.ready().await?.call(key).await
}

// ---- the awaited loops ----

/// Which floor a floor row runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Floor {
    Concurrent,
    Sequential,
}

/// Serves keys `start..start + n` through a floor; returns the sum of the answers. The
/// choice of floor is made once, outside the loop.
pub async fn floor_batch(which: Floor, cache: &mut Cache, db: &mut Db, start: u64, n: u64) -> u64 {
    let mut sum = 0_u64;
    match which {
        Floor::Concurrent => {
            for key in start..start + n {
                let Ok(answer) = floor(cache, db, key).await;
                sum = sum.wrapping_add(answer.unwrap_or(0));
            }
        }
        Floor::Sequential => {
            for key in start..start + n {
                let Ok(answer) = floor_sequential(cache, db, key).await;
                sum = sum.wrapping_add(answer.unwrap_or(0));
            }
        }
    }
    sum
}

/// Serves keys `start..start + n` through a service, as callers do; returns the sum of
/// the answers.
pub async fn service_batch<S>(svc: &mut S, start: u64, n: u64) -> Result<u64, S::Error>
where
    S: Service<u64, Response = Option<u64>>,
{
    let mut sum = 0_u64;
    for key in start..start + n {
        let answer = svc.ready().await?.call(key).await?;
        sum = sum.wrapping_add(answer.unwrap_or(0));
    }
    Ok(sum)
}

/// The size of the future a floor row awaits per request.
pub fn floor_future_size(which: Floor, hits: u64) -> usize {
    let (mut cache, mut db) = (Cache { hits }, Db);
    match which {
        Floor::Concurrent => std::mem::size_of_val(&floor(&mut cache, &mut db, 0)),
        Floor::Sequential => std::mem::size_of_val(&floor_sequential(&mut cache, &mut db, 0)),
    }
}

// ---- the rows ----

/// Receives every row of the trivial services; each bench decides what to do with it.
pub trait Rows {
    /// A hand-written floor.
    fn floor(&mut self, id: &'static str, which: Floor);

    /// A middleware around `Cache { hits }` (and `Db`).
    fn service<S>(&mut self, id: &'static str, svc: S)
    where
        S: Service<u64, Response = Option<u64>> + 'static,
        S::Error: Debug;

    /// Whether this path is the hit path: the hedges have no miss path.
    fn hit_path(&self) -> bool;

    /// Whether row `id` will be served at all, for a row whose building costs.
    fn wants(&self, id: &str) -> bool {
        let _ = id;
        true
    }
}

/// Every row of this build, around a cache hitting `hits` percent of keys.
pub fn rows(r: &mut impl Rows, hits: u64) {
    let cache = Cache { hits };
    let layer = || FallbackLayer::new(Db).accept(is_hit);

    r.floor("floor", Floor::Concurrent);
    r.floor("floor_sequential", Floor::Sequential);

    r.service("concurrent", layer().layer(cache));
    r.service(
        "sequential",
        layer().launch(Launch::Sequential).layer(cache),
    );

    #[cfg(feature = "time")]
    r.service(
        "delayed",
        layer().launch(Launch::Delayed(NEVER)).layer(cache),
    );

    #[cfg(feature = "adaptive")]
    r.service(
        "adaptive",
        layer()
            .launch(Launch::Adaptive(tower_backstop::launch::Adaptive::new(
                0.9, NEVER,
            )))
            .layer(cache),
    );

    // Coalescing, with keys nobody else has in flight (requests are served one at a
    // time here): what a request pays for the chance to share a call.
    r.service(
        "concurrent_coalesce",
        layer().coalesce_by(|k: &u64| Some(*k)).layer(cache),
    );
    r.service(
        "sequential_coalesce",
        layer()
            .launch(Launch::Sequential)
            .coalesce_by(|k: &u64| Some(*k))
            .layer(cache),
    );

    r.service("concurrent_stats", layer().stats(Stats::new()).layer(cache));
    r.service(
        "concurrent_hook",
        layer().on_outcome(|_: &Outcome| ()).layer(cache),
    );
    // Built only if served: choosing the TSC clock calibrates it, hundreds of
    // microseconds of work that would otherwise land in every row's instruction count.
    #[cfg(feature = "quanta")]
    if r.wants("concurrent_hook_tsc") {
        r.service(
            "concurrent_hook_tsc",
            layer()
                .on_outcome(|_: &Outcome| ())
                .latency_clock(tower_backstop::outcome::LatencyClock::Tsc)
                .layer(cache),
        );
    }

    #[cfg(feature = "budget")]
    r.service(
        "concurrent_budget",
        layer()
            .budget(tower::retry::budget::TpsBudget::default())
            .layer(cache),
    );

    // tower-fallback 0.2 is built on tower 0.4, whose `Service` is the same
    // `tower_service::Service`: it wraps these services unchanged.
    r.service(
        "tower_fallback",
        tower_fallback::Fallback::new_with_policy(cache, Db, tower_fallback_rejects),
    );

    r.service(
        "resilience_fallback",
        tower_resilience::fallback::FallbackLayer::<u64, Option<u64>, Infallible>::tower_service(
            Db,
        )
        .handle_response(|r: &Option<u64>| r.is_none())
        .layer(cache),
    );

    if r.hit_path() {
        // A hedge re-sends the request to the same service and serves the first
        // answer unjudged: it has no miss path. Warmed up so it hedges every request
        // at a p90 of 1 s, which never fires here.
        r.service(
            "tower_hedge",
            tower::hedge::Hedge::new_with_mock_latencies::<u64>(
                cache,
                HedgeAll,
                1,
                0.9,
                Duration::from_secs(3600),
                &[NEVER.as_millis() as u64; 10],
            ),
        );
    }
}

/// What each row is, for the tables.
pub fn describe(id: &str) -> &'static str {
    match id {
        "floor" => {
            "hand-written `async fn`: fallback's future created up front, driven on a rejection"
        }
        "floor_sequential" => "hand-written `async fn`: fallback called only after a rejection",
        "concurrent" => "`Launch::Concurrent` (the default)",
        "sequential" => "`Launch::Sequential`",
        "delayed" => "`Launch::Delayed(1 s)`",
        "adaptive" => "`Launch::Adaptive` (p90, 1 s until estimated)",
        "concurrent_stats" => "Concurrent + `.stats(stats)`",
        "concurrent_coalesce" => "Concurrent + `.coalesce_by(\\|k\\| Some(*k))`, no key shared",
        "sequential_coalesce" => "Sequential + `.coalesce_by(..)`, no key shared",
        // A `|` inside a markdown table cell must be escaped, code span or not.
        "concurrent_hook" => "Concurrent + `.on_outcome(\\|_\\| ())`",
        "concurrent_hook_tsc" => "the same, `.latency_clock(LatencyClock::Tsc)`",
        "concurrent_budget" => "Concurrent + `.budget(TpsBudget::default())`",
        "tower_fallback" => "`tower-fallback` 0.2 (Zebra's, sequential)",
        "resilience_fallback" => "`tower-resilience` 0.13 fallback (sequential)",
        "tower_hedge" => "`tower::hedge`, p90 = 1 s, hit only",
        "http_bare" => "axum `Router`, no layer",
        "http_concurrent" => {
            "axum `Router` + `route_layer(FallbackLayer…buffer_bodies())`, Concurrent"
        }
        "http_sequential" => "the same, `Launch::Sequential`",
        _ => "",
    }
}

// ---- the HTTP stack ----

pub mod http_stack {
    //! An axum `Router` driven in-process (no socket): a cache route answering `200`
    //! on a hit and `404` on a miss, with and without the layer in front of it.
    use axum::{
        body::Body,
        extract::Path,
        http::{header, Request, Response, StatusCode, Uri},
        routing::get,
        Router,
    };
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use tower::{Service, ServiceExt};

    /// The cache's answer on a hit.
    pub const CACHED: &str = "cached";
    /// The origin's answer.
    pub const ORIGIN: &str = "origin";

    /// One URI per key residue: `uris()[k % 100]` is `/item/{k % 100}`.
    pub fn uris() -> Vec<Uri> {
        (0..100)
            .map(|n| Uri::try_from(format!("/item/{n}")).expect("a valid URI"))
            .collect()
    }

    /// A request as a browser or client sends one: three headers, no body.
    pub fn request(uri: Uri) -> Request<Body> {
        Request::get(uri)
            .header(header::HOST, "example.com")
            .header(header::USER_AGENT, "overhead-bench/1")
            .header(header::ACCEPT, "*/*")
            .body(Body::empty())
            .expect("a valid request")
    }

    /// The cache router: `200 cached` for ids below `hits`, `404` above.
    pub fn cache(hits: u64) -> Router {
        Router::new().route(
            "/item/{id}",
            get(move |Path(id): Path<u64>| async move {
                if id < hits {
                    (StatusCode::OK, CACHED)
                } else {
                    (StatusCode::NOT_FOUND, "")
                }
            }),
        )
    }

    /// The cache router alone, finalized with `with_state(())` as `axum::serve` does
    /// (through `into_make_service`): otherwise the router turns its handlers into
    /// routes again on every request.
    pub fn bare(hits: u64) -> Router {
        cache(hits).with_state(())
    }

    /// The cache router with the layer on its route, as the `http` module's docs show,
    /// finalized as [`bare`] is.
    #[cfg(feature = "http")]
    pub fn layered(hits: u64, launch: tower_backstop::launch::Launch) -> Router {
        use tower_backstop::{
            http::{accept::RejectStatus, ReplayBody},
            FallbackLayer,
        };
        let origin = Router::new()
            .route("/item/{id}", get(|| async { ORIGIN }))
            .with_state(())
            .map_request(|mut req: Request<ReplayBody>| {
                req.extensions_mut().clear();
                req
            });
        cache(hits)
            .route_layer(
                FallbackLayer::new(origin)
                    .accept(RejectStatus(StatusCode::NOT_FOUND))
                    .launch(launch)
                    .buffer_bodies(),
            )
            .with_state(())
    }

    /// Serves keys `start..start + n`, reading every response body; returns the total
    /// of the body lengths.
    pub async fn batch(router: &mut Router, uris: &[Uri], start: u64, n: u64) -> usize {
        let mut total = 0;
        for key in start..start + n {
            let req = request(uris[(key % 100) as usize].clone());
            let Ok(svc) = ServiceExt::<Request<Body>>::ready(router).await;
            let Ok(response): Result<Response<Body>, Infallible> = svc.call(req).await;
            total += read(response).await.len();
        }
        total
    }

    async fn read(response: Response<Body>) -> bytes::Bytes {
        response
            .into_body()
            .collect()
            .await
            .expect("the body is read")
            .to_bytes()
    }

    /// Every HTTP row of this build, around a cache hitting `hits` percent of ids.
    pub fn rows(hits: u64) -> Vec<(&'static str, Router)> {
        #[allow(unused_mut)]
        let mut rows = vec![("http_bare", bare(hits))];
        #[cfg(feature = "http")]
        {
            use tower_backstop::launch::Launch;
            rows.push(("http_concurrent", layered(hits, Launch::Concurrent)));
            rows.push(("http_sequential", layered(hits, Launch::Sequential)));
        }
        rows
    }
}
