use crate::{
    accept::{AcceptOk, TypeName},
    launch::{AnyRequest, Launch, Settings},
    Fallback,
};
use std::fmt;
use tower_layer::Layer;

/// Wraps a primary service in a [`Fallback`] to the given fallback service.
///
/// The layer holds the fallback and the configuration, and clones them into each
/// service it builds; the builder methods are those of [`Fallback`]. Shared state —
/// a budget, an adaptive estimate — is shared by every service the layer builds.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{service_fn, ServiceBuilder};
/// use tower_backstop::{launch::Launch, FallbackLayer};
///
/// let db = service_fn(|key: u32| async move { Ok::<_, Infallible>(Some(key * 10)) });
/// let cache = service_fn(|_key: u32| async move { Ok::<Option<u32>, Infallible>(None) });
///
/// let svc = ServiceBuilder::new()
///     .layer(
///         FallbackLayer::new(db)
///             .accept(|r: &Result<Option<u32>, Infallible>| matches!(r, Ok(Some(_))))
///             .launch(Launch::Concurrent),
///     )
///     .service(cache);
/// # let _ = svc;
/// ```
#[derive(Clone)]
pub struct FallbackLayer<F, A = AcceptOk, S = AnyRequest> {
    fallback: F,
    accept: A,
    eligible: S,
    settings: Settings,
}

impl<F> FallbackLayer<F> {
    /// Creates a layer that falls back to `fallback`, accepting any `Ok` from the
    /// primary and starting both at once.
    pub fn new(fallback: F) -> Self {
        FallbackLayer {
            fallback,
            accept: AcceptOk,
            eligible: AnyRequest,
            settings: Settings::default(),
        }
    }
}

impl<F, A, S> FallbackLayer<F, A, S> {
    /// Replaces the predicate that decides whether the primary's result stands.
    /// Default: [`AcceptOk`]. See [`Fallback::accept`].
    pub fn accept<A2>(self, accept: A2) -> FallbackLayer<F, A2, S> {
        FallbackLayer {
            fallback: self.fallback,
            accept,
            eligible: self.eligible,
            settings: self.settings,
        }
    }

    /// Replaces the fallback service with `f(fallback)`, keeping the configuration:
    /// for wrapping the fallback in a middleware of its own after the fact.
    pub fn map_fallback<F2>(self, f: impl FnOnce(F) -> F2) -> FallbackLayer<F2, A, S> {
        FallbackLayer {
            fallback: f(self.fallback),
            accept: self.accept,
            eligible: self.eligible,
            settings: self.settings,
        }
    }

    /// Sets when the fallback starts. Default: [`Launch::Concurrent`].
    /// See [`Fallback::launch`].
    pub fn launch(mut self, launch: Launch) -> Self {
        self.settings.launch = launch;
        self
    }

    /// Caps speculative launches with a budget shared by every service this layer
    /// builds. Default: no cap. See [`Fallback::budget`].
    #[cfg(feature = "budget")]
    #[cfg_attr(docsrs, doc(cfg(feature = "budget")))]
    pub fn budget<B>(self, budget: B) -> Self
    where
        B: tower::retry::budget::Budget + Send + Sync + 'static,
    {
        self.shared_budget(std::sync::Arc::new(budget))
    }

    /// Like [`budget`](FallbackLayer::budget), with a budget you keep a handle to.
    /// See [`Fallback::shared_budget`].
    #[cfg(feature = "budget")]
    #[cfg_attr(docsrs, doc(cfg(feature = "budget")))]
    pub fn shared_budget<B>(mut self, budget: std::sync::Arc<B>) -> Self
    where
        B: tower::retry::budget::Budget + Send + Sync + 'static,
    {
        self.settings.budget = Some(budget);
        self
    }

    /// Lets only the requests `eligible` approves start their fallback speculatively.
    /// Default: [`AnyRequest`]. See [`Fallback::speculate_if`].
    pub fn speculate_if<S2>(self, eligible: S2) -> FallbackLayer<F, A, S2> {
        FallbackLayer {
            fallback: self.fallback,
            accept: self.accept,
            eligible,
            settings: self.settings,
        }
    }

    /// Bounds how long a successful fallback answer waits for the primary.
    /// Default: no bound. See [`Fallback::patience`].
    #[cfg(feature = "time")]
    #[cfg_attr(docsrs, doc(cfg(feature = "time")))]
    pub fn patience(mut self, patience: std::time::Duration) -> Self {
        self.settings.patience = Some(patience);
        self
    }
}

impl<F, A, S> FallbackLayer<F, A, S> {
    /// Calls `hook` with the outcome of every request finished by any service this
    /// layer builds. Default: no hook. See [`Fallback::on_outcome`].
    pub fn on_outcome<H>(mut self, hook: H) -> Self
    where
        H: Fn(&crate::outcome::Outcome) + Send + Sync + 'static,
    {
        self.settings.observers_mut().hook = Some(std::sync::Arc::new(hook));
        self
    }

    /// Counts the outcomes of every service this layer builds into `stats`.
    /// Default: no counting. See [`Fallback::stats`].
    pub fn stats(mut self, stats: crate::outcome::Stats) -> Self {
        self.settings.observers_mut().stats = Some(stats);
        self
    }
    /// Reports the outcomes of every service this layer builds through the
    /// [`metrics`] facade, labelled `layer = name`. Default: off. See
    /// [`Fallback::metrics`].
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, name: &'static str) -> Self {
        self.settings.observers_mut().metrics = Some(std::sync::Arc::new(
            crate::outcome::MetricsHandles::register(name),
        ));
        self
    }
}

impl<P, F, A, S> Layer<P> for FallbackLayer<F, A, S>
where
    F: Clone,
    A: Clone,
    S: Clone,
{
    type Service = Fallback<P, F, A, S>;

    fn layer(&self, primary: P) -> Self::Service {
        Fallback::from_parts(
            primary,
            self.fallback.clone(),
            self.accept.clone(),
            self.eligible.clone(),
            self.settings.clone(),
        )
    }
}

impl<F, A, S> fmt::Debug for FallbackLayer<F, A, S>
where
    F: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("fallback", &self.fallback)
            .field("accept", &TypeName::of(&self.accept))
            .field("eligible", &TypeName::of(&self.eligible))
            .field("settings", &self.settings)
            .finish()
    }
}
