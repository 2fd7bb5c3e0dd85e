//! Accepting the primary's answer by its HTTP status or its gRPC status.
//!
//! These predicates judge an `Ok(http::Response<B>)` by its head; every `Err` is
//! rejected, as with [`AcceptOk`](crate::accept::AcceptOk), and so is every response
//! whose body could not be read as far as wanted (marked
//! [`IncompleteBody`] by
//! [`read_primary_body`](crate::FallbackLayer::read_primary_body) or
//! [`peek_grpc_status`](crate::FallbackLayer::peek_grpc_status)). [`AcceptBody`] and
//! [`RejectBody`] judge the body that `read_primary_body` read whole. They combine with
//! [`And`](crate::accept::And), [`Or`](crate::accept::Or) and
//! [`Not`](crate::accept::Not) (or [`Accept::and`] and the like, when a closure in the
//! combination fixes the types):
//!
//! ```
//! use http::{Response, StatusCode};
//! use std::convert::Infallible;
//! use tower_backstop::{
//!     accept::{Accept, And},
//!     http::accept::{RejectServerErrors, RejectStatus},
//! };
//!
//! type Answer = Result<Response<String>, Infallible>;
//!
//! // A cache that answers 404 on a miss and 5xx when it is in trouble.
//! let hit = And::new(RejectServerErrors, RejectStatus(StatusCode::NOT_FOUND));
//!
//! let answer = |status: u16| -> Answer {
//!     Ok(Response::builder().status(status).body(String::new()).unwrap())
//! };
//! assert!(hit.accept(&answer(200)));
//! assert!(hit.accept(&answer(304)));
//! assert!(!hit.accept(&answer(404)));
//! assert!(!hit.accept(&answer(503)));
//!
//! // Combined with a closure, the closure names the types.
//! let fresh = RejectServerErrors.and(|r: &Answer| {
//!     r.as_ref().is_ok_and(|res| !res.headers().contains_key("x-stale"))
//! });
//! assert!(fresh.accept(&answer(200)));
//! ```
//!
//! [`Accept::not`] flips every verdict, the one on errors included: the negation of
//! `RejectStatus(..)` accepts errors too. Combine it with `AcceptOk` to keep rejecting
//! them.
//!
//! # gRPC
//!
//! [`GrpcStatus`] judges a gRPC answer by its status, read by
//! [`GrpcCode::of_response`]. Where the status is decides what it can see:
//!
//! - **In the headers** (a *trailers-only* answer): judged as the headers arrive. This
//!   is how tonic and grpc-go send every error — a handler's
//!   `Err(Status::not_found(..))`, `UNAVAILABLE` from a load shedder, and so on.
//! - **In the trailers, with no message before them**: HTTP `200` headers without
//!   `grpc-status`, then trailers with it. akka-grpc and Python's grpcio send errors of
//!   unary calls this way. On its own, the predicate sees only the headers and
//!   **accepts such an answer**, whatever its status: a `NOT_FOUND` from these servers
//!   is served instead of the fallback's answer. Add
//!   [`peek_grpc_status`](crate::FallbackLayer::peek_grpc_status) to the layer: it
//!   reads the primary's first body frame before the predicate is asked, so these
//!   answers are judged like trailers-only ones, and replays the frame to the caller
//!   when the answer stands (see [`PeekGrpcStatus`](super::grpc::PeekGrpcStatus)).
//! - **Not at all within the peek's wait**: with `peek_grpc_status`, a primary that
//!   sends `200` headers and then nothing for its `max_wait` (1 second by default) is
//!   marked [`IncompleteBody`] and rejected, and the
//!   fallback serves; without it, such an answer is accepted, and the client waits on
//!   its body past every timeout that bounds the headers.
//! - **In the trailers, after a message**: the answer is accepted as its headers (with
//!   `peek_grpc_status`, its first message) arrive; a status that comes after a
//!   message cannot be judged — serving the fallback then would mean holding back
//!   every message of the call. A streaming call
//!   that fails after its first message, or a server that sends a message and then an
//!   error status, escapes the predicate.
//!
//! Every `grpc-status` is parsed as tonic parses it ([`GrpcCode::from_bytes`]): `0` to
//! `16` as written, anything else (`05`, `+5`, `17`) is `UNKNOWN`.
//!
//! Available with the `http` feature.

pub use super::grpc::GrpcCode;

use super::read::IncompleteBody;
use crate::accept::Accept;
use http::{Response, StatusCode};
use std::{fmt, ops::RangeInclusive};

/// An `Ok` response whose body was not marked as read only in part.
fn complete<B, E>(result: &Result<Response<B>, E>) -> Option<&Response<B>> {
    result
        .as_ref()
        .ok()
        .filter(|response| !IncompleteBody::is_marked(response))
}

/// Rejects every response marked [`IncompleteBody`]; judges the others with `A`.
///
/// The predicates of this module reject such a response already, but
/// [`AcceptOk`](crate::accept::AcceptOk) (the layer's default), a closure, or a
/// [`Not`](crate::accept::Not) of a rejection would accept it, and the caller would
/// wait on a body that stalled. Wrap them in `Complete` whenever the layer uses
/// [`read_primary_body`](crate::FallbackLayer::read_primary_body) or
/// [`peek_grpc_status`](crate::FallbackLayer::peek_grpc_status):
///
/// ```
/// use http::Response;
/// use std::convert::Infallible;
/// use tower_backstop::{accept::Accept, http::{accept::Complete, read::IncompleteBody}};
///
/// type Answer = Result<Response<String>, Infallible>;
/// let fresh = Complete(|r: &Answer| {
///     r.as_ref().is_ok_and(|res| !res.headers().contains_key("x-stale"))
/// });
/// let mut stalled = Response::new(String::new());
/// stalled.extensions_mut().insert(IncompleteBody::TimedOut);
/// assert!(!fresh.accept(&Ok(stalled)));
/// assert!(fresh.accept(&Ok(Response::new(String::new()))));
/// ```
///
/// Available with the `http` feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Complete<A>(pub A);

impl<A, B, E> Accept<Response<B>, E> for Complete<A>
where
    A: Accept<Response<B>, E>,
{
    #[inline]
    fn accept(&self, result: &Result<Response<B>, E>) -> bool {
        !matches!(result, Ok(response) if IncompleteBody::is_marked(response))
            && self.0.accept(result)
    }
}

/// Accepts an `Ok` response whose status is in a range; rejects other statuses,
/// every `Err` and every [`IncompleteBody`].
///
/// ```
/// use tower_backstop::http::accept::StatusIn;
///
/// // Anything but 2xx falls back.
/// let success = StatusIn::SUCCESS;
/// // 2xx and 3xx stand.
/// let not_an_error = StatusIn::new(200..=399);
/// # let _ = (success, not_an_error);
/// ```
///
/// Available with the `http` feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusIn {
    first: u16,
    last: u16,
}

impl StatusIn {
    /// `200..=299`: a successful answer.
    pub const SUCCESS: StatusIn = StatusIn {
        first: 200,
        last: 299,
    };

    /// Accepts statuses in `range`, both ends included.
    pub const fn new(range: RangeInclusive<u16>) -> Self {
        StatusIn {
            first: *range.start(),
            last: *range.end(),
        }
    }

    fn contains(&self, status: StatusCode) -> bool {
        (self.first..=self.last).contains(&status.as_u16())
    }
}

impl<B, E> Accept<Response<B>, E> for StatusIn {
    fn accept(&self, result: &Result<Response<B>, E>) -> bool {
        complete(result).is_some_and(|response| self.contains(response.status()))
    }
}

/// Accepts an `Ok` response unless its status is a server error (`5xx`); rejects
/// every `Err` and every [`IncompleteBody`].
///
/// The usual predicate for a replica or a cache: a `4xx` is the client's problem and
/// would be the same from the fallback, a `5xx` is the primary's.
///
/// Available with the `http` feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RejectServerErrors;

impl<B, E> Accept<Response<B>, E> for RejectServerErrors {
    fn accept(&self, result: &Result<Response<B>, E>) -> bool {
        complete(result).is_some_and(|response| !response.status().is_server_error())
    }
}

/// Accepts an `Ok` response unless its status is this one; rejects every `Err` and
/// every [`IncompleteBody`].
///
/// `RejectStatus(StatusCode::NOT_FOUND)` treats a cache's `404` as a miss.
///
/// Available with the `http` feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RejectStatus(pub StatusCode);

impl<B, E> Accept<Response<B>, E> for RejectStatus {
    fn accept(&self, result: &Result<Response<B>, E>) -> bool {
        complete(result).is_some_and(|response| response.status() != self.0)
    }
}

/// Accepts a gRPC response unless the status in its headers is one of a set of codes;
/// rejects every `Err` and every [`IncompleteBody`] (a primary whose first frame did
/// not come within the peek's wait, or failed).
///
/// By default every code but `OK` is rejected. The status is read by
/// [`GrpcCode::of_response`]; a response whose status is not known before its first
/// message — an HTTP `200` without `grpc-status`, unless
/// [`PeekGrpcStatus`](super::grpc::PeekGrpcStatus) found it in the trailers — is
/// accepted, see [the module docs](self#grpc).
///
/// ```
/// use tower_backstop::http::accept::{GrpcCode, GrpcStatus};
///
/// // Fall back on any error status...
/// let any_error = GrpcStatus::new();
/// // ...except INVALID_ARGUMENT, which the fallback would answer just the same.
/// let worth_retrying = GrpcStatus::new().accepting(GrpcCode::InvalidArgument);
/// // Fall back only when the primary does not have it or cannot serve.
/// let miss = GrpcStatus::rejecting(&[GrpcCode::NotFound, GrpcCode::Unavailable]);
/// # let _ = (any_error, worth_retrying, miss);
/// ```
///
/// Available with the `http` feature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct GrpcStatus {
    rejected: u32,
}

impl GrpcStatus {
    /// Rejects every status but `OK`.
    pub const fn new() -> Self {
        let mut all = 0;
        let mut i = 0;
        while i < GrpcCode::ALL.len() {
            all |= GrpcCode::ALL[i].bit();
            i += 1;
        }
        GrpcStatus {
            rejected: all & !GrpcCode::Ok.bit(),
        }
    }

    /// Rejects exactly these codes and accepts the others.
    pub const fn rejecting(codes: &[GrpcCode]) -> Self {
        let mut rejected = 0;
        let mut i = 0;
        while i < codes.len() {
            rejected |= codes[i].bit();
            i += 1;
        }
        GrpcStatus { rejected }
    }

    /// Accepts `code` as well.
    pub const fn accepting(mut self, code: GrpcCode) -> Self {
        self.rejected &= !code.bit();
        self
    }

    /// Rejects `code` as well.
    pub const fn also_rejecting(mut self, code: GrpcCode) -> Self {
        self.rejected |= code.bit();
        self
    }

    /// Returns `true` if a response with this status is rejected.
    pub const fn rejects(&self, code: GrpcCode) -> bool {
        self.rejected & code.bit() != 0
    }
}

impl Default for GrpcStatus {
    fn default() -> Self {
        GrpcStatus::new()
    }
}

impl<B, E> Accept<Response<B>, E> for GrpcStatus {
    fn accept(&self, result: &Result<Response<B>, E>) -> bool {
        complete(result).is_some_and(|response| {
            GrpcCode::of_response(response).is_none_or(|code| !self.rejects(code))
        })
    }
}

impl fmt::Debug for GrpcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rejected = GrpcCode::ALL.iter().filter(|code| self.rejects(**code));
        f.debug_struct("GrpcStatus")
            .field("rejected", &DebugSet(rejected))
            .finish()
    }
}

#[cfg(feature = "time")]
#[cfg_attr(docsrs, doc(cfg(feature = "time")))]
pub use super::read::predicate::{AcceptBody, RejectBody};

struct DebugSet<I>(I);

impl<I> fmt::Debug for DebugSet<I>
where
    I: Iterator + Clone,
    I::Item: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.clone()).finish()
    }
}
