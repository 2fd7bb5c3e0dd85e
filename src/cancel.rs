//! Cancelling the work behind a call when its response future is dropped unanswered.
//!
//! When [`Fallback`](crate::Fallback) serves the primary's answer it drops the
//! fallback's future on the spot. Dropping a future stops the *client*; it does not
//! stop the *server*: a PostgreSQL query keeps running, holding its backend (and the
//! pooled connection that leads to it) until it ends. Stopping it takes an action of
//! its own — for PostgreSQL a cancel request on a side connection — and that action
//! needs a per-call handle that often exists only midway through the call (the
//! connection a pool hands out, its `CancelToken`).
//!
//! This module runs such an action, with nothing allocated and no task spawned by the
//! crate:
//!
//! - [`Slot`] is a place, owned by the call's future, that the call **fills** with its
//!   handle once it has one. If the call's future is dropped from outside while the
//!   slot is filled — mid-call: by `Fallback` on a cache hit, by a timeout, by a client
//!   that went away — the slot hands the handle to its [`Cancel`] action.
//! - [`OnCancel`] (built by [`OnCancelLayer`]) wraps a service and gives every call a
//!   fresh, empty slot carrying the layer's action, next to the request: the inner
//!   service takes `(Req, Slot<H, C>)` and the wrapper takes `Req`, so it fits where
//!   the plain service did — as the fallback of a [`FallbackLayer`](crate::FallbackLayer).
//!
//! **A call that answered never runs its action**, whatever its code forgot: a slot
//! dropped by its own call's code — the call ran to its end, or returned early with
//! `?` — lets its handle go unused. [`OnCancel`]'s [`ResponseFuture`] marks the call as
//! running (in a thread-local) while its `call` and each poll run, and the slot checks
//! the mark when it is dropped. [`disarm`](Slot::disarm) is still there, to release the
//! handle *early*: before the call's end, once the work it would cancel is over.
//!
//! A slot costs its handle, one clone of the action, a call id (8 bytes) and, with
//! [`OnCancelLayer::stats`], a clone of the [`Stats`] handle; a call costs a few
//! thread-local reads and writes more, no atomic operation and no allocation. The
//! action runs inside `drop`, so it must not block or panic: start the cancellation
//! (spawn a task, send on a channel) and return. Each action run is counted in
//! [`Snapshot::cancels`](crate::outcome::Snapshot::cancels) of the layer's [`Stats`].
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_backstop::{cancel::{OnCancelLayer, Slot}, outcome::Stats};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // The action: here it only reports which query to stop; a real one would send the
//! // server's cancel request (see `examples/redis-postgres` for PostgreSQL).
//! let (tx, mut cancelled) = tokio::sync::mpsc::unbounded_channel::<u64>();
//! let cancel = move |query_id: u64| {
//!     let _ = tx.send(query_id);
//! };
//!
//! let stats = Stats::new();
//! let db = ServiceBuilder::new()
//!     .layer(OnCancelLayer::new(cancel).stats(stats.clone()))
//!     .service(service_fn(|(key, mut slot): (u64, Slot<u64, _>)| async move {
//!         // Once the call knows its handle, it fills the slot...
//!         slot.fill(key * 1000);
//!         tokio::time::sleep(Duration::from_millis(10 * key)).await;
//!         // ...and when it answers, the slot lets the handle go: no `disarm` needed.
//!         Ok::<_, Infallible>(key)
//!     }));
//!
//! // Completed: nothing is cancelled.
//! assert_eq!(db.clone().oneshot(1).await, Ok(1));
//! // Dropped mid-call (by a timeout here, by `Fallback` on a cache hit): cancelled.
//! let slow = tokio::time::timeout(Duration::from_millis(5), db.oneshot(2)).await;
//! assert!(slow.is_err());
//! assert_eq!(cancelled.recv().await, Some(2000));
//! assert_eq!(stats.snapshot().cancels, 1);
//! # }
//! ```
//!
//! # When the action runs
//!
//! A slot filled and dropped runs its action, once, unless its own call's code drops
//! it. In detail:
//!
//! - **The call's future is dropped** before it answered, from outside its poll (by
//!   `Fallback`, a timeout, `select!`, `JoinHandle::abort`, a runtime shutting down,
//!   on this thread or another): the action runs. A future dropped before its first
//!   poll runs it only if the service's `call` filled the slot already.
//! - **The call answered**, `Ok` or `Err`, or returned early with `?`: its code dropped
//!   the slot while the call was running, and nothing runs. Dropping the slot from the
//!   call's own code is a release, as [`disarm`](Slot::disarm) is.
//! - **A poll panicked**: the call did not answer and its work may still be running,
//!   so the action runs (while the panic unwinds, or when the future is dropped).
//! - **Nested calls**: an `OnCancel` call made inside another one's poll marks itself
//!   while it runs and restores its caller's mark after; a call whose future its
//!   caller drops mid-way is cancelled like any other.
//! - **A slot moved out of its call's future** (into a spawned task, or a response;
//!   also a service that spawns the future its `call` returns) is dropped outside its
//!   call: it runs its action if still filled. Keep the slot in the call's future,
//!   polled through `OnCancel`'s, or disarm it before moving it.
//! - **The call's own code gives up on the work** (its own timeout, a `select!` that
//!   drops the query) and then answers: the slot cannot tell that from a query that
//!   finished, and runs nothing. Call [`Slot::cancel`] before answering.
//! - **A slot made by hand** with [`Slot::new`] belongs to no call: dropped filled, it
//!   always runs its action (and counts nowhere).
//!
//! # Choosing the handle
//!
//! Fill the slot with whatever the action needs *and* whatever must not be reused
//! before the cancellation is over. For a pooled PostgreSQL connection that is the
//! pooled connection itself, not only its cancel token: a cancel request reaches the
//! backend, not the query, so a connection handed back to the pool at once could have
//! the *next* query cancelled in its place. With the connection in the slot, the
//! action can send the cancel request, wait for the backend to be idle, and only then
//! let the connection go back to the pool.

mod call;
mod future;

pub use self::future::ResponseFuture;

use self::call::{CallId, Running};
use crate::outcome::Stats;
use std::{fmt, marker::PhantomData, task};
use tower_layer::Layer;
use tower_service::Service;

/// An action that cancels the work behind a call, given the call's handle.
///
/// Run by a [`Slot`] dropped while filled from outside its call (or by
/// [`Slot::cancel`]), inside `drop`: it must not block, and it
/// should not panic (a panic while the future is dropped during unwinding aborts).
/// Implemented for every `FnOnce(H)`; an action that must run more than once is cloned
/// into each slot.
pub trait Cancel<H> {
    /// Starts cancelling the work `handle` stands for.
    fn cancel(self, handle: H);
}

impl<H, F> Cancel<H> for F
where
    F: FnOnce(H),
{
    fn cancel(self, handle: H) {
        self(handle)
    }
}

/// A per-call place for the handle its cancel action needs.
///
/// Empty when created. [`fill`](Slot::fill) it once the call has its handle. Dropped
/// while filled by anything but its own call's code — the call's future was dropped
/// mid-call — it runs its action with the handle; dropped empty, or by its own call's
/// code (the call answered, or returned early), it does nothing. See [when the action
/// runs](self#when-the-action-runs).
///
/// Keep the slot in the call's future (move it into the `async` block) so that it is
/// dropped when the future is. [`disarm`](Slot::disarm) releases the handle early:
/// once the work it would cancel is over but the call goes on (parsing the rows, say),
/// so that a drop from then on cancels nothing, and the handle (a pooled connection)
/// can go back where it came from at once:
///
/// ```
/// # use tower_backstop::cancel::Slot;
/// # async fn query(_: &mut u32) -> Result<u32, ()> { Ok(1) }
/// # async fn parse(_: u32) -> Result<u32, ()> { Ok(1) }
/// # async fn call(mut slot: Slot<u32, fn(u32)>) -> Result<u32, ()> {
/// let conn = slot.fill(7);
/// let rows = query(conn).await?; // dropped here: cancelled; `?` here: not
/// slot.disarm(); // the query is over: the connection goes back now
/// parse(rows).await // dropped here: nothing to cancel
/// # }
/// ```
pub struct Slot<H, C>
where
    C: Cancel<H>,
{
    handle: Option<H>,
    action: Option<C>,
    /// The call the slot belongs to, `NONE` for a slot made by hand.
    call: CallId,
    /// Where an action run is counted.
    stats: Option<Stats>,
}

impl<H, C> Slot<H, C>
where
    C: Cancel<H>,
{
    /// An empty slot, made by hand, that will run `action` if dropped while filled.
    ///
    /// It belongs to no call, so it cannot tell its call's code from the outside:
    /// dropped filled, it **always** runs its action, and it counts the run nowhere.
    /// [`OnCancel`] makes the slots that know their call.
    pub fn new(action: C) -> Self {
        Slot::for_call(action, CallId::NONE, None)
    }

    fn for_call(action: C, call: CallId, stats: Option<Stats>) -> Self {
        Slot {
            handle: None,
            action: Some(action),
            call,
            stats,
        }
    }

    /// Puts the call's handle in the slot, arming it, and returns it for use.
    ///
    /// A handle already in the slot is dropped without running the action.
    pub fn fill(&mut self, handle: H) -> &mut H {
        self.handle.insert(handle)
    }

    /// Takes the handle back early: the work is over and must not be cancelled.
    ///
    /// Not needed at the call's end (a slot its own call drops runs nothing); useful to
    /// release the handle before it, or before moving the slot out of the call.
    /// Returns `None` if the slot was empty. The slot can be filled again.
    pub fn disarm(&mut self) -> Option<H> {
        self.handle.take()
    }

    /// The handle, if the slot is filled.
    pub fn get(&self) -> Option<&H> {
        self.handle.as_ref()
    }

    /// The handle, mutably, if the slot is filled.
    pub fn get_mut(&mut self) -> Option<&mut H> {
        self.handle.as_mut()
    }

    /// Whether the slot is filled: dropping it from outside its call would run the
    /// action.
    pub fn is_armed(&self) -> bool {
        self.handle.is_some()
    }

    /// Runs the action now if the slot is filled, whoever calls it.
    ///
    /// Returns whether the action ran (and was counted). Either way the slot is spent:
    /// it will never run its action again, and filling it again only holds the handle.
    pub fn cancel(&mut self) -> bool {
        match (self.handle.take(), self.action.take()) {
            (Some(handle), Some(action)) => {
                if let Some(stats) = &self.stats {
                    stats.count_cancel();
                }
                action.cancel(handle);
                true
            }
            _ => false,
        }
    }
}

impl<H, C> Drop for Slot<H, C>
where
    C: Cancel<H>,
{
    fn drop(&mut self) {
        // CORRECTNESS: dropped by its own call's code (the call answered, or returned
        // early), the work is over whatever that code forgot: the handle goes unused.
        // A panic unwinding out of the call is no answer: the work may still run.
        if self.handle.is_some() && self.call.is_running() && !std::thread::panicking() {
            return;
        }
        self.cancel();
    }
}

impl<H, C> fmt::Debug for Slot<H, C>
where
    C: Cancel<H>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("armed", &self.is_armed())
            .field("handle", &format_args!("{}", std::any::type_name::<H>()))
            .field("action", &format_args!("{}", std::any::type_name::<C>()))
            .field("counted", &self.stats.is_some())
            .finish()
    }
}

/// Gives every call of the inner service an empty [`Slot`] carrying a cancel action.
///
/// The inner service is a `Service<(Req, Slot<H, C>)>`; `OnCancel` is a
/// `Service<Req>` with the same response and error types. Its future,
/// [`ResponseFuture`], is the inner future marked as its call's own while it runs, so
/// that the call's slot runs its action only when the call is dropped unanswered. See
/// the [module docs](self).
pub struct OnCancel<S, C, H> {
    inner: S,
    action: C,
    stats: Option<Stats>,
    _handle: PhantomData<fn(H)>,
}

impl<S, C, H> OnCancel<S, C, H> {
    /// Wraps `inner`, giving each of its calls a slot that runs `action`.
    pub fn new(inner: S, action: C) -> Self {
        OnCancel {
            inner,
            action,
            stats: None,
            _handle: PhantomData,
        }
    }

    /// Counts every cancel action its slots run into `stats`, in
    /// [`Snapshot::cancels`](crate::outcome::Snapshot::cancels). Default: not counted.
    ///
    /// Give it the handle the [`Fallback`](crate::Fallback) in front counts into, to
    /// read both in one snapshot. Each call's slot holds a clone of the handle: one
    /// reference-count increment and decrement per call, and one atomic add per action
    /// run.
    pub fn stats(mut self, stats: Stats) -> Self {
        self.stats = Some(stats);
        self
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, C, H, Req> Service<Req> for OnCancel<S, C, H>
where
    S: Service<(Req, Slot<H, C>)>,
    C: Cancel<H> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut task::Context<'_>) -> task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let call = CallId::new();
        let slot = Slot::for_call(self.action.clone(), call, self.stats.clone());
        // The inner `call` is the call's own code too: a slot it fills and drops there
        // was not dropped from outside.
        let inner = {
            let _running = Running::enter(call);
            self.inner.call((req, slot))
        };
        ResponseFuture::new(inner, call)
    }
}

impl<S: Clone, C: Clone, H> Clone for OnCancel<S, C, H> {
    fn clone(&self) -> Self {
        OnCancel {
            inner: self.inner.clone(),
            action: self.action.clone(),
            stats: self.stats.clone(),
            _handle: PhantomData,
        }
    }
}

impl<S: fmt::Debug, C, H> fmt::Debug for OnCancel<S, C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnCancel")
            .field("inner", &self.inner)
            .field("action", &format_args!("{}", std::any::type_name::<C>()))
            .field("stats", &self.stats)
            .finish()
    }
}

/// Wraps a service in [`OnCancel`], with a cancel action.
///
/// The action is cloned into every call's [`Slot`]: give a closure that captures
/// cheap handles (an `Arc`, a channel sender, a pool), or none.
pub struct OnCancelLayer<C, H> {
    action: C,
    stats: Option<Stats>,
    _handle: PhantomData<fn(H)>,
}

impl<C, H> OnCancelLayer<C, H> {
    /// A layer whose services run `action` for each call dropped while its slot is filled.
    pub fn new(action: C) -> Self {
        OnCancelLayer {
            action,
            stats: None,
            _handle: PhantomData,
        }
    }

    /// Counts every cancel action run into `stats`: see [`OnCancel::stats`].
    /// Default: not counted.
    pub fn stats(mut self, stats: Stats) -> Self {
        self.stats = Some(stats);
        self
    }
}

impl<S, C: Clone, H> Layer<S> for OnCancelLayer<C, H> {
    type Service = OnCancel<S, C, H>;

    fn layer(&self, inner: S) -> Self::Service {
        OnCancel {
            inner,
            action: self.action.clone(),
            stats: self.stats.clone(),
            _handle: PhantomData,
        }
    }
}

impl<C: Clone, H> Clone for OnCancelLayer<C, H> {
    fn clone(&self) -> Self {
        OnCancelLayer {
            action: self.action.clone(),
            stats: self.stats.clone(),
            _handle: PhantomData,
        }
    }
}

impl<C, H> fmt::Debug for OnCancelLayer<C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnCancelLayer")
            .field("action", &format_args!("{}", std::any::type_name::<C>()))
            .field("stats", &self.stats)
            .finish()
    }
}
