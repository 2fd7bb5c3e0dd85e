//! The response future of [`Coalesce`](super::Coalesce).

use super::calls::{Calls, Join, Registry, Step, Ticket};
use pin_project_lite::pin_project;
use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tower_service::Service;

pin_project! {
    /// Response future of [`Coalesce`](super::Coalesce).
    ///
    /// For a request with a key, a place in the shared call for that key; for one
    /// without, the request's own call of the inner service. Dropping it leaves the
    /// shared call, which goes on while another request waits for it and is dropped
    /// with its last waiter.
    ///
    /// # Panics
    ///
    /// If the shared call panics, the request whose poll ran it panics with that
    /// panic, and every other waiter with "the coalesced call this request joined
    /// panicked". Like most futures, it panics if polled after it completed.
    pub struct ResponseFuture<S, Req, Key>
    where
        S: Service<Req>,
    {
        #[pin]
        kind: Kind<S, Req, Key>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, Req, Key>
    where
        S: Service<Req>,
    {
        // A request without a key: a call of its own.
        Alone {
            #[pin]
            call: Oneshot<S, Req>,
        },
        Waiting {
            waiter: Waiter<Key, Oneshot<S, Req>, S::Response, S::Error>,
        },
    }
}

type CallsOf<S, Req, Key> =
    Calls<Key, Oneshot<S, Req>, <S as Service<Req>>::Response, <S as Service<Req>>::Error>;

impl<S, Req, Key> ResponseFuture<S, Req, Key>
where
    S: Service<Req>,
{
    pub(crate) fn alone(svc: S, req: Req) -> Self {
        ResponseFuture {
            kind: Kind::Alone {
                call: Oneshot::new(svc, req),
            },
        }
    }
}

impl<S, Req, Key> ResponseFuture<S, Req, Key>
where
    S: Service<Req> + Send + 'static,
    S::Future: Send,
    S::Response: Clone + Send + 'static,
    S::Error: Clone + Send + 'static,
    Req: Send + 'static,
    Key: std::hash::Hash + Eq + Send + 'static,
{
    /// Joins the call in flight for `key` or starts one, calling `svc` with `req`.
    pub(crate) fn shared(
        registry: &Arc<Registry>,
        key: Key,
        svc: impl FnOnce() -> S,
        req: Req,
    ) -> Self {
        let hash = registry.hash(&key);
        let joined = registry.run(|calls: &mut CallsOf<S, Req, Key>, _, _, observers| {
            calls.join(hash, key, || Oneshot::new(svc(), req), observers)
        });
        let (ticket, fut, unused) = match joined {
            Join::Started(ticket, fut) => (ticket, Some(fut), None),
            Join::Joined(ticket, key, start) => (ticket, None, Some((key, start))),
        };
        let waiter = Waiter {
            registry: registry.clone(),
            ticket,
            fut,
            done: false,
            mark: 0,
            leave: leave::<Key, Oneshot<S, Req>, S::Response, S::Error>,
            _types: PhantomData,
        };
        // CORRECTNESS: a joiner's key and request (in its unused start) are dropped
        // outside the lock, and once its waiter holds its ticket: if their drop panics,
        // the waiter's own drop leaves the call.
        drop(unused);
        ResponseFuture {
            kind: Kind::Waiting { waiter },
        }
    }
}

impl<S, Req, Key> Future for ResponseFuture<S, Req, Key>
where
    S: Service<Req> + Send + 'static,
    S::Future: Send,
    S::Response: Clone + Send + 'static,
    S::Error: Clone + Send + 'static,
    Req: Send + 'static,
    Key: Eq + Send + 'static,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let address = std::ptr::from_ref(&*self).addr();
        match self.project().kind.project() {
            KindProj::Alone { call } => call.poll(cx),
            KindProj::Waiting { waiter } => waiter.poll(cx, address),
        }
    }
}

impl<S, Req, Key> fmt::Debug for ResponseFuture<S, Req, Key>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Alone { .. } => f
                .debug_struct("ResponseFuture")
                .field("shared", &false)
                .finish(),
            Kind::Waiting { waiter } => f
                .debug_struct("ResponseFuture")
                .field("shared", &true)
                .field("ticket", &waiter.ticket)
                .field("done", &waiter.done)
                .finish(),
        }
    }
}

/// The types of a call, for a waiter that holds none of them by value: `Send` and
/// `Sync` whatever they are.
type Types<Key, Fut, T, E> = PhantomData<fn() -> (Key, Fut, T, E)>;

/// One request's place in a shared call. Dropped unanswered, it leaves the call.
pub(crate) struct Waiter<Key, Fut, T, E> {
    registry: Arc<Registry>,
    ticket: Ticket,
    /// The call's future, while this waiter drives it.
    fut: Option<Pin<Box<Fut>>>,
    /// Answered, or out of the call after a panic: nothing left to leave.
    done: bool,
    /// The address this waiter's answer was marked as shared at, if it was: see [`mark`].
    mark: usize,
    leave: fn(&Registry, Ticket, Option<Pin<Box<Fut>>>),
    _types: Types<Key, Fut, T, E>,
}

impl<Key, Fut, T, E> Waiter<Key, Fut, T, E>
where
    Key: Eq + Send + 'static,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Clone + Send + 'static,
    E: Clone + Send + 'static,
{
    fn poll(&mut self, cx: &mut Context<'_>, address: usize) -> Poll<Result<T, E>> {
        assert!(!self.done, "`ResponseFuture` polled after completion");
        let ticket = self.ticket;
        let miss = mark::take_miss();
        if self.fut.is_none() {
            let step = self
                .registry
                .run(|calls: &mut Calls<Key, Fut, T, E>, _, garbage, _| {
                    calls.poll(ticket, cx, garbage, miss)
                });
            match step {
                Step::Ready(answer, skip) => {
                    self.done = true;
                    // Another waiter, already a miss, refills: not this request.
                    if skip {
                        self.mark = address;
                        mark::set(address);
                    }
                    return Poll::Ready(answer);
                }
                Step::Pending => return Poll::Pending,
                Step::Panicked => {
                    self.done = true;
                    panic!("the coalesced call this request joined panicked");
                }
                Step::Drive(fut) => self.fut = Some(fut),
            }
        }
        let Some(fut) = self.fut.as_mut() else {
            unreachable!("a driver holds the call's future")
        };
        // This waiter drives the call, holding its future: no lock until it answers. If
        // the poll panics, the guard tells the other waiters (the future is dropped with
        // this waiter).
        let mut guard = DriveGuard::<'_, Key, Fut, T, E> {
            registry: &self.registry,
            ticket,
            done: &mut self.done,
            armed: true,
            _types: PhantomData,
        };
        let answer = match fut.as_mut().poll(cx) {
            Poll::Ready(answer) => answer,
            Poll::Pending => {
                guard.armed = false;
                return Poll::Pending;
            }
        };
        let fut = self.fut.take().expect("polled just above");
        let (answer, skip) = self.registry.run(
            |calls: &mut Calls<Key, Fut, T, E>, wake, garbage, observers| {
                calls.driven(ticket, fut, answer, wake, garbage, observers, miss)
            },
        );
        guard.armed = false;
        *guard.done = true;
        if skip {
            self.mark = address;
            mark::set(address);
        }
        Poll::Ready(answer)
    }
}

impl<Key, Fut, T, E> Drop for Waiter<Key, Fut, T, E> {
    fn drop(&mut self) {
        if self.mark != 0 {
            mark::clear(self.mark);
        }
        if !self.done {
            (self.leave)(&self.registry, self.ticket, self.fut.take());
        }
    }
}

/// Leaves the call, for a waiter dropped unanswered: through a function pointer made
/// where the map's type is known (a `Drop` impl cannot have the bounds it needs).
fn leave<Key, Fut, T, E>(registry: &Registry, ticket: Ticket, fut: Option<Pin<Box<Fut>>>)
where
    Key: Eq + Send + 'static,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Clone + Send + 'static,
    E: Clone + Send + 'static,
{
    registry.run(
        |calls: &mut Calls<Key, Fut, T, E>, wake, garbage, observers| {
            calls.leave(ticket, fut, wake, garbage, observers)
        },
    );
}

/// Marks a driven call as panicked if its poll unwinds.
struct DriveGuard<'a, Key, Fut, T, E>
where
    Key: Eq + Send + 'static,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Clone + Send + 'static,
    E: Clone + Send + 'static,
{
    registry: &'a Registry,
    ticket: Ticket,
    done: &'a mut bool,
    armed: bool,
    _types: Types<Key, Fut, T, E>,
}

impl<Key, Fut, T, E> Drop for DriveGuard<'_, Key, Fut, T, E>
where
    Key: Eq + Send + 'static,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Clone + Send + 'static,
    E: Clone + Send + 'static,
{
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // The driver is out of the call: its own drop must not leave it again.
        *self.done = true;
        let ticket = self.ticket;
        self.registry.run(
            |calls: &mut Calls<Key, Fut, T, E>, wake, garbage, observers| {
                calls.panicked(ticket, wake, garbage, observers)
            },
        );
    }
}

/// The mark a coalesced answer handed to a joiner leaves for the `Fallback` future
/// polling it, so that the refill runs once per shared call rather than once per
/// waiter.
///
/// The mark is the address of the response future that returned the answer, in a
/// thread-local: the `Fallback` future that polled it reads it right after the poll,
/// comparing it with its fallback future's address, so a mark left by any other future
/// (a `Coalesce` used elsewhere, whose answer nobody reads this way) never matches; and
/// a response future clears its mark when dropped, so no later future at the same
/// address finds it.
pub(crate) mod mark {
    use std::cell::Cell;

    thread_local! {
        static MARK: Cell<usize> = const { Cell::new(0) };
        /// Set by the `Fallback` future, around its poll of the fallback's future,
        /// when its request is already a miss (its primary was rejected) and it has a
        /// refill to make: read (and cleared) by the coalesced response future polled.
        static MISS: Cell<bool> = const { Cell::new(false) };
    }

    /// The `Fallback` future polls its fallback's future for a request that is a miss
    /// already (`true`), and then again `false`.
    #[inline]
    pub(crate) fn expect_miss(miss: bool) {
        let _ = MISS.try_with(|m| m.set(miss));
    }

    /// Whether the `Fallback` future polling this one said its request is a miss.
    pub(super) fn take_miss() -> bool {
        MISS.try_with(|m| m.replace(false)).unwrap_or(false)
    }

    pub(super) fn set(address: usize) {
        let _ = MARK.try_with(|m| m.set(address));
    }

    pub(super) fn clear(address: usize) {
        let _ = MARK.try_with(|m| {
            if m.get() == address {
                m.set(0);
            }
        });
    }

    /// Whether `fut`, which just returned its answer, is a coalesced response future
    /// (or starts with one) whose call's refill another waiter claimed; clears the mark.
    #[inline(never)]
    pub(crate) fn shared<F>(fut: &F) -> bool {
        let address = std::ptr::from_ref(fut).addr();
        MARK.try_with(|m| {
            let hit = m.get() == address && address != 0;
            if hit {
                m.set(0);
            }
            hit
        })
        .unwrap_or(false)
    }
}

pin_project! {
    /// One call of a clone of the inner service: driven to readiness, then called, the
    /// way `tower::util::Oneshot` does. A shared call is one of these, boxed.
    #[project = OneshotProj]
    pub(crate) enum Oneshot<S, Req>
    where
        S: Service<Req>,
    {
        NotReady {
            svc: S,
            req: Option<Req>,
        },
        Called {
            #[pin]
            fut: S::Future,
        },
        Done,
    }
}

impl<S, Req> Oneshot<S, Req>
where
    S: Service<Req>,
{
    fn new(svc: S, req: Req) -> Self {
        Oneshot::NotReady {
            svc,
            req: Some(req),
        }
    }
}

impl<S, Req> Future for Oneshot<S, Req>
where
    S: Service<Req>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                OneshotProj::NotReady { svc, req } => {
                    // A readiness error is the call's answer, shared like any other.
                    if let Err(error) = std::task::ready!(svc.poll_ready(cx)) {
                        self.set(Oneshot::Done);
                        return Poll::Ready(Err(error));
                    }
                    let req = req.take().expect("request is present until called");
                    let fut = svc.call(req);
                    self.set(Oneshot::Called { fut });
                }
                OneshotProj::Called { fut } => {
                    let answer = std::task::ready!(fut.poll(cx));
                    self.set(Oneshot::Done);
                    return Poll::Ready(answer);
                }
                OneshotProj::Done => panic!("coalesced call polled after completion"),
            }
        }
    }
}
