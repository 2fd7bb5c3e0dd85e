//! Coalescing: concurrent calls with equal keys share one call.
//!
//! Fifty requests for one key that is not in the cache make fifty database calls —
//! and fifty refills — unless they share one. [`Coalesce`] (built by
//! [`CoalesceLayer`], or by [`FallbackLayer::coalesce_by`](crate::FallbackLayer::coalesce_by)
//! around a fallback) gives every request a key with a [`CoalesceKey`]; a request whose
//! key equals that of a call **in flight** joins that call instead of starting one, and
//! gets its answer.
//!
//! ```
//! use std::{convert::Infallible, sync::{atomic::{AtomicUsize, Ordering}, Arc}};
//! use tower::{service_fn, ServiceExt};
//! use tower_backstop::coalesce::CoalesceLayer;
//! use tower_layer::Layer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let queries = Arc::new(AtomicUsize::new(0));
//! let counted = queries.clone();
//! let db = service_fn(move |id: u32| {
//!     counted.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         tokio::task::yield_now().await;
//!         Ok::<_, Infallible>(format!("row {id}"))
//!     }
//! });
//! // Requests for the same id share a call; the key is all that varies the answer.
//! let db = CoalesceLayer::new(|id: &u32| Some(*id)).layer(db);
//!
//! let rows = futures_util::future::join_all((0..50).map(|_| db.clone().oneshot(7))).await;
//! assert!(rows.iter().all(|row| row.as_deref() == Ok("row 7")));
//! assert_eq!(queries.load(Ordering::SeqCst), 1);
//! # }
//! ```
//!
//! # What is shared
//!
//! Every request that joined gets the call's answer, `Ok` or `Err`: each gets a clone
//! (the last one the answer itself), so the inner service's `Response` and `Error`
//! must be `Clone`. An error that is not can be made so with
//! `ServiceBuilder::map_err(Arc::new)` (or into an error type of your own) on the inner
//! service; the layer itself adds no error type, so its error is the inner service's,
//! `Infallible` stays `Infallible`, and a [`Fallback`](crate::Fallback) without
//! coalescing is unchanged. A readiness error of the inner service is the call's answer
//! too.
//!
//! Nothing is cached: a request that arrives after the call ended starts a new one.
//! A request whose key is `None` is never shared.
//!
//! # The key decides who gets whose answer
//!
//! Two requests with equal keys get **the same answer**. A key that leaves out
//! something the answer depends on hands one caller's answer to another: with an
//! `Authorization` or `Cookie` header, one user's data to another user — a data leak.
//! Put in the key everything that varies the answer (for HTTP: the method, the URI,
//! the headers the answer varies by, the identity of the caller), or return `None` for
//! requests that must not be shared. The `http` module has a ready-made HTTP key,
//! `HttpKey` (feature `http`), that leaves requests carrying credentials unshared
//! unless told otherwise.
//!
//! # No waiter is special
//!
//! A waiter that goes away — its primary was accepted, so [`Fallback`](crate::Fallback)
//! dropped it; its caller left; a timeout fired — leaves the call, and the call goes
//! on for the others. Only when **the last waiter leaves** is the call's future
//! dropped, once, as a call of the inner service would be: an
//! [`OnCancel`](crate::cancel::OnCancel) slot inside it fires then, and only then.
//!
//! Leaving costs one lock of the layer's map. While the call goes on, what it costs
//! the backend is paid for the remaining waiters; the call is driven by the waiters
//! themselves, with no task spawned (no runtime needed): the request that started it
//! drives it, the others sleep until woken, and a driver that leaves wakes another to
//! take over. The starter drives from its first poll: a future made by `call` and not
//! yet awaited (never the case under [`Fallback`](crate::Fallback), which polls its
//! fallback's future as it calls it) holds up the requests that join it until it is
//! polled or dropped. So a call abandoned by its driver makes no progress until another waiter is
//! polled again, which its waker sees to at once.
//!
//! # Panics
//!
//! A panic in the shared call (the inner service's `poll_ready`, `call`, future, or
//! the clone of its answer) unwinds out of the poll of the waiter that was driving
//! it; every other waiter panics with "the coalesced call this request joined
//! panicked", at its next poll (it is woken for it) — none hangs. The call is gone:
//! the next request with that key starts a new one.
//!
//! # Bounds and cost
//!
//! - The map holds one entry per call in flight (and per answered call not yet
//!   collected by all its waiters): entries leave when a call ends or its last waiter
//!   leaves. It is shared, behind one lock, by every clone of a service and every
//!   service one layer makes — an `Arc` made by the layer, no global state — and works
//!   from any thread.
//! - A call allocates once (its boxed future: it must outlive any one waiter); a
//!   joiner allocates nothing in steady state. A request with a key takes the lock
//!   twice or so (at `call`, at its polls, when it leaves) and hashes its key once
//!   (with std's `RandomState`, resistant to keys chosen to collide).
//! - `poll_ready` is always ready: joining needs nothing of the inner service; the
//!   request that starts a call drives a clone of it to readiness inside the call.
//! - The inner service, its future, the request, the key, the response and the error
//!   must be `Send + 'static`: the map is shared across threads.
//! - Unused, coalescing costs nothing: no layer without it holds, checks or locks
//!   anything of it.
//!
//! # Seeing what it did
//!
//! [`Snapshot::coalesce_joined`](crate::outcome::Snapshot::coalesce_joined) counts the
//! requests that joined a call in flight, and
//! [`coalesce_answered`](crate::outcome::Snapshot::coalesce_answered),
//! [`coalesce_dropped`](crate::outcome::Snapshot::coalesce_dropped) and
//! [`coalesce_panicked`](crate::outcome::Snapshot::coalesce_panicked) how the calls
//! ended; the `metrics` feature reports the same, and with `tracing` a debug event
//! marks each join and the end of each call that was shared or did not answer.

mod calls;
mod future;
mod key;
mod observe;
mod service;

pub use self::{
    future::ResponseFuture,
    key::CoalesceKey,
    service::{Coalesce, CoalesceLayer},
};

pub(crate) use self::{calls::Registry, future::mark, observe::Observers};
