//! The [`Coalesce`] service and its [`CoalesceLayer`].

use super::{calls::Registry, future::ResponseFuture, CoalesceKey};
use crate::accept::TypeName;
use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};
use tower_layer::Layer;
use tower_service::Service;

/// Makes concurrent calls with equal keys share one call of the inner service.
///
/// See the [module docs](super) for what is shared, with whom, and what it costs.
///
/// Every clone shares the calls in flight of the service it was cloned from; every
/// service one [`CoalesceLayer`] makes shares the layer's.
///
/// # Readiness
///
/// [`poll_ready`](Service::poll_ready) is always ready: a request that joins a call in
/// flight needs nothing of the inner service. A request that starts a call drives a
/// clone of the inner service to readiness inside that call, as
/// [`Fallback`](crate::Fallback) does with its fallback; a readiness error is that
/// call's answer, shared by its waiters.
pub struct Coalesce<S, K> {
    inner: S,
    key: K,
    calls: Arc<Registry>,
}

impl<S, K> Coalesce<S, K> {
    /// Wraps `inner`: concurrent requests whose `key`s are equal share one call.
    pub fn new(inner: S, key: K) -> Self {
        Coalesce::with_registry(inner, key, Arc::new(Registry::new()))
    }

    pub(crate) fn with_registry(inner: S, key: K, calls: Arc<Registry>) -> Self {
        Coalesce { inner, key, calls }
    }

    /// Counts the requests that joined a call in flight and how the calls ended into
    /// `stats` (see [`Snapshot::coalesce_joined`](crate::outcome::Snapshot::coalesce_joined)
    /// and the fields after it). Default: no counting. Every clone, and every service of
    /// the same layer, counts into the same handle: the last one set wins.
    ///
    /// Behind [`Fallback::coalesce_by`](crate::Fallback::coalesce_by) the fallback's
    /// `stats` and `metrics` are used: this is for a `Coalesce` of your own.
    pub fn stats(self, stats: crate::outcome::Stats) -> Self {
        let mut observers = self.calls.observers();
        observers.stats = Some(stats);
        self.calls.set_observers(observers);
        self
    }

    /// Reports joined requests and ended calls through the [`metrics`] facade,
    /// labelled `layer = name`: `backstop_coalesce_joined_total` and
    /// `backstop_coalesce_calls_total{end}` (`answered`, `dropped`, `panicked`).
    /// Default: off.
    ///
    /// Available with the `metrics` feature.
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(self, name: &'static str) -> Self {
        let mut observers = self.calls.observers();
        observers.metrics = Some(Arc::new(crate::outcome::CoalesceMetrics::register(name)));
        self.calls.set_observers(observers);
        self
    }

    /// The calls in flight this service shares.
    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.calls
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The key function.
    pub fn key_ref(&self) -> &K {
        &self.key
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, K, Req> Service<Req> for Coalesce<S, K>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Clone + Send + 'static,
    S::Error: Clone + Send + 'static,
    K: CoalesceKey<Req>,
    K::Key: Send + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, Req, K::Key>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The clone that makes the call is never readied here: it is driven to
        // readiness inside the call, by whichever waiter drives it.
        match self.key.key(&req) {
            None => ResponseFuture::alone(self.inner.clone(), req),
            Some(key) => ResponseFuture::shared(&self.calls, key, || self.inner.clone(), req),
        }
    }
}

impl<S: Clone, K: Clone> Clone for Coalesce<S, K> {
    fn clone(&self) -> Self {
        Coalesce {
            inner: self.inner.clone(),
            key: self.key.clone(),
            calls: self.calls.clone(),
        }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for Coalesce<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coalesce")
            .field("inner", &self.inner)
            .field("key", &TypeName::of(&self.key))
            .field("observers", &self.calls.observers())
            .finish()
    }
}

/// Wraps services in [`Coalesce`]: every service it makes, and every clone of them,
/// shares one set of calls in flight.
///
/// One layer stands for one backend: a request to one service the layer made may be
/// answered by a call another one made. Use one layer per backend whose answers
/// differ.
pub struct CoalesceLayer<K> {
    key: K,
    calls: Arc<Registry>,
}

impl<K> CoalesceLayer<K> {
    /// A layer whose services share calls between concurrent requests with equal `key`s.
    pub fn new(key: K) -> Self {
        CoalesceLayer {
            key,
            calls: Arc::new(Registry::new()),
        }
    }

    /// Counts into `stats`. See [`Coalesce::stats`].
    pub fn stats(self, stats: crate::outcome::Stats) -> Self {
        let mut observers = self.calls.observers();
        observers.stats = Some(stats);
        self.calls.set_observers(observers);
        self
    }

    /// Reports through the [`metrics`] facade. See [`Coalesce::metrics`].
    ///
    /// Available with the `metrics` feature.
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(self, name: &'static str) -> Self {
        let mut observers = self.calls.observers();
        observers.metrics = Some(Arc::new(crate::outcome::CoalesceMetrics::register(name)));
        self.calls.set_observers(observers);
        self
    }
}

impl<S, K: Clone> Layer<S> for CoalesceLayer<K> {
    type Service = Coalesce<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Coalesce::with_registry(inner, self.key.clone(), self.calls.clone())
    }
}

impl<K: Clone> Clone for CoalesceLayer<K> {
    fn clone(&self) -> Self {
        CoalesceLayer {
            key: self.key.clone(),
            calls: self.calls.clone(),
        }
    }
}

impl<K> fmt::Debug for CoalesceLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceLayer")
            .field("key", &TypeName::of(&self.key))
            .field("observers", &self.calls.observers())
            .finish()
    }
}
