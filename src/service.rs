use crate::{
    accept::{Accept, AcceptOk, TypeName},
    coalesce::Coalesce,
    future::ResponseFuture,
    launch::{AnyRequest, Eligible, Launch, Settings},
    refill::{NoRefill, Refill},
};
use std::{
    fmt,
    task::{Context, Poll},
};
use tower_service::Service;

/// Serves requests from a primary service, with a fallback service started alongside.
///
/// Each request goes to the primary, and a clone of it to the fallback, at the same
/// time. The primary's result is judged by the [`Accept`](crate::accept::Accept)
/// predicate (by default [`AcceptOk`]) the moment it arrives:
///
/// - **accepted**: the fallback's future — or its pending readiness — is dropped and
///   the primary's result is returned. A hit costs only the primary.
/// - **rejected**: the fallback's result is returned, `Ok` or `Err`. A miss costs the
///   slower of the two branches, not their sum.
///
/// If the fallback answers first, its result is held and the primary is still awaited:
/// the primary is preferred.
///
/// # Readiness
///
/// [`poll_ready`](Service::poll_ready) reflects the primary alone. The fallback is
/// cloned into each response future and driven to readiness there, the way
/// [`tower::util::Oneshot`] does, so a saturated fallback never delays readiness or an
/// accepted answer. A fallback that never becomes ready delays only requests whose
/// primary answer is rejected; bound those with a timeout around this service.
///
/// # Load
///
/// Under the default [`Launch::Concurrent`], every request whose primary does not
/// answer on its first poll starts a fallback call: the fallback sees one call per
/// request — up to twice the load it would see behind a sequential fallback — most of
/// them dropped in flight when the primary is accepted. The other policies in
/// [`launch`](crate::launch), a budget and [`speculate_if`](Fallback::speculate_if)
/// bound that extra load.
///
/// # Misuse
///
/// As with any tower service, `call` must follow a successful `poll_ready`; this
/// service passes `call` on to the primary as is, so what happens otherwise is up to
/// the primary (tower's `ConcurrencyLimit`, for one, panics).
///
/// # Panics
///
/// Besides a response future polled after it finished (or was poisoned, below), this
/// service panics only where user code it runs panics; that panic propagates to the
/// caller, and the counters, the budget and the outcome stay true:
///
/// - **In `call`** — the [`speculate_if`](Fallback::speculate_if) predicate, the
///   [`refill`](Fallback::refill) action's `key` and `clone`, the request's `clone`,
///   the fallback's and the predicate's `clone`, then the primary's `call`, in that
///   order (so a panicking clone leaves the primary uncalled): the
///   request leaves no trace. Nothing is deposited in the budget, and no outcome is
///   reported or counted; there was no request. (The deposit is made at the response
///   future's first poll: a budget of your own whose `deposit` panics poisons the
///   future, as below.)
/// - **In the response future** — either branch's future, the fallback's `poll_ready`
///   or `call`, the [`Accept`](crate::accept::Accept) predicate, the refill action's
///   `refill`, a branch's `drop`: the
///   panic propagates out of `poll` and poisons the future. Polling it again panics
///   with "`ResponseFuture` polled after it panicked": a poisoned future never serves
///   an answer. Dropping it drops both branches and reports the request as
///   [`Served::Abandoned`](crate::outcome::Served::Abandoned) (one request, one
///   abandoned in [`Stats`](crate::outcome::Stats)), with the fallback's
///   [`Fate`](crate::outcome::Fate) as far as it got and the primary's
///   [`Verdict`](crate::outcome::Verdict) as follows:
///   - the primary's future panicked: `Pending`, with no primary latency;
///   - the predicate panicked on the primary's answer: `Panicked`, with the primary's
///     latency — it did answer;
///   - the fallback's `poll_ready` panicked: its fate is `DroppedBeforeReady`; its
///     `call` or its future panicked: `DroppedInFlight` (a `call` is counted as made
///     even if it panics);
///   - the refill action's `refill` panicked: `Rejected`, and the fallback's fate is
///     `Discarded` (its answer was dropped unserved); no refill is counted.
///
///   The fallback launch, if any, is counted as made, and its budget withdrawal stays
///   spent; an adaptive launch keeps the primary's latency as a sample if it answered,
///   and as a lower bound if not.
/// - **In the outcome hook** ([`on_outcome`](Fallback::on_outcome)) — it runs after
///   the outcome was counted in `Stats`, `metrics` and `tracing`, so those stay true,
///   and the request is never reported twice; the answer being served is dropped, and
///   the future is poisoned as above. A hook that panics while the future is dropped
///   as part of unwinding from another panic aborts the process: the hook must not
///   panic.
///
/// The service itself, its clones, and every other request are unaffected.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
/// use tower_backstop::FallbackLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cache = service_fn(|key: u32| async move {
///     Ok::<_, Infallible>(if key % 2 == 0 { Some(format!("cached {key}")) } else { None })
/// });
/// let db = service_fn(|key: u32| async move { Ok::<_, Infallible>(Some(format!("row {key}"))) });
///
/// let mut svc = ServiceBuilder::new()
///     .layer(FallbackLayer::new(db).accept(|r: &Result<Option<String>, Infallible>| {
///         matches!(r, Ok(Some(_)))
///     }))
///     .service(cache);
///
/// let hit = svc.ready().await.unwrap().call(2).await.unwrap();
/// assert_eq!(hit.as_deref(), Some("cached 2"));
/// let miss = svc.ready().await.unwrap().call(3).await.unwrap();
/// assert_eq!(miss.as_deref(), Some("row 3"));
/// # }
/// ```
///
/// [`tower::util::Oneshot`]: https://docs.rs/tower/latest/tower/util/struct.Oneshot.html
#[derive(Clone)]
pub struct Fallback<P, F, A = AcceptOk, S = AnyRequest, R = NoRefill> {
    primary: P,
    fallback: F,
    accept: A,
    eligible: S,
    refill: R,
    settings: Settings,
}

impl<P, F> Fallback<P, F> {
    /// Creates a service that serves from `primary` and falls back to `fallback`,
    /// accepting any `Ok` from the primary and starting both at once.
    pub fn new(primary: P, fallback: F) -> Self {
        Fallback::from_parts(
            primary,
            fallback,
            AcceptOk,
            AnyRequest,
            NoRefill,
            Settings::default(),
        )
    }
}

impl<P, F, A, S, R> Fallback<P, F, A, S, R> {
    pub(crate) const fn from_parts(
        primary: P,
        fallback: F,
        accept: A,
        eligible: S,
        refill: R,
        settings: Settings,
    ) -> Self {
        Fallback {
            primary,
            fallback,
            accept,
            eligible,
            refill,
            settings,
        }
    }

    /// Rebuilds the service with its branches replaced by `f(primary, fallback)`;
    /// the configuration is kept.
    #[cfg(all(feature = "http", feature = "time"))]
    pub(crate) fn map_branches<P2, F2>(
        self,
        f: impl FnOnce(P, F) -> (P2, F2),
    ) -> Fallback<P2, F2, A, S, R> {
        let (primary, fallback) = f(self.primary, self.fallback);
        Fallback::from_parts(
            primary,
            fallback,
            self.accept,
            self.eligible,
            self.refill,
            self.settings,
        )
    }

    /// Replaces the predicate that decides whether the primary's result stands.
    ///
    /// A closure needs its argument's type written out, `|r: &Result<T, E>| ..`; see
    /// [`FallbackLayer::accept`](crate::FallbackLayer::accept) for the errors rustc
    /// gives without it. The predicate sees the primary's whole `Result`; anything it rejects is replaced
    /// by the fallback's result. The default, [`AcceptOk`], accepts every `Ok`.
    pub fn accept<A2>(self, accept: A2) -> Fallback<P, F, A2, S, R> {
        Fallback::from_parts(
            self.primary,
            self.fallback,
            accept,
            self.eligible,
            self.refill,
            self.settings,
        )
    }

    /// Makes concurrent fallback calls with equal keys share one call, wrapping the
    /// fallback in a [`Coalesce`] whose calls in flight every clone of this service
    /// shares. Default: off.
    ///
    /// **The key must hold everything that varies the answer**, or one caller's answer
    /// is handed to another (with `Authorization` or `Cookie`, a data leak); the
    /// refill runs at most once per shared call. See
    /// [`FallbackLayer::coalesce_by`](crate::FallbackLayer::coalesce_by) for the whole
    /// contract, and the [`coalesce`](crate::coalesce) module.
    pub fn coalesce_by<K>(mut self, key: K) -> Fallback<P, Coalesce<F, K>, A, S, R> {
        let fallback = Coalesce::new(self.fallback, key);
        self.settings.set_coalesce(fallback.registry().clone());
        Fallback::from_parts(
            self.primary,
            fallback,
            self.accept,
            self.eligible,
            self.refill,
            self.settings,
        )
    }

    /// Sets when the fallback starts. Default: [`Launch::Concurrent`], with the primary.
    ///
    /// See the [`launch`](crate::launch) module for what each policy costs in extra
    /// fallback load and saves in latency.
    pub fn launch(mut self, launch: Launch) -> Self {
        self.settings.set_launch(launch);
        self
    }

    /// Caps speculative launches — fallback calls started before the primary was
    /// rejected — with a [`Budget`](crate::budget::Budget), such as
    /// [`TpsBudget`](crate::budget::TpsBudget). Default: no cap.
    ///
    /// Every request deposits, at the first poll of its response future (one dropped
    /// unpolled deposits nothing); every speculative launch withdraws. A refused withdrawal
    /// makes that request sequential: its fallback still starts if the primary is
    /// rejected. The budget is shared by all clones of this service.
    ///
    /// Available with the `budget` feature.
    #[cfg(feature = "budget")]
    #[cfg_attr(docsrs, doc(cfg(feature = "budget")))]
    pub fn budget<B>(self, budget: B) -> Self
    where
        B: tower::retry::budget::Budget + Send + Sync + 'static,
    {
        self.shared_budget(std::sync::Arc::new(budget))
    }

    /// Like [`budget`](Fallback::budget), with a budget you keep a handle to: to share
    /// one budget between several layers, or to read it.
    ///
    /// Available with the `budget` feature.
    #[cfg(feature = "budget")]
    #[cfg_attr(docsrs, doc(cfg(feature = "budget")))]
    pub fn shared_budget<B>(mut self, budget: std::sync::Arc<B>) -> Self
    where
        B: tower::retry::budget::Budget + Send + Sync + 'static,
    {
        self.settings.set_budget(budget);
        self
    }

    /// Caps the speculative fallback calls in flight at once — across every clone of
    /// this service — at `max`. Default: no cap.
    ///
    /// A speculative call holds its slot from its launch until it is speculative no
    /// more: the primary answers (accepted, the call is dropped; rejected, it is a
    /// miss's call), the fallback answers first, or the response future is dropped. A
    /// request that finds every slot taken is served sequentially, as a budget refusal
    /// does (its outcome says [`Launched::LimitReached`](crate::launch::Launched::LimitReached),
    /// and [`Snapshot::speculation_limited`](crate::outcome::Snapshot::speculation_limited)
    /// counts it): its fallback starts only if the primary is rejected. The refusal is
    /// final for that request — a slot freed a moment later does not start its
    /// fallback early — as a budget's is.
    ///
    /// Where a budget bounds speculation's *rate*, this bounds what speculation holds
    /// of the fallback *at once* — pooled connections, server time — so that calls
    /// started for what turn out to be hits cannot crowd out the calls misses need.
    /// Size it below the fallback's pool: with a pool of `n` connections, `max` of
    /// `n / 2` or less leaves the rest to misses (`docs/redis-postgres.md` measures
    /// this). `0` never speculates. Costs every request that may speculate a pooled
    /// cold part holding a clone of the limit's handle (a reference-count increment and
    /// decrement), and a speculative launch one atomic read-modify-write more to take
    /// its slot and one to give it back. Requests that may not speculate
    /// ([`speculate_if`](Fallback::speculate_if)) pay nothing.
    pub fn max_speculative(mut self, max: usize) -> Self {
        self.settings.set_max_speculative(max);
        self
    }

    /// Lets only the requests `eligible` approves start their fallback speculatively;
    /// the others are served sequentially. Default: [`AnyRequest`], every request.
    ///
    /// A closure needs its argument's type written out, `|req: &Req| ..`; see
    /// [`FallbackLayer::speculate_if`](crate::FallbackLayer::speculate_if) for the
    /// error rustc gives without it, and for ready-made HTTP predicates.
    ///
    /// Use it to keep requests that must not run twice (writes, non-idempotent calls)
    /// from reaching the fallback unless the primary has been rejected.
    pub fn speculate_if<S2>(self, eligible: S2) -> Fallback<P, F, A, S2, R> {
        Fallback::from_parts(
            self.primary,
            self.fallback,
            self.accept,
            eligible,
            self.refill,
            self.settings,
        )
    }

    /// Writes the fallback's answer back after a miss with `refill`, a
    /// [`Refill`](crate::refill::Refill) action or a closure
    /// `FnMut(Req, &Res) -> Result<Write, E>` ([`Write`](crate::refill::Write)). Default:
    /// [`NoRefill`], which keeps nothing
    /// and costs nothing.
    ///
    /// `call` asks the action for the request's [`key`](crate::refill::Refill::key)
    /// (`None`: this request is never refilled), and the response future keeps it, with
    /// a clone of the action. The action's [`refill`](crate::refill::Refill::refill)
    /// runs once, with that key and the response, when the fallback's `Ok` answer is
    /// served **because the primary's answer was rejected** — a miss — just before
    /// the response is returned. It is not called after a hit, for an answer served
    /// because the `patience` bound (`time` feature) ran out (the primary never
    /// said it missed), for an `Err` (the fallback's, or its readiness error), or for a
    /// request abandoned before it finished.
    ///
    /// The response waits for the action, so it **must not block**: start the write
    /// (spawn a task, send on a channel) and return `Ok(Write::Started)`, or
    /// `Ok(Write::Skipped)` for an answer with nothing to write; the two are counted
    /// apart ([`Snapshot::refills`](crate::outcome::Snapshot::refills),
    /// [`refills_skipped`](crate::outcome::Snapshot::refills_skipped)). A spawned write
    /// that fails later can be counted with
    /// [`Stats::refill_write_failed`](crate::outcome::Stats::refill_write_failed). An
    /// error the action returns is counted
    /// ([`Snapshot::refill_failures`](crate::outcome::Snapshot::refill_failures),
    /// [`Outcome::refill`](crate::outcome::Outcome::refill)) and dropped: it never fails
    /// the request or changes its answer. A panic in `key` happens in `call` and leaves
    /// no trace; a panic in `refill` poisons the response future (see
    /// [panics](Fallback#panics)).
    ///
    /// ```
    /// use std::{convert::Infallible, sync::mpsc};
    /// use tower::{service_fn, ServiceExt};
    /// use tower_backstop::{refill::Write, Fallback};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let cache = service_fn(|_key: u32| async { Ok::<_, Infallible>(None::<String>) });
    /// let db = service_fn(|key: u32| async move { Ok::<_, Infallible>(Some(format!("row {key}"))) });
    ///
    /// // A channel to a task that writes into the cache: sending does not block.
    /// let (writes, written) = mpsc::channel();
    /// let svc = Fallback::new(cache, db)
    ///     .accept(|r: &Result<Option<String>, Infallible>| matches!(r, Ok(Some(_))))
    ///     .refill(move |key: u32, row: &Option<String>| match row {
    ///         Some(row) => writes.send((key, row.clone())).map(|()| Write::Started),
    ///         None => Ok(Write::Skipped), // nothing to cache
    ///     });
    ///
    /// let row = svc.oneshot(7).await.unwrap();
    /// assert_eq!(row.as_deref(), Some("row 7"));
    /// assert_eq!(written.recv().unwrap(), (7, "row 7".to_owned()));
    /// # }
    /// ```
    pub fn refill<R2>(self, refill: R2) -> Fallback<P, F, A, S, R2> {
        Fallback::from_parts(
            self.primary,
            self.fallback,
            self.accept,
            self.eligible,
            refill,
            self.settings,
        )
    }

    /// Bounds how long a successful fallback answer waits for the primary.
    /// Default: no bound — the primary is preferred and always awaited.
    ///
    /// When the fallback answers `Ok` while the primary is still pending, the primary
    /// gets `patience` more; if it has not answered by then, the fallback's answer is
    /// served and the primary's future is dropped. A fallback error never cuts the
    /// primary short.
    ///
    /// Like a launch delay, the bound runs on tokio's timer, which fires on
    /// whole-millisecond ticks: the primary gets at least `patience`, and up to about
    /// 1 ms more (a sub-millisecond patience waits for the next tick).
    ///
    /// Available with the `time` feature (on by default).
    #[cfg(feature = "time")]
    #[cfg_attr(docsrs, doc(cfg(feature = "time")))]
    pub fn patience(mut self, patience: std::time::Duration) -> Self {
        self.settings.set_patience(patience);
        self
    }

    /// Calls `hook` with the [`Outcome`](crate::outcome::Outcome) of every request this
    /// service (or a clone) finishes, abandoned ones included. Default: no hook.
    ///
    /// The hook runs inside the response future's `poll` (or its drop, for an abandoned
    /// request), after the branch that was not served has been dropped, so it should be
    /// quick and must not panic (see [panics](Fallback#panics) for what happens if it
    /// does). There is one hook: calling this again replaces it.
    ///
    /// A hook times every request (the latencies in its `Outcome`): two clock readings
    /// for a request answered on its first poll, on the clock
    /// [`latency_clock`](Fallback::latency_clock) chooses. Without a hook, `metrics` or
    /// a listening `tracing` subscriber, nothing is timed.
    pub fn on_outcome<H>(mut self, hook: H) -> Self
    where
        H: Fn(&crate::outcome::Outcome) + Send + Sync + 'static,
    {
        self.settings.observers_mut().hook = Some(std::sync::Arc::new(hook));
        self
    }

    /// Reads the latencies observers get — an [`Outcome`](crate::outcome::Outcome)'s,
    /// the `metrics` histograms', the `tracing` span's — from `clock`. Default:
    /// [`LatencyClock::Monotonic`](crate::outcome::LatencyClock::Monotonic), which
    /// follows tokio's paused clock in tests.
    ///
    /// The clock readings are most of what a hook costs: with `LatencyClock::Tsc` (the
    /// `quanta` feature) a hook costs about 40 % less over an unobserved request (see
    /// `docs/overhead.md`), but its latencies no longer follow a paused clock. Choosing
    /// `Tsc` calibrates the counter here, once per process, rather than on the first
    /// request. Without an observer the clock is never read, whatever it is.
    pub fn latency_clock(mut self, clock: crate::outcome::LatencyClock) -> Self {
        self.settings.set_clock(clock);
        self
    }

    /// Counts every request's outcome into `stats`, a shared handle that can be read
    /// anywhere. Default: no counting.
    ///
    /// Counting reads no clock: one atomic add per request.
    pub fn stats(mut self, stats: crate::outcome::Stats) -> Self {
        self.settings.observers_mut().stats = Some(stats);
        self.settings.share_observers();
        self
    }

    /// Reports every request's outcome through the [`metrics`] facade, labelled
    /// `layer = name`. Default: off.
    ///
    /// Counters: `backstop_requests_total{served}`, `backstop_fallback_total{fate}`,
    /// `backstop_fallback_launches_total{launched}`, `backstop_budget_refusals_total`,
    /// `backstop_fallback_first_total`, `backstop_refills_total{result}`,
    /// `backstop_abandoned_unpolled_total`, `backstop_speculation_limited_total`; with
    /// [`coalesce_by`](Fallback::coalesce_by), `backstop_coalesce_joined_total` and
    /// `backstop_coalesce_calls_total{end}` (`answered`, `dropped`, `panicked`);
    /// histograms (seconds):
    /// `backstop_primary_latency_seconds`, `backstop_fallback_latency_seconds`. The
    /// handles are registered here, once: install the metrics recorder before calling
    /// this.
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

    /// Returns a reference to the primary service.
    pub fn get_ref(&self) -> &P {
        &self.primary
    }

    /// Returns a mutable reference to the primary service.
    pub fn get_mut(&mut self) -> &mut P {
        &mut self.primary
    }

    /// Returns a reference to the fallback service.
    pub fn fallback_ref(&self) -> &F {
        &self.fallback
    }

    /// Returns a mutable reference to the fallback service.
    pub fn fallback_mut(&mut self) -> &mut F {
        &mut self.fallback
    }

    /// Returns a reference to the accept predicate.
    pub fn accept_ref(&self) -> &A {
        &self.accept
    }

    /// Returns a reference to the refill action.
    pub fn refill_ref(&self) -> &R {
        &self.refill
    }

    /// Consumes `self`, returning the primary service.
    pub fn into_inner(self) -> P {
        self.primary
    }

    /// Consumes `self`, returning the primary and the fallback services.
    pub fn into_parts(self) -> (P, F) {
        (self.primary, self.fallback)
    }
}

impl<P, F, A, S, R, Req> Service<Req> for Fallback<P, F, A, S, R>
where
    P: Service<Req>,
    F: Service<Req, Response = P::Response, Error = P::Error> + Clone,
    A: Accept<P::Response, P::Error> + Clone,
    S: Eligible<Req>,
    R: Refill<Req, P::Response> + Clone,
    Req: Clone,
{
    type Response = P::Response;
    type Error = P::Error;
    type Future = ResponseFuture<P::Future, F, Req, A, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.primary.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // CORRECTNESS: all the user code `call` runs comes first — the clones before the
        // primary's `call`, so that a panicking clone leaves the primary uncalled — and
        // only then is the request planned (an outcome tracker; the budget deposit is made
        // at the first poll). A panic here thus leaves no trace: nothing deposited,
        // counted or reported.
        let eligible = self.eligible.eligible(&req);
        // Only a request that may be refilled holds a clone of the refill action.
        let refill = match self.refill.key(&req) {
            Some(key) => Some((self.refill.clone(), key)),
            None => None,
        };
        let fallback_req = req.clone();
        // The fallback's clone is readied inside the future, never here: `self.fallback`
        // itself is never polled for readiness, so every clone starts out un-readied and
        // is driven to readiness before it is called.
        let fallback = self.fallback.clone();
        let accept = self.accept.clone();
        let primary = self.primary.call(req);
        ResponseFuture::new(
            primary,
            fallback,
            fallback_req,
            accept,
            refill,
            &self.settings,
            eligible,
        )
    }
}

impl<P, F, A, S, R> fmt::Debug for Fallback<P, F, A, S, R>
where
    P: fmt::Debug,
    F: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("primary", &self.primary)
            .field("fallback", &self.fallback)
            .field("accept", &TypeName::of(&self.accept))
            .field("eligible", &TypeName::of(&self.eligible))
            .field("refill", &TypeName::of(&self.refill))
            .field("settings", &self.settings)
            .finish()
    }
}
