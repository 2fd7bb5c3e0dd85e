//! An axum `Router` as the fallback, behind `Router::layer` and `Router::route_layer`.

use axum::extract::{MatchedPath, NestedPath, OriginalUri};
use http::{Extensions, Request};
use std::{
    convert::Infallible,
    future::{ready, Future, Ready},
    pin::pin,
    sync::OnceLock,
    task::{Context, Poll, Waker},
};
use tower_layer::Layer;
use tower_service::Service;

/// Lets an axum `Router` route a request that a router has routed already: the
/// fallback router behind `Router::layer` or `Router::route_layer`.
///
/// Routing leaves state in the request's extensions: the path parameters it matched
/// (in a type private to axum), the [`MatchedPath`] and the [`NestedPath`]. A second
/// router adds its own parameters to the first one's, so a `Path` extractor in the
/// fallback router finds one parameter too many and answers
/// `500 Wrong number of path arguments for Path. Expected 1 but got 2`.
/// `Reroute` resets that routing state before calling the router it wraps, and keeps
/// every other extension: what your own layers put there (an `Extension` from an auth
/// layer, a request id, `ConnectInfo`) reaches the fallback router as it reaches the
/// primary. The [`OriginalUri`] is kept too.
///
/// ```
/// use axum::{extract::Path, http::StatusCode, routing::get, Extension, Router};
/// use tower_backstop::{http::{accept::RejectStatus, Reroute}, FallbackLayer};
///
/// #[derive(Clone)]
/// struct CurrentUser(String);
///
/// // The database, an axum router of its own.
/// let database = Router::new().route(
///     "/user/{id}",
///     get(|Path(id): Path<u32>, Extension(user): Extension<CurrentUser>| async move {
///         format!("user {id} from the database, asked by {}", user.0)
///     }),
/// );
///
/// let app: Router = Router::new()
///     // The cache: a 404 is a miss.
///     .route("/user/{id}", get(|Path(_id): Path<u32>| async { StatusCode::NOT_FOUND }))
///     .route_layer(
///         FallbackLayer::new(Reroute::new(database))
///             .accept(RejectStatus(StatusCode::NOT_FOUND))
///             .buffer_bodies(),
///     )
///     .layer(Extension(CurrentUser("ada".to_owned())));
/// ```
///
/// A handler or a `MethodRouter` as the fallback does not route again: it reads the
/// primary's path parameters, which are the ones it wants, and needs no `Reroute`.
/// The wrapped router sees the request's URI as the primary did: under
/// `Router::nest("/api", ..)`, without the `/api` prefix.
///
/// # Cost
///
/// Per fallback call, a copy of a one-entry extension map (three small allocations)
/// is merged into the request; the primary's branch is untouched.
///
/// Available with the `axum` feature.
#[derive(Clone, Debug)]
pub struct Reroute<S> {
    inner: S,
}

impl<S> Reroute<S> {
    /// Wraps `inner`, typically an axum `Router`.
    pub const fn new(inner: S) -> Self {
        Reroute { inner }
    }

    /// Returns a reference to the wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Returns a mutable reference to the wrapped service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for Reroute<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        reset_routing(req.extensions_mut());
        self.inner.call(req)
    }
}

/// Applies [`Reroute`] to a service.
///
/// Available with the `axum` feature.
#[derive(Clone, Copy, Debug, Default)]
pub struct RerouteLayer;

impl RerouteLayer {
    /// Creates the layer.
    pub const fn new() -> Self {
        RerouteLayer
    }
}

impl<S> Layer<S> for RerouteLayer {
    type Service = Reroute<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Reroute::new(inner)
    }
}

/// Puts `extensions` back in the routing state of a request no router has seen, keeping
/// everything else.
fn reset_routing(extensions: &mut Extensions) {
    extensions.remove::<MatchedPath>();
    extensions.remove::<NestedPath>();
    // `Extensions::extend` replaces the entries of the types it brings: this puts the
    // private path-parameter type back to "no parameters", which the next router's
    // parameters then extend as if it were the first.
    extensions.extend(fresh_routing_state().clone());
}

/// axum's private routing state after a route without parameters, captured once per
/// process: the request extensions a router leaves, less the public types.
fn fresh_routing_state() -> &'static Extensions {
    static FRESH: OnceLock<Extensions> = OnceLock::new();
    FRESH.get_or_init(capture_routing_state)
}

fn capture_routing_state() -> Extensions {
    use axum::{body::Body, response::Response, Router};

    // Answers with the request's extensions as the response's.
    #[derive(Clone)]
    struct Echo;

    impl Service<Request<Body>> for Echo {
        type Response = Response;
        type Error = Infallible;
        type Future = Ready<Result<Response, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<Body>) -> Self::Future {
            let mut response = Response::new(Body::empty());
            *response.extensions_mut() = req.into_parts().0.extensions;
            ready(Ok(response))
        }
    }

    let mut router = Router::new().route_service("/", Echo);
    let future = Service::<Request<Body>>::call(&mut router, Request::new(Body::empty()));
    // The router does no I/O and the echo is ready at once: one poll finishes it. Were
    // it ever pending, nothing would be reset, as before `Reroute` existed.
    let mut cx = Context::from_waker(Waker::noop());
    let mut extensions = match pin!(future).poll(&mut cx) {
        Poll::Ready(Ok(response)) => response.into_parts().0.extensions,
        Poll::Ready(Err(never)) => match never {},
        Poll::Pending => Extensions::new(),
    };
    extensions.remove::<MatchedPath>();
    extensions.remove::<NestedPath>();
    extensions.remove::<OriginalUri>();
    extensions
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_captured_state_is_the_private_parameters_alone() {
        assert_eq!(super::fresh_routing_state().len(), 1);
    }
}
