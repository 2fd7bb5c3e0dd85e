//! Accepting the primary's answer by its HTTP status or its gRPC status.
//!
//! These predicates judge an `Ok(http::Response<B>)` by its head; every `Err` is
//! rejected, as with [`AcceptOk`](crate::accept::AcceptOk). They combine with
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
//! [`GrpcStatus`] judges a gRPC answer by the `grpc-status` it carries in its
//! **headers**: that is where a server puts it when it answers *trailers-only*, which
//! is how tonic (and gRPC servers in general) send an error with no message — a
//! handler's `Err(Status::not_found(..))`, `UNAVAILABLE` from a load shedder, and so on.
//!
//! A status sent in the **trailers**, after a body, cannot be judged: the predicate
//! sees the response as soon as its headers arrive, before the body has been read, and
//! a response whose headers carry no `grpc-status` is accepted. In practice that is a
//! server that answered with at least one message, so only a streaming call that
//! fails after its first message escapes the predicate. A server that must be judged
//! on such calls has to be wrapped to read its answer to the end first.
//!
//! Available with the `http` feature.

use crate::accept::Accept;
use http::{Response, StatusCode};
use std::{fmt, ops::RangeInclusive};

/// Accepts an `Ok` response whose status is in a range; rejects other statuses and
/// every `Err`.
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
        matches!(result, Ok(response) if self.contains(response.status()))
    }
}

/// Accepts an `Ok` response unless its status is a server error (`5xx`); rejects
/// every `Err`.
///
/// The usual predicate for a replica or a cache: a `4xx` is the client's problem and
/// would be the same from the fallback, a `5xx` is the primary's.
///
/// Available with the `http` feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RejectServerErrors;

impl<B, E> Accept<Response<B>, E> for RejectServerErrors {
    fn accept(&self, result: &Result<Response<B>, E>) -> bool {
        matches!(result, Ok(response) if !response.status().is_server_error())
    }
}

/// Accepts an `Ok` response unless its status is this one; rejects every `Err`.
///
/// `RejectStatus(StatusCode::NOT_FOUND)` treats a cache's `404` as a miss.
///
/// Available with the `http` feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RejectStatus(pub StatusCode);

impl<B, E> Accept<Response<B>, E> for RejectStatus {
    fn accept(&self, result: &Result<Response<B>, E>) -> bool {
        matches!(result, Ok(response) if response.status() != self.0)
    }
}

/// A gRPC status code.
///
/// The numbering is gRPC's (and `tonic::Code`'s): `GrpcCode::NotFound as i32 == 5`.
///
/// Available with the `http` feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
#[allow(missing_docs)]
pub enum GrpcCode {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl GrpcCode {
    const ALL: [GrpcCode; 17] = [
        GrpcCode::Ok,
        GrpcCode::Cancelled,
        GrpcCode::Unknown,
        GrpcCode::InvalidArgument,
        GrpcCode::DeadlineExceeded,
        GrpcCode::NotFound,
        GrpcCode::AlreadyExists,
        GrpcCode::PermissionDenied,
        GrpcCode::ResourceExhausted,
        GrpcCode::FailedPrecondition,
        GrpcCode::Aborted,
        GrpcCode::OutOfRange,
        GrpcCode::Unimplemented,
        GrpcCode::Internal,
        GrpcCode::Unavailable,
        GrpcCode::DataLoss,
        GrpcCode::Unauthenticated,
    ];

    /// The status a gRPC client reads from this response's head, if it can be read
    /// there.
    ///
    /// - `grpc-status` in the headers (a trailers-only answer): that code; a value that
    ///   is not a known code is `Unknown`, as gRPC clients read it.
    /// - No `grpc-status` and HTTP `200`: `None`, the status will come in the trailers.
    /// - No `grpc-status` and another HTTP status (a proxy's answer): the code the gRPC
    ///   specification maps it to — `UNAVAILABLE` for 429, 502, 503 and 504,
    ///   `UNIMPLEMENTED` for 404, and so on.
    pub fn of_response<B>(response: &Response<B>) -> Option<GrpcCode> {
        if let Some(value) = response.headers().get("grpc-status") {
            let code = std::str::from_utf8(value.as_bytes())
                .ok()
                .and_then(|text| text.parse::<usize>().ok())
                .and_then(|n| GrpcCode::ALL.get(n).copied());
            return Some(code.unwrap_or(GrpcCode::Unknown));
        }
        let code = match response.status().as_u16() {
            200 => return None,
            400 => GrpcCode::Internal,
            401 => GrpcCode::Unauthenticated,
            403 => GrpcCode::PermissionDenied,
            404 => GrpcCode::Unimplemented,
            429 | 502 | 503 | 504 => GrpcCode::Unavailable,
            _ => GrpcCode::Unknown,
        };
        Some(code)
    }

    const fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// Accepts a gRPC response unless the status in its headers is one of a set of codes;
/// rejects every `Err`.
///
/// By default every code but `OK` is rejected. The status is read by
/// [`GrpcCode::of_response`]; a response whose status will only come in its trailers
/// is accepted, see [the module docs](self#grpc).
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
        match result {
            Ok(response) => GrpcCode::of_response(response).is_none_or(|code| !self.rejects(code)),
            Err(_) => false,
        }
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
