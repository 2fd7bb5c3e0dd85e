//! Ready-made [`Eligible`] predicates for HTTP requests, by method.

use crate::launch::Eligible;
use http::{Method, Request};

/// Lets only requests with a *safe* method start their fallback speculatively:
/// `GET`, `HEAD`, `OPTIONS` and `TRACE` (RFC 9110 §9.2.1).
///
/// A safe request asks for nothing to change on the server, so running it on both
/// branches at once is harmless. Every other request (`POST`, `PUT`, `DELETE`,
/// `PATCH`, `CONNECT`, extension methods) reaches the fallback only after the primary
/// is rejected. Judges any `http::Request<B>`, so it needs no type annotation.
///
/// Available with the `http` feature.
///
/// ```
/// use axum::{http::StatusCode, routing::get, Router};
/// use tower_backstop::{http::{accept::RejectStatus, SafeMethods}, FallbackLayer};
///
/// let app: Router = Router::new()
///     .route("/item/{id}", get(|| async { StatusCode::NOT_FOUND }).post(|| async { "saved" }))
///     .route_layer(
///         FallbackLayer::new(get(|| async { "origin" }).post(|| async { "saved" }))
///             .accept(RejectStatus(StatusCode::NOT_FOUND))
///             .speculate_if(SafeMethods)
///             .buffer_bodies(),
///     );
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SafeMethods;

impl SafeMethods {
    /// Whether `method` is safe (RFC 9110 §9.2.1).
    pub fn is_safe(method: &Method) -> bool {
        matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        )
    }
}

impl<B> Eligible<Request<B>> for SafeMethods {
    fn eligible(&self, req: &Request<B>) -> bool {
        SafeMethods::is_safe(req.method())
    }
}

/// Lets only requests with an *idempotent* method start their fallback speculatively:
/// the safe methods (`GET`, `HEAD`, `OPTIONS`, `TRACE`) and `PUT` and `DELETE`
/// (RFC 9110 §9.2.2).
///
/// An idempotent request has the same effect on the server sent once or twice, so a
/// fallback that writes to the same store as the primary may run it speculatively.
/// `POST`, `PATCH`, `CONNECT` and extension methods reach the fallback only after the
/// primary is rejected. Judges any `http::Request<B>`, so it needs no type annotation.
///
/// Available with the `http` feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdempotentMethods;

impl IdempotentMethods {
    /// Whether `method` is idempotent (RFC 9110 §9.2.2).
    pub fn is_idempotent(method: &Method) -> bool {
        SafeMethods::is_safe(method) || matches!(*method, Method::PUT | Method::DELETE)
    }
}

impl<B> Eligible<Request<B>> for IdempotentMethods {
    fn eligible(&self, req: &Request<B>) -> bool {
        IdempotentMethods::is_idempotent(req.method())
    }
}
