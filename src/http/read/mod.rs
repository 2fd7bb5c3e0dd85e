//! Reading the primary's response body before its answer is judged: [`ReadBody`]
//! reads it whole, up to a byte cap within a time bound, so that a predicate judges
//! the whole answer and a body that stalls after its headers is a rejection.
//!
//! A [`Fallback`](crate::Fallback) judges the primary's answer the moment its future
//! resolves, and an HTTP client's future resolves with the headers: the body is still
//! on its way. A primary that sends `200` headers and then stalls its body is accepted
//! and served, and the caller waits on the body until its own timeout — while the
//! fallback, already running under the default [`Launch::Concurrent`], had a complete
//! answer. A timeout around the primary does not help: it bounds the headers, not what
//! follows them.
//!
//! [`FallbackLayer::read_primary_body`](crate::FallbackLayer::read_primary_body) puts
//! a [`ReadBody`] on the primary: its response future resolves once the body has been
//! read to its end (within [`DEFAULT_MAX_BYTES`], 1 MiB, and [`DEFAULT_MAX_WAIT`],
//! 1 second), or with the response marked [`IncompleteBody`] when it could not be.
//! Every predicate of [`http::accept`](crate::http::accept) rejects a marked answer;
//! [`AcceptBody`](crate::http::accept::AcceptBody) and
//! [`RejectBody`](crate::http::accept::RejectBody) judge the bytes, in one line:
//!
//! ```
//! # #[cfg(feature = "time")] {
//! use tower_backstop::{accept::And, http::accept::{RejectBody, StatusIn}};
//!
//! // A cache that answers `200` with an empty body on a miss.
//! let hit = And::new(StatusIn::SUCCESS, RejectBody::EMPTY);
//! // One that answers `{"found":false}`.
//! let found = RejectBody::equal_to(b"{\"found\":false}");
//! # let _ = (hit, found);
//! # }
//! ```
//!
//! An answer that stands reaches the caller byte for byte, trailers included: its body
//! is a [`ReadAheadBody`] that replays what was read, then the rest. The gRPC peek,
//! [`PeekGrpcStatus`](crate::http::grpc::PeekGrpcStatus), is the same reader stopped
//! at the first frame that carries something.
//!
//! The peek bounds a gRPC answer up to its first message; a unary answer whose
//! trailers then stall is accepted, and its client waits on them. On a channel that
//! carries unary calls only, `read_primary_body` (with
//! [`GrpcStatus`](crate::http::accept::GrpcStatus)) bounds the whole answer instead,
//! trailers included (it does not read the status in them: a status after a message is
//! still not judged). Do not use it for streaming calls: a stream longer than the cap,
//! or than `max_wait`, is rejected.
//!
//! The reader, its body and the builder calls need the `http` and `time` features (the
//! time bound is on tokio's timer: a reader without one would wait on a stalled body
//! for ever); [`IncompleteBody`] needs `http` alone, so that the predicates check for
//! it in every build.
//!
//! [`Launch::Concurrent`]: crate::launch::Launch::Concurrent

#[cfg(feature = "time")]
mod body;
#[cfg(feature = "time")]
mod future;
#[cfg(feature = "time")]
pub(crate) mod predicate;
#[cfg(feature = "time")]
mod service;

#[cfg(feature = "time")]
pub(crate) use self::future::{Reader, Until};
#[cfg(feature = "time")]
#[cfg_attr(docsrs, doc(cfg(feature = "time")))]
pub use self::{
    body::ReadAheadBody,
    future::ReadFuture,
    service::{ReadBody, ReadBodyLayer, DEFAULT_MAX_BYTES, DEFAULT_MAX_WAIT},
};

/// A response extension: the body could not be read as far as the reader wanted —
/// [`ReadBody`] to its end, [`PeekGrpcStatus`](crate::http::grpc::PeekGrpcStatus) to
/// its first message or trailers, [`ShareResponse`](crate::http::ShareResponse) to its
/// end (which then answers `502 Bad Gateway` with an empty body in its place).
///
/// Every predicate of [`http::accept`](crate::http::accept) rejects a response that
/// carries one. A predicate of your own checks for it with
/// `response.extensions().get::<IncompleteBody>()`. A response of `ReadBody` or the
/// peek that stands anyway loses nothing: what was read is replayed, then the rest of
/// the body (or its error).
///
/// Available with the `http` feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IncompleteBody {
    /// The data and trailer fields are more than the cap: the body's size hint said
    /// so before anything was read, or a chunk crossed it.
    TooLarge,
    /// The body failed while being read.
    Failed,
    /// The body did not get as far as wanted within the time bound: it stalled.
    TimedOut,
}

impl IncompleteBody {
    /// Whether `response` is marked with an `IncompleteBody`.
    pub fn is_marked<B>(response: &http::Response<B>) -> bool {
        response.extensions().get::<IncompleteBody>().is_some()
    }
}
