use crate::{
    accept::{AcceptOk, TypeName},
    coalesce::Coalesce,
    launch::{AnyRequest, Launch, Settings},
    refill::NoRefill,
    Fallback,
};
use std::fmt;
use tower_layer::{Identity, Layer};

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
///
/// # Type parameters
///
/// `F` is the fallback service, `A` the [`Accept`](crate::accept::Accept) predicate,
/// `S` the [`Eligible`](crate::launch::Eligible) predicate and `R` the
/// [`Refill`](crate::refill::Refill) action (last, so that it can be left out). `O` and `I` are layers
/// the built [`Fallback`] is wrapped in (`O`) and the primary is wrapped in (`I`); both
/// are [`Identity`] unless the `http` feature's
/// `buffer_bodies` or
/// `mark_served_by` set them, so the builder methods
/// can be called in any order and the layer stays one type.
#[derive(Clone)]
pub struct FallbackLayer<F, A = AcceptOk, S = AnyRequest, O = Identity, I = Identity, R = NoRefill>
{
    fallback: F,
    accept: A,
    eligible: S,
    refill: R,
    settings: Settings,
    pub(crate) outer: O,
    pub(crate) inner: I,
}

impl<F> FallbackLayer<F> {
    /// Creates a layer that falls back to `fallback`, accepting any `Ok` from the
    /// primary and starting both at once.
    ///
    /// With axum, an axum `Router` as the fallback goes in
    /// `tower_backstop::http::Reroute` (feature `axum`), or its `Path` extractors see the
    /// primary's path parameters too; a handler or a `MethodRouter` needs nothing.
    pub fn new(fallback: F) -> Self {
        FallbackLayer {
            fallback,
            accept: AcceptOk,
            eligible: AnyRequest,
            refill: NoRefill,
            settings: Settings::default(),
            outer: Identity::new(),
            inner: Identity::new(),
        }
    }
}

impl<F, A, S, O, I, R> FallbackLayer<F, A, S, O, I, R> {
    /// Rebuilds the layer with other parts of any type; the refill action and the
    /// settings are kept.
    pub(crate) fn with_parts<F2, A2, S2, O2, I2>(
        self,
        parts: impl FnOnce(F, A, S, O, I) -> (F2, A2, S2, O2, I2),
    ) -> FallbackLayer<F2, A2, S2, O2, I2, R> {
        let (fallback, accept, eligible, outer, inner) = parts(
            self.fallback,
            self.accept,
            self.eligible,
            self.outer,
            self.inner,
        );
        FallbackLayer {
            fallback,
            accept,
            eligible,
            refill: self.refill,
            settings: self.settings,
            outer,
            inner,
        }
    }

    /// Replaces the predicate that decides whether the primary's result stands.
    ///
    /// **A closure needs its argument's type written out**, as in
    /// `.accept(|r: &Result<Option<Row>, Infallible>| matches!(r, Ok(Some(_))))`: the
    /// layer does not know the response type until it wraps a service. Without the
    /// annotation rustc reports `error[E0282]: type annotations needed` at the closure,
    /// or, when the closure's body fixes part of the type, an error far from it: at
    /// `oneshot`, ``error[E0599]: the method `oneshot` exists for struct
    /// `Fallback<..>`, but its trait bounds were not satisfied``; at `Router::layer`,
    /// `error[E0631]: type mismatch in closure arguments`. For HTTP responses the `http`
    /// feature's status predicates (`RejectStatus`, `StatusIn`, `GrpcStatus`) need no
    /// annotation.
    ///
    /// Default: [`AcceptOk`]. See [`Fallback::accept`].
    pub fn accept<A2>(self, accept: A2) -> FallbackLayer<F, A2, S, O, I, R> {
        self.with_parts(|f, _, s, o, i| (f, accept, s, o, i))
    }

    /// Replaces the fallback service with `f(fallback)`, keeping the configuration:
    /// for wrapping the fallback in a middleware of its own after the fact.
    pub fn map_fallback<F2>(self, f: impl FnOnce(F) -> F2) -> FallbackLayer<F2, A, S, O, I, R> {
        self.with_parts(|fallback, a, s, o, i| (f(fallback), a, s, o, i))
    }

    /// Makes concurrent fallback calls with equal keys share one call: the fallback is
    /// wrapped in a [`Coalesce`](crate::coalesce::Coalesce), with one map of calls in
    /// flight for this layer, shared by every service it builds and every clone of them.
    /// Default: off — every request makes its own fallback call.
    ///
    /// `key` is a [`CoalesceKey`](crate::coalesce::CoalesceKey), such as a closure
    /// `|req: &Req| Some(key)` (its argument's type written out, as for
    /// [`accept`](FallbackLayer::accept)); `None` for a request that must not share.
    /// Every request that joined a call gets its answer, `Ok` or `Err`, so the
    /// fallback's response and error must be `Clone` (make an error shareable with
    /// `map_err(Arc::new)` on the fallback); the layer's error type does not change. A
    /// joiner needs no fallback readiness. A request arriving after the call ended starts
    /// a new one: nothing is cached.
    ///
    /// **The key must hold everything that varies the answer.** Requests with equal
    /// keys get the same answer, whoever sent them: a key that leaves out the caller's
    /// identity hands one user's answer to another — with an `Authorization` or
    /// `Cookie` header, a data leak. Key on what the answer depends on, or return
    /// `None` for requests carrying credentials. Over HTTP, the `http` module's
    /// `HttpKey` (feature `http`) does so: it keys a request by its method, URI and the
    /// fields answers vary by, and shares no request that carries credentials or has an
    /// unsafe method. An HTTP answer is made `Clone` by `share_responses()` (features
    /// `http` and `time`), which must come **before** `coalesce_by`, so that the
    /// coalescer shares the answer it has read whole:
    /// `.share_responses().coalesce_by(HttpKey::new())`.
    ///
    /// No waiter is special: a request whose primary was accepted (its fallback
    /// dropped), whose caller left or timed out, leaves the shared call, which goes on
    /// for the others and is dropped — an [`OnCancel`](crate::cancel::OnCancel) slot in
    /// it firing once — only when its last waiter leaves. Until then the backend works
    /// on for whoever remains: an abandoned share costs nothing more than the call the
    /// remaining requests need anyway.
    ///
    /// The [`refill`](FallbackLayer::refill) runs once per shared call, for the first of
    /// its waiters that is already a miss (its primary rejected) when it takes the
    /// answer; a waiter whose primary was still pending then keeps its own refill, for
    /// if it turns out a miss — so under a speculative launch a shared call may refill
    /// more than once, never less than its misses need. [`Stats`] and `metrics`
    /// count the requests that joined and how the calls ended
    /// ([`Snapshot::coalesce_joined`](crate::outcome::Snapshot::coalesce_joined) and
    /// after), whether set before or after this call.
    ///
    /// A keyed request costs a hash of its key and a few takes of one lock shared by the
    /// layer, and a call one allocation (its boxed future); see the
    /// [`coalesce`](crate::coalesce) module for the bounds (`Send + 'static` parts) and
    /// the costs, measured in `docs/overhead.md`. A panic in the shared call reaches
    /// every waiter as a panic of its own.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use tower::{service_fn, ServiceBuilder, ServiceExt};
    /// use tower_backstop::{outcome::Stats, FallbackLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let cache = service_fn(|_id: u32| async { Ok::<_, Infallible>(None::<String>) });
    /// let db = service_fn(|id: u32| async move {
    ///     tokio::task::yield_now().await;
    ///     Ok::<_, Infallible>(Some(format!("row {id}")))
    /// });
    ///
    /// let stats = Stats::new();
    /// let svc = ServiceBuilder::new()
    ///     .layer(
    ///         FallbackLayer::new(db)
    ///             .accept(|r: &Result<Option<String>, Infallible>| matches!(r, Ok(Some(_))))
    ///             // The id is all the answer depends on: no caller identity to keep apart.
    ///             .coalesce_by(|id: &u32| Some(*id))
    ///             .stats(stats.clone()),
    ///     )
    ///     .service(cache);
    ///
    /// let (a, b) = tokio::join!(svc.clone().oneshot(7), svc.oneshot(7));
    /// assert_eq!(a.unwrap(), b.unwrap());
    /// assert_eq!(stats.snapshot().coalesce_joined, 1);
    /// # }
    /// ```
    ///
    /// [`Stats`]: crate::outcome::Stats
    pub fn coalesce_by<K>(mut self, key: K) -> FallbackLayer<Coalesce<F, K>, A, S, O, I, R> {
        let calls = std::sync::Arc::new(crate::coalesce::Registry::new());
        self.settings.set_coalesce(calls.clone());
        self.with_parts(|f, a, s, o, i| (Coalesce::with_registry(f, key, calls), a, s, o, i))
    }

    /// Sets when the fallback starts. Default: [`Launch::Concurrent`].
    /// See [`Fallback::launch`].
    pub fn launch(mut self, launch: Launch) -> Self {
        self.settings.set_launch(launch);
        self
    }

    /// Caps speculative launches with a budget shared by every service this layer
    /// builds, such as a [`TpsBudget`](crate::budget::TpsBudget). Default: no cap.
    /// See [`Fallback::budget`].
    ///
    /// Available with the `budget` feature.
    ///
    /// ```
    /// use std::time::Duration;
    /// # use std::convert::Infallible;
    /// # use tower::service_fn;
    /// use tower_backstop::{budget::TpsBudget, FallbackLayer};
    ///
    /// # let db = service_fn(|key: u32| async move { Ok::<_, Infallible>(key) });
    /// // At most 10% extra fallback calls over a 10 s window, and at least 1 per second.
    /// let layer = FallbackLayer::new(db).budget(TpsBudget::new(Duration::from_secs(10), 1, 0.1));
    /// # let _ = layer;
    /// ```
    #[cfg(feature = "budget")]
    #[cfg_attr(docsrs, doc(cfg(feature = "budget")))]
    pub fn budget<B>(self, budget: B) -> Self
    where
        B: crate::budget::Budget + Send + Sync + 'static,
    {
        self.shared_budget(std::sync::Arc::new(budget))
    }

    /// Like [`budget`](FallbackLayer::budget), with a budget you keep a handle to.
    /// See [`Fallback::shared_budget`].
    ///
    /// Available with the `budget` feature.
    #[cfg(feature = "budget")]
    #[cfg_attr(docsrs, doc(cfg(feature = "budget")))]
    pub fn shared_budget<B>(mut self, budget: std::sync::Arc<B>) -> Self
    where
        B: crate::budget::Budget + Send + Sync + 'static,
    {
        self.settings.set_budget(budget);
        self
    }

    /// Caps the speculative fallback calls in flight at once, across every service this
    /// layer builds and their clones, at `max`. Default: no cap. See
    /// [`Fallback::max_speculative`].
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use tower::service_fn;
    /// use tower_backstop::FallbackLayer;
    ///
    /// let db = service_fn(|key: u32| async move { Ok::<_, Infallible>(key) });
    /// // A pool of 8 connections: speculation may hold 2 of them at most.
    /// let layer = FallbackLayer::new(db).max_speculative(2);
    /// # let _ = layer;
    /// ```
    pub fn max_speculative(mut self, max: usize) -> Self {
        self.settings.set_max_speculative(max);
        self
    }

    /// Lets only the requests `eligible` approves start their fallback speculatively;
    /// the others start it only after the primary is rejected.
    ///
    /// **A closure needs its argument's type written out**, as in
    /// `.speculate_if(|req: &Request<ReplayBody>| req.method() == Method::GET)`: the
    /// layer does not know the request type until it is used, and without the
    /// annotation rustc reports `error[E0282]: type annotations needed` at the closure.
    /// Behind `buffer_bodies` the request type is
    /// `http::Request<ReplayBody>`. For HTTP, the `http` feature has ready-made
    /// predicates that need no annotation: `http::SafeMethods` and
    /// `http::IdempotentMethods` (RFC 9110 §9.2.1, §9.2.2).
    ///
    /// Default: [`AnyRequest`]. See [`Fallback::speculate_if`].
    pub fn speculate_if<S2>(self, eligible: S2) -> FallbackLayer<F, A, S2, O, I, R> {
        self.with_parts(|f, a, _, o, i| (f, a, eligible, o, i))
    }

    /// Writes the fallback's answer back after a miss with `refill`, a
    /// [`Refill`](crate::refill::Refill) action or a closure
    /// `FnMut(Req, &Res) -> Result<(), E>` (with its argument types written out, as for
    /// [`accept`](FallbackLayer::accept)). Default: [`NoRefill`], which keeps nothing
    /// and costs nothing.
    ///
    /// The action runs once, just before the response is returned, when the
    /// fallback's `Ok` answer is served because the primary's answer was rejected — not
    /// after a hit, not when the [`patience`](FallbackLayer::patience) bound ran out,
    /// not for an `Err`. The response waits for it, so it **must not block**: start the
    /// write (spawn a task, send on a channel) and return whether it did
    /// ([`Write`](crate::refill::Write)). Its errors are counted
    /// ([`Snapshot::refill_failures`](crate::outcome::Snapshot::refill_failures)) and
    /// never fail the request. See [`Fallback::refill`] for the details.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use tower::{service_fn, ServiceBuilder, ServiceExt};
    /// use tower_backstop::{outcome::Stats, refill::Write, FallbackLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let cache = service_fn(|_key: u32| async { Ok::<_, Infallible>(None::<u32>) });
    /// let db = service_fn(|key: u32| async move { Ok::<_, Infallible>(Some(key * 10)) });
    ///
    /// let stats = Stats::new();
    /// let svc = ServiceBuilder::new()
    ///     .layer(
    ///         FallbackLayer::new(db)
    ///             .accept(|r: &Result<Option<u32>, Infallible>| matches!(r, Ok(Some(_))))
    ///             .stats(stats.clone())
    ///             // In a real service: spawn the write into the cache, and return.
    ///             .refill(|_key: u32, _row: &Option<u32>| Err::<Write, _>("cache is read-only")),
    ///     )
    ///     .service(cache);
    ///
    /// // The failed refill is counted; the answer is the database's all the same.
    /// assert_eq!(svc.oneshot(4).await.unwrap(), Some(40));
    /// assert_eq!(stats.snapshot().refill_failures, 1);
    /// # }
    /// ```
    pub fn refill<R2>(self, refill: R2) -> FallbackLayer<F, A, S, O, I, R2> {
        FallbackLayer {
            fallback: self.fallback,
            accept: self.accept,
            eligible: self.eligible,
            refill,
            settings: self.settings,
            outer: self.outer,
            inner: self.inner,
        }
    }

    /// Bounds how long a successful fallback answer waits for the primary.
    /// Default: no bound. See [`Fallback::patience`].
    ///
    /// Available with the `time` feature (on by default).
    #[cfg(feature = "time")]
    #[cfg_attr(docsrs, doc(cfg(feature = "time")))]
    pub fn patience(mut self, patience: std::time::Duration) -> Self {
        self.settings.set_patience(patience);
        self
    }
}

impl<F, A, S, O, I, R> FallbackLayer<F, A, S, O, I, R> {
    /// Calls `hook` with the outcome of every request finished by any service this
    /// layer builds. Default: no hook. See [`Fallback::on_outcome`].
    pub fn on_outcome<H>(mut self, hook: H) -> Self
    where
        H: Fn(&crate::outcome::Outcome) + Send + Sync + 'static,
    {
        self.settings.observers_mut().hook = Some(std::sync::Arc::new(hook));
        self
    }

    /// Reads the latencies the observers of every service this layer builds get from
    /// `clock`. Default: [`LatencyClock::Monotonic`](crate::outcome::LatencyClock::Monotonic).
    /// See [`Fallback::latency_clock`].
    pub fn latency_clock(mut self, clock: crate::outcome::LatencyClock) -> Self {
        self.settings.set_clock(clock);
        self
    }

    /// Counts the outcomes of every service this layer builds into `stats`.
    /// Default: no counting. See [`Fallback::stats`].
    pub fn stats(mut self, stats: crate::outcome::Stats) -> Self {
        self.settings.observers_mut().stats = Some(stats);
        self.settings.share_observers();
        self
    }
    /// Reports the outcomes of every service this layer builds through the
    /// [`metrics`] facade, labelled `layer = name`. Default: off. See
    /// [`Fallback::metrics`].
    ///
    /// Available with the `metrics` feature.
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, name: &'static str) -> Self {
        self.settings.observers_mut().metrics = Some(std::sync::Arc::new(
            crate::outcome::MetricsHandles::register(name),
        ));
        self.settings.share_observers();
        self
    }
}

/// Stand-ins for the builder methods of features that are off: calling one fails to
/// compile with a message that names the feature (see `crate::feature`).
#[allow(missing_docs)]
impl<F, A, S, O, I, R> FallbackLayer<F, A, S, O, I, R> {
    #[cfg(not(feature = "budget"))]
    #[doc(hidden)]
    pub fn budget<B: crate::feature::NeedsBudget>(self, _budget: B) -> Self {
        self
    }

    #[cfg(not(feature = "budget"))]
    #[doc(hidden)]
    pub fn shared_budget<B: crate::feature::NeedsBudget>(self, _budget: B) -> Self {
        self
    }

    #[cfg(not(feature = "time"))]
    #[doc(hidden)]
    pub fn patience<D: crate::feature::NeedsTime>(self, _patience: D) -> Self {
        self
    }

    #[cfg(not(feature = "metrics"))]
    #[doc(hidden)]
    pub fn metrics<N: crate::feature::NeedsMetrics>(self, _name: N) -> Self {
        self
    }

    #[cfg(not(feature = "http"))]
    #[doc(hidden)]
    pub fn buffer_bodies(self) -> Self
    where
        F: crate::feature::NeedsHttp,
    {
        self
    }

    #[cfg(not(feature = "http"))]
    #[doc(hidden)]
    pub fn mark_served_by<H: crate::feature::NeedsHttp>(self, _header: H) -> Self {
        self
    }

    // Reading the first frame is bounded on tokio's timer: `http` alone is not enough.
    #[cfg(not(all(feature = "http", feature = "time")))]
    #[doc(hidden)]
    pub fn peek_grpc_status(self) -> Self
    where
        F: crate::feature::NeedsHttpAndTime,
    {
        self
    }

    // Reading the primary's body is bounded on tokio's timer too.
    #[cfg(not(all(feature = "http", feature = "time")))]
    #[doc(hidden)]
    pub fn read_primary_body(self) -> Self
    where
        F: crate::feature::NeedsHttpAndTime,
    {
        self
    }
}

impl<P, F, A, S, O, I, R> Layer<P> for FallbackLayer<F, A, S, O, I, R>
where
    F: Clone,
    A: Clone,
    S: Clone,
    R: Clone,
    I: Layer<P>,
    O: Layer<Fallback<I::Service, F, A, S, R>>,
{
    type Service = O::Service;

    fn layer(&self, primary: P) -> Self::Service {
        self.outer.layer(Fallback::from_parts(
            self.inner.layer(primary),
            self.fallback.clone(),
            self.accept.clone(),
            self.eligible.clone(),
            self.refill.clone(),
            self.settings.clone(),
        ))
    }
}

impl<F, A, S, O, I, R> fmt::Debug for FallbackLayer<F, A, S, O, I, R>
where
    F: fmt::Debug,
    O: fmt::Debug,
    I: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("fallback", &self.fallback)
            .field("accept", &TypeName::of(&self.accept))
            .field("eligible", &TypeName::of(&self.eligible))
            .field("refill", &TypeName::of(&self.refill))
            .field("settings", &self.settings)
            .field("outer", &self.outer)
            .field("inner", &self.inner)
            .finish()
    }
}
