//! Predicates over the body the reader read whole, re-exported in
//! [`http::accept`](crate::http::accept).

use crate::{
    accept::Accept,
    http::{
        read::{IncompleteBody, ReadAheadBody},
        ReplayBody,
    },
};
use http::Response;
use std::fmt;

/// The data of an `Ok` answer whose body was read whole.
fn whole<B: http_body::Body, E>(result: &Result<Response<ReadAheadBody<B>>, E>) -> Option<&[u8]> {
    result.as_ref().ok()?.body().whole().map(|bytes| &bytes[..])
}

/// The data of an `Ok` answer that [`ShareResponse`](crate::http::ShareResponse) read
/// whole (one it could not read is marked, and its body empty).
fn shared<E>(result: &Result<Response<ReplayBody>, E>) -> Option<&[u8]> {
    let response = result.as_ref().ok()?;
    if IncompleteBody::is_marked(response) {
        return None;
    }
    Some(&response.body().data()[..])
}

/// Accepts an `Ok` response whose whole body, as
/// [`read_primary_body`](crate::FallbackLayer::read_primary_body) (or
/// [`share_responses`](crate::FallbackLayer::share_responses)) read it, passes a
/// test on its bytes; rejects every `Err`, and every response whose body was not
/// read whole (it stalled, ran over the cap, failed — see
/// [`IncompleteBody`](crate::http::read::IncompleteBody) — or was not read).
///
/// The test sees the data bytes, not the trailers. Combine it with a status
/// predicate through [`And`](crate::accept::And):
///
/// ```
/// use tower_backstop::{accept::And, http::accept::{AcceptBody, StatusIn}};
///
/// // A hit is a 2xx whose JSON does not say it was not found.
/// let hit = And::new(StatusIn::SUCCESS, AcceptBody::new(|body| !body.starts_with(b"{\"found\":false")));
/// # let _ = hit;
/// ```
///
/// Available with the `http` and `time` features.
#[derive(Clone, Copy)]
pub struct AcceptBody<F>(F);

impl<F> AcceptBody<F>
where
    F: Fn(&[u8]) -> bool,
{
    /// Accepts a whole body when `test` returns `true` for its bytes.
    pub const fn new(test: F) -> Self {
        AcceptBody(test)
    }
}

impl<F, B, E> Accept<Response<ReadAheadBody<B>>, E> for AcceptBody<F>
where
    F: Fn(&[u8]) -> bool,
    B: http_body::Body,
{
    fn accept(&self, result: &Result<Response<ReadAheadBody<B>>, E>) -> bool {
        whole(result).is_some_and(|bytes| (self.0)(bytes))
    }
}

/// The same test on an answer that [`share_responses`](crate::FallbackLayer::share_responses)
/// read whole.
impl<F, E> Accept<Response<ReplayBody>, E> for AcceptBody<F>
where
    F: Fn(&[u8]) -> bool,
{
    fn accept(&self, result: &Result<Response<ReplayBody>, E>) -> bool {
        shared(result).is_some_and(|bytes| (self.0)(bytes))
    }
}

impl<F> fmt::Debug for AcceptBody<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AcceptBody")
            .field(&crate::accept::TypeName::of(&self.0))
            .finish()
    }
}

/// Rejects an `Ok` response whose whole body, as
/// [`read_primary_body`](crate::FallbackLayer::read_primary_body) (or
/// [`share_responses`](crate::FallbackLayer::share_responses)) read it, is
/// exactly these bytes; accepts other whole bodies, and rejects every `Err` and
/// every response whose body was not read whole (see [`AcceptBody`]).
///
/// ```
/// use tower_backstop::{accept::And, http::accept::{RejectBody, StatusIn}};
///
/// // A cache that answers `200` with an empty body on a miss.
/// let hit = And::new(StatusIn::SUCCESS, RejectBody::EMPTY);
/// // One that answers `{"found":false}`.
/// let found = RejectBody::equal_to(b"{\"found\":false}");
/// # let _ = (hit, found);
/// ```
///
/// Available with the `http` and `time` features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RejectBody(&'static [u8]);

impl RejectBody {
    /// Rejects an empty body. Answers that have no body by definition — to a `HEAD`
    /// request, a `204`, a `304` — are empty too, and rejected: route `HEAD` around
    /// the layer, or let a status predicate accept those statuses first
    /// ([`Or`](crate::accept::Or)).
    pub const EMPTY: RejectBody = RejectBody(b"");

    /// Rejects a body of exactly these bytes.
    pub const fn equal_to(bytes: &'static [u8]) -> Self {
        RejectBody(bytes)
    }
}

impl<B, E> Accept<Response<ReadAheadBody<B>>, E> for RejectBody
where
    B: http_body::Body,
{
    fn accept(&self, result: &Result<Response<ReadAheadBody<B>>, E>) -> bool {
        whole(result).is_some_and(|bytes| bytes != self.0)
    }
}

/// The same test on an answer that [`share_responses`](crate::FallbackLayer::share_responses)
/// read whole.
impl<E> Accept<Response<ReplayBody>, E> for RejectBody {
    fn accept(&self, result: &Result<Response<ReplayBody>, E>) -> bool {
        shared(result).is_some_and(|bytes| bytes != self.0)
    }
}
