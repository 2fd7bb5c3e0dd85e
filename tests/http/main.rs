//! The `http` feature against real stacks: request bodies buffered for both branches,
//! status predicates, axum routers, hyper-util clients over HTTP/1.1 and HTTP/2, tonic
//! channels, cancellation observed by the fallback's server, the stacking orders
//! with `timeout` and `retry`, and the coalescing key and shared answers.
//!
//! `buffer`, `accept` and part of `bad_input` run in memory; the others start their own
//! servers on 127.0.0.1 (port 0) and stop them. No test sleeps to synchronise: servers report
//! through channels, and every wait is bounded (`support::OBSERVE_LIMIT`).

mod accept;
mod axum_stack;
mod bad_input;
mod buffer;
mod cancel;
// Shared answers are read whole on tokio's timer (feature `time`).
#[cfg(feature = "time")]
mod coalesce_axum;
mod coalesce_key;
mod framing;
// Reading a gRPC answer's first frame is bounded on tokio's timer (feature `time`).
#[cfg(feature = "time")]
mod grpc_peek;
#[cfg(feature = "time")]
mod grpc_trailers;
mod hostile_body;
mod hyper_client;
mod mark;
// Reading the primary's body is bounded on tokio's timer (feature `time`).
#[cfg(feature = "time")]
mod read_body;
#[cfg(feature = "time")]
mod read_hostile;
// Answers read whole to be shared, bounded on tokio's timer (feature `time`).
#[cfg(feature = "time")]
mod share;
#[cfg(feature = "time")]
mod share_real;
mod stacking;
mod support;
mod tonic_client;
