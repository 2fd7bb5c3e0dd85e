//! Marking each response with the branch that served it.

use http::{HeaderName, HeaderValue, Response};
use pin_project_lite::pin_project;
use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};
use tower_layer::Layer;
use tower_service::Service;

/// Which branch of a [`Fallback`](crate::Fallback) produced a response.
///
/// Inserted into the response's extensions by [`MarkServedBy`], so a handler, a
/// middleware further out or a test can read it with
/// `response.extensions().get::<ServedBy>()`.
///
/// Available with the `http` feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServedBy {
    /// The primary's response was accepted.
    Primary,
    /// The fallback's response was served.
    Fallback,
}

impl ServedBy {
    /// `"primary"` or `"fallback"`: the value written to the header.
    pub const fn as_str(self) -> &'static str {
        match self {
            ServedBy::Primary => "primary",
            ServedBy::Fallback => "fallback",
        }
    }
}

/// The header [`FallbackLayer::mark_served_by`](crate::FallbackLayer::mark_served_by)
/// writes when asked to: `x-served-by: primary` or `x-served-by: fallback`.
///
/// Available with the `http` feature.
pub const X_SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");

/// Marks every response of the service it wraps as served by one branch: a
/// [`ServedBy`] extension, and optionally a header.
///
/// Wrap the primary with [`MarkServedByLayer::primary`] and the fallback with
/// [`MarkServedByLayer::fallback`]; whichever response the layer serves then carries
/// its origin. [`FallbackLayer::mark_served_by`](crate::FallbackLayer::mark_served_by)
/// does both in one call.
///
/// Available with the `http` feature.
#[derive(Clone, Debug)]
pub struct MarkServedBy<S> {
    inner: S,
    by: ServedBy,
    header: Option<HeaderName>,
}

impl<S> MarkServedBy<S> {
    /// Marks the responses of `inner` as served by `by`, with the extension only.
    pub const fn new(inner: S, by: ServedBy) -> Self {
        MarkServedBy {
            inner,
            by,
            header: None,
        }
    }

    /// Also writes `by` into the header `name` (replacing any value it had).
    pub fn header(mut self, name: HeaderName) -> Self {
        self.header = Some(name);
        self
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

impl<S, Req, B> Service<Req> for MarkServedBy<S>
where
    S: Service<Req, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = MarkFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        MarkFuture {
            inner: self.inner.call(req),
            by: self.by,
            header: self.header.clone(),
        }
    }
}

pin_project! {
    /// Response future of [`MarkServedBy`].
    ///
    /// Available with the `http` feature.
    #[derive(Debug)]
    pub struct MarkFuture<F> {
        #[pin]
        inner: F,
        by: ServedBy,
        header: Option<HeaderName>,
    }
}

impl<F, B, E> Future for MarkFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        response.extensions_mut().insert(*this.by);
        if let Some(name) = this.header.take() {
            let value = HeaderValue::from_static(this.by.as_str());
            response.headers_mut().insert(name, value);
        }
        Poll::Ready(Ok(response))
    }
}

/// Applies [`MarkServedBy`] to a service.
///
/// Available with the `http` feature.
#[derive(Clone, Debug)]
pub struct MarkServedByLayer {
    by: ServedBy,
    header: Option<HeaderName>,
}

impl MarkServedByLayer {
    /// Marks responses as served by the primary.
    pub const fn primary() -> Self {
        MarkServedByLayer {
            by: ServedBy::Primary,
            header: None,
        }
    }

    /// Marks responses as served by the fallback.
    pub const fn fallback() -> Self {
        MarkServedByLayer {
            by: ServedBy::Fallback,
            header: None,
        }
    }

    /// Also writes the branch into the header `name`. Default: extension only.
    pub fn header(mut self, name: HeaderName) -> Self {
        self.header = Some(name);
        self
    }
}

impl<S> Layer<S> for MarkServedByLayer {
    type Service = MarkServedBy<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MarkServedBy {
            inner,
            by: self.by,
            header: self.header.clone(),
        }
    }
}
