#![warn(
    missing_debug_implementations,
    missing_docs,
    rust_2018_idioms,
    unreachable_pub
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

//! Tower middleware that starts a fallback service at the same time as the primary.
//!
//! # Overview
//!
//! The usual read-through code asks a cache and, only after the cache says "miss",
//! asks the database: every miss costs the cache's latency *plus* the database's.
//! [`Fallback`] starts both calls at once, inside one response future:
//!
//! - a **hit** (the primary's answer is accepted) costs only the primary: the
//!   fallback's future is dropped the moment the answer is accepted;
//! - a **miss** (the answer is rejected) costs the slower of the two, not their sum.
//!
//! The primary is always preferred: a fallback answer that arrives first is held until
//! the primary has been judged. Which answers count is decided by an
//! [`Accept`](accept::Accept) predicate, by default [`AcceptOk`](accept::AcceptOk).
//!
//! The middleware spawns no task and allocates nothing per request (beyond what cloning
//! your request for the fallback costs; a layer that uses a timer, a budget or an
//! observer keeps its per-request state in blocks recycled per thread, allocated only
//! while a thread warms up), takes no lock unless a feature you turned on
//! needs one, and the error type passes through: with two
//! `Infallible` services, the stack stays `Infallible`, so axum needs no
//! `HandleErrorLayer`.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_backstop::FallbackLayer;
//!
//! # #[derive(Clone, Debug, PartialEq)] struct Row(u32);
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // A cache that answers `None` on a miss, and the database behind it.
//! let cache = service_fn(|id: u32| async move {
//!     Ok::<_, Infallible>(if id < 100 { Some(Row(id)) } else { None })
//! });
//! let db = service_fn(|id: u32| async move { Ok::<_, Infallible>(Some(Row(id))) });
//!
//! let mut svc = ServiceBuilder::new()
//!     .layer(FallbackLayer::new(db).accept(|r: &Result<Option<Row>, Infallible>| {
//!         matches!(r, Ok(Some(_)))
//!     }))
//!     .service(cache);
//!
//! // Served by the cache; the database call was dropped unfinished (or never started).
//! assert_eq!(svc.ready().await.unwrap().call(7).await.unwrap(), Some(Row(7)));
//! // Served by the database, which was already running when the cache missed.
//! assert_eq!(svc.ready().await.unwrap().call(700).await.unwrap(), Some(Row(700)));
//! # }
//! ```
//!
//! # When the fallback starts
//!
//! Starting the fallback with every request is extra load on it. The [`launch`] module
//! offers [`Launch::Sequential`](launch::Launch::Sequential) (no extra load),
//! `Launch::Delayed` (start once the primary is slower than a fixed delay),
//! `Launch::Adaptive` (a delay that follows a percentile of the primary's latency), a
//! budget that caps speculative launches, and a per-request eligibility predicate; its
//! docs have a table of what each costs and saves.
//!
//! # Seeing what it did
//!
//! The [`outcome`] module reports, per request, who served it, what became of the
//! fallback and why it started when it did, and counts all of it in shared [`Stats`]
//! counters, so you can tell whether the primary is saving latency at all.
//!
//! [`Stats`]: outcome::Stats
//!
//! # Stopping abandoned work, and refilling the primary
//!
//! Dropping the fallback's future stops the client, not the server: a database query
//! runs on. The [`cancel`] module's [`OnCancel`](cancel::OnCancel) runs an action of
//! yours (a PostgreSQL cancel request, say) when a call is dropped before it answered.
//! [`Fallback::refill`] hands the request and the fallback's answer of every miss to an
//! action of yours (writing the row back to the cache) without delaying the answer; see
//! the [`refill`] module. `examples/redis-postgres` in the repository does both against
//! real Redis and PostgreSQL servers.
//!
//! # One fallback call per key
//!
//! [`FallbackLayer::coalesce_by`] makes concurrent fallback calls with equal keys share
//! one call (and one refill); the [`coalesce`] module has the contract — above all,
//! that the key must hold everything that varies the answer.
//!
//! # Requirements
//!
//! - Both services take the same request type, which must be `Clone`: the primary gets
//!   the request and the fallback a clone of it.
//! - Both services return the same `Response` and `Error` types.
//! - The fallback must be `Clone`: each response future drives its own clone to
//!   readiness, so a saturated fallback never holds back the primary.
//!
//! # Feature flags
//!
//! | feature | default | enables |
//! |---|---|---|
//! | `time` | yes | `Launch::Delayed` and `patience`, on tokio's timer (needs a tokio runtime with time enabled) |
//! | `adaptive` | no | `Launch::Adaptive`, estimating a latency percentile of the primary |
//! | `budget` | no | `budget`, capping speculative launches with a [`TpsBudget`](https://docs.rs/tower/latest/tower/retry/budget/struct.TpsBudget.html) or any `Budget`, re-exported in the `budget` module |
//! | `tracing` | no | a debug-level span per request carrying its outcome |
//! | `metrics` | no | outcome counters and latency histograms through the `metrics` facade |
//! | `quanta` | no | `outcome::LatencyClock::Tsc`: the latencies observers get read from the CPU's counter through [`quanta`](https://docs.rs/quanta), which takes about 40 % off what a hook adds to a request in the same build; unlike the default clock it does not follow tokio's paused clock |
//! | `http` | no | the `http` module: request-body buffering so `http::Request`s can be cloned for the fallback, HTTP-status and gRPC-status predicates (axum, hyper, tonic), method predicates for `speculate_if`; with `time`, `read_primary_body` (the primary's whole response body judged, a stalled one rejected) and the gRPC peek |
//! | `axum` | no | `http`, and `http::Reroute`: an axum `Router` as the fallback behind `Router::layer` and `route_layer` (depends on axum without its default features) |
//!
//! Every item behind a feature says so in its own documentation.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.85.

// The layer and the service first: rustdoc lists their inherent methods in the order
// it meets the impl blocks, so `new`, `accept` and `launch` come before the builder
// methods the `http` module adds.
mod layer;
mod service;

pub mod accept;
#[cfg(feature = "budget")]
#[cfg_attr(docsrs, doc(cfg(feature = "budget")))]
pub mod budget;
pub mod cancel;
pub mod coalesce;
#[doc(hidden)]
pub mod feature;
pub mod future;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
pub mod launch;
pub mod outcome;
pub mod refill;

pub use crate::{layer::FallbackLayer, service::Fallback};

/// The README's snippets, compiled (and run, unless marked `no_run`) as doc-tests. They
/// use the `axum`, `budget` and `time` features, so they are tested when those are on.
#[cfg(all(doctest, feature = "axum", feature = "budget", feature = "time"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
