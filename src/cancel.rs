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
//!   handle once it has one, and **disarms** (taking the handle back) once the work it
//!   would cancel has finished. A slot dropped while filled — the future was dropped
//!   mid-call — hands the handle to its [`Cancel`] action.
//! - [`OnCancel`] (built by [`OnCancelLayer`]) wraps a service and gives every call a
//!   fresh, empty slot carrying the layer's action, next to the request: the inner
//!   service takes `(Req, Slot<H, C>)` and the wrapper takes `Req`, so it fits where
//!   the plain service did — as the fallback of a [`FallbackLayer`](crate::FallbackLayer).
//!
//! A slot costs one `Option<H>` and one clone of the action in the call's future; a
//! call that disarms its slot runs nothing more. The action runs inside `drop`, so it
//! must not block or panic: start the cancellation (spawn a task, send on a channel)
//! and return.
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_backstop::cancel::{OnCancelLayer, Slot};
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
//! let db = ServiceBuilder::new()
//!     .layer(OnCancelLayer::new(cancel))
//!     .service(service_fn(|(key, mut slot): (u64, Slot<u64, _>)| async move {
//!         // Once the call knows its handle, it fills the slot...
//!         slot.fill(key * 1000);
//!         tokio::time::sleep(Duration::from_millis(10 * key)).await;
//!         // ...and disarms it when the work it would cancel is over.
//!         slot.disarm();
//!         Ok::<_, Infallible>(key)
//!     }));
//!
//! // Completed: nothing is cancelled.
//! assert_eq!(db.clone().oneshot(1).await, Ok(1));
//! // Dropped mid-call (by a timeout here, by `Fallback` on a cache hit): cancelled.
//! let slow = tokio::time::timeout(Duration::from_millis(5), db.oneshot(2)).await;
//! assert!(slow.is_err());
//! assert_eq!(cancelled.recv().await, Some(2000));
//! # }
//! ```
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

use std::{fmt, marker::PhantomData, task};
use tower_layer::Layer;
use tower_service::Service;

/// An action that cancels the work behind a call, given the call's handle.
///
/// Run by a [`Slot`] dropped while filled, inside `drop`: it must not block, and it
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
/// Empty when created. [`fill`](Slot::fill) it once the call has its handle;
/// [`disarm`](Slot::disarm) it once the work it would cancel is over. Dropped while
/// filled, it runs its action with the handle; dropped empty, it does nothing.
///
/// Keep the slot in the call's future (move it into the `async` block) so that it is
/// dropped when the future is. Mind the error paths: a `?` that returns while the slot
/// is filled runs the action — disarm before propagating an error that means the work
/// is already over:
///
/// ```
/// # use tower_backstop::cancel::Slot;
/// # async fn query(_: &mut u32) -> Result<u32, ()> { Ok(1) }
/// # async fn call(mut slot: Slot<u32, fn(u32)>) -> Result<u32, ()> {
/// let conn = slot.fill(7);
/// let result = query(conn).await; // dropped here: cancelled
/// slot.disarm(); // an answer or an error, the query is over
/// result
/// # }
/// ```
pub struct Slot<H, C>
where
    C: Cancel<H>,
{
    handle: Option<H>,
    action: Option<C>,
}

impl<H, C> Slot<H, C>
where
    C: Cancel<H>,
{
    /// An empty slot that will run `action` if dropped while filled.
    pub fn new(action: C) -> Self {
        Slot {
            handle: None,
            action: Some(action),
        }
    }

    /// Puts the call's handle in the slot, arming it, and returns it for use.
    ///
    /// A handle already in the slot is dropped without running the action.
    pub fn fill(&mut self, handle: H) -> &mut H {
        self.handle.insert(handle)
    }

    /// Takes the handle back: the work is over and must not be cancelled.
    ///
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

    /// Whether the slot is filled: dropping it now would run the action.
    pub fn is_armed(&self) -> bool {
        self.handle.is_some()
    }

    /// Runs the action now if the slot is filled, as dropping it would.
    ///
    /// Returns whether the action ran. Either way the slot is spent: it will never run
    /// its action again, and filling it again only holds the handle.
    pub fn cancel(&mut self) -> bool {
        match (self.handle.take(), self.action.take()) {
            (Some(handle), Some(action)) => {
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
            .finish()
    }
}

/// Gives every call of the inner service an empty [`Slot`] carrying a cancel action.
///
/// The inner service is a `Service<(Req, Slot<H, C>)>`; `OnCancel` is a
/// `Service<Req>` with the same response, error and future types: it adds no future
/// of its own and nothing to a call but the slot, built from a clone of the action.
/// See the [module docs](self).
pub struct OnCancel<S, C, H> {
    inner: S,
    action: C,
    _handle: PhantomData<fn(H)>,
}

impl<S, C, H> OnCancel<S, C, H> {
    /// Wraps `inner`, giving each of its calls a slot that runs `action`.
    pub fn new(inner: S, action: C) -> Self {
        OnCancel {
            inner,
            action,
            _handle: PhantomData,
        }
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
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut task::Context<'_>) -> task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> S::Future {
        self.inner.call((req, Slot::new(self.action.clone())))
    }
}

impl<S: Clone, C: Clone, H> Clone for OnCancel<S, C, H> {
    fn clone(&self) -> Self {
        OnCancel::new(self.inner.clone(), self.action.clone())
    }
}

impl<S: fmt::Debug, C, H> fmt::Debug for OnCancel<S, C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnCancel")
            .field("inner", &self.inner)
            .field("action", &format_args!("{}", std::any::type_name::<C>()))
            .finish()
    }
}

/// Wraps a service in [`OnCancel`], with a cancel action.
///
/// The action is cloned into every call's [`Slot`]: give a closure that captures
/// cheap handles (an `Arc`, a channel sender, a pool), or none.
pub struct OnCancelLayer<C, H> {
    action: C,
    _handle: PhantomData<fn(H)>,
}

impl<C, H> OnCancelLayer<C, H> {
    /// A layer whose services run `action` for each call dropped while its slot is filled.
    pub fn new(action: C) -> Self {
        OnCancelLayer {
            action,
            _handle: PhantomData,
        }
    }
}

impl<S, C: Clone, H> Layer<S> for OnCancelLayer<C, H> {
    type Service = OnCancel<S, C, H>;

    fn layer(&self, inner: S) -> Self::Service {
        OnCancel::new(inner, self.action.clone())
    }
}

impl<C: Clone, H> Clone for OnCancelLayer<C, H> {
    fn clone(&self) -> Self {
        OnCancelLayer::new(self.action.clone())
    }
}

impl<C, H> fmt::Debug for OnCancelLayer<C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnCancelLayer")
            .field("action", &format_args!("{}", std::any::type_name::<C>()))
            .finish()
    }
}
